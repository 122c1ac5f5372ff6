"""Readers for the datasets' real on-disk formats; each returns plain numpy arrays or file lists.

Array readers return `(images uint8 [N, H, W, 3], labels int64 [N], classnames)`. Problems with
the files raise `DatasetLayoutError` naming the file; the registry adds the expected layout.
"""
import csv
import os
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"})
CIFAR10_CLASSNAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSNAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
# STL-10 label -> CIFAR-10 label (car = automobile); monkey (-1) has no CIFAR-10 class.
STL10_TO_CIFAR10 = np.array([0, 2, 1, 3, 4, 5, 7, -1, 8, 9])
WNID_PATTERN = re.compile(r"n\d{8}")


class DatasetLayoutError(ValueError):
    """A dataset path is missing or its files are not in the expected format."""


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(f"missing file {path}")
    return path


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays, nothing else.

    A pickle can call any importable function; a dataset file may come from anywhere. The CIFAR
    batches hold only dicts, lists, strings, bytes, ints and one uint8 array, so every global
    but numpy's array and dtype reconstructors is refused (those build arrays, call nothing
    else, and their contents go through this same filter), and `_codecs.encode`, with which
    pickle protocol 2 spells Python 3 bytes.
    """
    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                         ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does "
                                         "(refused: unpickling it could run code)")
        with warnings.catch_warnings():  # numpy 2 warns on its numpy.core alias, which old pickles name
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds persistent ids, which a CIFAR batch never does")


def _load_pickle(path: Path) -> dict:
    # The CIFAR pickles were written by Python 2: latin1 recovers their byte strings; keys may
    # come back as bytes or str depending on how the file was written.
    with open(require_file(path), "rb") as f:
        try:
            content = _CifarUnpickler(f, encoding="latin1").load()
        except Exception as error:  # noqa: BLE001 - any unpickling failure means "not this format"
            raise DatasetLayoutError(f"{path} is not a CIFAR python pickle ({type(error).__name__}: {error})")
    if not isinstance(content, dict):
        raise DatasetLayoutError(f"{path} holds a {type(content).__name__}, expected a CIFAR batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _pickle_field(content: dict, key: str, path: Path):
    if key not in content:
        raise DatasetLayoutError(f"{path} has no '{key}' entry (keys: {sorted(content)})")
    value = content[key]
    return [v.decode("latin1") if isinstance(v, bytes) else v for v in value] if isinstance(value, list) else value


def _read_cifar_batches(paths: Sequence[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        content = _load_pickle(path)
        data = np.asarray(_pickle_field(content, "data", path))
        batch_labels = np.asarray(_pickle_field(content, label_key, path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise DatasetLayoutError(f"{path}: expected uint8 'data' [N, 3072] and N labels, got "
                                     f"{data.dtype} {data.shape} and {len(batch_labels)} labels")
        # Each row is the R, G, B planes of a 32x32 image, row-major.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def read_cifar10(directory: Path, split: str):
    """`cifar-10-batches-py/`: `data_batch_1..5` (train), `test_batch`, `batches.meta`."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = _read_cifar_batches([directory / n for n in names], "labels")
    meta = directory / "batches.meta"
    return images, labels, _pickle_field(_load_pickle(meta), "label_names", meta)


def read_cifar100(directory: Path, split: str):
    """`cifar-100-python/`: `train`, `test`, `meta`; the 100 fine labels."""
    images, labels = _read_cifar_batches([directory / split], "fine_labels")
    meta = directory / "meta"
    return images, labels, _pickle_field(_load_pickle(meta), "fine_label_names", meta)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(require_file(path), allow_pickle=False)
    except (ValueError, EOFError) as error:
        raise DatasetLayoutError(f"{path} is not a plain .npy array ({type(error).__name__}: {error})")


def read_cifar10_1(directory: Path):
    """CIFAR-10.1 v6: `cifar10.1_v6_data.npy` uint8 [N, 32, 32, 3], `cifar10.1_v6_labels.npy` [N]."""
    images = _load_npy(directory / "cifar10.1_v6_data.npy")
    labels = _load_npy(directory / "cifar10.1_v6_labels.npy").astype(np.int64)
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or labels.shape != (len(images),):
        raise DatasetLayoutError(f"{directory}: expected uint8 data [N, 32, 32, 3] and labels [N], got "
                                 f"{images.dtype} {images.shape} and {labels.shape}")
    return images, labels, list(CIFAR10_CLASSNAMES)


def read_stl10_in_cifar10_order(directory: Path, split: str):
    """STL-10 binary (`stl10_binary/{split}_X.bin`, `{split}_y.bin`), monkeys dropped, labels in
    CIFAR-10 order (the authors' code skips this remap)."""
    pixels = np.fromfile(require_file(directory / f"{split}_X.bin"), dtype=np.uint8)
    raw_labels = np.fromfile(require_file(directory / f"{split}_y.bin"), dtype=np.uint8).astype(np.int64)
    per_image = 3 * 96 * 96
    if pixels.size % per_image or pixels.size // per_image != raw_labels.size:
        raise DatasetLayoutError(f"{directory / f'{split}_X.bin'}: {pixels.size} bytes is not {raw_labels.size} "
                                 f"images of 3x96x96 (one per label in {split}_y.bin)")
    if raw_labels.size and (raw_labels.min() < 1 or raw_labels.max() > 10):
        raise DatasetLayoutError(f"{directory / f'{split}_y.bin'}: labels must be 1..10")
    # Each channel is stored column-major: [N, C, W, H] in memory -> [N, H, W, C].
    images = pixels.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    labels = STL10_TO_CIFAR10[raw_labels - 1]
    keep = labels >= 0
    return np.ascontiguousarray(images[keep]), labels[keep], list(CIFAR10_CLASSNAMES)


def read_svhn(directory: Path, split: str):
    """SVHN cropped digits `{split}_32x32.mat`: X [32, 32, 3, N], y [N, 1] with 10 meaning digit 0."""
    try:
        from scipy.io import loadmat
    except ImportError as error:
        raise ImportError("reading SVHN's .mat files needs scipy: pip install 'reprogrammer[datasets]'") from error
    path = require_file(directory / f"{split}_32x32.mat")
    try:
        content = loadmat(path)
    except Exception as error:  # noqa: BLE001 - scipy raises several types for a bad file
        raise DatasetLayoutError(f"{path} is not a MATLAB .mat file ({type(error).__name__}: {error})")
    if "X" not in content or "y" not in content:
        raise DatasetLayoutError(f"{path} needs variables 'X' and 'y'")
    images, labels = content["X"], content["y"].reshape(-1).astype(np.int64)
    if images.dtype != np.uint8 or images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.size:
        raise DatasetLayoutError(f"{path}: expected uint8 X [32, 32, 3, N] and y [N, 1], got "
                                 f"{images.dtype} {images.shape} and {content['y'].shape}")
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels % 10, [str(d) for d in range(10)]


def list_image_files(directory: Path) -> list[Path]:
    """Every image file under `directory`, recursively, sorted; hidden files and folders skipped
    (e.g. macOS `._name.jpg` resource forks are not images)."""
    found = []
    for folder, subfolders, files in os.walk(directory, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def list_class_folders(directory: Path) -> list[str]:
    """Names of the non-hidden sub-folders of `directory`, sorted (ImageFolder class order)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def read_csv_listing(csv_path: Path) -> tuple[list[Path], list[str]]:
    """Rows of a CSV with `path` and `label` columns; relative paths are relative to the CSV."""
    with open(require_file(csv_path), newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetLayoutError(f"{csv_path}: the header row must name the columns 'path' and 'label', "
                                     f"got {reader.fieldnames}")
        rows = [(row["path"], row["label"]) for row in reader]
    return [csv_path.parent / p for p, _ in rows], [label.strip() for _, label in rows]


def read_classnames_file(path: Path) -> list[str] | dict[str, str]:
    """A class-names file: one name per line in label order, or `<key> <name>` lines (key = a
    WordNet id such as n01440764, a folder name, ...) when every line starts with a WordNet id."""
    lines = [line.strip() for line in require_file(path).read_text().splitlines() if line.strip()]
    pairs = [line.split(maxsplit=1) for line in lines]
    if lines and all(len(p) == 2 and WNID_PATTERN.fullmatch(p[0]) for p in pairs):
        return {key: name.strip() for key, name in pairs}
    return lines


def apply_classnames_file(path: Path | None, keys: Sequence[str], default: Sequence[str]) -> list[str]:
    """`default` unless a class-names file is given; a mapping file is looked up by `keys`."""
    if path is None:
        return list(default)
    names = read_classnames_file(Path(path))
    if isinstance(names, dict):
        missing = [k for k in keys if k not in names]
        if missing:
            raise DatasetLayoutError(f"{path} has no name for {len(missing)} classes, e.g. {missing[:5]}")
        return [names[k] for k in keys]
    if len(names) != len(keys):
        raise DatasetLayoutError(f"{path} lists {len(names)} class names, the dataset has {len(keys)} classes")
    return names


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted), from timm's metadata
    (timm is a dependency of open_clip)."""
    from timm.data import ImageNetInfo
    wnids = list(ImageNetInfo().label_names())
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise RuntimeError(f"timm's ImageNet-1k synset list has {len(wnids)} entries or is unsorted; "
                           "pass a classnames file with '<wnid> <name>' lines instead")
    return wnids


def imagenet_classnames() -> list[str]:
    """open_clip's 1000 curated ImageNet class names (the CLIP paper's), in class-index order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    return list(IMAGENET_CLASSNAMES)
