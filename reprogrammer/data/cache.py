"""`reprogrammer data cache`: a dataset decoded once into a memory-mapped uint8 array.

A folder of images at the intermediate resolution (the authors resize ImageNet to 128 before
reprogramming) holds `images.npy` `[N, S, S, 3]` (opened memory-mapped: training reads rows and
decodes nothing), `labels.npy`, `source_index.npy` (each row's index in the source dataset, so the
train/validation split of the source applies unchanged; unreadable files have no row) and
`cache.json`. The folder is written under a temporary name and renamed when complete.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .images import ArrayImageDataset, ImageDataset
from .loaders import make_loader

FORMAT_VERSION = 1


def write_cache(dataset: ImageDataset, out, *, source: dict, num_workers=None, batch_size: int = 256,
                progress: bool = True) -> dict:
    """Decode `dataset` (at its `image_resolution`) into cache folder `out`; returns its `cache.json`.
    `source` (dataset name, root, split) is recorded so that training can check what it reads."""
    size = dataset.image_resolution
    if size is None:
        raise ValueError("a cache stores one image size: set data.image_resolution (e.g. 128, the authors' "
                         "ImageNet size)")
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    n = len(dataset)
    images = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    labels = np.empty(n, dtype=np.int64)
    source_index = np.empty(n, dtype=np.int64)
    loader = make_loader(dataset, range(n), batch_size, torch.device("cpu"), drop_last=False,
                         num_workers=num_workers, budget_gb=0)
    rows, start = 0, 0
    with tqdm(total=n, desc=f"cache {dataset.name}", unit="image", disable=not progress, dynamic_ncols=True) as bar:
        for batch_images, batch_labels, skipped in loader:
            stop = min(start + batch_size, n)
            if skipped:
                dataset.record_skipped(skipped)
            missing = {s.index for s in skipped}
            kept = [i for i in range(start, stop) if i not in missing]
            if kept:
                images[rows:rows + len(kept)] = batch_images.permute(0, 2, 3, 1).numpy()
                labels[rows:rows + len(kept)] = batch_labels.numpy()
                source_index[rows:rows + len(kept)] = kept
            rows, start = rows + len(kept), stop
            bar.update(stop - bar.n)
    images.flush()
    del images
    np.save(partial / "labels.npy", labels[:rows])
    np.save(partial / "source_index.npy", source_index[:rows])
    meta = {"format_version": FORMAT_VERSION, **source, "image_resolution": size, "rows": rows, "source_size": n,
            "classnames": dataset.classnames, "class_indices": dataset.class_indices.tolist(),
            "skipped": [f"{s.path}: {s.reason}" for s in dataset.skipped]}
    (partial / "cache.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return meta


class CachedImageDataset(ArrayImageDataset):
    """A cache folder's images, memory-mapped; `source_index[i]` is row i's index in the source."""

    def __init__(self, folder):
        folder = Path(folder)
        meta_path = folder / "cache.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} is not a dataset cache (no cache.json); write one with "
                                    "`reprogrammer data cache`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder} was written by another version of the cache format; write it again")
        rows = self.meta["rows"]
        super().__init__(f"{self.meta['dataset']}-cache", np.load(folder / "images.npy", mmap_mode="r")[:rows],
                         np.load(folder / "labels.npy"), self.meta["classnames"],
                         class_indices=np.asarray(self.meta["class_indices"]))
        self.source_index = np.load(folder / "source_index.npy")

    def rows_of(self, source_indices: np.ndarray) -> list[int]:
        """Rows holding these source indices, in their order; unreadable sources have none."""
        row = np.full(self.meta["source_size"], -1, dtype=np.int64)
        row[self.source_index] = np.arange(len(self.source_index))
        found = row[np.asarray(source_indices, dtype=np.int64)]
        return found[found >= 0].tolist()

    def check_source(self, dataset: str, image_resolution) -> None:
        if self.meta["dataset"] != dataset or self.meta["image_resolution"] != image_resolution:
            raise ValueError(
                f"the cache holds {self.meta['dataset']} at {self.meta['image_resolution']} px, the config asks for "
                f"{dataset} at {image_resolution} px; write the cache for this config or unset data.cache")
