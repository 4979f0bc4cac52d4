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
leading branch axis G and a layer axis L) and computes it either vmapped over the branches with
the layers under `lax.scan` (pure functions below `_layer_norm`; few, large operations) or branch
by branch through `TransformerEncoder` (the per-branch Flax modules, layers unrolled). Both give
the same numbers (`tests/test_stacked.py`).

Attention maps for analysis are recorded only on request: applied with
`mutable=["intermediates"]`, a stack sows every layer's attention weights (see
`TransformerStack.__call__`); otherwise nothing is recorded.

LayerNorms use PyTorch's epsilon 1e-5. Arrays are batch-major (B, T, E) here; the reference is
time-major (T, B, E), which changes nothing in the maths.
"""

import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np

_LN_EPSILON = 1e-5  # torch.nn.LayerNorm default
_XAVIER_UNIFORM = nn.initializers.xavier_uniform()
_HIDDEN = -1e30  # added to the score of a key a query may not see: exp() of it is exactly 0


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


# ---------------------------------------------------------------- one branch as Flax modules


class MultiheadAttention(nn.Module):
  """Fairseq multi-head attention with a packed (q, k, v) input projection.

  Attributes:
    num_heads: number of heads h; head_dim = E / h.
    attn_dropout: dropout rate on the attention weights.
    query_block: with a causal mask, compute attention in blocks of this many query rows, each
      over only the keys it can see (`query_blocks`); 0 = one block.
  """
  num_heads: int
  attn_dropout: float = 0.0
  query_block: int = 0

  @nn.compact
  def __call__(self, query, key, value, *, causal: bool, key_mask: Optional[jax.Array],
               deterministic: bool):
    """query (B, T_q, E); key, value (B, T_k, E); key_mask (B, T_k) bool or None.

    causal: apply the future mask (query i sees keys j <= i + |T_k - T_q|).
    """
    b, t_q, e = query.shape
    t_k = key.shape[1]
    if e % self.num_heads:
      raise ValueError(f"embedding width {e} is not divisible by num_heads={self.num_heads}")
    head_dim = e // self.num_heads
    w = self.param("in_proj_kernel", _XAVIER_UNIFORM, (e, 3 * e))  # torch in_proj_weight.T
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * e,))
    # The key bias adds q.b_k to every score of a query row, which the softmax cancels: its
    # gradient is exactly 0. stop_gradient makes it exactly 0 in floating point too, so Adam does
    # not turn rounding noise into +-lr updates (runs on 1 and N devices would drift apart).
    bias = jnp.concatenate([bias[:e], jax.lax.stop_gradient(bias[e:2 * e]), bias[2 * e:]])
    if query is key and key is value:  # self-attention: one (E, 3E) product
      q, k, v = jnp.split(query @ w + bias, 3, axis=-1)
    elif key is value:  # cross-modal with one source: q, then k and v in one (E, 2E) product
      q = query @ w[:, :e] + bias[:e]  # (B, T_q, E)
      k, v = jnp.split(key @ w[:, e:] + bias[e:], 2, axis=-1)  # (B, T_k, E) each
    else:
      q = query @ w[:, :e] + bias[:e]
      k = key @ w[:, e:2 * e] + bias[e:2 * e]
      v = value @ w[:, 2 * e:] + bias[2 * e:]
    q = q * head_dim**-0.5
    q = q.reshape(b, t_q, self.num_heads, head_dim)
    k = k.reshape(b, t_k, self.num_heads, head_dim)
    v = v.reshape(b, t_k, self.num_heads, head_dim)
    dropout = nn.Dropout(self.attn_dropout)
    visible = future_mask(t_q, t_k) if causal else None  # (T_q, T_k)
    record = self.is_mutable_collection("intermediates")  # analysis only (TransformerStack)
    outs, recorded = [], []
    for q_start, q_end, k_end in query_blocks(t_q, t_k, causal, self.query_block):
      # (B, h, rows, k_end); Eq. 10 Q K^T / sqrt(d)
      scores = jnp.einsum("bqhc,bkhc->bhqk", q[:, q_start:q_end], k[:, :k_end])
      mask = None
      if causal:
        mask = visible[None, None, q_start:q_end, :k_end]  # (1, 1, rows, k_end)
      if key_mask is not None:
        padding = key_mask[:, None, None, :k_end]  # (B, 1, 1, k_end)
        mask = padding if mask is None else jnp.logical_and(mask, padding)
      if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
      weights = jax.nn.softmax(scores, axis=-1)
      if key_mask is not None:
        # A row with no visible key: zero weights instead of a uniform average over masked
        # keys. (The causal mask alone always leaves key 0 visible.)
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
      if record:
        recorded.append(jnp.pad(weights, ((0, 0), (0, 0), (0, 0), (0, t_k - k_end))))
      weights = dropout(weights, deterministic=deterministic)
      outs.append(jnp.einsum("bhqk,bkhc->bqhc", weights, v[:, :k_end]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    if record:  # pre-dropout weights (B, h, T_q, T_k)
      self.sow("intermediates", "attention_weights", jnp.concatenate(recorded, axis=2))
    return nn.Dense(e, kernel_init=_XAVIER_UNIFORM, bias_init=nn.initializers.zeros,
                    name="out_proj")(out.reshape(b, t_q, e))  # (B, T_q, E)


class TransformerEncoderLayer(nn.Module):
  """One pre-LN layer: (cross-)attention + FFN, each with a residual connection."""
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  query_block: int = 0

  @nn.compact
  def __call__(self, x, x_k=None, x_v=None, key_mask=None, causal: bool = True,
               deterministic: bool = True):
    """x (B, T_q, E); x_k, x_v (B, T_k, E) or None for self-attention; key_mask (B, T_k)."""
    e = x.shape[-1]
    norm_0 = nn.LayerNorm(epsilon=_LN_EPSILON, name="layer_norm_0")
    residual = x
    x = norm_0(x)
    if x_k is None:
      k = v = x
    elif x_k is x_v:  # no embedding dropout: key and value are one array, normalised once
      k = v = norm_0(x_k)
    else:
      k, v = norm_0(x_k), norm_0(x_v)  # the same LayerNorm on q, k and v, as coded
    x = MultiheadAttention(self.num_heads, self.attn_dropout, self.query_block,
                           name="self_attn")(
        x, k, v, causal=causal, key_mask=key_mask, deterministic=deterministic)
    x = nn.Dropout(self.res_dropout)(x, deterministic=deterministic)
    x = residual + x

    residual = x
    x = nn.LayerNorm(epsilon=_LN_EPSILON, name="layer_norm_1")(x)
    x = nn.Dense(4 * e, kernel_init=_XAVIER_UNIFORM, bias_init=nn.initializers.zeros, name="fc1")(x)
    x = nn.relu(x)  # (B, T_q, 4E)
    x = nn.Dropout(self.relu_dropout)(x, deterministic=deterministic)
    x = nn.Dense(e, kernel_init=_XAVIER_UNIFORM, bias_init=nn.initializers.zeros, name="fc2")(x)
    x = nn.Dropout(self.res_dropout)(x, deterministic=deterministic)
    return residual + x  # (B, T_q, E)


class TransformerEncoder(nn.Module):
  """MulT `TransformerEncoder`: self-attention if `source` is None, else cross-modal attention.

  Attributes:
    num_heads: attention heads.
    num_layers: number of layers.
    attn_dropout: dropout on attention weights (chosen by the caller from the SOURCE modality).
    relu_dropout, res_dropout, embed_dropout: the other dropout rates.
    causal_mask: apply the future mask with the |T_k - T_q| offset.
    query_block: causal attention in blocks of this many query rows (0 = off); see
      `query_blocks`. The same outputs, less work on long sequences.
  """
  num_heads: int
  num_layers: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  embed_dropout: float = 0.0
  causal_mask: bool = True
  query_block: int = 0
  remat: bool = False

  @nn.compact
  def __call__(self, x, source=None, *, key_mask=None, deterministic: bool):
    """Encodes a sequence.

    Args:
      x: (B, T_q, E) the query sequence (the target modality in a cross-modal block).
      source: (B, T_k, E) the key/value sequence of a cross-modal block, or None.
      key_mask: optional (B, T_k) bool frame mask of the keys (x's own mask for self-attention);
        None means every key is visible (the DMD code).
      deterministic: disables dropout.

    Returns:
      (B, T_q, E) the encoded query sequence (after the final LayerNorm).
    """
    e = x.shape[-1]
    scale = math.sqrt(e)
    embed_dropout = nn.Dropout(self.embed_dropout)
    h = scale * x + positional_embedding(x)  # (B, T_q, E)
    h = embed_dropout(h, deterministic=deterministic)
    if source is not None:
      if source.shape[-1] != e:
        raise ValueError(f"cross-modal source width {source.shape[-1]} != query width {e}")
      src = scale * source + positional_embedding(source)  # (B, T_k, E)
      h_k = embed_dropout(src, deterministic=deterministic)  # separate masks for k and v
      h_v = embed_dropout(src, deterministic=deterministic)
      t_k = source.shape[1]
    else:
      h_k = h_v = None
      t_k = x.shape[1]

    if key_mask is not None:
      key_mask = key_mask.astype(bool)
      if key_mask.shape != (x.shape[0], t_k):
        raise ValueError(f"key_mask has shape {key_mask.shape}; expected (B, T_k) = "
                         f"{(x.shape[0], t_k)}")
    # remat: each layer's activations are recomputed in the backward pass (causal and
    # deterministic are static: positions 5 and 6 counting self).
    layer_cls = (nn.remat(TransformerEncoderLayer, static_argnums=(5, 6)) if self.remat
                 else TransformerEncoderLayer)
    for i in range(self.num_layers):
      h = layer_cls(
          self.num_heads, self.attn_dropout, self.relu_dropout, self.res_dropout,
          self.query_block, name=f"layers_{i}")(
              h, h_k, h_v, key_mask, self.causal_mask, deterministic)
    return nn.LayerNorm(epsilon=_LN_EPSILON, name="layer_norm")(h)  # (B, T_q, E)


# ---------------------------------------------------------------- one branch, one layer (pure)


def _layer_norm(x, scale, bias):
  """torch.nn.LayerNorm over the last axis (epsilon 1e-5), variance as E[x^2] - E[x]^2 (Flax)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
  return (x - mean) * jax.lax.rsqrt(var + _LN_EPSILON) * scale + bias


def _keep_mask(key, keep_prob, shape):
  """Bernoulli(keep_prob) mask and its exact keep probability, from 16-bit uniform draws.

  A threefry key: every 64-bit threefry block gives four 16-bit draws (jax.random.bernoulli
  spends one block per element), so the attention-sized masks cost a quarter of the random-
  number work. keep_prob is quantised to multiples of 2^-16 and the exact quantised value is
  returned for the rescaling, so the dropout stays unbiased (0.6 -> 0.600006). Other key types
  (rbg) use jax.random.bernoulli.
  """
  data = jax.random.key_data(key)
  if data.shape != (2,):
    return jax.random.bernoulli(key, keep_prob, shape), keep_prob
  n = math.prod(shape)
  words = (n + 1) // 2 + ((n + 1) // 2) % 2  # uint32 words, an even count (two per block)
  bits = jax_random_ext.threefry_2x32(data, jnp.arange(words, dtype=jnp.uint32))
  draws = jnp.stack([bits & 0xFFFF, bits >> 16], axis=-1).reshape(-1)[:n].reshape(shape)
  threshold = jnp.round(keep_prob * 65536.0)  # keep iff draw < threshold
  return draws.astype(jnp.float32) < threshold, threshold / 65536.0


def _dropout(x, rate, key, active: bool):
  """Inverted dropout with a traced rate (one per branch under vmap); `active` is static."""
  if not active:
    return x
  keep, keep_prob = _keep_mask(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / keep_prob, 0.0)


class _Static(NamedTuple):
  """What the traced layer needs to know at trace time (hashable)."""
  num_heads: int
  blocks: tuple  # query_blocks(...)
  attn_dropout: bool  # some branch of the group has attention dropout and training is on
  relu_dropout: bool
  res_dropout: bool
  record: bool = False  # also return the attention weights (analysis; see TransformerStack)


def _attention(p, x, k_in, v_in, bias, key_mask, rate, keys, st: _Static):
  """Multi-head attention of one branch. x (B, T_q, E); k_in, v_in (B, T_k, E); bias (T_q, T_k)
  additive mask (0 visible, -1e30 hidden); key_mask (B, T_k) bool or None; keys: one dropout
  key per query block. With `st.record`, returns (output, pre-dropout weights (B, h, T_q, T_k))."""
  b, t_q, e = x.shape
  h = st.num_heads
  hd = e // h
  w, wb = p["in_proj_kernel"], p["in_proj_bias"]  # (E, 3E), (3E,)
  # Heads laid out once, head-major, straight out of the projection: (B, h, T, hd).
  q = jnp.einsum("bte,ehc->bhtc", x, (w[:, :e] * hd**-0.5).reshape(e, h, hd))
  q = q + (wb[:e] * hd**-0.5).reshape(h, 1, hd)
  # The key bias adds q.b_k to every score of a query row, which the softmax cancels: its
  # gradient is exactly 0. stop_gradient makes it exactly 0 in floating point too, so Adam does
  # not turn rounding noise into +-lr updates (runs on 1 and N devices would drift apart).
  k = jnp.einsum("bte,ehc->bhtc", k_in, w[:, e:2 * e].reshape(e, h, hd))
  k = k + jax.lax.stop_gradient(wb[e:2 * e]).reshape(h, 1, hd)
  v = jnp.einsum("bte,ehc->bhtc", v_in, w[:, 2 * e:].reshape(e, h, hd))
  v = v + wb[2 * e:].reshape(h, 1, hd)
  outs, recorded = [], []
  for i, (q0, q1, k_end) in enumerate(st.blocks):
    scores = jnp.einsum("bhqc,bhkc->bhqk", q[:, :, q0:q1], k[:, :, :k_end])  # Eq. 10 QK^T/sqrt(d)
    scores = scores + bias[q0:q1, :k_end]
    if key_mask is not None:
      scores = jnp.where(key_mask[:, None, None, :k_end], scores, _HIDDEN)
    weights = jax.nn.softmax(scores, axis=-1)  # (B, h, rows, k_end)
    if key_mask is not None:
      # A row with no visible key: zero weights instead of a uniform average over masked keys.
      visible = jnp.logical_and(key_mask[:, None, None, :k_end], bias[q0:q1, :k_end] == 0)
      weights = jnp.where(jnp.any(visible, axis=-1, keepdims=True), weights, 0.0)
    if st.record:
      recorded.append(jnp.pad(weights, ((0, 0), (0, 0), (0, 0), (0, k_in.shape[1] - k_end))))
    weights = _dropout(weights, rate, keys[i], st.attn_dropout)
    outs.append(jnp.einsum("bhqk,bhkc->bqhc", weights, v[:, :, :k_end]))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)  # (B, T_q, h, hd)
  out = out.reshape(b, t_q, e) @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
  return (out, jnp.concatenate(recorded, axis=2)) if st.record else out


_LAYER_SITES = 3  # dropout keys of a layer besides the attention's: res, relu, res


def _encoder_layer(p, x, k_src, v_src, bias, key_mask, rates, keys, st: _Static):
  """One pre-LN layer of one branch: (cross-)attention + FFN, each with a residual connection.
  rates: (attn, relu, res) dropout rates of this branch; keys: _LAYER_SITES + one per query
  block (drawn once for all sites: every `fold_in` or `split` is a threefry hash of its own)."""
  attn_rate, relu_rate, res_rate = rates
  norm_0 = lambda y: _layer_norm(y, p["layer_norm_0"]["scale"], p["layer_norm_0"]["bias"])
  residual = x
  x = norm_0(x)
  if k_src is None:
    k_in = v_in = x
  else:
    k_in, v_in = norm_0(k_src), norm_0(v_src)  # the same LayerNorm on q, k and v, as coded
  x = _attention(p["self_attn"], x, k_in, v_in, bias, key_mask, attn_rate,
                 keys[_LAYER_SITES:], st)
  if st.record:
    x, weights = x
  x = residual + _dropout(x, res_rate, keys[0], st.res_dropout)
  residual = x
  x = _layer_norm(x, p["layer_norm_1"]["scale"], p["layer_norm_1"]["bias"])
  x = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])  # (B, T_q, 4E)
  x = _dropout(x, relu_rate, keys[1], st.relu_dropout)
  x = x @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  x = residual + _dropout(x, res_rate, keys[2], st.res_dropout)
  return (x, weights) if st.record else x


def _stack_masks(lengths, t_q, t_k, causal):
  """(G, T_q, T_k) additive masks: the causal rule of each branch's REAL lengths, and no weight
  on the keys past a branch's real length (padding added to stack it)."""
  masks = np.zeros((len(lengths), t_q, t_k), np.float32)
  for g, (tq, tk) in enumerate(lengths):
    visible = np.zeros((t_q, t_k), bool)
    visible[:, :tk] = True
    if causal:
      visible[:, :tk] &= np.arange(tk)[None, :] <= np.arange(t_q)[:, None] + abs(tk - tq)
    masks[g][~visible] = _HIDDEN
  return jnp.asarray(masks)


def _split_tree(tree, n):
  """n trees of the slices of every leaf along axis 0, that axis dropped (one `split` per leaf:
  its gradient is one concatenate, not a pad + add per slice)."""
  leaves, treedef = jax.tree.flatten(tree)
  parts = [[jnp.squeeze(piece, 0) for piece in jnp.split(leaf, n, axis=0)] for leaf in leaves]
  return [treedef.unflatten([p[i] for p in parts]) for i in range(n)]


def _per_branch_tree(layer_params, final_norm, num_layers):
  """One branch's stacked parameters (L, ...) -> the `TransformerEncoder` tree: the per-layer
  tree `_params` builds is already a `TransformerEncoderLayer`'s, so each layer's slice is
  `layers_{i}` as it is."""
  layers = _split_tree(layer_params, num_layers)
  return {"layer_norm": final_norm, **{f"layers_{i}": p for i, p in enumerate(layers)}}


def _pad_to(x, t):
  return x if x.shape[1] == t else jnp.pad(x, ((0, 0), (0, t - x.shape[1]), (0, 0)))


class TransformerStack(nn.Module):
  """G MulT transformer encoders of one kind (same width, heads and depth), computed as one.

  Every parameter has a leading branch axis G and, inside a layer, a layer axis L: the branches
  run under `jax.vmap` and the layers under `jax.lax.scan`, so one layer body is traced and
  compiled once for all G x L layers. Branches whose lengths differ by at most `slack` are zero-
  padded to a common length with exact masks (padded keys get no weight, the causal offset and
  the positions stay those of each branch's real lengths, padded query rows are cut off before
  returning); branches of very different lengths are computed in separate groups.

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
    slack: largest padded/real length ratio inside one group (see `plan_groups`).
    compute: how the same parameters are computed. "vmap": each group of branches as one
      vmapped computation with the layers under `lax.scan` (few, large operations: compiles in
      seconds, and what a GPU wants); "loop": every branch on its own with the layers unrolled
      (the same numbers; many small independent operations, which a CPU runtime overlaps on
      its cores, at the cost of compile time).
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
    layer_params, final_norm = self._params(g_all, e)
    key = None if deterministic else self.make_rng("dropout")

    lengths = [(x.shape[1], s.shape[1]) for x, s in zip(xs, srcs)]
    if self.compute not in ("vmap", "loop"):  # the model's config is checked in ModelSettings
      raise ValueError(f"TransformerStack.compute must be 'vmap' or 'loop', got "
                       f"{self.compute!r}")
    outputs = [None] * g_all
    attention = [None] * g_all
    if self.compute == "loop":
      # One branch at a time: split (not sliced) out of the stacked parameters, so the backward
      # pass joins the gradients with one concatenate instead of a pad + add per branch.
      per_branch = zip(_split_tree(layer_params, g_all), _split_tree(final_norm, g_all))
      for g, (lp, fn) in enumerate(per_branch):
        encoder = TransformerEncoder(
            self.num_heads, self.num_layers, attn_dropout=rates[g],
            relu_dropout=self.relu_dropout, res_dropout=self.res_dropout,
            embed_dropout=self.embed_dropout, causal_mask=self.causal_mask,
            query_block=self.query_block, remat=self.remat)
        outputs[g] = encoder.apply(
            {"params": _per_branch_tree(lp, fn, self.num_layers)}, xs[g],
            srcs[g] if cross else None, key_mask=None if key_masks is None else key_masks[g],
            deterministic=deterministic,
            rngs=None if key is None else {"dropout": jax.random.fold_in(key, g)},
            mutable=["intermediates"] if record else False)
        if record:
          outputs[g], sown = outputs[g]
          attention[g] = jnp.stack(
              [sown["intermediates"][f"layers_{i}"]["self_attn"]["attention_weights"][0]
               for i in range(self.num_layers)])  # (L, B, h, T_q, T_k)
      if record:
        self.sow("intermediates", "attention", tuple(attention))
      return outputs[0] if single else outputs
    for n, group in enumerate(plan_groups(lengths, self.slack)):
      if group == list(range(group[0], group[-1] + 1)):  # contiguous: a slice
        take = lambda tree, lo=group[0], hi=group[-1] + 1: jax.tree.map(lambda a: a[lo:hi], tree)
      else:
        idx = np.asarray(group)
        take = lambda tree, idx=idx: jax.tree.map(lambda a: a[idx], tree)
      if len(group) == g_all:
        take = lambda tree: tree
      out = self._group(
          take(layer_params), take(final_norm), [xs[i] for i in group],
          [srcs[i] for i in group] if cross else None,
          None if key_masks is None else [key_masks[i] for i in group],
          [rates[i] for i in group], None if key is None else jax.random.fold_in(key, n), record)
      if record:
        out, weights = out
        for i, w in zip(group, weights):
          attention[i] = w
      for i, o in zip(group, out):
        outputs[i] = o
    if record:
      self.sow("intermediates", "attention", tuple(attention))
    return outputs[0] if single else outputs

  def _group(self, layer_params, final_norm, xs, srcs, key_masks, attn_rates, key,
             record=False):
    """One group of branches, zero-padded to its longest, as one vmapped, scanned computation.
    With `record`, also every branch's attention weights (L, B, h, T_q, T_k), padding cut off."""
    lengths = [(x.shape[1], (x if srcs is None else s).shape[1])
               for x, s in zip(xs, srcs or xs)]
    t_q = max(tq for tq, _ in lengths)
    t_k = max(tk for _, tk in lengths)
    e = xs[0].shape[-1]
    scale = math.sqrt(e)
    training = key is not None
    st = _Static(
        num_heads=self.num_heads,
        blocks=tuple(query_blocks(t_q, t_k, self.causal_mask, self.query_block, lengths)),
        attn_dropout=training and any(r > 0 for r in attn_rates),
        relu_dropout=training and self.relu_dropout > 0,
        res_dropout=training and self.res_dropout > 0, record=record)
    embed_on = training and self.embed_dropout > 0
    x = jnp.stack([_pad_to(x, t_q) for x in xs])  # (G, B, T_q, E)
    src = None if srcs is None else jnp.stack([_pad_to(s, t_k) for s in srcs])  # (G, B, T_k, E)
    kpm = None
    if key_masks is not None:
      kpm = jnp.stack([jnp.pad(km, ((0, 0), (0, t_k - km.shape[1]))) for km in key_masks])
    bias = _stack_masks(lengths, t_q, t_k, self.causal_mask)  # (G, T_q, T_k)
    g = len(xs)
    rates = jnp.asarray([[r, self.relu_dropout, self.res_dropout] for r in attn_rates],
                        jnp.float32)  # (G, 3)
    keys = jax.random.split(key if training else jax.random.key(0), g)
    embed_rate = jnp.float32(self.embed_dropout)

    num_sites = _LAYER_SITES + len(st.blocks)

    def branch(p, norm, x, src, bias, kpm, rates, key):
      # Every dropout key of the branch from one split (3 embedding + per layer num_sites).
      keys = jax.random.split(key, 3 + self.num_layers * num_sites)
      layer_keys = keys[3:].reshape(self.num_layers, num_sites)
      # Input embedding: sqrt(E) x + PE(x) (padded frames are zero: PE 0 by the padding rule).
      h = _dropout(scale * x + positional_embedding(x), embed_rate, keys[0], embed_on)
      h_k = h_v = None
      if src is not None:
        s = scale * src + positional_embedding(src)
        h_k = _dropout(s, embed_rate, keys[1], embed_on)  # separate masks for k and v
        h_v = _dropout(s, embed_rate, keys[2], embed_on)
      rate_tuple = (rates[0], rates[1], rates[2])

      def layer(h, xs_l):
        p_l, k_l = xs_l
        out = _encoder_layer(p_l, h, h_k, h_v, bias, kpm, rate_tuple, k_l, st)
        return out if st.record else (out, None)  # (h, per-layer weights when recording)

      if self.remat:  # prevent_cse=False: inside scan, CSE cannot undo the recomputation
        layer = jax.checkpoint(layer, prevent_cse=False)
      h, weights = jax.lax.scan(layer, h, (p, layer_keys))
      return _layer_norm(h, norm["scale"], norm["bias"]), weights

    in_axes = (0, 0, 0, None if src is None else 0, 0, None if kpm is None else 0, 0, 0)
    out, weights = jax.vmap(branch, in_axes=in_axes)(
        layer_params, final_norm, x, src, bias, kpm, rates, keys)  # (G, B, T_q, E)
    out = [out[i, :, :tq] for i, (tq, _) in enumerate(lengths)]  # padded queries cut off
    if not record:
      return out
    # (G, L, B, h, T_q, T_k) -> per branch, its real query rows and keys.
    return out, [weights[i, :, :, :, :tq, :tk] for i, (tq, tk) in enumerate(lengths)]
