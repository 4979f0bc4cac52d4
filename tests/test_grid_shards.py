"""A grid shared by several processes (`--shard_index/--num_shards`, SLURM job arrays): each
trains only its share, no run is trained twice when shards overlap in time or one is killed and
restarted (each run is trained holding its own workdir's lock), and the last shard to finish, or
a plain rerun, writes the grid's results. Bad shard values are one line and status 2.

The shards are processes of `test_grid_devices.DRIVER` (the FakeModel) on one shared workdir.
"""

import json
import os
import signal
import subprocess
import time
import types

import pytest

from dhmd_jax.experiments import grid
from dhmd_jax.experiments import table6
from test_experiments import run_main
from test_grid_devices import REPO, TINY, cpu_env, driver_command, run_driver

RATES = [1e-3, 2e-3, 3e-3, 4e-3]
LONG = 40  # epochs of the run that is killed mid-way (run lr1, shard 1's only run)
EPOCHS = [2, LONG, 2, 2]


def _start(workdir, calls, shard):
  return subprocess.Popen(driver_command(workdir, shard=shard, epochs=EPOCHS, rates=RATES,
                                         calls=calls),
                          cwd=REPO, env=cpu_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _outcome(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, out + err
  (line,) = [l for l in out.splitlines() if l.startswith("OUTCOME ")]
  return json.loads(line[len("OUTCOME "):])


def _epochs(path):
  with open(path) as f:
    return [json.loads(line)["epoch"] for line in f]


def test_shards_overlapping_killed_and_restarted_train_each_run_once(tmp_path):
  workdir, calls = tmp_path / "grid", tmp_path / "calls.txt"
  # Three shards, shard 0 twice at once (a requeued job beside its first instance).
  shards = [_start(workdir, calls, [0, 3]), _start(workdir, calls, [0, 3]),
            _start(workdir, calls, [1, 3]), _start(workdir, calls, [2, 3])]
  # Shard 1 is killed once its long run has checkpointed a few epochs, and started again.
  metrics = workdir / "lr1" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 4):
    assert time.time() < deadline and shards[2].poll() is None, "run lr1 never started"
    time.sleep(0.05)
  shards[2].send_signal(signal.SIGKILL)
  shards[2].communicate()
  assert not (workdir / "lr1" / "results.json").exists()  # killed mid-run
  killed = shards[2].pid
  shards[2] = _start(workdir, calls, [1, 3])
  outcomes = [_outcome(p) for p in shards]

  lines = calls.read_text().split()
  events = list(zip(lines[0::3], lines[1::3], lines[2::3]))
  for run in ("lr0", "lr1", "lr2", "lr3"):
    ends = [pid for what, name, pid in events if what == "end" and name == run]
    starts = [pid for what, name, pid in events if what == "start" and name == run]
    assert len(ends) == 1, (run, events)  # trained to its end once
    assert starts == ([str(killed)] if run == "lr1" else []) + ends, (run, events)
  # Each run was trained by a process of its own shard (runs I, I + 3, ... are shard I's).
  shard_of_pid = {str(shards[0].pid): 0, str(shards[1].pid): 0, str(shards[2].pid): 1,
                  str(shards[3].pid): 2, str(killed): 1}
  assert {name: shard_of_pid[pid] for what, name, pid in events if what == "end"} == {
      "lr0": 0, "lr1": 1, "lr2": 2, "lr3": 0}
  # The restarted shard resumed the killed run: every epoch once in its metrics log (up to
  # where its schedule stopped it).
  epochs = _epochs(metrics)
  assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > 2, epochs
  assert "resum" in (workdir / "lr1" / grid.LOG_FILE).read_text().lower()
  # The shard that finished last wrote the grid's results; the others said how far it was.
  reports = [o for o in outcomes if isinstance(o, dict)]
  assert reports, outcomes
  assert all("runs of the grid are finished" in o for o in outcomes if isinstance(o, str))
  with open(workdir / "results.json") as f:
    report = json.load(f)
  assert set(report["per_seed"]) == {"lr0", "lr1", "lr2", "lr3"}
  # A plain rerun trains nothing and writes the results again.
  out, _ = run_driver(workdir, 1, epochs=EPOCHS, rates=RATES, calls=calls)
  assert out["status"] == dict.fromkeys(("lr0", "lr1", "lr2", "lr3"), "skipped")
  assert "start" not in calls.read_text().split("\n", len(events))[-1]


def _args(**flags):
  return types.SimpleNamespace(**{"shard_index": None, "num_shards": None, **flags})


def test_shards_come_from_the_flags_or_a_slurm_job_array():
  assert grid.shard_of(_args(), {}) is None
  assert grid.shard_of(_args(shard_index=2, num_shards=3), {}) == (2, 3)
  assert grid.shard_of(_args(), {"SLURM_ARRAY_TASK_ID": "4",
                                 "SLURM_ARRAY_TASK_COUNT": "5"}) == (4, 5)
  # --array=1-5: ids from 1; --array=0-15:4: ids 0, 4, 8, 12.
  assert grid.shard_of(_args(), {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1",
                                 "SLURM_ARRAY_TASK_COUNT": "5"}) == (0, 5)
  assert grid.shard_of(_args(), {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "0",
                                 "SLURM_ARRAY_TASK_STEP": "4",
                                 "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
  # The flags win over the job array's variables.
  assert grid.shard_of(_args(shard_index=0, num_shards=1), {"SLURM_ARRAY_TASK_ID": "3",
                                                            "SLURM_ARRAY_TASK_COUNT": "4"}) == (
                                                                0, 1)


@pytest.mark.parametrize("argv, environ, fragment", [
    (["--shard_index=3", "--num_shards=3"], {}, "--shard_index=3 is not between 0 and 2"),
    (["--shard_index=-1", "--num_shards=3"], {}, "--shard_index=-1 is not between 0 and 2"),
    (["--shard_index=0", "--num_shards=0"], {}, "--num_shards=0: there must be at least one"),
    (["--shard_index=1.5", "--num_shards=3"], {}, "bad value for --shard_index: '1.5'"),
    (["--shard_index=0", "--num_shards=two"], {}, "bad value for --num_shards: 'two'"),
    (["--shard_index=1"], {}, "--shard_index needs --num_shards too"),
    (["--num_shards=2"], {}, "--num_shards needs --shard_index too"),
    ([], {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"},
     "SLURM_ARRAY_TASK_ID='x' is not an integer"),
    ([], {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3"},
     "SLURM_ARRAY_TASK_ID=7 is not one of 3 evenly spaced ids from SLURM_ARRAY_TASK_MIN=0"),
    ([], {"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_COUNT is not"),
])
def test_bad_shards_are_one_line(argv, environ, fragment, tmp_path, monkeypatch):
  for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
               "SLURM_ARRAY_TASK_STEP"):
    monkeypatch.delenv(name, raising=False)
  for name, value in environ.items():
    monkeypatch.setenv(name, value)
  status, out, err = run_main(table6.main, [f"--config={TINY}", f"--workdir={tmp_path / 'g'}",
                                            "--variants=none", "--reference=none", *argv])
  lines = err.strip().splitlines()
  assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (out, err)
  assert fragment in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "g")
