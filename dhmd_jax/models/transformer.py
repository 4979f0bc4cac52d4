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

LayerNorms use PyTorch's epsilon 1e-5. Arrays are batch-major (B, T, E) here; the reference is
time-major (T, B, E), which changes nothing in the maths.
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

_LN_EPSILON = 1e-5  # torch.nn.LayerNorm default
_XAVIER = nn.initializers.xavier_uniform()


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


def query_blocks(t_q: int, t_k: int, causal: bool, block: int):
  """Static (q_start, q_end, k_end) blocks: query rows [q_start, q_end) need keys [0, k_end).

  With the causal mask, query i sees keys j <= i + |T_k - T_q|, so a block of queries never needs
  the keys past its last row's horizon: computing attention block by block skips the keys that
  are masked for the whole block (about half of a long square score matrix) and gives the same
  result, since a masked key gets exactly zero weight. `block <= 0`, no causal mask, or a block
  that would not skip anything gives one block over everything.
  """
  if not causal or block <= 0 or t_q <= block:
    return [(0, t_q, t_k)]
  offset = abs(t_k - t_q)
  blocks = [(start, min(start + block, t_q), min(t_k, min(start + block, t_q) + offset))
            for start in range(0, t_q, block)]
  if all(k_end == t_k for _, _, k_end in blocks):
    return [(0, t_q, t_k)]
  return blocks


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
    w = self.param("in_proj_kernel", _XAVIER, (e, 3 * e))  # torch in_proj_weight.T
    bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * e,))
    q = query @ w[:, :e] + bias[:e]  # (B, T_q, E)
    # The key bias adds q.b_k to every score of a query row, which the softmax cancels: its
    # gradient is exactly 0. stop_gradient makes it exactly 0 in floating point too, so Adam does
    # not turn rounding noise into +-lr updates (runs on 1 and N devices would drift apart).
    k = key @ w[:, e:2 * e] + jax.lax.stop_gradient(bias[e:2 * e])  # (B, T_k, E)
    v = value @ w[:, 2 * e:] + bias[2 * e:]  # (B, T_k, E)
    q = q * head_dim**-0.5
    q = q.reshape(b, t_q, self.num_heads, head_dim)
    k = k.reshape(b, t_k, self.num_heads, head_dim)
    v = v.reshape(b, t_k, self.num_heads, head_dim)
    dropout = nn.Dropout(self.attn_dropout)
    visible = future_mask(t_q, t_k) if causal else None  # (T_q, T_k)
    outs = []
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
      weights = dropout(weights, deterministic=deterministic)
      outs.append(jnp.einsum("bhqk,bkhc->bqhc", weights, v[:, :k_end]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return nn.Dense(e, kernel_init=_XAVIER, bias_init=nn.initializers.zeros,
                    name="out_proj")(out.reshape(b, t_q, e))  # (B, T_q, E)


class TransformerEncoderLayer(nn.Module):
  """One pre-LN layer: (cross-)attention + FFN, each with a residual connection."""
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  query_block: int = 0

  @nn.compact
  def __call__(self, x, x_k=None, x_v=None, *, causal: bool, key_mask=None,
               deterministic: bool):
    """x (B, T_q, E); x_k, x_v (B, T_k, E) or None for self-attention; key_mask (B, T_k)."""
    e = x.shape[-1]
    norm_0 = nn.LayerNorm(epsilon=_LN_EPSILON, name="layer_norm_0")
    residual = x
    x = norm_0(x)
    if x_k is None:
      k = v = x
    else:
      k, v = norm_0(x_k), norm_0(x_v)  # the same LayerNorm on q, k and v, as coded
    x = MultiheadAttention(self.num_heads, self.attn_dropout, self.query_block,
                           name="self_attn")(
        x, k, v, causal=causal, key_mask=key_mask, deterministic=deterministic)
    x = nn.Dropout(self.res_dropout)(x, deterministic=deterministic)
    x = residual + x

    residual = x
    x = nn.LayerNorm(epsilon=_LN_EPSILON, name="layer_norm_1")(x)
    x = nn.Dense(4 * e, kernel_init=_XAVIER, bias_init=nn.initializers.zeros, name="fc1")(x)
    x = nn.relu(x)  # (B, T_q, 4E)
    x = nn.Dropout(self.relu_dropout)(x, deterministic=deterministic)
    x = nn.Dense(e, kernel_init=_XAVIER, bias_init=nn.initializers.zeros, name="fc2")(x)
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
    for i in range(self.num_layers):
      h = TransformerEncoderLayer(
          self.num_heads, self.attn_dropout, self.relu_dropout, self.res_dropout,
          self.query_block, name=f"layers_{i}")(
              h, h_k, h_v, causal=self.causal_mask, key_mask=key_mask,
              deterministic=deterministic)
    return nn.LayerNorm(epsilon=_LN_EPSILON, name="layer_norm")(h)  # (B, T_q, E)
