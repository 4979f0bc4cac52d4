"""dhmd_jax.cli, the runner of every command line, on a toy command: each way a command ends is one
line on stderr with its exit status, mistakes are named with a hint, --config overrides may come
before --config=, dashed flag names and `--flag value` work, and a command runs anew in one
process (as the grids' tests run them)."""

import contextlib
import io
import os

from absl import flags
import pytest

from dhmd_jax import cli
from dhmd_jax import validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


class ToyError(Exception):
  """The toy command's own 'cannot go on' error."""


def toy(argv, body=None, *, config=False):
  """(status, stdout, stderr, flags) of the toy command run on argv."""
  values = flags.FlagValues()
  if config:
    cli.define_config(TINY, flag_values=values)
  flags.DEFINE_string("workdir", None, "A folder.", flag_values=values)
  flags.DEFINE_integer("max_count", 1, "How many.", flag_values=values)
  flags.DEFINE_boolean("fast", False, "Hurry.", flag_values=values)
  command = cli.Command(prog="toy", summary="A toy command.", required=("workdir",),
                        interrupted="interrupted at --max_count={max_count}",
                        failures=(ToyError,), common_fields=("train.num_epochs",))
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = cli.run(command, body or (lambda rest: None), argv, flag_values=values)
  return status, out.getvalue(), err.getvalue(), values


def raising(error):
  def body(rest):
    raise error
  return body


@pytest.mark.parametrize("body,status,line", [
    (raising(cli.UsageError("no such variant")), 2, "error: no such variant"),
    (raising(validation.ConfigError("config.x = 1 is invalid")), 2,
     "error: config.x = 1 is invalid"),
    (raising(ToyError("the run\n  cannot go on")), 1, "error: the run cannot go on"),
    (raising(KeyboardInterrupt()), 130, "interrupted at --max_count=3"),
    (lambda rest: 4, 4, None),
    (lambda rest: "a report", 0, None),
], ids=["usage", "config", "failure", "ctrl-c", "own-status", "done"])
def test_each_way_to_end_is_one_line_and_its_status(body, status, line):
  got, out, err, _ = toy(["--workdir=w", "--max_count=3"], body)
  assert got == status and out == ""
  assert err.splitlines() == ([line] if line else [])


def test_the_librarys_errors_and_the_trainers_ctrl_c():
  # pylint: disable=g-import-not-at-top
  from dhmd_jax import checkpoint
  from dhmd_jax import data as data_lib
  from dhmd_jax import train as train_lib
  # pylint: enable=g-import-not-at-top
  for error in (data_lib.DataError("no pickle"), train_lib.TrainingError("no pickle"),
                checkpoint.CheckpointError("no pickle")):
    assert toy(["--workdir=w"], raising(error))[:3] == (1, "", "error: no pickle\n")
  stopped = train_lib.Interrupted("interrupted at epoch 2; rerun to resume")
  assert toy(["--workdir=w"], raising(stopped))[:3] == (
      130, "", "interrupted at epoch 2; rerun to resume\n")
  with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
    toy(["--workdir=w"], raising(RuntimeError("a bug")))


def test_running_out_of_memory_is_one_line_with_what_to_do():
  import jax.errors  # pylint: disable=g-import-not-at-top
  xla = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                   "9.31GiB.\n  buffer assignment follows ...")
  for error, what in ((xla, "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.31GiB."),
                      (MemoryError(), "MemoryError")):
    status, out, err, _ = toy(["--workdir=w"], raising(error))
    assert (status, out) == (1, "") and err.splitlines() == [
        f"error: out of memory ({what}); {cli.OUT_OF_MEMORY_ADVICE}"]
    assert "model.remat=True" in err
  with pytest.raises(jax.errors.JaxRuntimeError):  # XLA's other errors keep their traceback
    toy(["--workdir=w"], raising(jax.errors.JaxRuntimeError("INTERNAL: a bug")))


@pytest.mark.parametrize("argv,line", [
    (["--workdir", "--max_count=3"],  # absl would take the next flag as the folder
     "error: --workdir needs a value (--workdir=...), got '--max_count=3'"),
    (["--max_count=3", "--workdir"], "error: --workdir needs a value (--workdir=...)"),
    (["--max_cuont=3", "--workdir=w"], "error: unknown flag --max_cuont; did you mean "
     "--max_count?"),
    (["--workdir=w", "--max_count=x"], "error: bad value for --max_count: 'x': invalid "
     "literal for int() with base 10: 'x'"),
    (["--max_count=3"], "error: --workdir is required (toy --help lists the flags)"),
    (["--workdir=w", "more"], "error: unexpected argument 'more': flags are written "
     "--name=value (toy --help lists them)"),
    (["--workdir=w", "--nofast=1"], "error: --nofast=1 does not take an argument"),
    (["--workdir=w", "--fast=maybe"], "error: bad value for --fast: 'maybe': write --fast, "
     "--nofast or --fast=true|false"),
], ids=["next-flag-as-value", "no-value", "typo", "ill-typed", "required", "positional",
        "bool-with-value", "bool-ill-typed"])
def test_command_line_mistakes(argv, line):
  called = []
  status, out, err, _ = toy(argv, called.append)
  assert (status, out, err.splitlines(), called) == (2, "", [line], [])


def test_dashed_names_values_after_a_space_and_negative_numbers():
  status, _, err, values = toy(["--max-count", "5", "--workdir", "w", "--fast"])
  assert status == 0, err
  assert (values.max_count, values.workdir, values.fast) == (5, "w", True)
  status, _, err, values = toy(["--max_count", "-2", "--workdir=w"])
  assert status == 0 and values.max_count == -2, err


def test_config_overrides_before_the_file_run_anew_in_one_process():
  status, _, err, values = toy(["--config.train.num_epochs=3", f"--config={TINY}",
                                "--config.train.seeds=(7,)", "--workdir=w"], config=True)
  assert status == 0, err
  assert (values.config.train.num_epochs, values.config.train.seeds) == (3, (7,))
  assert cli.explicit_fields(values) == {"<file>", "train.num_epochs", "train.seeds"}
  # Again, without the file: the default, not named explicitly; nothing of the first run stays.
  status, _, err, values = toy(["--config.train.num_epochs=4", "--workdir=w"], config=True)
  assert status == 0, err
  assert (values.config.train.num_epochs, values.config.train.seeds) == (4, (1111, 1112))
  assert cli.explicit_fields(values) == {"train.num_epochs"}
  status, _, err, _ = toy(["--config.train.num_epoch=4", "--workdir=w"], config=True)
  assert (status, err) == (2, "error: unknown config field train.num_epoch; did you mean "
                              "train.num_epochs?\n")


def test_help_lists_the_flags_and_the_config_fields():
  status, out, err, _ = toy(["--max_count=x", "--help"], config=True)  # help first
  assert (status, err) == (0, "")
  assert out.startswith("usage: toy [--config=FILE[:ARG]] [--config.FIELD=VALUE ...] "
                        "--workdir=WORKDIR [--max_count=INT]\n"
                        "           [--[no]fast]\n\nA toy command.\n")
  for text in ("  --workdir=WORKDIR               A folder. Required.\n",
               "  --max_count=INT                 How many. Default 1.\n",
               "  --[no]fast                      Hurry. Default False.\n",
               "  --config.train.num_epochs=2\n"):
    assert text in out
  assert "--config.dm.num_elements" not in out
  status, out, _, _ = toy(["--helpfull"], config=True)
  assert status == 0 and "  --config.dm.num_elements=16\n" in out
