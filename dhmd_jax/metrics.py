"""Evaluation metrics (host-side NumPy) for MOSI/MOSEI, CH-SIMS, UR-FUNNY and MUStARD.

The regression metrics reproduce MMSA `MetricsTop.__eval_mosei_regression` (MOSI, MOSEI) and
`__eval_sims_regression` (CH-SIMS) exactly, including numpy's round-half-to-even, without
scikit-learn: the weighted F1 is computed here as `sklearn.metrics.f1_score(y_true, y_pred,
average="weighted")` does, with its zero-division value 0 for a class that is never predicted.
docs/data.md, "Metrics", states every definition.

Departures from MMSA, all where MMSA would crash or warn:
  * Corr is NaN (without a RuntimeWarning) when either side is constant or has < 2 values;
    `np.corrcoef` gives the same NaN but warns.
  * Non0 metrics are NaN when every label is 0 (MMSA raises an IndexError there).
  * Bad shapes or values raise a one-line ValueError.

The inputs are flattened. Float inputs keep their dtype (float32 stays float32) so comparisons
with the bin edges behave as in MMSA, which works on float32 arrays from PyTorch.
"""

import numpy as np

_REGRESSION = ("mosi", "mosei", "synthetic")
_SIMS = ("sims",)
_BINARY = ("urfunny", "mustard")


def _as_float_pair(predictions, labels, where):
  """Flattens both inputs; ints become float64, floats keep their dtype."""
  p = np.asarray(predictions).reshape(-1)
  y = np.asarray(labels).reshape(-1)
  if p.shape != y.shape:
    raise ValueError(
        f"metrics.{where}: {p.size} predictions but {y.size} labels; pass one prediction per"
        " label.")
  if not np.issubdtype(p.dtype, np.floating):
    p = p.astype(np.float64)
  if not np.issubdtype(y.dtype, np.floating):
    y = y.astype(np.float64)
  return p, y


def _round(value, decimals):
  value = float(value)
  return value if decimals is None else float(np.round(value, decimals))


def _accuracy(y_true, y_pred):
  if y_true.size == 0:
    return float("nan")
  return float(np.mean(y_true == y_pred))


def _per_class_counts(y_true, y_pred):
  """Per class of union(y_true, y_pred): true positives, predicted count, true count (support)."""
  classes = np.union1d(y_true, y_pred)  # (K,)
  is_true = y_true[None, :] == classes[:, None]  # (K, N)
  is_pred = y_pred[None, :] == classes[:, None]  # (K, N)
  tp = np.sum(is_true & is_pred, axis=1).astype(np.float64)  # (K,)
  n_pred = np.sum(is_pred, axis=1).astype(np.float64)  # (K,)
  n_true = np.sum(is_true, axis=1).astype(np.float64)  # (K,)
  return classes, tp, n_pred, n_true


def _zero_div(num, den):
  """num / den elementwise, 0 where den == 0 (sklearn's zero_division behaviour)."""
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _weighted_prf(y_true, y_pred):
  """sklearn `precision_recall_fscore_support(average="weighted")`: (precision, recall, F1).

  Per class: precision = tp / #pred, recall = tp / #true, F1 = 2 tp / (#pred + #true), each 0
  when its denominator is 0; then the support-weighted mean over the classes. NaN when empty.
  """
  if y_true.size == 0:
    return float("nan"), float("nan"), float("nan")
  _, tp, n_pred, n_true = _per_class_counts(y_true, y_pred)
  precision = _zero_div(tp, n_pred)
  recall = _zero_div(tp, n_true)
  f1 = _zero_div(2.0 * tp, n_pred + n_true)
  weights = n_true / np.sum(n_true)
  return (float(np.sum(weights * precision)), float(np.sum(weights * recall)),
          float(np.sum(weights * f1)))


def weighted_f1(y_true, y_pred):
  """sklearn `f1_score(y_true, y_pred, average="weighted")` (zero division -> 0); NaN if empty."""
  return _weighted_prf(np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1))[2]


def _pearson(p, y):
  """`np.corrcoef(p, y)[0, 1]`, but NaN without a warning for constant or < 2 values."""
  if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
    return float("nan")
  return float(np.corrcoef(p, y)[0, 1])


def _multiclass_acc(p, y):
  """MMSA `__multiclass_acc`: mean(round(p) == round(y)), numpy round half to even."""
  return float(np.sum(np.round(p) == np.round(y)) / float(y.size))


def regression_metrics(predictions, labels, *, decimals=4):
  """MOSI / MOSEI metrics, as MMSA `__eval_mosei_regression`.

    MAE = mean |p - y|; Corr = Pearson r (`np.corrcoef`);
    Mult_acc_7 / Mult_acc_5 = mean[round(clip(p)) == round(clip(y))] with clip [-3, 3] / [-2, 2];
    Has0_acc_2, Has0_F1_score: (p >= 0) vs (y >= 0) over all samples (negative / non-negative);
    Non0_acc_2, Non0_F1_score: (p > 0) vs (y > 0) over samples with y != 0 (DMD's "Acc_2/F1").
  F1 scores are support-weighted (sklearn average="weighted", y as y_true). Rounding is numpy's
  round half to even (2.5 -> 2, -0.5 -> -0).

  Edge cases: Corr is NaN when p or y is constant (MMSA: NaN from np.corrcoef, with a warning;
  here without one). Non0_acc_2 and Non0_F1_score are NaN when every label is 0 (MMSA crashes).

  Args:
    predictions: predictions, any shape; flattened.
    labels: labels with as many elements.
    decimals: decimals to round each value to (MMSA: 4); None leaves them unrounded.

  Returns:
    dict of Python floats: MAE, Corr, Mult_acc_7, Mult_acc_5, Has0_acc_2, Has0_F1_score,
    Non0_acc_2, Non0_F1_score.
  """
  p, y = _as_float_pair(predictions, labels, "regression_metrics")
  if p.size == 0:
    raise ValueError("metrics.regression_metrics: no predictions; evaluate at least one sample.")

  has0_true, has0_pred = y >= 0, p >= 0
  nonzero = y != 0
  non0_true, non0_pred = y[nonzero] > 0, p[nonzero] > 0
  results = {
      "MAE": float(np.mean(np.abs(p - y))),
      "Corr": _pearson(p, y),
      "Mult_acc_7": _multiclass_acc(np.clip(p, -3.0, 3.0), np.clip(y, -3.0, 3.0)),
      "Mult_acc_5": _multiclass_acc(np.clip(p, -2.0, 2.0), np.clip(y, -2.0, 2.0)),
      "Has0_acc_2": _accuracy(has0_true, has0_pred),
      "Has0_F1_score": weighted_f1(has0_true, has0_pred),
      "Non0_acc_2": _accuracy(non0_true, non0_pred),
      "Non0_F1_score": weighted_f1(non0_true, non0_pred),
  }
  return {k: _round(v, decimals) for k, v in results.items()}


def _right_closed_bins(x, inner_edges):
  """Class index for right-closed bins: number of inner edges strictly below x.

  With edges (e_1, ..., e_K) the bins are [lo, e_1], (e_1, e_2], ..., (e_K, hi]. The edges are
  Python floats, so the comparison runs in x's dtype, as in MMSA.
  """
  return np.sum([x > e for e in inner_edges], axis=0)


def sims_metrics(predictions, labels, *, decimals=4):
  """CH-SIMS metrics, as MMSA `__eval_sims_regression`.

  p and y are clipped to [-1, 1] and binned with right-closed intervals:
    2 classes: [-1, 0], (0, 1];
    3 classes: [-1, -0.1], (-0.1, 0.1], (0.1, 1];
    5 classes: [-1, -0.7], (-0.7, -0.1], (-0.1, 0.1], (0.1, 0.7], (0.7, 1].
  Mult_acc_{2,3,5} are the bin accuracies, F1_score the weighted F1 of the 2-class bins, MAE and
  Corr are on the clipped values (Corr NaN for constant inputs, without a warning). MMSA does not
  round these; `decimals=None` reproduces that.

  Args:
    predictions: predictions, any shape; flattened.
    labels: labels with as many elements.
    decimals: decimals to round to, or None.

  Returns:
    dict of Python floats: Mult_acc_2, Mult_acc_3, Mult_acc_5, F1_score, MAE, Corr.
  """
  p, y = _as_float_pair(predictions, labels, "sims_metrics")
  if p.size == 0:
    raise ValueError("metrics.sims_metrics: no predictions; evaluate at least one sample.")
  p, y = np.clip(p, -1.0, 1.0), np.clip(y, -1.0, 1.0)
  bins = {2: (0.0,), 3: (-0.1, 0.1), 5: (-0.7, -0.1, 0.1, 0.7)}
  p_cls = {k: _right_closed_bins(p, e) for k, e in bins.items()}
  y_cls = {k: _right_closed_bins(y, e) for k, e in bins.items()}
  results = {
      "Mult_acc_2": _accuracy(y_cls[2], p_cls[2]),
      "Mult_acc_3": _accuracy(y_cls[3], p_cls[3]),
      "Mult_acc_5": _accuracy(y_cls[5], p_cls[5]),
      "F1_score": weighted_f1(y_cls[2], p_cls[2]),
      "MAE": float(np.mean(np.abs(p - y))),
      "Corr": _pearson(p, y),
  }
  return {k: _round(v, decimals) for k, v in results.items()}


def binary_metrics(predicted_classes, labels, *, decimals=4):
  """UR-FUNNY / MUStARD metrics from class ids in {0, 1} (1 = humour / sarcasm).

  Accuracy; the support-weighted Precision, Recall and F1_score (sklearn average="weighted", the
  numbers the MUStARD / UR-FUNNY literature reports); and the positive-class ones Precision_pos,
  Recall_pos, F1_pos (sklearn average="binary", pos_label=1). A ratio with a zero denominator
  is 0, as sklearn's default zero_division.

  Args:
    predicted_classes: (N,) predicted class ids (argmax of the logits).
    labels: (N,) true class ids.
    decimals: decimals to round to, or None.

  Returns:
    dict of Python floats: Accuracy, Precision, Recall, F1_score, Precision_pos, Recall_pos,
    F1_pos.
  """
  p = np.asarray(predicted_classes).reshape(-1)
  y = np.asarray(labels).reshape(-1)
  if p.shape != y.shape or p.size == 0:
    raise ValueError(
        f"metrics.binary_metrics: {p.size} predictions and {y.size} labels; pass the same,"
        " nonzero number of class ids.")
  for name, arr in (("predicted_classes", p), ("labels", y)):
    if not np.all((arr == 0) | (arr == 1)):
      bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
      raise ValueError(
          f"metrics.binary_metrics: {name} must be class ids in {{0, 1}}, got values {bad}; pass"
          " argmax(logits) and 0/1 labels.")
  p, y = p.astype(np.int64), y.astype(np.int64)

  precision, recall, f1 = _weighted_prf(y, p)
  tp = float(np.sum((p == 1) & (y == 1)))
  n_pred, n_true = float(np.sum(p == 1)), float(np.sum(y == 1))
  results = {
      "Accuracy": _accuracy(y, p),
      "Precision": precision,
      "Recall": recall,
      "F1_score": f1,
      "Precision_pos": tp / n_pred if n_pred else 0.0,
      "Recall_pos": tp / n_true if n_true else 0.0,
      "F1_pos": 2.0 * tp / (n_pred + n_true) if n_pred + n_true else 0.0,
  }
  return {k: _round(v, decimals) for k, v in results.items()}


def compute_metrics(dataset_name, predictions, labels, *, decimals=4):
  """Metrics for `dataset_name` (config.dataset.name, case-insensitive).

  mosi, mosei, synthetic -> `regression_metrics`; sims -> `sims_metrics`; urfunny, mustard ->
  `binary_metrics` (predictions are class ids there).
  """
  name = str(dataset_name).lower()
  if name in _REGRESSION:
    return regression_metrics(predictions, labels, decimals=decimals)
  if name in _SIMS:
    return sims_metrics(predictions, labels, decimals=decimals)
  if name in _BINARY:
    return binary_metrics(predictions, labels, decimals=decimals)
  raise ValueError(
      f"metrics.compute_metrics: unknown dataset {dataset_name!r}; expected one of"
      f" {_REGRESSION + _SIMS + _BINARY}.")


# ----------------------------------------------------------------------------- per run


def metrics_dataset(config):
  """The dataset whose metrics apply: synthetic data takes those of the data it imitates."""
  if config.dataset.name != "synthetic":
    return config.dataset.name
  if config.dataset.task == "binary":
    return "mustard"
  return "sims" if config.dataset.synthetic.like == "sims" else "synthetic"


# The metrics of each family (`metric_family`) that epoch lines and reports show, in this order.
REPORTED = {
    "regression": ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5",
                   "Mult_acc_7", "MAE", "Corr"),
    "sims": ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"),
    "binary": ("Accuracy", "Precision", "Recall", "F1_score", "Precision_pos", "Recall_pos",
               "F1_pos"),
}
# The one number a grid's progress line shows per family.
HEADLINE = {"regression": "Non0_acc_2", "sims": "Mult_acc_2", "binary": "Accuracy"}
# Metrics reported raw; every other one is a fraction, shown in percent as in the paper.
RAW_METRICS = ("MAE", "Corr")


def metric_family(dataset_name, task):
  """Which table layout a run's metrics use: "binary", "sims" or "regression"."""
  if task == "binary":
    return "binary"
  return "sims" if dataset_name == "sims" else "regression"


def point_predictions(task, preds):
  """(S, N, O) raw outputs -> (S, N) predictions the metrics take (values or class ids)."""
  return np.argmax(preds, axis=-1) if task == "binary" else preds[..., 0]


def split_metrics(config, preds, labels):
  """{metric: [value per seed]} for one split, from (S, N, O) raw outputs."""
  per_seed = [compute_metrics(metrics_dataset(config), p, labels)
              for p in point_predictions(config.dataset.task, preds)]
  return {k: [m[k] for m in per_seed] for k in per_seed[0]}


def selection_loss(task, preds, labels):
  """Unrounded validation loss used for selection, plateau and early stopping, per seed: (S,).

  Regression: mean |p - y| (MAE); binary: cross-entropy of the two logits, both in float64.
  """
  if task == "binary":
    logits = preds.astype(np.float64)
    logits = logits - logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, labels[None, :, None].astype(np.int64), axis=-1)
    return -picked[..., 0].mean(-1)
  return np.abs(preds[..., 0].astype(np.float64) - labels[None].astype(np.float64)).mean(-1)
