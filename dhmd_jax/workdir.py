"""One run per workdir, and one line for a write that fails.

Training (and a grid, on its own folder) holds `<workdir>/dhmd.lock` for as long as it runs:
an exclusive `flock`, which the kernel releases when the process ends however it ends (SIGKILL,
the OOM killer), so no stale lock ever blocks a rerun. The holder writes who it is into the file
(pid, host, what, start time); a second process on the same workdir stops before touching
anything with one line naming them (`Busy`, exit status `BUSY_STATUS`).

Evaluate, predict and analysis (`reading`) hold the lock too when it is free, so that no
training starts under them; when a training holds it they run beside it: they only read
committed, manifest-verified checkpoints (`checkpoint.py`) and write their own files
(`eval_*.json`, `predictions_<split>_<which>.csv`, `analysis/`), which training never writes.

A write into a workdir that fails (a full disk, a file system turned read-only) ends the run
with `WriteError`: one line naming the path and what to do (`writing`).

This module imports nothing heavy: the command line checks the lock before JAX is loaded.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time

from dhmd_jax import lockfile

_LOG = logging.getLogger(__name__)

LOCK_FILE = "dhmd.lock"
BUSY_STATUS = 3  # the exit status of a command refused because its workdir is in use
WAIT_POLL_S = 0.5  # how often a process waiting for a workdir (`wait_for`) tries its lock

_HELD = {}  # lock file (real path) -> [fd, depth]: re-entrant within this process
_HELD_GUARD = threading.Lock()


class Busy(RuntimeError):
  """Another process holds the workdir; the message is one line (exit status BUSY_STATUS).
  `holder`: the holder's record (pid, host, what, started), or None when it wrote none."""

  holder = None


class WriteError(RuntimeError):
  """A write into a workdir failed (no space, read-only, ...); the message is one line."""


def reason(error):
  """What an OS-level failure was, in a few words: "No space left on device"."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__


def write_failed(path, error):
  """The WriteError of a failed write to `path`."""
  return WriteError(f"cannot write {path} ({reason(error)}); free space on its file system (or "
                    f"make it writable) and rerun the same command")


@contextlib.contextmanager
def writing(path):
  """Turns an OSError raised in the block into WriteError naming `path`."""
  try:
    yield
  except OSError as error:
    raise write_failed(path, error) from None


# ----------------------------------------------------------------------------- the lock


def _lock_path(workdir):
  return os.path.realpath(os.path.join(workdir, LOCK_FILE))


def _read_holder(fd):
  """The holder's record in an open lock file, or None (not written yet, or unreadable)."""
  for _ in range(20):  # a holder writes its record right after locking: give it a moment
    try:
      text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
      holder = json.loads(text)
      if isinstance(holder, dict) and "pid" in holder:
        return holder
    except (OSError, ValueError):
      pass
    time.sleep(0.025)
  return None


def describe(holder):
  """"training by pid 123 on host h, started 2026-01-02 03:04:05" (or who it might be)."""
  if holder is None:
    return "another process (its lock file names none)"
  return (f"{holder.get('what', 'another process')} by pid {holder.get('pid')} on "
          f"{holder.get('host', '?')}, started {holder.get('started', '?')}")


def _busy(workdir, holder):
  busy = Busy(f"{workdir} is in use: {describe(holder)}; wait for it to end (or stop it), or use "
              f"another --workdir")
  busy.holder = holder  # its record, for a caller that words its own line (a grid's shards)
  return busy


def _try_lock(workdir, what):
  """(fd, None) when this process now holds the lock, (None, holder) when another one does.

  Raises OSError when the lock file cannot be opened or the file system has no flock.
  """
  path = _lock_path(workdir)
  fd, holder = lockfile.acquire(path, wait=False, read_busy=_read_holder)
  if fd is None:
    return None, holder
  record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:300]}
  try:  # best effort: on a full disk the lock holds without its record
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
  except OSError:
    pass
  return fd, None


@contextlib.contextmanager
def _holding(workdir, what, *, share, wait_for=None):
  """Holds the workdir's lock for the block (re-entrant in one process); yields None, or, with
  `share` and another process holding it, that holder's record (the block runs beside it).
  While another process holds it and `wait_for(its record)` is true, waits for it."""
  path = _lock_path(workdir)
  with _HELD_GUARD:
    held = _HELD.get(path)
    if held is not None:
      held[1] += 1
  if held is not None:
    try:
      yield None
    finally:
      _let_go(path, held)
    return
  try:
    fd, holder = _try_lock(workdir, what)
    while fd is None and wait_for is not None and wait_for(holder):
      time.sleep(WAIT_POLL_S)
      fd, holder = _try_lock(workdir, what)
  except OSError as error:
    if share:  # e.g. a read-only workdir: reading needs no lock
      yield None
      return
    if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      _LOG.warning("warning: cannot lock %s (%s): this file system has no flock; make sure no "
                   "other process uses %s", path, reason(error), workdir)
      yield None
      return
    raise write_failed(path, error) from None
  if fd is None:
    if not share:
      raise _busy(workdir, holder)
    yield holder
    return
  with _HELD_GUARD:
    _HELD[path] = held = [fd, 1]
  try:
    yield None
  finally:
    _let_go(path, held)


def _let_go(path, held):
  """Ends one holding of the lock `held` ([fd, count]); the last one releases it."""
  with _HELD_GUARD:
    held[1] -= 1
    if not held[1]:
      del _HELD[path]
      lockfile.release(path, held[0])


def hold(workdir, what, *, wait_for=None):
  """Context manager: holds `workdir` (which must exist) for the block.

  `what` says who holds it ("training", "a table6 grid"), in the line another process prints.
  Raises Busy (one line) when another process holds it, WriteError when the lock file cannot be
  created. Re-entrant: a process holding it may enter again. `wait_for(holder)`: called with
  the holder's record (a dict, or None when it wrote none) while another process holds it;
  true waits for that holder to let go (polling every `WAIT_POLL_S` seconds) instead of
  raising Busy (the shards of a grid wait for each other's short holds and for a run's trainer).
  """
  return _holding(workdir, what, share=False, wait_for=wait_for)


def reading(workdir, what, *, wait_for=None):
  """Context manager for a reader (evaluate, predict, analysis) of `workdir`: holds it when
  free and yields None; when another process holds it, yields that holder's record (a dict:
  pid, host, what, started) and the block runs beside it. Never raises Busy. `wait_for` as in
  `hold`: a holder it accepts is waited for rather than run beside."""
  if not os.path.isdir(workdir):
    return contextlib.nullcontext()
  return _holding(workdir, what, share=True, wait_for=wait_for)
