"""The built-in default's report over seeds: every cell as mean and spread (sample standard
deviation, none with a single seed), with the per-seed values kept beside them."""
import math

import numpy as np

ACCURACY, DETECTION, DRIFT = "ood_generalization", "ood_detection", "feature_drift"
OOD_METRICS = ("fpr95", "auroc")


def cell(values) -> dict:
    values = [float(v) for v in values]
    spread = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": spread, "values": values}


def _method_cells(runs: list[dict]) -> dict:
    """Cells of one method from its per-seed results (each with `feature_drift` added)."""
    first = runs[0]
    out = {"id_accuracy": cell(r["id_accuracy"] for r in runs),
           ACCURACY: {name: cell(r[ACCURACY][name] for r in runs) for name in first[ACCURACY]},
           "ood_generalization_mean": cell(r["ood_generalization_mean"] for r in runs),
           DETECTION: {name: {m: cell(r[DETECTION][name][m] for r in runs) for m in OOD_METRICS}
                       for name in first[DETECTION]},
           "ood_detection_mean": {m: cell(r["ood_detection_mean"][m] for r in runs) for m in OOD_METRICS}}
    if DRIFT in first:
        out[DRIFT] = {name: cell(r[DRIFT][name] for r in runs) for name in first[DRIFT]}
    return out


def aggregate(per_seed: dict[int, dict]) -> dict:
    """`{method: cells}` from `{seed: {method: results}}`; every seed must hold the same methods."""
    seeds = sorted(per_seed)
    methods = list(per_seed[seeds[0]])
    for seed in seeds:
        if list(per_seed[seed]) != methods:
            raise ValueError(f"seed {seed} has methods {list(per_seed[seed])}, seed {seeds[0]} has {methods}")
    return {method: _method_cells([per_seed[s][method] for s in seeds]) for method in methods}


def _fmt(c: dict, scale: float, digits: int) -> str:
    text = f"{scale * c['mean']:.{digits}f}"
    return text if c["std"] is None or math.isnan(c["std"]) else f"{text} ± {scale * c['std']:.{digits}f}"


def markdown(title: str, notes: str, seeds: list[int], cells: dict, pretraining: dict) -> str:
    methods = list(cells)
    first = cells[methods[0]]
    shifts, oods = list(first[ACCURACY]), list(first[DETECTION])
    n = len(seeds)
    lines = [f"# {title}", "", notes, "",
             f"Seeds {', '.join(map(str, seeds))}: every cell is the mean"
             + (f" ± the sample standard deviation over the {n} seeds." if n > 1 else " of one seed (no spread)."),
             f"Encoder: {pretraining['model']}, zero-shot accuracy at pretraining "
             + ", ".join(f"{k} {100 * v:.1f}%" for k, v in pretraining["zero_shot_accuracy"].items()) + ".", "",
             "## Accuracy (%)", "",
             "| method | ID | " + " | ".join(shifts) + " | shift mean |", "|---" * (len(shifts) + 3) + "|"]
    for m in methods:
        c = cells[m]
        row = [_fmt(c["id_accuracy"], 100, 1)] + [_fmt(c[ACCURACY][s], 100, 1) for s in shifts] \
            + [_fmt(c["ood_generalization_mean"], 100, 1)]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    for metric, label in (("fpr95", "FPR95 ↓"), ("auroc", "AUROC ↑")):
        lines += ["", f"## OOD detection, MCM {label} (%)", "",
                  "| method | " + " | ".join(oods) + " | mean |", "|---" * (len(oods) + 2) + "|"]
        for m in methods:
            c = cells[m]
            row = [_fmt(c[DETECTION][o][metric], 100, 1) for o in oods]
            row.append(_fmt(c["ood_detection_mean"][metric], 100, 1))
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    with_drift = [m for m in methods if DRIFT in cells[m]]
    if with_drift:
        drift_sets = list(cells[with_drift[0]][DRIFT])
        lines += ["", "## Feature drift: mean cosine between each method's image features and the frozen "
                  "encoder's (1 = unmoved)", "",
                  "| method | " + " | ".join(drift_sets) + " |", "|---" * (len(drift_sets) + 1) + "|"]
        for m in with_drift:
            lines.append(f"| {m} | " + " | ".join(_fmt(cells[m][DRIFT][s], 1, 3) for s in drift_sets) + " |")
    lines += ["", "Per-seed reports, plots and sweeps: `seed-N/report.md`."]
    return "\n".join(lines) + "\n"
