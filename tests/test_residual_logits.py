"""Residual logits and OOD scores: the Triton kernels (both plans: the kept image block and the
streamed one, one program per row block or classes split across programs) and the reference
path, against a float64 numpy oracle written out here (forward, every gradient, scores); the
text-side cache; torch.compile; a CUDA-only precision section."""
import importlib

import numpy as np
import pytest
import torch

from reprogrammer import kernels
from reprogrammer.kernels.backend import triton_interpreting

rl = importlib.import_module(kernels.residual_logits.__module__)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SCALE = 47.3  # stands in for exp(CLIP's logit_scale); deliberately not a round number
EPS = 1e-12  # F.normalize's eps

# (B, C, D, alpha): prime sizes; B = 67 is one full 64-row block plus 3 rows; C = 131 spans three
# 64-class tiles (kept plan) or two 128-class tiles (streamed); D = 97 spans four 32-wide chunks.
CASES = [(67, 131, 97, 0.4), (37, 11, 53, 0.0), (13, 7, 31, 1.0)]


# ---------------------------------------------------------------------------------------------
# The oracle: float64 numpy, independent of the package
# ---------------------------------------------------------------------------------------------
def _unit(x):
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, EPS), norm


def oracle_logits(img_rp, img_zs, txt_rp, txt_zs, alpha, scale):
    """(logits, cos, blended image, blended text) in float64."""
    img = (1 - alpha) * _unit(img_rp)[0] + alpha * _unit(img_zs)[0]
    txt = (1 - alpha) * _unit(txt_rp)[0] + alpha * _unit(txt_zs)[0]
    cos = img @ txt.T
    return scale * cos, cos, img, txt


def _unit_backward(x, grad, weight):
    """d/dx of weight * x / max(||x||, eps), applied to `grad`."""
    unit, norm = _unit(x)
    along = np.where(norm > EPS, np.sum(unit * grad, axis=1, keepdims=True), 0.0)
    return weight * (grad - unit * along) / np.maximum(norm, EPS)


def oracle_gradients(img_rp, img_zs, txt_rp, txt_zs, alpha, scale, upstream):
    """Gradients of sum(upstream * logits) w.r.t. the four inputs and the scale."""
    _, cos, img, txt = oracle_logits(img_rp, img_zs, txt_rp, txt_zs, alpha, scale)
    grad_img = scale * upstream @ txt
    grad_txt = scale * upstream.T @ img
    return {"img_rp": _unit_backward(img_rp, grad_img, 1 - alpha),
            "img_zs": _unit_backward(img_zs, grad_img, alpha),
            "txt_rp": _unit_backward(txt_rp, grad_txt, 1 - alpha),
            "txt_zs": _unit_backward(txt_zs, grad_txt, alpha),
            "logit_scale": np.sum(upstream * cos)}


def oracle_scores(cos, temperature):
    """(prediction, mcm, energy, max cos); argmax takes the first of ties."""
    z = cos / temperature
    top = z.max(axis=1, keepdims=True)
    total = np.exp(z - top).sum(axis=1)
    return cos.argmax(axis=1), 1.0 / total, temperature * (top[:, 0] + np.log(total)), cos.max(axis=1)


def as_numpy(t):
    return t.detach().double().cpu().numpy()


def assert_close(ours, expected, rtol, atol, what):
    ours = as_numpy(ours) if isinstance(ours, torch.Tensor) else np.asarray(ours, dtype=np.float64)
    bad = ~np.isclose(ours, expected, rtol=rtol, atol=atol)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} elements differ, first at {where}: "
                             f"ours {ours[bad][:5]} expected {np.asarray(expected)[bad][:5]}")


# ---------------------------------------------------------------------------------------------
# Inputs and implementations
# ---------------------------------------------------------------------------------------------
def features(B, C, D, *, seed=0, device=DEVICE, dtype=torch.float32, tiny=True):
    """img_rp, img_zs, txt_rp, txt_zs with rows of unequal norms, so normalisation matters; with
    `tiny`, one row of each of img_rp, img_zs and txt_rp is shorter than F.normalize's eps."""
    g = torch.Generator().manual_seed(seed)

    def rows(n):
        return torch.randn(n, D, generator=g) * (0.3 + 3 * torch.rand(n, 1, generator=g))

    out = [rows(B), rows(B), rows(C), rows(C)]
    if tiny:
        for t, row in ((out[0], B // 2), (out[1], B - 1), (out[2], C // 2)):
            t[row] *= 1e-13 / t[row].norm()
    return [t.to(device=device, dtype=dtype) for t in out]


@pytest.fixture(params=["torch", "stream", "kept", "kept-one-group"])
def backend(request, monkeypatch):
    """The reference path, or the Triton kernels with the streamed image block (IEEE fp32), the
    kept block (tensor-core plan; the CPU interpreter computes its tf32 dots in full fp32) with
    classes split across programs, and the kept block swept by one program per row block."""
    rl._TEXT_CACHE.clear()
    if request.param == "torch":
        monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
        return request.param
    if not (CUDA or triton_interpreting()):
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    if request.param.startswith("kept") and CUDA:
        pytest.skip("fp32 on CUDA streams (IEEE); the kept plan is covered by the bf16 CUDA tests")
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    if request.param.startswith("kept"):
        monkeypatch.setattr(rl, "_dot_precision", lambda dtype: "tf32")
    if request.param == "kept-one-group":
        monkeypatch.setattr(rl, "_sm_count", lambda device: 1)
    return request.param


# ---------------------------------------------------------------------------------------------
# Forward, gradients, scores
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,C,D,alpha", CASES)
def test_logits_and_every_gradient_match_numpy(backend, B, C, D, alpha):
    inputs = features(B, C, D, seed=B + C)
    upstream = torch.randn(B, C, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in inputs]
    scale = torch.tensor(SCALE, device=DEVICE, requires_grad=True)
    ours = kernels.residual_logits(*leaves, alpha=alpha, logit_scale=scale)
    assert ours.shape == (B, C) and ours.dtype == torch.float32
    ours.backward(upstream)
    arrays = [as_numpy(t) for t in inputs]
    expected, *_ = oracle_logits(*arrays, alpha, SCALE)
    assert_close(ours, expected, rtol=1e-5, atol=1e-4, what="logits")
    grads = oracle_gradients(*arrays, alpha, SCALE, as_numpy(upstream))
    for name, leaf in zip(("img_rp", "img_zs", "txt_rp", "txt_zs", "logit_scale"), [*leaves, scale]):
        grad = leaf.grad
        if grad is None:  # at alpha == 0 the zero-shot inputs are never read: no gradient at all
            assert alpha == 0.0 and name.endswith("_zs"), name
            grad = torch.zeros_like(leaf)
        # Rows shorter than eps get gradients of order 1 / eps: relative tolerance there.
        assert_close(grad, grads[name], rtol=1e-4, atol=1e-5 * max(1.0, np.abs(grads[name]).max() * 1e-8),
                     what=f"grad of {name}")


@pytest.mark.parametrize("B,C,D,alpha", CASES)
def test_scores_match_numpy(backend, B, C, D, alpha):
    inputs = features(B, C, D, seed=B * C)
    temperature = 0.013
    return_logits = C > 100  # asked for once per backend: the interpreter is slow
    scores = kernels.residual_scores(*inputs, alpha=alpha, logit_scale=SCALE, temperature=temperature,
                                     return_logits=return_logits)
    expected_logits, cos, _, _ = oracle_logits(*map(as_numpy, inputs), alpha, SCALE)
    prediction, mcm, energy, max_cos = oracle_scores(cos, temperature)
    assert scores.prediction.dtype == torch.int64
    assert scores.prediction.cpu().tolist() == prediction.tolist()
    for name, ours, ref in (("mcm", scores.mcm, mcm), ("energy", scores.energy, energy),
                            ("max_logit", scores.max_logit, max_cos)):
        assert ours.dtype == torch.float32 and ours.shape == (B,), name
        assert_close(ours, ref, rtol=1e-5, atol=1e-5, what=name)
    if return_logits:
        assert_close(scores.logits, expected_logits, rtol=1e-5, atol=1e-4, what="logits")
    else:
        assert scores.logits is None


def test_prediction_takes_first_of_tied_classes(backend):
    """Class 7 ties with class 9 (same class tile) and class 140 (a later tile, and with classes
    split across programs a later group): an op that kept the last of tied classes would answer
    140. The ties are exact in floating point whatever the order of summation: the tied rows
    hold sixteen entries of +-1 (norm 4) and the image rows are those times powers of two, so
    every normalised entry, product and partial sum of their dot products is a small multiple
    of a power of two."""
    _, _, txt_rp, txt_zs = features(5, 150, 64, tiny=False)
    g = torch.Generator().manual_seed(4)
    signs = torch.where(torch.rand(16, generator=g) < 0.5, -1.0, 1.0)
    tied = torch.zeros(64).index_put_((torch.randperm(64, generator=g)[:16],), signs).to(DEVICE)
    txt_rp[7] = txt_rp[9] = txt_rp[140] = tied
    img_rp = tied * torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], device=DEVICE)[:, None]
    scores = kernels.residual_scores(img_rp, img_rp, txt_rp, txt_zs, alpha=0.0, logit_scale=SCALE)
    _, cos, _, _ = oracle_logits(*map(as_numpy, (img_rp, img_rp, txt_rp, txt_zs)), 0.0, SCALE)
    assert (cos[:, [7, 9, 140]] == 1.0).all() and (np.delete(cos, [7, 9, 140], axis=1) < 0.9).all()
    assert scores.prediction.tolist() == oracle_scores(cos, 0.01)[0].tolist() == [7] * 5
    reference = kernels.residual_scores_ref(img_rp, img_rp, txt_rp, txt_zs, alpha=0.0, logit_scale=SCALE)
    assert reference.prediction.tolist() == [7] * 5


def test_alpha_zero_never_reads_zero_shot(backend):
    img_rp, _, txt_rp, _ = features(21, 10, 64, tiny=False)
    poison_img, poison_txt = torch.full_like(img_rp, float("nan")), torch.full_like(txt_rp, float("nan"))
    expected, cos, _, _ = oracle_logits(*map(as_numpy, (img_rp, img_rp, txt_rp, txt_rp)), 0.0, SCALE)
    logits = kernels.residual_logits(img_rp, poison_img, txt_rp, poison_txt, alpha=0.0, logit_scale=SCALE)
    assert_close(logits, expected, rtol=1e-5, atol=1e-4, what="logits")
    scores = kernels.residual_scores(img_rp, poison_img, txt_rp, poison_txt, alpha=0.0, logit_scale=SCALE)
    assert_close(scores.max_logit, cos.max(axis=1), rtol=1e-5, atol=1e-5, what="max_logit")


# ---------------------------------------------------------------------------------------------
# The text-side cache (evaluation)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def text_blends(monkeypatch):
    """Counts the text-side blends (calls of `blend` on the text features)."""
    calls = []
    original = rl.blend

    def counting(rp, zs, alpha):
        if rp.shape[0] == 11:  # the text side of `cache_inputs`
            calls.append(alpha)
        return original(rp, zs, alpha)

    monkeypatch.setattr(rl, "blend", counting)
    return calls


def cache_inputs():
    return features(9, 11, 24, seed=5, tiny=False)


@pytest.mark.parametrize("which", ["logits", "scores"])
def test_text_blend_cached_in_eval_and_updated_in_place(backend, text_blends, which):
    if backend.startswith("kept"):
        pytest.skip("the cache sits before the kernels: once for the reference path and the streamed plan")
    img_rp, img_zs, txt_rp, txt_zs = cache_inputs()

    def run(alpha=0.4):
        if which == "logits":
            return kernels.residual_logits(img_rp, img_zs, txt_rp, txt_zs, alpha=alpha, logit_scale=SCALE)
        return kernels.residual_scores(img_rp, img_zs, txt_rp, txt_zs, alpha=alpha, logit_scale=SCALE,
                                       return_logits=True).logits

    def expected(alpha=0.4):
        return oracle_logits(*map(as_numpy, (img_rp, img_zs, txt_rp, txt_zs)), alpha, SCALE)[0]

    with torch.no_grad():
        first = run()
        second = run()
        assert len(text_blends) == 1, "unchanged text features and alpha: blended once"
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        txt_rp[3].mul_(-2.0)  # in place: bumps txt_rp._version
        assert_close(run(), expected(), rtol=1e-5, atol=1e-4, what="after changing txt_rp in place")
        txt_zs.add_(0.5)
        assert_close(run(), expected(), rtol=1e-5, atol=1e-4, what="after changing txt_zs in place")
        assert_close(run(alpha=0.7), expected(0.7), rtol=1e-5, atol=1e-4, what="another alpha")
        assert len(text_blends) == 4
        run(alpha=0.7)
        assert len(text_blends) == 4
    with torch.inference_mode():  # inference tensors have no version counter: never cached
        frozen = [t.clone() for t in (txt_rp, txt_zs)]
        kernels.residual_logits(img_rp, img_zs, *frozen, alpha=0.4, logit_scale=SCALE)
        frozen[0].mul_(3.0)
        again = kernels.residual_logits(img_rp, img_zs, *frozen, alpha=0.4, logit_scale=SCALE)
    assert_close(again, oracle_logits(*map(as_numpy, (img_rp, img_zs, *frozen)), 0.4, SCALE)[0],
                 rtol=1e-5, atol=1e-4, what="inference-mode tensors")


def test_text_blend_not_cached_when_it_needs_gradients(text_blends, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    rl._TEXT_CACHE.clear()
    img_rp, img_zs, txt_rp, txt_zs = cache_inputs()
    txt_rp.requires_grad_()
    for _ in range(2):
        kernels.residual_logits(img_rp, img_zs, txt_rp, txt_zs, alpha=0.4, logit_scale=SCALE).sum().backward()
    assert len(text_blends) == 2 and txt_rp.grad is not None
    with torch.no_grad():
        for _ in range(2):
            kernels.residual_logits(img_rp, img_zs, txt_rp, txt_zs, alpha=0.4, logit_scale=SCALE)
    assert len(text_blends) == 3


# ---------------------------------------------------------------------------------------------
# Launch plans, dtype policy, compile, errors
# ---------------------------------------------------------------------------------------------
def test_plans_at_the_benchmark_shapes():
    """bf16 keeps 64-row blocks on chip and fills the 132 SMs with at most one wave; IEEE fp32
    streams; a block too wide to keep streams too."""
    for D in (512, 768):
        for kernel in ("logits", "scores"):
            plan = rl._plan(4096, 1000, D, 2, "tf32", 132, kernel)
            assert plan["BLOCK_B"] == 64 and plan["NUM_K"] * plan["BLOCK_K"] >= D, plan
            assert 64 * 2 <= plan["grid"][0] * plan["grid"][1] <= 132, plan
            assert plan["classes_per_program"] * plan["grid"][1] >= 1000 and plan["classes_per_program"] % plan[
                "BLOCK_C"] == 0
    assert rl._plan(4096, 1000, 512, 4, "ieee", 132, "scores")["NUM_K"] == 0
    assert rl._plan(4096, 1000, 4096, 2, "tf32", 132, "logits")["NUM_K"] == 0
    assert rl._plan(13, 1000, 512, 2, "tf32", 132, "scores")["grid"] == (1, 16)


def test_dtype_policy_on_reference_path(monkeypatch):
    """img_rp's dtype is the compute dtype: logits come back in it, scores are fp32."""
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    img_rp, img_zs, txt_rp, txt_zs = features(9, 10, 64, device="cpu", tiny=False)
    logits = kernels.residual_logits(img_rp.bfloat16(), img_zs, txt_rp, txt_zs.double(), alpha=0.4,
                                     logit_scale=SCALE)
    assert logits.dtype == torch.bfloat16
    scores = kernels.residual_scores(img_rp.bfloat16(), img_zs.bfloat16(), txt_rp, txt_zs, alpha=0.4,
                                     logit_scale=SCALE, return_logits=True)
    assert scores.mcm.dtype == scores.energy.dtype == scores.max_logit.dtype == torch.float32
    assert scores.logits.dtype == torch.bfloat16 and scores.prediction.dtype == torch.int64
    expected = oracle_logits(*map(as_numpy, (img_rp, img_zs, txt_rp, txt_zs)), 0.4, SCALE)[0]
    assert_close(logits, expected, rtol=2e-2, atol=0.1, what="bf16 logits")


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_reference_path(monkeypatch, compiler):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "torch")
    inputs = features(7, 10, 64, device="cpu", tiny=False)
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
    args = dict(zip(("img_rp", "img_zs", "txt_rp", "txt_zs"), features(4, 3, 16, device="cpu", tiny=False)))
    args.update(alpha=0.4, logit_scale=SCALE, temperature=0.01)
    args.update(change)
    with pytest.raises(error, match=match):
        kernels.residual_scores(**args)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "0.4", None, True])
def test_alpha_check_names_the_key_and_the_range(alpha):
    """One check for the op, the exported graph and the exporter: it names the key it is given."""
    with pytest.raises(ValueError, match=r"^method\.alpha=.* must be a number in \[0, 1\].*give method\.alpha"):
        kernels.check_alpha(alpha, "method.alpha")
    assert kernels.check_alpha(0) == 0.0 and kernels.check_alpha(1) == 1.0


# ---------------------------------------------------------------------------------------------
# CUDA only: compiled Triton at evaluation size, fp32 and bf16
# ---------------------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# B = 4096, C = 1000 as in the benchmarks, at CLIP ViT-B (512) and ViT-L (768) widths.
BIG = [(4096, 1000, 512), (4096, 1000, 768)]
# (shape, dtype, compiled): fp32 and bf16 at both widths; torch.compile (inductor + the user
# Triton kernels) once, in bf16 at D = 512, to keep the GPU run short.
CUDA_VARIANTS = [(shape, dtype, False) for shape in BIG for dtype in (torch.float32, torch.bfloat16)] \
    + [(BIG[0], torch.bfloat16, True)]
CUDA_IDS = [f"D{shape[2]}-{str(dtype)[6:]}{'-compiled' if compiled else ''}" for shape, dtype, compiled in CUDA_VARIANTS]
NAMES = ("logits", "grad img_rp", "grad img_zs", "grad txt_rp", "grad txt_zs")


def max_error(values, reference):
    return (values.double() - reference.double()).abs().max().item()


def assert_within_torch_error(ours, torch_low, reference, atol, what):
    """The low-precision rule: the kernel's error against the fp32 reference is at most twice
    PyTorch's own low-precision error against it, plus a small atol."""
    ours_error, torch_error = max_error(ours, reference), max_error(torch_low, reference)
    assert ours_error <= 2 * torch_error + atol, (
        f"{what}: error {ours_error:.3g} vs the fp32 reference exceeds 2 x PyTorch's {torch_error:.3g} + {atol:.3g}")


def _run_logits(op, inputs, upstream, alpha):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = op(*leaves, alpha=alpha, logit_scale=SCALE)
    out.backward(upstream)
    return (out.detach(), *(leaf.grad for leaf in leaves))


@cuda_only
@pytest.mark.parametrize("shape,dtype,compiled", CUDA_VARIANTS, ids=CUDA_IDS)
def test_cuda_logits_and_gradients(monkeypatch, shape, dtype, compiled):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    alpha = 0.4
    inputs = features(*shape, device="cuda", dtype=dtype, tiny=False)
    upstream = torch.randn(shape[0], shape[1], device="cuda", dtype=dtype)
    fn = torch.compile(kernels.residual_logits, fullgraph=True) if compiled else kernels.residual_logits
    ours = _run_logits(fn, inputs, upstream, alpha)
    # fp32 reference at PyTorch's default "highest" matmul precision (no TF32).
    reference = _run_logits(kernels.residual_logits_ref, [t.float() for t in inputs], upstream.float(), alpha)
    if dtype == torch.float32:
        for name, o, r in zip(NAMES, ours, reference):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * r.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
        return
    torch_low = _run_logits(kernels.residual_logits_ref, inputs, upstream, alpha)
    for name, o, t, r in zip(NAMES, ours, torch_low, reference):
        assert o.dtype == dtype, name
        assert_within_torch_error(o, t, r, atol=1e-3 * r.abs().max().item(), what=name)


@cuda_only
@pytest.mark.parametrize("shape,dtype,compiled", CUDA_VARIANTS, ids=CUDA_IDS)
def test_cuda_scores(monkeypatch, shape, dtype, compiled):
    monkeypatch.setenv("REPROGRAMMER_BACKEND", "triton")
    alpha, temperature = 0.4, 0.01
    inputs = features(*shape, device="cuda", dtype=dtype, tiny=False)
    fn = torch.compile(kernels.residual_scores, fullgraph=True) if compiled else kernels.residual_scores
    ours = fn(*inputs, alpha=alpha, logit_scale=SCALE, temperature=temperature, return_logits=True)
    reference = kernels.residual_scores_ref(*[t.float() for t in inputs], alpha=alpha, logit_scale=SCALE,
                                            temperature=temperature, return_logits=True)
    cos = kernels.residual_logits_ref(*[t.float() for t in inputs], alpha=alpha, logit_scale=1.0)
    # Robust to near-ties: the predicted class must be (within rounding) a maximal one.
    picked = cos.gather(1, ours.prediction[:, None]).squeeze(1)
    tie_tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (picked >= reference.max_logit - tie_tolerance).all()
    named = (("mcm", ours.mcm, reference.mcm), ("energy", ours.energy, reference.energy),
             ("max_logit", ours.max_logit, reference.max_logit), ("logits", ours.logits, reference.logits))
    if dtype == torch.float32:
        for name, o, r in named:
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * r.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
        return
    torch_low = kernels.residual_scores_ref(*inputs, alpha=alpha, logit_scale=SCALE, temperature=temperature,
                                            return_logits=True)
    torch_values = (torch_low.mcm, torch_low.energy, torch_low.max_logit, torch_low.logits)
    for (name, o, r), t in zip(named, torch_values):
        assert_within_torch_error(o, t, r, atol=1e-3 * r.abs().max().item(), what=name)
