"""Evaluation reports: `report.json` for machines, `report.md` and plots for people."""
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

PAPER_ORDER = ["zero-shot", "linear-probe", "fine-tune", "lp-ft", "wise-ft", "coop", "reprogrammer-image",
               "reprogrammer-text", "reprogrammer", "residual-reprogrammer"]


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def markdown(report: dict) -> str:
    """Tables laid out like the paper's: ID and OOD-generalisation accuracy, then OOD detection."""
    methods = sorted(report["methods"], key=lambda m: PAPER_ORDER.index(m) if m in PAPER_ORDER else 99)
    first = report["methods"][methods[0]]
    shift_sets = list(first.get("ood_generalization", {}))
    ood_sets = list(first.get("ood_detection", {}))
    lines = [f"# {report.get('title', 'Evaluation')}", ""]
    if report.get("notes"):
        lines += [report["notes"], ""]
    lines += ["## Accuracy (%)", "",
              "| method | ID | " + " | ".join(shift_sets) + (" | shift mean |" if shift_sets else ""),
              "|---" * (2 + len(shift_sets) + bool(shift_sets)) + "|"]
    for name in methods:
        result = report["methods"][name]
        row = [_pct(result["id_accuracy"])] + [_pct(result["ood_generalization"].get(s)) for s in shift_sets]
        if shift_sets:
            row.append(_pct(result.get("ood_generalization_mean")))
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    if ood_sets:
        lines += ["", "## OOD detection, MCM score (FPR95 ↓ / AUROC ↑, %)", "",
                  "| method | " + " | ".join(ood_sets) + " | mean |", "|---" * (2 + len(ood_sets)) + "|"]
        for name in methods:
            det = report["methods"][name]["ood_detection"]
            mean = report["methods"][name].get("ood_detection_mean", {})
            cells = [f"{_pct(det[s]['fpr95'])} / {_pct(det[s]['auroc'])}" for s in ood_sets]
            cells.append(f"{_pct(mean.get('fpr95'))} / {_pct(mean.get('auroc'))}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, result in report["methods"].items():
        if "alpha" in result:
            lines += ["", f"`{name}` uses alpha = {result['alpha']}."]
    sweep = report.get("alpha_sweep")
    if sweep:
        lines += ["", "## Residual Reprogrammer alpha sweep (%)", "",
                  "| alpha | ID | shift mean | mean FPR95 | mean AUROC |", "|---|---|---|---|---|"]
        for row in sweep:
            mean = row.get("ood_detection_mean", {})
            lines.append(f"| {row['alpha']:.1f} | {_pct(row['id_accuracy'])} | {_pct(row.get('ood_generalization_mean'))}"
                         f" | {_pct(mean.get('fpr95'))} | {_pct(mean.get('auroc'))} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir, *, id_scores=None, ood_scores=None) -> dict:
    """Write `report.json`, `report.md`, and the plots; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(markdown(report))
    try:
        from . import plots
    except ImportError:
        log.warning("no plots in %s: matplotlib is not installed (pip install 'reprogrammer[plots]')", out)
        return paths
    if id_scores is not None and ood_scores:
        paths["roc"] = plots.plot_roc_curves(id_scores, ood_scores, out / "roc.png", title="ROC, MCM score")
        paths["histograms"] = plots.plot_score_histograms(id_scores, ood_scores, out / "score_histograms.png",
                                                          score_name="MCM score")
    sweep = report.get("alpha_sweep")
    if sweep and "ood_detection_mean" in sweep[0]:
        paths["alpha_sweep"] = plots.plot_alpha_sweep(
            [r["alpha"] for r in sweep], [r["id_accuracy"] for r in sweep],
            [r.get("ood_generalization_mean", float("nan")) for r in sweep],
            [r["ood_detection_mean"]["fpr95"] for r in sweep], out / "alpha_sweep.png")
    return paths
