"""The Python entry points behind the CLI: train, evaluate, load a trained run, export it."""
from pathlib import Path
from typing import Optional, Sequence, Union

from .config import Config, load_config


def _config(config: Union[str, Path, Config, None], overrides: Sequence[str]) -> Config:
    if isinstance(config, Config):
        if overrides:
            raise ValueError("overrides apply to a config file or preset name, not to a Config object; "
                             "change the object's fields instead")
        return config
    return load_config(None if config is None else str(config), tuple(overrides))


def train(config: Union[str, Path, Config, None] = "default", out: Union[str, Path] = "runs/train", *,
          overrides: Sequence[str] = (), resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Train the method a config names (a YAML file, a preset name or a `Config`) into run directory
    `out`; returns the run summary (also in `out/summary.json`). An existing run in `out` is
    continued with `resume` or replaced with `overwrite`, and refused otherwise."""
    from .data.suites import build_train_data
    from .training.engine import train as train_engine
    from .clip import clip_from_config

    cfg = _config(config, overrides)
    return train_engine(cfg, out, build_train_data(cfg), clip=clip_from_config(cfg), resume=resume,
                        overwrite=overwrite, progress=progress)


def evaluate(run_dir: Union[str, Path], out: Union[str, Path], *, which: str = "best",
             config: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
             progress: bool = True) -> dict:
    """ID accuracy, OOD generalisation and OOD detection of a trained run; writes report.json,
    report.md and plots to `out` and returns the report. `config`/`overrides` replace the run's
    evaluation sets (`eval` and `data.root`)."""
    from .evaluation.run_eval import run_eval

    return run_eval(run_dir, out, which=which, config_path=config, overrides=overrides, progress=progress)
