"""Read-only folders for real, also where the tests run as root (CI).

Root writes through permission bits, so the read-only tests of test_data.py and test_faults.py
would fall back to simulating them. Here, when this process is root, they run again in a child
pytest whose capability bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: the kernel
then checks permission bits for it as for any user (a folder chmod 0o555 refuses its writes),
and every one of those tests must run and pass, none skipped. As another user they ran for real
in the main suite already, and this test skips itself saying so.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ_ONLY_TESTS = ("tests/test_data.py::test_read_only_data_folder_caches_per_user",
                   "tests/test_data.py::test_read_only_data_folder_by_chmod_alone",
                   "tests/test_data.py::test_read_only_data_folder_uses_a_cache_built_there_before",
                   "tests/test_data.py::test_read_only_cache_dir_is_one_line",
                   "tests/test_faults.py::test_unwritable_workdir_stops_before_any_work")
DROP = "-dac_override,-dac_read_search"


@pytest.mark.skipif(os.geteuid() != 0, reason="not root: the read-only tests ran for real in "
                    "the main suite (chmod 0o555 stops this user)")
def test_read_only_tests_run_for_real_without_root_privileges():
  setpriv = shutil.which("setpriv")
  if setpriv is None:
    pytest.skip("running as root without util-linux's setpriv: the read-only tests could only "
                "simulate an unwritable folder here")
  probe = subprocess.run([setpriv, f"--bounding-set={DROP}", sys.executable, "-c",
                          "import os, tempfile; d = tempfile.mkdtemp(); os.chmod(d, 0o555); "
                          "print(os.access(d, os.W_OK)); os.chmod(d, 0o755); os.rmdir(d)"],
                         capture_output=True, text=True, timeout=60)
  if probe.returncode != 0 or probe.stdout.strip() != "False":
    pytest.skip(f"this machine does not let root drop CAP_DAC_OVERRIDE ({probe.stderr[-200:]})")
  proc = subprocess.run(
      [setpriv, f"--bounding-set={DROP}", sys.executable, "-m", "pytest", "-n", "0", "-q",
       "-p", "no:cacheprovider", "-rs", *READ_ONLY_TESTS],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert re.fullmatch(rf"=* ?{len(READ_ONLY_TESTS)} passed in [\d.]+s.*", summary), summary
