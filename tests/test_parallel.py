"""Data parallelism: the same train step on 1 and on 4 CPU devices gives the same losses and
parameters. Runs in a child process, since the CPU device count is fixed when JAX starts."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny train chunk's inputs, shared by the child scripts here and in test_distributed.py:
# two seeds, 4 steps of 2 micro-batches of 8 samples.
TINY_CHUNK_SETUP = """
config = tiny.get_config()
config.train.seeds = (1111, 1112)
dataset = data_lib.load_dataset(config.dataset, workdir=tempfile.mkdtemp())
model = train_lib.build(config, dataset)
host = data_lib.split_arrays(dataset.splits["train"], "regression")
init_keys, order_keys, dropout_keys = train_lib.seed_keys(config.train.seeds)
index = steps.epoch_index(order_keys, 1, num_samples=96, batch_size=8, num_steps=4,
                          micro_per_step=2)
"""

CHILD = r"""
import json, sys, tempfile
import jax
jax.config.update("jax_num_cpu_devices", 4)
import jax.numpy as jnp
import numpy as np
from configs import tiny
from dhmd_jax import data as data_lib, parallel, steps, train as train_lib

assert len(jax.devices()) == 4, jax.devices()
""" + TINY_CHUNK_SETUP + r"""out = {}
for n in (1, 4):
  mesh = parallel.make_mesh(n)
  data = jax.device_put(host, parallel.replicated(mesh))
  sample = jax.tree.map(lambda a: a[:8], data)
  states = jax.jit(jax.vmap(lambda k: steps.init_state(config, model, sample, k)),
                   out_shardings=parallel.replicated(mesh))(init_keys)
  run_chunk = steps.make_run_chunk(steps.make_train_step(config, model), mesh)
  states, metrics = run_chunk(states, jnp.ones(2, bool), data, index, jnp.ones(4, bool),
                              dropout_keys)
  hlo = run_chunk.lower(states, jnp.ones(2, bool), data, index, jnp.ones(4, bool),
                        dropout_keys).compile().as_text()
  predict = steps.make_predict(model, batch_size=32, mesh=mesh)
  preds = predict(states.params, jax.device_put(
      data_lib.split_arrays(dataset.splits["valid"], "regression"), parallel.replicated(mesh)))
  out[n] = {
      "metrics": {k: np.asarray(v).tolist() for k, v in metrics.items()},
      "params": [np.asarray(p).ravel()[:64].tolist() for p in jax.tree.leaves(states.params)],
      "preds": np.asarray(preds).ravel().tolist(),
      "devices": len(jax.tree.leaves(states.params)[0].sharding.device_set),
      "all_reduce": "all-reduce" in hlo,
  }
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_one_and_four_devices_agree():
  proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  out = json.loads(line[len("RESULT"):])
  one, four = out["1"], out["4"]
  assert one["devices"] == 1 and four["devices"] == 4
  # The 4-device program really is data parallel: gradients are all-reduced across devices.
  assert four["all_reduce"] and not one["all_reduce"]
  import numpy as np  # pylint: disable=g-import-not-at-top
  for name in ("total", "task", "mar", "ort", "dtl_homo", "dtl_hetero", "ctr_homo"):
    np.testing.assert_allclose(four["metrics"][name], one["metrics"][name], rtol=2e-4,
                               atol=1e-5, err_msg=name)
  for a, b in zip(one["params"], four["params"]):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=2e-5)
  np.testing.assert_allclose(four["preds"], one["preds"], rtol=1e-3, atol=1e-4)
