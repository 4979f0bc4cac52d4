"""A stand-in for DHMD in trainer tests (scenic's pattern): what the trainer, checkpoints, logs,
evaluate and predict do does not depend on the model, and the real model's compilation is most
of a tiny run's time on a 2-core machine.

`FakeModel` reads the same batches, has parameters, dropout and a train/eval difference, and
returns the outputs the objective needs for a config with `fake_config()`'s switches (MulT-style
heads, no decoupling, no GD, no DM): the fused prediction and the three modality heads. It is
linear in the time-averaged features, so it learns the synthetic data's planted signal.

Use: `monkeypatch.setattr(train_lib, "build", fake_build)`; in a child process, `install()`.
"""

import flax.linen as nn
import jax.numpy as jnp

from configs import tiny
from dhmd_jax.names import MODALITIES


class FakeModel(nn.Module):
  num_outputs: int = 1

  @nn.compact
  def __call__(self, batch, deterministic=True):
    pooled = []
    for m in MODALITIES:
      mask = batch[f"{m}_mask"].astype(jnp.float32)[..., None]  # (B, T, 1)
      pooled.append(jnp.sum(batch[m] * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    heads = [nn.Dense(self.num_outputs, name=f"head_{m}")(
        nn.Dropout(0.1)(p, deterministic=deterministic)) for m, p in zip(MODALITIES, pooled)]
    fused = nn.Dense(self.num_outputs, name="fusion")(jnp.concatenate(pooled, axis=-1))
    return {"prediction": fused, "logits_hetero": jnp.stack(heads)}  # (B, O), (3, B, O)


def fake_build(config, dataset):
  del dataset
  return FakeModel(num_outputs=2 if config.dataset.task == "binary" else 1)


def fake_config():
  """The tiny config with the switches under which FakeModel's outputs are all the objective
  reads (its loss terms other than the task loss are zero)."""
  config = tiny.get_config()
  config.model.arch = "mult"
  config.model.use_gd = False
  config.model.use_dm = False
  return config


def install():
  """Makes every `train.build` in this process build the FakeModel (for child processes)."""
  from dhmd_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  train_lib.build = fake_build
