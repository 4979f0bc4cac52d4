"""The DHMD model: DMD's decoupling + two-branch distillation backbone + dictionary matching.

Forward pass (modality order everywhere (L, V, A); it follows the
DMD code layer for layer):

1. dropout(text_dropout) on the text features; Conv1d C_m per modality (VALID, no bias)
   -> X~_m (B, T'_m, d). With `text_encoder="bert"` the text features are BERT's
   last_hidden_state of the `text_bert` ids (`bert.py`), fine-tuned with the rest, as in the DMD
   code (BertTextEncoder -> text dropout -> Conv1d).
2. Feature decoupling (Eq. 1-3, `decoupling.py`): c_m = E^com(X~_m), s_m = E_m^prt(X~_m),
   recon_m = D_m([s_m, c_m]), s_r_m = E_m^prt(recon_m); margin features align_c_m(flatten c_m).
3. Homogeneous branch: per-modality residual flatten-MLP heads on c_m (logits/repr for HoGD);
   self-attention transformers on c_m whose last steps form c_fusion (3d) and the head logits_c.
4. Heterogeneous branch (Eq. 10): six cross-modal transformers on the s_m, per target a 2d
   "memory" transformer; its last step h_m (2d) feeds a residual head (logits/repr for HeGD).
5. GD-Units (Eq. 8, `gd_unit.py`) on the homo and hetero logits/reprs: edge weights only.
6. Dictionary matching (Eq. 11-12, `dictionary.py`): HoDM on c_m, HeDM on the memory sequences.
7. Fusion and final head: "code" = [sigmoid(W h_l), sigmoid(W h_v), sigmoid(W h_a),
   sigmoid(W c_fusion)] (+ DM reconstructions), "paper" = the plain concatenation
   [h_l, h_v, h_a, c_fusion] (+ DM reconstructions); then a residual MLP and a Linear.
   The DM part is [HeDM (3 x 2d), HoDM (3 x d)] flattened. Without `homo_self_attention`,
   c_fusion is the concatenated last steps of c_m.

Switches (Table 6 / Table 8 ablations):
* `use_fd=False`: no encoders/decoders/align_c; both branches take X~_m (c_m = s_m = X~_m).
* `use_ca=False`: per target, Linear(d -> 2d) on s_m replaces the two cross-modal transformers.
* `use_gd=False`: no GD-Units; `use_dm=False`: no dictionaries and no DM parts in the fusion.
* `arch="mult"`: the MulT baseline: no decoupling (use_fd is ignored), no homogeneous branch;
  cross-modal + memory transformers on X~_m, fusion = residual MLP over [h_l, h_v, h_a]
  (+ HeDM reconstructions), whatever `fusion` and `homo_self_attention` say.

Key-padding (`key_padding_mask=True`, not in the DMD code): attention keys, DM max-pools and the
"last step" read-outs use the conv-level frame masks (the last REAL step is read), so every
attention-derived output is independent of the content of padded frames. Without it, the model is
the DMD code: padding is attended to and the read-out is index -1.

Parameters are initialised like the reference: PyTorch defaults for Linear/Conv1d, xavier-uniform
with zero bias inside the transformers, xavier-normal dictionaries.
"""

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dhmd_jax import auto
from dhmd_jax import validation
from dhmd_jax.data import DataError
from dhmd_jax.models import bert_weights
from dhmd_jax.models.bert import BertEncoder
from dhmd_jax.models.bert import BertSettings
from dhmd_jax.models.decoupling import FeatureDecoupling
from dhmd_jax.models.decoupling import TemporalProjection
from dhmd_jax.models.decoupling import conv_frame_mask
from dhmd_jax.models.dictionary import DictionaryMatching
from dhmd_jax.models.gd_unit import GDUnit
from dhmd_jax.models.heads import ResidualHead
from dhmd_jax.models.heads import torch_linear
from dhmd_jax.models.transformer import TransformerStack
from dhmd_jax.names import MODALITY_KEYS

BATCH_KEYS = ("text", "vision", "audio")  # model order (L, V, A)
# Sources of the two cross-modal transformers of each target, in the DMD code's concat order.
CROSS_SOURCES = {"l": ("a", "v"), "v": ("l", "a"), "a": ("l", "v")}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """What the model reads: the config's `model`, `gd` and `dm` groups as they are (frozen, so the
  settings are hashable and static under jit; their fields and rules are those of the schema,
  configs/default.py), the output width, and what is resolved from them."""
  model: ml_collections.FrozenConfigDict
  gd: ml_collections.FrozenConfigDict
  dm: ml_collections.FrozenConfigDict
  num_outputs: int  # 1 (regression) or 2 (binary logits)
  stack_compute: str  # model.stack_compute with "auto" resolved: "vmap", "grouped" or "loop"
  remat: bool = False  # model.remat with "auto" resolved
  bert: Optional[BertSettings] = None  # with model.text_encoder="bert": the BERT's architecture

  @classmethod
  def from_config(cls, config, num_outputs: int) -> "ModelSettings":
    validation.validate(config, strict=False)  # entry points have refused unknown fields
    if int(num_outputs) < 1:
      raise ValueError(f"num_outputs (build_model argument) = {num_outputs!r} is invalid: "
                       f"expected 1 (regression) or 2 (binary)")
    m = config.model
    remat = auto.remat(m.remat, config.get("train"))
    settings = cls(
        model=ml_collections.FrozenConfigDict(m),
        gd=ml_collections.FrozenConfigDict(config.gd),
        dm=ml_collections.FrozenConfigDict(config.dm), num_outputs=int(num_outputs),
        stack_compute=auto.stack_compute(m.stack_compute, remat), remat=remat)
    if m.text_encoder == "bert":  # reads and checks the checkpoint folder's headers
      settings = dataclasses.replace(settings, bert=bert_weights.settings_from_config(
          m.bert, pooler=m.unused_reference_layers))
    return settings

  @property
  def conv_kernels(self) -> tuple:
    """The Conv1d kernel sizes in model order (l, v, a)."""
    k = self.model.conv_kernel
    return (k.text, k.vision, k.audio)


def _read_batch(batch: Mapping[str, Any], kernels, text=None, text_mask=None):
  """Returns the three (B, T, D) inputs and (B, T) bool masks (all True where absent).

  `text`, when given, is the text input (BERT's output) instead of batch['text'], and
  `text_mask` the text mask used when the batch has none.
  """
  inputs, masks = [], []
  batch_size = None
  for key, k in zip(BATCH_KEYS, kernels):
    if key == "text" and text is not None:
      x = text
    elif key not in batch:
      raise KeyError(f"batch has no {key!r} entry (keys: {sorted(batch)}); the model needs "
                     f"'text', 'vision' and 'audio' arrays of shape (B, T, D).")
    else:
      x = jnp.asarray(batch[key], jnp.float32)
    if x.ndim != 3:
      raise ValueError(f"batch[{key!r}] has shape {x.shape}; expected (B, T, D).")
    if batch_size is None:
      batch_size = x.shape[0]
    if x.shape[0] != batch_size:
      raise ValueError(f"batch[{key!r}] has batch size {x.shape[0]} but batch['text'] has "
                       f"{batch_size}.")
    if x.shape[1] < k:
      raise ValueError(f"batch[{key!r}] has {x.shape[1]} frames, fewer than its Conv1d kernel "
                       f"{k} (config.model.conv_kernel.{key}); pad the sequences or lower it.")
    mask = batch.get(f"{key}_mask")  # optional input; not a config read
    if mask is None and key == "text":
      mask = text_mask
    if mask is None:
      mask = jnp.ones(x.shape[:2], bool)
    else:
      mask = jnp.asarray(mask).astype(bool)
      if mask.shape != x.shape[:2]:
        raise ValueError(f"batch[{key + '_mask'!r}] has shape {mask.shape}; expected "
                         f"{x.shape[:2]} (B, T) to match batch[{key!r}].")
    inputs.append(x)
    masks.append(mask)
  return tuple(inputs), tuple(masks)


def _flatten(x):
  return x.reshape(x.shape[0], -1)  # (B, T, C) -> (B, T*C), time-major as the reference


def _last_step(seq: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """(B, T, C) -> (B, C): index -1, or the last real step when a frame mask is given."""
  if mask is None:
    return seq[:, -1]
  steps = jnp.arange(seq.shape[1])
  last = jnp.max(jnp.where(mask, steps[None, :], 0), axis=1)  # (B,)
  return jnp.take_along_axis(seq, last[:, None, None], axis=1)[:, 0]


class DHMD(nn.Module):
  """DHMD / DMD / MulT-baseline model (see the module docstring)."""
  settings: ModelSettings

  def _stack(self, name: str, attn_dropout, layers: int) -> TransformerStack:
    cfg = self.settings.model
    return TransformerStack(
        num_heads=cfg.num_heads, num_layers=layers, attn_dropout=tuple(attn_dropout),
        relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout,
        embed_dropout=cfg.embed_dropout, causal_mask=cfg.causal_mask,
        query_block=cfg.attention_query_block, remat=self.settings.remat,
        compute=self.settings.stack_compute, name=name)

  def _attn_dropout(self, source: str) -> float:
    """Attention dropout by SOURCE modality (`get_network` types l/al/vl, a/la/va, v/lv/av)."""
    cfg = self.settings.model
    return {"l": cfg.attn_dropout, "v": cfg.attn_dropout_v, "a": cfg.attn_dropout_a}[source]

  @nn.compact
  def __call__(self, batch: Mapping[str, Any], *, deterministic: bool):
    """Runs the model.

    Args:
      batch: dict with `text` (B, T_l, D_l) (or, with text_encoder="bert", `text_bert`
        (B, 3, T_l) [ids, mask, segment ids]), `vision` (B, T_v, D_v), `audio` (B, T_a, D_a) and
        optional `text_mask`, `vision_mask`, `audio_mask` (B, T_m) bool; other keys are ignored.
      deterministic: disables dropout (then no 'dropout' RNG is needed).

    Returns:
      dict of outputs; keys of switched-off components are absent (docs/architecture.md).
    """
    s, cfg = self.settings, self.settings.model
    d, o = cfg.d_model, s.num_outputs
    is_dhmd = cfg.arch == "dhmd"
    text, text_mask = None, None
    if cfg.text_encoder == "bert":
      if "text_bert" not in batch:
        raise DataError(
            f"config.model.text_encoder='bert' needs 'text_bert' token ids (B, 3, T) in the "
            f"batch, which has {sorted(batch)}: use an MMSA pickle (aligned_50.pkl / "
            f"unaligned_50.pkl carry text_bert; MulT/MultiBench GloVe pickles do not) or "
            f"--config.model.text_encoder=features")
      # BertTextEncoder of the DMD code: last_hidden_state (B, T, H) of [ids, mask, segments].
      # The pooler is built only for the parameter count (unused_reference_layers).
      text, _ = BertEncoder(s.bert, name="bert")(batch["text_bert"],
                                                 deterministic=deterministic)
      text_mask = jnp.asarray(batch["text_bert"])[:, 1] > 0.5  # (B, T)
    inputs, masks = _read_batch(batch, s.conv_kernels, text, text_mask)

    # ------------------------------------------------ 1. temporal Conv1d C_m
    text = nn.Dropout(cfg.text_dropout)(inputs[0], deterministic=deterministic)
    proj = tuple(
        TemporalProjection(d, k, name=f"proj_{m}")(x)  # (B, T'_m, d)
        for m, k, x in zip(MODALITY_KEYS, s.conv_kernels, (text,) + inputs[1:]))
    frame_masks = tuple(conv_frame_mask(mk, k) for mk, k in zip(masks, s.conv_kernels))
    key_masks = frame_masks if cfg.key_padding_mask else (None, None, None)
    out = {"proj": proj}

    # ------------------------------------------------ 2. feature decoupling (Eq. 1-3)
    if is_dhmd and cfg.use_fd:
      dec = FeatureDecoupling(d, name="decoupling")(proj)
      shared, private = dec.shared, dec.private
      out.update(shared=dec.shared, private=dec.private, recon=dec.recon,
                 private_regressed=dec.private_regressed)
      # align_c_m flattens c_m channel-major, as the reference does (its c_m is (B, d, T') there).
      margin = [
          torch_linear(d, c.shape[1] * d, name=f"align_c_{m}")(_flatten(c.transpose(0, 2, 1)))
          for m, c in zip(MODALITY_KEYS, shared)]
      out["margin_features"] = jnp.stack(margin, axis=1)  # (B, 3, d), input of L_mar (Eq. 4)
      if cfg.unused_reference_layers:
        # proj_cosine_m of the reference: built (same parameter count), output used by nothing.
        for m, p in zip(MODALITY_KEYS, private):
          torch_linear(d, p.shape[1] * d, name=f"proj_cosine_{m}")(_flatten(p))
    else:
      shared = private = proj

    # ------------------------------------------------ 3. homogeneous branch
    if is_dhmd:
      homo = [
          ResidualHead(d, o, cfg.output_dropout, name=f"homo_head_{m}")(
              _flatten(c), deterministic=deterministic)
          for m, c in zip(MODALITY_KEYS, shared)]
      out["logits_homo"] = jnp.stack([h[0] for h in homo])  # (3, B, O)
      out["repr_homo"] = jnp.stack([h[1] for h in homo])  # (3, B, d), post-ReLU r
      if cfg.homo_self_attention:
        attended = self._stack(  # three self-attention transformers on c_m, as one
            "self_attentions_c", [self._attn_dropout(m) for m in MODALITY_KEYS],
            cfg.num_layers)(
                list(shared), key_masks=list(key_masks) if cfg.key_padding_mask else None,
                deterministic=deterministic)  # 3 x (B, T'_m, d)
        c_fusion = jnp.concatenate(
            [_last_step(a, km) for a, km in zip(attended, key_masks)], axis=-1)  # (B, 3d)
        out["logits_c"] = ResidualHead(3 * d, o, cfg.output_dropout, name="head_c")(
            c_fusion, deterministic=deterministic)[0]  # (B, O)
      else:
        c_fusion = jnp.concatenate(
            [_last_step(c, km) for c, km in zip(shared, key_masks)], axis=-1)  # (B, 3d)

    # ------------------------------------------------ 4. heterogeneous branch (Eq. 10)
    by_key = dict(zip(MODALITY_KEYS, private))
    mask_by_key = dict(zip(MODALITY_KEYS, key_masks))
    if cfg.use_ca:
      # The six cross-modal transformers (query m, key/value src) as one stack, in the order
      # l<-a, l<-v, v<-l, v<-a, a<-l, a<-v; attention dropout by the SOURCE modality.
      pairs = [(m, src) for m in MODALITY_KEYS for src in CROSS_SOURCES[m]]
      crossed = self._stack(
          "cross_transformers", [self._attn_dropout(src) for _, src in pairs],
          cfg.num_layers)(
              [by_key[m] for m, _ in pairs], [by_key[src] for _, src in pairs],
              key_masks=([mask_by_key[src] for _, src in pairs] if cfg.key_padding_mask
                         else None),
              deterministic=deterministic)  # 6 x (B, T'_m, d)
      z = [jnp.concatenate(crossed[2 * i:2 * i + 2], axis=-1)
           for i in range(3)]  # 3 x (B, T'_m, 2d)
    else:
      z = [torch_linear(2 * d, d, name=f"proj_{m}_2d")(by_key[m])  # (B, T'_m, 2d), no CA
           for m in MODALITY_KEYS]
    memory = self._stack(  # the three 2d "memory" transformers, as one
        "memory_transformers", [cfg.attn_dropout] * 3, max(cfg.num_layers, 3))(
            z, key_masks=list(key_masks) if cfg.key_padding_mask else None,
            deterministic=deterministic)  # 3 x (B, T'_m, 2d)
    last_h = [_last_step(seq, km) for seq, km in zip(memory, key_masks)]  # 3 x (B, 2d)
    hetero = [ResidualHead(2 * d, o, cfg.output_dropout, name=f"hetero_head_{m}")(
                  h, deterministic=deterministic) for m, h in zip(MODALITY_KEYS, last_h)]
    out["logits_hetero"] = jnp.stack([h[0] for h in hetero])  # (3, B, O)
    out["repr_hetero"] = jnp.stack([h[2] for h in hetero])  # (3, B, 2d), post-residual

    # ------------------------------------------------ 5. GD-Units (Eq. 8)
    if cfg.use_gd:
      units = [("hetero", s.gd.hetero_hidden)]
      if is_dhmd:
        units.insert(0, ("homo", s.gd.homo_hidden))
      for space, hidden in units:
        w, e = GDUnit(hidden, s.gd.edge_input, s.gd.temperature, name=f"gd_{space}")(
            out[f"logits_{space}"], out[f"repr_{space}"])
        out[f"gd_{space}_edges"] = w  # (B, 6)
        out[f"gd_{space}_edge_logits"] = e  # (B, 6)

    # ------------------------------------------------ 6. dictionary matching (Eq. 11-12)
    dm_masks = frame_masks if cfg.key_padding_mask else None
    dm_parts = []
    if cfg.use_dm:
      spaces = [("hetero", memory)]
      if is_dhmd:
        spaces.append(("homo", shared))
      for space, seqs in spaces:
        alpha, recon = DictionaryMatching(
            s.dm.num_elements, s.dm.score_scale, s.dm.detach_input, name=f"dm_{space}")(
                seqs, dm_masks)
        out[f"dm_{space}_weights"] = alpha  # (B, 3, K)
        out[f"dm_{space}_recon"] = recon  # (B, 3, C)
        dm_parts.append(_flatten(recon))  # [hetero (3*2d), homo (3*d)]

    # ------------------------------------------------ 7. fusion and final head
    if not is_dhmd:
      features = last_h  # MulT: plain concatenation
    elif cfg.fusion == "code":
      features = [jax.nn.sigmoid(torch_linear(2 * d, 2 * d, name=f"weight_{m}")(h))
                  for m, h in zip(MODALITY_KEYS, last_h)]
      features.append(jax.nn.sigmoid(torch_linear(3 * d, 3 * d, name="weight_c")(c_fusion)))
    else:
      features = last_h + [c_fusion]  # paper: GD-reinforced features, no gates
    z = jnp.concatenate(features + dm_parts, axis=-1)  # (B, 9d [+ 9d]) or MulT (B, 6d [+ 6d])
    out["prediction"] = ResidualHead(z.shape[-1], o, cfg.output_dropout, name="fusion_head")(
        z, deterministic=deterministic)[0]  # (B, O)
    return out


def build_model(config, *, num_outputs: int) -> DHMD:
  """The model for a full ConfigDict (`config.model`, `config.gd`, `config.dm`)."""
  return DHMD(ModelSettings.from_config(config, num_outputs))
