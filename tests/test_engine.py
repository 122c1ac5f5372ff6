import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reprogrammer.config import ConfigError, load_config
from reprogrammer.methods import build_method
from reprogrammer.runs import checkpoint as ckpt
from reprogrammer.training.engine import TrainingDiverged, train
from tests.engine_data import train_data
from tests.helpers import tiny_clip

ROOT = Path(__file__).resolve().parents[1]
BASE = ("model.name=RP-ViT-Tiny", "model.pretrained=null", "data.num_workers=0", "train.batch_size=8",
        "train.epochs=3", "train.log_every=1", "method.warmup_steps=2", "method.up_resolution=20",
        "method.mr_resolution=11")


def run(tmp_path, *overrides, name="run", resume=False, data=None):
    cfg = load_config(None, BASE + overrides)
    return train(cfg, tmp_path / name, data or train_data(), resume=resume, clip=tiny_clip(), progress=False)


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


def test_the_engine_takes_the_steps_of_a_plain_training_loop(tmp_path):
    """Four steps of the engine (which cross an epoch, so the second epoch's shuffle is used) equal
    a hand-written loop: seed, build, shuffle with the sampler's seed + epoch, step the optimisers
    and schedulers once per batch."""
    data = train_data(n_train=24)  # 3 steps an epoch
    run(tmp_path, "train.max_steps=4", data=data)
    trained = load_file(str(ckpt.find_checkpoint(tmp_path / "run") / "learned.safetensors"))

    cfg = load_config(None, BASE + ("train.max_steps=4",))
    clip, tokenizer = tiny_clip()
    torch.manual_seed(cfg.train.seed)
    classifier = build_method(clip, tokenizer, data.classnames, cfg.method)
    optimizers, schedulers = classifier.make_optimizers(4)
    classifier.train()
    order = [i for epoch in (0, 1)
             for i in torch.randperm(24, generator=torch.Generator().manual_seed(cfg.train.seed + epoch)).tolist()]
    for step in range(4):
        batch = [data.train[i] for i in order[8 * step:8 * step + 8]]
        images = torch.stack([image for image, _ in batch]).float() / 255
        labels = torch.tensor([label for _, label in batch])
        for optimizer in optimizers:
            optimizer.zero_grad()
        classifier.loss(images, labels).backward()
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    expected = classifier.learned_state()
    assert set(trained) == set(expected)
    for key in trained:
        torch.testing.assert_close(trained[key], expected[key].detach(), rtol=1e-6, atol=1e-7, msg=key)
    assert not torch.allclose(trained["image_delta"], build_method(clip, tokenizer, data.classnames,
                                                                   cfg.method).image_delta, atol=1e-3)


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


def test_amp_bf16_training_follows_the_fp32_trajectory(tmp_path):
    fp32, bf16 = run(tmp_path, "train.epochs=1", name="fp32"), run(tmp_path, "train.epochs=1",
                                                                   "train.precision=amp_bf16", name="bf16")
    assert fp32["steps"] == bf16["steps"] == 6
    clip, tokenizer = tiny_clip()
    torch.manual_seed(1)  # train.seed: the engine seeds, then builds the method
    start = build_method(clip, tokenizer, train_data().classnames, load_config(None, BASE).method).image_delta.detach()
    a, b = (load_file(str(ckpt.find_checkpoint(tmp_path / name) / "learned.safetensors"))["image_delta"]
            for name in ("fp32", "bf16"))
    assert a.dtype == b.dtype == torch.float32  # the learned tensors stay fp32 under autocast
    moved = (a - start).norm()
    # bf16 rounding perturbs the steps a little (so autocast did run in bf16), but the run follows fp32.
    assert moved > 0.1 and 0 < (b - a).norm() < 0.01 * moved, ((b - a).norm(), moved)


def test_resume_rejects_another_class_set_or_another_served_alpha(tmp_path):
    run(tmp_path, "train.epochs=1")
    data = train_data()
    data.classnames = ["a", "b", "c", "d"]
    cfg = load_config(None, BASE)
    with pytest.raises(ckpt.CheckpointError, match="other classes"):
        train(cfg, tmp_path / "run", data, resume=True, clip=tiny_clip(), progress=False)
    # The evaluations so far scored the classifier at alpha 0.4: scores at 0.3 would not compare.
    with pytest.raises(ckpt.CheckpointError, match="scored at alpha 0.4, this run serves alpha 0.3"):
        run(tmp_path, "method.alpha=0.3", resume=True)


def test_eval_every_validates_every_k_steps_and_checkpoints_each_new_best(tmp_path):
    # 48 images, batch 8: 6 steps an epoch, 12 steps, a scheduled checkpoint after each epoch.
    summary = run(tmp_path, "train.epochs=2", "train.eval_every=5", "train.keep_checkpoints=20")
    run_dir = tmp_path / "run"
    scores = {r["step"]: r["accuracy"] for r in map(json.loads, (run_dir / "val_log.jsonl").read_text().splitlines())}
    assert list(scores) == [5, 10, 12]  # every 5 steps, and the last
    assert [e["step"] for e in summary["evaluations"]] == [5, 10, 12]
    new_bests, best = [], -1.0
    for step, accuracy in scores.items():
        if accuracy > best:
            new_bests.append(step)
            best = accuracy
    written = {int(path.name.removeprefix("step-")) for path in (run_dir / "checkpoints").glob("step-*")}
    assert written == {6, 12} | set(new_bests)  # step 5 is the first score, always a new best
    assert summary["best_checkpoint"] == ckpt.find_checkpoint(run_dir, "best").name == f"step-{new_bests[-1]:08d}"
    for step in written:
        assert ckpt.read_meta(run_dir / "checkpoints" / f"step-{step:08d}")["val_accuracy"] == scores.get(step)


def test_validation_scores_the_classifier_at_the_alpha_the_run_serves(tmp_path, monkeypatch):
    """`best` is chosen among the classifiers `load_run` serves, a Reprogrammer at `method.alpha`,
    though plain Reprogrammer (alpha 0) is what trains: each recorded score is the served
    classifier's accuracy on the validation split, counted here by hand."""
    from reprogrammer.runs.restore import load_run
    from reprogrammer.training import engine

    scored_at = []

    def recording(classifier, *args, **kwargs):
        scored_at.append(classifier.alpha)
        return evaluate_accuracy(classifier, *args, **kwargs)

    evaluate_accuracy = engine.evaluate_accuracy
    monkeypatch.setattr(engine, "evaluate_accuracy", recording)
    data = train_data()
    summary = run(tmp_path, "train.epochs=2", "method.alpha=0.7", "train.keep_checkpoints=5", data=data)
    assert scored_at == [0.7, 0.7]
    assert summary["selection_alpha"] == 0.7 and "residual alpha 0.7 (method.alpha)" in summary["selection"]
    assert [e["alpha"] for e in summary["evaluations"]] == [0.7, 0.7]
    images = torch.stack([data.val[i][0] for i in range(len(data.val))]).float() / 255
    labels = torch.tensor([data.val[i][1] for i in range(len(data.val))])
    for evaluation in summary["evaluations"]:
        served, _, _ = load_run(tmp_path / "run", f"step-{evaluation['step']:08d}", clip=tiny_clip())
        assert served.alpha == 0.7
        with torch.no_grad():
            correct = (served(images).argmax(-1) == labels).sum().item()
        assert evaluation["val_accuracy"] == pytest.approx(correct / len(labels), abs=1e-12)


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
    with pytest.raises(TrainingDiverged, match="nan by step 9.*--resume continues from the last checkpoint, "
                                               "step-00000008"):
        run(tmp_path, "train.save_every=4", "train.log_every=3")
    last = ckpt.find_checkpoint(tmp_path / "run")
    assert last.name == "step-00000008"
    assert torch.isfinite(load_file(str(last / "learned.safetensors"))["image_delta"]).all()
