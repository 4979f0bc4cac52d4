"""Checkpoints with orbax: one checkpoint per epoch under `<workdir>/checkpoints/latest/`, the
single source of truth of a run.

  latest/<epoch>/  {"arrays": {"state": TrainState (stacked over seeds),
                               "best_params": the selected parameters of every seed},
                    "host": JSON (scheduler state with the best epoch per seed, seeds,
                                  config fingerprint)}

Training state and selected models are committed together, so no kill point can leave a
"best" that disagrees with the run that resumes, its report, or `--mode=evaluate/predict`
(which read `best_params` and the best epochs from the same checkpoint). Orbax writes each
save into a temporary folder and renames it into place once complete; a run killed mid-save
leaves the previous checkpoints intact (the temporary folder is removed on the next start).
The two most recent checkpoints are kept: a newest one that cannot be read (a truncated array
file, a damaged JSON) is skipped with one warning line, and the run resumes from the one before.

Saves are asynchronous: the arrays are copied to host memory, then written while training goes
on; the next save, `wait()` and `close()` wait for it.

Workdirs of older versions: a `best/` folder written next to `latest/` is no longer read (its
parameters are in `latest/` too); checkpoints in the per-branch parameter layout v1 (see
`models/layout.py`) are read with a v1-shaped target and converted on restore. This is the only
module that touches the orbax API.
"""

import json
import logging as py_logging
import os
import sys
import time
import traceback
import zlib

import jax
import orbax.checkpoint as ocp

from dhmd_jax.models import layout

KEEP = 2  # checkpoints kept: the newest and one to fall back on


class CheckpointError(RuntimeError):
  """No readable checkpoint where one is needed; the message is one line."""


class _QuietOrbax(py_logging.Filter):
  """Drops orbax's informational chatter (e.g. "Waiting for previous save to complete took
  2.8 seconds ... consider checkpointing less frequently", which our own end-of-epoch wait
  triggers) from the absl log; orbax errors still pass."""

  def filter(self, record):
    return record.levelno >= py_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


class _DropClosedLoopCallbacks:
  """An unraisable-exception hook that drops one kind of noise and passes everything else on.

  When orbax fails to read a damaged checkpoint it closes its event loop while tensorstore reads
  of the same checkpoint are still in flight; as each finishes, its callback calls the closed
  loop's `call_soon_threadsafe` from a tensorstore thread and Python prints a traceback
  "RuntimeError: Event loop is closed" for it (dozens, interleaved). The reads are of a
  checkpoint already given up on, so nothing is lost: the restore reports the damage in one line.
  """

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    error, tb = unraisable.exc_value, unraisable.exc_traceback
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)] if tb is not None else []
    if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        and "call_soon_threadsafe" in frames):
      return
    self.previous(unraisable)


def _quiet_orbax():
  logger = py_logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())
  if not isinstance(sys.unraisablehook, _DropClosedLoopCallbacks):
    sys.unraisablehook = _DropClosedLoopCallbacks(sys.unraisablehook)


def _manager(directory, *, create):
  options = ocp.CheckpointManagerOptions(max_to_keep=KEEP, create=create,
                                         cleanup_tmp_directories=create,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("arrays", "host"))


def _warn(message):
  print(f"warning: {message}", file=sys.stderr, flush=True)


def _reason(error):
  """One line of an exception: its type and the first line of its message, shortened."""
  text = str(error).strip().splitlines()
  text = text[0] if text else ""
  if len(text) > 160:
    text = text[:157] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


MANIFEST = "dhmd_manifest.json"


def _file_digests(folder):
  """{relative path: [size, crc32]} of every file under `folder` but the manifest."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if rel in (MANIFEST, MANIFEST + ".tmp"):
        continue
      crc = 0
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # pylint: disable=cell-var-from-loop
          crc = zlib.crc32(block, crc)
      out[rel] = [os.path.getsize(path), crc]
  return out


def _write_manifest(folder):
  """Records size and CRC32 of every file of a committed checkpoint (atomic write)."""
  digests = _file_digests(folder)
  tmp = os.path.join(folder, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": digests}, f)
  os.replace(tmp, os.path.join(folder, MANIFEST))


def _damage(folder):
  """Why a checkpoint's files differ from its manifest, or None (also when it has none: a kill
  between the commit and the manifest; orbax's own reading decides then)."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      expected = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as error:
    return f"its {MANIFEST} is unreadable ({_reason(error)})"
  actual = _file_digests(folder)
  for rel, (size, crc) in sorted(expected.items()):
    if rel not in actual:
      return f"{rel} is missing"
    if actual[rel][0] != size:
      return f"{rel} has {actual[rel][0]} bytes, {size} when written"
    if actual[rel][1] != crc:
      return f"{rel} changed since it was written (CRC32 mismatch)"
  return None


class Checkpointer:
  """Saves and restores the per-epoch checkpoints of a workdir (see the module docstring).

  `read_only=True` (evaluate, predict, analysis) never creates or cleans anything on disk.
  """

  def __init__(self, workdir, *, read_only=False):
    _quiet_orbax()
    self.directory = os.path.join(workdir, "checkpoints", "latest")
    self._read_only = read_only
    self._pending = None  # epoch of a save whose files may still be in flight
    self._manager = None
    if not read_only or os.path.isdir(self.directory):
      self._manager = _manager(self.directory, create=not read_only)

  def epochs(self):
    """Epochs with a committed checkpoint, oldest first."""
    return [] if self._manager is None else list(self._manager.all_steps())

  def save(self, epoch, *, state, best_params, host):
    """Starts saving epoch `epoch` (waits for the previous save first); returns once the arrays
    are on the host, while the files are written in the background."""
    if self._read_only:
      raise CheckpointError("this Checkpointer is read-only")
    self.wait()
    arrays = jax.device_get({"state": state, "best_params": best_params})
    self._manager.save(epoch, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                      host=ocp.args.JsonSave(host)))
    self._pending = epoch

  def wait(self):
    """Blocks until the last save is committed (renamed into place), then records the size and
    CRC32 of its files (`dhmd_manifest.json`), so damage is recognised before orbax reads it."""
    if self._manager is None:
      return
    self._manager.wait_until_finished()
    if self._pending is not None:
      folder = os.path.join(self.directory, str(self._pending))
      if os.path.isdir(folder):
        _write_manifest(folder)
      self._pending = None

  def restore(self, *, state, best_params, check_host=None):
    """The newest readable checkpoint: (epoch, {"state", "best_params"}, host), or None.

    `state` and `best_params` are targets giving the structure (abstract arrays are enough).
    `check_host(epoch, host)` runs on the host JSON before any array is read and may raise
    (e.g. a config mismatch): that error propagates. A checkpoint that cannot be read is skipped
    with one warning line; if none of them can be, CheckpointError.
    """
    epochs = self.epochs()
    target = {"state": state, "best_params": best_params}
    failures = []
    for epoch in reversed(epochs):
      path = os.path.join(self.directory, str(epoch))
      damage = _damage(path)
      if damage is not None:
        failures.append((path, CheckpointError(damage)))
        continue
      try:
        host = self._manager.restore(epoch, args=ocp.args.Composite(
            host=ocp.args.JsonRestore()))["host"]
      except Exception as error:  # pylint: disable=broad-except
        failures.append((path, error))
        continue
      if check_host is not None:
        check_host(epoch, host)
      try:
        arrays = self._restore_arrays(epoch, target)
      except Exception as error:  # pylint: disable=broad-except
        if _incompatible(error):  # readable, but not this model's: never skip or move it
          raise CheckpointError(
              f"the checkpoint {path} holds arrays of another structure than this model "
              f"({_reason(error)}); it was written by another config or version: use a new "
              f"--workdir, or the version that wrote it") from None
        failures.append((path, error))
        continue
      for bad, error in failures:
        moved = self._set_aside(bad)
        _warn(f"skipped the unreadable checkpoint {bad} ({_reason(error)}); using the one of "
              f"epoch {epoch}" + (f"; the unreadable one was moved to {moved}" if moved else ""))
      return epoch, arrays, host
    if failures:
      bad, error = failures[0]
      raise CheckpointError(
          f"no readable checkpoint in {self.directory}: {bad} ({_reason(error)})"
          + (f" and {len(failures) - 1} older" if len(failures) > 1 else "")
          + "; delete the folder to start the run over")
    return None

  def _set_aside(self, path):
    """Moves an unreadable checkpoint out of the way of the next save (training only), to
    `checkpoints/unreadable/`, for inspection; returns where it went (None when read-only)."""
    if self._read_only:
      return None
    folder = os.path.join(os.path.dirname(os.path.dirname(path)), "unreadable")
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, f"{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, dest)
    self._manager.reload()
    return dest

  def _restore_arrays(self, epoch, target):
    restore = lambda t: self._manager.restore(epoch, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(t)))["arrays"]
    try:
      return restore(target)
    except (ValueError, KeyError) as error:  # a tree of another structure: maybe layout v1
      try:
        arrays = restore(_v1_target(target))
      except Exception:  # pylint: disable=broad-except
        raise error from None
      return _from_v1(arrays)

  def close(self):
    if self._manager is not None:
      self.wait()
      self._manager.close()
      self._manager = None


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
