"""Tests of the data layer: every reader, masks, non-finite handling, the cache, every error."""

import errno
import fcntl
import importlib.util
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from dhmd_jax import data
from dhmd_jax import lockfile
from dhmd_jax import synthetic
from dhmd_jax.data import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_DIMS = {"text": 6, "vision": 4, "audio": 3}
TINY_ALIGNED = {"text": 8, "vision": 8, "audio": 8}
TINY_UNALIGNED = {"text": 8, "vision": 11, "audio": 13}


def _default_config():
  spec = importlib.util.spec_from_file_location("default_config", REPO / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().dataset


def _config(path="", **fields):
  config = _default_config()
  config.path = str(path)
  for key, value in fields.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _tiny(tmp_path, name="x.pkl", *, like="mosi", aligned=True, layout="mmsa", **kwargs):
  """A tiny synthetic pickle and its contents."""
  seq_lens = TINY_ALIGNED if aligned else TINY_UNALIGNED
  if like == "sims":
    seq_lens = TINY_UNALIGNED
  args = dict(num_train=6, num_valid=4, num_test=3, seed=0, dims=TINY_DIMS, seq_lens=seq_lens)
  args.update(kwargs)
  path = synthetic.write_synthetic(str(tmp_path / name), like=like, aligned=aligned,
                                   layout=layout, **args)
  with open(path, "rb") as f:
    return path, pickle.load(f)


def _dump(tmp_path, obj, name="h.pkl"):
  path = tmp_path / name
  with open(path, "wb") as f:
    pickle.dump(obj, f)
  return str(path)


def _handmade(fmt="mmsa", n=3, t=4, sizes=(3, 2, 2)):
  """A small hand-written file whose every value is known."""
  out = {}
  for split, n in zip(data.SPLITS, sizes):
    rng = np.random.default_rng(n)
    d = {m: rng.uniform(0.5, 1.0, size=(n, t, dim)).astype(np.float32)
         for m, dim in TINY_DIMS.items()}
    if fmt == "mmsa":
      d["regression_labels"] = np.linspace(-3, 3, n).astype(np.float32)
      d["id"] = np.array([f"v{i}$_${i}" for i in range(n)])
    else:
      d["labels"] = np.linspace(-3, 3, n).astype(np.float32).reshape(n, 1, 1)
      d["id"] = np.array([[f"v{i}".encode(), b"1.0", b"2.5"] for i in range(n)])
    out[split] = d
  return out


def _load(path, **fields):
  return data.load_dataset(_config(path, name=fields.pop("name", "mosi"), **fields))


# ----------------------------------------------------------------------------- readers


def test_mmsa_aligned(tmp_path):
  path, raw = _tiny(tmp_path, like="mosei", aligned=True)
  ds = _load(path, name="mosei")
  assert ds.aligned and ds.task == "regression" and ds.source == path
  assert ds.feature_dims == {"text": 6, "vision": 4, "audio": 3}
  assert ds.seq_lens == {"text": 8, "vision": 8, "audio": 8}
  for name, split in ds.splits.items():
    r = raw[name]
    assert split.name == name and split.num_samples == len(r["regression_labels"])
    for m in data.MODALITIES:
      assert split.features[m].dtype == np.float32
      np.testing.assert_array_equal(split.features[m], r[m])
      assert split.masks[m].dtype == bool and split.lengths[m].dtype == np.int32
    text_mask = r["text_bert"][:, 1] == 1
    np.testing.assert_array_equal(split.masks["text"], text_mask)
    np.testing.assert_array_equal(split.masks["audio"], text_mask)  # aligned, zero padding
    np.testing.assert_array_equal(split.lengths["vision"], text_mask.sum(1))
    np.testing.assert_array_equal(split.labels, r["regression_labels"])
    assert split.labels.dtype == np.float32
    np.testing.assert_array_equal(split.ids, r["id"])


def test_mmsa_unaligned_masks_from_lengths(tmp_path):
  path, raw = _tiny(tmp_path, like="mosi", aligned=False)
  ds = _load(path)
  assert not ds.aligned and ds.seq_lens == {"text": 8, "vision": 11, "audio": 13}
  for name, split in ds.splits.items():
    for m in ("audio", "vision"):
      lengths = raw[name][f"{m}_lengths"]
      np.testing.assert_array_equal(split.lengths[m], lengths)
      t = ds.seq_lens[m]
      np.testing.assert_array_equal(split.masks[m], np.arange(t)[None] < lengths[:, None])


def test_lengths_and_text_bert_win_over_zero_padding(tmp_path):
  raw = _handmade(t=5)
  for split in raw.values():
    n = len(split["id"])
    split["audio"][:, 1] = 0.0  # an all-zero frame inside the stated length
    split["audio_lengths"] = np.full(n, 3)
    bert = np.zeros((n, 3, 5), np.int64)
    bert[:, 1, :4] = 1
    split["text_bert"] = bert
    split["text"][:, 2] = 0.0  # a zero token inside the attention mask
  ds = _load(_dump(tmp_path, raw))
  split = ds.splits["train"]
  np.testing.assert_array_equal(split.masks["audio"][0], [True, True, True, False, False])
  np.testing.assert_array_equal(split.masks["text"][0], [True, True, True, True, False])
  assert split.lengths["audio"].tolist() == [3, 3, 3]
  assert split.lengths["text"].tolist() == [4, 4, 4]
  assert split.masks["vision"].all()  # no lengths: zero padding, none here


def test_masks_from_zero_padding_left_and_right(tmp_path):
  raw = _handmade("multibench", t=5)
  train = raw["train"]
  train["text"][0, :2] = 0.0  # MulT GloVe text is zero left-padded
  train["text"][1, :] = 0.0
  train["vision"][0, 3:] = 0.0  # right padding
  train["audio"][2, 2, 0] = 0.0  # one zero value does not make a frame padding
  ds = _load(_dump(tmp_path, raw), format="multibench")
  split = ds.splits["train"]
  np.testing.assert_array_equal(split.masks["text"][0], [False, False, True, True, True])
  assert split.lengths["text"].tolist() == [3, 0, 5]
  np.testing.assert_array_equal(split.masks["vision"][0], [True, True, True, False, False])
  assert split.lengths["vision"].tolist() == [3, 5, 5]
  assert split.masks["audio"].all()


def test_sims(tmp_path):
  path, raw = _tiny(tmp_path, like="sims", aligned=False)
  ds = _load(path, name="sims")
  assert ds.feature_dims == TINY_DIMS and not ds.aligned
  y = ds.splits["train"].labels
  assert y.min() >= -1 and y.max() <= 1
  np.testing.assert_array_equal(y, raw["train"]["regression_labels"])


def test_multibench_regression_with_bytes_ids(tmp_path):
  path, raw = _tiny(tmp_path, like="mosi", aligned=True, layout="multibench")
  assert raw["train"]["id"].dtype.kind == "S"
  ds = _load(path, format="multibench")
  split = ds.splits["train"]
  first = [v.decode() for v in raw["train"]["id"][0]]
  assert split.ids[0] == "$_$".join(first) and split.ids.dtype.kind == "U"
  np.testing.assert_array_equal(split.labels, raw["train"]["labels"].reshape(-1))
  text_real = np.any(raw["train"]["text"] != 0, axis=-1)
  np.testing.assert_array_equal(split.masks["text"], text_real)
  assert not split.masks["text"][:, 0].all() and split.masks["text"][:, -1].all()  # left pad


@pytest.mark.parametrize("like", ["mustard", "urfunny"])
def test_multibench_binary_labels(tmp_path, like):
  path, raw = _tiny(tmp_path, like=like, aligned=True, layout="multibench")
  ds = _load(path, name=like, format="multibench", task="binary")
  labels = ds.splits["train"].labels
  assert labels.dtype == np.int32 and set(labels.tolist()) <= {0, 1}
  np.testing.assert_array_equal(labels, (raw["train"]["labels"].reshape(-1) > 0).astype(int))
  assert "class 1" in data.summarize(ds)


def test_str_ids_of_shape_n(tmp_path):
  raw = _handmade("multibench")
  for split in raw.values():
    split["id"] = [f"clip{i}" for i in range(len(split["labels"]))]  # a plain list
  ds = _load(_dump(tmp_path, raw), format="multibench")
  assert ds.splits["valid"].ids.tolist() == ["clip0", "clip1"]


# ----------------------------------------------------------------------------- non-finite


def test_nonfinite_replaced_and_counted(tmp_path):
  path, raw = _tiny(tmp_path, aligned=False, nonfinite_fraction=0.1)
  raw["valid"]["text"][0, 0, :2] = np.nan
  path = _dump(tmp_path, raw)
  ds = _load(path)
  for name in data.SPLITS:
    expected = int(np.isneginf(raw[name]["audio"]).sum())
    assert expected > 0 and ds.nonfinite_counts[name]["audio"] == expected
    for m in data.MODALITIES:
      feats = np.asarray(ds.splits[name].features[m])
      assert np.isfinite(feats).all()
      np.testing.assert_array_equal(feats, np.where(np.isfinite(raw[name][m]), raw[name][m], 0))
  assert ds.nonfinite_counts["valid"]["text"] == 2 and ds.nonfinite_counts["train"]["text"] == 0
  summary = data.summarize(ds)
  assert f"{ds.nonfinite_counts['train']['audio']} non-finite values replaced" in summary


def test_nonfinite_refused_in_error_mode_and_no_cache_left(tmp_path):
  raw = _handmade()
  raw["test"]["audio"][1, 2, :] = -np.inf  # test is converted last: train was already written
  path = _dump(tmp_path, raw)
  with pytest.raises(DataError, match=r"split 'test' key 'audio' has 3 non-finite") as e:
    _load(path, nonfinite="error")
  assert path in str(e.value) and "nonfinite=zero" in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ["h.pkl"]  # neither the cache nor its temp folder
  ds = _load(path)  # the default mode builds the cache ...
  assert ds.nonfinite_counts["test"]["audio"] == 3
  with pytest.raises(DataError, match="has 3 non-finite"):  # ... which error mode still refuses
    _load(path, nonfinite="error")


# ----------------------------------------------------------------------------- cache


def test_cache_memory_maps_and_matches_first_load(tmp_path):
  path, _ = _tiny(tmp_path, aligned=False)
  first = _load(path)
  cache = pathlib.Path(path + ".cache")
  assert (cache / "manifest.json").is_file() and (cache / "train" / "audio.npy").is_file()
  assert sorted(os.listdir(tmp_path)) == ["x.pkl", "x.pkl.cache"]
  mtime = (cache / "train" / "audio.npy").stat().st_mtime_ns
  second = _load(path)
  assert (cache / "train" / "audio.npy").stat().st_mtime_ns == mtime  # not rewritten
  for name in data.SPLITS:
    a, b = first.splits[name], second.splits[name]
    for m in data.MODALITIES:
      assert isinstance(b.features[m], np.memmap) and not b.features[m].flags.writeable
      np.testing.assert_array_equal(a.features[m], b.features[m])
      np.testing.assert_array_equal(a.masks[m], b.masks[m])
      np.testing.assert_array_equal(a.lengths[m], b.lengths[m])
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.ids, b.ids)
  assert first.nonfinite_counts == second.nonfinite_counts


def test_stale_cache_is_refused_then_rebuilt(tmp_path):
  path, _ = _tiny(tmp_path, seed=0)
  old = _load(path).splits["train"].labels.copy()
  _tiny(tmp_path, seed=1)  # the pickle changes under its cache
  with pytest.raises(DataError, match="no longer matches") as e:
    _load(path)
  assert "rebuild_cache=True" in str(e.value) and "x.pkl.cache" in str(e.value)
  new = _load(path, rebuild_cache=True).splits["train"].labels
  assert not np.array_equal(old, new)
  with open(path, "rb") as f:
    np.testing.assert_array_equal(new, pickle.load(f)["train"]["regression_labels"])
  assert sorted(os.listdir(tmp_path)) == ["x.pkl", "x.pkl.cache"]  # no old/temp folders left
  _load(path)  # valid again


def test_cache_built_for_another_task_is_stale(tmp_path):
  raw = _handmade("multibench")
  for split in raw.values():
    split["labels"] = (np.arange(len(split["labels"])) % 2).astype(np.float32)
  path = _dump(tmp_path, raw)
  _load(path, format="multibench")
  with pytest.raises(DataError, match="built with task=regression"):
    _load(path, name="urfunny", format="multibench", task="binary")


def test_cache_dir_config_and_foreign_folder(tmp_path):
  path, _ = _tiny(tmp_path)
  cache = tmp_path / "elsewhere" / "c"
  _load(path, cache_dir=str(cache))
  assert (cache / "manifest.json").is_file() and not os.path.exists(path + ".cache")
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  with pytest.raises(DataError, match="not a dhmd-jax cache"):
    _load(path, cache_dir=str(foreign), rebuild_cache=True)
  assert (foreign / "notes.txt").read_text() == "keep me"


def test_damaged_cache(tmp_path):
  path, _ = _tiny(tmp_path)
  _load(path)
  os.remove(path + ".cache/valid/text.npy")
  with pytest.raises(DataError, match="cannot be read"):
    _load(path)
  assert _load(path, rebuild_cache=True).splits["valid"].num_samples == 4



# ----------------------------------------------------------------------------- read-only folders


def _chmod_read_only(folder):
  """chmod 0o555; True when that stops this process from writing there (not for root)."""
  folder.chmod(0o555)
  return not os.access(folder, os.W_OK)


def _user_caches(home):
  root = home / ".cache" / "dhmd_jax" / "features"
  return sorted(os.listdir(root)) if root.is_dir() else []


@pytest.fixture
def home(tmp_path, monkeypatch):
  """A fresh HOME, so the per-user cache folder is under tmp_path."""
  folder = tmp_path / "home"
  folder.mkdir()
  monkeypatch.setenv("HOME", str(folder))
  return folder


def _read_only_data(tmp_path, monkeypatch):
  """A tiny pickle in a folder this process cannot write: chmod 0o555, and where chmod does not
  stop this process (root) the writability check answers what it answers for other users."""
  folder = tmp_path / "shared"
  folder.mkdir()
  path, _ = _tiny(folder)
  if not _chmod_read_only(folder):
    real = data._writable
    monkeypatch.setattr(data, "_writable",
                        lambda f: False if os.path.abspath(f) == str(folder) else real(f))
  return folder, path


def test_read_only_data_folder_caches_per_user(tmp_path, monkeypatch, home, capsys):
  folder, path = _read_only_data(tmp_path, monkeypatch)
  try:
    ds = _load(path)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1, printed
    (cache_name,) = _user_caches(home)
    cache = home / ".cache" / "dhmd_jax" / "features" / cache_name
    assert printed[0] == (f"data folder {folder} is not writable: the feature cache of x.pkl is "
                          f"{cache} (set --config.dataset.cache_dir to choose another)")
    assert cache_name.startswith("x.pkl-") and (cache / "manifest.json").is_file()
    assert sorted(os.listdir(folder)) == ["x.pkl"]  # nothing written beside the pickle
    with open(path, "rb") as f:
      np.testing.assert_array_equal(ds.splits["train"].labels,
                                    pickle.load(f)["train"]["regression_labels"])
    mtime = (cache / "manifest.json").stat().st_mtime_ns
    assert _load(path).splits["test"].num_samples == 3  # reused, not rebuilt
    assert (cache / "manifest.json").stat().st_mtime_ns == mtime
    assert len(capsys.readouterr().out.splitlines()) == 1
    # The pickle changes (say, replaced by the data's owner): a new cache under a new key,
    # and the old one, of the same path, is removed once the new one is complete.
    folder.chmod(0o755)
    _tiny(folder, seed=1)
    folder.chmod(0o555)
    new = _load(path).splits["train"].labels
    (new_name,) = _user_caches(home)
    assert new_name != cache_name and new_name.split("-")[:2] == cache_name.split("-")[:2]
    with open(path, "rb") as f:
      np.testing.assert_array_equal(new, pickle.load(f)["train"]["regression_labels"])
  finally:
    folder.chmod(0o755)


def test_read_only_data_folder_by_chmod_alone(tmp_path, home):
  folder = tmp_path / "shared"
  folder.mkdir()
  path, _ = _tiny(folder)
  try:
    if not _chmod_read_only(folder):
      pytest.skip("chmod does not stop this process (root) from writing")
    assert _load(path).splits["valid"].num_samples == 4
    assert sorted(os.listdir(folder)) == ["x.pkl"] and len(_user_caches(home)) == 1
  finally:
    folder.chmod(0o755)


def test_read_only_data_folder_uses_a_cache_built_there_before(tmp_path, monkeypatch, home,
                                                                capsys):
  folder = tmp_path / "shared"
  folder.mkdir()
  path, _ = _tiny(folder)
  _load(path)  # built while the folder was writable
  capsys.readouterr()
  try:
    if not _chmod_read_only(folder):
      monkeypatch.setattr(data, "_writable", lambda f: False)
    assert _load(path).splits["train"].num_samples == 6
    assert capsys.readouterr().out == "" and _user_caches(home) == []
  finally:
    folder.chmod(0o755)


def test_unwritable_cache_dir_is_one_line(tmp_path):
  path, _ = _tiny(tmp_path)
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  cache = blocker / "cache"  # no process, root included, can create a folder under a file
  with pytest.raises(DataError) as e:
    _load(path, cache_dir=str(cache))
  message = str(e.value)
  assert "\n" not in message and message.startswith(f"cannot write the feature cache {cache}")
  assert "set --config.dataset.cache_dir to a folder you can write" in message
  assert sorted(os.listdir(tmp_path)) == ["a_file", "x.pkl"]


def test_read_only_cache_dir_is_one_line(tmp_path):
  path, _ = _tiny(tmp_path)
  locked = tmp_path / "locked"
  locked.mkdir()
  try:
    if not _chmod_read_only(locked):
      pytest.skip("chmod does not stop this process (root) from writing")
    with pytest.raises(DataError, match="cannot write the feature cache .*PermissionError"):
      _load(path, cache_dir=str(locked / "cache"))
  finally:
    locked.chmod(0o755)


def test_unwritable_user_cache_is_one_line(tmp_path, monkeypatch):
  folder, path = _read_only_data(tmp_path, monkeypatch)
  home = tmp_path / "home_file"
  home.write_text("HOME is a file here")
  monkeypatch.setenv("HOME", str(home))
  try:
    with pytest.raises(DataError, match=f"cannot write the feature cache {home}/.cache/"):
      _load(path)
  finally:
    folder.chmod(0o755)


# ----------------------------------------------------------------------------- killed builds


def _leftover_names(base):
  return [f"{base}.tmp-ab12cd_9", f"{base}.old-0123abcd"]


def test_leftovers_of_a_killed_build_are_removed_and_only_ours(tmp_path):
  path, _ = _tiny(tmp_path)
  _load(path)
  ours = _leftover_names("x.pkl.cache")
  not_ours = ["x.pkl.cache.tmp-mine", "y.pkl.cache.tmp-ab12cd_9", "x.pkl.cache.tmp-ab12cd_9x"]
  for name in ours + not_ours:
    (tmp_path / name).mkdir()
    (tmp_path / name / "part.npy").write_bytes(b"half")
  _load(path)  # a load with a valid cache cleans up too
  assert sorted(os.listdir(tmp_path)) == sorted(["x.pkl", "x.pkl.cache"] + not_ours)


def test_leftovers_stay_while_another_process_holds_the_lock(tmp_path):
  path, _ = _tiny(tmp_path)
  _load(path)
  for name in _leftover_names("x.pkl.cache"):
    (tmp_path / name).mkdir()
  with open(path + ".cache.lock", "w") as lock:  # a build of the same cache in progress
    fcntl.flock(lock, fcntl.LOCK_EX)
    _load(path)
    assert all((tmp_path / n).is_dir() for n in _leftover_names("x.pkl.cache"))
  _load(path)
  assert sorted(os.listdir(tmp_path)) == ["x.pkl", "x.pkl.cache"]


def test_a_file_system_without_flock_builds_the_cache_unlocked(tmp_path, monkeypatch):
  path, _ = _tiny(tmp_path)
  _load(path)
  for name in _leftover_names("x.pkl.cache"):
    (tmp_path / name).mkdir()
  os.rename(path + ".cache", str(tmp_path / "elsewhere"))  # the next load builds again

  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(lockfile.fcntl, "flock", no_flock)
  ds = _load(path)
  assert ds.splits["train"].num_samples == 6
  # The leftovers stay (unlocked, a build in progress elsewhere cannot be told apart from a
  # killed one's), and so does the empty lock file that could not be locked.
  assert sorted(os.listdir(tmp_path)) == sorted(["elsewhere", "x.pkl", "x.pkl.cache",
                                                 "x.pkl.cache.lock"]
                                                + _leftover_names("x.pkl.cache"))


_KILLED_BUILD = """
import os, signal, sys
from configs import default
from dhmd_jax import data
real = data._convert_split
def convert_then_die(d, entry, folder, spec, split):  # SIGKILL once two splits are written
  counts = real(d, entry, folder, spec, split)
  if split == "valid":
    os.kill(os.getpid(), signal.SIGKILL)
  return counts
data._convert_split = convert_then_die
config = default.get_config().dataset
config.name, config.path = "mosi", sys.argv[1]
data.load_dataset(config)
"""


def test_sigkill_during_a_build_then_the_next_load_cleans_up(tmp_path):
  path, _ = _tiny(tmp_path)
  proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, path], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  left = sorted(os.listdir(tmp_path))
  assert len(left) == 3 and left[:2] == ["x.pkl", "x.pkl.cache.lock"], left
  assert re.fullmatch(r"x\.pkl\.cache\.tmp-[a-z0-9_]{8}", left[2])
  assert sorted(os.listdir(tmp_path / left[2])) == ["train", "valid"]
  ds = _load(path)
  assert ds.splits["test"].num_samples == 3
  assert sorted(os.listdir(tmp_path)) == ["x.pkl", "x.pkl.cache"]


def test_second_builder_waits_and_opens_the_first_ones_cache(tmp_path, monkeypatch):
  path, _ = _tiny(tmp_path)
  builds = []
  real_build = data._build_cache
  monkeypatch.setattr(data, "_build_cache",
                      lambda spec, fp: builds.append(spec.cache_dir) or real_build(spec, fp))
  results = []
  with open(path + ".cache.lock", "w") as lock:  # the first builder, at work
    fcntl.flock(lock, fcntl.LOCK_EX)
    second = threading.Thread(target=lambda: results.append(_load(path)))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() and not os.path.exists(path + ".cache")  # waiting for the lock
    other = str(tmp_path / "built_by_the_first.cache")
    _load(path, cache_dir=other)
    os.rename(other, path + ".cache")  # the first builder installs its cache
    os.unlink(path + ".cache.lock")  # and releases the lock, as data._locked does
  second.join(timeout=60)
  assert not second.is_alive() and results[0].splits["train"].num_samples == 6
  assert builds == [other]  # the second one did not build again
  assert sorted(os.listdir(tmp_path)) == ["x.pkl", "x.pkl.cache"]


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_in_workdir(tmp_path):
  config = _config(**{"synthetic.like": "mosi", "synthetic.aligned": False,
                      "synthetic.num_train": 5, "synthetic.num_valid": 3,
                      "synthetic.num_test": 2, "synthetic.seed": 3})
  ds = data.load_dataset(config, workdir=str(tmp_path))
  expected = tmp_path / "data" / "synthetic-mosi-unaligned-mmsa-3.pkl"
  assert ds.source == str(expected) and expected.is_file()
  assert os.path.isdir(str(expected) + ".cache")
  assert ds.seq_lens == {"text": 50, "vision": 500, "audio": 375} and ds.name == "synthetic"
  mtime = expected.stat().st_mtime_ns
  assert data.load_dataset(config, workdir=str(tmp_path)).splits["test"].num_samples == 2
  assert expected.stat().st_mtime_ns == mtime  # reused
  config.synthetic.num_train = 7  # other sizes: the file is regenerated, the cache rebuilt
  assert data.load_dataset(config, workdir=str(tmp_path)).splits["train"].num_samples == 7


def test_binary_synthetic_uses_multibench_and_explicit_path(tmp_path):
  config = _config(task="binary", **{"synthetic.like": "mustard", "synthetic.num_train": 4,
                                     "synthetic.num_valid": 2, "synthetic.num_test": 2})
  ds = data.load_dataset(config, workdir=str(tmp_path))
  assert ds.source.endswith("synthetic-mustard-aligned-multibench-0.pkl")
  assert ds.splits["train"].labels.dtype == np.int32 and ds.feature_dims["vision"] == 371
  path, _ = _tiny(tmp_path, like="sims", aligned=False)
  config = _config(path, **{"synthetic.like": "sims", "synthetic.aligned": False})
  assert data.load_dataset(config).source == path  # no workdir needed



@pytest.mark.parametrize("fields", [{"format": "multibench"},
                                    {"synthetic.layout": "multibench"},
                                    {"format": "multibench", "synthetic.layout": "multibench"}])
def test_synthetic_data_honours_dataset_format(tmp_path, fields):
  config = _config(**fields, **{"synthetic.like": "mosei", "synthetic.num_train": 4,
                                "synthetic.num_valid": 2, "synthetic.num_test": 2})
  ds = data.load_dataset(config, workdir=str(tmp_path))
  assert ds.source.endswith("synthetic-mosei-aligned-multibench-0.pkl")
  with open(ds.source, "rb") as f:
    raw = pickle.load(f)
  assert raw["train"]["labels"].shape == (4, 1, 1) and "regression_labels" not in raw["train"]
  assert ds.feature_dims["text"] == 300  # MulT's GloVe text
  config.path = ds.source  # the same file given by path is read in the same layout
  assert data.load_dataset(config).splits["valid"].num_samples == 2


def test_synthetic_layout_that_does_not_exist_is_one_line(tmp_path):
  config = _config(format="multibench", **{"synthetic.like": "sims",
                                           "synthetic.aligned": False})
  with pytest.raises(DataError) as e:
    data.load_dataset(config, workdir=str(tmp_path))
  assert "\n" not in str(e.value) and "like='sims' has only the mmsa layout" in str(e.value)
  assert "config.dataset.format='multibench'" in str(e.value)
  assert not os.path.exists(tmp_path / "data")


# ----------------------------------------------------------------------------- errors


def _set(split, key, value):
  def mutate(raw):
    raw[split][key] = value(raw[split]) if callable(value) else value
  return mutate


def _drop(split, key):
  def mutate(raw):
    del raw[split][key]
  return mutate


BAD_FILES = [
    # (case, format, mutation of _handmade, config fields, substrings of the message)
    ("top level not a dict", "mmsa", lambda raw: list(raw.values()), {},
     ["top level is a list", "MISA"]),
    ("missing split", "mmsa", lambda raw: {"train": raw["train"], "dev": raw["valid"],
                                           "test": raw["test"]}, {},
     ["no split 'valid'", "rename 'dev'"]),
    ("split not a dict", "mmsa", None, {}, []),
    ("missing key", "mmsa", _drop("valid", "vision"), {}, ["split 'valid'", "no key 'vision'"]),
    ("wrong layout", "mmsa", None, {"_fmt_file": "multibench"},
     ["no key 'regression_labels'", "format=multibench"]),
    ("wrong layout 2", "multibench", None, {"_fmt_file": "mmsa"},
     ["no key 'labels'", "format=mmsa"]),
    ("count mismatch", "mmsa", _set("train", "audio", lambda d: d["audio"][:2]), {},
     ["sample counts differ", "audio 2", "text 3"]),
    ("id count mismatch", "mmsa", _set("test", "id", np.array(["a"])), {},
     ["split 'test'", "sample counts differ", "id 1"]),
    ("features 2-D", "mmsa", _set("train", "vision", lambda d: d["vision"][:, :, 0]), {},
     ["key 'vision'", "expected 3-D"]),
    ("features not numeric", "mmsa", _set("train", "text", np.full((3, 4, 6), "a")), {},
     ["key 'text'", "numeric"]),
    ("labels wrong rank", "multibench", _set("train", "labels", np.zeros((3, 4, 2))), {},
     ["key 'labels'", "(3, 4, 2)", "IEMOCAP"]),
    ("labels out of range", "mmsa", _set("valid", "regression_labels", np.array([0.0, 3.5])), {},
     ["split 'valid'", "'regression_labels'", "3.5", "[-3, 3]", "mosi"]),
    ("sims range", "mmsa", None, {"name": "sims"}, ["[-3, 3]", "expected [-1, 1] for sims"]),
    ("synthetic like sims range", "mmsa", None,
     {"name": "synthetic", "synthetic.like": "sims", "synthetic.layout": "mmsa"},
     ["expected [-1, 1] for synthetic"]),
    ("labels non-finite", "mmsa", _set("test", "regression_labels", np.array([0.0, np.nan])), {},
     ["split 'test'", "1 non-finite labels"]),
    ("binary labels not binary", "multibench",
     _set("train", "labels", np.array([0.0, 1.0, 2.0])),
     {"name": "urfunny", "task": "binary"}, ["'labels'", "[0.0, 1.0, 2.0]", "{-1, 1}"]),
    ("binary labels mixed", "multibench", _set("train", "labels", np.array([-1, 0, 1])),
     {"name": "mustard", "task": "binary"}, ["[-1.0, 0.0, 1.0]"]),
    ("empty split", "mmsa", None, {"_sizes": (3, 0, 2)}, ["split 'valid' is empty"]),
    ("dims differ", "mmsa", _set("test", "audio", lambda d: d["audio"][:, :, :2]), {},
     ["feature dims differ", "'audio' is 3 in train and 2 in test"]),
    ("seq lens differ", "mmsa", _set("valid", "text", lambda d: d["text"][:, :3]), {},
     ["sequence lengths differ", "'text' is 4 in train and 3 in valid"]),
    ("length > T", "mmsa", _set("train", "audio_lengths", np.array([1, 5, 2])), {},
     ["'audio_lengths'", "[1, 5]", "0..4"]),
    ("negative length", "mmsa", _set("train", "vision_lengths", np.array([1, -1, 2])), {},
     ["'vision_lengths'", "[-1, 2]"]),
    ("text_bert shape", "mmsa", _set("train", "text_bert", np.ones((3, 3, 5))), {},
     ["'text_bert'", "(3, 3, 5)", "(3, 3, 4)"]),
    ("id rank", "mmsa", _set("train", "id", np.zeros((3, 1, 1))), {}, ["key 'id'", "(N, 3)"]),
]


@pytest.mark.parametrize("case,fmt,mutate,fields,expected", BAD_FILES,
                         ids=[c[0] for c in BAD_FILES])
def test_bad_files(tmp_path, case, fmt, mutate, fields, expected):
  fields = dict(fields)
  raw = _handmade(fields.pop("_fmt_file", fmt), sizes=fields.pop("_sizes", (3, 2, 2)))
  if case == "split not a dict":
    raw["test"] = [1, 2, 3]
    expected = ["split 'test' is a list"]
  elif case in ("sims range", "synthetic like sims range"):
    raw["train"]["regression_labels"] = np.array([-3.0, 0.0, 3.0], np.float32)
  elif mutate is not None:
    raw = mutate(raw) or raw
  path = _dump(tmp_path, raw)
  fields.setdefault("name", "mosi")
  with pytest.raises(DataError) as e:
    data.load_dataset(_config(path, format=fmt, **fields))
  message = str(e.value)
  assert "\n" not in message
  assert path in message
  for part in expected:
    assert part in message, message
  assert sorted(os.listdir(tmp_path)) == ["h.pkl"]  # no cache, no temp folder


def test_missing_file_says_where_files_go_and_come_from(tmp_path):
  path = str(tmp_path / "MOSEI" / "unaligned_50.pkl")
  with pytest.raises(DataError) as e:
    _load(path, name="mosei")
  message = str(e.value)
  assert "\n" not in message and path in message and "does not exist" in message
  for part in ("MMSA README", "Baidu/Google Drive", "CMU-MultimodalSDK", "MultiBench"):
    assert part in message
  with pytest.raises(DataError, match="config.dataset.path is empty for dataset mosei"):
    _load("", name="mosei")


@pytest.mark.parametrize("content", [b"this is not a pickle", "truncated"])
def test_not_a_pickle_or_truncated(tmp_path, content):
  if content == "truncated":
    whole = pickle.dumps(_handmade())
    content = whole[:len(whole) // 2]
  path = tmp_path / "bad.pkl"
  path.write_bytes(content)
  with pytest.raises(DataError, match="is not a readable pickle") as e:
    _load(str(path))
  assert str(path) in str(e.value) and "truncated" in str(e.value)
  assert sorted(os.listdir(tmp_path)) == ["bad.pkl"]


@pytest.mark.parametrize("fields,message", [
    ({"name": "iemocap"}, "config.dataset.name='iemocap' is not one of"),
    ({"format": "tfrecord"}, "config.dataset.format='tfrecord'"),
    ({"nonfinite": "drop"}, "config.dataset.nonfinite='drop'"),
    ({"name": "urfunny", "task": "binary"}, "needs the MultiBench layout"),
    ({"name": "mosi", "format": "multibench", "task": "binary"}, "set --config.dataset.task=regr"),
    ({"name": "mustard", "format": "multibench"}, "has binary labels"),
    ({"name": "synthetic", "task": "binary"}, "synthetic.like=urfunny or mustard"),
    ({"name": "synthetic", "synthetic.like": "urfunny"}, "set --config.dataset.task=binary"),
    ({"name": "synthetic", "synthetic.like": "sims", "synthetic.aligned": True},
     "config.dataset.synthetic: sims has no aligned"),
    ({"name": "synthetic"}, "no workdir was given"),
    ({"name": "synthetic", "synthetic.layout": "csv"}, "synthetic.layout='csv' is not one of"),
])
def test_bad_config(tmp_path, fields, message):
  with pytest.raises(DataError, match=message.replace("(", r"\(")):
    data.load_dataset(_config("", **fields), workdir=None if fields == {"name": "synthetic"}
                      else str(tmp_path))


def test_summarize(tmp_path):
  path, _ = _tiny(tmp_path, like="mosei", aligned=False)
  ds = _load(path, name="mosei")
  text = data.summarize(ds)
  lines = text.splitlines()
  assert lines[0].startswith("dataset mosei (regression, unaligned) from ") and path in lines[0]
  assert "text 6, vision 4, audio 3" in text and "text 8, vision 11, audio 13" in text
  for name in data.SPLITS:
    assert f"  {name}: N={ds.splits[name].num_samples}" in lines
  audio = ds.splits["train"].lengths["audio"]
  assert f"{audio.min()}/{audio.mean():.1f}/{audio.max()}" in text
  y = ds.splits["valid"].labels
  assert f"range [{y.min():.3f}, {y.max():.3f}], mean {y.mean():.3f}" in text
  assert "non-finite" not in text
