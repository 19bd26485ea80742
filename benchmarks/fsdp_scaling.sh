#!/usr/bin/env bash
# Issue 6 in one command: FSDP2 on N GPUs against one GPU with the same global batch, and a run
# stopped mid-way (train.time_limit) and resumed on a different number of GPUs.
#
#   NGPU=2 benchmarks/fsdp_scaling.sh                  # on a machine with >= 2 GPUs (torchrun + NCCL)
#   SMOKE=1 NGPU=2 benchmarks/fsdp_scaling.sh          # tiny preset, gloo on CPU, ~2 minutes
#
# Runs (each its own run directory under $RUN, default runs/fsdp):
#   one/      1 process,  ROWS x NGPU rows per step        (the reference curve and bytes/s)
#   many/     NGPU processes, ROWS rows each                 (same global batch)
#   split/    NGPU processes stopped by train.time_limit at STOP_S seconds, then resumed on
#             RESUME_GPUS processes (default 1) with ROWS x NGPU / RESUME_GPUS rows each
# Then a summary: losses side by side, bytes/s per GPU, scaling efficiency
# (bytes/s on N GPUs / (N x bytes/s on 1)), and the resumed curve against the uninterrupted one.
#
# Environment: PRESET (blt-1b), DATA (data/main/train.txt; unpacked from data/pack when missing),
# STEPS (200), ROWS (per GPU, 2), SEQ (8192), STOP_S (seconds of the split run before the stop),
# RESUME_GPUS (1), EXTRA (more key=value overrides). Patching is by spaces (no entropy model
# needed; set EXTRA to change it). NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
NGPU=${NGPU:-2}
RESUME_GPUS=${RESUME_GPUS:-1}
RUN=${RUN:-runs/fsdp}
if [ "${SMOKE:-0}" = 1 ]; then
  PRESET=${PRESET:-tiny} DATA=${DATA:-tests/assets/pride_20k.txt} STEPS=${STEPS:-8} ROWS=${ROWS:-2}
  SEQ=${SEQ:-128} STOP_S=${STOP_S:-1e-9} DEVICE=cpu
  export OMP_NUM_THREADS=1
else
  PRESET=${PRESET:-blt-1b} DATA=${DATA:-data/main/train.txt} STEPS=${STEPS:-200} ROWS=${ROWS:-2}
  SEQ=${SEQ:-8192} STOP_S=${STOP_S:-120} DEVICE=auto
fi
if [ ! -f "$DATA" ] && [ -f data/pack/main.txt.xz ]; then
  mkdir -p data/main && xz -dc data/pack/main.txt.xz > data/main/train.txt && xz -dc data/pack/main.docs.xz > data/main/train.docs
fi
COMMON=(--preset "$PRESET" --data "$DATA" model.patcher.mode=space train.steps="$STEPS" train.seq_len="$SEQ"
        train.log_every=10 train.eval_every=0 train.eval_batches=0 train.ckpt_every=0 train.device="$DEVICE"
        ${EXTRA:-})
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
echo "== 1 process x $((ROWS * NGPU)) rows"
launch 1 "$RUN/one" $((ROWS * NGPU)) 2>&1 | tail -4
echo "== $NGPU processes x $ROWS rows"
launch "$NGPU" "$RUN/many" "$ROWS" 2>&1 | tail -4
echo "== $NGPU processes, stopped after ${STOP_S}s"
launch "$NGPU" "$RUN/split" "$ROWS" train.time_limit="$STOP_S" 2>&1 | tail -3
echo "== resumed on $RESUME_GPUS process(es)"
launch "$RESUME_GPUS" "$RUN/split" $((ROWS * NGPU / RESUME_GPUS)) train.time_limit=0 2>&1 | tail -3
python - "$RUN" "$NGPU" <<'PY'
import json, statistics, sys
from pathlib import Path
run, n = Path(sys.argv[1]), int(sys.argv[2])
rows = {k: [json.loads(l) for l in (run / k / "metrics.jsonl").read_text().splitlines() if l.strip()]
        for k in ("one", "many", "split")}
def rate(r):
    v = [x["bytes_per_s"] for x in r[1:] if x.get("bytes_per_s")] or [x["bytes_per_s"] for x in r if x.get("bytes_per_s")]
    return statistics.median(v)
one, many = rate(rows["one"]), rate(rows["many"])
print(f"bytes/s: 1 GPU {one:,.0f}; {n} GPUs {many:,.0f} in all, {many / n:,.0f} per GPU; "
      f"scaling efficiency {many / (n * one):.1%}")
print("step  loss(1)  loss(N)  loss(split+resume)")
by = {k: {x["step"]: x["loss"] for x in v} for k, v in rows.items()}
worst = 0.0
for s in sorted(by["one"]):
    a, b, c = by["one"][s], by["many"].get(s), by["split"].get(s)
    worst = max(worst, *(abs(x - a) / a for x in (b, c) if x is not None))
    print(f"{s:5d}  {a:.4f}  {b if b is None else f'{b:.4f}'}  {c if c is None else f'{c:.4f}'}")
print(f"largest relative loss difference against 1 GPU: {worst:.2e}")
PY
