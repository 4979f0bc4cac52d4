"""Training: `train_and_evaluate(config, workdir)` runs the reference protocol for every seed of
`config.train.seeds` in one compiled program and returns the report (also written to disk).

Protocol (the DMD code's training loop, docs/training.md; each part a config field): Adam on all
parameters; gradient accumulation over `update_epochs` micro-batches with the running sum
value-clipped after each; ReduceLROnPlateau on the validation loss; early stopping; a cap on
epochs; the model selected on the validation split (MAE for regression, cross-entropy for binary
tasks), never on test.

The trainer reads as its phases: `_set_up` (workdir, data, model, compiled functions),
`_start_or_resume` (fresh states or the newest readable checkpoint), `_train_epoch` (the chunks of
one epoch), `_end_epoch` (validation, scheduler, selection, logs, checkpoint) and `_final_report`.

Speed: the training arrays live on the device; an epoch runs as a few jitted `lax.scan` chunks
(no host synchronisation per step); the step compiles once. Resume: RNG keys derive from
(seed, epoch, step), so a run resumed from its latest checkpoint ends with the same results, bit
for bit, as an uninterrupted one. Ctrl-C stops at the next chunk boundary (see `_StopRequest`).
"""

import contextlib
import dataclasses
import json
import logging as python_logging
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dhmd_jax import auto
from dhmd_jax import checkpoint
from dhmd_jax import data as data_lib
from dhmd_jax import distributed
from dhmd_jax import host
from dhmd_jax import metrics as metrics_lib
from dhmd_jax import objective
from dhmd_jax import parallel
from dhmd_jax import reporting
from dhmd_jax import schedule
from dhmd_jax import steps
from dhmd_jax import validation
from dhmd_jax.models import bert_weights
from dhmd_jax.models import dhmd as dhmd_model

_LOG = python_logging.getLogger(__name__)  # what a run reports (see dhmd_jax/__init__.py)

# Config fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("train.num_epochs", "train.steps_per_chunk", "train.eval_batch_size",
                      "train.eval_test_every_epoch", "train.device_data_limit_bytes",
                      "train.num_devices", "train.compilation_cache_dir", "dataset.path",
                      "dataset.cache_dir", "dataset.rebuild_cache", "log")


class TrainingError(RuntimeError):
  """A run that cannot go on (non-finite loss, mismatched workdir); the message is one line."""


class Interrupted(Exception):
  """Ctrl-C stopped the run at a safe point; the message is the one line to print."""


def num_outputs(config):
  return 2 if config.dataset.task == "binary" else 1


def build(config, dataset):
  """The model of `config` (shapes come from the batches themselves); with BERT, the dataset's
  `text_bert` ids are checked against its vocabulary first (one line naming pickle and split)."""
  model = dhmd_model.build_model(config, num_outputs=num_outputs(config))
  if dataset is not None:
    bert_weights.check_dataset(model.settings, dataset)
  return model


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
  base = [jax.random.key(int(s)) for s in seeds]
  keys = [jnp.stack([jax.random.fold_in(k, i) for k in base]) for i in range(3)]
  if dropout_rng == "rbg":
    keys[2] = jnp.stack([jax.random.fold_in(jax.random.key(int(s), impl="rbg"), 2)
                         for s in seeds])
  return tuple(keys)


# ----------------------------------------------------------------------------- bookkeeping


def _resumable(name):
  return any(name == p or name.startswith(p + ".") for p in _RESUMABLE_CHANGES)


def config_fingerprint(config):
  """The fields a resumed run must share with the run that wrote the checkpoint."""
  return json.loads(json.dumps(
      {k: v for k, v in validation.flat_config(config).items() if not _resumable(k)}))


def config_conflicts(stored, current):
  """[(field, stored value, current value)] of the fields that must not change on resume.

  Fields only one side has are not conflicts: fields added by a newer version of this code
  default to the behaviour of the version before.
  """
  return [(k, stored[k], current[k]) for k in sorted(set(stored) & set(current))
          if not _resumable(k) and stored[k] != current[k]]


def _check_resumable(workdir, stored, config):
  conflicts = config_conflicts(stored, config_fingerprint(config))
  if conflicts:
    field, old, new = conflicts[0]
    more = f" (and {len(conflicts) - 1} more fields)" if len(conflicts) > 1 else ""
    raise TrainingError(
        f"{workdir} holds a run with {field}={old!r}, this command has {new!r}{more}; "
        f"use a new --workdir, or the run's own config (its config.json) to resume")


def sweep_runs(seeds, loss_weights=None):
  """(seed per run, {name: (R,) float32} or None, name per run) of one compiled program.

  Without `loss_weights` the runs are the seeds. With {name: V values} (names from
  `objective.LOSS_WEIGHTS`, every name the same V), R = V x S runs, value-major: run r trains
  seed seeds[r % S] with the weights of value r // S, starting, ordering its data and drawing its
  dropout exactly as that seed alone would.
  """
  if not loss_weights:
    return list(seeds), None, list(seeds)
  unknown = [n for n in loss_weights if n not in objective.LOSS_WEIGHTS]
  counts = {len(v) for v in loss_weights.values()}
  if unknown or len(counts) != 1 or 0 in counts:
    given = {k: list(v) for k, v in loss_weights.items()}
    raise TrainingError(f"loss_weights must give the same number (>= 1) of values for names "
                        f"among {', '.join(objective.LOSS_WEIGHTS)}; got {given}")
  runs = [(v, s) for v in range(counts.pop()) for s in seeds]
  weights = {n: np.asarray([float(values[v]) for v, _ in runs], np.float32)
             for n, values in loss_weights.items()}
  names = [f"{s}-" + ",".join(f"{n}={float(values[v]):g}" for n, values in loss_weights.items())
           for v, s in runs]
  return [s for _, s in runs], weights, names


def _host_weights(run):
  """A sweep's per-run loss weights as JSON lists (for the checkpoint and the report)."""
  return {n: [float(x) for x in np.asarray(w)] for n, w in run.swept.items()}


def run_loss_weights(config, num_runs, swept=None):
  """{name: (R,) float32} for every Eq. 14 weight: the config's value, or a sweep's per run."""
  weights = {n: np.full(num_runs, getattr(config.loss, n), np.float32)
             for n in objective.LOSS_WEIGHTS}
  weights.update(swept or {})
  return weights


def _check_same_sweep(run, stored):
  """Resuming a sweep needs the checkpoint's per-run loss weights (None: not a sweep)."""
  current = None if run.swept is None else _host_weights(run)
  if stored != current:
    raise TrainingError(
        f"{run.workdir} holds runs with loss weights {stored}, this command has {current}; "
        f"use a new --workdir, or the same loss weights to resume")


def _check_finite(metrics, valid, active, *, epoch, first_step, seeds, workdir):
  """Raises TrainingError naming the epoch, step and term of the first non-finite loss or
  gradient norm."""
  names = [k for k in metrics if not k.startswith("edge/")]
  ordered = [k for k in names if k not in ("total", "l2_grads")] + ["total", "l2_grads"]
  finite = np.isfinite(metrics["total"]) & np.isfinite(metrics["l2_grads"])  # (S, K)
  bad = ~finite & valid[None, :] & active[:, None]
  if not bad.any():
    return
  s, k = np.argwhere(bad)[0]
  term = next(n for n in ordered if not np.isfinite(metrics[n][s, k]))
  what = "gradient" if term == "l2_grads" else "loss"
  raise TrainingError(
      f"non-finite {what} at epoch {epoch}, step {first_step + k + 1} (seed {seeds[s]}): "
      f"term '{term}' = {metrics[term][s, k]}; the last good checkpoint in "
      f"{os.path.join(workdir, 'checkpoints')} is intact")


def _chunking(steps_per_epoch, max_chunk):
  """(number of chunks, steps per chunk): the longest chunk of at most `max_chunk` steps that
  divides the epoch, so that no chunk computes padding steps only to drop them (an epoch of 7
  steps with at most 4 per chunk ran 2 x 4 steps, one eighth of them wasted). A chunk boundary
  costs a few milliseconds of host work; a step of the reference protocol costs seconds."""
  if max_chunk <= 0 or max_chunk >= steps_per_epoch:
    return 1, steps_per_epoch
  chunk = max(k for k in range(1, max_chunk + 1) if steps_per_epoch % k == 0)
  return steps_per_epoch // chunk, chunk


def prepare_workdir(workdir):
  """Creates `workdir` if needed and checks that it is writable, before any work.

  Returns True when this call created it. Raises TrainingError (one line) otherwise.
  """
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as error:
    if created:
      shutil.rmtree(workdir, ignore_errors=True)
    raise TrainingError(
        f"cannot write to the workdir {workdir} ({error.strerror or error}); choose a writable "
        f"--workdir") from None
  return created


class _StopRequest:
  """Ctrl-C during training: the first SIGINT asks the loop to stop at its next safe point (the
  end of a chunk), the second exits at once. Committed checkpoints are never touched: orbax
  writes a save into a temporary folder and renames it when complete."""

  def __init__(self):
    self.requested = False

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:
      os.write(2, b"interrupted twice: exiting now; committed checkpoints are intact, rerun the "
                  b"same command to resume\n")
      os._exit(130)  # pylint: disable=protected-access
    self.requested = True

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self  # signals only reach the main thread
      return
    previous = signal.signal(signal.SIGINT, self._handle)
    try:
      yield self
    finally:
      signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- phases


@dataclasses.dataclass
class _Run:
  """What stays fixed during a run: config, data, model and compiled functions."""
  config: Any
  workdir: str
  seeds: list
  family: str
  dataset: Any
  host: dict  # split -> host arrays
  device: dict  # split -> device arrays
  labels: dict  # split -> labels
  mesh: Any
  model: Any
  keys: tuple  # (init, data order, dropout) keys, stacked over seeds
  steps_per_epoch: int
  chunking: tuple  # (number of chunks, steps per chunk)
  run_chunk: Any
  predict: Any
  # Every run's Eq. 14 weights, {name: (R,) float32 on the device} for every name of
  # `objective.LOSS_WEIGHTS`: inputs of the compiled chunk, also when they are the config's own,
  # so a plain run and a loss-weight sweep are one program and agree exactly.
  loss_weights: Any
  # A loss-weight sweep (see `sweep_runs`): the vmapped axis holds runs (value x seed) instead of
  # seeds; `seeds` then has one entry per run. {name: (R,) values} of the swept names, or None.
  swept: Any = None
  run_names: list = None  # per run: the seed, or "<seed>-<name>=<value>,..."

  def place(self, tree):
    """Replicated over the mesh: the layout the compiled chunk gives and takes."""
    return jax.device_put(tree, parallel.replicated(self.mesh))


@dataclasses.dataclass
class _Progress:
  """What changes from epoch to epoch, all of it in the checkpoint."""
  states: Any  # stacked TrainState
  best_params: Any  # per seed: the parameters selected on validation
  sched: dict  # schedule.py's per-seed state
  epoch: int  # last completed epoch
  # The valid and test predictions of every seed's selected parameters, kept from the epoch
  # that selected them, so the final report needs no forward pass; None after a resume (not in
  # the checkpoint: the report then predicts).
  best_preds: Any = None


@dataclasses.dataclass
class _BestPredictions:
  """Per split, the (S, N, O) predictions of each seed's selected parameters, and which seeds'
  rows hold them (`known`, (S,) bool): rows are replaced exactly where a seed's parameters are
  (`improved`), so they are what `predict(best_params)` gives, bit for bit (the same compiled
  program on the same parameters)."""
  known: np.ndarray
  preds: dict

  @classmethod
  def empty(cls, num_seeds):
    return cls(known=np.zeros(num_seeds, bool), preds={})

  def update(self, improved, preds):
    """`preds`: {split: (S, N, O)} of this epoch's parameters (the same splits every epoch of
    a run); `improved`: (S,) bool, where `select_best` takes this epoch's parameters."""
    for split, value in preds.items():
      self.preds[split] = np.where(improved[:, None, None], value, self.preds.get(split, value))
    self.known |= improved

  def get(self, split):
    """The selected models' predictions of `split`, or None when not known for every seed."""
    return self.preds.get(split) if self.known.all() else None


def _set_up(config, workdir, loss_weights=None):
  """Data, model and compiled functions of a run."""
  enable_compilation_cache(config.train.compilation_cache_dir)
  task = config.dataset.task
  seeds, run_weights, run_names = sweep_runs([int(s) for s in config.train.seeds], loss_weights)
  dataset = data_lib.load_dataset(config.dataset, workdir=workdir)
  _LOG.info("%s", data_lib.summarize(dataset))

  batch_size, micro = config.train.batch_size, config.train.update_epochs
  host = {name: data_lib.split_arrays(dataset.splits[name], task,
                                      text_encoder=config.model.text_encoder)
          for name in ("train", "valid", "test")}
  num_train = host["train"]["label"].shape[0]
  steps_per_epoch = (num_train // batch_size) // micro
  if steps_per_epoch < 1:
    raise TrainingError(
        f"the train split has {num_train} samples, fewer than one optimizer step of "
        f"batch_size {batch_size} x update_epochs {micro}; lower train.batch_size or "
        f"train.update_epochs")
  if data_lib.nbytes(host["train"]) > config.train.device_data_limit_bytes:
    logging.warning("training arrays (%.1f GB) exceed train.device_data_limit_bytes; "
                    "they are copied to the device anyway (host streaming is not implemented)",
                    data_lib.nbytes(host["train"]) / 1e9)
  try:  # the config asks for devices or a split this machine cannot give
    mesh = parallel.make_mesh(config.train.num_devices)
    parallel.check_divisible(mesh, batch_size, "config.train.batch_size")
    parallel.check_divisible(mesh, config.train.eval_batch_size, "config.train.eval_batch_size")
  except ValueError as error:
    raise TrainingError(str(error)) from None
  model = build(config, dataset)
  train_step = steps.make_train_step(config, model)
  return _Run(
      config=config, workdir=workdir, seeds=seeds,
      family=metrics_lib.metric_family(metrics_lib.metrics_dataset(config), task),
      dataset=dataset, host=host,
      device={name: parallel.replicate(arrays, mesh)  # also over several processes
              for name, arrays in host.items()},
      labels={name: arrays["label"] for name, arrays in host.items()},
      mesh=mesh, model=model, keys=seed_keys(seeds, config.train.dropout_rng),
      steps_per_epoch=steps_per_epoch,
      chunking=_chunking(steps_per_epoch, config.train.steps_per_chunk),
      run_chunk=steps.make_run_chunk(train_step, mesh, seed_compute=config.train.seed_compute),
      predict=steps.make_predict(model, batch_size=config.train.eval_batch_size, mesh=mesh,
                                 seed_compute=config.train.seed_compute),
      loss_weights=jax.device_put(run_loss_weights(config, len(seeds), run_weights),
                                  parallel.replicated(mesh)),
      swept=run_weights, run_names=run_names)


# XLA options of the programs a run executes once (the initialisation, a copy): compiled without
# LLVM's optimisations. The random initialisation of every parameter is a large program of
# threefry arithmetic that XLA's default optimisation level compiles in minutes on a 2-core CPU
# (as long as the train step) and level 0 in seconds; it runs once, so its speed does not
# matter. Floating-point initialisers may then differ in the last bit from an optimised build
# (as they may between CPUs); a run and its resumption never depend on it (a resumed run reads
# its states from the checkpoint, and the initialisation is not compiled at all then).
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def _run_once(jitted, *args):
  """`jitted(*args)`, compiled with `_RUN_ONCE_OPTIONS` (a persistent cache entry of its own)."""
  return jitted.lower(*args).compile(compiler_options=_RUN_ONCE_OPTIONS)(*args)


def _init_program(run):
  """The jitted initialisation of every seed's TrainState from its init key."""
  config = run.config
  sample = jax.tree.map(lambda a: a[:config.train.batch_size], run.device["train"])
  return jax.jit(jax.vmap(lambda k: steps.init_state(config, run.model, sample, k)),
                 out_shardings=parallel.replicated(run.mesh))


def _fresh_progress(run, init):
  """Epoch 0: every seed's initial state, and a copy of its parameters as the selected ones."""
  states = _run_once(init, run.keys[0])
  # One jitted copy, not one eager op (and one compilation) per parameter array.
  best_params = _run_once(jax.jit(lambda p: jax.tree.map(jnp.copy, p)), states.params)
  return _Progress(states=states, best_params=best_params,
                   sched=schedule.init_state(len(run.seeds), run.config.train.learning_rate),
                   epoch=0, best_preds=_BestPredictions.empty(len(run.seeds)))


def _start_or_resume(run, ckpt):
  """Fresh states for every seed, or those of the newest readable checkpoint.

  The checkpoint is read into abstract targets (shapes, dtypes and the run's replicated
  layout, from tracing the initialisation): a resumed run never compiles or runs the
  initialisation it would throw away.
  """
  config = run.config
  init = _init_program(run)
  layout = parallel.replicated(run.mesh)
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=layout),
                        jax.eval_shape(init, run.keys[0]))
  restored = ckpt.restore(
      state=target, best_params=target.params,
      check_host=lambda _, host: (_check_resumable(run.workdir, host["fingerprint"], config),
                                  _check_same_sweep(run, host.get("loss_weights"))))
  if restored is None:
    progress = _fresh_progress(run, init)
  else:
    epoch, arrays, host = restored
    progress = _Progress(states=arrays["state"], best_params=run.place(arrays["best_params"]),
                         sched=schedule.from_json(host["schedule"]), epoch=epoch)
    _LOG.info("resuming from the checkpoint of epoch %d in %s", epoch, run.workdir)
  progress.states = run.place(steps.set_learning_rate(progress.states, progress.sched["lr"]))
  return progress


def _train_epoch(run, progress, epoch, *, stop, bar, done_steps):
  """Runs the chunks of one epoch; returns (per-seed mean of every logged term, steps done).

  Raises Interrupted when Ctrl-C asked to stop (the epoch is abandoned; the last checkpoint
  is the one of the epoch before).
  """
  config = run.config
  num_chunks, chunk = run.chunking
  active = progress.sched["active"].copy()
  # On the host (S x steps x U x B int32, kilobytes): slicing a device array by chunk would
  # compile one slicing program per chunk offset.
  index = np.asarray(steps.epoch_index(
      run.keys[1], epoch, num_samples=run.host["train"]["label"].shape[0],
      batch_size=config.train.batch_size, num_steps=run.steps_per_epoch,
      micro_per_step=config.train.update_epochs))
  sums, count = {}, 0
  for c in range(num_chunks):
    lo = c * chunk
    idx = index[:, lo:lo + chunk]
    valid = np.arange(lo, lo + chunk) < run.steps_per_epoch
    progress.states, metrics = run.run_chunk(progress.states, jnp.asarray(active),
                                             run.device["train"], idx, jnp.asarray(valid),
                                             run.keys[2], run.loss_weights)
    metrics = jax.device_get(metrics)
    _check_finite(metrics, valid, active, epoch=epoch, first_step=lo, seeds=run.run_names,
                  workdir=run.workdir)
    for name, value in metrics.items():
      sums[name] = sums.get(name, 0.0) + np.where(valid[None], value, 0.0).sum(axis=1)
    count += int(valid.sum())
    done_steps += int(valid.sum())
    bar.update(done_steps, label=f"epoch {epoch}/{config.train.num_epochs}")
    # Several processes stop at the same chunk when any of them got Ctrl-C.
    if distributed.any_process(stop.requested, f"stop/{epoch}/{c}"):
      bar.end_line()
      raise Interrupted(f"interrupted at epoch {epoch}; rerun the same command to resume")
  return {name: value / count for name, value in sums.items()}, done_steps


def _end_epoch(run, progress, epoch, train_means, *, train_seconds, start):
  """Validation, scheduler, model selection: updates `progress`, returns the epoch's record."""
  config = run.config
  task = config.dataset.task
  valid_preds = parallel.to_host(run.predict(progress.states.params, run.device["valid"]))
  valid_metrics = metrics_lib.split_metrics(config, valid_preds, run.labels["valid"])
  valid_loss = metrics_lib.selection_loss(task, valid_preds, run.labels["valid"])
  test_metrics = {}
  if config.train.eval_test_every_epoch:
    test_preds = parallel.to_host(run.predict(progress.states.params, run.device["test"]))
    test_metrics = metrics_lib.split_metrics(config, test_preds, run.labels["test"])
  active, lr_used = progress.sched["active"].copy(), progress.sched["lr"].copy()
  progress.sched, improved = schedule.update(
      progress.sched, epoch=epoch, valid_loss=valid_loss, factor=config.train.plateau_factor,
      patience=config.train.plateau_patience, early_stop=config.train.early_stop)
  progress.best_params = steps.select_best(progress.best_params, progress.states.params,
                                           jnp.asarray(improved))
  if progress.best_preds is not None:
    progress.best_preds.update(improved, {"valid": valid_preds, **(
        {"test": test_preds} if config.train.eval_test_every_epoch else {})})
  progress.states = run.place(steps.set_learning_rate(progress.states, progress.sched["lr"]))
  progress.epoch = epoch
  # A sweep's runs share seeds: "runs" names each column ("<seed>-<name>=<value>"), as in
  # results.json.
  names = {} if run.swept is None else {"runs": run.run_names}
  end = time.time()
  return {
      "epoch": epoch, "seeds": run.seeds, **names, "active": active, "lr": lr_used,
      "train": {k: v for k, v in train_means.items() if not k.startswith("edge/")},
      "edges": {k[len("edge/"):]: v for k, v in train_means.items() if k.startswith("edge/")},
      "valid_loss": valid_loss, "valid": valid_metrics, "test": test_metrics,
      "improved": improved, "time_s": end - start,
      # Where the epoch's time went (the checkpoint's save follows the record, see timing_s in
      # results.json); the first epoch's training includes compiling the train program.
      "timing_s": {"train": train_seconds, "evaluate": end - start - train_seconds},
  }


def _save(run, progress, ckpt):
  host = {"fingerprint": config_fingerprint(run.config),
          "schedule": schedule.to_json(progress.sched), "seeds": run.seeds}
  if run.swept is not None:
    host["loss_weights"] = _host_weights(run)
  ckpt.save(progress.epoch, state=progress.states, best_params=progress.best_params,
            host=json.loads(json.dumps(reporting.jsonable(host))))


def _selected_predictions(run, progress, split):
  """(S, N, O) predictions of every seed's selected parameters on `split`: kept from the epoch
  that selected them when known, else predicted."""
  known = None if progress.best_preds is None else progress.best_preds.get(split)
  if known is not None:
    return known
  return parallel.to_host(run.predict(progress.best_params, run.device[split]))


def computed_as(config):
  """How this invocation computed the run: the backend, its devices, the JAX version, the host's
  CPU model and the CPUs this process may use, and what the config's "auto" switches became
  (`auto.resolve`). Results computed differently, or on another CPU, agree up to float
  rounding; this says which way and where a report's numbers were computed."""
  devices = jax.devices()
  return {"backend": jax.default_backend(), "devices": len(devices),
          "device_kind": devices[0].device_kind, "jax": jax.__version__,
          "host_cpu": host.cpu_model(), "host_cpus": host.cpus(), **auto.resolve(config)}


def _final_report(run, progress, start_time, timing, *, how, log):
  """Tests the selected model of every seed; writes results.json/.md and the predictions.
  `timing`: seconds of this invocation by phase (setup, train, evaluate, checkpoint); `how`:
  this invocation's `computed_as`; `log`: the MetricsLog (process 0), whose epoch records say
  how each epoch was computed."""
  report_start = time.time()
  config = run.config
  task = config.dataset.task
  best_valid_preds, best_test_preds = (_selected_predictions(run, progress, split)
                                        for split in ("valid", "test"))
  test = metrics_lib.split_metrics(config, best_test_preds, run.labels["test"])
  valid = metrics_lib.split_metrics(config, best_valid_preds, run.labels["valid"])
  results = {
      "dataset": config.dataset.name, "task": task, "metric_family": run.family,
      "seeds": run.seeds, "best_epoch": progress.sched["best_epoch"].tolist(),
      "epochs_run": progress.epoch,
      "selection_metric": "cross-entropy" if task == "binary" else "MAE",
      "best_valid_loss": progress.sched["best_valid"].tolist(),
      "valid": valid, "test": test,
      "valid_summary": reporting.summarize_seeds(valid),
      "test_summary": reporting.summarize_seeds(test),
      "wall_time_s": time.time() - start_time,
      "timing_s": {**timing, "report": time.time() - report_start},
      "computed_as": how,
  }
  if run.swept is not None:  # a loss-weight sweep: each run's weights and name
    results["loss_weights"] = _host_weights(run)
    results["runs"] = run.run_names
  if not distributed.is_primary():  # several processes: process 0 writes the report
    return results
  results["computed_as_by_epochs"] = reporting.computed_as_by_epochs(log.read())
  reporting.write_predictions(
      os.path.join(run.workdir, "predictions_test.csv"), run.dataset.splits["test"].ids,
      run.labels["test"], metrics_lib.point_predictions(task, best_test_preds), run.run_names)
  reporting.write_json(os.path.join(run.workdir, "results.json"), results)
  markdown = reporting.markdown_report(results)
  reporting.write_text(os.path.join(run.workdir, "results.md"), markdown)
  _LOG.info("%s", markdown)
  return results


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(config, workdir, *, loss_weights=None):
  """Trains every seed, selects on validation, tests the selected models, writes the report.

  Returns the report dict (also in `<workdir>/results.json` and `results.md`). Rerunning with
  the same workdir resumes from its newest readable checkpoint. The run holds the workdir's
  lock (`workdir.hold`): a second run on it stops at once with `workdir.Busy`.

  `loss_weights` ({name: V values}, names from `objective.LOSS_WEIGHTS`) trains a loss-weight
  sweep in this one program: V x S runs side by side (`sweep_runs`), each with the seed's init,
  data order and dropout and its own weights; the report then has one entry per run and
  `loss_weights`/`runs` naming them. config.json keeps the config's own values.
  """
  start_time = time.time()
  validation.validate(config)
  created = prepare_workdir(workdir)
  stop = _StopRequest()
  committed = False
  # Several processes (dhmd_jax.distributed): process 0 holds the lock and writes the workdir's
  # logs and reports; every process saves its share of the checkpoints.
  primary = distributed.is_primary()
  # Busy is raised before the `try`: the workdir is another run's, nothing here may remove it.
  with distributed.holding(workdir, "training"), stop.installed(), \
      contextlib.ExitStack() as resources:
    try:
      # ------------------------------------------------------------- set-up
      config_path = os.path.join(workdir, "config.json")
      if os.path.exists(config_path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
        with open(config_path) as f:  # fail before loading anything
          stored = validation.flat_config(json.load(f))
        _check_resumable(workdir, json.loads(json.dumps(stored)), config)
      run = _set_up(config, workdir, loss_weights)
      if primary:
        reporting.write_json(config_path, config.to_dict())
      ckpt = checkpoint.Checkpointer(workdir)
      resources.callback(ckpt.close)
      progress = _start_or_resume(run, ckpt)
      committed = progress.epoch > 0
      log = reporting.MetricsLog(os.path.join(workdir, "metrics.jsonl"),
                                 resume_epoch=progress.epoch) if primary else None
      tb = reporting.TensorBoard(workdir, run.run_names, config.log.tensorboard and primary)
      resources.callback(tb.close)
      num_epochs = config.train.num_epochs
      bar = reporting.ProgressBar((num_epochs - progress.epoch) * run.steps_per_epoch,
                                  enabled=config.log.progress_bar and primary,
                                  interval=config.log.progress_interval_s)
      done_steps = 0
      # Seconds of this invocation by phase (results.json "timing_s"); "setup" is everything
      # before the first epoch: reading the data, restoring or initialising, compiling the init.
      timing = {"setup": time.time() - start_time, "train": 0.0, "evaluate": 0.0,
                "checkpoint": 0.0}
      how = computed_as(config)  # recorded with every epoch: a resumed run may move
      # ------------------------------------------------------------- epochs
      for epoch in range(progress.epoch + 1, num_epochs + 1):
        if not progress.sched["active"].any():
          break
        epoch_start = time.time()
        train_means, done_steps = _train_epoch(run, progress, epoch, stop=stop, bar=bar,
                                               done_steps=done_steps)
        record = _end_epoch(run, progress, epoch, train_means,
                            train_seconds=time.time() - epoch_start, start=epoch_start)
        timing["train"] += record["timing_s"]["train"]
        timing["evaluate"] += record["timing_s"]["evaluate"]
        if log is not None:
          log.write({**record, "computed_as": how})
        tb.write(epoch, _tensorboard_scalars(record, run.run_names))
        bar.end_line()
        _LOG.info("%s", reporting.epoch_line(
            epoch, num_epochs, train_loss=train_means["total"], valid=record["valid"],
            test=record["test"], lr=record["lr"], active=progress.sched["active"],
            family=run.family, seconds=record["time_s"]))
        save_start = time.time()
        _save(run, progress, ckpt)
        timing["checkpoint"] += time.time() - save_start
        committed = True
        if distributed.any_process(stop.requested, f"stop/{epoch}/saved"):
          ckpt.wait()
          raise Interrupted(f"interrupted after epoch {epoch} (saved); rerun the same "
                            f"command to resume")
      save_start = time.time()
      ckpt.wait()
      timing["checkpoint"] += time.time() - save_start
      # ------------------------------------------------------------- report
      return _final_report(run, progress, start_time, timing, how=how, log=log)
    except BaseException:
      if created and not committed and primary:  # nothing worth keeping: leave no half-made
        # workdir (with several processes, process 0 alone removes it)
        resources.close()
        shutil.rmtree(workdir, ignore_errors=True)
      raise


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
