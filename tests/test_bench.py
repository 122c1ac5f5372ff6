"""The benchmarks at tiny sizes on the CPU: well-formed results, counts and ratios recomputed here,
and the authors' pipeline computing the same objective as Reprogrammer."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import data as bench_data
from bench import kernels as bench_kernels
from bench import train as bench_train
from bench.kernels import PatchEmbedCase, ResidualCase, patch_embed_work, residual_work
from reprogrammer import kernels
from reprogrammer.methods import MethodConfig
from reprogrammer.methods.reprogramming import ReprogrammerClassifier
from tests.helpers import tiny_clip

CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(CUDA, reason="checks the CPU behaviour of the benchmarks")


def _record(folder: Path, name: str) -> dict:
    (path,) = folder.glob(f"{name}-*.json")
    assert path.with_suffix(".md").read_text().startswith(f"# {name}\n")
    return json.loads(path.read_text())


def _by_key(rows, *keys):
    return {tuple(row[k] for k in keys): row for row in rows}


@pytest.fixture(scope="module")
def kernels_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    assert bench_kernels.main(["--quick", "--out", str(out)]) == 0
    return _record(out, "kernels")


@cpu_only
def test_kernels_quick_has_every_op_mode_and_provider(kernels_quick):
    rows = kernels_quick["rows"]
    assert {r["provider"] for r in rows} == {"torch", "torch_compile"}
    assert any("triton provider skipped" in note for note in kernels_quick["notes"])
    modes = {(r["op"], r["mode"]) for r in rows}
    assert modes == {(op, mode) for op in ("patch-embed", "residual-logits") for mode in bench_kernels.MODES} \
        | {("residual-scores", "forward")}
    for row in rows:
        assert 0 < row["p20_ms"] <= row["ms"] <= row["p80_ms"]
        assert {"tflops", "gbps", "speedup_vs_torch", "speedup_vs_torch_compile", "frac_of_peak"} <= row.keys()
    assert kernels_quick["ceilings"]["matmul_tflops"] > 0
    assert set(kernels_quick["counted"]) == {"flops", "bytes"}


@cpu_only
def test_kernels_quick_ratios_and_throughput_recomputed(kernels_quick):
    rows = kernels_quick["rows"]
    ceilings = kernels_quick["ceilings"]
    torch_rows = _by_key([r for r in rows if r["provider"] == "torch"], "op", "case", "mode")
    for row in rows:
        base = torch_rows[row["op"], row["case"], row["mode"]]
        assert row["speedup_vs_torch"] == pytest.approx(base["ms"] / row["ms"])
        assert row["frac_of_peak"] == pytest.approx(max(row["tflops"] / ceilings["matmul_tflops"],
                                                        row["gbps"] / ceilings["copy_gbps"]))
    # The tiny model: S = 32, p = 8, width 48, B = 3; source 8 upsampled to 32.
    row = _by_key(rows, "op", "case", "mode", "provider")["patch-embed", "tiny B=3 8->32", "forward", "torch"]
    m, n, k = 3 * 16, 48, 3 * 64
    moved = 3 * 3 * 8 * 8 * 4 + 3 * 32 * 32 * 4 + n * k * 4 + 16 * n * 4 + m * n * 4
    assert row["tflops"] * 1e12 * row["ms"] * 1e-3 == pytest.approx(2 * m * n * k)
    assert row["gbps"] * 1e9 * row["ms"] * 1e-3 == pytest.approx(moved)
    assert kernels_quick["cases"]["tiny B=3 8->32"] == {"model": "tiny", "batch": 3, "source": 8, "canvas": 32,
                                                        "patch": 8, "width": 48}


def test_work_counts_at_real_shapes():
    vit_b32 = PatchEmbedCase("ViT-B/32", batch=256, source=32, canvas=224, patch=32, width=768)
    m, n, k = 256 * 49, 768, 3 * 32 * 32
    images, perturbation, weight = 256 * 3 * 32 * 32 * 4, 3 * 224 * 224 * 4, n * k * 2
    forward = (2 * m * n * k, images + perturbation + weight + 49 * n * 4 + m * n * 2)
    backward = (2 * m * n * k, m * n * 2 + images + perturbation + weight + perturbation)
    assert patch_embed_work(vit_b32, "forward", torch.bfloat16) == forward
    assert patch_embed_work(vit_b32, "backward", torch.bfloat16) == backward
    assert patch_embed_work(vit_b32, "full", torch.bfloat16) == (forward[0] + backward[0], forward[1] + backward[1])

    case = ResidualCase(batch=4096, classes=1000, dim=512)
    features = (2 * 4096 * 512 + 2 * 1000 * 512) * 4
    assert residual_work(case, "forward", torch.float32, "residual-logits") == \
        (2 * 4096 * 1000 * 512, features + 4096 * 1000 * 4)
    assert residual_work(case, "backward", torch.float32, "residual-logits") == \
        (4 * 4096 * 1000 * 512, 4096 * 1000 * 4 + features + (4096 + 1000) * 512 * 4)
    assert residual_work(case, "forward", torch.float32, "residual-scores") == \
        (2 * 4096 * 1000 * 512, features + 4096 * 20)


@cpu_only
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs Triton's interpreter")
def test_kernels_triton_provider_in_the_interpreter(tmp_path):
    argv = ["--quick", "--interpret", "--ops", "residual-logits", "residual-scores", "--out", str(tmp_path)]
    assert bench_kernels.main(argv) == 0
    rows = _record(tmp_path, "kernels")["rows"]
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    assert {r["mode"] for r in triton_rows} == {"forward", "backward", "full"}
    compiled = _by_key([r for r in rows if r["provider"] == "torch_compile"], "op", "case", "mode")
    for row in triton_rows:
        base = compiled[row["op"], row["case"], row["mode"]]
        assert row["speedup_vs_torch_compile"] == pytest.approx(base["ms"] / row["ms"])


@cpu_only
def test_interpret_flag_without_interpreter_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        bench_kernels.main(["--quick", "--interpret", "--out", str(tmp_path)])


@cpu_only
def test_train_quick_has_every_pipeline_and_ratio(tmp_path):
    assert bench_train.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _record(tmp_path, "train")
    rows = record["rows"]
    assert record["compiled_towers"] is False and record["precision"] == "fp32"
    assert {(r["task"], r["pipeline"], r["batch"]) for r in rows} == {
        (task, pipeline, batch) for batch in (4, 8)
        for task, pipeline in [("train", "authors"), ("train", "eager-amp"), ("train", "ours"),
                               ("train", "lower-bound"), ("eval", "naive-two-pass"), ("eval", "ours")]} | {
        (f"train {count} classes", pipeline, 8) for count in (10, 100) for pipeline in ("ours", "full-text")}
    by = _by_key(rows, "task", "pipeline", "batch")
    for row in rows:
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_ms"] * 1e3)
        assert 0 < row["p20_ms"] <= row["step_ms"] <= row["p80_ms"]
    ours = by["train", "ours", 8]
    for baseline in ("authors", "eager-amp", "lower-bound"):
        assert ours[f"speedup_vs_{baseline}"] == pytest.approx(by["train", baseline, 8]["step_ms"] / ours["step_ms"])
    assert by["eval", "ours", 8]["speedup_vs_naive-two-pass"] == pytest.approx(
        by["eval", "naive-two-pass", 8]["step_ms"] / by["eval", "ours", 8]["step_ms"])
    assert ours["speedup_vs_naive-two-pass"] is None
    assert len(list(tmp_path.glob("train-*.png"))) == 1
    context = 16  # RP-ViT-Tiny's
    for count in (10, 100):
        cut, full = by[f"train {count} classes", "ours", 8], by[f"train {count} classes", "full-text", 8]
        assert full["text_length"] == context and cut["text_length"] <= context and cut["classes"] == count
        assert cut["speedup_vs_full-text"] == pytest.approx(full["step_ms"] / cut["step_ms"])
        for row in (cut, full):
            assert row["text_share"] == pytest.approx(row["text_ms"] / row["step_ms"])
    for row in rows:
        if row["task"] == "train":
            assert row["loader_images_per_s"] > 0
            assert row["input_bound"] == (row["loader_images_per_s"] < row["images_per_s"])
        else:
            assert "input_bound" not in row


def test_data_quick_measures_every_cpu_path(tmp_path):
    assert bench_data.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _record(tmp_path, "data")
    rows = {row["path"]: row for row in record["rows"]}
    assert set(rows) == {"resident", "mapped", "files-pil"}
    for row in rows.values():
        assert row["images"] == 64 and row["batch"] == 16 and row["resolution"] == 32
        assert row["images_per_s"] == pytest.approx(row["images"] / row["epoch_s"])
        assert row["first_epoch_s"] > 0
    assert rows["files-pil"]["workers"] == 2 and rows["resident"]["workers"] == 0


def _pixels(shape, seed):
    """(k + 0.5) / 255: what a PIL round trip turns into exactly k / 255."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 255, shape, generator=g).float() + 0.5) / 255


def _authors(up_resolution, seed=0):
    clip, tokenizer = tiny_clip(seed)
    return bench_train.AuthorsPipeline(clip, tokenizer, bench_train.CLASSNAMES, up_resolution=up_resolution,
                                       mr_resolution=11)


def _reference_canvas(authors, images, up_resolution):
    return kernels.reprogram_image(torch.floor(images * 255) / 255,
                                   kernels.perturbation(authors.image_delta, authors.mask),
                                   up_resolution=up_resolution, mean=authors.mean.flatten().tolist(),
                                   std=authors.std.flatten().tolist())


def test_authors_reprogramming_is_the_reference_up_to_pil_resizing():
    authors = _authors(up_resolution=32)  # the tiny model's canvas: no resize, PIL only quantises
    images = _pixels((5, 3, 32, 32), seed=1)
    torch.testing.assert_close(authors.reprogram(images), _reference_canvas(authors, images, 32))
    # Upsampled 8 -> 20 and centred: PIL's bicubic (a = -0.5, uint8 output) differs from torch's
    # (a = -0.75) inside the image only, by a few grey levels on average.
    authors = _authors(up_resolution=20)
    images = _pixels((5, 3, 8, 8), seed=2)
    difference = (authors.reprogram(images) - _reference_canvas(authors, images, 20)).abs()
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[6:26, 6:26] = True
    assert difference[..., ~inside].max() == 0
    assert 0 < difference[..., inside].mean() < 0.05


def test_authors_loss_and_delta_gradient_equal_reprogrammers():
    authors = _authors(up_resolution=32, seed=3)
    clip, tokenizer = tiny_clip(seed=3)
    ours = ReprogrammerClassifier(clip, tokenizer, bench_train.CLASSNAMES,
                                  MethodConfig(up_resolution=32, mr_resolution=11))
    with torch.no_grad():
        ours.image_delta.copy_(authors.image_delta)
    images = _pixels((7, 3, 32, 32), seed=4)
    labels = torch.tensor([3, 1, 3, 0, 9, 1, 3])  # duplicates: N prompts against the unique ones
    with kernels.use_backend("torch"):
        expected = ours.loss(torch.floor(images * 255) / 255, labels)
    loss = authors.loss(images, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(authors.image_delta.grad, ours.image_delta.grad, rtol=1e-4, atol=1e-7)
    assert authors.clip.token_embedding.weight.grad is not None  # the whole table is trained


def test_authors_optimizers_follow_the_recipe():
    authors = _authors(up_resolution=32)
    image, text = authors.optimizers()
    assert isinstance(image, torch.optim.Adam) and not isinstance(image, torch.optim.AdamW)
    assert image.param_groups[0]["params"] == [authors.image_delta]
    assert (image.defaults["lr"], image.defaults["weight_decay"]) == (5e-3, 0.1)
    assert isinstance(text, torch.optim.AdamW)
    assert text.defaults["betas"] == (0.9, 0.98) and text.defaults["eps"] == 1e-6
    assert sum(p.numel() for p in text.param_groups[0]["params"]) == \
        authors.clip.token_embedding.weight.numel() + authors.clip.positional_embedding.numel()


def test_gpu_check_script_parses():
    script = Path(bench_kernels.__file__).with_name("gpu_check.sh")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


GPU_CHECK = Path(bench_kernels.__file__).with_name("gpu_check.sh")


def test_gpu_check_fits_five_minutes_with_a_limit_on_every_stage():
    text = GPU_CHECK.read_text()
    limits = {name: int(value) for name, value in re.findall(r"^LIMIT_([A-Z]+)=(\d+)$", text, re.M)}
    assert sum(limits.values()) <= 300, limits
    staged = re.findall(r'^\s*stage (\w+) "\$LIMIT_([A-Z]+)"', text, re.M)
    # The dry run and the GPU run go through the same stages, each under its own limit.
    assert sorted(staged) == sorted(2 * [("doctor", "DOCTOR"), ("tests", "TESTS"), ("kernels", "KERNELS"),
                                         ("train", "TRAIN")])
    assert set(limits) == {"WHEELS", "PREFLIGHT", "DOCTOR", "TESTS", "KERNELS", "TRAIN"}
    assert "compile_report" not in text  # offline work has no place on the device
    # SIGINT first, so that pytest and the doctor print what they did before the limit.
    assert "timeout --signal=INT" in text


def test_gpu_check_names_existing_cuda_tests():
    text = GPU_CHECK.read_text()
    block = text[text.index("CUDA_TESTS=("):]
    node_ids = re.findall(r'^\s*"(tests/[^"]+)"$', block[:block.index(")\n")], re.M)
    assert node_ids
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *node_ids], capture_output=True, text=True, cwd=GPU_CHECK.parents[1])
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert f"{len(node_ids)} tests collected" in collected.stdout
