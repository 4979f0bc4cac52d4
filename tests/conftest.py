"""Test session set-up, before JAX is imported (child processes inherit it):

- one persistent XLA compilation cache for the session, so a program compiled by one test (or
  child process) is not compiled again by the next;
- XLA's backend optimisation level 0: on the 2-core CI machine compiling the model dominates the
  suite, and level 0 halves it. Results are the same programs' results, only slower to run; the
  benchmark and the README numbers never use this setting.
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="dhmd_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
