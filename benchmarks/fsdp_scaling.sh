#!/usr/bin/env bash
# Issue 6 in one command: FSDP2 on N GPUs against one GPU with the same global batch, and a run
# stopped mid-way (train.stop_at) and resumed on a different number of GPUs.
#
#   NGPU=2 benchmarks/fsdp_scaling.sh                  # on a machine with >= 2 GPUs (torchrun + NCCL)
#   SMOKE=1 NGPU=2 benchmarks/fsdp_scaling.sh          # tiny preset, gloo on CPU, ~2 minutes
#
# Runs (each its own run directory under $RUN, default runs/fsdp):
#   many/     NGPU processes, ROWS rows each                 (the N-GPU curve and bytes/s)
#   split/    NGPU processes stopped by train.stop_at after STOP_STEP steps, then resumed on
#             RESUME_GPUS processes (default 1) with ROWS x NGPU / RESUME_GPUS rows each
#   one/      1 process, ROWS x NGPU rows per step          (the reference curve and bytes/s)
# With RESUME_GPUS=1 and NGPU >= 2, one/ and the resume of split/ run at the same time on GPUs 0
# and 1 (they share only the host; each has a GPU to itself). Then a summary: losses side by side,
# bytes/s per GPU, scaling efficiency (bytes/s on N GPUs / (N x bytes/s on 1)), and the resumed
# curve against the uninterrupted ones.
#
# Environment: PRESET (blt-1b), DATA (data/main/train.txt; unpacked from data/pack when missing),
# STEPS (200), ROWS (per GPU, 1), SEQ (8192), STOP_STEP (STEPS / 2), RESUME_GPUS (1), EXTRA (more
# key=value overrides; default model.hash_vocab=65536: the blt-1b shape and FLOPs with 6 x 65,536
# hash rows instead of 6 x 500,002, so each checkpoint holds 1.4B parameters' state, not 4.5B).
# Patching is by spaces (no entropy model needed; set EXTRA to change it). Patch counts are padded
# to multiples of 512 so Flex compiles a few shapes, not one per 64. NVLink multicast stays off.
set -uo pipefail  # a failed phase is reported, the others still run
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
NGPU=${NGPU:-2}
RESUME_GPUS=${RESUME_GPUS:-1}
RUN=${RUN:-runs/fsdp}
if [ "${SMOKE:-0}" = 1 ]; then
  PRESET=${PRESET:-tiny} DATA=${DATA:-tests/assets/pride_20k.txt} STEPS=${STEPS:-8} ROWS=${ROWS:-2}
  SEQ=${SEQ:-128} DEVICE=cpu EXTRA=${EXTRA:-}
  export OMP_NUM_THREADS=1
else
  PRESET=${PRESET:-blt-1b} DATA=${DATA:-data/main/train.txt} STEPS=${STEPS:-200} ROWS=${ROWS:-1}
  SEQ=${SEQ:-8192} DEVICE=auto EXTRA=${EXTRA:-model.hash_vocab=65536 model.max_patches=$((SEQ + 1)) train.pad_patches=512}
fi
if [ ! -f "$DATA" ] && [ -f data/pack/main.txt.xz ]; then
  mkdir -p data/main && xz -dc data/pack/main.txt.xz > data/main/train.txt && xz -dc data/pack/main.docs.xz > data/main/train.docs
fi
COMMON=(--preset "$PRESET" --data "$DATA" model.patcher.mode=space train.steps="$STEPS" train.seq_len="$SEQ"
        train.log_every=10 train.eval_every=0 train.eval_batches=0 train.ckpt_every=0 train.device="$DEVICE"
        $EXTRA)
STOP_STEP=${STOP_STEP:-$((STEPS / 2))}
[ "${SMOKE:-0}" = 1 ] && COMMON+=(train.log_every=2 optim.lr=3e-3)
launch() {  # nproc out rows [overrides...]
  local n=$1 out=$2 rows=$3; shift 3
  if [ "$n" = 1 ]; then
    python -m bltkit train --out "$out" "${COMMON[@]}" train.batch_size="$rows" "$@"
  else
    python -m torch.distributed.run --standalone --nproc_per_node="$n" -m bltkit train --out "$out" \
      "${COMMON[@]}" train.batch_size="$rows" "$@"
  fi
}
rm -rf "$RUN"; mkdir -p "$RUN"
echo "== $NGPU processes x $ROWS rows"
launch "$NGPU" "$RUN/many" "$ROWS" 2>&1 | tail -4
echo "== $NGPU processes, stopped after step $STOP_STEP"
launch "$NGPU" "$RUN/split" "$ROWS" train.stop_at="$STOP_STEP" 2>&1 | tail -3
one() { echo "== 1 process x $((ROWS * NGPU)) rows"; launch 1 "$RUN/one" $((ROWS * NGPU)) > "$RUN/one.log" 2>&1; tail -4 "$RUN/one.log"; }
resume() { echo "== resumed on $RESUME_GPUS process(es)"
  launch "$RESUME_GPUS" "$RUN/split" $((ROWS * NGPU / RESUME_GPUS)) > "$RUN/resume.log" 2>&1; tail -3 "$RUN/resume.log"; }
if [ "$RESUME_GPUS" = 1 ] && [ "$NGPU" -ge 2 ]; then  # side by side, one GPU each
  CUDA_VISIBLE_DEVICES=0 one > "$RUN/one.out" & a=$!
  CUDA_VISIBLE_DEVICES=1 resume > "$RUN/resume.out" & b=$!
  wait $a; wait $b; cat "$RUN/one.out" "$RUN/resume.out"
else
  one; resume
fi
python - "$RUN" "$NGPU" <<'PY'
import json, statistics, sys
from pathlib import Path
run, n = Path(sys.argv[1]), int(sys.argv[2])
def load(k):
    f = run / k / "metrics.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.is_file() else []
rows = {k: load(k) for k in ("one", "many", "split")}
for k, r in rows.items():
    print(f"{k}: {len(r)} log rows, last step {r[-1]['step'] if r else None}")
def med(r, key):  # the first window holds the compiles
    v = [x[key] for x in r[1:] if x.get(key)] or [x[key] for x in r if x.get(key)]
    return statistics.median(v) if v else None
one, many = med(rows["one"], "bytes_per_s"), med(rows["many"], "bytes_per_s")
for k in ("one", "many"):
    mfu, mem = med(rows[k], "mfu"), max((x.get("mem_gb") or 0 for x in rows[k]), default=0)
    print(f"{k}: median bytes/s {med(rows[k], 'bytes_per_s') or 0:,.0f}, step {med(rows[k], 'step_ms') or 0:,.0f} ms, "
          f"MFU {100 * (mfu or 0):.1f}%, peak memory {mem:.1f} GB per GPU, mean patch {med(rows[k], 'mean_patch_len') or 0:.2f}")
if one and many:
    print(f"bytes/s: 1 GPU {one:,.0f}; {n} GPUs {many:,.0f} in all, {many / n:,.0f} per GPU; "
          f"scaling efficiency {many / (n * one):.1%}")
print("step  loss(1)  loss(N)  loss(split+resume)")
by = {k: {x["step"]: x["loss"] for x in v} for k, v in rows.items()}
worst = {"many": 0.0, "split": 0.0}
for s in sorted(set().union(*by.values())):
    a, b, c = by["one"].get(s), by["many"].get(s), by["split"].get(s)
    for k, x in (("many", b), ("split", c)):
        if a is not None and x is not None:
            worst[k] = max(worst[k], abs(x - a) / a)
    print(f"{s:5d}  " + "  ".join("   -   " if x is None else f"{x:.4f}" for x in (a, b, c)))
print(f"largest relative loss difference against 1 GPU: N GPUs {worst['many']:.2e}, "
      f"split+resume {worst['split']:.2e}")
PY
