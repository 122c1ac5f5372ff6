"""The fused reprogramming + patch-embedding op against an independent float64 numpy oracle.

The oracle below is written from docs/method.md section 1 and PyTorch's documented bicubic semantics
(half-pixel centres, Keys' kernel with A = -0.75, source index min(floor(real), in - 1),
fraction clamped to [0, 1], taps clamped to the border; no antialiasing when downsampling), as a
direct 16-tap sum per output pixel, then pad, perturb, clamp, normalise and the patch GEMM; the
perturbation gradient is its closed form. Both backends are checked against it: `triton` (the
kernels; on the CPU in Triton's interpreter, fp32, since conftest.py sets TRITON_INTERPRET=1)
and `torch` (the PyTorch reference inside the op). The section at the end compares the compiled
kernels in fp32 and bf16 at ViT-B/32 shapes and needs a GPU.
"""
import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import triton
from open_clip.constants import OPENAI_DATASET_MEAN as MEAN
from open_clip.constants import OPENAI_DATASET_STD as STD

from reprogrammer import kernels
from reprogrammer.kernels.backend import triton_interpreting
from reprogrammer.kernels.launch import sm_count
from reprogrammer.kernels.reprogram_patch_embed import (UINT8_SCALE, _backward_gemm_config, reprogram_patch_rows,
                                                        sm90_cases)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp32 kernel vs float64 oracle: the kernel rounds each product and partial sum to fp32; over
# K = 3 p^2 (<= 192 here) products per token and `width` products per gradient pixel the worst
# case is ~K * 6e-8 ~ 1e-5 of the summed magnitudes (measured: below ~1e-6 of the largest
# element). A wrong tap, weight, mask bit or offset moves elements by O(1) of that scale.
RTOL = 1e-5
ATOL_OF_MAX = 1e-5
# A canvas value within this distance of a clamp bound (but not on it) may land on either side
# in fp32: the oracle does not judge the gradient of such pixels. Values exactly on a bound are
# judged (see test_values_exactly_on_the_clamp_bounds).
AMBIGUOUS = 1e-6


# --------------------------------------------------------------------------------------------
# float64 oracle
# --------------------------------------------------------------------------------------------


def _keys(d, a=-0.75):
    """Keys' cubic convolution kernel W(d)."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _taps(n_in, n_out):
    """Source indices `[n_out, 4]` (border-clamped) and their weights, PyTorch's align_corners=False."""
    real = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    first = np.minimum(np.floor(real), n_in - 1)
    t = np.clip(real - first, 0.0, 1.0)
    offsets = np.arange(-1, 3)
    return np.clip(first[:, None].astype(np.int64) + offsets, 0, n_in - 1), _keys(t[:, None] - offsets)


def oracle_pixels(images):
    """float64 pixels in [0, 1]; uint8 is scaled by the fp32 constant 1/255 in fp32, as specified."""
    images = images.detach().cpu().numpy()
    if images.dtype == np.uint8:
        return (images.astype(np.float32) * np.float32(UINT8_SCALE)).astype(np.float64)
    return images.astype(np.float64)


def oracle_canvas(images, perturbation, up):
    """Unclamped canvas v = pad(bicubic_up(x)) + P, `[B, 3, S, S]` float64."""
    x = oracle_pixels(images)
    b, _, h, w = x.shape
    if (h, w) != (up, up):
        rows, wy = _taps(h, up)
        cols, wx = _taps(w, up)
        gathered = x[:, :, rows[:, :, None, None], cols[None, None, :, :]]  # [B, 3, up, 4, up, 4]
        x = np.einsum("bcyixj,yi,xj->bcyx", gathered, wy, wx)
    pert = perturbation.detach().cpu().double().numpy()
    s = pert.shape[-1]
    o = (s - up) // 2
    canvas = np.zeros((b, 3, s, s))
    canvas[:, :, o:o + up, o:o + up] = x
    return canvas + pert


def oracle(inputs, up):
    """(tokens, dL/dP, pixels whose gradient is judged) in float64 for the case's upstream gradient."""
    v = oracle_canvas(inputs["images"], inputs["perturbation"], up)
    weight = inputs["weight"].detach().cpu().double().numpy()
    width, _, p, _ = weight.shape
    b, _, s, _ = v.shape
    g = s // p
    mean, std = np.array(MEAN)[:, None, None], np.array(STD)[:, None, None]
    a = (np.clip(v, 0, 1) - mean) / std
    patches = a.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
    w2 = weight.reshape(width, -1)
    tokens = patches @ w2.T
    if inputs["pos_embed"] is not None:
        tokens = tokens + inputs["pos_embed"].detach().cpu().double().numpy()
    upstream = inputs["upstream"].cpu().double().numpy()
    grad_canvas = (upstream @ w2).reshape(b, g, g, 3, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(b, 3, s, s)
    grad = (np.where((v > 0) & (v < 1), grad_canvas, 0.0) / std).sum(0)
    gap = np.minimum(np.abs(v), np.abs(v - 1))
    judged = ~((gap > 0) & (gap < AMBIGUOUS)).any(0)
    return tokens, grad, judged


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
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
    def n_patches(self) -> int:
        return (self.canvas // self.patch) ** 2


CASES = {
    "upsample_13x11_to_20_on_24": Case(3, 13, 11, 20, 24, 8, 40, pos=True),
    "upsample_uint8_p4_width_31": Case(2, 5, 7, 12, 16, 4, 31, pos=False, uint8=True),
    "no_resize_no_padding": Case(2, 24, 24, 24, 24, 8, 24, pos=False),
    "no_resize_padded_uint8": Case(3, 18, 18, 18, 24, 6, 20, pos=True, uint8=True),
    "downsample_uneven_padding_p5_width_17": Case(2, 29, 31, 15, 20, 5, 17, pos=True),
    "resize_width_only": Case(2, 12, 9, 12, 16, 4, 16, pos=False),
    "wide_source_two_column_blocks": Case(1, 37, 140, 24, 32, 8, 16, pos=True, uint8=True),
    "batch_67_two_image_chunks": Case(67, 5, 5, 6, 8, 4, 19, pos=True),
}


def make_inputs(case: Case, seed: int, device=DEVICE):
    """Images in [0, 1] (or uint8); a raw N(0, 2^2) perturbation so the clamp saturates both ways."""
    g = torch.Generator().manual_seed(seed)
    k = 3 * case.patch ** 2
    if case.uint8:
        images = torch.randint(0, 256, (case.batch, 3, case.h, case.w), generator=g, dtype=torch.uint8)
    else:
        images = torch.rand(case.batch, 3, case.h, case.w, generator=g)
    inputs = dict(
        images=images,
        perturbation=torch.randn(3, case.canvas, case.canvas, generator=g) * 2,
        weight=torch.randn(case.width, 3, case.patch, case.patch, generator=g) / k ** 0.5,
        pos_embed=torch.randn(case.n_patches, case.width, generator=g) if case.pos else None,
        upstream=torch.randn(case.batch, case.n_patches, case.width, generator=g),
    )
    return {name: None if t is None else t.to(device) for name, t in inputs.items()}


def assert_close(actual, expected, what, *, rtol=RTOL, atol_of_max=ATOL_OF_MAX, where=None):
    """Elementwise |actual - expected| <= atol + rtol |expected| (NaN fails), listing offenders."""
    actual = actual.detach().cpu().double().numpy() if isinstance(actual, torch.Tensor) else actual
    expected = expected.detach().cpu().double().numpy() if isinstance(expected, torch.Tensor) else expected
    assert actual.shape == expected.shape, f"{what}: got shape {actual.shape}, expected {expected.shape}"
    atol = atol_of_max * np.abs(expected).max()
    ok = np.abs(actual - expected) <= atol + rtol * np.abs(expected)
    if where is not None:
        ok |= ~np.broadcast_to(where, ok.shape)
    if not ok.all():
        bad = np.argwhere(~ok).tolist()
        listing = "\n".join(f"  {tuple(i)}: got {actual[tuple(i)]:.8g}, expected {expected[tuple(i)]:.8g}"
                            for i in bad[:12])
        pytest.fail(f"{what}: {len(bad)} of {ok.size} elements differ (atol {atol:.3g}, rtol {rtol:g}):\n{listing}")


def run_op(inputs, up, fn=None):
    """Tokens and dL/dP of `fn` (default: the public op) for the case's upstream gradient."""
    fn = fn or kernels.reprogram_patch_embed
    perturbation = inputs["perturbation"].clone().requires_grad_()
    tokens = fn(inputs["images"], perturbation, inputs["weight"], up_resolution=up,
                mean=MEAN, std=STD, pos_embed=inputs["pos_embed"])
    (grad,) = torch.autograd.grad(tokens, perturbation, inputs["upstream"].to(tokens.dtype))
    return tokens.detach(), grad


@pytest.fixture
def exact_fp32(monkeypatch):
    """On CUDA, keep both the kernel and cuDNN's reference convolution off TF32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# --------------------------------------------------------------------------------------------
# Both backends against the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_perturbation_grad_match_float64_oracle(case, backend, monkeypatch, exact_fp32):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    inputs = make_inputs(case, seed=case.h * 31 + case.up + case.batch)
    tokens, grad = run_op(inputs, case.up)
    ref_tokens, ref_grad, judged = oracle(inputs, case.up)
    v = oracle_canvas(inputs["images"], inputs["perturbation"], case.up)
    assert (v < 0).mean() > 0.1 and (v > 1).mean() > 0.1, "clamp must saturate both ways"
    assert judged.mean() > 0.99
    assert tokens.shape == (case.batch, case.n_patches, case.width) and tokens.dtype == torch.float32
    if case.batch > 64:  # the case exists to split the batch into several fp32 partials
        block = _backward_gemm_config(case.batch, case.n_patches, case.width, case.patch, "ieee",
                                      sm_count(torch.device(DEVICE)))["BLOCK_M"]
        assert case.batch > block
    assert_close(tokens, ref_tokens, f"{backend} tokens")
    assert_close(grad, ref_grad, f"{backend} dL/dperturbation", where=judged)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
def test_values_exactly_on_the_clamp_bounds(backend, uint8, monkeypatch, exact_fp32):
    """v exactly 0 or 1 passes no gradient (torch.clamp's backward with scalar bounds): in the
    padding (v = P) for every image, and inside the image for image 0."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    case = Case(2, 12, 12, 12, 16, 4, 16, pos=False, uint8=uint8)
    inputs = make_inputs(case, seed=5, device="cpu")
    x = torch.from_numpy(oracle_pixels(inputs["images"])[0]).float()  # image 0 as the kernel sees it
    if not uint8:
        g = torch.Generator().manual_seed(6)
        inputs["images"] = torch.randint(1, 256, (2, 3, 12, 12), generator=g) / 256  # exact in fp32
        x = inputs["images"][0]
    pert = inputs["perturbation"]
    pert[:, 0, :] = 0.0  # padding rows: v = P, exactly 0 or 1 for every image
    pert[:, 1, :] = 1.0
    inner = pert[:, 2:14, 2:14]
    pick = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    one_minus = 1 - x
    exact = one_minus.double() == 1 - x.double()  # 1 - x without rounding: then x + P == 1 exactly
    inner[(pick[0] < 0.3) & exact] = one_minus[(pick[0] < 0.3) & exact]
    inner[pick[1] < 0.3] = -x[pick[1] < 0.3]
    inputs = {k: None if t is None else t.to(DEVICE) for k, t in inputs.items()}
    v = oracle_canvas(inputs["images"], inputs["perturbation"], case.up)
    assert (v == 0).sum() > 100 and (v == 1).sum() > 100

    tokens, grad = run_op(inputs, case.up)
    ref_tokens, ref_grad, judged = oracle(inputs, case.up)
    assert judged.all()
    assert_close(tokens, ref_tokens, "tokens")
    assert_close(grad, ref_grad, "dL/dperturbation with values on the bounds")


def test_canvas_kernel_writes_patch_rows_and_mask_bits(exact_fp32):
    """Kernel 1 alone: the normalised canvas in patch-row layout and one bit per canvas pixel."""
    case = Case(2, 7, 9, 10, 12, 4, 8, pos=False)
    inputs = make_inputs(case, seed=12)
    if DEVICE == "cpu" and not triton_interpreting():
        pytest.skip("needs CUDA or Triton's interpreter")
    rows, bits = reprogram_patch_rows(inputs["images"], inputs["perturbation"], case.up, case.patch,
                                      torch.float32, MEAN, STD)
    v = oracle_canvas(inputs["images"], inputs["perturbation"], case.up)
    a = (np.clip(v, 0, 1) - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    g, p = case.canvas // case.patch, case.patch
    expected = a.reshape(2, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(2 * g * g, 3 * p * p)
    assert_close(rows, expected, "patch rows")
    words = bits.cpu().numpy().astype(np.int64) & 0xFFFFFFFF
    unpacked = (words[..., None] >> np.arange(32)) & 1  # [B, 3, S, words, 32]
    live = unpacked.reshape(2, 3, case.canvas, -1)[..., :case.canvas]
    np.testing.assert_array_equal(live, ((v > 0) & (v < 1)).astype(np.int64))
    assert not unpacked.reshape(2, 3, case.canvas, -1)[..., case.canvas:].any(), "bits past the canvas"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_in_an_image_reaches_its_tokens_only(backend, monkeypatch):
    """NaN is not checked (a device sync), but it must not vanish in the clamp: it shows in the
    tokens of its own image, and the other images are unaffected."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    for case in (CASES["upsample_13x11_to_20_on_24"], CASES["no_resize_no_padding"]):
        inputs = make_inputs(case, seed=13)
        inputs["images"][1, 2, 3, 4] = float("nan")
        with torch.no_grad():
            tokens = kernels.reprogram_patch_embed(inputs["images"], inputs["perturbation"], inputs["weight"],
                                                   up_resolution=case.up, mean=MEAN, std=STD)
        assert tokens[1].isnan().any()
        assert not tokens[0].isnan().any() and not tokens[2:].isnan().any()


@pytest.mark.parametrize("backend, compiler", [
    ("torch", "aot_eager"),
    ("triton", "aot_eager"),  # traced calls take the reference: the interpreter needs real tensors
    pytest.param("torch", "inductor", marks=pytest.mark.slow),
])
def test_compiled_fullgraph_forward_and_backward_match_oracle_on_cpu(backend, compiler, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    if backend == "triton" and not triton_interpreting():
        pytest.skip("the CPU interpreter runs only without CUDA")
    torch._dynamo.reset()
    case = CASES["upsample_uint8_p4_width_31"]
    inputs = make_inputs(case, seed=9, device="cpu")
    pos = torch.randn(case.n_patches, case.width)

    def loss(images, delta):
        tokens = kernels.reprogram_patch_embed(images, torch.tanh(delta) * 1.5, inputs["weight"],
                                               up_resolution=case.up, mean=MEAN, std=STD, pos_embed=pos)
        return (tokens * inputs["upstream"]).sum()

    delta = inputs["perturbation"].clone().requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)  # fullgraph: a graph break raises
    value = compiled(inputs["images"], delta)
    (grad,) = torch.autograd.grad(value, delta)

    pert = torch.tanh(delta.detach().double()) * 1.5
    tokens, grad_p, judged = oracle(dict(inputs, perturbation=pert, pos_embed=pos), case.up)
    assert_close(value, np.array((tokens * inputs["upstream"].double().numpy()).sum()), "compiled loss")
    grad_delta = grad_p * (1.5 * (1 - torch.tanh(delta.detach().double()) ** 2)).numpy()
    assert_close(grad, grad_delta, "compiled dL/ddelta", where=judged)


# --------------------------------------------------------------------------------------------
# Contracts: errors, frozen inputs, autocast, operator registration, compile-report cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen, message", [
    ("weight", "patch weight .* frozen"),
    ("pos_embed", "pos_embed require"),
    ("images", r"images\.detach"),
])
def test_constants_requiring_grad_raise(frozen, message, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    case = CASES["upsample_13x11_to_20_on_24"]
    inputs = make_inputs(case, seed=2)
    inputs[frozen].requires_grad_()
    with pytest.raises(RuntimeError, match=message):
        run_op(inputs, case.up)


def test_weight_requiring_grad_is_fine_when_nothing_is_recorded(monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton" if DEVICE == "cuda" or triton_interpreting() else "torch")
    case = CASES["no_resize_padded_uint8"]
    inputs = make_inputs(case, seed=2)
    inputs["weight"].requires_grad_()
    args = (inputs["images"], inputs["perturbation"], inputs["weight"])
    with torch.no_grad():
        tokens = kernels.reprogram_patch_embed(*args, up_resolution=case.up, mean=MEAN, std=STD)
    expected, _, _ = oracle(dict(inputs, pos_embed=None), case.up)
    assert_close(tokens, expected, "tokens without grad recording")


def _bad(**changes):
    args = dict(images=torch.rand(2, 3, 8, 8), perturbation=torch.rand(3, 16, 16),
                weight=torch.rand(5, 3, 4, 4), up_resolution=12, mean=MEAN, std=STD, pos_embed=None)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, error, match", [
    (_bad(images=torch.rand(2, 4, 8, 8)), ValueError, "RGB"),
    (_bad(images=torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.int32)), TypeError, "uint8 .* or floating"),
    (_bad(images=torch.zeros(2, 3, 8, 8, dtype=torch.bool)), TypeError, "torch.bool"),
    (_bad(perturbation=torch.rand(3, 16, 15)), ValueError, r"perturbation must be \[3, S, S\]"),
    (_bad(up_resolution=17), ValueError, "up_resolution=17"),
    (_bad(weight=torch.rand(5, 3, 4, 3)), ValueError, r"\[width, 3, p, p\]"),
    (_bad(weight=torch.rand(5, 3, 5, 5)), ValueError, "multiple of the patch size 5"),
    (_bad(pos_embed=torch.rand(15, 5)), ValueError, r"pos_embed must be \[\(S/p\)\^2, width\] = \[16, 5\]"),
    (_bad(mean=(0.5, 0.5)), ValueError, "mean must have 3 entries"),
    (_bad(std=(0.2, 0.0, 0.2)), ValueError, "std must be positive"),
    (_bad(weight=torch.rand(5, 3, 4, 4, device="meta")), ValueError, "one device"),
], ids=["channels", "int32", "bool", "perturbation", "up_resolution", "weight", "patch", "pos_embed", "mean",
        "std", "device"])
def test_bad_inputs_raise_clear_errors(args, error, match, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    images, perturbation, weight = args.pop("images"), args.pop("perturbation"), args.pop("weight")
    with pytest.raises(error, match=match):
        kernels.reprogram_patch_embed(images, perturbation, weight, **args)


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(CASES["no_resize_padded_uint8"], seed=3, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_op(inputs, 18)


@pytest.mark.skipif(not triton_interpreting(), reason="the CPU interpreter runs only without CUDA")
def test_interpreter_refuses_bf16_autocast(monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    inputs = make_inputs(CASES["no_resize_padded_uint8"], seed=3, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="fp32 only"):
        run_op(inputs, 18)


def test_autocast_gives_the_low_precision_dtype_near_the_oracle(monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    case = CASES["upsample_13x11_to_20_on_24"]
    inputs = make_inputs(case, seed=4, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, grad = run_op(inputs, case.up)
    assert tokens.dtype == torch.bfloat16 and grad.dtype == torch.float32
    ref_tokens, ref_grad, judged = oracle(inputs, case.up)
    # bf16 operands (8 bits of mantissa) over K = 192 products; the gradient is also rounded per image.
    assert_close(tokens.float(), ref_tokens, "bf16 tokens", rtol=3e-2, atol_of_max=3e-2)
    assert_close(grad, ref_grad, "dL/dP under bf16", rtol=3e-2, atol_of_max=3e-2, where=judged)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_operators_pass_opcheck(backend, monkeypatch):
    """Schema, fake (meta) implementation and autograd registration of both operators."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    case = CASES["upsample_uint8_p4_width_31"]
    inputs = make_inputs(case, seed=8)
    images, perturbation, weight = inputs["images"], inputs["perturbation"], inputs["weight"]
    pos = torch.randn(case.n_patches, case.width, device=DEVICE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (images, perturbation.requires_grad_(), weight, pos, case.up, list(MEAN), list(STD), True)
    torch.library.opcheck(torch.ops.reprogrammer.reprogram_patch_embed, args, test_utils=utils)
    _, bits = torch.ops.reprogrammer.reprogram_patch_embed(*args)
    torch.library.opcheck(torch.ops.reprogrammer.reprogram_patch_embed_backward,
                          (inputs["upstream"], bits, images, perturbation.detach(), weight, case.up, list(STD)),
                          test_utils=utils)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_sm90_cases_describe_the_launched_kernels(dtype):
    """The compile report's cases: one per kernel, signatures in the kernels' argument order."""
    cases = sm90_cases(256, 32, 32, 224, 224, 32, 768, dtype)
    assert [c["name"] for c in cases] == ["canvas", "gemm", "grad"]
    for c in cases:
        assert list(c["signature"]) == list(c["kernel"].arg_names), c["name"]
        assert all(c["signature"][k] == "constexpr" for k in c["constexprs"])
        assert c["flops"] >= 0 and c["bytes"] > 0 and c["num_warps"] in (4, 8) and c["num_stages"] >= 2
    gemm = cases[1]
    assert gemm["flops"] == 2 * 256 * 49 * 768 * 3072
    assert gemm["signature"]["a_ptr"] == "*" + dtype and gemm["constexprs"]["BLOCK_M"] >= 64
    assert min(gemm["constexprs"]["BLOCK_M"], cases[2]["constexprs"]["BLOCK_M"]) >= 64
    assert min(gemm["constexprs"]["BLOCK_N"], cases[2]["constexprs"]["BLOCK_N"]) >= 128
    assert len(sm90_cases(8, 224, 224, 224, 224, 14, 1024, dtype, backward=False)) == 2


PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
# Run in a fresh interpreter: with TRITON_INTERPRET=1 (set for this session) kernels cannot compile.
SM90_BUILD = """
import importlib, json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
rpe = importlib.import_module("reprogrammer.kernels.reprogram_patch_embed")
out = {}
for case in rpe.sm90_cases(256, 32, 32, 224, 224, 32, 768, "bf16"):
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(case["signature"].items())
             if kind.startswith("*") or (kind == "i32" and case["values"][name] % 16 == 0)}
    source = ASTSource(fn=case["kernel"], signature=case["signature"], constexprs=case["constexprs"], attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))
    ptx = os.path.join(sys.argv[1], case["name"] + ".ptx")
    open(ptx, "w").write(compiled.asm["ptx"])
    report = subprocess.run([sys.argv[2], "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                            capture_output=True, text=True, check=True)
    out[case["name"]] = dict(ptxas=report.stdout + report.stderr, wgmma="wgmma.mma_async" in compiled.asm["ptx"])
print(json.dumps(out))
"""


@pytest.mark.skipif(not PTXAS.exists(), reason="the triton wheel ships no ptxas here")
def test_bf16_kernels_compile_for_sm90a_without_spills_and_with_wgmma(tmp_path):
    """Offline sm_90a build of what the launchers run at ViT-B/32, B=256, 32 -> 224, bf16: no
    register spills anywhere, and the two GEMMs issue wgmma (not mma.sync, not FMA loops)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", SM90_BUILD, str(tmp_path), str(PTXAS)], capture_output=True,
                         text=True, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(results) == {"canvas", "gemm", "grad"}
    for name, result in results.items():
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result["ptxas"])]
        assert spills and not any(spills), f"{name}: {result['ptxas']}"
        assert result["wgmma"] or name == "canvas", f"{name}: no wgmma in the PTX"


# --------------------------------------------------------------------------------------------
# CUDA: compiled Triton kernels at ViT-B/32 shapes (S = 224, p = 32, width = 768).
# Criterion for fp32, TF32 and bf16 under autocast alike: the kernel's largest error against an
# fp64 reference is at most twice that of PyTorch's own computation in the same precision, plus
# a small atol.
# --------------------------------------------------------------------------------------------

VIT_B32 = {
    "cifar_32_to_224": Case(64, 32, 32, 224, 224, 32, 768, pos=True),
    "cifar_uint8_32_to_224": Case(64, 32, 32, 224, 224, 32, 768, pos=True, uint8=True),
    "imagenet_128_to_160_padded": Case(64, 128, 128, 160, 224, 32, 768, pos=True),
    "no_resize": Case(32, 224, 224, 224, 224, 32, 768, pos=False),
}
# precision: (autocast dtype or None, cuDNN / kernel TF32 for fp32, atol as a fraction of max|ref|)
PRECISIONS = {
    "fp32": (None, False, 1e-5),
    "tf32": (None, True, 2e-3),  # cuDNN may pick a non-TF32 algorithm: the atol covers TF32 itself
    "bf16": (torch.bfloat16, True, 1e-3),
}


def _max_error(value, reference):
    return (value.double() - reference).abs().max().item()


@cuda_only
@pytest.mark.parametrize("case, precision, compiled", [
    *[(case, precision, True) for case in VIT_B32 for precision in ("fp32", "bf16")],
    *[("cifar_32_to_224", precision, False) for precision in PRECISIONS],
])
def test_cuda_kernels_within_twice_torch_error(case, precision, compiled, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "auto")
    autocast_dtype, tf32, atol_of_max = PRECISIONS[precision]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    torch._dynamo.reset()
    case = VIT_B32[case]
    inputs = make_inputs(case, seed=case.up + case.h)
    inputs["perturbation"] = torch.tanh(inputs["perturbation"])
    as_double = {k: None if t is None else t.double() for k, t in inputs.items()}
    if case.uint8:  # the fp64 reference sees the pixels the kernel sees
        as_double["images"] = (inputs["images"].float() * UINT8_SCALE).double()
    ref_tokens, ref_grad = run_op(as_double, case.up, kernels.reprogram_patch_embed_ref)

    def run(fn):
        with torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            return run_op(inputs, case.up, fn)

    op = kernels.reprogram_patch_embed
    tokens, grad = run(torch.compile(op, fullgraph=True) if compiled else op)
    torch_tokens, torch_grad = run(kernels.reprogram_patch_embed_ref)
    assert tokens.dtype == (autocast_dtype or torch.float32) and grad.dtype == torch.float32
    for what, ours, theirs, ref in (("tokens", tokens, torch_tokens, ref_tokens),
                                    ("dL/dperturbation", grad, torch_grad, ref_grad)):
        atol = atol_of_max * ref.abs().max().item()
        ours_err, torch_err = _max_error(ours, ref), _max_error(theirs, ref)
        assert ours_err <= 2 * torch_err + atol, (
            f"{what}: kernel error {ours_err:.3g} vs PyTorch's {torch_err:.3g} (atol {atol:.3g})")


@cuda_only
def test_cuda_compiled_with_dynamic_batch(monkeypatch):
    """A smaller last batch recompiles with a symbolic batch size; block sizes must cope."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "auto")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    compiled = torch.compile(kernels.reprogram_patch_embed, fullgraph=True, dynamic=True)
    for batch in (7, 3):
        case = Case(batch, 13, 11, 20, 24, 8, 40, pos=True)
        inputs = make_inputs(case, seed=batch)
        tokens, grad = run_op(inputs, case.up, compiled)
        ref_tokens, ref_grad = run_op(inputs, case.up, kernels.reprogram_patch_embed_ref)
        assert_close(tokens, ref_tokens, f"tokens, batch {batch}")
        assert_close(grad, ref_grad, f"dL/dperturbation, batch {batch}")


@cuda_only
def test_cuda_offsets_past_int32(monkeypatch):
    """B * (S/p)^2 * width > 2^31: the last images' tokens and gradient must still be right."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "auto")
    case = Case(2 ** 31 // (49 * 768) + 2, 32, 32, 224, 224, 32, 768, pos=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.rand(case.batch, 3, 32, 32, device="cuda", generator=g)
    delta = torch.randn(3, 224, 224, device="cuda", generator=g).tanh().requires_grad_()
    weight = torch.randn(768, 3, 32, 32, device="cuda", generator=g) / 55
    pos = torch.randn(49, 768, device="cuda", generator=g)
    upstream = torch.zeros(case.batch, 49, 768, device="cuda", dtype=torch.bfloat16)
    upstream[-2:] = torch.randn(2, 49, 768, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tokens = kernels.reprogram_patch_embed(images, delta, weight, up_resolution=224, mean=MEAN,
                                               std=STD, pos_embed=pos)
        (grad,) = torch.autograd.grad(tokens, delta, upstream)
        tail = dict(images=images[-2:], perturbation=delta.detach(), weight=weight, pos_embed=pos,
                    upstream=upstream[-2:])
        ref_tokens, ref_grad = run_op(tail, 224, kernels.reprogram_patch_embed)
    # Same kernels on the last two images alone: only the offsets differ.
    torch.testing.assert_close(tokens[-2:].float(), ref_tokens.float(), rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())
