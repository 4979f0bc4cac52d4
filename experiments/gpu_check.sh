#!/usr/bin/env bash
# The prepared GPU check of issue 5, as one script for the `device` tool (H100/H200, python3.12
# with jax/flax/optax/orbax/chex preinstalled; ml-collections and tensorboardX travel as wheels
# in .whl/, see README "Performance"). Writes everything under $OUT.
#
#   1. the benchmark (MOSEI shapes; aligned/unaligned; batch 16/64; 1 and 5 seeds; DMD and DHMD);
#   2. a full MOSEI-sized run on synthetic data: 16,326/1,871/4,659 samples, 30 epochs, five
#      seeds, validation and test evaluation every epoch, early stopping off; wall time includes
#      data loading and compilation (results.json "wall_time_s").
set -euo pipefail
OUT=${OUT:-/tmp/dhmd_gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/jax.txt"

python3 -m dhmd_jax.benchmark --steps=20 --repeats=3 --out="$OUT/bench.json" \
  > "$OUT/bench.txt" 2> "$OUT/bench.log"
tail -n 25 "$OUT/bench.txt"

python3 -m dhmd_jax.synthetic --like mosei --aligned --num-train 16326 --num-valid 1871 \
  --num-test 4659 --out /tmp/mosei_synthetic.pkl > "$OUT/synthetic.txt"
/usr/bin/time -v python3 -m dhmd_jax.main --config=configs/mosei.py \
  --config.dataset.path=/tmp/mosei_synthetic.pkl --config.train.num_epochs=30 \
  --config.train.early_stop=1000 --config.log.progress_bar=False \
  --workdir=/tmp/mosei_full_run > "$OUT/full_run.txt" 2> "$OUT/full_run.log"
cp /tmp/mosei_full_run/results.json "$OUT/full_run_results.json"
tail -n 20 "$OUT/full_run.txt"
