"""Residual blend of reprogrammed and zero-shot features, cosine logits and OOD scores
(METHOD.md sections 4 and 5).

    img = (1 - a) * norm(img_rp) + a * norm(img_zs)        # [B, D], not re-normalised
    txt = (1 - a) * norm(txt_rp) + a * norm(txt_zs)        # [C, D]
    cos = img @ txt.T                                       # [B, C]
    logits = logit_scale * cos

`norm` is `F.normalize` (rows divided by `max(||row||, 1e-12)`). The text side is tiny and is
blended in PyTorch once per call; the image side never exists as a tensor on the Triton path:
each program computes the inverse row norms of its `img_rp` / `img_zs` rows, then blends
them while loading the GEMM's A operand. Accumulation is fp32; the dot's inputs are in the
features' dtype (fp32 dots use TF32 only when `torch.get_float32_matmul_precision()` allows it).

Dtypes: `img_rp`'s dtype is the compute dtype; the other inputs are cast to it. Logits come
back in that dtype; the OOD scores are always fp32.

Gradient of the logits w.r.t. the image rows, with `g = dL/dimg` (rows) and `u = x / ||x||`:

    dL/dx = w / ||x|| * (g - u (u . g)),     w = 1 - a for img_rp, a for img_zs

(`g / 1e-12` for rows shorter than `1e-12`, where `F.normalize` divides by the constant).
The text side and `logit_scale` get their gradients from PyTorch's autograd through the
blend, so training with the residual path on works for `img_rp`, `txt_rp` and any `a`.

Scores (evaluation only, no gradient) for temperature `T`, per row of `cos`:
`prediction = argmax`, `mcm = max softmax(cos / T)`, `energy = T * logsumexp(cos / T)`,
`max_logit = max cos` (the blended cosine, not scaled by `logit_scale`). The Triton kernel
gets them with an online softmax over tiles of classes, writing logits only when asked.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .backend import use_triton

NORM_EPS = 1e-12  # F.normalize's default; the kernels spell it out as a literal
# Fewest programs the scores kernel aims for (about one per SM of a large GPU) before it
# trades rows per program for parallelism.
MIN_SCORE_PROGRAMS = 128


class ResidualScores(NamedTuple):
    prediction: Tensor  # int64 [B], argmax over classes
    mcm: Tensor  # fp32 [B], max softmax(cos / T)
    energy: Tensor  # fp32 [B], T * logsumexp(cos / T)
    max_logit: Tensor  # fp32 [B], max of the blended cosine (unscaled)
    logits: Tensor | None  # [B, C] logit_scale * cos in the compute dtype, when asked for


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _inverse_row_norms(x_ptr, rows, row_ok, D, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """`1 / max(||x[row]||, eps)` for the `BLOCK_B` rows of a contiguous `[B, D]` matrix."""
    squares = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * D + ks[None, :],
                    mask=row_ok[:, None] & (ks[None, :] < D), other=0.0).to(tl.float32)
        squares += x * x
    return 1.0 / tl.maximum(tl.sqrt(tl.sum(squares, axis=1)), 1e-12)  # NORM_EPS


@triton.jit
def _blend_weights(img_rp_ptr, img_zs_ptr, rows, row_ok, D, alpha,
                   USE_RP: tl.constexpr, USE_ZS: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row factors `(1 - a) / ||img_rp||` and `a / ||img_zs||`; an unused side reads nothing."""
    w_rp = tl.zeros((BLOCK_B,), tl.float32)
    w_zs = tl.zeros((BLOCK_B,), tl.float32)
    if USE_RP:
        w_rp = (1.0 - alpha) * _inverse_row_norms(img_rp_ptr, rows, row_ok, D, BLOCK_B, BLOCK_K)
    if USE_ZS:
        w_zs = alpha * _inverse_row_norms(img_zs_ptr, rows, row_ok, D, BLOCK_B, BLOCK_K)
    return w_rp, w_zs


@triton.jit
def _cosine_tile(img_rp_ptr, img_zs_ptr, txt_ptr, w_rp, w_zs, rows, row_ok, cols, col_ok, D,
                 USE_RP: tl.constexpr, USE_ZS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 `[BLOCK_B, BLOCK_C]` tile of `blend(img) @ txt.T`, blending while loading A."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a_offsets = rows[:, None] * D + ks[None, :]
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
        if USE_RP:
            a += w_rp[:, None] * tl.load(img_rp_ptr + a_offsets, mask=a_mask, other=0.0).to(tl.float32)
        if USE_ZS:
            a += w_zs[:, None] * tl.load(img_zs_ptr + a_offsets, mask=a_mask, other=0.0).to(tl.float32)
        # B operand: txt.T tile, [BLOCK_K, BLOCK_C], read straight from row-major txt.
        b = tl.load(txt_ptr + cols[None, :] * D + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _residual_logits_kernel(
    img_rp_ptr,  # [B, D] contiguous, reprogrammed image features (any norm)
    img_zs_ptr,  # [B, D] contiguous, zero-shot image features, same dtype; unread when a == 0
    txt_ptr,  # [C, D] contiguous, blended text features times logit_scale, same dtype
    out_ptr,  # [B, C] contiguous logits, same dtype
    B, C, D,  # sizes
    alpha,  # blend weight a of the zero-shot side, in [0, 1]
    USE_RP: tl.constexpr,  # a < 1
    USE_ZS: tl.constexpr,  # a > 0
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 inputs ("ieee" or "tf32")
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One [BLOCK_B, BLOCK_C] tile of logits per program; the grid is (B tiles, C tiles).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < B
    col_ok = cols < C
    w_rp, w_zs = _blend_weights(img_rp_ptr, img_zs_ptr, rows, row_ok, D, alpha,
                                USE_RP, USE_ZS, BLOCK_B, BLOCK_K)
    acc = _cosine_tile(img_rp_ptr, img_zs_ptr, txt_ptr, w_rp, w_zs, rows, row_ok, cols, col_ok, D,
                       USE_RP, USE_ZS, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _residual_scores_kernel(
    img_rp_ptr,  # [B, D] contiguous, reprogrammed image features
    img_zs_ptr,  # [B, D] contiguous, zero-shot image features, same dtype; unread when a == 0
    txt_ptr,  # [C, D] contiguous, blended text features (unscaled), same dtype
    scale_ptr,  # [1] fp32 logit_scale; read only when STORE_LOGITS
    prediction_ptr,  # [B] int64 out: argmax (first of ties)
    mcm_ptr,  # [B] fp32 out: max softmax(cos / T) = 1 / sum exp((cos - max) / T)
    energy_ptr,  # [B] fp32 out: T * logsumexp(cos / T) = max + T * log(sum exp((cos - max) / T))
    max_ptr,  # [B] fp32 out: max cos
    logits_ptr,  # [B, C] contiguous out in the input dtype: logit_scale * cos; used when STORE_LOGITS
    B, C, D,  # sizes
    alpha,  # blend weight a of the zero-shot side
    temperature,  # T > 0
    USE_RP: tl.constexpr, USE_ZS: tl.constexpr, STORE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Each program owns BLOCK_B whole rows and walks the classes in BLOCK_C tiles, keeping a
    # running max m, argmax and l = sum exp((cos - m) / T), rescaled whenever m grows.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    w_rp, w_zs = _blend_weights(img_rp_ptr, img_zs_ptr, rows, row_ok, D, alpha,
                                USE_RP, USE_ZS, BLOCK_B, BLOCK_K)
    to_log2 = 1.4426950408889634 / temperature  # exp(x / T) = exp2(x * log2(e) / T)
    running_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_B,), tl.float32)
    best = tl.zeros((BLOCK_B,), tl.int64)
    for c in range(0, C, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        cos = _cosine_tile(img_rp_ptr, img_zs_ptr, txt_ptr, w_rp, w_zs, rows, row_ok, cols, col_ok, D,
                           USE_RP, USE_ZS, DOT_PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)
        if STORE_LOGITS:
            scale = tl.load(scale_ptr)
            tl.store(logits_ptr + rows[:, None] * C + cols[None, :],
                     (scale * cos).to(logits_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
        cos = tl.where(col_ok[None, :], cos, float("-inf"))
        tile_max = tl.max(cos, axis=1)
        tile_best = c + tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int64)
        # Strictly greater: an earlier tile keeps ties, as torch.argmax does.
        best = tl.where(tile_max > running_max, tile_best, best)
        new_max = tl.maximum(running_max, tile_max)
        running_sum = (running_sum * tl.exp2((running_max - new_max) * to_log2)
                       + tl.sum(tl.exp2((cos - new_max[:, None]) * to_log2), axis=1))
        running_max = new_max
    tl.store(prediction_ptr + rows, best, mask=row_ok)
    tl.store(mcm_ptr + rows, 1.0 / running_sum, mask=row_ok)
    tl.store(energy_ptr + rows, running_max + temperature * tl.log(running_sum), mask=row_ok)
    tl.store(max_ptr + rows, running_max, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _block(n: int, low: int, high: int) -> int:
    """Power-of-two block covering `n`, within [low, high] (tl.dot needs every dim >= 16)."""
    return max(low, min(high, triton.next_power_of_2(n)))


def _num_warps(block_b: int, block_c: int) -> int:
    # Eight warps from 32 x 128 tiles up: with four, the fp32 tile plus the blend (and the
    # softmax state in the scores kernel) spill registers on sm_90 (ptxas -v).
    return 8 if block_b * block_c >= 32 * 128 else 4


def _dot_precision(dtype: torch.dtype) -> str:
    # Follow PyTorch's own fp32 matmul setting so the kernel and the reference agree.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch_logits(img_rp: Tensor, img_zs: Tensor, txt: Tensor, alpha: float) -> Tensor:
    (B, D), C = img_rp.shape, txt.shape[0]
    out = img_rp.new_empty(B, C)
    block_b, block_c, block_k = _block(B, 16, 64), _block(C, 16, 128), _block(D, 16, 64)
    grid = (triton.cdiv(B, block_b), triton.cdiv(C, block_c))
    wrap_triton(_residual_logits_kernel)[grid](
        img_rp, img_zs, txt, out, B, C, D, alpha,
        USE_RP=alpha < 1.0, USE_ZS=alpha > 0.0, DOT_PRECISION=_dot_precision(img_rp.dtype),
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=_num_warps(block_b, block_c),
    )
    return out


def _launch_scores(img_rp: Tensor, img_zs: Tensor, txt: Tensor, logit_scale: Tensor, alpha: float,
                   temperature: float, return_logits: bool) -> tuple[Tensor, ...]:
    (B, D), C = img_rp.shape, txt.shape[0]
    # Rows per program: 32 where that still keeps MIN_SCORE_PROGRAMS programs busy (64 rows
    # with the softmax state spill registers even at eight warps).
    block_b = 32 if triton.cdiv(B, 32) >= MIN_SCORE_PROGRAMS else 16
    block_c, block_k = _block(C, 16, 128), _block(D, 16, 64)
    prediction = torch.empty(B, dtype=torch.int64, device=img_rp.device)
    mcm, energy, max_cos = (torch.empty(B, dtype=torch.float32, device=img_rp.device) for _ in range(3))
    logits = img_rp.new_empty(B, C if return_logits else 0)
    wrap_triton(_residual_scores_kernel)[(triton.cdiv(B, block_b),)](
        img_rp, img_zs, txt, logit_scale, prediction, mcm, energy, max_cos, logits,
        B, C, D, alpha, temperature,
        USE_RP=alpha < 1.0, USE_ZS=alpha > 0.0, STORE_LOGITS=return_logits,
        DOT_PRECISION=_dot_precision(img_rp.dtype),
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=_num_warps(block_b, block_c),
    )
    return prediction, mcm, energy, max_cos, logits


# ---------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------
def _check_inputs(img_rp, img_zs, txt_rp, txt_zs, alpha):
    if img_rp.dim() != 2 or txt_rp.dim() != 2 or img_rp.shape[1] != txt_rp.shape[1]:
        raise ValueError(
            f"image features must be [B, D] and text features [C, D], got {tuple(img_rp.shape)} "
            f"and {tuple(txt_rp.shape)}"
        )
    if img_zs.shape != img_rp.shape or txt_zs.shape != txt_rp.shape:
        raise ValueError(
            f"zero-shot features {tuple(img_zs.shape)}, {tuple(txt_zs.shape)} must match the "
            f"reprogrammed ones {tuple(img_rp.shape)}, {tuple(txt_rp.shape)}"
        )
    features = (img_rp, img_zs, txt_rp, txt_zs)
    if not all(f.is_floating_point() for f in features):
        raise TypeError(f"features must be floating point, got {[f.dtype for f in features]}")
    if len({f.device for f in features}) > 1:
        raise ValueError(
            f"features live on different devices {[str(f.device) for f in features]}; move them "
            "to one device"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1] (0: Reprogrammer, 1: zero-shot)")


def blend(rp: torch.Tensor, zs: torch.Tensor, alpha: float) -> torch.Tensor:
    """`(1 - a) * norm(rp) + a * norm(zs)`, without re-normalisation."""
    if alpha == 0.0:
        # Plain Reprogrammer: `zs` may be a placeholder (callers pass `rp` again); never read it.
        return F.normalize(rp, dim=-1)
    return (1.0 - alpha) * F.normalize(rp, dim=-1) + alpha * F.normalize(zs, dim=-1)


def residual_logits_ref(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale) -> torch.Tensor:
    """Reference for `residual_logits`: both blends materialised, then one matmul."""
    _check_inputs(img_rp, img_zs, txt_rp, txt_zs, alpha)
    dtype = img_rp.dtype
    img = blend(img_rp, img_zs.to(dtype), alpha)
    txt = blend(txt_rp, txt_zs, alpha).to(dtype)
    return logit_scale * img @ txt.T


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive (the paper uses 0.01)")


def _scores_of_cosine(cos: Tensor, logit_scale, temperature: float, return_logits: bool):
    """(prediction, mcm, energy, max cos, logits or None) of materialised cosines `[B, C]`."""
    z = cos.float() / temperature
    logits = (logit_scale * cos).to(cos.dtype) if return_logits else None
    return (cos.argmax(dim=1), z.softmax(dim=1).amax(dim=1), temperature * z.logsumexp(dim=1),
            cos.float().amax(dim=1), logits)


def residual_scores_ref(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale,
                        temperature: float = 0.01, return_logits: bool = False) -> ResidualScores:
    """Reference for `residual_scores`: materialises the cosines, then reduces them."""
    _check_temperature(temperature)
    cos = residual_logits_ref(img_rp, img_zs, txt_rp, txt_zs, alpha=alpha, logit_scale=1.0)
    return ResidualScores(*_scores_of_cosine(cos, logit_scale, temperature, return_logits))


# ---------------------------------------------------------------------------------------------
# Operators: Triton where `use_triton` says so, the reference otherwise (CPU, torch backend)
# ---------------------------------------------------------------------------------------------
@triton_op("reprogrammer::residual_logits", mutates_args=())
def _residual_logits_op(img_rp: Tensor, img_zs: Tensor, txt: Tensor, alpha: float) -> Tensor:
    """`blend(img_rp, img_zs) @ txt.T`; `txt` is already blended and scaled, all in one dtype."""
    if use_triton(img_rp):
        return _launch_logits(img_rp.contiguous(), img_zs.contiguous(), txt.contiguous(), alpha)
    return blend(img_rp, img_zs, alpha) @ txt.T


def _normalize_backward(x: Tensor, grad: Tensor, weight: float) -> Tensor:
    """Gradient w.r.t. `x` of `weight * F.normalize(x)` given the upstream `grad`, in fp32."""
    x32, grad32 = x.float(), grad.float()
    norm = x32.norm(dim=-1, keepdim=True)
    inverse = 1.0 / norm.clamp_min(NORM_EPS)
    unit = x32 * inverse
    # Below eps F.normalize divides by a constant: no projection term.
    along = torch.where(norm > NORM_EPS, (unit * grad32).sum(dim=-1, keepdim=True), 0.0)
    return (weight * inverse * (grad32 - unit * along)).to(x.dtype)


def _logits_setup_context(ctx, inputs, output):
    img_rp, img_zs, txt, alpha = inputs
    ctx.save_for_backward(img_rp, img_zs, txt)
    ctx.alpha = alpha


def _logits_backward(ctx, grad):
    img_rp, img_zs, txt = ctx.saved_tensors
    alpha = ctx.alpha
    need_rp, need_zs, need_txt = ctx.needs_input_grad[:3]
    grad_rp = grad_zs = grad_txt = None
    if need_rp or need_zs:
        grad_img = grad @ txt  # dL/d(blended image rows)
        if need_rp:
            grad_rp = _normalize_backward(img_rp, grad_img, 1.0 - alpha)
        if need_zs:
            grad_zs = _normalize_backward(img_zs, grad_img, alpha)
    if need_txt:
        grad_txt = grad.T @ blend(img_rp, img_zs, alpha)
    return grad_rp, grad_zs, grad_txt, None


_residual_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


@triton_op("reprogrammer::residual_scores", mutates_args=())
def _residual_scores_op(img_rp: Tensor, img_zs: Tensor, txt: Tensor, logit_scale: Tensor, alpha: float,
                        temperature: float, return_logits: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Scores of `cos = blend(img_rp, img_zs) @ txt.T` (`txt` blended, unscaled); the logits
    output is `[B, 0]` unless `return_logits`."""
    if use_triton(img_rp):
        return _launch_scores(img_rp.contiguous(), img_zs.contiguous(), txt.contiguous(), logit_scale,
                              alpha, temperature, return_logits)
    cos = blend(img_rp, img_zs, alpha) @ txt.T
    *scores, logits = _scores_of_cosine(cos, logit_scale, temperature, return_logits)
    return (*scores, cos.new_empty(cos.shape[0], 0) if logits is None else logits)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def residual_logits(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale) -> torch.Tensor:
    """Residual Reprogrammer logits `[B, C]` in `img_rp`'s dtype; see the module docstring.

    `logit_scale` (a float or 0-d tensor, `exp` of CLIP's parameter) is folded into the text
    side. Differentiable w.r.t. every input, except that with `alpha == 0` `img_zs` and
    `txt_zs` are never read and so get no gradient.
    """
    _check_inputs(img_rp, img_zs, txt_rp, txt_zs, alpha)
    dtype = img_rp.dtype
    txt = (logit_scale * blend(txt_rp, txt_zs, alpha)).to(dtype)
    return _residual_logits_op(img_rp, img_zs.to(dtype), txt, float(alpha))


@torch.no_grad()
def residual_scores(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale,
                    temperature: float = 0.01, return_logits: bool = False) -> ResidualScores:
    """Prediction and OOD scores of the Residual Reprogrammer in one pass (evaluation only).

    `mcm`, `energy` and `max_logit` are fp32 functions of the blended cosine `cos` (not of
    `logit_scale * cos`); `logits` (`logit_scale * cos`, `[B, C]` in `img_rp`'s dtype) is
    computed only when `return_logits`, otherwise it is None and no `[B, C]` tensor is made.
    """
    _check_inputs(img_rp, img_zs, txt_rp, txt_zs, alpha)
    _check_temperature(temperature)
    dtype = img_rp.dtype
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=img_rp.device).reshape(1)
    prediction, mcm, energy, max_cos, logits = _residual_scores_op(
        img_rp, img_zs.to(dtype), blend(txt_rp, txt_zs, alpha).to(dtype), scale, float(alpha),
        float(temperature), return_logits)
    return ResidualScores(prediction, mcm, energy, max_cos, logits if return_logits else None)


# ---------------------------------------------------------------------------------------------
# Offline compile cases (bench/compile_report.py): the launchers' configurations at a shape
# ---------------------------------------------------------------------------------------------
_TRITON_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def sm90_cases(batch: int, classes: int, dim: int, dtype: str) -> list[dict]:
    """The logits and scores kernels as the launchers would run them at `[batch, dim]` images and
    `[classes, dim]` texts in `dtype` ("bf16" / "fp32"), in `bench.compile_report`'s case format."""
    t = _TRITON_TYPES[dtype]
    size = 2 if dtype != "fp32" else 4
    prec = "tf32" if dtype != "fp32" else "ieee"  # fp32 at PyTorch's default "highest"
    B, C, D = batch, classes, dim
    div = [n for n, v in (("B", B), ("C", C), ("D", D)) if v % 16 == 0]
    features = (2 * B * D + C * D) * size
    bb, bc, bk = _block(B, 16, 64), _block(C, 16, 128), _block(D, 16, 64)
    logits = dict(
        name="residual_logits", kernel=_residual_logits_kernel,
        signature={"img_rp_ptr": f"*{t}", "img_zs_ptr": f"*{t}", "txt_ptr": f"*{t}", "out_ptr": f"*{t}",
                   "B": "i32", "C": "i32", "D": "i32", "alpha": "fp32", "USE_RP": "constexpr",
                   "USE_ZS": "constexpr", "DOT_PRECISION": "constexpr", "BLOCK_B": "constexpr",
                   "BLOCK_C": "constexpr", "BLOCK_K": "constexpr"},
        constexprs=dict(USE_RP=True, USE_ZS=True, DOT_PRECISION=prec, BLOCK_B=bb, BLOCK_C=bc, BLOCK_K=bk),
        num_warps=_num_warps(bb, bc), num_stages=3, flops=2 * B * C * D, bytes=features + B * C * size,
        grid=(triton.cdiv(B, bb), triton.cdiv(C, bc)), outputs=B * C, trips=triton.cdiv(D, bk),
        divisible_by_16=div)
    sb = 32 if triton.cdiv(B, 32) >= MIN_SCORE_PROGRAMS else 16
    scores = dict(
        name="residual_scores", kernel=_residual_scores_kernel,
        signature={"img_rp_ptr": f"*{t}", "img_zs_ptr": f"*{t}", "txt_ptr": f"*{t}", "scale_ptr": "*fp32",
                   "prediction_ptr": "*i64", "mcm_ptr": "*fp32", "energy_ptr": "*fp32", "max_ptr": "*fp32",
                   "logits_ptr": f"*{t}", "B": "i32", "C": "i32", "D": "i32", "alpha": "fp32",
                   "temperature": "fp32", "USE_RP": "constexpr", "USE_ZS": "constexpr",
                   "STORE_LOGITS": "constexpr", "DOT_PRECISION": "constexpr", "BLOCK_B": "constexpr",
                   "BLOCK_C": "constexpr", "BLOCK_K": "constexpr"},
        constexprs=dict(USE_RP=True, USE_ZS=True, STORE_LOGITS=False, DOT_PRECISION=prec, BLOCK_B=sb,
                        BLOCK_C=bc, BLOCK_K=bk),
        num_warps=_num_warps(sb, bc), num_stages=3, flops=2 * B * C * D, bytes=features + B * 20,
        grid=(triton.cdiv(B, sb),), outputs=B * C, trips=triton.cdiv(C, bc) * triton.cdiv(D, bk), outer_trips=triton.cdiv(C, bc),
        divisible_by_16=div)
    return [logits, scores]
