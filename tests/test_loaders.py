"""Every loader path yields the batches the plain per-sample DataLoader yields, in the same order,
and resumes mid-epoch exactly."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from reprogrammer.data import ArrayImageDataset, build_dataset, collate_images
from reprogrammer.data.loaders import (
    FileLoader,
    MappedLoader,
    ResidentLoader,
    decode_batch,
    eval_loader,
    make_loader,
)
from reprogrammer.training.distributed import DistInfo, ResumableSampler

CPU = torch.device("cpu")
RNG = np.random.default_rng(7)


def reference_batches(dataset, sampler, batch_size, drop_last=True):
    """The loader the engine used before the fast paths: one sample at a time, collated."""
    return [(x.clone(), y.clone()) for x, y, _ in DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                                            drop_last=drop_last, collate_fn=collate_images)]


def batches(loader):
    return [(x.cpu(), y.cpu()) for x, y, _ in loader]


def assert_same(got, expected):
    assert len(got) == len(expected) and len(got) > 0
    for (x, y), (ex, ey) in zip(got, expected):
        assert x.dtype == torch.uint8 and torch.equal(x, ex) and torch.equal(y, ey)


def array_set(n=37, size=(12, 10), resolution=None, mapped=None):
    images = RNG.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    if mapped is not None:
        np.save(mapped, images)
        images = np.load(mapped, mmap_mode="r")
    return ArrayImageDataset("arrays", images, np.arange(n) % 5, list("abcde"), image_resolution=resolution)


def image_folder(root, n=14, ext=".jpg"):
    for i in range(n):
        folder = root / "train" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = 14 + i % 4 * 3, 11 + i % 5 * 2  # mixed sizes and aspect ratios
        Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i}{ext}")
    return build_dataset("imagefolder", root / "train", image_resolution=9)


LOADERS = {
    "resident": lambda ds, sampler, b: make_loader(ds, sampler, b, CPU, drop_last=True),
    "mapped": lambda ds, sampler, b: make_loader(ds, sampler, b, CPU, drop_last=True, budget_gb=0),
}


@pytest.mark.parametrize("path", LOADERS)
@pytest.mark.parametrize("resolution", [None, 8])
def test_array_paths_equal_the_per_sample_loader_bitwise(tmp_path, path, resolution):
    base = array_set(resolution=resolution, mapped=tmp_path / "images.npy" if path == "mapped" else None)
    train = Subset(base, RNG.permutation(37)[:30].tolist())
    sampler = ResumableSampler(train, DistInfo(), seed=3)
    loader = LOADERS[path](train, sampler, 4)
    assert isinstance(loader, ResidentLoader if path == "resident" else MappedLoader)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        got = batches(loader)
        sampler.set_epoch(epoch)
        assert_same(got, reference_batches(train, sampler, 4))


@pytest.mark.parametrize("path", ["resident", "mapped", "files", "files-2-workers"])
def test_resume_mid_epoch_yields_the_rest_of_the_epoch(tmp_path, path):
    if path.startswith("files"):
        dataset = image_folder(tmp_path)
        workers = 2 if path == "files-2-workers" else 0
        make = lambda ds, s, b: make_loader(ds, s, b, CPU, drop_last=True, num_workers=workers)  # noqa: E731
    else:
        dataset = array_set(mapped=tmp_path / "images.npy" if path == "mapped" else None)
        make = LOADERS[path]
    sampler = ResumableSampler(dataset, DistInfo(), seed=5)
    loader = make(dataset, sampler, 3)
    sampler.set_position(1, 0)
    full = batches(loader)
    sampler.set_position(1, 2 * 3)  # resume after two batches of epoch 1
    assert_same(batches(loader), full[2:])
    sampler.set_position(1, 0)
    assert_same(full, reference_batches(dataset, sampler, 3))


def test_file_loader_equals_the_per_sample_loader_and_persists_its_workers(tmp_path):
    dataset = image_folder(tmp_path)
    train = Subset(dataset, list(range(2, 14)))
    sampler = ResumableSampler(train, DistInfo(), seed=1)
    loader = make_loader(train, sampler, 5, CPU, drop_last=True, num_workers=2)
    assert isinstance(loader, FileLoader)
    first = batches(loader)
    workers = loader.loader._iterator._workers
    sampler.set_epoch(1)
    second = batches(loader)
    assert loader.loader._iterator._workers == workers  # the same processes served both epochs
    for epoch, got in enumerate((first, second)):
        sampler.set_epoch(epoch)
        assert_same(got, reference_batches(train, sampler, 5))


def test_eval_loader_keeps_order_and_the_short_last_batch():
    dataset = array_set(n=11)
    got = batches(eval_loader(dataset, 4, CPU, indices=range(1, 11, 2)))
    assert_same(got, reference_batches(dataset, list(range(1, 11, 2)), 4, drop_last=False))
    assert [len(y) for _, y in got] == [4, 1]


def test_batched_jpeg_decoding_is_within_a_few_levels_of_pil(tmp_path):
    """The GPU path's decoding, run on the CPU: libjpeg-turbo through torchvision, then torch's
    antialiased bicubic resize, against PIL's decode + resize."""
    dataset = image_folder(tmp_path, ext=".jpg")
    (tmp_path / "train" / "class0" / "img_0.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    loader = FileLoader(dataset, range(len(dataset)), 7, CPU, drop_last=False, num_workers=0, decode_on=CPU)
    got = list(loader)
    expected = reference_batches(dataset, range(len(dataset)), 7, drop_last=False)
    assert [s.path.rsplit("/", 1)[1] for s in got[0][2]] == ["img_0.jpg"]
    for (x, y, _), (ex, ey) in zip(got, expected):
        assert torch.equal(y, ey)
        difference = (x.int() - ex.int()).abs()
        assert difference.max() <= 3 and difference.float().mean() < 0.5


def test_decode_batch_passes_decoded_samples_through():
    image = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8)
    images, labels, skipped = decode_batch([(image, 4)], CPU)
    assert torch.equal(images[0], image) and labels.tolist() == [4] and skipped == []
