"""Host-side epoch bookkeeping per seed: ReduceLROnPlateau, model selection and early stopping.

All seeds train in one program, so every quantity here is a NumPy array with one entry per seed.
The rules are the reference trainer's (DMD `do_train`, PyTorch `ReduceLROnPlateau`):

- selection: a seed's validation loss improves when `value <= best - 1e-6` (MMSA `KeyEval`);
- early stopping: a seed stops once `epoch - best_epoch >= early_stop`;
- plateau (mode "min", threshold 1e-4 relative, cooldown 0): a value is better than the
  scheduler's own best when `value < best * (1 - 1e-4)`; after more than `patience` epochs
  without that, the learning rate is multiplied by `factor`.

The state is a dict of arrays so it goes into the checkpoint as JSON and resumes exactly.
"""

import numpy as np

SELECTION_EPS = 1e-6
PLATEAU_THRESHOLD = 1e-4


def init_state(num_seeds, learning_rate):
  return {
      "lr": np.full(num_seeds, learning_rate, np.float64),
      "plateau_best": np.full(num_seeds, np.inf),
      "plateau_bad_epochs": np.zeros(num_seeds, np.int64),
      "best_valid": np.full(num_seeds, np.inf),
      "best_epoch": np.zeros(num_seeds, np.int64),
      "active": np.ones(num_seeds, bool),
  }


def update(state, *, epoch, valid_loss, factor, patience, early_stop):
  """Applies one epoch's validation losses; returns (new_state, improved mask).

  Seeds that already stopped keep their state unchanged.
  """
  valid_loss = np.asarray(valid_loss, np.float64)
  active = state["active"]
  new = {k: np.array(v) for k, v in state.items()}

  improved = active & (valid_loss <= new["best_valid"] - SELECTION_EPS)
  new["best_valid"] = np.where(improved, valid_loss, new["best_valid"])
  new["best_epoch"] = np.where(improved, epoch, new["best_epoch"])

  better = valid_loss < new["plateau_best"] * (1.0 - PLATEAU_THRESHOLD)
  new["plateau_best"] = np.where(active & better, valid_loss, new["plateau_best"])
  bad = np.where(better, 0, new["plateau_bad_epochs"] + 1)
  reduce = bad > patience
  new["lr"] = np.where(active & reduce, new["lr"] * factor, new["lr"])
  new["plateau_bad_epochs"] = np.where(active, np.where(reduce, 0, bad),
                                       new["plateau_bad_epochs"])

  new["active"] = active & (epoch - new["best_epoch"] < early_stop)
  return new, improved


def to_json(state):
  return {k: v.tolist() for k, v in state.items()}


def from_json(data):
  dtypes = {"lr": np.float64, "plateau_best": np.float64, "plateau_bad_epochs": np.int64,
            "best_valid": np.float64, "best_epoch": np.int64, "active": bool}
  return {k: np.asarray(data[k], dtypes[k]) for k in dtypes}
