"""`validate(config)`: every shipped config passes; each field family's bad value is one line
naming the field, the value and what is allowed; every entry point validates before any work."""

import importlib
import os
import subprocess
import sys

import pytest

from configs import tiny
from dhmd_jax import evaluate as evaluate_lib
from dhmd_jax import train as train_lib
from dhmd_jax import validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shipped_configs():
  yield "default", importlib.import_module("configs.default").get_config()
  for name in ("synthetic", "tiny", "mosi", "mosei", "sims", "urfunny", "mustard"):
    module = importlib.import_module(f"configs.{name}")
    yield name, module.get_config()
  for arg in ("mosei:unaligned", "mosi:unaligned"):
    name, variant = arg.split(":")
    yield arg, importlib.import_module(f"configs.{name}").get_config(variant)
  ablations = importlib.import_module("configs.ablations")
  for variant in ("full", "no_dm", "no_gd", "fd_ca", "ca_dm", "fd", "none", "mult", "mult_gd",
                  "mult_gd_dm"):
    yield f"ablations:{variant}", ablations.get_config(f"synthetic,{variant}")


def test_every_shipped_config_is_valid():
  for name, config in _shipped_configs():
    assert validation.validate(config) is config, name


@pytest.mark.parametrize("field,value,expected", [
    ("loss.margin_mode", "papr", "one of 'code', 'paper'"),  # choices
    ("dataset.name", "mosei2", "one of 'mosi'"),
    ("model.causal_mask", 1, "True or False"),  # booleans
    ("model.num_layers", 0, "an integer >= 1"),  # integers
    ("train.batch_size", 8.0, "an integer >= 1"),
    ("model.attn_dropout", 1.0, "a number >= 0.0 and < 1.0"),  # rates
    ("train.learning_rate", 0.0, "a number > 0.0"),  # positive reals
    ("loss.lambda_dec", -0.1, "a number >= 0.0"),  # weights
    ("train.plateau_factor", 1.5, "<= 1"),
    ("train.seeds", (1111, 1111), "distinct integers"),  # cross-field rules
    ("model.d_model", 9, "a multiple of model.num_heads"),
])
def test_a_bad_value_is_one_line_naming_field_value_and_allowed(field, value, expected):
  config = tiny.get_config().to_dict()  # plain dicts: ConfigDict's own type checks aside
  node = config
  *parents, leaf = field.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(validation.ConfigError) as info:
    validation.validate(config)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"config.{field} = {value!r} is invalid"), message
  assert expected in message, message


def test_real_dataset_and_task_must_agree():
  config = importlib.import_module("configs.mustard").get_config()
  config.dataset.task = "regression"
  with pytest.raises(validation.ConfigError, match="'binary' for mustard"):
    validation.validate(config)


def test_fields_a_config_lacks_are_skipped():
  config = tiny.get_config()
  config.unlock()
  del config.model["remat"]  # an older config
  validation.validate(config)


def test_training_validates_before_touching_the_workdir(tmp_path):
  config = tiny.get_config()
  config.loss.margin_mode = "papr"
  with pytest.raises(validation.ConfigError, match="loss.margin_mode"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_evaluate_validates_the_runs_config(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  config = tiny.get_config().to_dict()
  config["loss"]["ort_mode"] = "sideways"
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(validation.ConfigError, match="loss.ort_mode"):
    evaluate_lib.run_config(str(tmp_path))


def test_the_command_line_answers_a_bad_value_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "dhmd_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}/w", "--config.loss.margin_mode=papr"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines == ["error: config.loss.margin_mode = 'papr' is invalid: expected one of "
                   "'code', 'paper'"], proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()
