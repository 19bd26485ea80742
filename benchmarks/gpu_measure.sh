#!/usr/bin/env bash
# One GPU call (< 10 minutes) for the open speed questions: the per-byte decode time (eager, CUDA
# graphs, compiled) and generation after the kernel-count reductions with the fp32 exactness check
# against transformers (issue 4), and the training step against transformers at the blt-1b shape
# with compiled blocks (issue 3). PROFILE_TRAIN=1 adds where a bundled-size BLT training step
# goes. Every run has its own time limit; results land in $OUT (or ./bench_out).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
run() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | grep -v -i warn | tee "$OUT/$name.txt"; }
run profile_generate 230 python benchmarks/profile_generate.py --batch 1 --steps 64  # eager, graphs, compile
run generate 170 python benchmarks/generate.py --preset blt-1b --dtype bf16 --check-fp32 8 --hf-bytes 8 \
  --batches 1 64 --prompt-lens 64 2048 --new-bytes 128 --json "$OUT/generate.json"
run train_step 170 python benchmarks/train_step.py --compile --steps 6
if [ "${PROFILE_TRAIN:-0}" = 1 ]; then  # where a bundled-size BLT training step goes (another call)
  run profile_flex 100 python benchmarks/profile_train.py --steps 5 --rows 30
  run profile_sdpa 80 python benchmarks/profile_train.py --steps 5 --rows 30 --attn sdpa
fi
