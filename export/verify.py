"""Does an exported graph compute what the PyTorch model computes?

The reference is the model's own `forward` on the PyTorch reference ops in fp32, independent of
the traced wrapper in `export.graph`; both see the same random images. A reduced-precision graph
may differ from it by `atol` plus twice what PyTorch's own computation in that precision differs
by (the traced wrapper run in PyTorch), so the tolerance follows the model's scale: CLIP's logit
scale of 100 multiplies every cosine error by 100.
"""
import contextlib
import logging

import numpy as np
import onnxruntime as ort
import torch

from reprogrammer.constants import MCM_TEMPERATURE
from reprogrammer.kernels import ood_scores, use_backend
from .graph import OUTPUT_NAMES

log = logging.getLogger(__name__)


class ExportVerificationError(RuntimeError):
    """The exported graph cannot be run, or disagrees with PyTorch; nothing was written."""


@contextlib.contextmanager
def _reference_backend_and_alpha(model, alpha: float):
    """The PyTorch references and `model.alpha = alpha` for the duration."""
    saved_alpha = model.alpha
    model.alpha = alpha
    try:
        with use_backend("torch"):
            yield
    finally:
        model.alpha = saved_alpha


def reference_outputs(model, images: torch.Tensor, alpha: float) -> dict[str, np.ndarray]:
    """The graph's outputs as PyTorch computes them from `model(images)` with `alpha`."""
    with _reference_backend_and_alpha(model, alpha), torch.no_grad():
        logits = model(images).float()
        scores = ood_scores(logits / model.logit_scale, MCM_TEMPERATURE)
    return {
        "logits": logits.numpy(),
        "probabilities": logits.softmax(dim=-1).numpy(),
        "ood_score": scores.mcm.numpy(),
        "prediction": scores.prediction.numpy(),
    }


def open_session(path) -> ort.InferenceSession:
    """An onnxruntime CPU session on `path`; a graph it cannot load is a verification failure."""
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types, one per status code
        raise ExportVerificationError(
            f"onnxruntime (CPU) cannot load the exported graph: {exc}. With --fp16 this means an "
            "operator lacks a float16 CPU kernel in this onnxruntime version: export in fp32, or "
            "upgrade onnxruntime"
        ) from exc


def compare(session: ort.InferenceSession, model, *, alpha: float, image_resolution: int,
            batch_sizes: tuple[int, ...], atol: float, seed: int = 0, low_precision=None) -> dict:
    """Run both on random batches of `batch_sizes`; raise `ExportVerificationError` when a float
    output differs by more than its tolerance (max-abs), else return the differences.

    The tolerance is `atol`; with `low_precision` (the exported module in its reduced precision,
    returning the graph's outputs in order) it is `atol + 2 * |low_precision - fp32 reference|`."""
    generator = torch.Generator().manual_seed(seed)
    names = ("logits", "probabilities", "ood_score")
    per_batch = {name: [] for name in names}
    pytorch_error = {name: [0.0] for name in names}
    agree = total = 0
    for batch in batch_sizes:
        images = torch.rand(batch, 3, image_resolution, image_resolution, generator=generator)
        expected = reference_outputs(model, images, alpha)
        got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {"images": images.numpy()})))
        for name, values in per_batch.items():
            values.append(np.max(np.abs(got[name] - expected[name])))
        if low_precision is not None:
            with torch.no_grad():
                own = dict(zip(OUTPUT_NAMES, (t.float().numpy() for t in low_precision(images))))
            for name in names:
                pytorch_error[name].append(np.max(np.abs(own[name] - expected[name])))
        agree += int((got["prediction"] == expected["prediction"]).sum())
        total += batch
    # np.max propagates NaN, so a NaN output fails the `<= tolerance` test below
    diffs = {name: float(np.max(values)) for name, values in per_batch.items()}
    tolerance = {name: atol + 2 * float(np.max(pytorch_error[name])) for name in names}
    report = {"max_abs_diff": diffs, "tolerance": tolerance, "prediction_agreement": agree / total,
              "batch_sizes": list(batch_sizes), "atol": atol}
    summary = ", ".join(f"{name} {diffs[name]:.3g} (tolerance {tolerance[name]:.3g})" for name in names)
    log.info("ONNX vs PyTorch max |diff| over batch sizes %s: %s; predictions agree on %d/%d",
             list(batch_sizes), summary, agree, total)
    failed = [name for name in names if not diffs[name] <= tolerance[name]]
    if failed:
        raise ExportVerificationError(
            f"the exported graph disagrees with PyTorch on {', '.join(failed)}: max |diff| {summary}; "
            "the file was not written. In fp32 this is a bug in the export path"
        )
    return report
