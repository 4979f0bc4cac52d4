"""`steps.map_in_batches`: the one padded-batch loop of prediction, analysis and Table 7."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhmd_jax import steps


@pytest.mark.parametrize("num,batch_size", [(10, 4), (8, 4), (3, 5), (1, 1)])
def test_every_sample_once_in_order_with_one_compilation(num, batch_size):
  x = np.arange(num * 2, dtype=np.float32).reshape(num, 2)
  ids = np.arange(num) * 10

  traces = []

  @jax.jit
  def fn(batch):
    traces.append(batch["x"].shape)  # every batch, the padded last one too, has batch_size rows
    return {"sum": batch["x"].sum(-1), "twice": jnp.stack([batch["x"], 2 * batch["x"]])}

  out = steps.map_in_batches(fn, {"x": x, "id": ids}, batch_size)
  np.testing.assert_array_equal(out["sum"], x.sum(-1))
  chex.assert_shape(out["sum"], (num,))
  # The second output has samples on axis 1: concatenated on axis 0 it is wrong; axis=1 is right.
  both = steps.map_in_batches(lambda b: fn(b)["twice"], {"x": x, "id": ids}, batch_size, axis=1)
  np.testing.assert_array_equal(both, np.stack([x, 2 * x]))
  assert traces == [(batch_size, 2)]


def test_host_outputs_stay_numpy_and_take_selects_the_batch():
  x = np.arange(7.0)
  seen = []
  out = steps.map_in_batches(
      lambda b: np.asarray(b["x"]) + 1, {"x": x}, 3,
      take=lambda a, rows: seen.append(rows.tolist()) or {"x": a["x"][rows]})
  assert isinstance(out, np.ndarray)
  np.testing.assert_array_equal(out, x + 1)
  assert seen == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]  # the last batch padded with real rows
