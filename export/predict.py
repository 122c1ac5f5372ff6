"""Classify images with an exported ONNX classifier, using onnxruntime, numpy and PIL only.

Images are prepared as the training pipeline prepares them: RGB, the shorter side resized to
the model's resolution with bicubic interpolation, a centre crop, then values / 255.
"""
import argparse
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

from reprogrammer.pixels import open_rgb

from . import metadata as meta

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Tried in this order by `providers="auto"`, where the installed onnxruntime has them
# (onnxruntime-gpu); the CPU provider always comes last as the fallback.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)
OUTPUTS = frozenset({"logits", "probabilities", "ood_score", "prediction"})


def check_images(images, image_resolution: int) -> np.ndarray:
    """`images` as a contiguous float32 `[B, 3, R, R]` array in [0, 1], or a clear error."""
    images = np.asarray(images)
    expected = (3, image_resolution, image_resolution)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(
            f"images must be [B, {', '.join(map(str, expected))}] (RGB, channels first, at the model's "
            f"resolution {image_resolution}), got shape {images.shape}; load files with load_image()"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be floats in [0, 1], got {images.dtype}; divide uint8 pixels by 255")
    if images.size and not 0 <= images.min() <= images.max() <= 1:  # also false for NaN
        raise ValueError(
            f"images must lie in [0, 1], got values in [{images.min():.3g}, {images.max():.3g}]; pass raw "
            "pixels / 255, not normalised images (the model normalises them itself)"
        )
    return np.ascontiguousarray(images, dtype=np.float32)


def resolve_providers(providers: Union[str, Iterable[str]] = "auto") -> list[str]:
    """onnxruntime execution providers, best first. `"auto"`: TensorRT and CUDA where this
    onnxruntime has them, then the CPU; otherwise the names given (a list, or comma-separated) in
    their order, less those this onnxruntime build lacks (with a warning), so that one command
    line serves a GPU and a CPU install alike. A misspelt name, or none left, is an error."""
    available = ort.get_available_providers()
    if isinstance(providers, str) and providers == "auto":
        return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]
    names = [p.strip() for p in providers.split(",")] if isinstance(providers, str) else list(providers)
    if not names:
        raise ValueError("no execution provider given; pass auto or names such as CPUExecutionProvider")
    for name in names:
        if name not in ort.get_all_providers():
            raise ValueError(f"unknown onnxruntime execution provider {name!r}; this onnxruntime has "
                             f"{', '.join(available)} (or pass auto)")
    usable = [name for name in names if name in available]
    missing = [name for name in names if name not in available]
    if not usable:
        raise ValueError(f"none of the execution providers {', '.join(names)} is available in this onnxruntime "
                         f"({ort.__version__}, which has {', '.join(available)}); for GPUs install "
                         "onnxruntime-gpu, or add CPUExecutionProvider")
    if missing:
        warnings.warn(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                      f"({ort.__version__}); running on {', '.join(usable)}", stacklevel=2)
    return usable


class OnnxClassifier:
    """An exported classifier: `classifier(images)` -> `{"logits", "probabilities", "ood_score",
    "prediction"}` numpy arrays for float32 `[B, 3, R, R]` images in [0, 1]. `providers`: see
    `resolve_providers` (default: the GPU where onnxruntime-gpu finds one, else the CPU)."""

    def __init__(self, path, *, providers: Union[str, Iterable[str]] = "auto"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no ONNX model at {path}; create one with `reprogrammer export`")
        self.path = str(path)
        providers = resolve_providers(providers)
        try:
            self.session = ort.InferenceSession(self.path, providers=providers)
        except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise ValueError(f"{path} is not an ONNX model onnxruntime can load ({error}); pass a file written "
                             "by `reprogrammer export`") from None
        self.metadata = meta.decode(self.session.get_modelmeta().custom_metadata_map)
        missing = sorted({meta.CLASSNAMES, meta.IMAGE_RESOLUTION} - set(self.metadata))
        if missing:
            raise ValueError(f"{path} lacks the metadata {missing}: it was not written by export_onnx")
        inputs = [node.name for node in self.session.get_inputs()]
        outputs = {node.name for node in self.session.get_outputs()}
        if inputs != ["images"] or not OUTPUTS <= outputs or not isinstance(self.metadata[meta.CLASSNAMES], list):
            raise ValueError(f"{path} maps {inputs} to {sorted(outputs)}: not a classifier written by "
                             "`reprogrammer export`")
        self.classnames: list[str] = self.metadata[meta.CLASSNAMES]
        self.image_resolution: int = self.metadata[meta.IMAGE_RESOLUTION]
        self.alpha: Optional[float] = self.metadata.get(meta.ALPHA)
        self.threshold: Optional[float] = self.metadata.get(meta.OOD_THRESHOLD)
        self._outputs = [output.name for output in self.session.get_outputs()]

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = check_images(images, self.image_resolution)
        return dict(zip(self._outputs, self.session.run(self._outputs, {"images": images})))


def load_image(path, image_resolution: int) -> np.ndarray:
    """`[3, R, R]` float32 in [0, 1]: RGB, bicubic shorter side to R, centre crop (torchvision's
    `Resize(R)` + `CenterCrop(R)` geometry)."""
    image = open_rgb(path)
    width, height = image.size
    short, long = sorted((width, height))
    resized_long = int(image_resolution * long / short)
    size = (image_resolution, resized_long) if width <= height else (resized_long, image_resolution)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - image_resolution) / 2.0))
    top = int(round((size[1] - image_resolution) / 2.0))
    image = image.crop((left, top, left + image_resolution, top + image_resolution))
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)


def _image_files(paths: Iterable) -> Iterator[tuple[str, Optional[str]]]:
    """`(file, None)` for each file to classify, `(path, error)` for a path that yields none."""
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                yield str(path), "directory holds no PNG or JPEG files"
            yield from ((str(p), None) for p in found)
        elif path.exists():
            yield str(path), None
        else:
            yield str(path), "no such file or directory"


def _record(path: str, *, error: Optional[str] = None, **result) -> dict:
    empty = dict.fromkeys(("class", "probability", "ood_score", "ood"))
    return {"path": path, **empty, **result, "error": error}


def _classify(classifier: OnnxClassifier, batch: list[tuple[str, Union[np.ndarray, str]]]) -> Iterator[dict]:
    """Records for `batch` in its order; items are a loaded image or an error message."""
    images = [item for _, item in batch if isinstance(item, np.ndarray)]
    outputs = classifier(np.stack(images)) if images else {}
    row = 0
    for path, item in batch:
        if isinstance(item, str):
            yield _record(path, error=item)
            continue
        label = int(outputs["prediction"][row])
        score = float(outputs["ood_score"][row])
        yield _record(path, **{
            "class": classifier.classnames[label],
            "probability": float(outputs["probabilities"][row, label]),
            "ood_score": score,
            "ood": None if classifier.threshold is None else score < classifier.threshold,
        })
        row += 1


def predict_files(model, paths: Iterable, *, batch_size: int = 32,
                  providers: Union[str, Iterable[str]] = "auto") -> Iterator[dict]:
    """Classify PNG/JPEG files (directories are searched recursively), in order, one record each:
    `{"path", "class", "probability", "ood_score", "ood", "error"}`. `ood` is None when the model
    has no calibrated threshold; a file that cannot be read gets an `error` and None elsewhere.
    `model` is an `OnnxClassifier` or the path of an exported model (run on `providers`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    classifier = model if isinstance(model, OnnxClassifier) else OnnxClassifier(model, providers=providers)
    batch, loaded = [], 0
    for path, error in _image_files(paths):
        if error is None:
            try:
                item = load_image(path, classifier.image_resolution)
                loaded += 1
            except _UNREADABLE as exc:
                item = f"cannot read image: {exc}"
        else:
            item = error
        batch.append((path, item))
        if loaded == batch_size:
            yield from _classify(classifier, batch)
            batch, loaded = [], 0
    yield from _classify(classifier, batch)


def predict_main(argv: Optional[list[str]] = None) -> int:
    """`reprogrammer predict`: one JSON record per image on stdout; exit status 1 when any file
    could not be classified (the others are still reported)."""
    parser = argparse.ArgumentParser(prog="reprogrammer predict", description=(
        "Classify PNG/JPEG images (files or directories, searched recursively) with an exported ONNX model."))
    parser.add_argument("--onnx", required=True, help="model written by `reprogrammer export`")
    parser.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime call (default 32)")
    parser.add_argument("--providers", default="auto", help=(
        "onnxruntime execution providers, comma-separated, best first (default auto: TensorRT and CUDA "
        "where the installed onnxruntime has them, then CPUExecutionProvider)"))
    parser.add_argument("images", nargs="+", help="image files or directories")
    args = parser.parse_args(argv)
    failed = 0
    for record in predict_files(args.onnx, args.images, batch_size=args.batch_size, providers=args.providers):
        print(json.dumps(record), flush=True)
        failed += record["error"] is not None
    return 1 if failed else 0
