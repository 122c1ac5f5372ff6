"""Datasets on their real on-disk formats, yielding `(uint8 tensor [3, H, W], label)`."""
from .formats import CIFAR10_CLASSNAMES, DatasetLayoutError
from .images import (
    ArrayImageDataset,
    FileImageDataset,
    ImageDataset,
    ImageLoader,
    SkippedSample,
    TooManySkippedError,
    collate_images,
    resize_center_crop,
)
from .registry import DATASET_NAMES, DATASETS, PAPER_BENCHMARKS, DatasetSpec, build_dataset
from .splits import split_indices

__all__ = [
    "ArrayImageDataset", "CIFAR10_CLASSNAMES", "DATASETS", "DATASET_NAMES", "DatasetLayoutError", "DatasetSpec",
    "FileImageDataset", "ImageDataset", "ImageLoader", "PAPER_BENCHMARKS", "SkippedSample", "TooManySkippedError",
    "build_dataset", "collate_images", "resize_center_crop", "split_indices",
]
