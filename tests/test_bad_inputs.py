"""Every bad input of the fault survey gets a one-line error naming the problem and the fix,
exit code 2 from the CLI, and leaves the run directory exactly as it was.

The CLI cases run `reprogrammer` in this process against one trained run (an image folder of
four colour classes, RP-ViT-Tiny with random weights, one epoch); Python API cases check the
exception. A few fixes that return a right answer instead of an error are pinned at the end.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from reprogrammer import Reprogrammer
from reprogrammer.cli import main
from reprogrammer.config import ConfigError, load_config
from reprogrammer.data.images import FileImageDataset, TooManySkippedError, first_image_size
from reprogrammer.export.predict import check_images
from tests.helpers import tiny_clip

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (128, 128, 128)}
SETTINGS = ("model.name=RP-ViT-Tiny", "model.pretrained=null", "data.dataset=imagefolder", "data.val_size=8",
            "data.num_workers=0", "train.batch_size=8", "train.epochs=1", "train.device=cpu",
            "method.warmup_steps=1", "method.up_resolution=20", "method.mr_resolution=11")


def image_folder(root: Path, classes=COLOURS, per_class=8, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for name, rgb in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.integers(-30, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    paths = {"base": base, "data": image_folder(base / "data"), "run": base / "run"}
    paths["other"] = image_folder(base / "other", {"cat": (90, 60, 30), "dog": (30, 60, 90)}, per_class=3)
    paths["empty_class"] = image_folder(base / "empty_class")
    (paths["empty_class"] / "zebra").mkdir()
    paths["duplicates"] = base / "duplicates.txt"
    paths["duplicates"].write_text("red\ngreen\nred\ngrey\n")
    assert main(["train", "--out", str(paths["run"]), *sets(*SETTINGS, f"data.root={paths['data']}")]) == 0
    paths["random_onnx"] = base / "random.onnx"
    paths["random_onnx"].write_bytes(np.random.default_rng(0).bytes(400))
    paths["foreign_onnx"] = base / "foreign.onnx"
    _foreign_onnx(paths["foreign_onnx"])
    paths["folder"] = base / "a_folder"
    paths["folder"].mkdir()
    return paths


def _foreign_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [value("x", TensorProto.FLOAT, [1])], [value("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    for key, text in {"classnames": '["a", "b"]', "image_resolution": "12"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, text
    onnx.save(model, str(path))


def train(ctx, *extra, settings=()):
    return ["train", "--out", str(ctx["run"]), *extra, *sets(*SETTINGS, f"data.root={ctx['data']}", *settings)]


def user_data(ctx):
    return sets(f"data.root={ctx['data']}")


CASES = {
    # train
    "train into an existing run": (lambda c: train(c), "already holds a training run.*--resume.*--overwrite"),
    "--resume and --overwrite": (lambda c: train(c, "--resume", "--overwrite"), "exclude each other"),
    "epochs=0": (lambda c: train(c, "--overwrite", settings=["train.epochs=0"]), r"train.epochs must be >= 1"),
    "max_steps=0": (lambda c: train(c, "--overwrite", settings=["train.max_steps=0"]), r"train.max_steps must be >= 1"),
    "negative warm-up": (lambda c: train(c, "--overwrite", settings=["method.warmup_steps=-1"]),
                         r"method.warmup_steps must be >= 0"),
    "skip fraction > 1": (lambda c: train(c, "--overwrite", settings=["data.max_skipped_fraction=1.5"]),
                          r"data.max_skipped_fraction must lie in \[0, 1\]"),
    "mask larger than the image": (lambda c: train(c, "--overwrite", settings=["method.mr_resolution=21"]),
                                   "mr_resolution=21 exceeds up_resolution=20.*method.mr_resolution <="),
    "class folder without images": (lambda c: train(c, "--overwrite", settings=[f"data.root={c['empty_class']}"]),
                                    "class folder .*zebra holds no image files"),
    "duplicate class names": (lambda c: train(c, "--overwrite", settings=[f"data.classnames_file={c['duplicates']}"]),
                              r"class names \['red'\] appear more than once"),
    "shapeworld weights for another model": (
        lambda c: train(c, "--overwrite", settings=["model.name=ViT-B-32", "model.pretrained=shapeworld"]),
        "pretrained=shapeworld exists only for the built-in architectures"),
    "resume of a directory without a run": (
        lambda c: ["train", "--resume", "--out", str(c["base"] / "no_run"),
                   *sets(*SETTINGS, f"data.root={c['data']}")],
        "holds no checkpoints/ directory"),
    # eval
    "eval following the run's own paths": (lambda c: ["eval", "--checkpoint", str(c["run"]),
                                                      "--out", str(c["base"] / "e")],
                                           "names dataset paths in its meta.json.*--set data.root"),
    "eval on other classes": (lambda c: ["eval", "--checkpoint", str(c["run"]), "--out", str(c["base"] / "e"),
                                         *user_data(c),
                                         *sets(f"eval.test={{dataset: imagefolder, root: {c['other']}}}")],
                              r"eval set 'test' has the classes \['cat', 'dog'\].*trained on \['blue'"),
    "eval of a missing step": (lambda c: ["eval", "--checkpoint", str(c["run"]), "--which", "step-00000099",
                                          "--out", str(c["base"] / "e"), *user_data(c)],
                               r"no 'step-00000099' checkpoint .*step directories: step-00000003"),
    "eval of a folder without a run": (lambda c: ["eval", "--checkpoint", str(c["folder"]),
                                                  "--out", str(c["base"] / "e")],
                                       "holds no checkpoints/ directory"),
    # export
    "export to a folder": (lambda c: ["export", "--checkpoint", str(c["run"]), "--out", str(c["folder"]),
                                      *user_data(c)],
                           "is a directory; pass the .onnx file"),
    "export following the run's own paths": (
        lambda c: ["export", "--checkpoint", str(c["run"]), "--out", str(c["base"] / "m.onnx")],
        "names dataset paths in its meta.json.*--set data.root"),
    "negative calibration samples": (
        lambda c: ["export", "--checkpoint", str(c["run"]), "--out", str(c["base"] / "m.onnx"),
                   "--calibration-samples", "-1"], "--calibration-samples must be >= 0"),
    # predict
    "predict with random bytes": (lambda c: ["predict", "--onnx", str(c["random_onnx"]), str(c["data"])],
                                  "is not an ONNX model onnxruntime can load.*reprogrammer export"),
    "predict with a foreign ONNX model": (lambda c: ["predict", "--onnx", str(c["foreign_onnx"]), str(c["data"])],
                                          "not a classifier written by `reprogrammer export`"),
    "predict with a missing model": (lambda c: ["predict", "--onnx", str(c["base"] / "none.onnx"), str(c["data"])],
                                     "no ONNX model at"),
}


def snapshot(folder: Path) -> dict:
    """Every file's bytes and every folder (as None) under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_cli_input(ctx, capsys, name):
    argv, match = CASES[name]
    argv = argv(ctx)
    capsys.readouterr()
    before = snapshot(ctx["base"])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    # One line; dataset errors may add the expected folder layout below it.
    assert lines[0].startswith(f"reprogrammer {argv[0]}: error: ") and lines[1:2] in ([], ["Expected layout:"]), err
    assert re.search(match, lines[0]), lines[0]
    assert snapshot(ctx["base"]) == before  # nothing written, nothing lost


@pytest.fixture(scope="module")
def model():
    clip, tokenizer = tiny_clip()
    model = Reprogrammer(clip, tokenizer, ["red", "green"], up_resolution=20, mr_resolution=11)
    model.tokenizer = tokenizer
    return model


def _nan_images():
    images = torch.rand(2, 3, 12, 12)
    images[1, 0, 3, 3] = float("nan")
    return images


API_CASES = {
    "classnames as one string": (lambda m: Reprogrammer(m.clip, m.tokenizer, "cat"), ValueError,
                                 r"got the string 'cat'; write \['cat'\]"),
    "duplicate class names": (lambda m: Reprogrammer(m.clip, m.tokenizer, ["cat", "dog", "cat"]), ValueError,
                              r"\['cat'\] appear more than once"),
    "numpy images": (lambda m: m(np.random.rand(2, 3, 12, 12).astype(np.float32)), TypeError,
                     "must be a torch.Tensor.*torch.as_tensor"),
    "NaN images": (lambda m: m(_nan_images()), ValueError, r"must lie in \[0, 1\], got values in \[nan"),
    "NaN images for onnxruntime": (lambda m: check_images(_nan_images().numpy(), 12), ValueError,
                                   r"must lie in \[0, 1\]"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_bad_python_input(model, name):
    call, error, match = API_CASES[name]
    with pytest.raises(error, match=match):
        call(model)


def test_unreadable_first_training_image(tmp_path):
    folder = image_folder(tmp_path / "data", {"red": (200, 30, 30)}, per_class=3)
    (folder / "red" / "0.png").write_bytes(b"\x89PNG broken")
    dataset = FileImageDataset("d", sorted((folder / "red").glob("*.png")), np.zeros(3), ["red"],
                               max_skipped_fraction=0.5)
    assert first_image_size(dataset) == 12 and [Path(r.path).name for r in dataset.skipped] == ["0.png"]
    for i in (1, 2):
        (folder / "red" / f"{i}.png").write_bytes(b"broken")
    with pytest.raises(TooManySkippedError):
        first_image_size(Subset(FileImageDataset("d", sorted((folder / "red").glob("*.png")), np.zeros(3), ["red"],
                                                 max_skipped_fraction=1.0), [2, 1, 0]))


# ---- fixed answers, pinned -------------------------------------------------------------------

def test_the_skip_fraction_reaches_the_training_set(ctx):
    from reprogrammer.data.images import base_dataset
    from reprogrammer.data.suites import build_train_data

    cfg = load_config(None, SETTINGS + (f"data.root={ctx['data']}", "data.max_skipped_fraction=0.25"))
    assert base_dataset(build_train_data(cfg).train).max_skipped_fraction == 0.25


def test_sixteen_bit_greyscale_is_scaled_not_saturated(tmp_path):
    from reprogrammer.export.predict import load_image

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((12, 12), 128 * 257, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    image, _ = FileImageDataset("d", [path], np.zeros(1), ["grey"])[0]
    assert image.unique().tolist() == [128]
    assert np.unique(load_image(path, 12)).tolist() == [np.float32(128 / 255)]


def test_export_without_alpha_uses_the_runs_alpha(ctx):
    from reprogrammer.export.predict import OnnxClassifier
    from reprogrammer.runs.restore import load_run

    assert load_run(ctx["run"])[0].alpha == 0.4 and load_run(ctx["run"], alpha=0.0)[0].alpha == 0.0
    path = ctx["base"] / "exports" / "m.onnx"
    path.parent.mkdir()
    assert main(["export", "--checkpoint", str(ctx["run"]), "--out", str(path), *user_data(ctx)]) == 0
    assert OnnxClassifier(path).alpha == 0.4


def test_random_backbone_is_drawn_from_the_run_seed():
    from reprogrammer.clip import clip_from_config

    cfg = load_config(None, ("model.name=RP-ViT-Tiny", "model.pretrained=null", "train.seed=5"))
    torch.manual_seed(0)
    first = clip_from_config(cfg)[0].state_dict()
    torch.manual_seed(1)
    again = clip_from_config(cfg)[0].state_dict()
    other = clip_from_config(load_config(None, ("model.name=RP-ViT-Tiny", "model.pretrained=null",
                                                "train.seed=6")))[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])


def test_shapeworld_weights_need_a_built_in_model():
    from reprogrammer.clip import clip_from_config

    with pytest.raises(ConfigError, match="exists only for the built-in"):
        clip_from_config(load_config(None, ("model.name=ViT-B-32", "model.pretrained=shapeworld")))
