"""`python -m dhmd_jax.main` over two processes on this machine (one CPU device each, joined at
localhost:<free port> with gloo collectives), against the same command in one process with two
CPU devices:

- the two-process run writes the same results.json, metrics.jsonl, test predictions and
  checkpoints (array for array: the manifests' CRC32 of every array's values) as the one-process
  run, written by process 0 alone;
- Ctrl-C in process 1 alone stops both at the same point, one line each (status 130); rerun,
  process 1 killed after the next checkpoint: process 0 stops within the peer timeout with one
  line naming process 1 (no traceback, no abort); rerunning both processes resumes and ends with
  what the uninterrupted run wrote.

Mistakes in the distributed flags stop with one line (status 2) before anything starts.
Every run is a real command line in a child process (the distributed runtime is one per
process).
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # for one run (all its processes together)
PEER_TIMEOUT_S = 10  # --distributed_timeout_s of the runs: a killed peer is noticed this late
# The tiny config, three epochs: long enough that a kill after epoch 1 lands mid-run.
FLAGS = ["--config=configs/tiny.py", "--config.train.num_epochs=3"]


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # with conftest's XLA flags and compile cache
  if devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
  return env


def _start(workdir, logs, name, *extra, devices=1):
  out, err = (open(os.path.join(logs, f"{name}.{s}"), "w") for s in ("out", "err"))
  with out, err:
    return subprocess.Popen([sys.executable, "-m", "dhmd_jax.main", *FLAGS,
                             f"--workdir={workdir}", *extra], cwd=REPO, env=_env(devices),
                            stdout=out, stderr=err)


def _start_two(workdir, logs, name):
  """Processes 0 and 1 of one run."""
  common = [f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2",
            f"--distributed_timeout_s={PEER_TIMEOUT_S}"]
  return [_start(workdir, logs, f"{name}{i}", *common, f"--process_id={i}") for i in (0, 1)]


def _read(logs, name, stream):
  with open(os.path.join(logs, f"{name}.{stream}"), errors="replace") as f:
    return f.read()


def _wait(procs, logs, names, timeout=TIMEOUT_S):
  """Waits for every process; kills the rest as soon as one fails or the time runs out.
  Returns the exit codes."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
  codes = [p.returncode for p in procs]
  assert codes == [0] * len(procs), "\n".join(
      f"--- {n}: exit code {c}; stderr tail:\n{_read(logs, n, 'err')[-3000:]}"
      for n, c in zip(names, codes))
  return codes


def _outputs(workdir):
  """What a run wrote, the parts that must agree between runs: results.json (but its wall
  time), metrics.jsonl (but epoch times), the test predictions, and per checkpoint its host
  JSON and the CRC32 of every array (from the manifest process 0 wrote)."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results.pop("wall_time_s"), results.pop("timing_s")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f if line.strip()]
  for record in metrics:
    record.pop("time_s"), record.pop("timing_s")
  with open(os.path.join(workdir, "predictions_test.csv")) as f:
    predictions = f.read()
  checkpoints = {}
  for folder in sorted(glob.glob(os.path.join(workdir, "checkpoints", "latest", "*"))):
    with open(os.path.join(folder, "dhmd_manifest.json")) as f:
      arrays = json.load(f)["arrays"]
    host = {}
    for path in glob.glob(os.path.join(folder, "host", "*")):
      if os.path.basename(path) == "commit_success.txt":  # names its own folder
        continue
      with open(path, "rb") as f:
        host[os.path.basename(path)] = f.read()
    checkpoints[os.path.basename(folder)] = {"arrays": arrays, "host": host}
  return {"results": results, "metrics": metrics, "predictions": predictions,
          "checkpoints": checkpoints}


@pytest.mark.parametrize("args, line", [
    (["--num_processes=2"], "error: --coordinator_address, --num_processes and --process_id go "
                            "together; give all three (or --distributed=auto to read them "
                            "from the cluster)"),
    (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
     "error: --process_id=2 must be below --num_processes=2"),
    (["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=0",
      "--distributed_timeout_s=1"],
     "error: --distributed_timeout_s=1 is too short; give at least 5 seconds"),
    (["--mode=evaluate", "--distributed=auto"],
     "error: --mode=evaluate runs in one process; drop --coordinator_address, --num_processes, "
     "--process_id and --distributed"),
], ids=["incomplete", "process-id", "timeout", "evaluate"])
def test_flag_mistakes_stop_with_one_line_before_anything_starts(args, line, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dhmd_jax.main", *FLAGS,
                         f"--workdir={tmp_path / 'run'}", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert (proc.returncode, proc.stderr, proc.stdout) == (2, line + "\n", "")
  assert not os.path.exists(tmp_path / "run")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(logs folder, {name: workdir}): one process on 2 devices ("one") and two processes
  ("two"), started together."""
  logs = str(tmp_path_factory.mktemp("logs"))
  workdirs = {name: str(tmp_path_factory.mktemp(name)) + "/run" for name in ("one", "two")}
  start = time.monotonic()
  procs = [_start(workdirs["one"], logs, "one", devices=2), *_start_two(workdirs["two"], logs,
                                                                        "two")]
  _wait(procs, logs, ["one", "two0", "two1"])
  print(f"\none process on 2 devices and two processes, side by side: "
        f"{time.monotonic() - start:.1f} s")
  return logs, workdirs


@pytest.mark.slow
def test_two_processes_write_what_one_process_with_two_devices_writes(runs):
  logs, workdirs = runs
  one, two = _outputs(workdirs["one"]), _outputs(workdirs["two"])
  assert sorted(two["checkpoints"]) == ["2", "3"]  # two kept, the last epoch's among them
  assert two["results"]["epochs_run"] == 3
  for part in ("results", "metrics", "predictions", "checkpoints"):
    assert two[part] == one[part], part  # the same numbers, bit for bit
  # Process 0 alone reports (the table and the epoch lines); process 1 prints nothing of it.
  assert "mean ± std" in _read(logs, "two0", "out")
  assert "mean ± std" not in _read(logs, "two1", "out")
  assert "epoch 1/3" not in _read(logs, "two1", "out") + _read(logs, "two1", "err")


def _when_committed(workdir, epoch, procs, logs, names):
  """Waits until the checkpoint of `epoch` is complete (its manifest written)."""
  path = os.path.join(workdir, "checkpoints", "latest", str(epoch), "dhmd_manifest.json")
  deadline = time.monotonic() + TIMEOUT_S
  while not os.path.exists(path):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "\n".join(
        _read(logs, n, "err")[-3000:] for n in names)
    time.sleep(0.05)


def _one_error_line(logs, name):
  err = _read(logs, name, "err")
  assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if not line.startswith("[Gloo]")]
  assert len(lines) == 1, err[-3000:]
  return lines[0]


@pytest.mark.slow
def test_ctrl_c_or_a_killed_process_stops_both_and_the_rerun_resumes_exactly(runs, tmp_path):
  logs, workdirs = runs
  workdir = str(tmp_path / "run")
  # Ctrl-C in process 1 only, after epoch 1: both stop at the same chunk, one line each.
  procs = _start_two(workdir, logs, "ctrl_c")
  _when_committed(workdir, 1, procs, logs, ["ctrl_c0", "ctrl_c1"])
  procs[1].send_signal(signal.SIGINT)
  for p in procs:
    p.wait(timeout=PEER_TIMEOUT_S + 60)
  assert [p.returncode for p in procs] == [130, 130]
  for name in ("ctrl_c0", "ctrl_c1"):
    assert _one_error_line(logs, name).startswith("interrupted "), name
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  # Rerun; process 1 killed after epoch 2: process 0 stops with one line naming it.
  procs = _start_two(workdir, logs, "killed")
  _when_committed(workdir, 2, procs, logs, ["killed0", "killed1"])
  procs[1].send_signal(signal.SIGKILL)  # mid-run: epoch 2 committed, epoch 3 to go
  killed_at = time.monotonic()
  procs[1].wait()
  try:
    procs[0].wait(timeout=PEER_TIMEOUT_S + 60)
  finally:
    procs[0].kill()
  waited = time.monotonic() - killed_at
  assert procs[0].returncode == 1, _read(logs, "killed0", "err")[-3000:]
  line = _one_error_line(logs, "killed0")
  assert line.startswith("error: process 1 has not answered for "), line
  assert "rerun every process's command" in line, line
  assert waited < PEER_TIMEOUT_S + 30, waited
  assert not os.path.exists(os.path.join(workdir, "results.json"))  # it was stopped mid-run
  print(f"\nprocess 0 stopped {waited:.1f} s after process 1 was killed: {line}")

  # Rerun both: it resumes and ends with what the uninterrupted run wrote.
  _wait(_start_two(workdir, logs, "rerun"), logs, ["rerun0", "rerun1"])
  assert "resuming from the checkpoint of epoch 2" in _read(logs, "rerun0", "out")
  resumed, uninterrupted = _outputs(workdir), _outputs(workdirs["one"])
  for part in ("results", "metrics", "predictions", "checkpoints"):
    assert resumed[part] == uninterrupted[part], part
