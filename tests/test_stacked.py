"""The stacked transformers (one vmapped, scanned computation per kind) against the per-branch
model they replace, the stack's two schedules ("vmap", "loop") against each other, with and
without dropout, and the parameter-layout converter that carries old checkpoints over.

`fixtures/legacy_dhmd_v1.npz` holds a tiny DHMD in the per-branch layout v1 (every transformer
its own module, the code that reproduced the reference DMD output for output) with its inputs,
outputs, loss terms and gradients, written by `fixtures/make_legacy_dhmd.py` at commit 56083f1.
The current model, given the same parameters through `layout.convert_v1_params`, must give the
same numbers: unequal sequence lengths (T' = 7, 6, 6: padded into one stack), padded frames,
with and without key-padding masks, the MulT baseline and DM off (the reference DMD model).
"""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import test_model
from configs import ablations
from dhmd_jax import objective
from dhmd_jax.models import build_model
from dhmd_jax.models import layout
from dhmd_jax.models import transformer
from dhmd_jax.models.transformer import TransformerStack
from dhmd_jax.models.transformer import plan_groups
from dhmd_jax.models.transformer import query_blocks

FIXTURE = pathlib.Path(__file__).with_name("fixtures") / "legacy_dhmd_v1.npz"
CASES = {"full": ("full", False), "full_kpm": ("full", True), "mult": ("mult", False),
         "no_dm": ("no_dm", False)}


def _load_fixture():
  z = np.load(FIXTURE)
  index = json.loads(str(z["index"]))
  out = {}
  for key, (dtype, shape, offset) in index.items():
    store = z["bools"] if dtype == "|b1" else z["floats"]
    size = int(np.prod(shape))
    out[key] = store[offset:offset + size].reshape(shape).astype(np.dtype(dtype))
  return out


def _nest(flat, prefix):
  tree = {}
  for key, value in flat.items():
    if not key.startswith(prefix + "/"):
      continue
    *path, leaf = key[len(prefix) + 1:].split("/")
    node = tree
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _case(name):
  variant, kpm = CASES[name]
  config = ablations.apply_variant(test_model.tiny_config(key_padding_mask=kpm), variant)
  config.model.num_layers = 2
  config.model.d_model = 4
  return config


@pytest.fixture(scope="module")
def legacy():
  return _load_fixture()


@pytest.mark.parametrize("compute", ["vmap", "loop"])
@pytest.mark.parametrize("name", list(CASES))
def test_converted_v1_parameters_reproduce_every_output_term_and_gradient(legacy, name, compute):
  config = _case(name)
  config.model.stack_compute = compute
  model = build_model(config, num_outputs=1)
  batch = _nest(legacy, f"{name}/batch")
  params_v1 = _nest(legacy, f"{name}/params")
  assert layout.is_v1(params_v1)
  params = layout.convert_v1_params(params_v1)
  assert not layout.is_v1(params)
  # Same tree as the model's own init: the converter produces the current layout exactly.
  shapes, _ = test_model.abstract_init(model, batch)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, shapes)

  def loss(p):
    out = model.apply({"params": p}, batch, deterministic=True)
    total, terms = objective.compute_objective(config, out, jnp.asarray(batch["label"]))
    return total, (out, terms)

  (_, (outputs, terms)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  want_out = _nest(legacy, f"{name}/outputs")
  flat_out = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
              for path, v in jax.tree_util.tree_flatten_with_path(outputs)[0]}
  assert set(flat_out) == set(_flat_keys(want_out))
  for key, value in flat_out.items():
    np.testing.assert_allclose(value, _get(want_out, key), rtol=2e-5, atol=2e-6, err_msg=key)
  want_terms = _nest(legacy, f"{name}/terms")
  # Every loss term the per-branch code had, plus the triplet counts added since (not losses).
  assert set(want_terms) <= set(terms)
  assert all(k.startswith(("triplets/", "triplets_active/")) for k in set(terms) - set(want_terms))
  for key, value in terms.items():
    if key not in want_terms:
      continue
    np.testing.assert_allclose(value, want_terms[key], rtol=2e-5, atol=2e-6, err_msg=key)
  if name.startswith("full"):
    want_grads = layout.convert_v1_params(_nest(legacy, f"{name}/grads"))
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    # The flat-vector form (Adam's moments in a checkpoint) goes through the same mapping.
    flat_v1 = ravel_pytree(_nest(legacy, f"{name}/grads"))[0]
    np.testing.assert_array_equal(layout.convert_v1_vector(flat_v1, params_v1),
                                  ravel_pytree(want_grads)[0])


def _flat_keys(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat_keys(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}"


def _get(tree, key):
  for k in key.split("/"):
    tree = tree[k]
  return tree


def test_converter_refuses_a_current_tree_and_keeps_seed_axes(legacy):
  params_v1 = _nest(legacy, "full/params")
  with pytest.raises(ValueError, match="not in the per-branch layout"):
    layout.convert_v1_params(layout.convert_v1_params(params_v1))
  seeds = jax.tree.map(lambda a: np.stack([a, 2 * a]), params_v1)  # (S=2, ...)
  stacked = layout.convert_v1_params(seeds, batch_dims=1)
  one = layout.convert_v1_params(params_v1)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], stacked),
                              jax.tree.map(lambda a: 2 * a, one))


# ---------------------------------------------------------------- the stack against its branches


def _branch_params(stack_params, g):
  return jax.tree.map(lambda a: a[g:g + 1], stack_params)


@pytest.mark.parametrize("compute", ["vmap", "grouped"])
@pytest.mark.parametrize("cross,causal,key_padding", [
    (False, True, False), (True, True, False), (True, False, True), (True, True, True)])
def test_stack_equals_each_branch_alone(cross, causal, key_padding, compute):
  """G branches of unequal lengths in one vmapped stack (padded, grouped; layers scanned in
  "vmap", unrolled in "grouped") = each branch computed alone ("loop", a stack of one), outputs
  and gradients; with query blocks, so blocks over padded branches are covered too."""
  xs, srcs, masks = _unequal_branches(cross, key_padding)
  t_q = [x.shape[1] for x in xs]
  t_k = [s.shape[1] for s in srcs] if cross else t_q  # branch 3 is far shorter/longer: own group
  stack = TransformerStack(num_heads=2, num_layers=2, causal_mask=causal, query_block=3,
                           compute=compute)
  loop = stack.clone(compute="loop")
  shapes = jax.eval_shape(
      lambda: stack.init(jax.random.key(0), xs, srcs, key_masks=masks, deterministic=True))
  params = test_model.random_params(shapes["params"], seed=4)
  assert plan_groups(list(zip(t_q, t_k))) == [[0, 1, 2], [3]]

  def loss(p, fn):
    outs = fn(p)
    return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs)), outs

  together = lambda p: stack.apply({"params": p}, xs, srcs, key_masks=masks, deterministic=True)

  def alone(p):
    return [loop.apply({"params": _branch_params(p, g)}, xs[g],
                        None if srcs is None else srcs[g],
                        key_masks=None if masks is None else masks[g], deterministic=True)
            for g in range(len(xs))]

  # Compiled, not op by op: the same numbers, and one compilation instead of hundreds.
  value_and_grad = lambda fn: jax.jit(jax.value_and_grad(lambda p: loss(p, fn), has_aux=True))
  (_, out_a), grad_a = value_and_grad(together)(params)
  (_, out_b), grad_b = value_and_grad(alone)(params)
  for a, b, t in zip(out_a, out_b, t_q):
    assert a.shape == (2, t, 8)
    np.testing.assert_allclose(a, b, atol=2e-5)
  chex.assert_trees_all_close(grad_a, grad_b, atol=2e-4)


def _unequal_branches(cross, key_padding, seed=0):
  """Four branches of unequal lengths: three padded into one "vmap" group, one on its own."""
  rng = np.random.default_rng(seed)
  t_q, t_k = (9, 8, 9, 3), (8, 8, 9, 30)
  xs = [rng.normal(size=(2, t, 8)).astype(np.float32) for t in t_q]
  srcs = [rng.normal(size=(2, t, 8)).astype(np.float32) for t in t_k] if cross else None
  masks = None
  if key_padding:
    masks = [np.arange(t)[None, :] < np.array([[t], [t - 2]]) for t in (t_k if cross else t_q)]
  return xs, srcs, masks


@pytest.mark.parametrize("cross,key_padding,remat,record", [
    (False, False, False, True), (True, True, True, False), (True, False, False, True)])
def test_schedules_agree_with_dropout(cross, key_padding, remat, record):
  """Training mode: "loop", "vmap" and "grouped" draw the same dropout masks (every site:
  embedding, attention weights per branch rate, relu, residual), so outputs, gradients and
  recorded attention maps agree as in deterministic mode; unequal lengths (padding, two groups),
  query blocks."""
  xs, srcs, masks = _unequal_branches(cross, key_padding)
  stack = TransformerStack(num_heads=2, num_layers=2, query_block=3, remat=remat,
                           attn_dropout=(0.3, 0.5, 0.0, 0.2), embed_dropout=0.1,
                           relu_dropout=0.2, res_dropout=0.1)
  shapes = jax.eval_shape(
      lambda: stack.init(jax.random.key(0), xs, srcs, key_masks=masks, deterministic=True))
  params = test_model.random_params(shapes["params"], seed=7)

  def run(compute, deterministic=False, key=3):
    def loss(p):
      outs = stack.clone(compute=compute).apply(
          {"params": p}, xs, srcs, key_masks=masks, deterministic=deterministic,
          rngs={"dropout": jax.random.key(key)}, mutable=["intermediates"] if record else False)
      outs, maps = outs if record else (outs, None)
      return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs)), (outs, maps)

    (_, (outs, maps)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return outs, maps, grads

  out_l, maps_l, grad_l = run("loop")
  for compute in ("grouped", "vmap"):
    out_v, maps_v, grad_v = run(compute)
    for a, b in zip(out_v, out_l):
      np.testing.assert_allclose(a, b, atol=2e-5, err_msg=compute)
    chex.assert_trees_all_close(grad_v, grad_l, atol=2e-4)
    if record:
      chex.assert_trees_all_close(maps_v, maps_l, atol=2e-5)
  # Dropout is on (else the check above would hold trivially), and its masks follow the key.
  det = run("vmap", deterministic=True)[0]
  other = run("vmap", key=4)[0]
  for g in range(len(xs)):
    assert not np.allclose(out_v[g], det[g], atol=1e-3)
    assert not np.allclose(out_v[g], other[g], atol=1e-3)


def test_dropout_masks_do_not_depend_on_the_query_block():
  """Query blocks change where attention is cut, not which units dropout drops: training-mode
  outputs with blocks of 3 and 4 rows and with one block are the same."""
  xs, srcs, _ = _unequal_branches(True, False, seed=1)
  stack = TransformerStack(num_heads=2, num_layers=2, attn_dropout=0.5)
  shapes = jax.eval_shape(lambda: stack.init(jax.random.key(0), xs, srcs, deterministic=True))
  params = test_model.random_params(shapes["params"], seed=8)
  outs = [jax.jit(lambda p, block=block: stack.clone(query_block=block).apply(
              {"params": p}, xs, srcs, deterministic=False,
              rngs={"dropout": jax.random.key(5)}))(params) for block in (0, 3, 4)]
  for out in outs[1:]:
    for a, b in zip(out, outs[0]):
      np.testing.assert_allclose(a, b, atol=2e-5)


def test_keep_masks_depend_on_coordinates_not_shapes():
  """The same key draws the same mask on the elements two shapes share, rows counted from
  `first_row` (a query block), and keeps units at the quantised rate."""
  key = jax.random.key(0)
  mask, keep = transformer._keep_mask(key, 0.6, (2, 3, 9, 11))
  padded, _ = transformer._keep_mask(key, 0.6, (2, 3, 12, 16))
  np.testing.assert_array_equal(padded[:, :, :9, :11], mask)
  rows, _ = transformer._keep_mask(key, 0.6, (2, 3, 4, 11), first_row=5)
  np.testing.assert_array_equal(rows, mask[:, :, 5:])
  assert keep == pytest.approx(39322 / 65536)
  big, _ = transformer._keep_mask(key, 0.6, (64, 200, 60))
  assert abs(float(np.mean(big)) - keep) < 0.005  # 768,000 draws: about 9 standard deviations
  other, _ = transformer._keep_mask(jax.random.key(1), 0.6, (2, 3, 9, 11))
  assert not np.array_equal(other, mask)


@pytest.mark.parametrize("compute", ["vmap", "grouped", "loop"])
def test_bad_stack_inputs_fail_with_a_message(compute):
  """One copy of each input check, ahead of either schedule."""
  x, y = jnp.ones((2, 5, 8)), jnp.ones((2, 4, 6))
  init = lambda stack, *args, **kwargs: stack.init(jax.random.key(0), *args, deterministic=True,
                                                   **kwargs)
  stack = TransformerStack(num_heads=3, num_layers=1, compute=compute)
  with pytest.raises(ValueError, match="embedding width 8 is not divisible by num_heads=3"):
    init(stack, [x])
  stack = stack.clone(num_heads=2)
  with pytest.raises(ValueError, match="needs width 8; got 8 and 6"):
    init(stack, [x], [y])
  with pytest.raises(ValueError, match=r"key_mask has shape \(2, 4\); expected"):
    init(stack, [x, x], key_masks=[jnp.ones((2, 5), bool), jnp.ones((2, 4), bool)])
  with pytest.raises(ValueError, match="3 attention dropout rates for 2 branches"):
    init(stack.clone(attn_dropout=(0.1, 0.2, 0.3)), [x, x])
  with pytest.raises(ValueError,
                     match="compute must be one of vmap, grouped, loop, got 'scan'"):
    init(stack.clone(compute="scan"), [x])


@pytest.mark.parametrize("compute", ["vmap", "grouped", "loop"])
def test_remat_gives_the_same_gradients(compute):
  rng = np.random.default_rng(1)
  xs = [rng.normal(size=(2, 6, 8)).astype(np.float32) for _ in range(3)]
  grads = []
  for remat in (False, True):
    stack = TransformerStack(num_heads=2, num_layers=2, remat=remat, compute=compute)
    shapes = jax.eval_shape(lambda: stack.init(jax.random.key(0), xs, deterministic=True))
    params = test_model.random_params(shapes["params"], seed=5)
    loss = lambda p: sum(jnp.sum(o ** 2) for o in stack.apply({"params": p}, xs,
                                                               deterministic=True))
    grads.append(jax.grad(loss)(params))
  chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize("compute", ["vmap", "grouped", "loop"])
def test_dropout_rates_are_per_branch(compute):
  """Branch 0 has attention dropout 0 and must be deterministic; branch 1 (0.5) must not."""
  rng = np.random.default_rng(2)
  xs = [rng.normal(size=(2, 6, 8)).astype(np.float32) for _ in range(2)]
  stack = TransformerStack(num_heads=2, num_layers=1, attn_dropout=(0.0, 0.5), compute=compute)
  shapes = jax.eval_shape(lambda: stack.init(jax.random.key(0), xs, deterministic=True))
  params = test_model.random_params(shapes["params"], seed=6)
  det = stack.apply({"params": params}, xs, deterministic=True)
  run = lambda k: stack.apply({"params": params}, xs, deterministic=False,
                              rngs={"dropout": jax.random.key(k)})
  a, b = run(1), run(2)
  np.testing.assert_allclose(a[0], det[0], atol=1e-6)
  np.testing.assert_allclose(b[0], det[0], atol=1e-6)
  assert not np.allclose(a[1], b[1], atol=1e-3)


def test_query_blocks_of_padded_branches_reach_every_real_horizon():
  lengths = [(7, 9), (9, 9), (5, 12)]
  blocks = query_blocks(9, 12, True, 3, lengths)
  for tq, tk in lengths:
    for q0, q1, k_end in blocks:
      for i in range(q0, min(q1, tq)):  # every real row of every branch sees all it may see
        assert k_end >= min(tk, i + abs(tk - tq) + 1)
