"""Evaluate a trained workdir on any split, or write its per-sample predictions to CSV.

Both restore the `best` checkpoint (the models selected on validation) or the `latest` one, for
every seed of the run, and reuse the training code's batched prediction and metrics.
"""

import os

import jax
import numpy as np

from dhmd_jax import checkpoint
from dhmd_jax import data as data_lib
from dhmd_jax import metrics as metrics_lib
from dhmd_jax import reporting
from dhmd_jax import steps
from dhmd_jax import train as train_lib

SPLITS = ("train", "valid", "test")


def _restore(config, workdir, which):
  """(dataset, model, stacked params) of a trained workdir."""
  if which not in ("best", "latest"):
    raise ValueError(f"checkpoint must be 'best' or 'latest', got {which!r}")
  dataset = data_lib.load_dataset(config.dataset, workdir=workdir)
  model = train_lib.build(config, dataset)
  seeds = [int(s) for s in config.train.seeds]
  init_keys, _, _ = train_lib.seed_keys(seeds)
  sample = jax.tree.map(lambda a: a[:config.train.batch_size],
                        data_lib.split_arrays(dataset.splits["train"], config.dataset.task))
  abstract = jax.eval_shape(
      jax.vmap(lambda k: steps.init_state(config, model, sample, k)), init_keys)
  ckpt = checkpoint.Checkpointer(workdir)
  try:
    if which == "best":
      restored = ckpt.restore_best(best_params=abstract.params)
      params = None if restored is None else restored[1]["best_params"]
    else:
      restored = ckpt.restore_latest(state=abstract, best_params=abstract.params)
      params = None if restored is None else restored[1]["state"].params
  finally:
    ckpt.close()
  if params is None:
    raise train_lib.TrainingError(
        f"no '{which}' checkpoint in {os.path.join(workdir, 'checkpoints')}; train first with "
        f"python -m dhmd_jax.main --config=... --workdir={workdir}")
  return dataset, model, params


def _predict(config, workdir, split, which):
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  dataset, model, params = _restore(config, workdir, which)
  arrays = data_lib.split_arrays(dataset.splits[split], config.dataset.task)
  predict = steps.make_predict(model, batch_size=config.train.eval_batch_size)
  preds = np.asarray(predict(params, jax.device_put(arrays)))
  return dataset, arrays["label"], preds


def evaluate(config, workdir, *, split="test", which="best"):
  """Metrics of every seed's model on `split`: {"per_seed": {...}, "summary": {...}}."""
  _, labels, preds = _predict(config, workdir, split, which)
  per_seed = metrics_lib.split_metrics(config, preds, labels)
  result = {"split": split, "checkpoint": which, "seeds": [int(s) for s in config.train.seeds],
            "per_seed": per_seed, "summary": reporting.summarize_seeds(per_seed)}
  reporting.write_json(os.path.join(workdir, f"eval_{split}_{which}.json"), result)
  return result


def predict(config, workdir, *, split="test", which="best", output=""):
  """Writes per-sample predictions with their ids to CSV; returns the path."""
  dataset, labels, preds = _predict(config, workdir, split, which)
  path = output or os.path.join(workdir, f"predictions_{split}_{which}.csv")
  reporting.write_predictions(path, dataset.splits[split].ids, labels,
                              metrics_lib.point_predictions(config.dataset.task, preds),
                              [int(s) for s in config.train.seeds])
  return path
