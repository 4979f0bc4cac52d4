#!/usr/bin/env bash
# The prepared GPU measurement (docs/performance.md, "GPU"), as one script sized for a single
# 10-minute call on a GPU machine (python3 with jax, flax, optax, orbax-checkpoint and chex
# installed). Writes everything under $OUT; each part has its own time limit so that a slow part
# still returns what it measured. On a machine without network access, put wheels of the
# packages it lacks (ml-collections, tensorboardX, ...) into a folder and pass WHEELS=that/folder.
#
#   [WHEELS=DIR] [OUT=DIR] bash tools/gpu_check.sh [all|bench|full]
#   bench: the GPU benchmark cases of docs/performance.md, the model as in the DMD code (DM off):
#          aligned batch 16 and 64, unaligned batch 16, aligned batch 16 with five seeds;
#   full:  a full MOSEI-sized run on synthetic data: 16,326/1,871/4,659 samples, 30 epochs, five
#          seeds, validation and test evaluation every epoch, early stopping off; its wall time
#          includes data loading and compilation (results.json "wall_time_s").
set -uo pipefail
part=${1:-all}
OUT=${OUT:-/tmp/dhmd_gpu_out}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/jax.txt"

if [ "$part" = all ] || [ "$part" = bench ]; then
  timeout 210 python3 -m dhmd_jax.benchmark --variant=dmd \
    --cases=aligned:16:1,aligned:64:1,unaligned:16:1,aligned:16:5 --steps=20 --repeats=3 \
    --out="$OUT/bench.json" > "$OUT/bench.txt" 2> "$OUT/bench.log"
  echo "benchmark rc $?"
  tail -n 8 "$OUT/bench.txt"; grep '^{' "$OUT/bench.log" | tail -n 4
fi

if [ "$part" = all ] || [ "$part" = full ]; then
  python3 -m dhmd_jax.synthetic --like mosei --aligned --num-train 16326 --num-valid 1871 \
    --num-test 4659 --out /tmp/mosei_synthetic.pkl > "$OUT/synthetic.txt"
  timeout 330 /usr/bin/time -v python3 -m dhmd_jax.main --config=configs/mosei.py \
    --config.dataset.path=/tmp/mosei_synthetic.pkl --config.train.num_epochs=30 \
    --config.train.early_stop=1000 --config.log.progress_bar=False \
    --workdir=/tmp/mosei_full_run > "$OUT/full_run.txt" 2> "$OUT/full_run.log"
  echo "full run rc $? (124: cut at 330 s; the epoch lines give the rate)"
  cp /tmp/mosei_full_run/results.json "$OUT/full_run_results.json" 2>/dev/null
  cp /tmp/mosei_full_run/metrics.jsonl "$OUT/full_run_metrics.jsonl" 2>/dev/null
  tail -n 20 "$OUT/full_run.txt"
fi
