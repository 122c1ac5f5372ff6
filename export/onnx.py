"""`export_onnx`: a trained Reprogrammer as one verified ONNX classifier file.

Two exporters, both translating `F.interpolate(mode="bicubic", align_corners=False)` to
`Resize(cubic, half_pixel, a=-0.75)`, which onnxruntime computes like PyTorch:
- `dynamo`: PyTorch's torch.export-based exporter (`dynamo=True`), the one PyTorch develops; it
  needs onnxscript (part of the `export` extra) and emits opset 18 or later;
- `legacy`: the TorchScript-based tracer (`dynamo=False`), for opsets below 18, installs without
  onnxscript, models torch.export cannot capture, and fp16 graphs: onnxruntime 1.32's CPU layout
  optimiser (NchwcTransformer, on at its default optimisation level) crashes the process with a
  segmentation fault, which no verification can catch, on the dynamo exporter's fp16 graph of
  RP-ViT-Small, and not on the tracer's.
`exporter="auto"` (the default) takes `dynamo` for fp32 where it is installed and the opset allows
it, and falls back to `legacy` when the dynamo export raises. Either graph is verified the same way.
The file is staged in a temporary folder beside `path` and only moved into place once
onnxruntime has reproduced PyTorch's outputs, so a failed export leaves nothing behind.
"""
import contextlib
import copy
import importlib.util
import itertools
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch

from reprogrammer.constants import MCM_TEMPERATURE
from reprogrammer.evaluation.metrics import fpr95_threshold
from reprogrammer.kernels import check_alpha
from . import metadata as meta
from .graph import OUTPUT_NAMES, ExportableClassifier, check_exportable
from .predict import check_images
from .verify import compare, open_session

log = logging.getLogger(__name__)

MIN_OPSET = 11  # first opset with Resize(cubic, half_pixel)
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter's onnxscript functions start at opset 18
EXPORTERS = ("auto", "dynamo", "legacy")
TRACE_BATCH = 2
VERIFY_BATCHES = (1, 3)  # both differ from the traced batch: the batch axis must really be dynamic
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 1e-2}
# Protobuf cannot serialise 2 GiB; graphs above this keep their weights in `<file>.data`.
EXTERNAL_DATA_BYTES = 3 << 29
CALIBRATION_BATCH = 64


def export_onnx(model, path, *, image_resolution: int, alpha: Optional[float] = None, fp16: bool = False,
                opset: int = 18, metadata: Optional[dict] = None, calibration_images=None,
                atol: Optional[float] = None, seed: int = 0, exporter: str = "auto") -> dict:
    """Write `model` as an ONNX classifier to `path` and return the verification report.

    Graph: input `images` float32 `[B, 3, R, R]` in [0, 1] with `R = image_resolution` and a
    dynamic batch; outputs `logits` `[B, C]`, `probabilities` `[B, C]`, `ood_score` `[B]` (MCM)
    and `prediction` `[B]` (int64). `alpha` defaults to `model.alpha`. `fp16` runs the image
    tower in float16 for GPU serving (inputs and outputs stay float32; the reprogramming before
    the patch embedding and the scores after the pooled features stay in float32). `metadata` entries (e.g. model_name,
    pretrained) are stored beside the derived ones (class names, alpha, template, resolutions).
    `calibration_images` (the ID validation split: an array `[N, 3, R, R]`, or an iterable of
    such batches or of `(images, labels)` pairs) set the OOD threshold at 95% TPR. `atol` is the
    max-abs tolerance against PyTorch in fp32 (default 1e-4 in fp32, 1e-2 in fp16); an fp16 graph
    may add twice PyTorch's own fp16 error on the same images (export.verify). `exporter` is `auto`,
    `dynamo` or `legacy` (see the module docstring); the report names the one used.
    """
    check_exportable(model, image_resolution)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset={opset!r} must be an int >= {MIN_OPSET} (bicubic Resize needs it); 18 is the default")
    exporters = _exporters_to_try(exporter, opset, fp16)
    alpha = check_alpha(model.alpha if alpha is None else alpha)
    precision = "fp16" if fp16 else "fp32"
    atol = DEFAULT_ATOL[precision] if atol is None else float(atol)
    user = dict(metadata or {})
    clashes = sorted(meta.DERIVED & set(user))
    if clashes:
        raise ValueError(f"metadata keys {clashes} are derived from the model by the exporter; drop them")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the .onnx file to write, e.g. {path / 'model.onnx'}")
    path.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with _cpu_fp32_eval(model) as reference:
            graph = ExportableClassifier(reference, alpha=alpha, dtype=torch.float16 if fp16 else torch.float32)
            proto, exporter = _trace(graph, staging / "trace", image_resolution, opset, seed, exporters)
            props = {
                meta.CLASSNAMES: reference.classnames, meta.ALPHA: alpha, meta.TEMPLATE: reference.template,
                meta.IMAGE_RESOLUTION: image_resolution, meta.UP_RESOLUTION: reference.up_resolution,
                meta.CANVAS: reference.canvas, meta.LOGIT_SCALE: reference.logit_scale.item(),
                meta.PRECISION: precision, meta.OOD_TEMPERATURE: MCM_TEMPERATURE, **user,
            }
            staged = staging / path.name
            _save(proto, staged, props)
            session = open_session(staged)
            report = compare(session, reference, alpha=alpha, image_resolution=image_resolution,
                             batch_sizes=VERIFY_BATCHES, atol=atol, seed=seed,
                             low_precision=graph if fp16 else None)
        threshold = None
        if calibration_images is not None:
            threshold = fpr95_threshold(_ood_scores(session, calibration_images, image_resolution))
            _save(proto, staged, {**props, meta.OOD_THRESHOLD: threshold})
        del session  # releases the staged files (onnxruntime may memory-map external weights)
        for staged_file in staging.iterdir():
            os.replace(staged_file, path.parent / staged_file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s (%s exporter, %s, opset %d, alpha %g, OOD threshold %s)", path, exporter, precision, opset,
             alpha, threshold)
    return {"path": str(path), "exporter": exporter, "precision": precision, "opset": opset, "alpha": alpha,
            "image_resolution": image_resolution, "ood_threshold": threshold, **report}


@contextlib.contextmanager
def _cpu_fp32_eval(model):
    """`model` on the CPU in fp32 and eval mode (no perturbation dropout): a copy when it lives
    elsewhere, otherwise the model itself with its training flag restored afterwards."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    in_place = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
                   for t in tensors)
    target = model if in_place else copy.deepcopy(model).to("cpu", torch.float32)
    was_training = target.training
    target.eval()
    try:
        yield target
    finally:
        target.train(was_training)


@contextlib.contextmanager
def _tracing_settings():
    # The fused attention fast path is one aten op the exporter cannot translate; the tracer
    # warnings concern shape checks, which are constant by design (only the batch is dynamic).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            warnings.filterwarnings("ignore", message="The feature will be removed")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _exporters_to_try(exporter: str, opset: int, fp16: bool = False) -> list[str]:
    """The exporters to try in order for the requested `exporter`, or a clear error."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} is not one of {', '.join(EXPORTERS)}")
    dynamo_missing = importlib.util.find_spec("onnxscript") is None
    if exporter == "dynamo":
        if dynamo_missing:
            raise RuntimeError("exporter='dynamo' needs onnxscript: pip install 'reprogrammer[export]' "
                               "(or pip install onnxscript), or use exporter='legacy'")
        if opset < DYNAMO_MIN_OPSET:
            raise ValueError(f"exporter='dynamo' emits opset {DYNAMO_MIN_OPSET} or later, not {opset}; raise the "
                             "opset or use exporter='legacy'")
        if fp16:
            raise ValueError("exporter='dynamo' with fp16: onnxruntime crashes loading such graphs (see "
                             "reprogrammer.export.onnx); use exporter='legacy' or 'auto'")
    if exporter == "auto":
        return ["legacy"] if fp16 or dynamo_missing or opset < DYNAMO_MIN_OPSET else ["dynamo", "legacy"]
    return [exporter]


def _trace(graph: ExportableClassifier, folder: Path, image_resolution: int, opset: int, seed: int,
           exporters: list[str]):
    """`(graph as an in-memory ONNX model, the exporter used)`, the trace files removed: the first of
    `exporters` that succeeds (an error of the last one propagates)."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(seed)
    example = torch.rand(TRACE_BATCH, 3, image_resolution, image_resolution, generator=generator)
    graph.eval()
    file = folder / "graph.onnx"
    export = {"dynamo": _export_dynamo, "legacy": _export_legacy}
    for i, exporter in enumerate(exporters):
        try:
            with _tracing_settings(), torch.no_grad():
                export[exporter](graph, example, file, opset)
            break
        except Exception as error:  # the exporters raise many types; only a fallback catches them
            if i == len(exporters) - 1:
                raise
            log.warning("the %s exporter failed (%s: %s); using the %s exporter", exporter,
                        type(error).__name__, error, exporters[i + 1])
    proto = onnx.load(str(file))
    shutil.rmtree(folder)
    return proto, exporter


def _export_dynamo(graph, example, file: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                output_names=list(OUTPUT_NAMES), dynamic_shapes={"images": {0: batch}},
                                verbose=False)
    program.save(str(file))


def _export_legacy(graph, example, file: Path, opset: int) -> None:
    dynamic = {name: {0: "batch"} for name in ("images", *OUTPUT_NAMES)}
    torch.onnx.export(graph, (example,), str(file), dynamo=False, opset_version=opset, input_names=["images"],
                      output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)


def _save(proto, path: Path, props: dict) -> None:
    """Write `proto` with `props` as its metadata; large weights go to `<name>.data` beside it.

    Once saved with external data the proto only references that file, so saving it again
    (new metadata) rewrites the graph file alone.
    """
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta.encode(props))
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    onnx.save_model(proto, str(path), save_as_external_data=weight_bytes > EXTERNAL_DATA_BYTES,
                    all_tensors_to_one_file=True, location=f"{path.name}.data")


def _calibration_batches(images):
    if hasattr(images, "shape"):  # one array or tensor of all images
        batches = [images[i:i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
    else:
        batches = images
    for batch in batches:
        if isinstance(batch, (tuple, list)):  # (images, labels) from a data loader
            batch = batch[0]
        yield batch.detach().cpu().float().numpy() if hasattr(batch, "detach") else batch


def _ood_scores(session, calibration_images, image_resolution: int) -> np.ndarray:
    scores = []
    for batch in _calibration_batches(calibration_images):
        try:
            batch = check_images(batch, image_resolution)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"calibration_images: {exc}") from None
        scores.append(session.run(["ood_score"], {"images": batch})[0])
    if not scores:
        raise ValueError("calibration_images is empty: pass the ID validation images")
    return np.concatenate(scores)
