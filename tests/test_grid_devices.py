"""A grid's runs side by side on the devices of one machine (`--devices_per_run`,
`grid.Placement`), on this CPU's virtual devices (`--xla_force_host_platform_device_count`):
each run in its own worker process on its own group of devices gives, run for run, the numbers
the sequential grid gives; a failing run and Ctrl-C end the grid with every worker stopped; the
flag's mistakes are one line.

The grids are `grid.run_grid` over runs of the FakeModel that differ in learning rate (a
child process per grid, `DRIVER`): the machinery is the point, not the model. The worker
processes build the FakeModel too: the grid hands them its `train.build`.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dhmd_jax import workdir as workdir_lib
from dhmd_jax.experiments import grid
from dhmd_jax.experiments import table6

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")

# A grid of the FakeModel in this process: sys.argv[1] is JSON {"workdir", "devices_per_run",
# "shard": null | [index, count], "epochs" (one for all, or per run), "rates", "batch_sizes": per
# run or null, "calls": file or null}. With "calls", each
# training this process does appends "start|end <run> <pid>" to that file. Prints the grid's
# outcome: {"report": true} when it wrote results.*, else the line it returned.
DRIVER = r"""
import json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import fake_model
fake_model.install()
from dhmd_jax import train as train_lib
from dhmd_jax.experiments import grid
args = json.loads(sys.argv[1])
if args.get("calls"):
  real = train_lib.train_and_evaluate
  def counted(config, workdir, **kwargs):
    name = os.path.basename(workdir)
    with open(args["calls"], "a") as f:
      f.write(f"start {name} {os.getpid()}\n")
    results = real(config, workdir, **kwargs)
    with open(args["calls"], "a") as f:
      f.write(f"end {name} {os.getpid()}\n")
    return results
  train_lib.train_and_evaluate = counted
base = fake_model.fake_config()
base.train.seeds = (1111,)
base.train.num_epochs = 2
runs = []
for i, rate in enumerate(args["rates"]):
  config = fake_model.fake_config()
  epochs = args["epochs"][i] if isinstance(args["epochs"], list) else args["epochs"]
  config.update_from_flattened_dict({"train.seeds": (1111,), "train.num_epochs": epochs,
                                     "train.learning_rate": rate})
  if args.get("batch_sizes"):
    config.train.batch_size = args["batch_sizes"][i]
  runs.append(grid.Run(name=f"lr{i}", config=config, rows=(f"lr{i}",),
                       overrides={"train.learning_rate": rate}))
tables = [grid.Table(title="rates", rows=[r.name for r in runs], reference="lr0",
                     metrics=["MAE", "Corr"])]
def report(outcome):
  grid.write_report(args["workdir"], kind="fake", base_config=base, runs=runs, tables=tables,
                    outcome=outcome, per_seed=grid.collect(runs, outcome, "test"), split="test")
  return {"report": True, "status": {k: v[1] for k, v in outcome.items()}}
out = grid.run_grid("fake", base, args["workdir"], runs, report=report,
                    devices_per_run=args["devices_per_run"],
                    shard=None if args.get("shard") is None else tuple(args["shard"]))
print("OUTCOME " + json.dumps(out), flush=True)
"""

RATES = [1e-3, 3e-3, 1e-2]


def driver_command(workdir, *, devices_per_run=0, shard=None, epochs=2, rates=RATES,
                   batch_sizes=None, calls=None):
  args = {"workdir": str(workdir), "devices_per_run": devices_per_run, "shard": shard,
          "epochs": epochs, "rates": rates, "batch_sizes": batch_sizes,
          "calls": calls and str(calls)}
  return [sys.executable, "-c", DRIVER, json.dumps(args)]


def cpu_env(devices):
  """This process's environment with a CPU platform of `devices` virtual devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def run_driver(workdir, devices, **kwargs):
  proc = subprocess.run(driver_command(workdir, **kwargs), cwd=REPO, env=cpu_env(devices),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("OUTCOME ")]
  return json.loads(line[len("OUTCOME "):]), proc.stdout


def run_numbers(workdir, name):
  """What a run's results must agree on: its metrics, selection, and every prediction."""
  with open(os.path.join(workdir, name, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, name, "predictions_test.csv")) as f:
    predictions = list(csv.reader(f))
  return ({k: results[k] for k in ("valid", "test", "best_valid_loss", "best_epoch")},
          predictions)


@pytest.mark.parametrize("devices, per_run", [(2, 1), (4, 2)])
def test_runs_side_by_side_on_device_groups_equal_the_sequential_grid(tmp_path, devices,
                                                                      per_run):
  """`devices` virtual CPU devices, `per_run` each: the runs train in worker processes, at most
  devices // per_run at once (one device per run: more runs than groups, so a group takes a
  second run), and equal run for run a grid trained one run at a time in a process of
  `per_run` devices (the same mesh)."""
  sequential, parallel = tmp_path / "sequential", tmp_path / "parallel"
  slots = devices // per_run
  rates = RATES[:slots + 1] if per_run == 1 else RATES[:slots]  # more runs than groups, or not
  names = [f"lr{i}" for i in range(len(rates))]
  out, printed = run_driver(sequential, per_run, devices_per_run=per_run, rates=rates)
  assert out["status"] == dict.fromkeys(names, "trained")
  assert f"one run at a time on all {per_run} cpu device(s)" in printed
  out, printed = run_driver(parallel, devices, devices_per_run=per_run, rates=rates)
  assert out["status"] == dict.fromkeys(names, "trained")
  assert f"{slots} run(s) side by side, each on {per_run} cpu device(s)" in printed
  groups = {",".join(str(i) for i in range(g * per_run, (g + 1) * per_run))
            for g in range(slots)}
  used = {line.split(" on cpu device(s) ")[1].split(" ")[0] for line in printed.splitlines()
          if " on cpu device(s) " in line}
  assert used == groups, printed  # every group took runs, and no other devices were named
  for name in names:
    assert run_numbers(parallel, name) == run_numbers(sequential, name), name
    with open(parallel / name / grid.LOG_FILE) as f:
      log = f.read()
    assert f"{per_run} device" in log or "epoch" in log, log  # the run's own output is there
    with open(parallel / name / "config.json") as f:
      assert json.load(f)["train"]["num_devices"] == 0  # the group is the run's whole machine
  assert run_numbers(parallel, "lr0") != run_numbers(parallel, "lr1")  # the runs differ
  with open(parallel / "results.json") as f:
    parallel_report = json.load(f)
  with open(sequential / "results.json") as f:
    assert json.load(f)["per_seed"] == parallel_report["per_seed"]
  # A rerun finds every run finished: no worker, no device listing.
  out, printed = run_driver(parallel, devices, devices_per_run=per_run, rates=rates)
  assert out["status"] == dict.fromkeys(names, "skipped")
  assert "side by side" not in printed


def test_a_failing_run_in_a_worker_is_one_line_naming_it(tmp_path):
  """A run that cannot train (no step fits its split) fails in its worker: the grid ends with
  the run's one line and its log, after the other runs finished."""
  proc = subprocess.run(driver_command(tmp_path / "g", devices_per_run=1, rates=[1e-3, 1e-3],
                                      batch_sizes=[8, 4096]),
                        cwd=REPO, env=cpu_env(2), capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  assert "GridError: run lr1: " in proc.stderr, proc.stderr
  assert f"(its log: {tmp_path / 'g' / 'lr1' / grid.LOG_FILE})" in proc.stderr
  assert os.path.exists(tmp_path / "g" / "lr0" / "results.json")  # the other run finished


def _error(argv, tmp_path, *, planned=True):
  from test_experiments import run_main  # pylint: disable=g-import-not-at-top
  status, out, err = run_main(table6.main, [f"--config={TINY}", f"--workdir={tmp_path / 'g'}",
                                            "--variants=none", "--reference=none", *argv])
  lines = err.strip().splitlines()
  assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (out, err)
  assert os.path.exists(tmp_path / "g") != planned  # planned: found before the workdir is made
  return lines[0]


def test_bad_devices_per_run_is_one_line(tmp_path):
  assert "--devices_per_run=-1: give a number of devices" in _error(
      ["--devices_per_run=-1"], tmp_path)
  assert "bad value for --devices_per_run: 'two'" in _error(["--devices_per_run=two"], tmp_path)
  line = _error(["--devices_per_run=3"], tmp_path)  # batch_size 8
  assert "config.train.batch_size = 8 is not divisible by the 3 devices of a run" in line
  line = _error(["--devices_per_run=2", "--config.train.num_devices=1"], tmp_path)
  assert "--devices_per_run=2 but config.train.num_devices=1" in line
  line = _error(["--devices_per_run=64", "--config.train.batch_size=64",
                 "--config.train.eval_batch_size=64"], tmp_path, planned=False)
  assert re.search(r"--devices_per_run=64, but this machine has (\d+) cpu device\(s\); pass "
                   r"at most \1$", line), line


def test_ctrl_c_stops_every_worker(tmp_path):
  """Ctrl-C at the grid (SIGINT to its process alone: its workers run in sessions of their own)
  is passed on to every worker, which stops its run at a safe point; the grid ends
  interrupted, and no worker is left holding a run."""
  workdir = tmp_path / "g"
  proc = subprocess.Popen(driver_command(workdir, devices_per_run=1, epochs=60,
                                         rates=[1e-3, 2e-3]),
                          cwd=REPO, env=cpu_env(2), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = [workdir / name / "metrics.jsonl" for name in ("lr0", "lr1")]
  deadline = time.time() + 300
  while not all(m.exists() and m.read_text().count("\n") >= 2 for m in metrics):
    assert time.time() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert "KeyboardInterrupt" in err.strip().splitlines()[-1], err
  for name in ("lr0", "lr1"):
    assert not (workdir / name / "results.json").exists()  # stopped, not finished
    with workdir_lib.hold(str(workdir / name), "test"):  # free: its worker has ended
      pass
