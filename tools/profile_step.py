"""Where a training step's time goes: a jax.profiler trace of the benchmark's step, summarised.

  python tools/profile_step.py --layout=aligned --batch=16 --pvariant=dmd --psteps=5

Traces `--psteps` steps of the benchmark's jitted chunk (forward, losses, backward, Adam) with
`jax.profiler`, reads the Perfetto JSON it writes, and attributes every executed XLA op (thunk)
to the model part named in its HLO metadata (the Flax module path in `op_name`). Prints:
- the step's wall time and the XLA ops' time summed over the runtime's threads (against the
  wall time and the core count: how busy the cores are);
- the number of ops executed per step and their median duration;
- time by op kind (dot/convolution, fusion, ...), by model part, and the top ops.
The raw trace stays under `--trace_dir` for TensorBoard/Perfetto.
"""

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time

from absl import app
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dhmd_jax import benchmark  # pylint: disable=g-import-not-at-top
from dhmd_jax.models import dhmd as dhmd_model

_LAYOUT = flags.DEFINE_enum("layout", "aligned", ["aligned", "unaligned"], "MOSEI layout.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds trained together.")
_PVARIANT = flags.DEFINE_enum("pvariant", "dmd", ["dmd", "dhmd"], "Model variant.")
_PSTEPS = flags.DEFINE_integer("psteps", 5, "Steps traced.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/dhmd_profile", "Where the trace goes.")
_TOP = flags.DEFINE_integer("top", 15, "Rows of the top-ops table.")

# Model parts, matched in this order against the op's metadata op_name: the Flax module path
# (the three transformer stacks are modules named by kind; inside them the pure functions add
# the named scopes `layers_i` / `layers` and `self_attn`). `tests/test_benchmark.py` checks that
# every part of the DMD model is found in a compiled step. With stack_compute=vmap many backward
# ops carry no module path at all (transformed scan bodies) and count as "other"; the default
# CPU schedule ("loop") keeps the paths.
PARTS = [
    ("cross-modal transformers", r"cross_transformers"),
    ("memory transformers", r"memory_transformers"),
    ("homo self-attention transformers", r"self_attentions_c"),
    # Ops of a layer whose module path was lost (hoisted out of a scanned layer, say).
    ("transformer layers, stack not named", r"(^|/)(self_attn|layers(_\d+)?)/"),
    ("BERT", r"(^|/)bert/"),
    ("decoupling", r"decoupling|align_c_|proj_cosine"),
    ("conv projections", r"proj_[lva](/|$)"),
    ("GD units", r"gd_(homo|hetero)"),
    ("dictionary matching", r"dm_(homo|hetero)"),
    ("heads and fusion", r"head|weight_|proj_[lva]_2d"),
    ("optimizer / accumulation", r"adam|scale_by|clip|ravel|unravel|inject_hyperparams"),
]
OTHER = "losses, RNG, gathers, other"


def op_metadata(hlo_text):
  """{HLO instruction name: op_name metadata} from the compiled module's text.

  Instructions that XLA created (many backward dots) carry no op_name of their own; such an
  instruction gets the first op_name found inside the computation it calls, else that of its
  first operand that has one (so it is counted with the module that produced its input).
  """
  instruction = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s")
  op_name = re.compile(r"op_name=\"([^\"]*)\"")
  calls = re.compile(r"calls=%?([\w.\-]+)")
  header = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
  operand = re.compile(r"%([\w.\-]+)")
  meta, inside, called, operands = {}, {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    h = header.match(line)
    if h:
      computation = h.group(1)
      continue
    m = instruction.match(line)
    if not m:
      continue
    name = op_name.search(line)
    if name:
      meta[m.group(1)] = name.group(1)
      if computation is not None:
        inside.setdefault(computation, name.group(1))
    else:
      c = calls.search(line)
      if c:
        called[m.group(1)] = c.group(1)
      args = line.split("=", 1)[1].split("metadata=")[0]
      operands[m.group(1)] = [o for o in operand.findall(args) if o != m.group(1)]
  for name, computation in called.items():
    if computation in inside:
      meta[name] = inside[computation]
  for _ in range(3):  # chains of unnamed instructions
    for name, args in operands.items():
      if name not in meta:
        named = [meta[a] for a in args if a in meta]
        if named:
          meta[name] = named[0]
  return meta


def part_of(op_name):
  # Backward ops carry `transpose(jvp(...))`; the module path is still in the name.
  for part, pattern in PARTS:
    if re.search(pattern, op_name):
      return part
  return OTHER


def source_of(op_name):
  """'jit(f)/.../trans_l_with_a/layers_2/self_attn/dot_general' -> 'self_attn/dot_general'."""
  if not op_name:
    return "(no metadata)"
  parts = [p for p in op_name.split("/") if p]
  backward = "transpose(" in op_name
  tail = "/".join(parts[-2:])
  tail = re.sub(r"layers_\d+", "layers_i", tail)
  return ("bwd " if backward else "fwd ") + tail


def main(argv):
  del argv
  config = benchmark.make_config(_PVARIANT.value)
  if os.environ.get("STACK_COMPUTE"):
    config.model.stack_compute = os.environ["STACK_COMPUTE"]
  batch, num_steps, num_seeds = _BATCH.value, _PSTEPS.value, _SEEDS.value
  config.train.seeds = benchmark.case_seeds(num_seeds)
  model = dhmd_model.build_model(config, num_outputs=1)
  chunk = benchmark.make_chunk(config, model, _LAYOUT.value, batch, num_seeds, num_steps)
  # Compile once and run that executable, so the traced op names are those of this HLO text.
  compiled = chunk.run_chunk.lower(chunk.states, *chunk.args).compile()
  hlo = compiled.as_text()
  meta = op_metadata(hlo)
  os.makedirs(_TRACE_DIR.value, exist_ok=True)
  with open(os.path.join(_TRACE_DIR.value, "module.hlo.txt"), "w") as f:
    f.write(hlo)
  states, metrics = compiled(chunk.states, *chunk.args)  # warm up
  jax.block_until_ready(metrics)

  jax.profiler.start_trace(_TRACE_DIR.value, create_perfetto_trace=True)
  start = time.perf_counter()
  states, metrics = compiled(states, *chunk.args)
  jax.block_until_ready(metrics)
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()

  trace = max(glob.glob(os.path.join(_TRACE_DIR.value, "**", "perfetto_trace.json.gz"),
                        recursive=True), key=os.path.getmtime)
  events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
         and not e["name"].startswith("end:")]
  # Thunks of control flow (while loops, calls) contain other thunks: count leaves only.
  container = re.compile(r"^(while|call|conditional)")
  leaves = [e for e in ops if not container.match(e["args"]["hlo_op"])]
  total_us = sum(e["dur"] for e in leaves)
  threads = {e["tid"] for e in leaves}

  by_kind, by_part, by_op, by_source = (collections.Counter() for _ in range(4))
  count_kind = collections.Counter()
  for e in leaves:
    name = e["args"]["hlo_op"]
    kind = re.sub(r"[.\d]+$", "", name)
    by_kind[kind] += e["dur"]
    count_kind[kind] += 1
    by_part[part_of(meta.get(name, ""))] += e["dur"]
    by_op[name] += e["dur"]
    by_source[source_of(meta.get(name, ""))] += e["dur"]

  per_step_ms = 1e3 * wall / num_steps
  print(f"# Profile: {_PVARIANT.value} {_LAYOUT.value} batch {batch}, {num_seeds} seed(s), "
        f"{num_steps} steps; {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"wall {per_step_ms:.1f} ms/step; XLA ops {1e-3 * total_us / num_steps:.1f} ms/step "
        f"summed over {len(threads)} thread(s); {len(leaves) / num_steps:.0f} ops/step, median "
        f"{statistics.median(e['dur'] for e in leaves):.1f} us, "
        f"{sum(e['dur'] < 10 for e in leaves) / len(leaves):.0%} under 10 us")
  def table(title, counter, counts=None):
    print(f"\n| {title} | ms/step | share |" + (" ops/step |" if counts else ""))
    print("|---|---|---|" + ("---|" if counts else ""))
    for key, us in counter.most_common(_TOP.value):
      row = f"| {key} | {1e-3 * us / num_steps:.2f} | {us / total_us:.1%} |"
      if counts:
        row += f" {counts[key] / num_steps:.0f} |"
      print(row)
  table("op kind", by_kind, count_kind)
  table("model part", by_part)
  table("jax operation (module / primitive; layers merged)", by_source)
  table("op", by_op)
  print(f"\ntrace: {trace}")


if __name__ == "__main__":
  app.run(main)
