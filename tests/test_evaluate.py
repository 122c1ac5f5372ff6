import numpy as np
import torch

from reprogrammer import kernels
from reprogrammer.data import ArrayImageDataset
from reprogrammer.data.suites import EvalSets
from reprogrammer.evaluation.evaluate import EvalOptions, alpha_sweep, evaluate_classifier, reprogrammer_features
from tests.helpers import CLASSNAMES, tiny_reprogrammer


def _sets(seed=0):
    rng = np.random.default_rng(seed)

    def images(n):
        return rng.integers(0, 256, (n, 13, 11, 3), dtype=np.uint8)

    labelled = {name: ArrayImageDataset(name, images(n), rng.integers(0, 5, n), CLASSNAMES)
                for name, n in (("test", 11), ("shift", 7))}
    ood = ArrayImageDataset("noise", images(9), np.full(9, -1), [])
    return EvalSets(CLASSNAMES, labelled["test"], {"shift": labelled["shift"]}, {"noise": ood})


def _trained_model():
    model = tiny_reprogrammer().eval()
    with torch.no_grad():
        model.token_rows.add_(0.5 * torch.randn_like(model.token_rows))
        model.text_positional.add_(0.1 * torch.randn_like(model.text_positional))
    return model


def test_alpha_sweep_from_cached_features_equals_rerunning_the_model():
    model, sets = _trained_model(), _sets()
    options = EvalOptions(device=torch.device("cpu"), batch_size=4, progress=False)
    alphas = [0.0, 0.3, 0.4, 1.0]
    sweep = alpha_sweep(reprogrammer_features(model, sets, options), sets, alphas, options)
    for row, alpha in zip(sweep, alphas):
        model.alpha = alpha
        direct = evaluate_classifier(model, sets, options, "direct")
        assert row["alpha"] == alpha
        for key in ("id_accuracy", "id_top5", "ood_generalization"):
            assert row[key] == direct[key], (alpha, key)
        for metric, value in direct["ood_detection"]["noise"].items():
            np.testing.assert_allclose(row["ood_detection"]["noise"][metric], value, rtol=1e-5, atol=1e-6)


def test_the_alpha_sweep_scores_through_the_fused_op(monkeypatch):
    """Every residual row comes from `kernels.residual_scores` (Triton on CUDA where the backend
    allows), one call per set and alpha, not from re-scoring its logits."""
    model, sets = _trained_model(), _sets()
    options = EvalOptions(device=torch.device("cpu"), batch_size=8, progress=False)
    features = reprogrammer_features(model, sets, options)
    calls, fused = [], kernels.residual_scores
    monkeypatch.setattr(kernels, "residual_scores", lambda *args, **kw: calls.append(kw["alpha"]) or fused(*args, **kw))
    monkeypatch.setattr(kernels, "ood_scores", None)  # the per-logits scores are not called
    alpha_sweep(features, sets, [0.0, 0.4], options)
    assert calls == [0.0] * 3 + [0.4] * 3


def test_sweep_rows_differ_across_alpha():
    model, sets = _trained_model(), _sets(1)
    options = EvalOptions(device=torch.device("cpu"), batch_size=8, progress=False)
    features = reprogrammer_features(model, sets, options)
    logits = {alpha: features.logits(alpha)["test"] for alpha in (0.0, 0.5, 1.0)}
    assert not np.allclose(logits[0.0], logits[1.0])
    assert not np.allclose(logits[0.5], logits[1.0])


def test_eval_options_resolve_the_configured_device(monkeypatch):
    """`eval` picks this process's GPU as training does (resolve_device takes a local rank)."""
    from reprogrammer.config import load_config
    from reprogrammer.evaluation import run_eval

    seen = []
    monkeypatch.setattr(run_eval, "resolve_device", lambda *args: seen.append(args) or torch.device("cpu"))
    options = run_eval.eval_options(load_config(None, ("train.device=cuda",)))
    assert options.device == torch.device("cpu") and seen == [("cuda",)]
