"""Benchmark: training and evaluation throughput on MOSEI-shaped synthetic batches.

  python -m dhmd_jax.benchmark                       # all cases, JSON + Markdown on stdout
  python -m dhmd_jax.benchmark --cases=aligned:16:1,unaligned:16:1 --out=bench.json
  python -m dhmd_jax.benchmark --variant=dmd         # the model as in the reference (no DM)
  python -m dhmd_jax.benchmark --variant=dmd --text_encoder=bert --cases=aligned:16:1  # + BERT

A case is `layout:batch:seeds`. A training "step" is what the reference figures time: forward,
every loss, backward and the Adam step on one batch (`--update_epochs=1`, the default), here run
as a jitted `lax.scan` of `--steps` steps over device-resident data, for `seeds` seeds at once
(vmap). With `--update_epochs=U` a step is U micro-batches and one Adam step (the reference
protocol, U = 10). samples/s counts every micro-batch of every seed. Compile time is the first
call's wall time minus a steady-state call. Also reported: FLOPs of one step (XLA cost
analysis), the fraction of the CPU's peak it reaches (on CPU), evaluation throughput, the peak
device memory (or the process peak RSS on CPU), the device and the library versions.
"""

import dataclasses
import json
import os
import platform
import resource
import sys
import time
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import mosei
from dhmd_jax import auto
from dhmd_jax import cli
from dhmd_jax import host
from dhmd_jax import steps
from dhmd_jax import train as train_lib
from dhmd_jax import validation
from dhmd_jax.models import dhmd as dhmd_model


def _choices(field):
  """The values the config schema allows for `field` (one list for the config and the flag)."""
  return list(validation.rules()[field].choices)


_CASES = flags.DEFINE_string(
    "cases", "aligned:16:1,aligned:64:1,unaligned:16:1,unaligned:64:1,"
    "aligned:16:5,aligned:64:5,unaligned:16:5,unaligned:64:5",
    "Comma-separated layout:batch:seeds cases.")
_VARIANT = flags.DEFINE_enum("variant", "both", ["dmd", "dhmd", "both"],
                             "dmd: the model as in the reference (dictionary matching off); "
                             "dhmd: the full model; both: each case twice.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed chunk.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed chunks per case (the best is reported).")
_ACCUMULATE = flags.DEFINE_enum(
    "accumulate", None, _choices("train.accumulate"),
    "config.train.accumulate for the step (default: the config's, as the trainer runs it).")
_SEED_COMPUTE = flags.DEFINE_enum(
    "seed_compute", None, _choices("train.seed_compute"),
    "config.train.seed_compute: how the seeds of a case share the program (default: the "
    "config's, as the trainer runs it).")
_UPDATE_EPOCHS = flags.DEFINE_integer(
    "update_epochs", 1, "Micro-batches per optimizer step (the reference protocol uses 10; "
    "its per-step figures are for 1). samples/s counts every micro-batch.")
_DROPOUT_RNG = flags.DEFINE_enum("dropout_rng", "threefry", _choices("train.dropout_rng"),
                                 "config.train.dropout_rng for the step.")
_QUERY_BLOCK = flags.DEFINE_integer(
    "attention_query_block", None, "config.model.attention_query_block (default: the config's).")
_REMAT = flags.DEFINE_enum(
    "remat", None, ["true", "false", "auto"],
    "config.model.remat: recompute transformer layers in the backward pass; auto: when the "
    "case's seeds are vmapped (default: the config's).")
_STACK_COMPUTE = flags.DEFINE_enum(
    "stack_compute", None, _choices("model.stack_compute"),
    "config.model.stack_compute (default: the config's).")
_EVAL_SAMPLES = flags.DEFINE_integer("eval_samples", 1024,
                                     "Samples per seed in the evaluation-throughput pass.")
_EVAL_BATCH = flags.DEFINE_integer(
    "eval_batch_size", 256, "Batch size of the evaluation pass (config.train.eval_batch_size).")
_TEXT_ENCODER = flags.DEFINE_enum(
    "text_encoder", "features", _choices("model.text_encoder"),
    "features: the precomputed 768-d text features; bert: text through a randomly initialised "
    "BERT of bert-base-uncased's size (12 layers, hidden 768; config.model.bert.random_arch) on "
    "text_bert ids, fine-tuned with the rest, as the DMD code trains it (no weights needed).")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")

# MOSEI shapes: (T, D) per modality.
SHAPES = {
    "aligned": {"text": (50, 768), "vision": (50, 35), "audio": (50, 74)},
    "unaligned": {"text": (50, 768), "vision": (500, 35), "audio": (500, 74)},
}


def make_config(variant):
  config = mosei.get_config("aligned")
  config.model.use_dm = variant == "dhmd"
  config.train.update_epochs = _UPDATE_EPOCHS.value
  config.train.dropout_rng = _DROPOUT_RNG.value
  if _QUERY_BLOCK.value is not None:
    config.model.attention_query_block = _QUERY_BLOCK.value
  if _REMAT.value is not None:
    config.model.remat = {"true": True, "false": False}.get(_REMAT.value, _REMAT.value)
  if _STACK_COMPUTE.value is not None:
    config.model.stack_compute = _STACK_COMPUTE.value
  if _TEXT_ENCODER.value == "bert":
    config.model.text_encoder = "bert"
    config.model.bert.init = "random"  # the cost of bert-base, not its weights
    config.train.accumulate = "scan"  # as the BERT configs train (configs/mosei.py use_bert)
  if _ACCUMULATE.value is not None:
    config.train.accumulate = _ACCUMULATE.value
  if _SEED_COMPUTE.value is not None:
    config.train.seed_compute = _SEED_COMPUTE.value
  return validation.validate(config)


def synthetic_arrays(layout, num, seed=0, text_encoder="features"):
  """Random MOSEI-shaped batches; with text_encoder="bert", `text_bert` token rows (ids of
  bert-base-uncased's vocabulary, [CLS] first, [SEP] last, no padding) instead of `text`."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for m, (t, d) in SHAPES[layout].items():
    if m == "text" and text_encoder == "bert":
      ids = rng.integers(1000, 30522, size=(num, t))
      ids[:, 0], ids[:, -1] = 101, 102
      arrays["text_bert"] = np.stack([ids, np.ones_like(ids), np.zeros_like(ids)],
                                     axis=1).astype(np.int32)  # (N, 3, T)
    else:
      arrays[m] = rng.standard_normal((num, t, d), dtype=np.float32)
    arrays[f"{m}_mask"] = np.ones((num, t), bool)
  arrays["label"] = np.clip(rng.standard_normal(num), -3, 3).astype(np.float32)
  return arrays


def cpu_peak_flops():
  """Peak fp32 FLOP/s of this CPU: cores x GHz x FLOPs/cycle (FMA width from the flags)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return None, "unknown"
  flags_line = next((l for l in info.splitlines() if l.startswith("flags")), "")
  mhz = [float(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu MHz")]
  cores = os.cpu_count() or 1
  if "avx512f" in flags_line:
    per_cycle, isa = 64, "AVX-512 (2 FMA units x 16 fp32 x 2)"
  elif "avx2" in flags_line and "fma" in flags_line:
    per_cycle, isa = 32, "AVX2+FMA (2 FMA units x 8 fp32 x 2)"
  else:
    per_cycle, isa = 8, "SSE"
  if not mhz:
    return None, isa
  return cores * (max(mhz) * 1e6) * per_cycle, f"{cores} cores x {max(mhz):.0f} MHz x {isa}"


def peak_memory():
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return {"device_peak_bytes": int(stats["peak_bytes_in_use"])}
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"process_peak_rss_bytes": int(rss_kb) * 1024}


@dataclasses.dataclass
class CaseResult:
  variant: str
  dropout_rng: str
  layout: str
  batch: int
  micro_batches: int
  seeds: int
  accumulate: str
  attention_query_block: int
  remat: bool
  stack_compute: str
  compile_s: float
  ms_per_step: float
  samples_per_s: float
  step_gflops: float
  eval_samples_per_s: float
  eval_batch_size: int
  cpu_peak_fraction: float | None
  text_encoder: str = "features"
  params: int = 0  # parameters of one seed's model
  seed_compute: str = ""  # resolved train.seed_compute


@dataclasses.dataclass
class Chunk:
  """A jitted training chunk over synthetic MOSEI-shaped data and its inputs:
  `run_chunk(states, *chunk.args)` runs it (see `steps.make_run_chunk`)."""
  run_chunk: Any
  states: Any  # stacked TrainState of the seeds
  active: jax.Array  # (S,)
  data: dict  # (N, ...) arrays
  index: jax.Array  # (S, K, U, B)
  valid: jax.Array  # (K,)
  dropout_keys: jax.Array  # (S,)
  loss_weights: dict  # {name: (S,)}: the config's Eq. 14 weights, inputs as in the trainer

  @property
  def args(self):
    return (self.active, self.data, self.index, self.valid, self.dropout_keys,
            self.loss_weights)


def case_seeds(num_seeds):
  """The seeds of a case: 1111, 1112, ... (the MMSA convention). The config's `train.seeds`
  must hold them before the model is built (`model.remat="auto"` counts them)."""
  return tuple(range(1111, 1111 + num_seeds))


def make_chunk(config, model, layout, batch, num_seeds, num_steps):
  """Initial states of `num_seeds` seeds and a chunk of `num_steps` steps (the timed unit)."""
  micro = config.train.update_epochs
  num = max(batch * micro * num_steps, 256)
  data = jax.device_put(synthetic_arrays(layout, num, text_encoder=config.model.text_encoder))
  seeds = list(case_seeds(num_seeds))
  keys = jnp.stack([jax.random.key(s) for s in seeds])
  dropout_keys = train_lib.seed_keys(seeds, config.train.dropout_rng)[2]
  sample = jax.tree.map(lambda a: a[:batch], data)
  states = jax.jit(jax.vmap(lambda k: steps.init_state(config, model, sample, k)))(keys)
  run_chunk = steps.make_run_chunk(steps.make_train_step(config, model),
                                   seed_compute=config.train.seed_compute)
  index = steps.epoch_index(keys, 1, num_samples=num, batch_size=batch, num_steps=num_steps,
                            micro_per_step=micro)
  return Chunk(run_chunk, states, jnp.ones(num_seeds, bool), data, index,
               jnp.ones(num_steps, bool), dropout_keys,
               jax.device_put(train_lib.run_loss_weights(config, num_seeds)))


def run_case(variant, layout, batch, num_seeds, num_steps, repeats):
  config = make_config(variant)
  config.train.seeds = case_seeds(num_seeds)
  model = dhmd_model.build_model(config, num_outputs=1)
  micro = config.train.update_epochs
  chunk = make_chunk(config, model, layout, batch, num_seeds, num_steps)
  run_chunk, states, args = chunk.run_chunk, chunk.states, chunk.args

  start = time.perf_counter()
  states, metrics = run_chunk(states, *args)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    states, metrics = run_chunk(states, *args)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  best = min(times)
  ms_per_step = 1e3 * best / num_steps

  # FLOPs of one optimizer step of one seed (XLA's count for the compiled step).
  one_state = jax.tree.map(lambda a: a[0], states)
  one_batch = jax.tree.map(lambda a: a[chunk.index[0, 0]], chunk.data)
  step = jax.jit(steps.make_train_step(config, model))
  # Lowering only: no second compilation.
  one_weights = jax.tree.map(lambda a: a[0], chunk.loss_weights)  # as the timed chunk has them
  cost = step.lower(one_state, one_batch, chunk.dropout_keys[0], one_weights).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  peak, _ = cpu_peak_flops()
  achieved = flops * num_seeds / (best / num_steps)
  fraction = achieved / peak if (peak and jax.default_backend() == "cpu") else None

  predict = steps.make_predict(model, batch_size=_EVAL_BATCH.value,
                               seed_compute=config.train.seed_compute)
  eval_data = jax.device_put(synthetic_arrays(layout, _EVAL_SAMPLES.value, seed=1,
                                              text_encoder=config.model.text_encoder))
  jax.block_until_ready(predict(states.params, eval_data))
  start = time.perf_counter()
  jax.block_until_ready(predict(states.params, eval_data))
  eval_rate = _EVAL_SAMPLES.value * num_seeds / (time.perf_counter() - start)
  return CaseResult(variant, config.train.dropout_rng, layout, batch, micro, num_seeds,
                    auto.accumulate(config.train.accumulate),
                    config.model.attention_query_block,
                    model.settings.remat, model.settings.stack_compute,
                    max(first - best, 0.0), ms_per_step,
                    batch * micro * num_seeds * 1e3 / ms_per_step, flops / 1e9, eval_rate,
                    _EVAL_BATCH.value, fraction, text_encoder=config.model.text_encoder,
                    params=sum(int(x.size) for x in jax.tree.leaves(one_state.params)),
                    seed_compute=auto.seed_compute(config.train.seed_compute))


def environment():
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  peak, peak_text = cpu_peak_flops()
  return {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "python": sys.version.split()[0], "platform": platform.platform(),
      "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
      "numpy": np.__version__, "cpu_count": os.cpu_count(), "cpu_model": host.cpu_model(),
      "cpus_usable": host.cpus(),
      "cpu_peak_gflops": None if peak is None else peak / 1e9, "cpu_peak_basis": peak_text,
  }


def markdown(results, env):
  lines = [f"Device: {env['device_kind']} ({env['backend']}), jax {env['jax']}; host "
           f"{env['cpu_model']}, {env['cpus_usable']} CPUs", "",
           # New columns go at the end: a side-by-side harness reads columns 6-8 (compile s,
           # ms/step, samples/s).
           "| model | layout | batch | micro-batches/step | seeds | compile s | ms/step "
           "| samples/s | GFLOP/step | % CPU peak | eval samples/s | text | parameters "
           "| seeds computed |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    frac = "" if r["cpu_peak_fraction"] is None else f"{100 * r['cpu_peak_fraction']:.1f}"
    lines.append(f"| {r['variant']} | {r['layout']} | {r['batch']} | "
                 f"{r['micro_batches']} | {r['seeds']} | "
                 f"{r['compile_s']:.1f} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.1f} | "
                 f"{r['step_gflops']:.2f} | {frac} | {r['eval_samples_per_s']:.0f} | "
                 f"{r['text_encoder']} | {r['params']:,} | {r['seed_compute']} |")
  return "\n".join(lines)


COMMAND = cli.Command(
    prog="python -m dhmd_jax.benchmark",
    summary="Times training and evaluation on MOSEI-shaped synthetic batches; prints JSON and "
            "Markdown.", placeholders={"cases": "LAYOUT:BATCH:SEEDS,...", "out": "JSON"})


def parse_cases(text):
  """[(layout, batch, seeds)] of `--cases`; UsageError (one line) for a malformed one."""
  cases = []
  for case in text.split(","):
    parts = case.strip().split(":")
    if (len(parts) != 3 or parts[0] not in SHAPES or not all(p.isdigit() and int(p) > 0
                                                              for p in parts[1:])):
      raise cli.UsageError(f"bad --cases entry {case!r}: write layout:batch:seeds with layout "
                           f"{' or '.join(SHAPES)}, e.g. --cases=aligned:16:1,unaligned:64:5")
    cases.append((parts[0], int(parts[1]), int(parts[2])))
  return cases


def main(argv):
  del argv
  cases = parse_cases(_CASES.value)
  variants = ["dmd", "dhmd"] if _VARIANT.value == "both" else [_VARIANT.value]
  results = []
  for layout, batch, seeds in cases:
    for variant in variants:
      r = run_case(variant, layout, batch, seeds, _STEPS.value, _REPEATS.value)
      results.append(dataclasses.asdict(r))
      print(json.dumps(results[-1]), file=sys.stderr, flush=True)
  env = environment()
  report = {"environment": env, "memory": peak_memory(), "results": results}
  print(json.dumps(report, indent=2))
  print(markdown(results, env))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  sys.exit(cli.run(COMMAND, main))
