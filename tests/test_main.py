"""The command line: every mistake is one line `error: ...` on stderr and exit status 2 (no
traceback, nothing from absl), --help shows where fields are documented. Each case runs
`python -m dhmd_jax.main` in a subprocess and fails before any data is read or model built."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=configs/tiny.py"


def _run(*args, code=None, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "dhmd_jax.main", *args] if code is None else [
      sys.executable, "-c", code, *args]
  return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _one_error_line(proc, status=2):
  assert proc.returncode == status, (proc.returncode, proc.stderr)
  assert "Traceback" not in proc.stderr and proc.stdout == ""
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


@pytest.mark.parametrize("args,expected", [
    ([TINY, "--config.train.num_epoch=3"],
     "error: unknown config field train.num_epoch; did you mean train.num_epochs?"),
    (["--config.dataset.pth=x.pkl"],  # the embedded default config (no --config=)
     "error: unknown config field dataset.pth; did you mean dataset.path?"),
    ([TINY, "--noconfig.model.use_dn"],  # equally close fields are all named
     "error: unknown config field model.use_dn; did you mean model.use_dm, model.use_fd or "
     "model.use_gd?"),
    ([TINY, "--config.train.num_epochs=abc"],
     "error: bad value for --config.train.num_epochs: 'abc' is not an integer (now 2; "
     "configs/default.py documents the field)"),
    ([TINY, "--config.train.seeds=abc"],
     "error: bad value for --config.train.seeds: ('abc',) is not a tuple of integers (now "
     "(1111, 1112); configs/default.py documents the field)"),
    ([TINY, "--config.model.use_dm=maybe"],
     "error: bad value for --config.model.use_dm: 'maybe' is not True or False (now True; "
     "configs/default.py documents the field)"),
    ([TINY, "--bogus=1"],
     "error: unknown flag --bogus; python -m dhmd_jax.main --help lists the flags"),
    ([TINY, "--confg.train.num_epochs=3"],
     "error: unknown flag --confg.train.num_epochs; did you mean --config.train.num_epochs?"),
    ([TINY, "--mode=evalute"],
     "error: bad value for --mode: 'evalute': value should be one of <train|evaluate|predict>"),
    ([TINY, "--config.model.conv_kernel=3"],
     "error: bad value for --config.model.conv_kernel: '3': it is a group of fields (audio, "
     "text, vision); set them one by one, e.g. --config.model.conv_kernel.audio=..."),
    ([TINY, "--output", "--mode=predict"],  # absl takes the next argument as the value
     "error: --output needs a value (--output=...), got '--mode=predict'"),
    ([TINY, "runs/x"],
     "error: unexpected argument 'runs/x': flags are written --name=value (python -m "
     "dhmd_jax.main --help lists them)"),
], ids=["typo", "typo-default-config", "typo-ties", "ill-typed-int", "ill-typed-tuple",
        "ill-typed-bool", "unknown-flag", "misspelt-config-prefix", "bad-enum", "group-of-fields",
        "flag-without-value", "positional"])
def test_command_line_mistakes_are_one_line_and_status_2(tmp_path, args, expected):
  workdir = tmp_path / "run"
  proc = _run(*args, f"--workdir={workdir}")
  assert _one_error_line(proc) == expected
  assert not workdir.exists()  # stopped before any work


def test_a_flag_without_its_value_at_the_end(tmp_path):
  line = _one_error_line(_run(TINY, f"--workdir={tmp_path / 'run'}", "--output"))
  assert line == "error: --output needs a value (--output=...)"
  assert not (tmp_path / "run").exists()


def test_config_file_that_does_not_load(tmp_path):
  line = _one_error_line(_run("--config=configs/tiny_typo.py"))
  assert line.startswith("error: config file configs/tiny_typo.py does not exist: pass "
                         "--config=configs/<name>.py")
  line = _one_error_line(_run("--config=configs/ablations.py:mosei,no_dn"))
  assert line.startswith("error: config file configs/ablations.py:mosei,no_dn does not load "
                         "(ValueError at ") and "no_dm" in line
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  return undefined_name\n")
  line = _one_error_line(_run(f"--config={broken}"))
  assert line == (f"error: config file {broken} does not load (NameError at {broken}:2: "
                  f"name 'undefined_name' is not defined)")


def test_help_shows_the_common_fields_and_where_all_are_documented():
  proc = _run(TINY, "--help")
  assert proc.returncode == 0 and proc.stderr == ""
  text = proc.stdout
  assert "configs/default.py" in text and "--helpfull" in text
  for field in ("dataset.path", "dataset.format", "train.seeds", "train.num_epochs",
                "train.batch_size", "model.use_dm"):
    assert f"--config.{field}=" in text
  assert "--config.train.seeds=(1111, 1112)\n" in text  # the values of the config given
  assert "      Cap on epochs (paper: 30; the DMD code has no cap)." in text  # its comment
  for flag in ("--workdir=DIR", "--mode=train|evaluate|predict", "--split=", "--checkpoint=",
               "--output=CSV"):
    assert flag in text
  full = _run(TINY, "--helpfull")
  assert full.returncode == 0 and "--config.model.attention_query_block=" in full.stdout
  assert "--config.dm.num_elements=16" in full.stdout


_PARSE = """
import sys
from dhmd_jax import cli
from dhmd_jax import main
rest = cli.parse(main.COMMAND, ["main.py", *sys.argv[1:]])
config = main._CONFIG.value
print(len(rest), config.train.num_epochs, config.model.use_dm, config.train.seeds)
print(sorted(cli.explicit_fields()))
"""


def test_overrides_before_config_apply_and_explicit_fields():
  proc = _run("--config.train.num_epochs=3", TINY, "--noconfig.model.use_dm",
              "--config.train.seeds=7", "--config.train.seeds=8", code=_PARSE)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      "1 3 False (7, 8)", "['<file>', 'model.use_dm', 'train.num_epochs', 'train.seeds']"]
  proc = _run("--config.train.num_epochs=3", code=_PARSE)  # the embedded default config
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ["1 3 True (1111, 1112, 1113)", "['train.num_epochs']"]


def test_a_run_that_cannot_start_is_one_line_and_status_1(tmp_path):
  pickle_path = tmp_path / "MOSEI" / "aligned_50.pkl"
  proc = _run("--config=configs/mosei.py", f"--config.dataset.path={pickle_path}",
              f"--workdir={tmp_path / 'run'}")
  line = _one_error_line(proc, status=1)
  assert line.startswith(f"error: feature pickle {pickle_path} does not exist")
