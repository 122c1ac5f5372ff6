"""Rebuild a trained classifier from a run directory (for evaluation and export)."""
from pathlib import Path

from . import checkpoint as ckpt
from .clip import load_pretrained
from .config import from_dict, Config
from .methods import build_method


def load_run(run_dir, which: str = "best", *, device="cpu", clip=None):
    """`(classifier, config, meta)` of the `which` checkpoint (`best`, `latest` or `step-N`) of a run."""
    path = ckpt.find_checkpoint(Path(run_dir), which)
    meta = ckpt.read_meta(path)
    cfg = from_dict(Config, meta["config"])
    clip, tokenizer = clip if clip is not None else load_pretrained(cfg.model, device=device)
    classifier = build_method(clip, tokenizer, meta["classnames"], cfg.method).to(device)
    try:
        classifier.load_learned_state(ckpt.load_learned(path))
    except (ValueError, KeyError) as error:
        raise ckpt.CheckpointError(f"{path} does not fit {cfg.method.name} on {cfg.model.name}: {error}") from error
    classifier.eval()
    return classifier, cfg, meta
