"""Dataset configs carry the paper's Table 1 and the DMD config values; overrides fail loudly."""

import jax
import pytest

from configs import default
from configs import mosei
from configs import mosi
from configs import mustard
from configs import sims
from configs import synthetic
from configs import urfunny
from dhmd_jax.models import dhmd as dhmd_model
from dhmd_jax.validation import ConfigError
from dhmd_jax.validation import validate

# (d, heads, layers, kernels (text, vision, audio)) from Table 1 / the DMD config (MOSEI audio 1).
EXPECTED = {
    "mosi": (mosi.get_config, 50, 10, 4, (5, 5, 5)),
    "mosei": (mosei.get_config, 30, 6, 4, (5, 3, 1)),
    "urfunny": (urfunny.get_config, 50, 10, 4, (5, 5, 5)),
    "mustard": (mustard.get_config, 32, 8, 2, (5, 3, 5)),
    "sims": (sims.get_config, 50, 10, 4, (5, 5, 5)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_configs(name):
  get, d, heads, layers, kernels = EXPECTED[name]
  config = get()
  assert config.dataset.name == name
  m = config.model
  assert (m.d_model, m.num_heads, m.num_layers) == (d, heads, layers)
  assert (m.conv_kernel.text, m.conv_kernel.vision, m.conv_kernel.audio) == kernels
  assert config.dataset.task == ("binary" if name in ("urfunny", "mustard") else "regression")
  assert config.dataset.path and not config.dataset.path.startswith("/")
  # The reference protocol (DMD config): lr 1e-4, batch 16, accumulation 10, clip 0.6.
  t = config.train
  assert (t.learning_rate, t.batch_size, t.update_epochs, t.grad_clip_value) == (1e-4, 16, 10, 0.6)
  assert (t.plateau_factor, t.plateau_patience, t.early_stop) == (0.5, 5, 10)
  assert tuple(t.seeds) == (1111, 1112, 1113, 1114, 1115)


def test_reference_dropouts():
  a, b = mosi.get_config().model, mosei.get_config().model
  assert (a.text_dropout, a.embed_dropout, a.attn_dropout, a.attn_dropout_a) == (0.5, 0.2, 0.3, 0.2)
  assert (b.text_dropout, b.embed_dropout, b.attn_dropout, b.attn_dropout_a) == (0.3, 0.0, 0.4, 0.0)


def test_unaligned_variants_and_bad_variant():
  assert mosei.get_config("unaligned").dataset.path.endswith("unaligned_50.pkl")
  assert mosi.get_config("unaligned").dataset.path.endswith("unaligned_50.pkl")
  with pytest.raises(ValueError, match="aligned"):
    mosei.get_config("unalinged")


@pytest.mark.parametrize("get", [lambda: mosei.get_config("unaligned"),
                                 lambda: mosi.get_config("unaligned"), sims.get_config])
def test_long_sequences_recompute_layers_only_when_the_seeds_are_vmapped(get, monkeypatch):
  """model.remat="auto": on for two or more vmapped seeds (their activations side by side),
  off when the seeds run one after another, as train.seed_compute="auto" has them on a CPU."""
  config = get()
  assert config.model.remat == "auto" and mosei.get_config("aligned").model.remat is False
  settings = lambda c: dhmd_model.ModelSettings.from_config(c, num_outputs=1)
  assert (settings(config).remat, settings(config).stack_compute) == (False, "loop")  # this CPU
  config.train.seed_compute = "vmap"
  assert (settings(config).remat, settings(config).stack_compute) == (True, "vmap")
  config.train.seeds = (7,)  # one seed: nothing side by side
  assert settings(config).remat is False
  config.train.seeds, config.train.seed_compute = (1, 2), "auto"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # seeds vmapped there
  assert settings(config).remat is True
  for value in (True, False):
    config.model.remat = value
    assert settings(config).remat is value
  config.model.remat = "yes"
  with pytest.raises(ConfigError, match=r"model\.remat.*True, False or 'auto'"):
    validate(config)


def test_embedded_default_is_synthetic_mosei_shaped():
  config = synthetic.get_config()
  assert config.dataset.name == "synthetic" and config.dataset.path == ""
  assert config.dataset.synthetic.like == "mosei" and config.model.d_model == 30


def test_unknown_field_fails():
  config = default.get_config()
  with pytest.raises(AttributeError):
    _ = config.train.learning_rat
