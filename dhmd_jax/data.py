"""Loads the precomputed-feature pickles (MMSA, MulT/MultiBench) as memory-mapped arrays.

`load_dataset(config.dataset)` reads one pickle (the layouts are described in docs/data.md),
validates it and returns a `Dataset` of three `Split`s whose features are float32 `np.memmap`s
of a `.npy` cache:

* The first load unpickles the file once, checks every split (keys, ranks, sample counts, label
  range, lengths, dims), then converts and writes it split by split into a temporary sibling
  folder, chunk by chunk, dropping each split as soon as it is written, so the peak memory is
  about the size of the pickle (loaders that keep every split in memory and copy it need a
  multiple of that for unaligned MOSEI). The folder is
  renamed into place only when complete; on any error it is removed.
* Later loads check the cache's manifest against the pickle (size, mtime, hash of the first and
  last MiB) and memory-map the arrays: only the pages a run touches are read.
* Where: `dataset.cache_dir` when set; else `<pickle>.cache` beside the pickle when its folder is
  writable (or already holds a valid cache); else, for read-only data folders, a per-user folder
  `~/.cache/dhmd_jax/features/<pickle name>-<hash of its path>-<hash of its fingerprint>` (said
  in one line; older caches of the same path there are removed once the new one is built).
* A build holds `<cache>.lock` (flock) so that two processes never build the same cache at once
  (the second waits and then opens the first's). Under that lock, `<cache>.tmp-*` and
  `<cache>.old-*` folders, which only a killed build leaves behind, are removed.

Masks are True for real frames: from `text_bert[:, 1]` (MMSA text), from `*_lengths` (MMSA
unaligned audio/vision) or else from zero padding (a frame is real if any feature is nonzero or
non-finite; works for the left-padded MulT text). -inf/NaN features are replaced by 0 and counted
(`nonfinite == "zero"`, as MMSA does) or refused (`"error"`).

Bad input raises `DataError` with one line naming the file, the key, the expected and the actual
value and what to do. Pickles can run code when loaded: only load files from trusted sources.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile

import numpy as np

from dhmd_jax import lockfile
from dhmd_jax import synthetic
from dhmd_jax.names import MODALITIES
from dhmd_jax.names import SPLITS

_LOG = logging.getLogger(__name__)

FORMATS = ("mmsa", "multibench")
TASKS = ("regression", "binary")
NONFINITE_MODES = ("zero", "error")
REGRESSION_RANGES = {"mosi": (-3.0, 3.0), "mosei": (-3.0, 3.0), "sims": (-1.0, 1.0)}
BINARY_NAMES = ("urfunny", "mustard")
NAMES = (*REGRESSION_RANGES, *BINARY_NAMES, "synthetic")

_CACHE_KIND = "dhmd-jax feature cache"
_CACHE_VERSION = 2  # 2: MMSA `text_bert` cached (text_bert.npy)
_MANIFEST = "manifest.json"
_MANIFEST_KEYS = frozenset({"pickle", "settings", "num_samples", "feature_dims", "seq_lens",
                            "aligned", "nonfinite_counts", "text_bert"})
_HASH_BYTES = 1 << 20  # hash the first and the last MiB of the pickle
_CHUNK_BYTES = 32 << 20  # features converted per chunk
_LABEL_TOLERANCE = 1e-4
_REBUILD_HINT = "delete the folder or set --config.dataset.rebuild_cache=True"
_USER_CACHE = os.path.join("~", ".cache", "dhmd_jax", "features")  # read-only data folders
_WHERE_TO_GET = (
    "MMSA files (aligned_50.pkl, unaligned_50.pkl, unaligned_39.pkl) come from the dataset links "
    "(Baidu/Google Drive) in the thuiar/MMSA README (raw data: CMU-MultimodalSDK); MulT and "
    "MultiBench pickles from those projects' READMEs; nothing is downloaded automatically")


class DataError(ValueError):
  """Unusable data, config or cache. The message is one line: file, key, expected vs actual, fix."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).splitlines()))


@dataclasses.dataclass(frozen=True)
class Split:
  """One split. Features are read-only memory maps of the cache."""
  name: str  # 'train' | 'valid' | 'test'
  features: dict[str, np.ndarray]  # modality -> (N, T_m, D_m) float32
  masks: dict[str, np.ndarray]  # modality -> (N, T_m) bool, True = real frame
  lengths: dict[str, np.ndarray]  # modality -> (N,) int32, number of real frames
  labels: np.ndarray  # (N,) float32 (regression) or int32 in {0, 1} (binary)
  ids: np.ndarray  # (N,) str
  # (N, 3, T_text) int32 [input_ids, attention_mask, segment_ids] of MMSA files, else None.
  text_bert: np.ndarray | None = None

  @property
  def num_samples(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  task: str  # 'regression' | 'binary'
  splits: dict[str, Split]  # 'train', 'valid', 'test'
  feature_dims: dict[str, int]  # from the file
  seq_lens: dict[str, int]  # from the file
  aligned: bool  # all three sequence lengths equal
  nonfinite_counts: dict[str, dict[str, int]]  # split -> modality -> values replaced by 0
  source: str  # path of the pickle


# ----------------------------------------------------------------------------- public API


def load_dataset(config, *, workdir: str | None = None) -> Dataset:
  """Loads the dataset described by `config` (the `config.dataset` ConfigDict).

  For `name == "synthetic"` with an empty `path`, the file
  `<workdir>/data/synthetic-<like>-<aligned|unaligned>-<layout>-<seed>[-vocab<V>].pkl` (V: a
  `synthetic.text_vocab_size` other than bert-base-uncased's) is written first
  when absent (and rewritten when its split sizes differ from the config). Its layout is
  multibench when `format` or `synthetic.layout` says so (both default to mmsa) and always for
  binary tasks. Raises `DataError` on anything unusable.
  """
  task, label_range = _check_config(config)
  if config.name == "synthetic":
    fmt = _synthetic_layout(config, task)
    path, generated = _synthetic_path(config, workdir, fmt)
  else:
    fmt, path, generated = config.format, config.path, False
    if not path:
      raise DataError(f"config.dataset.path is empty for dataset {config.name}: set "
                      f"--config.dataset.path to the feature pickle; {_WHERE_TO_GET}")
  # An empty cache_dir is resolved by _load (beside the pickle or the per-user folder).
  cache_dir = os.path.expanduser(config.cache_dir) if config.cache_dir else ""
  spec = _Spec(path=path, cache_dir=cache_dir, fmt=fmt, task=task, label_range=label_range,
               nonfinite=config.nonfinite, name=config.name)
  # A generated synthetic file is ours, and so is its cache: rebuild it whenever it is stale.
  dataset = _load(spec, rebuild=config.rebuild_cache or generated)
  if generated:
    wanted = _synthetic_sizes(config)
    if tuple(dataset.splits[s].num_samples for s in SPLITS) != wanted:
      _write_synthetic_file(config, path, fmt)  # our own derived file: regenerate it
      dataset = _load(spec, rebuild=True)
  return dataset


def summarize(dataset: Dataset) -> str:
  """A multi-line human-readable summary: per split N, shapes, lengths, labels, non-finite."""
  dims = ", ".join(f"{m} {dataset.feature_dims[m]}" for m in MODALITIES)
  lens = ", ".join(f"{m} {dataset.seq_lens[m]}" for m in MODALITIES)
  lines = [
      f"dataset {dataset.name} ({dataset.task}, {'aligned' if dataset.aligned else 'unaligned'})"
      f" from {dataset.source}",
      f"  feature dims: {dims}; sequence lengths: {lens}",
  ]
  for name in SPLITS:
    split = dataset.splits[name]
    lines.append(f"  {name}: N={split.num_samples}")
    for m in MODALITIES:
      length = split.lengths[m]
      bad = dataset.nonfinite_counts[name][m]
      note = f", {bad} non-finite values replaced by 0" if bad else ""
      lines.append(f"    {m:<6} {str(tuple(split.features[m].shape)):<18} real frames "
                   f"min/mean/max {length.min()}/{length.mean():.1f}/{length.max()}{note}")
    y = split.labels
    if dataset.task == "binary":
      positive = float(np.mean(y == 1))
      lines.append(f"    labels: class 0 {1 - positive:.1%}, class 1 {positive:.1%}")
    else:
      lines.append(f"    labels: range [{y.min():.3f}, {y.max():.3f}], mean {y.mean():.3f}, "
                   f"std {y.std():.3f}, zeros {np.mean(y == 0):.1%}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class _Spec:
  path: str
  cache_dir: str
  fmt: str
  task: str
  label_range: tuple[float, float] | None  # None for binary
  nonfinite: str
  name: str

  def settings(self):
    """What the cache depends on besides the pickle itself."""
    label_range = list(self.label_range) if self.label_range else None
    return {"format": self.fmt, "task": self.task, "label_range": label_range}


def _check_config(config):
  """Validates the config.dataset fields; returns (task, regression label range or None)."""
  for field, value, allowed in (("name", config.name, NAMES), ("format", config.format, FORMATS),
                                ("task", config.task, TASKS),
                                ("nonfinite", config.nonfinite, NONFINITE_MODES)):
    if value not in allowed:
      raise DataError(f"config.dataset.{field}={value!r} is not one of {allowed}")
  task = config.task
  if config.name == "synthetic":
    like = config.synthetic.like
    if config.synthetic.layout not in FORMATS:
      raise DataError(f"config.dataset.synthetic.layout={config.synthetic.layout!r} is not one of "
                      f"{FORMATS}")
    if task == "binary" and like not in BINARY_NAMES:
      raise DataError(f"task=binary with synthetic data needs "
                      f"--config.dataset.synthetic.like=urfunny or mustard (got {like!r})")
    if task == "regression" and like not in REGRESSION_RANGES:
      raise DataError(f"synthetic like={like!r} is a binary dataset: set "
                      f"--config.dataset.task=binary, or like to one of {tuple(REGRESSION_RANGES)}")
    layout = _synthetic_layout(config, task)
    if layout == "multibench" and like == "sims":
      raise DataError(f"synthetic like='sims' has only the mmsa layout, but the config asks for "
                      f"multibench (config.dataset.format={config.format!r}, "
                      f"config.dataset.synthetic.layout={config.synthetic.layout!r}): set both to "
                      f"mmsa, or like to mosi or mosei")
    kind = like
  else:
    kind = config.name
    if task == "binary" and config.format == "mmsa":
      raise DataError("task=binary needs the MultiBench layout (MMSA files only carry "
                      "regression labels): set --config.dataset.format=multibench and a "
                      "UR-FUNNY/MUStARD pickle")
    if task == "binary" and kind not in BINARY_NAMES:
      raise DataError(f"dataset {kind} has regression labels: set --config.dataset.task=regression "
                      f"(binary datasets: {BINARY_NAMES})")
    if task == "regression" and kind in BINARY_NAMES:
      raise DataError(f"dataset {kind} has binary labels: set --config.dataset.task=binary")
  return task, (REGRESSION_RANGES[kind] if task == "regression" else None)


def _synthetic_layout(config, task):
  """The layout of synthetic data: either field set to multibench selects it (both default to
  mmsa, so whichever one the user set counts); binary labels exist only in that layout."""
  if task == "binary" or "multibench" in (config.format, config.synthetic.layout):
    return "multibench"
  return "mmsa"


def _synthetic_sizes(config):
  s = config.synthetic
  return (int(s.num_train), int(s.num_valid), int(s.num_test))


def _synthetic_path(config, workdir, fmt):
  """(path, generated): the configured file, or the workdir file (written when absent)."""
  if config.path:
    return config.path, False
  if workdir is None:
    raise DataError("config.dataset.path is empty and no workdir was given for the synthetic "
                    "data: pass workdir= to load_dataset or set --config.dataset.path")
  s = config.synthetic
  name = f"synthetic-{s.like}-{'aligned' if s.aligned else 'unaligned'}-{fmt}-{s.seed}"
  if fmt == "mmsa" and s.text_vocab_size != synthetic.BERT_VOCAB_SIZE:
    name += f"-vocab{s.text_vocab_size}"  # text_bert ids for another BERT: another file
  name += ".pkl"
  path = os.path.join(workdir, "data", name)
  if not os.path.exists(path):
    _write_synthetic_file(config, path, fmt)
  return path, True


def _write_synthetic_file(config, path, fmt):
  s = config.synthetic
  try:
    synthetic.write_synthetic(path, like=s.like, aligned=s.aligned, layout=fmt,
                              num_train=s.num_train, num_valid=s.num_valid,
                              num_test=s.num_test, seed=s.seed,
                              text_vocab_size=s.text_vocab_size)
  except ValueError as e:
    raise DataError(f"config.dataset.synthetic: {e}") from None


# ----------------------------------------------------------------------------- cache


def _load(spec: _Spec, *, rebuild: bool) -> Dataset:
  """Opens a valid cache, or builds it from the pickle first (one builder at a time)."""
  if not os.path.isfile(spec.path):
    where = "is a folder, not a file" if os.path.isdir(spec.path) else "does not exist"
    raise DataError(f"feature pickle {spec.path} {where}: put the file there or set "
                    f"--config.dataset.path; {_WHERE_TO_GET}")
  fingerprint = _fingerprint(spec.path)
  spec = dataclasses.replace(spec, cache_dir=_cache_location(spec, fingerprint))
  _remove_leftovers(spec.cache_dir, wait=False)
  dataset, problem = _open_if_valid(spec, fingerprint)
  if dataset is not None:
    return dataset
  if problem is not None and not rebuild:
    raise DataError(f"cache {spec.cache_dir} no longer matches {spec.path}: {problem}; "
                    f"{_REBUILD_HINT}")
  try:
    os.makedirs(os.path.dirname(os.path.abspath(spec.cache_dir)), exist_ok=True)
    with _locked(spec.cache_dir, wait=True) as held:
      if held:
        # Another process may have built the cache while this one waited for the lock.
        dataset, _ = _open_if_valid(spec, fingerprint)
        if dataset is not None:
          return dataset
        _remove_leftovers(spec.cache_dir, wait=None)
      manifest = _build_cache(spec, fingerprint)
  except OSError as e:
    raise DataError(f"cannot write the feature cache {spec.cache_dir} ({type(e).__name__}: "
                    f"{e.strerror or e}): set --config.dataset.cache_dir to a folder you can "
                    f"write") from None
  _remove_replaced_user_caches(spec.cache_dir)
  return _open_cache(spec, manifest)


def _open_if_valid(spec, fingerprint):
  """(dataset, None) from a valid cache; (None, why it is stale) or (None, None) when absent."""
  if not os.path.lexists(spec.cache_dir):
    return None, None
  manifest = _read_manifest(spec.cache_dir)
  if manifest is None:  # never delete a folder that is not ours, even with rebuild_cache
    raise DataError(f"cache folder {spec.cache_dir} exists but is not a dhmd-jax cache (no "
                    f"readable {_MANIFEST}): delete it or set --config.dataset.cache_dir "
                    f"to another folder")
  problem = _manifest_problem(manifest, spec, fingerprint)
  if problem is None:
    try:
      return _open_cache(spec, manifest), None
    except (OSError, ValueError, KeyError) as e:
      if isinstance(e, DataError):
        raise
      problem = f"its arrays cannot be read ({type(e).__name__}: {e})"
  return None, problem


def _fingerprint(path):
  try:
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      digest.update(f.read(_HASH_BYTES))
      if stat.st_size > _HASH_BYTES:
        f.seek(max(_HASH_BYTES, stat.st_size - _HASH_BYTES))
        digest.update(f.read(_HASH_BYTES))
  except OSError as e:
    raise DataError(f"cannot read the feature pickle {path} ({type(e).__name__}: "
                    f"{e.strerror or e}): check that you may read it") from None
  return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
          "head_tail_sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------- cache location


def _writable(folder):
  return os.access(folder, os.W_OK | os.X_OK)


def _user_cache_root():
  return os.path.expanduser(_USER_CACHE)


def _user_cache_name(path, fingerprint=None):
  """`<name>-<path hash>-<fingerprint hash>`, or the prefix up to the path hash."""
  key = lambda value: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]
  prefix = f"{os.path.basename(path)}-{key(os.path.abspath(path))}-"
  return prefix if fingerprint is None else prefix + key(fingerprint)


def _cache_location(spec, fingerprint):
  """The configured folder; else beside the pickle when possible; else the per-user folder."""
  if spec.cache_dir:
    return spec.cache_dir
  beside = spec.path + ".cache"
  folder = os.path.dirname(os.path.abspath(spec.path))
  if _writable(folder):
    return beside
  manifest = _read_manifest(beside)  # built before the folder became read-only: use it
  if manifest is not None and _manifest_problem(manifest, spec, fingerprint) is None:
    return beside
  cache_dir = os.path.join(_user_cache_root(), _user_cache_name(spec.path, fingerprint))
  _LOG.info("data folder %s is not writable: the feature cache of %s is %s (set "
            "--config.dataset.cache_dir to choose another)", folder, os.path.basename(spec.path),
            cache_dir)
  return cache_dir


def _remove_replaced_user_caches(cache_dir):
  """Removes the per-user caches of earlier versions of the same pickle (ours only)."""
  parent, name = os.path.split(os.path.abspath(cache_dir))
  ours = re.fullmatch(r"(.+-[0-9a-f]{12}-)[0-9a-f]{12}", name)
  if parent != os.path.abspath(_user_cache_root()) or not ours:
    return
  prefix = ours.group(1)  # `<pickle name>-<path hash>-`
  for entry in os.listdir(parent):
    other = os.path.join(parent, entry)
    if (entry != name and entry.startswith(prefix) and re.fullmatch(r"[0-9a-f]{12}",
                                                                     entry[len(prefix):])
        and _read_manifest(other) is not None):
      shutil.rmtree(other, ignore_errors=True)


# ----------------------------------------------------------------------------- build lock


@contextlib.contextmanager
def _locked(cache_dir, *, wait):
  """Holds `<cache_dir>.lock` exclusively; yields True, or False when `wait` is False and
  another process holds it (or the file system has no flock). The lock file is removed on
  release, so no lock file stays behind (on a file system without flock, the empty one that
  could not be locked stays). OSError when the lock file cannot be created."""
  lock_path = os.path.abspath(cache_dir) + ".lock"
  try:
    fd, _ = lockfile.acquire(lock_path, wait=wait)
  except lockfile.FlockFailed:  # no flock here: go on unlocked
    fd = None
  if fd is None:
    yield False
    return
  try:
    yield True
  finally:
    lockfile.release(lock_path, fd)


def _remove_leftovers(cache_dir, *, wait):
  """Removes `<cache>.tmp-*` / `<cache>.old-*` folders left by a killed build.

  `wait=None`: the caller holds the lock. Otherwise the lock is taken first (`wait=False`: only
  if free, as a normal load does; a build in progress keeps its folder).
  """
  parent, base = os.path.split(os.path.abspath(cache_dir))
  pattern = re.compile(re.escape(base) + r"\.(tmp|old)-[a-z0-9_]{8}")  # tempfile.mkdtemp names
  try:
    names = [n for n in os.listdir(parent) if pattern.fullmatch(n)]
  except OSError:
    return
  folders = [os.path.join(parent, n) for n in names]
  folders = [f for f in folders if os.path.isdir(f) and not os.path.islink(f)]
  if not folders:
    return
  if wait is None:
    for folder in folders:
      shutil.rmtree(folder, ignore_errors=True)
    return
  try:
    with _locked(cache_dir, wait=wait) as held:
      if held:
        for folder in folders:
          shutil.rmtree(folder, ignore_errors=True)
  except OSError:  # a read-only folder: nothing can be removed there anyway
    pass


def _read_manifest(cache_dir):
  try:
    with open(os.path.join(cache_dir, _MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) and manifest.get("kind") == _CACHE_KIND else None


def _manifest_problem(manifest, spec, fingerprint):
  """Why the cache does not fit the pickle and config, or None."""
  if manifest.get("version") != _CACHE_VERSION:
    return f"cache version {manifest.get('version')}, this code writes {_CACHE_VERSION}"
  missing = _MANIFEST_KEYS - manifest.keys()
  if missing:
    return f"its {_MANIFEST} lacks {sorted(missing)}"
  for key, now in fingerprint.items():
    if manifest["pickle"].get(key) != now:
      return (f"the pickle changed since the cache was built ({key} "
              f"{manifest['pickle'].get(key)} -> {now})")
  for key, now in spec.settings().items():
    if manifest["settings"].get(key) != now:
      return f"it was built with {key}={manifest['settings'].get(key)}, the config asks {now}"
  return None


def _open_cache(spec, manifest):
  counts = manifest["nonfinite_counts"]
  if spec.nonfinite == "error":
    for split in SPLITS:
      for m in MODALITIES:
        if counts[split][m]:
          raise _nonfinite_error(spec.path, split, m, counts[split][m])
  splits = {}
  for split in SPLITS:
    folder = os.path.join(spec.cache_dir, split)
    n = manifest["num_samples"][split]
    features, masks, lengths = {}, {}, {}
    for m in MODALITIES:
      t, d = manifest["seq_lens"][m], manifest["feature_dims"][m]
      features[m] = _load_npy(folder, f"{m}.npy", (n, t, d), mmap=True)  # (N, T, D)
      masks[m] = _load_npy(folder, f"{m}_mask.npy", (n, t), mmap=True)  # (N, T)
      lengths[m] = _load_npy(folder, f"{m}_lengths.npy", (n,), mmap=False)  # (N,)
    text_bert = None
    if manifest["text_bert"][split]:
      text_bert = _load_npy(folder, "text_bert.npy", (n, 3, manifest["seq_lens"]["text"]),
                            mmap=True)  # (N, 3, T)
    splits[split] = Split(name=split, features=features, masks=masks, lengths=lengths,
                          labels=_load_npy(folder, "labels.npy", (n,), mmap=False),
                          ids=_load_npy(folder, "ids.npy", (n,), mmap=False),
                          text_bert=text_bert)
  return Dataset(name=spec.name, task=spec.task, splits=splits,
                 feature_dims=dict(manifest["feature_dims"]), seq_lens=dict(manifest["seq_lens"]),
                 aligned=manifest["aligned"], nonfinite_counts=counts, source=spec.path)


def _load_npy(folder, filename, shape, *, mmap):
  array = np.load(os.path.join(folder, filename), mmap_mode="r" if mmap else None,
                  allow_pickle=False)
  if array.shape != shape:
    raise ValueError(f"{filename} has shape {array.shape}, the manifest says {shape}")
  return array


def _build_cache(spec, fingerprint):
  """Converts the pickle into `spec.cache_dir` (atomically); returns the manifest."""
  cache_dir = os.path.abspath(spec.cache_dir)
  parent = os.path.dirname(cache_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(cache_dir) + ".tmp-", dir=parent)
  try:
    data = _unpickle(spec.path)
    info = _validate(data, spec)
    counts = {}
    for split in SPLITS:
      split_data = data.pop(split)
      counts[split] = _convert_split(split_data, info[split], os.path.join(tmp, split), spec,
                                     split)
      del split_data  # frees this split's arrays before the next one is converted
    del data
    train = info["train"]
    manifest = {
        "kind": _CACHE_KIND,
        "version": _CACHE_VERSION,
        "pickle": {"path": os.path.abspath(spec.path), **fingerprint},
        "settings": spec.settings(),
        "nonfinite_mode": spec.nonfinite,
        "num_samples": {s: info[s]["n"] for s in SPLITS},
        "feature_dims": {m: train["shape"][m][2] for m in MODALITIES},
        "seq_lens": {m: train["shape"][m][1] for m in MODALITIES},
        "aligned": len({train["shape"][m][1] for m in MODALITIES}) == 1,
        "nonfinite_counts": counts,
        "text_bert": {s: info[s].get("text_bert") is not None for s in SPLITS},
    }
    with open(os.path.join(tmp, _MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    _install(tmp, cache_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _install(tmp, cache_dir):
  """Renames the finished `tmp` folder to `cache_dir`, replacing an old cache of ours."""
  if os.path.lexists(cache_dir):
    old = tempfile.mkdtemp(prefix=os.path.basename(cache_dir) + ".old-",
                           dir=os.path.dirname(cache_dir))
    os.rename(cache_dir, old)  # onto the empty folder `old`
    os.rename(tmp, cache_dir)
    shutil.rmtree(old, ignore_errors=True)
    return
  try:
    os.rename(tmp, cache_dir)
  except OSError:
    if not os.path.isdir(cache_dir):
      raise
    shutil.rmtree(tmp, ignore_errors=True)  # another process installed the same cache first


# ----------------------------------------------------------------------------- reading


def _unpickle(path):
  try:
    with open(path, "rb") as f:
      # latin1 reads Python 2 pickles of numpy arrays too; it does not affect Python 3 pickles.
      return pickle.load(f, encoding="latin1")
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any failure means: not a usable pickle)
    raise DataError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); the file is "
                    f"truncated or not a pickle: download it again and check its checksum"
                   ) from None


def _validate(data, spec):
  """Checks structure, ranks, counts, labels, lengths and dims of every split.

  Returns per split: n, feature shapes, labels, ids and the masks/lengths that do not need a
  pass over the features. Holds no reference to the big arrays.
  """
  path = spec.path
  if not isinstance(data, dict):
    hint = " (a list looks like the MISA/MMIM layout, which is not supported)" if isinstance(
        data, (list, tuple)) else ""
    raise DataError(f"{path}: top level is a {type(data).__name__}, expected a dict with keys "
                    f"'train', 'valid', 'test'{hint}")
  for split in SPLITS:
    if split not in data:
      hint = " (rename 'dev' to 'valid')" if split == "valid" and "dev" in data else ""
      raise DataError(f"{path}: no split '{split}' at the top level (keys: {_keys(data)}); "
                      f"expected 'train', 'valid', 'test'{hint}")
  label_key = "regression_labels" if spec.fmt == "mmsa" else "labels"
  info = {}
  for split in SPLITS:
    d = data[split]
    if not isinstance(d, dict):
      raise DataError(f"{path}: split '{split}' is a {type(d).__name__}, expected a dict of arrays")
    for key in (*MODALITIES, label_key, "id"):
      if key not in d:
        raise DataError(f"{path}: split '{split}' has no key '{key}' (keys: {_keys(d)})"
                        f"{_format_hint(spec.fmt, d)}")
    shapes = {}
    for m in MODALITIES:
      x = d[m]
      if not isinstance(x, np.ndarray):
        x = d[m] = np.asarray(x)
      if x.dtype.kind not in "fiub":
        raise DataError(f"{path}: split '{split}' key '{m}' has dtype {x.dtype}, expected a "
                        f"numeric (float) array")
      if x.ndim != 3:
        raise DataError(f"{path}: split '{split}' key '{m}' has shape {x.shape}, expected 3-D "
                        f"(N, T, D)")
      shapes[m] = x.shape
    counts = {m: shapes[m][0] for m in MODALITIES}
    counts[label_key] = _len(d[label_key])
    counts["id"] = _len(d["id"])
    extra_keys = ["text_bert", "audio_lengths", "vision_lengths"] if spec.fmt == "mmsa" else []
    for key in extra_keys:
      if key in d:
        counts[key] = _len(d[key])
    if len(set(counts.values())) != 1:
      listed = ", ".join(f"{k} {v}" for k, v in counts.items())
      raise DataError(f"{path}: split '{split}' sample counts differ ({listed}); every key must "
                      f"have the same number of samples")
    n = counts["text"]
    if n == 0:
      raise DataError(f"{path}: split '{split}' is empty (0 samples); every split needs samples")
    entry = {"n": n, "shape": shapes, "masks": {}, "lengths": {},
             "labels": _labels(d[label_key], path, split, label_key, spec),
             "ids": _ids(d["id"], path, split)}
    if spec.fmt == "mmsa" and "text_bert" in d:
      bert = np.asarray(d["text_bert"])
      want = (n, 3, shapes["text"][1])
      if bert.shape != want:
        raise DataError(f"{path}: split '{split}' key 'text_bert' has shape {bert.shape}, "
                        f"expected {want} ([input_ids, attention_mask, segment_ids] over text's T)")
      entry["masks"]["text"] = bert[:, 1, :] != 0  # (N, L)
      entry["text_bert"] = _token_rows(bert, path, split)  # (N, 3, L) int32
    for m in ("vision", "audio"):
      key = f"{m}_lengths"
      if spec.fmt == "mmsa" and key in d:
        entry["masks"][m] = _mask_from_lengths(d[key], shapes[m][1], path, split, key)
    for m, mask in entry["masks"].items():
      entry["lengths"][m] = mask.sum(axis=1).astype(np.int32)
    info[split] = entry
    train = info["train"]["shape"]
    for m in MODALITIES:
      for axis, what in ((2, "feature dims"), (1, "sequence lengths")):
        if shapes[m][axis] != train[m][axis]:
          raise DataError(f"{path}: {what} differ between splits: '{m}' is {train[m][axis]} in "
                          f"train and {shapes[m][axis]} in {split}; all splits must match")
  return info


def _format_hint(fmt, d):
  if fmt == "mmsa" and "labels" in d and "regression_labels" not in d:
    return "; this looks like a MulT/MultiBench file: set --config.dataset.format=multibench"
  if fmt == "multibench" and "regression_labels" in d and "labels" not in d:
    return "; this looks like an MMSA file: set --config.dataset.format=mmsa"
  return ""


def _keys(d):
  keys = [str(k) for k in d]
  return ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "")


def _len(value):
  shape = getattr(value, "shape", None)
  if shape is not None:
    return shape[0] if len(shape) else -1
  return len(value)


def _labels(raw, path, split, key, spec):
  """(N,) float32 regression labels or int32 {0, 1} binary labels, validated."""
  y = np.asarray(raw)
  where = f"{path}: split '{split}' key '{key}'"
  if y.dtype.kind not in "fiub":
    raise DataError(f"{where} has dtype {y.dtype}, expected numeric labels")
  if y.ndim > 1 and int(np.prod(y.shape[1:])) == 1:
    y = y.reshape(y.shape[0])  # (N, 1, 1) or (N, 1) -> (N,)
  if y.ndim != 1:
    raise DataError(f"{where} has shape {y.shape}, expected (N,), (N, 1) or (N, 1, 1) "
                    f"(multi-label files such as IEMOCAP's (N, 4, 2) are not supported)")
  y = y.astype(np.float64)
  bad = int(np.sum(~np.isfinite(y)))
  if bad:
    raise DataError(f"{where} has {bad} non-finite labels (NaN/inf); labels must be finite: fix "
                    f"the file")
  if spec.task == "binary":
    values = set(np.unique(y).tolist())
    if values <= {0.0, 1.0}:
      return y.astype(np.int32)
    if values <= {-1.0, 1.0}:
      return (y > 0).astype(np.int32)  # -1 -> 0
    shown = sorted(values)[:6]
    raise DataError(f"{where} has values {shown}, expected {{0, 1}} or {{-1, 1}} for a binary "
                    f"task: check --config.dataset.task/name or the file")
  lo, hi = spec.label_range
  if y.min() < lo - _LABEL_TOLERANCE or y.max() > hi + _LABEL_TOLERANCE:
    raise DataError(f"{where} has values in [{y.min():g}, {y.max():g}], expected [{lo:g}, {hi:g}] "
                    f"for {spec.name}: check --config.dataset.name (and synthetic.like) or the "
                    f"file")
  return y.astype(np.float32)


def _ids(raw, path, split):
  """(N,) str ids; MulT's (N, 3) [video, start, end] rows become 'video$_$start$_$end'."""
  ids = np.asarray(raw)
  if ids.ndim == 2:
    out = ["$_$".join(_to_str(v) for v in row) for row in ids]
  elif ids.ndim == 1:
    out = [_to_str(v) for v in ids]
  else:
    raise DataError(f"{path}: split '{split}' key 'id' has shape {ids.shape}, expected (N,) or "
                    f"(N, 3)")
  return np.array(out, dtype=str)


def _to_str(value):
  if isinstance(value, (bytes, np.bytes_)):
    return value.decode("utf-8", errors="replace")
  return str(value)


def _token_rows(bert, path, split):
  """MMSA `text_bert` (N, 3, L) [ids, mask, segment ids], stored as floats, as int32 rows."""
  where = f"{path}: split '{split}' key 'text_bert'"
  if bert.dtype.kind not in "fiub":
    raise DataError(f"{where} has dtype {bert.dtype}, expected numeric token rows")
  if not np.all(np.isfinite(bert)) or not np.all(bert == np.round(bert)):
    raise DataError(f"{where} has non-integer values, expected token ids, a 0/1 mask and "
                    f"segment ids: fix the file")
  if bert.size and (bert.min() < 0 or bert[:, 0].max() >= 2**31):
    raise DataError(f"{where} has values in [{bert.min():g}, {bert.max():g}], expected token ids "
                    f">= 0: fix the file")
  if not np.all((bert[:, 1] == 0) | (bert[:, 1] == 1)):
    raise DataError(f"{where} has attention-mask values other than 0 and 1 (row 1): fix the file")
  return bert.astype(np.int32)


def _mask_from_lengths(raw, t, path, split, key):
  lengths = np.asarray(raw)
  if lengths.ndim == 2 and lengths.shape[1] == 1:
    lengths = lengths[:, 0]
  where = f"{path}: split '{split}' key '{key}'"
  if lengths.ndim != 1 or lengths.dtype.kind not in "fiu":
    raise DataError(f"{where} has shape {lengths.shape} dtype {lengths.dtype}, expected (N,) "
                    f"integer frame counts")
  integral = np.isfinite(lengths) & (lengths == np.round(lengths))
  if lengths.dtype.kind == "f" and not np.all(integral):
    raise DataError(f"{where} has non-integer values, expected integer frame counts")
  if lengths.min() < 0 or lengths.max() > t:
    raise DataError(f"{where} has values in [{lengths.min():g}, {lengths.max():g}], expected "
                    f"0..{t} (the padded length T of that modality): fix the file")
  return np.arange(t)[None, :] < lengths.astype(np.int64)[:, None]  # (N, T)


# ----------------------------------------------------------------------------- conversion


def _convert_split(d, entry, folder, spec, split):
  """Writes one split's arrays; returns its non-finite counts per modality."""
  os.makedirs(folder)
  counts = {}
  for m in MODALITIES:
    real, counts[m] = _write_features(d[m], os.path.join(folder, f"{m}.npy"), spec, split, m)
    mask = entry["masks"].get(m, real)  # (N, T)
    lengths = entry["lengths"].get(m)
    if lengths is None:
      lengths = mask.sum(axis=1).astype(np.int32)
    np.save(os.path.join(folder, f"{m}_mask.npy"), np.ascontiguousarray(mask, dtype=bool))
    np.save(os.path.join(folder, f"{m}_lengths.npy"), lengths)
    d[m] = None  # drop the pickle's array as soon as it is written
  np.save(os.path.join(folder, "labels.npy"), entry["labels"])
  np.save(os.path.join(folder, "ids.npy"), entry["ids"])
  if entry.get("text_bert") is not None:
    np.save(os.path.join(folder, "text_bert.npy"), entry["text_bert"])
  return counts


def _write_features(x, out_path, spec, split, key):
  """Writes x as float32 .npy chunk by chunk, zeroing -inf/NaN.

  Returns the zero-padding mask (N, T) (a frame is real if any value is nonzero or non-finite)
  and the number of non-finite values. Memory: one chunk; the file is written with plain writes
  so it does not count towards this process's resident memory.
  """
  n, t, d = x.shape
  rows = max(1, _CHUNK_BYTES // max(1, t * d * 4))
  real = np.empty((n, t), dtype=bool)  # (N, T)
  count = 0
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
            "shape": (n, t, d)}
  with open(out_path, "wb") as f:
    np.lib.format.write_array_header_2_0(f, header)
    for start in range(0, n, rows):
      chunk = np.array(x[start:start + rows], dtype=np.float32)  # (C, T, D), a copy
      bad = ~np.isfinite(chunk)
      bad_count = int(bad.sum())
      real[start:start + rows] = np.any(chunk != 0, axis=-1)  # NaN/-inf count as real
      if bad_count:
        count += bad_count
        if spec.nonfinite == "error":
          continue  # keep counting to report the total
        chunk[bad] = 0.0
      f.write(memoryview(chunk).cast("B"))
  if count and spec.nonfinite == "error":
    raise _nonfinite_error(spec.path, split, key, count)
  return real, count


def _nonfinite_error(path, split, key, count):
  return DataError(f"{path}: split '{split}' key '{key}' has {count} non-finite values "
                   f"(-inf/NaN); set --config.dataset.nonfinite=zero to replace them by 0 "
                   f"(as MMSA does) or fix the file")


# ----------------------------------------------------------------------------- batch layout


def split_arrays(split, task, *, text_encoder="features"):
  """Host arrays of a split in the model's batch layout: {text, text_mask, vision, ...,
  label}, and `text_bert` (N, 3, T) int32 when the split has it (labels int32 class ids for
  binary tasks, float32 otherwise). With `text_encoder="bert"` the `text` features, which the
  model then does not read, are left out (MOSEI: 2.5 GB not copied to the device)."""
  arrays = {}
  for m in MODALITIES:
    if not (m == "text" and text_encoder == "bert"):
      arrays[m] = split.features[m]
    arrays[f"{m}_mask"] = split.masks[m]
  if split.text_bert is not None:
    arrays["text_bert"] = split.text_bert
  arrays["label"] = (split.labels.astype(np.int32) if task == "binary"
                     else split.labels.astype(np.float32))
  return arrays


def nbytes(arrays):
  """Bytes of a dict of arrays (memmaps count their full size)."""
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays.values())
