"""Metrics against brute-force threshold sweeps, scipy's Mann-Whitney U, torch ops and hand examples."""
import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from reprogrammer.evaluation.metrics import (
    OOD_METRIC_NAMES,
    energy_score,
    expected_calibration_error,
    max_logit_score,
    mcm_score,
    mean_ood_metrics,
    ood_metrics,
    per_class_accuracy,
    restrict_to_classes,
    roc_curve,
    topk_accuracy,
)

# ----------------------------------------------------------------------------- brute-force references

def brute_auroc(id_scores, ood_scores):
    diff = id_scores[:, None] - ood_scores[None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean()


def brute_average_precision(pos, neg):
    """Walk the distinct thresholds from the top, one boolean mask each."""
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(np.concatenate([pos, neg]))[::-1]:
        tp, fp = (pos >= t).sum(), (neg >= t).sum()
        recall = tp / pos.size
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
    return ap


def brute_detection_error(id_scores, ood_scores):
    candidates = np.r_[np.unique(np.concatenate([id_scores, ood_scores])), np.inf]
    errors = [(id_scores < t).sum() + (ood_scores >= t).sum() for t in candidates]
    return min(errors) / (id_scores.size + ood_scores.size)


def brute_fpr95(id_scores, ood_scores):
    threshold = sorted(id_scores.tolist())[round(0.05 * len(id_scores))]
    return sum(s > threshold for s in ood_scores.tolist()) / len(ood_scores)


def random_scores(rng, n_id, n_ood, tied):
    id_scores = rng.normal(1.0, 1.3, n_id)
    ood_scores = rng.normal(0.2, 0.9, n_ood)
    if tied:  # a handful of distinct values: every threshold is shared by both sets
        return np.round(id_scores * 2), np.round(ood_scores * 2)
    return id_scores, ood_scores


# ----------------------------------------------------------------------------- OOD metrics

@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_id,n_ood", [(37, 53), (101, 13), (7, 211)])
def test_ood_metrics_match_brute_force(n_id, n_ood, tied):
    rng = np.random.default_rng(n_id * 1000 + n_ood + tied)
    id_scores, ood_scores = random_scores(rng, n_id, n_ood, tied)
    got = ood_metrics(id_scores, ood_scores)
    assert set(got) == set(OOD_METRIC_NAMES)
    assert got["auroc"] == pytest.approx(brute_auroc(id_scores, ood_scores), abs=1e-12)
    u = mannwhitneyu(id_scores, ood_scores, alternative="two-sided").statistic
    assert got["auroc"] == pytest.approx(u / (n_id * n_ood), abs=1e-12)
    assert got["aupr_in"] == pytest.approx(brute_average_precision(id_scores, ood_scores), abs=1e-12)
    assert got["aupr_out"] == pytest.approx(brute_average_precision(-ood_scores, -id_scores), abs=1e-12)
    assert got["detection_error"] == pytest.approx(brute_detection_error(id_scores, ood_scores), abs=1e-12)
    assert got["fpr95"] == pytest.approx(brute_fpr95(id_scores, ood_scores), abs=1e-12)


def test_sklearn_documented_example():
    # sklearn's docstrings: y_true [0, 0, 1, 1], scores [0.1, 0.4, 0.35, 0.8] -> AP 0.8333, AUROC 0.75.
    got = ood_metrics([0.35, 0.8], [0.1, 0.4])
    assert got["aupr_in"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert got["auroc"] == pytest.approx(0.75)
    # Keeping >= 0.8 misses one ID and keeps no OOD: 1 error out of 4.
    assert got["detection_error"] == pytest.approx(0.25)


def test_fpr95_hand_examples():
    id_scores = np.arange(20.0)[::-1] + 0.5          # ascending: 0.5, 1.5, ...; index round(1.0) = 1 -> 1.5
    ood = np.array([1.5, 1.6, 0.2, 3.0, 1.4, 9.9, 1.5, 0.0])
    assert ood_metrics(id_scores, ood)["fpr95"] == pytest.approx(3 / 8)   # strictly above 1.5: 1.6, 3.0, 9.9
    # 30 ID scores: round(1.5) = 2 (round half to even), threshold = third smallest.
    id30 = np.arange(30.0)
    assert ood_metrics(id30, [1.5, 2.0, 2.5, 3.0])["fpr95"] == pytest.approx(2 / 4)
    # 10 ID scores: round(0.5) = 0, threshold = the smallest ID score.
    assert ood_metrics(np.arange(10.0), [-1.0, 0.0, 0.5, 4.0])["fpr95"] == pytest.approx(2 / 4)


def test_perfect_and_inverted_separation():
    rng = np.random.default_rng(3)
    id_scores, ood_scores = rng.uniform(2, 3, 41), rng.uniform(0, 1, 29)
    good = ood_metrics(id_scores, ood_scores)
    assert good == pytest.approx({"fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "detection_error": 0.0})
    bad = ood_metrics(ood_scores, id_scores)
    assert bad["auroc"] == pytest.approx(0.0) and bad["fpr95"] == pytest.approx(1.0)
    assert bad["detection_error"] == pytest.approx(29 / 70)   # best is to keep nothing: every ID missed


def test_torch_inputs_and_large_n():
    rng = np.random.default_rng(5)
    id_scores, ood_scores = rng.normal(0.5, 1, 300_001), rng.normal(0, 1, 199_999)
    from_numpy = ood_metrics(id_scores, ood_scores)
    from_torch = ood_metrics(torch.from_numpy(id_scores), torch.from_numpy(ood_scores))
    assert from_numpy == from_torch
    u = mannwhitneyu(id_scores, ood_scores, alternative="two-sided").statistic
    assert from_numpy["auroc"] == pytest.approx(u / (id_scores.size * ood_scores.size), rel=1e-9)


def test_roc_curve_endpoints_and_area():
    rng = np.random.default_rng(11)
    id_scores, ood_scores = random_scores(rng, 61, 47, tied=True)
    fpr, tpr = roc_curve(id_scores, ood_scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auroc(id_scores, ood_scores))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(2)
    id_scores, ood_scores = random_scores(rng, 400, 300, tied=False)
    first = ood_metrics(id_scores, ood_scores, bootstrap=60, seed=7)
    again = ood_metrics(id_scores, ood_scores, bootstrap=60, seed=7)
    other = ood_metrics(id_scores, ood_scores, bootstrap=60, seed=8)
    assert first == again and first["ci"] != other["ci"]
    assert set(first["ci"]) == set(OOD_METRIC_NAMES)
    for name in OOD_METRIC_NAMES:
        lo, hi = first["ci"][name]
        assert lo < hi and lo - 0.02 <= first[name] <= hi + 0.02


def test_bad_scores_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        ood_metrics([], [0.3])
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([0.1, np.nan], [0.3])


def test_mean_ood_metrics_is_a_plain_mean():
    a = {"fpr95": 0.2, "auroc": 0.9, "aupr_in": 0.8, "aupr_out": 0.7, "detection_error": 0.1, "ci": {}}
    b = {"fpr95": 0.6, "auroc": 0.7, "aupr_in": 0.4, "aupr_out": 0.5, "detection_error": 0.3}
    expected = {"fpr95": 0.4, "auroc": 0.8, "aupr_in": 0.6, "aupr_out": 0.6, "detection_error": 0.2}
    assert mean_ood_metrics({"svhn": a, "lsun": b}) == pytest.approx(expected)
    assert mean_ood_metrics([a, b]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="missing"):
        mean_ood_metrics([{"fpr95": 0.1}])


# ----------------------------------------------------------------------------- scores

def test_scores_match_torch():
    g = torch.Generator().manual_seed(0)
    cosines = torch.rand(23, 13, generator=g, dtype=torch.float64) * 0.4 - 0.1
    for t in (0.01, 1.0):
        expected_mcm = torch.softmax(cosines / t, 1).max(1).values.numpy()
        np.testing.assert_allclose(mcm_score(cosines, t), expected_mcm, rtol=1e-12)
        expected_energy = (t * torch.logsumexp(cosines / t, 1)).numpy()
        np.testing.assert_allclose(energy_score(cosines.numpy(), t), expected_energy, rtol=1e-12)
    np.testing.assert_array_equal(max_logit_score(cosines), cosines.max(1).values.numpy())
    # bf16 tensors convert too
    assert mcm_score(cosines.to(torch.bfloat16), 0.01).shape == (23,)


# ----------------------------------------------------------------------------- classification

def test_topk_accuracy_matches_torch_topk():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(97, 11, generator=g)
    labels = torch.randint(0, 11, (97,), generator=g)
    top5 = logits.topk(5, 1).indices
    expected = {1: (top5[:, 0] == labels).float().mean().item(),
                5: (top5 == labels[:, None]).any(1).float().mean().item()}
    assert topk_accuracy(logits, labels) == pytest.approx(expected)
    assert topk_accuracy(logits.numpy(), labels.numpy(), k=3).keys() == {3}


def test_topk_ties_break_towards_lower_index_like_argmax():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    labels = np.array([1, 1, 2])
    assert topk_accuracy(scores, labels, k=(1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    assert (scores.argmax(1) == labels).mean() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="k must lie"):
        topk_accuracy(scores, labels, k=4)


def test_per_class_accuracy():
    pred = np.array([0, 1, 1, 2, 2, 2, 0])
    labels = np.array([0, 1, 2, 2, 2, 0, 0])
    got = per_class_accuracy(pred, labels, num_classes=4)
    np.testing.assert_allclose(got[:3], [2 / 3, 1.0, 2 / 3])
    assert np.isnan(got[3])


def test_expected_calibration_error_hand_example():
    # 3 bins. Confidences 0.9 (right), 0.9 (wrong), 0.5 (right), 2/3 (wrong: closes the middle bin).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [1 / 3, 2 / 3]])
    labels = np.array([0, 1, 0, 0])
    # bin (1/3, 2/3]: acc 1/2, conf (0.5 + 2/3)/2; bin (2/3, 1]: acc 1/2, conf 0.9.
    expected = 2 / 4 * abs(0.5 - (0.5 + 2 / 3) / 2) + 2 / 4 * abs(0.5 - 0.9)
    assert expected_calibration_error(probs, labels, n_bins=3) == pytest.approx(expected)
    perfect = np.eye(5)[[0, 3, 2, 2, 4]]
    assert expected_calibration_error(perfect, np.array([0, 3, 2, 2, 4])) == pytest.approx(0.0)


def test_restrict_to_classes():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(9, 17))
    subset = np.array([2, 5, 11, 16])
    labels = subset[rng.integers(0, 4, 9)]
    sub_logits, sub_labels = restrict_to_classes(torch.from_numpy(logits), labels, subset)
    for row in range(9):
        assert list(sub_logits[row]) == [logits[row, c] for c in subset]
        assert subset[sub_labels[row]] == labels[row]
    with pytest.raises(ValueError, match=r"labels \[3\] are not among"):
        restrict_to_classes(logits[:3], np.array([2, 3, 16]), subset)
