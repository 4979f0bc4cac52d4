"""Tests of dhmd_jax.metrics against hand-computed values and a brute-force weighted F1."""

import warnings

import numpy as np
import pytest

from dhmd_jax import metrics


def _brute_force_weighted(y_true, y_pred):
  """Per-class loop in the textbook form: P, R, F1 = 2PR/(P+R), weighted by support."""
  classes = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
  n = len(y_true)
  out_p = out_r = out_f = 0.0
  for cls in classes:
    tp = sum(1 for t, p in zip(y_true, y_pred) if t == cls and p == cls)
    n_pred = sum(1 for p in y_pred if p == cls)
    n_true = sum(1 for t in y_true if t == cls)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_true if n_true else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    out_p += n_true / n * prec
    out_r += n_true / n * rec
    out_f += n_true / n * f1
  return out_p, out_r, out_f


def test_round_half_to_even_in_mult_acc():
  # numpy rounds 2.5 -> 2, -0.5 -> -0, 0.5 -> 0, 1.5 -> 2; half-away-from-zero would give 0.25.
  p = np.array([2.5, -0.5, 0.5, 1.5])
  y = np.array([2.0, 0.0, 0.0, 2.0])
  out = metrics.regression_metrics(p, y)
  assert out["Mult_acc_7"] == 1.0
  assert out["Mult_acc_5"] == 1.0


def test_clipping_differs_between_acc7_and_acc5():
  p = np.array([3.0, -2.6, 0.0])
  y = np.array([2.0, -3.0, 0.2])
  out = metrics.regression_metrics(p, y)
  assert out["Mult_acc_7"] == pytest.approx(2 / 3, abs=1e-4)  # 3 vs 2 differs before clip to 2
  assert out["Mult_acc_5"] == 1.0
  assert out["MAE"] == pytest.approx(round((1.0 + 0.4 + 0.2) / 3, 4))


def test_zero_labels_split_has0_and_non0():
  p = np.array([0.5, -0.5, 1.0, -1.0])
  y = np.array([0.0, 0.0, 1.0, -1.0])
  out = metrics.regression_metrics(p, y)
  assert out["Has0_acc_2"] == 0.75
  # Has0 classes: y>=0 = [T,T,T,F], p>=0 = [T,F,T,F]. F1(T) = 4/5, F1(F) = 2/3, supports 3 and 1.
  assert out["Has0_F1_score"] == round((3 * 0.8 + 1 * 2 / 3) / 4, 4) == 0.7667
  assert out["Non0_acc_2"] == 1.0
  assert out["Non0_F1_score"] == 1.0


def test_all_one_class_predictions_use_zero_division():
  y = np.array([1.0, 2.0, -1.0, -2.0])
  p = np.array([1.0, 1.0, 1.0, 1.0])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no RuntimeWarning for the constant-prediction Corr
    out = metrics.regression_metrics(p, y)
  # Class "positive": tp 2, 4 predicted, 2 true -> F1 2/3; "negative" never predicted -> 0.
  assert out["Non0_acc_2"] == 0.5
  assert out["Non0_F1_score"] == round(0.5 * 2 / 3, 4) == 0.3333
  assert np.isnan(out["Corr"])


def test_all_zero_labels_make_non0_nan():
  p = np.array([0.3, -0.2, 0.0])
  y = np.zeros(3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = metrics.regression_metrics(p, y)
  assert np.isnan(out["Non0_acc_2"]) and np.isnan(out["Non0_F1_score"])
  assert np.isnan(out["Corr"])  # constant labels
  assert out["Has0_acc_2"] == pytest.approx(2 / 3, abs=1e-4)


def test_perfect_prediction():
  y = np.array([-2.4, -1.0, 0.0, 0.3, 1.6, 2.9], np.float32)
  out = metrics.regression_metrics(y.copy(), y)
  assert out == {"MAE": 0.0, "Corr": 1.0, "Mult_acc_7": 1.0, "Mult_acc_5": 1.0,
                 "Has0_acc_2": 1.0, "Has0_F1_score": 1.0, "Non0_acc_2": 1.0,
                 "Non0_F1_score": 1.0}


def test_corr_matches_numpy_and_decimals():
  rng = np.random.default_rng(0)
  p, y = rng.normal(size=50), rng.normal(size=50)
  raw = metrics.regression_metrics(p, y, decimals=None)
  assert raw["Corr"] == np.corrcoef(p, y)[0, 1]
  assert raw["MAE"] == np.mean(np.abs(p - y))
  rounded = metrics.regression_metrics(p, y)
  assert rounded["Corr"] == np.round(raw["Corr"], 4) != raw["Corr"]


def test_weighted_f1_matches_brute_force_loop():
  rng = np.random.default_rng(1)
  for trial in range(20):
    n = int(rng.integers(1, 30))
    y_true = rng.integers(0, 4, size=n)
    y_pred = rng.integers(0, 3 + trial % 3, size=n)  # sometimes a class only in predictions
    want = _brute_force_weighted(y_true, y_pred)
    assert metrics.weighted_f1(y_true, y_pred) == pytest.approx(want[2], abs=1e-12)
    got = metrics._weighted_prf(y_true, y_pred)  # pylint: disable=protected-access
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_sims_bin_edges_are_right_closed():
  y = np.array([-0.1, 0.1, 0.7, 0.0, -0.7])
  p = np.array([-0.09, 0.11, 0.71, 0.01, -0.69])
  for dtype in (np.float64, np.float32):  # float32 edges compare in float32, as in MMSA
    out = metrics.sims_metrics(p.astype(dtype), y.astype(dtype))
    assert out["Mult_acc_2"] == 0.8
    assert out["Mult_acc_3"] == 0.6
    assert out["Mult_acc_5"] == 0.2
    # 2-class y [0,1,1,0,0] vs p [0,1,1,1,0]: F1 = 4/5 for both classes.
    assert out["F1_score"] == 0.8


def test_sims_clips_before_mae():
  out = metrics.sims_metrics(np.array([2.0, -3.0, 0.2]), np.array([1.0, 0.5, -0.4]))
  assert out["MAE"] == pytest.approx((0.0 + 1.5 + 0.6) / 3, abs=1e-4)
  assert out["Mult_acc_2"] == pytest.approx(1 / 3, abs=1e-4)


def test_binary_known_confusion_matrix():
  # TP 3, FN 1, FP 2, TN 4.
  y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
  p = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
  out = metrics.binary_metrics(p, y, decimals=None)
  assert out["Accuracy"] == pytest.approx(0.7)
  assert out["Precision_pos"] == pytest.approx(0.6)
  assert out["Recall_pos"] == pytest.approx(0.75)
  assert out["F1_pos"] == pytest.approx(2 / 3)
  # Negative class: P 4/5, R 4/6, F1 8/11; supports 4 (pos) and 6 (neg).
  assert out["Precision"] == pytest.approx((4 * 0.6 + 6 * 0.8) / 10)
  assert out["Recall"] == pytest.approx((4 * 0.75 + 6 * 4 / 6) / 10)
  assert out["F1_score"] == pytest.approx((4 * 2 / 3 + 6 * 8 / 11) / 10)


def test_binary_never_predicting_positive():
  out = metrics.binary_metrics(np.zeros(4), np.array([1, 0, 1, 0]))
  assert out["Precision_pos"] == out["Recall_pos"] == out["F1_pos"] == 0.0
  assert out["Accuracy"] == 0.5
  assert out["F1_score"] == round(0.5 * 2 * 2 / 6, 4)  # negative: tp 2, 4 predicted, 2 true


def test_binary_random_matches_brute_force():
  rng = np.random.default_rng(2)
  y, p = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
  out = metrics.binary_metrics(p, y, decimals=None)
  want = _brute_force_weighted(y, p)
  np.testing.assert_allclose([out["Precision"], out["Recall"], out["F1_score"]], want)


def test_compute_metrics_dispatch_and_errors():
  y = np.array([-1.0, 0.5, 2.0])
  assert metrics.compute_metrics("MOSI", y, y) == metrics.regression_metrics(y, y)
  assert metrics.compute_metrics("synthetic", y, y)["MAE"] == 0.0
  assert set(metrics.compute_metrics("sims", y, y)) == {
      "Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"}
  assert metrics.compute_metrics("mustard", [0, 1], [0, 1])["F1_score"] == 1.0
  with pytest.raises(ValueError, match="unknown dataset 'iemocap'") as err:
    metrics.compute_metrics("iemocap", y, y)
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="3 predictions but 2 labels"):
    metrics.regression_metrics(y, y[:2])
  with pytest.raises(ValueError, match="class ids in"):
    metrics.binary_metrics(np.array([0.3, 1.0]), np.array([0, 1]))


def test_selection_loss_is_unrounded_mae_and_cross_entropy():
  preds = np.array([[[1 / 3], [0.0]], [[0.0], [0.5]]])  # (S=2, N=2, O=1)
  got = metrics.selection_loss("regression", preds, np.array([0.0, 0.0]))
  np.testing.assert_allclose(got, [1 / 6, 1 / 4], rtol=0, atol=1e-15)
  logits = np.array([[[2.0, -1.0], [0.5, 0.25]]])  # (S=1, N=2, O=2)
  labels = np.array([1, 0])
  brute = np.mean([-np.log(np.exp(l[y]) / np.exp(l).sum()) for l, y in zip(logits[0], labels)])
  np.testing.assert_allclose(metrics.selection_loss("binary", logits, labels), [brute], rtol=1e-12)