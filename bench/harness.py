"""Shared setup of every benchmark: timing, measured ceilings, environment record, results files.

A benchmark times each provider (`time_fn`; `cpu_threads` fixes the CPU's thread count), turns
times into throughput, relates it to the ceilings measured in the same run (`measure_ceilings`,
`add_peak_fractions`) and to the other providers (`add_speedups`), then writes JSON + markdown
named by device and date (`write_results`) so that the numbers can be committed with the code
they were measured on.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from reprogrammer.training.telemetry import nvml_driver_version

REPO_ROOT = Path(__file__).resolve().parents[1]
QUANTILES = (0.5, 0.2, 0.8)

# Ceiling workloads: on CUDA the sizes at which an H200 reaches its peak; on the CPU small
# enough to take well under a second.
CEILING_SIZES = {
    "cuda": {"matmul_n": 8192, "copy_bytes": 1 << 30},
    "cpu": {"matmul_n": 512, "copy_bytes": 32 << 20},
}


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in CEILING_SIZES:
        raise ValueError(f"benchmarks run on 'cuda' or 'cpu', got device {str(device)!r}")
    return device


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` intra-op CPU threads (None: leave torch's setting alone).

    On a loaded machine one thread is the honest setting for small ops: a second thread that
    waits for a time slice turns every parallel op into a scheduler quantum (~10-30 ms)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: float = 25,
    rep: float = 100,
    device: str | torch.device | None = None,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Median, 20th and 80th percentile of `fn`'s run time, in ms.

    `warmup` and `rep` are time budgets in ms, as in `triton.testing.do_bench`, which does the
    timing on CUDA (CUDA events, L2 flushed between runs); on the CPU a `perf_counter` loop
    follows the same schedule. `device` defaults to CUDA when present. `grad_to_none` tensors
    get `.grad = None` before each run so that backward passes do not accumulate.
    """
    if not (warmup >= 0 and rep > 0):
        raise ValueError(f"need warmup >= 0 and rep > 0 (ms), got warmup={warmup}, rep={rep}")
    if _device(device).type == "cuda":
        from triton.testing import do_bench

        times = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                         quantiles=list(QUANTILES))
    else:
        times = _cpu_quantiles(fn, warmup, rep, grad_to_none or ())
    return dict(zip(("median_ms", "p20_ms", "p80_ms"), map(float, times)))


def _cpu_quantiles(fn, warmup: float, rep: float, grad_to_none) -> list[float]:
    def timed() -> float:
        for tensor in grad_to_none:
            tensor.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    # Same schedule as do_bench: one call, a 5-call estimate, then run counts from the budgets.
    fn()
    estimate_ms = max(sum(timed() for _ in range(5)) / 5, 1e-6)
    for _ in range(max(1, int(warmup / estimate_ms))):
        fn()
    times = [timed() for _ in range(max(1, int(rep / estimate_ms)))]
    # Linear interpolation between order statistics, as do_bench's torch.quantile does.
    times = torch.tensor(times, dtype=torch.float64)
    return torch.quantile(times, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def measure_ceilings(
    device: str | torch.device | None = None,
    *,
    matmul_n: int | None = None,
    copy_bytes: int | None = None,
    warmup: float = 25,
    rep: float = 100,
) -> dict[str, object]:
    """Measured dense-matmul TFLOP/s and copy GB/s of `device`, the peaks to report against.

    The matmul is square `matmul_n`^3 (2 n^3 flops) in bf16 on CUDA, fp32 on the CPU; the
    copy moves `copy_bytes` from one buffer into another on the same device and counts the
    read and the write (2 * copy_bytes). Sizes default to `CEILING_SIZES[device.type]`.
    """
    device = _device(device)
    sizes = CEILING_SIZES[device.type]
    n = sizes["matmul_n"] if matmul_n is None else matmul_n
    nbytes = sizes["copy_bytes"] if copy_bytes is None else copy_bytes
    if n < 1 or nbytes < 4:
        raise ValueError(f"need matmul_n >= 1 and copy_bytes >= 4, got {n} and {nbytes}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    matmul = time_fn(lambda: torch.mm(a, b, out=c), warmup=warmup, rep=rep, device=device)
    del a, b, c
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), warmup=warmup, rep=rep, device=device)
    moved = 2 * src.numel() * src.element_size()
    return {
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
        "matmul_ms": matmul["median_ms"],
        "matmul_tflops": 2 * n**3 / (matmul["median_ms"] * 1e-3) / 1e12,
        "copy_bytes": moved,
        "copy_ms": copy["median_ms"],
        "copy_gbps": moved / (copy["median_ms"] * 1e-3) / 1e9,
    }


def git_revision(path: str | os.PathLike = REPO_ROOT) -> dict[str, object]:
    """Short commit hash and dirty flag (tracked files only) of the checkout holding `path`.

    `REPROGRAMMER_GIT_COMMIT` overrides the hash, for machines that get a copy of the tree
    without its `.git`; outside a checkout the commit is 'unknown' and the flag None.
    """
    override = os.environ.get("REPROGRAMMER_GIT_COMMIT")
    if override:
        return {"commit": override, "dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def environment_info(device: str | torch.device | None = None) -> dict[str, object]:
    """What a result depends on: device, driver, library versions, commit, UTC date and time.

    Holds no hostname or user name, so results can be committed as they are.
    """
    device = _device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name = f"CPU {platform.machine()}"
        capability = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    revision = git_revision()
    return {
        "device": name,
        "device_type": device.type,
        "capability": capability,
        "driver": nvml_driver_version(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "git_commit": revision["commit"],
        "git_dirty": revision["dirty"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def slug(text: str) -> str:
    """`NVIDIA H200` -> `nvidia-h200`: a file-name-safe form of a name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def add_peak_fractions(rows: Iterable[dict], ceilings: dict) -> list[dict]:
    """Copies of `rows` with `frac_of_peak`: the row's `tflops` over the measured matmul
    ceiling or its `gbps` over the copy ceiling, whichever is closer to its limit (the bound
    that the roofline says applies); None for a row with neither."""
    peaks = {"tflops": ceilings["matmul_tflops"], "gbps": ceilings["copy_gbps"]}
    out = []
    for row in rows:
        fractions = [row[key] / peak for key, peak in peaks.items() if row.get(key) is not None]
        out.append({**row, "frac_of_peak": max(fractions) if fractions else None})
    return out


def add_speedups(
    rows: Iterable[dict],
    case_keys: Sequence[str],
    baselines: Sequence[str],
    *,
    provider_key: str = "provider",
    time_key: str = "ms",
) -> list[dict]:
    """Copies of `rows` with `speedup_vs_<baseline>` = baseline time / row time.

    Rows with equal values under `case_keys` (e.g. mode and shape) are one case; within a
    case each provider appears once. A case that lacks a baseline gets None for it.
    """
    rows = [dict(row) for row in rows]
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        missing = [k for k in (*case_keys, provider_key, time_key) if k not in row]
        if missing:
            raise ValueError(f"row {row} lacks {missing}; every row needs the case keys, "
                             f"{provider_key!r} and {time_key!r}")
        case = tuple(row[k] for k in case_keys)
        providers = by_case.setdefault(case, {})
        if row[provider_key] in providers:
            raise ValueError(f"provider {row[provider_key]!r} appears twice in case "
                             f"{dict(zip(case_keys, case))}; add the distinguishing key to "
                             "case_keys")
        providers[row[provider_key]] = row
    for row in rows:
        providers = by_case[tuple(row[k] for k in case_keys)]
        for baseline in baselines:
            base = providers.get(baseline)
            row[f"speedup_vs_{baseline}"] = (
                None if base is None else base[time_key] / row[time_key]
            )
    return rows


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict]) -> str:
    """A markdown table over the union of the rows' keys, in the order they first appear."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    rows: Sequence[dict],
    name: str,
    out_dir: str | os.PathLike,
    *,
    env: dict | None = None,
    ceilings: dict | None = None,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write `<name>-<device-slug>-<date>.json` (env, ceilings, extra, rows) and a `.md` beside it.

    `env` defaults to `environment_info()`; `extra` holds anything else worth keeping with the
    rows, e.g. a telemetry summary. Returns the two paths.
    """
    if not rows:
        raise ValueError(f"no rows to write for benchmark {name!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"benchmark name {name!r} names a file: use letters, digits, '_', '.' "
                         "and '-' only, e.g. 'kernels'")
    clashes = {"name", "environment", "ceilings", "rows"} & set(extra or {})
    if clashes:
        raise ValueError(f"extra keys {sorted(clashes)} clash with the record's own keys")
    env = environment_info() if env is None else env
    stem = f"{name}-{slug(env['device'])}-{env['date'][:10]}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    record = {"name": name, "environment": env, "ceilings": ceilings, **(extra or {}),
              "rows": list(rows)}
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")

    commit = f"{env['git_commit']}{'-dirty' if env.get('git_dirty') else ''}"
    parts = [f"# {name}",
             f"{env['device']}, driver {env.get('driver')}, torch {env['torch']}, "
             f"triton {env['triton']}, commit {commit}, {env['date']}"]
    if ceilings is not None:
        parts.append(f"Measured ceilings: {ceilings['matmul_tflops']:.4g} TFLOP/s "
                     f"{ceilings['matmul_dtype']} matmul, {ceilings['copy_gbps']:.4g} GB/s copy")
    parts.append(markdown_table(rows))
    md_path.write_text("\n\n".join(parts) + "\n")
    return json_path, md_path


def plot_throughput(
    rows: Iterable[dict],
    x: str,
    y: str,
    group: str,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    logx: bool = True,
) -> Path:
    """Line plot of `y` against `x`, one line per value of `group` (e.g. images/s vs batch).

    Rows lacking `x` or `y` are left out. Draws on a bare Agg figure, so the caller's
    matplotlib backend is untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None:
            lines.setdefault(str(row.get(group)), []).append((row[x], row[y]))
    if not lines:
        raise ValueError(f"no row has both {x!r} and {y!r} to plot")
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in lines.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=x, ylabel=y, title=title or f"{y} vs {x}")
    ax.grid(True, alpha=0.3)
    ax.legend(title=group)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
