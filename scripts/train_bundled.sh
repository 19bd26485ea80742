#!/usr/bin/env bash
# Rebuild the bundled model: corpus -> entropy model -> threshold calibration -> BLT -> held-out
# bits per byte (with xz -9e next to it) -> model card. One GPU, about 20 minutes of device time.
#
#   scripts/train_bundled.sh                 # everything, on the GPU (stage all)
#   scripts/train_bundled.sh entropy         # only the entropy model (+ calibration)
#   scripts/train_bundled.sh blt             # only the BLT, patched by RUN/ent/model
#   scripts/train_bundled.sh eval            # held-out evaluation and the model card
#   scripts/train_bundled.sh pack            # RUN/model + records as <= 15 MB parts in $OUT (the GPU
#                                            # tool returns at most 8 files of 16 MiB); rejoin with cat
#   scripts/train_bundled.sh entropy blt     # several stages, in order
#   scripts/train_bundled.sh sweep           # a size sweep (scripts/size_sweep.py; after entropy, not
#                                            # in "all"): SWEEP_STEPS steps a candidate (600),
#                                            # SWEEP_ONLY="name ..." runs some of them
#   SMOKE=1 scripts/train_bundled.sh         # tiny presets on the tiny corpus, CPU, ~3 minutes
#
# With no environment it retrains the shipped model's settings (ENT_STEPS=1400, BLT_STEPS=6400, the
# patcher in bf16: about 2 + 15 minutes of training steps on one H200, ~27 minutes with compiling,
# validation, checkpoints and the held-out evaluation; three 10-minute leases: BLT_STOP_AT).
#
# Environment: DATA (corpus folder, default data), RUN (default runs/bundled), ENT_STEPS / BLT_STEPS
# (step counts; set them empty to size the runs by ENT_SECONDS / BLT_SECONDS, time budgets turned
# into steps by a short throughput probe, which costs a process start and a compile. Measured:
# entropy-small 32 x 4096 bytes ~79 ms/step on an H100, 66 on an H200; the BLT below 32 x 4096
# ~0.135 s/step on an H200 with its patcher in bf16 and its global transformer packed),
# BLT_STOP_AT (seconds since this script started: the BLT run checkpoints and stops there, and
# the `blt` stage run again resumes it; for machines lent by the 10 minutes), EXPORT_UNFINISHED=1
# (ship RUN/blt/model even when the BLT stopped before its last step; the card says how far it got),
# EXTRA_ENT_ARGS / EXTRA_BLT_ARGS (more key=value overrides, e.g. train.attn_impl=sdpa, or
# train.patcher_dtype=fp32 for the first shipped model's fp32 patcher), PYTHON
# (the interpreter with torch and bltkit; default python3), EVAL_MAX_BYTES (score only the first N bytes
# of each held-out file, for a CPU), ENT_FROM (an entropy-model directory for the entropy stage to
# reuse instead of training one, e.g. a copy of bltkit/models/default/entropy_model; it is still
# calibrated, and the card names where it came from).
#
# On the GPU tool (docs/benchmarks.md): it sends the tracked tree with the carried paths, 64 MiB in
# all, and the shipped model (56 MB) does not fit beside the packed corpus (data/pack, 54 MB). For
# the call, untrack the shipped copy:
#   git rm -r -q --cached bltkit/models/default && echo /bltkit/models/default/ >> .git/info/exclude
# and afterwards restore it:
#   git reset -q HEAD bltkit/models/default && sed -i '\#^/bltkit/models/default/$#d' .git/info/exclude
# The blt stage alone needs only data/pack/{main.txt.xz,main.docs.xz,extra.tar.xz,MANIFEST.json}
# and RUN/ent/model with RUN/calibration.json.
set -euo pipefail
cd "$(dirname "$0")/.."
# the interpreter that has torch and bltkit (a symlink to a venv's python loses the venv: use PYTHON)
PY=${PYTHON:-python3}
blt() { "$PY" -m bltkit "$@"; }
STAGES=" ${*:-all} "
want() { [[ $STAGES == *" all "* || $STAGES == *" $1 "* ]]; }
DATA=${DATA:-data}
RUN=${RUN:-runs/bundled}
mkdir -p "$RUN"
log() { printf '\n== [%s, %ss] %s ==\n' "$(date +%T)" "$SECONDS" "$*"; }

if [ "${SMOKE:-0}" = 1 ]; then
  ENT_PRESET=entropy-tiny BLT_PRESET=tiny TRAIN="$DATA/tiny/train.txt"
  ENT_SECONDS=${ENT_SECONDS:-40} BLT_SECONDS=${BLT_SECONDS:-60}
  ENT_ARGS="train.seq_len=512 train.batch_size=8 optim.lr=3e-3"
  BLT_ARGS="train.seq_len=512 train.batch_size=8 optim.lr=3e-3"
  HELDOUT="tests/assets/persuasion_8k.txt"
else
  ENT_PRESET=entropy-small BLT_PRESET=small TRAIN="$DATA/main/train.txt"
  ENT_SECONDS=${ENT_SECONDS:-240} BLT_SECONDS=${BLT_SECONDS:-420}
  # the shipped model's step counts (its MODEL_CARD.md); ENT_STEPS= / BLT_STEPS= (empty) size the
  # runs by ENT_SECONDS / BLT_SECONDS with a throughput probe instead
  ENT_STEPS=${ENT_STEPS-1400} BLT_STEPS=${BLT_STEPS-6400}
  ENT_ARGS="train.seq_len=4096 train.batch_size=32 optim.lr=2e-3 optim.warmup=200"
  # sized to ship under 60 MB in bf16 with its entropy model (~28M parameters in all); the shape
  # (global 4 x 384, 6,144 hash rows) won the ninth session's size sweep (docs/benchmarks.md)
  BLT_ARGS="train.seq_len=4096 train.batch_size=32 train.pad_patches=256 train.patcher_dtype=bf16 optim.lr=1.5e-3 optim.warmup=200 model.hash_vocab=6144 model.max_patches=8192 model.global_transformer.dim=384 model.global_transformer.n_heads=6 model.global_transformer.n_layers=4"
  HELDOUT="$DATA/heldout/*.txt"
fi

if [ ! -f "${TRAIN%% *}" ]; then
  if [ -f "$DATA/pack/main.txt.xz" ]; then
    log "unpacking the carried corpus"
    mkdir -p "$DATA/main"
    xz -dc "$DATA/pack/main.txt.xz" > "$DATA/main/train.txt"
    xz -dc "$DATA/pack/main.docs.xz" > "$DATA/main/train.docs"
    # heldout (eval stage) and tiny (the entropy stage's calibration) may stay behind when only
    # the blt stage runs: the GPU tool carries at most 64 MiB with the tree
    for part in heldout tiny extra; do
      if [ -f "$DATA/pack/$part.tar.xz" ]; then tar -xJf "$DATA/pack/$part.tar.xz" -C "$DATA"; fi
    done
    if [ -f "$DATA/pack/MANIFEST.json" ]; then cp "$DATA/pack/MANIFEST.json" "$DATA/MANIFEST.json"; fi
  elif [ "${SMOKE:-0}" = 1 ]; then  # the smoke run needs only the tiny corpus (~1 minute to build)
    log "building the tiny corpus (needs the package registries)"
    "$PY" scripts/build_corpus.py --out "$DATA" --only tiny
  else
    log "building the corpus (needs the package registries)"
    "$PY" scripts/build_corpus.py --out "$DATA"
  fi
fi
# the extra scripts (Greek, Korean, Hindi: docs/corpus.md) train along with the main mix
if [ "${SMOKE:-0}" != 1 ] && [ -f "$DATA/extra/train.txt" ]; then TRAIN="$TRAIN $DATA/extra/train.txt"; fi

# steps for a time budget: a 20-step probe, then seconds x bytes/s / bytes per step
steps_for() {  # preset seconds data args...
  local preset=$1 seconds=$2 data=$3; shift 3
  rm -rf "$RUN/probe"
  # shellcheck disable=SC2086
  blt train --preset "$preset" --data $data --out "$RUN/probe" train.steps=20 train.log_every=5 \
    train.eval_batches=0 "$@" "${PROBE_ARGS[@]}" > "$RUN/probe.log" 2>&1 || { cat "$RUN/probe.log" >&2; exit 1; }
  "$PY" - "$RUN/probe/metrics.jsonl" "$seconds" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rate = [r["bytes_per_s"] for r in rows if r.get("bytes_per_s")][-1]  # after warm-up
seconds = float(sys.argv[2])
cfg = json.load(open(sys.argv[1].replace("metrics.jsonl", "config.json")))
per_step = cfg["train"]["batch_size"] * cfg["train"]["seq_len"] * cfg["train"]["grad_accum"]
print(max(20, int(seconds * rate / per_step)))
PY
}
PROBE_ARGS=()

finished() {  # run_dir -> yes | no: has its last logged step reached train.steps?
  "$PY" - "$1" <<'PY'
import json, sys
cfg = json.load(open(f"{sys.argv[1]}/config.json"))
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
print("yes" if rows and rows[-1]["step"] >= cfg["train"]["steps"] else "no")
PY
}

if want entropy; then
  rm -rf "$RUN/ent"
  if [ -n "${ENT_FROM:-}" ]; then  # reuse a trained entropy model (the card says where it came from)
    log "entropy model: reusing $ENT_FROM"
    mkdir -p "$RUN/ent"
    cp -r "$ENT_FROM" "$RUN/ent/model"
    "$PY" - "$ENT_FROM" "$RUN/ent/origin.json" <<'PY'
import json, sys
from pathlib import Path
src = Path(sys.argv[1])
card = next((p / "MODEL_CARD.md" for p in (src, src.parent) if (p / "MODEL_CARD.md").is_file()), None)
lines = card.read_text().splitlines() if card else []
note = next((line for line in lines if line.startswith("Entropy model:")), "")
Path(sys.argv[2]).write_text(json.dumps({"reused_from": str(src), "card_line": note}) + "\n")
PY
  else
    log "entropy model ($ENT_PRESET, ~${ENT_SECONDS}s)"
    read -r -a EA <<< "$ENT_ARGS ${EXTRA_ENT_ARGS:-}"
    STEPS=${ENT_STEPS:-$(steps_for "$ENT_PRESET" "$ENT_SECONDS" "$TRAIN" "${EA[@]}")}
    echo "steps: $STEPS"
    # shellcheck disable=SC2086
    blt train --preset "$ENT_PRESET" --data $TRAIN --out "$RUN/ent" train.steps="$STEPS" "${EA[@]}"
  fi
  log "threshold for a mean patch of 4.5 bytes on English prose (Austen, not Persuasion)"
  blt calibrate --model "$RUN/ent/model" "$DATA/tiny/train.txt" --target 4.5 --json | tee "$RUN/calibration.json"
fi

if want blt; then
  LIMIT=(train.time_limit=0)
  if [ -n "${BLT_STOP_AT:-}" ]; then LIMIT=(train.time_limit=$(( BLT_STOP_AT > SECONDS + 1 ? BLT_STOP_AT - SECONDS : 1 ))); fi
  if [ -f "$RUN/blt/checkpoints/latest" ] && [ "$(finished "$RUN/blt")" = no ]; then
    log "BLT: resuming $RUN/blt"
    blt train --out "$RUN/blt" --entropy-model "$RUN/ent/model" "${LIMIT[@]}"
  else
    THETA=$("$PY" -c "import json; print(json.load(open('$RUN/calibration.json'))['threshold'])")
    log "BLT ($BLT_PRESET, threshold $THETA, ~${BLT_SECONDS}s)"
    read -r -a BA <<< "$BLT_ARGS ${EXTRA_BLT_ARGS:-}"
    BA+=("model.patcher.threshold=$THETA")
    PROBE_ARGS=(--entropy-model "$RUN/ent/model")
    STEPS=${BLT_STEPS:-$(steps_for "$BLT_PRESET" "$BLT_SECONDS" "$TRAIN" "${BA[@]}")}
    echo "steps: $STEPS"
    rm -rf "$RUN/blt"
    if [ -n "${BLT_STOP_AT:-}" ]; then LIMIT=(train.time_limit=$(( BLT_STOP_AT > SECONDS + 1 ? BLT_STOP_AT - SECONDS : 1 ))); fi
    # shellcheck disable=SC2086
    blt train --preset "$BLT_PRESET" --data $TRAIN --out "$RUN/blt" --entropy-model "$RUN/ent/model" \
      train.steps="$STEPS" "${BA[@]}" "${LIMIT[@]}"
  fi
  if [ "$(finished "$RUN/blt")" = no ] && [ -z "${EXPORT_UNFINISHED:-}" ]; then
    echo "the BLT stopped at BLT_STOP_AT with a checkpoint: run the blt stage again to finish it"
    exit 0
  else
    rm -rf "$RUN/model"
    blt convert "$RUN/blt/model" "$RUN/model" --dtype bf16   # the shipped copy: bf16 safetensors
    SIZE=$(du -sb "$RUN/model" | cut -f1)
    echo "shipped size: $SIZE bytes"
    [ "$SIZE" -le 60000000 ] || { echo "the model is over 60 MB: shrink it"; exit 1; }
  fi
fi

if [[ $STAGES == *" sweep "* ]]; then  # not part of "all": a size sweep before choosing the shape
  THETA=$("$PY" -c "import json; print(json.load(open('$RUN/calibration.json'))['threshold'])")
  SWEEP=(--shipped-steps "${BLT_STEPS:-6400}")
  if [ "${SMOKE:-0}" = 1 ]; then
    SWEEP_STEPS=${SWEEP_STEPS:-20}
    SWEEP+=(--candidate base= --candidate global-1=model.global_transformer.n_layers=1)
  fi
  log "size sweep ($BLT_PRESET, ${SWEEP_STEPS:=600} steps a candidate)"
  SWEEP+=(--steps "$SWEEP_STEPS")
  # shellcheck disable=SC2086
  "$PY" scripts/size_sweep.py --preset "$BLT_PRESET" --data $TRAIN --entropy-model "$RUN/ent/model" \
    --out "$RUN/sweep" --args "$BLT_ARGS ${EXTRA_BLT_ARGS:-} model.patcher.threshold=$THETA" "${SWEEP[@]}" \
    ${SWEEP_ONLY:+--only $SWEEP_ONLY}
fi

if want eval; then
  log "held-out bits per byte"
  # shellcheck disable=SC2086
  XZ_FILES=$HELDOUT CAP=()
  if [ -n "${EVAL_MAX_BYTES:-}" ]; then  # xz on exactly the bytes the model scores
    CAP=(--max-bytes "$EVAL_MAX_BYTES")
    rm -rf "$RUN/heldout_cap" && mkdir -p "$RUN/heldout_cap"
    for f in $HELDOUT; do head -c "$EVAL_MAX_BYTES" "$f" > "$RUN/heldout_cap/$(basename "$f")"; done
    XZ_FILES="$RUN/heldout_cap/*.txt"
  fi
  # shellcheck disable=SC2086
  blt eval bpb --model "$RUN/model" $HELDOUT --batch-size "${EVAL_BATCH:-32}" "${CAP[@]}" --json > "$RUN/eval.json"
  # shellcheck disable=SC2086
  blt data stats --xz $XZ_FILES --json > "$RUN/xz.json"
  "$PY" scripts/model_card.py --run "$RUN" --out "$RUN/model/MODEL_CARD.md" --manifest "$DATA/MANIFEST.json"
  cat "$RUN/model/MODEL_CARD.md"
fi

if want pack; then
  OUT=${OUT:-$RUN/out}
  mkdir -p "$OUT"
  PARTS=()
  for f in model ent/metrics.jsonl ent/config.json ent/env.json ent/origin.json blt/metrics.jsonl blt/config.json \
      blt/env.json calibration.json eval.json xz.json; do
    if [ -e "$RUN/$f" ]; then PARTS+=("$f"); fi
  done
  tar -cf - -C "$RUN" "${PARTS[@]}" | xz -1 | split -b 15m - "$OUT/bundled.tar.xz.part-"
  ls -l "$OUT"
fi
