"""One run per workdir (`dhmd_jax/workdir.py`), with real processes: a held workdir refuses a
second holder with one line naming the holder's pid, host and start time; readers run beside
the holder; a holder killed with SIGKILL blocks nothing. A write that fails is one line.

The runs themselves (a second training refused with the exit status, evaluate beside a
training, a full disk at each write site) are in test_faults.py, next to the run they share.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from dhmd_jax import lockfile
from dhmd_jax import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Holds the workdir argv[1] as argv[2] ("training", ...) until killed.
HOLDER = r"""
import sys, time
from dhmd_jax import workdir
with workdir.hold(sys.argv[1], sys.argv[2]):
  print("held", flush=True)
  time.sleep(600)
"""


def holder(path, what="training"):
  """A child process holding `path` (it has taken the lock when this returns)."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), what], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  proc.stdout.close()  # the child writes nothing more; an open pipe would leak its file
  return proc


def test_a_held_workdir_refuses_a_second_holder_until_the_first_is_killed(tmp_path):
  proc = holder(tmp_path)
  try:
    with pytest.raises(workdir.Busy) as info:
      with workdir.hold(str(tmp_path), "training"):
        pytest.fail("two holders")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path} is in use: training by pid {proc.pid} on "
                              f"{socket.gethostname()}, started "), message
    assert re.search(r", started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", message), message
    assert message.endswith("; wait for it to end (or stop it), or use another --workdir")
    # Readers run beside the holder and are told who it is.
    with workdir.reading(str(tmp_path), "evaluate") as beside:
      assert (beside["pid"], beside["what"]) == (proc.pid, "training")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  # The killed holder's lock file is still there, naming it; the kernel released its lock.
  assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == proc.pid
  with workdir.hold(str(tmp_path), "training"):
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    with workdir.hold(str(tmp_path), "training"):  # re-entrant within a process
      pass
    with workdir.reading(str(tmp_path), "evaluate") as beside:
      assert beside is None  # this process holds it
    assert (tmp_path / workdir.LOCK_FILE).exists()
  assert not (tmp_path / workdir.LOCK_FILE).exists()  # a holder that ends removes it


def test_a_reader_holds_the_workdir_against_a_training(tmp_path):
  """Evaluate, predict and analysis hold a free workdir, so that no training starts under the
  checkpoint they read."""
  proc = holder(tmp_path, "evaluate")
  try:
    with pytest.raises(workdir.Busy, match=f"in use: evaluate by pid {proc.pid} "):
      with workdir.hold(str(tmp_path), "training"):
        pass
  finally:
    proc.kill()
    proc.wait()


def test_two_processes_racing_for_one_workdir_get_one_holder(tmp_path):
  """Started together, exactly one of several would-be holders gets the workdir."""
  race = ("import sys; from dhmd_jax import workdir\n"
          "try:\n"
          "  with workdir.hold(sys.argv[1], 'training'):\n"
          "    print('held', flush=True); sys.stdin.read()\n"
          "except workdir.Busy:\n"
          "  print('busy', flush=True)\n")
  procs = [subprocess.Popen([sys.executable, "-c", race, str(tmp_path)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
           for _ in range(4)]
  answers = [p.stdout.readline().strip() for p in procs]
  for p in procs:
    p.communicate("", timeout=60)
  assert sorted(answers) == ["busy", "busy", "busy", "held"], answers


def test_no_flock_on_the_file_system_is_a_warning_not_a_stop(tmp_path, monkeypatch, capsys):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(lockfile.fcntl, "flock", no_flock)
  with workdir.hold(str(tmp_path), "training"):
    pass
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: cannot lock ") and "flock" in err[0]


def test_a_failed_write_is_one_line_naming_the_path(tmp_path):
  path = str(tmp_path / "results.json")
  with pytest.raises(workdir.WriteError) as info:
    with workdir.writing(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path + ".tmp")
  assert str(info.value) == (f"cannot write {path} (No space left on device); free space on its "
                             f"file system (or make it writable) and rerun the same command")


def test_the_command_line_ends_busy_with_its_own_status_and_a_failed_write_with_1():
  from test_cli import raising, toy  # pylint: disable=g-import-not-at-top
  busy = workdir.Busy("runs/x is in use: training by pid 1 on h, started t; wait")
  assert toy(["--workdir=w"], raising(busy))[:3] == (
      workdir.BUSY_STATUS, "", f"error: {busy}\n")
  assert workdir.BUSY_STATUS not in (0, 1, 2, 130)  # the statuses of the other ways to end
  failed = workdir.write_failed("runs/x/results.json", _no_space())
  assert toy(["--workdir=w"], raising(failed))[:3] == (1, "", f"error: {failed}\n")


def _no_space():
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_grid_holds_its_workdir(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from dhmd_jax.experiments import grid  # pylint: disable=g-import-not-at-top
  proc = holder(tmp_path, "a table6 grid")
  try:
    with pytest.raises(workdir.Busy, match=f"in use: a table6 grid by pid {proc.pid} "):
      grid.run_grid("table6", tiny.get_config(), str(tmp_path), [])
    assert sorted(os.listdir(tmp_path)) == [workdir.LOCK_FILE]  # nothing written
  finally:
    proc.kill()
    proc.wait()
  assert grid.run_grid("table6", tiny.get_config(), str(tmp_path), []) == {}
  assert os.path.exists(tmp_path / grid.GRID_FILE)
