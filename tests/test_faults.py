"""Failures end in the correct result or one clear line: SIGKILL at four points, Ctrl-C,
damaged checkpoints (every file of one, each way), a full disk at every write site, a workdir
in use by another process, a read-only workdir, evaluate/predict with the run's own config.

The kills are real (`os.kill(SIGKILL)` inside a child process, placed by wrapping the function
that runs at that point); every resumed run must equal an uninterrupted one bit for bit: its
report, `evaluate` and `predict`. The trainer's machinery does not depend on the model, so these
runs use `fake_model.FakeModel` (compiles in a second); one test kills and resumes the real
model too (marked slow).
"""

import asyncio
import csv
import errno
import json
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

import fake_model
from dhmd_jax import checkpoint
from dhmd_jax import evaluate as evaluate_lib
from dhmd_jax import train as train_lib
from dhmd_jax import workdir as workdir_lib

_REAL_BUILD = train_lib.build
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3

# Child scripts that train several workdirs in one process share the first one's set-up (data,
# model, compiled functions: nothing of it depends on the workdir; tracing the real model is most
# of a child's time). `share_set_up()` makes train_and_evaluate reuse it.
SHARE_SET_UP = r"""
def share_set_up():
  import dataclasses
  from dhmd_jax import train as train_lib
  real_set_up, shared = train_lib._set_up, []
  def set_up(config, workdir, loss_weights=None):
    if not shared:
      shared.append(real_set_up(config, workdir, loss_weights))
    return dataclasses.replace(shared[0], workdir=workdir)
  train_lib._set_up = set_up
"""

# A tiny run (one seed, 3 epochs of two 3-step chunks) in a child process; FAULT=<point>@<n>
# kills it with SIGKILL: "step" after the n-th chunk has run (mid-epoch), "save" during the save
# of epoch n (its files written in the background, the commit not done), "committed" once orbax
# has committed the checkpoint of epoch n and before its manifest is written, "saved" once the
# checkpoint of epoch n is complete (before the next epoch or the report).
CHILD = SHARE_SET_UP + r"""
import os, signal, sys
sys.path.insert(0, "tests")
import jax
import fake_model
from configs import tiny
from dhmd_jax import checkpoint, steps, train as train_lib

if os.environ.get("REAL_MODEL"):
  config = tiny.get_config()
else:
  config = fake_model.fake_config()
  fake_model.install()
config.train.seeds = (1111,)
config.train.num_epochs = %d
config.train.steps_per_chunk = 3
point, _, at = os.environ.get("FAULT", "none@0").partition("@")
at = int(at)
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "step":
  real_make = steps.make_run_chunk
  def make(*args, **kwargs):
    run_chunk, calls = real_make(*args, **kwargs), []
    def counted(*a):
      out = run_chunk(*a)
      calls.append(1)
      if len(calls) == at:
        jax.block_until_ready(out)
        kill()
      return out
    return counted
  steps.make_run_chunk = make
elif point == "save":
  # Killed inside orbax's commit of epoch n: every file written to its temporary folder, the
  # rename to the final one not done. What was on disk is recorded first, so the test can see
  # that the kill did land during the save (an orbax that no longer commits this way never
  # kills, and the test fails on the exit status).
  import json
  from orbax.checkpoint._src.path import async_path
  real_rename = async_path.rename
  async def rename(src, dst):
    if os.path.basename(str(dst)) == str(at):
      with open(os.path.join(sys.argv[1], "killed_during_save.json"), "w") as f:
        json.dump({"tmp": str(src), "tmp_exists": os.path.isdir(str(src)),
                   "final_exists": os.path.exists(str(dst))}, f)
      kill()
    return await real_rename(src, dst)
  async_path.rename = rename
elif point == "committed":
  real_write = checkpoint._write_manifest
  def write_manifest(folder, digests):
    if os.path.basename(folder) == str(at):
      kill()
    return real_write(folder, digests)
  checkpoint._write_manifest = write_manifest
elif point == "saved":
  real_save = checkpoint.Checkpointer.save
  def save(self, epoch, **kwargs):
    real_save(self, epoch, **kwargs)
    if epoch == at:
      self.wait()
      kill()
  checkpoint.Checkpointer.save = save
workdirs = sys.argv[1:]
if len(workdirs) > 1:
  # Several runs in this one process, one after the other: they share the first one's set-up
  # (data, model, compiled functions: nothing of it depends on the workdir; tracing the real
  # model is most of a child's time).
  share_set_up()
for workdir in workdirs:
  train_lib.train_and_evaluate(config, workdir)
""" % EPOCHS


def _child(*workdirs, fault=None, real_model=False):
  """`CHILD` training each of `workdirs` in turn (one set-up for all) in a child process."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("FAULT", None)
  env.pop("REAL_MODEL", None)
  if fault:
    env["FAULT"] = fault
  if real_model:
    env["REAL_MODEL"] = "1"
  return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, workdirs)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs):
  out = []
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    out.append((proc.returncode, stdout, stderr))
  return out


def _config():
  config = fake_model.fake_config()
  config.train.seeds = (1111,)
  config.train.num_epochs = EPOCHS
  config.train.steps_per_chunk = 3
  return config


@pytest.fixture(autouse=True)
def _fake_model_here(monkeypatch):
  """In-process runs, evaluate and predict build the FakeModel too."""
  monkeypatch.setattr(train_lib, "build", fake_model.fake_build)


def _outcome(workdir, build=fake_model.fake_build):
  """Everything a user reads from a finished run: report, evaluate and predict."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_lib, "build", build)
    return _read_outcome(workdir)


def _read_outcome(workdir):
  config = evaluate_lib.run_config(str(workdir))
  results = json.load(open(os.path.join(workdir, "results.json")))
  results.pop("wall_time_s"), results.pop("timing_s")
  evaluated = evaluate_lib.evaluate(config, str(workdir), split="test")["per_seed"]
  path = evaluate_lib.predict(config, str(workdir), split="valid",
                              output=os.path.join(workdir, "p.csv"))
  return results, evaluated, list(csv.reader(open(path)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  [(code, _, stderr)] = _wait([_child(workdir)])
  assert code == 0, stderr[-3000:]
  return workdir, _outcome(workdir)


def test_sigkill_at_four_points_then_resume_equals_uninterrupted_run(straight, tmp_path):
  straight_dir, expected = straight
  # step@5: mid-epoch 3, when epoch 1's checkpoint is surely committed (a save waits for the one
  # before, and saves are asynchronous: at chunk 4 epoch 1's may still be in flight).
  faults = {"step": "step@5", "save": "save@2", "committed": "committed@2", "saved": "saved@2"}
  dirs = {name: tmp_path / name for name in faults}
  killed = _wait([_child(dirs[n], fault=f) for n, f in faults.items()])
  for (code, _, stderr), name in zip(killed, faults):
    assert code == -signal.SIGKILL, (name, code, stderr[-2000:])
  during = json.load(open(dirs["save"] / "killed_during_save.json"))
  assert during["tmp_exists"] and not during["final_exists"], during  # mid-save, uncommitted
  committed = dirs["committed"] / "checkpoints" / "latest" / "2"
  assert committed.is_dir() and not (committed / checkpoint.MANIFEST).exists()
  for name in faults:  # the killed run's lock file stays behind, naming it: it blocks nothing
    assert json.load(open(dirs[name] / workdir_lib.LOCK_FILE))["what"] == "training", name
  resumed = _wait([_child(dirs[n]) for n in faults])
  # The checkpoint each rerun resumes from: the newest complete one at the kill (mid-epoch 3,
  # epoch 2's asynchronous save may or may not have been completed yet; one committed without
  # its manifest is not complete).
  resumes_from = {"step": (1, 2), "save": (1,), "committed": (1,), "saved": (2,)}
  for (code, stdout, stderr), name in zip(resumed, faults):
    assert code == 0, (name, stderr[-3000:])
    assert any(f"resuming from the checkpoint of epoch {e} " in stdout
               for e in resumes_from[name]), (name, stdout)
    assert "Traceback" not in stderr, name
    if name == "committed":  # one warning line, the whole of stderr
      assert stderr.strip().splitlines() == [
          f"warning: skipped the unreadable checkpoint {committed} (it has no "
          f"{checkpoint.MANIFEST}: its save did not complete); using the one of epoch 1; the "
          f"unreadable one was moved to "
          f"{next((dirs[name] / 'checkpoints' / 'unreadable').iterdir())}"], stderr[-3000:]
    records = [json.loads(l) for l in open(dirs[name] / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1)), name
    # Every epoch's logged values, the resumed ones included, equal the uninterrupted run's.
    assert _epoch_records(dirs[name]) == _epoch_records(straight_dir), name
    assert _outcome(dirs[name]) == expected, name  # bit for bit: floats compared exactly


def _epoch_records(workdir):
  """metrics.jsonl without its wall times."""
  return [{k: v for k, v in json.loads(l).items() if k not in ("time_s", "timing_s")}
          for l in open(os.path.join(workdir, "metrics.jsonl"))]


# `python -m dhmd_jax.main ARGS`, with the FakeModel and fake_config()'s switches.
# With SLOW_CHUNKS set, every chunk takes a second longer, so that signals land mid-epoch.
MAIN = ("import os, runpy, sys, time; sys.path.insert(0, 'tests'); import fake_model; "
        "fake_model.install(); sys.argv[0] = 'dhmd_jax.main'\n"
        "if os.environ.get('SLOW_CHUNKS'):\n"
        "  from dhmd_jax import steps\n"
        "  make = steps.make_run_chunk\n"
        "  def slow(*a, **k):\n"
        "    run = make(*a, **k)\n"
        "    return lambda *x: (time.sleep(1.0), run(*x))[1]\n"
        "  steps.make_run_chunk = slow\n"
        "runpy.run_module('dhmd_jax.main', run_name='__main__', alter_sys=True)")
FAKE_SWITCHES = ("--config.model.arch=mult", "--config.model.use_gd=False",
                 "--config.model.use_dm=False")


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(straight, tmp_path, presses):
  """One Ctrl-C: stop at the next chunk, one line, status 130. Two: exit at once, one line."""
  _, expected = straight
  cmd = [sys.executable, "-c", MAIN, "--config=configs/tiny.py", *FAKE_SWITCHES,
         f"--workdir={tmp_path}", "--config.train.seeds=(1111,)",
         f"--config.train.num_epochs={EPOCHS}", "--config.train.steps_per_chunk=3"]
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env, SLOW_CHUNKS="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  latest = tmp_path / "checkpoints" / "latest"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if latest.is_dir() and any(p.name == "1" for p in latest.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be interrupted"
  if presses == 1:  # meanwhile the run holds its workdir: a second one stops at once
    with pytest.raises(workdir_lib.Busy, match=f"in use: training by pid {proc.pid} on "):
      train_lib.train_and_evaluate(_config(), str(tmp_path))
  for press in range(presses):
    if press:
      time.sleep(0.3)  # signals arriving together reach Python's handler as one
    proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("interrupted "), stderr[-3000:]
  assert "rerun the same command to resume" in lines[0]
  if presses == 2:
    assert lines[0].startswith("interrupted twice")
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resuming from the checkpoint of epoch" in rerun.stdout
  assert _outcome(tmp_path) == expected


def _copy_run(src, dst, *, state_only=False):
  """A copy of the run in `src`; `state_only`: only what a rerun resumes from (checkpoints,
  config.json, metrics.jsonl), not its data or outputs (the rerun then reads `_data(src)`)."""
  keep = ("checkpoints", "config.json", "metrics.jsonl")
  ignore = (lambda folder, names: [n for n in names if n not in keep]
            if state_only and os.path.samefile(folder, src) else [])
  shutil.copytree(src, dst, ignore=ignore)
  return dst


def _data(workdir):
  """The synthetic data file a run of `_child` generated into its workdir."""
  [path] = (workdir / "data").glob("*.pkl")
  return path


def test_a_corrupted_newest_checkpoint_is_skipped_with_one_warning(straight, tmp_path, capsys):
  src, expected = straight
  latest = src / "checkpoints" / "latest"
  assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [2, 3]

  # A truncated host JSON and, separately, truncated array files: the run falls back to epoch
  # 2, retrains epoch 3, and ends exactly like the uninterrupted run.
  # Damage is found from the size and CRC32 recorded in each checkpoint's manifest before orbax
  # reads anything; without a manifest (a kill between a save's commit and its manifest),
  # orbax's failure to read decides: that case runs as its own process, whose whole stderr must
  # be the one warning (orbax giving up used to leave dozens of "Event loop is closed"
  # tracebacks there, printed by Python's unraisable-exception hook after the fact).
  for name, damage in (("json", "host"), ("arrays", "arrays"), ("no_manifest", "arrays")):
    workdir = _copy_run(src, tmp_path / name)
    newest = workdir / "checkpoints" / "latest" / "3"
    assert (newest / checkpoint.MANIFEST).exists()
    if name == "no_manifest":
      os.remove(newest / checkpoint.MANIFEST)
    if damage == "host":
      files = [p for p in (newest / "host").rglob("*") if p.is_file()]
    else:
      files = [p for p in (newest / "arrays").rglob("*") if p.is_file()
               and p.stat().st_size > 64 and not p.name.endswith(".json")
               and "_METADATA" not in p.name and "commit_success" not in p.name]
    assert files, damage
    for f in files:
      f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    os.remove(workdir / "results.json")
    if name == "no_manifest":
      [(code, _, err)] = _wait([_child(workdir)])
      assert code == 0, err[-3000:]
      assert len(err.strip().splitlines()) == 1, err[-3000:]
    else:
      capsys.readouterr()
      train_lib.train_and_evaluate(_config(), str(workdir))
      err = capsys.readouterr().err
    warnings = [l for l in err.splitlines() if l.startswith("warning: skipped the unreadable")]
    assert len(warnings) == 1 and str(newest) in warnings[0], err[-2000:]
    assert list((workdir / "checkpoints" / "unreadable").iterdir())  # kept for inspection
    assert _outcome(workdir) == expected, name

  # Nothing readable: one line, and nothing is deleted.
  workdir = _copy_run(src, tmp_path / "none")
  for epoch in ("2", "3"):
    for f in (workdir / "checkpoints" / "latest" / epoch / "host").rglob("*"):
      if f.is_file():
        f.write_bytes(b"{")
  with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint") as info:
    train_lib.train_and_evaluate(_config(), str(workdir))
  assert "\n" not in str(info.value)
  assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()
                if p.name.isdigit()) == ["2", "3"]


def test_evaluate_uses_the_runs_config_and_rejects_conflicts(straight):
  workdir, expected = straight
  given = fake_model.fake_config()  # the command's config: two seeds, another epoch count
  config = evaluate_lib.run_config(str(workdir), given=given,
                                   explicit={"train.eval_batch_size"})
  assert list(config.train.seeds) == [1111] and config.train.num_epochs == EPOCHS
  given.train.eval_batch_size = 16  # allowed to differ
  config = evaluate_lib.run_config(str(workdir), given=given, explicit={"train.eval_batch_size"})
  assert config.train.eval_batch_size == 16
  evaluated = evaluate_lib.evaluate(config, str(workdir), split="test")["per_seed"]
  assert evaluated == expected[1]  # the batch size of prediction does not change a result
  with pytest.raises(train_lib.TrainingError,
                     match=r"train.seeds=\[1111, 1112\] differs from the run .*\[1111\]"):
    evaluate_lib.run_config(str(workdir), given=given, explicit={"train.seeds"})
  with pytest.raises(train_lib.TrainingError, match="differs from the run"):
    evaluate_lib.run_config(str(workdir), given=given, explicit={"<file>"})
  with pytest.raises(train_lib.TrainingError, match="config.json not found"):
    evaluate_lib.run_config(str(workdir / "nowhere"))


def test_evaluate_and_predict_via_the_command_line_without_repeating_overrides(straight):
  workdir, expected = straight
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-c", MAIN, f"--workdir={workdir}"]
  out = subprocess.run(base + ["--mode=predict", "--split=valid",
                               f"--output={workdir}/cli.csv"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert list(csv.reader(open(workdir / "cli.csv"))) == expected[2]
  bad = subprocess.run(base + ["--mode=evaluate", "--config=configs/tiny.py",
                               "--config.train.seeds=(1111,1112)", *FAKE_SWITCHES],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  lines = [l for l in bad.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "train.seeds" in lines[0] and "differs from the run" in lines[0]


def test_unwritable_workdir_stops_before_any_work(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(train_lib.TrainingError, match="cannot write to the workdir"):
    train_lib.train_and_evaluate(_config(), str(blocker / "run"))
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  if not os.access(ro, os.W_OK):  # root writes through permission bits: test_read_only.py
    with pytest.raises(train_lib.TrainingError, match="cannot write to the workdir"):
      train_lib.train_and_evaluate(_config(), str(ro))
    assert os.listdir(ro) == []
  ro.chmod(0o755)
  # Read-only file systems report EROFS when the write test creates its file.
  real = train_lib.tempfile.NamedTemporaryFile

  def read_only(*args, **kwargs):
    raise OSError(30, "Read-only file system")
  monkeypatch.setattr(train_lib.tempfile, "NamedTemporaryFile", read_only)
  with pytest.raises(train_lib.TrainingError, match="Read-only file system"):
    train_lib.train_and_evaluate(_config(), str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  monkeypatch.setattr(train_lib.tempfile, "NamedTemporaryFile", real)


def test_a_run_that_fails_at_start_leaves_no_workdir(tmp_path):
  config = _config()
  config.train.batch_size = 1000  # more than the 96 training samples
  workdir = tmp_path / "fresh"
  with pytest.raises(train_lib.TrainingError, match="fewer than one optimizer step"):
    train_lib.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_a_checkpoint_of_another_model_is_refused_not_skipped(straight, tmp_path):
  """A readable checkpoint whose arrays do not fit the model (another config or version) is
  an error naming it, never mistaken for damage: nothing is skipped or moved."""
  src, _ = straight
  workdir = _copy_run(src, tmp_path / "other")
  config = _config()  # the checkpoint holds FakeModel parameters; restore DHMD's
  ckpt = checkpoint.Checkpointer(str(workdir))
  try:
    run_model = _REAL_BUILD(config, None)
    import jax  # pylint: disable=g-import-not-at-top
    from dhmd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from dhmd_jax import steps  # pylint: disable=g-import-not-at-top
    dataset = data_lib.load_dataset(config.dataset, workdir=str(workdir))
    sample = jax.tree.map(lambda a: a[:8],
                          data_lib.split_arrays(dataset.splits["train"], "regression"))
    abstract = jax.eval_shape(jax.vmap(lambda k: steps.init_state(config, run_model, sample, k)),
                              train_lib.seed_keys([1111])[0])
    with pytest.raises(checkpoint.CheckpointError, match="another structure") as info:
      ckpt.restore(state=abstract, best_params=abstract.params)
  finally:
    ckpt.close()
  assert "\n" not in str(info.value) and str(workdir / "checkpoints" / "latest" / "3") in str(
      info.value)
  assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()
                if p.name.isdigit()) == ["2", "3"]
  assert not (workdir / "checkpoints" / "unreadable").exists()


def test_only_the_closed_event_loop_noise_is_dropped():
  """The hook checkpoint.py installs drops orbax's late callbacks into its closed event loop
  and passes every other unraisable exception on."""
  seen = []
  hook = checkpoint._DropClosedLoopCallbacks(seen.append)  # pylint: disable=protected-access
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as error:
    closed = error
  other = RuntimeError("Event loop is closed")  # the same text, not from the closed loop
  different = ValueError("x")
  for error in (closed, other, different):
    hook(types.SimpleNamespace(exc_type=type(error), exc_value=error, object=None,
                               exc_traceback=error.__traceback__, err_msg=None))
  assert [u.exc_value for u in seen] == [other, different]

  async def _read_array_index_and_device_put():  # orbax's read coroutine, by name
    pass

  async def another_coroutine():
    pass

  failed = Exception("Encountered error while reading array index")
  for function in (_read_array_index_and_device_put, another_coroutine):
    coroutine = function()
    hook(types.SimpleNamespace(exc_type=Exception, exc_value=failed, object=coroutine,
                               exc_traceback=None, err_msg=None))
    coroutine.close()
  assert [u.object.cr_code.co_name for u in seen[2:]] == ["another_coroutine"]


@pytest.mark.slow
def test_the_real_model_resumes_bit_for_bit_after_sigkill_mid_epoch(tmp_path):
  """The same with the real (tiny) DHMD: dropout keys, Adam moments and the selection state all
  come back exactly from a kill in the middle of an epoch.

  Two children, not three: the killed run, then one process that resumes it and afterwards
  trains the uninterrupted run (the resume first, so it starts from a process that has run
  nothing else; the second run shares its set-up, the model traced once: most of a child's time,
  and the killed run left the compiled programs in the session's compilation cache)."""
  straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
  [(killed_code, _, stderr)] = _wait([_child(killed_dir, fault="step@5", real_model=True)])
  assert killed_code == -signal.SIGKILL, stderr[-3000:]
  [(code, stdout, stderr)] = _wait([_child(killed_dir, straight_dir, real_model=True)])
  assert code == 0, stderr[-3000:]
  # The resume says so; the uninterrupted run, in a fresh workdir, has nothing to resume.
  assert stdout.count("resuming from the checkpoint of epoch") == 1, stdout[-3000:]
  assert _outcome(killed_dir, _REAL_BUILD) == _outcome(straight_dir, _REAL_BUILD)


# ----------------------------------------------------------------------------- damaged files

# Reruns of damaged copies of the uninterrupted run, several per child process: the whole stderr
# of each case (file descriptor 2: Python's, orbax's and tensorstore's threads') goes to a file of
# its own. A child's cases share its set-up (data, model, compiled functions: nothing of it
# depends on the workdir), so a case costs its restore, one epoch and the report. Before each
# case the `warnings` registry is reset (a warning shown once per process would hide in a later
# case), after it garbage is collected (late "Exception ignored" reports land in its own file).
BATCH = SHARE_SET_UP + r"""
import dataclasses, gc, json, os, sys, time, warnings
sys.path.insert(0, "tests")
import fake_model
from dhmd_jax import train as train_lib
fake_model.install()
config = fake_model.fake_config()
config.train.seeds = (1111,)
config.train.num_epochs = %d
config.train.steps_per_chunk = 3
config.dataset.path = sys.argv[1]
share_set_up()
outcomes = {}
for workdir in sys.argv[3:]:
  fd = os.open(workdir + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  saved = os.dup(2)
  os.dup2(fd, 2)
  try:
    with warnings.catch_warnings():
      train_lib.train_and_evaluate(config, workdir)
    outcomes[workdir] = "ok"
  except BaseException as error:
    outcomes[workdir] = repr(error)
  time.sleep(0.05)
  gc.collect()
  sys.stderr.flush()
  os.dup2(saved, 2)
  os.close(saved)
  os.close(fd)
with open(sys.argv[2], "w") as f:
  json.dump(outcomes, f)
""" % EPOCHS

DAMAGES = {"truncated": lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 3]),
           "emptied": lambda p: p.write_bytes(b""),
           "deleted": os.remove}
MANIFEST_CASES = ("with its manifest", "without a manifest")


@pytest.fixture(scope="module")
def damaged_reruns(straight, tmp_path_factory):
  """Every file of the uninterrupted run's newest checkpoint, truncated, emptied and deleted,
  with the manifest and without it, each in a copy of the run, rerun: ([files], {(manifest,
  damage, file): (outcome, whole stderr, workdir)})."""
  src, _ = straight
  newest = src / "checkpoints" / "latest" / "3"
  files = sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file())
  root = tmp_path_factory.mktemp("damaged")
  cases = {}
  for manifest in MANIFEST_CASES:
    for damage, apply in DAMAGES.items():
      for rel in files:
        if manifest == MANIFEST_CASES[1] and rel == checkpoint.MANIFEST:
          continue
        workdir = _copy_run(src, root / f"case{len(cases)}", state_only=True)
        target = workdir / "checkpoints" / "latest" / "3"
        if manifest == MANIFEST_CASES[1]:
          os.remove(target / checkpoint.MANIFEST)
        apply(target / rel)
        cases[(manifest, damage, rel)] = workdir
  dirs = [str(w) for w in cases.values()]
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", BATCH, str(_data(src)),
                             str(root / f"outcomes{i}.json"), *dirs[i::2]],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outcomes = {}
  for i, proc in enumerate(procs):
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    outcomes.update(json.load(open(root / f"outcomes{i}.json")))
  return files, {key: (outcomes[str(w)], open(f"{w}.stderr").read(), w)
                 for key, w in cases.items()}


def _report(workdir):
  """What a finished run wrote: results.json (no wall time), the epoch records, predictions."""
  results = json.load(open(os.path.join(workdir, "results.json")))
  results.pop("wall_time_s"), results.pop("timing_s")
  return (results, _epoch_records(workdir),
          list(csv.reader(open(os.path.join(workdir, "predictions_test.csv")))))


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("manifest", MANIFEST_CASES)
def test_any_file_of_a_checkpoint_damaged_costs_one_warning_line_and_nothing_else(
    straight, damaged_reruns, manifest, damage):
  """Each file of a real checkpoint (enumerated, so a new orbax layout is covered too):
  the rerun falls back to the checkpoint before, ends bit for bit as the uninterrupted run,
  and its whole stderr is the one warning line naming the damaged checkpoint."""
  src, _ = straight
  files, cases = damaged_reruns
  # The enumeration saw a whole checkpoint: array data and metadata, the host JSON, orbax's own
  # metadata, the manifest.
  assert checkpoint.MANIFEST in files and "_CHECKPOINT_METADATA" in files, files
  assert any(f.startswith("host" + os.sep) for f in files), files
  assert sum(f.startswith("arrays" + os.sep) for f in files) >= 4, files
  expected = _report(src)
  wrong = []
  for rel in files:
    if (manifest, damage, rel) not in cases:  # the manifest itself, removed already
      continue
    outcome, err, workdir = cases[(manifest, damage, rel)]
    newest = workdir / "checkpoints" / "latest" / "3"
    lines = err.splitlines()
    if outcome != "ok":
      wrong.append((rel, outcome, err[-1000:]))
    elif len(lines) != 1 or not lines[0].startswith(
        f"warning: skipped the unreadable checkpoint {newest} ("):
      wrong.append((rel, f"{len(lines)} lines on stderr", err[:1500]))
    elif not lines[0].endswith(f"; using the one of epoch 2; the unreadable one was moved to "
                               f"{next((workdir / 'checkpoints' / 'unreadable').iterdir())}"):
      wrong.append((rel, lines[0]))
    elif _report(workdir) != expected:
      wrong.append((rel, "the rerun differs from the uninterrupted run"))
  assert not wrong, wrong


def test_a_workdir_without_any_manifest_is_read_as_before_and_quietly(straight, tmp_path):
  """Checkpoints of a version before manifests: orbax's reading decides, and when it gives up
  on a damaged array file, stderr is still the one warning line (its failed read coroutines
  used to follow it by the thousand lines, some of the time: each damage runs twice)."""
  src, _ = straight
  workdirs = []
  for apply in list(DAMAGES.values()) * 2:
    workdir = _copy_run(src, tmp_path / f"old{len(workdirs)}", state_only=True)
    latest = workdir / "checkpoints" / "latest"
    for manifest in latest.glob(f"*/{checkpoint.MANIFEST}"):
      os.remove(manifest)
    apply(max((p for p in (latest / "3" / "arrays").rglob("*") if p.is_file()),
              key=lambda p: p.stat().st_size))
    workdirs.append(workdir)
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", BATCH, str(_data(src)),
                         str(tmp_path / "outcomes.json"), *map(str, workdirs)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(tmp_path / "outcomes.json")) == {str(w): "ok" for w in workdirs}
  for workdir in workdirs:
    lines = open(f"{workdir}.stderr").read().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"warning: skipped the unreadable checkpoint {workdir / 'checkpoints' / 'latest' / '3'} ("
    ), (workdir.name, len(lines), lines[:20])
    assert _report(workdir) == _report(src)


def test_the_manifest_reads_no_large_file_back_and_changed_values_are_still_found(
    tmp_path, monkeypatch, capsys):
  """The manifest of a save is written from the host arrays and the files' sizes: no file
  larger than SMALL_FILE is opened (here every file counts as large). Values read that differ
  from those written are found from their CRC32 once orbax has read them; a byte changed in an
  array file, its size kept, is found (by orbax's decoding or by those CRC32s)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpoint, "SMALL_FILE", 0)
  opened = []
  real_open = open

  def recording_open(path, mode="r", *args, **kwargs):
    if "w" not in mode and str(path).startswith(str(tmp_path)):
      opened.append(path)
    return real_open(path, mode, *args, **kwargs)
  monkeypatch.setattr(checkpoint, "open", recording_open, raising=False)
  state = {"w": np.arange(5000, dtype=np.float32), "v": np.ones((30, 7), np.float32)}
  best = {"w": np.arange(5000, dtype=np.float32) * 2}
  real_digests = checkpoint._array_digests  # pylint: disable=protected-access

  def written_otherwise(tree):  # the manifest of what orbax wrote, but for one value
    digests = real_digests(tree)
    digests["['best_params']['w']"][2] ^= 1
    return digests
  for name, digests in (("changed", written_otherwise), ("flipped", real_digests)):
    folder = tmp_path / name
    opened.clear()
    ckpt = checkpoint.Checkpointer(str(folder))
    for epoch in (1, 2):
      monkeypatch.setattr(checkpoint, "_array_digests", digests if epoch == 2 else real_digests)
      ckpt.save(epoch, state=state, best_params=best, host={"epoch": epoch})
      ckpt.wait()
    ckpt.close()
    monkeypatch.setattr(checkpoint, "_array_digests", real_digests)
    assert not opened, opened
    latest = folder / "checkpoints" / "latest"
    manifest = json.load(open(latest / "2" / checkpoint.MANIFEST))
    assert all(crc is None for _, crc in manifest["files"].values())
    assert sorted(manifest["arrays"]) == ["['best_params']['w']", "['state']['v']",
                                          "['state']['w']"]
    if name == "flipped":
      biggest = max((p for p in (latest / "2" / "arrays").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
      data = bytearray(biggest.read_bytes())
      data[len(data) // 2] ^= 0x10
      biggest.write_bytes(bytes(data))
    ckpt = checkpoint.Checkpointer(str(folder))
    epoch, arrays, host = ckpt.restore(state=state, best_params=best)
    ckpt.close()
    assert (epoch, host) == (1, {"epoch": 1}), name
    assert np.array_equal(arrays["best_params"]["w"], best["w"])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: skipped the unreadable checkpoint {latest / '2'} ("), line
    if name == "changed":
      assert "(the array ['best_params']['w'] differs from what was written (CRC32 mismatch))" in (
          line), line


def test_a_workdir_in_use_stops_a_second_run_at_once_and_readers_run_beside_it(
    straight, tmp_path, capsys):
  """A second training on a workdir another process holds stops before touching anything:
  one line naming the holder, exit status `workdir.BUSY_STATUS`. Evaluate and predict beside
  it read its newest complete checkpoint (never one being written) and say so; with none yet,
  one line says why not. Once the holder is killed (SIGKILL), the run goes on."""
  from test_workdir import holder  # pylint: disable=g-import-not-at-top
  src, expected = straight
  workdir = _copy_run(src, tmp_path / "run")
  latest = workdir / "checkpoints" / "latest"
  shutil.copytree(latest / "3", latest / "4.orbax-checkpoint-tmp")  # a save being written
  os.remove(workdir / "results.json")
  before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*") if p.is_file()}
  proc = holder(workdir, "training")
  try:
    cmd = [sys.executable, "-c", MAIN, "--config=configs/tiny.py", *FAKE_SWITCHES,
           f"--workdir={workdir}", "--config.train.seeds=(1111,)",
           f"--config.train.num_epochs={EPOCHS}", "--config.train.steps_per_chunk=3"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    busy = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert busy.returncode == workdir_lib.BUSY_STATUS, busy.stderr[-3000:]
    [line] = busy.stderr.strip().splitlines()
    assert line.startswith(f"error: {workdir} is in use: training by pid {proc.pid} on "), line
    assert ", started " in line and line.endswith("or use another --workdir"), line
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*")
             if p.is_file() and p.name != workdir_lib.LOCK_FILE}
    assert after == before  # nothing touched

    capsys.readouterr()
    config = evaluate_lib.run_config(str(workdir))
    assert evaluate_lib.evaluate(config, str(workdir), split="test")["per_seed"] == expected[1]
    path = evaluate_lib.predict(config, str(workdir), split="valid",
                                output=str(workdir / "p.csv"))
    assert list(csv.reader(open(path))) == expected[2]
    record = json.load(open(workdir / workdir_lib.LOCK_FILE))
    assert record["pid"] == proc.pid
    assert capsys.readouterr().err.strip().splitlines() == [
        f"note: {workdir} is in use ({workdir_lib.describe(record)}); reading its newest "
        f"complete checkpoint, of epoch 3"] * 2

    shutil.rmtree(latest / "2")
    shutil.rmtree(latest / "3")
    with pytest.raises(train_lib.TrainingError, match=(
        rf"has no checkpoint yet: it is in use \(training by pid {proc.pid} .*\); rerun once "
        r"its first epoch has ended$")):
      evaluate_lib.evaluate(config, str(workdir), split="test")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  shutil.rmtree(workdir)
  workdir = _copy_run(src, tmp_path / "run")
  os.remove(workdir / "results.json")
  killed = holder(workdir, "training")
  killed.kill()  # SIGKILL: the lock goes with the process
  killed.wait()
  train_lib.train_and_evaluate(_config(), str(workdir))
  assert _outcome(workdir) == expected


# ----------------------------------------------------------------------------- a full disk


def _no_space(path=None):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class _FullDisk:
  """A file whose writes fail as on a full disk."""

  def __init__(self, f):
    self._f = f

  def write(self, *args):
    raise _no_space()

  writelines = write

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()

  def __getattr__(self, name):
    return getattr(self._f, name)


def _full_disk_for(monkeypatch, name):
  """Writes through reporting.py to the file `name` fail as on a full disk."""
  import builtins  # pylint: disable=g-import-not-at-top
  from dhmd_jax import reporting  # pylint: disable=g-import-not-at-top

  def failing_open(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    return _FullDisk(f) if os.path.basename(path) == name and mode[0] in "wa" else f
  monkeypatch.setattr(reporting, "open", failing_open, raising=False)


def _fail_checkpoint_commit(monkeypatch):
  """Orbax's commit of epoch 3 (in its background thread) fails as on a full disk."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  real_rename = async_path.rename

  async def rename(src, dst):
    if os.path.basename(str(dst)) == "3":
      raise _no_space(str(dst))
    return await real_rename(src, dst)
  monkeypatch.setattr(async_path, "rename", rename)


def _fail_checkpoint_save_call(monkeypatch):
  """Orbax's save call itself fails as on a full disk."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def save(self, step, *args, **kwargs):
    raise _no_space(str(self.directory))
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def _fail_manifest(monkeypatch):
  def write_manifest(folder, digests):
    raise _no_space(os.path.join(folder, checkpoint.MANIFEST + ".tmp"))
  monkeypatch.setattr(checkpoint, "_write_manifest", write_manifest)


def _fail_tensorboard(monkeypatch):
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  def flush(self):
    raise _no_space(self.path)
  monkeypatch.setattr(record_writer.RecordWriter, "flush", flush)


CHECKPOINT_LINE = ("cannot write the checkpoint of epoch 3 into {latest} (No space left on "
                   "device); the checkpoints before it are intact: free space on its file system "
                   "(or make it writable) and rerun the same command to resume")
WRITE_LINE = ("cannot write {path} (No space left on device); free space on its file system (or "
              "make it writable) and rerun the same command")
# Write site: (how to make it fail, "epoch" (it fails in epoch 3, resumed from epoch 2) or
# "report" (in the final report of the finished run), the file the line names).
WRITE_SITES = {
    "checkpoint commit": (_fail_checkpoint_commit, "epoch", None),
    "checkpoint save call": (_fail_checkpoint_save_call, "epoch", None),
    "manifest": (_fail_manifest, "epoch", None),
    "config.json": (lambda m: _full_disk_for(m, "config.json.tmp"), "epoch", "config.json"),
    "metrics.jsonl": (lambda m: _full_disk_for(m, "metrics.jsonl"), "epoch", "metrics.jsonl"),
    "tensorboard": (_fail_tensorboard, "epoch", os.path.join("tensorboard", "seed_1111")),
    "results.json": (lambda m: _full_disk_for(m, "results.json.tmp"), "report", "results.json"),
    "results.md": (lambda m: _full_disk_for(m, "results.md.tmp"), "report", "results.md"),
    "predictions": (lambda m: _full_disk_for(m, "predictions_test.csv.tmp"), "report",
                    "predictions_test.csv"),
}


@pytest.mark.parametrize("site", list(WRITE_SITES))
def test_a_full_disk_at_each_write_site_is_one_line_and_the_rerun_resumes(
    straight, tmp_path, monkeypatch, capsys, site):
  """A write that fails (ENOSPC) ends the run with one line naming the path and what to do,
  nothing else on stderr; the checkpoints before it stay complete, and the same command then
  resumes and ends bit for bit as the uninterrupted run."""
  src, _ = straight
  inject, when, name = WRITE_SITES[site]
  workdir = _copy_run(src, tmp_path / "run", state_only=True)
  latest = workdir / "checkpoints" / "latest"
  if when == "epoch":
    shutil.rmtree(latest / "3")
  committed = lambda: sorted(p.name for p in latest.iterdir() if p.name.isdigit())
  kept = committed()
  config = _config()
  config.dataset.path = str(_data(src))
  config.log.tensorboard = site == "tensorboard"
  capsys.readouterr()
  with pytest.MonkeyPatch.context() as patch:
    inject(patch)
    with pytest.raises((checkpoint.CheckpointError, workdir_lib.WriteError)) as info:
      train_lib.train_and_evaluate(config, str(workdir))
  line = str(info.value)
  if name is None:
    assert line == CHECKPOINT_LINE.format(latest=latest)
  else:
    assert line == WRITE_LINE.format(path=workdir / name)
  assert capsys.readouterr().err == ""
  assert committed() == kept  # (a failed save's temporary folder goes at the next start)
  for epoch in kept:
    assert checkpoint._check_files(str(latest / epoch), legacy=False)[1] is None
  train_lib.train_and_evaluate(config, str(workdir))
  assert _report(workdir) == _report(src)


@pytest.mark.parametrize("mode", ["evaluate", "predict"])
def test_a_full_disk_under_evaluate_and_predict_is_one_line(straight, tmp_path, monkeypatch,
                                                           mode):
  src, expected = straight
  workdir = _copy_run(src, tmp_path / "run")
  config = evaluate_lib.run_config(str(workdir))
  name = "eval_test_best.json" if mode == "evaluate" else "predictions_test_best.csv"
  if (workdir / name).exists():
    os.remove(workdir / name)
  with pytest.MonkeyPatch.context() as patch:
    _full_disk_for(patch, name + ".tmp")
    with pytest.raises(workdir_lib.WriteError) as info:
      getattr(evaluate_lib, mode)(config, str(workdir), split="test")
  assert str(info.value) == WRITE_LINE.format(path=workdir / name)
  assert not (workdir / name).exists() and not (workdir / (name + ".tmp")).exists()
  result = getattr(evaluate_lib, mode)(config, str(workdir), split="test")
  if mode == "evaluate":
    assert result["per_seed"] == expected[1]
  assert (workdir / name).exists()


def test_a_real_write_error_from_orbax_is_one_line_and_the_rerun_resumes(straight, tmp_path):
  """An OS error inside orbax's and tensorstore's own writes (files limited to 6 KiB with
  RLIMIT_FSIZE: the checkpoint's array metadata and data cannot be written, EFBIG, as ENOSPC
  would be): the command ends with one line and status 1, orbax's tracebacks from its threads do
  not reach stderr, and the same command without the limit resumes."""
  src, _ = straight
  limit = 6144
  workdir = _copy_run(src, tmp_path / "run", state_only=True)
  latest = workdir / "checkpoints" / "latest"
  shutil.rmtree(latest / "3")
  assert os.path.getsize(latest / "2" / "arrays" / "_METADATA") > limit
  assert max(os.path.getsize(src / n) for n in ("config.json", "metrics.jsonl")) < limit
  args = ["--config=configs/tiny.py", *FAKE_SWITCHES, f"--workdir={workdir}",
          "--config.train.seeds=(1111,)", f"--config.dataset.path={_data(src)}",
          f"--config.train.num_epochs={EPOCHS}", "--config.train.steps_per_chunk=3"]
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  limited = ("import resource, signal\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
  # The limit holds for every file of the process: the session's compilation cache
  # (conftest.py) is still read, but nothing is written to it (its entries are larger than the
  # limit, and a failed cache write is a warning on stderr that is not the run's).
  failed = subprocess.run([sys.executable, "-c", limited + MAIN, *args], cwd=REPO,
                          env=dict(env, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1e9"),
                          capture_output=True, text=True, timeout=600)
  assert failed.returncode == 1, failed.stderr[-3000:]
  assert failed.stderr.strip().splitlines() == [
      "error: " + CHECKPOINT_LINE.format(latest=latest).replace("No space left on device",
                                                                os.strerror(errno.EFBIG))]
  assert sorted(p.name for p in latest.iterdir() if p.name.isdigit()) == ["2"]
  rerun = subprocess.run([sys.executable, "-c", MAIN, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resuming from the checkpoint of epoch 2 " in rerun.stdout
  assert _report(workdir) == _report(src)


def test_a_checkpoint_removed_while_a_reader_reads_it_is_no_damage(straight, tmp_path, capsys):
  """A reader beside a training (which keeps two checkpoints) may see the one it reads removed:
  it lists them again and reads the newest, with nothing on stderr."""
  src, expected = straight
  workdir = _copy_run(src, tmp_path / "run")
  real = checkpoint.Checkpointer._restore_arrays
  calls = []

  def removed_while_read(self, epoch, target, manifest):
    calls.append(epoch)
    if len(calls) == 1:  # the training beside removes it meanwhile
      shutil.copytree(workdir / "checkpoints" / "latest" / "3",
                      workdir / "checkpoints" / "latest" / "4")
      shutil.rmtree(workdir / "checkpoints" / "latest" / str(epoch))
      raise ValueError("NOT_FOUND: Error reading ... (removed)")
    return real(self, epoch, target, manifest)
  capsys.readouterr()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoint.Checkpointer, "_restore_arrays", removed_while_read)
    config = evaluate_lib.run_config(str(workdir))
    assert evaluate_lib.evaluate(config, str(workdir), split="test")["per_seed"] == expected[1]
  assert calls == [3, 4]
  assert capsys.readouterr().err == ""


def test_asyncio_reports_of_failed_orbax_reads_and_writes_are_dropped_and_others_kept():
  """asyncio's "Task exception was never retrieved" for orbax's read of a damaged checkpoint, or
  for a tensorstore write that failed at the OS level in a save already reported as failed, is
  noise after the one line; the same report for any other task still reaches stderr."""
  checkpoint._quiet_orbax()
  logger = logging.getLogger("asyncio")
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  logger.addHandler(handler)
  try:
    orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "_src", "serialization",
                              "serialization.py")
    logger.error("Task exception was never retrieved\nfuture: <Task finished coro=<"
                 f"_read_array_index_and_device_put() done, defined at {orbax_file}:272>>")
    logger.error("Future exception was never retrieved\nfuture: <Future finished exception="
                 "ValueError('OUT_OF_RANGE: Error reading \"x/0.0\" in OCDBT database at local "
                 "file ...')>")
    # (the text tensorstore gives a write that a file-size limit stops)
    logger.error("Future exception was never retrieved\nfuture: <Future finished exception="
                 "ValueError('OUT_OF_RANGE: Error writing \"0\" in OCDBT database at local file "
                 "\"/run/checkpoints/latest/3/arrays/\": Failed writing: ...: File too large "
                 "[os_error_code=\\'27\\']')>")
    logger.error("Future exception was never retrieved\nfuture: <Future finished exception="
                 "ValueError('INTERNAL: Error writing \"0\": unexpected')>")
    logger.error("Task exception was never retrieved\nfuture: <Task finished coro=<mine() done>>")
  finally:
    logger.removeHandler(handler)
  assert stream.getvalue() == ("Future exception was never retrieved\n"
                               "future: <Future finished exception=ValueError('INTERNAL: Error "
                               "writing \"0\": unexpected')>\n"
                               "Task exception was never retrieved\n"
                               "future: <Task finished coro=<mine() done>>\n")
