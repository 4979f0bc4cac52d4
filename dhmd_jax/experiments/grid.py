"""Grids of runs: what table6, table7, table8 and sweep share.

A grid is a list of `Run`s (each a config, trained in its own sub-workdir of the grid's workdir by
`train.train_and_evaluate`, all seeds in one program) and the `Table`s built from their results.
`run_grid`:

1. refuses a workdir that holds another grid (`grid.json`: the kind and the config fingerprint)
   or a sub-workdir whose run was planned differently (`run.json`), one line each;
2. skips every run already finished (results.json present, its config.json equal to the config
   the grid would run, and for a loss-weight sweep the same weights); the trainer resumes an
   unfinished one from its checkpoint. Each run is trained holding its own workdir's lock and
   checked again under it (`claim`), so processes sharing the grid's workdir never train a run
   twice: one another process holds is waited for after the others;
3. trains the rest one after another in this process, or side by side in worker processes on
   disjoint groups of devices (`Placement`, `--devices_per_run`; `worker.py`), and only its
   share when it is one shard of several (`run_shard`, `--shard_index/--num_shards` or a SLURM
   job array's variables);
4. prints one line per run with the grid's elapsed time and ETA; a run's own output goes to
   `<run>/train.log`;
5. writes `results.json` (every per-seed value, the runs, the table rows), `results.csv` and
   `results.md` at the grid's root: per row and metric mean ± std over seeds, and for each row
   against the table's reference row the paired difference over seeds with its 95% confidence
   interval and p-value (`dhmd_jax.stats`), "n.s." where not significant at 0.05; a shard
   writes them when it finds every run of the grid finished (the last one to finish).

Rows of a table are variants (table6/7/8) or swept values (sweep). A run gives one row, or, for a
loss-weight sweep trained in one program (`Run.loss_weights`), one row per value: the trainer's
runs are value-major (`train.sweep_runs`), so value i owns runs i*S .. i*S + S - 1, which pair
with seed order of every other row.

The command line (`flag_values`, `run_command`: absl flags run by `dhmd_jax.cli`, as
`dhmd_jax.main`) takes `--config=FILE[:ARG]`, `--config.FIELD=VALUE` overrides, `--workdir` and
each command's own flags; any mistake is one line `error: ...` and exit status 2, a run that
fails one line and status 1, Ctrl-C status 130. JAX and the trainer are imported only when a
grid starts, so a mistake is answered at once.
"""

import collections
import contextlib
import dataclasses
import json
import logging
import os
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from absl import flags
import ml_collections
import numpy as np

from configs import ablations
from dhmd_jax import cli
from dhmd_jax import metrics as metrics_lib
from dhmd_jax import reporting
from dhmd_jax import stats
from dhmd_jax import validation
from dhmd_jax import workdir as workdir_lib

_LOG = logging.getLogger(__name__)

GRID_FILE = "grid.json"
RUN_FILE = "run.json"
LOG_FILE = "train.log"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "synthetic.py")

# Metrics a table shows by default, per metric family (the paper's columns, plus MAE); every
# metric of every run stays in results.json. `--metrics` picks others.
TABLE_METRICS = {
    "regression": ("Mult_acc_7", "Non0_acc_2", "Non0_F1_score", "Has0_acc_2", "MAE", "Corr"),
    "sims": ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"),
    "binary": ("Accuracy", "F1_score", "Precision", "Recall"),
}

# Variants of the ablation tables: configs/ablations.py's, plus `ca`, the "w/o FD" column of
# Table 7 (cross-modal attention without decoupling, no GD, no DM), which Table 6 has no row for.
# variant -> (arch, use_fd, use_ca, use_gd, use_dm)
VARIANTS = dict(ablations.VARIANTS, ca=("dhmd", False, True, False, False))


class GridError(Exception):
  """A grid that cannot go on; the message is one line (exit status 1)."""


class UsageError(cli.UsageError):
  """A mistake on the command line; the message is one line (exit status 2)."""


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Run:
  """One program to train, in `<grid workdir>/<name>`.

  rows: the table rows it yields: one, or, with `loss_weights`, one per value.
  overrides: {dotted field: value} that differ from the grid's base config (for the records).
  loss_weights: None, or {name: V values} of a loss-weight sweep trained in this one program.
  """
  name: str
  config: Any
  rows: tuple
  overrides: dict
  loss_weights: Optional[dict] = None


@dataclasses.dataclass
class Table:
  """One table of the report: `rows` (row names), compared with `reference` on `metrics`.

  columns: {metric key: column header} for the Markdown (default: the keys themselves).
  label: the header of the row names' column.
  """
  title: str
  rows: list
  reference: str
  metrics: list
  columns: Optional[dict] = None
  note: str = ""
  label: str = "variant"


def variant_config(base, variant):
  """A copy of `base` with the component switches of `variant` (see `VARIANTS`)."""
  config = ml_collections.ConfigDict(base.to_dict())
  for name, value in variant_overrides(variant).items():
    validation.set_field(config, name, value)
  return config


def variant_overrides(variant):
  arch, use_fd, use_ca, use_gd, use_dm = VARIANTS[variant]
  return {"model.arch": arch, "model.use_fd": use_fd, "model.use_ca": use_ca,
          "model.use_gd": use_gd, "model.use_dm": use_dm}


def components(variant):
  """"FD CA GD DM" marks of a variant, e.g. "FD+CA+GD" or "MulT+GD"."""
  arch, *switches = VARIANTS[variant]
  names = [n for n, on in zip(("FD", "CA", "GD", "DM"), switches) if on]
  if arch == "mult":
    names = ["MulT"] + [n for n in names if n not in ("FD", "CA")]
  return "+".join(names) or "none"


def pick_variants(text, default, reference):
  """The variants of `--variants` (comma list; default `default`), checked; the reference must
  be one of them."""
  variants = [v.strip() for v in text.split(",") if v.strip()] if text else list(default)
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise UsageError(f"unknown variant {unknown[0]!r} in --variants; choose from "
                     f"{', '.join(VARIANTS)} (configs/ablations.py; 'ca' = CA only)")
  if len(set(variants)) != len(variants):
    raise UsageError(f"--variants names a variant twice: {text}")
  if reference not in VARIANTS:
    raise UsageError(f"unknown --reference {reference!r}; choose from {', '.join(VARIANTS)}")
  if reference not in variants:
    raise UsageError(f"the reference variant {reference!r} is not in --variants "
                     f"({', '.join(variants)}); add it or pass --reference=<one of them>")
  return variants


def pick_metrics(text, family, default=None):
  default = list(default or TABLE_METRICS[family])
  if not text:
    return default
  metrics = [m.strip() for m in text.split(",") if m.strip()]
  known = _family_metrics(family)
  unknown = [m for m in metrics if m not in known]
  if unknown:
    raise UsageError(f"unknown metric {unknown[0]!r} in --metrics for {family} data; choose "
                     f"from {', '.join(known)}")
  return metrics


def _family_metrics(family):
  return list(metrics_lib.REPORTED[family])


def metric_family(config):
  return metrics_lib.metric_family(metrics_lib.metrics_dataset(config), config.dataset.task)


# ----------------------------------------------------------------------------- records


def _json_normal(value):
  """As JSON stores it (tuples as lists)."""
  return json.loads(json.dumps(value))


def read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as error:
    raise GridError(f"cannot read {path} ({error}); the grid writes it and it should not be "
                    f"edited: move the folder away to start it over") from None


def write_json(path, data):
  reporting.write_json(path, data)


def _run_record(run):
  """What run.json holds: how the grid planned the run (the grid's kind is in grid.json, so
  a run may be moved between grids that plan it alike)."""
  return _json_normal({"run": run.name, "rows": list(run.rows),
                       "overrides": run.overrides,
                       "loss_weights": None if run.loss_weights is None else
                       {k: [float(v) for v in vals] for k, vals in run.loss_weights.items()}})


def _expected_weights(run):
  """The per-run loss weights a finished sweep's results.json holds (float32, value-major)."""
  if run.loss_weights is None:
    return None
  from dhmd_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  _, weights, _ = train_lib.sweep_runs([int(s) for s in run.config.train.seeds], run.loss_weights)
  return {k: [float(x) for x in v] for k, v in weights.items()}


def check_workdir(workdir, kind, base_config, runs):
  """Refuses a workdir holding another grid or a differently planned run; returns the record
  to write as grid.json."""
  from dhmd_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  record = {"grid": kind, "fingerprint": train_lib.config_fingerprint(base_config)}
  stored = read_json(os.path.join(workdir, GRID_FILE))
  if stored is not None:
    if stored.get("grid") != kind:
      raise GridError(f"{workdir} holds a {stored.get('grid')} grid, not {kind}: use another "
                      f"--workdir")
    conflicts = train_lib.config_conflicts(stored.get("fingerprint", {}), record["fingerprint"])
    if conflicts:
      field, old, new = conflicts[0]
      more = f" (and {len(conflicts) - 1} more fields)" if len(conflicts) > 1 else ""
      raise GridError(f"{workdir} holds a {kind} grid of another config: {field}={old!r} there, "
                      f"{new!r} here{more}; use another --workdir, or the same config")
  elif os.path.exists(os.path.join(workdir, "config.json")):
    raise GridError(f"{workdir} holds a training run (config.json), not a grid: use another "
                    f"--workdir")
  for run in runs:
    stored_run = read_json(os.path.join(workdir, run.name, RUN_FILE))
    if stored_run is not None and stored_run != _run_record(run):
      raise GridError(f"{os.path.join(workdir, run.name)} holds a run planned as "
                      f"{_describe_run(stored_run)}, this grid plans "
                      f"{_describe_run(_run_record(run))}; use another --workdir, or the same "
                      f"plan")
  return record


def _describe_run(record):
  if record.get("loss_weights"):
    return ", ".join(f"{k}={v}" for k, v in record["loss_weights"].items())
  return ", ".join(f"{k}={v}" for k, v in record.get("overrides", {}).items()) or "the base config"


def finished(workdir, run):
  """The run's results.json when it is finished with the config the grid would run, else None."""
  results = read_json(os.path.join(workdir, "results.json"))
  if results is None:
    return None
  stored = read_json(os.path.join(workdir, "config.json"))
  if stored != _json_normal(run.config.to_dict()):
    return None
  if results.get("loss_weights") != _expected_weights(run):
    return None
  return results


# ----------------------------------------------------------------------------- running


def _scale(metric):
  return 1.0 if metric in metrics_lib.RAW_METRICS else 100.0


def _headline(results, family, split):
  name = metrics_lib.HEADLINE[family]
  values = results.get(split, {}).get(name)
  if not values:
    return ""
  s = stats.summarize([np.nan if v is None else _scale(name) * v for v in values])
  return f"{split} {name} {s.mean:.2f} ± {s.std:.2f}" if s.n > 1 else f"{split} {name} {s.mean:.2f}"


def _train(run, workdir):  # the one call that trains: tests count it
  """Trains (or resumes) one run, its output appended to <workdir>/train.log."""
  from dhmd_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOG_FILE), "a") as log, \
      contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    if run.loss_weights is None:
      return train_lib.train_and_evaluate(run.config, workdir)
    return train_lib.train_and_evaluate(run.config, workdir, loss_weights=run.loss_weights)


def reuse_runs(workdir, runs, sources):
  """Copies into `workdir` the runs it lacks that another grid's workdir holds finished, with
  the same config and plan (e.g. table7's variants after table6); returns {run name: source}."""
  copied = {}
  for run in runs:
    target = os.path.join(workdir, run.name)
    if os.path.exists(target):
      continue
    for source in sources:
      candidate = os.path.join(source, run.name)
      if os.path.abspath(candidate) == os.path.abspath(target):
        continue
      plan = read_json(os.path.join(candidate, RUN_FILE))
      if finished(candidate, run) is not None and plan in (None, _run_record(run)):
        shutil.copytree(candidate, target)
        copied[run.name] = source
        break
  return copied


def _train_named(run, run_dir):
  """_train, its one-line errors naming the run and its log."""
  # pylint: disable=g-import-not-at-top
  from dhmd_jax import checkpoint
  from dhmd_jax import data as data_lib
  from dhmd_jax import train as train_lib
  try:
    return _train(run, run_dir)
  except (train_lib.TrainingError, data_lib.DataError, checkpoint.CheckpointError) as error:
    raise GridError(f"run {run.name}: {error} (its log: {os.path.join(run_dir, LOG_FILE)})"
                    ) from None


def run_grid(kind, base_config, workdir, runs, *, after_run=None, reuse=(), report=None,
             devices_per_run=0, shard=None):
  """Trains the runs not finished yet; returns {run name: (results, status, seconds)}, or, with
  `report`, what `report(that outcome)` returns (written while the grid holds its workdir).

  after_run(run, run_workdir, results) -> str: extra work on a run's results (table7's head
  metrics): what it did ("" when nothing was needed), counted in the run's time. Its
  `pending(run, run_workdir, results)`, when it has one (table7's `HeadMetrics`), says whether
  work is left on a finished run (without it: always; a shard then never sees the grid done);
  worker processes are handed it pickled, so it must be defined at a module's top level.
  reuse: other grids' workdirs whose finished runs are copied instead of trained again.
  devices_per_run: devices each run gets (`Placement`); 0 picks (config.train.num_devices, or 1).
  shard: None, or (index, count): train only runs index, index + count, ... (`run_shard`).

  Each run is trained holding its own workdir's lock, after checking again that it is not
  finished; a run another process holds is waited for after the other runs, so no run is
  trained twice by grids, shards or restarts sharing a workdir. Without `shard` the grid also
  holds its own workdir meanwhile: a second plain grid on it stops at once (`workdir.Busy`).
  """
  if shard is not None:
    return run_shard(kind, base_config, workdir, runs, shard, after_run=after_run, reuse=reuse,
                     report=report, devices_per_run=devices_per_run)
  record = check_workdir(workdir, kind, base_config, runs)
  _make_workdir(workdir)
  with workdir_lib.hold(workdir, f"a {kind} grid", wait_for=_is_short_hold):
    write_json(os.path.join(workdir, GRID_FILE), record)
    copied = reuse_runs(workdir, runs, reuse)
    outcome = train_runs(kind, base_config, workdir, runs, after_run=after_run, copied=copied,
                         devices_per_run=devices_per_run)
    return outcome if report is None else report(outcome)


def _make_workdir(workdir):
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise GridError(f"cannot create the workdir {workdir} ({error.strerror or error}); choose "
                    f"a writable --workdir") from None


# What a shard's short holds of the grid's workdir say they are: the other shards (and a plain
# grid starting) wait for them; a plain grid's hold lasts the whole grid and is not waited for.
SHORT_HOLD = "shard "


def _is_short_hold(holder):
  return bool(holder) and str(holder.get("what", "")).startswith(SHORT_HOLD)


def run_shard(kind, base_config, workdir, runs, shard, *, after_run=None, reuse=(), report=None,
              devices_per_run=0):
  """One shard of a grid shared by several processes (hosts, a SLURM job array): trains runs
  index, index + count, ... of `runs` (shard = (index, count)); the grid's workdir is held only
  for moments (checking and recording the grid, copying `reuse` runs, writing the report).

  Returns as `run_grid` when every run of the grid is finished after this shard's work (the
  last shard to finish writes the report); else a line saying how far the grid is.
  """
  index, count = shard
  name = f"{SHORT_HOLD}{index + 1} of {count} of a {kind} grid"
  _make_workdir(workdir)
  # While a plain grid holds the workdir for its whole run, a shard goes on beside it: that
  # grid wrote grid.json and copies, and it writes the report; the run locks keep them apart.
  with workdir_lib.reading(workdir, f"{name}, checking the grid",
                           wait_for=_is_short_hold) as plain:
    record = check_workdir(workdir, kind, base_config, runs)
    copied = {}
    if plain is None:
      write_json(os.path.join(workdir, GRID_FILE), record)
      copied = reuse_runs(workdir, runs, reuse)
  share = runs[index::count]
  _LOG.info("%s: runs %s of %d", name.split(" of a ")[0],
            ", ".join(run.name for run in share) or "none", len(runs))
  outcome = train_runs(kind, base_config, workdir, share, after_run=after_run, copied=copied,
                       devices_per_run=devices_per_run)
  with workdir_lib.reading(workdir, f"{name}, writing the results",
                           wait_for=_is_short_hold) as plain:
    for run in runs:
      if run.name not in outcome:
        run_dir = os.path.join(workdir, run.name)
        outcome[run.name] = (_done(run, run_dir, after_run), "skipped", 0.0)
    open_runs = [run.name for run in runs if outcome[run.name][0] is None]
    where = os.path.join(workdir, "results.md")
    if plain is not None:
      return (f"{name}: done; the grid command holding {workdir} "
              f"({workdir_lib.describe(plain)}) writes {where}")
    if open_runs:
      return (f"{name}: done; {len(runs) - len(open_runs)} of {len(runs)} runs of the grid "
              f"are finished ({', '.join(open_runs)} not yet): the shard that finishes last "
              f"writes {where} (or rerun the command without --shard_index/--num_shards)")
    ordered = {run.name: outcome[run.name] for run in runs}
    return ordered if report is None else report(ordered)


def _pending(after_run, run, run_dir, results):
  """Whether `after_run` has work left on a finished run (unknown: yes; it says when not)."""
  if after_run is None:
    return False
  pending = getattr(after_run, "pending", None)
  return True if pending is None else pending(run, run_dir, results)


def _done(run, run_dir, after_run):
  """The run's results when it is finished and its after_run work done, else None."""
  results = finished(run_dir, run)
  if results is None or _pending(after_run, run, run_dir, results):
    return None
  return results


def _always(holder):
  del holder
  return True


def claim(kind, run, run_dir, after_run=None, *, wait=False):
  """Trains `run` in `run_dir` unless it is finished, then `after_run`, holding the run's
  workdir; returns (results, {"status": "trained" | "finished", "extra": what after_run did}),
  or (None, {"status": "busy", "holder": ...}) when another process holds it and not `wait`.

  The finished-check is made again under the lock: a run finished by another process meanwhile
  is not trained again (the trainer would only resume it and report it anew).
  """
  with workdir_lib.writing(run_dir):
    os.makedirs(run_dir, exist_ok=True)
  try:
    with workdir_lib.hold(run_dir, f"run {run.name} of a {kind} grid",
                          wait_for=_always if wait else None):
      results = finished(run_dir, run)
      trained = results is None
      if trained:
        _write_json_dir(run_dir, RUN_FILE, _run_record(run))
        results = _train_named(run, run_dir)
      extra = after_run(run, run_dir, results) if after_run is not None else ""
  except workdir_lib.Busy as busy:
    return None, {"status": "busy", "holder": workdir_lib.describe(busy.holder)}
  return results, {"status": "trained" if trained else "finished", "extra": extra or ""}


def train_runs(kind, base_config, workdir, runs, *, after_run=None, copied=None,
               devices_per_run=0):
  """Trains or waits for each of `runs` not finished, printing a line per run; returns {run
  name: (results, "trained" | "skipped", seconds)}. Runs go one after another in this process,
  or side by side in worker processes on disjoint groups of devices (`Placement`)."""
  copied = copied or {}
  family = metric_family(base_config)
  seeds = len(base_config.train.seeds)
  start = time.time()
  todo = collections.deque()
  outcome, ready = {}, []
  for run in runs:
    run_dir = os.path.join(workdir, run.name)
    results = finished(run_dir, run)
    if results is not None and not _pending(after_run, run, run_dir, results):
      ready.append((run, results))
    else:
      todo.append((run, False))
  placement = Placement.choose(base_config, devices_per_run, len(todo)) if todo else None
  _LOG.info("%s: %d runs (%d to train, %d seeds each) in %s; each run's log: %s%s", kind,
            len(runs), len(todo), seeds, workdir, os.path.join(workdir, "<run>", LOG_FILE),
            f"; {placement.describe()}" if placement is not None else "")
  # ETA: seconds per table row of the runs trained so far, times the rows still to train (a
  # loss-weight sweep's one program trains all its values' rows), over the runs side by side.
  per_row = []
  left = sum(len(run.rows) for run, _ in todo if finished(os.path.join(workdir, run.name), run)
             is None)
  side_by_side = 1 if placement is None else placement.slots

  def record(run, results, info, seconds, where=""):
    nonlocal left
    trained = info["status"] == "trained"
    extra = info.get("extra", "")
    if trained:
      left -= len(run.rows)
      per_row.append(seconds / len(run.rows))
      status = f"trained in {reporting.format_duration(seconds)}{where}"
    else:
      status = ("finished by another process meanwhile, skipped" if info.get("waited") else
                f"copied from {copied[run.name]} (finished there)" if run.name in copied else
                "finished earlier, skipped") + (
          f" (then {extra} in {reporting.format_duration(seconds)}{where})" if extra else "")
    outcome[run.name] = (results, "trained" if trained else "skipped", seconds)
    eta = np.mean(per_row) * left / side_by_side if per_row else (0.0 if not left else None)
    what = (_headline(results, family, "test") if len(run.rows) == 1 else
            f"{len(run.rows)} values x {seeds} seeds in one program")
    _LOG.info("[%d/%d] %s: %s%s | grid %s, ETA %s", len(outcome), len(runs), run.name, status,
              f" | {what}" if what else "", reporting.format_duration(time.time() - start),
              reporting.format_duration(eta))

  def deferred(run, info):
    _LOG.info("%s: held by %s; waited for after the other runs", run.name, info["holder"])
    todo.append((run, True))

  for run, results in ready:
    record(run, results, {"status": "finished"}, 0.0)
  if placement is None or placement.in_process:
    while todo:
      run, wait = todo.popleft()
      t0 = time.time()
      results, info = claim(kind, run, os.path.join(workdir, run.name), after_run, wait=wait)
      if info["status"] == "busy":
        deferred(run, info)
        continue
      info["waited"] = wait and info["status"] == "finished"
      record(run, results, info, time.time() - t0)
  else:
    placement.run(kind, workdir, todo, after_run, record=record, deferred=deferred)
  return {run.name: outcome[run.name] for run in runs if run.name in outcome}


# ----------------------------------------------------------------------------- devices

# Lists the devices of a fresh process (the grid's own process does not start JAX's backend for
# this: on a GPU that would take memory on every device).
_PROBE = ("import json, jax\n"
          "devices = jax.local_devices()\n"
          "print(json.dumps({'platform': devices[0].platform,\n"
          "                  'version': str(getattr(devices[0].client, 'platform_version', '')),\n"
          "                  'ids': [getattr(d, 'local_hardware_id', None) for d in devices]}))\n")


def local_devices():
  """{"platform": "cpu" | "gpu" | ..., "version": ..., "ids": [hardware id per device]} of this
  machine, as a process started like this one sees them."""
  xla_bridge = sys.modules.get("jax._src.xla_bridge")
  if xla_bridge is not None and getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.local_devices()
    return {"platform": devices[0].platform,
            "version": str(getattr(devices[0].client, "platform_version", "")),
            "ids": [getattr(d, "local_hardware_id", None) for d in devices]}
  try:
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=600, check=False)
  except (OSError, subprocess.TimeoutExpired) as error:
    raise GridError(f"cannot list this machine's devices ({error}); pass "
                    f"--devices_per_run=<all of them> to train in this process") from None
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise GridError(f"cannot list this machine's devices: JAX said {last!r}")
  return json.loads(lines[-1])


def devices_per_run_of(base_config, devices_per_run):
  """The devices a run gets for --devices_per_run (0: config.train.num_devices, or 1); raises
  UsageError (one line) for a number no run of this config can use."""
  if devices_per_run < 0:
    raise UsageError(f"--devices_per_run={devices_per_run}: give a number of devices (0: "
                     f"config.train.num_devices, or 1)")
  wanted = int(base_config.train.num_devices)
  per_run = devices_per_run or wanted or 1
  if wanted and wanted != per_run:
    raise UsageError(f"--devices_per_run={per_run} but config.train.num_devices={wanted}: a "
                     f"run trains on the devices it gets; set one of them, or both alike")
  for field in ("batch_size", "eval_batch_size"):
    size = int(base_config.train[field])
    if size % per_run:
      raise UsageError(f"config.train.{field} = {size} is not divisible by the {per_run} "
                       f"devices of a run (--devices_per_run); choose a multiple of {per_run}")
  return per_run


@dataclasses.dataclass
class Placement:
  """Where a grid's runs train: `groups` of `per_run` devices each (indices into the machine's
  devices); one group of all of them is this process (`in_process`), several are worker
  processes (`dhmd_jax.experiments.worker`), one run per group at a time, each process seeing
  only its group's devices (CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES on GPUs, a CPU platform
  of `per_run` devices on the CPU), so each run's mesh (`config.train.num_devices`) is its
  group.
  """
  platform: str
  per_run: int
  groups: list
  in_process: bool
  devices: dict

  @property
  def slots(self):
    return len(self.groups)

  @classmethod
  def choose(cls, base_config, devices_per_run, num_runs):
    """The placement of `num_runs` runs for --devices_per_run (0: config.train.num_devices, or
    1 device per run); raises UsageError (one line) for a placement this machine cannot give."""
    per_run = devices_per_run_of(base_config, devices_per_run)
    devices = local_devices()
    total = len(devices["ids"])
    if per_run > total:
      raise UsageError(f"--devices_per_run={per_run}, but this machine has {total} "
                       f"{devices['platform']} device(s); pass at most {total}")
    count = min(total // per_run, max(num_runs, 1))
    groups = [list(range(i * per_run, (i + 1) * per_run)) for i in range(count)]
    in_process = per_run == total
    if not in_process and devices["platform"] not in ("cpu", "gpu", "cuda", "rocm"):
      raise UsageError(f"runs side by side on separate devices work on GPUs and CPUs, not on "
                       f"{devices['platform']}; pass --devices_per_run={total} (each run on "
                       f"all devices, one after another)")
    return cls(platform=devices["platform"], per_run=per_run, groups=groups,
               in_process=in_process, devices=devices)

  def describe(self):
    if self.in_process:
      return f"one run at a time on all {self.per_run} {self.platform} device(s)"
    return (f"{self.slots} run(s) side by side, each on {self.per_run} {self.platform} "
            f"device(s) in its own process")

  def environment(self, group):
    """The worker's environment: only `group`'s devices visible."""
    env = dict(os.environ)
    if self.platform == "cpu":
      flags_text = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                          env.get("XLA_FLAGS", ""))
      env["XLA_FLAGS"] = (flags_text + f" --xla_force_host_platform_device_count="
                                       f"{len(group)}").strip()
      env["JAX_NUM_CPU_DEVICES"] = str(len(group))
      return env
    rocm = "rocm" in self.devices["version"].lower() or self.platform == "rocm"
    name = "ROCR_VISIBLE_DEVICES" if rocm else "CUDA_VISIBLE_DEVICES"
    visible = [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]
    ids = self.devices["ids"]
    physical = [ids[i] if ids[i] is not None else i for i in group]
    env[name] = ",".join(visible[p] if p < len(visible) else str(p) for p in physical)
    env.pop("JAX_CUDA_VISIBLE_DEVICES", None)  # JAX's own filter: the variable above is it now
    return env

  def run(self, kind, workdir, todo, after_run, *, record, deferred):
    """Trains the runs of `todo` ((run, wait) pairs, more may be added by `deferred`) in worker
    processes, at most one per group at a time. Ctrl-C stops them all at a safe point (a second
    one at once); a failed run starts no new ones, the running ones finish, then it is raised."""
    from dhmd_jax import train as train_lib  # pylint: disable=g-import-not-at-top
    done = queue.Queue()
    free = list(self.groups)
    running = {}  # pid -> Popen
    stop = {"interrupts": 0, "error": None}

    def interrupt(signum, frame):
      del signum, frame
      stop["interrupts"] += 1
      for proc in list(running.values()):
        with contextlib.suppress(OSError):
          proc.send_signal(signal.SIGINT)  # the trainer stops at a safe point; twice: at once

    def launch(run, wait, group):
      run_dir = os.path.abspath(os.path.join(workdir, run.name))
      with workdir_lib.writing(run_dir):
        os.makedirs(run_dir, exist_ok=True)
        log = open(os.path.join(run_dir, LOG_FILE), "ab")  # pylint: disable=consider-using-with
      # A model plugged in by replacing train.build (tests' fake model) is used there too.
      build = train_lib.build
      job = {"kind": kind, "run": run, "run_dir": run_dir, "after_run": after_run, "wait": wait,
             "build": None if getattr(build, "__module__", "") == train_lib.__name__ else build}
      try:
        payload = pickle.dumps({"sys_path": [os.path.abspath(p) for p in sys.path],
                                "job": pickle.dumps(job)})
      except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise GridError(f"run {run.name} cannot be handed to a worker process ({error}); "
                        f"pass --devices_per_run={len(self.devices['ids'])} to train in this "
                        f"process") from None
      # Its own session: a Ctrl-C at the terminal reaches the grid, which passes it on once.
      proc = subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, "-m", "dhmd_jax.experiments.worker"], stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, stderr=log, env=self.environment(group),
          start_new_session=True)
      log.close()
      running[proc.pid] = proc
      t0 = time.time()

      def wait_for_it():
        out, _ = proc.communicate(payload)
        done.put((run, wait, group, proc, out, time.time() - t0))
      threading.Thread(target=wait_for_it, daemon=True).start()

    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupt) if on_main else None
    try:
      while todo or running:
        while todo and free and not stop["interrupts"] and stop["error"] is None:
          run, wait = todo.popleft()
          launch(run, wait, free.pop(0))
        if not running:
          break
        try:
          run, wait, group, proc, out, seconds = done.get(timeout=1.0)
        except queue.Empty:
          continue
        running.pop(proc.pid, None)
        free.append(group)
        free.sort()
        log = os.path.join(workdir, run.name, LOG_FILE)
        lines = out.decode("utf-8", "replace").strip().splitlines()
        info = json.loads(lines[-1]) if lines else {
            "status": "failed", "error": f"its process ended with status {proc.returncode} "
                                         f"without a word"}
        if info["status"] == "busy":
          deferred(run, info)
        elif info["status"] in ("trained", "finished"):
          results = finished(os.path.join(workdir, run.name), run)
          if results is None:
            info = {"status": "failed", "error": "its process ended without its results.json"}
          else:
            info["waited"] = wait and info["status"] == "finished"
            where = f" on {self.platform} device(s) {','.join(map(str, group))}"
            record(run, results, info, seconds, where)
        if info["status"] == "interrupted":
          stop["interrupts"] = max(stop["interrupts"], 1)
        elif info["status"] == "failed" and stop["error"] is None:
          stop["error"] = (info["error"] if info["error"].startswith(f"run {run.name}: ") else
                           f"run {run.name}: {info['error']} (its log: {log})")
          if running:
            _LOG.info("%s; no new run starts, the %d running one(s) finish", stop["error"],
                      len(running))
    finally:
      if on_main:
        signal.signal(signal.SIGINT, previous)
    if stop["interrupts"]:
      raise KeyboardInterrupt
    if stop["error"] is not None:
      raise GridError(stop["error"])


def _write_json_dir(folder, name, data):
  os.makedirs(folder, exist_ok=True)
  write_json(os.path.join(folder, name), data)


# ----------------------------------------------------------------------------- tables


def row_values(run, results, split):
  """{row: {metric: [per-seed values]}} of one run's results (a sweep run: one row per value)."""
  per_run = results[split]
  if run.loss_weights is None:
    return {run.rows[0]: {k: list(v) for k, v in per_run.items()}}
  seeds = len(run.config.train.seeds)
  rows = {}
  for i, row in enumerate(run.rows):
    part = slice(i * seeds, (i + 1) * seeds)
    for name, values in run.loss_weights.items():  # value-major, as train.sweep_runs lays out
      held = set(results["loss_weights"][name][part])
      if held != {float(np.float32(values[i]))}:
        raise GridError(f"results of {run.name} hold {name}={sorted(held)} where the grid "
                        f"expects {values[i]}; move the folder away to train it again")
    rows[row] = {k: list(v[part]) for k, v in per_run.items()}
  return rows


def _nan(values):
  return [np.nan if v is None else float(v) for v in values]


def table_rows(table, per_seed, *, lower_is_better=None):
  """stats.comparison_rows for one Table (values scaled to percent where they are fractions)."""
  data = {row: {m: [_scale(m.split(" ")[-1]) * v for v in _nan(per_seed[row][m])]
                for m in table.metrics} for row in table.rows}
  lower = set(stats.LOWER_IS_BETTER) | set(lower_is_better or ())
  decimals = {m: 4 if m.split(" ")[-1] in metrics_lib.RAW_METRICS else 2 for m in table.metrics}
  return stats.comparison_rows(data, table.reference, metrics=table.metrics,
                               lower_is_better=lower, decimals=decimals)


def write_report(workdir, *, kind, base_config, runs, tables, outcome, per_seed, split,
                 legend="", lower_is_better=None, start_time=None, extra=None):
  """results.json, results.csv and results.md at the grid's root; returns the Markdown."""
  all_rows, blocks = [], []
  for table in tables:
    rows = table_rows(table, per_seed, lower_is_better=lower_is_better)
    all_rows.extend(rows)
    shown = [dict(r, metric=(table.columns or {}).get(r["metric"], r["metric"])) for r in rows]
    blocks.append((table, rows, stats.markdown_table(shown, layout="wide",
                                                     reference=table.reference,
                                                     label=table.label)))
  synthetic = base_config.dataset.name == "synthetic"
  seeds = [int(s) for s in base_config.train.seeds]
  trained = sum(1 for _, status, _ in outcome.values() if status == "trained")
  wall = time.time() - start_time if start_time else None
  title = f"# {kind}: {base_config.dataset.name}" + (
      f" (synthetic data shaped like {base_config.dataset.synthetic.like}: the numbers show "
      f"the pipeline, not the paper's datasets)" if synthetic else "")
  lines = [title, "",
           f"{split} split, the model of each seed selected on validation; seeds "
           f"{', '.join(map(str, seeds))} (n = {len(seeds)}), at most "
           f"{base_config.train.num_epochs} epoch(s). Accuracies and F1 in %, MAE and Corr raw. "
           f"Each cell: mean ± std over seeds, and below the reference row the paired "
           f"difference from it (see under each table).", ""]
  if legend:
    lines += [legend, ""]
  for table, _, markdown in blocks:
    lines += [f"## {table.title}", ""]
    if table.note:
      lines += [table.note, ""]
    lines += [markdown.rstrip("\n"), ""]
  lines.append(f"Runs: {len(runs)} ({trained} trained by this command, "
               f"{len(runs) - trained} finished earlier)"
               + (f"; this command's wall time {reporting.format_duration(wall)}." if wall
                  else "."))
  markdown = "\n".join(lines) + "\n"
  report = {
      "grid": kind, "dataset": base_config.dataset.name, "synthetic": synthetic, "split": split,
      "seeds": seeds, "reference": {t.title: t.reference for t in tables},
      "runs": [{"name": r.name, "workdir": r.name, "rows": list(r.rows),
                "overrides": r.overrides, "loss_weights": r.loss_weights,
                "status": outcome[r.name][1], "seconds": outcome[r.name][2]} for r in runs],
      "tables": [{"title": t.title, "reference": t.reference, "metrics": t.metrics,
                  "rows": rows} for t, rows, _ in blocks],
      "per_seed": per_seed, "wall_time_s": wall, **(extra or {}),
  }
  write_json(os.path.join(workdir, RESULTS_JSON), report)
  stats.write_csv(all_rows, os.path.join(workdir, "results.csv"))
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown)
  return markdown


RESULTS_JSON = "results.json"


# ----------------------------------------------------------------------------- command line

# Config fields a grid's --help shows (--helpfull: all); the variants set the model's switches.
COMMON_FIELDS = ("dataset.name", "dataset.path", "dataset.format", "dataset.cache_dir",
                 "train.seeds", "train.num_epochs", "train.batch_size", "train.learning_rate")


def flag_values():
  """New absl flags with what every grid command has; the command adds its own. Each call gets
  its own: a command may run more than once in one process (as the tests run them)."""
  values = flags.FlagValues()
  cli.define_config(DEFAULT_CONFIG, flag_values=values)
  flags.DEFINE_string("workdir", "", "The grid's folder (empty: runs/<command>).",
                      flag_values=values)
  flags.DEFINE_enum("split", "test", ["test", "valid"],
                    "Split of the tables (the model is always selected on valid).",
                    flag_values=values)
  flags.DEFINE_string("metrics", "", "Comma list of metrics for the tables.", flag_values=values)
  flags.DEFINE_string("reuse", "", "Comma list of other grids' workdirs: a run this grid plans "
                      "alike that finished there is copied instead of trained again.",
                      flag_values=values)
  flags.DEFINE_integer("devices_per_run", 0, "Devices each run gets: runs train side by side, "
                       "each in its own process on its own group of that many devices (0: "
                       "config.train.num_devices, or 1; all of them: one run at a time in this "
                       "process).", flag_values=values)
  flags.DEFINE_integer("shard_index", None, "This process trains only runs shard_index, "
                       "shard_index + num_shards, ... of the grid (default: "
                       "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN in a SLURM job array); the "
                       "last shard to finish writes the results.", flag_values=values)
  flags.DEFINE_integer("num_shards", None, "How many processes share the grid's workdir "
                       "(default: SLURM_ARRAY_TASK_COUNT in a SLURM job array).",
                       flag_values=values)
  return values


def shard_of(args, environ=None):
  """(index, count) of --shard_index/--num_shards, else of a SLURM job array's variables
  (`SLURM_ARRAY_TASK_ID` from `SLURM_ARRAY_TASK_MIN` in steps of `SLURM_ARRAY_TASK_STEP`, of
  `SLURM_ARRAY_TASK_COUNT`), else None; a value no shard can have is a UsageError (one line)."""
  environ = os.environ if environ is None else environ
  index, count = args.shard_index, args.num_shards
  if index is None and count is None:
    if "SLURM_ARRAY_TASK_ID" not in environ:
      return None
    if "SLURM_ARRAY_TASK_COUNT" not in environ:
      raise UsageError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass "
                       "--shard_index=I --num_shards=N")
    values = {}
    for name, default in (("SLURM_ARRAY_TASK_ID", None), ("SLURM_ARRAY_TASK_COUNT", None),
                          ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_STEP", "1")):
      text = environ.get(name, default)
      try:
        values[name] = int(text)
      except ValueError:
        raise UsageError(f"{name}={text!r} is not an integer; pass --shard_index=I "
                         f"--num_shards=N") from None
    offset = values["SLURM_ARRAY_TASK_ID"] - values["SLURM_ARRAY_TASK_MIN"]
    step = max(values["SLURM_ARRAY_TASK_STEP"], 1)
    index, count = offset // step, values["SLURM_ARRAY_TASK_COUNT"]
    if offset % step or not 0 <= index < count:
      raise UsageError(
          f"SLURM_ARRAY_TASK_ID={values['SLURM_ARRAY_TASK_ID']} is not one of "
          f"{count} evenly spaced ids from SLURM_ARRAY_TASK_MIN="
          f"{values['SLURM_ARRAY_TASK_MIN']}: submit the array as --array=0-{count - 1}, or "
          f"pass --shard_index=I --num_shards=N")
    return index, count
  if index is None or count is None:
    given, missing = ("shard_index", "num_shards") if count is None else ("num_shards",
                                                                          "shard_index")
    raise UsageError(f"--{given} needs --{missing} too (--shard_index=I --num_shards=N, "
                     f"I from 0 to N-1)")
  if count < 1:
    raise UsageError(f"--num_shards={count}: there must be at least one shard")
  if not 0 <= index < count:
    raise UsageError(f"--shard_index={index} is not between 0 and {count - 1} "
                     f"(--num_shards={count}); shards are numbered from 0")
  return index, count


def placement_options(args):
  """run_grid's devices_per_run and shard from the command line (checked: UsageError)."""
  devices_per_run_of(args.config, args.devices_per_run)
  return {"devices_per_run": args.devices_per_run, "shard": shard_of(args)}


def run_command(kind, summary, values, make_report, argv=None):
  """Runs a grid command (`cli.run`): parses `argv` into `values`, prints `make_report()` (the
  report's Markdown) and returns the exit status; every failure is one line."""
  command = cli.Command(
      prog=f"python -m dhmd_jax.experiments.{kind}", summary=summary,
      placeholders={"workdir": "DIR", "metrics": "LIST", "reuse": "DIRS", "devices_per_run": "K",
                    "shard_index": "I", "num_shards": "N"},
      common_fields=COMMON_FIELDS, interrupted="interrupted; rerun the same command to resume",
      failures=(GridError,))
  return cli.run(command, lambda _: print(make_report(), flush=True), argv, flag_values=values)


def reuse_dirs(args):
  dirs = [d.strip() for d in args.reuse.split(",") if d.strip()]
  missing = [d for d in dirs if not os.path.isdir(d)]
  if missing:
    raise UsageError(f"--reuse: {missing[0]} is not a folder (give grid workdirs, e.g. "
                     f"--reuse=runs/table6)")
  return dirs


def validate(config, where):
  """The trainer's config check, before any run starts (one line naming the run)."""
  try:
    validation.validate(config)
  except validation.ConfigError as error:
    raise UsageError(f"{where}: {error}") from None


# ----------------------------------------------------------------------------- variant grids


def collect(runs, outcome, split):
  """{row: {metric: [per-seed values]}} of every run's results."""
  per_seed = {}
  for run in runs:
    per_seed.update(row_values(run, outcome[run.name][0], split))
  return per_seed


def legend(variants):
  """Markdown: which components each variant has."""
  lines = ["| variant | components | FD | CA | GD | DM |", "|---|---|---|---|---|---|"]
  for v in variants:
    arch, *switches = VARIANTS[v]
    marks = ["✓" if on and not (arch == "mult" and n == "FD") else "✗"
             for n, on in zip(("FD", "CA", "GD", "DM"), switches)]
    lines.append(f"| {v} | {components(v)} | " + " | ".join(marks) + " |")
  return "\n".join(lines)


def variant_runs(base, variants):
  return [Run(name=v, config=variant_config(base, v), rows=(v,), overrides=variant_overrides(v))
          for v in variants]


def add_variant_flags(values, default_variants, reference):
  flags.DEFINE_string("variants", "", f"Comma list of variants (empty: "
                      f"{','.join(default_variants)}); any of {', '.join(VARIANTS)}.",
                      flag_values=values)
  flags.DEFINE_string("reference", reference, "The row the others are compared with.",
                      flag_values=values)


def variant_grid(kind, argv, *, default_variants, reference, title, description):
  """table6 and table8: one run per variant, one table of the configured metrics."""
  values = flag_values()
  add_variant_flags(values, default_variants, reference)
  return run_command(kind, description, values, lambda: _variant_report(
      kind, values, default_variants=default_variants, title=title), argv)


def _variant_report(kind, args, *, default_variants, title):
  base = args.config
  variants = pick_variants(args.variants, default_variants, args.reference)
  family = metric_family(base)
  metrics = pick_metrics(args.metrics, family)
  runs = variant_runs(base, variants)
  for run in runs:
    validate(run.config, f"variant {run.name}")
  workdir = args.workdir or os.path.join("runs", kind)
  options = placement_options(args)
  start = time.time()
  tables = [Table(title=title, rows=variants, reference=args.reference, metrics=metrics)]
  return run_grid(kind, base, workdir, runs, reuse=reuse_dirs(args), **options,
                  report=lambda outcome: write_report(
                      workdir, kind=kind, base_config=base, runs=runs, tables=tables,
                      outcome=outcome, per_seed=collect(runs, outcome, args.split),
                      split=args.split, legend=legend(variants), start_time=start))
