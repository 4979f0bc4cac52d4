"""Command line: train, evaluate or predict.

  python -m dhmd_jax.main                                   # synthetic MOSEI-shaped default
  python -m dhmd_jax.main --config=configs/mosei.py --workdir=runs/mosei
  python -m dhmd_jax.main --config=configs/mosei.py:unaligned --config.train.num_epochs=5
  python -m dhmd_jax.main --workdir=runs/mosei --mode=evaluate --split=valid
  python -m dhmd_jax.main --workdir=runs/mosei --mode=predict --output=p.csv

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

from absl import flags

import configs
from dhmd_jax import cli

_CONFIG = cli.define_config(os.path.join(os.path.dirname(configs.__file__), "synthetic.py"))
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Folder for checkpoints, logs, report.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"], "What to do.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test"],
                           "Split for --mode=evaluate/predict.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Checkpoint for --mode=evaluate/predict.")
_OUTPUT = flags.DEFINE_string("output", "", "CSV path for --mode=predict.")

COMMAND = cli.Command(
    prog="python -m dhmd_jax.main",
    summary="Trains DHMD (rerunning with the same workdir resumes), or evaluates or predicts "
            "with a trained workdir (using the run's own config from there).",
    placeholders={"workdir": "DIR", "checkpoint": "WHICH", "output": "CSV"},
    common_fields=("dataset.name", "dataset.path", "dataset.format", "dataset.cache_dir",
                   "train.seeds", "train.num_epochs", "train.batch_size", "train.learning_rate",
                   "model.use_fd", "model.use_ca", "model.use_gd", "model.use_dm"),
    interrupted="interrupted (--mode={mode}); rerun the same command to start it again")


def main(argv):
  del argv  # cli.run refused anything that is not a flag
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


if __name__ == "__main__":
  sys.exit(cli.run(COMMAND, main))
