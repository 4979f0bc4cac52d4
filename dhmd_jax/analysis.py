"""The arrays behind the paper's analysis figures, as pure functions of parameters and batches.

Nothing here draws, reads a workdir or parses flags (`dhmd_jax.figures` does); every function takes
a model, one seed's parameters and batches in the model's layout (`data.split_arrays`), or arrays
these functions returned:

* `split_outputs`: per-sample analysis outputs of a whole split: predictions, the HoGD/HeGD edge
  weights (B, 6), the HoDM/HeDM dictionary weights (B, 3, K), and the decoupled homogeneous
  (c_m) and heterogeneous (s_m) features pooled over each sample's real frames (B, 3, d).
* `edge_matrices`, `edge_summary`: edges as 3x3 matrices (rows = teacher/source, columns =
  student/target: W[i, j] = w_{i->j}, the paper's W_ij and `gd_unit.edges_to_matrix`), averaged
  over samples and per sentiment class (Figs. 9-10); `edges_over_epochs` from metrics.jsonl.
* `class_activations`, `activated_atoms`, `modality_sharing`: dictionary activations per class,
  space and modality, which atom each sample activates, and how much the modalities share
  (Fig. 11).
* `attention_maps`: every cross-modal and self-attention map of one sample (Fig. 12), collected
  from the transformer stacks with `mutable=["intermediates"]` (the stacks record nothing
  otherwise).
* `missing_modality`: every seed's metrics with each modality and each pair removed at test time
  (features and masks zeroed), and the change against the full input with its statistics.
* `sentiment_classes`, `training_curves`: the classes the per-class figures use, and the curves of
  every logged quantity.

Modality order (L, V, A) and edge order/labels come from `dhmd_jax.names`.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dhmd_jax import metrics as metrics_lib
from dhmd_jax import stats
from dhmd_jax import steps
from dhmd_jax.models import dhmd as dhmd_model
from dhmd_jax.models.decoupling import conv_frame_mask
from dhmd_jax.models.gd_unit import edges_to_matrix
from dhmd_jax.names import EDGE_NAMES
from dhmd_jax.names import MODALITIES
from dhmd_jax.names import MODALITY_KEYS
from dhmd_jax.names import MODALITY_LETTERS
from dhmd_jax.names import edge_name

SPACES = ("homo", "hetero")  # HoGD/HoDM on c_m, HeGD/HeDM on the heterogeneous branch

# Branch names of each transformer stack, in the model's order. A cross-modal transformer with
# query m and keys/values from src carries information src -> m, so it is named like the GD
# edge from teacher src to student m ("A->L": language attends to audio).
_KEY_INDEX = {k: i for i, k in enumerate(MODALITY_KEYS)}
STACK_BRANCHES = {
    "self_attentions_c": MODALITY_LETTERS,
    "cross_transformers": tuple(edge_name(_KEY_INDEX[m], _KEY_INDEX[src])
                                for m in MODALITY_KEYS for src in dhmd_model.CROSS_SOURCES[m]),
    "memory_transformers": MODALITY_LETTERS,
}


# ----------------------------------------------------------------------------- classes


def sentiment_classes(labels, *, task: str, dataset: str):
  """(classes (N,) int in 0..C-1, class names (C,)) used by the per-class figures.

  Binary tasks: the labels 0/1. SIMS: MMSA's three classes (y <= -0.1, -0.1 < y <= 0.1, y > 0.1).
  Otherwise (MOSI, MOSEI, synthetic): the seven classes round(clip(y, -3, 3)), -3 .. 3, as
  Mult_acc_7 and the paper's seven categories.
  """
  labels = np.asarray(labels)
  if task == "binary":
    return labels.astype(np.int64), ("0", "1")
  if dataset == "sims":
    return np.sum([labels > -0.1, labels > 0.1], axis=0).astype(np.int64), (
        "negative", "neutral", "positive")
  classes = np.round(np.clip(labels.astype(np.float64), -3.0, 3.0)).astype(np.int64) + 3
  return classes, ("-3", "-2", "-1", "0", "+1", "+2", "+3")


def per_class_mean(values, classes, num_classes: int):
  """(C, ...) mean of `values` (N, ...) over the samples of each class (NaN for an empty class),
  and the (C,) counts."""
  values = np.asarray(values, np.float64)
  counts = np.bincount(classes, minlength=num_classes)[:num_classes]
  sums = np.zeros((num_classes,) + values.shape[1:])
  np.add.at(sums, classes, values)
  with np.errstate(invalid="ignore", divide="ignore"):
    means = sums / counts.reshape((-1,) + (1,) * (values.ndim - 1))
  return means, counts


# ----------------------------------------------------------------------------- forward passes


def frame_masks(model, batch):
  """The three (B, T'_m) conv-level masks of real frames (a T' frame is real if its whole Conv1d
  window is), in (L, V, A) order, as the model computes them."""
  out = []
  for m, k in zip(MODALITIES, model.settings.conv_kernels):
    mask = batch.get(f"{m}_mask")
    if mask is None:
      mask = jnp.ones(jnp.shape(batch[m])[:2], bool)
    out.append(conv_frame_mask(jnp.asarray(mask).astype(bool), k))
  return tuple(out)


def pool_frames(sequences, masks):
  """(B, 3, C): each (B, T'_m, C) sequence averaged over its real frames (0 if none)."""
  pooled = []
  for seq, mask in zip(sequences, masks):
    w = mask.astype(seq.dtype)[..., None]  # (B, T', 1)
    pooled.append(jnp.sum(seq * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0))
  return jnp.stack(pooled, axis=1)


def _analysis_outputs(model, params, batch):
  """The per-sample arrays the figures use, from one deterministic forward pass."""
  out = model.apply({"params": params}, batch, deterministic=True)
  masks = frame_masks(model, batch)
  result = {"prediction": out["prediction"]}
  for space in SPACES:
    for key in (f"gd_{space}_edges", f"dm_{space}_weights"):
      if key in out:
        result[key] = out[key]
  # The decoupled features: c_m (homogeneous) and s_m (heterogeneous); without decoupling both
  # are the projected X~_m (the model's own fallback).
  result["homo_features"] = pool_frames(out.get("shared", out["proj"]), masks)
  result["hetero_features"] = pool_frames(out.get("private", out["proj"]), masks)
  return result


def split_outputs(model, params, arrays: Mapping[str, np.ndarray], *, batch_size: int = 64):
  """Per-sample analysis outputs of one seed's model over a whole split (NumPy, first axis N).

  Args:
    model: the DHMD module (`train.build(config, dataset)`).
    params: ONE seed's parameters (not stacked over seeds; see `seed_params`).
    arrays: the split in the model's batch layout (`data.split_arrays`).
    batch_size: samples per forward pass (one compilation; the last batch is padded).

  Returns:
    dict: "prediction" (N, O); "gd_homo_edges", "gd_hetero_edges" (N, 6) in `names.EDGES`
    order, each row summing to 1 (absent without GD); "dm_homo_weights", "dm_hetero_weights"
    (N, 3, K), summing to 1 over K (absent without DM); "homo_features" (N, 3, d) and
    "hetero_features" (N, 3, d): c_m and s_m averaged over each sample's real frames.
  """
  inputs = {k: v for k, v in arrays.items() if k != "label"}
  forward = jax.jit(lambda p, b: _analysis_outputs(model, p, b))
  return steps.map_in_batches(lambda batch: jax.device_get(forward(params, batch)), inputs,
                              batch_size)


def seed_params(stacked_params, index: int):
  """One seed's parameters out of the checkpoint's stacked (S, ...) tree."""
  return jax.tree.map(lambda a: a[index], stacked_params)


def sample_batch(arrays: Mapping[str, np.ndarray], index: int):
  """A batch of one sample (keeps the leading axis), without the label."""
  num = arrays["label"].shape[0]
  if not 0 <= index < num:
    raise IndexError(f"sample index {index} is out of range: the split has {num} samples "
                     f"(0 .. {num - 1})")
  return {k: np.asarray(v[index:index + 1]) for k, v in arrays.items() if k != "label"}


def attention_maps(model, params, batch):
  """Every attention map of the transformer stacks for the samples of `batch`.

  Applies the model with `mutable=["intermediates"]`, which makes each `TransformerStack` record
  its attention weights (nothing is recorded in training or evaluation).

  Returns:
    {stack: {branch: (L, B, h, T_q, T_k)}} with stacks "cross_transformers" (branches "A->L",
    "V->L", "L->V", "A->V", "L->A", "V->A": query modality after the arrow), "self_attentions_c"
    and "memory_transformers" (branches "L", "V", "A"); weights before dropout, each row summing
    to 1 over the keys a query may see (causal mask, key padding when on). Stacks a variant does
    not have are absent.
  """
  _, state = jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True,
                                              mutable=["intermediates"]))(params, batch)
  recorded = state.get("intermediates", {})
  maps = {}
  for stack, branches in STACK_BRANCHES.items():
    if stack in recorded:
      per_branch = recorded[stack]["attention"][0]
      maps[stack] = {name: np.asarray(w) for name, w in zip(branches, per_branch)}
  return maps


# ----------------------------------------------------------------------------- GD edges


def edge_matrices(edges):
  """(..., 6) edge weights in `names.EDGES` order -> (..., 3, 3) W[i, j] = w_{i->j} (row =
  teacher/source, column = student/target, zero diagonal; all nine entries sum to 1)."""
  return np.asarray(edges_to_matrix(jnp.asarray(edges)))


def edge_summary(edges, classes, num_classes: int):
  """Averages of per-sample edge weights (N, 6): over all samples and per class.

  Returns {"mean": (6,), "mean_matrix": (3, 3), "per_class": (C, 6) (NaN for an empty class),
  "per_class_matrix": (C, 3, 3), "count": (C,)}.
  """
  edges = np.asarray(edges, np.float64)
  mean = edges.mean(axis=0)
  per_class, count = per_class_mean(edges, classes, num_classes)
  return {"mean": mean, "mean_matrix": edge_matrices(mean), "per_class": per_class,
          "per_class_matrix": edge_matrices(per_class), "count": count}


def edges_over_epochs(records: Sequence[Mapping]):
  """The mean training edge weights logged per epoch in metrics.jsonl.

  Returns (epochs (E,), {"homo": (E, S, 6), "hetero": (E, S, 6)}), edges in `names.EDGES`
  order; a space the run has no GD-Unit for is absent. A later record of the same epoch (a
  resumed run) replaces an earlier one.
  """
  by_epoch = {}
  for r in records:
    by_epoch[int(r["epoch"])] = r
  epochs = sorted(by_epoch)
  out = {}
  for space in SPACES:
    keys = [f"{space}/{name}" for name in EDGE_NAMES]
    if epochs and all(k in by_epoch[epochs[0]].get("edges", {}) for k in keys):
      out[space] = np.array([[by_epoch[e]["edges"][k] for k in keys] for e in epochs],
                            np.float64).transpose(0, 2, 1)  # (E, S, 6)
  return np.array(epochs), out


# ----------------------------------------------------------------------------- dictionaries


def class_activations(weights, classes, num_classes: int):
  """(C, 3, K) mean dictionary weights alpha per class and modality, and (C,) counts."""
  return per_class_mean(weights, classes, num_classes)


def activated_atoms(weights):
  """(N, 3) index of the most activated dictionary element (argmax over K) per sample and
  modality: the element a sample's modality is matched to."""
  return np.argmax(np.asarray(weights), axis=-1)


def activation_counts(atoms, classes, num_classes: int, num_atoms: int):
  """(C, 3, K) how often each element is the activated one, per class and modality."""
  counts = np.zeros((num_classes, atoms.shape[1], num_atoms), np.int64)
  for m in range(atoms.shape[1]):
    np.add.at(counts, (classes, m, atoms[:, m]), 1)
  return counts


def modality_sharing(weights, classes, num_classes: int, *, top_k: int = 5):
  """How much the three modalities share dictionary elements.

  Returns:
    "same_atom" (3, 3): fraction of samples whose activated (argmax) element is the same for
      modalities i and j (1 on the diagonal);
    "top_k_jaccard" (3, 3): mean over samples of |top_i ∩ top_j| / |top_i ∪ top_j| of the
      `top_k` most activated elements;
    "class_jaccard" (C, 3, 3): per class, the Jaccard overlap of the SETS of elements activated
      by the class's samples in modality i and in modality j (NaN for an empty class).
  """
  weights = np.asarray(weights)
  n, num_mod, num_atoms = weights.shape
  atoms = activated_atoms(weights)
  same = np.array([[np.mean(atoms[:, i] == atoms[:, j]) for j in range(num_mod)]
                   for i in range(num_mod)])
  k = min(top_k, num_atoms)
  top = np.argsort(-weights, axis=-1, kind="stable")[..., :k]  # (N, 3, k)
  member = np.zeros((n, num_mod, num_atoms), bool)
  np.put_along_axis(member, top, True, axis=-1)
  jac = np.zeros((num_mod, num_mod))
  for i, j in itertools.product(range(num_mod), repeat=2):
    inter = np.sum(member[:, i] & member[:, j], axis=-1)
    union = np.sum(member[:, i] | member[:, j], axis=-1)
    jac[i, j] = np.mean(inter / union)
  class_jac = np.full((num_classes, num_mod, num_mod), np.nan)
  for c in range(num_classes):
    sel = atoms[classes == c]
    if not sel.size:
      continue
    sets = [set(sel[:, m].tolist()) for m in range(num_mod)]
    for i, j in itertools.product(range(num_mod), repeat=2):
      class_jac[c, i, j] = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
  return {"same_atom": same, "top_k_jaccard": jac, "class_jaccard": class_jac}


def dictionary(params, space: str):
  """(K, C) the learned dictionary D of HoDM ("homo") or HeDM ("hetero") of one seed."""
  key = f"dm_{space}"
  if key not in params:
    raise KeyError(f"the model has no {key} (dictionary matching is off in this run)")
  return np.asarray(params[key]["dictionary"])


# ----------------------------------------------------------------------------- missing modalities


def missing_conditions():
  """[(name, removed modality indices)]: the full input, each modality and each pair removed.
  Names list what remains ("L+V+A", "V+A", ..., "A")."""
  conditions = []
  for r in range(0, 3):
    for removed in itertools.combinations(range(3), r):
      kept = [MODALITY_LETTERS[m] for m in range(3) if m not in removed]
      conditions.append(("+".join(kept), removed))
  return conditions


def remove_modalities(arrays: Mapping[str, np.ndarray], removed: Sequence[int]):
  """A copy of the batch arrays with the features and masks of the `removed` modalities zeroed
  (as if the modality were missing at test time: no frame is real)."""
  out = dict(arrays)
  for m in removed:
    name = MODALITIES[m]
    out[name] = np.zeros_like(arrays[name])
    out[f"{name}_mask"] = np.zeros_like(arrays[f"{name}_mask"])
  return out


def missing_modality(config, model, stacked_params, arrays, *, batch_size: Optional[int] = None,
                     alpha: float = 0.05):
  """Every seed's test metrics with modalities removed at test time, against the full input.

  Args:
    config: the run's config (metrics family, task).
    model, stacked_params: the model and every seed's parameters (S, ...) (a checkpoint).
    arrays: the split in the model's batch layout, labels included.
    batch_size: prediction batch (default config.train.eval_batch_size).

  Returns:
    {"conditions": [(name, removed)], "per_seed": {name: {metric: [per seed]}} (as
     `metrics.split_metrics`), "predictions": {name: (S, N) point predictions}, "rows":
     `stats.comparison_rows` of the conditions against "L+V+A" with accuracies and F1 in percent
     (`as_percent`) (diff = condition - full: the drop, with its 95% CI and p over seeds)}.
  """
  predict = steps.make_predict(model, batch_size=batch_size or config.train.eval_batch_size,
                               seed_compute=config.train.seed_compute)
  labels = np.asarray(arrays["label"])
  per_seed, predictions = {}, {}
  conditions = missing_conditions()
  for name, removed in conditions:
    preds = np.asarray(predict(stacked_params, jax.device_put(remove_modalities(arrays,
                                                                                 removed))))
    per_seed[name] = metrics_lib.split_metrics(config, preds, labels)
    predictions[name] = metrics_lib.point_predictions(config.dataset.task, preds)
  rows = stats.comparison_rows(as_percent(per_seed), conditions[0][0], alpha=alpha)
  return {"conditions": conditions, "per_seed": per_seed, "predictions": predictions,
          "rows": rows}


def as_percent(table):
  """{variant: {metric: values}} with accuracies/F1 (every metric but MAE and Corr) x 100, as
  the run's report prints them."""
  return {v: {m: [x if m in metrics_lib.RAW_METRICS or x is None else 100.0 * x for x in values]
              for m, values in by_metric.items()} for v, by_metric in table.items()}


# ----------------------------------------------------------------------------- training curves


def training_curves(records: Sequence[Mapping]):
  """Every per-epoch quantity of metrics.jsonl as arrays over (epoch, seed).

  Returns {"epoch": (E,), "seeds": [...], "train": {term: (E, S)}, "valid": {metric: (E, S)},
  "test": {metric: (E, S)}, "lr": (E, S), "valid_loss": (E, S)}; missing or null values are NaN
  (a seed that stopped early keeps logging its frozen values; see "active").
  """
  by_epoch = {}
  for r in records:
    by_epoch[int(r["epoch"])] = r
  epochs = sorted(by_epoch)
  recs = [by_epoch[e] for e in epochs]
  seeds = list(recs[0]["seeds"]) if recs else []

  def column(get):
    rows = []
    for r in recs:
      v = get(r)
      rows.append([np.nan] * len(seeds) if v is None else
                  [np.nan if x is None else float(x) for x in v])
    return np.array(rows, np.float64).reshape(len(recs), len(seeds))

  def group(name):
    keys = list(dict.fromkeys(k for r in recs for k in (r.get(name) or {})))
    return {k: column(lambda r, k=k: (r.get(name) or {}).get(k)) for k in keys}

  curves = {"epoch": np.array(epochs), "seeds": seeds, "train": group("train"),
            "valid": group("valid"), "test": group("test"),
            "lr": column(lambda r: r.get("lr")),
            "valid_loss": column(lambda r: r.get("valid_loss"))}
  if recs and "active" in recs[0]:
    curves["active"] = column(lambda r: r.get("active"))
  return curves


__all__ = [
    "SPACES", "STACK_BRANCHES", "sentiment_classes", "per_class_mean",
    "frame_masks", "pool_frames", "split_outputs", "seed_params", "sample_batch",
    "attention_maps", "edge_matrices", "edge_summary", "edges_over_epochs", "class_activations",
    "activated_atoms", "activation_counts", "modality_sharing", "dictionary",
    "missing_conditions", "remove_modalities", "missing_modality", "as_percent",
    "training_curves",
]
