#!/usr/bin/env bash
# One GPU call for the core checks: Flex vs reference at 8,192 bytes (issue 2) and generation
# speed against transformers (issue 4). Results land in $OUT (or ./bench_out).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python benchmarks/flex_check.py --preset blt-1b --seq-len 8192 2>&1 | grep -v -i warn | tee "$OUT/flex_check.txt"
python benchmarks/generate.py --preset blt-1b --dtype bf16 --json "$OUT/generate.json" "$@" 2>&1 | grep -v -i warn | tee "$OUT/generate.txt"
