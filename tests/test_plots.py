"""Plots are written to disk in the requested format, and bad inputs are refused."""
import numpy as np
import pytest
import torch
from PIL import Image

from reprogrammer.evaluation.plots import plot_alpha_sweep, plot_roc_curves, plot_score_histograms


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    return rng.normal(1.0, 0.5, 301), {"svhn": rng.normal(0.2, 0.6, 197), "lsun": torch.randn(89) * 0.3,
                                       "textures": np.round(rng.normal(0.5, 0.7, 113), 1)}


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_roc_and_histograms(tmp_path, scores):
    id_scores, ood_scores = scores
    assert_png(plot_roc_curves(id_scores, ood_scores, tmp_path / "nested" / "roc.png"))
    assert_png(plot_score_histograms(torch.from_numpy(id_scores), ood_scores, tmp_path / "hist.png",
                                     score_name="MCM", title="CIFAR-10"))
    pdf = plot_roc_curves(id_scores, {"svhn": ood_scores["svhn"]}, tmp_path / "roc.pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match="no OOD score sets"):
        plot_score_histograms(id_scores, {}, tmp_path / "empty.png")


def test_alpha_sweep(tmp_path):
    alphas = np.linspace(0, 1, 6)
    id_acc = [0.95, 0.94, 0.93, 0.91, 0.9, 0.88]
    fpr = [0.3, 0.28, 0.27, 0.3, 0.35, 0.4]
    assert_png(plot_alpha_sweep(alphas, id_acc, [0.8, 0.82, 0.83, 0.82, 0.8, 0.79], fpr, tmp_path / "a.png"))
    per_set = {"CIFAR-10.1": [0.85] * 6, "STL-10": [0.9, 0.91, 0.92, 0.92, 0.91, 0.9]}
    assert_png(plot_alpha_sweep(alphas, id_acc, per_set, fpr, tmp_path / "b.png", title="sweep"))
    with pytest.raises(ValueError, match="'STL-10' has 2 values for 6 alphas"):
        plot_alpha_sweep(alphas, id_acc, {"STL-10": [0.9, 0.9]}, fpr, tmp_path / "c.png")
