"""The command line end to end on fabricated image folders: train, eval, export, predict."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from reprogrammer.cli import main
from reprogrammer.config import PRESETS

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _folder(root, n_per_class, seed, labelled=True):
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        folder = root / name if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = np.clip(np.array(rgb) + rng.integers(-40, 40, (14, 14, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{seed}_{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    train_root, test_root = _folder(base / "train", 12, 0), _folder(base / "test", 5, 1)
    ood_root = base / "ood"
    ood_root.mkdir()
    rng = np.random.default_rng(2)
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)).save(ood_root / f"noise_{i}.png")
    (ood_root / "broken.png").write_bytes(b"\x89PNG not really")
    config = {
        "model": {"name": "RP-ViT-Tiny", "pretrained": None},
        "data": {"dataset": "imagefolder", "root": str(train_root), "val_size": 6, "num_workers": 0,
                 "max_skipped_fraction": 0.2,
                 "image_resolution": 12},
        "method": {"name": "reprogrammer", "up_resolution": 20, "mr_resolution": 11, "warmup_steps": 2},
        "train": {"batch_size": 6, "epochs": 2, "log_every": 2},
        "eval": {"test": {"dataset": "imagefolder", "root": str(test_root)},
                 "covariate": {"shifted": {"dataset": "imagefolder", "root": str(test_root)}},
                 "semantic": {"noise": {"dataset": "textures", "root": str(ood_root)}},
                 "alphas": [0.0, 0.5, 1.0], "batch_size": 8, "num_workers": 0},
    }
    config_file = base / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(config_file), "--out", str(base / "run")]) == 0
    return base


def test_train_then_eval_writes_a_complete_report(run, capsys):
    assert main(["eval", "--checkpoint", str(run / "run"), "--out", str(run / "eval"), "--quiet",
                 "--config", str(run / "config.yaml")]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["methods"]) == {"reprogrammer", "residual-reprogrammer"}
    residual = report["methods"]["residual-reprogrammer"]
    assert residual["alpha"] == 0.4 and set(residual["ood_generalization"]) == {"shifted"}
    assert set(residual["ood_detection"]["noise"]) >= {"fpr95", "auroc", "aupr_in", "aupr_out", "detection_error"}
    assert [row["alpha"] for row in report["alpha_sweep"]] == [0.0, 0.4, 0.5, 1.0]
    for name in ("report.md", "roc.png", "score_histograms.png", "alpha_sweep.png"):
        assert (run / "eval" / name).stat().st_size > 0
    assert "| reprogrammer |" in (run / "eval" / "report.md").read_text()
    assert [f.split(":")[0] for f in report["skipped_files"]["noise"]] == [str(run / "ood" / "broken.png")]


def test_export_then_predict(run, capsys):
    onnx_path = run / "model.onnx"
    assert main(["export", "--checkpoint", str(run / "run"), "--out", str(onnx_path), "--alpha", "0.4",
                 "--set", f"data.root={run / 'train'}"]) == 0
    capsys.readouterr()
    assert main(["predict", "--onnx", str(onnx_path), str(run / "test" / "red"), str(run / "ood" / "broken.png")]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 6 and records[-1]["error"] and not any(r["error"] for r in records[:5])
    assert all(r["class"] in COLOURS and isinstance(r["ood"], bool) for r in records[:5])


def test_missing_dataset_path_names_the_layout(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), "--set", "data.dataset=cifar10",
                 "--set", f"data.root={tmp_path / 'nowhere'}", "--set", "model.name=RP-ViT-Tiny",
                 "--set", "model.pretrained=null"])
    assert code == 2
    assert "batches.meta" in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "train.bach_size=4"]) == 2
    assert "train.bach_size" in capsys.readouterr().err


def test_config_show_prints_the_resolved_yaml(tmp_path, capsys):
    assert main(["config", "show", "cifar10", "--set", "train.epochs=3", "--set", "train.report_to=[csv]"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    preset = yaml.safe_load((PRESETS / "cifar10.yaml").read_text())
    assert shown["model"] == preset["model"] and shown["method"]["mr_resolution"] == preset["method"]["mr_resolution"]
    assert shown["train"]["epochs"] == 3 and shown["train"]["report_to"] == ["csv"]
    assert shown["train"]["log_every"] == 10 and shown["eval"]["temperature"] == 0.01  # defaults filled in
    assert main(["config", "show", "nope"]) == 2
    assert "neither a file nor a preset" in capsys.readouterr().err


def test_config_list_names_each_preset_with_its_description(capsys):
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted(PRESETS.glob("*.yaml"))
    assert [line.split()[0] for line in lines] == [f.stem for f in files]
    for line, file in zip(lines, files):
        assert line.endswith(file.read_text().splitlines()[0].lstrip("# "))


def test_export_is_export_run_from_python_and_from_the_command_line(run, monkeypatch):
    import reprogrammer
    from reprogrammer import api
    from reprogrammer.export import OnnxClassifier

    user_data = [f"data.root={run / 'train'}"]
    report = reprogrammer.export_run(run / "run", run / "api.onnx", alpha=0.4, calibration_samples=5,
                                     overrides=user_data)
    assert report["path"] == str(run / "api.onnx") and report["ood_threshold"] is not None
    with pytest.raises(ValueError, match="--calibration-samples must be >= 0"):
        reprogrammer.export_run(run / "run", run / "bad.onnx", calibration_samples=-1)
    calls = []
    monkeypatch.setattr(api, "export_run", lambda *args, **kwargs: calls.append((args, kwargs)) or report)
    assert main(["export", "--checkpoint", str(run / "run"), "--out", str(run / "cli.onnx"), "--alpha", "0.4",
                 "--calibration-samples", "5", "--opset", "17", "--exporter", "legacy", "--fp16",
                 "--which", "latest", "--set", user_data[0]]) == 0
    assert calls == [((str(run / "run"), str(run / "cli.onnx")),
                      dict(which="latest", alpha=0.4, fp16=True, opset=17, exporter="legacy",
                           calibration_samples=5, overrides=user_data))]
    images = np.random.default_rng(0).random((4, 3, 12, 12), dtype=np.float32)
    served = OnnxClassifier(run / "api.onnx")(images)
    assert set(served) >= {"logits", "ood_score", "prediction"} and len(served["prediction"]) == 4


def test_bench_runs_the_checkout_script_as_a_module(capfd, monkeypatch, tmp_path):
    # A `bench` package in the current folder must not shadow the checkout's.
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "onnx_latency.py").write_text("raise SystemExit('the wrong bench')")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "onnx_latency", "--help"]) == 0
    out = capfd.readouterr().out
    assert "CPU latency and throughput of the exported ONNX classifier" in out and "--batch-sizes" in out
    assert main(["bench", "compile", "--no-such-option"]) == 2  # the script's own exit status
    assert "unrecognized arguments: --no-such-option" in capfd.readouterr().err


def test_bench_without_a_checkout_says_how_to_get_one(capsys, monkeypatch, tmp_path):
    from reprogrammer import api

    monkeypatch.setattr(api, "__file__", str(tmp_path / "site-packages" / "reprogrammer" / "api.py"))
    assert main(["bench", "kernels", "--quick"]) == 2
    assert "source checkout's bench/ folder; clone the repository" in capsys.readouterr().err


def _parsers(parser, path=("reprogrammer",)):
    """Every (sub)parser of the CLI with its command path."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_option_has_help_and_defaults_are_shown():
    from reprogrammer.cli import build_parser

    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help"
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, " ".join(path)
    export_help = dict((p[-1], q) for p, q in _parsers(build_parser()))["export"].format_help()
    assert "(default: 2000)" in export_help and "(default: best)" in export_help


def test_version(capsys):
    import reprogrammer

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"reprogrammer {reprogrammer.__version__}"
    assert reprogrammer.__version__[0].isdigit()
