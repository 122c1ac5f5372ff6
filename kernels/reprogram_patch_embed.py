"""Padded image reprogramming fused with the ViT patch embedding (METHOD.md section 1).

    tokens[b, n, :] = W @ patch_n( normalise( clamp( pad_o( bicubic_U(x_b) ) + P, 0, 1 ) ) )

`x` is `[B, 3, h, w]` in [0, 1]; `bicubic_U` resizes it to `U x U` (skipped when h == w == U);
`pad_o` centres it on a zero `S x S` canvas at offset `o = (S - U) // 2`; `P` is the
`[3, S, S]` perturbation shared by the batch; `normalise` is `(v - mean_c) / std_c`; `W` is the
`[width, 3, p, p]` patch-embedding weight (stride `p`, no bias); patches are taken in raster
order, as open_clip's `conv1 -> flatten -> permute` gives them. An optional positional
embedding (`[(S/p)^2, width]`, the patch rows of open_clip's table) is added in the epilogue.

Only `P` receives a gradient: images are data and `W` is frozen. With `g = dL/dtokens`,

    dL/dP[c, y, x] = sum_b [0 < v_b(c, y, x) < 1] / std_c * (g[b, n(y, x)] @ W)[c, y % p, x % p]

where `v` is the unclamped canvas value. The bounds are exclusive because that is what
`torch.clamp(v, 0, 1)`'s backward does with scalar bounds: a value sitting exactly on 0 or 1
passes no gradient.

Layout of this file: the Triton kernels, their launchers, the PyTorch reference (test oracle,
CPU path and export path), then the `reprogrammer::` operators and the public entry point.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ._triton import tl, triton
from .backend import use_triton

# --------------------------------------------------------------------------------------------
# Kernels
#
# Both kernels see the canvas through the same function: for canvas pixel (c, y, x) of image b,
# the source coordinate is (y - o, x - o); outside [0, U)^2 the image contributes 0. Inside, when
# resizing, PyTorch's bicubic (align_corners=False) is reproduced step by step:
#     scale = h / U,  real = scale * (i + 0.5) - 0.5,  i0 = min(floor(real), h - 1),
#     t = clamp(real - i0, 0, 1),  taps i0-1 .. i0+2 clamped to [0, h - 1],
#     weights = Keys' cubic convolution with A = -0.75 at distances 1+t, t, 1-t, 2-t,
# first along x for each of the four rows, then along y (the order PyTorch sums in).
#
# Forward: a GEMM with M = B * (S/p)^2 patch rows, K = 3 * p * p, N = width. Row m is patch
# n = m mod (S/p)^2 of image b = m div (S/p)^2; column k is (c, ky, kx) in the weight's
# [3, p, p] order, so A[m, k] = normalise(clamp(v_b(c, top_n + ky, left_n + kx))) is computed on
# the fly per K tile and never written out. Every program owns one (M, N) output tile.
#
# Backward: patches do not overlap (stride = kernel size), so each (patch n, k) pair is exactly
# one perturbation pixel. A program owns a tile of patches x K columns, loops over its share of
# the batch, forms (g[b, tile] @ W[:, K tile]) with an inner loop over width, masks it with the
# clamp condition of image b and accumulates in fp32; the batch shares go to an fp32 partial
# buffer that is summed once.
# --------------------------------------------------------------------------------------------


@triton.jit
def _cubic_weights(t):
    """The four bicubic tap weights for fraction `t` (PyTorch's get_cubic_upsample_coefficients)."""
    far_left = t + 1.0
    near_right = 1.0 - t
    far_right = near_right + 1.0
    # |d| in [1, 2): ((A d - 5A) d + 8A) d - 4A; |d| < 1: ((A + 2) d - (A + 3)) d d + 1; A = -0.75.
    w0 = ((-0.75 * far_left + 3.75) * far_left - 6.0) * far_left + 3.0
    w1 = (1.25 * t - 2.25) * t * t + 1.0
    w2 = (1.25 * near_right - 2.25) * near_right * near_right + 1.0
    w3 = ((-0.75 * far_right + 3.75) * far_right - 6.0) * far_right + 3.0
    return w0, w1, w2, w3


@triton.jit
def _cubic_taps(dst, in_size, out_size):
    """Fraction `t` and the four border-clamped source taps of output coordinate `dst`
    (half-pixel centres, no corner alignment)."""
    # tl.cast, not .to(): an int argument equal to 1 arrives as a constexpr.
    scale = tl.math.div_rn(tl.cast(in_size, tl.float32), tl.cast(out_size, tl.float32))
    real = scale * (dst.to(tl.float32) + 0.5) - 0.5
    last = in_size - 1
    first = tl.minimum(tl.floor(real).to(tl.int32), last)
    t = tl.clamp(real - first.to(tl.float32), 0.0, 1.0)
    i0 = tl.minimum(tl.maximum(first - 1, 0), last)
    i1 = tl.minimum(tl.maximum(first, 0), last)
    i2 = tl.minimum(tl.maximum(first + 1, 0), last)
    i3 = tl.minimum(tl.maximum(first + 2, 0), last)
    return t, i0, i1, i2, i3


@triton.jit
def _cubic_row(row_ptr, x0, x1, x2, x3, wx0, wx1, wx2, wx3, mask):
    """One source row interpolated along x."""
    return (wx0 * tl.load(row_ptr + x0, mask=mask, other=0.0).to(tl.float32)
            + wx1 * tl.load(row_ptr + x1, mask=mask, other=0.0).to(tl.float32)
            + wx2 * tl.load(row_ptr + x2, mask=mask, other=0.0).to(tl.float32)
            + wx3 * tl.load(row_ptr + x3, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _canvas_values(
    images_ptr,        # [B, 3, h, w] contiguous source images
    perturbation_ptr,  # [3, S, S] contiguous perturbation P
    b,                 # image index (int64), broadcastable against y / x
    c,                 # channel index, broadcastable against y / x
    y, x,              # canvas coordinates of the tile
    valid,             # tile mask: False for rows / columns past the end of the problem
    h, w,              # source image size
    canvas,            # S
    up_res,            # U
    offset,            # o = (S - U) // 2
    RESIZE: tl.constexpr,  # whether (h, w) != (U, U), i.e. whether to sample bicubically
):
    """Unclamped canvas value v = pad_o(bicubic_U(x_b))[c, y, x] + P[c, y, x] in fp32."""
    iy = y - offset
    ix = x - offset
    inside = valid & (iy >= 0) & (iy < up_res) & (ix >= 0) & (ix < up_res)
    plane = images_ptr + (b * 3 + c) * h * w
    if RESIZE:
        ty, y0, y1, y2, y3 = _cubic_taps(iy, h, up_res)
        tx, x0, x1, x2, x3 = _cubic_taps(ix, w, up_res)
        wy0, wy1, wy2, wy3 = _cubic_weights(ty)
        wx0, wx1, wx2, wx3 = _cubic_weights(tx)
        image = (wy0 * _cubic_row(plane + y0 * w, x0, x1, x2, x3, wx0, wx1, wx2, wx3, inside)
                 + wy1 * _cubic_row(plane + y1 * w, x0, x1, x2, x3, wx0, wx1, wx2, wx3, inside)
                 + wy2 * _cubic_row(plane + y2 * w, x0, x1, x2, x3, wx0, wx1, wx2, wx3, inside)
                 + wy3 * _cubic_row(plane + y3 * w, x0, x1, x2, x3, wx0, wx1, wx2, wx3, inside))
    else:
        image = tl.load(plane + iy * w + ix, mask=inside, other=0.0).to(tl.float32)
    delta = tl.load(perturbation_ptr + (c * canvas + y) * canvas + x, mask=valid, other=0.0)
    return image + delta.to(tl.float32)


@triton.jit
def _channel_select(c, v0, v1, v2):
    """Per-channel scalar (mean or std) for a vector of channel indices."""
    return tl.where(c == 0, v0, tl.where(c == 1, v1, v2))


@triton.jit
def _mma(a, b, acc, IEEE_FP32: tl.constexpr):
    """acc + a @ b; fp32 operands use exact fp32 products when IEEE_FP32, TF32 otherwise."""
    if IEEE_FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _reprogram_patch_embed_fwd_kernel(
    images_ptr,        # [B, 3, h, w] contiguous source images
    perturbation_ptr,  # [3, S, S] contiguous perturbation
    weight_ptr,        # [width, 3 * p * p] patch weight (row-major view of [width, 3, p, p])
    pos_embed_ptr,     # [(S/p)^2, width] positional embedding; ignored unless HAS_POS
    tokens_ptr,        # [B, (S/p)^2, width] output, in the weight's dtype
    batch,             # B
    width,             # N of the GEMM
    h, w,              # source image size
    canvas,            # S
    up_res,            # U
    offset,            # o = (S - U) // 2
    mean0, mean1, mean2,  # per-channel normalisation mean
    std0, std1, std2,     # per-channel normalisation std
    PATCH: tl.constexpr,      # p
    RESIZE: tl.constexpr,     # sample bicubically ((h, w) != (U, U))
    HAS_POS: tl.constexpr,    # add pos_embed in the epilogue
    IEEE_FP32: tl.constexpr,  # exact fp32 products for fp32 operands (else TF32)
    BLOCK_M: tl.constexpr,    # patch rows per program
    BLOCK_N: tl.constexpr,    # output features per program
    BLOCK_K: tl.constexpr,    # reduction step over 3 * p * p
):
    K: tl.constexpr = 3 * PATCH * PATCH
    side = canvas // PATCH
    n_patches = side * side
    num_n = tl.cdiv(width, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < batch * n_patches
    b = (rows // n_patches).to(tl.int64)
    patch = rows % n_patches
    top = (patch // side) * PATCH
    left = (patch % side) * PATCH
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        c = ks // (PATCH * PATCH)
        ky = (ks // PATCH) % PATCH
        kx = ks % PATCH
        valid = row_ok[:, None] & k_ok[None, :]
        v = _canvas_values(images_ptr, perturbation_ptr, b[:, None], c[None, :],
                           top[:, None] + ky[None, :], left[:, None] + kx[None, :], valid,
                           h, w, canvas, up_res, offset, RESIZE)
        mean = _channel_select(c, mean0, mean1, mean2)
        std = _channel_select(c, std0, std1, std2)
        a = (tl.clamp(v, 0.0, 1.0, propagate_nan=tl.PropagateNan.ALL) - mean[None, :]) / std[None, :]
        a = tl.where(valid, a, 0.0)
        weight = tl.load(weight_ptr + cols[None, :] * K + ks[:, None],
                         mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a.to(weight.dtype), weight, acc, IEEE_FP32)

    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_POS:
        pos = tl.load(pos_embed_ptr + patch[:, None] * width + cols[None, :], mask=out_mask, other=0.0)
        acc += pos.to(tl.float32)
    out = tokens_ptr + rows[:, None].to(tl.int64) * width + cols[None, :]
    tl.store(out, acc.to(tokens_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _reprogram_patch_embed_bwd_kernel(
    grad_ptr,          # [B, (S/p)^2, width] contiguous upstream gradient dL/dtokens
    images_ptr,        # [B, 3, h, w] contiguous source images
    perturbation_ptr,  # [3, S, S] contiguous perturbation
    weight_ptr,        # [width, 3 * p * p] patch weight
    partial_ptr,       # [chunks, 3, S, S] fp32: each batch chunk's share of dL/dP
    batch,             # B
    width,             # reduction length of g @ W
    h, w,              # source image size
    canvas,            # S
    up_res,            # U
    offset,            # o = (S - U) // 2
    std0, std1, std2,  # per-channel normalisation std
    batch_per_chunk,   # images per batch chunk (program_id(1) picks the chunk)
    PATCH: tl.constexpr,      # p
    RESIZE: tl.constexpr,     # sample bicubically ((h, w) != (U, U))
    IEEE_FP32: tl.constexpr,  # exact fp32 products for fp32 operands (else TF32)
    BLOCK_P: tl.constexpr,    # patches per program
    BLOCK_K: tl.constexpr,    # (c, ky, kx) columns per program
    BLOCK_W: tl.constexpr,    # reduction step over width
):
    K: tl.constexpr = 3 * PATCH * PATCH
    side = canvas // PATCH
    n_patches = side * side
    num_k = tl.cdiv(K, BLOCK_K)
    pid = tl.program_id(0)
    pid_p = pid // num_k
    pid_k = pid % num_k
    chunk = tl.program_id(1)

    patches = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = patches < n_patches
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    c = ks // (PATCH * PATCH)
    y = (patches // side * PATCH)[:, None] + ((ks // PATCH) % PATCH)[None, :]
    x = (patches % side * PATCH)[:, None] + (ks % PATCH)[None, :]
    valid = p_ok[:, None] & k_ok[None, :]

    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    # int64 bounds give an int64 loop index: b * n_patches * width may pass 2^31.
    b_start = chunk.to(tl.int64) * batch_per_chunk
    b_end = tl.minimum(b_start + batch_per_chunk, batch)
    for b in range(b_start, b_end):
        rows = b * n_patches + patches
        grad_canvas = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, width, BLOCK_W):
            ns = n0 + tl.arange(0, BLOCK_W)
            n_ok = ns < width
            g = tl.load(grad_ptr + rows[:, None] * width + ns[None, :],
                        mask=p_ok[:, None] & n_ok[None, :], other=0.0)
            weight = tl.load(weight_ptr + ns[:, None] * K + ks[None, :],
                             mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            grad_canvas = _mma(g.to(weight.dtype), weight, grad_canvas, IEEE_FP32)
        v = _canvas_values(images_ptr, perturbation_ptr, b, c[None, :], y, x, valid,
                           h, w, canvas, up_res, offset, RESIZE)
        acc += tl.where((v > 0.0) & (v < 1.0), grad_canvas, 0.0)

    acc = acc / _channel_select(c, std0, std1, std2)[None, :]
    out = partial_ptr + chunk.to(tl.int64) * 3 * canvas * canvas + (c[None, :] * canvas + y) * canvas + x
    tl.store(out, acc, mask=valid)


# --------------------------------------------------------------------------------------------
# Launchers: shapes in, block sizes chosen from them, outputs allocated here.
# --------------------------------------------------------------------------------------------


def _pow2_between(n: int, low: int, high: int) -> int:
    """The power of two covering `n`, kept within [low, high] (tl.dot needs tiles of >= 16).
    Only comparisons touch `n`, so a symbolic batch size under torch.compile(dynamic=True) works."""
    size = low
    while size < high and size < n:
        size *= 2
    return size


# Tile sizes, from compiling both kernels for sm_90 and reading `ptxas -v`: the register file,
# not shared memory, is the limit. Bicubic sampling keeps 16 gathered taps and their indices
# live per A element, so K tiles are 16 wide when resizing (32 without); 8 warps spread the
# tile over more threads; one extra pipeline stage (2) is all the gathers leave room for
# (3 stages overflow shared memory). The backward hoists each element's taps out of its batch
# loop, hence its narrower width step. With these, bf16 compiles without register spills and
# fp32 (TF32 or IEEE) with at most a few dozen bytes.


def _forward_config(rows: int, width: int, patch: int, resize: bool) -> dict:
    block_m = _pow2_between(rows, 16, 64)
    block_n = _pow2_between(width, 16, 128)
    block_k = _pow2_between(3 * patch * patch, 16, 16 if resize else 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=8 if block_m * block_n >= 4096 else 4, num_stages=2)


def _backward_config(n_patches: int, width: int, patch: int, resize: bool) -> dict:
    block_p = _pow2_between(n_patches, 16, 64)
    block_k = _pow2_between(3 * patch * patch, 16, 16 if resize else 32)
    block_w = _pow2_between(width, 16, 32 if resize else 64)
    return dict(BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_W=block_w,
                num_warps=8 if block_p * block_k >= 1024 else 4, num_stages=2)


def _ieee_fp32(weight: torch.Tensor) -> bool:
    # Mirror the convolution this kernel replaces: TF32 for fp32 only where cuDNN would use it.
    return weight.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32


def _geometry(images, perturbation, up_resolution):
    _, _, h, w = images.shape
    return dict(h=h, w=w, canvas=perturbation.shape[-1], up_res=up_resolution,
                offset=(perturbation.shape[-1] - up_resolution) // 2)


def reprogram_patch_embed_forward(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor,
                                  pos_embed: Optional[torch.Tensor], up_resolution: int,
                                  mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Fused forward on already-checked inputs: tokens `[B, (S/p)^2, width]` in the weight's dtype."""
    batch, _, h, w = images.shape
    width, patch = weight.shape[0], weight.shape[-1]
    n_patches = (perturbation.shape[-1] // patch) ** 2
    resize = (h, w) != (up_resolution, up_resolution)
    tokens = torch.empty(batch, n_patches, width, device=images.device, dtype=weight.dtype)
    config = _forward_config(batch * n_patches, width, patch, resize)
    grid = (triton.cdiv(batch * n_patches, config["BLOCK_M"]) * triton.cdiv(width, config["BLOCK_N"]),)
    weight = weight.reshape(width, -1).contiguous()
    torch.library.wrap_triton(_reprogram_patch_embed_fwd_kernel)[grid](
        images.contiguous(), perturbation.contiguous(), weight,
        weight if pos_embed is None else pos_embed.contiguous(), tokens,
        batch, width, **_geometry(images, perturbation, up_resolution),
        mean0=mean[0], mean1=mean[1], mean2=mean[2], std0=std[0], std1=std[1], std2=std[2],
        PATCH=patch, RESIZE=resize, HAS_POS=pos_embed is not None, IEEE_FP32=_ieee_fp32(weight),
        **config,
    )
    return tokens


def _batch_chunks(batch: int, tiles: int, device: torch.device) -> int:
    """How many batch shares the backward splits into: enough programs to fill the GPU (about
    four per SM), one share on the CPU where the interpreter runs programs one after another."""
    if device.type != "cuda":
        return 1
    wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(batch, triton.cdiv(wanted, tiles)))


def reprogram_patch_embed_backward(grad_tokens: torch.Tensor, images: torch.Tensor,
                                   perturbation: torch.Tensor, weight: torch.Tensor, up_resolution: int,
                                   std: Sequence[float], *, batch_chunks: Optional[int] = None) -> torch.Tensor:
    """dL/dP `[3, S, S]` in the perturbation's dtype, reduced over the batch inside the kernel.

    `batch_chunks` splits the batch loop over that many programs per tile (fp32 partials, summed
    once); by default it is chosen from the device and the tile count.
    """
    batch, _, h, w = images.shape
    width, patch = weight.shape[0], weight.shape[-1]
    canvas = perturbation.shape[-1]
    n_patches = (canvas // patch) ** 2
    resize = (h, w) != (up_resolution, up_resolution)
    config = _backward_config(n_patches, width, patch, resize)
    tiles = triton.cdiv(n_patches, config["BLOCK_P"]) * triton.cdiv(3 * patch * patch, config["BLOCK_K"])
    chunks = batch_chunks or _batch_chunks(batch, tiles, images.device)
    per_chunk = triton.cdiv(batch, chunks)
    chunks = triton.cdiv(batch, per_chunk)
    partial = torch.empty(chunks, 3, canvas, canvas, device=images.device, dtype=torch.float32)
    torch.library.wrap_triton(_reprogram_patch_embed_bwd_kernel)[(tiles, chunks)](
        grad_tokens.contiguous(), images.contiguous(), perturbation.contiguous(),
        weight.reshape(width, -1).contiguous(), partial,
        batch, width, **_geometry(images, perturbation, up_resolution),
        std0=std[0], std1=std[1], std2=std[2], batch_per_chunk=per_chunk,
        PATCH=patch, RESIZE=resize, IEEE_FP32=_ieee_fp32(weight), **config,
    )
    grad = partial[0] if chunks == 1 else partial.sum(0)
    return grad.to(perturbation.dtype)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _check_inputs(images, perturbation, weight, up_resolution, mean, std, pos_embed):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be [B, 3, h, w] (RGB, channels first), got shape {tuple(images.shape)}; "
            "convert grey or RGBA images to RGB first"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"images must be floating point in [0, 1], got {images.dtype}; divide uint8 images by 255"
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
    """`pad_o(bicubic_U(x)) + P`, `[B, 3, S, S]` in the images' dtype."""
    canvas = perturbation.shape[-1]
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
    """The reprogrammed, normalised canvas `[B, 3, S, S]` (reference; steps 1-5 of METHOD.md 1)."""
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
# Operators `reprogrammer::reprogram_patch_embed` and its backward
#
# Inside a triton_op body the device decides: CUDA launches the kernels through wrap_triton, so
# torch.compile sees them; elsewhere the body is the reference, which inductor compiles for the
# CPU (a CPU-registered kernel would still be inlined and fail: Triton has no CPU backend).
# The interpreter (REPROGRAMMER_BACKEND=triton with TRITON_INTERPRET=1) runs on real tensors
# only, so traced calls (fake tensors) on the CPU take the reference too.
# --------------------------------------------------------------------------------------------


def _runs_triton(images: torch.Tensor, weight: torch.Tensor) -> bool:
    wanted = use_triton(images) and use_triton(weight)
    return wanted and (images.is_cuda or not is_fake(images))


@torch.library.triton_op("reprogrammer::reprogram_patch_embed", mutates_args=())
def _reprogram_patch_embed_op(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor,
                              pos_embed: Optional[torch.Tensor], up_resolution: int,
                              mean: list[float], std: list[float]) -> torch.Tensor:
    if _runs_triton(images, weight):
        return reprogram_patch_embed_forward(images, perturbation, weight, pos_embed, up_resolution, mean, std)
    tokens = reprogram_patch_embed_ref(images, perturbation, weight, up_resolution=up_resolution,
                                       mean=mean, std=std, pos_embed=pos_embed)
    return tokens.contiguous()  # the kernel's layout, so traced and eager outputs agree on strides


@torch.library.triton_op("reprogrammer::reprogram_patch_embed_backward", mutates_args=())
def _reprogram_patch_embed_backward_op(grad_tokens: torch.Tensor, images: torch.Tensor,
                                       perturbation: torch.Tensor, weight: torch.Tensor,
                                       up_resolution: int, std: list[float]) -> torch.Tensor:
    if _runs_triton(images, weight):
        return reprogram_patch_embed_backward(grad_tokens, images, perturbation, weight, up_resolution, std)
    return _perturbation_grad_ref(grad_tokens, images, perturbation, weight, up_resolution, std)


def _setup_context(ctx, inputs, output):
    images, perturbation, weight, pos_embed, up_resolution, mean, std = inputs
    constants = {"images": images, "weight": weight, "pos_embed": pos_embed}
    wrong = [name for name, t in constants.items() if t is not None and t.requires_grad]
    if wrong:
        raise RuntimeError(
            f"reprogram_patch_embed: {', '.join(wrong)} require(s) grad, but only the perturbation "
            "is differentiated. The patch weight (and positional embedding) is frozen in "
            "reprogramming and must have requires_grad=False (e.g. model.visual.requires_grad_(False)); "
            "images are data: pass images.detach()"
        )
    ctx.save_for_backward(images, perturbation, weight)
    ctx.constants = (up_resolution, std)


def _backward(ctx, grad_tokens):
    images, perturbation, weight = ctx.saved_tensors
    grad = torch.ops.reprogrammer.reprogram_patch_embed_backward(
        grad_tokens, images, perturbation, weight, *ctx.constants)
    return None, grad, None, None, None, None, None


_reprogram_patch_embed_op.register_autograd(_backward, setup_context=_setup_context)


def reprogram_patch_embed(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor, *,
                          up_resolution: int, mean: Sequence[float], std: Sequence[float],
                          pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patch tokens `[B, (S/p)^2, width]` of the reprogrammed images; see the module docstring.

    Output dtype: the autocast dtype when autocast is on for the images' device, else the
    weight's dtype (as the convolution it replaces). Differentiable w.r.t. `perturbation` only.
    """
    _check_inputs(images, perturbation, weight, up_resolution, mean, std, pos_embed)
    device_type = images.device.type
    if torch.is_autocast_enabled(device_type):
        weight = weight.to(torch.get_autocast_dtype(device_type))
    return torch.ops.reprogrammer.reprogram_patch_embed(
        images, perturbation, weight, pos_embed, up_resolution,
        [float(m) for m in mean], [float(s) for s in std])
