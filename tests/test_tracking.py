"""Experiment tracking: TensorBoard, CSV and JSONL carry the same per-step values and validation
metrics, learning rates are named by parameter group, and the run's config.yaml reads back."""
import csv
import json
import math
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from reprogrammer.config import ConfigError, load_config
from reprogrammer.training.engine import train
from reprogrammer.training.tracking import Tracker
from tests.engine_data import train_data
from tests.helpers import tiny_clip

# 48 training images, batch 8: 6 steps an epoch, 12 steps, an evaluation after each epoch.
OVERRIDES = ("model.name=RP-ViT-Tiny", "model.pretrained=null", "data.num_workers=0", "train.batch_size=8",
             "train.epochs=2", "train.log_every=1", "method.warmup_steps=2", "method.up_resolution=20",
             "method.mr_resolution=11", "method.image_lr=0.004", "method.text_lr=0.0003",
             "train.report_to=[jsonl, csv, tensorboard]")
STEPS, WARMUP = 12, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracking") / "run"
    cfg = load_config(None, OVERRIDES)
    summary = train(cfg, run_dir, train_data(), clip=tiny_clip(), progress=False)
    return run_dir, cfg, summary


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _flat(record):
    flat = {k: v for k, v in record.items() if k != "lr"}
    flat.update({f"lr/{name}": value for name, value in record.get("lr", {}).items()})
    return flat


def _scheduled(base_lr, step):
    """docs/method.md 3: linear warm-up, then half a cosine to 0; logged after the step's update."""
    if step < WARMUP:
        return base_lr * (step + 1) / WARMUP
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def test_jsonl_has_every_step_with_named_learning_rates(run):
    run_dir, _, _ = run
    records = _jsonl(run_dir / "train_log.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert set(record["lr"]) == {"image_delta", "text"}
        assert record["lr"]["image_delta"] == pytest.approx(_scheduled(0.004, record["step"]), abs=1e-12)
        assert record["lr"]["text"] == pytest.approx(_scheduled(0.0003, record["step"]), abs=1e-12)
        assert math.isfinite(record["loss"]) and record["images_per_s"] > 0


def test_validation_metrics_at_every_evaluation(run):
    run_dir, _, summary = run
    records = _jsonl(run_dir / "val_log.jsonl")
    assert [r["step"] for r in records] == [6, 12]
    assert [r["accuracy"] for r in records] == [e["val_accuracy"] for e in summary["evaluations"]]


def test_csv_carries_the_jsonl_values_under_a_stable_header(run):
    run_dir, _, _ = run
    for name, header in (("train_log", ["step", "epoch", "loss", "lr/image_delta", "lr/text", "images_per_s",
                                        "grad_scale", "skipped_steps", "max_memory_mb"]),
                         ("val_log", ["step", "accuracy"])):
        with open(run_dir / f"{name}.csv", newline="") as file:
            rows = list(csv.reader(file))
        assert rows[0] == header
        expected = [_flat(r) for r in _jsonl(run_dir / f"{name}.jsonl")]
        assert len(rows) - 1 == len(expected)
        for row, record in zip(rows[1:], expected):
            # csv writes repr(float): the exact value; None (no GPU, no AMP) is an empty cell
            assert row == ["" if record[column] is None else str(record[column]) for column in header]


def test_tensorboard_event_files_hold_the_logged_scalars(run):
    run_dir, _, _ = run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    train_records = _jsonl(run_dir / "train_log.jsonl")
    val_records = _jsonl(run_dir / "val_log.jsonl")
    expected = {"train/loss": [(r["step"], r["loss"]) for r in train_records],
                "train/images_per_s": [(r["step"], r["images_per_s"]) for r in train_records],
                "lr/image_delta": [(r["step"], r["lr"]["image_delta"]) for r in train_records],
                "lr/text": [(r["step"], r["lr"]["text"]) for r in train_records],
                "val/accuracy": [(r["step"], r["accuracy"]) for r in val_records]}
    assert set(expected) <= set(events.Tags()["scalars"])
    assert "train/max_memory_mb" not in events.Tags()["scalars"]  # None on the CPU: not a scalar
    for tag, values in expected.items():
        logged = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in logged] == [step for step, _ in values], tag
        for (_, got), (_, want) in zip(logged, values):
            assert got == pytest.approx(want, rel=1e-6), tag  # event files store float32


def test_config_yaml_reads_back_as_the_run_config(run):
    run_dir, cfg, _ = run
    assert load_config(str(run_dir / "config.yaml")) == cfg
    assert load_config(str(run_dir / "config.yaml")).train.report_to == ["jsonl", "csv", "tensorboard"]


def test_a_resumed_csv_must_keep_its_columns(tmp_path):
    with Tracker(tmp_path, ["csv"], ["image_delta", "text"]) as tracker:
        tracker.log_validation(3, accuracy=0.5)
    with Tracker(tmp_path, ["csv"], ["image_delta", "text"]) as tracker:  # same columns: appended
        tracker.log_validation(6, accuracy=0.75)
    assert (tmp_path / "val_log.csv").read_text().splitlines() == ["step,accuracy", "3,0.5", "6,0.75"]
    with pytest.raises(ValueError, match="train_log.csv has the columns"):
        Tracker(tmp_path, ["csv"], ["context"])


def test_tensorboard_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'reprogrammer\[tracking\]'"):
        Tracker(tmp_path, ["jsonl", "tensorboard"], ["text"])


def test_unknown_reporter_is_rejected():
    with pytest.raises(ConfigError, match="'wandb' is not one of jsonl, tensorboard, csv"):
        load_config(None, ("train.report_to=[jsonl, wandb]",))
