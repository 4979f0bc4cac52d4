"""Reporting pieces: the progress bar's rate and ETA, in place on a terminal and plain lines in a
log, the epoch line, metrics.jsonl truncation on resume, the Markdown report and strict JSON."""

import io
import json
import math

import numpy as np

from dhmd_jax import metrics as metrics_lib
from dhmd_jax import reporting


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_rate_ignores_time_before_first_update(monkeypatch):
  clock = iter([0.0, 100.0, 110.0, 110.0])  # construction, first update (after compiling), ...
  monkeypatch.setattr(reporting.time, "time", lambda: next(clock))
  stream = _Terminal()
  bar = reporting.ProgressBar(100, enabled=True, interval=0.0, stream=stream)
  bar.update(10, label="epoch 1/2")  # t=100: 10 steps done, the first chunk incl. compilation
  bar.update(30, label="epoch 1/2")  # t=110: 20 more steps in 10 s -> 2 steps/s
  text = stream.getvalue().split("\r")[-1]
  assert "30/100 steps 2.00 steps/s" in text
  assert "ETA 35 s" in text  # 70 steps at 2 steps/s
  bar.end_line()
  assert stream.getvalue().endswith("\n")


def test_progress_redraws_in_place_only_on_a_terminal(monkeypatch):
  monkeypatch.setattr(reporting.time, "time", lambda: 5.0)
  terminal = _Terminal()
  bar = reporting.ProgressBar(3, enabled=True, interval=0.0, stream=terminal)
  for done in (1, 2, 3):
    bar.update(done, label="epoch 1/1")
  assert terminal.getvalue().count("\r") == 3 and terminal.getvalue().count("\033[K") == 3
  assert "\n" not in terminal.getvalue()  # one line, redrawn


def test_progress_in_a_log_file_is_plain_lines_every_tenth(monkeypatch):
  monkeypatch.setattr(reporting.time, "time", lambda: 5.0)
  log = io.StringIO()  # not a terminal, as a redirected stderr
  bar = reporting.ProgressBar(95, enabled=True, interval=0.0, stream=log)
  for done in range(1, 96):
    bar.update(done, label=f"epoch {done // 20 + 1}/5")
  bar.end_line()  # nothing to end
  text = log.getvalue()
  assert "\r" not in text and "\033" not in text
  assert all(c == "\n" or c.isprintable() for c in text)
  lines = text.splitlines()
  done = [int(line.split("] ")[1].split("/")[0]) for line in lines]
  assert done == [10, 19, 29, 38, 48, 57, 67, 76, 86, 95]  # each tenth of 95 steps, and the end
  assert lines[-1].startswith("epoch 5/5 [############################] 95/95 steps")
  big_steps = io.StringIO()  # chunks of many steps: one line per chunk at most
  bar = reporting.ProgressBar(100, enabled=True, interval=0.0, stream=big_steps)
  for done in (4, 50, 51, 100):
    bar.update(done)
  assert [line.split("] ")[1].split(" ")[0] for line in big_steps.getvalue().splitlines()] == [
      "50/100", "100/100"]
  quiet = io.StringIO()
  bar = reporting.ProgressBar(10, enabled=False, interval=0.0, stream=quiet)
  bar.update(10)
  assert quiet.getvalue() == ""


def _epoch_line(lr):
  valid = {"MAE": [0.8, 0.9], "Non0_acc_2": [0.7, 0.6]}
  return reporting.epoch_line(3, 30, train_loss=[1.0, 2.0], valid=valid, test={}, lr=lr,
                              active=[True, False], family="regression", seconds=1.25)


def test_epoch_line_shows_each_seeds_learning_rate_when_they_differ():
  line = _epoch_line(np.array([5e-5, 5e-5, 1e-4, 1e-4, 1e-4]))
  assert "| lr 5.00e-05,5.00e-05,1.00e-04,1.00e-04,1.00e-04 |" in line  # not the mean 8.00e-05
  assert "| lr 1.00e-04 |" in _epoch_line(np.array([1e-4, 1e-4, 1e-4]))
  assert _epoch_line(np.array([2.5e-5, 1e-4])) == (
      "epoch 3/30 | loss 1.5000 | valid MAE 0.8500 | valid Non0_acc_2 0.6500 | "
      "lr 2.50e-05,1.00e-04 | active 1/2 | 1.2s")


def test_metrics_log_drops_records_after_resumed_epoch(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  log = reporting.MetricsLog(path)
  for epoch in (1, 2, 3):
    log.write({"epoch": epoch})
  with open(path, "a") as f:
    f.write('{"epoch": 4, "trunc')  # a line cut short by a kill
  resumed = reporting.MetricsLog(path, resume_epoch=2)
  assert [r["epoch"] for r in resumed.read()] == [1, 2]


def test_json_is_strict_and_markdown_names_both_binary_variants(tmp_path):
  path = str(tmp_path / "r.json")
  reporting.write_json(path, {"Corr": [float("nan"), 0.5]})
  assert json.load(open(path)) == {"Corr": [None, 0.5]}
  test = {m: [0.5, 0.7] for m in metrics_lib.REPORTED["regression"]}
  results = {"dataset": "mosei", "metric_family": "regression", "seeds": [1111, 1112],
             "best_epoch": [3, 4], "selection_metric": "MAE", "test": test,
             "test_summary": reporting.summarize_seeds(test), "wall_time_s": 1.0}
  text = reporting.markdown_report(results)
  assert "Has0_acc_2" in text and "Non0_acc_2" in text
  # Sample std over seeds (ddof=1): 0.5 and 0.7 -> 0.1414.
  assert "| 1111 | 3 |" in text and "60.00 ± 14.14" in text
  assert math.isclose(results["test_summary"]["MAE"]["std"], 0.1 * math.sqrt(2))
  assert math.isnan(reporting.summarize_seeds({"MAE": [0.5]})["MAE"]["std"])


def test_one_seeds_report_has_no_mean_and_std_row():
  test = {m: [0.5] for m in metrics_lib.REPORTED["regression"]}
  results = {"dataset": "mosei", "metric_family": "regression", "seeds": [1111],
             "best_epoch": [3], "selection_metric": "MAE", "test": test,
             "test_summary": reporting.summarize_seeds(test), "wall_time_s": 1.0}
  text = reporting.markdown_report(results)
  assert "| 1111 | 3 | 50.00 |" in text
  assert "nan" not in text and "mean ± std |" not in text, text
  assert "One seed: no mean ± std over seeds" in text


def test_the_closing_line_names_the_host_and_reads_reports_written_before_it_was_recorded():
  how = {"backend": "cpu", "devices": 1, "device_kind": "cpu", "jax": "0.10.2",
         "train.accumulate": "scan", "model.remat": False}
  assert reporting._computed_as_note(how) == (  # pylint: disable=protected-access
      "cpu (1 device, cpu, jax 0.10.2): train.accumulate scan, model.remat False.")
  how.update(host_cpu="AMD EPYC 7B13", host_cpus=1)
  assert reporting._computed_as_note(how) == (  # pylint: disable=protected-access
      "cpu (1 device, cpu, jax 0.10.2; host AMD EPYC 7B13, 1 CPU): "
      "train.accumulate scan, model.remat False.")


def test_epochs_are_grouped_by_how_they_were_computed():
  a, b = {"backend": "cpu", "host_cpu": "A"}, {"backend": "cpu", "host_cpu": "B"}
  records = [{"epoch": 1, "computed_as": a}, {"epoch": 2, "computed_as": a},
             {"epoch": 3, "computed_as": b}, {"epoch": 4, "computed_as": a}]
  assert reporting.computed_as_by_epochs(records) == [
      {"epochs": [1, 2], "computed_as": a}, {"epochs": [3, 3], "computed_as": b},
      {"epochs": [4, 4], "computed_as": a}]
  # Records of earlier versions say nothing; a record written twice counts once (the last).
  old = [{"epoch": 1}, {"epoch": 2}, {"epoch": 3, "computed_as": b}, {"epoch": 3, "computed_as": a}]
  assert reporting.computed_as_by_epochs(old) == [
      {"epochs": [1, 2], "computed_as": None}, {"epochs": [3, 3], "computed_as": a}]
  # An epoch whose record was lost (a line cut short by a kill) does not split a stretch.
  assert reporting.computed_as_by_epochs([{"epoch": 1, "computed_as": a},
                                          {"epoch": 3, "computed_as": a}]) == [
      {"epochs": [1, 3], "computed_as": a}]
  assert reporting.computed_as_by_epochs([]) == []
