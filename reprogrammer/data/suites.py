"""The datasets of a run: training and validation splits, and the evaluation suite
(ID test set, covariate-shift sets, semantic-shift OOD sets) of docs/method.md section 7."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset, Subset

from ..config import Config
from .cache import CachedImageDataset
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


def _generated(dataset: str) -> bool:
    return dataset in DATASETS and DATASETS[dataset].generated


def _build(cfg: Config, dataset: str, root, split=None, **options):
    """`build_dataset`; a generated dataset (the shape world) is the world of the run's seed, at
    the configured sizes, so that training and evaluation see splits of one world."""
    if _generated(dataset):
        options.update(seed=cfg.train.seed, n_train=cfg.data.n_train, n_test=cfg.data.n_test)
    return build_dataset(dataset, root, split, **options)


def build_train_data(cfg: Config) -> TrainData:
    data = cfg.data
    options = dict(image_resolution=data.image_resolution, classnames=data.classnames_file,
                   max_skipped_fraction=data.max_skipped_fraction)
    splits = DATASETS[data.dataset].splits if data.dataset in DATASETS else ("train",)
    train_split = "train" if "train" in splits else splits[0]
    val_split = DATASETS[data.dataset].val_split if data.dataset in DATASETS else None
    if val_split is not None:
        train = _build(cfg, data.dataset, data.root, train_split, **options)
        return TrainData(train, _build(cfg, data.dataset, data.root, val_split, **options), train.classnames)
    size = {"val_fraction": data.val_size} if data.val_size < 1 else {"val_size": int(data.val_size)}
    if data.cache is not None:
        return _cached_train_data(cfg, size)
    train = _build(cfg, data.dataset, _root(data.root, data.dataset), train_split, **options)
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
    root = _root(data.root, data.dataset)
    options = dict(image_resolution=data.image_resolution, classnames=data.classnames_file,
                   max_skipped_fraction=data.max_skipped_fraction)
    test = _eval_set(cfg, data.dataset, ecfg.test, options) if ecfg.test else \
        _build(cfg, data.dataset, root, _test_split(data.dataset), **options)
    covariate = ecfg.covariate or _default_sets(data.dataset, root, "shift")
    semantic = ecfg.semantic or _default_sets(data.dataset, root, "ood")
    return EvalSets(test.classnames, test,
                    {name: _eval_set(cfg, name, spec, options) for name, spec in covariate.items()},
                    {name: _eval_set(cfg, name, spec, dict(image_resolution=data.image_resolution, ood=True,
                                                           max_skipped_fraction=data.max_skipped_fraction))
                     for name, spec in semantic.items()})


def _default_sets(dataset: str, root, role: str) -> dict:
    """The evaluation sets of `role` ("shift" or "ood") a dataset comes with: a generated one's
    own splits, else the paper's sets in folders beside `root`."""
    if _generated(dataset):
        spec = DATASETS[dataset]
        return {split: {"dataset": dataset, "split": split}
                for split in (spec.shift_splits if role == "shift" else spec.ood_splits)}
    paper = PAPER_BENCHMARKS.get(dataset, {"shift": (), "ood": ()})
    return {name: str(Path(root).parent / name) for name in paper[role]}


def _eval_set(cfg: Config, name: str, spec, options: dict):
    """`spec` is the root of registry dataset `name`, or `{dataset: registry name, root: ...}`
    (no root for a generated dataset)."""
    if isinstance(spec, dict):
        dataset = spec.get("dataset", name)
        if set(spec) - {"dataset", "root", "split"} or ("root" not in spec and not _generated(dataset)):
            raise ValueError(f"eval set {name!r}: give a root path or {{dataset: NAME, root: PATH[, split: S]}}, "
                             f"got {spec!r}")
        return _build(cfg, dataset, spec.get("root"), spec.get("split"), **options)
    return _build(cfg, name, spec, **options)


def _test_split(dataset: str):
    """The held-out split: `test`, or `val` for ImageNet-style datasets."""
    held_out = [s for s in ("test", "val") if s in DATASETS[dataset].splits]
    if not held_out:
        raise ValueError(f"{dataset} has no test split of its own: name one with "
                         "eval.test: {dataset: NAME, root: PATH}")
    return held_out[0]


def _root(root, dataset: str):
    if root is None and not _generated(dataset):
        raise ValueError(f"data.root is not set: point it at the {dataset} dataset folder "
                         f"(e.g. --set data.root=/data/{dataset})")
    return root
