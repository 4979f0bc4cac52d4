"""Checkpoints with orbax: one checkpoint per epoch under `<workdir>/checkpoints/latest/`, the
single source of truth of a run.

  latest/<epoch>/  {"arrays": {"state": TrainState (stacked over seeds),
                               "best_params": the selected parameters of every seed},
                    "host": JSON (scheduler state with the best epoch per seed, seeds,
                                  config fingerprint),
                    dhmd_manifest.json: what was written (see below)}

Training state and selected models are committed together, so no kill point can leave a
"best" that disagrees with the run that resumes, its report, or `--mode=evaluate/predict`
(which read `best_params` and the best epochs from the same checkpoint). Orbax writes each
save into a temporary folder and renames it into place once complete; a run killed mid-save
leaves the previous checkpoints intact (the temporary folder is removed on the next start).

The manifest is the commit. `dhmd_manifest.json` records the size of every file of the
checkpoint (and the CRC32 of each file up to `SMALL_FILE` bytes: metadata, JSON, a small
model's data) and the CRC32 of every array's values, computed from the host copy the save
writes: the checkpoint is never read back. A background thread hashes the host copy while orbax
writes the files, waits for orbax's commit, then writes the manifest (a few stat calls and small
files later). A checkpoint counts as complete only when its manifest is there and matches:
files are checked before orbax reads anything (a truncated, emptied or missing file never
reaches orbax, whose failures print tracebacks from its threads), array values after they are
read. One that does not match, or has no manifest (a kill between the commit and the
manifest), is damaged: the newest complete one is used, with one warning line; in training the
damaged one is moved to `checkpoints/unreadable/`. Two checkpoints are kept: the newest and one
to fall back on.

Saves are asynchronous: the arrays are copied to host memory, then written while training goes
on; the next save, `wait()` and `close()` wait for it. A save that fails (a full disk) ends the
run with one line; the checkpoints before it stay as they were.

Workdirs of older versions: checkpoints with no manifest at all (written before manifests
existed) are read as they are (orbax's reading decides); manifests of the first format (a CRC32
of every file) are checked as written. A `best/` folder written next to `latest/` is no longer
read (its parameters are in `latest/` too); checkpoints in the per-branch parameter layout v1
(see `models/layout.py`) are read with a v1-shaped target and converted on restore. This is the
only module that touches the orbax API.
"""

import contextlib
import dataclasses
import json
import logging as py_logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
import warnings
from typing import Any
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from dhmd_jax import distributed
from dhmd_jax import workdir as workdir_lib
from dhmd_jax.models import layout

_LOG = py_logging.getLogger(__name__)

KEEP = 2  # checkpoints kept: the newest and one to fall back on
MANIFEST = "dhmd_manifest.json"
SMALL_FILE = 1 << 20  # files up to this size get a CRC32 in the manifest, larger ones a size


class CheckpointError(RuntimeError):
  """No readable checkpoint where one is needed, or a save that failed; the message is one
  line."""


def _os_failure(error):
  """What went wrong at the OS level ("No space left on device") when `error` (or an error it
  came from) is one, else None. Tensorstore reports them as ValueError with an errno in its
  text (`[os_error_code='28']`)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return workdir_lib.reason(error)
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
      return os.strerror(int(code.group(1)))
    error = error.__cause__ or error.__context__
  return None


_READING = [0]  # > 0 while checkpoints are listed or read: see _QuietOrbax


@contextlib.contextmanager
def _reading():
  _READING[0] += 1
  try:
    yield
  finally:
    _READING[0] -= 1


class _QuietOrbax(py_logging.Filter):
  """Drops from the absl log orbax's informational chatter (e.g. "Waiting for previous save to
  complete took 2.8 seconds ... consider checkpointing less frequently", which our own
  end-of-epoch wait triggers); what it logs while checkpoints are listed and read (e.g. "Failed
  to json parse Metadata file" of a damaged one: the manifest check or the restore reports each
  damage in one line); and its tracebacks of a save that failed at the OS level (a full disk:
  each of its threads logs one; the run ends with one line saying so). Other orbax errors still
  pass."""

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno < py_logging.ERROR or _READING[0]:
      return False
    error = record.exc_info[1] if record.exc_info else None
    return _os_failure(error) is None and _os_failure(Exception(record.getMessage())) is None


class _DropClosedLoopCallbacks:
  """An unraisable-exception hook that drops two kinds of noise and passes everything else on.

  When orbax fails to read a damaged checkpoint it closes its event loop while tensorstore reads
  of the same checkpoint are still in flight; as each finishes, its callback calls the closed
  loop's `call_soon_threadsafe` from a tensorstore thread and Python prints a traceback
  "RuntimeError: Event loop is closed" for it (dozens, interleaved); and each of orbax's read
  coroutines (`_read_array_index_and_device_put`) that failed and was never awaited again is
  reported as "Exception ignored in: <coroutine ...>" with its error and the whole tensorstore
  spec (thousands of lines). The reads are of a checkpoint already given up on, so nothing is
  lost: the restore reports the damage in one line.
  """

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    error, tb = unraisable.exc_value, unraisable.exc_traceback
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)] if tb is not None else []
    if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        and "call_soon_threadsafe" in frames):
      return
    code = getattr(unraisable.object, "cr_code", None)
    if getattr(code, "co_name", "") == "_read_array_index_and_device_put":
      return
    self.previous(unraisable)


class _DropFailedOrbaxReads(py_logging.Filter):
  """Drops asyncio's "Task/Future exception was never retrieved" for orbax's read tasks
  (`async_deserialize`, `_read_array_index_and_device_put`) and tensorstore's OCDBT reads of a
  damaged checkpoint: the same noise as the one `_DropClosedLoopCallbacks` drops, when the
  failed read is a task or future collected by asyncio rather than a bare coroutine. The restore
  already reported the damage in one line. Likewise a tensorstore write that failed at the OS
  level (a full or read-only disk) while another write of the same save had already failed it:
  the save reports the failure in one line."""

  def filter(self, record):
    message = record.getMessage()
    if "exception was never retrieved" not in message.split("\n", 1)[0]:
      return True  # (Task, Future, _GatheringFuture, ...)
    orbax_read = (f"{os.sep}orbax{os.sep}" in message
                  and f"{os.sep}serialization{os.sep}" in message)  # a read coroutine of orbax
    tensorstore_read = (("Error reading" in message and "in OCDBT database" in message)
                        or "Encountered error while reading array index" in message)
    tensorstore_write = "Error writing" in message and "os_error_code=" in message
    return not (orbax_read or tensorstore_read or tensorstore_write)


def _quiet_orbax():
  logger = py_logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())
  logger = py_logging.getLogger("asyncio")
  if not any(isinstance(f, _DropFailedOrbaxReads) for f in logger.filters):
    logger.addFilter(_DropFailedOrbaxReads())
  # The same reads, when the coroutine was never started at all.
  warnings.filterwarnings("ignore", category=RuntimeWarning, message=(
      "coroutine '(_read_array_index_and_device_put|async_deserialize)' was never awaited"))
  if not isinstance(sys.unraisablehook, _DropClosedLoopCallbacks):
    sys.unraisablehook = _DropClosedLoopCallbacks(sys.unraisablehook)


def _manager(directory, *, create):
  options = ocp.CheckpointManagerOptions(max_to_keep=KEEP, create=create,
                                         cleanup_tmp_directories=create,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("arrays", "host"))


def _warn(message):
  _LOG.warning("warning: %s", message)


def _reason(error):
  """One line of an exception: its type (not for our own findings) and the first line of its
  message, shortened."""
  text = str(error).strip().splitlines()
  text = text[0] if text else ""
  if len(text) > 160:
    text = text[:157] + "..."
  if isinstance(error, CheckpointError) and text:
    return text
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------- the manifest


def _file_crc(path):
  crc = 0
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      crc = zlib.crc32(block, crc)
  return crc


def _files(folder):
  """{relative path: absolute path} of every file under `folder` but the manifest."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel not in (MANIFEST, MANIFEST + ".tmp"):
        out[rel] = path
  return out


def _file_digests(folder):
  """{relative path: [size, CRC32 or None]}: a CRC32 for the files up to SMALL_FILE bytes."""
  out = {}
  for rel, path in _files(folder).items():
    size = os.path.getsize(path)
    out[rel] = [size, _file_crc(path) if size <= SMALL_FILE else None]
  return out


def _array_digests(tree):
  """{key path: [dtype, shape, CRC32 of the values]} of a tree of host arrays."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    out[jax.tree_util.keystr(path)] = [a.dtype.name, list(a.shape),
                                       zlib.crc32(a.reshape(-1).view(np.uint8))]
  return out


def _write_manifest(folder, array_digests):
  """Writes the manifest of the committed checkpoint in `folder` (atomic)."""
  manifest = {"format": 2, "files": _file_digests(folder), "arrays": array_digests}
  tmp = os.path.join(folder, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f)
  os.replace(tmp, os.path.join(folder, MANIFEST))


def _check_files(folder, *, legacy):
  """(manifest or None, why the checkpoint in `folder` is damaged or None), before orbax reads
  anything. `legacy`: no checkpoint of the folder has a manifest (a version before them)."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    if legacy:
      return None, None
    return None, f"it has no {MANIFEST}: its save did not complete"
  try:
    with open(path) as f:
      manifest = json.load(f)
    expected = manifest["files"]
  except (OSError, ValueError, KeyError, TypeError) as error:
    return None, f"its {MANIFEST} is unreadable ({_reason(error)})"
  actual = _files(folder)
  for rel, (size, crc) in sorted(expected.items()):
    if rel not in actual:
      return None, f"{rel} is missing"
    try:
      now = os.path.getsize(actual[rel])
      if now != size:
        return None, f"{rel} has {now} bytes, {size} when written"
      if crc is not None and _file_crc(actual[rel]) != crc:
        return None, f"{rel} changed since it was written (CRC32 mismatch)"
    except OSError as error:  # removed meanwhile, or unreadable
      return None, f"{rel} cannot be read ({workdir_lib.reason(error)})"
  return manifest, None


def _check_arrays(arrays, manifest):
  """Raises CheckpointError when the values read differ from those written."""
  expected = (manifest or {}).get("arrays")
  if not expected:  # a manifest of the first format: its files were checked whole
    return
  actual = _array_digests(jax.device_get(arrays))
  for key, (dtype, shape, crc) in expected.items():
    if key not in actual:
      raise CheckpointError(f"the array {key} is missing")
    now_dtype, now_shape, now_crc = actual[key]
    if (now_dtype, now_shape) == (dtype, shape) and now_crc != crc:
      raise CheckpointError(f"the array {key} differs from what was written (CRC32 mismatch)")


@dataclasses.dataclass
class _Pending:
  """A save in flight: its epoch, the host arrays it writes (until hashed), and the thread that
  writes its manifest once orbax has committed it (with the error that stopped it, if any)."""
  epoch: int
  arrays: Any
  thread: Any = None
  error: Any = None


# ----------------------------------------------------------------------------- checkpoints


class Checkpointer:
  """Saves and restores the per-epoch checkpoints of a workdir (see the module docstring).

  `read_only=True` (evaluate, predict, analysis) never creates, cleans or moves anything on disk.
  """

  def __init__(self, workdir, *, read_only=False):
    _quiet_orbax()
    self.directory = os.path.join(workdir, "checkpoints", "latest")
    self._read_only = read_only
    self._pending = None  # the save in flight
    self._failed = None  # the error of a save that failed: close() then waits no more
    self._manager = None
    if not read_only or os.path.isdir(self.directory):
      with _reading():  # orbax reads the metadata of every checkpoint here
        self._manager = _manager(self.directory, create=not read_only)

  def epochs(self):
    """Epochs with a committed checkpoint, oldest first."""
    return [] if self._manager is None else list(self._manager.all_steps())

  def save(self, epoch, *, state, best_params, host):
    """Starts saving epoch `epoch` (waits for the previous save first); returns once the arrays
    are on the host, while the files and then the manifest are written in the background."""
    if self._read_only:
      raise CheckpointError("this Checkpointer is read-only")
    self.wait()
    arrays = jax.device_get({"state": state, "best_params": best_params})
    self._pending = pending = _Pending(epoch, arrays)
    try:
      self._manager.save(epoch, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                        host=ocp.args.JsonSave(host)))
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_failed(error) from None
    pending.thread = threading.Thread(target=self._write_manifest_when_committed,
                                      args=(pending,), name="dhmd-manifest", daemon=True)
    pending.thread.start()

  def _write_manifest_when_committed(self, pending):
    """The manifest thread: hashes the host arrays while orbax writes them (zlib releases the
    GIL), waits for orbax's commit, then writes the manifest into the committed folder."""
    try:
      digests = _array_digests(pending.arrays)
      pending.arrays = None
      self._manager.wait_until_finished()
      folder = os.path.join(self.directory, str(pending.epoch))
      if os.path.isdir(folder) and distributed.is_primary():  # one writer (several processes)
        try:
          _write_manifest(folder, digests)
        except OSError:  # incomplete without it: removed, so a rerun finds only complete ones
          shutil.rmtree(folder, ignore_errors=True)
          raise
    except BaseException as error:  # pylint: disable=broad-except
      pending.error = error  # wait() raises it in the main thread

  def _save_failed(self, error):
    """The one-line CheckpointError of a save that failed at the OS level (else `error`)."""
    self._failed = error
    why = _os_failure(error)
    if why is None:
      return error
    epoch = self._pending.epoch if self._pending is not None else "?"
    return CheckpointError(
        f"cannot write the checkpoint of epoch {epoch} into {self.directory} ({why}); the "
        f"checkpoints before it are intact: free space on its file system (or make it "
        f"writable) and rerun the same command to resume")

  def wait(self):
    """Blocks until the last save is committed (renamed into place) with its manifest."""
    if self._manager is None or self._failed is not None:
      return
    pending = self._pending
    try:
      if pending is not None and pending.thread is not None:
        pending.thread.join()
        if pending.error is not None:
          raise pending.error
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_failed(error) from None
    self._pending = None
    # Several processes: process 0 writes the manifest (the others' wait ends before it may).
    if pending is not None and distributed.is_primary() and not os.path.exists(
        os.path.join(self.directory, str(pending.epoch), MANIFEST)):
      self._failed = CheckpointError(f"the save of epoch {pending.epoch} was not committed")
      raise CheckpointError(
          f"the checkpoint of epoch {pending.epoch} was not committed into {self.directory} "
          f"(orbax reported no error); the checkpoints before it are intact: rerun the same "
          f"command to resume")

  def restore(self, *, state, best_params, check_host=None):
    """The newest readable checkpoint: (epoch, {"state", "best_params"}, host), or None.

    `state` and `best_params` are targets giving the structure (abstract arrays are enough).
    `check_host(epoch, host)` runs on the host JSON before any array is read and may raise
    (e.g. a config mismatch): that error propagates. A checkpoint that cannot be read is skipped
    with one warning line; if none of them can be, CheckpointError. A checkpoint removed while
    it was read (the training a reader runs beside keeps two) is no damage: the newest ones are
    listed again.
    """
    target = {"state": state, "best_params": best_params}
    for _ in range(10):
      with _reading():
        outcome = self._restore_newest(target, check_host)
        if outcome is not None:
          self._agree(outcome[0])
          return outcome[0]
        self._manager.reload()
    raise CheckpointError(f"the checkpoints in {self.directory} kept changing while they were "
                          f"read; rerun the command")

  def _agree(self, restored):
    """Several processes (dhmd_jax.distributed): all of them resume from the same epoch, and
    see the checkpoint folder as process 0 left it (having set aside what it skipped)."""
    if not distributed.active():
      return
    epoch = str(None if restored is None else restored[0])
    first = distributed.broadcast("restored", epoch)
    if first != epoch:
      raise CheckpointError(
          f"process 0 resumes from epoch {first} of {self.directory}, {distributed.who()} from "
          f"{epoch}; every process needs the same workdir on one shared file system")
    distributed.barrier("restored")
    self._manager.reload()

  def _restore_newest(self, target, check_host):
    """(the restore's result,), or None when a checkpoint vanished while it was read."""
    epochs = self.epochs()
    legacy = bool(epochs) and not any(
        os.path.exists(os.path.join(self.directory, str(e), MANIFEST)) for e in epochs)
    failures = []
    for epoch in reversed(epochs):
      path = os.path.join(self.directory, str(epoch))
      manifest, damage = _check_files(path, legacy=legacy)
      if damage is not None:
        if not os.path.isdir(path):
          return None
        failures.append((path, CheckpointError(damage)))
        continue
      try:
        host = self._manager.restore(epoch, args=ocp.args.Composite(
            host=ocp.args.JsonRestore()))["host"]
      except Exception as error:  # pylint: disable=broad-except
        if not os.path.isdir(path):
          return None
        failures.append((path, error))
        continue
      if check_host is not None:
        check_host(epoch, host)
      try:
        arrays = self._restore_arrays(epoch, target, manifest)
      except Exception as error:  # pylint: disable=broad-except
        if _incompatible(error):  # readable, but not this model's: never skip or move it
          raise CheckpointError(
              f"the checkpoint {path} holds arrays of another structure than this model "
              f"({_reason(error)}); it was written by another config or version: use a new "
              f"--workdir, or the version that wrote it") from None
        if not os.path.isdir(path):
          return None
        failures.append((path, error))
        continue
      for bad, error in failures:
        moved = self._set_aside(bad)
        _warn(f"skipped the unreadable checkpoint {bad} ({_reason(error)}); using the one of "
              f"epoch {epoch}" + (f"; the unreadable one was moved to {moved}" if moved else ""))
      return ((epoch, arrays, host),)
    if failures:
      bad, error = failures[0]
      raise CheckpointError(
          f"no readable checkpoint in {self.directory}: {bad} ({_reason(error)})"
          + (f" and {len(failures) - 1} older" if len(failures) > 1 else "")
          + "; delete the folder to start the run over")
    return (None,)

  def _set_aside(self, path):
    """Moves an unreadable checkpoint out of the way of the next save (training only), to
    `checkpoints/unreadable/`, for inspection; returns where it went (None when read-only)."""
    if self._read_only or not distributed.is_primary():  # process 0 moves it (several)
      return None
    folder = os.path.join(os.path.dirname(os.path.dirname(path)), "unreadable")
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, f"{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, dest)
    self._manager.reload()
    return dest

  def _restore_arrays(self, epoch, target, manifest):
    """The arrays of `epoch`, their values checked against the manifest (before a layout v1
    checkpoint is converted: the manifest holds what was written)."""
    restore = lambda t: self._manager.restore(epoch, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(t)))["arrays"]
    try:
      arrays = restore(target)
    except (ValueError, KeyError) as error:  # a tree of another structure: maybe layout v1
      try:
        arrays = restore(_v1_target(target))
      except Exception:  # pylint: disable=broad-except
        raise error from None
      _check_arrays(arrays, manifest)
      return _from_v1(arrays)
    _check_arrays(arrays, manifest)
    return arrays

  def close(self):
    if self._manager is None:
      return
    try:
      self.wait()
    finally:
      manager, self._manager = self._manager, None
      try:
        manager.close()
      except Exception:  # pylint: disable=broad-except
        if self._failed is None:  # a failed save was reported already
          raise


def _incompatible(error):
  """True when orbax read the checkpoint but its tree or shapes differ from the target (as
  opposed to files that cannot be read: those are damaged)."""
  text = str(error)
  return isinstance(error, (ValueError, KeyError)) and (
      "tree structures do not match" in text or "Structure mismatch" in text
      or "not compatible with the stored shape" in text)


def _v1_target(target):
  """The checkpoint target with every parameter tree in the per-branch layout v1 (seed axis 1)."""
  to_v1 = lambda p: jax.eval_shape(lambda q: layout.to_v1_params(q, batch_dims=1), p)
  out = dict(target)
  out["state"] = out["state"].replace(params=to_v1(out["state"].params))
  out["best_params"] = to_v1(out["best_params"])
  return out


def _from_v1(arrays):
  out = dict(arrays)
  out["state"] = layout.convert_v1_train_state(out["state"], batch_dims=1)
  out["best_params"] = jax.jit(lambda p: layout.convert_v1_params(p, batch_dims=1))(
      out["best_params"])  # compiled: one program, not one per array
  return out
