"""Measures the peak resident memory (RSS) of loading a MOSEI-sized unaligned pickle.

Writes a synthetic file of MOSEI-unaligned size (16,326 / 1,871 / 4,659 samples; 50x768 text,
500x74 audio, 500x35 vision; ~8.5 GB) into a temporary folder, then, each in a fresh process,
measures `ru_maxrss` of
  (a) the first load: pickle -> .npy cache -> memory-mapped Dataset, and
  (b) a later load from the cache that also touches every train array (computes its mean).
Prints one JSON object with both peaks in MB, the pickle size, the size of the train split's
arrays and the ratios the data layer aims for: (b) under 1.5x the train arrays, (a) close to the
pickle size (the file must be unpickled once). Needs ~18 GB free disk (pickle + cache) and
~12 GB RAM (for writing the file); takes a few minutes on 2 cores. Files are deleted at the end
unless --keep.

Usage:
  python tools/measure_load_rss.py [--tmp_root /tmp] [--scale 1.0] [--keep]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOSEI_SIZES = (16326, 1871, 4659)
MB = 2**20


def _peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB


def _dataset_config(path):
  spec = importlib.util.spec_from_file_location("default_config",
                                                os.path.join(REPO, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config().dataset
  config.name = "mosei"
  config.format = "mmsa"
  config.path = path
  config.task = "regression"
  return config


def _child(mode, path, sizes):
  """Runs in a fresh process; prints one JSON line."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dhmd_jax import data, synthetic  # pylint: disable=g-import-not-at-top
  baseline = _peak_rss_mb()
  start = time.time()
  result = {}
  if mode == "write":
    synthetic.write_synthetic(path, like="mosei", aligned=False, layout="mmsa",
                              num_train=sizes[0], num_valid=sizes[1], num_test=sizes[2], seed=0)
  else:
    dataset = data.load_dataset(_dataset_config(path))
    if mode == "later":
      train = dataset.splits["train"]
      arrays = [*train.features.values(), *train.masks.values(), *train.lengths.values(),
                train.labels]
      result["train_means"] = {m: float(train.features[m].mean(dtype=np.float64))
                               for m in data.MODALITIES}
      for a in arrays[3:]:
        float(a.mean())
      result["train_arrays_mb"] = sum(a.nbytes for a in arrays) / MB
      result["memmapped"] = all(isinstance(a, np.memmap) for a in train.features.values())
  result.update(seconds=time.time() - start, baseline_rss_mb=baseline, peak_rss_mb=_peak_rss_mb())
  print(json.dumps(result))


def _run_child(mode, path, sizes):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--path", path,
         "--sizes", ",".join(map(str, sizes))]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tmp_root", default=tempfile.gettempdir())
  parser.add_argument("--scale", type=float, default=1.0, help="fraction of the MOSEI sizes")
  parser.add_argument("--keep", action="store_true", help="keep the pickle and cache")
  parser.add_argument("--child", choices=("write", "first", "later"), help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  parser.add_argument("--sizes", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args.child, args.path, tuple(int(s) for s in args.sizes.split(",")))
    return

  sizes = tuple(max(1, round(args.scale * n)) for n in MOSEI_SIZES)
  folder = tempfile.mkdtemp(prefix="dhmd_rss_", dir=args.tmp_root)
  path = os.path.join(folder, "mosei_unaligned_50.pkl")
  try:
    write = _run_child("write", path, sizes)
    first = _run_child("first", path, sizes)
    later = _run_child("later", path, sizes)
    pickle_mb = os.path.getsize(path) / MB
    report = {
        "sizes": sizes,
        "pickle_mb": round(pickle_mb, 1),
        "train_arrays_mb": round(later["train_arrays_mb"], 1),
        "write": {"peak_rss_mb": round(write["peak_rss_mb"], 1),
                  "seconds": round(write["seconds"], 1)},
        "first_load": {"peak_rss_mb": round(first["peak_rss_mb"], 1),
                       "seconds": round(first["seconds"], 1),
                       "peak_over_pickle": round(first["peak_rss_mb"] / pickle_mb, 3)},
        "later_load": {"peak_rss_mb": round(later["peak_rss_mb"], 1),
                       "seconds": round(later["seconds"], 1),
                       "peak_over_train_arrays": round(later["peak_rss_mb"] /
                                                       later["train_arrays_mb"], 3),
                       "memmapped": later["memmapped"]},
        "baseline_rss_mb": round(first["baseline_rss_mb"], 1),
    }
    print(json.dumps(report, indent=1))
  finally:
    if args.keep:
      print(f"kept {folder}", file=sys.stderr)
    else:
      shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  main()
