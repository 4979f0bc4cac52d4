#!/usr/bin/env bash
# The benchmark runs behind the README's CPU table, one group per process (a case that runs out
# of memory loses only its own group). Run it alone on the machine: timings share the cores.
#   bash experiments/run_benchmarks.sh [OUT_DIR]     (about 40 minutes on the 2-core CPU)
set -u
out=${1:-bench}
mkdir -p "$out"
py=${PYTHON:-python}
run() {  # name, then benchmark flags
  local name=$1; shift
  echo "== $name: $*"
  "$py" -m dhmd_jax.benchmark --out="$out/$name.json" "$@" \
    > "$out/$name.md" 2> "$out/$name.log" || echo "   $name failed (rc $?), see $out/$name.log"
  grep '^|' "$out/$name.md" | tail -n +3
}
run aligned --variant=both --cases=aligned:16:1,aligned:64:1,aligned:16:5,aligned:64:5 \
  --steps=10 --repeats=3
run unaligned_1seed --variant=both --cases=unaligned:16:1 --steps=2 --repeats=2
run unaligned_1seed_b64 --variant=dmd --cases=unaligned:64:1 --steps=2 --repeats=2
run unaligned_5seeds --variant=dmd --cases=unaligned:16:5 --steps=1 --repeats=1 --eval_samples=64
