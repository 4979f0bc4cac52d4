#!/usr/bin/env bash
# The benchmark runs behind the `vmap` and memory rows of docs/performance.md ("Training step on
# a CPU", "Memory of long sequences"), one group per process (a case that runs out of memory
# loses only its own group; peak RSS from /usr/bin/time -v in $OUT_DIR/<name>.log). Run it alone
# on the machine: timings share the cores. The `loop` rows come from the benchmark command that
# docs/performance.md gives for them.
#   bash tools/run_benchmarks.sh [OUT_DIR]     (about 20 minutes on the 2-core CPU)
set -u
out=${1:-bench}
mkdir -p "$out"
py=${PYTHON:-python}
run() {  # name, then benchmark flags
  local name=$1; shift
  echo "== $name: $*"
  /usr/bin/time -v "$py" -m dhmd_jax.benchmark --out="$out/$name.json" "$@" \
    > "$out/$name.md" 2> "$out/$name.log" || echo "   $name failed (rc $?), see $out/$name.log"
  grep '^|' "$out/$name.md" | tail -n +3
  grep 'Maximum resident' "$out/$name.log"
}
run vmap --variant=dmd --cases=aligned:16:1,aligned:64:1,unaligned:16:1 --steps=4 --repeats=1 \
  --eval_samples=64 --eval_batch_size=64 --stack_compute=vmap
run vmap_5seeds --variant=dmd --cases=aligned:16:5 --steps=4 --repeats=2 --eval_samples=64 \
  --stack_compute=vmap
run remat_unaligned_b64 --variant=dmd --cases=unaligned:64:1 --steps=2 --repeats=1 \
  --eval_samples=64 --eval_batch_size=64 --remat=true
run remat_unaligned_5seeds --variant=dmd --cases=unaligned:16:5 --steps=2 --repeats=1 \
  --eval_samples=64 --eval_batch_size=64 --remat=true
