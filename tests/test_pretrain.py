"""Shape-world pretraining: training, determinism, zero-shot evaluation and the on-disk cache."""
import copy
import dataclasses
import hashlib
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from reprogrammer.constants import CLIP_MEAN, CLIP_STD
from reprogrammer.shapeworld import pretrain
from reprogrammer.data import shapeworld as shapeworld

# A CLIP small enough to pretrain in about a second; its context fits every pretraining caption.
MICRO = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "mlp_ratio": 2, "patch_size": 8},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1, "mlp_ratio": 2},
}
SHORT_CONTEXT = copy.deepcopy(MICRO)
SHORT_CONTEXT["text_cfg"]["context_length"] = 12


@pytest.fixture(scope="module", autouse=True)
def micro_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model_configs")
    for name, cfg in (("PT-Micro", MICRO), ("PT-Micro-Short", SHORT_CONTEXT)):
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)


# A mild final logit scale: a one-layer model cannot yet earn the confidence of 100 in 100 steps.
CFG = pretrain.PretrainConfig(model="PT-Micro", n_pairs=601, steps=100, batch_size=32, lr=2e-3, warmup_steps=10,
                              n_eval=37, logit_scale=20.0)


@pytest.fixture(scope="module")
def trained(micro_models):
    return pretrain.pretrain_shapeworld(CFG, progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROGRAMMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def counted_pretraining(trained, monkeypatch):
    """Replace pretraining by a copy of the module's trained model; the list counts the calls."""
    calls = []

    def fake(cfg, progress=True):
        calls.append(cfg)
        model, tokenizer, report = trained
        return copy.deepcopy(model), tokenizer, copy.deepcopy(report)

    monkeypatch.setattr(pretrain, "pretrain_shapeworld", fake)
    return calls


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    a, b = state(a), state(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def test_short_pretraining_lowers_the_loss_and_reports(trained):
    _, _, report = trained
    losses = report["losses"]
    assert len(losses) == report["steps"] == CFG.steps
    # log(batch) is the loss of features that carry no information about which caption is whose.
    # Identical captions in a batch (a quarter are bare class prompts over 24 shapes) keep the
    # loss of even a perfect model well above 0, so 100 steps get only part of the way down.
    assert np.mean(losses[-10:]) < np.log(CFG.batch_size) - 0.1 < losses[0], losses
    assert report["final_loss"] == pytest.approx(np.mean(losses[-5:]), abs=1e-3)
    assert set(report["zero_shot_accuracy"]) == {"id", *shapeworld.COVARIATE_DOMAINS}
    assert all(0 <= v <= 1 for v in report["zero_shot_accuracy"].values())
    assert report["config"] == dataclasses.asdict(CFG)
    assert report["seconds"] >= report["train_seconds"] > 0
    assert trained[0].logit_scale.exp().item() == pytest.approx(CFG.logit_scale)
    assert not trained[0].logit_scale.requires_grad


def test_logit_scale_rises_from_clips_initial_value_to_the_configured_one_at_half_the_steps():
    cfg = dataclasses.replace(CFG, steps=10, logit_scale=100.0)
    scales = [pretrain.logit_scale_at(step, cfg) for step in range(10)]
    assert scales[0] == pytest.approx(1 / 0.07)
    assert scales[2] == pytest.approx(np.exp(np.log(1 / 0.07) + 0.4 * np.log(100 * 0.07)))  # 2/5 of the log range
    assert scales[5:] == pytest.approx([100.0] * 5)
    assert all(a < b for a, b in zip(scales[:6], scales[1:6]))


def test_pretraining_is_deterministic_and_leaves_global_state_alone(trained):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    model, _, report = pretrain.pretrain_shapeworld(CFG, progress=False)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream is untouched
    assert torch.get_num_threads() == threads
    assert report["losses"] == trained[2]["losses"]
    assert_same_weights(model, trained[0])


def test_another_seed_gives_other_weights(trained):
    model, _, _ = pretrain.pretrain_shapeworld(dataclasses.replace(CFG, seed=1, steps=12), progress=False)
    assert not torch.equal(model.visual.conv1.weight, trained[0].visual.conv1.weight)


def test_pretraining_pairs_are_resized_to_the_input_size():
    images, captions = pretrain._pretraining_data(dataclasses.replace(CFG, n_pairs=9, resolutions=(32, 24)), 32)
    assert images.shape == (9, 3, 32, 32) and images.dtype == np.uint8 and len(captions) == 9
    first, _, first_captions = shapeworld.pretraining_pairs(5, 0, 32)  # seed * 2 + share index
    small, _, small_captions = shapeworld.pretraining_pairs(4, 1, 24)
    up = F.interpolate(torch.from_numpy(small).double() / 255, size=(32, 32), mode="bicubic", align_corners=False)
    up = (up.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(images[:5], first)
    assert np.abs(images[5:].astype(int) - up).max() <= 1  # float32 vs float64 rounding
    assert captions == first_captions + small_captions


def test_a_caption_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="context_length"):
        pretrain.pretrain_shapeworld(dataclasses.replace(CFG, model="PT-Micro-Short", n_pairs=400), progress=False)


def test_tokens_match_the_tokenizer_caption_by_caption():
    tokenizer = open_clip.get_tokenizer("PT-Micro")
    captions = ["a photo of a star", "a ring", "a photo of a star", "a blurry photo of a small red heart"]
    tokens = pretrain._tokenize(captions, tokenizer, 20)
    expected = torch.cat([tokenizer([c], context_length=20) for c in captions])
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("change", [{"steps": 0}, {"n_pairs": 0}, {"batch_size": 0}, {"resolutions": ()},
                                    {"lr": 0.0}, {"weight_decay": -0.1}, {"logit_scale": 0.0}])
def test_bad_configs_are_refused(change):
    with pytest.raises(ValueError):
        dataclasses.replace(CFG, **change)


def test_batches_larger_than_the_data_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        pretrain.pretrain_shapeworld(dataclasses.replace(CFG, n_pairs=20), progress=False)


# ---------------------------------------------------------------------------------------------
# Zero-shot evaluation
# ---------------------------------------------------------------------------------------------
def test_zero_shot_accuracy_matches_an_independent_computation(trained):
    model, tokenizer, _ = trained
    classnames = list(shapeworld.ID_CLASSES[:7])
    images = np.random.default_rng(5).integers(0, 256, (37, 3, 23, 23), dtype=np.uint8)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    with torch.no_grad():
        x = F.interpolate(torch.from_numpy(images).double() / 255, size=(32, 32), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        image_features = F.normalize(model.encode_image(((x - mean) / std).float()), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}" for c in classnames])), dim=-1)
    predicted = (image_features @ text_features.T).argmax(1).numpy()
    assert len(set(predicted)) > 1  # a constant prediction would make the check below weak
    # Every prediction must agree: all right against these labels, all wrong against shifted ones.
    assert pretrain.zero_shot_accuracy(model, tokenizer, classnames, images, predicted, batch_size=10) == 1.0
    shifted = (predicted + 1) % len(classnames)
    assert pretrain.zero_shot_accuracy(model, tokenizer, classnames, images, shifted, batch_size=10) == 0.0


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------
def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("REPROGRAMMER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrain.cache_dir() == tmp_path / "xdg" / "reprogrammer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pretrain.cache_dir() == tmp_path / "home" / ".cache" / "reprogrammer"
    monkeypatch.setenv("REPROGRAMMER_CACHE", str(tmp_path / "mine"))
    assert pretrain.cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("change", [{"seed": 1}, {"steps": 101}, {"lr": 1e-3}, {"resolutions": (32,)},
                                    {"model": "PT-Micro-Short"}, {"n_eval": 38}])
def test_hash_changes_with_the_config(change):
    assert pretrain.config_hash(dataclasses.replace(CFG)) == pretrain.config_hash(CFG)
    assert pretrain.config_hash(dataclasses.replace(CFG, **change)) != pretrain.config_hash(CFG)


def test_hash_changes_with_the_model_config(monkeypatch):
    before = pretrain.config_hash(CFG)
    wider = copy.deepcopy(MICRO)
    wider["vision_cfg"]["width"] = 48
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: copy.deepcopy(wider))
    assert pretrain.config_hash(CFG) != before


def test_hash_changes_with_the_generator_code(monkeypatch, tmp_path):
    before = pretrain.config_hash(CFG)
    edited = tmp_path / "shapeworld.py"
    edited.write_bytes(open(shapeworld.__file__, "rb").read() + b"\nMIN_RESOLUTION = 12\n")
    monkeypatch.setattr(shapeworld, "__file__", str(edited))
    assert pretrain.config_hash(CFG) != before


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        pretrain.config_hash(dataclasses.replace(CFG, model="No-Such-Model"))


def test_cache_round_trip(cache, counted_pretraining, trained):
    assert pretrain.cached_report("PT-Micro", config=CFG) is None
    model, _ = pretrain.load_shapeworld_clip("PT-Micro", config=CFG, progress=False)
    key = pretrain.config_hash(CFG)
    assert sorted(p.name for p in cache.iterdir()) == [f"{key}.json", f"{key}.safetensors"]
    report = pretrain.cached_report("PT-Micro", config=CFG)
    assert report["weights_sha256"] == hashlib.sha256((cache / f"{key}.safetensors").read_bytes()).hexdigest()
    assert report["losses"] == trained[2]["losses"]
    assert not model.training

    again, tokenizer = pretrain.load_shapeworld_clip("PT-Micro", config=CFG, progress=False)
    assert len(counted_pretraining) == 1  # the second call loaded the cache
    assert_same_weights(again, model)
    assert not again.training
    assert tokenizer(["a photo of a star"]).shape == (1, MICRO["text_cfg"]["context_length"])


def test_default_config_is_keyed_by_the_name(cache, counted_pretraining):
    with pytest.raises(ValueError, match="differs"):
        pretrain.load_shapeworld_clip("RP-ViT-Small", config=CFG)
    assert pretrain.cached_report("RP-ViT-Small") is None


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped weight byte": lambda weights, report: _flip_a_byte(weights),
    "truncated weights": lambda weights, report: weights.write_bytes(weights.read_bytes()[:100]),
    "missing weights": lambda weights, report: weights.unlink(),
    "garbage report": lambda weights, report: report.write_text("{not json"),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_cache_is_rebuilt_with_a_warning(cache, counted_pretraining, corrupt):
    model, _ = pretrain.load_shapeworld_clip("PT-Micro", config=CFG, progress=False)
    weights, report = pretrain._paths(CFG)
    corrupt(weights, report)
    with pytest.warns(UserWarning, match="unusable"):
        rebuilt, _ = pretrain.load_shapeworld_clip("PT-Micro", config=CFG, progress=False)
    assert len(counted_pretraining) == 2
    assert_same_weights(rebuilt, model)
    reloaded, _ = pretrain.load_shapeworld_clip("PT-Micro", config=CFG, progress=False)  # healthy again
    assert len(counted_pretraining) == 2
    assert_same_weights(reloaded, model)


def test_weights_without_a_report_are_an_interrupted_run(cache, counted_pretraining, recwarn):
    pretrain.load_shapeworld_clip("PT-Micro", config=CFG, progress=False)
    pretrain._paths(CFG)[1].unlink()
    pretrain.load_shapeworld_clip("PT-Micro", config=CFG, progress=False)
    assert len(counted_pretraining) == 2
    assert not [w for w in recwarn if "unusable" in str(w.message)]


def test_a_failed_write_leaves_no_file(cache, counted_pretraining, monkeypatch):
    def broken_save(model, path):
        path.write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(pretrain, "save_clip", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain.load_shapeworld_clip("PT-Micro", config=CFG, progress=False)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Zero-shot quality of a longer run
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretraining_gives_zero_shot_accuracy_well_above_chance():
    cfg = pretrain.PretrainConfig(n_pairs=20_000, steps=400, warmup_steps=30, n_eval=500)
    _, _, report = pretrain.pretrain_shapeworld(cfg, progress=False)
    chance = 1 / len(shapeworld.ID_CLASSES)
    assert report["zero_shot_accuracy"]["id"] > 2 * chance, report["zero_shot_accuracy"]
