"""Failures end in the correct result or one clear line: SIGKILL at three points, Ctrl-C,
corrupted checkpoints, a read-only workdir, evaluate/predict with the run's own config.

The kills are real (`os.kill(SIGKILL)` inside a child process, placed by wrapping the function
that runs at that point); every resumed run must equal an uninterrupted one bit for bit: its
report, `evaluate` and `predict`. The trainer's machinery does not depend on the model, so these
runs use `fake_model.FakeModel` (compiles in a second); one test kills and resumes the real
model too (marked slow).
"""

import asyncio
import csv
import json
import os
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

_REAL_BUILD = train_lib.build
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3

# A tiny run (one seed, 3 epochs of two 3-step chunks) in a child process; FAULT=<point>@<n>
# kills it with SIGKILL: "step" after the n-th chunk has run (mid-epoch), "save" during the save
# of epoch n (its files written in the background, the commit not done), "saved" once the
# checkpoint of epoch n is committed (before the next epoch or the report).
CHILD = r"""
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
elif point == "saved":
  real_save = checkpoint.Checkpointer.save
  def save(self, epoch, **kwargs):
    real_save(self, epoch, **kwargs)
    if epoch == at:
      self.wait()
      kill()
  checkpoint.Checkpointer.save = save
train_lib.train_and_evaluate(config, sys.argv[1])
""" % EPOCHS


def _child(workdir, fault=None, real_model=False):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env.pop("FAULT", None)
  env.pop("REAL_MODEL", None)
  if fault:
    env["FAULT"] = fault
  if real_model:
    env["REAL_MODEL"] = "1"
  return subprocess.Popen([sys.executable, "-c", CHILD, str(workdir)], cwd=REPO, env=env,
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
  results.pop("wall_time_s")
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


def test_sigkill_at_three_points_then_resume_equals_uninterrupted_run(straight, tmp_path):
  straight_dir, expected = straight
  # step@5: mid-epoch 3, when epoch 1's checkpoint is surely committed (a save waits for the one
  # before, and saves are asynchronous: at chunk 4 epoch 1's may still be in flight).
  faults = {"step": "step@5", "save": "save@2", "saved": "saved@2"}
  dirs = {name: tmp_path / name for name in faults}
  killed = _wait([_child(dirs[n], f) for n, f in faults.items()])
  for (code, _, stderr), name in zip(killed, faults):
    assert code == -signal.SIGKILL, (name, code, stderr[-2000:])
  during = json.load(open(dirs["save"] / "killed_during_save.json"))
  assert during["tmp_exists"] and not during["final_exists"], during  # mid-save, uncommitted
  resumed = _wait([_child(dirs[n]) for n in faults])
  # The checkpoint each rerun resumes from: the newest committed one at the kill (mid-epoch 3,
  # epoch 2's asynchronous save may or may not have been committed yet).
  resumes_from = {"step": (1, 2), "save": (1,), "saved": (2,)}
  for (code, stdout, stderr), name in zip(resumed, faults):
    assert code == 0, (name, stderr[-3000:])
    assert any(f"resuming from the checkpoint of epoch {e} " in stdout
               for e in resumes_from[name]), (name, stdout)
    assert "Traceback" not in stderr, name
    records = [json.loads(l) for l in open(dirs[name] / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1)), name
    # Every epoch's logged values, the resumed ones included, equal the uninterrupted run's.
    assert _epoch_records(dirs[name]) == _epoch_records(straight_dir), name
    assert _outcome(dirs[name]) == expected, name  # bit for bit: floats compared exactly


def _epoch_records(workdir):
  """metrics.jsonl without its wall times."""
  return [{k: v for k, v in json.loads(l).items() if k != "time_s"}
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


def _copy_run(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst)
  return dst


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


@pytest.mark.slow
def test_the_real_model_resumes_bit_for_bit_after_sigkill_mid_epoch(tmp_path):
  """The same with the real (tiny) DHMD: dropout keys, Adam moments and the selection state all
  come back exactly from a kill in the middle of an epoch."""
  straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
  procs = [_child(straight_dir, real_model=True), _child(killed_dir, "step@5", real_model=True)]
  (code, _, stderr), (killed_code, _, _) = _wait(procs)
  assert code == 0, stderr[-3000:]
  assert killed_code == -signal.SIGKILL
  [(code, stdout, stderr)] = _wait([_child(killed_dir, real_model=True)])
  assert code == 0 and "resuming from the checkpoint of epoch" in stdout, stderr[-3000:]
  assert _outcome(killed_dir, _REAL_BUILD) == _outcome(straight_dir, _REAL_BUILD)
