"""What the `train`, `eval` and `demo` commands do, as functions."""
import logging

from ..model import Reprogrammer
from ..runtime import resolve_device
from . import metrics
from .evaluate import (
    EvalOptions,
    alpha_sweep,
    dataset_line,
    evaluate_classifier,
    evaluate_wise_ft,
    pick_alpha,
    reprogrammer_features,
)
from .reports import write_report

log = logging.getLogger(__name__)


def eval_options(cfg, *, progress=True) -> EvalOptions:
    device = resolve_device(cfg.train.device)
    return EvalOptions(device=device, precision=cfg.train.precision, batch_size=cfg.eval.batch_size,
                       temperature=cfg.eval.temperature, bootstrap=cfg.eval.bootstrap,
                       num_workers=cfg.eval.num_workers, progress=progress)


def evaluate_method(classifier, method: str, cfg, sets, options: EvalOptions) -> tuple[dict, dict]:
    """`({report name: results}, extras)` for one trained classifier.

    Reprogrammer also yields `residual-reprogrammer` at the configured alpha and the alpha
    sweep; WiSE-FT yields its interpolation sweep. `extras["mcm"]` holds the MCM scores of the
    headline model (ID test and each OOD set) for the plots.
    """
    extras = {}
    if isinstance(classifier, Reprogrammer) and method == "reprogrammer":
        features = reprogrammer_features(classifier, sets, options)
        sweep = alpha_sweep(features, sets, sorted(set(cfg.eval.alphas) | {0.0, cfg.method.alpha}), options)
        plain = pick_alpha(sweep, 0.0)
        residual = pick_alpha(sweep, cfg.method.alpha)
        results = {"reprogrammer": {k: v for k, v in plain.items() if k != "alpha"},
                   "residual-reprogrammer": dict(residual)}
        logits = features.logits(residual["alpha"])
        temperature = options.temperature * features.logit_scale
        extras["mcm"] = {name: metrics.mcm_score(logits[name], temperature) for name in ["test", *sets.semantic]}
        extras["alpha_sweep"] = [_sweep_row(row) for row in sweep]
        return results, extras
    if method == "wise-ft":
        sweep = evaluate_wise_ft(classifier, sets, cfg.method.wise_alphas, options)
        chosen = pick_alpha(sweep, 0.5)
        extras["wise_ft_sweep"] = [_sweep_row(row) for row in sweep]
        return {"wise-ft": dict(chosen)}, extras
    return {method: evaluate_classifier(classifier, sets, options, method)}, extras


def _sweep_row(row: dict) -> dict:
    keep = ("alpha", "id_accuracy", "ood_generalization", "ood_generalization_mean", "ood_detection_mean")
    return {k: row[k] for k in keep if k in row}


def finish_report(results: dict, extras: dict, out_dir, *, title: str, notes: str = "", config=None,
                  skipped=None) -> dict:
    report = {"title": title, "notes": notes, "methods": results, "skipped_files": skipped or {}}
    if "alpha_sweep" in extras:
        report["alpha_sweep"] = extras["alpha_sweep"]
    if "wise_ft_sweep" in extras:
        report["wise_ft_sweep"] = extras["wise_ft_sweep"]
    if config is not None:
        report["config"] = config
    mcm = extras.get("mcm")
    paths = write_report(report, out_dir, id_scores=mcm["test"] if mcm else None,
                         ood_scores={k: v for k, v in mcm.items() if k != "test"} if mcm else None)
    for name, result in results.items():
        print(dataset_line(name, result))
    for name, files in report["skipped_files"].items():
        print(f"{name}: skipped {len(files)} unreadable file(s), e.g. {files[0]}")
    print(f"report: {paths['markdown']}")
    return report


def check_classes(sets, trained: list) -> None:
    """Accuracy on a labelled set is only meaningful with the classes the checkpoint was trained on."""
    labelled = {"test": sets.test, **sets.covariate}
    for name, dataset in labelled.items():
        classnames = list(getattr(dataset, "classnames", sets.classnames))
        if classnames != list(trained):
            raise ValueError(f"eval set {name!r} has the classes {_first(classnames)}, the checkpoint was trained on "
                             f"{_first(trained)}: evaluate on a set with the training classes (eval.test, "
                             "data.classnames_file)")


def _first(names, count: int = 5) -> str:
    return str(list(names)[:count]) + ("..." if len(names) > count else "")


def run_eval(run_dir, out_dir, *, which="best", config_path=None, overrides=(), progress=True) -> dict:
    from ..data.suites import build_eval_sets
    from ..runs.restore import load_run, with_user_data_paths

    classifier, cfg, meta = load_run(run_dir, which)
    cfg = with_user_data_paths(cfg, run_dir, config_path, overrides)
    sets = build_eval_sets(cfg)
    check_classes(sets, meta["classnames"])
    options = eval_options(cfg, progress=progress)
    classifier.to(options.device)
    results, extras = evaluate_method(classifier, meta["method"], cfg, sets, options)
    return finish_report(results, extras, out_dir, title=f"{meta['method']} on {cfg.data.dataset}",
                         notes=f"checkpoint: {run_dir} ({which})", config=meta["config"], skipped=sets.skipped())
