import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reprogrammer.config import ConfigError, load_config
from reprogrammer.training import checkpoint as ckpt
from reprogrammer.training.engine import TrainingDiverged, train
from tests.engine_data import train_data
from tests.helpers import tiny_clip

ROOT = Path(__file__).resolve().parents[1]
BASE = ("model.name=RP-ViT-Tiny", "model.pretrained=null", "data.num_workers=0", "train.batch_size=8",
        "train.epochs=3", "train.log_every=1", "method.warmup_steps=2", "method.up_resolution=20",
        "method.mr_resolution=11")


def run(tmp_path, *overrides, name="run", resume=False):
    cfg = load_config(None, BASE + overrides)
    return train(cfg, tmp_path / name, train_data(), resume=resume, clip=tiny_clip(), progress=False)


def test_training_writes_checkpoints_log_and_summary(tmp_path):
    summary = run(tmp_path)
    run_dir = tmp_path / "run"
    assert summary["steps"] == 18 and summary["total_steps"] == 18
    assert len(summary["evaluations"]) == 3 and "validation" in summary["selection"]
    lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 19))
    assert {"loss", "lr", "images_per_s", "max_memory_mb"} <= set(lines[0])
    best = ckpt.find_checkpoint(run_dir, "best")
    assert best.name == summary["best_checkpoint"]
    assert set(load_file(str(best / "learned.safetensors"))) >= {"image_delta", "token_rows"}
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert len(kept) <= 3 and ckpt.find_checkpoint(run_dir).name == "step-00000018"


def test_loss_decreases_on_fixed_data(tmp_path):
    run(tmp_path, "train.epochs=6")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert sum(losses[-6:]) < sum(losses[:6])


@pytest.mark.parametrize("override, match", [
    ("train.bogus=1", "train.bogus"),
    ("train.batch_size=abc", "train.batch_size"),
    ("method.warmup_steps=50", "warm-up"),
    ("train.batch_size=9", "divisible"),
])
def test_config_errors_name_the_key(tmp_path, override, match):
    overrides = (override, "train.grad_accum=2") if override == "train.batch_size=9" else (override,)
    with pytest.raises(ConfigError if "warm" not in match else ValueError, match=match):
        run(tmp_path, *overrides)


def test_corrupt_or_missing_checkpoint_files_give_clear_errors(tmp_path):
    run(tmp_path, "train.epochs=1")
    path = ckpt.find_checkpoint(tmp_path / "run")
    (path / "learned.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_learned(path)
    (path / "meta.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.read_meta(path)
    with pytest.raises(ckpt.CheckpointError, match="run directory"):
        ckpt.find_checkpoint(tmp_path / "nowhere")


def test_amp_bf16_and_compile_model_smoke(tmp_path):
    summary = run(tmp_path, "train.epochs=1", "train.precision=amp_bf16", "train.compile=model", name="amp")
    assert summary["steps"] == 6


SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from reprogrammer.config import load_config
from reprogrammer.training.engine import train, TrainingInterrupted
from tests.engine_data import train_data
from tests.helpers import tiny_clip
cfg = load_config(None, {overrides!r})
slow = {slow}
data = train_data()
if slow:
    getitem = type(data.train).__getitem__
    def slow_getitem(self, i):
        time.sleep(0.02)
        return getitem(self, i)
    type(data.train).__getitem__ = slow_getitem
try:
    train(cfg, {run_dir!r}, data, resume={resume}, clip=tiny_clip(), progress=False)
except TrainingInterrupted as stop:
    print(stop, file=sys.stderr)
    sys.exit(stop.exit_code)
"""


def _train_subprocess(run_dir, resume=False, slow=False, overrides=()):
    code = SCRIPT.format(root=str(ROOT), overrides=BASE + ("train.epochs=4",) + overrides, run_dir=str(run_dir),
                         resume=resume, slow=slow)
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_sigterm_then_resume_is_bitwise_identical(tmp_path):
    straight = _train_subprocess(tmp_path / "straight", overrides=("method.dropout=0.3",))
    interrupted = _train_subprocess(tmp_path / "cut", slow=True, overrides=("method.dropout=0.3",))
    log = tmp_path / "cut" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGTERM)
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "--resume" in err
    stopped_at = ckpt.read_meta(ckpt.find_checkpoint(tmp_path / "cut"))["step"]
    assert 5 <= stopped_at < 24
    resumed = _train_subprocess(tmp_path / "cut", resume=True, overrides=("method.dropout=0.3",))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    a = load_file(str(ckpt.find_checkpoint(tmp_path / "straight") / "learned.safetensors"))
    b = load_file(str(ckpt.find_checkpoint(tmp_path / "cut") / "learned.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_rejects_another_class_set(tmp_path):
    run(tmp_path, "train.epochs=1")
    data = train_data()
    data.classnames = ["a", "b", "c", "d"]
    cfg = load_config(None, BASE)
    with pytest.raises(ckpt.CheckpointError, match="other classes"):
        train(cfg, tmp_path / "run", data, resume=True, clip=tiny_clip(), progress=False)


def test_two_rank_gloo_ddp_equals_one_rank_with_the_same_global_batch(tmp_path):
    overrides = BASE + ("train.epochs=2", "train.device=cpu")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    script = str(ROOT / "tests" / "scripts" / "ddp_train.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one"), *overrides], check=True, env=env, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    script, str(tmp_path / "two"), *overrides], check=True, env=env, cwd=ROOT)
    one = load_file(str(ckpt.find_checkpoint(tmp_path / "one") / "learned.safetensors"))
    two = load_file(str(ckpt.find_checkpoint(tmp_path / "two") / "learned.safetensors"))
    first_epoch = load_file(str(ckpt.find_checkpoint(tmp_path / "two", "step-00000006") / "learned.safetensors"))
    assert not torch.allclose(two["image_delta"], first_epoch["image_delta"], rtol=1e-3, atol=1e-4)
    for key in one:
        # fp32, same samples per step; only the order of the cross-rank sums differs.
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


def test_nan_loss_in_fp32_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from reprogrammer.methods.reprogramming import ReprogrammerClassifier

    loss = ReprogrammerClassifier.loss
    calls = {"n": 0}

    def poisoned(self, images, labels):
        calls["n"] += 1
        value = loss(self, images, labels)
        return value * float("nan") if calls["n"] > 8 else value

    monkeypatch.setattr(ReprogrammerClassifier, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="nan"):
        run(tmp_path, "train.save_every=4", "train.log_every=3")
    last = ckpt.find_checkpoint(tmp_path / "run")
    assert last.name == "step-00000008"
    assert torch.isfinite(load_file(str(last / "learned.safetensors"))["image_delta"]).all()
