"""`reprogrammer doctor`: do the fused ops give their reference's results on this machine?

Each fused op (`reprogram_patch_embed`, `residual_logits`, `residual_scores`) runs at a few
shapes and precisions, forward and every gradient, against its PyTorch reference computed in
float64 from the same inputs. Where the kernels run (CUDA, or the CPU with `TRITON_INTERPRET=1`)
the kernels are judged; elsewhere the reference itself in fp32, which still checks this torch.

Tolerances, on the largest error relative to the largest reference value:
- fp32 (IEEE): 1e-4; the kernels accumulate in fp32 over at most a few thousand terms, about
  1e-6, and a wrong index or mask is of order one;
- tf32, bf16, fp16: at most twice PyTorch's own error in that precision plus 2e-3 (tf32) or 1e-3,
  the rule the CUDA tests use;
- predicted classes: the picked class's cosine is within 1e-5 (fp32) or 1e-2 of the maximum,
  so near-ties do not fail.

`check_kernels_once(device, precision)` is what training runs at its start on CUDA: the checks
for the precision it trains in, once per process and device. If a kernel disagrees it raises
`KernelCheckFailed` rather than falling back: a fallback would change speed and memory behind the
user's back, and ranks of one distributed run could end up on different paths; stopping names
the op, the error and the switch to the reference (`REPROGRAMMER_BACKEND=torch`), so the choice
stays the user's.
"""
from __future__ import annotations

import contextlib
import math
import platform
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from . import kernels
from .constants import CLIP_MEAN, CLIP_STD
from .kernels._triton import AVAILABLE as TRITON_AVAILABLE
from .kernels.backend import backend, triton_interpreting, use_backend

FP32_TOLERANCE = 1e-4
LOW_PRECISION_ATOL = {"tf32": 2e-3, "bf16": 1e-3, "fp16": 1e-3}
TIE_TOLERANCE = {"fp32": 1e-5, "tf32": 1e-3, "bf16": 1e-2, "fp16": 1e-2}
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A run's `train.precision` (runtime.PRECISIONS) and the kernel precisions it launches: fp32
# training runs the IEEE kernels or, with PyTorch's TF32 switches on, the TF32 ones.
TRAIN_PRECISIONS = {"fp32": ("fp32", "tf32"), "amp_bf16": ("bf16",), "amp_fp16": ("fp16",)}
ALPHA = 0.4
SCALE = 47.3  # stands in for exp(CLIP's logit scale)
TEMPERATURE = 0.01


@dataclass(frozen=True)
class PatchCase:
    batch: int
    h: int
    w: int
    up: int
    canvas: int
    patch: int
    width: int
    pos: bool
    uint8: bool = False

    @property
    def label(self) -> str:
        source = f"{'uint8 ' if self.uint8 else ''}{self.h}x{self.w}"
        return f"B{self.batch} {source}->{self.up} on {self.canvas} p{self.patch} w{self.width}"


@dataclass(frozen=True)
class ResidualCase:
    batch: int
    classes: int
    dim: int
    alpha: float

    @property
    def label(self) -> str:
        return f"B{self.batch} C{self.classes} D{self.dim} a{self.alpha:g}"


# Odd sizes that leave partial tiles and masks everywhere (the first of each is the quick set);
# on CUDA also one shape of ViT-B/32 / CLIP's feature width.
PATCH_CASES = (PatchCase(3, 13, 11, 20, 24, 8, 40, pos=True),
               PatchCase(2, 5, 7, 12, 16, 4, 31, pos=False, uint8=True))
PATCH_CUDA_CASES = (PatchCase(8, 32, 32, 224, 224, 32, 768, pos=True),)
RESIDUAL_CASES = (ResidualCase(67, 131, 97, ALPHA), ResidualCase(13, 7, 31, 0.0))
RESIDUAL_CUDA_CASES = (ResidualCase(512, 1000, 512, ALPHA),)


@dataclass(frozen=True)
class Row:
    """One compared quantity: `error` and `tolerance` relative to the largest reference value
    (for `prediction`, cosine below the maximum); `error` None when the run raised."""
    op: str
    case: str
    precision: str
    path: str
    quantity: str
    error: Optional[float]
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is not None and math.isfinite(self.error) and self.error <= self.tolerance


@dataclass
class Report:
    device: str
    versions: dict
    rows: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row.ok for row in self.rows)

    @property
    def failures(self) -> list:
        return [row for row in self.rows if not row.ok]

    def header(self) -> str:
        return "\n".join([f"device: {self.device}",
                          "versions: " + ", ".join(f"{name} {version}" for name, version in self.versions.items()),
                          "", "| op | case | precision | path | quantity | error | tolerance | ok |",
                          "|---|---|---|---|---|---|---|---|"])

    @staticmethod
    def line(row: Row) -> str:
        error = "raised" if row.error is None else f"{row.error:.2e}"
        verdict = "ok" if row.ok else f"FAIL{': ' + row.detail if row.detail else ''}"
        return (f"| {row.op} | {row.case} | {row.precision} | {row.path} | {row.quantity} | {error} | "
                f"{row.tolerance:.1e} | {verdict} |")

    def summary(self) -> str:
        failed = len(self.failures)
        return (f"{len(self.rows) - failed} of {len(self.rows)} checks passed"
                + ("" if self.ok else f"; {failed} FAILED"))

    def table(self) -> str:
        return "\n".join([self.header(), *map(self.line, self.rows), "", self.summary()])


class KernelCheckFailed(RuntimeError):
    """A fused kernel disagrees with its PyTorch reference on this device."""


def versions() -> dict:
    import numpy

    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    if TRITON_AVAILABLE:
        import triton

        found["triton"] = triton.__version__
    if torch.version.cuda:
        found["cuda"] = torch.version.cuda
    try:
        from importlib.metadata import version

        found["reprogrammer"] = version("reprogrammer")
    except Exception:  # a source checkout on PYTHONPATH has no metadata
        found["reprogrammer"] = "source"
    return found


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} (cuda:{device.index or 0}, sm_{props.major}{props.minor}, "
                f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
    return f"CPU ({platform.machine()}, {platform.processor() or 'unknown processor'})"


def kernels_run_on(device: torch.device) -> bool:
    """Whether the fused ops launch Triton kernels on `device` (else they run their reference)."""
    if not TRITON_AVAILABLE or backend() == "torch":
        return False
    return device.type == "cuda" or triton_interpreting()


def precisions_for(device: torch.device) -> tuple:
    # Triton's interpreter computes in fp32 only; the CPU reference in low precision says nothing.
    return ("fp32", "tf32", "bf16", "fp16") if device.type == "cuda" else ("fp32",)


# ---------------------------------------------------------------------------------------------
# Running one implementation
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _precision(device: torch.device, precision: str, autocast: bool = False) -> Iterator[None]:
    """IEEE fp32 (no TF32 anywhere) for `fp32` and the float64 reference, PyTorch's TF32 for
    `tf32` (both kernels follow these switches, as the ops they replace do); with `autocast`,
    bf16 / fp16 autocast for those precisions (the patch embedding runs under it in training)."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with (torch.autocast(device.type, dtype=LOW_DTYPES[precision]) if autocast and precision in LOW_DTYPES
              else contextlib.nullcontext()):
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def _patch_inputs(case: PatchCase, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(case.batch * 1000 + case.h)  # never the global RNG
    shape = (case.batch, 3, case.h, case.w)
    images = (torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if case.uint8
              else torch.rand(shape, generator=g))
    n_patches = (case.canvas // case.patch) ** 2
    inputs = dict(images=images,
                  perturbation=torch.randn(3, case.canvas, case.canvas, generator=g).tanh(),
                  weight=torch.randn(case.width, 3, case.patch, case.patch, generator=g) / (3 * case.patch**2) ** 0.5,
                  pos_embed=torch.randn(n_patches, case.width, generator=g) if case.pos else None,
                  upstream=torch.randn(case.batch, n_patches, case.width, generator=g))
    return {name: None if t is None else t.to(device) for name, t in inputs.items()}


def _run_patch(fn: Callable, inputs: dict, case: PatchCase) -> dict:
    perturbation = inputs["perturbation"].clone().requires_grad_()
    tokens = fn(inputs["images"], perturbation, inputs["weight"], up_resolution=case.up,
                mean=CLIP_MEAN, std=CLIP_STD, pos_embed=inputs["pos_embed"])
    (grad,) = torch.autograd.grad(tokens, perturbation, inputs["upstream"].to(tokens.dtype))
    return {"tokens": tokens.detach(), "dL/dperturbation": grad}


def _residual_inputs(case: ResidualCase, device: torch.device) -> list:
    g = torch.Generator().manual_seed(case.batch * 1000 + case.classes)

    def rows(n):  # unequal norms, so the normalisation matters
        return torch.randn(n, case.dim, generator=g) * (0.3 + 3 * torch.rand(n, 1, generator=g))

    return [t.to(device) for t in (rows(case.batch), rows(case.batch), rows(case.classes), rows(case.classes),
                                   torch.randn(case.batch, case.classes, generator=g))]


def _run_logits(fn: Callable, inputs: list, case: ResidualCase) -> dict:
    *features, upstream = inputs
    leaves = dict(zip(("img_rp", "img_zs", "txt_rp", "txt_zs"), (t.clone().requires_grad_() for t in features)))
    logits = fn(*leaves.values(), alpha=case.alpha, logit_scale=SCALE)
    # With alpha 0 the zero-shot inputs are never read and get no gradient.
    judged = {name: leaf for name, leaf in leaves.items() if case.alpha or not name.endswith("_zs")}
    grads = torch.autograd.grad(logits, list(judged.values()), upstream.to(logits.dtype))
    return {"logits": logits.detach(), **{f"d/d{name}": grad for name, grad in zip(judged, grads)}}


def _run_scores(fn: Callable, inputs: list, case: ResidualCase) -> dict:
    scores = fn(*inputs[:4], alpha=case.alpha, logit_scale=SCALE, temperature=TEMPERATURE, return_logits=True)
    return {"prediction": scores.prediction, "mcm": scores.mcm, "energy": scores.energy,
            "max_logit": scores.max_logit, "logits": scores.logits}


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------
def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item() or 1.0
    return (value.double() - reference).abs().max().item() / scale


def _compare(op: str, case: str, precision: str, path: str, ours: dict, reference: dict,
             low: Optional[dict], cosine: Optional[torch.Tensor]) -> list:
    rows = []
    for quantity, expected in reference.items():
        value = ours[quantity]
        if quantity == "prediction":
            picked = cosine.gather(1, value[:, None].long()).squeeze(1)
            error = (cosine.amax(dim=1) - picked).max().item()
            rows.append(Row(op, case, precision, path, quantity, error, TIE_TOLERANCE[precision]))
            continue
        if value.shape != expected.shape:
            rows.append(Row(op, case, precision, path, quantity, None, 0.0,
                            f"shape {tuple(value.shape)}, expected {tuple(expected.shape)}"))
            continue
        error = _relative_error(value, expected)
        if low is None:
            tolerance = FP32_TOLERANCE
        else:
            tolerance = 2 * _relative_error(low[quantity], expected) + LOW_PRECISION_ATOL[precision]
        rows.append(Row(op, case, precision, path, quantity, error, tolerance))
    return rows


def _check(op: str, case, precision: str, device: torch.device, path: str) -> list:
    """Rows for one op, case and precision: ours (the kernel, or the fp32 reference) against the
    float64 reference, and in low precision against PyTorch's own error there."""
    fused, reference_fn = {"reprogram_patch_embed": (kernels.reprogram_patch_embed, kernels.reprogram_patch_embed_ref),
                           "residual_logits": (kernels.residual_logits, kernels.residual_logits_ref),
                           "residual_scores": (kernels.residual_scores, kernels.residual_scores_ref)}[op]
    patch = op == "reprogram_patch_embed"
    if patch:
        inputs, run = _patch_inputs(case, device), _run_patch
        as64 = {name: t if t is None or not t.is_floating_point() else t.double() for name, t in inputs.items()}
        if case.uint8:  # the kernel scales uint8 by the fp32 constant 1/255: the reference sees those pixels
            as64["images"] = (inputs["images"].float() * (1.0 / 255.0)).double()
        low_inputs = inputs  # autocast lowers the precision
    else:
        inputs = _residual_inputs(case, device)
        run = _run_logits if op == "residual_logits" else _run_scores
        as64 = [t.double() for t in inputs]
        low_inputs = [t.to(LOW_DTYPES[precision]) for t in inputs] if precision in LOW_DTYPES else inputs
    with _precision(device, "fp32"):
        expected = run(reference_fn, as64, case)
        cosine = (kernels.residual_logits_ref(*as64[:4], alpha=case.alpha, logit_scale=1.0)
                  if op == "residual_scores" else None)
    try:
        with _precision(device, precision, autocast=patch):
            with use_backend("triton" if path == "triton" else "torch"):
                ours = run(fused if path == "triton" else reference_fn, low_inputs, case)
            low = run(reference_fn, low_inputs, case) if precision != "fp32" else None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as error:  # a kernel that fails to compile or launch is a failed check
        return [Row(op, case.label, precision, path, "run", None, 0.0, f"{type(error).__name__}: {error}")]
    return _compare(op, case.label, precision, path, ours, expected, low, cosine)


def run_checks(device=None, *, precisions=None, quick: bool = False,
               on_row: Optional[Callable[[Row], None]] = None) -> Report:
    """Every fused op at its cases and `precisions` (default: all this device runs) on `device`
    (default: CUDA where available). `quick`: the first case of each op only. `on_row` sees each
    row as it is made (the command line prints them, so an interrupted run shows what it did)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precisions = tuple(precisions or precisions_for(device))
    unknown = [p for p in precisions if p not in TIE_TOLERANCE]
    if unknown:
        raise ValueError(f"unknown precision(s) {unknown}: choose from {', '.join(TIE_TOLERANCE)}")
    if device.type != "cuda" and precisions != ("fp32",):
        raise ValueError(f"on {device.type} only fp32 is checked (Triton's interpreter computes in fp32), "
                         f"got {precisions}")
    path = "triton" if kernels_run_on(device) else "reference"
    if path == "triton" and device.type == "cuda":
        torch.cuda.set_device(device)
    patch_cases = PATCH_CASES + (PATCH_CUDA_CASES if device.type == "cuda" else ())
    residual_cases = RESIDUAL_CASES + (RESIDUAL_CUDA_CASES if device.type == "cuda" else ())
    if quick:
        patch_cases, residual_cases = patch_cases[:1], residual_cases[:1]
    checks = [("reprogram_patch_embed", case) for case in patch_cases]
    checks += [(op, case) for op in ("residual_logits", "residual_scores") for case in residual_cases]
    report = Report(describe(device), versions())
    for precision in precisions:
        for op, case in checks:
            for row in _check(op, case, precision, device, path):
                report.rows.append(row)
                if on_row is not None:
                    on_row(row)
    return report


_CHECKED: dict = {}


def check_kernels_once(device, precision: str = "fp32") -> Optional[Report]:
    """At the start of training on `device` in `precision` (`train.precision`): the quick checks
    of the kernels that run will launch, once per process, device and precision; None where no
    kernel runs (not CUDA, or the `torch` backend). Raises `KernelCheckFailed` naming the op."""
    device = torch.device(device)
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(TRAIN_PRECISIONS)}")
    if device.type != "cuda" or not kernels_run_on(device):
        return None
    key = (str(device), precision)
    if key not in _CHECKED:
        _CHECKED[key] = run_checks(device, precisions=TRAIN_PRECISIONS[precision], quick=True)
    return raise_if_failed(_CHECKED[key])


def raise_if_failed(report: Report) -> Report:
    """`report` if every check passed, else `KernelCheckFailed` naming the ops, the first error
    and the way to train on the reference ops."""
    if report.ok:
        return report
    failed = report.failures
    first = failed[0]
    what = first.detail or f"{first.quantity} error {first.error:.2e} > tolerance {first.tolerance:.1e}"
    raise KernelCheckFailed(
        f"fused kernel(s) {', '.join(dict.fromkeys(row.op for row in failed))} disagree with their PyTorch "
        f"reference on {report.device} ({', '.join(f'{k} {v}' for k, v in report.versions.items())}): "
        f"{first.op} {first.case} {first.precision}: {what}. Training would compute wrong results or "
        "gradients: train on the reference ops with REPROGRAMMER_BACKEND=torch, and see `reprogrammer "
        "doctor` for every check.\n" + report.table())
