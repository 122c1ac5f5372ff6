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

def test_scores_match_a_float64_numpy_oracle():
    """The scores are the kernels' one definition, in fp32: float64 numpy agrees to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    cosines = torch.rand(23, 13, generator=g, dtype=torch.float64) * 0.4 - 0.1
    c = cosines.numpy()
    for t in (0.01, 1.0):
        z = c / t
        top = z.max(1)
        expected_mcm = 1.0 / np.exp(z - top[:, None]).sum(1)
        expected_energy = t * (top + np.log(np.exp(z - top[:, None]).sum(1)))
        np.testing.assert_allclose(mcm_score(cosines, t), expected_mcm, rtol=1e-5)
        np.testing.assert_allclose(energy_score(c, t), expected_energy, rtol=1e-5)
    np.testing.assert_allclose(max_logit_score(cosines), c.max(1), rtol=1e-7)
    assert max_logit_score(np.ones((2, 3))).dtype == mcm_score(np.zeros((2, 4)), 1.0).dtype == np.float32
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


# ----------------------------------------------------------------------------- independent oracles, edge cases

from reprogrammer.evaluation.metrics import fpr95_threshold, to_numpy  # noqa: E402


def brute_threshold(id_scores):
    return sorted(float(s) for s in id_scores)[round(0.05 * len(id_scores))]


@pytest.mark.parametrize("n_id", [1, 9, 10, 11, 29, 30, 31, 50, 101])
def test_fpr95_threshold_matches_sorted_list(n_id):
    rng = np.random.default_rng(n_id)
    scores = rng.normal(size=n_id)
    assert fpr95_threshold(scores) == brute_threshold(scores)
    assert fpr95_threshold(torch.from_numpy(scores)) == brute_threshold(scores)
    ood = rng.normal(size=17)
    expected = sum(o > brute_threshold(scores) for o in ood.tolist()) / 17
    assert ood_metrics(scores, ood)["fpr95"] == pytest.approx(expected, abs=1e-15)


def test_fpr95_threshold_rejects_bad_scores():
    with pytest.raises(ValueError, match=r"^ID scores are empty: OOD metrics need at least one ID and one OOD score$"):
        fpr95_threshold([])
    with pytest.raises(ValueError, match=r"^ID scores contain NaN or infinite values; check the logits that produced them$"):
        fpr95_threshold([0.1, np.inf])


def test_score_validation_messages():
    with pytest.raises(ValueError, match=r"^OOD scores are empty: OOD metrics need at least one ID and one OOD score$"):
        ood_metrics([0.3], [])
    with pytest.raises(ValueError, match=r"^OOD scores contain NaN or infinite values; check the logits"):
        ood_metrics([0.3], [0.1, -np.inf])
    with pytest.raises(ValueError, match=r"^ID scores contain NaN"):
        roc_curve([np.nan], [0.1])
    with pytest.raises(ValueError, match=r"^bootstrap must be >= 0 resamples, got -1$"):
        ood_metrics([0.3, 0.4], [0.1], bootstrap=-1)


def test_multi_dim_scores_are_flattened():
    rng = np.random.default_rng(8)
    id_scores, ood_scores = rng.normal(1, 1, 24), rng.normal(0, 1, 12)
    flat = ood_metrics(id_scores, ood_scores)
    assert ood_metrics(id_scores.reshape(4, 6), ood_scores.reshape(3, 2, 2)) == flat
    assert flat["auroc"] == pytest.approx(brute_auroc(id_scores, ood_scores), abs=1e-12)


def test_float32_scores_are_computed_in_float64():
    # 1 + 2**-30 and 1 are distinct in float64; in float32 they tie.
    id_scores = torch.tensor([1.0 + 2.0**-30], dtype=torch.float64)
    ood_scores = np.array([1.0], dtype=np.float64)
    assert ood_metrics(id_scores, ood_scores)["auroc"] == 1.0


def brute_roc(id_scores, ood_scores):
    fprs, tprs = [0.0], [0.0]
    for t in sorted(set(id_scores) | set(ood_scores), reverse=True):
        tprs.append(sum(s >= t for s in id_scores) / len(id_scores))
        fprs.append(sum(s >= t for s in ood_scores) / len(ood_scores))
    return fprs, tprs


@pytest.mark.parametrize("case", range(4))
def test_roc_curve_matches_threshold_sweep_with_ties(case):
    rng = np.random.default_rng(100 + case)
    id_scores = rng.integers(0, 5, 3 + 4 * case).astype(float).tolist()
    ood_scores = rng.integers(-2, 3, 2 + 3 * case).astype(float).tolist()
    fpr, tpr = roc_curve(id_scores, ood_scores)
    bf, bt = brute_roc(id_scores, ood_scores)
    np.testing.assert_allclose(fpr, bf, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, bt, rtol=0, atol=1e-15)
    got = ood_metrics(id_scores, ood_scores)
    i, o = np.array(id_scores), np.array(ood_scores)
    assert got["auroc"] == pytest.approx(brute_auroc(i, o), abs=1e-12)
    assert got["aupr_in"] == pytest.approx(brute_average_precision(i, o), abs=1e-12)
    assert got["aupr_out"] == pytest.approx(brute_average_precision(-o, -i), abs=1e-12)
    assert got["detection_error"] == pytest.approx(brute_detection_error(i, o), abs=1e-12)


def test_ood_metrics_small_hand_cases():
    # One ID, one OOD, tied: AUROC 1/2; keep-all keeps the OOD, keep-nothing misses the ID.
    got = ood_metrics([1.0], [1.0])
    assert got == {"fpr95": 0.0, "auroc": 0.5, "aupr_in": 0.5, "aupr_out": 0.5, "detection_error": 0.5}
    got = ood_metrics([2.0, 3.0], [1.0])
    assert got == {"fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "detection_error": 0.0}
    # ID [1, 3], OOD [2]: sweep 3 -> P 1; 2 -> P 1/2 (recall 1/2 each step): AP = 1/2 + 1/2 * 2/3.
    got = ood_metrics([1.0, 3.0], [2.0])
    assert got["aupr_in"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-15)
    assert got["auroc"] == 0.5 and got["fpr95"] == 1.0
    assert got["detection_error"] == pytest.approx(1 / 3, abs=1e-15)
    # OOD positive with negated scores: -2 first (one OOD, no ID): AP 1.
    assert got["aupr_out"] == pytest.approx(brute_average_precision(np.array([-2.0]), np.array([-1.0, -3.0])))


def test_mean_ood_metrics_errors_and_values():
    with pytest.raises(ValueError, match=r"^no per-OOD-set metrics to average$"):
        mean_ood_metrics({})
    with pytest.raises(ValueError, match=r"^no per-OOD-set metrics to average$"):
        mean_ood_metrics([])
    full = dict.fromkeys(OOD_METRIC_NAMES, 0.5)
    partial = {k: 0.1 for k in OOD_METRIC_NAMES if k != "auroc"}
    with pytest.raises(ValueError, match=r"missing \['auroc'\]$"):
        mean_ood_metrics([full, partial])
    with pytest.raises(ValueError, match=r"^every per-set dict needs the metrics "):
        mean_ood_metrics({"a": partial})
    got = mean_ood_metrics([full, dict.fromkeys(OOD_METRIC_NAMES, 0.25), dict.fromkeys(OOD_METRIC_NAMES, 0.0)])
    assert got == {k: 0.25 for k in OOD_METRIC_NAMES}
    assert all(type(v) is float for v in got.values())


# ----------------------------------------------------------------------------- conversion and validation

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_numpy_half_precision_is_lossless_float32(dtype):
    t = torch.tensor([0.1, -3.5, 1e-3, 7.0], dtype=dtype)
    out = to_numpy(t)
    assert out.dtype == np.float32
    assert out.tolist() == [float(v) for v in t.tolist()]


def test_to_numpy_keeps_wide_and_integer_dtypes():
    assert to_numpy(torch.tensor([0.1], dtype=torch.float64)).dtype == np.float64
    assert to_numpy(torch.tensor([0.1], dtype=torch.float64)).tolist() == [0.1]
    assert to_numpy(torch.tensor([0.5], dtype=torch.float32)).dtype == np.float32
    assert to_numpy(torch.tensor([3], dtype=torch.int16)).dtype == np.int16
    assert to_numpy(torch.tensor([3], dtype=torch.uint8)).dtype == np.uint8
    grad = torch.tensor([1.0, 2.0], requires_grad=True)
    assert to_numpy(grad * 2).tolist() == [2.0, 4.0]
    assert to_numpy([[1, 2]]).shape == (1, 2)


def test_logits_and_labels_validation_messages():
    with pytest.raises(ValueError, match=r"^expected a \[N, C\] array of per-class scores with C >= 1, got shape \(3,\)$"):
        topk_accuracy(np.ones(3), np.zeros(3, dtype=int), k=1)
    with pytest.raises(ValueError, match=r"got shape \(2, 0\)$"):
        expected_calibration_error(np.ones((2, 0)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 3\)$"):
        mcm_score(np.ones((1, 2, 3)), 1.0)
    with pytest.raises(ValueError, match=r"^expected 2 integer labels of shape \[2\], got dtype float64 shape \(2,\)$"):
        topk_accuracy(np.ones((2, 3)), np.zeros(2), k=1)
    with pytest.raises(ValueError, match=r"^expected 2 integer labels of shape \[2\], got dtype int64 shape \(3,\)$"):
        topk_accuracy(np.ones((2, 3)), np.zeros(3, dtype=np.int64), k=1)
    with pytest.raises(ValueError, match=r"got dtype int64 shape \(2, 1\)$"):
        per_class_accuracy(np.zeros(2, dtype=int), np.zeros((2, 1), dtype=np.int64), 3)
    # 1 x 1 logits are a valid [N, C] array
    assert topk_accuracy(np.ones((1, 1)), np.zeros(1, dtype=int), k=1) == {1: 1.0}


# ----------------------------------------------------------------------------- top-k

def brute_topk(scores, labels, k):
    hits = 0
    for row, label in zip(scores.tolist(), labels.tolist()):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))   # stable: ties to the lower index
        hits += label in order[:k]
    return hits / len(labels)


@pytest.mark.parametrize("seed", range(3))
def test_topk_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (40, 6)).astype(np.float32)   # many ties
    labels = rng.integers(0, 6, 40).astype(np.int32)
    got = topk_accuracy(torch.from_numpy(scores), torch.from_numpy(labels), k=[1, 2, 3, 6])
    assert got == {k: pytest.approx(brute_topk(scores, labels, k), abs=1e-15) for k in (1, 2, 3, 6)}
    assert got[6] == 1.0


def test_topk_validation():
    scores, labels = np.zeros((2, 3)), np.array([0, 2])
    assert topk_accuracy(scores, labels, k=3) == {3: 1.0}
    assert topk_accuracy(scores, labels, k=1) == {1: 0.5}
    with pytest.raises(ValueError, match=r"^every k must lie in \[1, 3\] \(the number of classes\), got \(4,\)$"):
        topk_accuracy(scores, labels, k=4)
    with pytest.raises(ValueError, match=r"got \(0,\)$"):
        topk_accuracy(scores, labels, k=0)
    with pytest.raises(ValueError, match=r"got \(\)$"):
        topk_accuracy(scores, labels, k=[])
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 3\), got range \[0, 3\]$"):
        topk_accuracy(scores, np.array([0, 3]), k=1)
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 3\), got range \[-1, 2\]$"):
        topk_accuracy(scores, np.array([-1, 2]), k=1)
    empty = topk_accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int), k=(1, 2))
    assert list(empty) == [1, 2] and all(np.isnan(v) for v in empty.values())


# ----------------------------------------------------------------------------- per-class accuracy

def test_per_class_accuracy_brute_force_absent_classes():
    rng = np.random.default_rng(6)
    labels = rng.choice([0, 2, 3, 6], 50)
    pred = np.where(rng.random(50) < 0.6, labels, rng.integers(0, 8, 50))
    got = per_class_accuracy(torch.from_numpy(pred), labels, num_classes=8)
    assert got.shape == (8,) and got.dtype == np.float64
    for c in range(8):
        idx = [i for i in range(50) if labels[i] == c]
        if idx:
            assert got[c] == pytest.approx(sum(pred[i] == c for i in idx) / len(idx), abs=1e-15)
        else:
            assert np.isnan(got[c])


def test_per_class_accuracy_validation():
    with pytest.raises(ValueError, match=r"^pred must be 1-D class ids \(take argmax of logits first\), got shape \(2, 2\)$"):
        per_class_accuracy(np.zeros((2, 2)), np.zeros(2, dtype=int), 2)
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 2\), got range \[0, 2\]$"):
        per_class_accuracy(np.zeros(2, dtype=int), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 2\), got range \[-1, 1\]$"):
        per_class_accuracy(np.zeros(2, dtype=int), np.array([-1, 1]), 2)
    empty = per_class_accuracy(np.zeros(0, dtype=int), np.zeros(0, dtype=int), 3)
    assert empty.shape == (3,) and np.isnan(empty).all()
    assert per_class_accuracy(np.array([1]), np.array([1]), 2).tolist()[1] == 1.0


# ----------------------------------------------------------------------------- ECE

def brute_ece(probs, labels, n_bins):
    """Bins (i/n, (i+1)/n]; a confidence of 0 goes to the first bin."""
    bins = [[] for _ in range(n_bins)]
    for row, label in zip(probs.tolist(), labels.tolist()):
        conf = max(row)
        pred = row.index(conf)
        b = next(i for i in range(n_bins) if conf <= (i + 1) / n_bins)
        bins[b].append((conf, pred == label))
    total = 0.0
    for members in bins:
        if members:
            acc = sum(c for _, c in members) / len(members)
            mean_conf = sum(conf for conf, _ in members) / len(members)
            total += len(members) / len(labels) * abs(acc - mean_conf)
    return total


@pytest.mark.parametrize("n_bins", [1, 2, 4, 8, 15])
def test_ece_matches_brute_force(n_bins):
    rng = np.random.default_rng(n_bins)
    logits = rng.normal(0, 2, (60, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 5, 60)
    got = expected_calibration_error(torch.from_numpy(probs), labels, n_bins=n_bins)
    assert got == pytest.approx(brute_ece(probs, labels, n_bins), abs=1e-12)


def test_ece_edges_empty_bins_and_one_bin():
    # Confidences exactly on edges (exact in binary with 4 bins): 0.25 | 0.5 | 0.75 | 1.0 close their bins.
    probs = np.array([[0.25, 0.0], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0], [0.0, 0.0]])
    labels = np.array([1, 0, 0, 1, 0])
    # bins (4): [0.25 wrong, 0.0 right], [0.5 right], [0.75 right], [1.0 wrong]
    expected = (2 / 5 * abs(0.5 - 0.125) + 1 / 5 * abs(1 - 0.5) + 1 / 5 * abs(1 - 0.75) + 1 / 5 * abs(0 - 1.0))
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx(brute_ece(probs, labels, 4), abs=1e-15)
    # 2 bins: 0.5 closes the first bin.
    expected2 = 3 / 5 * abs(2 / 3 - 0.25) + 2 / 5 * abs(0.5 - 0.875)
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(expected2, abs=1e-15)
    # One bin: |accuracy - mean confidence|.
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(abs(3 / 5 - 2.5 / 5), abs=1e-15)
    # Many empty bins, single sample.
    assert expected_calibration_error(np.array([[0.3, 0.7]]), np.array([1]), n_bins=10) == pytest.approx(0.3, abs=1e-15)
    assert expected_calibration_error(np.array([[0.3, 0.7]]), np.array([0]), n_bins=10) == pytest.approx(0.7, abs=1e-15)
    with pytest.raises(ValueError, match=r"^n_bins must be >= 1, got 0$"):
        expected_calibration_error(probs, labels, n_bins=0)


# ----------------------------------------------------------------------------- restrict_to_classes

def test_restrict_to_classes_brute_force_and_errors():
    logits = np.arange(24.0).reshape(3, 8)
    sub, pos = restrict_to_classes(logits, np.array([7, 1, 4]), [1, 4, 7])
    assert sub.tolist() == [[row[c] for c in (1, 4, 7)] for row in logits.tolist()]
    assert pos.tolist() == [2, 0, 1]
    sub, pos = restrict_to_classes(logits, np.array([0, 0, 0]), [0])
    assert sub.shape == (3, 1) and pos.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"^class_indices must be a non-empty, strictly increasing list of class ids$"):
        restrict_to_classes(logits, np.array([1, 1, 1]), [])
    with pytest.raises(ValueError, match=r"^class_indices must be a non-empty, strictly increasing list"):
        restrict_to_classes(logits, np.array([1, 1, 1]), [1, 1, 4])
    with pytest.raises(ValueError, match=r"^class_indices must be a non-empty, strictly increasing list"):
        restrict_to_classes(logits, np.array([1, 1, 1]), [4, 1])
    # A label above the largest class id (searchsorted past the end) is reported, not an IndexError.
    with pytest.raises(ValueError, match=r"^labels \[7\] are not among class_indices$"):
        restrict_to_classes(logits, np.array([7, 1, 4]), [1, 4])
    # At most five missing labels are listed.
    with pytest.raises(ValueError, match=r"^labels \[0 2 3 5 6\] are not among class_indices$"):
        restrict_to_classes(np.zeros((7, 8)), np.array([0, 2, 3, 5, 6, 7, 1]), [1, 4])
    with pytest.raises(ValueError, match=r"^expected 3 integer labels"):
        restrict_to_classes(logits, np.array([1, 4]), [1, 4])


# ----------------------------------------------------------------------------- defaults, warnings, bootstrap

import warnings  # noqa: E402


def test_ece_default_is_15_bins_and_over_one_confidences_share_the_last_bin():
    rng = np.random.default_rng(15)
    logits = rng.normal(0, 2, (80, 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 4, 80)
    assert expected_calibration_error(probs, labels) == pytest.approx(brute_ece(probs, labels, 15), abs=1e-12)
    assert expected_calibration_error(probs, labels) != pytest.approx(brute_ece(probs, labels, 16), abs=1e-12)
    # Scores above 1 are clipped into the last bin: gaps -0.5 and +0.5 cancel there.
    scores = np.array([[1.5, 0.0], [0.5, 0.0]])
    assert expected_calibration_error(scores, np.array([0, 0]), n_bins=1) == pytest.approx(0.0, abs=1e-15)
    assert expected_calibration_error(scores, np.array([0, 0]), n_bins=2) == pytest.approx(0.5, abs=1e-15)


def test_absent_classes_and_empty_inputs_raise_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = per_class_accuracy(np.array([0, 1]), np.array([0, 0]), 3)
        assert got[0] == 0.5 and np.isnan(got[1]) and np.isnan(got[2])
        empty = topk_accuracy(np.zeros((0, 2)), np.zeros(0, dtype=int), k=1)
        assert np.isnan(empty[1])


def test_restrict_to_consecutive_classes():
    logits = np.arange(12.0).reshape(2, 6)
    sub, pos = restrict_to_classes(logits, np.array([2, 3]), np.array([1, 2, 3]))
    assert sub.tolist() == [[1.0, 2.0, 3.0], [7.0, 8.0, 9.0]] and pos.tolist() == [1, 2]


def test_which_score_set_is_bad_is_named():
    with pytest.raises(ValueError, match=r"^ID scores are empty"):
        ood_metrics([], [0.3])
    with pytest.raises(ValueError, match=r"^OOD scores contain NaN or infinite values"):
        roc_curve([0.1], [np.nan])
    with pytest.raises(ValueError, match=r"^ID scores contain NaN or infinite values"):
        ood_metrics([np.nan], [0.3])


def brute_metrics(id_scores, ood_scores):
    return {
        "fpr95": brute_fpr95(id_scores, ood_scores),
        "auroc": brute_auroc(id_scores, ood_scores),
        "aupr_in": brute_average_precision(id_scores, ood_scores),
        "aupr_out": brute_average_precision(-ood_scores, -id_scores),
        "detection_error": brute_detection_error(id_scores, ood_scores),
    }


def test_bootstrap_matches_brute_force_resampling():
    # Documented protocol: generator seeded with `seed` (default 0); per resample, N_id indices into
    # the sorted ID scores, then N_ood into the sorted OOD scores; 2.5 / 97.5 percentiles.
    rng = np.random.default_rng(21)
    id_scores, ood_scores = random_scores(rng, 13, 11, tied=True)
    id_sorted, ood_sorted = np.sort(id_scores), np.sort(ood_scores)
    draws = {name: [] for name in OOD_METRIC_NAMES}
    gen = np.random.default_rng(0)
    for _ in range(40):
        id_b = id_sorted[gen.integers(0, id_sorted.size, id_sorted.size)]
        ood_b = ood_sorted[gen.integers(0, ood_sorted.size, ood_sorted.size)]
        for name, value in brute_metrics(id_b, ood_b).items():
            draws[name].append(value)
    got = ood_metrics(id_scores, ood_scores, bootstrap=40)
    for name in OOD_METRIC_NAMES:
        assert got["ci"][name] == pytest.approx(list(np.percentile(draws[name], [2.5, 97.5])), abs=1e-12)
    assert got == ood_metrics(id_scores, ood_scores, bootstrap=40, seed=0)
