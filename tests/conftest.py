"""Test session set-up, before JAX is imported (child processes inherit it):

- one persistent XLA compilation cache for the session, so a program compiled by one test (or
  child process) is not compiled again by the next;
- XLA's backend optimisation level 0 and the CPU backend's older (non-"fusion emitter") code
  generator: on the 2-core CI machine compiling the model dominates the suite; level 0 halves it,
  and the older code generator compiles the tiny model's train step in 3 s instead of 7 s. The
  programs compute the same functions, only slower; the benchmark and the README numbers never
  use these settings.
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="dhmd_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
