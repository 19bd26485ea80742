#!/usr/bin/env bash
# One GPU call: training step vs transformers (issue 3), generation after the kernel-count
# reductions (issue 4), and a GPU smoke run of `blt train` (bf16 autocast, fused AdamW, flex).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
timeout 150 python benchmarks/train_step.py --steps 6 2>&1 | grep -v -i warn | tee "$OUT/train_step.txt"
timeout 80 python benchmarks/generate.py --preset blt-1b --dtype bf16 --no-hf --batches 1 64 --prompt-lens 64 \
  --new-bytes 128 --json "$OUT/generate2.json" 2>&1 | grep -v -i warn | tee "$OUT/generate2.txt"
timeout 60 python -m bltkit train --preset tiny --data tests/assets/pride_20k.txt --out /tmp/g1 \
  model.patcher.mode=space train.steps=40 train.seq_len=1024 2>&1 | grep -v -i warn | tail -15 | tee "$OUT/train_smoke.txt"
