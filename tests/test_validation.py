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


def test_every_field_has_a_rule_and_every_rule_a_field():
  rules = validation.rules()
  seen = set()
  for name, config in _shipped_configs():
    fields = set(validation.config_fields(config, groups=False))
    assert not fields - set(rules), f"{name}: fields without a rule in configs/default.py RULES"
    seen |= fields
  assert not set(rules) - seen, "rules without a field in any shipped config"


def test_every_field_is_documented():
  docs = validation.field_docs()
  for field in validation.rules():
    group = field.rsplit(".", 1)[0]
    assert docs.get(field) or docs.get(group), f"config.{field} has no comment in default.py"
  # A comment describes the whole block of fields under it, and a field's own comment comes first.
  assert docs["model.use_ca"] == docs["model.use_fd"] and "cross-modal" in docs["model.use_ca"]
  assert docs["model.text_dropout"].startswith("On the text input features.")
  # Only get_config() declares fields: the helpers after it set them, they do not document them.
  assert docs["model.text_encoder"].startswith("Text input.")


def test_a_field_the_schema_does_not_know_is_refused_with_a_suggestion():
  config = tiny.get_config()
  config.train.num_epoch = 5  # a typo in a config file: a new field, silently unused before
  with pytest.raises(validation.ConfigError) as info:
    validation.validate(config)
  assert str(info.value) == ("config.train.num_epoch is not a config field; did you mean "
                             "train.num_epochs?")
  # A run's stored config.json may hold a field a later version removed: not a typo there.
  assert validation.validate(config, strict=False) is config


def test_the_model_takes_its_settings_from_the_config_groups():
  # No hand-copied field list: every field of model/gd/dm reaches the model as the config has it.
  from dhmd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.d_model = 12
  config.gd.temperature = 3.5
  settings = build_model(config, num_outputs=1).settings
  for group in ("model", "gd", "dm"):
    for field, value in validation.config_fields(config[group], groups=False).items():
      assert validation.get_field(getattr(settings, group), field) == value, (group, field)
  assert settings.conv_kernels == (5, 3, 1)
  config.model.d_model = 3  # the model's own lower bound is the schema's: one rule
  with pytest.raises(validation.ConfigError, match=r"model.d_model = 3 is invalid: expected an "
                     r"integer >= 4"):
    build_model(config, num_outputs=1)


def test_describe_names_what_a_field_may_be():
  assert validation.describe("model.fusion") == "one of 'code', 'paper'"
  assert validation.describe("train.plateau_factor") == "a number > 0.0 and <= 1.0"
  assert validation.describe("model.attn_dropout") == "a number >= 0.0 and < 1.0"
  assert validation.describe("train.grad_clip_value") == "a number"
  assert validation.describe("train.no_such_field") is None


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
    ("model.d_model", 2, "an integer >= 4"),
    ("dataset.path", 3, "a string"),
    ("model.bert.random_arch.hidden_size", 0, "an integer >= 1"),
    ("gd.temperature", 0, "a number > 0.0"),
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
  assert validation.validate(config) is config
  config.model.d_model = 0  # the fields it has are still checked
  with pytest.raises(validation.ConfigError, match="model.d_model"):
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


def test_help_shows_each_fields_comment_and_rule():
  proc = subprocess.run([sys.executable, "-m", "dhmd_jax.main", "--helpfull"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = " ".join(proc.stdout.split())  # unwrapped
  assert ("--config.model.fusion='code' Fusion: \"code\" = [sigmoid(W h_l)" in text
          and "Allowed: one of 'code', 'paper'." in text)
  assert "--config.train.plateau_factor=0.5" in text
  assert "Allowed: a number > 0.0 and <= 1.0." in text
  for field in validation.rules():  # every field is listed
    assert f"--config.{field}=" in text, field
