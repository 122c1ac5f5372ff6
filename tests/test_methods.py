from copy import deepcopy
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from reprogrammer.methods import METHODS, MethodConfig, build_method
from reprogrammer.methods.coop import CoOpClassifier
from reprogrammer.methods.finetune import fine_tune_optimizer
from reprogrammer.methods.linear import linear_probe_optimizer, step_decay, step_scheduled
from reprogrammer.methods.reprogramming import ReprogrammerClassifier
from tests.helpers import CLASSNAMES, tiny_clip

BASELINES = ["zero-shot", "linear-probe", "fine-tune", "lp-ft", "wise-ft", "coop"]
TRAINED = BASELINES[1:]
STEPS = 8


def config(name, **kwargs):
    # lr 1e-3 for the fine-tuning family: the authors' 3e-5 barely moves a random tiny model in a few steps.
    settings = dict(lr=1e-3 if name in ("fine-tune", "lp-ft", "wise-ft") else None, warmup_steps=2, n_ctx=4)
    return MethodConfig(name=name, **{**settings, **kwargs})


@cache
def _tiny_clip(seed):
    return tiny_clip(seed)


def fresh_clip(seed=0):
    """A private copy of the tiny CLIP (building one, tokenizer included, is the slow part of these tests)."""
    clip, tokenizer = _tiny_clip(seed)
    torch.manual_seed(seed)
    return deepcopy(clip), tokenizer


def build(name, seed=0, classnames=CLASSNAMES, **kwargs):
    clip, tokenizer = fresh_clip(seed)
    return build_method(clip, tokenizer, classnames, config(name, **kwargs))


def batch(seed=3, n=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 23, 17, generator=generator), torch.randint(0, len(CLASSNAMES), (n,), generator=generator)


def train(classifier, images, labels, steps=STEPS):
    """The engine's loop on one batch; returns the classifier in eval mode and the losses."""
    optimizers, schedulers = classifier.make_optimizers(steps)
    losses = []
    classifier.train()
    for _ in range(steps):
        loss = classifier.loss(images, labels)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        losses.append(loss.item())
    return classifier.eval(), losses


@pytest.fixture(scope="module")
def trained():
    """Each trained method once, on one fixed batch: `{name: (classifier, losses)}`."""
    images, labels = batch()
    return {name: train(build(name), images, labels) for name in TRAINED}


def zero_shot_reference(clip, tokenizer, images):
    """`s * cos` of open_clip's own encoders under standard preprocessing, computed by hand."""
    resized = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    image_features = clip.encode_image((resized - mean) / std, normalize=True)
    text_features = clip.encode_text(tokenizer([f"a photo of a {c}" for c in CLASSNAMES]), normalize=True)
    return clip.logit_scale.exp() * image_features @ text_features.T


def test_registry_has_every_baseline():
    assert set(BASELINES) <= set(METHODS)


@pytest.mark.parametrize("name", TRAINED)
def test_training_lowers_the_loss(trained, name):
    _, losses = trained[name]
    assert losses[-1] < 0.95 * losses[0], losses


def test_zero_shot_matches_open_clip_and_frozen_reprogrammer():
    clip, tokenizer = fresh_clip()
    classifier = build_method(clip, tokenizer, CLASSNAMES, MethodConfig(name="zero-shot"))
    images, _ = batch(n=4)
    with torch.no_grad():
        expected = zero_shot_reference(clip, tokenizer, images)
        frozen = ReprogrammerClassifier(clip, tokenizer, CLASSNAMES, MethodConfig(), image=False, text=False)
        torch.testing.assert_close(classifier(images), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(classifier(images), frozen(images), rtol=1e-5, atol=1e-4)
    assert classifier.trainable is False
    assert classifier.make_optimizers(100) == ([], []) and classifier.learned_state() == {}
    assert not any(p.requires_grad for p in classifier.parameters())
    assert classifier.score_temperature == pytest.approx(0.01 * clip.logit_scale.exp().item())
    with pytest.raises(RuntimeError, match="nothing to train"):
        classifier.loss(images, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", ["fine-tune", "wise-ft"])
def test_fine_tune_head_starts_at_the_zero_shot_classifier(name):
    clip, tokenizer = fresh_clip()
    classifier = build_method(clip, tokenizer, CLASSNAMES, MethodConfig(name=name))
    scale = clip.logit_scale.exp()
    with torch.no_grad():
        text = clip.encode_text(tokenizer([f"a photo of a {c}" for c in CLASSNAMES]), normalize=True)
        torch.testing.assert_close(classifier.head.weight, scale * text)
        assert not classifier.head.bias.any()
        images, _ = batch(n=4)
        torch.testing.assert_close(classifier(images), zero_shot_reference(clip, tokenizer, images),
                                   rtol=1e-5, atol=1e-4)
    assert classifier.score_temperature == pytest.approx(0.01 * scale.item())


def test_score_temperatures():
    scale = fresh_clip()[0].logit_scale.exp().item()
    expected = {"linear-probe": 1.0, "lp-ft": 1.0, "fine-tune": 0.01 * scale, "wise-ft": 0.01 * scale,
                "coop": 0.01 * scale}
    assert {name: build(name).score_temperature for name in expected} == pytest.approx(expected)


def test_fine_tuning_leaves_the_callers_clip_untouched():
    clip, tokenizer = fresh_clip()
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    classifier = build_method(clip, tokenizer, CLASSNAMES, config("fine-tune"))
    train(classifier, *batch(n=4), steps=3)
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert not torch.equal(classifier.image_tower.visual.proj, clip.visual.proj)


def test_wise_ft_interpolates_between_zero_shot_and_fine_tuned(trained):
    classifier, _ = trained["wise-ft"]
    clip, tokenizer = fresh_clip()
    images, labels = batch(seed=7, n=4)
    finetuned_state = {k: v.clone() for k, v in classifier.learned_state().items()}
    with torch.no_grad():
        finetuned = classifier(images)
        # Independent midpoint: average the two endpoints' tensors by hand, load them into a fresh classifier.
        zero_shot_state = {f"visual.{k}": v for k, v in clip.visual.state_dict().items()}
        text = clip.encode_text(tokenizer([f"a photo of a {c}" for c in CLASSNAMES]), normalize=True)
        zero_shot_state.update({"head.weight": clip.logit_scale.exp() * text, "head.bias": torch.zeros(5)})
        midpoint = build("fine-tune")
        midpoint.load_learned_state({k: 0.3 * zero_shot_state[k] + 0.7 * v for k, v in finetuned_state.items()})

        classifier.set_wise_alpha(0.0)
        torch.testing.assert_close(classifier(images), zero_shot_reference(clip, tokenizer, images),
                                   rtol=1e-5, atol=1e-4)
        classifier.set_wise_alpha(0.7)
        torch.testing.assert_close(classifier(images), midpoint(images), rtol=1e-5, atol=1e-5)
        assert all(torch.equal(finetuned_state[k], v) for k, v in classifier.learned_state().items())
        with pytest.raises(RuntimeError, match="set_wise_alpha"):
            classifier.loss(images, labels)
        classifier.set_wise_alpha(1.0)
        assert torch.equal(classifier(images), finetuned)
    classifier.loss(images, labels)


@pytest.mark.parametrize("name, trained_prefixes", [
    ("linear-probe", ("head.",)),
    ("fine-tune", ("head.", "image_tower.visual.")),
    ("wise-ft", ("head.", "image_tower.visual.")),
    ("lp-ft", ("head.", "image_tower.visual.")),
    ("coop", ("context",)),
])
def test_only_the_intended_parameters_get_gradients(name, trained_prefixes):
    clip, tokenizer = fresh_clip()
    classifier = build_method(clip, tokenizer, CLASSNAMES, config(name)).train()
    classifier.loss(*batch(n=4)).backward()
    with_grad = {n for n, p in classifier.named_parameters() if p.grad is not None}
    expected = {n for n, _ in classifier.named_parameters() if n.startswith(trained_prefixes)}
    assert with_grad == expected and expected
    assert all(p.grad is None for p in clip.parameters())
    tower = classifier.image_tower
    assert tower.visual.training == tower.trainable == any(n.startswith("image_tower.") for n in expected)


def test_lp_ft_equals_a_linear_probe_run_then_a_fine_tuning_run():
    classifier = build("lp-ft", lp_epochs=15)
    assert classifier.default_epochs == 40
    reference = deepcopy(classifier).train()
    images, labels = batch(n=6)
    train(classifier, images, labels, steps=16)  # 15/40 of 16 steps: 6 of linear probing, then 10 of fine-tuning
    for optimizer, steps in ((linear_probe_optimizer(reference.head), 6),
                             (fine_tune_optimizer(reference, reference.cfg), 10)):
        scheduler = step_scheduled(optimizer, 2, steps)
        for _ in range(steps):
            reference.zero_grad(set_to_none=True)
            reference.loss(images, labels).backward()
            optimizer.step()
            scheduler.step()
    expected, got = reference.learned_state(), classifier.learned_state()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
    with pytest.raises(ValueError, match="steps"):
        build("lp-ft").make_optimizers(1)


@pytest.mark.parametrize("name", TRAINED)
def test_learned_state_round_trips_into_a_fresh_classifier(trained, name):
    classifier, _ = trained[name]
    fresh = build(name).eval()
    images, _ = batch(seed=11, n=4)
    with torch.no_grad():
        assert not torch.allclose(fresh(images), classifier(images))
        fresh.load_learned_state(classifier.learned_state())
        assert torch.equal(fresh(images), classifier(images))


def test_mismatched_learned_state_raises(trained):
    probe, _ = trained["linear-probe"]
    with pytest.raises(ValueError, match="missing"):
        build("fine-tune").load_learned_state(probe.learned_state())
    with pytest.raises(ValueError, match="shape"):
        build("linear-probe", classnames=CLASSNAMES[:3]).load_learned_state(probe.learned_state())
    with pytest.raises(ValueError, match="shape"):
        build("coop", n_ctx=5).load_learned_state(trained["coop"][0].learned_state())


def test_coop_prompts_hold_the_context_before_the_class_name():
    clip, tokenizer = fresh_clip()
    classifier = CoOpClassifier(clip, tokenizer, CLASSNAMES, config("coop"))
    n_ctx, x_id = 4, tokenizer.encode("X")[0]
    tokens = classifier.prompt_tokens
    assert classifier.context_start == 1 and (tokens[:, 1:1 + n_ctx] == x_id).all()
    # EOT pooling index: after SOS, the context and the tokens of "classname."
    eot = torch.tensor([1 + n_ctx + len(tokenizer.encode(f"{c}.")) for c in CLASSNAMES])
    assert torch.equal(tokens.argmax(-1), eot) and (tokens[torch.arange(5), eot] == tokenizer.eot_token_id).all()

    with torch.no_grad():
        embedded = classifier.prompt_embeddings_with_context()
        table = clip.token_embedding(tokens)
        assert torch.equal(embedded[:, 1:1 + n_ctx], classifier.context.expand(5, -1, -1))
        assert torch.equal(embedded[:, :1], table[:, :1]) and torch.equal(embedded[:, 1 + n_ctx:], table[:, 1 + n_ctx:])
        # With the context set to the placeholder's own embedding, the prompts are plain text again.
        classifier.context.copy_(clip.token_embedding.weight[x_id].expand(n_ctx, -1))
        torch.testing.assert_close(classifier.encode_text(), clip.encode_text(tokens, normalize=True),
                                   rtol=1e-5, atol=1e-6)


def test_coop_prompt_longer_than_the_context_length_raises():
    with pytest.raises(ValueError, match="context_length=16"):
        build("coop", n_ctx=14)
    with pytest.raises(ValueError, match="at least 1"):
        build("coop", n_ctx=0)


def test_step_schedule_multipliers():
    total = 100
    expected = {0: 1.0, 39: 1.0, 40: 0.5, 69: 0.5, 70: 0.2, 79: 0.2, 80: 0.1, 99: 0.1}
    assert {s: step_decay(s, 0, total) for s in expected} == expected
    assert [step_decay(s, 4, total) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.3)
    scheduler = step_scheduled(optimizer, 0, 10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.3] * 4 + [0.15] * 3 + [0.06] + [0.03] * 2)
    with pytest.raises(ValueError, match="warm-up"):
        step_scheduled(optimizer, 10, 10)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_takes_uint8_batches_as_the_engine_passes_them(name):
    """The engine and evaluation hand classifiers uint8 batches (runtime.to_device_images): each
    method must read them as pixels / 255, the same as the float batch."""
    clip, tokenizer = tiny_clip(0)
    cfg = MethodConfig(name=name, up_resolution=20, mr_resolution=11, n_ctx=4)
    classifier = build_method(clip, tokenizer, CLASSNAMES, cfg).eval()
    pixels = torch.randint(0, 256, (3, 3, 13, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        from_bytes, from_floats = classifier(pixels), classifier(pixels.double().div(255).float())
    # fp32 both ways: x * (1/255) and x / 255 differ by at most an ulp before the encoder.
    torch.testing.assert_close(from_bytes, from_floats, rtol=1e-4, atol=1e-4 * from_floats.abs().max().item())


def test_batches_reach_the_device_as_bytes():
    from reprogrammer.runtime import to_device_images

    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert to_device_images(pixels, torch.device("cpu")).dtype == torch.uint8
    floats = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    assert to_device_images(floats, torch.device("cpu")).dtype == torch.float32
