"""Command line: train, evaluate or predict.

  python -m dhmd_jax.main                                   # synthetic MOSEI-shaped default
  python -m dhmd_jax.main --config=configs/mosei.py --workdir=runs/mosei
  python -m dhmd_jax.main --config=configs/mosei.py:unaligned --config.train.num_epochs=5
  python -m dhmd_jax.main --workdir=runs/mosei --mode=evaluate --split=valid
  python -m dhmd_jax.main --workdir=runs/mosei --mode=predict --output=p.csv

Rerunning `train` with an existing workdir resumes from its latest checkpoint; evaluate and
predict read the run's own config from the workdir. `--help` shows the common config fields,
`--helpfull` all of them (each is declared, with a comment, in configs/default.py).

A mistake on the command line (an unknown or ill-typed `--config.*` field, an unknown flag, a
config file that does not load) stops with one line `error: ...` and exit status 2; a run that
cannot go on stops with one line and status 1; Ctrl-C with one line and status 130.
"""

import json
import os
import re
import sys
import textwrap

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

import configs
from dhmd_jax import validation

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "synthetic.py")
_SCHEMA = os.path.join(os.path.dirname(configs.__file__), "default.py")
_SCHEMA_NAME = "configs/default.py"
_PROG = "python -m dhmd_jax.main"
# Shown by --help; --helpfull shows every field.
_COMMON_FIELDS = ("dataset.name", "dataset.path", "dataset.format", "dataset.cache_dir",
                  "train.seeds", "train.num_epochs", "train.batch_size", "train.learning_rate",
                  "model.use_fd", "model.use_ca", "model.use_gd", "model.use_dm")
_OWN_FLAGS = {"workdir": "DIR", "mode": None, "split": None, "checkpoint": None, "output": "CSV"}
_HELP_ARGS = {"-h", "--help", "-help", "--helpshort", "-helpshort", "-?"}
_HELPFULL_ARGS = {"--helpfull", "-helpfull"}

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Folder for checkpoints, logs, report.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"], "What to do.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "valid", "test"],
                           "Split for --mode=evaluate/predict.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Checkpoint for --mode=evaluate/predict.")
_OUTPUT = flags.DEFINE_string("output", "", "CSV path for --mode=predict.")


def main(argv):
  del argv  # _parse_flags refused anything that is not a flag
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    _run(flags.FLAGS.config, _WORKDIR.value)
  except KeyboardInterrupt:  # outside the trainer's own handling (importing, loading, evaluating)
    _stop(f"interrupted (--mode={_MODE.value}); rerun the same command to start it again", 130)


def _run(config, workdir):
  # Imported here, after the flags are checked: JAX, Flax and orbax take seconds to import, and
  # a mistake on the command line should be answered at once.
  # pylint: disable=g-import-not-at-top
  from dhmd_jax import checkpoint
  from dhmd_jax import data as data_lib
  from dhmd_jax import evaluate as evaluate_lib
  from dhmd_jax import train as train_lib
  # pylint: enable=g-import-not-at-top
  try:
    if _MODE.value == "train":
      train_lib.train_and_evaluate(config, workdir)
      return
    config = evaluate_lib.run_config(workdir, given=config, explicit=_explicit_fields())
    if _MODE.value == "evaluate":
      result = evaluate_lib.evaluate(config, workdir, split=_SPLIT.value,
                                     which=_CHECKPOINT.value)
      print(json.dumps(result["summary"], indent=2))
    else:
      path = evaluate_lib.predict(config, workdir, split=_SPLIT.value, which=_CHECKPOINT.value,
                                  output=_OUTPUT.value)
      print(f"wrote {path}")
  except train_lib.Interrupted as e:
    _stop(str(e), 130)
  except validation.ConfigError as e:  # a value no run can use: a command-line mistake
    _stop(f"error: {e}", 2)
  except (data_lib.DataError, train_lib.TrainingError, checkpoint.CheckpointError) as e:
    _stop(f"error: {e}", 1)


def _stop(line, status):
  print(line, file=sys.stderr, flush=True)
  sys.exit(status)


def _usage_error(message):
  _stop(f"error: {message}", 2)


def _explicit_fields():
  """The config fields the user set: dotted names of --config.* flags, "<file>" for --config=."""
  flag = flags.FLAGS["config"]
  explicit = set(flag.override_values)
  if flag.present:
    explicit.add("<file>")
  return explicit


# ----------------------------------------------------------------------------- parsing


def _parse_flags(argv):
  """absl's `flags_parser`: any mistake on the command line is one line and exit status 2."""
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # expands --flagfile=
  except flags.Error as e:
    _usage_error(_first_line(e))
  argv, config_arg, overrides, wants_help = _scan(argv)
  config = _load_config(config_arg)
  if wants_help:
    print(_help(config, config_arg, full=wants_help == "full"))
    sys.exit(0)
  fields = validation.config_fields(config)
  for name, arg in overrides:
    if name not in fields:
      _usage_error(_unknown_field(name, arg, fields))
  try:
    # Defined only now: ml_collections loads the config file and registers one flag per
    # --config.* override as soon as the flag exists, so every override is checked first.
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                    f"Config file (configs/*.py); fields in {_SCHEMA_NAME}.",
                                    lock_config=True, sys_argv=argv)
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    _usage_error(_unknown_flag(e.flagname, fields))
  except flags.IllegalFlagValueError as e:
    _usage_error(_bad_value(str(e), fields))
  except flags.Error as e:
    _usage_error(_first_line(e))
  for name, value in flags.FLAGS["config"].override_values.items():
    problem = _type_problem(value, fields[name])
    if problem:
      _usage_error(_not_a(f"--config.{name}", repr(value), fields[name], problem))
  for name in ("workdir", "output"):
    value = flags.FLAGS[name].value
    if value.startswith("-"):  # `--workdir --mode=...` takes the next flag as the folder
      _usage_error(f"--{name} needs a value (--{name}=...), got {value!r}")
  if len(rest) > 1:
    _usage_error(f"unexpected argument {rest[1]!r}: flags are written --name=value "
                 f"({_PROG} --help lists them)")
  return rest


def _scan(argv):
  """(argv with --config=FILE moved first, FILE, [(override field, its argument)], help
  request). ml_collections refuses overrides before --config=; they mean the same after it."""
  config_arg, overrides, wants_help = _DEFAULT_CONFIG, [], None
  config_args, others = [], []
  args = argv[1:]
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--":
      others += args[i:]
      break
    if arg in _HELP_ARGS:
      wants_help = wants_help or "short"
    elif arg in _HELPFULL_ARGS:
      wants_help = "full"
    match = re.match(r"^--?(?:no)?config\.([^=]*)", arg)
    if match:
      overrides.append((match.group(1), arg))
    if re.match(r"^--?config=", arg):
      config_arg = arg.split("=", 1)[1]
      config_args = [arg]
    elif arg in ("--config", "-config") and i + 1 < len(args):
      config_arg = args[i + 1]
      config_args = [arg, config_arg]
      i += 1
    else:
      others.append(arg)
    i += 1
  return [argv[0], *config_args, *others], config_arg, overrides, wants_help


def _load_config(arg):
  """The config that `--config=arg` names, loaded as ml_collections will; one line if not."""
  try:
    return validation.load_config_file(arg)
  except validation.ConfigError as e:
    _usage_error(str(e))


def _unknown_field(name, arg, fields):
  hint = (validation.did_you_mean(name, fields) or
          f"every field is declared in {_SCHEMA_NAME} ({_PROG} --helpfull lists them)")
  return f"unknown config field {name or arg}; {hint}"


def _unknown_flag(name, fields):
  candidates = [f"--{n}" for n in flags.FLAGS if not n.startswith("config.")]
  candidates += [f"--config.{n}" for n in fields]
  hint = validation.did_you_mean(f"--{name}", candidates) or f"{_PROG} --help lists the flags"
  return f"unknown flag --{name}; {hint}"


def _bad_value(message, fields):
  """One line from absl's 'flag --name=value: reason'."""
  match = re.match(r"flag --([^=]*)=(.*?): (.*)", message, re.DOTALL)
  if not match:
    return _first_line(message)
  name, value, reason = match.groups()
  field = name[len("config."):] if name.startswith("config.") else None
  if field in fields:
    return _not_a(f"--{name}", repr(value), fields[field], _describe(fields[field]))
  return f"bad value for --{name}: {value!r}: {_first_line(reason)}"


def _not_a(flag, shown, now, kind):
  if isinstance(now, ml_collections.ConfigDict):
    names = list(now)
    listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return (f"bad value for {flag}: {shown}: it is a group of fields ({listed}); set them one "
            f"by one, e.g. {flag}.{names[0]}=...")
  return (f"bad value for {flag}: {shown} is not {kind} (now {now!r}; {_SCHEMA_NAME} documents "
          f"the field)")


def _describe(value):
  if isinstance(value, bool):
    return "True or False"
  if isinstance(value, int):
    return "an integer"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, str):
    return "a string"
  if isinstance(value, tuple):
    kinds = {_describe(v) for v in value}
    if len(kinds) == 1:
      kind = kinds.pop().replace("an integer", "integers").replace("a number", "numbers")
      return f"a tuple of {kind.replace('a string', 'strings')}"
    return "a tuple"
  return f"a {type(value).__name__}"


def _type_problem(value, now):
  """What `value` should be to replace `now`, or None. ml_collections checks scalars itself;
  tuples it takes as they come (`--config.train.seeds=abc` gives ('abc',))."""
  if isinstance(now, tuple) and now and isinstance(value, tuple):
    for v in value:
      if not any(type(v) is type(n) or (isinstance(n, float) and type(v) is int) for n in now):
        return _describe(now)
  return None


def _first_line(error):
  """validation.first_line, without absl's 'ERROR:' prefix on flag errors."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return re.sub(r"^ERROR:+\s*", "", lines[0]) if lines else type(error).__name__


# ----------------------------------------------------------------------------- help


def _field_docs():
  """{dotted field: its comment or ""} from configs/default.py, in declaration order: the one
  place where fields are described."""
  docs, block = {}, []
  with open(_SCHEMA) as f:
    for line in f:
      text = line.strip()
      if text.startswith("#"):
        comment = text.lstrip("#").strip()
        if not comment.startswith("---"):  # section banners
          block.append(comment)
        continue
      match = re.match(r"config\.([\w.]+)\s*=\s*(.*)", text)
      if match:
        inline = match.group(2).split("  # ", 1)
        docs[match.group(1)] = " ".join(block) or (inline[1].strip() if len(inline) == 2 else "")
      block = []
  return docs


def _help(config, config_arg, *, full):
  fields, docs = validation.config_fields(config), _field_docs()
  wrap = lambda text, indent: textwrap.wrap(text, width=96, initial_indent=indent,
                                            subsequent_indent=indent)
  lines = [f"usage: {_PROG} [--config=FILE[:ARG]] [--config.FIELD=VALUE ...] [--workdir=DIR]",
           f"{' ' * 7}{' ' * len(_PROG)} [--mode=MODE] [--split=SPLIT] [--checkpoint=WHICH] "
           f"[--output=CSV]", ""]
  lines += wrap("Trains DHMD (rerunning with the same workdir resumes), or evaluates or "
                "predicts with a trained workdir (using the run's own config from there).", "")
  lines += ["", "flags:"]
  own = [("config=FILE[:ARG]", "Config file (configs/*.py; ARG is passed to its get_config).",
          os.path.relpath(_DEFAULT_CONFIG))]
  for name, placeholder in _OWN_FLAGS.items():
    flag = flags.FLAGS[name]
    choices = getattr(flag.parser, "enum_values", None)
    own.append((f"{name}={'|'.join(choices) if choices else placeholder}",
                re.sub(r"^<[^>]*>: ", "", flag.help), repr(flag.default)))
  for name, text, default in own:
    described = wrap(f"{text} Default {default}.", " " * 34)
    lines += [f"  --{name}".ljust(34) + described[0].lstrip(), *described[1:]]
  leaves = [n for n in fields if not isinstance(fields[n], ml_collections.ConfigDict)]
  if full:
    shown = [n for n in docs if n in leaves] + [n for n in leaves if n not in docs]
  else:
    shown = [n for n in _COMMON_FIELDS if n in fields]
  lines.append("")
  lines += wrap(f"config fields: --config.FIELD=VALUE overrides one field of the config file. "
                f"Every field is declared and documented in {_SCHEMA_NAME}. "
                + ("All fields" if full else f"The common ones ({_PROG} --helpfull lists all)")
                + f", with their values in {os.path.relpath(config_arg.split(':')[0])}"
                + (f":{config_arg.split(':', 1)[1]}" if ":" in config_arg else "") + ":", "")
  for name in shown:
    lines.append(f"  --config.{name}={fields[name]!r}")
    lines += wrap(docs.get(name, ""), " " * 6)
  return "\n".join(lines)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
