#!/usr/bin/env bash
# The checks a session runs when it is lent a GPU, as one prepared command (at most about 11 minutes;
# the build's speed on an H200 is not yet measured):
#
#   1. the CUDA tests (tests/decoding/test_cuda.py: lean forward in bf16, speculative == target alone;
#      tests/training/test_precision.py: every method trains on CUDA, target bf16, draft under autocast);
#   2. `spectool bench` of the shipped DSpark draft on CUDA (bf16), 8 held-out prompts;
#   3. a GPU build of the source-code tiny target (examples/tiny_target/build.py --source-code --device cuda),
#      BUILD_STEPS steps of 16 x 256 tokens (4,500 = about ten epochs of its 1.85M training tokens; the shipped
#      target is a CPU build of this corpus that kept step 3,154 of 3,500), to compare a longer, GPU-trained
#      target with it and measure the build's GPU speed. Held-out loss is measured every 30 s
#      and only a checkpoint that lowers it is exported (--keep-best), so the result is the best-generalising
#      snapshot, and a run cut by its timeout still leaves the best one so far.
#
# Run from the repository root; OUT names the folder for the results (the device tool sets it):
#   OUT=/tmp/gpu_out bash examples/gpu_session.sh
# Steps are independent: one failing does not stop the next. Everything is logged to $OUT/log.txt; the
# built target lands in $OUT/tiny-qwen3-v2 (6 files), so at most 8 files come back.
# Nothing is installed: the machine's own torch / transformers / typer / rich are used through PYTHONPATH.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
BUILD_STEPS=${BUILD_STEPS:-4500}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec > >(tee "$OUT/log.txt") 2>&1

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "versions"
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step "CUDA tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/decoding/test_cuda.py tests/training/test_precision.py

step "bench on CUDA"
timeout 180 python3 -m spectool bench --draft dspark --device cuda --limit 8 --max-new-tokens 96 \
    --baselines target,hf --json

step "tiny target v2 build on CUDA (${BUILD_STEPS} steps)"
timeout 420 python3 examples/tiny_target/build.py --device cuda --source-code --minutes 0 \
    --max-steps "$BUILD_STEPS" --keep-best --checkpoint-minutes 0.5 --work-dir /tmp/tiny_v2_work --out "$OUT/tiny-qwen3-v2"

step "done"
