"""Cross-modal dictionary matching, HoDM and HeDM (paper Sec. 3.3, Eq. 11-12; no public code).

One learnable dictionary D (K x C) per feature space, shared by the three modalities
("distinct dictionaries within each enhanced feature space"). For each modality's sequence
Z_m (T x C):

  A_m = Z_m D^T                     (T x K) relevance of every time step to every element
  a_m = max_t A_m[t, :]             (K,)    column-wise max-pool over time
  alpha_m = softmax(a_m)            (K,)    Eq. 11
  Z^_m = sum_k alpha_m^k D_k        (C,)    Eq. 12

Choices the paper leaves open (each documented in docs/fidelity.md):
* inputs: HoDM takes c_m (B, T'_m, d), the decoupled homogeneous features (the paper's
  z_m = X~_m^com); HeDM takes the memory-transformer output sequence (B, T'_m, 2d), the reinforced
  features Z~_{->m}^prt that also feed HeGD;
* no query projection and no temperature; `score_scale="sqrt_dim"` multiplies A by 1/sqrt(C)
  as FDT does (default "none", the paper);
* D is initialised xavier-normal (FDT's choice);
* the max-pool skips padded time steps only when a frame mask is given (the model passes one
  when `config.model.key_padding_mask` is on); a sequence with no real step gets uniform alpha;
* `detach_input` stops gradients from this branch into Z (the svliy/mmsa experiment detaches).
"""

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class DictionaryMatching(nn.Module):
  """Dictionary matching over the three modalities of one feature space.

  Attributes:
    num_elements: K.
    score_scale: "none" or "sqrt_dim".
    detach_input: stop gradients into the input sequences.
  """
  num_elements: int
  score_scale: str = "none"
  detach_input: bool = False

  @nn.compact
  def __call__(self, sequences: Sequence[jax.Array],
               masks: Optional[Sequence[jax.Array]] = None):
    """Matches each modality's sequence against the shared dictionary.

    Args:
      sequences: tuple (l, v, a) of (B, T_m, C) arrays (T_m may differ).
      masks: optional tuple of (B, T_m) bool frame masks; None pools over every step.

    Returns:
      weights alpha (B, 3, K) (rows sum to 1) and reconstructions Z^ (B, 3, C).
    """
    c = sequences[0].shape[-1]
    dictionary = self.param("dictionary", nn.initializers.xavier_normal(),
                            (self.num_elements, c))  # (K, C)
    # "none" or "sqrt_dim" (validated once, against configs/default.py RULES).
    scale = 1.0 / math.sqrt(c) if self.score_scale == "sqrt_dim" else 1.0
    pooled = []
    for idx, z in enumerate(sequences):
      if self.detach_input:
        z = jax.lax.stop_gradient(z)
      scores = jnp.einsum("btc,kc->btk", z, dictionary) * scale  # (B, T, K)  A_m = Z D^T
      if masks is None:
        a = jnp.max(scores, axis=1)  # (B, K)
      else:
        real = masks[idx].astype(bool)[:, :, None]  # (B, T, 1)
        a = jnp.max(jnp.where(real, scores, jnp.finfo(scores.dtype).min), axis=1)  # (B, K)
        a = jnp.where(jnp.any(real, axis=1), a, 0.0)  # no real step: uniform alpha
      pooled.append(a)
    a = jnp.stack(pooled, axis=1)  # (B, 3, K)
    alpha = jax.nn.softmax(a, axis=-1)  # (B, 3, K)  Eq. 11
    recon = alpha @ dictionary  # (B, 3, C)  Eq. 12
    return alpha, recon
