"""Test session set-up, before JAX is imported (child processes inherit it):

- one persistent XLA compilation cache for the session, shared by the xdist workers and every
  child process (they inherit the environment), so a program compiled by one test (or child
  process) is not compiled again by the next; every program goes into it, however fast it
  compiled (the many small ones of the FakeModel's children add up);
- XLA's backend optimisation level 0 and the CPU backend's older (non-"fusion emitter") code
  generator: on a 2-core CI machine compiling the model dominates the suite, and both settings
  cut the compile time of the tiny model substantially. The programs compute the same functions,
  only slower; the benchmark and the numbers of docs/performance.md never use these settings.
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="dhmd_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


# ------------------------------------------------------------------ running on several workers
# `python -m pytest` runs the tests on up to four worker processes (pytest-xdist, setup.cfg's
# addopts; `-n 0` runs them all in this process). Each test file is one unit of work
# (`--dist loadfile`), so its module-scoped fixtures are built once. Files start heaviest first
# (by their times on the 2-core machine), so no long file starts last while the other worker
# idles.

HEAVIEST_FIRST = ("test_faults.py", "test_parallel.py", "test_grid_shards.py", "test_stacked.py",
                  "test_train.py", "test_multiprocess.py", "test_experiments.py",
                  "test_grid_devices.py", "test_model.py", "test_analysis.py", "test_bert.py",
                  "test_benchmark.py", "test_dmd_reference.py", "test_v1_checkpoint.py")


def pytest_xdist_auto_num_workers(config):
  del config
  return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
