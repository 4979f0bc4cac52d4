"""Tests of the synthetic pickle writer: layouts, shapes, determinism, planted signal, CLI."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from dhmd_jax import synthetic

TINY_DIMS = {"text": 6, "vision": 4, "audio": 3}


def _write(tmp_path, name="s.pkl", **kwargs):
  args = dict(like="mosi", aligned=True, layout="mmsa", num_train=6, num_valid=3, num_test=3,
              seed=0)
  args.update(kwargs)
  path = synthetic.write_synthetic(str(tmp_path / name), **args)
  with open(path, "rb") as f:
    return path, pickle.load(f)


MMSA_KEYS = {"raw_text", "audio", "vision", "id", "text", "text_bert", "annotations",
             "classification_labels", "regression_labels"}


@pytest.mark.parametrize("like,aligned,layout", [
    ("mosi", True, "mmsa"), ("mosi", False, "mmsa"), ("mosei", True, "mmsa"),
    ("mosei", False, "mmsa"), ("sims", False, "mmsa"), ("mosi", True, "multibench"),
    ("mosi", False, "multibench"), ("mosei", True, "multibench"), ("mosei", False, "multibench"),
    ("urfunny", True, "multibench"), ("mustard", True, "multibench")])
def test_real_keys_shapes_and_dtypes(tmp_path, like, aligned, layout):
  _, data = _write(tmp_path, like=like, aligned=aligned, layout=layout, num_train=2,
                   num_valid=1, num_test=1)
  assert set(data) == {"train", "valid", "test"}
  shapes = synthetic.shapes_for(like, aligned, layout)
  split = data["train"]
  for m in synthetic.MODALITIES:
    assert split[m].shape == (2, *shapes[m]) and split[m].dtype == np.float32
  if layout == "mmsa":
    expected = set(MMSA_KEYS)
    if not aligned:
      expected |= {"audio_lengths", "vision_lengths"}
    if like == "sims":
      expected |= {"regression_labels_T", "regression_labels_A", "regression_labels_V"}
    assert set(split) == expected
    assert split["text_bert"].shape == (2, 3, shapes["text"][0])
    assert split["text_bert"].dtype == np.int64
    assert split["regression_labels"].shape == (2,)
    assert all("$_$" in i for i in split["id"])
  else:
    assert set(split) == {"text", "audio", "vision", "labels", "id"}
    assert split["id"].shape == (2, 3)
    assert split["id"].dtype.kind == ("S" if like == "mosi" else "U")
    label_shape = {"urfunny": (2, 1), "mustard": (2,)}.get(like, (2, 1, 1))
    assert split["labels"].shape == label_shape


def test_real_dims_of_the_reference_table():
  assert synthetic.shapes_for("mosei", False, "mmsa") == {
      "text": (50, 768), "vision": (500, 35), "audio": (500, 74)}
  assert synthetic.shapes_for("mosi", False, "mmsa")["audio"] == (375, 5)
  assert synthetic.shapes_for("sims", False, "mmsa") == {
      "text": (39, 768), "vision": (55, 709), "audio": (400, 33)}
  assert synthetic.shapes_for("urfunny", True, "multibench") == {
      "text": (50, 300), "vision": (50, 371), "audio": (50, 81)}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
  kwargs = dict(like="mosi", aligned=False, dims=TINY_DIMS, seq_lens={"audio": 9, "vision": 7})
  a, _ = _write(tmp_path, "a.pkl", **kwargs)
  b, _ = _write(tmp_path, "b.pkl", **kwargs)
  c, _ = _write(tmp_path, "c.pkl", seed=1, **kwargs)
  with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
    bytes_a, bytes_b, bytes_c = fa.read(), fb.read(), fc.read()
  assert bytes_a == bytes_b
  assert bytes_a != bytes_c


def test_overrides_change_dims_and_lengths(tmp_path):
  _, data = _write(tmp_path, aligned=False, dims=TINY_DIMS,
                   seq_lens={"text": 5, "audio": 9, "vision": 7})
  assert data["train"]["text"].shape == (6, 5, 6)
  assert data["train"]["audio"].shape == (6, 9, 3)
  assert data["train"]["vision"].shape == (6, 7, 4)
  assert data["train"]["text_bert"].shape == (6, 3, 5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(like="sims", aligned=True), "only unaligned"),
    (dict(like="urfunny", layout="mmsa"), "not available in the mmsa layout"),
    (dict(like="mustard", aligned=False, layout="multibench"), "only aligned"),
    (dict(layout="tfrecord"), "layout must be one of"),
    (dict(aligned=True, seq_lens={"audio": 9}), "one sequence length"),
    (dict(dims={"speech": 3}), "keys must be in"),
    (dict(num_valid=0), "split sizes must be >= 1"),
])
def test_invalid_options_are_refused(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    _write(tmp_path, **kwargs)
  assert not os.listdir(tmp_path)


def test_label_grids(tmp_path):
  _, mosei = _write(tmp_path, "m.pkl", like="mosei", num_train=400, dims=TINY_DIMS,
                    seq_lens={"text": 4, "audio": 4, "vision": 4})
  y = mosei["train"]["regression_labels"]
  assert y.dtype == np.float32 and y.min() >= -3 and y.max() <= 3
  np.testing.assert_allclose(y * 3, np.round(y * 3), atol=1e-5)  # multiples of 1/3
  assert 0.02 < np.mean(y == 0) < 0.3 and np.all(np.signbit(y[y == 0]) == 0)
  _, sims = _write(tmp_path, "s.pkl", like="sims", aligned=False, num_train=400, dims=TINY_DIMS,
                   seq_lens={"text": 4, "audio": 4, "vision": 4})
  for key in ("regression_labels", "regression_labels_T", "regression_labels_A",
              "regression_labels_V"):
    y = sims["train"][key]
    assert y.min() >= -1 and y.max() <= 1
    np.testing.assert_allclose(y * 5, np.round(y * 5), atol=1e-5)  # steps of 0.2
  _, mustard = _write(tmp_path, "b.pkl", like="mustard", layout="multibench", num_train=50)
  assert set(np.unique(mustard["train"]["labels"])) == {-1, 1}
  _, urfunny = _write(tmp_path, "u.pkl", like="urfunny", layout="multibench", num_train=50)
  assert set(np.unique(urfunny["train"]["labels"])) == {0, 1}


def test_padding_lengths_and_text_bert(tmp_path):
  _, data = _write(tmp_path, aligned=False, num_train=20, dims=TINY_DIMS,
                   seq_lens={"text": 8, "audio": 12, "vision": 10})
  split = data["train"]
  for m in ("audio", "vision"):
    lengths = split[f"{m}_lengths"]
    t = split[m].shape[1]
    real = np.any(split[m] != 0, axis=-1)  # (N, T)
    np.testing.assert_array_equal(real, np.arange(t)[None] < lengths[:, None])
    assert lengths.min() >= 1 and len(set(lengths.tolist())) > 1  # variable, padding at the end
  bert = split["text_bert"]
  np.testing.assert_array_equal(bert[:, 1] == 1, np.any(split["text"] != 0, axis=-1))
  text_len = bert[:, 1].sum(axis=1)
  assert np.all(bert[:, 0, 0] == 101)
  assert np.all(bert[np.arange(20), 0, text_len - 1] == 102)
  assert np.all(bert[:, 2] == 0)


def test_multibench_left_pads_text(tmp_path):
  _, data = _write(tmp_path, like="mosei", aligned=False, layout="multibench", num_train=20,
                   dims=TINY_DIMS, seq_lens={"text": 8, "audio": 12, "vision": 10})
  split = data["train"]
  real_text = np.any(split["text"] != 0, axis=-1)  # (N, L)
  assert np.all(real_text[:, -1]) and not np.all(real_text[:, 0])
  assert np.all(np.diff(real_text.astype(int), axis=1) >= 0)  # zeros first, then real frames
  real_audio = np.any(split["audio"] != 0, axis=-1)
  assert np.all(real_audio[:, 0]) and np.all(np.diff(real_audio.astype(int), axis=1) <= 0)


def test_nonfinite_fraction_plants_inf_in_audio_only(tmp_path):
  _, clean = _write(tmp_path, "c.pkl", aligned=False, dims=TINY_DIMS)
  assert all(np.isfinite(clean[s][m]).all() for s in clean for m in synthetic.MODALITIES)
  _, dirty = _write(tmp_path, "d.pkl", aligned=False, dims=TINY_DIMS, nonfinite_fraction=0.05)
  audio = dirty["train"]["audio"]
  assert np.isneginf(audio).any() and not np.isnan(audio).any()
  assert np.isfinite(dirty["train"]["text"]).all() and np.isfinite(dirty["train"]["vision"]).all()
  lengths = dirty["train"]["audio_lengths"]
  padding = np.arange(audio.shape[1])[None] >= lengths[:, None]
  assert np.all(audio[padding] == 0)


def _pooled(split, m, mask):
  x = split[m]
  return (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)  # (N, D)


def _linear_test_corr(data, m):
  """Pearson r on test of a ridge fit (train) from mean-pooled real frames to the label."""
  feats = {}
  for s in ("train", "test"):
    split = data[s]
    mask = split["text_bert"][:, 1] == 1 if m == "text" else np.arange(
        split[m].shape[1])[None] < split[f"{m}_lengths"][:, None]
    x = np.concatenate([_pooled(split, m, mask), np.ones((len(mask), 1))], axis=1)
    feats[s] = x
  y = data["train"]["regression_labels"]
  x = feats["train"]
  w = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ y)
  return np.corrcoef(feats["test"] @ w, data["test"]["regression_labels"])[0, 1]


def test_planted_signal_is_learnable_strong_in_text_weak_in_audio(tmp_path):
  _, data = _write(tmp_path, like="mosei", aligned=False, num_train=600, num_valid=2,
                   num_test=400, dims={"text": 12, "vision": 6, "audio": 5},
                   seq_lens={"text": 10, "audio": 16, "vision": 12})
  text, audio, vision = (_linear_test_corr(data, m) for m in ("text", "audio", "vision"))
  assert text > 0.75
  assert 0.15 < audio < text - 0.2
  assert 0.15 < vision < text - 0.2


def test_hard_samples_carry_signal_in_a_weaker_modality_only(tmp_path):
  _, data = _write(tmp_path, like="mosei", aligned=True, num_train=1000,
                   dims={"text": 8, "vision": 6, "audio": 5},
                   seq_lens={"text": 6, "audio": 6, "vision": 6})
  split = data["train"]
  mask = split["text_bert"][:, 1] == 1
  y = split["regression_labels"]
  x_text = np.c_[_pooled(split, "text", mask), np.ones(len(y))]
  residual = y - x_text @ np.linalg.lstsq(x_text, y, rcond=None)[0]
  worst = np.argsort(-np.abs(residual))[:100]  # where text fails to explain the label
  others = np.c_[_pooled(split, "audio", mask), _pooled(split, "vision", mask), np.ones(len(y))]
  w = np.linalg.lstsq(others, residual, rcond=None)[0]
  assert 0.05 < np.mean(np.abs(residual) > 1.0) < 0.3  # roughly the planted 15% (0.01 without)
  # Audio/vision explain what text cannot (r ~0.65 here, ~0.3 without hard samples).
  assert np.corrcoef(others[worst] @ w, residual[worst])[0, 1] > 0.5


def test_cli_writes_a_file_and_prints_shapes(tmp_path):
  out = tmp_path / "cli.pkl"
  result = subprocess.run(
      [sys.executable, "-m", "dhmd_jax.synthetic", "--like", "mosi", "--unaligned", "--out",
       str(out), "--num-train", "3", "--num-valid", "2", "--num-test", "2", "--seed", "5"],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert str(out) in result.stdout and "(3, 375, 5)" in result.stdout
  with open(out, "rb") as f:
    data = pickle.load(f)
  assert data["valid"]["vision"].shape == (2, 500, 20)
  bad = subprocess.run([sys.executable, "-m", "dhmd_jax.synthetic", "--like", "sims", "--aligned",
                        "--out", str(tmp_path / "x.pkl")], capture_output=True, text=True,
                       check=False)
  assert bad.returncode != 0 and "only unaligned" in bad.stderr
  assert not (tmp_path / "x.pkl").exists()


def test_cli_takes_absl_and_dashed_flag_names(tmp_path, capsys):
  out = tmp_path / "u.pkl"
  assert synthetic.main(["--like=mosi", "--num_train=3", "--num-valid", "2", "--num_test=2",
                         "--text-vocab-size=128", f"--out={out}"]) == 0
  with open(out, "rb") as f:
    data = pickle.load(f)
  assert len(data["valid"]["id"]) == 2 and data["train"]["text_bert"].max() < 128
  capsys.readouterr()
  assert synthetic.main(["--like=mosi", "--aligned", "--unaligned", f"--out={out}.2"]) == 2
  assert capsys.readouterr().err == (
      "error: --aligned and --unaligned exclude each other: give one\n")
  assert not os.path.exists(f"{out}.2")
