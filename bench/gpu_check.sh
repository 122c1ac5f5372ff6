#!/usr/bin/env bash
# The one GPU check, for a lent H200 (see /work/shared/GPU.md); about 8 minutes at most:
#   (0) preflight: the stack has every API the kernels use, or the script stops here, loudly;
#   (a) the kernel tests on CUDA, compiled Triton, fp32 and bf16 (TRITON_INTERPRET unset), for
#       both kernels (patch embedding, residual logits / scores);
#   (b) the kernel microbenchmarks (bench.kernels) at the target shapes, bf16: patch embedding
#       of ViT-B/32 at B=256 from 32x32 sources (forward, backward, both) and the residual ops
#       at B=4096, C=1000, D=512; providers triton (ours), torch (the eager reference) and
#       torch_compile (the compiled reference);
#   (c) the offline sm_90a compile report (bench.compile_report) with this machine's triton;
#   (d) only with GPU_CHECK_TRAIN=1: the training-throughput benchmark (its first step compiles
#       the whole ViT for minutes, more than this check's budget);
# then a short table, printed last: each timing as ratios to the eager and compiled references
# and as fractions of the ceilings measured in the same run. Results and the log go to $OUT
# (bench/results when $OUT is unset). Each stage runs under its own time limit, and the
# benchmarks rewrite their results as they go, so a stage cut short keeps what it measured.
#
# The machine has Python 3.12, torch 2.11, triton 3.6 and the project's other dependencies,
# but not open_clip, and no network. `import open_clip` needs, at import time: torch,
# torchvision, regex, ftfy (which needs wcwidth), safetensors, timm (>= 1.0.17),
# huggingface_hub, tqdm, pyyaml, pillow; of these only ftfy and wcwidth are missing there. So
# `.whl/` (git-ignored) holds exactly:
#   open_clip_torch==3.3.0   ftfy==6.3.1   wcwidth==0.9.4
# fetched in the repository root with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# and the device run carries `.whl` and passes the commit, since the copy there has no .git:
#   REPROGRAMMER_GIT_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_check.sh
# Nothing is installed that was not carried: the wheels go to /tmp/site without dependencies
# or an index, and the project itself is installed editable with the image's own setuptools
# (`pip install --no-deps --no-build-isolation --no-index -e .`); if the image's setuptools
# cannot build it, PYTHONPATH points at the checkout (with kernels/ and export/ linked into
# reprogrammer/ for the run), and the log says so.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
# Benchmarks and tests compile with inductor: keep its cache to this run (a cache left by a
# killed compile can break later runs).
export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/reprogrammer-inductor-$$"
unset TRITON_INTERPRET REPROGRAMMER_BACKEND

fail() { echo "gpu_check: FAILED: $*" | tee -a "$LOG" >&2; exit 1; }

PYTHONPATH_EXTRA=""
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail "installing the carried wheels .whl/*.whl"
    PYTHONPATH_EXTRA="/tmp/site"
fi
export PYTHONPATH="$PYTHONPATH_EXTRA"
if python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1; then
    echo "project installed editable (pip -e ., the image's setuptools)" | tee -a "$LOG"
else
    # Without the editable install's finder, reprogrammer.kernels / reprogrammer.export are found
    # through links placed where they are installed, removed again when this script exits.
    echo "WARNING: pip install -e . failed with the image's setuptools (see the log);" \
         "using PYTHONPATH=$PWD with reprogrammer/kernels and reprogrammer/export linked" | tee -a "$LOG"
    for name in kernels export; do
        [ -e "reprogrammer/$name" ] || ln -s "../$name" "reprogrammer/$name"
    done
    trap 'rm -f reprogrammer/kernels reprogrammer/export' EXIT
    export PYTHONPATH="${PYTHONPATH_EXTRA:+$PYTHONPATH_EXTRA:}$PWD"
fi

# Preflight: every API the kernels, their registration and the compile report use.
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
import inspect
import sys
from pathlib import Path

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
need("Tensor.is_inference", lambda: hasattr(torch.Tensor, "is_inference"))
need("triton.compiler.ASTSource", lambda: hasattr(importlib.import_module("triton.compiler"), "ASTSource"))
need("triton.backends.compiler.GPUTarget",
     lambda: hasattr(importlib.import_module("triton.backends.compiler"), "GPUTarget"))
need("tl.argmax(tie_break_left=)",
     lambda: "tie_break_left" in inspect.signature(getattr(tl.argmax, "fn", tl.argmax)).parameters)
need("tl.dot(input_precision=)",
     lambda: "input_precision" in inspect.signature(getattr(tl.dot, "fn", tl.dot)).parameters)
bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
need(f"ptxas and cuobjdump in {bin_dir}", lambda: (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists())
need("open_clip (carry .whl/, see the header)", lambda: importlib.import_module("open_clip") is not None)
need("a CUDA device", torch.cuda.is_available)
for name in ("residual_logits", "reprogram_patch_embed"):
    module = None
    for prefix in ("reprogrammer.kernels", "kernels"):
        try:
            module = importlib.import_module(f"{prefix}.{name}")
            break
        except ModuleNotFoundError:
            continue
    need(f"kernel module {name} importable", lambda: module is not None)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
if missing:
    print("missing on this machine:", *missing, sep="\n  ")
    sys.exit(1)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "preflight: an API the kernels need is missing (listed above)"

status=0
# stage NAME SECONDS COMMAND...: run COMMAND with a time limit, its output into the log.
stage() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ]; then
        status=1
        echo "gpu_check: stage $name FAILED (exit $rc$([ "$rc" -ge 124 ] && echo ', time limit'))" | tee -a "$LOG" >&2
    fi
}

stage tests 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" --durations=5 \
    tests/test_reprogram_patch_embed.py tests/test_residual_logits.py
stage kernels 210 python3 -m bench.kernels --out "$OUT_DIR" --dtypes bf16 --warmup 10 --rep 40 \
    --models ViT-B/32 --batches 256 --sources 32 --residual-batches 4096 --classes 1000 --dim 512
stage compile 75 python3 -m bench.compile_report --out "$OUT_DIR"
if [ "${GPU_CHECK_TRAIN:-0}" = 1 ]; then
    stage train 180 python3 -m bench.train --model ViT-B-32 --batch 256 --steps 8 --warmup 2 --out "$OUT_DIR"
fi

python3 - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$LOG"
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
    print(f"\n## kernels: {path.name} ({env['device']}, torch {env['torch']}, commit {env['git_commit']}); "
          f"ceilings {ceilings['matmul_tflops']:.0f} TFLOP/s, {ceilings['copy_gbps']:.0f} GB/s")
    if record.get("errors"):
        print("errors:", *record["errors"], sep="\n  ")
    print(kernels.short_table(record["rows"]))
    print("\nours (triton) per case: time, speedups over the eager and compiled references, fractions of "
          "the ceilings")
    print("| op | case | dtype | mode | ms | x eager | x compiled | TFLOP/s / peak | GB/s / peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in record["rows"]:
        if row["provider"] != "triton":
            continue

        def cell(value, spec):
            return "" if value is None else format(value, spec)

        print(f"| {row['op']} | {row['case']} | {row['dtype']} | {row['mode']} | {row['ms']:.4f} | "
              f"{cell(row.get('speedup_vs_torch'), '.2f')} | {cell(row.get('speedup_vs_torch_compile'), '.2f')} | "
              f"{row['tflops'] / ceilings['matmul_tflops']:.3f} | {row['gbps'] / ceilings['copy_gbps']:.3f} |")

path = latest("compile-sm90a-offline-*.json")
if path is None:
    print("\n## compile report: no results")
else:
    print(f"\n## compile report: {path.name}")
    print("\n".join(line for line in path.with_suffix(".md").read_text().splitlines() if line.startswith("|")))

path = latest("train-*.json")
if path is not None and "GPU_CHECK_TRAIN" in __import__("os").environ:
    record = json.loads(path.read_text())
    print(f"\n## train: {path.name}")
    print(train.short_table(record["rows"], record["main_batch"]))
EOF
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
exit $status
