"""The config schema's rules, and `validate(config)`: every value checked once, first, in every
entry point.

The schema is `configs/default.py`: each field is declared there once, with its default and a
comment, and its rule (type and allowed values) sits in the `RULES` table of the same file. This
module holds the kinds of rule and everything derived from that table: `validate(config)`, the
field descriptions of `--help` (`field_docs`, `describe`) and the dotted-field access used by the
command lines, the grids and evaluation. A bad value stops with one line naming the field, the
value and what is allowed, before any data is loaded or any model is built. Fields a config does
not have are skipped, so configs written for older versions validate too; a field the schema
does not know is refused (a typo in a config file), except in a run's stored config.json.
"""

import dataclasses
import difflib
import functools
import importlib.util
import numbers
import os
import re
import traceback
from typing import Any, Optional

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line."""


# ----------------------------------------------------------------------------- kinds of rule


def _is_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class OneOf:
  """A fixed set of values (strings)."""
  choices: tuple

  def __init__(self, *choices):
    object.__setattr__(self, "choices", tuple(choices))

  def ok(self, value):
    return isinstance(value, str) and value in self.choices

  def describe(self):
    return "one of " + ", ".join(repr(c) for c in self.choices)


@dataclasses.dataclass(frozen=True)
class Bool:
  """True or False (not 0/1), or one of the strings given (e.g. Bool("auto"))."""
  also: tuple

  def __init__(self, *also):
    object.__setattr__(self, "also", tuple(also))

  def ok(self, value):
    return isinstance(value, bool) or (isinstance(value, str) and value in self.also)

  def describe(self):
    if not self.also:
      return "True or False"
    return "True, False or " + " or ".join(repr(a) for a in self.also)


@dataclasses.dataclass(frozen=True)
class Int:
  """An integer >= low."""
  low: int

  def ok(self, value):
    return _is_int(value) and value >= self.low

  def describe(self):
    return f"an integer >= {self.low}"


@dataclasses.dataclass(frozen=True)
class Real:
  """A number in [low, high), (low, high) with `low_open`, [low, high] with `high_closed`;
  None leaves that end unbounded. Integers are numbers too."""
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_closed: bool = False

  def ok(self, value):
    if not _is_real(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    if self.high is not None and (value > self.high if self.high_closed else value >= self.high):
      return False
    return True

  def describe(self):
    parts = []
    if self.low is not None:
      parts.append(f"{'>' if self.low_open else '>='} {self.low}")
    if self.high is not None:
      parts.append(f"{'<=' if self.high_closed else '<'} {self.high}")
    return "a number" + (" " + " and ".join(parts) if parts else "")


@dataclasses.dataclass(frozen=True)
class Text:
  """Any string (paths; empty is allowed: each field's comment says what empty means)."""

  def ok(self, value):
    return isinstance(value, str)

  def describe(self):
    return "a string"


@dataclasses.dataclass(frozen=True)
class Seeds:
  """A non-empty tuple of distinct integers."""

  def ok(self, value):
    value = tuple(value) if isinstance(value, (list, tuple)) else value
    return (isinstance(value, tuple) and bool(value) and all(_is_int(s) for s in value)
            and len(set(value)) == len(value))

  def describe(self):
    return "a non-empty tuple of distinct integers, e.g. (1111, 1112)"


Rule = Any  # one of the classes above: .ok(value) -> bool, .describe() -> str


@functools.cache
def rules():
  """{dotted field: rule} of every leaf field of the schema (`configs/default.py` RULES)."""
  # pylint: disable=g-import-not-at-top
  from configs import default  # imported here: configs/default.py imports this module
  return dict(default.RULES)


# ----------------------------------------------------------------------------- dotted fields


_MISSING = object()


def get_field(config, dotted, default=_MISSING):
  """config["a"]["b"]["c"] for "a.b.c" (ConfigDicts and plain dicts alike); `default` when the
  config has no such field (KeyError without one)."""
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      if default is _MISSING:
        raise KeyError(dotted) from None
      return default
  return node


def set_field(config, dotted, value):
  """Sets config["a"]["b"]["c"] = value for "a.b.c"."""
  *parents, leaf = dotted.split(".")
  node = get_field(config, ".".join(parents)) if parents else config
  node[leaf] = value


def config_fields(config, prefix="", *, groups=True):
  """{dotted name: value} of every field in declaration order, nested groups (ConfigDicts or
  dicts) included as fields too unless `groups=False`."""
  out = {}
  for key, value in config.items():
    is_group = hasattr(value, "items")
    if groups or not is_group:
      out[prefix + key] = value
    if is_group:
      out.update(config_fields(value, prefix + key + ".", groups=groups))
  return out


def flat_config(config):
  """{"train.learning_rate": 1e-4, ...}: every leaf under its dotted name, tuples as lists (as
  JSON stores them), so a config and its config.json compare equal."""
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in config_fields(config, groups=False).items()}


# ----------------------------------------------------------------------------- validation


def _fail(field, value, allowed):
  raise ConfigError(f"config.{field} = {value!r} is invalid: expected {allowed}")


def validate(config, *, strict=True):
  """Checks every field of `config` against its rule; raises ConfigError (one line) on the
  first bad one, or (with `strict`) on a field the schema does not declare.

  Returns the config, so entry points can write `config = validate(config)`.
  """
  table = rules()
  for field, value in config_fields(config, groups=False).items():
    rule = table.get(field)
    if rule is None:
      if strict:
        hint = did_you_mean(field, table) or "every field is declared in configs/default.py"
        raise ConfigError(f"config.{field} is not a config field; {hint}")
      continue
    if not rule.ok(value):
      _fail(field, value, rule.describe())
  _check_cross_fields(config)
  return config


def describe(field):
  """What `field` may be ("an integer >= 1"), or None for a field the schema does not declare."""
  rule = rules().get(field)
  return None if rule is None else rule.describe()


def _check_cross_fields(config):
  d = get_field(config, "model.d_model", None)
  h = get_field(config, "model.num_heads", None)
  if d is not None and h is not None and d % h:
    _fail("model.d_model", d, f"a multiple of model.num_heads ({h})")
  name = get_field(config, "dataset.name", None)
  task = get_field(config, "dataset.task", None)
  if name is not None and task is not None:
    binary = name in ("urfunny", "mustard")
    if name != "synthetic" and binary != (task == "binary"):
      _fail("dataset.task", task, f"{'binary' if binary else 'regression'!r} for {name}")
  encoder = get_field(config, "model.text_encoder", None)
  init = get_field(config, "model.bert.init", None)
  path = get_field(config, "model.bert.path", None)
  if encoder == "bert" and init == "checkpoint" and path is not None and not path:
    _fail("model.bert.path", path, "the folder of a Hugging Face BERT checkpoint (config.json "
          "and model.safetensors), e.g. bert-base-uncased; see docs/bert.md")


# ----------------------------------------------------------------------------- documentation


@functools.cache
def field_docs():
  """{dotted field: its comment in configs/default.py, or ""}, in declaration order: the fields'
  one description, shown by `--help`."""
  # pylint: disable=g-import-not-at-top
  from configs import default
  docs, block, shared = {}, [], False
  with open(default.__file__) as f:
    for line in f:
      text = line.strip()
      if text == "return config":  # the end of get_config(): helpers below set fields too
        break
      if text.startswith("#"):
        comment = text.lstrip("#").strip()
        if shared:  # a new comment starts a new block
          block, shared = [], False
        if not comment.startswith("---"):  # section banners
          block.append(comment)
        continue
      match = re.match(r"config\.([\w.]+)\s*=\s*(.*)", text)
      if match:  # a block of comments describes every assignment up to a blank line
        inline = match.group(2).split("  # ", 1)
        own = inline[1].strip() if len(inline) == 2 else ""
        own = [own[:1].upper() + own[1:] + "."] if own else []  # the field's own, first
        docs[match.group(1)] = " ".join(own + block)
        shared = True
      elif not text:
        block, shared = [], False
  return docs


# ----------------------------------------------------------------------------- config files


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
