"""Faults injected into tiny CPU trainings: stops at any moment, kills during saves, two
trainings at once, a second training without --resume, damaged files, a full disk, and a run
directory whose meta.json points at a hostile dataset.

Signals and kills run in subprocesses (tests/scripts/fault_train.py, the `reprogrammer train`
command on tests/engine_data.py's colour data: 24 training images, batch 8, 3 steps an epoch,
3 epochs, a checkpoint each epoch). A training sends itself the signal when the training set
serves its K-th sample, so each stop lands at a chosen point of a chosen step.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reprogrammer.cli import main
from reprogrammer.runs import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "scripts" / "fault_train.py")
SETTINGS = ("model.name=RP-ViT-Tiny", "model.pretrained=null", "data.num_workers=0", "train.batch_size=8",
            "train.epochs=3", "train.log_every=1", "train.device=cpu", "train.keep_checkpoints=5",
            "method.warmup_steps=2", "method.up_resolution=20", "method.mr_resolution=11", "method.dropout=0.3")
BATCH = 8


def train_args(out, *extra, settings=()):
    args = ["train", "--out", str(out), *extra]
    for item in SETTINGS + tuple(settings):
        args += ["--set", item]
    return args


def phase(out, *extra, settings=(), **faults):
    return dict(args=train_args(out, *extra, settings=settings), **faults)


def sample_of_step(step: int, micro: int = 0, grad_accum: int = 1) -> int:
    """The 1-based count at which the training set serves the first sample of micro-batch `micro` of
    `step` (1-based); the engine reads one sample before training to learn the image size."""
    return 1 + (step - 1) * BATCH + micro * BATCH // grad_accum + 1


def start(phases):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, SCRIPT, json.dumps(phases)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return [json.loads(line)["exit"] for line in out.splitlines() if line.startswith("{")], err, process.returncode


def run_phases(phases, timeout=600):
    return finish(start(phases), timeout)


def tensors(run_dir, which="latest"):
    path = ckpt.find_checkpoint(run_dir, which)
    return {f"{file}:{key}": value for file in ckpt.TENSOR_FILES
            for key, value in load_file(str(path / file)).items()}


def assert_same_run(run_dir, reference):
    """Every tensor (learned, optimiser, RNG) of the final checkpoint and the best selection equal."""
    a, b = tensors(run_dir), tensors(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    best, expected = ckpt.find_checkpoint(run_dir, "best"), ckpt.find_checkpoint(reference, "best")
    assert best.name == expected.name
    state = ckpt.read_meta(ckpt.find_checkpoint(run_dir))["engine_state"]
    assert state == ckpt.read_meta(ckpt.find_checkpoint(reference))["engine_state"]
    for key, value in tensors(run_dir, "best").items():
        assert torch.equal(value, tensors(reference, "best")[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, with grad_accum 1 and 2."""
    base = tmp_path_factory.mktemp("reference")
    codes, err, _ = run_phases([phase(base / "accum1"), phase(base / "accum2", settings=["train.grad_accum=2"])])
    assert codes == [0, 0], err
    return base


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sigterm_and_sigint_mid_epoch_then_resume_is_bitwise_identical(tmp_path, reference, grad_accum):
    settings = [f"train.grad_accum={grad_accum}"]
    # Inside epoch 1 (step 2), on an epoch's last step (3, a scheduled save), inside epoch 2 (step 5),
    # each time in the last micro-batch of the step.
    stops = [("SIGTERM", 2), ("SIGINT", 3), ("SIGTERM", 5)]
    phases = []
    for name, step in stops:
        out = tmp_path / f"{name}-{step}"
        phases += [phase(out, settings=settings, signal=name,
                         signal_at_sample=sample_of_step(step, grad_accum - 1, grad_accum)),
                   phase(out, "--resume", settings=settings)]
    codes, err, _ = run_phases(phases)
    assert codes == [128 + signal.SIGTERM, 0, 128 + signal.SIGINT, 0, 128 + signal.SIGTERM, 0], err
    assert "stopped by SIGTERM at step 2" in err and "--resume" in err
    for name, step in stops:
        assert_same_run(tmp_path / f"{name}-{step}", reference / f"accum{grad_accum}")
    # The stop at step 2 wrote an interrupt checkpoint: not scored, never `best`.
    interrupt = ckpt.read_meta(tmp_path / "SIGTERM-2" / "checkpoints" / "step-00000002")
    assert interrupt["interrupt"] and interrupt["val_accuracy"] is None


def test_stops_off_the_save_schedule_with_eval_every_then_resume_is_bitwise_identical(tmp_path):
    """`train.eval_every=2` scores steps 2, 4, 6, 8 and 9 between the checkpoints of steps 3, 6, 9: a
    stop on a scored step (4) and on an unscored one (5) resume to the uninterrupted run."""
    settings = ["train.eval_every=2"]
    reference = tmp_path / "reference"
    phases = [phase(reference, settings=settings)]
    for step in (4, 5):
        phases += [phase(tmp_path / f"stop-{step}", settings=settings, signal="SIGTERM",
                         signal_at_sample=sample_of_step(step)),
                   phase(tmp_path / f"stop-{step}", "--resume", settings=settings)]
    codes, err, _ = run_phases(phases)
    assert codes == [0, 128 + signal.SIGTERM, 0, 128 + signal.SIGTERM, 0], err
    scored = [json.loads(line)["step"] for line in (reference / "val_log.jsonl").read_text().splitlines()]
    assert scored == [2, 4, 6, 8, 9]
    for step in (4, 5):
        assert_same_run(tmp_path / f"stop-{step}", reference)
        assert (tmp_path / f"stop-{step}" / "val_log.jsonl").read_text() == (reference / "val_log.jsonl").read_text()
    # The stop at step 5 wrote an interrupt checkpoint: not scored, never `best`.
    interrupt = ckpt.read_meta(tmp_path / "stop-5" / "checkpoints" / "step-00000005")
    assert interrupt["interrupt"] and interrupt["val_accuracy"] is None


def test_sigkill_mid_step_and_during_a_save_then_resume_is_bitwise_identical(tmp_path, reference):
    mid_step, late, in_save = tmp_path / "mid-step", tmp_path / "late", tmp_path / "in-save"
    killed = [start([phase(mid_step, signal="SIGKILL", signal_at_sample=sample_of_step(5) + 3)]),
              start([phase(late, signal="SIGKILL", signal_at_sample=sample_of_step(8) + 6)]),
              # Tensor files 1-2 are step 3's checkpoint; file 3 is the first of step 6's.
              start([phase(in_save, kill_after_file=3)])]
    for process in killed:
        codes, err, returncode = finish(process)
        assert codes == [] and returncode == -signal.SIGKILL, err
    temporaries = list((in_save / "checkpoints").glob(".step-*"))
    assert temporaries and ckpt.find_checkpoint(in_save).name == "step-00000003"
    assert (mid_step / ".lock").exists()  # a killed training cannot release its lock
    assert ckpt.find_checkpoint(late).name == "step-00000006"
    codes, err, _ = run_phases([phase(mid_step, "--resume"), phase(late, "--resume"), phase(in_save, "--resume")])
    assert codes == [0, 0, 0], err
    assert "ended without releasing it" in err and "removed 1 temporaries" in err
    assert not list((in_save / "checkpoints").glob(".step-*"))
    for run_dir in (mid_step, late, in_save):
        assert_same_run(run_dir, reference / "accum1")
        assert not (run_dir / ".lock").exists()


def test_two_trainings_into_one_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    first = start([phase(run_dir, slow=0.25)])
    lock = run_dir / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.05)
    codes, err, _ = run_phases([phase(run_dir, "--resume"), phase(run_dir, "--overwrite")])
    assert codes == [2, 2], err
    assert err.count(f"in use by another training (pid {first.pid}") == 2
    first.send_signal(signal.SIGTERM)
    codes, err, _ = finish(first)
    assert codes == [128 + signal.SIGTERM], err
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one training's log, not two interleaved
    assert ckpt.find_checkpoint(run_dir).name == f"step-{steps[-1]:08d}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, monkeypatch_module):
    """A finished run (checkpoints at steps 3, 6 and 9), trained in this process through the CLI."""
    from tests.engine_data import train_data

    monkeypatch_module.setattr("reprogrammer.data.suites.build_train_data", lambda cfg: train_data(24, 8))
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_args(run_dir)) == 0
    return run_dir


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_without_resume_into_a_run_is_refused_and_changes_nothing(trained, capsys):
    before = snapshot(trained)
    assert main(train_args(trained)) == 2
    err = capsys.readouterr().err
    assert "already holds a training run (checkpoints up to step-00000009)" in err
    assert "--resume" in err and "--overwrite" in err
    assert snapshot(trained) == before


def test_overwrite_replaces_the_run(tmp_path, trained, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "notes.txt").write_text("mine")
    assert main(train_args(run_dir, "--overwrite", settings=["train.epochs=1"])) == 0
    assert [p.name for p in ckpt.step_directories(run_dir / "checkpoints")] == ["step-00000003"]
    assert len((run_dir / "train_log.jsonl").read_text().splitlines()) == 3
    assert (run_dir / "notes.txt").read_text() == "mine"  # only what training writes is replaced


def flip_bytes(path: Path, count: int = 100, start: int = 200) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_detected_and_latest_falls_back(tmp_path, trained, caplog):
    import shutil

    from reprogrammer.runs.restore import load_run

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoints" / "step-00000009"
    flip_bytes(last / "learned.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="step-00000009/learned.safetensors is corrupt: its SHA-256"):
        load_run(run_dir, "step-00000009")
    assert main(["export", "--checkpoint", str(run_dir), "--which", "step-00000009", "--out",
                 str(tmp_path / "m.onnx"), "--calibration-samples", "0"]) == 2
    assert not (tmp_path / "m.onnx").exists()
    with caplog.at_level("WARNING"):
        assert ckpt.find_checkpoint(run_dir).name == "step-00000006"
    assert "step-00000009/learned.safetensors is corrupt" in caplog.text
    # A garbage pointer: the same fallback, naming the pointer.
    (run_dir / "checkpoints" / "latest.json").write_text("{not json")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert ckpt.find_checkpoint(run_dir).name == "step-00000006"
    assert "latest.json is corrupt" in caplog.text
    flip_bytes(run_dir / "checkpoints" / "step-00000006" / "training.safetensors", count=1)
    assert ckpt.find_checkpoint(run_dir).name == "step-00000003"


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # learned.safetensors is ~30 kB: a 20 kB file-size limit fails the save of step 6.
    codes, err, _ = run_phases([phase(run_dir, settings=["train.epochs=1"]),
                                phase(run_dir, "--resume", settings=["train.epochs=2"], fsize=20_000)])
    assert codes == [0, 2], err
    message = [line for line in err.splitlines() if "error:" in line]
    assert len(message) == 1 and "could not write checkpoint step-00000006" in message[0]
    assert "the previous checkpoint step-00000003 is intact" in message[0] and "--resume" in message[0]
    assert not list((run_dir / "checkpoints").glob(".step-*"))
    assert ckpt.find_checkpoint(run_dir).name == "step-00000003"
    assert ckpt.damage(run_dir / "checkpoints" / "step-00000003") is None


class Payload:
    """Unpickling this creates `marker`: what a hostile dataset file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_an_untrusted_meta_json_cannot_make_eval_or_export_unpickle(tmp_path, trained, capsys):
    import shutil

    run_dir, hostile = tmp_path / "run", tmp_path / "cifar-10-batches-py"
    shutil.copytree(trained, run_dir)
    hostile.mkdir()
    marker = tmp_path / "executed"
    for name in ("batches.meta", "test_batch", *[f"data_batch_{i}" for i in range(1, 6)]):
        (hostile / name).write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}))
    for meta_path in (run_dir / "checkpoints").glob("step-*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta["config"]["data"].update(dataset="cifar10", root=str(hostile))
        meta_path.write_text(json.dumps(meta))
    before = snapshot(run_dir)
    assert main(["eval", "--checkpoint", str(run_dir), "--out", str(tmp_path / "eval")]) == 2
    assert "not a run directory's to choose" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not a run directory's to choose" in capsys.readouterr().err
    # Even the user's own --set on such files: the unpickler refuses the payload.
    assert main(["eval", "--checkpoint", str(run_dir), "--out", str(tmp_path / "eval"),
                 "--set", f"data.root={hostile}"]) == 2
    err = capsys.readouterr().err
    assert "refused: unpickling it could run code" in err.splitlines()[0]
    assert not marker.exists() and snapshot(run_dir) == before
    assert not (tmp_path / "eval").exists() and not (tmp_path / "m.onnx").exists()


def test_validation_draws_no_global_random_numbers():
    from reprogrammer.training.distributed import DistInfo
    from reprogrammer.training.engine import evaluate_accuracy
    from tests.engine_data import colour_dataset

    class Probe(torch.nn.Module):  # takes batches as the engine passes them: uint8 [B, 3, H, W]
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 12 * 12, 4)

        def forward(self, images):
            return self.linear(images.flatten(1).float() / 255)

    classifier = Probe()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    accuracy = evaluate_accuracy(classifier, colour_dataset(10, 1), 4, torch.device("cpu"), "fp32", DistInfo())
    assert 0.0 <= accuracy <= 1.0 and classifier.training
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_resumable_sampler_starts_epoch_e_after_skip_samples(rank, world_size):
    from reprogrammer.training.distributed import DistInfo, ResumableSampler

    dataset, seed = list(range(11)), 3
    sampler = ResumableSampler(dataset, DistInfo(rank, world_size), seed=seed)

    def order(epoch):  # DistributedSampler's shuffle: randperm seeded with seed + epoch, rank-strided
        perm = torch.randperm(11, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        usable = 11 // world_size * world_size
        return perm[:usable][rank::world_size]

    assert order(1) != order(2)
    sampler.set_position(2, 3)
    assert len(sampler) == len(order(2)) - 3 and list(sampler) == order(2)[3:]
    assert list(sampler) == order(2)  # the skip applies to one pass only
    sampler.set_position(1, 0)
    assert list(sampler) == order(1)


class _Learned:
    def __init__(self, value):
        self.value = value

    def learned_state(self):
        return {"w": torch.full((4,), float(self.value))}


def test_an_interrupted_pointer_write_leaves_the_previous_pointer(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, _Learned(1), [], [], {}, best=True)
    write_text = Path.write_text

    def killed_halfway(self, text, *args, **kwargs):
        if "latest.json" in self.name:
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt  # the process dies in the middle of the write
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, _Learned(2), [], [], {}, best=True)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert json.loads((root / "latest.json").read_text())["checkpoint"] == "step-00000001"
    assert json.loads((root / "best.json").read_text())["checkpoint"] == "step-00000001"
    assert not list(root.glob(".*.tmp"))
