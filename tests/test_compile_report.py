"""The offline sm_90a report (bench.compile_report): the residual kernels' bf16 configurations at
the benchmark shapes compile for the H200 without spills and with wgmma, and the command writes
well-formed JSON and markdown. Compiling needs no GPU, only the triton wheel's ptxas and
cuobjdump; it runs in a fresh process because the test session defines the kernels for
Triton's interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
needs_tools = pytest.mark.skipif(not (TOOLS / "ptxas").exists() or not (TOOLS / "cuobjdump").exists(),
                                 reason="this triton wheel ships no ptxas / cuobjdump")


def report(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run([sys.executable, "-m", "bench.compile_report", "--out", str(tmp_path), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (record,) = tmp_path.glob("compile-sm90a-offline-*.json")
    return json.loads(record.read_text()), record.with_suffix(".md").read_text(), done.stdout


@needs_tools
def test_residual_bf16_at_benchmark_shapes_use_wgmma_without_spills(tmp_path):
    record, _, _ = report(tmp_path, "^residual .*bf16")
    rows = record["rows"]
    shapes = {row["shape"] for row in rows}
    assert shapes == {"B=4096 C=1000 D=512", "B=4096 C=1000 D=768"}
    for row in rows:
        assert "error" not in row, row
        assert row["spill_stores"] == row["spill_loads"] == 0, row["name"]
        assert row["ctas_per_sm"] >= 1, row["name"]
        if row["flops"]:  # the GEMM kernels; the scores' group merge has no dot
            assert row["mma"].startswith("HGMMA.64x"), (row["name"], row["mma"])
            assert row["inner_loop_counts"]["hgmma"] > 0, row["name"]


@needs_tools
def test_quick_report_writes_json_and_markdown(tmp_path):
    record, markdown, stdout = report(tmp_path, "--quick")
    assert record["quick"] and record["environment"]["triton"] == triton.__version__
    names = {row["name"] for row in record["rows"]}
    assert {"residual_logits", "residual_scores"} <= names
    for row in record["rows"]:
        assert row["dtype"] == "bf16" and row["registers"] > 0 and row["smem"] >= 0
        assert row["instructions_per_output"] > 0 and row["bound_us"]
    lines = markdown.splitlines()
    assert lines[0].startswith("# sm_90a compile report (compiled offline, not measured)")
    assert f"triton {triton.__version__}" in markdown
    table = [line for line in lines if line.startswith("|")]
    header, rule, *body = table
    assert len(body) == len(record["rows"])
    assert {line.count("|") for line in body} == {header.count("|")} and rule.startswith("|---")
    assert "wrote" in stdout


def test_patch_embed_cases_follow_the_documented_interface(monkeypatch):
    """`sm90_cases(batch, h, w, up_resolution, canvas, patch, width, dtype)` of the patch-embedding
    module feeds the report at the three benchmark shapes; without it the report skips with a note."""
    from bench import compile_report

    calls = []

    class StandIn:
        @staticmethod
        def sm90_cases(batch, h, w, up_resolution, canvas, patch, width, dtype):
            calls.append((batch, h, w, up_resolution, canvas, patch, width, dtype))
            return [{"name": "patch_fwd", "kernel": None, "signature": {}, "constexprs": {}, "num_warps": 4,
                     "num_stages": 3, "flops": 1, "bytes": 1}]

    real = compile_report._kernel_module
    monkeypatch.setattr(compile_report, "_kernel_module",
                        lambda name: StandIn if name == "reprogram_patch_embed" else real(name))
    notes = []
    cases = compile_report.collect_cases(False, notes)
    patch = [(shape, dtype) for family, shape, dtype, _ in cases if family == "patch-embed"]
    assert not notes and len(patch) == 6
    assert ("ViT-B/32 B=256 32->224", "bf16") in patch
    assert (256, 32, 32, 224, 224, 32, 768, "bf16") in calls and (128, 224, 224, 224, 224, 14, 1024, "fp32") in calls
    monkeypatch.setattr(compile_report, "_kernel_module",
                        lambda name: object() if name == "reprogram_patch_embed" else real(name))
    cases = compile_report.collect_cases(False, notes)
    assert {family for family, *_ in cases} == {"residual"} and "sm90_cases" in notes[0]
