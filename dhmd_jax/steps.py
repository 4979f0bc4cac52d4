"""The compiled pieces of training: the train step, chunks of steps, and batched prediction.

`train_step(state, batch, key) -> (state, metrics)` is a pure function of one seed's state, one
optimizer step's micro-batches (leading axis `update_epochs`) and an RNG key. Around it:

- `run_chunk` scans `train_step` over several steps, gathering each step's micro-batches from
  training arrays that stay on the device (no host synchronisation per step), for every seed in
  one program (`jax.vmap`-ed, or one seed after another: `train.seed_compute`): every seed has
  its own parameters, optimizer state, learning rate, data order and dropout keys, and a seed
  that early-stopped simply keeps its state.
- `predict` runs the deterministic model over a padded split, for every seed at once.

Gradient accumulation follows the DMD code's training loop exactly (docs/training.md): the
running sum of micro-batch gradients is clipped to +-clip after *every* micro-batch,
G <- clip(G + g_k), and Adam steps once per group.

Accumulation, clipping and Adam act on one flat vector of all parameters (`ravel_pytree`), not
leaf by leaf: the model has hundreds of small parameter arrays, and per-leaf optimizer arithmetic
multiplies the compiled program's size (compile time) and the number of kernels per step.
"""

import functools
from typing import Any

import flax
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from dhmd_jax import auto
from dhmd_jax import objective
from dhmd_jax import parallel
from dhmd_jax.models import bert_weights
from dhmd_jax.models import dhmd as dhmd_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken, int32 ()
  params: Any  # the model's parameter pytree
  opt_state: Any  # Adam's state over the flat parameter vector


def make_optimizer(config):
  """Adam on all parameters, no weight decay (the DMD code never passes its weight_decay)."""
  return optax.inject_hyperparams(optax.adam)(learning_rate=config.train.learning_rate)


def set_learning_rate(state, lr):
  """Returns `state` with Adam's learning rate replaced (per seed when `state` is stacked)."""
  hyper = dict(state.opt_state.hyperparams)
  hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype).reshape(
      hyper["learning_rate"].shape)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def init_state(config, model, sample_batch, key):
  """One seed's TrainState (vmap over keys for several seeds)."""
  init_key, dropout_key = jax.random.split(key)
  params = model.init({"params": init_key, "dropout": dropout_key}, sample_batch,
                      deterministic=False)["params"]
  # Pretrained parts replace their random initialisation, the same weights for every seed (the
  # reference loads bert-base-uncased in each run): BERT when config.model.text_encoder="bert".
  if isinstance(model, dhmd_model.DHMD):  # (tests may stand another model in for DHMD)
    params = bert_weights.load_pretrained(model.settings, params)
  opt_state = make_optimizer(config).init(ravel_pytree(params)[0])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def over_seeds(fn, mode, in_axes):
  """`fn` over the leading (seed) axis of the arguments whose `in_axes` entry is 0, the others
  shared: `jax.vmap` ("vmap") or `jax.lax.map` ("scan", one seed after another; the body is
  traced and compiled once). Outputs stack along a new leading axis either way."""
  if mode == "vmap":
    return jax.vmap(fn, in_axes=in_axes)
  if mode != "scan":
    raise ValueError(f"seed_compute must be 'vmap' or 'scan', got {mode!r}")

  def mapped(*args):
    def one(per_seed):
      per_seed = iter(per_seed)
      return fn(*[next(per_seed) if axis == 0 else a for a, axis in zip(args, in_axes)])
    return jax.lax.map(one, tuple(a for a, axis in zip(args, in_axes) if axis == 0))
  mapped.__name__ = mapped.__qualname__ = fn.__name__  # the program's name in logs and profiles
  return mapped


def make_train_step(config, model):
  """Builds `train_step(state, batch, key, loss_weights=None) -> (state, metrics)` for one seed.

  `loss_weights`: None (the config's Eq. 14 weights) or {name: scalar} for names in
  `objective.LOSS_WEIGHTS`, e.g. one run's values in a vmapped loss-weight sweep.
  """
  tx = make_optimizer(config)
  clip = config.train.grad_clip_value
  accumulate_mode = auto.accumulate(config.train.accumulate)  # "vmap" or "scan"

  def loss_fn(params, micro, key, loss_weights=None):
    outputs = model.apply({"params": params}, micro, deterministic=False,
                          rngs={"dropout": key})
    total, terms = objective.compute_objective(config, outputs, micro["label"], loss_weights)
    terms = dict(terms, **{f"edge/{k}": v for k, v in objective.edge_summary(outputs).items()})
    return total, terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def add_and_clip(carry, grad):
    """carry: (clipped running sum, raw sum, clipped-at-least-once mask), (P,) each."""
    acc, raw, bit = carry
    acc, raw = acc + grad, raw + grad
    if clip > 0:
      bit = bit | (jnp.abs(acc) > clip)
      acc = jnp.clip(acc, -clip, clip)
    return acc, raw, bit

  def train_step(state, batch, key, loss_weights=None):
    """batch: dict of (U, B, ...) arrays, U = update_epochs micro-batches."""
    num_micro = batch["label"].shape[0]
    keys = jax.random.split(key, num_micro)
    flat_params, unravel = ravel_pytree(state.params)  # (P,)
    zeros = jnp.zeros_like(flat_params)
    start = (zeros, zeros, jnp.zeros(flat_params.shape, bool))
    flat_grad = lambda g: ravel_pytree(g)[0]
    if accumulate_mode == "vmap":
      # All micro-batch gradients at once (same parameters, as in the reference), then the
      # sequential clipped accumulation, which is cheap.
      (_, terms), grads = jax.vmap(grad_fn, in_axes=(None, 0, 0, None))(
          state.params, batch, keys, loss_weights)
      grads = jax.vmap(flat_grad)(grads)  # (U, P)
      carry, _ = jax.lax.scan(lambda c, g: (add_and_clip(c, g), None), start, grads)
    else:
      def body(c, xs):
        micro, k = xs
        (_, t), g = grad_fn(state.params, micro, k, loss_weights)
        return add_and_clip(c, flat_grad(g)), t
      carry, terms = jax.lax.scan(body, start, (batch, keys))
    grad_sum, raw_sum, clipped = carry
    updates, opt_state = tx.update(grad_sum, state.opt_state, flat_params)
    params = jax.tree.map(jnp.add, state.params, unravel(updates))
    metrics = jax.tree.map(lambda t: jnp.mean(t, axis=0), terms)
    metrics.update(step_statistics(raw_sum=raw_sum, clipped=clipped, updates=updates,
                                   new_params=flat_params + updates))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def step_statistics(*, raw_sum, clipped, updates, new_params):
  """What to look at first when training misbehaves, per optimizer step (all (P,) vectors):

    l2_grads: norm of the step's summed micro-batch gradients before clipping;
    clipped_fraction: fraction of parameters whose running sum hit the +-clip bound at least
      once during the step (0 with clipping off);
    l2_updates: norm of Adam's update; l2_params: norm of the parameters after it.
  """
  norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v)))
  return {"l2_grads": norm(raw_sum), "clipped_fraction": jnp.mean(clipped.astype(jnp.float32)),
          "l2_updates": norm(updates), "l2_params": norm(new_params)}


def gather(data, index):
  """Rows `index` (any shape) of every array in `data`: (N, ...) -> (*index.shape, ...)."""
  return jax.tree.map(lambda a: jnp.take(a, index, axis=0), data)


def make_run_chunk(train_step, mesh=None, *, seed_compute="auto"):
  """Jitted: scan `train_step` over K steps for all seeds in one program (`seed_compute`:
  "vmap" all at once, "scan" one after another, "auto" as `auto.seed_compute`).

  Arguments of the returned function (S seeds, K steps, U micro-batches, B batch size):
    states: stacked TrainState (leading axis S); donated.
    active: (S,) bool, False for seeds that early-stopped.
    data: dict of training arrays (N, ...), shared by the seeds (replicated over the mesh).
    index: (S, K, U, B) int32 rows of `data` for every micro-batch.
    valid: (K,) bool, False for padding steps past the end of the epoch.
    dropout_keys: (S,) keys; step t of a seed uses fold_in(key, t), so resuming is exact.
    loss_weights: {name: (S,) float32}, each run's Eq. 14 weights (`objective.LOSS_WEIGHTS`;
      `train.run_loss_weights` gives the config's). The leading axis may hold runs (a sweep's
      value x seed), each with its own weights as it has its own dropout keys. They are an
      input, not part of the TrainState, so checkpoints keep their structure, and a plain run
      and a sweep of one config are the same program.
  Returns (states, metrics) with metrics leaves of shape (S, K).
  With a `mesh`, each step's micro-batches (U, B, ...) are split over devices along B.
  """

  def run_one_seed(state, active, data, index, valid, dropout_key, weights):
    def body(state, xs):
      step_index, ok = xs
      key = jax.random.fold_in(dropout_key, state.step)
      batch = parallel.constrain_batch(gather(data, step_index), mesh, batch_axis=1)
      new_state, metrics = train_step(state, batch, key, weights)
      keep = jnp.logical_and(ok, active)
      new_state = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_state, state)
      return new_state, metrics
    return jax.lax.scan(body, state, (index, valid))

  # Outputs replicated over the mesh, the layout the caller gives the inputs: a chunk's output
  # state is the next chunk's input, and any change of sharding would recompile the step.
  out_shardings = None if mesh is None else parallel.replicated(mesh)
  return jax.jit(over_seeds(run_one_seed, auto.seed_compute(seed_compute),
                            in_axes=(0, 0, None, 0, None, 0, 0)), donate_argnums=0,
                 out_shardings=out_shardings)


@functools.partial(jax.jit, static_argnames=("num_samples", "batch_size", "num_steps",
                                             "micro_per_step"))
def epoch_index(order_keys, epoch, *, num_samples, batch_size, num_steps, micro_per_step):
  """(S, num_steps, U, B) sample indices of one epoch: a fresh permutation per seed and epoch.

  Leftover samples (fewer than one step's worth) are skipped this epoch, like the reference's
  leftover micro-batches; each epoch reshuffles, so no sample is left out for good.
  """
  used = num_steps * micro_per_step * batch_size

  def one(key):
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_samples)
    return perm[:used].reshape(num_steps, micro_per_step, batch_size).astype(jnp.int32)

  return jax.vmap(one)(order_keys)


def make_predict(model, *, batch_size, mesh=None, seed_compute="auto"):
  """`predict(stacked_params, data) -> (S, N, O)` deterministic predictions of every seed (the
  seeds computed as `seed_compute` says, see `make_run_chunk`).

  One jitted batch function serves every split (its shapes do not depend on N, so valid, test
  and any other split share one compilation); a short host loop walks the batches, padding the
  last one with real rows whose outputs are dropped.
  """

  mode = auto.seed_compute(seed_compute)

  @jax.jit
  def predict_batch(params, batch):
    batch = parallel.constrain_batch(batch, mesh, batch_axis=0)
    apply = lambda p: model.apply({"params": p}, batch, deterministic=True)["prediction"]
    return over_seeds(apply, mode, in_axes=(0,))(params)  # (S, batch_size, O)

  def predict(params, data):
    return map_in_batches(lambda batch: predict_batch(params, batch), data, batch_size, axis=1,
                          take=lambda d, rows: gather(d, jnp.asarray(rows)))

  return predict


def map_in_batches(fn, arrays, batch_size, *, axis=0, take=None):
  """`fn` over every sample of `arrays` ({name: (N, ...)}) in batches of exactly `batch_size`.

  The last batch is padded with real rows (wrapping around to the first), so one compilation
  of a jitted `fn` serves every batch and every split; the padded rows' outputs are dropped. The
  outputs (a pytree of arrays whose sample axis is `axis`) are concatenated along that axis and
  cut to N. `take(arrays, rows)` selects a batch (default: NumPy indexing of every entry).
  """
  num = next(iter(arrays.values())).shape[0]
  take = take or (lambda a, rows: {k: np.asarray(v)[rows] for k, v in a.items()})
  outputs = [fn(take(arrays, np.arange(start, start + batch_size) % num))
             for start in range(0, num, batch_size)]

  first_n = (slice(None),) * axis + (slice(0, num),)
  join = lambda *parts: (np if isinstance(parts[0], np.ndarray) else jnp).concatenate(
      parts, axis=axis)[first_n]  # host arrays stay on the host
  return jax.tree.map(join, *outputs)


@jax.jit
def select_best(best_params, params, improved):
  """Per seed: keep `params` where `improved` (S,) else the old best."""
  def pick(b, p):
    mask = improved.reshape((-1,) + (1,) * (p.ndim - 1))
    return jnp.where(mask, p, b)
  return jax.tree.map(pick, best_params, params)
