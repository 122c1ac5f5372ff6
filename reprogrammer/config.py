"""Typed run configuration: dataclasses read from YAML, with `--set key=value` overrides.

Unknown keys and values of the wrong type are rejected with a message naming the key.
"""
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .constants import MCM_TEMPERATURE, RESIDUAL_ALPHA
from .runtime import PRECISIONS

PRESETS = Path(__file__).parent / "presets"
#: Where `train.report_to` may send the training metrics (see training/tracking.py).
REPORTERS = ("jsonl", "tensorboard", "csv")


@dataclass
class ModelConfig:
    name: str = "RP-ViT-Small"
    #: open_clip tag, checkpoint file, "shapeworld" (the built-in pretrained model) or None.
    pretrained: Optional[str] = "shapeworld"


@dataclass
class DataConfig:
    dataset: str = "shapeworld"
    root: Optional[str] = None
    #: resize + centre-crop on load (None: the dataset's own resolution).
    image_resolution: Optional[int] = None
    #: validation split carved from the training set: a fraction (< 1) or a count.
    val_size: float = 0.1
    classnames_file: Optional[str] = None
    #: unreadable image files are skipped and counted; more than this fraction is an error.
    max_skipped_fraction: float = 0.01
    #: worker processes reading image files (None: one per core); in-memory sets need none.
    num_workers: Optional[int] = None
    #: a set whose uint8 tensor fits this many GiB lives on the device (None: a quarter of its memory).
    memory_budget_gb: Optional[float] = None
    #: folder written by `reprogrammer data cache`: training reads its images, no decoding.
    cache: Optional[str] = None
    #: shapeworld sizes
    n_train: int = 4000
    n_test: int = 1000


@dataclass
class MethodConfig:
    """Hyper-parameters of a method; `None` takes the method's own default (the authors')."""
    name: str = "reprogrammer"
    template: str = "a photo of a {}"
    # Reprogrammer
    up_resolution: Optional[int] = None
    mr_resolution: Optional[int] = None
    dropout: float = 0.0
    alpha: float = RESIDUAL_ALPHA
    train_residual: bool = False
    image_lr: float = 5e-3
    text_lr: float = 5e-4
    # baselines
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    n_ctx: int = 16
    wise_alphas: list = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    lp_epochs: Optional[int] = None
    # shared
    warmup_steps: Optional[int] = None


@dataclass
class TrainConfig:
    batch_size: int = 128
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    grad_accum: int = 1
    seed: int = 1
    precision: str = "fp32"
    compile: str = "none"
    device: str = "auto"
    log_every: int = 10
    #: validate every N optimiser steps and at the last (null: at each save_every checkpoint); a new best is saved
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    keep_checkpoints: int = 2
    #: metric writers, any of REPORTERS
    report_to: list = field(default_factory=lambda: ["jsonl"])


@dataclass
class EvalConfig:
    #: covariate-shift and OOD sets as {registry name: root}; empty: the paper's sets for the ID
    #: dataset (docs/method.md 7) found under `data.root`'s parent folder.
    covariate: dict = field(default_factory=dict)
    semantic: dict = field(default_factory=dict)
    #: ID test set {dataset: NAME, root: PATH} for datasets without a test split (imagefolder, csv).
    test: dict = field(default_factory=dict)
    alphas: list = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    batch_size: int = 256
    temperature: float = MCM_TEMPERATURE
    bootstrap: int = 0
    num_workers: Optional[int] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        choices = {"train.precision": (self.train.precision, tuple(PRECISIONS)),
                   "train.compile": (self.train.compile, ("none", "model", "step"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
        unknown = [name for name in self.train.report_to if name not in REPORTERS]
        if unknown:
            raise ConfigError(f"train.report_to={self.train.report_to!r}: {', '.join(map(repr, unknown))} is not one "
                              f"of {', '.join(REPORTERS)}")
        for key in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self.train, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self.train, key)}")
        # Optional counts: None means "the default" (epochs, warm-up) or "no limit" (max_steps), never 0.
        at_least = {"train.epochs": (self.train.epochs, 1), "train.max_steps": (self.train.max_steps, 1),
                    "train.save_every": (self.train.save_every, 1), "train.eval_every": (self.train.eval_every, 1),
                    "method.warmup_steps": (self.method.warmup_steps, 0),
                    "data.num_workers": (self.data.num_workers, 0), "eval.num_workers": (self.eval.num_workers, 0),
                    "eval.batch_size": (self.eval.batch_size, 1)}
        for key, (value, low) in at_least.items():
            if value is not None and value < low:
                raise ConfigError(f"{key} must be >= {low} (or null for its default), got {value}")
        if not 0.0 <= self.data.max_skipped_fraction <= 1.0:
            raise ConfigError(f"data.max_skipped_fraction must lie in [0, 1] (a fraction of the files), "
                              f"got {self.data.max_skipped_fraction}")
        if self.train.batch_size % self.train.grad_accum:
            raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by "
                              f"train.grad_accum={self.train.grad_accum}")
        return self


class ConfigError(ValueError):
    pass


def _check_type(key: str, value: Any, annotation) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads exponent literals without a dot (1e-3) as strings
            return float(value)
        except ValueError:
            pass
    for kind in (list, dict):
        if annotation is kind or origin is kind:
            if not isinstance(value, kind):
                raise ConfigError(f"{key} must be a {kind.__name__}, got {value!r}")
            return value
    if annotation in (int, float, str, bool) and not (isinstance(value, annotation) and
                                                      not (annotation is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
                          f"{prefix or 'top level'} accepts {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _check_type(prefix + name, value, hint)
    return cls(**values)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or a preset name such as `cifar10`), apply `section.key=value` overrides."""
    data: dict = {}
    if path is not None:
        file = Path(path)
        if not file.exists() and (PRESETS / f"{path}.yaml").exists():
            file = PRESETS / f"{path}.yaml"
        if not file.exists():
            presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise ConfigError(f"config {path!r} is neither a file nor a preset ({presets})")
        data = yaml.safe_load(file.read_text()) or {}
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return from_dict(Config, data).validate()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The whole resolved config as YAML that `load_config` reads back to an equal `Config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def list_presets() -> dict[str, str]:
    """`{preset name: description}`, the description being the first comment line of its file."""
    presets = {}
    for file in sorted(PRESETS.glob("*.yaml")):
        first = next(iter(file.read_text().splitlines()), "")
        presets[file.stem] = first.removeprefix("#").strip() if first.startswith("#") else ""
    return presets
