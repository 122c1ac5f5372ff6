#!/usr/bin/env bash
# The one GPU check, for a lent H100 or H200 (see /work/shared/GPU.md): at most 300 s of device
# time, the wheel install included, so that one rerun and two machine starts fit in 15 minutes.
#
# Here, once: `make gpu-wheels` (open_clip_torch, ftfy, wcwidth for cp312 manylinux x86_64 into
# the git-ignored .whl/). Then one call of the device tool (the tree there has no .git: pass the
# commit), with a timeout that leaves room for a rerun:
#   run(command="REPROGRAMMER_GIT_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_check.sh", carry=[".whl"], timeout_s=360)
# Offline rehearsal on a CPU, tiny shapes, same stages: `bash bench/gpu_check.sh --dry-run`.
#
# Stages, each under its own limit (SIGINT first, so pytest and the doctor print their summary
# even when cut short; the benchmarks rewrite their results after every case):
#   setup    the carried wheels into /tmp/site; the checkout on PYTHONPATH with kernels/ and
#            export/ linked where they are installed; a preflight of every API the kernels use;
#   doctor   `reprogrammer doctor` in fp32 and bf16: every fused op, forward and gradients, at
#            odd shapes and one real one against the float64 reference (each kernel
#            configuration compiles once here);
#   tests    the curated CUDA tests the doctor does not cover: torch.compile(fullgraph) of each
#            op at the target shapes, TF32, a dynamic batch, offsets past int32, ViT-L width
#            (junit XML in $OUT);
#   kernels  bench.kernels at the target shapes, bf16: patch embedding of ViT-B/32 at B=256 from
#            32x32 sources, residual logits and scores at B=4096, C=1000, D=512; providers
#            triton (ours), torch (the eager reference), torch_compile (the compiled reference);
#            the ceilings (bf16 matmul, device copy) measured first, in the same run;
#   train    bench.train: ViT-B-32, B=256, 32x32 sources, towers not compiled (inductor builds
#            the whole ViT for minutes, more than this check has), so `ours` against `eager-amp`
#            is the fused ops' share of a training step;
# then a short table, printed last: the device (H100 or H200) and its measured ceilings, each
# kernel timing as ratios to the eager and compiled references and as fractions of those
# ceilings. Full results and the log go to $OUT (bench/results when $OUT is unset).
# The machine has Python 3.12, torch 2.11, triton 3.6 and every dependency but open_clip's ftfy
# and wcwidth, and no network: nothing is installed that was not carried.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Inductor's cache kept to this run: a cache left by a killed compile can break later runs.
export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/reprogrammer-inductor-$$"
unset REPROGRAMMER_BACKEND
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the kernels in Triton's interpreter
else
    unset TRITON_INTERPRET
fi
PYTHON=${PYTHON:-python3}

# Limits in seconds; test_bench.py checks that they add up to at most 300.
LIMIT_WHEELS=15
LIMIT_PREFLIGHT=20
LIMIT_DOCTOR=70
LIMIT_TESTS=60
LIMIT_KERNELS=90
LIMIT_TRAIN=45

# The dry run's CPU is slower at everything (a loaded 2-core machine imports torch in tens of
# seconds): its limits are these times GPU_CHECK_DRY_RUN_SCALE (default 5).
SCALE=1
[ "$DRY_RUN" = 1 ] && SCALE=${GPU_CHECK_DRY_RUN_SCALE:-5}

status=0
START=$SECONDS
# stage NAME SECONDS COMMAND...: COMMAND under a time limit, its output into the log.
stage() {
    local name=$1 limit=$(($2 * SCALE)) start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ]; then
        status=1
        echo "gpu_check: stage $name FAILED (exit $rc$([ "$rc" -ge 124 ] && echo ', time limit'))" \
            | tee -a "$LOG" >&2
    fi
    return "$rc"
}

# Setup: the carried wheels, then the checkout on PYTHONPATH with kernels/ and export/ linked
# where pyproject's package-dir installs them (links this script makes go again at exit).
made_links=()
cleanup() {
    for link in "${made_links[@]}"; do rm -f "$link"; done
    rm -rf "$TORCHINDUCTOR_CACHE_DIR"
}
trap cleanup EXIT
echo "=== setup (limits ${LIMIT_WHEELS}s wheels, ${LIMIT_PREFLIGHT}s preflight)" | tee -a "$LOG"
SITE=""
if [ -d .whl ]; then
    SITE=${TMPDIR:-/tmp}/reprogrammer-site
    timeout "$((LIMIT_WHEELS * SCALE))" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: installing .whl/*.whl failed" | tee -a "$LOG" >&2; exit 1; }
fi
for name in kernels export; do
    if [ ! -e "reprogrammer/$name" ]; then
        ln -s "../$name" "reprogrammer/$name" && made_links+=("reprogrammer/$name")
    fi
done
export PYTHONPATH="${SITE:+$SITE:}$PWD"

# Preflight: every API the kernels and their registration use, or nothing else runs.
DRY_RUN=$DRY_RUN timeout "$((LIMIT_PREFLIGHT * SCALE))" "$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
import inspect
import os
import sys

missing = []


def need(what, check):
    try:
        ok = check()
    except Exception as error:  # an import error is a missing API too
        ok, what = False, f"{what} ({type(error).__name__}: {error})"
    if not ok:
        missing.append(what)


import torch
import triton
import triton.language as tl

need("torch.library.triton_op", lambda: hasattr(torch.library, "triton_op"))
need("torch.library.wrap_triton", lambda: hasattr(torch.library, "wrap_triton"))
need("torch.library.register_autograd", lambda: hasattr(torch.library, "register_autograd"))
need("torch.compiler.is_compiling", lambda: hasattr(torch.compiler, "is_compiling"))
need("tl.argmax(tie_break_left=)",
     lambda: "tie_break_left" in inspect.signature(getattr(tl.argmax, "fn", tl.argmax)).parameters)
need("tl.dot(input_precision=)",
     lambda: "input_precision" in inspect.signature(getattr(tl.dot, "fn", tl.dot)).parameters)
need("open_clip (make gpu-wheels, carry .whl)", lambda: importlib.import_module("open_clip") is not None)
need("the kernels importable as reprogrammer.kernels",
     lambda: importlib.import_module("reprogrammer.kernels.residual_logits") is not None)
if os.environ["DRY_RUN"] != "1":
    need("a CUDA device", torch.cuda.is_available)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
if missing:
    print("missing on this machine:", *missing, sep="\n  ")
    sys.exit(1)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: preflight failed, nothing else runs (above)" | tee -a "$LOG" >&2; exit 1; }
echo "=== setup: done after $((SECONDS - START))s" | tee -a "$LOG"

# The CUDA tests beyond the doctor's (on a CPU they collect and skip).
CUDA_TESTS=(
    "tests/test_reprogram_patch_embed.py::test_cuda_kernels_within_twice_torch_error[cifar_32_to_224-bf16-True]"
    "tests/test_reprogram_patch_embed.py::test_cuda_kernels_within_twice_torch_error[cifar_uint8_32_to_224-fp32-True]"
    "tests/test_reprogram_patch_embed.py::test_cuda_kernels_within_twice_torch_error[cifar_32_to_224-tf32-False]"
    "tests/test_reprogram_patch_embed.py::test_cuda_compiled_with_dynamic_batch"
    "tests/test_reprogram_patch_embed.py::test_cuda_offsets_past_int32"
    "tests/test_residual_logits.py::test_cuda_logits_and_gradients[D512-bfloat16-compiled]"
    "tests/test_residual_logits.py::test_cuda_scores[D512-bfloat16-compiled]"
    "tests/test_residual_logits.py::test_cuda_logits_and_gradients[D768-bfloat16]"
    "tests/test_residual_logits.py::test_cuda_scores[D768-float32]"
)
if [ "$DRY_RUN" = 1 ]; then
    stage doctor "$LIMIT_DOCTOR" "$PYTHON" -m reprogrammer.cli doctor --quick
    stage tests "$LIMIT_TESTS" "$PYTHON" -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT_DIR/cuda-tests.xml" \
        "${CUDA_TESTS[@]}"
    stage kernels "$LIMIT_KERNELS" "$PYTHON" -m bench.kernels --out "$OUT_DIR" --quick --interpret
    stage train "$LIMIT_TRAIN" "$PYTHON" -m bench.train --quick --out "$OUT_DIR"
else
    stage doctor "$LIMIT_DOCTOR" "$PYTHON" -m reprogrammer.cli doctor --precision fp32 bf16
    stage tests "$LIMIT_TESTS" "$PYTHON" -m pytest -q -p no:cacheprovider -rs --durations=5 \
        --junitxml="$OUT_DIR/cuda-tests.xml" "${CUDA_TESTS[@]}"
    stage kernels "$LIMIT_KERNELS" "$PYTHON" -m bench.kernels --out "$OUT_DIR" --dtypes bf16 --warmup 10 --rep 40 \
        --models ViT-B/32 --batches 256 --sources 32 --residual-batches 4096 --classes 1000 --dim 512
    stage train "$LIMIT_TRAIN" "$PYTHON" -m bench.train --model ViT-B-32 --batch 256 --sweep --steps 5 --warmup 1 \
        --image-resolution 32 --compile off --out "$OUT_DIR"
fi

"$PYTHON" - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$LOG"
import json
import sys
from pathlib import Path

from bench import kernels, train

out = Path(sys.argv[1])


def latest(pattern):
    found = sorted(out.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


path = latest("kernels-*.json")
if path is None:
    print("\n## kernels: no results")
else:
    record = json.loads(path.read_text())
    env, ceilings = record["environment"], record["ceilings"]
    kind = next((k for k in ("H100", "H200") if k in env["device"]), "neither H100 nor H200")
    print(f"\n## device: {env['device']} ({kind}), torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['git_commit']}")
    print(f"ceilings measured in this run: {ceilings['matmul_tflops']:.0f} TFLOP/s "
          f"({ceilings['matmul_dtype']} matmul, n={ceilings['matmul_n']}), {ceilings['copy_gbps']:.0f} GB/s copy")
    if record.get("errors"):
        print("errors:", *record["errors"], sep="\n  ")
    print(kernels.short_table(record["rows"]))
    print("\nours (triton) per case: time, speedups over the eager and compiled references, fractions of "
          "the ceilings")
    print("| op | case | dtype | mode | ms | x eager | x compiled | TFLOP/s / peak | GB/s / peak |")
    print("|---|---|---|---|---|---|---|---|---|")

    def cell(value, spec):
        return "" if value is None else format(value, spec)

    for row in record["rows"]:
        if row["provider"] == "triton":
            print(f"| {row['op']} | {row['case']} | {row['dtype']} | {row['mode']} | {row['ms']:.4f} | "
                  f"{cell(row.get('speedup_vs_torch'), '.2f')} | {cell(row.get('speedup_vs_torch_compile'), '.2f')} | "
                  f"{row['tflops'] / ceilings['matmul_tflops']:.3f} | {row['gbps'] / ceilings['copy_gbps']:.3f} |")

path = latest("train-*.json")
if path is None:
    print("\n## train: no results")
else:
    record = json.loads(path.read_text())
    print(f"\n## train: {path.name}")
    print(train.short_table(record["rows"], record["main_batch"]))
EOF
echo "gpu_check: $((SECONDS - START))s in all, $([ "$status" = 0 ] && echo 'every stage passed' || echo 'a stage FAILED (above)')" \
    | tee -a "$LOG"
exit $status
