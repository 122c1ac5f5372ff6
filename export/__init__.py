"""Deployment: the Reprogrammer as a verified ONNX classifier, and prediction with onnxruntime.

`predict` needs only onnxruntime, numpy and PIL; the torch-based exporter is imported on first
use of `export_onnx`, so `import reprogrammer.export` stays light on a serving machine.
"""
try:
    import onnxruntime  # noqa: F401  (checked here so every entry point gives the same advice)
except ImportError as error:
    raise ImportError(
        "reprogrammer.export needs onnx and onnxruntime: pip install 'reprogrammer[export]' "
        "(for GPU serving install onnx and onnxruntime-gpu instead)") from error

from .predict import OnnxClassifier, load_image, predict_files, predict_main

__all__ = ["OnnxClassifier", "load_image", "predict_files", "predict_main", "export_onnx",
           "ExportVerificationError"]


def __getattr__(name):
    if name == "export_onnx":
        from .onnx import export_onnx
        return export_onnx
    if name == "ExportVerificationError":
        from .verify import ExportVerificationError
        return ExportVerificationError
    raise AttributeError(f"module 'reprogrammer.export' has no attribute {name!r}")
