"""The built-in default's report over seeds, and the feature-drift diagnostic."""
import copy

import pytest
import torch
import torch.nn.functional as F

from reprogrammer.data.images import ArrayImageDataset
from reprogrammer.evaluation.drift import feature_drift, frozen_features
from reprogrammer.evaluation.evaluate import EvalOptions
from reprogrammer.methods import build_method
from reprogrammer.config import MethodConfig
from reprogrammer.shapeworld import seed_report

from .helpers import CLASSNAMES, tiny_clip, tiny_reprogrammer


def _result(id_acc, texture, fpr, auroc, drift):
    return {"id_accuracy": id_acc, "ood_generalization": {"texture": texture, "sketch": 0.5},
            "ood_generalization_mean": (texture + 0.5) / 2,
            "ood_detection": {"shapes": {"fpr95": fpr, "auroc": auroc, "aupr_in": 0.5}},
            "ood_detection_mean": {"fpr95": fpr, "auroc": auroc},
            "feature_drift": {"texture": drift, "mean": drift}}


def test_every_cell_gets_mean_and_sample_spread():
    per_seed = {1: {"fine-tune": _result(0.9, 0.4, 0.8, 0.6, 0.5)},
                2: {"fine-tune": _result(0.7, 0.6, 0.6, 0.8, 0.7)},
                3: {"fine-tune": _result(0.8, 0.5, 0.7, 0.7, 0.6)}}
    cells = seed_report.aggregate(per_seed)["fine-tune"]
    # Hand-computed: values v, v + 0.1, v - 0.1 (in some order) have mean v and sample std 0.1.
    for c, mean in ((cells["id_accuracy"], 0.8), (cells["ood_generalization"]["texture"], 0.5),
                    (cells["ood_detection"]["shapes"]["fpr95"], 0.7), (cells["ood_detection_mean"]["auroc"], 0.7),
                    (cells["feature_drift"]["texture"], 0.6)):
        assert c["mean"] == pytest.approx(mean) and c["std"] == pytest.approx(0.1) and len(c["values"]) == 3
    assert cells["ood_generalization"]["sketch"]["std"] == 0.0
    assert cells["ood_generalization_mean"]["mean"] == pytest.approx(0.5)
    text = seed_report.markdown("T", "N", [1, 2, 3], {"fine-tune": cells},
                                {"model": "M", "zero_shot_accuracy": {"id": 0.9}})
    assert "| fine-tune | 80.0 ± 10.0 | 50.0 ± 10.0 | 50.0 ± 0.0 | 50.0 ± 5.0 |" in text
    assert "| fine-tune | 0.600 ± 0.100 | 0.600 ± 0.100 |" in text


def test_one_seed_has_no_spread_and_mismatched_seeds_are_refused():
    cells = seed_report.aggregate({1: {"lp": _result(0.9, 0.4, 0.8, 0.6, 0.5)}})["lp"]
    assert cells["id_accuracy"] == {"mean": 0.9, "std": None, "values": [0.9]}
    with pytest.raises(ValueError, match="methods"):
        seed_report.aggregate({1: {"lp": _result(0.9, 0.4, 0.8, 0.6, 0.5)}, 2: {}})


# ---------------------------------------------------------------------------------------------
# Feature drift
# ---------------------------------------------------------------------------------------------
OPTIONS = EvalOptions(device=torch.device("cpu"), batch_size=7, progress=False)


def _sets():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 19, 16, 16, 3), generator=g, dtype=torch.uint8).numpy()
    return {name: ArrayImageDataset(name, x, torch.zeros(19, dtype=torch.long).numpy(), CLASSNAMES)
            for name, x in zip(("test", "sketch"), images)}


def _features(tower, dataset):
    x = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return F.normalize(tower(x), dim=-1)


def test_frozen_methods_do_not_move_and_a_changed_tower_moves_by_its_cosine():
    clip, tokenizer = tiny_clip()
    sets = _sets()
    zero_shot = build_method(copy.deepcopy(clip), tokenizer, CLASSNAMES, MethodConfig(name="zero-shot"))
    reference = frozen_features(zero_shot, sets, OPTIONS)
    probe = build_method(copy.deepcopy(clip), tokenizer, CLASSNAMES, MethodConfig(name="linear-probe"))
    assert feature_drift(probe, reference, sets, OPTIONS)["linear-probe"]["mean"] == pytest.approx(1.0, abs=1e-6)

    tuned = build_method(copy.deepcopy(clip), tokenizer, CLASSNAMES, MethodConfig(name="fine-tune"))
    with torch.no_grad():
        tuned.image_tower.visual.proj.add_(0.05 * torch.randn_like(tuned.image_tower.visual.proj))
    drift = feature_drift(tuned, reference, sets, OPTIONS)["fine-tune"]
    for name, dataset in sets.items():  # oracle: the towers run directly, without the evaluator
        expected = (_features(tuned.image_tower, dataset) * _features(zero_shot.image_tower, dataset)).sum(-1).mean()
        assert drift[name] == pytest.approx(expected.item(), abs=1e-5)
        assert drift[name] < 0.999
    assert drift["mean"] == pytest.approx((drift["test"] + drift["sketch"]) / 2)


def test_reprogrammer_drift_comes_from_its_perturbation_and_the_residual_blend_moves_less():
    model = tiny_reprogrammer(up_resolution=32, mr_resolution=20)
    clip, tokenizer = tiny_clip()
    zero_shot = build_method(clip, tokenizer, CLASSNAMES, MethodConfig(name="zero-shot"))
    sets = _sets()
    reference = frozen_features(zero_shot, sets, OPTIONS)
    with torch.no_grad():
        model.image_delta.zero_()  # tanh(0) = 0: no perturbation
    unchanged = feature_drift(model, reference, sets, OPTIONS, residual_alpha=0.4)
    assert unchanged["reprogrammer"]["mean"] == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        model.image_delta.normal_(generator=torch.Generator().manual_seed(1))
    moved = feature_drift(model, reference, sets, OPTIONS, residual_alpha=0.4)
    assert moved["reprogrammer"]["mean"] < 0.999
    assert moved["reprogrammer"]["mean"] < moved["residual-reprogrammer"]["mean"] < 1.0
