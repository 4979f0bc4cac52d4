"""Tests of the Flax model: shapes, masks, positional embedding, GD / DM, ablations, gradients.

Compilation dominates on a CPU (random-number code especially), so most tests get parameter
SHAPES from `jax.eval_shape(model.init_with_output)` (which traces the same code as `init`), fill
them with NumPy random numbers and run un-jitted; only the gradient and jit tests compile the
model. The initialisers are checked on real inits of small parts (a transformer, a Linear, the
dictionary, the decoupling); masks, positional embedding, GD-Unit and dictionary matching are
checked against brute-force NumPy versions of the reference definitions.
"""

import functools
import importlib.util
import math
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhmd_jax.models import build_model
from dhmd_jax.models import edges_to_matrix
from dhmd_jax.models.decoupling import FeatureDecoupling
from dhmd_jax.models.decoupling import conv_frame_mask
from dhmd_jax.models.dictionary import DictionaryMatching
from dhmd_jax.names import EDGES
from dhmd_jax.models.gd_unit import GDUnit
from dhmd_jax.models.heads import torch_linear
from dhmd_jax.models import transformer
from dhmd_jax.models.transformer import TransformerStack
from dhmd_jax.models.transformer import future_mask
from dhmd_jax.models.transformer import query_blocks
from dhmd_jax.models.transformer import positional_embedding

_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _load_config_module(name):
  spec = importlib.util.spec_from_file_location(f"_test_configs_{name}", _CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


default = _load_config_module("default")
ablations = _load_config_module("ablations")

from dhmd_jax.names import MODALITIES
from dhmd_jax.names import MODALITY_KEYS


# ---------------------------------------------------------------- helpers


def tiny_config(**model_overrides):
  """A full config with a tiny model: d 8, 2 heads, 1 layer (memory transformers still 3)."""
  config = default.get_config()
  m = config.model
  m.d_model, m.num_heads, m.num_layers = 8, 2, 1
  m.conv_kernel.text, m.conv_kernel.vision, m.conv_kernel.audio = 3, 2, 1
  m.attn_dropout, m.attn_dropout_a, m.attn_dropout_v = 0.2, 0.1, 0.1
  # 0 as in the MOSEI config: every dropout site compiles its own RNG code (slow on a CPU);
  # the transformer's embed/relu/res dropouts are tested on the transformer alone.
  m.embed_dropout, m.relu_dropout, m.res_dropout = 0.0, 0.0, 0.0
  config.gd.homo_hidden, config.gd.hetero_hidden = 4, 4
  config.dm.num_elements = 16
  for key, value in model_overrides.items():
    setattr(m, key, value)
  return config


def make_batch(lengths, dims, batch_size=2, seed=0, real_lengths=None):
  """Random (B, T, D) features per modality; frames past real_lengths[m][b] are zero padding."""
  rng = np.random.default_rng(seed)
  batch = {"label": np.zeros((batch_size,), np.float32)}  # an extra key the model must ignore
  for m, t, dim in zip(MODALITIES, lengths, dims):
    x = rng.normal(size=(batch_size, t, dim)).astype(np.float32)
    mask = np.ones((batch_size, t), bool)
    if real_lengths is not None:
      for b, n in enumerate(real_lengths[m]):
        mask[b, n:] = False
      x[~mask] = 0.0
    batch[m], batch[f"{m}_mask"] = x, mask
  return batch


def abstract_init(model, batch):
  """(param shapes, output shapes) from tracing `init_with_output`; nothing is computed."""
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  out, variables = jax.eval_shape(
      lambda b: model.init_with_output(keys, b, deterministic=False), batch)
  return variables["params"], out


def random_params(shapes, seed=0):
  """NumPy-random parameters with the given shapes (kernels ~ U(+-1/sqrt(fan_in)))."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "scale":
      return jnp.ones(s.shape, s.dtype)
    if len(s.shape) >= 2:
      bound = 1.0 / math.sqrt(math.prod(s.shape[:-1]))
      return jnp.asarray(rng.uniform(-bound, bound, s.shape), s.dtype)
    return jnp.asarray(rng.uniform(-0.1, 0.1, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# Every tiny test uses these shapes (T' = 6 for all three: the kernels are 3, 2, 1), so the
# un-jitted runs share their compiled primitives. Unequal lengths are covered by the shape tests.
TINY_LENGTHS, TINY_DIMS = (8, 7, 6), (16, 5, 3)


@functools.lru_cache(maxsize=None)
def tiny_setup(variant="full", key_padding_mask=False):
  """(config, model, batch, params, forward) for a tiny model; cached so that jax.jit(forward)
  compiles once per setup. forward(params, batch, key) runs with dropout, key None without."""
  config = ablations.apply_variant(tiny_config(key_padding_mask=key_padding_mask), variant)
  model = build_model(config, num_outputs=1)
  batch = make_batch(TINY_LENGTHS, TINY_DIMS, real_lengths={
      "text": (8, 5), "vision": (7, 4), "audio": (6, 3)})
  shapes, _ = abstract_init(model, batch)

  def forward(params, batch, key=None):
    if key is None:
      return model.apply({"params": params}, batch, deterministic=True)
    return model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": key})

  return config, model, batch, random_params(shapes), forward


def expected_keys(config):
  m = config.model
  keys = {"prediction", "proj", "logits_hetero", "repr_hetero"}
  spaces = ["hetero"]
  if m.arch == "dhmd":
    spaces.append("homo")
    keys |= {"logits_homo", "repr_homo"}
    if m.homo_self_attention:
      keys.add("logits_c")
    if m.use_fd:
      keys |= {"shared", "private", "recon", "private_regressed", "margin_features"}
  for space in spaces:
    if m.use_gd:
      keys |= {f"gd_{space}_edges", f"gd_{space}_edge_logits"}
    if m.use_dm:
      keys |= {f"dm_{space}_weights", f"dm_{space}_recon"}
  return keys


# ---------------------------------------------------------------- output shapes

SHAPE_CASES = {
    # name: (feature dims (L, V, A), input lengths (L, V, A), d, heads, kernels (L, V, A))
    "mosi_aligned": ((768, 20, 5), (50, 50, 50), 50, 10, (5, 5, 5)),
    "mosi_unaligned": ((768, 20, 5), (50, 500, 375), 50, 10, (5, 5, 5)),
    "mosei_aligned": ((768, 35, 74), (50, 50, 50), 30, 6, (5, 3, 1)),
    "mosei_unaligned": ((768, 35, 74), (50, 500, 500), 30, 6, (5, 3, 1)),
}


def _check_shapes(out, config, lengths, kernels, batch_size, num_outputs):
  d = config.model.d_model
  t_l, t_v, t_a = (t - k + 1 for t, k in zip(lengths, kernels))
  dims = chex.Dimensions(B=batch_size, O=num_outputs, D=d, H=2 * d, F=3 * d, M=3, E=6,
                         K=config.dm.num_elements, L=t_l, V=t_v, A=t_a)
  assert set(out) == expected_keys(config)
  chex.assert_shape(out["prediction"], dims["BO"])
  chex.assert_shape([out["logits_homo"], out["logits_hetero"]], dims["MBO"])
  chex.assert_shape(out["repr_homo"], dims["MBD"])
  chex.assert_shape(out["repr_hetero"], dims["MBH"])
  chex.assert_shape(out["logits_c"], dims["BO"])
  for key in ("proj", "shared", "private", "recon", "private_regressed"):
    chex.assert_shape(out[key], (dims["BLD"], dims["BVD"], dims["BAD"]))
  chex.assert_shape(out["margin_features"], dims["BMD"])
  for space in ("homo", "hetero"):
    chex.assert_shape([out[f"gd_{space}_edges"], out[f"gd_{space}_edge_logits"]], dims["BE"])
    chex.assert_shape(out[f"dm_{space}_weights"], dims["BMK"])
  chex.assert_shape(out["dm_homo_recon"], dims["BMD"])
  chex.assert_shape(out["dm_hetero_recon"], dims["BMH"])


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_output_shapes(case):
  feature_dims, lengths, d, heads, kernels = SHAPE_CASES[case]
  config = default.get_config()
  m = config.model
  m.d_model, m.num_heads, m.num_layers = d, heads, 1
  m.conv_kernel.text, m.conv_kernel.vision, m.conv_kernel.audio = kernels
  num_outputs = 2 if case == "mosi_aligned" else 1  # also cover the binary head
  model = build_model(config, num_outputs=num_outputs)
  batch = {m_: jax.ShapeDtypeStruct((2, t, dim), jnp.float32)
           for m_, t, dim in zip(MODALITIES, lengths, feature_dims)}
  _, out = abstract_init(model, batch)
  _check_shapes(out, config, lengths, kernels, 2, num_outputs)


def test_real_mosei_config():
  """The default (MOSEI, DMD-code) config at full size: 4 layers, d 30, K 512, aligned 50.

  Traced abstractly (compiling it costs ~10 s on a CPU); the tiny tests below run the numbers.
  """
  config = default.get_config()
  model = build_model(config, num_outputs=1)
  batch = make_batch((50, 50, 50), (768, 35, 74))
  shapes, out = abstract_init(model, batch)
  kernels = (config.model.conv_kernel.text, config.model.conv_kernel.vision,
             config.model.conv_kernel.audio)
  _check_shapes(out, config, (50, 50, 50), kernels, 2, 1)
  # Three stacks: (branches, layers, ...) on every transformer parameter.
  chex.assert_shape(shapes["self_attentions_c"]["in_proj_kernel"], (3, 4, 30, 90))
  chex.assert_shape(shapes["cross_transformers"]["fc1_kernel"], (6, 4, 30, 120))
  chex.assert_shape(shapes["memory_transformers"]["out_proj_kernel"], (3, 4, 60, 60))
  chex.assert_shape(shapes["memory_transformers"]["layer_norm_scale"], (3, 60))
  chex.assert_shape(shapes["homo_head_l"]["proj1"]["kernel"], (46 * 30, 30))


@pytest.mark.parametrize("seed_compute,recomputed", [("vmap", True), ("scan", False)])
def test_the_layers_recompute_as_model_remat_auto_resolves(seed_compute, recomputed):
  """remat="auto" reaches the transformers resolved: the gradient's program recomputes the
  layers (a `checkpoint`/`remat` primitive) with vmapped seeds only. Traced, not compiled."""
  config = tiny_config(remat="auto")
  config.train.seeds, config.train.seed_compute = (1, 2), seed_compute
  model = build_model(config, num_outputs=1)
  batch = make_batch(TINY_LENGTHS, TINY_DIMS)
  params = random_params(abstract_init(model, batch)[0])
  loss = lambda p: model.apply({"params": p}, batch, deterministic=True)["logits_c"].sum()
  program = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert (" checkpoint[" in program or " remat" in program) is recomputed


# ---------------------------------------------------------------- determinism, dropout, jit


def test_deterministic_needs_no_rng_and_is_repeatable():
  _, model, batch, params, _ = tiny_setup()
  out1 = model.apply({"params": params}, batch, deterministic=True)  # no rngs at all
  out2 = model.apply({"params": params}, batch, deterministic=True)
  chex.assert_trees_all_equal(out1, out2)
  chex.assert_tree_all_finite(out1)


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True)  # the compiled forward against the op-by-op one
  def test_jit_matches_eager(self):
    _, _, batch, params, forward = tiny_setup()
    with jax.disable_jit():
      expected = forward(params, batch)  # eager
    got = self.variant(forward)(params, batch)
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5)


def test_gradients_with_dropout_finite_and_reach_every_parameter():
  """One compiled training-mode value-and-grad: finite gradients that reach every parameter,
  and dropout masks that follow the key."""
  _, _, batch, params, forward = tiny_setup()
  out_shapes = jax.eval_shape(forward, params, batch)
  rng = np.random.default_rng(1)
  weights = [jnp.asarray(rng.normal(size=s.shape), jnp.float32)
             for s in jax.tree.leaves(out_shapes)]

  def scalar(p, key):  # a random weighting of every output, so no softmax sum cancels out
    out = forward(p, batch, key)
    return sum(jnp.sum(w * o) for w, o in zip(weights, jax.tree.leaves(out))), out

  grad_fn = jax.jit(jax.grad(scalar, has_aux=True))
  grads, out0 = grad_fn(params, jax.random.key(0))
  chex.assert_tree_all_finite((grads, out0))
  dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g))]
  assert not dead, f"parameters with an all-zero gradient: {dead}"

  _, out1 = grad_fn(params, jax.random.key(1))
  _, out0_again = grad_fn(params, jax.random.key(0))
  chex.assert_trees_all_equal(out0["prediction"], out0_again["prediction"])
  assert not np.allclose(out0["prediction"], out1["prediction"]), "dropout ignores the key"
  assert not np.allclose(out0["prediction"], forward(params, batch)["prediction"])


# ---------------------------------------------------------------- GD-Unit and DM outputs


def test_gd_and_dm_weights_are_distributions():
  _, _, batch, params, forward = tiny_setup()
  out = forward(params, batch)
  for key in ("gd_homo_edges", "gd_hetero_edges", "dm_homo_weights", "dm_hetero_weights"):
    assert np.all(np.asarray(out[key]) >= 0), key
    np.testing.assert_allclose(np.sum(out[key], axis=-1), 1.0, rtol=1e-5, err_msg=key)
  for space in ("homo", "hetero"):
    np.testing.assert_allclose(
        out[f"gd_{space}_edges"], jax.nn.softmax(out[f"gd_{space}_edge_logits"] / 8.0, axis=-1),
        rtol=1e-5)


def test_edges_to_matrix_layout():
  w = jnp.arange(1.0, 7.0)  # edges V->L, A->L, L->V, A->V, L->A, V->A
  expected = np.array([[0, 3, 5],  # teacher L: L->V (2), L->A (4)
                       [1, 0, 6],  # teacher V: V->L (0), V->A (5)
                       [2, 4, 0]])  # teacher A: A->L (1), A->V (3)
  np.testing.assert_array_equal(edges_to_matrix(w), expected)
  batched = edges_to_matrix(jnp.stack([w, 2 * w]))  # leading dims are kept
  chex.assert_shape(batched, (2, 3, 3))
  np.testing.assert_array_equal(batched[1], 2 * expected)
  for k, (student, teacher) in enumerate(EDGES):
    assert expected[teacher, student] == k + 1


@pytest.mark.parametrize("edge_input", ["embedded", "raw"])
def test_gd_unit_matches_formula(edge_input):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4, 2)).astype(np.float32)  # (3, B, O)
  reprs = rng.normal(size=(3, 4, 5)).astype(np.float32)  # (3, B, H)
  unit = GDUnit(hidden=3, edge_input=edge_input, temperature=8.0)
  params = random_params(jax.eval_shape(unit.init, jax.random.key(0), logits, reprs)["params"])
  w, e = unit.apply({"params": params}, logits, reprs)
  p = jax.tree.map(np.asarray, params)

  def dense(name, x):
    return x @ p[name]["kernel"] + p[name]["bias"]

  if edge_input == "embedded":  # code: z = [W_logit y, W_repr r]; e = W_edge [z_j, z_i]
    z = np.concatenate([dense("W_logit", logits), dense("W_repr", reprs)], -1)
    chex.assert_shape(p["W_edge"]["kernel"], (4 * 3, 1))
    e_np = [dense("W_edge", np.concatenate([z[j], z[i]], -1))[:, 0] for j, i in EDGES]
  else:  # paper Eq. 8: g([[f(X_i), X_i], [f(X_j), X_j]]), teacher i first
    x = np.concatenate([logits, reprs], -1)
    chex.assert_shape(p["W_edge"]["kernel"], (2 * (2 + 5), 1))
    e_np = [dense("W_edge", np.concatenate([x[i], x[j]], -1))[:, 0] for j, i in EDGES]
  e_np = np.stack(e_np, axis=1)  # (B, 6)
  np.testing.assert_allclose(e, e_np, rtol=1e-5, atol=1e-6)
  w_np = np.exp(e_np / 8.0) / np.exp(e_np / 8.0).sum(1, keepdims=True)
  np.testing.assert_allclose(w, w_np, rtol=1e-5)
  # The biases shift all six scores equally: exactly zero gradient through the weights.
  probe = np.random.default_rng(1).normal(size=w.shape)
  grads = jax.grad(lambda q: jnp.sum(unit.apply({"params": q}, logits, reprs)[0] * probe))(params)
  for name, g in grads.items():
    np.testing.assert_array_equal(g["bias"], 0.0, err_msg=name)
    assert np.any(np.asarray(g["kernel"])), name


@pytest.mark.parametrize("masked,scale", [(False, "none"), (True, "sqrt_dim")])
def test_dictionary_matching_matches_formula(masked, scale):
  rng = np.random.default_rng(0)
  seqs = tuple(rng.normal(size=(2, t, 6)).astype(np.float32) for t in (5, 4, 3))
  masks = (np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool),
           np.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool),
           np.array([[1, 1, 1], [0, 0, 0]], bool))  # last: a sequence with no real step
  dm = DictionaryMatching(num_elements=7, score_scale=scale)
  params = dm.init(jax.random.key(0), seqs, masks if masked else None)["params"]
  alpha, recon = dm.apply({"params": params}, seqs, masks if masked else None)
  dictionary = np.asarray(params["dictionary"])  # (K, C)
  chex.assert_shape(dictionary, (7, 6))
  for m in range(3):
    for b in range(2):
      scores = seqs[m][b] @ dictionary.T * (1 / math.sqrt(6) if scale == "sqrt_dim" else 1)
      if masked:
        real = masks[m][b]
        a = scores[real].max(0) if real.any() else np.zeros(7)
      else:
        a = scores.max(0)
      expected_alpha = np.exp(a - a.max()) / np.exp(a - a.max()).sum()  # Eq. 11
      np.testing.assert_allclose(alpha[b, m], expected_alpha, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(recon[b, m], expected_alpha @ dictionary, rtol=1e-5,
                                 atol=1e-6)  # Eq. 12


# ---------------------------------------------------------------- decoupling


def test_decoupling_matches_formula():
  rng = np.random.default_rng(0)
  proj = tuple(rng.normal(size=(2, t, 4)).astype(np.float32) for t in (5, 4, 3))
  module = FeatureDecoupling(4)
  params = module.init(jax.random.key(0), proj)["params"]
  dec = module.apply({"params": params}, proj)
  p = jax.tree.map(lambda x: np.asarray(x)[0], params)  # (1, C_in, C_out) -> (C_in, C_out)
  for idx, m in enumerate("lva"):
    c = proj[idx] @ p["encoder_c"]["kernel"]  # one shared encoder
    s = proj[idx] @ p[f"encoder_s_{m}"]["kernel"]
    recon = np.concatenate([s, c], -1) @ p[f"decoder_{m}"]["kernel"]  # [s_m, c_m], as coded
    for got, want in [(dec.shared[idx], c), (dec.private[idx], s), (dec.recon[idx], recon),
                      (dec.private_regressed[idx], recon @ p[f"encoder_s_{m}"]["kernel"])]:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_frame_mask_brute_force():
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6], bool)
  for k in (1, 2, 3):
    got = np.asarray(conv_frame_mask(jnp.asarray(mask), k))
    want = np.array([[mask[b, t:t + k].all() for t in range(6 - k + 1)] for b in range(3)])
    np.testing.assert_array_equal(got, want)


def test_torch_linear_init_bounds():
  x = jnp.ones((1, 50))
  params = torch_linear(40, 50, name="fc").init(jax.random.key(0), x)["params"]
  bound = 1 / math.sqrt(50)
  for leaf in (params["kernel"], params["bias"]):
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound


# ---------------------------------------------------------------- transformer internals


def test_positional_embedding_brute_force():
  rng = np.random.default_rng(0)
  for dim in (8, 9):  # even and odd widths
    x = rng.normal(size=(2, 6, dim)).astype(np.float32)
    x[0, 2, 0] = 0.0  # first channel exactly 0: padding, zero PE
    x[1, 4:, :] = 0.0
    x[1, 1, 1:] = 0.0  # only later channels 0: NOT padding
    want = np.zeros_like(x)
    half = dim // 2
    for b in range(2):
      for t in range(6):
        if x[b, t, 0] == 0:
          continue
        pos = t + 1
        for i in range(half):
          freq = math.exp(-i * math.log(10000) / (half - 1))
          want[b, t, i] = math.sin(pos * freq)
          want[b, t, half + i] = math.cos(pos * freq)
    np.testing.assert_allclose(positional_embedding(jnp.asarray(x)), want, atol=1e-5)


@pytest.mark.parametrize("t_q,t_k", [(5, 5), (3, 7), (7, 3), (1, 4)])
def test_future_mask_brute_force(t_q, t_k):
  # Reference: triu(-inf, diagonal=1+|T_k-T_q|): entry (i, j) is masked iff j - i >= 1+|T_k-T_q|.
  want = np.array([[not (j - i >= 1 + abs(t_k - t_q)) for j in range(t_k)] for i in range(t_q)])
  np.testing.assert_array_equal(np.asarray(future_mask(t_q, t_k)), want)


@pytest.mark.parametrize("t_q,t_k,block", [(10, 10, 3), (10, 10, 4), (7, 12, 2), (12, 7, 5),
                                           (10, 10, 10), (10, 10, 0), (9, 30, 4)])
def test_query_blocks_cover_every_visible_key_and_tile_the_queries(t_q, t_k, block):
  blocks = query_blocks(t_q, t_k, True, block)
  visible = np.asarray(future_mask(t_q, t_k))
  rows = [r for q0, q1, _ in blocks for r in range(q0, q1)]
  assert rows == list(range(t_q))  # in order, each query row once
  for q0, q1, k_end in blocks:
    assert not visible[q0:q1, k_end:].any()  # nothing visible is skipped
  if block and t_q > block and t_q == t_k:  # square: the first block needs only `block` keys
    assert len(blocks) > 1 and min(k for _, _, k in blocks) < t_k  # and something is skipped
  assert query_blocks(t_q, t_k, False, block) == [(0, t_q, t_k)]


@pytest.mark.parametrize("cross,key_padding", [(False, False), (True, False), (False, True)])
def test_blocked_causal_attention_equals_one_block(cross, key_padding):
  """Outputs and gradients do not depend on the query block size (deterministic mode)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 11, 8)).astype(np.float32)
  src = rng.normal(size=(2, 11, 8)).astype(np.float32) if cross else None
  key_mask = None
  if key_padding:
    key_mask = np.ones((2, 11), bool)
    key_mask[1, 6:] = False
  results = []
  for block in (0, 3, 4):
    module = TransformerStack(num_heads=2, num_layers=2, causal_mask=True, query_block=block)
    params = _transformer_params(module, x, src)  # same seed, same shapes: same parameters

    def loss(p, inputs):
      out = module.apply({"params": p}, inputs, src, key_masks=key_mask, deterministic=True)
      return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    results.append((out, grads))
  for out, grads in results[1:]:
    np.testing.assert_allclose(out, results[0][0], atol=2e-5)
    chex.assert_trees_all_close(grads, results[0][1], atol=2e-4)


def _transformer_params(module, x, source=None):
  """Random parameters of the right shapes (no real init: that compiles slowly on a CPU)."""
  shapes = jax.eval_shape(lambda a, b: module.init(jax.random.key(0), a, b, deterministic=True),
                          x, source)["params"]
  return random_params(shapes, seed=3)


def test_transformer_dropout_sites(monkeypatch):
  """Order and rate of every dropout of a cross-modal layer (the model test runs dropout)."""
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  module = TransformerStack(num_heads=2, num_layers=1, embed_dropout=0.1, attn_dropout=0.2,
                            relu_dropout=0.3, res_dropout=0.4)
  sites = []
  original = transformer._dropout

  def record(x, rate, key, active, **block):  # block: an attention block's first_row
    sites.append((x.shape[-2:], active))
    return original(x, rate, key, active, **block)

  monkeypatch.setattr(transformer, "_dropout", record)
  params = _transformer_params(module, x, x)
  sites.clear()
  module.apply({"params": params}, x, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  # embed: query, key, value (separate masks); attention weights; res; relu; res.
  assert sites == [((5, 8), True)] * 3 + [((5, 5), True), ((5, 8), True), ((5, 32), True),
                                          ((5, 8), True)]
  # The rate reaches the mask as given, also as a traced per-branch value under vmap.
  rates = jnp.array([0.0, 0.3, 0.75])
  kept = jax.vmap(lambda r, k: jnp.mean(original(jnp.ones(20000), r, k, True) != 0))(
      rates, jax.random.split(jax.random.key(1), 3))
  np.testing.assert_allclose(kept, 1 - rates, atol=0.015)


def test_transformer_init_matches_reference():
  """xavier-uniform in_proj / out_proj / fc per branch and layer, zero biases, LayerNorms (1, 0)."""
  e = 8
  module = TransformerStack(num_heads=2, num_layers=2)
  x = jnp.ones((1, 3, e))
  params = jax.jit(lambda k: module.init(k, [x, x, x], deterministic=True))(jax.random.key(0))
  p = params["params"]
  chex.assert_shape([p["in_proj_kernel"], p["in_proj_bias"], p["layer_norm_scale"]],
                    [(3, 2, e, 3 * e), (3, 2, 3 * e), (3, e)])
  xavier = {"in_proj_kernel": math.sqrt(6 / (e + 3 * e)),  # torch (3E, E) weight
            "out_proj_kernel": math.sqrt(6 / (2 * e)), "fc1_kernel": math.sqrt(6 / (5 * e)),
            "fc2_kernel": math.sqrt(6 / (5 * e))}
  for name, bound in xavier.items():
    for g in range(3):
      for layer in range(2):  # every slice is its own xavier-uniform matrix
        kernel = p[name][g, layer]
        assert 0.7 * bound < np.abs(kernel).max() <= bound, name
    assert not np.allclose(p[name][0], p[name][1])  # branches are not copies
  for name in ("in_proj_bias", "out_proj_bias", "fc1_bias", "fc2_bias", "layer_norm_0_bias",
               "layer_norm_1_bias", "layer_norm_bias"):
    np.testing.assert_array_equal(p[name], 0.0)
  for name in ("layer_norm_0_scale", "layer_norm_1_scale", "layer_norm_scale"):
    np.testing.assert_array_equal(p[name], 1.0)


def test_causal_mask_hides_the_future():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 4, 8)).astype(np.float32)
  src = rng.normal(size=(1, 6, 8)).astype(np.float32)  # offset |6 - 4| = 2
  module = TransformerStack(num_heads=2, num_layers=2, causal_mask=True)
  params = _transformer_params(module, x, src)
  base = module.apply({"params": params}, x, src, deterministic=True)
  src2 = src.copy()
  src2[:, 5] = rng.normal(size=(1, 8))  # key 5 is visible only to queries i >= 3
  moved = module.apply({"params": params}, x, src2, deterministic=True)
  np.testing.assert_allclose(moved[:, :3], base[:, :3], atol=1e-6)
  assert not np.allclose(moved[:, 3], base[:, 3])


@pytest.mark.parametrize("cross,causal", [(False, False), (True, False), (True, True)])
def test_key_padding_mask_ignores_padded_content(cross, causal):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  src = rng.normal(size=(2, 7, 8)).astype(np.float32) if cross else x
  key_mask = np.ones(src.shape[:2], bool)
  key_mask[0, 4:] = False
  key_mask[1, 2:] = False
  module = TransformerStack(num_heads=2, num_layers=2, causal_mask=causal)
  params = _transformer_params(module, x, src if cross else None)
  garbage = src.copy()
  garbage[~key_mask] = rng.normal(size=garbage[~key_mask].shape) * 5
  if cross:
    x_garbage = x
    real_queries = np.ones(x.shape[:2], bool)
  else:
    x_garbage = garbage
    real_queries = key_mask

  def run(q, s, mask):
    return np.asarray(module.apply({"params": params}, q, s if cross else None, key_masks=mask,
                                   deterministic=True))

  base = run(x, src, key_mask)
  moved = run(x_garbage, garbage, key_mask)
  np.testing.assert_allclose(moved[real_queries], base[real_queries], atol=1e-5)
  # Without the mask the padded frames do leak into real positions (so the check above bites).
  assert not np.allclose(run(x_garbage, garbage, None)[real_queries],
                         run(x, src, None)[real_queries], atol=1e-5)


def test_masked_rows_finite_and_key_bias_has_no_gradient():
  """A query with no visible key gives zeros, not NaN; the key bias gets exactly 0 gradient."""
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  key_mask = np.array([[False] * 3, [True, True, False]])  # sample 0: no visible key at all
  module = TransformerStack(num_heads=2, num_layers=1, causal_mask=False)
  params = _transformer_params(module, x, x)

  def run(p):
    return module.apply({"params": p}, x, x, key_masks=key_mask, deterministic=True)

  value, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(run(p) ** 2)))(params)
  chex.assert_tree_all_finite((run(params), value, grads))
  bias_grad = np.asarray(grads["in_proj_bias"][0, 0])  # (3E,) = [q, k, v]
  np.testing.assert_array_equal(bias_grad[8:16], 0.0)
  assert np.any(bias_grad[:8]) and np.any(bias_grad[16:])


def test_attention_dropout_is_routed_by_source_modality():
  config = tiny_config()
  config.model.attn_dropout, config.model.attn_dropout_v, config.model.attn_dropout_a = (
      0.11, 0.22, 0.33)
  model = build_model(config, num_outputs=1)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, TransformerStack) and context.method_name == "__call__":
      seen[context.module.name] = (context.module.attn_dropout, context.module.num_layers)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract_init(model, make_batch(TINY_LENGTHS, TINY_DIMS))
  l, v, a = 0.11, 0.22, 0.33
  assert seen == {
      "self_attentions_c": ((l, v, a), 1),  # by its own modality
      # l<-a, l<-v, v<-l, v<-a, a<-l, a<-v: by the SOURCE modality
      "cross_transformers": ((a, v, l, a, l, v), 1),
      "memory_transformers": ((l, l, l), 3)}


# ---------------------------------------------------------------- key padding at model level


def test_model_key_padding_ignores_padded_frames():
  # Outputs built from attention read-outs and DM pools (the flatten heads see every frame).
  keys = ("prediction", "logits_hetero", "repr_hetero", "logits_c", "gd_hetero_edges",
          "dm_homo_weights", "dm_homo_recon", "dm_hetero_weights", "dm_hetero_recon")
  rng = np.random.default_rng(5)
  for key_padding in (True, False):
    _, _, batch, params, forward = tiny_setup(key_padding_mask=key_padding)
    noisy = dict(batch)
    for m in MODALITIES:
      x, pad = batch[m].copy(), ~batch[f"{m}_mask"]
      x[pad] = rng.normal(size=x[pad].shape)
      noisy[m] = x
    a, b = forward(params, batch), forward(params, noisy)
    same = [np.allclose(a[k], b[k], atol=1e-5) for k in keys]
    if key_padding:
      assert all(same), [k for k, s in zip(keys, same) if not s]
    else:  # without the mask the padding does reach the prediction (so the check above bites)
      assert not np.allclose(a["prediction"], b["prediction"], atol=1e-5)


# ---------------------------------------------------------------- ablations and baselines


@pytest.mark.parametrize("variant", list(ablations.VARIANTS))
def test_every_ablation_builds_and_runs(variant):
  config, _, batch, params, forward = tiny_setup(variant)
  out = forward(params, batch)
  assert set(out) == expected_keys(config)
  chex.assert_tree_all_finite(out)
  chex.assert_shape(out["prediction"], (2, 1))
  if config.model.arch == "mult":
    assert not any("homo" in k for k in out) and "logits_c" not in out
    assert not any(name.startswith(("decoupling", "homo", "self_attentions")) for name in params)
  # Cross-modal attention (Table 6's fd/none rows: off) is the cross_transformers stack; without
  # it a Linear(d -> 2d) per target takes its place.
  linears = {f"proj_{m}_2d" for m in MODALITY_KEYS}
  if config.model.use_ca:
    assert "cross_transformers" in params and not linears & set(params)
  else:
    assert "cross_transformers" not in params and linears <= set(params)
  if not config.model.use_fd:
    assert "decoupling" not in params and not any(n.startswith("align_c") for n in params)


def test_fusion_paper_and_no_self_attention_run():
  for fusion, self_attention in [("paper", True), ("paper", False), ("code", False)]:
    config = tiny_config(fusion=fusion, homo_self_attention=self_attention)
    model = build_model(config, num_outputs=2)
    batch = make_batch(TINY_LENGTHS, TINY_DIMS)
    shapes, out_shapes = abstract_init(model, batch)
    assert set(out_shapes) == expected_keys(config)
    d = config.model.d_model
    width = 9 * d + 9 * d  # [h_l, h_v, h_a, c] + DM reconstructions
    assert shapes["fusion_head"]["proj1"]["kernel"].shape == (width, width)
    # "code" gates every part with sigmoid(W x) before the head; "paper" concatenates them as
    # they are (the widths are the same, so only the gates tell the two apart).
    gates = {f"weight_{m}" for m in MODALITY_KEYS} | {"weight_c"}
    assert (gates <= set(shapes)) == (fusion == "code"), fusion
    assert (gates & set(shapes) == set()) == (fusion == "paper"), fusion
    out = model.apply({"params": random_params(shapes)}, batch, deterministic=True)
    chex.assert_shape(out["prediction"], (2, 2))


def test_ablation_config_from_dataset_file():
  config = ablations.get_config("default,no_gd")
  m = config.model
  assert (m.arch, m.use_fd, m.use_ca, m.use_gd, m.use_dm) == ("dhmd", True, True, False, True)
  config = ablations.get_config("mosei,mult_gd_dm,unaligned")
  assert (config.model.arch, config.model.use_gd, config.model.use_dm) == ("mult", True, True)
  assert config.dataset.name == "mosei" and "unaligned" in config.dataset.path
  with pytest.raises(ValueError, match="unknown ablation variant"):
    ablations.get_config("default,no_such_variant")
  with pytest.raises(ValueError, match="no dataset config"):
    ablations.get_config("no_such_dataset,full")
  with pytest.raises(ValueError, match="<dataset>,<variant>"):
    ablations.get_config("mosei")
  for variant in ablations.VARIANTS:  # every variant is a valid config for the model
    build_model(ablations.get_config(f"default,{variant}"), num_outputs=1)


def test_bad_inputs_fail_with_a_message():
  _, model, batch, params, _ = tiny_setup()
  short = dict(batch, text=batch["text"][:, :2], text_mask=batch["text_mask"][:, :2])
  with pytest.raises(ValueError, match="fewer than its Conv1d kernel"):
    model.apply({"params": params}, short, deterministic=True)
  with pytest.raises(KeyError, match="'audio'"):
    model.apply({"params": params}, {k: v for k, v in batch.items() if k != "audio"},
                deterministic=True)
  with pytest.raises(ValueError, match="config.model.fusion"):
    build_model(tiny_config(fusion="sum"), num_outputs=1)
  with pytest.raises(ValueError, match="config.model.attention_query_block"):
    build_model(tiny_config(attention_query_block=-1), num_outputs=1)
  with pytest.raises(ValueError, match="config.model.stack_compute = 'scan' is invalid"):
    build_model(tiny_config(stack_compute="scan"), num_outputs=1)
  x = jnp.ones((2, 5, 8))
  with pytest.raises(ValueError, match=r"key_mask has shape \(2, 4\); expected"):
    TransformerStack(num_heads=2, num_layers=1).init(
        jax.random.key(0), x, key_masks=jnp.ones((2, 4), bool), deterministic=True)
