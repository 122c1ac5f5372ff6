#!/usr/bin/env bash
# The one GPU check, for a lent H200 (see /work/shared/GPU.md); about 8 minutes at most:
#   (a) the kernel tests on CUDA, compiled Triton, fp32 and bf16 (TRITON_INTERPRET unset);
#   (b) the kernel microbenchmarks (bench.kernels);
#   (c) the training-throughput benchmark at ViT-B/32, batch 256 (bench.train);
# then a short table of both benchmarks, printed last. Results, plot and the log go to $OUT
# (bench/results when $OUT is unset). Each stage runs under its own time limit, and both
# benchmarks rewrite their results as they go, so a stage cut short keeps what it measured.
#
# The machine has Python 3.12, torch 2.11, triton 3.6 and the project's other dependencies,
# but not open_clip. `import open_clip` needs, at import time: torch, torchvision, regex, ftfy
# (which needs wcwidth), safetensors, timm (>= 1.0.17), huggingface_hub, tqdm, pyyaml, pillow;
# of these only ftfy and wcwidth are missing there. So `.whl/` (git-ignored) holds exactly:
#   open_clip_torch==3.3.0   ftfy==6.3.1   wcwidth==0.9.4
# fetched in the repository root with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
# and the device run carries `.whl` and passes the commit, since the copy there has no .git:
#   REPROGRAMMER_GIT_COMMIT=<git rev-parse --short HEAD> bash bench/gpu_check.sh
# The project is not pip-installed there: PYTHONPATH points at the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET REPROGRAMMER_BACKEND

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "installing .whl/*.whl failed" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi

python3 - <<'EOF' 2>&1 | tee -a "$LOG" || exit 1
import sys
import torch, triton, open_clip
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"open_clip {open_clip.__version__}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: this script is for the GPU machine")
print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

status=0
# stage NAME SECONDS COMMAND...: run COMMAND with a time limit, its output into the log.
stage() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

stage tests 120 python3 -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_reprogram_patch_embed.py tests/test_residual_logits.py
stage kernels 150 python3 -m bench.kernels --out "$OUT_DIR" --warmup 10 --rep 40
stage train 180 python3 -m bench.train --model ViT-B-32 --batch 256 --sweep 64 512 \
    --steps 8 --warmup 2 --out "$OUT_DIR"

python3 - "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

from bench import kernels, train

out = Path(sys.argv[1])
for name in ("kernels", "train"):
    found = sorted(out.glob(f"{name}-*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        print(f"\n## {name}: no results")
        continue
    record = json.loads(found[-1].read_text())
    env = record["environment"]
    print(f"\n## {name}: {found[-1].name} ({env['device']}, torch {env['torch']}, "
          f"commit {env['git_commit']})")
    if record.get("errors"):
        print("errors:", *record["errors"], sep="\n  ")
    if name == "kernels":
        print(kernels.short_table(record["rows"]))
    else:
        print(train.short_table(record["rows"], record["main_batch"]))
EOF
exit $status
