"""Where a CLIP's weights come from: a local checkpoint file, an open_clip `local-dir:` folder (no
false "random weights" warning), and `pretrained: shapeworld` only for the built-in architectures."""
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reprogrammer.clip import WEIGHTS_DIR, clip_from_config, image_normalisation, load_clip
from reprogrammer.config import ConfigError, load_config
from tests.helpers import tiny_clip

TINY_CONFIG = Path(__file__).resolve().parents[1] / "reprogrammer" / "model_configs" / "RP-ViT-Tiny.json"


def _saved_weights(path: Path) -> dict[str, torch.Tensor]:
    """Random RP-ViT-Tiny weights written to `path` in safetensors (open_clip's own file format)."""
    model, _ = tiny_clip(seed=7)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def _load_quietly(*args):
    """`load_clip(*args)` and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = load_clip(*args)
    return model, tokenizer, [str(w.message) for w in caught]


def _assert_weights(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def _local_dir(folder: Path, with_weights: bool = True):
    """An open_clip 3.x local-dir model: open_clip_config.json (model_cfg + preprocess_cfg) and
    open_clip_model.safetensors, the file names open_clip's factory looks for."""
    folder.mkdir()
    config = {"model_cfg": json.loads(TINY_CONFIG.read_text()),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return _saved_weights(folder / "open_clip_model.safetensors") if with_weights else None


def test_local_dir_model_loads_its_weights_without_a_random_weights_warning(tmp_path):
    state = _local_dir(tmp_path / "tiny")
    model, tokenizer, messages = _load_quietly(f"local-dir:{tmp_path / 'tiny'}")
    assert not [m for m in messages if "random weights" in m], messages
    _assert_weights(model, state)
    assert image_normalisation(model) == ((0.5,) * 3, (0.25,) * 3)
    assert tokenizer(["a photo of a cat"]).shape == (1, 16)


def test_local_dir_without_weights_warns(tmp_path):
    _local_dir(tmp_path / "empty", with_weights=False)
    _, _, messages = _load_quietly(f"local-dir:{tmp_path / 'empty'}")
    assert any("random weights" in m for m in messages), messages


def test_self_contained_models_refuse_a_pretrained_tag(tmp_path):
    _local_dir(tmp_path / "tiny")
    with pytest.raises(ValueError, match="carries its own weights; set pretrained"):
        load_clip(f"local-dir:{tmp_path / 'tiny'}", "openai")


def test_local_checkpoint_file(tmp_path):
    state = _saved_weights(tmp_path / "tiny.safetensors")
    model, _, messages = _load_quietly("RP-ViT-Tiny", str(tmp_path / "tiny.safetensors"))
    assert not [m for m in messages if "random weights" in m], messages
    _assert_weights(model, state)


def test_random_weights_warn_once_and_open_clips_notice_is_dropped(monkeypatch, caplog):
    monkeypatch.setattr("reprogrammer.clip._WARNED_RANDOM", set())
    with caplog.at_level(logging.INFO):
        _, _, messages = _load_quietly("RP-ViT-Tiny")
        assert sum("random weights" in m for m in messages) == 1, messages
        _, _, messages = _load_quietly("RP-ViT-Tiny")  # a second caller: no second warning
        assert not messages, messages
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()], caplog.records
    assert not [m for m in _load_quietly("RP-ViT-Small", "shapeworld")[2] if "random" in m]


def test_shapeworld_is_only_for_the_built_in_architectures_and_loading_never_trains(monkeypatch):
    def no_pretraining(*args, **kwargs):
        raise AssertionError("loading a CLIP started a pretraining")

    monkeypatch.setattr("reprogrammer.shapeworld.pretrain.pretrain_shapeworld", no_pretraining)
    for name in ("ViT-B-32", "local-dir:/models/tiny"):
        cfg = load_config(None, (f"model.name={name}",))
        assert cfg.model.pretrained == "shapeworld"  # the default
        with pytest.raises(ConfigError, match="only for the built-in architectures RP-ViT-Tiny, RP-ViT-Small"):
            clip_from_config(cfg)
    # A built-in architecture without shipped weights: told how to make them, nothing trains.
    with pytest.raises(FileNotFoundError, match="reprogrammer pretrain --model RP-ViT-Tiny"):
        clip_from_config(load_config(None, ("model.name=RP-ViT-Tiny",)))


def test_the_shipped_weights_load_by_their_tag():
    model, _ = load_clip("RP-ViT-Small", "shapeworld")
    shipped = load_file(WEIGHTS_DIR / "RP-ViT-Small.safetensors")
    assert set(shipped) == set(model.state_dict())
    assert all(torch.equal(value.float(), shipped[key].float()) for key, value in model.state_dict().items())
