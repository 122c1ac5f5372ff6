"""Evaluation figures: ROC curves, ID-vs-OOD score histograms, the Residual Reprogrammer alpha sweep.

Figures are drawn on `matplotlib.figure.Figure` objects and saved through the Agg renderer, never
through pyplot, so plotting changes no global backend or state. Each function writes the file
named by `path` (format from its extension, folders created) and returns that path.
Metric inputs are fractions, as `reprogrammer.metrics` returns them; axes show percentages.
"""
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import ood_metrics, roc_curve, to_numpy


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _require_sets(ood_scores: Mapping[str, object]) -> None:
    if not ood_scores:
        raise ValueError("no OOD score sets to plot: pass {set name: scores}")


def plot_roc_curves(id_scores, ood_scores: Mapping[str, object], path: str | os.PathLike, *,
                    title: str | None = None) -> Path:
    """One ROC curve per OOD set (ID positive), legend with each set's AUROC and FPR95."""
    _require_sets(ood_scores)
    figure = Figure(figsize=(5.5, 5))
    axes = figure.add_subplot()
    for name, scores in ood_scores.items():
        fpr, tpr = roc_curve(id_scores, scores)
        metrics = ood_metrics(id_scores, scores)
        axes.plot(100 * fpr, 100 * tpr,
                  label=f"{name} (AUROC {100 * metrics['auroc']:.1f}, FPR95 {100 * metrics['fpr95']:.1f})")
    axes.plot([0, 100], [0, 100], color="grey", linestyle=":", linewidth=1)
    axes.axhline(95, color="grey", linestyle="--", linewidth=0.8)
    axes.set(xlabel="OOD kept (false-positive rate, %)", ylabel="ID kept (true-positive rate, %)",
             xlim=(0, 100), ylim=(0, 100.5), title=title or "ROC, ID = positive")
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_score_histograms(id_scores, ood_scores: Mapping[str, object], path: str | os.PathLike, *,
                          bins: int = 60, score_name: str = "score", title: str | None = None) -> Path:
    """One panel per OOD set: density histograms of the ID and that set's scores on shared bins."""
    _require_sets(ood_scores)
    id_values = to_numpy(id_scores).reshape(-1)
    columns = min(3, len(ood_scores))
    rows = -(-len(ood_scores) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    for i, (name, scores) in enumerate(ood_scores.items()):
        ood_values = to_numpy(scores).reshape(-1)
        edges = np.histogram_bin_edges(np.concatenate([id_values, ood_values]), bins=bins)
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.hist(id_values, bins=edges, density=True, alpha=0.55, label="ID")
        axes.hist(ood_values, bins=edges, density=True, alpha=0.55, label=name)
        axes.set(xlabel=score_name, ylabel="density", title=name)
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_alpha_sweep(alphas: Sequence[float], id_accuracy: Sequence[float],
                     ood_accuracy: Sequence[float] | Mapping[str, Sequence[float]], mean_fpr95: Sequence[float],
                     path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Accuracy (ID, and OOD generalisation: one series or one per shifted set) and mean FPR95
    against the residual blend `alpha` (0 = Reprogrammer, 1 = zero-shot)."""
    alphas = np.asarray(alphas, dtype=float)
    shifted = ood_accuracy if isinstance(ood_accuracy, Mapping) else {"OOD generalisation": ood_accuracy}
    series = {"ID": id_accuracy, **shifted, "mean FPR95": mean_fpr95}
    for name, values in series.items():
        if len(values) != len(alphas):
            raise ValueError(f"'{name}' has {len(values)} values for {len(alphas)} alphas")
    figure = Figure(figsize=(6, 4))
    accuracy_axes = figure.add_subplot()
    accuracy_axes.plot(alphas, 100 * np.asarray(id_accuracy, float), marker="o", label="ID accuracy")
    for name, values in shifted.items():
        accuracy_axes.plot(alphas, 100 * np.asarray(values, float), marker="s", label=f"{name} accuracy")
    fpr_axes = accuracy_axes.twinx()
    fpr_axes.plot(alphas, 100 * np.asarray(mean_fpr95, float), marker="^", color="black", linestyle="--",
                  label="mean FPR95")
    accuracy_axes.set(xlabel="alpha (0 = Reprogrammer, 1 = zero-shot)", ylabel="accuracy (%)",
                      title=title or "Residual Reprogrammer alpha sweep")
    fpr_axes.set_ylabel("mean FPR95 (%, lower is better)")
    handles = accuracy_axes.get_legend_handles_labels()[0] + fpr_axes.get_legend_handles_labels()[0]
    accuracy_axes.legend(handles=handles, fontsize="small", loc="best")
    return _save(figure, path)
