"""Reporting pieces: the progress bar's rate and ETA, metrics.jsonl truncation on resume, the
Markdown report and strict JSON."""

import io
import json
import math

from dhmd_jax import reporting


def test_progress_rate_ignores_time_before_first_update(monkeypatch):
  clock = iter([0.0, 100.0, 110.0, 110.0])  # construction, first update (after compiling), ...
  monkeypatch.setattr(reporting.time, "time", lambda: next(clock))
  stream = io.StringIO()
  bar = reporting.ProgressBar(100, enabled=True, interval=0.0, stream=stream)
  bar.update(10, label="epoch 1/2")  # t=100: 10 steps done, the first chunk incl. compilation
  bar.update(30, label="epoch 1/2")  # t=110: 20 more steps in 10 s -> 2 steps/s
  text = stream.getvalue().split("\r")[-1]
  assert "30/100 steps 2.00 steps/s" in text
  assert "ETA 0:00:35" in text  # 70 steps at 2 steps/s
  bar.end_line()
  assert stream.getvalue().endswith("\n")


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
  test = {m: [0.5, 0.7] for m in reporting.HEADLINE["regression"]}
  results = {"dataset": "mosei", "metric_family": "regression", "seeds": [1111, 1112],
             "best_epoch": [3, 4], "selection_metric": "MAE", "test": test,
             "test_summary": reporting.summarize_seeds(test), "wall_time_s": 1.0}
  text = reporting.markdown_report(results)
  assert "Has0_acc_2" in text and "Non0_acc_2" in text
  assert "| 1111 | 3 |" in text and "60.00 ± 10.00" in text
  assert math.isclose(results["test_summary"]["MAE"]["std"], 0.1)
