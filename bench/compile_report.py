"""Offline sm_90a (H200) report of every Triton kernel configuration the launchers choose.

    python -m bench.compile_report [--quick] [--out DIR] [FILTER]
    reprogrammer bench compile [--quick] [--out DIR] [FILTER]

No GPU is needed: each configuration is compiled for sm_90a with triton's own compiler
(`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`), then `ptxas -v` and
`cuobjdump -sass` shipped inside the triton wheel give registers, spills and the SASS. The
configurations come from each kernel module's `sm90_cases(...)`, which calls the same
launch-config code as the launchers, so the report cannot drift from what runs.

Case dicts (`sm90_cases` of `kernels/residual_logits.py` and `kernels/reprogram_patch_embed.py`):
`name`, `kernel` (the `@triton.jit` function), `signature` (argument name -> triton type string,
`"*bf16"`, `"i32"`, `"fp32"`, `"constexpr"`, ...), `constexprs`, `num_warps`, `num_stages`,
`flops`, `bytes` (compulsory work of the whole launch); optional `grid` (programs),
`outputs` (output elements of the launch), `trips` (iterations of the innermost loop per
program), `values` (run-time integer and float arguments: those divisible by 16 are specialised as
the launcher does), `divisible_by_16` (further integer arguments to mark divisible).

Everything in the table is compiled, not measured: registers, spills, shared memory, the MMA
instruction kind and shape are read from the compiler's output; CTAs per SM follow from them
(H200: 65536 registers, 228 KB shared memory, 2048 threads and 32 CTAs per SM); per-element
counts are static SASS counts times the case's trip counts; the time bound is the compulsory
bytes and FLOPs against the H200 ceilings measured on the lent machine (4.3 TB/s copy,
790 TFLOP/s dense bf16) or the data-sheet rates for tf32 tensor cores and fp32 FMA.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# H200 per-SM limits (sm_90) and ceilings.
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024  # 227 KB usable by one CTA, 1 KB reserved per CTA
SMEM_RESERVED_PER_CTA = 1024
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
SMS = 132
COPY_BYTES_PER_S = 4.3e12  # measured on the lent H200
CEILING_FLOPS = {  # by the MMA kind of the hot loop
    "bf16": 790e12,  # measured dense bf16 matmul on the lent H200
    "tf32": 395e12,  # data sheet (half the bf16 rate)
    "ffma": 67e12,  # data sheet, fp32 FMA without tensor cores
}

# Benchmark shapes (issue 12): patch embedding (model, batch, source side, canvas, patch, width);
# residual (batch, classes, dim).
PATCH_SHAPES = [("ViT-B/32", 256, 32, 224, 32, 768), ("ViT-B/16", 256, 224, 224, 16, 768),
                ("ViT-L/14", 128, 224, 224, 14, 1024)]
RESIDUAL_SHAPES = [(4096, 1000, 512), (4096, 1000, 768)]
DTYPES = ("bf16", "fp32")
QUICK_RESIDUAL = (512, 200, 256)  # one small shape, bf16 only

SASS_CLASSES = {
    "hgmma": r"\bHGMMA\b",
    "hmma": r"\bHMMA\b",
    "ffma": r"\bFFMA\b",
    "ldg": r"\bLDG\b",
    "ldgsts": r"\bLDGSTS\b",
    "tma": r"\bUTMALDG\b|\bUBLKCP\b",
    "lds": r"\bLDS\b|\bLDSM\b",
    "sts": r"\bSTS\b",
    "stg": r"\bSTG\b",
    "bar": r"\bBAR\b",
    "spill": r"\bLDL\b|\bSTL\b",
}


# ------------------------------------------------------------------------------------------------
# Compiling one case
# ------------------------------------------------------------------------------------------------
def _triton_bin() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_case(case: dict, workdir: Path) -> dict:
    """Compile `case` for sm_90a; return its facts (see `facts_of`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = case["kernel"]
    signature = dict(case["signature"])
    names = list(signature)
    attrs = {}
    # What Triton's launcher specialises at run time: integer arguments divisible by 16.
    divisible = set(case.get("divisible_by_16", ())) | {
        name for name, value in case.get("values", {}).items()
        if isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0}
    for i, name in enumerate(names):
        kind = signature[name]
        # torch allocations are 16-byte aligned: pointers get the launcher's divisibility.
        if kind.startswith("*") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(case["constexprs"]), attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))
    workdir.mkdir(parents=True, exist_ok=True)
    ptx, cubin = workdir / "kernel.ptx", workdir / "kernel.cubin"
    ptx.write_text(compiled.asm["ptx"])
    cubin.write_bytes(compiled.asm["cubin"])
    (workdir / "kernel.ttgir").write_text(compiled.asm["ttgir"])
    tool = _triton_bin()
    ptxas = subprocess.run([str(tool / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", "/dev/null"],
                           capture_output=True, text=True, check=True)
    sass = subprocess.run([str(tool / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    (workdir / "kernel.sass").write_text(sass)
    return facts_of(case, ptxas.stdout + ptxas.stderr, sass, compiled.metadata.shared)


def _ptxas_number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else 0


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction of the cubin's one kernel."""
    out = []
    for line in sass.splitlines():
        found = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if found:
            out.append((int(found.group(1), 16), found.group(2)))
    return out


def sass_loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Loops as (first, last) instruction indices, from backward branches; innermost first."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    loops = []
    for i, (address, text) in enumerate(instructions):
        found = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if found:
            target = int(found.group(1), 16)
            if target <= address and target in index:
                loops.append((index[target], i))
    # Innermost first: a loop containing no other loop. Several backward branches to one head
    # (a loop with a `continue`) count once, with the widest body.
    widest: dict[int, int] = {}
    for start, end in loops:
        widest[start] = max(end, widest.get(start, end))
    return sorted(widest.items(), key=lambda se: se[1] - se[0])


def count_classes(texts) -> dict[str, int]:
    texts = list(texts)
    return {name: sum(1 for t in texts if re.search(rx, t)) for name, rx in SASS_CLASSES.items()}


def mma_kind(instructions) -> str:
    """The MMA instruction and its shape, e.g. `HGMMA.64x128x16.F32.BF16`, `HMMA.16816.F32.BF16`,
    or `FFMA` when the dot became plain FMAs."""
    kinds = {}
    for _, text in instructions:
        found = re.search(r"\b(HGMMA\.[0-9x]+\.\S+|HMMA\.\S+)", text)
        if found:
            opcode = found.group(1)
            kinds[opcode] = kinds.get(opcode, 0) + 1
    if kinds:
        return ", ".join(sorted(kinds, key=kinds.get, reverse=True)[:2])
    return "FFMA" if any(re.search(r"\bFFMA\b", t) for _, t in instructions) else "none"


def occupancy(regs: int, smem: int, warps: int) -> dict[str, int]:
    """Resident CTAs per SM and what limits them (registers allocated per warp in 256s)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = {
        "registers": REGS_PER_SM // (regs_per_warp * warps),
        "smem": (SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)) if smem else CTAS_PER_SM,
        "threads": THREADS_PER_SM // (32 * warps),
        "ctas": CTAS_PER_SM,
    }
    ctas = max(0, min(limits.values()))
    return {"ctas_per_sm": ctas, "limited_by": min(limits, key=limits.get)}


def facts_of(case: dict, ptxas: str, sass: str, smem: int) -> dict:
    regs = _ptxas_number(r"Used (\d+) registers", ptxas)
    spill_stores = _ptxas_number(r"(\d+) bytes spill stores", ptxas)
    spill_loads = _ptxas_number(r"(\d+) bytes spill loads", ptxas)
    instructions = sass_instructions(sass)
    texts = [t for _, t in instructions]
    loops = sass_loops(instructions)
    warps = case["num_warps"]
    facts = {
        "name": case["name"], "num_warps": warps, "num_stages": case["num_stages"],
        "constexprs": {k: v for k, v in case["constexprs"].items() if isinstance(v, (int, float, str, bool))},
        "registers": regs, "spill_stores": spill_stores, "spill_loads": spill_loads, "smem": smem,
        **occupancy(regs, smem, warps), "mma": mma_kind(instructions),
        "sass_total": len(texts), "sass_counts": count_classes(texts),
        "loops": [{"first": s, "last": e, "instructions": e - s + 1,
                   "counts": count_classes(texts[s:e + 1])} for s, e in loops],
        "flops": case["flops"], "bytes": case["bytes"],
    }
    # The hot loop: the innermost loop holding an MMA, else the loop with the most FMAs. A loop
    # holding it (a class sweep around a K loop) is its outer loop.
    loops = [l for l in facts["loops"] if l["instructions"] > 1]  # `BRA` to itself: the exit trap
    facts["loops"] = loops
    mma_loops = [l for l in loops if l["counts"]["hgmma"] or l["counts"]["hmma"]]
    most_ffma = max((l["counts"]["ffma"] for l in loops), default=0)
    hot = mma_loops[0] if mma_loops else next(
        (l for l in loops if most_ffma and l["counts"]["ffma"] >= most_ffma / 2), None)
    outer = None
    if hot is not None:
        enclosing = [l for l in loops if l["first"] <= hot["first"] and l["last"] >= hot["last"] and l is not hot]
        outer = min(enclosing, key=lambda l: l["instructions"], default=None)
    if facts["mma"] == "FFMA" and not (hot and hot["counts"]["ffma"] >= 64):
        facts["mma"] = "none"  # a few FMAs of index or softmax maths, no dot
    facts["inner_loop_instructions"] = hot["instructions"] if hot else None
    facts["inner_loop_counts"] = hot["counts"] if hot else None
    facts["outer_loop_instructions"] = outer["instructions"] if outer else None
    grid, outputs, trips = case.get("grid"), case.get("outputs"), case.get("trips")
    if hot and grid and outputs and trips:
        programs = 1
        for g in grid:
            programs *= g
        per_program = outputs / programs
        outer_trips = case.get("outer_trips", 1) if outer else 0
        loads = ("ldg", "ldgsts", "tma")

        def dynamic(counts_of):
            """Per warp and program: hot loop x trips, rest of the outer loop x its trips, the rest once."""
            inner = counts_of(hot)
            if outer is None:
                return inner * trips + counts_of(None) - inner
            around = counts_of(outer) - inner
            return inner * trips + around * outer_trips + counts_of(None) - counts_of(outer)

        def instructions(loop):
            return len(texts) if loop is None else loop["instructions"]

        def global_loads(loop):
            counts = facts["sass_counts"] if loop is None else loop["counts"]
            return sum(counts[k] for k in loads)

        facts["programs"] = programs
        facts["waves"] = round(programs / max(1, SMS * facts["ctas_per_sm"]), 2)
        facts["instructions_per_output"] = round(warps * dynamic(instructions) / per_program, 3)
        facts["global_loads_per_output"] = round(warps * dynamic(global_loads) / per_program, 4)
    if case["flops"] or case["bytes"]:
        kind = "bf16" if "HGMMA" in facts["mma"] and "BF16" in facts["mma"].upper() else (
            "tf32" if "TF32" in facts["mma"].upper() else ("bf16" if "MMA" in facts["mma"] else "ffma"))
        ceiling = CEILING_FLOPS[kind]
        memory_s, compute_s = case["bytes"] / COPY_BYTES_PER_S, case["flops"] / ceiling
        facts["ceiling"] = kind
        facts["bound_us"] = round(max(memory_s, compute_s) * 1e6, 3)
        facts["bound_by"] = "memory" if memory_s >= compute_s else "compute"
    return facts


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------
def _kernel_module(name: str):
    """`reprogrammer.kernels.<name>` or, in the older layout, `kernels.<name>`: the one in this
    checkout when both are importable (another checkout may be installed in the environment)."""

    found = []
    for prefix in ("reprogrammer.kernels", "kernels"):
        try:
            spec = importlib.util.find_spec(f"{prefix}.{name}")
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin:
            found.append((REPO_ROOT in Path(spec.origin).resolve().parents, f"{prefix}.{name}"))
    if not found:
        raise ModuleNotFoundError(f"kernel module {name} not found")
    found.sort(key=lambda f: not f[0])  # this checkout first
    return importlib.import_module(found[0][1])


def collect_cases(quick: bool, notes: list[str]) -> list[tuple[str, str, str, dict]]:
    """(kernel family, shape label, dtype, case) for every configuration of the report."""
    out = []
    residual = _kernel_module("residual_logits")
    shapes = [QUICK_RESIDUAL] if quick else RESIDUAL_SHAPES
    dtypes = ("bf16",) if quick else DTYPES
    for batch, classes, dim in shapes:
        for dtype in dtypes:
            for case in residual.sm90_cases(batch, classes, dim, dtype):
                out.append(("residual", f"B={batch} C={classes} D={dim}", dtype, case))
    if quick:
        return out
    patch = _kernel_module("reprogram_patch_embed")
    if not hasattr(patch, "sm90_cases"):
        notes.append("patch embedding skipped: kernels/reprogram_patch_embed.py has no sm90_cases() yet")
        print(f"note: {notes[-1]}", flush=True)
        return out
    for model, batch, source, canvas, size, width in PATCH_SHAPES:
        for dtype in DTYPES:
            for case in patch.sm90_cases(batch, source, source, canvas, canvas, size, width, dtype):
                out.append(("patch-embed", f"{model} B={batch} {source}->{canvas}", dtype, case))
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
COLUMNS = [("kernel", "kernel"), ("shape", "shape"), ("dtype", "dtype"), ("registers", "regs"),
           ("spills", "spills (st/ld B)"), ("smem", "smem (B)"), ("ctas_per_sm", "CTAs/SM"),
           ("warps", "warps"), ("mma", "MMA"), ("inner_loop_instructions", "instr/inner iter"),
           ("instructions_per_output", "warp-instr/output"), ("global_loads_per_output", "LDG/output"),
           ("programs", "programs"), ("gflop", "GFLOP"), ("mbytes", "MB"), ("bound_us", "bound (us)")]


def _row(family: str, shape: str, dtype: str, facts: dict) -> dict:
    row = {"kernel": facts["name"], "family": family, "shape": shape, "dtype": dtype,
           "spills": f"{facts['spill_stores']}/{facts['spill_loads']}", "warps": facts["num_warps"],
           "gflop": round(facts["flops"] / 1e9, 3), "mbytes": round(facts["bytes"] / 1e6, 2), **facts}
    if "bound_us" in facts:
        row["bound_us"] = f"{facts['bound_us']} ({facts['bound_by']}, {facts['ceiling']})"
    return row


def markdown(rows: list[dict], env: dict, notes: list[str]) -> str:
    lines = [
        "# sm_90a compile report (compiled offline, not measured)",
        "",
        f"Compiled {env['date']} with triton {env['triton']} (`triton.compile` for "
        f"`GPUTarget(\"cuda\", 90, 32)`, the wheel's `ptxas -v --gpu-name sm_90a` and `cuobjdump`), "
        f"commit {env['git_commit']}{' (dirty tree)' if env.get('git_dirty') else ''}. No GPU ran "
        "anything: registers, spills, shared memory and MMA kind come from the compiler; CTAs/SM is "
        "derived from them (H200: 65536 regs, 228 KB smem, 2048 threads, 32 CTAs per SM); per-output "
        "counts are static SASS counts of the innermost loop (found by backward branches) times its "
        "trip count, per warp, times the warps of a program, over the program's output elements; the "
        "bound is max(compulsory bytes / 4.3 TB/s, FLOPs / ceiling) with 790 TFLOP/s bf16 (measured "
        "on the lent H200), 395 tf32 and 67 fp32 FMA (data sheet).",
        "",
    ]
    lines += [f"- note: {n}" for n in notes]
    if notes:
        lines.append("")
    lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in rows if r.get("error")]
    for row in errors:
        lines.append(f"\n- {row['kernel']} {row['shape']} {row['dtype']}: {row['error']}")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import triton

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = os.environ.get("REPROGRAMMER_GIT_COMMIT") or git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "triton": triton.__version__, "git_commit": commit, "git_dirty": dirty,
            "target": "cuda sm_90a (GPUTarget('cuda', 90, 32))"}


def _compiler_mode() -> None:
    """Kernels decorated while `TRITON_INTERPRET=1` are interpreter functions that cannot be
    compiled: drop the variable when no kernel module is imported yet, else stop with a note."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    loaded = [name for name in sys.modules if name.endswith(("kernels.residual_logits",
                                                             "kernels.reprogram_patch_embed"))]
    if loaded:
        raise SystemExit("bench.compile_report: TRITON_INTERPRET is set and the kernels are already "
                         "defined for the interpreter; run it in a fresh process without TRITON_INTERPRET")
    del os.environ["TRITON_INTERPRET"]


def run(args) -> int:
    _compiler_mode()
    notes: list[str] = []
    env = environment()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for family, shape, dtype, case in collect_cases(args.quick, notes):
            label = f"{case['name']} {shape} {dtype}"
            if args.filter and not re.search(args.filter, f"{family} {label}"):
                continue
            workdir = Path(args.keep or tmp) / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
            try:
                facts = compile_case(case, workdir)
            except Exception as error:  # report it, keep going
                failed += 1
                message = f"{type(error).__name__}: {str(error)[:300]}"
                print(f"{label}: FAILED {message}", file=sys.stderr, flush=True)
                rows.append({"kernel": case["name"], "family": family, "shape": shape, "dtype": dtype,
                             "error": message})
                continue
            row = _row(family, shape, dtype, facts)
            rows.append(row)
            print(f"{label:48} regs={facts['registers']} spills={row['spills']} smem={facts['smem']} "
                  f"CTAs/SM={facts['ctas_per_sm']} mma={facts['mma']} "
                  f"inner={facts['inner_loop_instructions']} instr/out={facts.get('instructions_per_output')}",
                  flush=True)
    if not rows:
        print("no configuration matched", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compile-sm90a-offline-{env['date']}" + ("-quick" if args.quick else "")
    record = {"name": "compile", "environment": env, "notes": notes, "quick": args.quick,
              "ceilings": {"copy_bytes_per_s": COPY_BYTES_PER_S, "flops_per_s": CEILING_FLOPS},
              "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(rows, env, notes))
    print(f"wrote {out / stem}.json and .md")
    return 1 if failed else 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="reprogrammer bench compile", description=__doc__.splitlines()[0])
    parser.add_argument("filter", nargs="?", default="", help="regular expression on '<family> <kernel> <shape> <dtype>', family "
                        "'residual' or 'patch-embed', e.g. '^residual .*bf16'")
    parser.add_argument("--quick", action="store_true",
                        help=f"one small residual shape {QUICK_RESIDUAL}, bf16 only (CI)")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"),
                        help="folder for the JSON + markdown (default bench/results)")
    parser.add_argument("--keep", help="keep ttgir/ptx/cubin/sass of every case under this folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
