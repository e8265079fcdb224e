#!/usr/bin/env bash
# The GPU check: everything rev_det has that only a CUDA device can run, in one go (about 8
# minutes on one GPU), its results written under one folder with the GPU named.
#
#   1. tests/test_gpu.py: gradients equal across backprop modes and with the parallel (two CUDA
#      streams) backward, bf16, peak-memory ordering, RevAMPTrainer steps;
#   2. tools/benchmark.py's speed section on the RevViT-B Mask R-CNN at 1024x1024, fp32 and bf16
#      autocast: step time and peak torch.cuda.max_memory_allocated at batch 1, 2 and 4 for
#      autograd, checkpoint, reversible and reversible with the parallel backward, and the
#      largest batch each fits;
#   3. its whole_step section on the RevViT-L Mask R-CNN at 1024x1024 (recomputed heads, fp32,
#      batch 1): torch.cuda.max_memory_allocated and max_memory_reserved of a whole AdamW step,
#      after backward and inside it, to hold beside the CPU tracker's (docs/whole_step.md).
#
# Each stage has its own time limit and the next one runs even if it fails, so that a partial
# run still leaves its results; the exit status is that of the first stage that failed.
#
# Usage:
#   bash tools/gpu_check.sh [--dry-run] [OUT_DIR]
#
#   OUT_DIR    default benchmarks/gpu_check; gpu_check.log (everything printed) and one
#              benchmark folder per precision (results.md, results.json, plots).
#   --dry-run  the same stages on CPU with a tiny detector (the tests skip without CUDA): checks
#              everything but the CUDA code itself.
#
# The interpreter is $PYTHON (default .venv/bin/python if present, else python3).
set -u -o pipefail

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY_RUN=1
    shift
fi
OUT_DIR=${1:-benchmarks/gpu_check}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
STATUS=0

# stage NAME SECONDS COMMAND...: run COMMAND under a time limit, its output into the log.
stage() {
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (limit ${seconds} s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ] && [ "$STATUS" -eq 0 ]; then STATUS=$rc; fi
}

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=(--device cpu)
    DETECTOR=(--size 128 --speed-batches 1 2 --repeats 1 --warmup 1)
    TINY=(MODEL.REVVIT.EMBED_DIM 96 MODEL.REVVIT.NUM_HEADS 3 MODEL.REVVIT.DEPTH 4
        MODEL.REVVIT.WINDOW_SIZE 4 "MODEL.REVVIT.WINDOW_BLOCK_INDEXES" "[0, 1, 2]"
        MODEL.FPN.OUT_CHANNELS 64 MODEL.ROI_BOX_HEAD.NUM_CONV 0 MODEL.ROI_MASK_HEAD.NUM_CONV 1
        MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 64)
    DETECTOR+=(--opts "${TINY[@]}")
    WHOLE=(--size 128 --opts "${TINY[@]}" MODEL.REV.RECOMPUTE_HEADS True)
else
    DEVICE=(--device cuda)
    DETECTOR=(--size 1024 --speed-batches 1 2 4 --repeats 5 --warmup 2 --max-batch 128)
    WHOLE=(--size 1024 --opts MODEL.REV.RECOMPUTE_HEADS True)
fi

stage environment 60 "$PYTHON" -c "
import platform, subprocess, torch, detectron2
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| detectron2', detectron2.__version__)
print('commit', subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
      text=True).stdout.strip() or 'unknown')
print('GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)')
"
if command -v nvidia-smi >/dev/null; then stage nvidia-smi 30 nvidia-smi; fi
stage test_gpu 150 "$PYTHON" -m pytest -v -rs -p no:cacheprovider tests/test_gpu.py
stage speed-fp32 240 "$PYTHON" tools/benchmark.py --backbone rev_vit_b --sections speed \
    "${DEVICE[@]}" --out "$OUT_DIR/fp32" "${DETECTOR[@]}"
stage speed-bf16 180 "$PYTHON" tools/benchmark.py --backbone rev_vit_b --sections speed --amp \
    "${DEVICE[@]}" --out "$OUT_DIR/bf16" "${DETECTOR[@]}"
stage whole-step 240 "$PYTHON" tools/benchmark.py --backbone rev_vit_l --sections whole_step \
    --pairs reversible/reversible "${DEVICE[@]}" --out "$OUT_DIR/whole_step" "${WHOLE[@]}"
echo "gpu_check: exit $STATUS; results in $OUT_DIR" | tee -a "$LOG"
exit "$STATUS"
