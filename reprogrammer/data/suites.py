"""The datasets of a run: training and validation splits, and the evaluation suite
(ID test set, covariate-shift sets, semantic-shift OOD sets) of docs/method.md section 7."""
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from torch.utils.data import Dataset, Subset

from ..config import Config
from .cache import CachedImageDataset
from .images import ArrayImageDataset
from .registry import DATASETS, PAPER_BENCHMARKS, build_dataset
from .splits import split_indices


@dataclass
class TrainData:
    train: Dataset
    val: Optional[Dataset]
    classnames: list


@dataclass
class EvalSets:
    classnames: list
    test: Dataset
    covariate: dict
    semantic: dict

    def skipped(self) -> dict:
        """Unreadable files skipped so far, per set."""
        sets = {"test": self.test, **self.covariate, **self.semantic}
        return {name: [f"{r.path}: {r.reason}" for r in getattr(ds, "skipped", [])] for name, ds in sets.items()
                if getattr(ds, "skipped", None)}


@functools.lru_cache(maxsize=2)
def _shapeworld(seed: int, n_train: int, n_test: int):
    from .shapeworld import downstream_benchmark

    n_val = max(1, n_train // 9)
    return downstream_benchmark(seed=seed, resolution=24, n_train=n_train, n_val=n_val, n_test=n_test,
                                n_shift=n_test, n_ood=n_test)


def _array_set(name, images, labels, classnames):
    return ArrayImageDataset(name, np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, classnames)


def _ood_array_set(name, images):
    return ArrayImageDataset(name, np.ascontiguousarray(images.transpose(0, 2, 3, 1)),
                             np.full(len(images), -1, dtype=np.int64), [])


def build_train_data(cfg: Config) -> TrainData:
    data = cfg.data
    if data.dataset == "shapeworld":
        bench = _shapeworld(cfg.train.seed, data.n_train, data.n_test)
        names = bench["classnames"]
        return TrainData(_array_set("shapeworld-train", *bench["train"], names),
                         _array_set("shapeworld-val", *bench["val"], names), names)
    size = {"val_fraction": data.val_size} if data.val_size < 1 else {"val_size": int(data.val_size)}
    if data.cache is not None:
        return _cached_train_data(cfg, size)
    splits = DATASETS[data.dataset].splits if data.dataset in DATASETS else ("train",)
    train = build_dataset(data.dataset, _root(data.root, data.dataset), "train" if "train" in splits else splits[0],
                          image_resolution=data.image_resolution, classnames=data.classnames_file,
                          max_skipped_fraction=data.max_skipped_fraction)
    train_idx, val_idx = split_indices(len(train), seed=cfg.train.seed, **size)
    return TrainData(Subset(train, train_idx.tolist()), Subset(train, val_idx.tolist()), train.classnames)


def _cached_train_data(cfg: Config, size: dict) -> TrainData:
    """The splits of a `reprogrammer data cache` folder: the source's split, minus unreadable files."""
    cache = CachedImageDataset(cfg.data.cache)
    cache.check_source(cfg.data.dataset, cfg.data.image_resolution)
    train_idx, val_idx = split_indices(cache.meta["source_size"], seed=cfg.train.seed, **size)
    return TrainData(Subset(cache, cache.rows_of(train_idx)), Subset(cache, cache.rows_of(val_idx)), cache.classnames)


def build_eval_sets(cfg: Config) -> EvalSets:
    data, ecfg = cfg.data, cfg.eval
    if data.dataset == "shapeworld":
        bench = _shapeworld(cfg.train.seed, data.n_train, data.n_test)
        names = bench["classnames"]
        return EvalSets(names, _array_set("shapeworld-test", *bench["test"], names),
                        {k: _array_set(k, *v, names) for k, v in bench["covariate"].items()},
                        {k: _ood_array_set(k, v) for k, v in bench["semantic"].items()})
    root = _root(data.root, data.dataset)
    options = dict(image_resolution=data.image_resolution, classnames=data.classnames_file,
                   max_skipped_fraction=data.max_skipped_fraction)
    test = _eval_set(data.dataset, ecfg.test, options) if ecfg.test else \
        build_dataset(data.dataset, root, _test_split(data.dataset), **options)
    paper = PAPER_BENCHMARKS.get(data.dataset, {"shift": (), "ood": ()})
    covariate = ecfg.covariate or {name: str(Path(root).parent / name) for name in paper["shift"]}
    semantic = ecfg.semantic or {name: str(Path(root).parent / name) for name in paper["ood"]}
    return EvalSets(test.classnames, test,
                    {name: _eval_set(name, spec, options) for name, spec in covariate.items()},
                    {name: _eval_set(name, spec, dict(image_resolution=data.image_resolution, ood=True,
                                                          max_skipped_fraction=data.max_skipped_fraction))
                     for name, spec in semantic.items()})


def _eval_set(name: str, spec, options: dict):
    """`spec` is the root of registry dataset `name`, or `{dataset: registry name, root: ...}`."""
    if isinstance(spec, dict):
        if set(spec) - {"dataset", "root", "split"} or "root" not in spec:
            raise ValueError(f"eval set {name!r}: give a root path or {{dataset: NAME, root: PATH[, split: S]}}, "
                             f"got {spec!r}")
        return build_dataset(spec.get("dataset", name), spec["root"], spec.get("split"), **options)
    return build_dataset(name, spec, **options)


def _test_split(dataset: str):
    """The held-out split: `test`, or `val` for ImageNet-style datasets."""
    held_out = [s for s in ("test", "val") if s in DATASETS[dataset].splits]
    if not held_out:
        raise ValueError(f"{dataset} has no test split of its own: name one with "
                         "eval.test: {dataset: NAME, root: PATH}")
    return held_out[0]


def _root(root, dataset: str) -> str:
    if root is None:
        raise ValueError(f"data.root is not set: point it at the {dataset} dataset folder "
                         f"(e.g. --set data.root=/data/{dataset})")
    return root
