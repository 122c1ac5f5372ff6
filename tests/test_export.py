import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from reprogrammer import kernels
from reprogrammer.cli import main
from reprogrammer.export import OnnxClassifier, load_image, predict_files, predict_main
from reprogrammer.export import graph as export_graph
from reprogrammer.export import predict as export_predict
from reprogrammer.export import onnx as export_onnx_module
from reprogrammer.export.onnx import export_onnx
from reprogrammer.export.verify import ExportVerificationError
from tests.helpers import CLASSNAMES, tiny_reprogrammer

CANVAS = 32  # RP-ViT-Tiny's input size; tiny_reprogrammer uses up_resolution 20, mr_resolution 11
# The torch.export-based exporter runs on onnxscript, which the export extra installs.
needs_onnxscript = pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                                      reason="onnxscript missing: pip install 'reprogrammer[export]'")


def trained_like(**kwargs):
    """A tiny Reprogrammer away from its initialisation on both sides."""
    model = tiny_reprogrammer(**kwargs)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if model.image_delta is not None:
            model.image_delta.copy_(torch.randn(model.image_delta.shape, generator=generator) * 2 + 0.3)
        model.token_rows.add_(torch.randn(model.token_rows.shape, generator=generator))
        model.text_positional.add_(0.1 * torch.randn(model.text_positional.shape, generator=generator))
    return model


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (PyTorch's and ONNX Resize's `a = -0.75`)."""
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, a * x ** 3 - 5 * a * x * x + 8 * a * x - 4 * a, 0.0))


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """`[out, in]` weights of a half-pixel bicubic resize whose taps are clamped to the border."""
    matrix = np.zeros((size_out, size_in))
    for out in range(size_out):
        source = (out + 0.5) * size_in / size_out - 0.5
        base = np.floor(source)
        for tap in range(-1, 3):
            matrix[out, int(np.clip(base + tap, 0, size_in - 1))] += _cubic(source - (base + tap))
    return matrix


def reprogrammed_canvas(model, images: np.ndarray, perturbation: np.ndarray, up_resolution: int) -> np.ndarray:
    """docs/method.md section 1 in float64 numpy: bicubic resize to `up_resolution`, centre on a zero
    canvas, add the perturbation, clamp to [0, 1], normalise."""
    h, w = images.shape[-2:]
    resized = _bicubic_matrix(h, up_resolution) @ images @ _bicubic_matrix(w, up_resolution).T
    canvas = np.zeros(images.shape[:2] + (CANVAS, CANVAS))
    offset = (CANVAS - up_resolution) // 2
    canvas[..., offset:offset + up_resolution, offset:offset + up_resolution] = resized
    mean, std = (np.array(v, dtype=np.float64).reshape(1, 3, 1, 1) for v in (model.mean, model.std))
    return (np.clip(canvas + perturbation, 0, 1) - mean) / std


def border_perturbation(model) -> np.ndarray:
    """`tanh(W * M)`, M ones but for the centred `mr x mr` square (eval mode: no dropout)."""
    mask = np.ones((3, CANVAS, CANVAS))
    start = (CANVAS - model.mr_resolution) // 2
    mask[:, start:start + model.mr_resolution, start:start + model.mr_resolution] = 0
    return np.tanh(model.image_delta.detach().double().numpy() * mask)


def expected_outputs(model, images: torch.Tensor, alpha: float) -> dict[str, np.ndarray]:
    """The classifier's outputs from an independent float64 numpy reprogramming of the images, fed to
    open_clip's own `encode_image` (the exported graph uses the toolkit's kernels instead)."""
    pixels = images.double().numpy()
    with torch.no_grad():
        def encode(canvas):
            return F.normalize(model.clip.encode_image(torch.tensor(canvas, dtype=torch.float32)), dim=-1)

        zero_shot = encode(reprogrammed_canvas(model, pixels, 0.0, CANVAS))
        reprogrammed = zero_shot if model.image_delta is None else \
            encode(reprogrammed_canvas(model, pixels, border_perturbation(model), model.up_resolution))
        image = (1 - alpha) * reprogrammed + alpha * zero_shot
        text = (1 - alpha) * model.encode_text() + alpha * model.zs_text_features
        cos = image @ text.T
        logits = model.clip.logit_scale.exp() * cos
        return {"logits": logits.numpy(), "probabilities": logits.softmax(-1).numpy(),
                "ood_score": (cos / 0.01).softmax(-1).amax(-1).numpy(), "prediction": logits.argmax(-1).numpy()}


def test_the_numpy_oracle_is_torchs_bicubic():
    images = torch.rand(2, 3, 13, 9, generator=torch.Generator().manual_seed(1))
    expected = F.interpolate(images.double(), size=(20, 20), mode="bicubic", align_corners=False)
    resized = _bicubic_matrix(13, 20) @ images.double().numpy() @ _bicubic_matrix(9, 20).T
    np.testing.assert_allclose(resized, expected.numpy(), rtol=0, atol=1e-12)


def assert_matches(got: dict, expected: dict, atol: float) -> None:
    for name in ("logits", "probabilities", "ood_score"):
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=atol, err_msg=name)
    top2 = np.sort(expected["logits"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol  # near-ties may flip either way
    np.testing.assert_array_equal(got["prediction"][clear], expected["prediction"][clear])


@pytest.fixture(scope="module")
def model():
    """In training mode with perturbation dropout: the export must still use the eval perturbation."""
    return trained_like(dropout=0.3).train()


@pytest.fixture(scope="module")
def calibration():
    return torch.rand(41, 3, 13, 13, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def calibrated(model, calibration, tmp_path_factory):
    """Path and report of an export with metadata and an OOD threshold, at resolution 13."""
    path = tmp_path_factory.mktemp("calibrated") / "model.onnx"
    report = export_onnx(model, path, image_resolution=13, alpha=0.4, calibration_images=calibration,
                         metadata={"model_name": "RP-ViT-Tiny", "pretrained": "none", "step": 120})
    return path, report


@pytest.mark.parametrize("alpha, resolution, image, exporter", [
    *(pytest.param(*case, "dynamo", marks=needs_onnxscript)
      for case in ((0.0, 13, True), (0.4, 13, True), (0.4, CANVAS, True), (0.4, 13, False))),
    (0.4, 13, True, "legacy"), (0.0, CANVAS, True, "legacy"),
])
def test_onnxruntime_equals_pytorch(model, tmp_path, alpha, resolution, image, exporter):
    model = model if image else trained_like(image=False)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, image_resolution=resolution, alpha=alpha, exporter=exporter)
    assert report["exporter"] == exporter and report["max_abs_diff"]["logits"] <= 1e-4
    assert model.alpha == 0.0 and model.training  # restored after the export
    classifier = OnnxClassifier(path)
    generator = torch.Generator().manual_seed(5)
    for batch in (2, 7):
        images = torch.rand(batch, 3, resolution, resolution, generator=generator)
        assert_matches(classifier(images.numpy()), expected_outputs(model, images, alpha), atol=1e-4)
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, resolution, resolution]
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    # up_resolution 20 != resolution always; the zero-shot branch resizes unless resolution == canvas
    assert len(resizes) == int(image) + int((alpha > 0 or not image) and resolution != CANVAS)
    for node in resizes:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["mode"] == b"cubic" and attributes["coordinate_transformation_mode"] == b"half_pixel"
        assert attributes["cubic_coeff_a"] == pytest.approx(-0.75)


def test_metadata_and_threshold_round_trip(model, calibrated, calibration):
    path, report = calibrated
    classifier = OnnxClassifier(path)
    assert classifier.classnames == CLASSNAMES and classifier.alpha == 0.4
    assert classifier.image_resolution == 13
    assert classifier.metadata["template"] == model.template
    assert classifier.metadata["model_name"] == "RP-ViT-Tiny" and classifier.metadata["pretrained"] == "none"
    assert classifier.metadata["step"] == "120"
    scores = np.sort(expected_outputs(model, calibration, 0.4)["ood_score"])
    assert classifier.threshold == report["ood_threshold"]
    assert classifier.threshold == pytest.approx(scores[2], abs=1e-5)  # round(0.05 * 41) = 2


def write_images(folder):
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "sub" / "b.jpg", folder / "sub" / "c.PNG"]
    Image.fromarray(rng.integers(0, 256, (29, 40, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (50, 17, 3), dtype=np.uint8)).save(paths[1], quality=95)
    Image.fromarray(rng.integers(0, 256, (13, 13, 4), dtype=np.uint8), mode="RGBA").save(paths[2])
    corrupt = folder / "sub" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return paths, corrupt


def test_load_image_is_torchvision_resize_and_centre_crop(tmp_path):
    paths, _ = write_images(tmp_path)
    reference = transforms.Compose([transforms.Resize(13, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(13), transforms.ToTensor()])
    for path in paths:
        with Image.open(path) as image:
            expected = reference(image.convert("RGB")).numpy()
        np.testing.assert_array_equal(load_image(path, 13), expected)


def test_predict_files_reports_unreadable_files_and_classifies_the_rest(calibrated, tmp_path):
    path, _ = calibrated
    paths, corrupt = write_images(tmp_path / "images")
    missing = tmp_path / "missing.png"
    records = list(predict_files(path, [tmp_path / "images", missing], batch_size=2))
    ordered = [paths[0], paths[1], corrupt, paths[2], missing]  # sorted walk, then the next argument
    assert [r["path"] for r in records] == [str(p) for p in ordered]
    bad = {r["path"]: r for r in records if r["error"]}
    assert set(bad) == {str(corrupt), str(missing)}
    assert "cannot read image" in bad[str(corrupt)]["error"] and bad[str(corrupt)]["class"] is None
    classifier = OnnxClassifier(path)
    good = [r for r in records if not r["error"]]
    outputs = classifier(np.stack([load_image(r["path"], 13) for r in good]))
    for i, record in enumerate(good):
        label = outputs["prediction"][i]
        assert record["class"] == CLASSNAMES[label]
        assert record["probability"] == pytest.approx(outputs["probabilities"][i, label], abs=1e-6)
        assert record["ood_score"] == pytest.approx(outputs["ood_score"][i], abs=1e-6)
        assert record["ood"] == (record["ood_score"] < classifier.threshold)


def test_predict_main_prints_json_lines(calibrated, tmp_path, capsys):
    path, _ = calibrated
    paths, corrupt = write_images(tmp_path)
    assert predict_main(["--onnx", str(path), str(paths[0]), str(paths[1])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == [str(paths[0]), str(paths[1])]
    assert predict_main(["--onnx", str(path), str(corrupt), str(paths[2])]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["error"] and lines[1]["class"] in CLASSNAMES and isinstance(lines[1]["ood"], bool)


def test_predict_path_does_not_import_torch():
    code = "import sys; import export.predict; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_providers_take_the_gpu_where_onnxruntime_has_it(monkeypatch):
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(export_predict.ort, "get_available_providers", lambda: gpu)
    assert export_predict.resolve_providers() == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                  "CPUExecutionProvider"]
    assert export_predict.resolve_providers("CUDAExecutionProvider, CPUExecutionProvider") == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(export_predict.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert export_predict.resolve_providers("auto") == ["CPUExecutionProvider"]


def test_unknown_or_missing_providers_are_clear_errors(calibrated, tmp_path, monkeypatch, capsys):
    path, _ = calibrated
    with pytest.raises(ValueError, match="unknown onnxruntime execution provider 'CUDA'"):
        OnnxClassifier(path, providers="CUDA")
    monkeypatch.setattr(export_predict.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="none of the execution providers CUDAExecutionProvider is available"
                                         ".* install onnxruntime-gpu"):
        OnnxClassifier(path, providers=["CUDAExecutionProvider"])
    assert OnnxClassifier(path).session.get_providers() == ["CPUExecutionProvider"]
    paths, _ = write_images(tmp_path)
    # The README's GPU command line on a CPU build: the CPU runs it, and a warning names what is missing.
    with pytest.warns(UserWarning, match="CUDAExecutionProvider not available .* running on CPUExecutionProvider"):
        classifier = OnnxClassifier(path, providers="CUDAExecutionProvider,CPUExecutionProvider")
    assert classifier.session.get_providers() == ["CPUExecutionProvider"]
    assert main(["predict", "--onnx", str(path), "--providers", "CUDAExecutionProvider,CPUExecutionProvider",
                 str(paths[0])]) == 0
    capsys.readouterr()
    assert main(["predict", "--onnx", str(path), "--providers", "Bogus", str(paths[0])]) == 2
    assert "unknown onnxruntime execution provider 'Bogus'" in capsys.readouterr().err


def test_onnx_classifier_rejects_bad_images(calibrated):
    classifier = OnnxClassifier(calibrated[0])
    with pytest.raises(ValueError, match=r"\[B, 3, 13, 13\]"):
        classifier(np.random.rand(2, 3, 12, 13).astype(np.float32))
    with pytest.raises(TypeError, match="255"):
        classifier(np.zeros((2, 3, 13, 13), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classifier(np.random.rand(2, 3, 13, 13).astype(np.float32) * 2)


def test_fp16_export_within_tolerance(model, tmp_path):
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, image_resolution=CANVAS, alpha=0.4, fp16=True)
    assert report["precision"] == "fp16" and report["max_abs_diff"]["logits"] <= 1e-2
    proto = onnx.load(str(path))
    weight_types = {t.data_type for t in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in weight_types
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for v in [*proto.graph.input, *proto.graph.output] if v.name != "prediction")
    images = torch.rand(6, 3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(8))
    got = OnnxClassifier(path)(images.numpy())
    assert_matches(got, expected_outputs(model, images, 0.4), atol=1e-2)
    assert np.abs(got["logits"] - expected_outputs(model, images, 0.4)["logits"]).max() > 1e-6  # really fp16


@needs_onnxscript
def test_auto_exporter_prefers_dynamo_and_falls_back_to_legacy(model, tmp_path, monkeypatch, caplog):
    assert export_onnx_module._exporters_to_try("auto", 18) == ["dynamo", "legacy"]
    assert export_onnx_module._exporters_to_try("auto", 17) == ["legacy"]  # dynamo emits opset >= 18
    assert export_onnx_module._exporters_to_try("auto", 18, fp16=True) == ["legacy"]  # see export.onnx
    with pytest.raises(ValueError, match="opset 18 or later"):
        export_onnx(model, tmp_path / "m.onnx", image_resolution=13, opset=17, exporter="dynamo")
    with pytest.raises(ValueError, match="dynamo' with fp16"):
        export_onnx(model, tmp_path / "m.onnx", image_resolution=13, fp16=True, exporter="dynamo")

    def unsupported(*args):
        raise RuntimeError("torch.export cannot capture this model")

    monkeypatch.setattr(export_onnx_module, "_export_dynamo", unsupported)
    report = export_onnx(model, tmp_path / "m.onnx", image_resolution=13, alpha=0.4)
    assert report["exporter"] == "legacy" and report["opset"] == 18
    assert "cannot capture this model" in caplog.text
    images = torch.rand(3, 3, 13, 13, generator=torch.Generator().manual_seed(4))
    assert_matches(OnnxClassifier(tmp_path / "m.onnx")(images.numpy()), expected_outputs(model, images, 0.4), atol=1e-4)
    with pytest.raises(RuntimeError, match="cannot capture"):  # asked for explicitly: no fallback
        export_onnx(model, tmp_path / "n.onnx", image_resolution=13, exporter="dynamo")


def test_fp16_tolerance_is_twice_pytorchs_own_fp16_error(tmp_path):
    """With CLIP's logit scale of 100 and no extra atol, the fp16 graph passes on the error PyTorch
    itself makes in fp16; a fixed absolute tolerance would not scale with the model."""
    model = trained_like().eval()
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(100.0))
    report = export_onnx(model, tmp_path / "model.onnx", image_resolution=CANVAS, alpha=0.4, fp16=True, atol=0.0)
    assert 0 < report["tolerance"]["logits"] < 0.05  # fp16 is ~1e-3 relative; logits span ~5 here
    assert report["max_abs_diff"]["logits"] <= report["tolerance"]["logits"]
    images = torch.rand(5, 3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(9))
    got = OnnxClassifier(tmp_path / "model.onnx")(images.numpy())
    assert_matches(got, expected_outputs(model, images, 0.4), atol=report["tolerance"]["logits"])
    with pytest.raises(ExportVerificationError, match="disagrees"):  # fp32 has no such allowance
        export_onnx(model, tmp_path / "fp32.onnx", image_resolution=CANVAS, alpha=0.4, atol=0.0, exporter="legacy")


def test_large_weights_go_to_an_external_data_file(model, tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx_module, "EXTERNAL_DATA_BYTES", 0)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, image_resolution=CANVAS, alpha=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    images = torch.rand(3, 3, CANVAS, CANVAS, generator=torch.Generator().manual_seed(2))
    assert_matches(OnnxClassifier(path)(images.numpy()), expected_outputs(model, images, 0.0), atol=1e-4)


def test_verification_refuses_a_wrong_graph_and_writes_nothing(model, tmp_path, monkeypatch):
    def shifted(*args, **kwargs):  # a ramp over the width: a constant shift would vanish in ln_pre
        tokens = kernels.reprogram_patch_embed_ref(*args, **kwargs)
        return tokens + 0.1 * torch.linspace(0, 1, tokens.shape[-1])

    monkeypatch.setattr(export_graph, "reprogram_patch_embed_ref", shifted)
    with pytest.raises(ExportVerificationError, match="disagrees with PyTorch on logits"):
        export_onnx(model, tmp_path / "model.onnx", image_resolution=13, alpha=0.4)
    assert list(tmp_path.iterdir()) == []


def test_non_vit_and_incompatible_models_are_rejected(tmp_path):
    not_vit = tiny_reprogrammer()
    not_vit.clip.visual = torch.nn.Identity()
    with pytest.raises(TypeError, match="ViT image tower"):
        export_onnx(not_vit, tmp_path / "m.onnx", image_resolution=16)
    with pytest.raises(TypeError, match="needs a reprogrammer.Reprogrammer"):
        export_onnx(not_vit.clip, tmp_path / "m.onnx", image_resolution=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, error, match", [
    ({"image_resolution": 0}, ValueError, "positive int"),
    ({"image_resolution": 16.0}, ValueError, "positive int"),
    ({"image_resolution": 16, "opset": 9}, ValueError, "opset"),
    ({"image_resolution": 16, "exporter": "jit"}, ValueError, "auto, dynamo, legacy"),
    ({"image_resolution": 16, "metadata": {"alpha": 1.0}}, ValueError, "derived"),
    ({"image_resolution": 16, "alpha": 1.5}, ValueError, "alpha"),
    ({"image_resolution": 16, "calibration_images": torch.rand(4, 3, 15, 15)}, ValueError, r"\[B, 3, 16, 16\]"),
])
def test_bad_export_arguments_raise(model, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_onnx(model, tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []
