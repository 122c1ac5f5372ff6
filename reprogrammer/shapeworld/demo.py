"""The built-in default: the paper's comparison, end to end and offline, on the shape world.

A small CLIP pretrained on generated image-caption pairs (cached after the first run) stands in
for pretrained CLIP; a 10-class shape task stands in for CIFAR-10, with shifted renderings for
OOD generalisation and unseen shapes and bare textures for OOD detection.
"""
import copy
import json
import time
from pathlib import Path

from ..config import load_config
from ..data.suites import build_eval_sets, build_train_data
from ..evaluation.run_eval import eval_options, evaluate_method, finish_report
from ..methods import build_method
from ..training.engine import train
from ..training.restore import load_run
from .pretrain import cached_report, load_shapeworld_clip

# Epochs per method: the authors' recipes (docs/method.md 3 and 6) at the scale of a 4000-image task.
METHOD_EPOCHS = {"linear-probe": 10, "fine-tune": 4, "lp-ft": 6, "wise-ft": 4, "reprogrammer": 10}
QUICK_EPOCHS = {**{name: 2 for name in METHOD_EPOCHS}, "reprogrammer": 10}

NOTES = (
    "Synthetic benchmark: a small CLIP pretrained on procedurally rendered shapes with captions, "
    "a 10-class shape task (ID), the same classes rendered in other domains (OOD generalisation), "
    "and unseen shapes and bare textures (OOD detection). It exercises the full method and "
    "pipeline offline; it is not evidence about real CLIP models on natural images."
)


def run_demo(out_dir, *, quick: bool = False, progress: bool = True, pretrain_config=None) -> dict:
    out = Path(out_dir)
    start = time.perf_counter()
    overrides = ("data.n_train=1200", "data.n_test=400", "method.warmup_steps=1") if quick else ()
    cfg = load_config("default", overrides)
    clip, tokenizer = load_shapeworld_clip(cfg.model.name, config=pretrain_config, progress=progress)
    pretraining = cached_report(cfg.model.name, config=pretrain_config)
    zero_shot = pretraining["zero_shot_accuracy"]
    print(f"{cfg.model.name} pretrained on the shape world in {pretraining['seconds']:.0f} s; zero-shot accuracy "
          + ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in zero_shot.items()) + " (10 classes, chance 10%)")
    data, sets = build_train_data(cfg), build_eval_sets(cfg)
    options = eval_options(cfg, progress=progress)
    results, extras, timings = {}, {}, {}

    zero_shot_model = build_method(copy.deepcopy(clip), tokenizer, data.classnames,
                                   load_config("default", overrides + ("method.name=zero-shot",)).method)
    results.update(evaluate_method(zero_shot_model, "zero-shot", cfg, sets, options)[0])

    for method, epochs in (QUICK_EPOCHS if quick else METHOD_EPOCHS).items():
        began = time.perf_counter()
        method_cfg = load_config("default", overrides + (f"method.name={method}", f"train.epochs={epochs}"))
        run_dir = out / "runs" / method
        # Each run and each reload gets its own copy: fine-tuning changes the CLIP in place, and
        # WiSE-FT's zero-shot endpoint must be the pretrained weights.
        train(method_cfg, run_dir, data, clip=(copy.deepcopy(clip), tokenizer), overwrite=True, progress=progress)
        classifier, run_cfg, meta = load_run(run_dir, "best", clip=(copy.deepcopy(clip), tokenizer))
        method_results, method_extras = evaluate_method(classifier, method, run_cfg, sets, options)
        results.update(method_results)
        extras.update(method_extras)
        timings[method] = time.perf_counter() - began
        if method == "reprogrammer":
            _export(classifier, run_cfg, data, meta, out)

    report = finish_report(results, extras, out, title="Shape world: the paper's comparison", notes=NOTES)
    report["pretraining"] = {k: v for k, v in pretraining.items() if k != "losses"}
    report["seconds"] = {"total": time.perf_counter() - start, **timings}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print((out / "report.md").read_text())
    return report


def _export(classifier, cfg, data, meta, out: Path) -> None:
    import numpy as np

    from ..export import export_onnx

    calibration = np.stack([data.val[i][0].numpy() for i in range(len(data.val))]).astype(np.float32) / 255
    export_onnx(classifier, out / "residual_reprogrammer.onnx", image_resolution=meta["image_resolution"],
                alpha=cfg.method.alpha, calibration_images=calibration,
                metadata={"model_name": cfg.model.name, "pretrained": "shapeworld", "method": "reprogrammer"})
