"""Padded image reprogramming fused with the ViT patch embedding (docs/method.md section 1).

Why fuse: the reprogrammed canvas exists only to be cut into patches and multiplied by the
frozen patch weight. Computed in PyTorch it is a chain of full-size fp32 passes over
`[B, 3, S, S]` (resize, pad, add, clamp, normalise) before the convolution, and a backward that
writes the canvas gradient and reads it back with the clamp mask. Here each canvas pixel is
computed once, straight into the GEMM's operand, and the backward reduces over the batch inside
its GEMM.

    tokens[b, n, :] = W @ patch_n( normalise( clamp( pad_o( bicubic_U(x_b) ) + P, 0, 1 ) ) )

`x` is `[B, 3, h, w]`, uint8 (scaled by 1/255, the fp32 constant `UINT8_SCALE`, in the kernel
and in the reference alike) or float in [0, 1]; `bicubic_U` resizes it to `U x U` (skipped when
h == w == U); `pad_o` centres it on a zero `S x S` canvas at offset `o = (S - U) // 2`; `P` is the
`[3, S, S]` perturbation shared by the batch; `normalise` is `(v - mean_c) / std_c`; `W` is the
`[width, 3, p, p]` patch-embedding weight (stride `p`, no bias); patches are taken in raster
order, as open_clip's `conv1 -> flatten -> permute` gives them. An optional positional
embedding (`[(S/p)^2, width]`, the patch rows of open_clip's table) is added in the epilogue.

Only `P` receives a gradient: images are data and `W` is frozen. With `g = dL/dtokens`,

    dL/dP[c, y, x] = sum_b [0 < v_b(c, y, x) < 1] / std_c * (g[b, n(y, x)] @ W)[c, y % p, x % p]

where `v` is the unclamped canvas value. The bounds are exclusive because that is what
`torch.clamp(v, 0, 1)`'s backward does with scalar bounds: a value sitting exactly on 0 or 1
passes no gradient. NaN in a float image is not checked (that needs a device sync): it reaches
the tokens of its own image (the clamp propagates NaN; the kernel's matrix resize spreads it
over the 64-row bands of its channel plane, the reference's over the 4 x 4 neighbourhood) and
passes no gradient.

Three kernels:
1. `_reprogram_canvas_kernel` writes every reprogrammed, normalised pixel once, in patch-row
   (im2col) layout `A[b (S/p)^2 + n, (c, ky, kx)]` and the GEMM operand dtype, and, when a
   gradient will be asked for, the clamp mask as bits (bit x % 32 of int32 word [b, c, y, x / 32]).
   The bicubic resize is linear and separable, `Ry @ X @ Rx^T` per image plane, run as two
   fp32-accurate tensor-core products per band of canvas rows.
2. `_patch_gemm_kernel`: tokens = A @ W^T (+ pos), a plain pipelined GEMM, programs grouped so
   that neighbouring row tiles share the weight's column tiles in L2.
3. `_patch_grad_kernel`: G = g @ W with rows in patch-major order, so that a tile holds many
   images of one patch; its epilogue applies each image's mask bit, sums the tile's images and
   scales by 1/std_c into one fp32 partial per image chunk, and the partials are summed once:
   deterministic, no atomics.

Why A is written out instead of kept on chip while the width tiles sweep past it: a 128-row
block of A is 128 x 3 p^2 x 2 bytes = 768 KB at p = 32, beyond an SM's 228 KB of shared memory.
Writing it and reading it back buys a canvas computed exactly once and a standard wgmma GEMM.
Why mask bits instead of recomputing the clamp in the backward: one bit per pixel, against the
16-tap resize per pixel again, or re-reading A, which cannot tell saturation from rounding.

Precision follows the convolution this op replaces: fp32 weights use TF32 exactly where cuDNN
would (`torch.backends.cudnn.allow_tf32`, see `launch.dot_precision`), IEEE fp32 otherwise;
16-bit weights, or autocast, give 16-bit operands with fp32 accumulation.

The registers, spills, shared memory, MMA instructions and traffic bounds of every
configuration the launchers choose are in the committed offline compile reports,
bench/results/compile-sm90a-offline-*.md (`python -m bench.compile_report patch-embed`).

Layout of this file: the PyTorch reference (test oracle, CPU path and export path), the Triton
kernels, their launch configurations and launchers (with `sm90_cases`, the same configurations
described for the compile report), the `reprogrammer::` triton_ops, then the public entry point.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ._triton import tl, triton, wrap_triton
from .backend import use_triton
from .launch import DEFAULT_SM_COUNT, as_dtype, cdiv, dot_precision, pow2_between, sm_count, triton_signature

UINT8_SCALE = 1.0 / 255.0  # uint8 pixels -> [0, 1]; the kernel and the reference both multiply by it

# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _check_inputs(images, perturbation, weight, up_resolution, mean, std, pos_embed):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be [B, 3, h, w] (RGB, channels first), got shape {tuple(images.shape)}; "
            "convert grey or RGBA images to RGB first"
        )
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise TypeError(
            f"images must be uint8 (0-255) or floating point in [0, 1], got {images.dtype}; convert "
            "other integer images to uint8, or divide them by their maximum value (255 for 8 bits)"
        )
    if perturbation.dim() != 3 or perturbation.shape[0] != 3 or perturbation.shape[1] != perturbation.shape[2]:
        raise ValueError(f"perturbation must be [3, S, S], got {tuple(perturbation.shape)}")
    canvas = perturbation.shape[-1]
    if not 1 <= up_resolution <= canvas:
        raise ValueError(
            f"up_resolution={up_resolution} must lie in [1, canvas size {canvas}]: the upsampled "
            "image is placed inside the canvas"
        )
    if weight is not None:
        if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
            raise ValueError(f"patch weight must be [width, 3, p, p], got {tuple(weight.shape)}")
        patch = weight.shape[-1]
        if canvas % patch:
            raise ValueError(f"canvas size {canvas} is not a multiple of the patch size {patch}")
        if pos_embed is not None and tuple(pos_embed.shape) != ((canvas // patch) ** 2, weight.shape[0]):
            raise ValueError(
                f"pos_embed must be [(S/p)^2, width] = [{(canvas // patch) ** 2}, {weight.shape[0]}], "
                f"got {tuple(pos_embed.shape)}"
            )
        devices = {t.device for t in (images, perturbation, weight, pos_embed) if t is not None}
        if len(devices) > 1:
            raise ValueError(
                f"images, perturbation, weight and pos_embed must be on one device, got "
                f"{sorted(str(d) for d in devices)}; move them with .to(device)"
            )
    for name, value in (("mean", mean), ("std", std)):
        if len(value) != 3:
            raise ValueError(f"{name} must have 3 entries (one per RGB channel), got {len(value)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {tuple(std)}")


def _unclamped_canvas(images: torch.Tensor, perturbation: torch.Tensor, up_resolution: int) -> torch.Tensor:
    """`pad_o(bicubic_U(x)) + P`, `[B, 3, S, S]` in the images' dtype (fp32 for uint8 images,
    scaled by the kernel's fp32 constant 1/255, so both round alike)."""
    canvas = perturbation.shape[-1]
    if images.dtype == torch.uint8:
        images = images.float() * UINT8_SCALE
    if images.shape[-2:] != (up_resolution, up_resolution):
        images = F.interpolate(images, size=(up_resolution, up_resolution), mode="bicubic",
                               align_corners=False)
    before = (canvas - up_resolution) // 2
    after = canvas - up_resolution - before
    return F.pad(images, (before, after, before, after)) + perturbation.to(images.dtype)


def _channel_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)


def reprogram_image(images: torch.Tensor, perturbation: torch.Tensor, *, up_resolution: int,
                    mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The reprogrammed, normalised canvas `[B, 3, S, S]` (reference; steps 1-5 of docs/method.md 1).
    uint8 images are scaled by 1/255 first; float images are taken as they are (NaN propagates)."""
    _check_inputs(images, perturbation, None, up_resolution, mean, std, None)
    x = _unclamped_canvas(images, perturbation, up_resolution).clamp(0, 1)
    return (x - _channel_view(mean, x)) / _channel_view(std, x)


def reprogram_patch_embed_ref(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor, *,
                              up_resolution: int, mean: Sequence[float], std: Sequence[float],
                              pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: `reprogram_image` then the stride-`p` convolution, as `[B, (S/p)^2, width]` tokens."""
    _check_inputs(images, perturbation, weight, up_resolution, mean, std, pos_embed)
    x = reprogram_image(images, perturbation, up_resolution=up_resolution, mean=mean, std=std)
    patch = weight.shape[-1]
    tokens = F.conv2d(x.to(weight.dtype), weight, stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    if pos_embed is not None:
        tokens = tokens + pos_embed.to(tokens.dtype)
    return tokens


def _perturbation_grad_ref(grad_tokens, images, perturbation, weight, up_resolution, std):
    """The module docstring's dL/dP in closed form (materialises `[B, 3, S, S]`; CPU path)."""
    batch, _, width = grad_tokens.shape
    side = perturbation.shape[-1] // weight.shape[-1]
    grad_patches = grad_tokens.transpose(1, 2).reshape(batch, width, side, side)
    grad_canvas = F.conv_transpose2d(grad_patches.to(weight.dtype), weight, stride=weight.shape[-1]).float()
    v = _unclamped_canvas(images, perturbation, up_resolution)
    grad = torch.where((v > 0) & (v < 1), grad_canvas, 0.0) / _channel_view(std, grad_canvas)
    return grad.sum(0).to(perturbation.dtype)


# --------------------------------------------------------------------------------------------
# Kernels
#
# Canvas pixel (c, y, x) of image b goes to the patch-row matrix (im2col layout) at
#     A[b * (S/p)^2 + (y / p) * (S/p) + x / p,  c * p^2 + (y % p) * p + x % p],
# the row/column order of open_clip's conv1 -> flatten -> permute and of the weight's [3, p, p].
# `p` and `S` are compile-time constants, so these divisions are multiply-shifts.
#
# Resizing is separable and linear: the bicubic resize of one image plane X [h, w], placed on
# the canvas, is  Ry @ X @ Rx^T  with Ry [S, h] and Rx [S, w] built once per call on the host
# (`_resize_matrix`): row y of Ry holds the four Keys weights (A = -0.75, half-pixel centres) at
# the border-clamped taps of canvas row y, summed where clamped taps coincide, and is all zero
# in the padding. The kernel evaluates it as two small tensor-core products per band of canvas
# rows; each source element is loaded once per band, each canvas pixel is produced once.
# --------------------------------------------------------------------------------------------


@triton.jit
def _channel_select(c, v0, v1, v2):
    """Per-channel scalar (mean or 1/std) for a channel index (scalar or vector)."""
    return tl.where(c == 0, v0, tl.where(c == 1, v1, v2))


@triton.jit
def _resized_rows(
    src,               # pointer to the image plane [h, w]
    resize_y_ptr,      # [S, h] fp32 row-resize matrix Ry
    ys, y_ok,          # canvas rows of the band and their bounds mask
    w0,                # first source column of this column block
    h, w,              # source size
    scale,             # 1/255 for uint8 images, 1 otherwise
    BLOCK_Y: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(Ry[ys, :] @ X[:, w0:w0 + BLOCK_W]) in fp32: the band's rows resized along y only."""
    ws = w0 + tl.arange(0, BLOCK_W)
    w_ok = ws < w
    rows = tl.zeros((BLOCK_Y, BLOCK_W), dtype=tl.float32)
    for h0 in range(0, h, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < h
        ry = tl.load(resize_y_ptr + ys[:, None] * h + hs[None, :], mask=y_ok[:, None] & h_ok[None, :], other=0.0)
        x = tl.load(src + hs[:, None] * w + ws[None, :], mask=h_ok[:, None] & w_ok[None, :], other=0)
        rows = tl.dot(ry, x.to(tl.float32) * scale, rows, input_precision=DOT_PRECISION)
    return rows


@triton.jit
def _reprogram_canvas_kernel(
    images_ptr,        # [B, 3, h, w] contiguous source images (uint8, or float in [0, 1])
    perturbation_ptr,  # [3, S, S] contiguous perturbation P
    resize_y_ptr,      # [S, h] fp32 Ry (zero rows in the padding); unused unless RESIZE
    resize_x_ptr,      # [S, w] fp32 Rx; unused unless RESIZE
    a_ptr,             # out [B * (S/p)^2, 3 * p * p] patch rows, in the GEMM operand dtype
    bits_ptr,          # out [B, 3, S, ceil(S/32)] int32 clamp mask, bit x%32 of word x/32 = [0 < v < 1]
    h, w,              # source image size
    up_res,            # U (no-resize path: the image covers canvas [o, o + U)^2)
    offset,            # o = (S - U) // 2
    scale,             # 1/255 for uint8 images, 1 for float images
    mean0, mean1, mean2,           # per-channel normalisation mean
    inv_std0, inv_std1, inv_std2,  # per-channel 1 / std
    CANVAS: tl.constexpr,      # S
    PATCH: tl.constexpr,       # p
    RESIZE: tl.constexpr,      # (h, w) != (U, U): resample bicubically through Ry, Rx
    ONE_W_BLOCK: tl.constexpr,  # w <= BLOCK_W: the y-resized rows are computed once per band
    STORE_BITS: tl.constexpr,  # write the clamp mask (only when a gradient will be asked for)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32x3": the resize stays fp32-accurate
    BLOCK_Y: tl.constexpr,     # canvas rows per program
    BLOCK_X: tl.constexpr,     # canvas columns per step (a multiple of 32: whole mask words)
    BLOCK_H: tl.constexpr,     # source rows per resize step
    BLOCK_W: tl.constexpr,     # source columns per resize step
):
    """One program: plane (b, c) = program_id(0), canvas rows program_id(1) * BLOCK_Y + [0, BLOCK_Y),
    all columns. Writes normalise(clamp(pad(resize(x)) + P)) into A and the clamp mask bits."""
    SIDE: tl.constexpr = CANVAS // PATCH
    K: tl.constexpr = 3 * PATCH * PATCH
    WORDS: tl.constexpr = (CANVAS + 31) // 32
    plane = tl.program_id(0)
    b = plane // 3
    c = plane % 3
    mean = _channel_select(c, mean0, mean1, mean2)
    inv_std = _channel_select(c, inv_std0, inv_std1, inv_std2)
    ys = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    y_ok = ys < CANVAS
    src = images_ptr + plane.to(tl.int64) * h * w
    # A offset = row part (image, patch row, ky, channel) + column part (patch column, kx).
    a_rows = (b.to(tl.int64) * (SIDE * SIDE) + (ys // PATCH) * SIDE) * K + c * (PATCH * PATCH) + (ys % PATCH) * PATCH
    bit_rows = (plane.to(tl.int64) * CANVAS + ys) * WORDS
    if RESIZE:
        if ONE_W_BLOCK:
            rows = _resized_rows(src, resize_y_ptr, ys, y_ok, 0, h, w, scale,
                                 BLOCK_Y, BLOCK_H, BLOCK_W, DOT_PRECISION)
    for x0 in range(0, CANVAS, BLOCK_X):
        xs = x0 + tl.arange(0, BLOCK_X)
        x_ok = xs < CANVAS
        ok = y_ok[:, None] & x_ok[None, :]
        if RESIZE:
            if ONE_W_BLOCK:
                ws = tl.arange(0, BLOCK_W)
                rx_t = tl.load(resize_x_ptr + xs[None, :] * w + ws[:, None],
                               mask=(ws < w)[:, None] & x_ok[None, :], other=0.0)
                image = tl.dot(rows, rx_t, input_precision=DOT_PRECISION)
            else:
                image = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
                for w0 in range(0, w, BLOCK_W):
                    part = _resized_rows(src, resize_y_ptr, ys, y_ok, w0, h, w, scale,
                                         BLOCK_Y, BLOCK_H, BLOCK_W, DOT_PRECISION)
                    ws = w0 + tl.arange(0, BLOCK_W)
                    rx_t = tl.load(resize_x_ptr + xs[None, :] * w + ws[:, None],
                                   mask=(ws < w)[:, None] & x_ok[None, :], other=0.0)
                    image = tl.dot(part, rx_t, image, input_precision=DOT_PRECISION)
        else:
            iy = ys - offset
            ix = xs - offset
            inside = ((iy >= 0) & (iy < up_res))[:, None] & ((ix >= 0) & (ix < up_res))[None, :]
            image = tl.load(src + iy[:, None] * w + ix[None, :], mask=inside, other=0).to(tl.float32) * scale
        delta = tl.load(perturbation_ptr + (c * CANVAS + ys[:, None]) * CANVAS + xs[None, :], mask=ok, other=0.0)
        v = image + delta.to(tl.float32)
        a = (tl.clamp(v, 0.0, 1.0, propagate_nan=tl.PropagateNan.ALL) - mean) * inv_std
        a_cols = (xs // PATCH) * K + xs % PATCH
        tl.store(a_ptr + a_rows[:, None] + a_cols[None, :], a.to(a_ptr.dtype.element_ty), mask=ok)
        if STORE_BITS:
            # Outside the canvas v is 0, so padding bits of the last word are 0.
            live = ((v > 0.0) & (v < 1.0)).to(tl.int32) << (xs % 32)[None, :]
            words = tl.sum(tl.reshape(live, (BLOCK_Y, BLOCK_X // 32, 32)), axis=2)
            word = x0 // 32 + tl.arange(0, BLOCK_X // 32)
            tl.store(bits_ptr + bit_rows[:, None] + word[None, :], words,
                     mask=y_ok[:, None] & (word < WORDS)[None, :])


@triton.jit
def _patch_gemm_kernel(
    a_ptr,        # [M, K] patch rows (M = B * (S/p)^2)
    weight_ptr,   # [N, K] patch weight (row-major view of [width, 3, p, p])
    pos_ptr,      # [(S/p)^2, N] positional embedding; unused unless HAS_POS
    out_ptr,      # out [M, N] tokens
    M,            # B * (S/p)^2
    N,            # width
    K: tl.constexpr,              # 3 * p * p
    N_PATCHES: tl.constexpr,      # (S/p)^2: token row m is patch m % N_PATCHES (a multiply-shift)
    HAS_POS: tl.constexpr,        # add pos_embed in the epilogue
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands; ignored for 16-bit ones
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,        # row tiles per L2 group (programs of a group share W column tiles)
):
    """tokens = A @ W^T (+ pos): a plain pipelined GEMM; the K loop has a compile-time trip count."""
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Past-the-end rows / columns read a valid row instead (stores are masked): unmasked loads.
    rows_in = tl.where(rows < M, rows, M - 1)
    cols_in = tl.where(cols < N, cols, N - 1)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_in.to(tl.int64)[:, None] * K + ks[None, :]
    w_ptrs = weight_ptr + cols_in[None, :] * K + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            wt = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + ks < K)[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=(k0 + ks < K)[:, None], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    ok = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_POS:
        # int32 row index: the modulo by a constant stays cheap; columns masked, not clamped (vector loads).
        pos = tl.load(pos_ptr + (rows_in % N_PATCHES)[:, None] * N + cols[None, :], mask=(cols < N)[None, :])
        acc += pos.to(tl.float32)
    tl.store(out_ptr + rows_in.to(tl.int64)[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _patch_grad_kernel(
    grad_ptr,      # [B, (S/p)^2, N] contiguous dL/dtokens
    weight_ptr,    # [N, 3 * p * p] patch weight
    bits_ptr,      # [B, 3, S, ceil(S/32)] int32 clamp mask written by the forward
    partial_ptr,   # out [chunks, 3, S, S] fp32: each image chunk's share of dL/dP
    batch,         # B
    N,             # width (the reduction of this GEMM)
    inv_std0, inv_std1, inv_std2,  # per-channel 1 / std
    CANVAS: tl.constexpr,         # S
    PATCH: tl.constexpr,          # p
    EVEN_N: tl.constexpr,         # N % BLOCK_K == 0: no width mask in the reduction loop
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 operands
    BLOCK_M: tl.constexpr,        # images per program (rows of G for one patch)
    BLOCK_N: tl.constexpr,        # (c, ky, kx) columns per program
    BLOCK_K: tl.constexpr,        # reduction step over width
):
    """G = dTokens @ W with rows in patch-major order (patch n, then image b): a program owns
    BLOCK_M images of ONE patch x BLOCK_N pixels, so its epilogue masks each image's clamp bit,
    sums the tile's images and writes one fp32 partial row of dL/dP per image chunk."""
    SIDE: tl.constexpr = CANVAS // PATCH
    N_PATCHES: tl.constexpr = SIDE * SIDE
    K: tl.constexpr = 3 * PATCH * PATCH
    WORDS: tl.constexpr = (CANVAS + 31) // 32
    NUM_N: tl.constexpr = (K + BLOCK_N - 1) // BLOCK_N
    EVEN_K: tl.constexpr = K % BLOCK_N == 0
    pid = tl.program_id(0)
    chunks = tl.cdiv(batch, BLOCK_M)
    pid_n = pid % NUM_N  # neighbouring programs share one dTokens row tile (L2 reuse)
    chunk = (pid // NUM_N) % chunks
    patch = pid // NUM_N // chunks

    images = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    image_ok = images < batch
    grad_rows = (images.to(tl.int64) * N_PATCHES + patch) * N
    ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    ns = tl.arange(0, BLOCK_K)
    g_ptrs = grad_ptr + grad_rows[:, None] + ns[None, :]
    w_ptrs = weight_ptr + ns[:, None] * K + ks[None, :]  # a masked column, not a clamped index: keeps
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the contiguity for vector copies
    for n0 in range(0, N, BLOCK_K):
        if EVEN_N:
            g = tl.load(g_ptrs, mask=image_ok[:, None], other=0.0)
            if EVEN_K:
                wt = tl.load(w_ptrs)
            else:
                wt = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            n_ok = n0 + ns < N
            g = tl.load(g_ptrs, mask=image_ok[:, None] & n_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g.to(wt.dtype), wt, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * K

    ks_in = tl.where(k_ok, ks, K - 1)
    c = ks_in // (PATCH * PATCH)
    y = (patch // SIDE) * PATCH + (ks_in // PATCH) % PATCH
    x = (patch % SIDE) * PATCH + ks_in % PATCH
    # int32 offsets inside the image chunk (one add per element); the chunk's base in int64.
    chunk_bits = bits_ptr + chunk.to(tl.int64) * (BLOCK_M * 3 * CANVAS * WORDS)
    words = tl.load(chunk_bits + (tl.arange(0, BLOCK_M) * (3 * CANVAS * WORDS))[:, None]
                    + (c * (CANVAS * WORDS) + y * WORDS + x // 32)[None, :], mask=image_ok[:, None], other=0)
    live = ((words >> (x % 32)[None, :]) & 1) != 0
    partial = tl.sum(tl.where(live, acc, 0.0), axis=0) * _channel_select(c, inv_std0, inv_std1, inv_std2)
    out = partial_ptr + chunk.to(tl.int64) * (3 * CANVAS * CANVAS) + (c * CANVAS + y) * CANVAS + x
    tl.store(out, partial, mask=k_ok)


# --------------------------------------------------------------------------------------------
# Launch configurations: one table, used by the launchers and by `sm90_cases` alike.
# --------------------------------------------------------------------------------------------

# GEMM tiles per operand kind (the autotune-free table): 16-bit operands use 128 x 128 tiles with
# a 64-wide K step and 4 stages (2 x 16 KB per stage); TF32 halves the K step (same bytes per
# stage); IEEE fp32 becomes FMA loops, where a 64-row tile keeps the accumulator in registers.
_GEMM_TABLE = {
    "16bit": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    "tf32": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    "ieee": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
}


def _operand_kind(dtype: torch.dtype, ieee_fp32: bool) -> str:
    if dtype != torch.float32:
        return "16bit"
    return "ieee" if ieee_fp32 else "tf32"


def _gemm_precision(kind: str) -> str:
    """The GEMMs' `tl.dot` input precision (16-bit operands ignore it)."""
    return "ieee" if kind == "ieee" else "tf32"


def _resize_precision(kind: str) -> str:
    """The resize's: its operands are fp32 whatever the GEMM's, and TF32x3 keeps it fp32-accurate."""
    return "ieee" if kind == "ieee" else "tf32x3"


def _gemm_tiles(rows: int, cols: int, red: int, kind: str, sms: int, repeats: int = 1) -> dict:
    """Tiles for `repeats` independent [rows x red] @ [red x cols] products, shrunk to the problem
    (interpreter-sized tests) and to 64 rows when 128-row tiles would fill fewer than two waves
    of the `sms` streaming multiprocessors."""
    top = _GEMM_TABLE[kind]
    block_m = pow2_between(rows, 16, top["BLOCK_M"])
    block_n = pow2_between(cols, 16, top["BLOCK_N"])
    if block_m == 128 and repeats * cdiv(rows, 128) * cdiv(cols, block_n) < 2 * sms:
        block_m = 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=pow2_between(red, 16, top["BLOCK_K"]),
                num_warps=top["num_warps"] if block_m * block_n >= 8192 else 4, num_stages=top["num_stages"])


def _forward_gemm_config(rows: int, width: int, patch: int, kind: str, sms: int) -> dict:
    return dict(_gemm_tiles(rows, width, 3 * patch * patch, kind, sms), GROUP_M=8)


def _backward_gemm_config(batch: int, n_patches: int, width: int, patch: int, kind: str, sms: int) -> dict:
    """Rows of G are (patch, image) pairs, but a tile never spans two patches: one product of
    [B x width] @ [width x 3 p^2] per patch."""
    return _gemm_tiles(batch, 3 * patch * patch, width, kind, sms, repeats=n_patches)


def _canvas_config(h: int, w: int, canvas: int, resize: bool) -> dict:
    """A band of canvas rows per program, 32 columns per step (one mask word per row). Resizing
    runs two tensor-core products per step on 64-row bands, the source in steps of 32 rows and
    up to 128 columns; sources wider than 128 go in 16 x 64 blocks, recomputed per step. From
    `ptxas -v` for sm_90a (bf16, sources 13, 32, 64, 128, 200, 256, 300): no spills with these;
    a 128-column block for a 256-wide source, or 32-row bands with 128 columns, spill."""
    if not resize:
        return dict(BLOCK_Y=pow2_between(canvas, 16, 32), BLOCK_X=32, BLOCK_H=16, BLOCK_W=16, ONE_W_BLOCK=True,
                    num_warps=4, num_stages=2)
    block_w = pow2_between(w, 16, 128) if w <= 128 else 64
    block_h = pow2_between(h, 16, 32) if w <= 128 else 16
    return dict(BLOCK_Y=pow2_between(canvas, 16, 64), BLOCK_X=32, BLOCK_H=block_h,
                BLOCK_W=block_w, ONE_W_BLOCK=w <= block_w, num_warps=4 if block_w <= 32 else 8, num_stages=2)


def _ieee_fp32(weight: torch.Tensor) -> bool:
    return dot_precision(weight.dtype, replaces="conv") == "ieee"


def _resize_matrix(size_in: int, size_out: int, canvas: int, offset: int, device) -> torch.Tensor:
    """`[S, size_in]` fp32: rows `offset .. offset + size_out` resample bicubically (PyTorch's
    `upsample_bicubic2d`, align_corners=False: half-pixel centres, A = -0.75, source index
    `min(floor(real), in - 1)`, fraction clamped to [0, 1], taps clamped to the border), the
    padding rows are zero. Weights are evaluated in fp64, then rounded once."""
    dst = torch.arange(size_out, device=device, dtype=torch.float64)
    real = (dst + 0.5) * (size_in / size_out) - 0.5
    first = torch.floor(real).clamp(max=size_in - 1)
    t = (real - first).clamp(0, 1)
    a = -0.75

    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = torch.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], dim=1)
    taps = (first.long()[:, None] + torch.arange(-1, 3, device=device)).clamp(0, size_in - 1)
    matrix = torch.zeros(canvas, size_in, device=device, dtype=torch.float64)
    matrix[offset:offset + size_out].scatter_add_(1, taps, weights)
    return matrix.float()


_RESIZE_CACHE: dict = {}  # (h, w, U, S, device) -> (Ry, Rx); eager calls only, a few entries


def _resize_matrices(images, h, w, up_resolution, canvas, offset):
    """Ry and Rx, cached for eager calls (building them is a dozen tiny launches); traced calls
    build them in the graph, where the compiler fuses the construction."""
    if torch.compiler.is_compiling() or is_fake(images):
        return (_resize_matrix(h, up_resolution, canvas, offset, images.device),
                _resize_matrix(w, up_resolution, canvas, offset, images.device))
    key = (h, w, up_resolution, canvas, images.device)
    if key not in _RESIZE_CACHE:
        if len(_RESIZE_CACHE) >= 8:
            _RESIZE_CACHE.pop(next(iter(_RESIZE_CACHE)))
        _RESIZE_CACHE[key] = (_resize_matrix(h, up_resolution, canvas, offset, images.device),
                              _resize_matrix(w, up_resolution, canvas, offset, images.device))
    return _RESIZE_CACHE[key]


def _canvas_launch(images, perturbation, up_resolution, patch, dtype, mean, std, store_bits, kind):
    """Arguments (name -> value, kernel order), grid and meta-parameters of the canvas kernel."""
    batch, _, h, w = images.shape
    canvas = perturbation.shape[-1]
    resize = (h, w) != (up_resolution, up_resolution)
    config = _canvas_config(h, w, canvas, resize)
    return config, resize, (batch * 3, cdiv(canvas, config["BLOCK_Y"])), dict(
        h=h, w=w, up_res=up_resolution, offset=(canvas - up_resolution) // 2,
        scale=UINT8_SCALE if images.dtype == torch.uint8 else 1.0,
        mean0=mean[0], mean1=mean[1], mean2=mean[2],
        inv_std0=1.0 / std[0], inv_std1=1.0 / std[1], inv_std2=1.0 / std[2],
        CANVAS=canvas, PATCH=patch, RESIZE=resize, STORE_BITS=store_bits,
        DOT_PRECISION=_resize_precision(kind))


def _mask_words(canvas: int) -> int:
    return cdiv(canvas, 32)


def reprogram_patch_rows(images: torch.Tensor, perturbation: torch.Tensor, up_resolution: int, patch: int,
                         dtype: torch.dtype, mean: Sequence[float], std: Sequence[float], *,
                         store_bits: bool = True, ieee_fp32: bool = True):
    """Kernel 1 alone: `(A [B * (S/p)^2, 3 p^2] in `dtype`, clamp-mask words [B, 3, S, S/32] int32)`."""
    batch, _, h, w = images.shape
    canvas = perturbation.shape[-1]
    kind = _operand_kind(dtype, ieee_fp32)
    config, resize, grid, args = _canvas_launch(images, perturbation, up_resolution, patch, dtype, mean, std,
                                                store_bits, kind)
    rows = torch.empty(batch * (canvas // patch) ** 2, 3 * patch * patch, device=images.device, dtype=dtype)
    bits = torch.empty((batch, 3, canvas, _mask_words(canvas)) if store_bits else (0,), device=images.device,
                       dtype=torch.int32)
    if resize:
        resize_y, resize_x = _resize_matrices(images, h, w, up_resolution, canvas, args["offset"])
    else:
        resize_y = resize_x = perturbation  # never read
    wrap_triton(_reprogram_canvas_kernel)[grid](
        images.contiguous(), perturbation.contiguous(), resize_y, resize_x, rows, bits, **args, **config)
    return rows, bits


def reprogram_patch_embed_forward(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor,
                                  pos_embed: Optional[torch.Tensor], up_resolution: int,
                                  mean: Sequence[float], std: Sequence[float], store_bits: bool = True):
    """Fused forward on already-checked inputs: `(tokens [B, (S/p)^2, width] in the weight's dtype,
    clamp-mask words for the backward, empty unless store_bits)`."""
    batch = images.shape[0]
    width, patch = weight.shape[0], weight.shape[-1]
    n_patches = (perturbation.shape[-1] // patch) ** 2
    kind = _operand_kind(weight.dtype, _ieee_fp32(weight))
    rows, bits = reprogram_patch_rows(images, perturbation, up_resolution, patch, weight.dtype, mean, std,
                                      store_bits=store_bits, ieee_fp32=kind == "ieee")
    tokens = torch.empty(batch, n_patches, width, device=images.device, dtype=weight.dtype)
    config = _forward_gemm_config(batch * n_patches, width, patch, kind, sm_count(images.device))
    grid = (cdiv(batch * n_patches, config["BLOCK_M"]) * cdiv(width, config["BLOCK_N"]),)
    wrap_triton(_patch_gemm_kernel)[grid](
        rows, weight.reshape(width, -1).contiguous(), weight if pos_embed is None else pos_embed.contiguous(),
        tokens, batch * n_patches, width, K=3 * patch * patch, N_PATCHES=n_patches, HAS_POS=pos_embed is not None,
        DOT_PRECISION=_gemm_precision(kind), **config)
    return tokens, bits


def reprogram_patch_embed_backward(grad_tokens: torch.Tensor, bits: torch.Tensor, perturbation: torch.Tensor,
                                   weight: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """dL/dP `[3, S, S]` in the perturbation's dtype from the forward's clamp-mask words: one GEMM
    with the batch reduction in its epilogue, fp32 partials per image chunk, summed once."""
    batch, n_patches, width = grad_tokens.shape
    patch = weight.shape[-1]
    canvas = perturbation.shape[-1]
    kind = _operand_kind(weight.dtype, _ieee_fp32(weight))
    config = _backward_gemm_config(batch, n_patches, width, patch, kind, sm_count(grad_tokens.device))
    chunks = cdiv(batch, config["BLOCK_M"])
    partial = torch.empty(chunks, 3, canvas, canvas, device=grad_tokens.device, dtype=torch.float32)
    grid = (n_patches * chunks * cdiv(3 * patch * patch, config["BLOCK_N"]),)
    wrap_triton(_patch_grad_kernel)[grid](
        grad_tokens.to(weight.dtype).contiguous(), weight.reshape(width, -1).contiguous(), bits, partial,
        batch, width, inv_std0=1.0 / std[0], inv_std1=1.0 / std[1], inv_std2=1.0 / std[2],
        CANVAS=canvas, PATCH=patch, EVEN_N=width % config["BLOCK_K"] == 0,
        DOT_PRECISION=_gemm_precision(kind), **config)
    grad = partial[0] if chunks == 1 else partial.sum(0)
    return grad.to(perturbation.dtype)


# --------------------------------------------------------------------------------------------
# What the launchers run at a shape, for the offline sm_90a compile report
# --------------------------------------------------------------------------------------------

def sm90_cases(batch: int, h: int, w: int, up_resolution: int, canvas: int, patch: int, width: int, dtype,
               *, images_dtype="fp32", ieee_fp32: bool = False, backward: bool = True) -> list[dict]:
    """Every Triton kernel the launchers run for one forward (+ backward) at this shape, with the
    meta-parameters from the same config functions: name, kernel, signature, constexprs,
    runtime int/float values ("values"), num_warps, num_stages, grid, output elements and trips of
    the hot loop per program (for per-output instruction counts), flops and compulsory bytes.

    `dtype` is the GEMM operand dtype (the weight's, or autocast's); `ieee_fp32` mirrors
    `torch.backends.cudnn.allow_tf32 = False` for fp32. Tiles are sized for `DEFAULT_SM_COUNT`
    SMs, the H100's and H200's, which the sm_90a report is for."""
    dtype, images_dtype = as_dtype(dtype), as_dtype(images_dtype)
    size, src_size = torch.finfo(dtype).bits // 8, (1 if images_dtype == torch.uint8 else 4)
    kind = _operand_kind(dtype, ieee_fp32)
    n_patches = (canvas // patch) ** 2
    rows, k = batch * n_patches, 3 * patch * patch
    resize = (h, w) != (up_resolution, up_resolution)
    words = _mask_words(canvas)
    cases = []

    config = _canvas_config(h, w, canvas, resize)
    constexprs = dict(CANVAS=canvas, PATCH=patch, RESIZE=resize, STORE_BITS=backward,
                      DOT_PRECISION=_resize_precision(kind),
                      **{key: value for key, value in config.items() if key.isupper()})
    args = [("images_ptr", ("ptr", images_dtype)), ("perturbation_ptr", ("ptr", torch.float32)),
            ("resize_y_ptr", ("ptr", torch.float32)), ("resize_x_ptr", ("ptr", torch.float32)),
            ("a_ptr", ("ptr", dtype)), ("bits_ptr", ("ptr", torch.int32)), ("h", h), ("w", w),
            ("up_res", up_resolution), ("offset", (canvas - up_resolution) // 2), ("scale", 1.0),
            ("mean0", 0.48), ("mean1", 0.46), ("mean2", 0.41), ("inv_std0", 3.7), ("inv_std1", 3.8),
            ("inv_std2", 3.6)]
    signature, values = triton_signature(_reprogram_canvas_kernel, args, constexprs)
    resize_flops = 2 * batch * 3 * canvas * (h * w + canvas * w) if resize else 0
    cases.append(dict(
        name="canvas", kernel=_reprogram_canvas_kernel, signature=signature, constexprs=constexprs, values=values,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        grid=(batch * 3, cdiv(canvas, config["BLOCK_Y"])), flops=resize_flops, outputs=rows * k,
        # The hot loop steps over the canvas columns, except when a wide source adds inner loops.
        trips=cdiv(canvas, config["BLOCK_X"]) if not resize or config["ONE_W_BLOCK"] else None,
        bytes=batch * 3 * h * w * src_size + 3 * canvas * canvas * 4 + rows * k * size
        + (batch * 3 * canvas * words * 4 if backward else 0) + (2 * canvas * (h + w) * 4 if resize else 0)))

    config = _forward_gemm_config(rows, width, patch, kind, DEFAULT_SM_COUNT)
    constexprs = dict(K=k, N_PATCHES=n_patches, HAS_POS=True, DOT_PRECISION=_gemm_precision(kind),
                      **{key: value for key, value in config.items() if key.isupper()})
    args = [("a_ptr", ("ptr", dtype)), ("weight_ptr", ("ptr", dtype)), ("pos_ptr", ("ptr", torch.float32)),
            ("out_ptr", ("ptr", dtype)), ("M", rows), ("N", width)]
    signature, values = triton_signature(_patch_gemm_kernel, args, constexprs)
    cases.append(dict(
        name="gemm", kernel=_patch_gemm_kernel, signature=signature, constexprs=constexprs, values=values,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        grid=(cdiv(rows, config["BLOCK_M"]) * cdiv(width, config["BLOCK_N"]),),
        outputs=rows * width, trips=cdiv(k, config["BLOCK_K"]), flops=2 * rows * width * k, bytes=rows * k * size + width * k * size + n_patches * width * 4
        + rows * width * size))

    if backward:
        config = _backward_gemm_config(batch, n_patches, width, patch, kind, DEFAULT_SM_COUNT)
        chunks = cdiv(batch, config["BLOCK_M"])
        constexprs = dict(CANVAS=canvas, PATCH=patch, EVEN_N=width % config["BLOCK_K"] == 0,
                          DOT_PRECISION=_gemm_precision(kind),
                          **{key: value for key, value in config.items() if key.isupper()})
        args = [("grad_ptr", ("ptr", dtype)), ("weight_ptr", ("ptr", dtype)), ("bits_ptr", ("ptr", torch.int32)),
                ("partial_ptr", ("ptr", torch.float32)), ("batch", batch), ("N", width),
                ("inv_std0", 3.7), ("inv_std1", 3.8), ("inv_std2", 3.6)]
        signature, values = triton_signature(_patch_grad_kernel, args, constexprs)
        cases.append(dict(
            name="grad", kernel=_patch_grad_kernel, signature=signature, constexprs=constexprs, values=values,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
            grid=(n_patches * chunks * cdiv(k, config["BLOCK_N"]),),
            outputs=rows * k, trips=cdiv(width, config["BLOCK_K"]), flops=2 * rows * width * k, bytes=rows * width * size + width * k * size
            + batch * 3 * canvas * words * 4 + (chunks + 1) * 3 * canvas * canvas * 4))
    return cases


# --------------------------------------------------------------------------------------------
# Operators `reprogrammer::reprogram_patch_embed` and its backward
#
# Inside a triton_op body the device decides: CUDA launches the kernels through wrap_triton, so
# torch.compile sees them; elsewhere the body is the reference, which inductor compiles for the
# CPU (a CPU-registered kernel would still be inlined and fail: Triton has no CPU backend).
# The interpreter (REPROGRAMMER_BACKEND=triton with TRITON_INTERPRET=1) runs on real tensors
# only, so traced calls (fake tensors) on the CPU take the reference too.
# --------------------------------------------------------------------------------------------


def _runs_triton(images: torch.Tensor, weight: torch.Tensor) -> bool:
    # uint8 images are fine in the interpreter (the kernel converts them); float ones must be fp32.
    wanted = use_triton(weight) and use_triton(images if images.is_floating_point() else weight)
    return wanted and (images.is_cuda or not is_fake(images))


@torch.library.triton_op("reprogrammer::reprogram_patch_embed", mutates_args=())
def _reprogram_patch_embed_op(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor,
                              pos_embed: Optional[torch.Tensor], up_resolution: int,
                              mean: list[float], std: list[float], need_grad: bool
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and, when `need_grad`, the clamp-mask words the Triton backward reads (the
    reference path returns an unwritten buffer of the same shape, so traced and eager agree)."""
    if _runs_triton(images, weight):
        return reprogram_patch_embed_forward(images, perturbation, weight, pos_embed, up_resolution, mean, std,
                                             store_bits=need_grad)
    tokens = reprogram_patch_embed_ref(images, perturbation, weight, up_resolution=up_resolution,
                                       mean=mean, std=std, pos_embed=pos_embed)
    canvas = perturbation.shape[-1]
    bits = torch.empty((images.shape[0], 3, canvas, _mask_words(canvas)) if need_grad else (0,),
                       device=images.device, dtype=torch.int32)
    return tokens.contiguous(), bits  # the kernel's layout, so traced and eager outputs agree on strides


@torch.library.triton_op("reprogrammer::reprogram_patch_embed_backward", mutates_args=())
def _reprogram_patch_embed_backward_op(grad_tokens: torch.Tensor, bits: torch.Tensor, images: torch.Tensor,
                                       perturbation: torch.Tensor, weight: torch.Tensor,
                                       up_resolution: int, std: list[float]) -> torch.Tensor:
    if _runs_triton(images, weight):
        return reprogram_patch_embed_backward(grad_tokens, bits, perturbation, weight, std)
    return _perturbation_grad_ref(grad_tokens, images, perturbation, weight, up_resolution, std)


def _setup_context(ctx, inputs, output):
    images, perturbation, weight, pos_embed, up_resolution, mean, std, need_grad = inputs
    constants = {"images": images, "weight": weight, "pos_embed": pos_embed}
    wrong = [name for name, t in constants.items() if t is not None and t.requires_grad]
    if wrong:
        raise RuntimeError(
            f"reprogram_patch_embed: {', '.join(wrong)} require(s) grad, but only the perturbation "
            "is differentiated. The patch weight (and positional embedding) is frozen in "
            "reprogramming and must have requires_grad=False (e.g. model.visual.requires_grad_(False)); "
            "images are data: pass images.detach()"
        )
    ctx.save_for_backward(output[1], images, perturbation, weight)
    ctx.constants = (up_resolution, std)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_tokens, grad_bits):
    bits, images, perturbation, weight = ctx.saved_tensors
    if bits.numel() == 0:
        raise RuntimeError(
            "reprogram_patch_embed: the forward ran without gradient recording (no clamp mask was "
            "saved); call it with torch.enable_grad() and a perturbation that requires grad")
    grad = torch.ops.reprogrammer.reprogram_patch_embed_backward(
        grad_tokens, bits, images, perturbation, weight, *ctx.constants)
    return None, grad, None, None, None, None, None, None


_reprogram_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def reprogram_patch_embed(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor, *,
                          up_resolution: int, mean: Sequence[float], std: Sequence[float],
                          pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patch tokens `[B, (S/p)^2, width]` of the reprogrammed images; see the module docstring.

    Images: uint8 (scaled by 1/255 inside the kernel) or float in [0, 1]. Output dtype: the
    autocast dtype when autocast is on for the images' device, else the weight's dtype (as the
    convolution it replaces). Differentiable w.r.t. `perturbation` only. NaN in float images is
    not checked here (that would need a device sync): it propagates into the tokens of its image.
    """
    _check_inputs(images, perturbation, weight, up_resolution, mean, std, pos_embed)
    device_type = images.device.type
    if torch.is_autocast_enabled(device_type):
        weight = weight.to(torch.get_autocast_dtype(device_type))
    need_grad = torch.is_grad_enabled() and perturbation.requires_grad
    tokens, _ = torch.ops.reprogrammer.reprogram_patch_embed(
        images, perturbation, weight, pos_embed, up_resolution,
        [float(m) for m in mean], [float(s) for s in std], need_grad)
    return tokens
