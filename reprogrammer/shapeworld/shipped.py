"""The shape-world CLIP shipped with the package, and the `reprogrammer pretrain` command that
reproduces it.

`reprogrammer/weights/<model>.safetensors` holds fp16 weights; `<model>.json` beside it their
record: the exact pretraining config, thread count and command, the weights' SHA-256, and the
zero-shot accuracy they reach (the full table and a small sample the tests recompute). Loading them
is `clip.load_clip(name, "shapeworld")`; only the demo pretrains (and caches) a model that ships none.
"""
import dataclasses
import platform
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from ..clip import SHIPPED, load_clip, shipped_record
from ..data import shapeworld
from ..files import file_sha256, write_atomically, write_json_atomically
from .pretrain import (
    PretrainConfig,
    cached_report,
    evaluate_zero_shot,
    load_shapeworld_clip,
    pretrain_shapeworld,
    zero_shot_accuracy,
)

#: The record's small zero-shot sample: this many test images per set of the config's world,
#: few enough for a test to recompute in seconds.
SAMPLE_SIZE = 200


def record_config(record: dict) -> PretrainConfig:
    cfg = dict(record["config"])
    return PretrainConfig(**{**cfg, "resolutions": tuple(cfg["resolutions"])})


def builtin_clip(name: str, device="cpu", *, config: Optional[PretrainConfig] = None, progress: bool = True):
    """`(model, tokenizer, record)` of the shape-world CLIP: the shipped weights when `config` is
    None and they exist, else pretrained with `config` (or the default one) and cached."""
    record = shipped_record(name) if config is None else None
    if record is not None:
        return (*load_clip(name, SHIPPED, device=device), record)
    model, tokenizer = load_shapeworld_clip(name, device, config=config, progress=progress)
    return model, tokenizer, cached_report(name, config=config)


def zero_shot_sample(model, tokenizer, cfg: PretrainConfig) -> dict[str, float]:
    """Zero-shot accuracy on the first `SAMPLE_SIZE` test images of every set of the config's world."""
    bench = shapeworld.downstream_benchmark(cfg.seed, cfg.eval_resolution, n_train=0, n_val=0,
                                            n_test=SAMPLE_SIZE, n_shift=SAMPLE_SIZE, n_ood=0)
    sets = {"id": bench["test"], **bench["covariate"]}
    return {name: zero_shot_accuracy(model, tokenizer, bench["classnames"], *data) for name, data in sets.items()}


def _round_to_fp16(model) -> dict[str, torch.Tensor]:
    """Round the model's floating-point weights to fp16 in place; returns the fp16 state to save."""
    state = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            half = value.detach().to(torch.float16) if value.is_floating_point() else value.detach()
            value.copy_(half)
            state[key] = half.contiguous().cpu()
    return state


def parse_overrides(base: PretrainConfig, overrides) -> PretrainConfig:
    """`base` with `key=value` overrides of its fields (`resolutions=32,24` for the tuple)."""
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad pretraining override {item!r}: use KEY=VALUE with KEY one of {sorted(fields)}")
        if key == "resolutions":
            changes[key] = tuple(int(v) for v in value.split(","))
        else:
            parsed = yaml.safe_load(value)
            expected = type(getattr(base, key))
            if expected is float and isinstance(parsed, int):
                parsed = float(parsed)
            if not isinstance(parsed, expected) or isinstance(parsed, bool):
                raise ValueError(f"pretraining override {key}={value!r} must be a {expected.__name__}")
            changes[key] = parsed
    return dataclasses.replace(base, **changes)


def run_pretrain(out_dir, *, model: str = "RP-ViT-Small", overrides=(), threads: Optional[int] = None,
                 progress: bool = True) -> dict:
    """Pretrain `model` (the shipped config with `overrides`) and write fp16 weights and their record.

    Writes `<out>/<model>.safetensors` and `<out>/<model>.json`. When the config and thread count
    are the shipped ones, the weights must equal the shipped weights bit for bit: a different
    hash raises RuntimeError (after writing), naming what differs from the recorded run.
    """
    shipped = shipped_record(model)
    base = record_config(shipped) if shipped else dataclasses.replace(PretrainConfig(), model=model)
    cfg = parse_overrides(base, overrides)
    if cfg.model != model:
        raise ValueError(f"override model={cfg.model!r} differs from --model {model!r}; pass --model")
    if threads is None and shipped:
        threads = shipped["threads"]
    clip, tokenizer, report = pretrain_shapeworld(cfg, progress=progress, threads=threads)
    state = _round_to_fp16(clip)
    clip.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{model}.safetensors"
    write_atomically(weights, lambda temp: save_file(state, str(temp)))
    record = {
        "model": model,
        "config": dataclasses.asdict(cfg),
        "threads": report["threads"],
        "command": " ".join(["reprogrammer pretrain", f"--out {out_dir}", f"--model {model}",
                             f"--threads {report['threads']}", *(f"--set {o}" for o in overrides)]),
        "weights_sha256": file_sha256(weights),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "seconds": report["seconds"],
        "train_seconds": report["train_seconds"],
        "images_per_second": report["images_per_second"],
        "first_loss": report["first_loss"],
        "final_loss": report["final_loss"],
        "zero_shot_template": report["zero_shot_template"],
        # Measured on the fp16 weights as shipped, not on the fp32 ones that trained.
        "zero_shot_accuracy": evaluate_zero_shot(clip, tokenizer, cfg),
        "zero_shot_sample": {"size": SAMPLE_SIZE, "accuracy": zero_shot_sample(clip, tokenizer, cfg)},
    }
    if shipped:
        record["shipped_sha256"] = shipped["weights_sha256"]
    write_json_atomically(out / f"{model}.json", record)
    if shipped and cfg == base and record["threads"] == shipped["threads"] \
            and record["weights_sha256"] != shipped["weights_sha256"]:
        raise RuntimeError(
            f"{weights} differs from the shipped weights (SHA-256 {record['weights_sha256'][:16]}... vs "
            f"{shipped['weights_sha256'][:16]}...): bit-for-bit reproduction needs the recorded torch "
            f"{shipped['torch']} and numpy {shipped['numpy']} on a {shipped['machine']} CPU "
            f"(here torch {torch.__version__}, numpy {np.__version__})")
    return record
