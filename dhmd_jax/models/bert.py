"""BERT (Devlin et al. 2019) as Hugging Face's `BertModel` computes it, for the text path.

The DMD code (its `BertTextEncoder`; docs/bert.md) runs `bert-base-uncased` on the `text_bert`
token ids of the MMSA pickles and fine-tunes it with the rest of the model at the same Adam
learning rate; its `last_hidden_state` (B, T, H) replaces the precomputed `text` features. This
is that network, layer for layer (`transformers.models.bert.modeling_bert`, absolute positions,
no cache, encoder only):

  embeddings: LayerNorm(word[ids] + token_type[segments] + position[0..T-1]) -> dropout
  layer i (post-LN): a = LayerNorm(x + dropout(W_o MHA(x, mask)))
                     x = LayerNorm(a + dropout(W_2 gelu_erf(W_1 a)))
  MHA: per head softmax(q k^T / sqrt(H / heads) + mask) v, masked keys at the dtype's minimum,
       dropout on the attention probabilities.
  pooler (built only when asked): tanh(W x[:, 0]), unused by DMD but part of its parameter count.

LayerNorms use epsilon from the checkpoint's config.json (1e-12) and the two-pass variance, as
PyTorch does. Parameter names mirror the Hugging Face state dict (`encoder.layer.3.attention.self.
query.weight` is `encoder/layer_3/attention/self/query/kernel`, transposed), so
`bert_weights.py` maps a checkpoint onto them by rule. Random initialisation is Hugging Face's
(`_init_weights`): N(0, 0.02) kernels and embeddings, zero biases and padding row, LayerNorm 1/0.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhmd_jax.data import DataError

_INIT = nn.initializers.normal(stddev=0.02)  # BertConfig.initializer_range


@dataclasses.dataclass(frozen=True)
class BertSettings:
  """Architecture (from config.json or config.model.bert.random_arch) and where the weights are."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  pooler: bool = False  # build the pooler (only its parameter count matters to DMD)
  checkpoint: str = ""  # local Hugging Face folder the weights come from; "" = random init

  def validate(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_positions", "type_vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"BERT {name} = {getattr(self, name)} must be >= 1")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BERT hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_heads}")


def _dense(features, name):
  return nn.Dense(features, kernel_init=_INIT, bias_init=nn.initializers.zeros, name=name)


def _layer_norm(eps, name):
  # Two-pass variance (PyTorch's), not Flax's default E[x^2] - E[x]^2.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class _Embedding(nn.Module):
  """An embedding table (`embedding` (N, H)); ids outside [0, N) give NaN rows, never a silently
  clipped row (`jnp.take`'s fill mode), so a wrong vocabulary stops training at the first step.

  `padding_idx` is PyTorch's `nn.Embedding(padding_idx=...)`, as BERT's word embeddings use it:
  that row starts at zero (random init) and never receives a gradient.
  """
  num: int
  features: int
  padding_idx: Optional[int] = None

  @nn.compact
  def __call__(self, ids):
    def init(key, shape, dtype=jnp.float32):
      table = _INIT(key, shape, dtype)
      return table if self.padding_idx is None else table.at[self.padding_idx].set(0.0)
    table = self.param("embedding", init, (self.num, self.features))
    x = jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)  # (..., H)
    if self.padding_idx is not None:
      x = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(x), x)
    return x


class _Embeddings(nn.Module):
  s: BertSettings

  @nn.compact
  def __call__(self, ids, segments, *, deterministic):  # (B, T) int32 -> (B, T, H)
    s = self.s
    positions = jnp.arange(ids.shape[1])
    x = _Embedding(s.vocab_size, s.hidden_size, s.pad_token_id, name="word_embeddings")(ids)
    x = x + _Embedding(s.type_vocab_size, s.hidden_size, name="token_type_embeddings")(segments)
    x = x + _Embedding(s.max_positions, s.hidden_size, name="position_embeddings")(positions)
    x = _layer_norm(s.layer_norm_eps, "LayerNorm")(x)
    return nn.Dropout(s.hidden_dropout)(x, deterministic=deterministic)


class _SelfAttention(nn.Module):
  s: BertSettings

  @nn.compact
  def __call__(self, x, key_mask, *, deterministic):  # (B, T, H), (B, T) bool -> (B, T, H)
    s = self.s
    b, t, h = x.shape
    head_dim = h // s.num_heads
    split = lambda y: y.reshape(b, t, s.num_heads, head_dim)  # (B, T, heads, dh)
    q = split(_dense(h, "query")(x))
    k = split(_dense(h, "key")(x))
    v = split(_dense(h, "value")(x))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) * (head_dim ** -0.5)  # (B, heads, T, T)
    # Masked keys get the dtype's minimum (Hugging Face's additive mask): a row with no real key
    # becomes uniform, as there.
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(s.attention_dropout)(probs, deterministic=deterministic)
    return jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, t, h)


class _Residual(nn.Module):
  """`BertSelfOutput` / `BertOutput`: LayerNorm(residual + dropout(Dense(x)))."""
  s: BertSettings

  @nn.compact
  def __call__(self, x, residual, *, deterministic):
    y = _dense(self.s.hidden_size, "dense")(x)
    y = nn.Dropout(self.s.hidden_dropout)(y, deterministic=deterministic)
    return _layer_norm(self.s.layer_norm_eps, "LayerNorm")(y + residual)


class _Attention(nn.Module):
  s: BertSettings

  @nn.compact
  def __call__(self, x, key_mask, *, deterministic):
    a = _SelfAttention(self.s, name="self")(x, key_mask, deterministic=deterministic)
    return _Residual(self.s, name="output")(a, x, deterministic=deterministic)


class _Intermediate(nn.Module):
  s: BertSettings

  @nn.compact
  def __call__(self, x):
    return jax.nn.gelu(_dense(self.s.intermediate_size, "dense")(x), approximate=False)


class _Layer(nn.Module):
  s: BertSettings

  @nn.compact
  def __call__(self, x, key_mask, *, deterministic):  # (B, T, H) -> (B, T, H)
    a = _Attention(self.s, name="attention")(x, key_mask, deterministic=deterministic)
    ff = _Intermediate(self.s, name="intermediate")(a)
    return _Residual(self.s, name="output")(ff, a, deterministic=deterministic)


class _Encoder(nn.Module):
  s: BertSettings

  @nn.compact
  def __call__(self, x, key_mask, *, deterministic):
    for i in range(self.s.num_layers):
      x = _Layer(self.s, name=f"layer_{i}")(x, key_mask, deterministic=deterministic)
    return x


class _Pooler(nn.Module):
  s: BertSettings

  @nn.compact
  def __call__(self, x):  # (B, T, H) -> (B, H): Dense of the first ([CLS]) token, before tanh
    return _dense(self.s.hidden_size, "dense")(x[:, 0])


class BertEncoder(nn.Module):
  """`BertModel(...).last_hidden_state` of MMSA's `text_bert` rows (and the pooled output)."""
  settings: BertSettings

  @nn.compact
  def __call__(self, text_bert, *, deterministic: bool):
    """Runs BERT.

    Args:
      text_bert: (B, 3, T) [input_ids, attention_mask, token_type_ids], integer or float (MMSA
        stores floats; ids are truncated to integers as the reference's `.long()` does).
      deterministic: disables dropout.

    Returns:
      (last_hidden_state (B, T, H), pooled (B, H) or None when the pooler is not built).
    """
    s = self.settings
    text_bert = jnp.asarray(text_bert)
    if text_bert.ndim != 3 or text_bert.shape[1] != 3:
      raise DataError(f"text_bert has shape {text_bert.shape}; expected (B, 3, T) "
                           f"[input_ids, attention_mask, segment_ids] as MMSA stores them")
    if text_bert.shape[2] > s.max_positions:
      raise DataError(
          f"text_bert has {text_bert.shape[2]} tokens per sample, more than this BERT's "
          f"{s.max_positions} positions (max_position_embeddings): truncate the sequences")
    ids = text_bert[:, 0].astype(jnp.int32)  # (B, T)
    key_mask = text_bert[:, 1] > 0.5  # (B, T) bool, True = real token
    segments = text_bert[:, 2].astype(jnp.int32)  # (B, T)
    x = _Embeddings(s, name="embeddings")(ids, segments, deterministic=deterministic)
    x = _Encoder(s, name="encoder")(x, key_mask, deterministic=deterministic)  # (B, T, H)
    pooled = jnp.tanh(_Pooler(s, name="pooler")(x)) if s.pooler else None  # (B, H)
    return x, pooled

