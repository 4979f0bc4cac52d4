"""What a run writes for people: config.json, metrics.jsonl, TensorBoard events, the progress
bar, the one-line epoch summary, and the final report (results.json and results.md).

TensorBoard files come from tensorboardX, a light writer with no TensorFlow dependency.

Every file is written through this module, and a write that fails (a full disk, a file system
turned read-only) raises `workdir.WriteError`: one line naming the path and what to do. Whole
files are written to `<path>.tmp` and renamed, so a failed or killed write leaves the previous
version as it was.
"""

import contextlib
import csv
import json
import math
import os
import sys
import time

import numpy as np

from dhmd_jax import metrics as metrics_lib
from dhmd_jax import workdir as workdir_lib

def jsonable(value):
  """`value` with NumPy arrays and scalars as lists and Python numbers, dict keys as strings and
  NaN/inf as None: what `json` writes as strict JSON (results, logs, checkpoint host data)."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return jsonable(value.tolist())
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else None  # strict JSON: NaN -> null
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def _write_whole(path, write, newline=None):
  """Writes a file through `write(f)` into `<path>.tmp`, then renames it over `path`; raises
  WriteError (one line) when that fails, leaving `path` as it was."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w", newline=newline) as f:
      write(f)
    os.replace(tmp, path)
  except OSError as error:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise workdir_lib.write_failed(path, error) from None


def write_json(path, data):
  def write(f):
    json.dump(jsonable(data), f, indent=2, sort_keys=False)
    f.write("\n")
  _write_whole(path, write)


def write_text(path, text):
  _write_whole(path, lambda f: f.write(text))


class MetricsLog:
  """metrics.jsonl: one JSON object per epoch. On resume, records after the resumed epoch
  (written by the interrupted run after its last checkpoint) are dropped."""

  def __init__(self, path, *, resume_epoch=0):
    self.path = path
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          line = line.strip()
          if not line:
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut short by a kill
          if record.get("epoch", 0) <= resume_epoch:
            kept.append(line)
    _write_whole(path, lambda f: f.writelines(line + "\n" for line in kept))

  def write(self, record):
    # A line cut short by a full disk is dropped on resume, as one cut by a kill.
    with workdir_lib.writing(self.path), open(self.path, "a") as f:
      f.write(json.dumps(jsonable(record)) + "\n")

  def read(self):
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


class TensorBoard:
  """One event-file folder per seed under workdir/tensorboard/seed_<seed>.

  Events are written and flushed in this thread by tensorboardX's synchronous event writer, so
  that a full disk raises WriteError here. (Its SummaryWriter hands events to a thread of its
  own, which dies on a write error with a traceback and then leaves its bounded queue full: the
  run would hang at the next epoch.)"""

  def __init__(self, workdir, seeds, enabled):
    self._writers = {}  # seed -> (folder, EventsWriter)
    self._failed = False
    if not enabled:
      return
    # pylint: disable=g-import-not-at-top
    from tensorboardX.event_file_writer import EventsWriter
    for seed in seeds:
      folder = os.path.join(workdir, "tensorboard", f"seed_{seed}")
      with self._writing(folder):
        os.makedirs(folder, exist_ok=True)
        self._writers[seed] = (folder, EventsWriter(os.path.join(folder, "events")))

  @contextlib.contextmanager
  def _writing(self, folder):
    try:
      with workdir_lib.writing(folder):
        yield
    except workdir_lib.WriteError:
      self._failed = True
      raise

  def write(self, epoch, per_seed_scalars):
    """per_seed_scalars: {seed: {tag: value}}."""
    # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import scalar
    for seed, scalars in per_seed_scalars.items():
      if seed not in self._writers:
        continue
      folder, writer = self._writers[seed]
      with self._writing(folder):
        for tag, value in scalars.items():
          if value is not None and math.isfinite(float(value)):
            writer.write_event(event_pb2.Event(summary=scalar(tag, float(value)),
                                               wall_time=time.time(), step=int(epoch)))
        writer.flush()

  def close(self):
    for folder, writer in self._writers.values():
      try:
        with self._writing(folder):
          writer.close()
      except workdir_lib.WriteError:
        if not self._failed:  # the first failure is the one reported
          raise


def format_duration(seconds):
  """"35 s", "2 min 05 s", "1 h 02 min"; "?" for None or a non-finite number (an unknown ETA)."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(round(max(seconds, 0)))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressBar:
  """Progress with rate and ETA on stderr.

  On a terminal, one line redrawn in place at most every `interval` s. Anywhere else (a log
  file, a pipe) a plain line, with no control characters, each time another tenth of the run is
  done, so that a redirected log stays readable.
  """

  def __init__(self, total_steps, *, enabled, interval, width=28, stream=None):
    self.total = max(int(total_steps), 1)
    self.enabled = enabled
    self.interval = interval
    self.width = width
    self.stream = stream or sys.stderr
    try:
      self.in_place = bool(self.stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
      self.in_place = False
    self.start = time.time()
    self.done = 0
    self._last_draw = 0.0
    self._on_line = False  # a partial bar is on the terminal line
    self._next_tenth = 1  # plain lines: the next tenth of the run to report
    self._first_time = None
    self._first_done = 0
    self.label = ""

  def update(self, done, label=""):
    now = time.time()
    if self._first_time is None:
      self._first_time, self._first_done = now, done
    self.done = done
    self.label = label
    if not self.enabled:
      return
    if self.in_place:
      if now - self._last_draw >= self.interval or done >= self.total:
        self._last_draw = now
        self.stream.write("\r" + self.render(now) + "\033[K")
        self.stream.flush()
        self._on_line = True
    elif done * 10 >= self._next_tenth * self.total:
      self._next_tenth = done * 10 // self.total + 1
      self.stream.write(self.render(now) + "\n")
      self.stream.flush()

  def render(self, now=None):
    now = time.time() if now is None else now
    elapsed = now - self.start
    frac = min(self.done / self.total, 1.0)
    filled = int(round(frac * self.width))
    # The rate counts from the first update on, so the first chunk's compilation does not
    # inflate the ETA for the whole run.
    since = now - self._first_time if self._first_time is not None else 0.0
    rate = (self.done - self._first_done) / since if since > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    eta_text = format_duration(eta)
    return (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.done}/{self.total} steps {rate:.2f} steps/s "
            f"elapsed {format_duration(elapsed)} ETA {eta_text}")

  def end_line(self):
    """Ends the bar's line so that other output starts on a fresh one."""
    if self._on_line:
      self.stream.write("\n")
      self.stream.flush()
      self._on_line = False


def summarize_seeds(per_seed):
  """{metric: [value per seed]} -> {metric: {"mean", "std"}}: the sample standard deviation
  over seeds (ddof=1, what papers report as mean ± std; NaN for a single seed, where there is no
  spread to estimate). `dhmd_jax.stats` has intervals and paired tests."""
  out = {}
  for name, values in per_seed.items():
    arr = np.asarray([np.nan if v is None else v for v in values], np.float64)
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else float("nan")
    out[name] = {"mean": float(np.mean(arr)), "std": std}
  return out


def markdown_report(results):
  """The Markdown table of the final report: one row per seed, then mean ± std."""
  family = results["metric_family"]
  names = [m for m in metrics_lib.REPORTED[family] if m in results["test"]]
  lines = [f"# {results['dataset']} — test metrics of the model selected on validation", "",
           f"Selection: lowest validation {results['selection_metric']} per seed "
           "(never the test split).", ""]
  if family == "regression":
    lines.append("Has0 = negative vs non-negative over all samples; Non0 = negative vs "
                 "positive over samples with a non-zero label (what DMD reports as Acc-2/F1).")
    lines.append("")
  header = "| seed | best epoch | " + " | ".join(names) + " |"
  lines += [header, "|" + "---|" * (len(names) + 2)]
  for i, seed in enumerate(results["seeds"]):
    cells = [_cell(results["test"][m][i], m) for m in names]
    lines.append(f"| {seed} | {results['best_epoch'][i]} | " + " | ".join(cells) + " |")
  summary = results["test_summary"]
  if len(results["seeds"]) > 1:
    cells = [f"{_cell(summary[m]['mean'], m)} ± {_cell(summary[m]['std'], m)}" for m in names]
    lines.append("| mean ± std | | " + " | ".join(cells) + " |")
    lines.append("")
  else:  # a standard deviation needs two seeds
    lines += ["", "One seed: no mean ± std over seeds (train several with train.seeds).", ""]
  lines.append("Accuracies and F1 in %, MAE and Corr raw. "
               f"Wall time {results['wall_time_s']:.1f} s{_timing_note(results)}.")
  parts = results.get("computed_as_by_epochs") or []
  if len(parts) > 1:  # resumed elsewhere: say where each stretch of epochs was computed
    lines += ["", "Computed in parts (the run was resumed in another setting):"]
    for part in parts:
      first, last = part["epochs"]
      where = ("not recorded" if part["computed_as"] is None else
               f"computed on {_computed_as_note(part['computed_as'])}")
      lines.append(f"- epochs {first}-{last}: {where}")
    lines.append(f"- the report: computed on {_computed_as_note(results['computed_as'])}")
  elif results.get("computed_as"):
    lines += ["", f"Computed on {_computed_as_note(results['computed_as'])}"]
  return "\n".join(lines) + "\n"


def computed_as_by_epochs(records):
  """[{"epochs": [first, last], "computed_as": how}] from metrics.jsonl's epoch records: runs of
  successive epochs computed the same way (their "computed_as"; None where a record has none,
  as those of earlier versions), in epoch order. One entry for a run computed in one setting,
  however often it was resumed."""
  by_epoch = {}
  for record in records:
    if "epoch" in record:
      by_epoch[int(record["epoch"])] = record.get("computed_as")
  parts = []
  for epoch in sorted(by_epoch):
    how = by_epoch[epoch]
    if parts and parts[-1]["computed_as"] == how:  # (an epoch whose record a kill cut short
      # is missing: the epochs around it were computed alike, so it does not split the run)
      parts[-1]["epochs"][1] = epoch
    else:
      parts.append({"epochs": [epoch, epoch], "computed_as": how})
  return parts


def _computed_as_note(how):
  """"cpu (1 device, cpu, jax 0.10.2; host Intel Xeon, 2 CPUs): train.accumulate scan, ..."
  (what follows "Computed on") from results["computed_as"] (reports written before the host
  was recorded have no host part)."""
  switches = ", ".join(f"{k} {v}" for k, v in how.items() if "." in k)
  devices = f"{how['devices']} device{'s' if how['devices'] != 1 else ''}"
  where = ""
  if "host_cpu" in how:
    cpus = how["host_cpus"]
    where = f"; host {how['host_cpu']}, {cpus} CPU{'s' if cpus != 1 else ''}"
  return (f"{how['backend']} ({devices}, {how['device_kind']}, jax {how['jax']}{where}): "
          f"{switches}.")


def _timing_note(results):
  """" (set-up 20.1 s, training 180.2 s, ...)" from results["timing_s"], or "" without it."""
  timing = results.get("timing_s")
  if not timing:
    return ""
  names = (("setup", "set-up"), ("train", "training"), ("evaluate", "evaluation"),
           ("checkpoint", "checkpoints"), ("report", "report"))
  parts = [f"{label} {timing[key]:.1f} s" for key, label in names if key in timing]
  return " (" + ", ".join(parts) + ")"


def _cell(value, name):
  if value is None or not math.isfinite(float(value)):
    return "nan"
  if name in ("MAE", "Corr"):
    return f"{float(value):.4f}"
  return f"{100.0 * float(value):.2f}"


def epoch_line(epoch, num_epochs, *, train_loss, valid, test, lr, active, family, seconds):
  """The one-line summary of an epoch: means over seeds, and each seed's learning rate when
  they differ."""
  key = {"regression": ("MAE", "Non0_acc_2"), "sims": ("MAE", "Mult_acc_2"),
         "binary": ("Accuracy", "F1_score")}[family]
  parts = [f"epoch {epoch}/{num_epochs}", f"loss {np.nanmean(train_loss):.4f}"]
  for name in key:
    parts.append(f"valid {name} {np.nanmean(valid[name]):.4f}")
  if test:
    parts.append(f"test {key[0]} {np.nanmean(test[key[0]]):.4f}")
  parts.append(f"lr {_learning_rates(lr)}")
  parts.append(f"active {int(np.sum(active))}/{len(active)}")
  parts.append(f"{seconds:.1f}s")
  return " | ".join(parts)


def _learning_rates(lr):
  """One value when every seed has it, else each seed's value in seed order."""
  values = [f"{float(v):.2e}" for v in np.atleast_1d(lr)]
  return values[0] if len(set(values)) == 1 else ",".join(values)


def write_predictions(path, ids, labels, preds, seeds):
  """CSV with one row per sample: id, label, and the prediction of every seed (atomic write)."""
  def write(f):
    writer = csv.writer(f)
    writer.writerow(["id", "label"] + [f"prediction_seed_{s}" for s in seeds])
    for i, sample_id in enumerate(ids):
      writer.writerow([sample_id, labels[i]] + [repr(float(p[i])) if preds.dtype.kind == "f"
                                                else int(p[i]) for p in preds])
  _write_whole(path, write, newline="")
