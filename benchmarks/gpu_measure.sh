#!/usr/bin/env bash
# The open speed questions on one GPU: the Flex path and its BlockMasks, the per-byte decode time
# (eager, CUDA graphs, compiled) with its kernel table, generation with the fp32 exactness check
# against transformers (issue 4), the training step against transformers at the blt-1b shape with
# compiled blocks, where a bundled-size BLT training step goes, and the trainer on mixed scripts,
# packed and padded (issue 3). Each run has its own time limit; results land in $OUT (or
# ./bench_out). All of it is more than one 10-minute call: ONLY="a b" runs just the named runs
# (flex_check block_masks gpu_tests profile_generate profile_generate_b64 decode_gap entropy_contention attend_configs fused_norm
# pdl_chain generate
# generate_kernels generate_byte
# generate_sdpa train_step
# train_step_eager profile_train_1b
# profile_flex profile_flex_bf16 profile_flex_bf16_compiled profile_sdpa trainer_pack_true
# trainer_pack_false). The seventh session ran profile_generate (kernel tables), train_step
# (2.05-2.09x transformers) and profile_train_1b (compiled); the eighth tests/test_kernels.py,
# profile_generate with GEN_VARIANTS=graphs,kernels and generate --kernels on at batches 1 and 8;
# the ninth gpu_tests, profile_generate with GEN_VARIANTS=kernels,speculate and generate_kernels;
# the tenth gpu_tests and profile_generate --variants kernels,kernels-attend,kernels-linear,kernels-both
# at batches 1 and 64; the eleventh gpu_tests, profile_generate and profile_generate_b64 with their
# kernel tables, generate_kernels and the SDPA grid; the twelfth gpu_tests, the Triton/cuBLAS
# crossover and profile_generate_b64; the thirteenth gpu_tests, profile_generate at batches 1 and 64
# (tiled block kernels, the attention without splits) and the grid with a threshold per cell; the
# fourteenth gpu_tests, profile_generate_b64 with GEN64_VARIANTS=kernels-nooverlap,kernels and
# generate_kernels (docs/benchmarks.md); the fifteenth got no GPU; the sixteenth gpu_tests (the byte
# graph skipped: PyTorch 2.11 has no conditional-node capture) and generate_kernels; the seventeenth
# gpu_tests, profile_generate.py --variants speculate-sched (the host gap: 36/61 µs a byte, then
# 25/24 with one graph a launch) and generate_kernels; the nineteenth gpu_tests, profile_generate
# at 64 rows with --trace (the batch-64 step's kernels in launch order), attend_configs.py and the
# grid without transformers; the twentieth gpu_tests, fused_norm, and the grid's batch-8 and -64
# cells; the twenty-first pdl_chain (Triton products with PDL, removed from the generator again)
# and the 2,048-byte cells (docs/benchmarks.md); the twenty-second gpu_tests, profile_generate_b64
# with GEN64_VARIANTS=kernels-nodecnorms,kernels-nobounds,kernels, kernels.rope_attend and stream
# priorities (profile_generate.py --batch 64, kernels-noropeattend / kernels-nopriority) and
# generate_kernels; the twenty-third and twenty-fourth got no GPU; the twenty-fifth gpu_tests,
# profile_generate_b64 with the twenty-third and twenty-fourth sessions' switches off one at a time
# (all kept), ENTROPY_SMS (lost), generate_kernels and a batch-64 trace (docs/benchmarks.md); the
# twenty-sixth decode_gap (the grid's step grows with the caches: 2.28 ms at the start, 2.65 after
# 128 bytes), attend_configs, the global attention over closing rows only (lost), the commit and
# greedy kernels (kept); its grid got no machine. The twenty-seventh got none either (its attention
# kernel's first block loaded with the bounds, kernels.ATTEND_FIRST_BLOCK, the cross-attention's first
# units before its q product, kernels.CROSS_UNITS_EARLY, a block ahead in the attention's loop,
# kernels.ATTEND_AHEAD, and the 16 x 1 candidate,
# compiled for sm_90 on the CPU by benchmarks/hopper_compile.py, not run). The twenty-eighth got
# none either (every stack on Triton products with each norm in the next product's prologue,
# generate.DECODER_PRODUCTS, GLOBAL_PRODUCTS, FRONT_PRODUCTS: 333 -> 221 kernels on the batch-64
# chain, off until timed). Next: the compiled tests (one call; the products compile each candidate
# for each shape, so the limit is raised), then the products and the twenty-seventh session's
# switches on the grid's 128 steps (a second call; ~30 s a variant, more where the products tune):
#   ONLY=gpu_tests GPU_TESTS_LIMIT=560
#   ONLY=decode_gap GAP_LIMIT=560 GAP_VARIANTS="base DECODER_PRODUCTS=True GLOBAL_PRODUCTS=True
#     FRONT_PRODUCTS=True DECODER_PRODUCTS=True;GLOBAL_PRODUCTS=True;FRONT_PRODUCTS=True
#     kernels.ATTEND_FIRST_BLOCK=False kernels.ATTEND_AHEAD=False kernels.CROSS_UNITS_EARLY=False base"
# then the grid
# with the switches that won on (GRID_SET, generate.py --set) and attend_configs:
#   ONLY="attend_configs generate_kernels" GRID_SET="DECODER_PRODUCTS=True;GLOBAL_PRODUCTS=True;FRONT_PRODUCTS=True"
# then the step late in the grid's generation, where the growing caches' attention goes:
#   ONLY=profile_generate_b64 GEN64_VARIANTS=kernels GEN64_TABLE="--table-kernels --grid-prompts --at 112 --trace $OUT/tr"
# and on a PyTorch with torch.cuda.CUDAGraph.begin_capture_to_if_node:
#   ONLY="gpu_tests generate_byte"  (the byte graph tested, then timed against the grid)
#   ONLY="trainer_pack_true trainer_pack_false"                                   (~4 minutes)
# (GEN_VARIANTS=graphs shortens profile_generate to the CUDA-graph path and its kernel table.)
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
run() {
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | grep -v -i warn | tee "$OUT/$name.txt"; }
# FlexAttention BlockMasks are built from key-block ranges since the fifth session (not yet run on
# a GPU, where compiled Flex skips unlisted tiles): the bf16 Flex path against fp32 SDPA first
run flex_check 200 python benchmarks/flex_check.py --preset blt-1b --seq-len 8192 --rows 2
run block_masks 60 python benchmarks/block_masks.py --batch 32 --seq-len 4096 --patches 2048
# the generator's GPU-only tests: Triton kernels compiled, the speculative step's second stream
run gpu_tests "${GPU_TESTS_LIMIT:-300}" python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
  "tests/test_generate.py::test_speculation_on_cuda_equals_plain_steps" \
  "tests/test_generate.py::test_overlap_on_cuda_equals_plain_steps" \
  "tests/test_generate.py::test_entropy_model_on_fewer_sms_equals_plain_steps" \
  "tests/test_generate.py::test_byte_graph_on_cuda_equals_step_graphs" \
  "tests/test_generate.py::test_graph_capture_survives_garbage_holding_cuda_graphs"
# GEN_TABLE="--table-kernels --table-speculate": the kernel tables of those graphs (default: plain)
# shellcheck disable=SC2086
run profile_generate 230 python benchmarks/profile_generate.py --batch 1 --steps 64 \
  --variants "${GEN_VARIANTS:-graphs,eager,compile}" ${GEN_TABLE:-}  # the kernel table at the end needs ~30 s more
# the same at 64 rows (the cuBLAS products, kernels.rope_write, kernels.attend where switched on)
# shellcheck disable=SC2086
run profile_generate_b64 "${GEN64_LIMIT:-150}" python benchmarks/profile_generate.py --batch 64 --steps 32 \
  --variants "${GEN64_VARIANTS:-kernels,kernels-attend}" ${GEN64_TABLE:---table-kernels}
# the batch-64 step over the grid's 128 steps, under variants of bltkit.generate's switches
# (GAP_VARIANTS="base NAME=VALUE;NAME=VALUE ...", twenty-sixth session)
# shellcheck disable=SC2086
run decode_gap "${GAP_LIMIT:-260}" python benchmarks/decode_gap.py --variants ${GAP_VARIANTS:-base}
# what the entropy model beside the global stack costs the batch-64 step (twenty-second session: ~0.19 ms)
run entropy_contention 120 python benchmarks/entropy_contention.py --batch 64
# kernels.attend per launch configuration at 64 rows (nineteenth session; since the twenty-seventh
# the global step's RoPE call over 14-64 patches, each with the first block early and late), and kernels.residual_norm
# (an fp32-output product, then the residual add and the next RMSNorm in one kernel) against
# addmm + RMSNorm (twentieth session: it won, and the generator runs it past KERNEL_MAX_ROWS rows)
run attend_configs 150 python benchmarks/attend_configs.py
run fused_norm 60 python benchmarks/fused_norm.py
# one global layer's chain at 64 rows: cuBLAS's products against Triton's, with and without
# programmatic dependent launch (twenty-first session: they won alone and lost in the step)
run pdl_chain 120 python benchmarks/pdl_chain.py
# the PyTorch block steps, then the Triton ones (cross-attention kernel included) with speculation
# (under 8 rows); both on by default since the ninth session's run tested them
run generate 170 python benchmarks/generate.py --preset blt-1b --dtype bf16 --check-fp32 8 --hf-bytes 8 \
  --batches 1 8 64 --prompt-lens 64 2048 --new-bytes 128 --kernels off --speculate off --json "$OUT/generate.json"
run generate_kernels 300 python benchmarks/generate.py --preset blt-1b --dtype bf16 --check-fp32 8 --hf-bytes 8 \
  --batches 1 8 64 --prompt-lens 64 2048 --new-bytes 128 --kernels on --speculate on \
  --set "${GRID_SET:-}" --json "$OUT/generate_kernels.json"
# the same with a byte's steps as one CUDA graph, the patch step in a conditional node
# (Generator(byte_graph=True): no host sync a byte under 8 rows; written in the fifteenth session
# without a GPU, off by default until this and gpu_tests have run)
run generate_byte 300 python benchmarks/generate.py --preset blt-1b --dtype bf16 --no-hf \
  --batches 1 8 64 --prompt-lens 64 2048 --new-bytes 128 --kernels on --speculate on --byte-graph on \
  --json "$OUT/generate_byte.json"
# the same with SDPA for every cache (generate.ATTEND_KERNEL off; on by default since the eleventh
# session, for caches of up to generate.ATTEND_MAX_KEYS slots)
run generate_sdpa 170 python benchmarks/generate.py --preset blt-1b --dtype bf16 --no-hf \
  --batches 1 8 64 --prompt-lens 64 2048 --new-bytes 128 --kernels on --speculate on --attend-kernel off \
  --json "$OUT/generate_sdpa.json"
run train_step 170 python benchmarks/train_step.py --compile --steps 6
run train_step_eager 120 python benchmarks/train_step.py --steps 6 --no-hf  # eager blocks, for the ratio
# where the blt-1b training step goes (compiled, as the 2.05-2.09x of the seventh session ran)
run profile_train_1b 200 python benchmarks/profile_train.py --preset blt-1b --batch 1 --seq-len 8192 --steps 3 --compile \
  --mean-patch 4.5 --rows 30
if [ "${PROFILE_TRAIN:-0}" = 1 ] || [[ " ${ONLY:-} " == *" profile_flex"* || " ${ONLY:-} " == *" profile_sdpa"* ]]; then
  P=(python benchmarks/profile_train.py --steps 5 --rows 30 --batch 32 --pad-patches 256)  # the bundled run's step
  run profile_flex 100 "${P[@]}"
  run profile_flex_bf16 100 "${P[@]}" --patcher-dtype bf16  # train.patcher_dtype=bf16
  run profile_flex_bf16_compiled 150 "${P[@]}" --patcher-dtype bf16 --compile  # + train.compile=true
  run profile_sdpa 80 "${P[@]}" --attn sdpa
fi
# the trainer itself with the bundled model (its entropy model patches), on the held-out sets, whose
# scripts give very different patch counts per row (Greek ~15 bytes a patch, Chinese ~4): the global
# transformer packed (the default) and padded, patcher in bf16. metrics.jsonl has patch_slots and
# packed_slots. Needs data/heldout, or data/pack/heldout.tar.xz carried (2.6 MB).
if [ ! -d data/heldout ] && [ -f data/pack/heldout.tar.xz ]; then tar -xJf data/pack/heldout.tar.xz -C data; fi
for pack in true false; do
  run "trainer_pack_$pack" 110 python -m bltkit train --init-from bundled --data data/heldout --out "$OUT/trainer_$pack" \
    train.steps=80 train.seq_len=4096 train.batch_size=32 train.pad_patches=256 train.log_every=10 \
    train.eval_batches=0 train.ckpt_every=100000 train.patcher_dtype=bf16 train.pack_global=$pack
  rm -rf "$OUT/trainer_$pack/model" "$OUT/trainer_$pack/checkpoints" "$OUT/trainer_$pack/entropy_model"
done
