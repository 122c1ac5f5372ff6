"""Model reprogramming of CLIP text-image encoders (Reprogrammer and Residual Reprogrammer).

Public API:
- `load_clip(name, pretrained)`: an open_clip model and tokenizer;
- `Reprogrammer(clip, tokenizer, classnames, ...)`: the classifier (`alpha > 0`: Residual);
- `train(config, out)`, `evaluate(run_dir, out)`: what `reprogrammer train` / `eval` do;
- `load_run(run_dir)`: the trained classifier of a run, at the run's alpha;
- `export_onnx(classifier, path, ...)`: a verified ONNX classifier (needs the `export` extra);
- `export_run(run_dir, path, ...)`: what `reprogrammer export` does (a run's checkpoint, calibrated).

Names resolve on first use, so `reprogrammer.export.predict` (onnxruntime, numpy and PIL only)
never imports torch.
"""
import importlib
from importlib import metadata

try:
    __version__ = metadata.version("reprogrammer")
except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"

_PUBLIC = {
    "load_clip": "reprogrammer.clip",
    "Reprogrammer": "reprogrammer.model",
    "train": "reprogrammer.api",
    "evaluate": "reprogrammer.api",
    "load_run": "reprogrammer.runs.restore",
    "export_onnx": "reprogrammer.export",
    "export_run": "reprogrammer.api",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'reprogrammer' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
