"""Command line: train, evaluate or predict.

  python -m dhmd_jax.main                                   # synthetic MOSEI-shaped default
  python -m dhmd_jax.main --config=configs/mosei.py --workdir=runs/mosei
  python -m dhmd_jax.main --config=configs/mosei.py:unaligned --config.train.num_epochs=5
  python -m dhmd_jax.main --config=configs/mosei.py --workdir=runs/mosei --mode=evaluate --split=valid
  python -m dhmd_jax.main --config=configs/mosei.py --workdir=runs/mosei --mode=predict --output=p.csv

Rerunning `train` with an existing workdir resumes from its latest checkpoint.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import configs
from dhmd_jax import data as data_lib
from dhmd_jax import evaluate as evaluate_lib
from dhmd_jax import train as train_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "synthetic.py")

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (see configs/).",
                                lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Folder for checkpoints, logs, report.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"], "What to do.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test"],
                           "Split for --mode=evaluate/predict.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Checkpoint for --mode=evaluate/predict.")
_OUTPUT = flags.DEFINE_string("output", "", "CSV path for --mode=predict.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = flags.FLAGS.config
  workdir = _WORKDIR.value
  try:
    if _MODE.value == "train":
      train_lib.train_and_evaluate(config, workdir)
    elif _MODE.value == "evaluate":
      result = evaluate_lib.evaluate(config, workdir, split=_SPLIT.value,
                                     which=_CHECKPOINT.value)
      print(json.dumps(result["summary"], indent=2))
    else:
      path = evaluate_lib.predict(config, workdir, split=_SPLIT.value, which=_CHECKPOINT.value,
                                  output=_OUTPUT.value)
      print(f"wrote {path}")
  except (data_lib.DataError, train_lib.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
