"""Plateau scheduler, selection and early stopping against a plain re-statement of the
PyTorch ReduceLROnPlateau / DMD trainer rules, one seed at a time."""

import numpy as np
import pytest

from dhmd_jax import schedule


class TorchPlateau:
  """ReduceLROnPlateau(mode='min', factor, patience, threshold=1e-4 rel, cooldown=0)."""

  def __init__(self, lr, factor, patience):
    self.lr, self.factor, self.patience = lr, factor, patience
    self.best, self.bad = float("inf"), 0

  def step(self, value):
    if value < self.best * (1 - 1e-4):
      self.best, self.bad = value, 0
    else:
      self.bad += 1
    if self.bad > self.patience:
      self.lr *= self.factor
      self.bad = 0


def reference_run(losses, *, lr, factor, patience, early_stop):
  """One seed through the DMD loop: returns lr used per epoch, best epoch, stop epoch."""
  sched = TorchPlateau(lr, factor, patience)
  best, best_epoch, lrs = float("inf"), 0, []
  for epoch, value in enumerate(losses, start=1):
    lrs.append(sched.lr)
    if value <= best - 1e-6:
      best, best_epoch = value, epoch
    sched.step(value)
    if epoch - best_epoch >= early_stop:
      return lrs, best_epoch, epoch
  return lrs, best_epoch, None


@pytest.mark.parametrize("trial", range(5))
def test_matches_reference_loop(trial):
  rng = np.random.default_rng(trial)
  num_seeds, epochs = 4, 40
  # Losses that improve, then plateau with noise, so reductions and stops happen.
  losses = 1.0 / (1 + np.arange(epochs))[None] ** rng.uniform(0.2, 1.0, (num_seeds, 1))
  losses = np.where(np.arange(epochs)[None] > rng.integers(3, 20, (num_seeds, 1)),
                    rng.uniform(0.3, 0.4, (num_seeds, epochs)), losses)
  kw = dict(factor=0.5, patience=3, early_stop=7)
  state = schedule.init_state(num_seeds, 1e-3)
  lrs = np.zeros((num_seeds, epochs))
  stop_epoch = [None] * num_seeds
  for epoch in range(1, epochs + 1):
    was_active = state["active"].copy()
    lrs[:, epoch - 1] = state["lr"]
    state, improved = schedule.update(state, epoch=epoch, valid_loss=losses[:, epoch - 1], **kw)
    assert not np.any(improved & ~was_active)
    for s in range(num_seeds):
      if was_active[s] and not state["active"][s]:
        stop_epoch[s] = epoch
  for s in range(num_seeds):
    ref_lrs, ref_best, ref_stop = reference_run(losses[s], lr=1e-3, **kw)
    assert stop_epoch[s] == ref_stop
    n = len(ref_lrs)
    np.testing.assert_allclose(lrs[s, :n], ref_lrs)
    assert state["best_epoch"][s] == ref_best


def test_stopped_seed_is_frozen():
  state = schedule.init_state(2, 1.0)
  state["active"][1] = False
  new, improved = schedule.update(state, epoch=1, valid_loss=[0.5, 0.1], factor=0.5,
                                  patience=0, early_stop=10)
  assert improved.tolist() == [True, False]
  assert new["best_valid"][1] == np.inf and new["lr"][1] == 1.0


def test_json_round_trip():
  state = schedule.init_state(3, 1e-4)
  state, _ = schedule.update(state, epoch=1, valid_loss=[1.0, 2.0, 3.0], factor=0.5,
                             patience=5, early_stop=10)
  back = schedule.from_json(schedule.to_json(state))
  for k in state:
    np.testing.assert_array_equal(back[k], state[k])
    assert back[k].dtype == state[k].dtype
