import pytest
import torch
import torch.nn.functional as F

from reprogrammer import Reprogrammer, kernels
from tests.helpers import CLASSNAMES, tiny_clip, tiny_reprogrammer


def test_only_delta_and_text_embeddings_get_gradients():
    model = tiny_reprogrammer()
    model.train()
    model(torch.rand(4, 3, 13, 11)).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"image_delta", "token_rows", "text_positional"}
    assert all(not p.requires_grad for p in model.clip.parameters())
    assert not model.clip.training


def test_encode_text_at_init_equals_open_clip():
    model = tiny_reprogrammer()
    tokenizer_out = model.prompt_tokens
    expected = model.clip.encode_text(tokenizer_out, normalize=True)
    torch.testing.assert_close(model.encode_text(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.zs_text_features, expected, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_plain_reprogramming_and_alpha_one_is_zero_shot():
    model = tiny_reprogrammer().eval()
    with torch.no_grad():
        model.image_delta.normal_()
        model.token_rows.add_(torch.randn_like(model.token_rows))
    images = torch.rand(3, 3, 13, 11)
    scale = model.logit_scale
    with torch.no_grad():
        plain = scale * model.encode_image(images) @ model.encode_text().T
        resized = F.interpolate(images, size=(32, 32), mode="bicubic").clamp(0, 1)
        mean = torch.tensor(model.mean).view(1, 3, 1, 1)
        std = torch.tensor(model.std).view(1, 3, 1, 1)
        zero_shot = scale * model.clip.encode_image((resized - mean) / std, normalize=True) @ \
            model.clip.encode_text(model.prompt_tokens, normalize=True).T
        model.alpha = 0.0
        torch.testing.assert_close(model(images), plain, rtol=1e-5, atol=1e-5)
        model.alpha = 1.0
        torch.testing.assert_close(model(images), zero_shot, rtol=1e-5, atol=1e-4)
        model.alpha = 0.4
        assert not torch.allclose(model(images), plain, atol=1e-3)


def test_learned_state_round_trip_and_mismatch_errors():
    a, b = tiny_reprogrammer(seed=0), tiny_reprogrammer(seed=1)
    b.load_learned_state(a.learned_state())
    images = torch.rand(2, 3, 13, 11)
    assert torch.equal(a.image_delta, b.image_delta)
    clip, tokenizer = tiny_clip()
    other_classes = Reprogrammer(clip, tokenizer, ["a", "b", "c", "d", "e"], up_resolution=20, mr_resolution=11)
    with pytest.raises(ValueError, match="class set|prompts"):
        other_classes.load_learned_state(a.learned_state())
    text_only = tiny_reprogrammer(image=False)
    with pytest.raises(ValueError, match="does not fit"):
        text_only.load_learned_state(a.learned_state())
    del images


def _open_clip_image_features(model, images):
    """open_clip's own image path: bicubic resize to the canvas, clamp, normalise, `encode_image`."""
    resized = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.mean, model.std))
    return model.clip.encode_image((resized - mean) / std)


def test_image_only_and_text_only_variants_freeze_the_other_side():
    images = torch.rand(2, 3, 13, 11)
    text_only = tiny_reprogrammer(image=False)
    assert text_only.image_delta is None
    image_only = tiny_reprogrammer(text=False)
    assert not image_only.token_rows.requires_grad and not image_only.text_positional.requires_grad
    assert image_only.image_delta.requires_grad
    for model in (text_only, image_only):  # one training step with everything that can learn
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1.0)
        model(images).logsumexp(-1).sum().backward()
        optimizer.step()
        model.eval()
    with torch.no_grad():
        # The frozen side is open_clip's zero-shot model, computed along open_clip's own code path.
        torch.testing.assert_close(text_only.image_features(images), _open_clip_image_features(text_only, images),
                                   rtol=1e-5, atol=1e-5)
        zero_shot_text = image_only.clip.encode_text(image_only.prompt_tokens, normalize=True)
        torch.testing.assert_close(image_only.encode_text(), zero_shot_text, rtol=1e-5, atol=1e-6)
        # ... while the learning side moved away from it.
        assert not torch.allclose(text_only.encode_text(),
                                  text_only.clip.encode_text(text_only.prompt_tokens, normalize=True), atol=1e-4)
        assert not torch.allclose(image_only.image_features(images), _open_clip_image_features(image_only, images),
                                  atol=1e-4)


@pytest.mark.parametrize("images, match", [
    (torch.rand(2, 3, 13, 11) * 2, r"\[0, 1\]"),
    (torch.rand(2, 3, 13, 11) - 0.5, r"\[0, 1\]"),
    (torch.rand(2, 4, 13, 11), "RGB"),
])
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        tiny_reprogrammer()(images)


@pytest.mark.parametrize("kwargs, match", [
    ({"mr_resolution": 33}, "mr_resolution"),
    ({"up_resolution": 40}, "up_resolution"),
    ({"template": "a photo"}, "template"),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_reprogrammer(**kwargs)


def test_non_vit_tower_is_rejected():
    clip, tokenizer = tiny_clip()
    clip.visual = torch.nn.Identity()
    with pytest.raises(TypeError, match="ViT image tower"):
        Reprogrammer(clip, tokenizer, CLASSNAMES)


def test_forward_uses_the_fused_path_equivalently():
    """The model's token path (kernel + class token + ln_pre) equals open_clip's own `_embeds`."""
    model = tiny_reprogrammer().eval()
    images = torch.rand(2, 3, 13, 11)
    with torch.no_grad():
        pert = model.perturbation()
        canvas = kernels.reprogram_image(images, pert, up_resolution=20, mean=model.mean, std=model.std)
        expected = model.clip.encode_image(canvas)
        torch.testing.assert_close(model.image_features(images), expected, rtol=1e-5, atol=1e-5)


def test_triton_backend_equals_torch_backend_in_the_full_model(monkeypatch):
    """The fused kernels (Triton interpreter on CPU, fp32) inside Reprogrammer, forward and backward."""
    model = tiny_reprogrammer(alpha=0.4)
    model.train()
    images = torch.rand(3, 3, 13, 11)
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with kernels.use_backend(backend):
            logits = model(images)
        logits.backward(torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)))
        results[backend] = (logits.detach(), model.image_delta.grad.clone(), model.token_rows.grad.clone())
    for ours, reference in zip(results["triton"], results["torch"]):
        # fp32 both ways; the kernels accumulate in another order than conv2d / matmul.
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())
