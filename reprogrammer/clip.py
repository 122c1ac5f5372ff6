"""Loading CLIP models: any open_clip architecture, plus the toolkit's small ones.

`pretrained` may be an open_clip tag (downloaded where the hub is reachable), a local checkpoint
file (open_clip's `.pt`/`.bin`/`.safetensors` formats), `"shapeworld"` for the toolkit's own
weights shipped with the package (`weights/`, hash-checked; built-in architectures only), or None
for random weights. Models named
`hf-hub:ORG/REPO` or `local-dir:PATH` (a folder with open_clip's `open_clip_config.json` and a
weights file such as `open_clip_model.safetensors`) carry their own weights: `pretrained` stays None.
"""
import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Optional

import open_clip
import torch

from .config import Config, ConfigError
from .constants import CLIP_MEAN, CLIP_STD
from .files import file_sha256

# `RP-ViT-Tiny` (tests) and `RP-ViT-Small` (the built-in default) are ordinary open_clip configs.
open_clip.add_model_config(Path(__file__).parent / "model_configs")

BUILT_IN = ("RP-ViT-Tiny", "RP-ViT-Small")
#: The shape-world weights shipped with the package: `<model>.safetensors` (fp16) and `<model>.json`,
#: their record (pretraining config, command, SHA-256, zero-shot accuracy; see shapeworld/shipped.py).
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED = "shapeworld"
SELF_CONTAINED = ("hf-hub:", "local-dir:")
# The weight files open_clip 3.x looks for in a local-dir folder (factory._find_checkpoint_in_dir).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


def _random_weights(name: str) -> bool:
    """Whether `name` loaded with pretrained=None gets random weights: a plain architecture does, an
    hf-hub: model does not (open_clip downloads its weights with its config), a local-dir: folder
    does when it holds no weights file."""
    if name.startswith("hf-hub:"):
        return False
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        return folder.is_dir() and not any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir())
    return True


def shipped_record(name: str) -> Optional[dict]:
    """The record of `name`'s shipped weights, or None when none ship with the package."""
    path = WEIGHTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_weights(name: str) -> Path:
    """The checked path of `name`'s shipped weights; loading never pretrains."""
    if name not in BUILT_IN:
        raise ConfigError(
            f"pretrained={SHIPPED} exists only for the built-in architectures {', '.join(BUILT_IN)}, not {name!r}; "
            "use an open_clip tag (e.g. openai) or a checkpoint file, or null for an hf-hub: or local-dir: model")
    record = shipped_record(name)
    if record is None:
        raise FileNotFoundError(
            f"no {SHIPPED} weights ship for {name} (only for "
            f"{', '.join(p.stem for p in sorted(WEIGHTS_DIR.glob('*.json')))}); make them with "
            f"`reprogrammer pretrain --model {name} --out DIR` and pass pretrained=DIR/{name}.safetensors")
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file() or file_sha256(path) != record["weights_sha256"]:
        raise ValueError(f"the shipped weights {path} are missing or do not match their recorded SHA-256; "
                         "reinstall the package (or rebuild them with `reprogrammer pretrain`)")
    return path


#: Architectures already warned about: one warning a process, however many callers load them.
_WARNED_RANDOM: set = set()


@contextlib.contextmanager
def _without_open_clips_random_weights_notice():
    """open_clip logs "No pretrained weights loaded" on every random load; the warning above says it
    once, with the fix, so open_clip's notice is dropped."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_clip(name: str, pretrained: Optional[str] = None, *, device="cpu", cache_dir: Optional[str] = None):
    """Return `(model, tokenizer)` for an open_clip architecture, in eval mode on `device`."""
    if pretrained == SHIPPED:
        pretrained = str(shipped_weights(name))
    if name not in open_clip.list_models() and not name.startswith(SELF_CONTAINED):
        raise ValueError(
            f"unknown CLIP architecture {name!r}; use one of open_clip.list_models() "
            "(e.g. 'ViT-B-32', 'ViT-B-16', 'ViT-L-14', or the toolkit's 'RP-ViT-Tiny', 'RP-ViT-Small')"
        )
    if name.startswith(SELF_CONTAINED) and pretrained is not None:
        raise ValueError(f"{name} carries its own weights; set pretrained (model.pretrained) to null, "
                         f"not {pretrained!r}")
    if pretrained is None:
        if _random_weights(name) and name not in _WARNED_RANDOM:
            _WARNED_RANDOM.add(name)
            warnings.warn(
                f"{name} has random weights (pretrained=None): features are meaningless until it is trained; "
                "pass an open_clip pretrained tag or a checkpoint file", stacklevel=2)
    elif not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither an existing checkpoint file nor an open_clip tag for {name} "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})"
        )
    with _without_open_clips_random_weights_notice():
        model = open_clip.create_model(name, pretrained=pretrained, device=device, cache_dir=cache_dir)
    model.eval()
    return model, open_clip.get_tokenizer(name)


def clip_from_config(cfg: Config, *, device="cpu"):
    """`(model, tokenizer)` for a run's `model` section.

    `pretrained: null` draws random weights from `train.seed`, so that training, evaluation and
    export of such a run see the same backbone.
    """
    if cfg.model.pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            return load_clip(cfg.model.name, None, device=device)
    return load_clip(cfg.model.name, cfg.model.pretrained, device=device)


def image_normalisation(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std of the model's preprocessing config (CLIP's own when it has none)."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))


def save_clip(model, path) -> None:
    """Write the model's weights as an open_clip-loadable safetensors file."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
