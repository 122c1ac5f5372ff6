"""Residual blend of reprogrammed and zero-shot features, cosine logits and OOD scores
(docs/method.md sections 4 and 5).

    img = (1 - a) * norm(img_rp) + a * norm(img_zs)        # [B, D], not re-normalised
    txt = (1 - a) * norm(txt_rp) + a * norm(txt_zs)        # [C, D]
    cos = img @ txt.T                                       # [B, C]
    logits = logit_scale * cos

and per row of `cos`, for a temperature `T` (0.01 in the paper):

    prediction = argmax cos (the first of ties)     mcm = max softmax(cos / T)
    energy = T * logsumexp(cos / T)                 max_logit = max cos

`norm` is `F.normalize` (rows divided by `max(||row||, 1e-12)`). The scores are functions of the
blended cosine, not of `logit_scale * cos`. `ood_scores` is their one definition: the reference
ops, evaluation, ONNX export and its verification all call it.

Why fused: evaluation scores every image against every class, at each alpha of a sweep. The
eager reference materialises the blended image rows and the `[B, C]` logits (about ten
kernels); here the image side never exists as a tensor. Each program computes the inverse row
norms of its image rows, blends its row block once, keeps it on chip (tensor-core dots: bf16,
fp16, fp32 as TF32) or streams it (IEEE fp32, FMA-bound, where the blend is 2 / BLOCK_C of the
work), and sweeps its classes against it. The scores kernel keeps an online softmax over class
tiles, so no `[B, C]` tensor is written unless the logits are asked for; classes are split
across programs only as far as needed to fill the GPU, and `_combine_scores_kernel` merges the
groups. The text side is tiny: it is blended in PyTorch once per call, and while no gradient
can reach it kept across calls (`cache.TensorCache`, keyed on the text tensors and `alpha`).
The compiled code's evidence (registers, shared memory, instructions per output on sm_90a) is
in bench/results/compile-sm90a-offline-*.md, written by `python -m bench.compile_report`.

Dtypes: `img_rp`'s dtype is the compute dtype; the other inputs are cast to it. Logits come
back in that dtype; the OOD scores are always fp32.

Gradient of the logits w.r.t. the image rows, with `g = dL/dimg` (rows) and `u = x / ||x||`:

    dL/dx = w / ||x|| * (g - u (u . g)),     w = 1 - a for img_rp, a for img_zs

(`g / 1e-12` for rows shorter than `1e-12`, where `F.normalize` divides by the constant).
The text side and `logit_scale` get their gradients from PyTorch's autograd through the
blend, so training with the residual path on works for `img_rp`, `txt_rp` and any `a`.
"""
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from ._triton import tl, triton, wrap_triton
from .backend import use_triton
from .cache import TensorCache
from .launch import DEFAULT_SM_COUNT, cdiv, dot_precision, pow2_between
from .launch import sm_count as _sm_count  # a module attribute, so that tests can replace it

NORM_EPS = 1e-12  # F.normalize's default; the kernels spell it out as a literal


class ResidualScores(NamedTuple):
    prediction: Tensor  # int64 [B], argmax over classes
    mcm: Tensor  # fp32 [B], max softmax(cos / T)
    energy: Tensor  # fp32 [B], T * logsumexp(cos / T)
    max_logit: Tensor  # fp32 [B], max of the blended cosine (unscaled)
    logits: Tensor | None  # [B, C] logit_scale * cos in the compute dtype, when asked for


# ---------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------
def check_alpha(alpha, key: str = "alpha") -> float:
    """`alpha` as a float, or a ValueError naming `key` when it is not a number in [0, 1]."""
    value = float(alpha) if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) else float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{key}={alpha!r} must be a number in [0, 1], the weight of the zero-shot features (0: "
            f"Reprogrammer, 1: zero-shot CLIP, in between: Residual Reprogrammer); give {key} a value "
            "in that range"
        )
    return value


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
    check_alpha(alpha)


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


def ood_scores(cos: Tensor, temperature: float) -> ResidualScores:
    """The OOD scores of per-class similarities `[N, C]`: the one definition (module docstring).

    For CLIP-style classifiers pass the cosines with `T = 0.01` (the authors' fixed setting);
    any classifier's logits with its own temperature (1: MSP). `mcm`, `energy` and `max_logit`
    are fp32, `prediction` int64 (the first of tied classes); `logits` is None.
    """
    if cos.dim() != 2 or cos.shape[1] == 0:
        raise ValueError(f"expected [N, C] per-class scores with C >= 1, got shape {tuple(cos.shape)}")
    _check_temperature(temperature)
    z = cos.float() / temperature
    return ResidualScores(cos.argmax(dim=1), z.softmax(dim=1).amax(dim=1), temperature * z.logsumexp(dim=1),
                          cos.float().amax(dim=1), None)


def _scores_and_logits(cos: Tensor, logit_scale, temperature: float, return_logits: bool) -> ResidualScores:
    """`ood_scores(cos)` with `logit_scale * cos` in `cos`'s dtype when `return_logits`."""
    logits = (logit_scale * cos).to(cos.dtype) if return_logits else None
    return ResidualScores(*ood_scores(cos, temperature)[:4], logits)


def residual_scores_ref(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale,
                        temperature: float = 0.01, return_logits: bool = False) -> ResidualScores:
    """Reference for `residual_scores`: materialises the cosines, then reduces them."""
    _check_temperature(temperature)
    cos = residual_logits_ref(img_rp, img_zs, txt_rp, txt_zs, alpha=alpha, logit_scale=1.0)
    return _scores_and_logits(cos, logit_scale, temperature, return_logits)


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
def _blended_columns(img_rp_ptr, img_zs_ptr, w_rp, w_zs, rows, row_ok, k0, D,
                     USE_RP: tl.constexpr, USE_ZS: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns `[k0, k0 + BLOCK_K)` of the blended image block, fp32 (zero outside the matrix)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    offsets = rows[:, None] * D + ks[None, :]
    mask = row_ok[:, None] & (ks[None, :] < D)
    a = tl.zeros((BLOCK_B, BLOCK_K), tl.float32)
    if USE_RP:
        a += w_rp[:, None] * tl.load(img_rp_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if USE_ZS:
        a += w_zs[:, None] * tl.load(img_zs_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _blended_block(img_rp_ptr, img_zs_ptr, txt_ptr, rows, row_ok, D, alpha,
                   USE_RP: tl.constexpr, USE_ZS: tl.constexpr, NUM_K: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's blended image rows, once: blend weights, and with `NUM_K > 0` the whole
    `[BLOCK_B, NUM_K * BLOCK_K]` block as up to four column chunks in the dot's input dtype,
    which stay on chip (registers or shared memory) for the whole class sweep. With
    `NUM_K == 0` (a block too large to keep) the chunks are placeholders and the class sweep
    blends while loading, as a streaming GEMM."""
    w_rp, w_zs = _blend_weights(img_rp_ptr, img_zs_ptr, rows, row_ok, D, alpha, USE_RP, USE_ZS, BLOCK_B,
                                BLOCK_K)
    a0 = w_rp
    if NUM_K > 0:
        a0 = _blended_columns(img_rp_ptr, img_zs_ptr, w_rp, w_zs, rows, row_ok, 0, D, USE_RP, USE_ZS,
                              BLOCK_B, BLOCK_K).to(txt_ptr.dtype.element_ty)
    a1 = a0
    a2 = a0
    a3 = a0
    if NUM_K > 1:
        a1 = _blended_columns(img_rp_ptr, img_zs_ptr, w_rp, w_zs, rows, row_ok, BLOCK_K, D, USE_RP, USE_ZS,
                              BLOCK_B, BLOCK_K).to(txt_ptr.dtype.element_ty)
    if NUM_K > 2:
        a2 = _blended_columns(img_rp_ptr, img_zs_ptr, w_rp, w_zs, rows, row_ok, 2 * BLOCK_K, D, USE_RP,
                              USE_ZS, BLOCK_B, BLOCK_K).to(txt_ptr.dtype.element_ty)
    if NUM_K > 3:
        a3 = _blended_columns(img_rp_ptr, img_zs_ptr, w_rp, w_zs, rows, row_ok, 3 * BLOCK_K, D, USE_RP,
                              USE_ZS, BLOCK_B, BLOCK_K).to(txt_ptr.dtype.element_ty)
    return w_rp, w_zs, a0, a1, a2, a3


@triton.jit
def _cosine_tile(img_rp_ptr, img_zs_ptr, txt_ptr, w_rp, w_zs, a0, a1, a2, a3, rows, row_ok, cols, col_ok, D,
                 USE_RP: tl.constexpr, USE_ZS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 NUM_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 `[BLOCK_B, BLOCK_C]` tile of `blend(img) @ txt.T` for the classes `cols`."""
    ks = tl.arange(0, BLOCK_K)
    # B operand: txt.T chunks, [BLOCK_K, BLOCK_C], read straight from row-major txt.
    b_ptrs = txt_ptr + cols[None, :] * D + ks[:, None]
    if NUM_K == 0:
        acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
        for k in range(0, D, BLOCK_K):
            a = _blended_columns(img_rp_ptr, img_zs_ptr, w_rp, w_zs, rows, row_ok, k, D, USE_RP, USE_ZS,
                                 BLOCK_B, BLOCK_K)
            b = tl.load(b_ptrs + k, mask=col_ok[None, :] & (ks[:, None] + k < D), other=0.0)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    else:
        b = tl.load(b_ptrs, mask=col_ok[None, :] & (ks[:, None] < D), other=0.0)
        acc = tl.dot(a0, b, input_precision=DOT_PRECISION)
        if NUM_K > 1:
            b = tl.load(b_ptrs + BLOCK_K, mask=col_ok[None, :] & (ks[:, None] + BLOCK_K < D), other=0.0)
            acc = tl.dot(a1, b, acc, input_precision=DOT_PRECISION)
        if NUM_K > 2:
            b = tl.load(b_ptrs + 2 * BLOCK_K, mask=col_ok[None, :] & (ks[:, None] + 2 * BLOCK_K < D), other=0.0)
            acc = tl.dot(a2, b, acc, input_precision=DOT_PRECISION)
        if NUM_K > 3:
            b = tl.load(b_ptrs + 3 * BLOCK_K, mask=col_ok[None, :] & (ks[:, None] + 3 * BLOCK_K < D), other=0.0)
            acc = tl.dot(a3, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _residual_logits_kernel(
    img_rp_ptr,  # [B, D] contiguous, reprogrammed image features (any norm)
    img_zs_ptr,  # [B, D] contiguous, zero-shot image features, same dtype; unread when a == 0
    txt_ptr,  # [C, D] contiguous, blended text features times logit_scale, same dtype
    out_ptr,  # [B, C] contiguous logits, same dtype
    B, C, D,  # sizes
    alpha,  # blend weight a of the zero-shot side, in [0, 1]
    classes_per_program,  # classes each program sweeps, a multiple of BLOCK_C
    USE_RP: tl.constexpr,  # a < 1
    USE_ZS: tl.constexpr,  # a > 0
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 inputs ("ieee" or "tf32")
    NUM_K: tl.constexpr,  # column chunks of the kept image block (0: stream, blend per class tile)
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (i, j): image rows [i * BLOCK_B, ...), blended once, against classes
    # [j * classes_per_program, ...) in BLOCK_C tiles.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    w_rp, w_zs, a0, a1, a2, a3 = _blended_block(img_rp_ptr, img_zs_ptr, txt_ptr, rows, row_ok, D, alpha,
                                                USE_RP, USE_ZS, NUM_K, BLOCK_B, BLOCK_K)
    first = tl.program_id(1).to(tl.int64) * classes_per_program
    last = tl.minimum(first + classes_per_program, C)
    for c in range(first, last, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        col_ok = cols < last
        acc = _cosine_tile(img_rp_ptr, img_zs_ptr, txt_ptr, w_rp, w_zs, a0, a1, a2, a3, rows, row_ok, cols,
                           col_ok, D, USE_RP, USE_ZS, DOT_PRECISION, NUM_K, BLOCK_B, BLOCK_C, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * C + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _residual_scores_kernel(
    img_rp_ptr,  # [B, D] contiguous, reprogrammed image features
    img_zs_ptr,  # [B, D] contiguous, zero-shot image features, same dtype; unread when a == 0
    txt_ptr,  # [C, D] contiguous, blended text features (unscaled), same dtype
    scale_ptr,  # [1] fp32 logit_scale; read only when STORE_LOGITS
    prediction_ptr,  # [G, B] int64 out: argmax (first of ties) over the program's classes
    sum_ptr,  # [G, B] fp32 out: sum exp((cos - max) / T) over the program's classes
    max_ptr,  # [G, B] fp32 out: max cos over the program's classes
    mcm_ptr,  # [B] fp32 out when FINAL: max softmax(cos / T) = 1 / sum exp((cos - max) / T)
    energy_ptr,  # [B] fp32 out when FINAL: T * logsumexp(cos / T) = max + T * log(sum ...)
    logits_ptr,  # [B, C] contiguous out in the input dtype: logit_scale * cos; used when STORE_LOGITS
    B, C, D,  # sizes
    alpha,  # blend weight a of the zero-shot side
    temperature,  # T > 0
    classes_per_program,  # classes each program sweeps, a multiple of BLOCK_C
    USE_RP: tl.constexpr, USE_ZS: tl.constexpr, STORE_LOGITS: tl.constexpr,
    FINAL: tl.constexpr,  # one group of classes (G == 1): write the scores, not the sums
    DOT_PRECISION: tl.constexpr, NUM_K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (i, j) owns BLOCK_B rows and the j-th group of classes, walked in BLOCK_C tiles,
    # keeping a running max m, argmax and l = sum exp((cos - m) / T), rescaled whenever m grows.
    # With one group (FINAL) these are the row's final state; else `_combine_scores_kernel`
    # merges the groups and turns (m, l) into the scores.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    w_rp, w_zs, a0, a1, a2, a3 = _blended_block(img_rp_ptr, img_zs_ptr, txt_ptr, rows, row_ok, D, alpha,
                                                USE_RP, USE_ZS, NUM_K, BLOCK_B, BLOCK_K)
    to_log2 = 1.4426950408889634 / temperature  # exp(x / T) = exp2(x * log2(e) / T)
    running_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_B,), tl.float32)
    best = tl.zeros((BLOCK_B,), tl.int64)
    first = tl.program_id(1).to(tl.int64) * classes_per_program
    last = tl.minimum(first + classes_per_program, C)
    for c in range(first, last, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        col_ok = cols < last
        cos = _cosine_tile(img_rp_ptr, img_zs_ptr, txt_ptr, w_rp, w_zs, a0, a1, a2, a3, rows, row_ok, cols,
                           col_ok, D, USE_RP, USE_ZS, DOT_PRECISION, NUM_K, BLOCK_B, BLOCK_C, BLOCK_K)
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
    state = tl.program_id(1).to(tl.int64) * B + rows
    tl.store(prediction_ptr + state, best, mask=row_ok)
    tl.store(max_ptr + state, running_max, mask=row_ok)
    if FINAL:
        tl.store(mcm_ptr + rows, 1.0 / running_sum, mask=row_ok)
        tl.store(energy_ptr + rows, running_max + temperature * tl.log(running_sum), mask=row_ok)
    else:
        tl.store(sum_ptr + state, running_sum, mask=row_ok)


@triton.jit
def _combine_scores_kernel(
    prediction_ptr,  # [G, B] int64 in: per-group argmax; row 0 receives the final argmax
    sum_ptr,  # [G, B] fp32 in: per-group sum exp((cos - m_g) / T)
    max_ptr,  # [G, B] fp32 in: per-group max m_g; row 0 receives the final max
    mcm_ptr,  # [B] fp32 out: 1 / sum exp((cos - max) / T)
    energy_ptr,  # [B] fp32 out: max + T * log(sum exp((cos - max) / T))
    B, G,  # rows, groups of classes (groups in class order)
    temperature,  # T > 0
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    to_log2 = 1.4426950408889634 / temperature
    best = tl.load(prediction_ptr + rows, mask=ok, other=0)
    total = tl.load(sum_ptr + rows, mask=ok, other=1.0)
    top = tl.load(max_ptr + rows, mask=ok, other=0.0)
    for g in range(1, G):
        group_best = tl.load(prediction_ptr + g * B + rows, mask=ok, other=0)
        group_sum = tl.load(sum_ptr + g * B + rows, mask=ok, other=0.0)
        group_max = tl.load(max_ptr + g * B + rows, mask=ok, other=float("-inf"))
        best = tl.where(group_max > top, group_best, best)  # an earlier group keeps ties
        new_top = tl.maximum(top, group_max)
        total = total * tl.exp2((top - new_top) * to_log2) + group_sum * tl.exp2((group_max - new_top) * to_log2)
        top = new_top
    tl.store(prediction_ptr + rows, best, mask=ok)
    tl.store(max_ptr + rows, top, mask=ok)
    tl.store(mcm_ptr + rows, 1.0 / total, mask=ok)
    tl.store(energy_ptr + rows, top + temperature * tl.log(total), mask=ok)




# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
# Shared memory a program may plan for: the kept image block plus two stages of text chunks,
# leaving the rest of the 227 KB an sm_90 CTA can have to the compiler's layout scratch.
SMEM_BUDGET = 192 * 1024
COMBINE_BLOCK = 256  # rows per program of the scores' group merge
MAX_CHUNKS = 4  # column chunks of a kept image block (a0 .. a3 in the kernels)
# (class tile, warps, stages) for a kept block, in order of preference: a 64 x 64 wgmma per
# warpgroup with the next tile's text loaded ahead, then two warpgroups of 64 x 32 without,
# then 64 x 16 with (ptxas -v: none of these spills at D = 512 and 768 in bf16).
KEPT_CONFIGS = ((64, 4, 2), (64, 8, 1), (32, 8, 2))


def _dot_precision(dtype: torch.dtype) -> str:
    return dot_precision(dtype, replaces="matmul")


def _plan(B: int, C: int, D: int, element_size: int, precision: str, sms: int, kernel: str) -> dict:
    """Block sizes, warps, stages and class groups of `kernel` ("logits" / "scores") for
    `[B, D] x [C, D]`.

    Tensor-core dots (bf16 / fp16, and fp32 as tf32) take 64-row blocks, the wgmma tile of a
    warpgroup on sm_90. The blended image block is kept when it and the text chunks in flight
    fit `SMEM_BUDGET` with one of the (class tile, warps, stages) in `KEPT_CONFIGS` (widest
    wgmma first), else it is streamed: blended per class tile while loading a K loop's A
    operand. IEEE fp32 (FMA-bound, the blend being 2 / BLOCK_C of its work) always streams, in
    32-row blocks (64 spill registers at eight warps, ptxas -v). Programs sweep `classes_per_program` classes; the classes are split into
    groups only as far as needed to give every SM a program (the logits of a streamed block
    take one class tile per program, as a plain GEMM).
    """
    plan = None
    if element_size < 4 or precision == "tf32":
        chunk = pow2_between(cdiv(D, MAX_CHUNKS), 16, 1 << 30)
        num_k = cdiv(D, chunk)
        kept = 64 * num_k * chunk * element_size
        for block_c, warps, stages in KEPT_CONFIGS:
            if kept + stages * num_k * chunk * block_c * element_size <= SMEM_BUDGET:
                plan = dict(NUM_K=num_k, BLOCK_B=64, BLOCK_C=block_c, BLOCK_K=chunk, num_warps=warps,
                            num_stages=stages)
                break
        if plan is None:
            plan = dict(NUM_K=0, BLOCK_B=64, BLOCK_C=pow2_between(C, 16, 128), BLOCK_K=pow2_between(D, 16, 64),
                        num_warps=8, num_stages=3)
    else:
        plan = dict(NUM_K=0, BLOCK_B=32, BLOCK_C=pow2_between(C, 16, 128), BLOCK_K=pow2_between(D, 16, 64), num_warps=8,
                    num_stages=3)
    row_blocks = cdiv(B, plan["BLOCK_B"])
    class_tiles = max(1, cdiv(C, plan["BLOCK_C"]))
    if kernel == "logits" and plan["NUM_K"] == 0:
        groups = class_tiles
    else:
        groups = max(1, min(class_tiles, sms // row_blocks))
    tiles_per_program = cdiv(class_tiles, groups)
    plan["classes_per_program"] = tiles_per_program * plan["BLOCK_C"]
    plan["grid"] = (row_blocks, cdiv(class_tiles, tiles_per_program))
    return plan


def _launch_plan(img_rp: Tensor, txt: Tensor, kernel: str) -> dict:
    (B, D), C = img_rp.shape, txt.shape[0]
    precision = _dot_precision(img_rp.dtype)
    plan = _plan(B, C, D, img_rp.element_size(), precision, _sm_count(img_rp.device), kernel)
    plan["DOT_PRECISION"] = precision
    return plan


def _launch_logits(img_rp: Tensor, img_zs: Tensor, txt: Tensor, alpha: float) -> Tensor:
    (B, D), C = img_rp.shape, txt.shape[0]
    out = img_rp.new_empty(B, C)
    plan = _launch_plan(img_rp, txt, "logits")
    grid, per_program = plan.pop("grid"), plan.pop("classes_per_program")
    wrap_triton(_residual_logits_kernel)[grid](
        img_rp, img_zs, txt, out, B, C, D, alpha, per_program,
        USE_RP=alpha < 1.0, USE_ZS=alpha > 0.0, **plan,
    )
    return out


def _launch_scores(img_rp: Tensor, img_zs: Tensor, txt: Tensor, logit_scale: Tensor, alpha: float,
                   temperature: float, return_logits: bool) -> tuple[Tensor, ...]:
    (B, D), C = img_rp.shape, txt.shape[0]
    plan = _launch_plan(img_rp, txt, "scores")
    grid, per_program = plan.pop("grid"), plan.pop("classes_per_program")
    groups = grid[1]
    device = img_rp.device
    prediction = torch.empty(groups, B, dtype=torch.int64, device=device)
    sums, max_cos = (torch.empty(groups, B, dtype=torch.float32, device=device) for _ in range(2))
    mcm, energy = (torch.empty(B, dtype=torch.float32, device=device) for _ in range(2))
    logits = img_rp.new_empty(B, C if return_logits else 0)
    wrap_triton(_residual_scores_kernel)[grid](
        img_rp, img_zs, txt, logit_scale, prediction, sums, max_cos, mcm, energy, logits,
        B, C, D, alpha, temperature, per_program,
        USE_RP=alpha < 1.0, USE_ZS=alpha > 0.0, STORE_LOGITS=return_logits, FINAL=groups == 1, **plan,
    )
    if groups > 1:
        wrap_triton(_combine_scores_kernel)[(cdiv(B, COMBINE_BLOCK),)](
            prediction, sums, max_cos, mcm, energy, B, groups, temperature, BLOCK=COMBINE_BLOCK, num_warps=4,
        )
    return prediction[0], mcm, energy, max_cos[0], logits



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
    *scores, logits = _scores_and_logits(cos, logit_scale, temperature, return_logits)
    return (*scores, cos.new_empty(cos.shape[0], 0) if logits is None else logits)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
# The blended text side of recent calls that no gradient can reach (an evaluation loop's): the
# same `[C, D]` on every call, but half a dozen small kernels to blend.
_TEXT_CACHE = TensorCache(capacity=8)


def _text_side(txt_rp: Tensor, txt_zs: Tensor, alpha: float, logit_scale, dtype: torch.dtype) -> Tensor:
    """`(logit_scale * blend(txt_rp, txt_zs)).to(dtype)` (`logit_scale` None: unscaled), once
    per call, and from `_TEXT_CACHE` in evaluation."""
    tensors = [txt_rp] if alpha == 0.0 else [txt_rp, txt_zs]
    if isinstance(logit_scale, Tensor):
        tensors.append(logit_scale)
        scale_key = "tensor"
    else:
        scale_key = None if logit_scale is None else float(logit_scale)

    def compute():
        txt = blend(txt_rp, txt_zs, alpha)
        return (txt if logit_scale is None else logit_scale * txt).to(dtype)

    return _TEXT_CACHE(tensors, (float(alpha), scale_key, dtype), compute)


def residual_logits(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale) -> torch.Tensor:
    """Residual Reprogrammer logits `[B, C]` in `img_rp`'s dtype; see the module docstring.

    `logit_scale` (a float or 0-d tensor, `exp` of CLIP's parameter) is folded into the text
    side. Differentiable w.r.t. every input, except that with `alpha == 0` `img_zs` and
    `txt_zs` are never read and so get no gradient. Without gradients to the text side, its
    blend is kept across calls (`_TEXT_CACHE`).
    """
    _check_inputs(img_rp, img_zs, txt_rp, txt_zs, alpha)
    dtype = img_rp.dtype
    txt = _text_side(txt_rp, txt_zs, alpha, logit_scale, dtype)
    return _residual_logits_op(img_rp, img_zs.to(dtype), txt, float(alpha))


@torch.no_grad()
def residual_scores(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale,
                    temperature: float = 0.01, return_logits: bool = False) -> ResidualScores:
    """Prediction and OOD scores of the Residual Reprogrammer in one pass (evaluation only).

    `mcm`, `energy` and `max_logit` are fp32 functions of the blended cosine `cos` (not of
    `logit_scale * cos`); `logits` (`logit_scale * cos`, `[B, C]` in `img_rp`'s dtype) is
    computed only when `return_logits`, otherwise it is None and no `[B, C]` tensor is made.
    The blended text side is kept across calls (`_TEXT_CACHE`). `ood_scores` of the cosines
    defines the scores; this op computes the same without materialising them.
    """
    _check_inputs(img_rp, img_zs, txt_rp, txt_zs, alpha)
    _check_temperature(temperature)
    dtype = img_rp.dtype
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=img_rp.device).reshape(1)
    prediction, mcm, energy, max_cos, logits = _residual_scores_op(
        img_rp, img_zs.to(dtype), _text_side(txt_rp, txt_zs, alpha, None, dtype), scale, float(alpha),
        float(temperature), return_logits)
    return ResidualScores(prediction, mcm, energy, max_cos, logits if return_logits else None)


# ---------------------------------------------------------------------------------------------
# Offline compile cases (bench/compile_report.py): the launchers' configurations at a shape
# ---------------------------------------------------------------------------------------------
_TRITON_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def sm90_cases(batch: int, classes: int, dim: int, dtype: str) -> list[dict]:
    """The logits and scores kernels (and the scores' group merge when the plan splits the
    classes) as the launchers run them on an H200 at `[batch, dim]` images and `[classes, dim]`
    texts in `dtype` ("bf16", "fp16" or "fp32" at PyTorch's default "highest" precision), in
    `bench.compile_report`'s case format."""
    t = _TRITON_TYPES[dtype]
    size = 4 if dtype == "fp32" else 2
    precision = "ieee" if dtype == "fp32" else "tf32"
    B, C, D = batch, classes, dim
    features = (2 * B * D + C * D) * size
    pointers = {"img_rp_ptr": f"*{t}", "img_zs_ptr": f"*{t}", "txt_ptr": f"*{t}"}
    cases = []
    for kernel in ("logits", "scores"):
        plan = _plan(B, C, D, size, precision, DEFAULT_SM_COUNT, kernel)
        grid, per_program = plan.pop("grid"), plan.pop("classes_per_program")
        warps, stages = plan.pop("num_warps"), plan.pop("num_stages")
        ints = {"B": B, "C": C, "D": D, "classes_per_program": per_program}
        # Innermost loop: the class sweep when the block is kept (one trip per class tile), the
        # K loop inside it when streaming.
        tiles = cdiv(per_program, plan["BLOCK_C"])
        trips = tiles if plan["NUM_K"] else tiles * cdiv(D, plan["BLOCK_K"])
        common = dict(num_warps=warps, num_stages=stages, flops=2 * B * C * D, grid=grid, outputs=B * C,
                      trips=trips, outer_trips=tiles,
                      divisible_by_16=[n for n, v in ints.items() if v % 16 == 0])
        constexprs = dict(USE_RP=True, USE_ZS=True, DOT_PRECISION=precision, **plan)
        if kernel == "logits":
            cases.append(dict(
                name="residual_logits", kernel=_residual_logits_kernel,
                signature={**pointers, "out_ptr": f"*{t}", "B": "i32", "C": "i32", "D": "i32", "alpha": "fp32",
                           "classes_per_program": "i32", **{k: "constexpr" for k in constexprs}},
                constexprs=constexprs, bytes=features + B * C * size, **common))
            continue
        final = grid[1] == 1
        constexprs = dict(constexprs, STORE_LOGITS=False, FINAL=final)
        cases.append(dict(
            name="residual_scores", kernel=_residual_scores_kernel,
            signature={**pointers, "scale_ptr": "*fp32", "prediction_ptr": "*i64", "sum_ptr": "*fp32",
                       "max_ptr": "*fp32", "mcm_ptr": "*fp32", "energy_ptr": "*fp32", "logits_ptr": f"*{t}",
                       "B": "i32", "C": "i32", "D": "i32", "alpha": "fp32", "temperature": "fp32",
                       "classes_per_program": "i32", **{k: "constexpr" for k in constexprs}},
            constexprs=constexprs, bytes=features + B * 20 + (0 if final else grid[1] * B * 16 * 2), **common))
        if not final:
            cases.append(dict(
                name="residual_scores_combine", kernel=_combine_scores_kernel,
                signature={"prediction_ptr": "*i64", "sum_ptr": "*fp32", "max_ptr": "*fp32", "mcm_ptr": "*fp32",
                           "energy_ptr": "*fp32", "B": "i32", "G": "i32", "temperature": "fp32",
                           "BLOCK": "constexpr"},
                constexprs={"BLOCK": COMBINE_BLOCK}, num_warps=4, num_stages=1, flops=0,
                bytes=grid[1] * B * 16 + B * 20, grid=(cdiv(B, COMBINE_BLOCK),), outputs=B,
                trips=grid[1] - 1, divisible_by_16=[n for n, v in (("B", B),) if v % 16 == 0]))
    return cases

