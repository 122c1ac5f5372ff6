"""Residual logits and OOD scores: Triton kernels and reference path against float64 maths
written out here, gradients included, plus torch.compile and a CUDA-only precision section."""
import pytest
import torch

from reprogrammer import kernels
from reprogrammer.kernels.backend import triton_interpreting

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SCALE = 47.3  # stands in for exp(CLIP's logit_scale); deliberately not a round number

# (B, C, D, alpha): odd B, C not a power of two; several B and C tiles where it is cheap.
CASES = [(37, 10, 64, 0.4), (21, 100, 512, 0.0), (9, 1000, 768, 1.0), (37, 1000, 64, 0.4)]


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton" and not (CUDA or triton_interpreting()):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("REPROGRAMMER_BACKEND", request.param)
    return request.param


def features(B, C, D, *, seed=0, device=DEVICE, dtype=torch.float32):
    """img_rp, img_zs, txt_rp, txt_zs with rows of unequal norms, so normalisation matters."""
    g = torch.Generator().manual_seed(seed)

    def rows(n):
        return torch.randn(n, D, generator=g) * (0.3 + 3 * torch.rand(n, 1, generator=g))

    return [t.to(device=device, dtype=dtype) for t in (rows(B), rows(B), rows(C), rows(C))]


def cosine64(img_rp, img_zs, txt_rp, txt_zs, alpha):
    """The blended cosine in float64, written out independently of the package."""
    def unit(v):
        v = v.double()
        return v / v.norm(dim=-1, keepdim=True)

    img = (1 - alpha) * unit(img_rp) + alpha * unit(img_zs)
    txt = (1 - alpha) * unit(txt_rp) + alpha * unit(txt_zs)
    return img @ txt.T


@pytest.mark.parametrize("B,C,D,alpha", CASES)
def test_logits_match_float64(backend, B, C, D, alpha):
    inputs = features(B, C, D, seed=B + C)
    ours = kernels.residual_logits(*inputs, alpha=alpha, logit_scale=SCALE)
    assert ours.shape == (B, C) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), SCALE * cosine64(*inputs, alpha), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("B,C,D,alpha", [(23, 10, 64, 0.0), (23, 10, 64, 0.4), (23, 10, 64, 1.0),
                                         (19, 100, 512, 0.4)])
def test_gradients_match_float64(backend, B, C, D, alpha):
    inputs = features(B, C, D, seed=D + int(10 * alpha))
    upstream = torch.randn(B, C, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ours_in = [t.clone().requires_grad_() for t in inputs]
    kernels.residual_logits(*ours_in, alpha=alpha, logit_scale=SCALE).backward(upstream)
    ref_in = [t.double().requires_grad_() for t in inputs]
    (SCALE * cosine64(*ref_in, alpha)).backward(upstream.double())
    for name, ours, ref in zip(("img_rp", "img_zs", "txt_rp", "txt_zs"), ours_in, ref_in):
        # At alpha == 0 the zero-shot inputs are never read, so they get no gradient at all.
        grad = torch.zeros_like(ours) if ours.grad is None and alpha == 0 else ours.grad
        torch.testing.assert_close(grad.double(), ref.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_gradient_of_rows_shorter_than_normalize_eps(backend):
    """F.normalize divides such rows by its eps (1e-12): the reference's autograd is the oracle."""
    inputs = features(9, 10, 64)
    inputs[0][3] *= 1e-13 / inputs[0][3].norm()
    upstream = torch.randn(9, 10, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = []
    for op in (kernels.residual_logits, kernels.residual_logits_ref):
        img_rp = inputs[0].clone().requires_grad_()
        op(img_rp, *inputs[1:], alpha=0.4, logit_scale=SCALE).backward(upstream)
        grads.append(img_rp.grad)
    torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-5)


def test_logit_scale_tensor_gets_gradient(backend):
    inputs = features(7, 10, 64)
    scale = torch.tensor(SCALE, device=DEVICE, requires_grad=True)
    kernels.residual_logits(*inputs, alpha=0.4, logit_scale=scale).sum().backward()
    torch.testing.assert_close(scale.grad.double(), cosine64(*inputs, 0.4).sum(), rtol=1e-5, atol=1e-4)


def expected_scores(cos, temperature):
    z = cos / temperature
    return (cos.argmax(dim=1), torch.softmax(z, dim=1).max(dim=1).values,
            temperature * torch.logsumexp(z, dim=1), cos.max(dim=1).values)


@pytest.mark.parametrize("return_logits", [False, True])
@pytest.mark.parametrize("B,C,D,alpha", CASES)
def test_scores_match_float64(backend, B, C, D, alpha, return_logits):
    if backend == "triton" and not CUDA and return_logits != (C == 1000):
        pytest.skip("interpreter time: each case runs once, logits asked for at C=1000")
    inputs = features(B, C, D, seed=B * C)
    temperature = 0.013
    scores = kernels.residual_scores(*inputs, alpha=alpha, logit_scale=SCALE, temperature=temperature,
                                     return_logits=return_logits)
    cos = cosine64(*inputs, alpha)
    prediction, mcm, energy, max_cos = expected_scores(cos, temperature)
    torch.testing.assert_close(scores.prediction, prediction, rtol=0, atol=0)
    for name, ours, ref in (("mcm", scores.mcm, mcm), ("energy", scores.energy, energy),
                            ("max_logit", scores.max_logit, max_cos)):
        assert ours.dtype == torch.float32 and ours.shape == (B,), name
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if return_logits:
        torch.testing.assert_close(scores.logits.double(), SCALE * cos, rtol=1e-5, atol=1e-4)
    else:
        assert scores.logits is None


def test_prediction_takes_first_of_tied_classes(backend):
    """Class 7 ties with class 9 (same tile of classes) and class 140 (a later tile)."""
    _, _, txt_rp, txt_zs = features(5, 150, 64)
    txt_rp[9] = txt_rp[140] = txt_rp[7]
    img_rp = txt_rp[7] * torch.arange(1.0, 6.0, device=DEVICE)[:, None]
    scores = kernels.residual_scores(img_rp, img_rp, txt_rp, txt_zs, alpha=0.0, logit_scale=SCALE)
    assert scores.prediction.tolist() == [7] * 5


def test_alpha_zero_never_reads_zero_shot(backend):
    img_rp, _, txt_rp, _ = features(21, 10, 64)
    poison_img, poison_txt = torch.full_like(img_rp, float("nan")), torch.full_like(txt_rp, float("nan"))
    expected = cosine64(img_rp, img_rp, txt_rp, txt_rp, 0.0)
    logits = kernels.residual_logits(img_rp, poison_img, txt_rp, poison_txt, alpha=0.0, logit_scale=SCALE)
    torch.testing.assert_close(logits.double(), SCALE * expected, rtol=1e-5, atol=1e-4)
    scores = kernels.residual_scores(img_rp, poison_img, txt_rp, poison_txt, alpha=0.0, logit_scale=SCALE)
    torch.testing.assert_close(scores.max_logit.double(), expected.max(dim=1).values, rtol=1e-5, atol=1e-5)
    same = kernels.residual_logits(img_rp, img_rp, txt_rp, txt_rp, alpha=0.0, logit_scale=SCALE)
    torch.testing.assert_close(same, logits)


def test_dtype_policy_on_reference_path(monkeypatch):
    """img_rp's dtype is the compute dtype: logits come back in it, scores are fp32."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    img_rp, img_zs, txt_rp, txt_zs = features(9, 10, 64, device="cpu")
    logits = kernels.residual_logits(img_rp.bfloat16(), img_zs, txt_rp, txt_zs.double(), alpha=0.4,
                                     logit_scale=SCALE)
    assert logits.dtype == torch.bfloat16
    scores = kernels.residual_scores(img_rp.bfloat16(), img_zs.bfloat16(), txt_rp, txt_zs, alpha=0.4,
                                     logit_scale=SCALE, return_logits=True)
    assert scores.mcm.dtype == scores.energy.dtype == scores.max_logit.dtype == torch.float32
    assert scores.logits.dtype == torch.bfloat16 and scores.prediction.dtype == torch.int64
    torch.testing.assert_close(logits.double(), SCALE * cosine64(img_rp, img_zs, txt_rp, txt_zs, 0.4),
                               rtol=2e-2, atol=0.1)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_reference_path(monkeypatch, compiler):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    inputs = features(7, 10, 64, device="cpu")
    scale = torch.tensor(SCALE)

    def loss(img_rp, img_zs, txt_rp, txt_zs):
        return kernels.residual_logits(img_rp, img_zs, txt_rp, txt_zs, alpha=0.4, logit_scale=scale).pow(2).sum()

    def evaluate(img_rp, img_zs, txt_rp, txt_zs):
        return kernels.residual_scores(img_rp, img_zs, txt_rp, txt_zs, alpha=0.4, logit_scale=scale,
                                       return_logits=True)

    def loss_and_grads(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        value = fn(*leaves)
        value.backward()
        return value, leaves[0].grad, leaves[2].grad

    eager = [*loss_and_grads(loss), *evaluate(*inputs)]
    compiled = [*loss_and_grads(torch.compile(loss, fullgraph=True, backend=compiler)),
                *torch.compile(evaluate, fullgraph=True, backend=compiler)(*inputs)]
    for ours, ref in zip(compiled, eager, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("change,error,match", [
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(img_zs=torch.ones(5, 16)), ValueError, "zero-shot"),
    (dict(txt_rp=torch.ones(3, 8)), ValueError, r"\[C, D\]"),
    (dict(img_rp=torch.ones(4, 16, dtype=torch.int64)), TypeError, "floating point"),
])
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = dict(zip(("img_rp", "img_zs", "txt_rp", "txt_zs"), features(4, 3, 16, device="cpu")))
    args.update(alpha=0.4, logit_scale=SCALE, temperature=0.01)
    args.update(change)
    with pytest.raises(error, match=match):
        kernels.residual_scores(**args)


# ---------------------------------------------------------------------------------------------
# CUDA only: compiled Triton at evaluation size, fp32 and bf16
# ---------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
BIG = (4096, 1000, 512)
# torch.compile (inductor + user Triton kernels) once, in bf16, to keep the GPU run short.
CUDA_VARIANTS = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]


def max_error(values, reference):
    return (values.double() - reference).abs().max().item()


def assert_within_torch_error(ours, torch_low, reference, atol, what):
    """The low-precision rule: at most twice PyTorch's own error against fp64, plus atol."""
    ours_error, torch_error = max_error(ours, reference), max_error(torch_low, reference)
    assert ours_error <= 2 * torch_error + atol, (
        f"{what}: error {ours_error:.3g} vs fp64 exceeds 2 x PyTorch's {torch_error:.3g} + {atol}")


@cuda_only
@pytest.mark.parametrize("dtype,compiled", CUDA_VARIANTS)
def test_cuda_logits_and_gradients(monkeypatch, dtype, compiled):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    alpha = 0.4
    inputs = features(*BIG, device="cuda", dtype=dtype)
    upstream = torch.randn(BIG[0], BIG[1], device="cuda", dtype=dtype)
    fn = kernels.residual_logits
    if compiled:
        fn = torch.compile(kernels.residual_logits, fullgraph=True)

    def run(op):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = op(*leaves, alpha=alpha, logit_scale=SCALE)
        out.backward(upstream)
        return out.detach(), leaves[0].grad, leaves[2].grad

    ours = run(fn)
    leaves64 = [t.double().requires_grad_() for t in inputs]
    ref = SCALE * cosine64(*leaves64, alpha)
    ref.backward(upstream.double())
    reference = (ref.detach(), leaves64[0].grad, leaves64[2].grad)
    names = ("logits", "grad img_rp", "grad txt_rp")
    if dtype == torch.float32:
        for name, o, r in zip(names, ours, reference):
            torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
        return
    torch_low = run(kernels.residual_logits_ref)
    for name, o, t, r in zip(names, ours, torch_low, reference):
        assert o.dtype == dtype, name
        assert_within_torch_error(o, t, r, atol=1e-3 * r.abs().max().item(), what=name)


@cuda_only
@pytest.mark.parametrize("dtype,compiled", CUDA_VARIANTS)
def test_cuda_scores(monkeypatch, dtype, compiled):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    alpha, temperature = 0.4, 0.01
    inputs = features(*BIG, device="cuda", dtype=dtype)
    fn = torch.compile(kernels.residual_scores, fullgraph=True) if compiled else kernels.residual_scores
    ours = fn(*inputs, alpha=alpha, logit_scale=SCALE, temperature=temperature, return_logits=True)
    cos = cosine64(*inputs, alpha)
    _, mcm, energy, max_cos = expected_scores(cos, temperature)
    # Robust to near-ties: the predicted class must be (within rounding) a maximal one.
    picked = cos.gather(1, ours.prediction[:, None]).squeeze(1)
    tie_tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (picked >= max_cos - tie_tolerance).all()
    named = (("mcm", ours.mcm, mcm), ("energy", ours.energy, energy), ("max_logit", ours.max_logit, max_cos),
             ("logits", ours.logits, SCALE * cos))
    if dtype == torch.float32:
        for name, o, r in named:
            torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
        return
    torch_low = kernels.residual_scores_ref(*inputs, alpha=alpha, logit_scale=SCALE, temperature=temperature,
                                            return_logits=True)
    torch_values = (torch_low.mcm, torch_low.energy, torch_low.max_logit, torch_low.logits)
    for (name, o, r), t in zip(named, torch_values):
        assert_within_torch_error(o, t, r, atol=1e-3 * r.abs().max().item(), what=name)
