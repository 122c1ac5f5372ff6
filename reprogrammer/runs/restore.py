"""The trained classifier a run directory holds, and the dataset paths a run may not choose."""
from pathlib import Path
from typing import Optional

from ..clip import clip_from_config
from ..config import Config, ConfigError, from_dict, load_config
from ..methods import build_method
from . import checkpoint as ckpt


def served_alpha(classifier, cfg: Config) -> Optional[float]:
    """The residual blend a run's classifier is served with (`load_run`, export): a Reprogrammer's
    `method.alpha`, whatever it trained at; None for a method without one."""
    return cfg.method.alpha if hasattr(classifier, "alpha") else None


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
        classifier.load_learned_state(ckpt.load_learned(path, meta))
    except (ValueError, KeyError) as error:
        raise ckpt.CheckpointError(f"{path} does not fit {cfg.method.name} on {cfg.model.name}: {error}") from error
    served = served_alpha(classifier, cfg)
    if served is not None:
        classifier.alpha = served if alpha is None else alpha
    elif alpha is not None:
        raise ValueError(f"alpha applies to Reprogrammer runs only, this run trained {cfg.method.name}")
    classifier.eval()
    return classifier, cfg, meta


def run_dataset_paths(cfg: Config) -> list[str]:
    """The dataset files and folders a run's config names (`key=path`)."""
    paths = [f"data.{key}={getattr(cfg.data, key)}" for key in ("root", "classnames_file")
             if getattr(cfg.data, key) is not None]
    if cfg.eval.test:
        paths.append(f"eval.test={cfg.eval.test}")
    paths += [f"eval.{kind}.{name}={spec}" for kind in ("covariate", "semantic")
              for name, spec in getattr(cfg.eval, kind).items()]
    return paths


def with_user_data_paths(cfg: Config, run_dir, config_path=None, overrides=()) -> Config:
    """`cfg` (a run's config) with its dataset paths and `eval` section taken from the user's own
    `--config`/`--set`: a run directory's meta.json may come from anyone, and the files it would
    have us read are not its to choose."""
    if not (config_path or overrides):
        untrusted = run_dataset_paths(cfg)
        if untrusted:
            raise ConfigError(
                f"{run_dir} names dataset paths in its meta.json ({'; '.join(untrusted)}); files to read are not a run "
                "directory's to choose: give them yourself with --set data.root=PATH or --config FILE (the YAML "
                "the run was trained with)")
        return cfg
    user = load_config(config_path, tuple(overrides))
    cfg.eval = user.eval
    cfg.data.root, cfg.data.classnames_file = user.data.root, user.data.classnames_file
    return cfg
