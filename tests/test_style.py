"""The code keeps its style: `ruff check` (configured in pyproject.toml) finds nothing."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "dhmd_jax",
                         "configs", "tests", "tools"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_warnings_from_our_code_are_errors():
  """setup.cfg's filterwarnings turn a warning raised in dhmd_jax or configs into an error."""
  import warnings  # pylint: disable=g-import-not-at-top

  import pytest  # pylint: disable=g-import-not-at-top
  for module in ("dhmd_jax.train", "configs.mosei"):
    with pytest.raises(UserWarning):
      warnings.warn_explicit("x", UserWarning, "f.py", 1, module=module)
  with warnings.catch_warnings(record=True):  # others' warnings stay warnings
    warnings.warn_explicit("x", UserWarning, "f.py", 1, module="orbax.checkpoint")
