"""Grids of runs (dhmd_jax/experiments): tables with statistics, skipping finished runs, table7's
head metrics, the vmapped loss-weight sweep against separate runs, and one-line errors.

One small grid (the tiny config's cheapest variants `none` and `fd`, two seeds, one epoch) is
trained once for the module; the other tests reuse its runs (copied into their own grids) so the
file compiles few programs.
"""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import ablations
from dhmd_jax import evaluate as evaluate_lib
from dhmd_jax import stats
from dhmd_jax import train as train_lib
from dhmd_jax.experiments import grid
from dhmd_jax.experiments import sweep
from dhmd_jax.experiments import table6
from dhmd_jax.experiments import table7
from dhmd_jax.experiments import table8

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
TINY_FD = os.path.join(REPO, "configs", "ablations.py") + ":tiny,fd"
ONE_EPOCH = "--config.train.num_epochs=1"


@contextlib.contextmanager
def counted_training():
  """Counts train_and_evaluate calls (the grid's only way to train)."""
  calls = []
  real = train_lib.train_and_evaluate

  def counted(*args, **kwargs):
    calls.append(args[1])
    return real(*args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_lib, "train_and_evaluate", counted)
    yield calls


def run_main(main, argv):
  """(exit status, stdout, stderr) of a command's main(argv) run in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main(argv)
  return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def table6_grid(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("grids") / "table6")
  argv = [f"--config={TINY}", ONE_EPOCH, f"--workdir={workdir}", "--variants=none,fd",
          "--reference=none"]
  with counted_training() as calls:
    status, out, err = run_main(table6.main, argv)
  assert status == 0, err
  return workdir, argv, calls, out


def read(path):
  with open(path) as f:
    return json.load(f)


def test_grid_trains_every_variant_and_writes_tables(table6_grid):
  workdir, _, calls, out = table6_grid
  assert sorted(os.path.basename(c) for c in calls) == ["fd", "none"]
  for name in ("grid.json", "results.json", "results.csv", "results.md"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  for variant in ("none", "fd"):
    for name in ("results.json", "config.json", "run.json", "train.log"):
      assert os.path.isfile(os.path.join(workdir, variant, name)), (variant, name)
    assert read(os.path.join(workdir, variant, "config.json"))["model"]["use_fd"] == (
        variant == "fd")
  progress = [line for line in out.splitlines() if line.startswith("[")]
  assert len(progress) == 2 and all("ETA" in line and "trained in" in line for line in progress)

  report = read(os.path.join(workdir, "results.json"))
  runs = {v: read(os.path.join(workdir, v, "results.json")) for v in ("none", "fd")}
  rows = {(r["variant"], r["metric"]): r for r in report["tables"][0]["rows"]}
  assert report["tables"][0]["reference"] == "none"
  # The statistics are stats.py's on the runs' own per-seed values (percent for accuracies).
  for metric, scale in (("MAE", 1.0), ("Non0_acc_2", 100.0)):
    fd = [scale * v for v in runs["fd"]["test"][metric]]
    ref = [scale * v for v in runs["none"]["test"][metric]]
    row = rows[("fd", metric)]
    assert row["mean"] == pytest.approx(np.mean(fd))
    assert row["diff"] == pytest.approx(np.mean(fd) - np.mean(ref))
    t = stats.paired_t(fd, ref)
    assert (row["p"], row["ci_low"]) == pytest.approx((t.p, t.ci_low), nan_ok=True)
    assert row["verdict"] in ("better", "worse", "n.s.")
  assert rows[("fd", "MAE")]["lower_is_better"] and not rows[("fd", "Corr")]["lower_is_better"]
  with open(os.path.join(workdir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert len(table) == 2 * len(grid.TABLE_METRICS["regression"])
  markdown = open(os.path.join(workdir, "results.md")).read()
  assert "synthetic" in markdown and "Δ" in markdown and "| fd |" in markdown


def test_second_invocation_trains_nothing_and_resumes_only_what_is_missing(table6_grid):
  workdir, argv, _, _ = table6_grid
  before = read(os.path.join(workdir, "results.json"))["per_seed"]
  with counted_training() as calls:
    status, out, err = run_main(table6.main, argv)
  assert status == 0, err
  assert calls == []
  assert out.count("finished earlier, skipped") == 2
  assert read(os.path.join(workdir, "results.json"))["per_seed"] == before

  # A run without results.json is not finished: only it goes to the trainer, which resumes it
  # from its last checkpoint (no epoch left to train) and reports the same numbers.
  os.remove(os.path.join(workdir, "fd", "results.json"))
  with counted_training() as calls:
    status, out, err = run_main(table6.main, argv)
  assert status == 0, err
  assert [os.path.basename(c) for c in calls] == ["fd"]
  assert read(os.path.join(workdir, "results.json"))["per_seed"] == before


def test_table7_head_metrics_beside_the_fused_output(table6_grid, tmp_path):
  source, _, _, _ = table6_grid
  workdir = str(tmp_path / "table7")
  # The same runs, finished in table6's grid: copied (--reuse), and table7 only adds the heads.
  argv = [f"--config={TINY}", ONE_EPOCH, f"--workdir={workdir}", "--variants=none,fd",
          "--reference=none", f"--reuse={tmp_path / 'missing'}"]
  _one_line_error(*run_main(table7.main, argv), 2, "--reuse:", "is not a folder")
  argv[-1] = f"--reuse={source}"
  with counted_training() as calls:
    status, out, err = run_main(table7.main, argv)
  assert status == 0, err
  assert calls == [] and out.count(f"copied from {source}") == 2
  report = read(os.path.join(workdir, "results.json"))
  for variant in ("none", "fd"):
    heads = read(os.path.join(workdir, variant, "heads_test.json"))["heads"]
    assert set(heads) == set(table7.HEADS)
    results = read(os.path.join(workdir, variant, "results.json"))
    # The fused head is the model's prediction: the run's own test metrics.
    for metric in ("Non0_acc_2", "MAE", "Corr"):
      assert heads["fused"][metric] == pytest.approx(results["test"][metric], abs=2e-4)
    row = report["per_seed"][variant]
    per_modality = np.array([row[f"homo {m} Non0_acc_2"] for m in "LVA"])
    assert row["homo std Non0_acc_2"] == pytest.approx(per_modality.std(axis=0))
  titles = [t["title"] for t in report["tables"]]
  assert any("homogeneous heads" in t for t in titles) and any("fused" in t for t in titles)
  std_rows = [r for t in report["tables"] for r in t["rows"] if " std " in r["metric"]]
  assert std_rows and all(r["lower_is_better"] for r in std_rows)
  # Computed once: a second invocation neither trains nor recomputes the heads.
  status, out, _ = run_main(table7.main, argv)
  assert status == 0 and "head metrics" not in out
  # A shard (of one) finds every run finished with its heads: it writes the report.
  os.remove(os.path.join(workdir, "results.json"))
  with counted_training() as calls:
    status, out, err = run_main(table7.main, argv + ["--shard_index=0", "--num_shards=1"])
  assert status == 0 and calls == [] and "head metrics" not in out, err
  assert read(os.path.join(workdir, "results.json"))["per_seed"] == report["per_seed"]


def _predictions(workdir):
  with open(os.path.join(workdir, "predictions_test.csv")) as f:
    rows = list(csv.reader(f))
  return rows[0][2:], np.array([r[2:] for r in rows[1:]], np.float64)


def test_vmapped_loss_weight_sweep_equals_separate_runs(table6_grid, tmp_path):
  """Two values of lambda_dec in one program, one seed, against runs of the plain trainer.

  Exactly equal: the weights enter as inputs, and the program has two runs like the plain runs'
  two seeds (a wider vmapped axis changes XLA's rounding on the CPU by ~1e-7, which training
  then amplifies; docs/experiments.md says so). Two runs also means only the chunk compiles
  anew."""
  source, _, _, _ = table6_grid
  workdir = str(tmp_path / "sweep")
  argv = [f"--config={TINY_FD}", ONE_EPOCH, "--config.train.seeds=(1111,)",
          f"--workdir={workdir}", "--params=lambda_dec", "--lambda_dec=1"]
  with counted_training() as calls:
    status, out, err = run_main(sweep.main, argv)
  assert status == 0, err
  assert len(calls) == 1  # both values: one program
  swept = os.path.join(workdir, "lambda_dec")
  results = read(os.path.join(swept, "results.json"))
  assert results["loss_weights"]["lambda_dec"] == pytest.approx([0.1, 1.0])
  assert results["loss_weights"]["lambda_dtl"] == pytest.approx([0.05, 0.05])  # the config's
  assert [r.split(",")[0] for r in results["runs"]] == ["1111-lambda_dec=0.1", "1111-lambda_dec=1"]
  with open(os.path.join(workdir, "lambda_dec", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert records and all(r["runs"] == results["runs"] for r in records)  # seeds repeat here
  _, preds = _predictions(swept)

  # lambda_dec=0.1 is the config's own value: seed 1111 of table6's `fd` run, trained alone.
  alone_config = read(os.path.join(source, "fd", "config.json"))
  alone_config["train"]["seeds"] = [1111]
  assert alone_config == read(os.path.join(swept, "config.json"))
  alone = read(os.path.join(source, "fd", "results.json"))
  # lambda_dec=1: the plain trainer with the value in its config (seed 1111 is run 0).
  config = ablations.get_config("tiny,fd")
  config.train.num_epochs = 1
  config.loss.lambda_dec = 1.0
  with contextlib.redirect_stdout(io.StringIO()):
    separate = train_lib.train_and_evaluate(config, str(tmp_path / "separate"))
  for run, other, other_dir in ((0, alone, os.path.join(source, "fd")),
                                (1, separate, str(tmp_path / "separate"))):
    assert results["best_valid_loss"][run] == other["best_valid_loss"][0]
    assert {k: v[run] for k, v in results["test"].items()} == {
        k: v[0] for k, v in other["test"].items()}
    np.testing.assert_array_equal(preds[:, run], _predictions(other_dir)[1][:, 0])
  assert np.abs(preds[:, 0] - preds[:, 1]).max() > 1e-3  # the weight did change training
  # The grid's rows: value i owns run i (one seed), against the config's value.
  report = read(os.path.join(workdir, "results.json"))
  assert report["per_seed"]["lambda_dec=1"]["MAE"] == results["test"]["MAE"][1:]
  assert report["tables"][0]["reference"] == "lambda_dec=0.1"
  assert "n=1" in open(os.path.join(workdir, "results.md")).read()  # no CI from one seed
  # A sweep's runs are not the config's seeds: evaluate refuses it rather than mix values up.
  with pytest.raises(train_lib.TrainingError, match="loss-weight sweep .*2 runs"):
    evaluate_lib.evaluate(evaluate_lib.run_config(swept), swept, split="test")


def test_sweep_plans_k_as_separate_programs_and_weights_as_one():
  base = ml_collections.ConfigDict(ablations.get_config("tiny,full").to_dict())
  runs, tables = sweep.plan(base, {"num_elements": [4, 32], "lambda_dic": [0.5]})
  k_runs = [r for r in runs if r.name.startswith("num_elements")]
  assert [r.name for r in k_runs] == ["num_elements=4", "num_elements=16", "num_elements=32"]
  assert [r.config.dm.num_elements for r in k_runs] == [4, 16, 32]
  assert all(r.loss_weights is None for r in k_runs)
  (weights,) = [r for r in runs if r.loss_weights]
  assert weights.loss_weights == {"lambda_dec": [0.1, 0.1], "lambda_dtl": [0.05, 0.05],
                                  "lambda_dic": [0.1, 0.5], "gamma": [0.1, 0.1]}
  assert weights.config.loss.lambda_dic == 0.1  # the config keeps its value; runs get theirs
  assert [t.reference for t in tables] == ["num_elements=16", "lambda_dic=0.1"]
  runs, _ = sweep.plan(base, {"lambda_dic": [0.5]}, separate=True)
  assert [(r.name, r.config.loss.lambda_dic, r.loss_weights) for r in runs] == [
      ("lambda_dic=0.1", 0.1, None), ("lambda_dic=0.5", 0.5, None)]


def _one_line_error(status, out, err, expected_status, *fragments):
  lines = err.strip().splitlines()
  assert status == expected_status, (out, err)
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("main, args, fragments", [
    (table6.main, ["--variants=full,no_dm,bogus"], ("unknown variant 'bogus'",)),
    (table8.main, ["--variants=mult,mult_gd"], ("reference variant 'full' is not in",)),
    (sweep.main, ["--params=num_elements", "--num_elements=16,1.5"],
     ("--num_elements: '1.5' is not a positive integer",)),
    (sweep.main, ["--params=lambda_dec", "--lambda_dec=0.1,abc"],
     ("--lambda_dec: 'abc' is not a non-negative number",)),
    (sweep.main, ["--params=lambda_dec,lambda3"], ("unknown sweep parameter 'lambda3'",)),
    (table6.main, ["--config.train.num_epoch=1"], ("did you mean train.num_epochs",)),
    # The config file itself: main's loader (validation.load_config_file), main's messages.
    (table6.main, ["--config=configs/nope.py"], ("config file configs/nope.py does not exist",)),
    (sweep.main, ["--config=configs"], ("config file configs is a folder",)),
])
def test_bad_input_is_one_line(main, args, fragments, tmp_path):
  with counted_training() as calls:
    status, out, err = run_main(main, [f"--config={TINY}", f"--workdir={tmp_path / 'g'}", *args])
  _one_line_error(status, out, err, 2, *fragments)
  assert calls == [] and not os.path.exists(tmp_path / "g")


def test_help_and_ctrl_c(tmp_path, monkeypatch):
  status, out, err = run_main(table6.main, ["--help"])
  assert (status, err) == (0, "")
  assert out.startswith("usage: python -m dhmd_jax.experiments.table6 [--config=FILE[:ARG]]")
  for text in ("--variants=", "--reference=", "--reuse=", "--config.train.num_epochs=",
               "--helpfull", "--devices_per_run=K", "--shard_index=I", "--num_shards=N",
               "SLURM_ARRAY_TASK_ID"):
    assert text in out, text
  status, out, _ = run_main(sweep.main, ["--helpfull"])
  assert status == 0 and "--lambda_dec=" in out and "--config.dm.num_elements=" in out

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(grid, "run_grid", interrupted)
  status, out, err = run_main(table8.main, [f"--config={TINY}", f"--workdir={tmp_path}"])
  assert (status, out, err) == (130, "", "interrupted; rerun the same command to resume\n")


def test_a_workdir_holding_another_grid_is_refused(table6_grid, tmp_path):
  workdir, argv, _, _ = table6_grid
  with counted_training() as calls:
    # Another kind of grid in table6's workdir.
    _one_line_error(*run_main(table8.main, [f"--config={TINY}", f"--workdir={workdir}",
                                            "--variants=none", "--reference=none"]),
                    1, "holds a table6 grid, not table8")
    # The same kind with another config.
    _one_line_error(*run_main(table6.main, argv + ["--config.train.seeds=(1111,)"]),
                    1, "holds a table6 grid of another config", "train.seeds")
    # A sweep workdir whose one-program run was planned with other values.
    sweep_dir = str(tmp_path / "sweep")
    os.makedirs(os.path.join(sweep_dir, "lambda_dec"))
    grid.write_json(os.path.join(sweep_dir, "lambda_dec", grid.RUN_FILE),
                    {"run": "lambda_dec", "rows": ["lambda_dec=0.1", "lambda_dec=1"],
                     "overrides": {}, "loss_weights": {"lambda_dec": [0.1, 1.0]}})
    _one_line_error(*run_main(sweep.main, [f"--config={TINY_FD}", f"--workdir={sweep_dir}",
                                           "--params=lambda_dec", "--lambda_dec=0.5"]),
                    1, "holds a run planned as lambda_dec=[0.1, 1.0]")
  assert calls == []


def test_the_module_entry_point_answers_in_one_line_without_importing_jax():
  """`python -m dhmd_jax.experiments.table6 ...` (run as -m runs it, by runpy), in a fresh
  process: a mistake is answered before JAX is imported."""
  code = ("import runpy, sys\n"
          f"sys.argv = ['table6', '--config={TINY}', '--variants=nope']\n"
          "try:\n"
          "  runpy.run_module('dhmd_jax.experiments.table6', run_name='__main__')\n"
          "except SystemExit as e:\n"
          "  print('jax imported:', 'jax' in sys.modules, 'status:', e.code)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.stdout.strip() == "jax imported: False status: 2", proc.stdout + proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: unknown variant 'nope' in --variants; choose from "
      f"{', '.join(grid.VARIANTS)} (configs/ablations.py; 'ca' = CA only)"]
