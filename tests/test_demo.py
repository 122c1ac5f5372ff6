"""The built-in default, shortened: a complete report over two seeds on the shipped CLIP, with mean
and spread for every cell and the feature-drift diagnostic."""
import json

import numpy as np
import pytest

from reprogrammer.shapeworld.demo import run_demo

METHODS = {"zero-shot", "linear-probe", "fine-tune", "lp-ft", "wise-ft", "reprogrammer", "residual-reprogrammer"}


def _cells(tree):
    """Every `{"mean", "std", "values"}` cell of a nested report section."""
    if isinstance(tree, dict) and "mean" in tree and "values" in tree:
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _cells(value)


@pytest.mark.slow
def test_quick_demo_reports_mean_spread_and_drift_over_seeds(tmp_path):
    run_demo(tmp_path, quick=True, seeds=2, progress=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["seeds"] == [1, 2] and set(report["methods"]) == METHODS
    for name, cells in report["methods"].items():
        per_seed = [report["per_seed"][s][name] for s in ("1", "2")]
        assert cells["id_accuracy"]["values"] == [r["id_accuracy"] for r in per_seed]
        for cell in _cells(cells):
            assert len(cell["values"]) == 2
            assert cell["mean"] == pytest.approx(np.mean(cell["values"]))
            assert cell["std"] == pytest.approx(np.std(cell["values"], ddof=1))
        assert set(cells["ood_detection"]) == {"shapes", "textures"}
        assert set(cells["feature_drift"]) == {"test", "texture", "corrupted", "sketch", "mean"}
        assert all(-1 <= c["mean"] <= 1 + 1e-6 for c in _cells(cells["feature_drift"]))
    # The frozen encoder's features do not move; fine-tuning's do.
    for frozen in ("zero-shot", "linear-probe"):
        assert report["methods"][frozen]["feature_drift"]["mean"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert report["methods"]["fine-tune"]["feature_drift"]["mean"]["mean"] < 1 - 5e-5
    text = (tmp_path / "report.md").read_text()
    assert "±" in text and "Feature drift" in text
    for name in ("report.md", "roc.png", "score_histograms.png", "alpha_sweep.png"):
        assert (tmp_path / "seed-1" / name).stat().st_size > 0
    assert (tmp_path / "residual_reprogrammer.onnx").stat().st_size > 0
