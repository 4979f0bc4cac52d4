"""Command line: train, evaluate or predict.

  python -m dhmd_jax.main                                   # synthetic MOSEI-shaped default
  python -m dhmd_jax.main --config=configs/mosei.py --workdir=runs/mosei
  python -m dhmd_jax.main --config=configs/mosei.py:unaligned --config.train.num_epochs=5
  python -m dhmd_jax.main --workdir=runs/mosei --mode=evaluate --split=valid
  python -m dhmd_jax.main --workdir=runs/mosei --mode=predict --output=p.csv
  python -m dhmd_jax.main --config=configs/mosei.py --workdir=/nfs/runs/mosei \
      --coordinator_address=host0:12345 --num_processes=2 --process_id=0   # and 1 on host1

Rerunning `train` with an existing workdir resumes from its latest checkpoint; evaluate and
predict read the run's own config from the workdir. `--help` shows the common config fields,
`--helpfull` all of them (each is declared, with a comment, in configs/default.py).

A mistake on the command line (an unknown or ill-typed `--config.*` field, an unknown flag, a
config file that does not load) stops with one line `error: ...` and exit status 2; a run that
cannot go on stops with one line and status 1; Ctrl-C with one line and status 130 (`dhmd_jax.cli`).
A workdir that another process is training (or evaluating) stops a training with one line naming
it and status 3 (`dhmd_jax.workdir`); evaluate and predict beside a training read its newest
complete checkpoint.
"""

import json
import os
import sys
import traceback

from absl import flags

import configs
from dhmd_jax import cli
from dhmd_jax import distributed

_CONFIG = cli.define_config(os.path.join(os.path.dirname(configs.__file__), "synthetic.py"))
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Folder for checkpoints, logs, report.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"], "What to do.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test"],
                           "Split for --mode=evaluate/predict.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Checkpoint for --mode=evaluate/predict.")
_OUTPUT = flags.DEFINE_string("output", "", "CSV path for --mode=predict.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Several processes: process 0's HOST:PORT (the same for all).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Several processes: how many run this training (0 = one process).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "Several processes: this one's index, 0 .. num_processes - 1.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto"],
    "auto: start the distributed runtime with what JAX reads from the cluster (SLURM, Open MPI, "
    "Kubernetes) for the values the three flags above do not give.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", distributed.DEFAULT_TIMEOUT_S,
    "Several processes: seconds after which a silent process is taken for dead and every "
    "process stops.")

COMMAND = cli.Command(
    prog="python -m dhmd_jax.main",
    summary="Trains DHMD (rerunning with the same workdir resumes), or evaluates or predicts "
            "with a trained workdir (using the run's own config from there).",
    placeholders={"workdir": "DIR", "checkpoint": "WHICH", "output": "CSV",
                  "coordinator_address": "HOST:PORT"},
    common_fields=("dataset.name", "dataset.path", "dataset.format", "dataset.cache_dir",
                   "train.seeds", "train.num_epochs", "train.batch_size", "train.learning_rate",
                   "model.use_fd", "model.use_ca", "model.use_gd", "model.use_dm"),
    interrupted="interrupted (--mode={mode}); rerun the same command to start it again",
    failures=(distributed.SetupError,))


def _start_distributed():
  """Joins the distributed runtime when the flags ask for it: before any other JAX call."""
  many = (_COORDINATOR.value or _NUM_PROCESSES.value > 0 or _PROCESS_ID.value >= 0
          or _DISTRIBUTED.value == "auto")
  if not many:
    return
  if _MODE.value != "train":
    raise cli.UsageError(f"--mode={_MODE.value} runs in one process; drop --coordinator_address, "
                         f"--num_processes, --process_id and --distributed")
  try:
    distributed.initialize(coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                           auto=_DISTRIBUTED.value == "auto",
                           timeout_s=_DISTRIBUTED_TIMEOUT.value)
  except distributed.FlagError as error:
    raise cli.UsageError(str(error)) from None
  distributed.start_watchdog()


def main(argv):
  del argv  # cli.run refused anything that is not a flag
  _start_distributed()
  try:
    run_command()
  except BaseException as error:
    distributed.failed(error)  # several processes: the peers stop with its line
    raise


def run_command():
  # Imported here, after the flags are checked: JAX, Flax and orbax take seconds to import, and
  # a mistake on the command line should be answered at once.
  # pylint: disable=g-import-not-at-top
  from dhmd_jax import evaluate
  from dhmd_jax import train
  # pylint: enable=g-import-not-at-top
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value == "train":
    train.train_and_evaluate(config, workdir)
    return
  config = evaluate.run_config(workdir, given=config, explicit=cli.explicit_fields())
  if _MODE.value == "evaluate":
    result = evaluate.evaluate(config, workdir, split=_SPLIT.value, which=_CHECKPOINT.value)
    print(json.dumps(result["summary"], indent=2))
  else:
    path = evaluate.predict(config, workdir, split=_SPLIT.value, which=_CHECKPOINT.value,
                            output=_OUTPUT.value)
    print(f"wrote {path}")


def _status():
  """cli.run's exit status; with several processes also for an unexpected error (its traceback
  printed): `distributed.finish` then stops this process at once, not in JAX's shutdown barrier
  waiting for peers that are stopping."""
  try:
    return cli.run(COMMAND, main)
  except BaseException:  # pylint: disable=broad-except
    if not distributed.active():
      raise
    traceback.print_exc()
    return 1


if __name__ == "__main__":
  sys.exit(distributed.finish(_status()))
