"""bench.harness on the CPU at tiny sizes; the CUDA timing path through a stand-in do_bench."""
import json
import random
import re
import socket
import subprocess

import numpy as np
import pytest
import torch
import triton.testing

from bench import harness
from bench.harness import (
    add_peak_fractions,
    add_speedups,
    environment_info,
    git_revision,
    measure_ceilings,
    plot_throughput,
    time_fn,
    write_results,
)


class FakeClock:
    """`perf_counter` that moves only when the timed function says how long it took."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.now = 100.0
        self.durations_ms = []

    def perf_counter(self):
        return self.now

    def work(self):
        ms = self.rng.uniform(0.5, 3.0)
        self.durations_ms.append(ms)
        self.now += ms / 1e3


def test_cpu_quantiles_follow_do_bench_schedule(monkeypatch):
    clock = FakeClock(seed=3)
    monkeypatch.setattr(harness.time, "perf_counter", clock.perf_counter)
    result = time_fn(clock.work, warmup=0, rep=41, device="cpu")
    calls = clock.durations_ms
    # One untimed call, five to estimate, warm-up runs from the budget, then the timed runs.
    estimate = np.mean(calls[1:6])
    n_warmup, n_rep = max(1, int(0 / estimate)), max(1, int(41 / estimate))
    assert len(calls) == 1 + 5 + n_warmup + n_rep
    median, p20, p80 = np.percentile(calls[-n_rep:], [50, 20, 80])
    assert result == pytest.approx({"median_ms": median, "p20_ms": p20, "p80_ms": p80})


def test_cpu_time_fn_measures_real_work():
    target_s = 3e-4

    def spin():
        end = harness.time.perf_counter() + target_s
        while harness.time.perf_counter() < end:
            pass

    result = time_fn(spin, warmup=1, rep=10, device="cpu")
    assert target_s * 1e3 <= result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]
    assert result["median_ms"] < 100


def test_time_fn_clears_grads():
    weight = torch.randn(3, 5, requires_grad=True)
    seen = []

    def step():
        seen.append(weight.grad is None)
        (weight * 2.5).sum().backward()

    time_fn(step, warmup=0, rep=5, device="cpu", grad_to_none=[weight])
    # Calls: one untimed, five estimates, one warm-up (warmup=0), then the timed runs; only
    # the untimed and warm-up calls leave the previous gradient in place.
    assert seen[6] is False, "the warm-up call should see the previous step's gradient"
    assert seen[1:6] == [True] * 5 and len(seen) > 7 and all(seen[7:])


def test_cuda_path_uses_do_bench(monkeypatch):
    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, quantiles):
        calls.append((warmup, rep, grad_to_none, quantiles))
        return [3.25, 2.5, 4.75]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    result = time_fn(lambda: None, warmup=7, rep=33, device="cuda")
    assert calls == [(7, 33, None, [0.5, 0.2, 0.8])]
    assert result == {"median_ms": 3.25, "p20_ms": 2.5, "p80_ms": 4.75}


@pytest.mark.parametrize("kwargs", [{"warmup": -1}, {"rep": 0}, {"device": "meta"}])
def test_time_fn_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        time_fn(lambda: None, **{"device": "cpu", **kwargs})


def test_ceilings_on_cpu():
    n, nbytes = 67, 3 * 4 * 1009
    ceilings = measure_ceilings("cpu", matmul_n=n, copy_bytes=nbytes, warmup=1, rep=5)
    assert ceilings["matmul_dtype"] == "float32" and ceilings["matmul_n"] == n
    assert ceilings["copy_bytes"] == 2 * nbytes
    assert ceilings["matmul_tflops"] == pytest.approx(2 * n**3 / ceilings["matmul_ms"] / 1e9)
    assert ceilings["copy_gbps"] == pytest.approx(2 * nbytes / ceilings["copy_ms"] / 1e6)
    assert all(ceilings[k] > 0 for k in ("matmul_ms", "copy_ms", "matmul_tflops", "copy_gbps"))


@pytest.mark.parametrize("kwargs", [{"matmul_n": 0}, {"copy_bytes": 2}])
def test_ceilings_reject_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="need matmul_n"):
        measure_ceilings("cpu", **kwargs)


def test_environment_info_fields():
    env = environment_info("cpu")
    expected = {"device", "device_type", "capability", "driver", "cuda", "torch", "triton",
                "python", "platform", "git_commit", "git_dirty", "date"}
    assert set(env) == expected
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    assert env["triton"] == triton.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["date"])
    hostname = socket.gethostname()
    if len(hostname) >= 4:
        assert hostname not in json.dumps(env)


def test_git_revision_in_and_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("REPROGRAMMER_GIT_COMMIT", raising=False)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=harness.REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = None
    revision = git_revision()
    if head is None:
        assert revision == {"commit": "unknown", "dirty": None}
    else:
        assert head.startswith(revision["commit"]) and len(revision["commit"]) >= 7
        assert isinstance(revision["dirty"], bool)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_revision(tmp_path) == {"commit": "unknown", "dirty": None}
    monkeypatch.setenv("REPROGRAMMER_GIT_COMMIT", "abc1234")
    assert git_revision(tmp_path) == {"commit": "abc1234", "dirty": None}


def random_rows(seed):
    rng = random.Random(seed)
    rows = []
    for shape in [(3, 224, 224), (7, 97, 131)]:
        for provider in ["triton", "torch", "torch_compile"]:
            rows.append({"provider": provider, "mode": "forward", "batch": shape[0],
                         "size": f"{shape[1]}x{shape[2]}", "ms": rng.uniform(0.1, 9.0),
                         "gbps": rng.uniform(10, 4000)})
    return rows


FAKE_ENV = {"device": "NVIDIA H200", "device_type": "cuda", "driver": "580.1", "torch": "2.11",
            "triton": "3.6", "git_commit": "abc1234", "git_dirty": True,
            "date": "2026-11-17T09:30:00+00:00"}
FAKE_CEILINGS = {"matmul_dtype": "bfloat16", "matmul_tflops": 789.5, "copy_gbps": 4312.0}


def test_write_results_json_and_markdown(tmp_path):
    rows = add_speedups(random_rows(1), ["mode", "batch", "size"], ["torch"])
    json_path, md_path = write_results(rows, "reprogram-embed", tmp_path / "out", env=FAKE_ENV,
                                       ceilings=FAKE_CEILINGS, extra={"telemetry": {"n": 3}})
    assert json_path.name == "reprogram-embed-nvidia-h200-2026-11-17.json"
    assert md_path == json_path.with_suffix(".md")
    record = json.loads(json_path.read_text())
    assert record["environment"] == FAKE_ENV and record["ceilings"] == FAKE_CEILINGS
    assert record["telemetry"] == {"n": 3} and record["rows"] == rows

    lines = md_path.read_text().splitlines()
    assert lines[0] == "# reprogram-embed"
    assert "abc1234-dirty" in lines[2] and "789.5 TFLOP/s bfloat16" in lines[4]
    table = [line for line in lines if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["provider", "mode", "batch", "size", "ms", "gbps", "speedup_vs_torch"]
    assert len(table) == 2 + len(rows)
    first = [c.strip() for c in table[2].strip("|").split("|")]
    assert first[:4] == ["triton", "forward", "3", "224x224"]
    assert float(first[4]) == pytest.approx(rows[0]["ms"], rel=1e-3)


def test_write_results_default_env_and_bad_input(tmp_path):
    json_path, _ = write_results([{"provider": "torch", "ms": 1.5}], "tiny", tmp_path)
    env = json.loads(json_path.read_text())["environment"]
    assert json_path.name == f"tiny-{harness.slug(env['device'])}-{env['date'][:10]}.json"
    with pytest.raises(ValueError, match="no rows"):
        write_results([], "tiny", tmp_path, env=FAKE_ENV)
    with pytest.raises(ValueError, match="names a file"):
        write_results([{"ms": 1.0}], "../escape", tmp_path, env=FAKE_ENV)
    with pytest.raises(ValueError, match="clash"):
        write_results([{"ms": 1.0}], "tiny", tmp_path, env=FAKE_ENV, extra={"rows": []})


def test_add_speedups_against_independent_lookup():
    rows = random_rows(2)
    rows.append({"provider": "triton", "mode": "backward", "batch": 3, "size": "224x224",
                 "ms": 2.0, "gbps": 1.0})  # a case without baselines
    out = add_speedups(rows, ["mode", "batch", "size"], ["torch", "torch_compile"])
    assert all("speedup_vs_torch" not in row for row in rows), "input rows were modified"
    times = {(r["mode"], r["batch"], r["size"], r["provider"]): r["ms"] for r in rows}
    for row in out:
        for base in ["torch", "torch_compile"]:
            base_ms = times.get((row["mode"], row["batch"], row["size"], base))
            expected = None if base_ms is None else base_ms / row["ms"]
            assert row[f"speedup_vs_{base}"] == (None if expected is None
                                                 else pytest.approx(expected))
    assert out[-1]["speedup_vs_torch"] is None
    assert [r for r in out if r["provider"] == "torch"][0]["speedup_vs_torch"] == 1.0


def test_add_speedups_rejects_ambiguous_cases():
    rows = random_rows(3)
    with pytest.raises(ValueError, match="appears twice"):
        add_speedups(rows, ["mode"], ["torch"])
    with pytest.raises(ValueError, match="lacks"):
        add_speedups(rows, ["mode", "dtype"], ["torch"])


def test_add_peak_fractions():
    rows = [{"tflops": 394.75}, {"gbps": 1078.0}, {"tflops": 78.95, "gbps": 3449.6}, {"ms": 1.0}]
    out = add_peak_fractions(rows, FAKE_CEILINGS)
    assert [r["frac_of_peak"] for r in out[:3]] == pytest.approx([0.5, 0.25, 0.8])
    assert out[3]["frac_of_peak"] is None


def test_plot_throughput(tmp_path):
    rng = random.Random(4)
    rows = [{"provider": p, "batch": b, "images_per_s": rng.uniform(100, 5000)}
            for p in ["triton", "torch"] for b in [1, 8, 64, 3]]
    rows.append({"provider": "torch", "batch": 128})  # no measurement: left out
    path = plot_throughput(rows, "batch", "images_per_s", "provider", tmp_path / "p" / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no row has both"):
        plot_throughput(rows, "batch", "tokens_per_s", "provider", tmp_path / "x.png")
