"""Data parallelism: one `data` mesh axis over the devices, batches split along it.

The train step is the same function on 1 or N devices: `jax.jit` compiles it for the mesh, the
micro-batches are constrained to be split along their batch axis, and parameters, optimizer
state and the device-resident training arrays are replicated. XLA inserts the gradient
all-reduce. Because the program is written for the global batch, triplet mining sees the whole
batch, not a device's shard.

Several processes (hosts): `dhmd_jax.distributed` starts JAX's distributed runtime before
anything else; the mesh then spans every process's devices (`jax.devices()`), and every process
runs the same command. Host arrays go onto such a mesh with `replicate` and come back with
`to_host` (tests/test_parallel.py runs the train step over two processes,
tests/test_multiprocess.py the whole command).
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices):
  """A 1-D mesh over the first `num_devices` devices (0 = all)."""
  devices = jax.devices()
  n = len(devices) if num_devices == 0 else num_devices
  if n > len(devices) or n < 1:
    raise ValueError(f"config.train.num_devices = {num_devices}, but {len(devices)} "
                     f"device(s) are available; set it to at most {len(devices)} (0 = all)")
  if jax.process_count() > 1 and n != len(devices):  # a process without a device would idle
    raise ValueError(f"config.train.num_devices = {num_devices}, but a run over "
                     f"{jax.process_count()} processes uses all their {len(devices)} devices; "
                     f"set it to 0 (all)")
  axis_types = (jax.sharding.AxisType.Auto,)
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=axis_types, devices=devices[:n])


def check_divisible(mesh, batch_size, what):
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"{what} = {batch_size} is not divisible by the {n} devices of the data "
                     f"axis; choose a multiple of {n} or set config.train.num_devices")


def replicated(mesh):
  return NamedSharding(mesh, P())


def replicate(tree, mesh):
  """`jax.device_put(tree, replicated(mesh))` that also works when the mesh spans processes.

  With several processes, `device_put` onto a sharding that holds other processes' devices takes
  only plain ndarrays, scalars and uncommitted jax.Arrays (and checks that every process passes
  the same value): not the datasets' np.memmap arrays, nor typed PRNG key arrays. Those are
  converted here (a memmap to an ndarray view, a key array to its key data and back).
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if isinstance(x, np.ndarray):
      x = np.asarray(x)
    return jax.device_put(x, sharding)

  return jax.tree.map(put, tree)


def batch_sharding(mesh, batch_axis):
  """Sharding that splits axis `batch_axis` of every leaf over the data axis."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def constrain_batch(tree, mesh, batch_axis):
  """Inside jit: ask for `tree`'s leaves to be split along `batch_axis` (no-op for 1 device)."""
  if mesh is None or mesh.size == 1:
    return tree
  return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh, batch_axis))


def to_host(x):
  """`np.asarray(x)` for a jax.Array of any layout, also one that spans processes: a replicated
  array is read from this process's copy, a split one is gathered from every process (every
  process must call this then, as for any collective)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
