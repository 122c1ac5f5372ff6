"""The Python entry points behind the CLI: train, evaluate, export a trained run, cache a dataset,
run a benchmark of the source checkout."""
import os
import subprocess
import sys
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


def export_run(run_dir: Union[str, Path], path: Union[str, Path], *, which: str = "best",
               alpha: Optional[float] = None, fp16: bool = False, opset: int = 18, exporter: str = "auto",
               calibration_samples: int = 2000, config: Optional[Union[str, Path]] = None,
               overrides: Sequence[str] = ()) -> dict:
    """Export the `which` checkpoint of a run to the ONNX file `path`, verified against PyTorch with
    onnxruntime (`reprogrammer.export_onnx`, whose report it returns; needs the `export` extra).

    `alpha`: the residual blend (None: the run's). The OOD threshold is set at 95% TPR on the
    first `calibration_samples` images of the run's validation split (0: no threshold), read from
    the dataset paths `config`/`overrides` give (e.g. `["data.root=PATH"]`): a run directory does
    not choose the files it makes us read."""
    import numpy as np

    from .data.images import SkippedSample
    from .data.suites import build_train_data
    from .export import export_onnx
    from .runs.restore import load_run, with_user_data_paths

    if isinstance(calibration_samples, bool) or not isinstance(calibration_samples, int) or calibration_samples < 0:
        raise ValueError(f"calibration_samples: --calibration-samples must be >= 0, an int (0: no OOD threshold), "
                         f"got {calibration_samples!r}")
    classifier, cfg, meta = load_run(run_dir, which)
    calibration = None
    if calibration_samples > 0:
        val = build_train_data(with_user_data_paths(cfg, run_dir, config, overrides)).val
        samples = (val[i] for i in range(min(len(val), calibration_samples)))
        readable = [sample[0].numpy() for sample in samples if not isinstance(sample, SkippedSample)]
        calibration = np.stack(readable).astype(np.float32) / 255 if readable else None
    return export_onnx(classifier, path, image_resolution=meta["image_resolution"], alpha=alpha, fp16=fp16,
                       opset=opset, exporter=exporter, calibration_images=calibration,
                       metadata={"model_name": meta["model"]["name"], "pretrained": str(meta["model"]["pretrained"]),
                                 "method": meta["method"]})


def cache_data(config: Union[str, Path, Config, None], out: Union[str, Path], *, overrides: Sequence[str] = (),
               split: Optional[str] = None, progress: bool = True) -> dict:
    """Decode the dataset a config names (`data.dataset`, `data.root`, `data.image_resolution`) once
    into the memory-mapped cache folder `out`, which training reads with `data.cache=OUT`; returns
    its `cache.json`. `split`: None = `train` where the dataset has one."""
    from .data.cache import write_cache
    from .data.registry import DATASETS, build_dataset

    cfg = _config(config, overrides).data
    if cfg.dataset in DATASETS and DATASETS[cfg.dataset].generated:
        raise ValueError(f"{cfg.dataset} is rendered in memory and reads no files: it needs no cache")
    if cfg.root is None:
        raise ValueError(f"data.root is not set: point it at the {cfg.dataset} folder (--set data.root=PATH)")
    split = split or ("train" if "train" in DATASETS[cfg.dataset].splits else None)
    dataset = build_dataset(cfg.dataset, cfg.root, split, image_resolution=cfg.image_resolution,
                            classnames=cfg.classnames_file, max_skipped_fraction=cfg.max_skipped_fraction)
    return write_cache(dataset, out, num_workers=cfg.num_workers, progress=progress,
                       source={"dataset": cfg.dataset, "root": str(cfg.root), "split": split})


def run_benchmark(script: str, argv: Sequence[str] = ()) -> int:
    """Run `bench/<script>.py` of the source checkout (`kernels`, `train`, `data`, `compile_report`,
    `onnx_latency`) with its own options `argv`; returns its exit status.

    The benchmarks are scripts of the checkout, not part of the installed package. Each runs as
    `python -m bench.<script>` in a child process whose import path starts at the checkout (`-P`
    keeps the current folder off it, so that no `bench` folder of the user's shadows it), while
    relative paths in `argv` keep meaning the current folder."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "bench" / "__init__.py").is_file():
        raise FileNotFoundError("the benchmarks live in the source checkout's bench/ folder; "
                                "clone the repository and install it with `pip install -e .`")
    if not (checkout / "bench" / f"{script}.py").is_file():
        raise FileNotFoundError(f"{checkout / 'bench'} has no benchmark {script}.py")
    path = os.pathsep.join(filter(None, (str(checkout), os.environ.get("PYTHONPATH"))))
    done = subprocess.run([sys.executable, "-P", "-m", f"bench.{script}", *argv],
                          env={**os.environ, "PYTHONPATH": path}, check=False)
    return done.returncode
