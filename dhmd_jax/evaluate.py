"""Evaluate a trained workdir on any split, or write its per-sample predictions to CSV.

Both use the run's own config (`<workdir>/config.json`, see `run_config`) and restore, from the
run's newest readable checkpoint, either the models selected on validation (`best`) or the
parameters of the last epoch (`latest`), for every seed, then reuse the training code's batched
prediction and metrics. The selected models and the best epochs come from the same checkpoint,
so they always agree with the run's `results.json`.

Both hold the workdir's lock while they run (`workdir.reading`), so no training starts under
them. On a workdir that a training holds they run beside it, on its newest complete checkpoint
(committed, with a manifest that matches: never one being written), and say so in one line on
stderr; with no complete checkpoint yet, one line says why not.
"""

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from dhmd_jax import checkpoint
from dhmd_jax import data as data_lib
from dhmd_jax import metrics as metrics_lib
from dhmd_jax import reporting
from dhmd_jax import steps
from dhmd_jax import train as train_lib
from dhmd_jax import validation
from dhmd_jax import workdir as workdir_lib
from dhmd_jax.names import SPLITS

_LOG = logging.getLogger(__name__)

# Fields a command may set differently from the run it evaluates: where the data and caches are,
# how predictions are batched, and logging. Everything else comes from the run's config.json.
MAY_DIFFER = ("dataset.path", "dataset.cache_dir", "dataset.rebuild_cache",
              "train.eval_batch_size", "train.num_devices", "train.compilation_cache_dir", "log")


def _may_differ(name):
  return any(name == p or name.startswith(p + ".") for p in MAY_DIFFER)


def run_config(workdir, *, given=None, explicit=()):
  """The config to evaluate `workdir` with: the run's own config.json.

  Args:
    workdir: a trained run's folder.
    given: the config the command line built (its config file with its overrides), or None.
    explicit: dotted names of the fields the user set (`--config.train.seeds=...`), and
      "<file>" when a config file was named. Fields in `MAY_DIFFER` are taken from `given`;
      any other field the user set must equal the run's value.

  Raises TrainingError (one line) when there is no config.json or the user set a field to a
  value the run did not use.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    with workdir_lib.reading(workdir, "evaluate") as trainer:
      if _training(trainer):
        raise train_lib.TrainingError(_not_yet(workdir, trainer, "config.json"))
    raise train_lib.TrainingError(
        f"{path} not found: --workdir must be a folder written by a training run "
        f"(python -m dhmd_jax.main --config=... --workdir={workdir})")
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as error:
    raise train_lib.TrainingError(f"cannot read {path} ({error}); it is written by training "
                                  f"and should not be edited") from None
  config = ml_collections.ConfigDict(stored)
  if given is None:  # a field since removed from the schema is no typo in a stored config
    return validation.validate(config, strict=False)
  stored_flat = validation.flat_config(config)
  given_flat = validation.flat_config(given)
  names = sorted(set(explicit) - {"<file>"})  # the fields set one by one are checked first
  if "<file>" in explicit:  # then every field of the named config file
    names += sorted(set(given_flat) - set(names))
  for name in names:
    if name not in given_flat:
      continue
    if _may_differ(name):
      if name in stored_flat:
        validation.set_field(config, name, validation.get_field(given, name))
      continue
    if name in stored_flat and stored_flat[name] != given_flat[name]:
      raise train_lib.TrainingError(
          f"{name}={given_flat[name]!r} differs from the run in {workdir} "
          f"({stored_flat[name]!r}); evaluate and predict use the run's own config.json: "
          f"drop the override (or the --config file), or train a new run with it")
  return validation.validate(config, strict=False)


def restore_params(config, workdir, which="best"):
  """(dataset, model, stacked params (S, ...), epoch of the checkpoint) of a trained workdir."""
  if which not in ("best", "latest"):
    raise ValueError(f"checkpoint must be 'best' or 'latest', got {which!r}")
  dataset = data_lib.load_dataset(config.dataset, workdir=workdir)
  model = train_lib.build(config, dataset)
  seeds = [int(s) for s in config.train.seeds]
  init_keys, _, _ = train_lib.seed_keys(seeds)
  sample = jax.tree.map(lambda a: a[:config.train.batch_size],
                        data_lib.split_arrays(dataset.splits["train"], config.dataset.task,
                                              text_encoder=config.model.text_encoder))
  abstract = jax.eval_shape(
      jax.vmap(lambda k: steps.init_state(config, model, sample, k)), init_keys)
  with workdir_lib.reading(workdir, "reading a checkpoint") as trainer:
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
      restored = ckpt.restore(state=abstract, best_params=abstract.params,
                              check_host=lambda _, host: _refuse_sweep(workdir, host))
    finally:
      ckpt.close()
  if restored is None:
    if _training(trainer):
      raise train_lib.TrainingError(_not_yet(workdir, trainer, "checkpoint"))
    raise train_lib.TrainingError(
        f"no checkpoint in {os.path.join(workdir, 'checkpoints', 'latest')}; train first with "
        f"python -m dhmd_jax.main --config=... --workdir={workdir}")
  epoch, arrays, _ = restored
  if trainer is not None:
    _LOG.warning("note: %s is in use (%s); reading its newest complete checkpoint, of epoch %d",
                 workdir, workdir_lib.describe(trainer), epoch)
  params = arrays["best_params"] if which == "best" else arrays["state"].params
  return dataset, model, params, epoch


def _training(holder):
  return holder is not None and holder.get("what") == "training"


def _not_yet(workdir, holder, what):
  return (f"{workdir} has no {what} yet: it is in use ({workdir_lib.describe(holder)}); rerun "
          f"once its first epoch has ended")


def _refuse_sweep(workdir, host):
  """A loss-weight sweep's checkpoint holds value x seed runs, not the config's seeds: reading
  it as seeds would mix the values up, so it is refused."""
  if host.get("loss_weights"):
    raise train_lib.TrainingError(
        f"{workdir} holds a loss-weight sweep ({len(next(iter(host['loss_weights'].values())))} "
        f"runs of several weights), which evaluate, predict and figures do not read; use the "
        f"sweep's own results.json and results.md, or train the value alone")


def _predict(config, workdir, split, which):
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  dataset, model, params, _ = restore_params(config, workdir, which)
  arrays = data_lib.split_arrays(dataset.splits[split], config.dataset.task,
                                 text_encoder=config.model.text_encoder)
  predict = steps.make_predict(model, batch_size=config.train.eval_batch_size,
                               seed_compute=config.train.seed_compute)
  preds = np.asarray(predict(params, jax.device_put(arrays)))
  return dataset, arrays["label"], preds


def evaluate(config, workdir, *, split="test", which="best"):
  """Metrics of every seed's model on `split`: {"per_seed": {...}, "summary": {...}}."""
  with workdir_lib.reading(workdir, "evaluate"):
    _, labels, preds = _predict(config, workdir, split, which)
    per_seed = metrics_lib.split_metrics(config, preds, labels)
    result = {"split": split, "checkpoint": which, "seeds": [int(s) for s in config.train.seeds],
              "per_seed": per_seed, "summary": reporting.summarize_seeds(per_seed)}
    reporting.write_json(os.path.join(workdir, f"eval_{split}_{which}.json"), result)
  return result


def predict(config, workdir, *, split="test", which="best", output=""):
  """Writes per-sample predictions with their ids to CSV; returns the path."""
  with workdir_lib.reading(workdir, "predict"):
    dataset, labels, preds = _predict(config, workdir, split, which)
    path = output or os.path.join(workdir, f"predictions_{split}_{which}.csv")
    reporting.write_predictions(path, dataset.splits[split].ids, labels,
                                metrics_lib.point_predictions(config.dataset.task, preds),
                                [int(s) for s in config.train.seeds])
  return path
