"""dhmd_jax.benchmark on the tiny model: the chunk it times is the trainer's program (the loss
weights as inputs), its numbers are consistent with each other, and its Markdown keeps the
columns that a side-by-side harness reads (docs/performance.md); and tools/profile_step.py finds
every model part in the compiled step it profiles."""

import collections
import importlib.util
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dhmd_jax import benchmark
from dhmd_jax import train as train_lib
from dhmd_jax.models import dhmd as dhmd_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_benchmark(monkeypatch):
  """The benchmark's functions with the tiny model on MOSEI-aligned shapes and small flags."""

  def make_config(variant):
    config = tiny.get_config()
    config.model.use_dm = variant == "dhmd"
    return config

  monkeypatch.setattr(benchmark, "make_config", make_config)
  monkeypatch.setattr(benchmark, "_EVAL_SAMPLES", types.SimpleNamespace(value=32))
  monkeypatch.setattr(benchmark, "_EVAL_BATCH", types.SimpleNamespace(value=16))
  return benchmark


def test_a_case_runs_the_trainers_program_and_reports_consistent_numbers(tiny_benchmark):
  config = tiny_benchmark.make_config("dmd")
  model = dhmd_model.build_model(config, num_outputs=1)
  chunk = tiny_benchmark.make_chunk(config, model, "aligned", batch=8, num_seeds=2, num_steps=2)
  # The trainer's inputs: every Eq. 14 weight, one value per seed, the config's.
  weights = chunk.args[-1]
  assert set(weights) == set(train_lib.run_loss_weights(config, 2))
  for name, value in train_lib.run_loss_weights(config, 2).items():
    np.testing.assert_array_equal(weights[name], value)
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  params = copy(chunk.states.params)  # the chunk donates its input states
  states, metrics = chunk.run_chunk(copy(chunk.states), *chunk.args)
  assert metrics["total"].shape == (2, 2) and np.all(np.isfinite(metrics["total"]))
  assert np.all(np.asarray(states.step) == 2)
  # The weights are read: without the auxiliary terms the total is the task loss alone.
  zero = {n: np.zeros_like(v) for n, v in weights.items()}
  _, plain = chunk.run_chunk(chunk.states, *chunk.args[:-1], zero)
  np.testing.assert_allclose(plain["total"][:, 0], plain["task"][:, 0], rtol=1e-6)
  assert not np.allclose(metrics["total"][:, 0], metrics["task"][:, 0])

  result = tiny_benchmark.run_case("dmd", "aligned", batch=8, num_seeds=2, num_steps=2,
                                   repeats=1)
  assert result.ms_per_step > 0 and result.step_gflops > 0  # (compile_s is max(0, ...) by code)
  np.testing.assert_allclose(result.samples_per_s,
                             8 * result.micro_batches * 2 * 1e3 / result.ms_per_step)
  one_seed = jax.tree.map(lambda a: a[0], params)
  assert result.params == sum(int(x.size) for x in jax.tree.leaves(one_seed))
  assert result.eval_samples_per_s > 0 and result.eval_batch_size == 16


def test_markdown_keeps_the_columns_the_side_by_side_harness_reads():
  """Scripts that read the Markdown table split a `| dmd` row with awk -F'|' and take $7, $8 and
  $9 as compile s, ms/step and samples/s (awk's $N is Python's [N - 1]; new columns go at the
  end)."""
  row = dict(variant="dmd", layout="aligned", batch=16, micro_batches=1, seeds=1,
             compile_s=12.5, ms_per_step=230.31, samples_per_s=69.5, step_gflops=6.04,
             cpu_peak_fraction=0.079, eval_samples_per_s=378.0, text_encoder="features",
             params=1667602, seed_compute="scan")
  lines = benchmark.markdown([row], {"device_kind": "cpu", "backend": "cpu", "jax": "x",
                                     "cpu_model": "Some CPU", "cpus_usable": 2})
  assert lines.splitlines()[0] == "Device: cpu (cpu), jax x; host Some CPU, 2 CPUs"
  header = next(l for l in lines.splitlines() if l.startswith("| model"))
  line = next(l for l in lines.splitlines() if l.startswith("| dmd"))
  fields = [f.strip() for f in line.split("|")]
  names = [f.strip() for f in header.split("|")]
  assert (names[6], names[7], names[8]) == ("compile s", "ms/step", "samples/s")
  assert (fields[6], fields[7], fields[8]) == ("12.5", "230.3", "69.5")
  assert len(fields) == len(names)


def test_a_malformed_case_is_one_line_and_status_2():
  proc = subprocess.run([sys.executable, "-m", "dhmd_jax.benchmark",
                         "--cases=aligned:16:1,aligned:16"], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.splitlines() == [
      "error: bad --cases entry 'aligned:16': write layout:batch:seeds with layout aligned or "
      "unaligned, e.g. --cases=aligned:16:1,unaligned:64:5"]


def test_the_flags_that_set_config_fields_offer_what_the_schema_allows():
  """Each enum flag of the benchmark that sets a config field takes exactly the values the
  config schema allows, so the two cannot drift apart."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from dhmd_jax import validation  # pylint: disable=g-import-not-at-top
  for flag, field in [("accumulate", "train.accumulate"), ("seed_compute", "train.seed_compute"),
                      ("dropout_rng", "train.dropout_rng"),
                      ("stack_compute", "model.stack_compute"),
                      ("text_encoder", "model.text_encoder")]:
    allowed = validation.rules()[field].choices
    assert sorted(flags.FLAGS[flag].parser.enum_values) == sorted(allowed), flag


def _profile_tool():
  """tools/profile_step.py as a module (loaded once: it defines absl flags)."""
  if "profile_step" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "profile_step", os.path.join(REPO, "tools", "profile_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["profile_step"] = module
  return sys.modules["profile_step"]


@pytest.mark.parametrize("compute", ["loop", "vmap"])
def test_the_profile_finds_every_model_part_in_a_compiled_step(tiny_benchmark, compute):
  """tools/profile_step.py attributes each executed XLA op to a model part by the op_name of its
  HLO metadata: every part of the full model (BERT aside) must be found in the compiled chunk,
  whatever the stack schedule, so the per-part table does not fall through to "other"."""
  profile = _profile_tool()
  config = tiny_benchmark.make_config("dhmd")
  config.model.stack_compute = compute
  model = dhmd_model.build_model(config, num_outputs=1)
  chunk = tiny_benchmark.make_chunk(config, model, "aligned", batch=4, num_seeds=1, num_steps=1)
  hlo = chunk.run_chunk.lower(chunk.states, *chunk.args).compile().as_text()
  meta = profile.op_metadata(hlo)
  parts = collections.Counter(profile.part_of(name) for name in meta.values())
  named = {part for part, _ in profile.PARTS if part != "BERT" and "not named" not in part}
  assert named <= set(parts), parts
  if compute == "loop":  # (under "vmap" many backward ops carry no module path: "other")
    # The stacks hold most of the model's operations: more than the unattributed rest.
    stacks = sum(n for part, n in parts.items() if "transformer" in part)
    assert stacks > parts[profile.OTHER], parts
