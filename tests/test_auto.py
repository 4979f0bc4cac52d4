"""What the config's "auto" switches become (dhmd_jax/auto.py), on a CPU and on an accelerator."""

import jax
import pytest

from configs import default as default_config
from dhmd_jax import auto


def _config(seeds=(1111,), seed_compute="auto", **model):
  config = default_config.get_config()
  config.train.seeds = seeds
  config.train.seed_compute = seed_compute
  for name, value in {"remat": "auto", **model}.items():
    setattr(config.model, name, value)
  return config


def _resolved(**kwargs):
  return auto.resolve(_config(**kwargs))


def test_auto_on_a_cpu_runs_items_one_after_another_and_the_stacks_as_a_loop():
  assert jax.default_backend() == "cpu"
  table = {"train.accumulate": "scan", "train.seed_compute": "scan", "model.remat": False,
           "model.stack_compute": "loop"}
  assert _resolved() == table
  assert auto.resolve(default_config.get_config()) == table  # remat off by default
  assert _resolved(seeds=(1111, 1112, 1113)) == table  # seeds one after another: no remat
  # Vmapped seeds sit in memory side by side: remat, and with it the scanned stacks.
  assert _resolved(seeds=(1111, 1112), seed_compute="vmap") == {
      **table, "train.seed_compute": "vmap", "model.remat": True, "model.stack_compute": "vmap"}
  assert _resolved(seeds=(1111,), seed_compute="vmap")["model.remat"] is False  # one seed


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_on_an_accelerator_vmaps(monkeypatch, backend):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert _resolved() == {"train.accumulate": "vmap", "train.seed_compute": "vmap",
                         "model.remat": False, "model.stack_compute": "vmap"}
  assert _resolved(seeds=(1111, 1112))["model.remat"] is True


def test_values_other_than_auto_are_kept():
  config = _config(seeds=(1111, 1112), seed_compute="scan", remat=True, stack_compute="grouped")
  config.train.accumulate = "vmap"
  assert auto.resolve(config) == {"train.accumulate": "vmap", "train.seed_compute": "scan",
                                  "model.remat": True, "model.stack_compute": "grouped"}
  config.model.remat = False
  assert auto.resolve(config)["model.remat"] is False
