import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reprogrammer.methods.losses import contrastive_focal_loss, focal_loss
from reprogrammer.methods.optim import check_schedule, reprogrammer_optimizers, scheduled, warmup_cosine
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


def test_focal_loss_keeps_the_eps_term_on_confident_logits():
    # Confident, correct logits leave almost nothing but the eps-weighted wrong classes:
    # p_wrong = e^-30 / (1 + 3 e^-30), each contributing eps * alpha * (1 - p)^4 * (-log p).
    logits = np.array([[30.0, 0.0, 0.0, 0.0], [0.0, 0.0, 25.0, 0.0]])
    target = np.array([0, 2])
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    p = np.exp(log_p)
    onehot = np.eye(4)[target]
    expected = ((onehot + 1e-7) * (-0.8 * (1 - p) ** 4 * log_p)).sum(-1).mean()
    assert expected > 5e-6  # the eps term: without it the loss is ~1e-40
    actual = focal_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(target)).item()
    assert actual == pytest.approx(expected, rel=1e-4)
    gamma2 = ((onehot + 1e-3) * (-0.5 * (1 - p) ** 2 * log_p)).sum(-1).mean()
    actual = focal_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(target), alpha=0.5, gamma=2.0,
                        eps=1e-3).item()
    assert actual == pytest.approx(gamma2, rel=1e-4)


def test_focal_loss_sums_classes_over_the_last_dimension_of_any_batch_shape():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((2, 3, 5)) * 3  # classes last; sum over them, mean over the rest
    target = rng.integers(0, 5, (2, 3))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = ((np.eye(5)[target] + 1e-7) * (-0.8 * (1 - np.exp(log_p)) ** 4 * log_p)).sum(-1).mean()
    actual = focal_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(target)).item()
    assert actual == pytest.approx(expected, rel=1e-5)


def test_contrastive_focal_loss_is_the_mean_of_both_directions():
    rng = np.random.default_rng(3)
    image = rng.standard_normal((5, 4))
    text = rng.standard_normal((3, 4))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    classes = np.array([2, 0, 2, 1, 0])
    logits = 7.0 * image @ text[classes].T

    def focal(z, alpha=0.8, gamma=4.0, eps=1e-7):
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
        weight = np.eye(len(z)) + eps
        return (weight * (-alpha * (1 - np.exp(log_p)) ** gamma * log_p)).sum(-1).mean()

    expected = 0.5 * (focal(logits) + focal(logits.T))
    inputs = (torch.tensor(image, dtype=torch.float32), torch.tensor(text, dtype=torch.float32), torch.tensor(classes),
              torch.tensor(7.0))
    assert contrastive_focal_loss(*inputs).item() == pytest.approx(expected, rel=1e-5)
    # The focal settings reach both directions.
    settings = dict(alpha=0.5, gamma=2.0, eps=1e-3)
    expected = 0.5 * (focal(logits, **settings) + focal(logits.T, **settings))
    assert contrastive_focal_loss(*inputs, **settings).item() == pytest.approx(expected, rel=1e-5)


def test_schedule_edges():
    assert warmup_cosine(0, 0, 10) == 1.0
    assert warmup_cosine(5, 0, 10) == pytest.approx(0.5)
    assert warmup_cosine(9, 9, 10) == 1.0
    assert warmup_cosine(1, 2, 2) == 1.0  # inside the warm-up even when it is all of training
    check_schedule(9, 10)
    check_schedule(0, 1)
    with pytest.raises(ValueError, match=r"warm-up \(10 steps\) is not shorter than training \(10 steps\); lower "
                                         "method.warmup_steps or train longer"):
        check_schedule(10, 10)
    with pytest.raises(ValueError, match="training has 0 steps"):
        check_schedule(0, 0)
    with pytest.raises(ValueError, match="at least one epoch"):
        check_schedule(0, -1)


def test_the_scheduler_applies_the_schedule_before_each_step():
    # warm-up 2 of 6 steps: multipliers 1/2, 2/2, then 0.5 (1 + cos(pi k / 4)) for k = 0..3.
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.2)
    scheduler = scheduled(optimizer, 2, 6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.2 * m for m in expected], abs=1e-12)
    with pytest.raises(ValueError, match="warm-up"):
        scheduled(optimizer, 6, 6)


def _learned(image=True, text=True):
    """What `reprogrammer_optimizers` reads of a Reprogrammer: its three learned tensors."""
    delta = torch.nn.Parameter(torch.zeros(3, 4, 4)) if image else None
    rows, positional = (torch.nn.Parameter(torch.zeros(n, 4), requires_grad=text) for n in (5, 7))
    return SimpleNamespace(image_delta=delta, token_rows=rows, text_positional=positional)


def test_reprogrammer_optimizers_are_the_authors():
    model = _learned()
    image, text = reprogrammer_optimizers(model, image_lr=0.1, text_lr=0.01, weight_decay=0.5)
    assert type(image) is torch.optim.Adam and type(text) is torch.optim.AdamW
    assert len(image.param_groups) == 1 and image.param_groups[0]["params"] == [model.image_delta]
    group = image.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.1, (0.9, 0.999), 1e-8, 0.5)
    assert len(text.param_groups) == 1
    assert [id(p) for p in text.param_groups[0]["params"]] == [id(model.token_rows), id(model.text_positional)]
    group = text.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.01, (0.9, 0.98), 1e-6, 0.5)
    defaults = reprogrammer_optimizers(model)
    assert [o.param_groups[0]["lr"] for o in defaults] == [5e-3, 5e-4]
    assert [o.param_groups[0]["weight_decay"] for o in defaults] == [0.1, 0.1]
    assert [type(o) for o in reprogrammer_optimizers(_learned(image=False))] == [torch.optim.AdamW]
    assert [type(o) for o in reprogrammer_optimizers(_learned(text=False))] == [torch.optim.Adam]
    frozen = _learned()
    frozen.image_delta.requires_grad_(False)
    assert [type(o) for o in reprogrammer_optimizers(frozen)] == [torch.optim.AdamW]
