"""The built-in default, shortened: a complete report, and Reprogrammer ahead of zero-shot."""
import json

import pytest

from reprogrammer.shapeworld.demo import run_demo
from reprogrammer.shapeworld.pretrain import PretrainConfig

# A shorter pretraining than the default (about a minute; ~30 % zero-shot ID accuracy).
PRETRAIN = PretrainConfig(n_pairs=20_000, steps=400, warmup_steps=30, n_eval=400)

METHODS = {"zero-shot", "linear-probe", "fine-tune", "lp-ft", "wise-ft", "reprogrammer", "residual-reprogrammer"}


@pytest.mark.slow
def test_quick_demo_produces_the_paper_comparison(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_CACHE", str(tmp_path / "cache"))
    run_demo(tmp_path, quick=True, progress=False, pretrain_config=PRETRAIN)
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["methods"]) == METHODS
    for name, result in report["methods"].items():
        assert 0 <= result["id_accuracy"] <= 1, name
        assert len(result["ood_generalization"]) >= 2 and len(result["ood_detection"]) >= 2, name
        for metrics in result["ood_detection"].values():
            assert {"fpr95", "auroc", "aupr_in", "aupr_out"} <= set(metrics)
            assert all(0 <= metrics[k] <= 1 for k in ("fpr95", "auroc", "aupr_in", "aupr_out"))
    assert report["methods"]["residual-reprogrammer"]["alpha"] == 0.4
    assert report["methods"]["reprogrammer"]["id_accuracy"] > report["methods"]["zero-shot"]["id_accuracy"]
    for name in ("report.md", "roc.png", "score_histograms.png", "alpha_sweep.png", "residual_reprogrammer.onnx"):
        assert (tmp_path / name).stat().st_size > 0
