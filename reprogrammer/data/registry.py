"""`build_dataset(name, root, split)`: every dataset of docs/method.md section 7, plus users' own data
and the built-in shape world.

Each entry knows where its files live under `root` (the dataset's own folder, or a folder
holding it under its usual name) and the layout shown when they are not found. The shape world
reads no files: it is rendered (`reprogrammer.data.shapeworld`) from a seed and set sizes.
"""
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import (
    WNID_PATTERN,
    DatasetLayoutError,
    apply_classnames_file,
    imagenet_classnames,
    imagenet_wnids,
    list_class_folders,
    list_image_files,
    read_cifar10,
    read_cifar10_1,
    read_cifar100,
    read_csv_listing,
    read_stl10_in_cifar10_order,
    read_svhn,
)
from .images import ArrayImageDataset, FileImageDataset, ImageDataset
from .shapeworld import COVARIATE_DOMAINS, downstream_benchmark


@dataclass
class _Parts:
    data: np.ndarray | list[Path]     # uint8 images [N, H, W, 3] ([N, 3, H, W] if channels_first), or image files
    labels: np.ndarray
    classnames: list[str]
    class_indices: np.ndarray | None = None
    channels_first: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """`role`: "id" (trained on), "shift" (covariate shift, scored for accuracy) or "ood"
    (semantic shift, scored for detection; labels become -1). `splits[0]` is the default split.

    A `generated` dataset reads no files: `build` renders it from keyword parameters, at
    `image_resolution`. Its own evaluation suite may come with it: `shift_splits` and `ood_splits`
    (label-free), and `val_split`, a validation split drawn apart from the training split."""
    name: str
    role: str
    splits: tuple[str, ...]
    layout: str
    build: Callable[..., _Parts]
    generated: bool = False
    val_split: str | None = None
    shift_splits: tuple[str, ...] = ()
    ood_splits: tuple[str, ...] = ()


def _locate(root: Path, subdirs: Sequence[str], accept: Callable[[Path], bool], what: str) -> Path:
    """The first of `root/<subdir>` ..., `root` that looks like the dataset."""
    candidates = [root / s for s in subdirs] + [root]
    for candidate in candidates:
        if candidate.is_dir() and accept(candidate):
            return candidate
    raise DatasetLayoutError(f"found no {what} in any of: {', '.join(str(c) for c in candidates)}")


def _has_file(name: str) -> Callable[[Path], bool]:
    return lambda directory: (directory / name).is_file()


def _has_folders_like(pattern) -> Callable[[Path], bool]:
    return lambda directory: any(pattern.fullmatch(f) for f in list_class_folders(directory))


def _folder_samples(directory: Path, folders: Sequence[str], labels: Sequence[int]) -> tuple[list[Path], np.ndarray]:
    paths, sample_labels = [], []
    for folder, label in zip(folders, labels):
        files = list_image_files(directory / folder)
        if not files:  # a class with no images would still take a place among the classes
            raise DatasetLayoutError(f"class folder {directory / folder} holds no image files; add images or "
                                     "remove (or hide, with a leading '.') the folder")
        paths += files
        sample_labels += [label] * len(files)
    if not paths:
        raise DatasetLayoutError(f"no class folders in {directory}")
    return paths, np.asarray(sample_labels, dtype=np.int64)


# ----------------------------------------------------------------------------- builders

def _cifar10(root, split, classnames_file):
    directory = _locate(root, ["cifar-10-batches-py"], _has_file("batches.meta"), "CIFAR-10 'batches.meta'")
    images, labels, names = read_cifar10(directory, split)
    return _Parts(images, labels, apply_classnames_file(classnames_file, names, names))


def _cifar100(root, split, classnames_file):
    directory = _locate(root, ["cifar-100-python"], _has_file("meta"), "CIFAR-100 'meta'")
    images, labels, names = read_cifar100(directory, split)
    return _Parts(images, labels, apply_classnames_file(classnames_file, names, names))


def _cifar10_1(root, split, classnames_file):
    directory = _locate(root, ["datasets"], _has_file("cifar10.1_v6_data.npy"), "'cifar10.1_v6_data.npy'")
    images, labels, names = read_cifar10_1(directory)
    return _Parts(images, labels, apply_classnames_file(classnames_file, names, names))


def _stl10(root, split, classnames_file):
    directory = _locate(root, ["stl10_binary"], _has_file(f"{split}_X.bin"), f"STL-10 '{split}_X.bin'")
    images, labels, names = read_stl10_in_cifar10_order(directory, split)
    return _Parts(images, labels, apply_classnames_file(classnames_file, names, names))


def _svhn(root, split, classnames_file):
    directory = _locate(root, ["svhn"], _has_file(f"{split}_32x32.mat"), f"SVHN '{split}_32x32.mat'")
    images, labels, names = read_svhn(directory, split)
    return _Parts(images, labels, apply_classnames_file(classnames_file, names, names))


def _imagenet_wnid_folders(subdirs: Callable[[str], Sequence[str]]):
    """ImageNet, -A, -R, -Sketch: WordNet-id folders; labels are ImageNet-1k indices, the folders
    present give `class_indices` (200 for ImageNet-A/R)."""
    def build(root, split, classnames_file):
        directory = _locate(root, subdirs(split), _has_folders_like(WNID_PATTERN), "WordNet-id class folders")
        wnids = imagenet_wnids()
        index = {wnid: i for i, wnid in enumerate(wnids)}
        folders = list_class_folders(directory)
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise DatasetLayoutError(f"{directory}: folders {unknown[:5]} are not ImageNet-1k WordNet ids")
        paths, labels = _folder_samples(directory, folders, [index[f] for f in folders])
        names = apply_classnames_file(classnames_file, wnids, imagenet_classnames())
        return _Parts(paths, labels, names, np.array([index[f] for f in folders]))
    return build


def _is_class_index(folder: str) -> bool:
    return folder.isdigit() and int(folder) < 1000


def _imagenet_v2(root, split, classnames_file):
    directory = _locate(root, ["imagenetv2-matched-frequency-format-val"],
                        lambda d: any(_is_class_index(f) for f in list_class_folders(d)), "class folders 0..999")
    folders = list_class_folders(directory)
    unknown = [f for f in folders if not _is_class_index(f)]
    if unknown:
        raise DatasetLayoutError(f"{directory}: folders {unknown[:5]} are not ImageNet class indices 0..999")
    paths, labels = _folder_samples(directory, folders, [int(f) for f in folders])
    names = apply_classnames_file(classnames_file, imagenet_wnids(), imagenet_classnames())
    return _Parts(paths, labels, names, np.array(sorted(int(f) for f in folders)))


def _unlabelled_folder(root, split, classnames_file):
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a folder")
    paths = list_image_files(root)
    if not paths:
        raise DatasetLayoutError(f"no image files under {root}")
    return _Parts(paths, np.full(len(paths), -1, dtype=np.int64), [])


def _image_folder(root, split, classnames_file):
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a folder")
    folders = list_class_folders(root)
    paths, labels = _folder_samples(root, folders, range(len(folders)))
    names = apply_classnames_file(classnames_file, folders, [f.replace("_", " ") for f in folders])
    return _Parts(paths, labels, names)


def _csv(root, split, classnames_file):
    paths, raw_labels = read_csv_listing(root)
    if not paths:
        raise DatasetLayoutError(f"{root} lists no images")
    if all(label.isdigit() for label in raw_labels):
        labels = np.array([int(label) for label in raw_labels], dtype=np.int64)
        keys = [str(i) for i in range(labels.max() + 1)]
    else:
        keys = sorted(set(raw_labels))
        index = {key: i for i, key in enumerate(keys)}
        labels = np.array([index[label] for label in raw_labels], dtype=np.int64)
    return _Parts(paths, labels, apply_classnames_file(classnames_file, keys, keys))


#: the shape world's side when `image_resolution` does not ask for another.
SHAPEWORLD_RESOLUTION = 24
_SHAPEWORLD_OOD = ("shapes", "textures")


@functools.lru_cache(maxsize=2)
def _shapeworld_benchmark(seed: int, resolution: int, n_train: int, n_test: int) -> dict:
    """Every split of one world at once (they share one seed sequence); training, validation and
    evaluation ask for its splits in turn."""
    return downstream_benchmark(seed=seed, resolution=resolution, n_train=n_train, n_val=max(1, n_train // 9),
                                n_test=n_test, n_shift=n_test, n_ood=n_test)


def _shapeworld(root, split, classnames_file, *, image_resolution=None, seed=0, n_train=4000, n_test=1000):
    bench = _shapeworld_benchmark(seed, image_resolution or SHAPEWORLD_RESOLUTION, n_train, n_test)
    if split in _SHAPEWORLD_OOD:
        images = bench["semantic"][split]
        return _Parts(images, np.full(len(images), -1, dtype=np.int64), [], channels_first=True)
    images, labels = bench[split] if split in ("train", "val", "test") else bench["covariate"][split]
    names = bench["classnames"]
    return _Parts(images, labels, apply_classnames_file(classnames_file, names, names), channels_first=True)


# ----------------------------------------------------------------------------- the registry

_OOD_FOLDER_LAYOUT = """{root}/   any folder of images (.jpg .jpeg .png .bmp .ppm .pgm .tif .tiff .webp .gif),
              searched recursively; labels are -1. Example: {root}/{example}"""

_IMAGENET_TREE = """{root}/{sub}/     (or {root} itself)
  n01440764/*.JPEG   one folder per WordNet id"""


def _ood_folder(name: str, example: str) -> DatasetSpec:
    return DatasetSpec(name, "ood", ("test",), _OOD_FOLDER_LAYOUT.replace("{example}", example), _unlabelled_folder)


_SPECS = [
    DatasetSpec("cifar10", "id", ("test", "train"), """{root}/cifar-10-batches-py/   (or {root} itself)
  data_batch_1 ... data_batch_5   train (python pickles, torchvision's download)
  test_batch                      test
  batches.meta                    class names""", _cifar10),
    DatasetSpec("cifar100", "id", ("test", "train"), """{root}/cifar-100-python/   (or {root} itself)
  train, test   python pickles with 'data' and 'fine_labels'
  meta          'fine_label_names'""", _cifar100),
    DatasetSpec("cifar10.1", "shift", ("test",), """{root}/datasets/   (or {root} itself)
  cifar10.1_v6_data.npy     uint8 [N, 32, 32, 3]
  cifar10.1_v6_labels.npy   [N] CIFAR-10 labels""", _cifar10_1),
    DatasetSpec("stl10", "shift", ("test", "train"), """{root}/stl10_binary/   (or {root} itself)
  test_X.bin, test_y.bin     uint8 images [N, 3, 96, 96] column-major, labels 1..10
  train_X.bin, train_y.bin   (labels mapped to CIFAR-10 order, monkeys dropped)""", _stl10),
    DatasetSpec("imagenet", "id", ("val", "train"), _IMAGENET_TREE.replace("{sub}", "<split>") + """
  (train/ and val/ both in this class-folder layout; 1000 folders)""",
                _imagenet_wnid_folders(lambda split: [split])),
    DatasetSpec("imagenet-v2", "shift", ("test",), """{root}/imagenetv2-matched-frequency-format-val/   (or {root})
  0/ ... 999/   one folder per ImageNet class index, image files inside""", _imagenet_v2),
    DatasetSpec("imagenet-a", "shift", ("test",), _IMAGENET_TREE.replace("{sub}", "imagenet-a")
                + "   (200 of them)", _imagenet_wnid_folders(lambda split: ["imagenet-a"])),
    DatasetSpec("imagenet-r", "shift", ("test",), _IMAGENET_TREE.replace("{sub}", "imagenet-r")
                + "   (200 of them)", _imagenet_wnid_folders(lambda split: ["imagenet-r"])),
    DatasetSpec("imagenet-sketch", "shift", ("test",), _IMAGENET_TREE.replace("{sub}", "sketch"),
                _imagenet_wnid_folders(lambda split: ["sketch", "imagenet-sketch"])),
    DatasetSpec("svhn", "ood", ("test", "train"), """{root}/svhn/   (or {root} itself)
  test_32x32.mat, train_32x32.mat   X uint8 [32, 32, 3, N], y [N, 1] (10 = digit 0)""", _svhn),
    _ood_folder("inaturalist", "iNaturalist/images/*.jpg"),
    _ood_folder("sun", "SUN/images/*.jpg"),
    _ood_folder("places", "Places/images/*.jpg"),
    _ood_folder("textures", "dtd/images/<category>/*.jpg"),
    _ood_folder("lsun", "LSUN/test/*.jpg (LSUN crop or LSUN_resize)"),
    _ood_folder("isun", "iSUN/iSUN_patches/*.jpeg"),
    _ood_folder("places365", "places365/<category>/*.jpg"),
    DatasetSpec("imagefolder", "id", ("all",), """{root}/
  <class name>/**/*.jpg   one folder per class, sorted names = labels 0, 1, ...;
                          '_' in folder names becomes ' ' in class names""", _image_folder),
    DatasetSpec("csv", "id", ("all",), """{root} is a CSV file with a header row naming 'path' and 'label':
  path,label
  images/0001.jpg,3        paths relative to the CSV's folder; labels integers or class names""", _csv),
    DatasetSpec("shapeworld", "id", ("train", "val", "test", *COVARIATE_DOMAINS, *_SHAPEWORLD_OOD),
                """rendered, no files: seed, n_train, n_test and image_resolution (default 24) choose the world""",
                _shapeworld, generated=True, val_split="val", shift_splits=COVARIATE_DOMAINS,
                ood_splits=_SHAPEWORLD_OOD),
]
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)

# docs/method.md section 7: the paper's evaluation sets for each in-distribution dataset.
PAPER_BENCHMARKS = {
    "cifar10": {"shift": ("cifar10.1", "stl10"), "ood": ("svhn", "isun", "lsun", "textures", "places365")},
    "imagenet": {"shift": ("imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch"),
                 "ood": ("inaturalist", "sun", "places", "textures")},
}


def build_dataset(name: str, root: str | os.PathLike | None, split: str | None = None, *,
                  image_resolution: int | None = None, classnames: str | os.PathLike | None = None,
                  ood: bool | None = None, max_skipped_fraction: float = 0.01, **params) -> ImageDataset:
    """The dataset `name` (one of `DATASET_NAMES`) found under `root`, yielding `(uint8 [3, H, W], label)`.

    `split`: None = the dataset's default (`DATASETS[name].splits[0]`). `image_resolution`: resize
    the shorter side (PIL bicubic) and centre-crop to this size; None keeps the native size (a
    generated dataset renders at this size instead, its own default when None).
    `classnames`: a class-names file replacing the defaults (one name per line in label order,
    or `<key> <name>` lines keyed by WordNet id); ImageNet sets default to open_clip's curated
    names. `ood`: None = the dataset's role; True turns any dataset into an OOD set (labels -1,
    no classes). Unreadable image files are skipped up to `max_skipped_fraction` (see
    `reprogrammer.data.images`). `params`: a generated dataset's parameters (`shapeworld`: `seed`,
    `n_train`, `n_test`); `root` is then unused.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    spec = DATASETS[name]
    split = spec.splits[0] if split is None else split
    if split not in spec.splits:
        raise ValueError(f"{name} has the splits {spec.splits}, not {split!r}")
    if params and not spec.generated:
        raise ValueError(f"{name} is read from files under its root; {sorted(params)} apply only to generated "
                         "datasets (shapeworld)")
    label_free = spec.build is _unlabelled_folder or split in spec.ood_splits
    ood = spec.role == "ood" or split in spec.ood_splits if ood is None else ood
    if not ood and label_free:
        raise ValueError(f"{name} ({split}) has no labels: it can only be an OOD set (ood=True)")
    classnames_file = None if classnames is None else Path(classnames)
    if spec.generated:
        parts = spec.build(None, split, classnames_file, image_resolution=image_resolution, **params)
        name = f"{name}-{split}"
    else:
        if root is None:
            raise ValueError(f"{name} is read from files: give the folder that holds it as root")
        root = Path(root).expanduser()
        try:
            parts = spec.build(root, split, classnames_file)
        except DatasetLayoutError as error:
            raise DatasetLayoutError(f"{name} ({split}) at {root}: {error}\nExpected layout:\n"
                                     + spec.layout.replace("{root}", str(root))) from None
    labels, names, class_indices = parts.labels, parts.classnames, parts.class_indices
    if ood:
        labels, names, class_indices = np.full(len(labels), -1, dtype=np.int64), [], None
    options = dict(image_resolution=image_resolution, class_indices=class_indices,
                   max_skipped_fraction=max_skipped_fraction)
    if isinstance(parts.data, np.ndarray):
        return ArrayImageDataset(name, parts.data, labels, names, channels_first=parts.channels_first, **options)
    return FileImageDataset(name, parts.data, labels, names, **options)
