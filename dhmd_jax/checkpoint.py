"""Checkpoints with orbax: `latest` (everything needed to resume) and `best` (the selected
parameters of every seed). Each save is written to a temporary folder and renamed into place by
orbax, so a run killed mid-save leaves the previous checkpoint intact.

Layout under `<workdir>/checkpoints/`:
  latest/<epoch>/  {"arrays": {"state": TrainState (stacked over seeds), "best_params": ...},
                    "host": JSON (epoch, scheduler state, seeds, config fingerprint)}
  best/<epoch>/    {"arrays": {"best_params": ...}, "host": JSON (best epoch and valid loss per seed)}
This is the only module that touches the orbax API.

Checkpoints written before the transformers were stacked (parameter layout v1, see
`models/layout.py`) are read with a v1-shaped target and converted on restore, so old runs
resume, evaluate and predict unchanged.
"""

import os

import jax
import orbax.checkpoint as ocp

from dhmd_jax.models import layout


def _manager(directory):
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("arrays", "host"))


class Checkpointer:
  """Saves and restores the `latest` and `best` checkpoints of a workdir."""

  def __init__(self, workdir):
    root = os.path.join(workdir, "checkpoints")
    self._latest = _manager(os.path.join(root, "latest"))
    self._best = _manager(os.path.join(root, "best"))

  def _save(self, manager, epoch, arrays, host):
    manager.save(epoch, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                host=ocp.args.JsonSave(host)))
    manager.wait_until_finished()

  def _restore(self, manager, target):
    epoch = manager.latest_step()
    if epoch is None:
      return None
    restore = lambda t: manager.restore(epoch, args=ocp.args.Composite(
        arrays=ocp.args.StandardRestore(t), host=ocp.args.JsonRestore()))
    try:
      restored = restore(target)
    except (ValueError, KeyError) as error:  # a tree of another structure: maybe layout v1
      try:
        restored = restore(_v1_target(target))
      except (ValueError, KeyError):
        raise error from None
      restored = dict(restored, arrays=_from_v1(restored["arrays"]))
    return epoch, restored["arrays"], restored["host"]

  def save_latest(self, epoch, *, state, best_params, host):
    self._save(self._latest, epoch, {"state": state, "best_params": best_params}, host)

  def restore_latest(self, *, state, best_params):
    """Returns (epoch, {"state", "best_params"}, host) or None; targets give the structure."""
    return self._restore(self._latest, {"state": state, "best_params": best_params})

  def save_best(self, epoch, *, best_params, host):
    self._save(self._best, epoch, {"best_params": best_params}, host)

  def restore_best(self, *, best_params):
    return self._restore(self._best, {"best_params": best_params})

  def close(self):
    self._latest.close()
    self._best.close()


def _v1_target(target):
  """The checkpoint target with every parameter tree in the per-branch layout v1 (seed axis 1)."""
  to_v1 = lambda p: jax.eval_shape(lambda q: layout.to_v1_params(q, batch_dims=1), p)
  out = dict(target)
  if "state" in out:
    out["state"] = out["state"].replace(params=to_v1(out["state"].params))
  out["best_params"] = to_v1(out["best_params"])
  return out


def _from_v1(arrays):
  out = dict(arrays)
  if "state" in out:
    out["state"] = layout.convert_v1_train_state(out["state"], batch_dims=1)
  out["best_params"] = layout.convert_v1_params(out["best_params"], batch_dims=1)
  return out
