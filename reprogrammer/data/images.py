"""Image datasets that yield `(uint8 tensor [3, H, W], label)` and survive unreadable files.

Images stay uint8 so the training and evaluation engines convert (and normalise) them on the
device. Unreadable files are handled lazily, which is what works with DataLoader workers: a
worker that fails to decode a file returns a `SkippedSample` instead of raising;
`collate_images` drops those and hands their records along with the batch; `ImageLoader`, in the
main process, appends them to `dataset.skipped` (worker copies of the dataset cannot report back
themselves) and raises `TooManySkippedError` once more than `max_skipped_fraction` of the
dataset was unreadable.
"""
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ..pixels import open_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedSample:
    """An unreadable sample: its dataset index, file and the decoder's complaint."""
    index: int
    path: str
    reason: str


class TooManySkippedError(RuntimeError):
    """More than `max_skipped_fraction` of a dataset could not be read."""


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the shorter side to `size`, then a centred `size x size` crop.

    Same arithmetic as torchvision's `Resize(size, BICUBIC)` + `CenterCrop(size)` on PIL images
    (the authors' transform): long side `int(size * long / short)`, crop offset `round(excess / 2)`.
    """
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _to_tensor(hwc: np.ndarray) -> torch.Tensor:
    # A copy: decoded PIL buffers are read-only, and samples must not alias the dataset's arrays.
    return torch.from_numpy(hwc.transpose(2, 0, 1).copy())


class ImageDataset(Dataset):
    """Common state: labels (int64, -1 for OOD), class names, class subset, skipped-file log.

    `class_indices`: the class ids this dataset can contain, as indices into `classnames`
    (`arange(C)` for full datasets, e.g. the 200 of the 1000 ImageNet classes for ImageNet-A/R,
    empty for label-free OOD sets).
    """

    def __init__(self, name: str, labels: np.ndarray, classnames: Sequence[str], *,
                 image_resolution: int | None = None, class_indices: np.ndarray | None = None,
                 max_skipped_fraction: float = 0.01):
        if image_resolution is not None and image_resolution < 1:
            raise ValueError(f"image_resolution must be a positive pixel count or None, got {image_resolution}")
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must lie in [0, 1], got {max_skipped_fraction}")
        self.name = name
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classnames = list(classnames)
        self.class_indices = np.asarray(np.arange(len(self.classnames)) if class_indices is None else class_indices,
                                        dtype=np.int64)
        self.image_resolution = image_resolution
        self.max_skipped_fraction = max_skipped_fraction
        self.skipped: list[SkippedSample] = []
        self._skipped_indices: set[int] = set()

    def __len__(self) -> int:
        return len(self.labels)

    def _finish(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        size = self.image_resolution
        if isinstance(image, np.ndarray):
            if size is None or image.shape[:2] == (size, size):
                return _to_tensor(image)
            image = Image.fromarray(image)
        if size is not None:
            image = resize_center_crop(image, size)
        return _to_tensor(np.asarray(image, dtype=np.uint8))

    def record_skipped(self, records: Sequence[SkippedSample]) -> None:
        """Log newly skipped samples (once each across epochs); raise past the allowed fraction."""
        for record in records:
            if record.index in self._skipped_indices:
                continue
            self._skipped_indices.add(record.index)
            self.skipped.append(record)
            log.warning("%s: skipped unreadable sample %d (%s): %s", self.name, record.index, record.path,
                        record.reason)
        if len(self.skipped) > self.max_skipped_fraction * len(self):
            examples = "\n".join(f"  {r.path}: {r.reason}" for r in self.skipped[:5])
            raise TooManySkippedError(
                f"{self.name}: {len(self.skipped)} of {len(self)} samples are unreadable, more than "
                f"max_skipped_fraction={self.max_skipped_fraction}. First ones:\n{examples}\n"
                "Check the files (or the dataset root), or raise max_skipped_fraction to tolerate them.")


class ArrayImageDataset(ImageDataset):
    """Images held in memory as uint8 [N, H, W, 3] (CIFAR, STL-10, SVHN, CIFAR-10.1, a cache), or as
    [N, 3, H, W] with `channels_first` (the shape world renders in the layout batches take, so its
    images are never transposed)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str], *,
                 channels_first: bool = False, **kwargs):
        super().__init__(name, labels, classnames, **kwargs)
        layout = "[N, 3, H, W]" if channels_first else "[N, H, W, 3]"
        if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1 if channels_first else 3] != 3
                or len(images) != len(self.labels)):
            raise ValueError(f"{name}: expected uint8 images {layout} matching {len(self.labels)} labels, "
                             f"got {images.dtype} {images.shape}")
        self.images = images
        self.channels_first = channels_first

    @property
    def native_size(self) -> tuple[int, int]:
        """`(H, W)` of the stored images."""
        return tuple(self.images.shape[2:4] if self.channels_first else self.images.shape[1:3])

    def needs_resize(self) -> bool:
        size = self.image_resolution
        return size is not None and self.native_size != (size, size)

    def chw(self, rows) -> torch.Tensor:
        """The stored images of `rows` (a slice or an index array) as uint8 `[B, 3, H, W]`, not resized."""
        images = torch.from_numpy(np.array(self.images[rows]))
        return images if self.channels_first else images.permute(0, 3, 1, 2)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.channels_first:
            if not self.needs_resize():
                return torch.from_numpy(image.copy()), int(self.labels[index])
            image = image.transpose(1, 2, 0)
        return self._finish(image), int(self.labels[index])


class FileImageDataset(ImageDataset):
    """Images decoded lazily from files; an unreadable file yields a `SkippedSample`."""

    def __init__(self, name: str, paths: Sequence[str | os.PathLike], labels: np.ndarray, classnames: Sequence[str],
                 **kwargs):
        super().__init__(name, labels, classnames, **kwargs)
        if len(paths) != len(self.labels):
            raise ValueError(f"{name}: {len(paths)} paths but {len(self.labels)} labels")
        # One numpy bytes array rather than a list of str objects: DataLoader workers touching
        # millions of Python objects would copy the pages that hold their reference counts.
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=bytes)

    def path(self, index: int) -> str:
        return os.fsdecode(self._paths[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | SkippedSample:
        path = self.path(index)
        try:
            image = open_rgb(path)
        # Decoders raise OSError, SyntaxError, ValueError, EOFError, zlib errors...: any failure to
        # decode one file is that file's problem; the skip limit still stops systematic failures.
        except Exception as error:  # noqa: BLE001
            return SkippedSample(index, path, f"{type(error).__name__}: {error}")
        return self._finish(image), int(self.labels[index])


def collate_images(batch: Sequence) -> tuple[torch.Tensor, torch.Tensor, list[SkippedSample]]:
    """DataLoader `collate_fn`: stack the readable samples, return the skipped ones' records.

    Returns `(images uint8 [B, 3, H, W], labels int64 [B], skipped)`; B may be 0.
    """
    kept = [sample for sample in batch if not isinstance(sample, SkippedSample)]
    skipped = [sample for sample in batch if isinstance(sample, SkippedSample)]
    if not kept:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), skipped
    shapes = {tuple(image.shape) for image, _ in kept}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)} cannot form a batch: build the dataset "
                         "with image_resolution=<pixels> to resize and centre-crop them to one size")
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    return images, labels, skipped


def base_dataset(dataset: Dataset) -> ImageDataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"ImageLoader needs an ImageDataset (or a Subset of one), got {type(dataset).__name__}")
    return dataset


def first_image_size(dataset: Dataset) -> int:
    """The side of the first readable image of `dataset`; unreadable ones on the way are recorded
    (and fatal past the dataset's `max_skipped_fraction`)."""
    owner = base_dataset(dataset)
    for index in range(len(dataset)):
        sample = dataset[index]
        if not isinstance(sample, SkippedSample):
            return int(sample[0].shape[-1])
        owner.record_skipped([sample])
    raise TooManySkippedError(f"{owner.name}: none of its {len(dataset)} samples is readable; check the files "
                              "or the dataset root")


class ImageLoader:
    """A DataLoader that yields `(images uint8 [B, 3, H, W], labels int64 [B])`, unreadable files dropped.

    Skipped samples are recorded on the underlying `ImageDataset` (`dataset.skipped`), which
    raises `TooManySkippedError` past its `max_skipped_fraction`. `shuffle=True` draws each
    epoch's order from a generator seeded with `seed`. Other keyword arguments go to `DataLoader`.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 num_workers: int = 0, **loader_kwargs):
        self.dataset = dataset
        self._owner = base_dataset(dataset)
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                 num_workers=num_workers, collate_fn=collate_images, **loader_kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, skipped in self.loader:
            if skipped:
                self._owner.record_skipped(skipped)
            if len(labels):
                yield images, labels
