"""Cached text features (`Reprogrammer.text_features`): the text tower runs once per set of
prompt parameters at inference, and never serves features of parameters that have changed."""
import torch
import torch.nn.functional as F

from reprogrammer.methods import MethodConfig, build_method
from reprogrammer.methods.reprogramming import ReprogrammerClassifier
from reprogrammer.training.distributed import DistInfo
from reprogrammer.training.engine import evaluate_accuracy
from reprogrammer.methods.optim import reprogrammer_optimizers
from tests.engine_data import colour_dataset
from tests.helpers import tiny_clip, tiny_reprogrammer


class TextTowerRuns:
    """Counts forward passes of a model's text transformer."""

    def __init__(self, model):
        self.count = 0
        model.clip.transformer.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def fresh_logits(model, images):
    """Logits of a newly built model holding `model`'s current learned tensors: nothing cached."""
    other = tiny_reprogrammer(alpha=model.alpha).eval()
    other.load_learned_state(model.learned_state())
    with torch.no_grad():
        return other(images)


def test_inference_encodes_text_once_and_training_every_call():
    model = tiny_reprogrammer(alpha=0.4).eval()
    runs = TextTowerRuns(model)
    images = torch.rand(3, 3, 13, 11)
    with torch.no_grad():
        first = model(images)
        for _ in range(3):
            assert torch.equal(model(images), first)
    assert runs.count == 1
    model.train()
    model(images).sum().backward()
    model(images).sum().backward()
    assert runs.count == 3


def test_in_place_changes_of_prompt_parameters_reach_the_next_call():
    model = tiny_reprogrammer(alpha=0.4).eval()
    images = torch.rand(2, 3, 13, 11)
    with torch.no_grad():
        before = model(images)
        model.token_rows.add_(torch.randn_like(model.token_rows))
        after_rows = model(images)
        model.text_positional.mul_(1.5)
        after_positional = model(images)
    assert not torch.allclose(before, after_rows, atol=1e-3)
    torch.testing.assert_close(after_positional, fresh_logits(model, images))
    assert not torch.allclose(after_rows, after_positional, atol=1e-3)


def test_optimiser_steps_between_calls_invalidate_the_cache():
    model = tiny_reprogrammer(alpha=0.4)
    optimizers = reprogrammer_optimizers(model, text_lr=0.05)
    images = torch.rand(4, 3, 13, 11)
    for _ in range(2):
        model.train()
        model(images).logsumexp(-1).sum().backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(images), fresh_logits(model, images))


def test_load_state_dict_and_alpha_changes_reach_the_next_call():
    model = tiny_reprogrammer(alpha=0.4).eval()
    images = torch.rand(2, 3, 13, 11)
    with torch.no_grad():
        model(images)
        trained = tiny_reprogrammer(alpha=0.4)
        trained.token_rows.add_(torch.randn_like(trained.token_rows))
        trained.text_positional.add_(torch.randn_like(trained.text_positional))
    model.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images), fresh_logits(model, images))
        model.alpha = 0.8
        torch.testing.assert_close(model(images), fresh_logits(model, images))


def test_text_features_equal_encode_text_under_autocast_changes():
    model = tiny_reprogrammer().eval()
    with torch.no_grad():
        plain = model.text_features()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.text_features()
            torch.testing.assert_close(low, model.encode_text())
        assert low.dtype == torch.bfloat16 or not torch.equal(low, plain)
        torch.testing.assert_close(model.text_features(), plain)


def test_the_paired_image_pass_equals_two_separate_passes():
    model = tiny_reprogrammer(alpha=0.4).eval()
    images = torch.rand(5, 3, 13, 11)
    with torch.no_grad():
        model.image_delta.normal_()
        rp, zs = model.image_feature_pair(images)
        torch.testing.assert_close(rp, model.image_features(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(zs, model.zero_shot_image_features(images), rtol=1e-5, atol=1e-5)


def test_validation_with_1000_classes_runs_the_text_tower_once():
    clip, tokenizer = tiny_clip()
    classnames = [f"class {i}" for i in range(1000)]
    model = ReprogrammerClassifier(clip, tokenizer, classnames, MethodConfig(up_resolution=20, mr_resolution=11))
    runs = TextTowerRuns(model)
    val = colour_dataset(40, seed=3)
    accuracy = evaluate_accuracy(model, val, 8, torch.device("cpu"), "fp32", DistInfo())
    assert 0.0 <= accuracy <= 1.0
    assert runs.count == 1
    assert model.training


def test_coop_encodes_its_prompts_once_per_context_at_inference():
    clip, tokenizer = tiny_clip()
    coop = build_method(clip, tokenizer, ["cat", "dog", "red star"], MethodConfig(name="coop", n_ctx=4)).eval()
    runs = TextTowerRuns(coop)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = coop(images)
        assert torch.equal(coop(images), before) and runs.count == 1
        coop.context.add_(torch.randn_like(coop.context))
        after = coop(images)
        expected = coop.logit_scale * F.normalize(coop.image_tower(images), dim=-1) @ coop.encode_text().T
    assert runs.count == 3  # the changed context re-encoded once, plus the oracle's own encode_text
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(after, before, atol=1e-3)
