"""Batches for training, validation and evaluation, each dataset by the fastest path it allows.

- In memory (`ArrayImageDataset`: CIFAR, STL-10, SVHN, the shape world, a `reprogrammer data cache`)
  when its uint8 tensor fits the memory budget: one `[N, 3, H, W]` tensor on the device, resized to
  `image_resolution` once when it is built (the dataset's own PIL resize, so batches equal the
  per-sample path bit for bit); an epoch is an index order, batches are gathers on the device. No
  worker processes.
- Memory-mapped caches larger than the budget: each batch is read from the mapped file in the main
  process (sorted reads, no decoding) and copied to the device from pinned memory.
- Image files: one DataLoader for the whole run with persistent workers (default: one per core),
  prefetching and pinned memory. With CUDA the workers only read the files, and JPEGs are decoded
  a batch at a time on the GPU (`torchvision.io.decode_jpeg(device="cuda")`) and resized there;
  nvJPEG and torch's antialiased bicubic resize differ from libjpeg and PIL by a few grey levels.

Every path takes its order from the `sampler` it is given (training: `ResumableSampler`, so that
resuming mid-epoch is exact; evaluation: the dataset in order) and yields
`(images uint8 [B, 3, H, W] on the device or the CPU, labels int64 [B] on the CPU, skipped)`, the
triple `collate_images` gives; `skipped` lists the `SkippedSample`s of unreadable files.
"""
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .images import ArrayImageDataset, FileImageDataset, ImageDataset, SkippedSample, collate_images

JPEG_MAGIC = b"\xff\xd8\xff"
# Resident tensors per (dataset, device): training and validation subsets of one set share one copy.
_RESIDENT: "weakref.WeakKeyDictionary[ImageDataset, dict]" = weakref.WeakKeyDictionary()


def default_workers() -> int:
    """Worker processes for file datasets: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def memory_budget(device: torch.device, budget_gb: Optional[float] = None) -> int:
    """Bytes a resident dataset may take: `budget_gb`, else a quarter of the device's memory."""
    if budget_gb is not None:
        return int(budget_gb * 2**30)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def flatten_subsets(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """`(base dataset, base index of each of dataset's indices)` through nested `Subset`s."""
    index = np.arange(len(dataset))
    while isinstance(dataset, Subset):
        index = np.asarray(dataset.indices, dtype=np.int64)[index]
        dataset = dataset.dataset
    return dataset, index


def make_loader(dataset: Dataset, sampler: Iterable[int], batch_size: int, device: torch.device, *,
                drop_last: bool, num_workers: Optional[int] = None, budget_gb: Optional[float] = None,
                seed: int = 0):
    """The loader for `dataset` (see the module docstring); iterate it once per epoch."""
    base, index = flatten_subsets(dataset)
    if isinstance(base, ArrayImageDataset):
        if _array_bytes(base) <= memory_budget(device, budget_gb):
            return ResidentLoader(base, index, sampler, batch_size, device, drop_last=drop_last)
        return MappedLoader(base, index, sampler, batch_size, device, drop_last=drop_last)
    workers = default_workers() if num_workers is None else num_workers
    decode_on = device if device.type == "cuda" and isinstance(base, FileImageDataset) else None
    return FileLoader(dataset, sampler, batch_size, device, drop_last=drop_last, num_workers=workers,
                      seed=seed, decode_on=decode_on)


def eval_loader(dataset: Dataset, batch_size: int, device: torch.device, *, indices: Optional[Sequence[int]] = None,
                num_workers: Optional[int] = None, budget_gb: Optional[float] = None):
    """Batches of `dataset` in order (of `indices` when given), the last one possibly short."""
    order = range(len(dataset)) if indices is None else indices
    return make_loader(dataset, order, batch_size, device, drop_last=False, num_workers=num_workers,
                       budget_gb=budget_gb)


def _array_bytes(base: ArrayImageDataset) -> int:
    h, w = base.native_size
    if base.image_resolution is not None:
        h = w = base.image_resolution
    return len(base.images) * 3 * h * w


def _batch_ranges(n: int, batch_size: int, drop_last: bool) -> range:
    return range(0, n - batch_size + 1 if drop_last else n, batch_size)


class ResidentLoader:
    """The whole set as one uint8 tensor on the device; batches are gathers."""

    def __init__(self, base: ArrayImageDataset, index: np.ndarray, sampler, batch_size: int, device: torch.device,
                 *, drop_last: bool):
        self.images = resident_images(base, device)
        self.labels = torch.from_numpy(base.labels)
        self.index, self.sampler, self.batch_size, self.drop_last = index, sampler, batch_size, drop_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
        order = torch.from_numpy(self.index[np.fromiter(iter(self.sampler), dtype=np.int64)])
        on_device = order.to(self.images.device)
        for start in _batch_ranges(len(order), self.batch_size, self.drop_last):
            stop = start + self.batch_size
            yield self.images[on_device[start:stop]], self.labels[order[start:stop]], []


def resident_images(base: ArrayImageDataset, device: torch.device) -> torch.Tensor:
    """`base`'s images as uint8 `[N, 3, H, W]` on `device`, at its `image_resolution`; built once."""
    per_device = _RESIDENT.setdefault(base, {})
    if device not in per_device:
        n, size = len(base.images), base.image_resolution
        out = torch.empty(n, 3, *(base.native_size if size is None else (size, size)), dtype=torch.uint8,
                          device=device)
        chunk = 4096
        for start in range(0, n, chunk):
            if not base.needs_resize():
                part = base.chw(slice(start, start + chunk))
            else:
                part = torch.stack([base[i][0] for i in range(start, min(n, start + chunk))])
            out[start:start + chunk] = part.to(device)
        per_device[device] = out
    return per_device[device]


class MappedLoader:
    """Batches read from a (memory-mapped) array in the main process: no decoding, no workers."""

    def __init__(self, base: ArrayImageDataset, index: np.ndarray, sampler, batch_size: int, device: torch.device,
                 *, drop_last: bool):
        self.base, self.index, self.sampler = base, index, sampler
        self.batch_size, self.drop_last, self.device = batch_size, drop_last, device

    def __iter__(self):
        order = self.index[np.fromiter(iter(self.sampler), dtype=np.int64)]
        for start in _batch_ranges(len(order), self.batch_size, self.drop_last):
            rows = order[start:start + self.batch_size]
            sorted_rows, inverse = np.unique(rows, return_inverse=True)  # sequential reads of the file
            if not self.base.needs_resize():
                images = self.base.chw(sorted_rows)[torch.from_numpy(inverse)]
            else:
                images = torch.stack([self.base[i][0] for i in rows])
            if self.device.type == "cuda":
                images = images.contiguous().pin_memory().to(self.device, non_blocking=True)
            yield images, torch.from_numpy(self.base.labels[rows]), []


class FileLoader:
    """Image files through one persistent DataLoader; JPEGs optionally decoded on `decode_on`."""

    def __init__(self, dataset: Dataset, sampler, batch_size: int, device: torch.device, *, drop_last: bool,
                 num_workers: int, seed: int = 0, decode_on: Optional[torch.device] = None):
        self.decode_on = decode_on
        source = EncodedFiles(dataset) if decode_on is not None else dataset
        workers = dict(persistent_workers=True, prefetch_factor=4) if num_workers > 0 else {}
        # A generator of its own keeps worker seeding off the global RNG (the same dropout
        # masks with and without a resume); the samples themselves draw no random numbers.
        self.loader = DataLoader(source, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", drop_last=drop_last,
                                 generator=torch.Generator().manual_seed(seed),
                                 collate_fn=list if decode_on is not None else collate_images, **workers)

    def __iter__(self):
        if self.decode_on is None:
            yield from self.loader
            return
        for samples in self.loader:
            yield decode_batch(samples, self.decode_on)


class EncodedFiles(Dataset):
    """A file dataset whose samples are JPEG bytes (uint8 tensors) to decode later, in batches;
    other formats are decoded here as usual."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.base, self.index = flatten_subsets(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        index = int(self.index[i])
        path = self.base.path(index)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            return SkippedSample(index, path, f"{type(error).__name__}: {error}")
        if not data.startswith(JPEG_MAGIC):
            return self.base[index]
        return EncodedSample(torch.frombuffer(bytearray(data), dtype=torch.uint8), int(self.base.labels[index]),
                             index, path, self.base.image_resolution)


class EncodedSample:
    __slots__ = ("data", "label", "index", "path", "size")

    def __init__(self, data, label, index, path, size):
        self.data, self.label, self.index, self.path, self.size = data, label, index, path, size


def decode_batch(samples: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """`collate_images` of a batch holding `EncodedSample`s: their JPEGs decoded together on `device`
    (one by one when the batch call fails, unreadable ones skipped), resized and centre-cropped there."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [s for s in samples if isinstance(s, EncodedSample)]
    decoded: dict[int, object] = {}
    try:
        images = decode_jpeg([s.data for s in encoded], mode=ImageReadMode.RGB, device=device) if encoded else []
        decoded = {id(s): image for s, image in zip(encoded, images)}
    except RuntimeError:
        for s in encoded:
            try:
                decoded[id(s)] = decode_jpeg(s.data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as error:
                decoded[id(s)] = SkippedSample(s.index, s.path, f"{type(error).__name__}: {error}")
    batch = []
    for sample in samples:
        if isinstance(sample, EncodedSample):
            image = decoded[id(sample)]
            sample = image if isinstance(image, SkippedSample) else \
                (resize_center_crop_tensor(image, sample.size), sample.label)
        elif not isinstance(sample, SkippedSample):
            sample = (sample[0].to(device), sample[1])
        batch.append(sample)
    return collate_images(batch)


def resize_center_crop_tensor(image: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """`images.resize_center_crop` on a uint8 `[3, H, W]` tensor (antialiased bicubic; within one grey
    level of PIL's on almost every pixel)."""
    if size is None:
        return image
    import torchvision.transforms.v2.functional as TF

    height, width = image.shape[-2:]
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_h, new_w) != (height, width):
        image = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image[:, top:top + size, left:left + size]
