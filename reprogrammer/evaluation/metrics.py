"""Classification accuracy, calibration, OOD scores and OOD-detection metrics (docs/method.md section 5).

Everything here is plain numpy but the OOD scores, which are the kernels' one definition
(`kernels.ood_scores`); torch tensors are accepted and converted. Conventions for OOD
detection: in-distribution (ID) samples are the positives and a higher score means "more ID".
All metrics are fractions in [0, 1].
"""
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from .. import kernels

OOD_METRIC_NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out", "detection_error")


def to_numpy(x) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor (any device or dtype) or nested sequence."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        # numpy has no bfloat16: 16-bit floats go to float32 (lossless), wider dtypes stay.
        return (x.float() if x.is_floating_point() and x.element_size() < 4 else x).numpy()
    return np.asarray(x)


def _logits_2d(logits) -> np.ndarray:
    array = to_numpy(logits).astype(np.float64, copy=False)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"expected a [N, C] array of per-class scores with C >= 1, got shape {array.shape}")
    return array


def _labels_1d(labels, n: int) -> np.ndarray:
    array = to_numpy(labels)
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"expected {n} integer labels of shape [{n}], got dtype {array.dtype} shape {array.shape}")
    return array.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------- classification

def topk_accuracy(logits_or_scores, labels, k: int | Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose label is among the `k` highest scores, for each requested `k`.

    Ties are broken towards the lower class index, as a stable descending sort (and `argmax` for
    k = 1) does: the label's rank is the number of classes scoring strictly higher plus the number
    of lower-indexed classes scoring equally.
    """
    scores = _logits_2d(logits_or_scores)
    n, num_classes = scores.shape
    targets = _labels_1d(labels, n)
    if n and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{targets.min()}, {targets.max()}]")
    ks = (k,) if isinstance(k, int) else tuple(k)
    if not ks or min(ks) < 1 or max(ks) > num_classes:
        raise ValueError(f"every k must lie in [1, {num_classes}] (the number of classes), got {ks}")
    label_scores = scores[np.arange(n), targets][:, None]
    lower_index = np.arange(num_classes)[None, :] < targets[:, None]
    rank = (scores > label_scores).sum(1) + ((scores == label_scores) & lower_index).sum(1)
    return {kk: float((rank < kk).mean()) if n else float("nan") for kk in ks}


def restrict_to_classes(logits, labels, class_indices) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a class subset (e.g. ImageNet-A/R's 200 of 1000) and labels renumbered into it.

    Returns `(logits[:, class_indices], position of each label in class_indices)`; to predict
    over all classes instead (as the authors do), use the logits and labels unchanged.
    """
    scores = to_numpy(logits)
    subset = to_numpy(class_indices).astype(np.int64)
    targets = _labels_1d(labels, scores.shape[0])
    if subset.size == 0 or np.any(np.diff(subset) <= 0):
        raise ValueError("class_indices must be a non-empty, strictly increasing list of class ids")
    positions = np.minimum(np.searchsorted(subset, targets), subset.size - 1)
    if np.any(subset[positions] != targets):
        raise ValueError(f"labels {np.unique(targets[subset[positions] != targets])[:5]} are not among class_indices")
    return scores[:, subset], positions


def per_class_accuracy(pred, labels, num_classes: int) -> np.ndarray:
    """Accuracy of each class, shape [num_classes]; NaN for classes with no sample."""
    predictions = to_numpy(pred)
    if predictions.ndim != 1:
        raise ValueError(f"pred must be 1-D class ids (take argmax of logits first), got shape {predictions.shape}")
    targets = _labels_1d(labels, predictions.shape[0])
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{targets.min()}, {targets.max()}]")
    totals = np.bincount(targets, minlength=num_classes).astype(np.float64)
    hits = np.bincount(targets, weights=(predictions == targets), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / totals, np.nan)


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE with `n_bins` equal-width confidence bins `(i/n, (i+1)/n]` (Guo et al. 2017).

    `sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`, confidence = max probability,
    prediction = argmax.
    """
    probabilities = _logits_2d(probs)
    targets = _labels_1d(labels, probabilities.shape[0])
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an edge in the bin that edge closes.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / max(len(targets), 1))


# ----------------------------------------------------------------------------- OOD scores
# Views of `kernels.ood_scores`, the one definition of each score (the fused residual op
# computes the same), as numpy arrays: fp32, computed in torch.

def _ood_scores(logits, temperature: float):
    return kernels.ood_scores(torch.from_numpy(_logits_2d(logits)), temperature)


def mcm_score(logits, temperature: float) -> np.ndarray:
    """Maximum softmax of `logits / temperature` (MCM; MSP when temperature = 1), shape [N].

    For CLIP-style models pass the cosine similarities (`logits / logit_scale`) with
    temperature 0.01, the authors' fixed setting; for linear-head logits use temperature 1.
    """
    return _ood_scores(logits, temperature).mcm.numpy()


def energy_score(logits, temperature: float) -> np.ndarray:
    """Negative free energy `T * logsumexp(logits / T)`, shape [N] (higher = more ID).

    For CLIP-style models pass the cosine similarities (`logits / logit_scale`) with T = 0.01.
    """
    return _ood_scores(logits, temperature).energy.numpy()


def max_logit_score(logits) -> np.ndarray:
    """Largest logit per sample, shape [N]."""
    return _ood_scores(logits, 1.0).max_logit.numpy()


# ----------------------------------------------------------------------------- OOD metrics

def _scores_1d(scores, what: str) -> np.ndarray:
    array = to_numpy(scores).astype(np.float64, copy=False).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what} scores are empty: OOD metrics need at least one ID and one OOD score")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} scores contain NaN or infinite values; check the logits that produced them")
    return array


def _ranked_counts(positive_scores: np.ndarray, negative_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true positives, false positives) when keeping every score >= each distinct
    threshold, thresholds descending; tied scores form one step."""
    scores = np.concatenate([positive_scores, negative_scores])
    is_positive = np.zeros(scores.size, dtype=bool)
    is_positive[: positive_scores.size] = True
    order = np.argsort(-scores, kind="stable")
    scores, is_positive = scores[order], is_positive[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_positive)[last_of_group]
    return tps, last_of_group + 1 - tps


def roc_curve(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) with ID positive, starting at (0, 0)."""
    tps, fps = _ranked_counts(_scores_1d(id_scores, "ID"), _scores_1d(ood_scores, "OOD"))
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    """Step-wise AP, `sum_n (R_n - R_{n-1}) P_n`, as sklearn's `average_precision_score`."""
    recall_steps = np.diff(np.r_[0, tps]) / tps[-1]
    return float((recall_steps * tps / (tps + fps)).sum())


def _metrics_from_sorted(id_sorted: np.ndarray, ood_sorted: np.ndarray) -> dict[str, float]:
    """All metrics from ascending-sorted scores (ID positive, higher = more ID)."""
    n_id, n_ood = id_sorted.size, ood_sorted.size
    threshold = id_sorted[fpr95_index(n_id)]
    fpr95 = (n_ood - np.searchsorted(ood_sorted, threshold, side="right")) / n_ood

    tps, fps = _ranked_counts(id_sorted, ood_sorted)
    # Trapezoids over the grouped curve = Mann-Whitney U with ties counted 1/2.
    auroc = float(np.sum(np.diff(np.r_[0, fps]) * (tps + np.r_[0, tps[:-1]])) / (2.0 * n_id * n_ood))
    # OOD as positives with negated scores: the same groups visited in reverse order.
    ood_tps, id_fps = _ranked_counts(-ood_sorted, -id_sorted)
    # Keeping nothing misses every ID sample; the k-th threshold keeps tps[k] ID and fps[k] OOD.
    errors = np.r_[n_id, n_id - tps + fps]
    return {
        "fpr95": float(fpr95),
        "auroc": auroc,
        "aupr_in": _average_precision(tps, fps),
        "aupr_out": _average_precision(ood_tps, id_fps),
        "detection_error": float(errors.min() / (n_id + n_ood)),
    }


def fpr95_index(n_id: int) -> int:
    """Index of the FPR95 threshold in the ascending-sorted ID scores (docs/method.md 5)."""
    return round(0.05 * n_id)


def fpr95_threshold(id_scores) -> float:
    """The score that keeps 95 % of ID samples: below it a sample is flagged OOD."""
    scores = np.sort(_scores_1d(id_scores, "ID"))
    if not np.isfinite(scores).all():
        raise ValueError("ID scores must be finite to set a threshold")
    return float(scores[fpr95_index(scores.size)])


def ood_metrics(id_scores, ood_scores, *, bootstrap: int = 0, seed: int = 0) -> dict:
    """FPR95, AUROC, AUPR-In, AUPR-Out and detection error of one ID / OOD score pair.

    FPR95: threshold = the ascending-sorted ID scores at index `round(0.05 * N_id)` (Python's
    round), FPR95 = fraction of OOD scores strictly above it. AUROC counts ties as 1/2.
    AUPR-In / AUPR-Out are step-wise average precision with ID / OOD (scores negated) as
    positives. Detection error = min over thresholds of (missed ID + kept OOD) / (N_id + N_ood).

    With `bootstrap = B > 0`, ID and OOD scores are resampled separately B times (numpy
    generator seeded with `seed`) and the result gains `"ci"`: metric -> [2.5 %, 97.5 %]
    percentiles.
    """
    id_sorted = np.sort(_scores_1d(id_scores, "ID"))
    ood_sorted = np.sort(_scores_1d(ood_scores, "OOD"))
    result: dict = _metrics_from_sorted(id_sorted, ood_sorted)
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = {name: np.empty(bootstrap) for name in OOD_METRIC_NAMES}
        for b in range(bootstrap):
            # Indices into sorted arrays, then sorted: the resample comes out sorted for free.
            id_b = id_sorted[np.sort(rng.integers(0, id_sorted.size, id_sorted.size))]
            ood_b = ood_sorted[np.sort(rng.integers(0, ood_sorted.size, ood_sorted.size))]
            for name, value in _metrics_from_sorted(id_b, ood_b).items():
                draws[name][b] = value
        result["ci"] = {name: [float(v) for v in np.percentile(d, [2.5, 97.5])] for name, d in draws.items()}
    return result


def mean_ood_metrics(per_set: Mapping[str, Mapping[str, float]] | Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Plain mean over OOD sets of each metric in `OOD_METRIC_NAMES` (bootstrap CIs are not averaged).

    Accepts {set name: metrics} or a sequence of metric dicts.
    """
    dicts = list(per_set.values()) if isinstance(per_set, Mapping) else list(per_set)
    if not dicts:
        raise ValueError("no per-OOD-set metrics to average")
    missing = [name for name in OOD_METRIC_NAMES if any(name not in d for d in dicts)]
    if missing:
        raise ValueError(f"every per-set dict needs the metrics {OOD_METRIC_NAMES}; missing {missing}")
    return {name: float(np.mean([d[name] for d in dicts])) for name in OOD_METRIC_NAMES}
