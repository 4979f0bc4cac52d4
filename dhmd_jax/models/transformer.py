"""MulT / fairseq-style transformer encoder: self-attention and cross-modal attention (Eq. 10).

This is the block that DMD (and so DHMD) takes from MulT: twelve of them in the full model (three
self-attention transformers on the shared features c_m, six cross-modal transformers L<-A, L<-V,
A<-L, A<-V, V<-L, V<-A on the private features s_m, and three "memory" self-attention transformers
of width 2d). Everything follows `trains/subNets/transformers_encoder/*.py` of the DMD code:

* Input embedding: x <- sqrt(E) * x + PE(x), then dropout(embed_dropout). PE is the tensor2tensor
  sinusoid with [sin | cos] halves, positions t + 1, and a zero PE for every token whose FIRST
  feature channel is exactly 0 (fairseq's `padding_idx=0` rule). In a cross-modal block the source
  is embedded the same way twice, as key and as value, with separate dropout masks.
* Pre-LN layers. The same LayerNorm (`layer_norm_0`) normalises query, key and value. Attention
  has one packed input projection (PyTorch `in_proj_weight` (3E, E) + `in_proj_bias` (3E,), here
  stored transposed as `in_proj_kernel` (E, 3E)), xavier-uniform with zero bias; q is scaled by
  head_dim^-1/2; attention dropout acts on the softmax weights. FFN: LN -> Linear(E, 4E) -> ReLU
  -> dropout(relu) -> Linear(4E, E) -> dropout(res) -> + residual. A final LayerNorm follows.
* The key part of `in_proj_bias` is held out of the gradient (`stop_gradient`): the softmax
  cancels it, so its true gradient is exactly 0, and this keeps it exactly 0 in floating point.
* Causal ("future") mask: query i sees keys j <= i + |T_k - T_q| (`buffered_future_mask`).
  With `query_block` > 0, long causal attention is computed in blocks of query rows, each over
  only the keys it can see (same outputs; about half the work on a 500 x 500 score matrix).
* Key-padding mask (not in the DMD code, opt-in): keys whose frame mask is False get no weight; a
  query row with no visible key gets all-zero weights (so its attention output is out_proj's
  bias), never NaN.

The model holds the transformers of one kind as one `TransformerStack` (parameters with a
leading branch axis G and a layer axis L). The maths of one branch exists once, as pure functions
over its slice of the stacked parameters (`_branch` -> `_encoder_layer` -> `_attention`), and
every schedule of the stack (`SCHEDULES`) calls it: "vmap" vmaps it over the branches (padded to
a common length with exact masks) with the layers under `lax.scan` (few, large operations: the
GPU default); "grouped" vmaps the same groups with the layers unrolled; "loop" calls it branch by
branch at each branch's own lengths with the layers unrolled (many small operations that a CPU
runtime overlaps on its cores). Dropout masks (threefry keys, the default) are drawn from each
element's coordinates (`_keep_mask`) with each branch's own key, so the schedules drop the same
units and give the same numbers in training too, and the masks do not depend on `query_block`
(`tests/test_stacked.py`).

Attention maps for analysis are recorded only on request: applied with
`mutable=["intermediates"]`, a stack sows every layer's attention weights (see
`TransformerStack.__call__`); otherwise nothing is recorded.

LayerNorms use PyTorch's epsilon 1e-5. Arrays are batch-major (B, T, E) here; the reference is
time-major (T, B, E), which changes nothing in the maths.
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np

_LN_EPSILON = 1e-5  # torch.nn.LayerNorm default
# The score of a key a query may not see (added, or put in its place): exp() of it is exactly 0,
# and, finite, it keeps a row with no visible key free of inf - inf.
_HIDDEN = -1e30
_GRID = 1 << 16  # rows and column pairs a dropout mask addresses by coordinates
# How a stack is computed (TransformerStack.compute): "vmap" (branches of similar lengths vmapped,
# layers scanned), "grouped" (the same groups vmapped, layers unrolled), "loop" (branch by branch,
# layers unrolled).
SCHEDULES = ("vmap", "grouped", "loop")


def sinusoidal_table(num_positions: int, dim: int) -> jax.Array:
  """Rows p = 0 .. num_positions-1 of the tensor2tensor sinusoid, [sin | cos] halves.

  freq_i = exp(-i * ln(10000) / (half - 1)) for i < half = dim // 2; an odd `dim` gets a zero last
  column. Row 0 is NOT zeroed here (the padding rule is applied by `positional_embedding`).
  """
  half = dim // 2
  if half < 2:
    raise ValueError(
        f"sinusoidal positional embedding needs an embedding width >= 4, got {dim}: the "
        "frequency step ln(10000)/(half-1) is undefined for half < 2. Use a larger d_model.")
  step = math.log(10000.0) / (half - 1)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)  # (half,)
  angles = jnp.arange(num_positions, dtype=jnp.float32)[:, None] * freqs[None, :]  # (P, half)
  table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)  # (P, 2*half)
  if dim % 2 == 1:
    table = jnp.pad(table, ((0, 0), (0, 1)))
  return table  # (P, dim)


def positional_embedding(x: jax.Array) -> jax.Array:
  """Fairseq `SinusoidalPositionalEmbedding(dim, padding_idx=0)` applied to x's first channel.

  Token t gets the table row t + 1; a token whose first channel is exactly 0 counts as padding and
  gets a zero vector.

  Args:
    x: (B, T, C) the un-scaled transformer input.

  Returns:
    (B, T, C) positional embedding (no gradient flows through it; it depends on x only through the
    padding test).
  """
  _, t, c = x.shape
  table = sinusoidal_table(t + 1, c)[1:]  # (T, C): positions 1..T
  is_pad = x[..., 0] == 0  # (B, T)
  return jnp.where(is_pad[..., None], 0.0, table[None, :, :])  # (B, T, C)


def future_mask(t_q: int, t_k: int) -> jax.Array:
  """Causal mask of `buffered_future_mask`: True where query i may see key j <= i + |T_k - T_q|."""
  i = jnp.arange(t_q)[:, None]
  j = jnp.arange(t_k)[None, :]
  return j <= i + abs(t_k - t_q)  # (T_q, T_k) bool


def query_blocks(t_q: int, t_k: int, causal: bool, block: int, branch_lengths=None):
  """Static (q_start, q_end, k_end) blocks: query rows [q_start, q_end) need keys [0, k_end).

  With the causal mask, query i sees keys j <= i + |T_k - T_q|, so a block of queries never needs
  the keys past its last row's horizon: computing attention block by block skips the keys that
  are masked for the whole block (about half of a long square score matrix) and gives the same
  result, since a masked key gets exactly zero weight. `block <= 0`, no causal mask, or a block
  that would not skip anything gives one block over everything.

  `branch_lengths`: the real (t_q, t_k) of every branch padded to (t_q, t_k) in a stack; a block
  then reaches the furthest key any branch's real rows in it can see (padded rows need no more).
  """
  if not causal or block <= 0 or t_q <= block:
    return [(0, t_q, t_k)]
  lengths = branch_lengths or [(t_q, t_k)]

  def horizon(q_end):
    return max(1, max(min(tk, min(q_end, tq) + abs(tk - tq)) for tq, tk in lengths))

  blocks = [(start, min(start + block, t_q), horizon(min(start + block, t_q)))
            for start in range(0, t_q, block)]
  if all(k_end == t_k for _, _, k_end in blocks):
    return [(0, t_q, t_k)]
  return blocks


def plan_groups(lengths, slack: float = 1.25):
  """Which branches of a stack are computed together: indices grouped so that within a group every
  real length is at least 1/slack of the group's padded length (in T_q and in T_k).

  The branches of one kind usually share their shapes (one group, one set of operations); on
  unaligned data a 50-step and a 500-step branch are computed apart rather than padded 10x.
  """
  groups = []  # [indices]
  for i, (tq, tk) in enumerate(lengths):
    for group in groups:
      qs = [lengths[j][0] for j in group] + [tq]
      ks = [lengths[j][1] for j in group] + [tk]
      if max(qs) <= slack * min(qs) and max(ks) <= slack * min(ks):
        group.append(i)
        break
    else:
      groups.append([i])
  return groups


# ---------------------------------------------------------------- one branch (pure functions)


def _layer_norm(x, scale, bias):
  """torch.nn.LayerNorm over the last axis (epsilon 1e-5), variance as E[x^2] - E[x]^2: Flax's
  nn.LayerNorm operation for operation, in its order. (The same numbers written otherwise, e.g.
  statistics kept (..., 1) or (x - mean) * rsqrt * scale, gave a backward pass of about a fifth
  more XLA operations per layer, or rsqrt fused into the (..., E) product and computed E times.)"""
  square = jax.lax.square(x)
  mean = jnp.mean(x, axis=-1)  # (...,)
  var = jnp.maximum(0.0, jnp.mean(square, axis=-1) - jax.lax.square(mean))
  centred = x - mean[..., None]
  return centred * (jax.lax.rsqrt(var[..., None] + _LN_EPSILON) * scale) + bias


def _keep_mask(key, keep_prob, shape, first_row: int = 0):
  """Bernoulli(keep_prob) mask of `shape` and its exact keep probability, from 16-bit draws.

  A threefry key: the draw of element (..., i, j) depends on the key and its coordinates only
  (the flat index of the leading axes, the row first_row + i, the column j), not on the shape.
  So a branch computed alone and the same branch zero-padded into a stack, or attention weights
  computed in query blocks (`first_row` = the block's first row) and at once, draw the same mask
  on the elements they share: the "loop" and "vmap" schedules drop the same units. One 64-bit
  threefry block, hashed from (leading index, row << 16 | j // 2), gives the draws of columns
  2 (j // 2) and 2 (j // 2) + 1 (the top 16 bits of each of its two words): half the random-
  number work of jax.random.bernoulli (one block per element). Four 16-bit draws per block would
  halve it again, but XLA's CPU compile of each such site took about five times longer.
  keep_prob is quantised to multiples of 2^-16 and the exact quantised value is returned for the
  rescaling, so the dropout stays unbiased (0.6 -> 0.600006). Other key types (rbg), and rows or
  column pairs past 2^16, use jax.random.bernoulli (masks then depend on the shape).
  """
  data = jax.random.key_data(key)
  *lead, rows, cols = (1,) * max(0, 2 - len(shape)) + tuple(shape)
  pairs = -(-cols // 2)
  if data.shape != (2,) or first_row + rows > _GRID or pairs > _GRID:
    return jax.random.bernoulli(key, keep_prob, shape), keep_prob
  grid = (*lead, rows, pairs)
  iota = lambda axis: jax.lax.broadcasted_iota(jnp.uint32, grid, axis)
  index = jnp.zeros(grid, jnp.uint32)  # flat index of the leading axes
  for a in range(len(lead)):
    index = index + iota(a) * np.uint32(math.prod(lead[a + 1:]))
  cell = ((iota(len(lead)) + np.uint32(first_row)) << 16) | iota(len(lead) + 1)
  bits = jax_random_ext.threefry2x32_p.bind(data[0], data[1], index, cell)  # 2 x grid
  draws = jnp.stack([b >> 16 for b in bits], axis=-1)  # (..., rows, pairs, 2)
  draws = draws.reshape(*lead, rows, 2 * pairs)[..., :cols].reshape(shape)
  threshold = jnp.round(keep_prob * 65536.0)  # keep iff draw < threshold
  return draws.astype(jnp.float32) < threshold, threshold / 65536.0


def _dropout(x, rate, key, active: bool, first_row: int = 0):
  """Inverted dropout with a traced rate (one per branch under vmap); `active` is static;
  `first_row`: the row of x's first row in the whole tensor (a query block's first row)."""
  if not active:
    return x
  keep, keep_prob = _keep_mask(key, 1.0 - rate, x.shape, first_row)
  return jnp.where(keep, x / keep_prob, 0.0)


class _Static(NamedTuple):
  """What the traced branch needs to know at trace time."""
  num_heads: int
  num_layers: int
  blocks: tuple  # query_blocks(...)
  embed_rate: float
  relu_rate: float
  res_rate: float
  training: bool  # dropout on
  attn_dropout: bool  # training, and some branch computed with this has attention dropout
  remat: bool
  scan: bool  # layers under lax.scan ("vmap" schedule) or unrolled ("grouped", "loop")
  record: bool = False  # also return the attention weights (analysis; see TransformerStack)


_LAYER_SITES = 4  # dropout keys of a layer: attention weights, res, relu, res
_EMBED_SITES = 3  # query, key, value


def _attention(p, x, k_in, v_in, bias, key_mask, rate, key, st: _Static):
  """Multi-head attention of one branch (Eq. 10).

  Args:
    p: in_proj_kernel (E, 3E), in_proj_bias (3E,), out_proj {kernel (E, E), bias (E,)}.
    x: (B, T_q, E) normalised queries.
    k_in, v_in: None for self-attention (keys and values are x), else (B, T_k, E) each (one
      array, projected once, when key and value are the same).
    bias: (T_q, T_k) additive mask (0 visible, _HIDDEN hidden) or None (everything visible).
    key_mask: (B, T_k) bool or None.
    rate, key: attention-dropout rate and key.
    st: static settings (heads, query blocks, dropout on, recording).

  Returns:
    (B, T_q, E); with `st.record`, also the pre-dropout weights (B, h, T_q, T_k).
  """
  b, t_q, e = x.shape
  h = st.num_heads
  hd = e // h
  w, wb = p["in_proj_kernel"], p["in_proj_bias"]  # torch in_proj_weight.T (E, 3E), (3E,)
  # The key bias adds q.b_k to every score of a query row, which the softmax cancels: its
  # gradient is exactly 0. stop_gradient makes it exactly 0 in floating point too, so Adam does
  # not turn rounding noise into +-lr updates (runs on 1 and N devices would drift apart).
  wb = jnp.concatenate([wb[:e], jax.lax.stop_gradient(wb[e:2 * e]), wb[2 * e:]])
  if k_in is None:  # self-attention: one (E, 3E) product
    q, k, v = jnp.split(x @ w + wb, 3, axis=-1)
  elif v_in is k_in:  # cross-modal with one source: q, then k and v in one (E, 2E) product
    q = x @ w[:, :e] + wb[:e]  # (B, T_q, E)
    k, v = jnp.split(k_in @ w[:, e:] + wb[e:], 2, axis=-1)  # (B, T_k, E) each
  else:
    q = x @ w[:, :e] + wb[:e]
    k = k_in @ w[:, e:2 * e] + wb[e:2 * e]
    v = v_in @ w[:, 2 * e:] + wb[2 * e:]
  t_k = k.shape[1]
  q = (q * hd**-0.5).reshape(b, t_q, h, hd)
  k = k.reshape(b, t_k, h, hd)
  v = v.reshape(b, t_k, h, hd)
  outs, recorded = [], []
  for q0, q1, k_end in st.blocks:
    # (B, h, rows, k_end); Eq. 10 Q K^T / sqrt(d)
    scores = jnp.einsum("bqhc,bkhc->bhqk", q[:, q0:q1], k[:, :k_end])
    if bias is not None:
      scores = scores + bias[q0:q1, :k_end]
    if key_mask is not None:
      padding = key_mask[:, None, None, :k_end]  # (B, 1, 1, k_end)
      scores = jnp.where(padding, scores, _HIDDEN)
    weights = jax.nn.softmax(scores, axis=-1)
    if key_mask is not None:
      # A row with no visible key: zero weights instead of a uniform average over masked
      # keys. (The causal mask alone always leaves key 0 visible.)
      visible = padding if bias is None else padding & (bias[q0:q1, :k_end] == 0)
      weights = jnp.where(jnp.any(visible, axis=-1, keepdims=True), weights, 0.0)
    if st.record:
      recorded.append(jnp.pad(weights, ((0, 0), (0, 0), (0, 0), (0, t_k - k_end))))
    weights = _dropout(weights, rate, key, st.attn_dropout, first_row=q0)
    outs.append(jnp.einsum("bhqk,bkhc->bqhc", weights, v[:, :k_end]))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)  # (B, T_q, h, hd)
  out = out.reshape(b, t_q, e) @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
  return (out, jnp.concatenate(recorded, axis=2)) if st.record else out


def _encoder_layer(p, x, k_src, v_src, bias, key_mask, attn_rate, keys, st: _Static):
  """One pre-LN layer of one branch: (cross-)attention + FFN, each with a residual connection.
  k_src, v_src: the embedded source (None for self-attention); keys: _LAYER_SITES dropout keys
  (or None when not training)."""
  keys = [None] * _LAYER_SITES if keys is None else keys
  norm_0 = lambda y: _layer_norm(y, p["layer_norm_0"]["scale"], p["layer_norm_0"]["bias"])
  residual = x
  x = norm_0(x)
  if k_src is None:
    k_in = v_in = None
  elif v_src is k_src:  # no embedding dropout: key and value are one array, normalised once
    k_in = v_in = norm_0(k_src)
  else:
    k_in, v_in = norm_0(k_src), norm_0(v_src)  # the same LayerNorm on q, k and v, as coded
  with jax.named_scope("self_attn"):  # op names for profiles, as the per-branch modules had
    x = _attention(p["self_attn"], x, k_in, v_in, bias, key_mask, attn_rate, keys[0], st)
  if st.record:
    x, weights = x
  x = residual + _dropout(x, st.res_rate, keys[1], st.training and st.res_rate > 0)
  residual = x
  x = _layer_norm(x, p["layer_norm_1"]["scale"], p["layer_norm_1"]["bias"])
  x = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])  # (B, T_q, 4E)
  x = _dropout(x, st.relu_rate, keys[2], st.training and st.relu_rate > 0)
  x = x @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  x = residual + _dropout(x, st.res_rate, keys[3], st.training and st.res_rate > 0)
  return (x, weights) if st.record else x


def _branch(p, norm, x, src, bias, key_mask, attn_rate, key, st: _Static):
  """One MulT transformer encoder: the input embedding, `st.num_layers` layers, the final
  LayerNorm. Every schedule computes every branch with this function: "vmap" under `jax.vmap`
  (layers under `lax.scan`), "grouped" under `jax.vmap` (layers unrolled), "loop" as it is
  (layers unrolled).

  Args:
    p: the branch's layer parameters, every leaf with the layer axis L first.
    norm: the final LayerNorm's scale and bias (E,).
    x: (B, T_q, E) the query sequence; src: (B, T_k, E) the key/value sequence or None.
    bias: (T_q, T_k) additive mask or None; key_mask: (B, T_k) bool or None.
    attn_rate: attention-dropout rate (traced under vmap); key: the branch's dropout key, None
      when not training. Every dropout key of the branch comes from one split of it.

  Returns:
    (B, T_q, E); with `st.record`, also every layer's attention weights (L, B, h, T_q, T_k).
  """
  scale = math.sqrt(x.shape[-1])
  embed_on = st.training and st.embed_rate > 0
  num_layers = st.num_layers
  embed_keys, layer_keys = [None] * _EMBED_SITES, None
  if key is not None:
    keys = jax.random.split(key, _EMBED_SITES + num_layers * _LAYER_SITES)
    embed_keys = keys[:_EMBED_SITES]
    layer_keys = keys[_EMBED_SITES:].reshape(num_layers, _LAYER_SITES)
  # Input embedding: sqrt(E) x + PE(x) (zero-padded frames get PE 0 by the padding rule).
  h = _dropout(scale * x + positional_embedding(x), st.embed_rate, embed_keys[0], embed_on)
  h_k = h_v = None
  if src is not None:
    s = scale * src + positional_embedding(src)  # (B, T_k, E)
    h_k = _dropout(s, st.embed_rate, embed_keys[1], embed_on)  # separate masks for k and v
    h_v = _dropout(s, st.embed_rate, embed_keys[2], embed_on)  # (h_v is h_k when off)

  def layer(h, p_l, keys_l):
    return _encoder_layer(p_l, h, h_k, h_v, bias, key_mask, attn_rate, keys_l, st)

  if st.remat:  # inside scan CSE cannot undo the recomputation; unrolled it could
    layer = jax.checkpoint(layer, prevent_cse=not st.scan)
  if st.scan:
    def step(h, xs):
      out = layer(h, *xs)
      return out if st.record else (out, None)  # (h, this layer's weights when recording)

    with jax.named_scope("layers"):
      h, weights = jax.lax.scan(step, h, (p, layer_keys))
  else:
    # Split (not sliced) into layers: the backward pass joins the gradients with one
    # concatenate instead of a pad + add per layer.
    weights = []
    for i, p_l in enumerate(_split_tree(p, num_layers)):
      with jax.named_scope(f"layers_{i}"):
        h = layer(h, p_l, None if layer_keys is None else layer_keys[i])
      if st.record:
        h, w = h
        weights.append(w)
    weights = jnp.stack(weights) if st.record else None
  out = _layer_norm(h, norm["scale"], norm["bias"])  # (B, T_q, E)
  return (out, weights) if st.record else out


def _hidden_bias(lengths, t_q, t_k, causal):
  """(G, T_q, T_k) additive masks, or None when nothing is hidden: the causal rule of each
  branch's REAL lengths, and no weight on the keys past a branch's real length (padding added
  to stack it)."""
  masks = np.zeros((len(lengths), t_q, t_k), np.float32)
  for g, (tq, tk) in enumerate(lengths):
    visible = np.zeros((t_q, t_k), bool)
    visible[:, :tk] = True
    if causal:
      visible[:, :tk] &= np.arange(tk)[None, :] <= np.arange(t_q)[:, None] + abs(tk - tq)
    masks[g][~visible] = _HIDDEN
  return jnp.asarray(masks) if masks.any() else None


def _split_tree(tree, n):
  """n trees of the slices of every leaf along axis 0, that axis dropped (one `split` per leaf:
  its gradient is one concatenate, not a pad + add per slice)."""
  leaves, treedef = jax.tree.flatten(tree)
  parts = [[jnp.squeeze(piece, 0) for piece in jnp.split(leaf, n, axis=0)] for leaf in leaves]
  return [treedef.unflatten([p[i] for p in parts]) for i in range(n)]


def _branch_key(key, g: int):
  """Branch g's dropout key: the same in both schedules, whatever the grouping."""
  return jax.random.fold_in(key, g)


def _pad_to(x, t):
  return x if x.shape[1] == t else jnp.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0)))


class TransformerStack(nn.Module):
  """G MulT transformer encoders of one kind (same width, heads and depth), computed as one.

  Every parameter has a leading branch axis G and, inside a layer, a layer axis L. How the same
  parameters are computed is `compute`; every schedule runs every branch through `_branch`,
  with the same dropout masks (each branch's key is the stack's key folded with the branch
  index):

  * "vmap": branches whose lengths differ by at most `slack` are zero-padded to a common length
    with exact masks (padded keys get no weight, the causal offset and the positions stay those
    of each branch's real lengths, padded query rows are cut off before returning) and run as
    one `jax.vmap`, the layers under `jax.lax.scan`, so one layer body is traced and compiled
    once for all G x L layers (few, large operations: compiles in seconds, and what a GPU
    wants); branches of very different lengths are computed in separate groups.
  * "grouped": the same groups as "vmap", each one `jax.vmap`, the layers unrolled (one traced
    layer per group and depth instead of per branch and depth: a fraction of "loop"'s program,
    so it compiles several times faster; on a CPU each step costs more than "loop"'s, since
    the per-branch weights make every product a batched one).
  * "loop": every branch on its own at its own lengths, the layers unrolled (the same numbers;
    many small independent operations, which a CPU runtime overlaps on its cores, at the cost
    of compile time).

  Attributes:
    num_heads: attention heads.
    num_layers: layers per branch.
    attn_dropout: dropout on the attention weights, one rate per branch (the SOURCE modality's in
      a cross-modal block), or one rate for all.
    relu_dropout, res_dropout, embed_dropout: the other dropout rates.
    causal_mask: apply the future mask with the |T_k - T_q| offset.
    query_block: causal attention in blocks of this many query rows (0 = off); see
      `query_blocks`. The same outputs, less work on long sequences.
    remat: recompute each layer's activations in the backward pass instead of storing them.
    slack: largest padded/real length ratio inside one "vmap" group (see `plan_groups`).
    compute: "vmap", "grouped" or "loop" (above).
  """
  num_heads: int
  num_layers: int
  attn_dropout: Any = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  embed_dropout: float = 0.0
  causal_mask: bool = True
  query_block: int = 0
  remat: bool = False
  slack: float = 1.25
  compute: str = "vmap"

  def _params(self, g: int, e: int):
    l = self.num_layers
    zeros, ones = nn.initializers.zeros, nn.initializers.ones
    xavier = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", batch_axis=(0, 1))

    def dense(name, fan_in, fan_out):
      return {"kernel": self.param(f"{name}_kernel", xavier, (g, l, fan_in, fan_out)),
              "bias": self.param(f"{name}_bias", zeros, (g, l, fan_out))}

    def norm(name, shape):
      return {"scale": self.param(f"{name}_scale", ones, shape),
              "bias": self.param(f"{name}_bias", zeros, shape)}

    layers = {
        "layer_norm_0": norm("layer_norm_0", (g, l, e)),
        "self_attn": {"in_proj_kernel": self.param("in_proj_kernel", xavier, (g, l, e, 3 * e)),
                      "in_proj_bias": self.param("in_proj_bias", zeros, (g, l, 3 * e)),
                      "out_proj": dense("out_proj", e, e)},
        "layer_norm_1": norm("layer_norm_1", (g, l, e)),
        "fc1": dense("fc1", e, 4 * e),
        "fc2": dense("fc2", 4 * e, e),
    }
    return layers, norm("layer_norm", (g, e))

  def _static(self, blocks, attn_rates, training, record):
    return _Static(
        num_heads=self.num_heads, num_layers=self.num_layers, blocks=tuple(blocks),
        embed_rate=self.embed_dropout, relu_rate=self.relu_dropout, res_rate=self.res_dropout,
        training=training, attn_dropout=training and any(r > 0 for r in attn_rates),
        remat=self.remat, scan=self.compute == "vmap", record=record)

  @nn.compact
  def __call__(self, xs, sources=None, *, key_masks=None, deterministic: bool):
    """Encodes G sequences.

    Args:
      xs: sequence of G query sequences (B, T_q[g], E) (the target modality of a cross-modal
        block), or one (B, T_q, E) array for a stack of one.
      sources: None (self-attention) or G key/value sequences (B, T_k[g], E).
      key_masks: None or G (B, T_k[g]) bool frame masks of the keys (each query sequence's own
        mask for self-attention); None means every real key is visible (the DMD code).
      deterministic: disables dropout.

    Returns:
      G encoded query sequences (B, T_q[g], E) after the final LayerNorm (one array for one).

    Attention maps (analysis, opt-in): when the caller applies the model with
    `mutable=["intermediates"]`, the stack also sows, under "attention", a tuple of G arrays
    (L, B, h, T_q[g], T_k[g]): every layer's attention weights before dropout, rows summing to
    1 over the visible keys (a query row with no visible key is all 0). Otherwise nothing is
    recorded and the computation is the same as without this feature.
    """
    record = self.is_mutable_collection("intermediates")
    single = not isinstance(xs, (list, tuple))
    if single:
      xs = [xs]
      sources = None if sources is None else [sources]
      key_masks = None if key_masks is None else [key_masks]
    g_all, e = len(xs), xs[0].shape[-1]
    if e % self.num_heads:
      raise ValueError(f"embedding width {e} is not divisible by num_heads={self.num_heads}")
    cross = sources is not None
    srcs = sources if cross else xs
    for x, s in zip(xs, srcs):
      if s.shape[-1] != e or x.shape[-1] != e:
        raise ValueError(f"every sequence of a transformer stack needs width {e}; got "
                         f"{x.shape[-1]} and {s.shape[-1]}")
    if key_masks is not None:
      key_masks = [jnp.asarray(km).astype(bool) for km in key_masks]
      for km, x, s in zip(key_masks, xs, srcs):
        if km.shape != (x.shape[0], s.shape[1]):
          raise ValueError(f"key_mask has shape {km.shape}; expected (B, T_k) = "
                           f"{(x.shape[0], s.shape[1])}")
    rates = self.attn_dropout
    rates = tuple(rates) if isinstance(rates, (list, tuple)) else (rates,) * g_all
    if len(rates) != g_all:
      raise ValueError(f"{len(rates)} attention dropout rates for {g_all} branches")
    if self.compute not in SCHEDULES:  # the model's config is checked in ModelSettings
      raise ValueError(f"TransformerStack.compute must be one of {', '.join(SCHEDULES)}, got "
                       f"{self.compute!r}")
    layer_params, final_norm = self._params(g_all, e)
    key = None if deterministic else self.make_rng("dropout")
    lengths = [(x.shape[1], s.shape[1]) for x, s in zip(xs, srcs)]
    outputs = [None] * g_all
    attention = [None] * g_all

    if self.compute == "loop":
      # One branch at a time at its own lengths: split (not sliced) out of the stacked
      # parameters, so the backward pass joins the gradients with one concatenate instead of a
      # pad + add per branch.
      per_branch = zip(_split_tree(layer_params, g_all), _split_tree(final_norm, g_all))
      for g, (lp, fn) in enumerate(per_branch):
        t_q, t_k = lengths[g]
        bias = _hidden_bias([lengths[g]], t_q, t_k, self.causal_mask)
        st = self._static(query_blocks(t_q, t_k, self.causal_mask, self.query_block),
                          [rates[g]], key is not None, record)
        out = _branch(lp, fn, xs[g], srcs[g] if cross else None,
                      None if bias is None else bias[0],
                      None if key_masks is None else key_masks[g], rates[g],
                      None if key is None else _branch_key(key, g), st)
        outputs[g], attention[g] = out if record else (out, None)
    else:
      for group in plan_groups(lengths, self.slack):
        out, weights = self._group(group, layer_params, final_norm, xs, srcs if cross else None,
                                   key_masks, rates, key, record)
        for i, o, w in zip(group, out, weights):
          outputs[i], attention[i] = o, w
    if record:
      self.sow("intermediates", "attention", tuple(attention))
    return outputs[0] if single else outputs

  def _group(self, group, layer_params, final_norm, xs, srcs, key_masks, rates, key, record):
    """The branches `group` (indices), zero-padded to the longest, as one vmapped computation
    (layers scanned in "vmap", unrolled in "grouped"). Returns their outputs (B, T_q[g], E)
    and their attention weights (L, B, h, T_q[g], T_k[g]), padding cut off (None each unless
    `record`)."""
    g_all = len(xs)
    if len(group) == g_all:
      take = lambda tree: tree
    elif group == list(range(group[0], group[-1] + 1)):  # contiguous: a slice
      take = lambda tree: jax.tree.map(lambda a: a[group[0]:group[-1] + 1], tree)
    else:
      take = lambda tree: jax.tree.map(lambda a: a[np.asarray(group)], tree)
    xs = [xs[i] for i in group]
    srcs = None if srcs is None else [srcs[i] for i in group]
    lengths = [(x.shape[1], (x if srcs is None else s).shape[1])
               for x, s in zip(xs, srcs or xs)]
    t_q = max(tq for tq, _ in lengths)
    t_k = max(tk for _, tk in lengths)
    attn_rates = [rates[i] for i in group]
    training = key is not None
    st = self._static(query_blocks(t_q, t_k, self.causal_mask, self.query_block, lengths),
                      attn_rates, training, record)
    x = jnp.stack([_pad_to(x, t_q) for x in xs])  # (G, B, T_q, E)
    src = None if srcs is None else jnp.stack([_pad_to(s, t_k) for s in srcs])  # (G, B, T_k, E)
    kpm = None
    if key_masks is not None:
      kpm = jnp.stack([jnp.pad(key_masks[i], ((0, 0), (0, t_k - key_masks[i].shape[1])))
                       for i in group])  # (G, B, T_k)
    bias = _hidden_bias(lengths, t_q, t_k, self.causal_mask)  # (G, T_q, T_k) or None
    keys = jnp.stack([_branch_key(key, i) for i in group]) if training else None
    axis = lambda a: None if a is None else 0
    out = jax.vmap(lambda *args: _branch(*args, st=st),
                   in_axes=(0, 0, 0, axis(src), axis(bias), axis(kpm), 0, axis(keys)))(
        take(layer_params), take(final_norm), x, src, bias, kpm,
        jnp.asarray(attn_rates, jnp.float32), keys)  # (G, B, T_q, E)
    out, weights = out if record else (out, None)
    outs = [out[i, :, :tq] for i, (tq, _) in enumerate(lengths)]  # padded queries cut off
    if not record:
      return outs, [None] * len(group)
    # (G, L, B, h, T_q, T_k) -> per branch, its real query rows and keys.
    return outs, [weights[i, :, :, :, :tq, :tk] for i, (tq, tk) in enumerate(lengths)]
