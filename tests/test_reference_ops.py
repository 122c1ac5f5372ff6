"""The reference ops against a straightforward numpy computation of docs/method.md section 1."""
import numpy as np
import pytest
import torch

from reprogrammer import kernels

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _cubic_weights(t, a=-0.75):
    """Keys' cubic convolution weights of the 4 taps at distances 1+t, t, 1-t, 2-t."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_matrix(n_in, n_out):
    """`[n_out, n_in]` matrix of half-pixel bicubic resampling with clamped border taps."""
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    base = np.floor(src).astype(int)
    weights = _cubic_weights(src - base)
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        for k in range(4):
            matrix[i, np.clip(base[i] - 1 + k, 0, n_in - 1)] += weights[i, k]
    return matrix


def numpy_reprogram(images, pert, up, mean, std):
    b, _, h, w = images.shape
    s = pert.shape[-1]
    if (h, w) != (up, up):
        images = np.einsum("yh,bchw,xw->bcyx", _resize_matrix(h, up), images, _resize_matrix(w, up))
    canvas = np.zeros((b, 3, s, s))
    o = (s - up) // 2
    canvas[:, :, o:o + up, o:o + up] = images
    x = np.clip(canvas + pert, 0, 1)
    return (x - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


def numpy_patch_embed(canvas, weight):
    b, c, s, _ = canvas.shape
    width, _, p, _ = weight.shape
    g = s // p
    patches = canvas.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
    return patches @ weight.reshape(width, -1).T


@pytest.mark.parametrize("h, w, up, s, r", [(13, 11, 20, 24, 9), (24, 24, 24, 24, 10), (7, 7, 7, 12, 4),
                                            (9, 14, 17, 17, 0)])
def test_reprogram_image_matches_numpy(h, w, up, s, r):
    g = torch.Generator().manual_seed(h * 100 + up)
    images = torch.rand(3, 3, h, w, generator=g, dtype=torch.float64)
    pert = kernels.perturbation(torch.randn(3, s, s, generator=g, dtype=torch.float64) * 2,
                                kernels.border_mask(s, r, dtype=torch.float64))
    ours = kernels.reprogram_image(images, pert, up_resolution=up, mean=MEAN, std=STD)
    expected = numpy_reprogram(images.numpy(), pert.numpy(), up, MEAN, STD)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_reprogram_image_scales_uint8_by_1_over_255():
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 3, 9, 7), generator=g, dtype=torch.uint8)
    pert = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    ours = kernels.reprogram_image(images, pert, up_resolution=12, mean=MEAN, std=STD)
    pixels = images.numpy().astype(np.float32) * np.float32(1 / 255)  # fp32 scaling, as specified
    expected = numpy_reprogram(pixels.astype(np.float64), pert.numpy(), 12, MEAN, STD)
    assert ours.dtype == torch.float32  # uint8 images compute in fp32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_patch_embed_matches_numpy_with_pos_embed():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 13, 11, generator=g, dtype=torch.float64)
    pert = torch.randn(3, 24, 24, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 3, 8, 8, generator=g, dtype=torch.float64)
    pos = torch.randn(9, 40, generator=g, dtype=torch.float64)
    tokens = kernels.reprogram_patch_embed(images, pert, weight, up_resolution=20, mean=MEAN, std=STD,
                                           pos_embed=pos)
    canvas = numpy_reprogram(images.numpy(), pert.numpy(), 20, MEAN, STD)
    np.testing.assert_allclose(tokens.numpy(), numpy_patch_embed(canvas, weight.numpy()) + pos.numpy(),
                               rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("s, r", [(24, 10), (24, 9), (15, 7), (15, 8)])
def test_border_mask_centre(s, r):
    mask = kernels.border_mask(s, r)
    start = (s - r) // 2
    assert mask.sum() == 3 * (s * s - r * r)
    assert mask[:, start:start + r, start:start + r].abs().sum() == 0
    delta = torch.randn(3, s, s)
    assert torch.all(kernels.perturbation(delta, mask)[mask == 0] == 0)


def test_gradient_reaches_delta_outside_mask_and_not_where_clamped():
    g = torch.Generator().manual_seed(3)
    s, r, up = 16, 6, 10
    delta = (torch.randn(3, s, s, generator=g) * 3).requires_grad_()
    mask = kernels.border_mask(s, r)
    images = torch.rand(2, 3, 7, 9, generator=g)
    pert = kernels.perturbation(delta, mask)
    x = kernels.reprogram_image(images, pert, up_resolution=up, mean=MEAN, std=STD)
    x.backward(torch.randn(x.shape, generator=g))
    grad = delta.grad
    assert torch.all(grad[mask == 0] == 0)
    o = (s - up) // 2
    canvas = torch.zeros(2, 3, s, s)
    canvas[:, :, o:o + up, o:o + up] = torch.nn.functional.interpolate(images, size=(up, up), mode="bicubic")
    raw = canvas + pert.detach()
    saturated_everywhere = ((raw <= 0) | (raw >= 1)).all(0)
    assert saturated_everywhere.any() and (mask.bool() & ~saturated_everywhere).any()
    assert torch.all(grad[saturated_everywhere] == 0)
    assert torch.all(grad[mask.bool() & ~saturated_everywhere] != 0)


def test_dropout_shares_one_mask_over_the_batch_and_is_off_in_eval():
    delta, mask = torch.randn(3, 8, 8), kernels.border_mask(8, 2)
    torch.manual_seed(0)
    dropped = kernels.perturbation(delta, mask, dropout=0.5, training=True)
    assert dropped.shape == (3, 8, 8) and (dropped == 0).sum() > (mask == 0).sum()
    assert torch.equal(kernels.perturbation(delta, mask, dropout=0.5, training=False),
                       kernels.perturbation(delta, mask))


@pytest.mark.parametrize("images, pert, up, match", [
    (torch.rand(2, 1, 8, 8), torch.zeros(3, 8, 8), 8, "RGB"),
    (torch.rand(2, 3, 8), torch.zeros(3, 8, 8), 8, r"\[B, 3, h, w\]"),
    (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.int16), torch.zeros(3, 8, 8), 8, "uint8"),
    (torch.rand(2, 3, 8, 8), torch.zeros(3, 8, 8), 9, "up_resolution"),
    (torch.rand(2, 3, 8, 8), torch.zeros(3, 8, 6), 8, r"\[3, S, S\]"),
])
def test_bad_inputs_raise_clear_errors(images, pert, up, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.reprogram_image(images, pert, up_resolution=up, mean=MEAN, std=STD)


def test_mr_resolution_larger_than_canvas_raises():
    with pytest.raises(ValueError, match="mr_resolution"):
        kernels.border_mask(8, 9)


def test_residual_logits_reference_blend():
    g = torch.Generator().manual_seed(1)
    img_rp, img_zs = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    txt_rp, txt_zs = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)

    def unit(v):
        return v / v.norm(dim=-1, keepdim=True)

    for alpha in (0.0, 0.4, 1.0):
        img = (1 - alpha) * unit(img_rp) + alpha * unit(img_zs)
        txt = (1 - alpha) * unit(txt_rp) + alpha * unit(txt_zs)
        ours = kernels.residual_logits_ref(img_rp, img_zs, txt_rp, txt_zs, alpha=alpha, logit_scale=50.0)
        torch.testing.assert_close(ours, 50.0 * img @ txt.T)
