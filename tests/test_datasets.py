"""Dataset registry on tiny files fabricated in each real on-disk format."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch.utils.data import Subset
from torchvision import transforms

from reprogrammer.config import load_config
from reprogrammer.data import (
    CIFAR10_CLASSNAMES,
    DATASET_NAMES,
    DATASETS,
    PAPER_BENCHMARKS,
    DatasetLayoutError,
    ImageLoader,
    TooManySkippedError,
    build_dataset,
    collate_images,
    resize_center_crop,
    split_indices,
)
from reprogrammer.data import shapeworld
from reprogrammer.data.loaders import eval_loader, resident_images
from reprogrammer.data.suites import build_eval_sets, build_train_data

RNG = np.random.default_rng(1234)


def random_images(n, h, w):
    return RNG.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def as_chw(image_hwc):
    return torch.tensor(image_hwc).permute(2, 0, 1)


def save_images(folder, sizes, ext=".png"):
    """Random RGB images of the given (w, h) sizes; returns their pixels as HWC arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = []
    for i, (w, h) in enumerate(sizes):
        array = random_images(1, h, w)[0]
        Image.fromarray(array).save(folder / f"img_{i}{ext}")
        pixels.append(array)
    return pixels


def cifar_rows(images):
    """CIFAR's row format written plane by plane: all R, then all G, then all B, each row-major."""
    return np.concatenate([images[..., c].reshape(len(images), -1) for c in range(3)], axis=1)


def dump(path, content, bytes_keys):
    if bytes_keys:  # as the original Python 2 pickles read back
        content = {k.encode(): ([v.encode() for v in val] if isinstance(val, list) and isinstance(val[0], str)
                                else val) for k, val in content.items()}
    path.write_bytes(pickle.dumps(content))


# ----------------------------------------------------------------------------- array formats

@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_pickles(tmp_path, bytes_keys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {name: (random_images(3, 32, 32), RNG.integers(0, 10, 3).tolist())
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, (images, labels) in batches.items():
        dump(folder / name, {"data": cifar_rows(images), "labels": labels}, bytes_keys)
    dump(folder / "batches.meta", {"label_names": list(CIFAR10_CLASSNAMES)}, bytes_keys)

    test = build_dataset("cifar10", tmp_path)
    assert len(test) == 3 and test.classnames == list(CIFAR10_CLASSNAMES)
    image, label = test[2]
    assert image.dtype == torch.uint8 and torch.equal(image, as_chw(batches["test_batch"][0][2]))
    assert label == batches["test_batch"][1][2]

    train = build_dataset("cifar10", folder, "train")   # the batches folder itself works too
    assert len(train) == 15
    assert torch.equal(train[7][0], as_chw(batches["data_batch_3"][0][1]))
    np.testing.assert_array_equal(train.labels, sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), []))
    np.testing.assert_array_equal(train.class_indices, np.arange(10))


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images, fine = random_images(4, 32, 32), [99, 3, 57, 0]
    dump(folder / "test", {"data": cifar_rows(images), "fine_labels": fine, "coarse_labels": [1, 2, 3, 4]}, True)
    names = [f"class{i}" for i in range(100)]
    dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20}, True)
    test = build_dataset("cifar100", tmp_path, image_resolution=48)
    assert test.classnames == names and test.labels.tolist() == fine
    image, label = test[1]
    assert image.shape == (3, 48, 48) and label == 3
    expected = np.asarray(Image.fromarray(images[1]).resize((48, 48), Image.BICUBIC))
    assert torch.equal(image, as_chw(expected))


def test_cifar10_1_npy_pair(tmp_path):
    images, labels = random_images(5, 32, 32), np.array([9, 0, 4, 4, 1])
    np.save(tmp_path / "cifar10.1_v6_data.npy", images)
    np.save(tmp_path / "cifar10.1_v6_labels.npy", labels)
    test = build_dataset("cifar10.1", tmp_path, image_resolution=32)
    assert test.labels.tolist() == labels.tolist() and test.classnames[1] == "automobile"
    assert torch.equal(test[3][0], as_chw(images[3]))    # already at the resolution: untouched

    np.save(tmp_path / "cifar10.1_v6_labels.npy", labels[:4])
    with pytest.raises(DatasetLayoutError, match="labels"):
        build_dataset("cifar10.1", tmp_path)


def test_stl10_column_major_and_cifar10_label_order(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    stl_labels = np.array([8, 3, 1, 2, 7, 10, 8, 4, 5, 6, 9], dtype=np.uint8)   # 1-based; 8 = monkey, 3 = car
    images = random_images(len(stl_labels), 96, 96)
    # Each image's channels, one after another, each written column by column.
    raw = np.concatenate([images[n, :, :, c].ravel(order="F") for n in range(len(images)) for c in range(3)])
    raw.tofile(folder / "test_X.bin")
    stl_labels.tofile(folder / "test_y.bin")

    test = build_dataset("stl10", tmp_path)
    stl_names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    kept = [i for i, y in enumerate(stl_labels) if stl_names[y - 1] != "monkey"]
    expected = [CIFAR10_CLASSNAMES.index("automobile" if stl_names[stl_labels[i] - 1] == "car"
                                         else stl_names[stl_labels[i] - 1]) for i in kept]
    assert test.labels.tolist() == expected
    assert test.labels[0] == 1   # the car, now CIFAR-10's automobile
    assert test.classnames == list(CIFAR10_CLASSNAMES)
    for position, original in enumerate(kept):
        assert torch.equal(test[position][0], as_chw(images[original]))

    raw[:-5].tofile(folder / "test_X.bin")
    with pytest.raises(DatasetLayoutError, match="3x96x96"):
        build_dataset("stl10", tmp_path)


def test_svhn_mat(tmp_path):
    images, digits = random_images(4, 32, 32), np.array([[10], [3], [1], [10]], dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": digits})
    as_ood = build_dataset("svhn", tmp_path)
    assert as_ood.labels.tolist() == [-1] * 4 and as_ood.classnames == []
    labelled = build_dataset("svhn", tmp_path, ood=False)
    assert labelled.labels.tolist() == [0, 3, 1, 0]
    assert torch.equal(labelled[2][0], as_chw(images[2]))


# ----------------------------------------------------------------------------- file formats

def test_imagenet_wnid_folders_and_subsets(tmp_path):
    # Known ImageNet-1k indices: n01440764 = 0 (tench), n01443537 = 1 (goldfish), n15075141 = 999.
    wnids = {"n01440764": 0, "n01443537": 1, "n15075141": 999}
    for wnid in wnids:
        save_images(tmp_path / "val" / wnid, [(40, 30), (25, 50)], ".JPEG")
    val = build_dataset("imagenet", tmp_path, image_resolution=24)
    assert len(val.classnames) == 1000 and val.classnames[0] == "tench" and val.classnames[1] == "goldfish"
    assert val.labels.tolist() == [0, 0, 1, 1, 999, 999]
    assert val.class_indices.tolist() == [0, 1, 999]
    assert val[5][0].shape == (3, 24, 24)

    save_images(tmp_path / "imagenet-a" / "n15075141", [(20, 20)])
    save_images(tmp_path / "imagenet-a" / "n01443537", [(20, 20), (20, 20)])
    (tmp_path / "imagenet-a" / "README.txt").write_text("not a class")
    subset = build_dataset("imagenet-a", tmp_path)
    assert subset.class_indices.tolist() == [1, 999] and subset.labels.tolist() == [1, 1, 999]
    assert len(subset.classnames) == 1000

    save_images(tmp_path / "sketch" / "n01440764", [(30, 20)])
    assert build_dataset("imagenet-sketch", tmp_path).labels.tolist() == [0]

    (tmp_path / "imagenet-r" / "not_a_wnid").mkdir(parents=True)
    save_images(tmp_path / "imagenet-r" / "n01440764", [(30, 20)])
    with pytest.raises(DatasetLayoutError, match="not_a_wnid"):
        build_dataset("imagenet-r", tmp_path)


def test_imagenet_v2_index_folders(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    for index in ("0", "7", "999"):
        save_images(root / index, [(33, 21)], ".jpeg")
    v2 = build_dataset("imagenet-v2", tmp_path)
    assert v2.labels.tolist() == [0, 7, 999] and v2.classnames[0] == "tench"


def test_classnames_files(tmp_path):
    save_images(tmp_path / "val" / "n01443537", [(20, 20)])
    mapping = tmp_path / "names.txt"
    mapping.write_text("n01440764 tinca\nn01443537 gold fish\n")
    with pytest.raises(DatasetLayoutError, match="no name for 998 classes"):
        build_dataset("imagenet", tmp_path, classnames=mapping)

    save_images(tmp_path / "data" / "golden_retriever", [(20, 20)])
    save_images(tmp_path / "data" / "tabby", [(20, 20)])
    default = build_dataset("imagefolder", tmp_path / "data")
    assert default.classnames == ["golden retriever", "tabby"]
    listed = tmp_path / "list.txt"
    listed.write_text("dog\n\ncat\n")
    assert build_dataset("imagefolder", tmp_path / "data", classnames=listed).classnames == ["dog", "cat"]
    listed.write_text("dog\n")
    with pytest.raises(DatasetLayoutError, match="lists 1 class names"):
        build_dataset("imagefolder", tmp_path / "data", classnames=listed)


def test_unlabelled_ood_folders_recursive(tmp_path):
    dtd = tmp_path / "dtd"
    save_images(dtd / "images" / "banded", [(30, 40), (50, 20)], ".jpg")
    save_images(dtd / "images" / "zigzagged" / "deeper", [(16, 16)])
    (dtd / "labels").mkdir()
    (dtd / "labels" / "labels_joint_anno.txt").write_text("banded/img_0.jpg banded\n")
    (dtd / "images" / "banded" / "._img_0.jpg").write_bytes(b"resource fork")
    textures = build_dataset("textures", tmp_path, image_resolution=16)
    assert len(textures) == 3 and textures.labels.tolist() == [-1, -1, -1]
    assert textures.class_indices.size == 0
    assert all(textures[i][0].shape == (3, 16, 16) for i in range(3))
    with pytest.raises(ValueError, match="no labels"):
        build_dataset("textures", tmp_path, ood=False)


def test_imagefolder_and_csv_pixels(tmp_path):
    cats = save_images(tmp_path / "own" / "cat", [(17, 13)])
    dogs = save_images(tmp_path / "own" / "dog", [(13, 17), (9, 11)])
    folder = build_dataset("imagefolder", tmp_path / "own")
    assert folder.labels.tolist() == [0, 1, 1]
    assert torch.equal(folder[0][0], as_chw(cats[0])) and torch.equal(folder[2][0], as_chw(dogs[1]))

    (tmp_path / "own" / "listing.csv").write_text("label,path,extra\n4,dog/img_1.png,x\n2,cat/img_0.png,y\n")
    listing = build_dataset("csv", tmp_path / "own" / "listing.csv")
    assert listing.labels.tolist() == [4, 2] and len(listing.classnames) == 5
    assert torch.equal(listing[0][0], as_chw(dogs[1]))
    (tmp_path / "own" / "named.csv").write_text("path,label\ndog/img_0.png,dog\ncat/img_0.png,cat\n")
    named = build_dataset("csv", tmp_path / "own" / "named.csv")
    assert named.classnames == ["cat", "dog"] and named.labels.tolist() == [1, 0]
    (tmp_path / "own" / "bad.csv").write_text("file,class\nx.png,1\n")
    with pytest.raises(DatasetLayoutError, match="'path' and 'label'"):
        build_dataset("csv", tmp_path / "own" / "bad.csv")


@pytest.mark.parametrize("size", [(50, 30), (30, 50), (29, 20), (20, 29), (37, 37), (200, 81), (24, 24)])
def test_resize_center_crop_matches_torchvision(size):
    image = Image.fromarray(random_images(1, size[1], size[0])[0])
    reference = transforms.Compose([transforms.Resize(24, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(24)])
    np.testing.assert_array_equal(np.asarray(resize_center_crop(image, 24)), np.asarray(reference(image)))


# ----------------------------------------------------------------------------- errors

EXPECTED_IN_LAYOUT = {"cifar10": "data_batch_1", "cifar100": "fine_label_names", "cifar10.1": "cifar10.1_v6_labels.npy",
                      "stl10": "test_y.bin", "imagenet": "n01440764", "imagenet-v2": "999/",
                      "imagenet-a": "imagenet-a", "imagenet-r": "imagenet-r", "imagenet-sketch": "sketch",
                      "svhn": "test_32x32.mat", "textures": "dtd/images", "imagefolder": "<class name>",
                      "csv": "path,label"}


@pytest.mark.parametrize("name", [name for name in DATASET_NAMES if not DATASETS[name].generated])
def test_missing_paths_show_the_expected_layout(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError, match="Expected layout") as caught:
        build_dataset(name, missing, ood=True)
    assert str(missing) in str(caught.value)
    assert EXPECTED_IN_LAYOUT.get(name, "searched recursively") in str(caught.value)


def test_missing_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    dump(folder / "batches.meta", {"label_names": list(CIFAR10_CLASSNAMES)}, False)
    for i in (1, 2, 4, 5):
        dump(folder / f"data_batch_{i}", {"data": cifar_rows(random_images(2, 32, 32)), "labels": [1, 2]}, False)
    with pytest.raises(DatasetLayoutError, match="missing file .*data_batch_3"):
        build_dataset("cifar10", tmp_path, "train")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetLayoutError, match="data_batch_3 is not a CIFAR python pickle"):
        build_dataset("cifar10", tmp_path, "train")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
        build_dataset("cifar11", ".")
    with pytest.raises(ValueError, match="splits"):
        build_dataset("cifar10.1", ".", "train")
    assert set(PAPER_BENCHMARKS["cifar10"]["ood"]) <= set(DATASET_NAMES)
    assert set(PAPER_BENCHMARKS["imagenet"]["shift"]) <= set(DATASET_NAMES)


# ----------------------------------------------------------------------------- unreadable files

@pytest.fixture
def folder_with_corrupt_files(tmp_path):
    root = tmp_path / "ood"
    save_images(root / "good", [(20, 30)] * 7, ".jpg")
    good = (root / "good" / "img_0.jpg").read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "bad" / "garbage.jpg").write_bytes(b"\x00 certainly not a JPEG " * 10)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_files_are_skipped_and_counted(folder_with_corrupt_files, num_workers):
    dataset = build_dataset("inaturalist", folder_with_corrupt_files, image_resolution=16, max_skipped_fraction=0.25)
    loader = ImageLoader(dataset, batch_size=2, num_workers=num_workers)
    for epoch in range(2):
        seen = sum(len(labels) for _, labels in loader)
        assert seen == 7
    assert sorted(s.path.rsplit("/", 1)[1] for s in dataset.skipped) == ["garbage.jpg", "truncated.jpg"]
    assert all(s.reason for s in dataset.skipped)       # counted once despite two epochs


def test_too_many_skipped_raises(folder_with_corrupt_files):
    dataset = build_dataset("sun", folder_with_corrupt_files, image_resolution=16, max_skipped_fraction=0.1)
    with pytest.raises(TooManySkippedError, match="2 of 9 samples are unreadable"):
        for _ in ImageLoader(Subset(dataset, range(9)), batch_size=9):
            pass


def test_collate_needs_one_size(tmp_path):
    save_images(tmp_path / "a", [(20, 30), (30, 20)])
    dataset = build_dataset("places", tmp_path)
    with pytest.raises(ValueError, match="image_resolution"):
        collate_images([dataset[0], dataset[1]])


def test_shuffled_loader_is_seeded(tmp_path):
    np.save(tmp_path / "cifar10.1_v6_data.npy", random_images(23, 32, 32))
    np.save(tmp_path / "cifar10.1_v6_labels.npy", np.arange(23) % 10)
    dataset = build_dataset("cifar10.1", tmp_path)
    orders = [torch.cat([y for _, y in ImageLoader(dataset, 5, shuffle=True, seed=s)]).tolist() for s in (3, 3, 4)]
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == sorted(dataset.labels.tolist())


def test_split_indices():
    train, val = split_indices(101, val_fraction=0.2, seed=5)
    assert len(val) == 20 and len(train) == 81
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(101))
    again, val_again = split_indices(101, val_size=20, seed=5)
    assert np.array_equal(val, val_again) and np.array_equal(train, again)
    assert not np.array_equal(val, split_indices(101, val_size=20, seed=6)[1])
    with pytest.raises(ValueError, match="exactly one"):
        split_indices(10, val_fraction=0.1, val_size=1)
    with pytest.raises(ValueError, match="between 1 and 9"):
        split_indices(10, val_size=10)


# ----------------------------------------------------------------------------- the shape world

def _shapeworld_sets(*settings):
    cfg = load_config("default", ("data.n_train=45", "data.n_test=12", "train.seed=5", *settings))
    data, sets = build_train_data(cfg), build_eval_sets(cfg)
    return {"train": data.train, "val": data.val, "test": sets.test, **sets.covariate, **sets.semantic}


def _expected_world(resolution):
    world = shapeworld.downstream_benchmark(seed=5, resolution=resolution, n_train=45, n_val=5, n_test=12,
                                            n_shift=12, n_ood=12)
    expected = {name: world[name] for name in ("train", "val", "test")}
    expected.update(world["covariate"])
    expected.update({name: (images, np.full(len(images), -1)) for name, images in world["semantic"].items()})
    return expected


@pytest.mark.parametrize("settings, resolution", [((), 24), (("data.image_resolution=32",), 32)])
def test_shapeworld_sets_are_the_renderers_images_bit_for_bit(settings, resolution):
    """Through the registry, per sample, resident on the device and through the evaluation loader."""
    sets = _shapeworld_sets(*settings)
    expected = _expected_world(resolution)
    assert set(sets) == set(expected)
    for name, (images, labels) in expected.items():
        dataset = sets[name]
        per_sample = torch.stack([dataset[i][0] for i in range(len(dataset))])
        assert torch.equal(per_sample, torch.from_numpy(images)), name
        assert torch.equal(resident_images(dataset, torch.device("cpu")), torch.from_numpy(images)), name
        batches = list(eval_loader(dataset, 5, torch.device("cpu"), budget_gb=0))  # the memory-mapped path
        assert torch.equal(torch.cat([b[0] for b in batches]), torch.from_numpy(images)), name
        assert np.array_equal(dataset.labels, labels), name
    assert sets["test"].classnames == list(shapeworld.ID_CLASSES) and sets["shapes"].classnames == []


def test_shapeworld_label_free_splits_are_only_ood_sets():
    with pytest.raises(ValueError, match=r"shapeworld \(shapes\) has no labels"):
        build_dataset("shapeworld", None, "shapes", ood=False, n_train=9, n_test=3)
    with pytest.raises(ValueError, match="apply only to generated datasets"):
        build_dataset("cifar10", ".", seed=1)
