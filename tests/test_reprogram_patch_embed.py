"""The fused reprogramming + patch-embedding op against its PyTorch reference.

The Triton tests run on CUDA when there is a GPU and otherwise in Triton's CPU interpreter
(fp32; conftest.py sets TRITON_INTERPRET=1), with REPROGRAMMER_BACKEND=triton. The section at the
end compares the compiled kernels in fp32 and bf16 at ViT-B/32 shapes and needs a GPU.
"""
import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN as MEAN
from open_clip.constants import OPENAI_DATASET_STD as STD

from reprogrammer import kernels
from reprogrammer.kernels.backend import triton_interpreting
from reprogrammer.kernels.reprogram_patch_embed import reprogram_patch_embed_backward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp32 kernel vs fp32 reference: the two differ only in the summation order of the K = 3 p^2
# (<= 192 here) products per token / of the width products per gradient pixel, and in FMA
# contraction of the bicubic taps. Worst case that is ~K * 6e-8 ~ 1e-5 of the summed magnitudes;
# measured, the error stays below ~1e-6 of the output's largest element. A wrong tap, mask or
# offset moves elements by O(1) of that scale.
RTOL = 1e-5
ATOL_OF_MAX = 1e-5


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

    @property
    def n_patches(self) -> int:
        return (self.canvas // self.patch) ** 2


CASES = {
    "upsample_13x11_to_20_on_24": Case(3, 13, 11, 20, 24, 8, 40, pos=True),
    "upsample_p4_no_pos": Case(2, 5, 7, 12, 16, 4, 33, pos=False),
    "no_resize_no_padding": Case(2, 24, 24, 24, 24, 8, 24, pos=False),
    "no_resize_padded": Case(3, 18, 18, 18, 24, 6, 20, pos=True),
    "downsample_uneven_padding": Case(2, 29, 31, 15, 20, 5, 17, pos=True),
    "resize_width_only": Case(2, 12, 9, 12, 16, 4, 16, pos=False),
}


def make_inputs(case: Case, seed: int, device=DEVICE):
    """Images in [0, 1]; a raw N(0, 2^2) perturbation so the clamp saturates on both sides."""
    g = torch.Generator().manual_seed(seed)
    k = 3 * case.patch ** 2
    inputs = dict(
        images=torch.rand(case.batch, 3, case.h, case.w, generator=g),
        perturbation=torch.randn(3, case.canvas, case.canvas, generator=g) * 2,
        weight=torch.randn(case.width, 3, case.patch, case.patch, generator=g) / k ** 0.5,
        pos_embed=torch.randn(case.n_patches, case.width, generator=g) if case.pos else None,
        upstream=torch.randn(case.batch, case.n_patches, case.width, generator=g),
    )
    return {name: None if t is None else t.to(device) for name, t in inputs.items()}


def unclamped_canvas(images, perturbation, up):
    """pad(bicubic(x)) + P, written out independently of the module under test."""
    if images.shape[-2:] != (up, up):
        images = F.interpolate(images, size=(up, up), mode="bicubic", align_corners=False)
    o = (perturbation.shape[-1] - up) // 2
    canvas = torch.zeros(images.shape[0], 3, *perturbation.shape[-2:], dtype=images.dtype,
                         device=images.device)
    canvas[:, :, o:o + up, o:o + up] = images
    return canvas + perturbation


def assert_close(actual, expected, what, *, rtol=RTOL, atol_of_max=ATOL_OF_MAX):
    """Elementwise |actual - expected| <= atol + rtol |expected| (NaN fails), listing offenders."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: got {tuple(actual.shape)} {actual.dtype}, expected {tuple(expected.shape)} {expected.dtype}")
    atol = atol_of_max * expected.abs().max().item()
    ok = (actual - expected).abs() <= atol + rtol * expected.abs()
    if not ok.all():
        bad = (~ok).nonzero().tolist()
        listing = "\n".join(f"  {tuple(i)}: got {actual[tuple(i)].item():.8g}, "
                            f"expected {expected[tuple(i)].item():.8g}" for i in bad[:12])
        pytest.fail(f"{what}: {len(bad)} of {ok.numel()} elements differ "
                    f"(atol {atol:.3g}, rtol {rtol:g}):\n{listing}")


def run_both(case_inputs, up, fn):
    """Tokens and dL/dP from `fn` (the op or the reference) for the case's upstream gradient."""
    perturbation = case_inputs["perturbation"].clone().requires_grad_()
    tokens = fn(case_inputs["images"], perturbation, case_inputs["weight"], up_resolution=up,
                mean=MEAN, std=STD, pos_embed=case_inputs["pos_embed"])
    (grad,) = torch.autograd.grad(tokens, perturbation, case_inputs["upstream"])
    return tokens.detach(), grad


@pytest.fixture
def exact_fp32(monkeypatch):
    """On CUDA, keep both the kernel and cuDNN's reference convolution off TF32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_perturbation_grad_match_reference(case, backend, monkeypatch, exact_fp32):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    inputs = make_inputs(case, seed=case.h * 31 + case.up)
    v = unclamped_canvas(inputs["images"], inputs["perturbation"], case.up)
    assert (v < 0).float().mean() > 0.1 and (v > 1).float().mean() > 0.1, "clamp must saturate both ways"

    tokens, grad = run_both(inputs, case.up, kernels.reprogram_patch_embed)
    ref_tokens, ref_grad = run_both(inputs, case.up, kernels.reprogram_patch_embed_ref)
    assert tokens.shape == (case.batch, case.n_patches, case.width)
    assert_close(tokens, ref_tokens, f"{backend} tokens")
    assert_close(grad, ref_grad, f"{backend} dL/dperturbation")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_values_exactly_on_the_clamp_bounds_pass_no_gradient(backend, monkeypatch, exact_fp32):
    """torch.clamp(v, 0, 1)'s backward is zero where v is exactly 0 or 1; the op must agree."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    case = Case(2, 12, 12, 12, 16, 4, 16, pos=False)
    inputs = make_inputs(case, seed=5)
    g = torch.Generator().manual_seed(6)
    images = torch.randint(1, 256, (2, 3, 12, 12), generator=g) / 256  # exact in fp32
    pert = inputs["perturbation"].cpu()
    pert[:, 0, :] = 0.0  # padding rows: v = P exactly 0 or 1 for every image
    pert[:, 1, :] = 1.0
    inner = pert[:, 2:14, 2:14]
    on_one, on_zero = torch.rand(2, 3, 12, 12, generator=g).unbind(0)
    inner[on_one < 0.3] = (1 - images[0])[on_one < 0.3]  # v of image 0 exactly 1
    inner[on_zero < 0.3] = -images[0][on_zero < 0.3]  # ... and exactly 0
    inputs.update(images=images.to(DEVICE), perturbation=pert.to(DEVICE))
    v = unclamped_canvas(inputs["images"], inputs["perturbation"], case.up)
    assert ((v == 0) | (v == 1)).sum() > 100

    tokens, grad = run_both(inputs, case.up, kernels.reprogram_patch_embed)
    ref_tokens, ref_grad = run_both(inputs, case.up, kernels.reprogram_patch_embed_ref)
    assert_close(tokens, ref_tokens, "tokens")
    assert_close(grad, ref_grad, "dL/dperturbation with values on the bounds")


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_backward_kernel_splits_the_batch_into_partials(chunks, exact_fp32):
    """Each batch chunk writes its own fp32 partial; the sum must not depend on the split."""
    case = CASES["upsample_13x11_to_20_on_24"]
    inputs = make_inputs(case, seed=11)
    _, ref_grad = run_both(inputs, case.up, kernels.reprogram_patch_embed_ref)
    grad = reprogram_patch_embed_backward(inputs["upstream"], inputs["images"], inputs["perturbation"],
                                          inputs["weight"], case.up, STD, batch_chunks=chunks)
    assert_close(grad, ref_grad, f"dL/dperturbation in {chunks} batch chunks")


@pytest.mark.parametrize("frozen, message", [
    ("weight", "patch weight .* frozen"),
    ("pos_embed", "pos_embed require"),
    ("images", r"images\.detach"),
])
def test_constants_requiring_grad_raise(frozen, message, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    case = CASES["no_resize_padded"]
    inputs = make_inputs(case, seed=2)
    inputs[frozen].requires_grad_()
    with pytest.raises(RuntimeError, match=message):
        run_both(inputs, case.up, kernels.reprogram_patch_embed)


def test_weight_requiring_grad_is_fine_when_nothing_is_recorded(monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    case = CASES["no_resize_padded"]
    inputs = make_inputs(case, seed=2)
    inputs["weight"].requires_grad_()
    args = (inputs["images"], inputs["perturbation"], inputs["weight"])
    with torch.no_grad():
        tokens = kernels.reprogram_patch_embed(*args, up_resolution=case.up, mean=MEAN, std=STD)
        expected = kernels.reprogram_patch_embed_ref(*args, up_resolution=case.up, mean=MEAN, std=STD)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def _bad(**changes):
    args = dict(images=torch.rand(2, 3, 8, 8), perturbation=torch.rand(3, 16, 16),
                weight=torch.rand(5, 3, 4, 4), up_resolution=12, mean=MEAN, std=STD, pos_embed=None)
    args.update(changes)
    return args


@pytest.mark.parametrize("args, error, match", [
    (_bad(images=torch.rand(2, 4, 8, 8)), ValueError, "RGB"),
    (_bad(images=torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)), TypeError, "255"),
    (_bad(perturbation=torch.rand(3, 16, 15)), ValueError, r"perturbation must be \[3, S, S\]"),
    (_bad(up_resolution=17), ValueError, "up_resolution=17"),
    (_bad(weight=torch.rand(5, 3, 4, 3)), ValueError, r"\[width, 3, p, p\]"),
    (_bad(weight=torch.rand(5, 3, 5, 5)), ValueError, "multiple of the patch size 5"),
    (_bad(pos_embed=torch.rand(15, 5)), ValueError, r"pos_embed must be \[\(S/p\)\^2, width\] = \[16, 5\]"),
    (_bad(mean=(0.5, 0.5)), ValueError, "mean must have 3 entries"),
    (_bad(std=(0.2, 0.0, 0.2)), ValueError, "std must be positive"),
    (_bad(weight=torch.rand(5, 3, 4, 4, device="meta")), ValueError, "one device"),
], ids=["channels", "uint8", "perturbation", "up_resolution", "weight", "patch", "pos_embed", "mean",
        "std", "device"])
def test_bad_inputs_raise_clear_errors(args, error, match, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    images, perturbation, weight = args.pop("images"), args.pop("perturbation"), args.pop("weight")
    with pytest.raises(error, match=match):
        kernels.reprogram_patch_embed(images, perturbation, weight, **args)


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(CASES["no_resize_padded"], seed=3, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_both(inputs, 18, kernels.reprogram_patch_embed)


@pytest.mark.skipif(not triton_interpreting(), reason="the CPU interpreter runs only without CUDA")
def test_interpreter_refuses_bf16_autocast(monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    inputs = make_inputs(CASES["no_resize_padded"], seed=3, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="fp32 only"):
        run_both(inputs, 18, kernels.reprogram_patch_embed)


def test_autocast_gives_the_reference_dtype_and_values(monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    case = CASES["upsample_13x11_to_20_on_24"]
    inputs = make_inputs(case, seed=4, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, grad = run_both(inputs, case.up, kernels.reprogram_patch_embed)
        ref_tokens, ref_grad = run_both(inputs, case.up, kernels.reprogram_patch_embed_ref)
    assert tokens.dtype == torch.bfloat16 and grad.dtype == torch.float32
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=0)
    # The reference rounds the canvas gradient to bf16 per image; the op sums it in fp32.
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=2e-2 * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_operators_pass_opcheck(backend, monkeypatch):
    """Schema, fake (meta) implementation and autograd registration of both operators."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    case = CASES["upsample_p4_no_pos"]
    inputs = make_inputs(case, seed=8)
    images, perturbation, weight = inputs["images"], inputs["perturbation"], inputs["weight"]
    pos = torch.randn(case.n_patches, case.width, device=DEVICE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.reprogrammer.reprogram_patch_embed,
                          (images, perturbation.requires_grad_(), weight, pos, case.up, list(MEAN), list(STD)),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.reprogrammer.reprogram_patch_embed_backward,
                          (inputs["upstream"], images, perturbation.detach(), weight, case.up, list(STD)),
                          test_utils=utils)


@pytest.mark.parametrize("backend, compiler", [
    ("torch", "aot_eager"),
    ("triton", "aot_eager"),  # traced calls take the reference: the interpreter needs real tensors
    pytest.param("torch", "inductor", marks=pytest.mark.slow),
])
def test_compiled_fullgraph_forward_and_backward_equal_eager_on_cpu(backend, compiler, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", backend)
    if backend == "triton" and not triton_interpreting():
        pytest.skip("the CPU interpreter runs only without CUDA")
    torch._dynamo.reset()
    case = CASES["upsample_p4_no_pos"]
    inputs = make_inputs(case, seed=9, device="cpu")
    pos = torch.randn(case.n_patches, case.width)

    def loss(images, delta):
        tokens = kernels.reprogram_patch_embed(images, torch.tanh(delta) * 1.5, inputs["weight"],
                                               up_resolution=case.up, mean=MEAN, std=STD, pos_embed=pos)
        return (tokens * inputs["upstream"]).sum()

    delta = inputs["perturbation"].clone().requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    value = compiled(inputs["images"], delta)
    (grad,) = torch.autograd.grad(value, delta)
    eager_value = loss(inputs["images"], delta)
    (eager_grad,) = torch.autograd.grad(eager_value, delta)
    assert_close(value, eager_value, "compiled loss")
    assert_close(grad, eager_grad, "compiled dL/ddelta")


# --------------------------------------------------------------------------------------------
# CUDA: compiled Triton kernels at ViT-B/32 shapes (S = 224, p = 32, width = 768).
# Criterion for fp32, TF32 and bf16 under autocast alike: the kernel's largest error against an
# fp64 reference is at most twice that of PyTorch's own computation in the same precision, plus
# a small atol.
# --------------------------------------------------------------------------------------------

VIT_B32 = {
    "cifar_32_to_224": Case(64, 32, 32, 224, 224, 32, 768, pos=True),
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
    ref_tokens, ref_grad = run_both(as_double, case.up, kernels.reprogram_patch_embed_ref)

    def run(fn):
        with torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            return run_both(inputs, case.up, fn)

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
        tokens, grad = run_both(inputs, case.up, compiled)
        ref_tokens, ref_grad = run_both(inputs, case.up, kernels.reprogram_patch_embed_ref)
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
        ref_tokens, ref_grad = run_both(tail, 224, kernels.reprogram_patch_embed)
    # Same kernels on the last two images alone: only the offsets differ.
    torch.testing.assert_close(tokens[-2:].float(), ref_tokens.float(), rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())
