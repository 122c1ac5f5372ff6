"""The shape-world CLIP shipped with the package and `reprogrammer pretrain`, which reproduces it."""
import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from reprogrammer import clip
from reprogrammer.cli import main
from reprogrammer.shapeworld import shipped
from reprogrammer.shapeworld.pretrain import PretrainConfig

from .test_pretrain import micro_models  # noqa: F401 - the fixture registers the PT-Micro model config

NAME = "RP-ViT-Small"
TINY = ["n_pairs=300", "steps=6", "batch_size=32", "warmup_steps=2", "n_eval=20", "resolutions=24"]


def test_shipped_weights_match_their_recorded_hash_and_config():
    record = clip.shipped_record(NAME)
    weights = clip.WEIGHTS_DIR / f"{NAME}.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == record["weights_sha256"]
    assert all(t.dtype == torch.float16 for k, t in load_file(str(weights)).items() if t.is_floating_point())
    assert weights.stat().st_size < 16 * 2 ** 20  # a few MB in the wheel
    cfg = shipped.record_config(record)
    assert dataclasses.asdict(cfg) == record["config"] | {"resolutions": tuple(record["config"]["resolutions"])}
    assert f"--threads {record['threads']}" in record["command"]
    # The command that made them, replayed on the config defaults, gives the recorded config.
    overrides = [word for word in record["command"].split() if "=" in word]
    assert shipped.parse_overrides(PretrainConfig(), overrides) == cfg


def test_shipped_weights_reach_their_recorded_zero_shot_table_on_a_small_sample():
    record = clip.shipped_record(NAME)
    model, tokenizer = clip.load_clip(NAME, "shapeworld")
    assert model.logit_scale.exp().item() == pytest.approx(record["config"]["logit_scale"], rel=1e-3)
    got = shipped.zero_shot_sample(model, tokenizer, shipped.record_config(record))
    expected = record["zero_shot_sample"]["accuracy"]
    assert got.keys() == expected.keys()
    for name in got:  # at most one image may flip between thread counts
        assert abs(got[name] - expected[name]) <= 1 / record["zero_shot_sample"]["size"], (name, got, expected)
    assert record["zero_shot_accuracy"]["id"] >= 0.8


def test_corrupt_shipped_weights_are_refused(tmp_path, monkeypatch):
    for suffix in (".json", ".safetensors"):
        shutil.copy(clip.WEIGHTS_DIR / f"{NAME}{suffix}", tmp_path)
    weights = tmp_path / f"{NAME}.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(clip, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        clip.load_clip(NAME, "shapeworld")


def test_the_builtin_clip_is_the_shipped_one_unless_a_config_is_given(monkeypatch):
    monkeypatch.setattr(shipped, "load_shapeworld_clip", lambda *a, **k: pytest.fail("pretrained instead"))
    model, _, record = shipped.builtin_clip(NAME)
    assert record == clip.shipped_record(NAME)
    reference, _ = clip.load_clip(NAME, "shapeworld")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# `reprogrammer pretrain`
# ---------------------------------------------------------------------------------------------
def _pretrain(out, *extra):
    args = ["pretrain", "--out", str(out), "--model", "PT-Micro", "--threads", "1"]
    return main(args + [a for o in TINY + list(extra) for a in ("--set", o)])


def test_pretrain_command_is_bitwise_deterministic(tmp_path, micro_models, capsys):  # noqa: F811
    assert _pretrain(tmp_path / "a") == 0
    torch.manual_seed(12345)  # the caller's random state must not reach the weights
    assert _pretrain(tmp_path / "b") == 0
    first, second = (tmp_path / d / "PT-Micro.safetensors" for d in "ab")
    assert first.read_bytes() == second.read_bytes()
    record = json.loads((tmp_path / "a" / "PT-Micro.json").read_text())
    assert record["weights_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert record["config"]["steps"] == 6 and record["threads"] == 1
    assert _pretrain(tmp_path / "c", "seed=1") == 0
    assert (tmp_path / "c" / "PT-Micro.safetensors").read_bytes() != first.read_bytes()


def test_pretrain_command_checks_the_hash_of_the_shipped_config(tmp_path, micro_models, monkeypatch,
                                                                  capsys):  # noqa: F811
    assert _pretrain(tmp_path / "a") == 0
    record = json.loads((tmp_path / "a" / "PT-Micro.json").read_text())
    # Pretend these weights ship: the same config must give them again, bit for bit.
    monkeypatch.setattr(shipped, "shipped_record", lambda name: dict(record) if name == "PT-Micro" else None)
    assert main(["pretrain", "--out", str(tmp_path / "b"), "--model", "PT-Micro"]) == 0
    assert "bit for bit the shipped weights" in capsys.readouterr().out
    record["weights_sha256"] = "0" * 64
    assert main(["pretrain", "--out", str(tmp_path / "c"), "--model", "PT-Micro"]) == 2
    assert "differs from the shipped weights" in capsys.readouterr().err
    # Another config is a new model: nothing to compare with.
    assert main(["pretrain", "--out", str(tmp_path / "d"), "--model", "PT-Micro", "--set", "steps=7"]) == 0


@pytest.mark.parametrize("override", ["nope=1", "steps", "steps=1.5", "lr=fast", "resolutions=a,b"])
def test_bad_pretraining_overrides_are_refused(override):
    with pytest.raises(ValueError):
        shipped.parse_overrides(PretrainConfig(), [override])


def test_pretrain_refuses_a_model_override_that_contradicts_the_model(tmp_path):
    with pytest.raises(ValueError, match="--model"):
        shipped.run_pretrain(tmp_path, model=NAME, overrides=["model=RP-ViT-Tiny"])


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stopped_pretraining_says_so_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, stop):
    import os
    import signal

    def stopped_midway(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, stop))  # as Ctrl-C or `kill` would, during the training loop
        pytest.fail("the signal did not stop the pretraining")

    monkeypatch.setattr(shipped, "pretrain_shapeworld", stopped_midway)
    assert main(["pretrain", "--out", str(tmp_path / "out"), "--model", NAME]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing can be resumed" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
