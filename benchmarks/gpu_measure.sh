#!/usr/bin/env bash
# One GPU call (< 10 minutes) for the open speed questions: the per-byte decode time (eager, CUDA
# graphs, compiled) and generation after the kernel-count reductions with the fp32 exactness check
# against transformers (issue 4), and the training step against transformers at the blt-1b shape
# with compiled blocks (issue 3). PROFILE_TRAIN=1 adds where a bundled-size BLT training step
# goes. Every run has its own time limit; results land in $OUT (or ./bench_out). ONLY="a b" runs just
# the named runs (flex_check block_masks profile_generate generate train_step profile_flex profile_flex_bf16
# profile_flex_bf16_compiled profile_sdpa trainer).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
run() {
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | grep -v -i warn | tee "$OUT/$name.txt"; }
# FlexAttention BlockMasks are built from key-block ranges since the fifth session (not yet run on
# a GPU, where compiled Flex skips unlisted tiles): the bf16 Flex path against fp32 SDPA first
run flex_check 120 python benchmarks/flex_check.py --preset blt-1b --seq-len 8192
run block_masks 60 python benchmarks/block_masks.py --batch 32 --seq-len 4096 --patches 2048
run profile_generate 230 python benchmarks/profile_generate.py --batch 1 --steps 64  # eager, graphs, compile
run generate 170 python benchmarks/generate.py --preset blt-1b --dtype bf16 --check-fp32 8 --hf-bytes 8 \
  --batches 1 64 --prompt-lens 64 2048 --new-bytes 128 --json "$OUT/generate.json"
run train_step 170 python benchmarks/train_step.py --compile --steps 6
if [ "${PROFILE_TRAIN:-0}" = 1 ] || [[ " ${ONLY:-} " == *" profile_"* ]]; then  # where a bundled-size BLT training step goes (another call)
  P=(python benchmarks/profile_train.py --steps 5 --rows 30 --batch 32 --pad-patches 256)  # the bundled run's step
  run profile_flex 100 "${P[@]}"
  run profile_flex_bf16 100 "${P[@]}" --patcher-dtype bf16  # train.patcher_dtype=bf16
  run profile_flex_bf16_compiled 150 "${P[@]}" --patcher-dtype bf16 --compile  # + train.compile=true
  run profile_sdpa 80 "${P[@]}" --attn sdpa
fi
# the trainer itself on the bundled model's shapes (data/tiny from scripts/build_corpus.sh): its
# bytes/s against profile_flex's unprofiled step shows what the loop adds
run trainer 100 python -m bltkit train --init-from bundled --data data/tiny/train.txt --out "$OUT/trainer" \
  train.steps=60 train.seq_len=4096 train.batch_size=32 train.pad_patches=256 train.log_every=10 \
  train.eval_batches=0 train.ckpt_every=100000
rm -rf "$OUT/trainer/model" "$OUT/trainer/checkpoints"
