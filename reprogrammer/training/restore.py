"""The CLIP a config names, and the trained classifier a run directory holds."""
from pathlib import Path
from typing import Optional

import torch

from ..clip import load_clip
from ..config import Config, ConfigError, from_dict
from ..methods import build_method
from . import checkpoint as ckpt

BUILT_IN = ("RP-ViT-Tiny", "RP-ViT-Small")


def clip_from_config(cfg: Config, *, device="cpu"):
    """`(model, tokenizer)` for a run's `model` section.

    `pretrained: shapeworld` is the built-in CLIP pretrained on the shape world (built-in
    architectures only); `pretrained: null` draws random weights from `train.seed`, so training,
    evaluation and export of such a run see the same backbone.
    """
    model = cfg.model
    if model.pretrained == "shapeworld":
        if model.name not in BUILT_IN:
            raise ConfigError(
                f"model.pretrained=shapeworld exists only for the built-in architectures {', '.join(BUILT_IN)}, "
                f"not {model.name!r}; set model.pretrained to an open_clip tag (e.g. openai), an hf-hub: model "
                "or a checkpoint file")
        from ..shapeworld.shipped import builtin_clip

        return builtin_clip(model.name, device=device)[:2]
    if model.pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            return load_clip(model.name, None, device=device)
    return load_clip(model.name, model.pretrained, device=device)


def load_run(run_dir, which: str = "best", *, device="cpu", clip=None, alpha: Optional[float] = None):
    """`(classifier, config, meta)` of the `which` checkpoint (`best`, `latest` or `step-N`) of a run,
    in eval mode. A Reprogrammer classifier comes with the run's residual blend `method.alpha`
    (Residual Reprogrammer; 0.4 by default) unless `alpha` says otherwise (0: plain Reprogrammer)."""
    path = ckpt.find_checkpoint(Path(run_dir), which)
    meta = ckpt.read_meta(path)
    cfg = from_dict(Config, meta["config"])
    clip, tokenizer = clip if clip is not None else clip_from_config(cfg, device=device)
    classifier = build_method(clip, tokenizer, meta["classnames"], cfg.method).to(device)
    try:
        classifier.load_learned_state(ckpt.load_learned(path))
    except (ValueError, KeyError) as error:
        raise ckpt.CheckpointError(f"{path} does not fit {cfg.method.name} on {cfg.model.name}: {error}") from error
    if hasattr(classifier, "alpha"):
        classifier.alpha = cfg.method.alpha if alpha is None else alpha
    elif alpha is not None:
        raise ValueError(f"alpha applies to Reprogrammer runs only, this run trained {cfg.method.name}")
    classifier.eval()
    return classifier, cfg, meta
