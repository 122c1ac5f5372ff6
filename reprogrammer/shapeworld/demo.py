"""The built-in default: the paper's comparison, end to end and offline, on the shape world.

The shape-world CLIP shipped with the package stands in for pretrained CLIP; a 10-class shape
task trained in one narrow rendering domain stands in for CIFAR-10, with the same classes in
other domains for OOD generalisation and unseen shapes and bare textures for OOD detection.
Every seed is a full replicate (its own data draw and training); the report gives mean and
spread over seeds, and how far each method moved the image features from the frozen encoder's.
"""
import copy
import time
from pathlib import Path

from ..config import load_config
from ..data.suites import build_eval_sets, build_train_data
from ..evaluation.drift import feature_drift, frozen_features
from ..evaluation.run_eval import eval_options, evaluate_method, finish_report
from ..files import write_atomically, write_json_atomically
from ..methods import build_method
from ..runs.restore import load_run
from ..training.engine import train
from . import seed_report
from .shipped import builtin_clip

# Epochs per method: the authors' recipes (docs/method.md 3 and 6) at the scale of the task.
METHOD_EPOCHS = {"linear-probe": 10, "fine-tune": 4, "lp-ft": 6, "wise-ft": 4, "reprogrammer": 10}
QUICK_EPOCHS = {**{name: 2 for name in METHOD_EPOCHS}, "reprogrammer": 10}

NOTES = (
    "Synthetic benchmark: a small CLIP pretrained on procedurally rendered shapes with captions "
    "(shipped with the package), a 10-class shape task trained in one rendering domain (ID), the "
    "same classes in other domains the encoder saw in pretraining (OOD generalisation), and unseen "
    "shapes and bare textures (OOD detection). It exercises the full method and pipeline offline; "
    "it is not evidence about real CLIP models on natural images."
)


def run_demo(out_dir, *, quick: bool = False, seeds=1, progress: bool = True, pretrain_config=None) -> dict:
    """Run every method for seeds `1..seeds` (or the given list of seeds); writes `report.json` /
    `report.md` (mean and spread) and one full report per seed under `seed-N/`. Returns the report.

    Seed 0 draws the world the pretraining report evaluates on: the development world, on which
    design choices are made, kept out of the reported seeds."""
    seed_list = list(range(1, seeds + 1)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError(f"give at least one seed, got {seeds!r}")
    out = Path(out_dir)
    start = time.perf_counter()
    base = ("data.n_train=600", "data.n_test=400", "method.warmup_steps=1") if quick else ()
    name = load_config("default", base).model.name
    clip, tokenizer, pretraining = builtin_clip(name, config=pretrain_config, progress=progress)
    print(f"{name} pretrained on the shape world; zero-shot accuracy "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in pretraining["zero_shot_accuracy"].items())
          + " (10 classes, chance 10%)")
    per_seed, timings = {}, {}
    for seed in seed_list:
        began = time.perf_counter()
        per_seed[seed] = _one_seed(clip, tokenizer, (*base, f"train.seed={seed}"), out / f"seed-{seed}",
                                   epochs=QUICK_EPOCHS if quick else METHOD_EPOCHS, progress=progress,
                                   export_to=out if seed == seed_list[0] else None)
        timings[f"seed-{seed}"] = time.perf_counter() - began
    cells = seed_report.aggregate(per_seed)
    title = "Shape world: the paper's comparison"
    report = {"title": title, "notes": NOTES, "seeds": list(per_seed), "methods": cells,
              "per_seed": {str(s): r for s, r in per_seed.items()},
              "pretraining": {k: v for k, v in pretraining.items() if k != "losses"},
              "seconds": {"total": time.perf_counter() - start, **timings}}
    text = seed_report.markdown(title, NOTES, list(per_seed), cells, pretraining)
    write_json_atomically(out / "report.json", report)
    write_atomically(out / "report.md", lambda temp: temp.write_text(text))
    print(text)
    return report


def _one_seed(clip, tokenizer, overrides: tuple, out: Path, *, epochs: dict, progress: bool, export_to) -> dict:
    """`{method: results with feature_drift}` of one seed; its full report goes to `out`."""
    cfg = load_config("default", overrides)
    data, sets = build_train_data(cfg), build_eval_sets(cfg)
    options = eval_options(cfg, progress=progress)
    drift_sets = {"test": sets.test, **sets.covariate}
    results, extras = {}, {}

    zero_shot = build_method(copy.deepcopy(clip), tokenizer, data.classnames,
                             load_config("default", overrides + ("method.name=zero-shot",)).method)
    results.update(evaluate_method(zero_shot, "zero-shot", cfg, sets, options)[0])
    reference = frozen_features(zero_shot, drift_sets, options)
    drift = feature_drift(zero_shot, reference, drift_sets, options)

    for method, n_epochs in epochs.items():
        method_cfg = load_config("default", overrides + (f"method.name={method}", f"train.epochs={n_epochs}"))
        run_dir = out / "runs" / method
        # Each run and each reload gets its own copy: fine-tuning changes the CLIP in place, and
        # WiSE-FT's zero-shot endpoint must be the pretrained weights.
        train(method_cfg, run_dir, data, clip=(copy.deepcopy(clip), tokenizer), overwrite=True, progress=progress)
        classifier, run_cfg, meta = load_run(run_dir, "best", clip=(copy.deepcopy(clip), tokenizer))
        method_results, method_extras = evaluate_method(classifier, method, run_cfg, sets, options)
        results.update(method_results)
        extras.update(method_extras)
        drift.update(feature_drift(classifier, reference, drift_sets, options,
                                   wise_alpha=method_results.get("wise-ft", {}).get("alpha", 0.5),
                                   residual_alpha=run_cfg.method.alpha))
        if method == "reprogrammer" and export_to is not None:
            _export(classifier, run_cfg, data, meta, export_to)

    for method, result in results.items():
        result[seed_report.DRIFT] = drift[method]
    finish_report(results, extras, out, title=f"Shape world, seed {cfg.train.seed}", notes=NOTES)
    return results


def _export(classifier, cfg, data, meta, out: Path) -> None:
    import numpy as np

    from ..export import export_onnx

    calibration = np.stack([data.val[i][0].numpy() for i in range(len(data.val))]).astype(np.float32) / 255
    export_onnx(classifier, out / "residual_reprogrammer.onnx", image_resolution=meta["image_resolution"],
                alpha=cfg.method.alpha, calibration_images=calibration,
                metadata={"model_name": cfg.model.name, "pretrained": "shapeworld", "method": "reprogrammer"})
