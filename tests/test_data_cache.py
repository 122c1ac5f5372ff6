"""`reprogrammer data cache` round-trips an ImageNet-format folder, and training reads the cache."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from reprogrammer.cli import main
from reprogrammer.config import load_config
from reprogrammer.data import build_dataset
from reprogrammer.data.cache import CachedImageDataset
from reprogrammer.data.suites import build_train_data

WNIDS = ["n01440764", "n01443537", "n15075141"]  # ImageNet-1k classes 0, 1 and 999


@pytest.fixture
def imagenet(tmp_path):
    rng = np.random.default_rng(3)
    for k, wnid in enumerate(WNIDS):
        folder = tmp_path / "imagenet" / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(4):
            h, w = 20 + 3 * i, 26 - 2 * k
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{wnid}_{i}.JPEG")
    (tmp_path / "imagenet" / "train" / WNIDS[1] / "broken.JPEG").write_bytes(b"\xff\xd8\xff cut short")
    config = tmp_path / "imagenet.yaml"
    config.write_text(json.dumps({"data": {"dataset": "imagenet", "root": str(tmp_path / "imagenet"),
                                           "image_resolution": 12, "val_size": 4, "num_workers": 0,
                                           "max_skipped_fraction": 0.1}}))
    return config


def test_cache_round_trips_an_imagenet_folder(imagenet, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["data", "cache", "--config", str(imagenet), "--out", str(out), "--quiet"]) == 0
    assert "wrote 12 images of 12 px" in capsys.readouterr().out
    source = build_dataset("imagenet", tmp_path / "imagenet", "train", image_resolution=12)
    cache = CachedImageDataset(out)
    broken = [i for i in range(len(source)) if source.path(i).endswith("broken.JPEG")]
    assert len(cache) == len(source) - 1 and cache.meta["skipped"][0].startswith(source.path(broken[0]))
    assert isinstance(cache.images, np.memmap)
    for row, index in enumerate(cache.source_index):
        image, label = source[int(index)]
        assert torch.equal(cache[row][0], image) and cache[row][1] == label
    assert cache.classnames == source.classnames

    cfg = load_config(str(imagenet))
    plain = build_train_data(cfg)
    cfg.data.cache = str(out)
    cached = build_train_data(cfg)
    for split in ("train", "val"):
        expected = [s for s in getattr(plain, split) if isinstance(s, tuple)]  # the broken file has no row
        got = list(getattr(cached, split))
        assert len(got) == len(expected)
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(got, expected))


def test_cache_checks_what_it_serves(imagenet, tmp_path, capsys):
    out = tmp_path / "cache"
    main(["data", "cache", "--config", str(imagenet), "--out", str(out), "--quiet"])
    cfg = load_config(str(imagenet), (f"data.cache={out}", "data.image_resolution=16"))
    with pytest.raises(ValueError, match="at 12 px"):
        build_train_data(cfg)
    assert main(["data", "cache", "--config", str(imagenet), "--set", "data.image_resolution=null",
                 "--out", str(out)]) == 2
    assert "data.image_resolution" in capsys.readouterr().err
    assert CachedImageDataset(out).meta["rows"] == 12  # the failed run left the cache as it was
