"""Microbenchmarks of the fused ops against their PyTorch reference, eager and compiled.

    python -m bench.kernels [--quick] [--ops patch-embed residual-logits residual-scores]
                            [--batches 64 256 1024] [--dtypes bf16 fp32] [--out bench/results]

Providers, all on the same inputs: `triton` (the public op with REPROGRAMMER_BACKEND=triton),
`torch` (its `*_ref` reference, eager) and `torch_compile` (`torch.compile` of that reference).
Modes: `forward`; `backward` (the backward of one recorded forward, replayed); `full` (both).
The scores op is evaluation-only: forward alone.

Shapes come from real models: the patch embedding of ViT-B/32, ViT-B/16 and ViT-L/14 at
S = U = 224, fed 32x32 sources (upsampled bicubically to 224) and 224x224 sources (no resize);
the residual ops at B in {256, 4096}, C in {10, 1000}, D = 512, alpha = 0.4 (`RESIDUAL_ALPHA`).
On CUDA the patch embedding runs under bf16 autocast and in fp32; the residual ops take bf16 and
fp32 features.

Throughput: TFLOP/s counts the GEMM flops 2*M*N*K; GB/s counts the bytes a fused kernel must move
at the least (see `COUNTED`, also written into the JSON). Both are related to the ceilings measured
in the same run. Results are rewritten after every case, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.harness import (
    REPO_ROOT,
    add_peak_fractions,
    add_speedups,
    cpu_threads,
    environment_info,
    markdown_table,
    measure_ceilings,
    time_fn,
    write_results,
)
from reprogrammer import kernels
from reprogrammer.constants import CLIP_MEAN, CLIP_STD, MCM_TEMPERATURE, RESIDUAL_ALPHA
from reprogrammer.training.telemetry import GpuTelemetry

PROVIDERS = ("triton", "torch", "torch_compile")
BASELINES = ("torch", "torch_compile")
MODES = ("forward", "backward", "full")
# op: (the public fused op, its PyTorch reference), called alike.
IMPLEMENTATIONS = {
    "patch-embed": (kernels.reprogram_patch_embed, kernels.reprogram_patch_embed_ref),
    "residual-logits": (kernels.residual_logits, kernels.residual_logits_ref),
    "residual-scores": (kernels.residual_scores, kernels.residual_scores_ref),
}
OPS = tuple(IMPLEMENTATIONS)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# name: (canvas S, patch p, width) of the image tower's patch embedding.
MODELS = {"ViT-B/32": (224, 32, 768), "ViT-B/16": (224, 16, 768), "ViT-L/14": (224, 14, 1024)}
QUICK_MODELS = {"tiny": (32, 8, 48)}
ALPHA = RESIDUAL_ALPHA
LOGIT_SCALE = 100.0
TEMPERATURE = MCM_TEMPERATURE

COUNTED = {
    "flops": "GEMM flops 2*M*N*K. patch-embed: M = B*(S/p)^2, N = width, K = 3*p*p, forward and "
             "backward (g @ W) each; residual: 2*B*C*D forward, 4*B*C*D backward (image and text "
             "gradients).",
    "bytes": "least traffic of a fused kernel. patch-embed forward: source images (fp32) + "
             "perturbation (fp32) + weight (compute dtype) + positional embedding (fp32) read, tokens "
             "written; backward: upstream gradient + source images + perturbation + weight read, "
             "perturbation gradient (fp32) written. residual-logits forward: the four feature "
             "matrices read, logits written; backward: upstream gradient + the four feature matrices "
             "read, gradients of img_rp and txt_rp written. residual-scores: the four feature "
             "matrices read, four per-row results written (int64 + 3 x fp32). full = forward + "
             "backward.",
}


@dataclass(frozen=True)
class PatchEmbedCase:
    model: str
    batch: int
    source: int  # side of the square source images; upsampled to the canvas when smaller
    canvas: int
    patch: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.model} B={self.batch} {self.source}->{self.canvas}"

    def gemm(self) -> tuple[int, int, int]:
        return self.batch * (self.canvas // self.patch) ** 2, self.width, 3 * self.patch ** 2


@dataclass(frozen=True)
class ResidualCase:
    batch: int
    classes: int
    dim: int

    @property
    def label(self) -> str:
        return f"B={self.batch} C={self.classes} D={self.dim}"


def patch_embed_work(case: PatchEmbedCase, mode: str, dtype: torch.dtype) -> tuple[int, int]:
    """(flops, bytes) of one call in `mode`; see `COUNTED`."""
    m, n, k = case.gemm()
    size = torch.finfo(dtype).bits // 8
    images = case.batch * 3 * case.source ** 2 * 4
    perturbation = 3 * case.canvas ** 2 * 4
    weight = n * k * size
    forward = (2 * m * n * k, images + perturbation + weight + (m // case.batch) * n * 4 + m * n * size)
    backward = (2 * m * n * k, m * n * size + images + perturbation + weight + perturbation)
    return _by_mode(forward, backward, mode)


def residual_work(case: ResidualCase, mode: str, dtype: torch.dtype, op: str) -> tuple[int, int]:
    """(flops, bytes) of one call in `mode`; see `COUNTED`."""
    b, c, d = case.batch, case.classes, case.dim
    size = torch.finfo(dtype).bits // 8
    features = 2 * (b * d + c * d) * size
    written = b * (8 + 3 * 4) if op == "residual-scores" else b * c * size
    forward = (2 * b * c * d, features + written)
    backward = (4 * b * c * d, b * c * size + features + (b * d + c * d) * size)
    return _by_mode(forward, backward, mode)


def _by_mode(forward: tuple[int, int], backward: tuple[int, int], mode: str) -> tuple[int, int]:
    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    return forward[0] + backward[0], forward[1] + backward[1]


# ------------------------------------------------------------------------------------------------
# Inputs and the callables each provider times
# ------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def patch_embed_forward(case: PatchEmbedCase, fn: Callable, dtype: torch.dtype, device: torch.device
                        ) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """`(forward, tensors that receive gradients)` of one implementation on fresh random inputs.

    Low precision is autocast, as in training: fp32 weight and images, bf16 GEMM."""
    g = torch.Generator(device=device).manual_seed(case.batch + case.source)
    images = torch.rand(case.batch, 3, case.source, case.source, device=device, generator=g)
    perturbation = torch.randn(3, case.canvas, case.canvas, device=device, generator=g).tanh()
    perturbation.requires_grad_()
    weight = torch.randn(case.width, 3, case.patch, case.patch, device=device, generator=g)
    weight /= math.sqrt(3 * case.patch ** 2)
    n_patches = (case.canvas // case.patch) ** 2
    pos_embed = 0.02 * torch.randn(n_patches, case.width, device=device, generator=g)

    def forward():
        with _autocast(device, dtype):
            return fn(images, perturbation, weight, up_resolution=case.canvas, mean=CLIP_MEAN,
                      std=CLIP_STD, pos_embed=pos_embed)

    return forward, [perturbation]


def residual_forward(case: ResidualCase, fn: Callable, dtype: torch.dtype, device: torch.device,
                     op: str) -> tuple[Callable[[], object], list[torch.Tensor]]:
    """`(forward, tensors that receive gradients)`: logits with gradients to the reprogrammed
    features (training the residual path), or the evaluation-only scores."""
    g = torch.Generator(device=device).manual_seed(case.batch + case.classes)

    def features(rows):
        return torch.randn(rows, case.dim, device=device, generator=g).to(dtype)

    img_rp, img_zs, txt_rp, txt_zs = (features(n) for n in (case.batch, case.batch, case.classes,
                                                            case.classes))
    if op == "residual-scores":
        @torch.no_grad()
        def forward():
            return fn(img_rp, img_zs, txt_rp, txt_zs, alpha=ALPHA, logit_scale=LOGIT_SCALE,
                      temperature=TEMPERATURE)

        return forward, []
    trained = [img_rp.requires_grad_(), txt_rp.requires_grad_()]
    return (lambda: fn(img_rp, img_zs, txt_rp, txt_zs, alpha=ALPHA, logit_scale=LOGIT_SCALE)), trained


def time_modes(forward: Callable, trained: list[torch.Tensor], modes, *, device, warmup: float,
               rep: float) -> dict[str, dict[str, float]]:
    """Timings of `forward`, of replaying one recorded backward, and of both, for `modes`."""
    timings = {}
    if "forward" in modes:
        timings["forward"] = time_fn(forward, warmup=warmup, rep=rep, device=device)
    if not trained or not {"backward", "full"} & set(modes):
        return timings
    out = forward()
    upstream = torch.randn_like(out)
    if "backward" in modes:
        timings["backward"] = time_fn(lambda: out.backward(upstream, retain_graph=True), warmup=warmup,
                                      rep=rep, device=device, grad_to_none=trained)
    if "full" in modes:
        timings["full"] = time_fn(lambda: forward().backward(upstream), warmup=warmup, rep=rep,
                                  device=device, grad_to_none=trained)
    return timings


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def build_cases(args) -> dict[str, list]:
    models = QUICK_MODELS if args.quick else {name: MODELS[name] for name in args.models}
    cases = {"patch-embed": [], "residual-logits": [], "residual-scores": []}
    for model, (canvas, patch, width) in models.items():
        for source in args.sources:
            if source > canvas:
                raise SystemExit(f"--sources {source} is larger than the {model} canvas {canvas}: "
                                 "sources are upsampled to the canvas, give sizes <= it")
            for batch in args.batches:
                cases["patch-embed"].append(PatchEmbedCase(model, batch, source, canvas, patch, width))
    residual = [ResidualCase(b, c, args.dim) for b in args.residual_batches for c in args.classes]
    cases["residual-logits"] = cases["residual-scores"] = residual
    return {op: cases[op] for op in args.ops}


def _compiled_references(backend: str) -> dict[str, Callable]:
    return {op: torch.compile(ref, backend=backend) for op, (_, ref) in IMPLEMENTATIONS.items()}


def _providers(device: torch.device, interpret: bool, notes: list[str]) -> tuple[str, ...]:
    if device.type == "cuda":
        return PROVIDERS
    if interpret:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise SystemExit("--interpret needs TRITON_INTERPRET=1 set before Python starts (Triton "
                             "reads it when the kernels are defined): TRITON_INTERPRET=1 python -m "
                             "bench.kernels --interpret ...")
        notes.append("triton provider on the CPU runs in Triton's interpreter (TRITON_INTERPRET=1): "
                     "a correctness path, its times say nothing about GPU speed")
        return PROVIDERS
    notes.append("triton provider skipped on the CPU: Triton kernels run here only in the interpreter; "
                 "pass --interpret with TRITON_INTERPRET=1 to time it anyway")
    return BASELINES


def run(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    providers = _providers(device, args.interpret, notes)
    dtypes = ["fp32"] if device.type == "cpu" else args.dtypes
    if device.type == "cpu" and args.dtypes != ["fp32"]:
        notes.append("CPU run in fp32 only (Triton's interpreter and CPU autocast are fp32 / slow in bf16)")
    compile_backend = args.compile_backend or ("aot_eager" if args.quick and device.type == "cpu"
                                               else "inductor")
    if compile_backend != "inductor":
        notes.append(f"torch_compile uses backend {compile_backend!r}, not inductor (inductor takes tens "
                     "of seconds per graph on a small CPU; pass --compile-backend inductor to use it)")
    if "residual-scores" in args.ops:
        notes.append("residual-scores times repeated evaluation calls: the fused op caches the blended text "
                     "side across calls with unchanged text features (as an evaluation loop has), the "
                     "references blend it on every call")
    for note in notes:
        print(f"note: {note}")
    cases = build_cases(args)
    compiled = _compiled_references(compile_backend)
    env = environment_info(device)
    env["torch_threads"] = torch.get_num_threads()
    print(f"{env['device']}: measuring ceilings ...", flush=True)
    ceilings = measure_ceilings(device)
    extra = {"notes": notes, "counted": COUNTED, "compile_backend": compile_backend,
             "alpha": ALPHA, "cases": {}, "errors": []}
    if hasattr(os, "getloadavg"):
        extra["load_avg_start"] = os.getloadavg()
    rows: list[dict] = []
    paths = None
    # Dynamo caches compiled graphs per function; every shape, dtype and autocast state here is
    # one more entry for the same reference function.
    with _recompile_limit(256), GpuTelemetry() as telemetry:
        for dtype_name in dtypes:
            for op, op_cases in cases.items():
                for case in op_cases:
                    extra["cases"][case.label] = asdict(case)
                    rows += measure_case(op, case, dtype_name, providers, device, compiled[op], args,
                                         extra["errors"])
                    extra["telemetry"] = telemetry.summary()
                    if hasattr(os, "getloadavg"):
                        extra["load_avg_end"] = os.getloadavg()
                    paths = write(rows, ceilings, env, extra, args.out)
    if paths is None:
        raise SystemExit("no case was selected: check --ops, --batches and --sources")
    print(f"wrote {paths[0]} and {paths[1]}")
    print(short_table(finish(rows, ceilings)))
    return 1 if extra["errors"] else 0


@contextlib.contextmanager
def _recompile_limit(limit: int):
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: limit}):
        yield


def measure_case(op, case, dtype_name, providers, device, compiled, args, errors) -> list[dict]:
    dtype = DTYPES[dtype_name]
    modes = ("forward",) if op == "residual-scores" else tuple(args.modes)
    rows = []
    for provider in providers:
        backend = "triton" if provider == "triton" else "torch"
        try:
            with kernels.use_backend(backend):
                fused, reference = IMPLEMENTATIONS[op]
                fn = {"triton": fused, "torch": reference, "torch_compile": compiled}[provider]
                if op == "patch-embed":
                    forward, trained = patch_embed_forward(case, fn, dtype, device)
                else:
                    forward, trained = residual_forward(case, fn, dtype, device, op)
                timings = time_modes(forward, trained, modes, device=device, warmup=args.warmup,
                                     rep=args.rep)
        except Exception as err:
            # One failing provider (a kernel that does not build, memory) must not lose the run.
            message = f"{op} {case.label} {dtype_name} {provider}: {type(err).__name__}: {err}"
            errors.append(message)
            print(f"error: {message}", file=sys.stderr)
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for mode, timing in timings.items():
            if op == "patch-embed":
                flops, nbytes = patch_embed_work(case, mode, dtype)
            else:
                flops, nbytes = residual_work(case, mode, dtype, op)
            seconds = timing["median_ms"] * 1e-3
            row = {"op": op, "case": case.label, "dtype": dtype_name, "mode": mode, "provider": provider,
                   "ms": timing["median_ms"], "p20_ms": timing["p20_ms"], "p80_ms": timing["p80_ms"],
                   "tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9}
            rows.append(row)
            print(f"{op:16} {case.label:28} {dtype_name:4} {mode:8} {provider:13} "
                  f"{row['ms']:9.4f} ms {row['tflops']:8.3f} TFLOP/s {row['gbps']:8.1f} GB/s", flush=True)
    return rows


def finish(rows: list[dict], ceilings: dict) -> list[dict]:
    rows = add_speedups(rows, ("op", "case", "dtype", "mode"), BASELINES)
    return add_peak_fractions(rows, ceilings)


def write(rows, ceilings, env, extra, out) -> tuple[Path, Path]:
    return write_results(finish(rows, ceilings), "kernels", out, env=env, ceilings=ceilings, extra=extra)


def short_table(rows: list[dict]) -> str:
    """Per (op, dtype, mode, provider): geometric-mean speedups over the cases and the best
    fraction of the measured ceilings; the `torch` baseline itself is left out."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["provider"] != "torch":
            groups.setdefault((row["op"], row["dtype"], row["mode"], row["provider"]), []).append(row)

    def geomean(values):
        values = [v for v in values if v is not None]
        return statistics.geometric_mean(values) if values else None

    summary = []
    for (op, dtype, mode, provider), group in groups.items():
        fractions = [r["frac_of_peak"] for r in group if r.get("frac_of_peak") is not None]
        summary.append({
            "op": op, "dtype": dtype, "mode": mode, "provider": provider, "cases": len(group),
            "speedup_vs_torch": geomean(r["speedup_vs_torch"] for r in group),
            "speedup_vs_torch_compile": None if provider == "torch_compile"
            else geomean(r["speedup_vs_torch_compile"] for r in group),
            "best_frac_of_peak": max(fractions) if fractions else None,
        })
    return markdown_table(summary)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reprogrammer bench kernels",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (seconds on a CPU): one small ViT, B=3, residual B=13 C=10 D=24")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"),
                        help="folder for the JSON + markdown results (default bench/results)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", help="patch-embedding batch sizes "
                        "(default 64 256 1024)")
    parser.add_argument("--sources", type=int, nargs="+", help="source image sides (default 32 224)")
    parser.add_argument("--residual-batches", type=int, nargs="+", help="default 256 4096")
    parser.add_argument("--classes", type=int, nargs="+", help="default 10 1000")
    parser.add_argument("--dim", type=int, help="feature width D (default 512)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"],
                        help="GPU precisions (bf16: autocast for the patch embedding); the CPU runs fp32")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--warmup", type=float, help="warm-up budget per timing, ms (default 25; quick 5)")
    parser.add_argument("--rep", type=float, help="timing budget per timing, ms (default 100; quick 20)")
    parser.add_argument("--compile-backend", choices=["inductor", "aot_eager"],
                        help="torch.compile backend of the torch_compile provider (default inductor; "
                             "aot_eager for --quick on the CPU)")
    parser.add_argument("--interpret", action="store_true",
                        help="on the CPU, also time the triton provider in Triton's interpreter "
                             "(needs TRITON_INTERPRET=1; fp32)")
    parser.add_argument("--threads", type=int,
                        help="CPU intra-op threads for the run (default: torch's; --quick: 1)")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.threads is None and quick:
        args.threads = 1
    defaults = {"batches": [3] if quick else [64, 256, 1024], "sources": [8, 32] if quick else [32, 224],
                "residual_batches": [13] if quick else [256, 4096], "classes": [10] if quick else [10, 1000],
                "dim": 24 if quick else 512, "warmup": 5.0 if quick else 25.0, "rep": 20.0 if quick else 100.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = [*args.batches, *args.sources, *args.residual_batches, *args.classes, args.dim]
    if min(sizes) < 1 or (args.threads is not None and args.threads < 1):
        parser.error(f"sizes must be positive, got {sizes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cpu_threads(args.threads):
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
