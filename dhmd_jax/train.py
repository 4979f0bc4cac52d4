"""Training: `train_and_evaluate(config, workdir)` runs the reference protocol for every seed of
`config.train.seeds` in one compiled program and returns the report (also written to disk).

Protocol (reference doc, section 5; each part a config field): Adam on all parameters; gradient
accumulation over `update_epochs` micro-batches with the running sum value-clipped after each;
ReduceLROnPlateau on the validation loss; early stopping; a cap on epochs; the model selected on
the validation split (MAE for regression, cross-entropy for binary tasks), never on test.

Speed: the training arrays live on the device; an epoch runs as a few jitted `lax.scan` chunks
(no host synchronisation per step); the step compiles once. Resume: RNG keys derive from
(seed, epoch, step), so a run resumed from its latest checkpoint ends with the same metrics as an
uninterrupted one.
"""

import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dhmd_jax import checkpoint
from dhmd_jax import data as data_lib
from dhmd_jax import metrics as metrics_lib
from dhmd_jax import parallel
from dhmd_jax import reporting
from dhmd_jax import schedule
from dhmd_jax import steps
from dhmd_jax.models import dhmd as dhmd_model

# Config fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("train.num_epochs", "train.steps_per_chunk", "train.eval_batch_size",
                      "train.eval_test_every_epoch", "train.device_data_limit_bytes",
                      "train.num_devices", "train.compilation_cache_dir", "log")


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, mismatched workdir); the message is one line."""


# ----------------------------------------------------------------------------- data


def num_outputs(config):
  return 2 if config.dataset.task == "binary" else 1


def build(config, dataset):
  del dataset  # shapes come from the batches themselves
  return dhmd_model.build_model(config, num_outputs=num_outputs(config))


def enable_compilation_cache(directory):
  """Turns on JAX's persistent compilation cache unless one is configured already."""
  if directory and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def seed_keys(seeds, dropout_rng="threefry"):
  """Per seed: (init, data order, dropout) keys, each stacked over seeds.

  `dropout_rng` picks the dropout keys' PRNG: "threefry" (JAX's default: the same masks on any
  number of devices) or "rbg" (XLA's RngBitGenerator: much cheaper per random number, which
  matters for the (B, h, T, T) attention-dropout masks of unaligned data, but its masks depend
  on how the batch is sharded).
  """
  if dropout_rng not in ("threefry", "rbg"):
    raise ValueError(f"config.train.dropout_rng must be 'threefry' or 'rbg', got {dropout_rng!r}")
  base = [jax.random.key(int(s)) for s in seeds]
  keys = [jnp.stack([jax.random.fold_in(k, i) for k in base]) for i in range(3)]
  if dropout_rng == "rbg":
    keys[2] = jnp.stack([jax.random.fold_in(jax.random.key(int(s), impl="rbg"), 2)
                         for s in seeds])
  return tuple(keys)


# ----------------------------------------------------------------------------- bookkeeping


def _flat_config(config):
  flat = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if hasattr(value, "items"):
        walk(name + ".", value)
      else:
        flat[name] = list(value) if isinstance(value, tuple) else value
  walk("", config)
  return flat


def config_fingerprint(config):
  return {k: v for k, v in _flat_config(config).items()
          if not any(k == p or k.startswith(p + ".") for p in _RESUMABLE_CHANGES)}


def _check_finite(metrics, valid, active, *, epoch, first_step, seeds, workdir):
  """Raises TrainingError naming the epoch, step and loss term of the first non-finite loss."""
  names = [k for k in metrics if not k.startswith("edge/")]
  ordered = [k for k in names if k != "total"] + ["total"]
  total = metrics["total"]  # (S, K)
  bad = ~np.isfinite(total) & valid[None, :] & active[:, None]
  if not bad.any():
    return
  s, k = np.argwhere(bad)[0]
  term = next(n for n in ordered if not np.isfinite(metrics[n][s, k]))
  raise TrainingError(
      f"non-finite loss at epoch {epoch}, step {first_step + k + 1} (seed {seeds[s]}): "
      f"term '{term}' = {metrics[term][s, k]}; the last good checkpoint in "
      f"{os.path.join(workdir, 'checkpoints')} is intact")


def _chunking(steps_per_epoch, max_chunk):
  """(number of chunks, steps per chunk) covering the epoch with the least padding."""
  if max_chunk <= 0 or max_chunk >= steps_per_epoch:
    return 1, steps_per_epoch
  num_chunks = math.ceil(steps_per_epoch / max_chunk)
  return num_chunks, math.ceil(steps_per_epoch / num_chunks)


# ----------------------------------------------------------------------------- main loop


def train_and_evaluate(config, workdir):
  """Trains every seed, selects on validation, tests the selected models, writes the report.

  Returns the report dict (also in `<workdir>/results.json` and `results.md`).
  """
  start_time = time.time()
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(config.train.compilation_cache_dir)
  task = config.dataset.task
  seeds = [int(s) for s in config.train.seeds]
  num_seeds = len(seeds)
  family = metrics_lib.metric_family(metrics_lib.metrics_dataset(config), task)

  dataset = data_lib.load_dataset(config.dataset, workdir=workdir)
  print(data_lib.summarize(dataset), flush=True)
  reporting.write_json(os.path.join(workdir, "config.json"), config.to_dict())

  batch_size = config.train.batch_size
  micro = config.train.update_epochs
  host = {name: data_lib.split_arrays(dataset.splits[name], task) for name in ("train", "valid", "test")}
  num_train = host["train"]["label"].shape[0]
  steps_per_epoch = (num_train // batch_size) // micro
  if steps_per_epoch < 1:
    raise TrainingError(
        f"the train split has {num_train} samples, fewer than one optimizer step of "
        f"batch_size {batch_size} x update_epochs {micro}; lower train.batch_size or "
        f"train.update_epochs")

  on_device = data_lib.nbytes(host["train"]) <= config.train.device_data_limit_bytes
  if not on_device:
    logging.warning("training arrays (%.1f GB) exceed train.device_data_limit_bytes; "
                    "they are copied to the device anyway (host streaming is not implemented)",
                    data_lib.nbytes(host["train"]) / 1e9)
  mesh = parallel.make_mesh(config.train.num_devices)
  parallel.check_divisible(mesh, batch_size, "config.train.batch_size")
  parallel.check_divisible(mesh, config.train.eval_batch_size, "config.train.eval_batch_size")
  device = {name: jax.device_put(arrays, parallel.replicated(mesh))
            for name, arrays in host.items()}

  model = build(config, dataset)
  init_keys, order_keys, dropout_keys = seed_keys(seeds, config.train.dropout_rng)
  sample = jax.tree.map(lambda a: a[:batch_size], device["train"])
  states = jax.jit(jax.vmap(lambda k: steps.init_state(config, model, sample, k)),
                   out_shardings=parallel.replicated(mesh))(init_keys)
  # One jitted copy, not one eager op (and one compilation) per parameter array.
  best_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(states.params)
  sched = schedule.init_state(num_seeds, config.train.learning_rate)

  # Every state handed to the compiled chunk has the chunk's own output layout (replicated over
  # the mesh), so the step compiles once, not once more after the first chunk.
  place = lambda tree: jax.device_put(tree, parallel.replicated(mesh))
  ckpt = checkpoint.Checkpointer(workdir)
  start_epoch = 1
  restored = ckpt.restore_latest(state=states, best_params=best_params)
  if restored is not None:
    epoch, arrays, host_state = restored
    if host_state["fingerprint"] != json.loads(json.dumps(config_fingerprint(config))):
      raise TrainingError(
          f"{workdir} holds a run with a different config (see its config.json); "
          f"use a new --workdir or the same config to resume")
    states, best_params = arrays["state"], arrays["best_params"]
    sched = schedule.from_json(host_state["schedule"])
    start_epoch = epoch + 1
    print(f"resuming from the checkpoint of epoch {epoch} in {workdir}", flush=True)
  states = place(steps.set_learning_rate(states, sched["lr"]))

  train_step = steps.make_train_step(config, model)
  run_chunk = steps.make_run_chunk(train_step, mesh)
  predict = steps.make_predict(model, batch_size=config.train.eval_batch_size, mesh=mesh)
  num_chunks, chunk = _chunking(steps_per_epoch, config.train.steps_per_chunk)

  log = reporting.MetricsLog(os.path.join(workdir, "metrics.jsonl"),
                             resume_epoch=start_epoch - 1)
  tb = reporting.TensorBoard(workdir, seeds, config.log.tensorboard)
  num_epochs = config.train.num_epochs
  progress = reporting.ProgressBar((num_epochs - start_epoch + 1) * steps_per_epoch,
                                   enabled=config.log.progress_bar,
                                   interval=config.log.progress_interval_s)
  labels = {name: host[name]["label"] for name in host}
  done_steps = 0
  epochs_run = start_epoch - 1
  try:
    for epoch in range(start_epoch, num_epochs + 1):
      if not sched["active"].any():
        break
      epoch_start = time.time()
      active = sched["active"].copy()
      index = steps.epoch_index(order_keys, epoch, num_samples=num_train,
                                batch_size=batch_size, num_steps=steps_per_epoch,
                                micro_per_step=micro)
      sums, count = {}, 0
      for c in range(num_chunks):
        lo = c * chunk
        idx = index[:, lo:lo + chunk]
        valid = np.arange(lo, lo + chunk) < steps_per_epoch
        if idx.shape[1] < chunk:  # the last chunk: pad with steps that are not applied
          idx = jnp.pad(idx, ((0, 0), (0, chunk - idx.shape[1]), (0, 0), (0, 0)))
        states, chunk_metrics = run_chunk(states, jnp.asarray(active), device["train"], idx,
                                          jnp.asarray(valid), dropout_keys)
        chunk_metrics = jax.device_get(chunk_metrics)
        _check_finite(chunk_metrics, valid, active, epoch=epoch, first_step=lo, seeds=seeds,
                      workdir=workdir)
        for name, value in chunk_metrics.items():
          sums[name] = sums.get(name, 0.0) + np.where(valid[None], value, 0.0).sum(axis=1)
        count += int(valid.sum())
        done_steps += int(valid.sum())
        progress.update(done_steps, label=f"epoch {epoch}/{num_epochs}")
      train_means = {name: value / count for name, value in sums.items()}

      valid_preds = np.asarray(predict(states.params, device["valid"]))
      valid_metrics = metrics_lib.split_metrics(config, valid_preds, labels["valid"])
      valid_loss = metrics_lib.selection_loss(task, valid_preds, labels["valid"])
      test_metrics = {}
      if config.train.eval_test_every_epoch:
        test_metrics = metrics_lib.split_metrics(config, np.asarray(predict(states.params, device["test"])),
                                     labels["test"])
      lr_used = sched["lr"].copy()
      sched, improved = schedule.update(
          sched, epoch=epoch, valid_loss=valid_loss, factor=config.train.plateau_factor,
          patience=config.train.plateau_patience, early_stop=config.train.early_stop)
      best_params = steps.select_best(best_params, states.params, jnp.asarray(improved))
      states = place(steps.set_learning_rate(states, sched["lr"]))
      epochs_run = epoch

      record = {
          "epoch": epoch, "seeds": seeds, "active": active, "lr": lr_used,
          "train": {k: v for k, v in train_means.items() if not k.startswith("edge/")},
          "edges": {k[len("edge/"):]: v for k, v in train_means.items()
                    if k.startswith("edge/")},
          "valid_loss": valid_loss, "valid": valid_metrics, "test": test_metrics,
          "improved": improved, "time_s": time.time() - epoch_start,
      }
      log.write(record)
      tb.write(epoch, _tensorboard_scalars(record, seeds))
      progress.end_line()
      print(reporting.epoch_line(epoch, num_epochs, train_loss=train_means["total"],
                                 valid=valid_metrics, test=test_metrics, lr=lr_used,
                                 active=sched["active"], family=family,
                                 seconds=record["time_s"]), flush=True)

      host_state = {"fingerprint": config_fingerprint(config),
                    "schedule": schedule.to_json(sched), "seeds": seeds}
      ckpt.save_latest(epoch, state=states, best_params=best_params,
                       host=json.loads(json.dumps(reporting._jsonable(host_state))))
      if improved.any():
        ckpt.save_best(epoch, best_params=best_params, host={
            "best_epoch": sched["best_epoch"].tolist(),
            "best_valid": sched["best_valid"].tolist(), "seeds": seeds})
  finally:
    tb.close()

  # --------------------------------------------------------------------------- final test
  best_valid_preds = np.asarray(predict(best_params, device["valid"]))
  best_test_preds = np.asarray(predict(best_params, device["test"]))
  test = metrics_lib.split_metrics(config, best_test_preds, labels["test"])
  valid = metrics_lib.split_metrics(config, best_valid_preds, labels["valid"])
  results = {
      "dataset": config.dataset.name, "task": task, "metric_family": family,
      "seeds": seeds, "best_epoch": sched["best_epoch"].tolist(),
      "epochs_run": epochs_run,
      "selection_metric": "cross-entropy" if task == "binary" else "MAE",
      "best_valid_loss": sched["best_valid"].tolist(),
      "valid": valid, "test": test,
      "valid_summary": reporting.summarize_seeds(valid),
      "test_summary": reporting.summarize_seeds(test),
      "wall_time_s": time.time() - start_time,
  }
  reporting.write_predictions(os.path.join(workdir, "predictions_test.csv"), dataset.splits["test"].ids,
                    labels["test"], metrics_lib.point_predictions(task, best_test_preds), seeds)
  reporting.write_json(os.path.join(workdir, "results.json"), results)
  markdown = reporting.markdown_report(results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown)
  print(markdown, flush=True)
  ckpt.close()
  return results


def _tensorboard_scalars(record, seeds):
  out = {}
  for i, seed in enumerate(seeds):
    scalars = {f"train/{k}": v[i] for k, v in record["train"].items()}
    scalars.update({f"edges/{k}": v[i] for k, v in record["edges"].items()})
    scalars.update({f"valid/{k}": v[i] for k, v in record["valid"].items()})
    scalars.update({f"test/{k}": v[i] for k, v in record["test"].items()})
    scalars["lr"] = record["lr"][i]
    scalars["valid/selection_loss"] = record["valid_loss"][i]
    out[seed] = scalars
  return out
