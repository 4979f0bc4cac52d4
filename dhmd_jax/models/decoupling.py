"""Multimodal feature decoupling (paper Sec. 3.1, Eq. 1-3), as coded in DMD's `dmd.py`.

* `TemporalProjection` is C_m: one Conv1d per modality, VALID padding, no bias, kernel k_m, to the
  common width d. T'_m = T_m - k_m + 1.
* `conv_frame_mask` carries a (B, T) frame mask through that conv: a T' frame is real only when
  EVERY input frame under its window is real. With this rule no padded value reaches a frame
  marked real, so the opt-in key-padding mask makes the attention outputs independent of padding.
  (The DMD code has no masks at all; zero padding simply flows through.)
* `FeatureDecoupling` holds the ONE shared encoder E^com (`encoder_c`), the three private
  encoders E_m^prt (`encoder_s_{l,v,a}`) and the three decoders D_m (`decoder_{l,v,a}`), all
  Conv1d with kernel 1 and no bias (purely linear, as coded). The decoder input is the channel
  concatenation [s_m, c_m] (private first, as coded; the paper writes [com, prt]). The
  self-regression re-encodes the reconstruction with the SAME private encoder:
  s_r_m = E_m^prt(D_m([s_m, c_m])) (the second argument of Eq. 3).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhmd_jax.names import MODALITY_KEYS

from dhmd_jax.models.heads import TORCH_CONV_INIT



def conv_frame_mask(mask: jax.Array, kernel_size: int) -> jax.Array:
  """(B, T) bool -> (B, T - k + 1) bool: a VALID-conv frame is real iff its whole window is."""
  t_out = mask.shape[1] - kernel_size + 1
  windows = jnp.stack([mask[:, i:i + t_out] for i in range(kernel_size)], axis=0)  # (k, B, T')
  return jnp.all(windows, axis=0)


class Conv1dValid(nn.Module):
  """Conv1d with VALID padding and no bias, written as k shifted matrix products.

  The parameter is `kernel` (k, C_in, C_out), as `flax.linen.Conv` stores it. Written with
  matmuls instead of `lax.conv` because the seeds train under `jax.vmap`: a vmapped convolution
  with per-seed weights becomes a grouped convolution, which XLA's CPU backend runs an order of
  magnitude slower, while vmapped matmuls stay batched matmuls.
  """
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x):  # (B, T, C_in) -> (B, T - k + 1, C_out)
    k = self.kernel_size
    kernel = self.param("kernel", TORCH_CONV_INIT, (k, x.shape[-1], self.features))
    t_out = x.shape[1] - k + 1
    out = x[:, :t_out] @ kernel[0]
    for i in range(1, k):
      out = out + x[:, i:i + t_out] @ kernel[i]
    return out


class TemporalProjection(nn.Module):
  """C_m: Conv1d(D_m -> d, kernel k, VALID, no bias). (B, T, D_m) -> (B, T - k + 1, d)."""
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x):
    return Conv1dValid(self.features, self.kernel_size, name="conv")(x)


def _pointwise(features: int, name: str) -> Conv1dValid:
  """Conv1d(kernel 1, no bias), PyTorch default init."""
  return Conv1dValid(features, 1, name=name)


class Decoupled(NamedTuple):
  """Outputs of `FeatureDecoupling`, each a tuple (l, v, a) of (B, T'_m, d) arrays."""
  shared: tuple  # c_m = E^com(X~_m)                               (Eq. 1)
  private: tuple  # s_m = E_m^prt(X~_m)                             (Eq. 1)
  recon: tuple  # D_m([s_m, c_m])                                  (Eq. 2)
  private_regressed: tuple  # E_m^prt(D_m([s_m, c_m]))             (Eq. 3)


class FeatureDecoupling(nn.Module):
  """Shared / private encoders, decoders and self-regression (Eq. 1-3).

  Attributes:
    features: d.
  """
  features: int

  @nn.compact
  def __call__(self, proj: tuple) -> Decoupled:
    """proj: tuple (l, v, a) of X~_m, each (B, T'_m, d)."""
    encoder_c = _pointwise(self.features, "encoder_c")  # one encoder shared by all modalities
    shared, private, recon, regressed = [], [], [], []
    for m, x in zip(MODALITY_KEYS, proj):
      encoder_s = _pointwise(self.features, f"encoder_s_{m}")
      decoder = _pointwise(self.features, f"decoder_{m}")
      c = encoder_c(x)  # (B, T', d)
      s = encoder_s(x)  # (B, T', d)
      r = decoder(jnp.concatenate([s, c], axis=-1))  # (B, T', 2d) -> (B, T', d)
      shared.append(c)
      private.append(s)
      recon.append(r)
      regressed.append(encoder_s(r))  # same weights as s (self-regression)
    return Decoupled(tuple(shared), tuple(private), tuple(recon), tuple(regressed))
