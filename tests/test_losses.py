import math

import torch

from reprogrammer.methods.losses import contrastive_focal_loss, focal_loss
from reprogrammer.training.optim import warmup_cosine
from tests.helpers import tiny_reprogrammer


def test_focal_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 3
    target = torch.randint(0, 5, (7,), generator=g)
    p = torch.softmax(logits.double(), -1)
    onehot = torch.nn.functional.one_hot(target, 5).double()
    expected = ((onehot + 1e-7) * (-0.8 * (1 - p) ** 4.0 * torch.log(p))).sum(-1).mean()
    torch.testing.assert_close(focal_loss(logits, target).double(), expected, rtol=1e-5, atol=1e-7)


def test_unique_prompt_loss_equals_n_prompt_loss_in_value_and_gradients():
    model = tiny_reprogrammer()
    images = torch.rand(9, 3, 13, 11)
    labels = torch.tensor([3, 1, 3, 0, 4, 1, 1, 0, 3])
    scale = model.logit_scale

    def grads(loss):
        params = [model.image_delta, model.token_rows, model.text_positional]
        return torch.autograd.grad(loss, params)

    image_features = model.encode_image(images)
    classes, inverse = labels.unique(return_inverse=True)
    unique = contrastive_focal_loss(image_features, model.encode_text(classes), inverse, scale)
    unique_grads = grads(unique)
    image_features = model.encode_image(images)
    full = contrastive_focal_loss(image_features, model.encode_text(labels), torch.arange(9), scale)
    full_grads = grads(full)
    torch.testing.assert_close(unique, full)
    for a, b in zip(unique_grads, full_grads):
        # fp32: the two versions sum the same terms in different orders.
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 500, 1000) == 1 / 500
    assert warmup_cosine(499, 500, 1000) == 1.0
    assert warmup_cosine(500, 500, 1000) == 1.0
    assert math.isclose(warmup_cosine(750, 500, 1000), 0.5)
    assert math.isclose(warmup_cosine(1000, 500, 1000), 0.0, abs_tol=1e-12)
