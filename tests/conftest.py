"""Test session set-up: one persistent XLA compilation cache for the whole session (child
processes inherit it), so the same model is not compiled again by every test."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="dhmd_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
