"""`validate(config)`: every config value checked once, first, in every entry point.

The schema (the fields and what they mean) is `configs/default.py`; this module holds what each
field may be. A bad value stops with one line naming the field, the value and what is allowed,
before any data is loaded or any model is built (`--config.loss.margin_mode=papr` used to fail
only when the train step was first traced). Fields a config does not have are skipped, so
configs written for older versions validate too.
"""

import difflib
import importlib.util
import numbers
import os
import traceback

import ml_collections

from dhmd_jax.names import MODALITIES


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line."""


# Fields with a fixed set of values.
CHOICES = {
    "dataset.name": ("mosi", "mosei", "sims", "urfunny", "mustard", "synthetic"),
    "dataset.format": ("mmsa", "multibench"),
    "dataset.nonfinite": ("zero", "error"),
    "dataset.task": ("regression", "binary"),
    "dataset.synthetic.like": ("mosi", "mosei", "sims", "urfunny", "mustard"),
    "dataset.synthetic.layout": ("mmsa", "multibench"),
    "model.text_encoder": ("features", "bert"),
    "model.bert.init": ("checkpoint", "random"),
    "model.arch": ("dhmd", "mult"),
    "model.stack_compute": ("auto", "vmap", "loop"),
    "model.fusion": ("code", "paper"),
    "gd.edge_input": ("embedded", "raw"),
    "gd.prior": ("code", "uniform", "none"),
    "dm.score_scale": ("none", "sqrt_dim"),
    "loss.task": ("sum8", "final"),
    "loss.recon_reduction": ("mean", "frobenius"),
    "loss.ort_mode": ("torch19_batch_axis", "per_vector", "per_vector_hinge"),
    "loss.margin_mode": ("code", "paper"),
    "loss.triplet_classes": ("round7", "sign", "exact"),
    "train.accumulate": ("vmap", "scan"),
    "train.dropout_rng": ("threefry", "rbg"),
}

BOOLS = (
    "dataset.rebuild_cache", "dataset.synthetic.aligned", "model.use_fd", "model.use_ca",
    "model.use_gd", "model.use_dm", "model.causal_mask", "model.remat", "model.key_padding_mask",
    "model.homo_self_attention", "model.unused_reference_layers", "gd.hetero_repr_loss",
    "gd.homo_repr_loss", "dm.detach_input", "train.eval_test_every_epoch", "log.tensorboard",
    "log.progress_bar")

# Integers with a lower bound.
INTS = {
    "dataset.synthetic.num_train": 1, "dataset.synthetic.num_valid": 1,
    "dataset.synthetic.num_test": 1, "dataset.synthetic.seed": 0,
    "dataset.synthetic.text_vocab_size": 128,
    "model.d_model": 1, "model.num_heads": 1, "model.num_layers": 1,
    "model.attention_query_block": 0,
    **{f"model.conv_kernel.{m}": 1 for m in MODALITIES},
    "gd.homo_hidden": 1, "gd.hetero_hidden": 1, "dm.num_elements": 1,
    "train.batch_size": 1, "train.update_epochs": 1, "train.plateau_patience": 0,
    "train.early_stop": 1, "train.num_epochs": 1, "train.steps_per_chunk": 0,
    "train.eval_batch_size": 1, "train.num_devices": 0, "train.device_data_limit_bytes": 0,
}

# Real numbers in [low, high) (high None: unbounded); "open" makes the low end exclusive.
REALS = {
    **{f"model.{r}": (0.0, 1.0) for r in (
        "text_dropout", "embed_dropout", "attn_dropout", "attn_dropout_a", "attn_dropout_v",
        "relu_dropout", "res_dropout", "output_dropout")},
    "gd.temperature": ("open", 0.0, None), "gd.reg_weight": (0.0, None),
    "gd.repr_weight": (0.0, None), "dm.margin": (0.0, None),
    "loss.margin": (0.0, None), "loss.adaptive_margin_scale": (0.0, None),
    "loss.lambda_dec": (0.0, None), "loss.lambda_dtl": (0.0, None),
    "loss.lambda_dic": (0.0, None), "loss.gamma": (0.0, None),
    "train.learning_rate": ("open", 0.0, None), "train.grad_clip_value": (None, None),
    "train.plateau_factor": ("open", 0.0, 1.0 + 1e-12), "log.progress_interval_s": (0.0, None),
}


def get_field(config, dotted):
  """config["a"]["b"]["c"] for "a.b.c" (ConfigDicts and plain dicts alike)."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def set_field(config, dotted, value):
  """Sets config["a"]["b"]["c"] = value for "a.b.c"."""
  *parents, leaf = dotted.split(".")
  node = get_field(config, ".".join(parents)) if parents else config
  node[leaf] = value


def config_fields(config, prefix=""):
  """{dotted name: value} of every field, nested ConfigDicts included (as fields too)."""
  out = {}
  for key, value in config.items():
    out[prefix + key] = value
    if isinstance(value, ml_collections.ConfigDict):
      out.update(config_fields(value, prefix + key + "."))
  return out


CONFIG_HINT = ("pass --config=configs/<name>.py (mosei.py, mosi.py, sims.py, urfunny.py, "
               "mustard.py, ablations.py:<dataset>,<variant>, synthetic.py, tiny.py)")


def load_config_file(arg):
  """The config `--config=FILE[:ARG]` names (`get_config(ARG)` of FILE), as ml_collections'
  config flags load it; `ConfigError` with one line naming the file (and, when the file itself
  raised, where) if it cannot be loaded. The one loader of `main` and the experiment grids."""
  path, colon, config_string = arg.partition(":")
  if not os.path.isfile(path):
    where = "is a folder" if os.path.isdir(path) else "does not exist"
    raise ConfigError(f"config file {path} {where}: {CONFIG_HINT}")
  try:
    spec = importlib.util.spec_from_file_location("dhmd_jax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*([config_string] if colon else []))
  except Exception as e:  # pylint: disable=broad-except  (any failure: the file does not load)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.dirname(os.path.abspath(f.filename)) ==
              os.path.dirname(os.path.abspath(path))]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    raise ConfigError(f"config file {arg} does not load ({type(e).__name__}{where}: "
                      f"{first_line(e)})") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path}: get_config() returned a {type(config).__name__}, "
                      f"expected an ml_collections.ConfigDict")
  return config


def did_you_mean(word, candidates):
  """'did you mean X?' naming the candidates most similar to `word` (ties all named: 'X or Y'),
  or None when none is close (the command lines' hint for a typo'd field or flag)."""
  close = difflib.get_close_matches(word, list(candidates), n=5, cutoff=0.6)
  if not close:
    return None
  score = lambda c: difflib.SequenceMatcher(None, word, c).ratio()
  best = sorted(c for c in close if score(c) == score(close[0]))
  either = best[0] if len(best) == 1 else ", ".join(best[:-1]) + " or " + best[-1]
  return f"did you mean {either}?"


def first_line(error):
  """The first non-empty line of an error's message, or its type's name."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _lookup(config, dotted):
  """(True, value) or (False, None) when the config has no such field."""
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return False, None
  return True, node


def _fail(field, value, allowed):
  raise ConfigError(f"config.{field} = {value!r} is invalid: expected {allowed}")


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real(field, value, bounds):
  if bounds[0] == "open":
    _, low, high = bounds
    ok_low = low is None or value > low
    low_text = f"> {low}"
  else:
    low, high = bounds
    ok_low = low is None or value >= low
    low_text = f">= {low}"
  ok_high = high is None or value < high
  if not (_is_real(value) and ok_low and ok_high):
    if high is None:
      allowed = "a number" + ("" if low is None else f" {low_text}")
    elif high > 1.0:  # (0, 1]
      allowed = f"a number {low_text} and <= 1"
    else:
      allowed = f"a number {low_text} and < {high}"
    _fail(field, value, allowed)


def validate(config):
  """Checks every known field of `config`; raises ConfigError (one line) on the first bad one.

  Returns the config, so entry points can write `config = validate(config)`.
  """
  for field, choices in CHOICES.items():
    present, value = _lookup(config, field)
    if present and value not in choices:
      _fail(field, value, "one of " + ", ".join(repr(c) for c in choices))
  for field in BOOLS:
    present, value = _lookup(config, field)
    if present and not isinstance(value, bool):
      _fail(field, value, "True or False")
  for field, low in INTS.items():
    present, value = _lookup(config, field)
    if present and not (_is_int(value) and value >= low):
      _fail(field, value, f"an integer >= {low}")
  for field, bounds in REALS.items():
    present, value = _lookup(config, field)
    if present:
      _check_real(field, value, bounds)
  _check_cross_fields(config)
  return config


def _check_cross_fields(config):
  present, seeds = _lookup(config, "train.seeds")
  if present:
    seeds = tuple(seeds) if isinstance(seeds, (list, tuple)) else seeds
    if (not isinstance(seeds, tuple) or not seeds or not all(_is_int(s) for s in seeds)
        or len(set(seeds)) != len(seeds)):
      _fail("train.seeds", seeds, "a non-empty tuple of distinct integers, e.g. (1111, 1112)")
  d_ok, d = _lookup(config, "model.d_model")
  h_ok, h = _lookup(config, "model.num_heads")
  if d_ok and h_ok and d % h:
    _fail("model.d_model", d, f"a multiple of model.num_heads ({h})")
  name_ok, name = _lookup(config, "dataset.name")
  task_ok, task = _lookup(config, "dataset.task")
  if name_ok and task_ok:
    binary = name in ("urfunny", "mustard")
    if name != "synthetic" and binary != (task == "binary"):
      _fail("dataset.task", task, f"{'binary' if binary else 'regression'!r} for {name}")
  enc_ok, encoder = _lookup(config, "model.text_encoder")
  init_ok, init = _lookup(config, "model.bert.init")
  path_ok, path = _lookup(config, "model.bert.path")
  if enc_ok and encoder == "bert" and init_ok and init == "checkpoint" and path_ok and not path:
    _fail("model.bert.path", path, "the folder of a Hugging Face BERT checkpoint (config.json "
          "and model.safetensors), e.g. bert-base-uncased; see the README section on BERT")
