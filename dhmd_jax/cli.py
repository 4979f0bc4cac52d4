"""What every command line of dhmd-jax shares: absl flags, one-line errors, exit statuses, help.

Each entry point (`main`, `benchmark`, `figures`, `synthetic`, the grids of `experiments/`)
defines its flags with absl (`flags.DEFINE_*`; its config with `define_config`, ml_collections'
config flag) and hands its `main(argv)` to `run`, which parses the command line and maps how
the command ends to one line on stderr and an exit status:

* a mistake on the command line (`UsageError`, `validation.ConfigError`: an unknown flag or
  config field, with "did you mean" when one is close; an ill-typed value; a flag without its
  value; a config file that does not load): `error: ...`, status 2, before any work starts;
* a run that cannot go on (the command's own errors, `Command.failures`, and the library's
  `DataError`, `TrainingError`, `CheckpointError`, `workdir.WriteError`: a full disk):
  `error: ...`, status 1;
* a workdir that another process holds (`workdir.Busy`): `error: ...` naming its pid, host and
  start time, status 3, before the command touches it;
* Ctrl-C: one line, status 130 (the trainer's own line when it stopped at a safe point);
* `--help` (`-h`, `--helpshort`, `-?`; `--helpfull` lists every config field): status 0.

`--config=FILE[:ARG]` may come after its `--config.FIELD=VALUE` overrides (ml_collections wants it
first; `parse` moves it there). Flag names are absl's, with underscores; the same name with
dashes is accepted too (`--num-train` for `--num_train`).
"""

import contextlib
import dataclasses
import faulthandler
import os
import re
import sys
import textwrap
import warnings
from typing import Any, Callable, Optional

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from dhmd_jax import validation

_SCHEMA_NAME = "configs/default.py"
_HELP_ARGS = {"-h", "--help", "-help", "--helpshort", "-helpshort", "-?"}
_HELPFULL_ARGS = {"--helpfull", "-helpfull"}
# The command line that `parse` hands to absl, which the config flags read their
# --config.FIELD overrides from (set only while parsing).
_ARGV = []


class UsageError(Exception):
  """A mistake on the command line; the message is one line (`error: ...`, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Command:
  """How one entry point is called and described.

  prog: how it is run ("python -m dhmd_jax.main"), in its help and hints.
  summary: what it does, the paragraph under --help's usage line.
  required: flags it cannot run without.
  placeholders: {flag: what --help writes for its value} (default: the name in capitals).
  common_fields: config fields --help shows (--helpfull shows them all).
  interrupted: the line Ctrl-C prints; `{flag}` is replaced by the flag's value.
  failures: its own errors that mean "the run cannot go on" (exit status 1).
  """
  prog: str
  summary: str
  required: tuple = ()
  placeholders: dict = dataclasses.field(default_factory=dict)
  common_fields: tuple = ()
  interrupted: str = "interrupted; rerun the same command to start it again"
  failures: tuple = ()


def define_config(default, flag_values=flags.FLAGS):
  """`--config=FILE[:ARG]`, ml_collections' config file flag (locked: no new fields), whose
  `--config.FIELD=VALUE` overrides `parse` checks; `default` is the file when none is given."""
  with _quiet_config_loading():  # the default is loaded now
    return config_flags.DEFINE_config_file(
        "config", default, "Config file (configs/*.py; ARG is passed to its get_config).",
        flag_values=flag_values, lock_config=True, sys_argv=_ARGV)


@contextlib.contextmanager
def _quiet_config_loading():
  """ml_collections loads config files with importlib's deprecated load_module."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    yield


def explicit_fields(flag_values=flags.FLAGS):
  """The config fields the user set: dotted names of --config.* flags, "<file>" for --config=."""
  flag = flag_values["config"]
  explicit = set(flag.override_values)
  if flag.present:
    explicit.add("<file>")
  return explicit


def run(command: Command, main: Callable[[list], Any], argv: Optional[list] = None,
        flag_values=flags.FLAGS) -> int:
  """Parses `argv` (default sys.argv[1:]) into `flag_values`, calls `main(rest of argv)` and
  returns the exit status (main's own int, else 0); every way to fail is one line on stderr."""
  argv = [command.prog, *(sys.argv[1:] if argv is None else argv)]
  try:
    rest = parse(command, argv, flag_values)
    if flag_values is flags.FLAGS:  # a program's own flags: set up what absl's app.run would
      _start_absl_program()
    status = main(rest)
  except _Help as help_text:
    try:
      print(help_text, flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    return 0
  except (UsageError, validation.ConfigError) as error:  # a value no run can use
    return _stop(f"error: {_one_line(error)}", 2)
  except KeyboardInterrupt:  # outside the trainer's own handling (importing, loading, ...)
    values = {name: flag_values[name].value for name in flag_values}
    return _stop(command.interrupted.format_map(values), 130)
  except Exception as error:  # pylint: disable=broad-except
    if isinstance(error, _library_errors("dhmd_jax.train", "Interrupted")):
      return _stop(_one_line(error), 130)
    if isinstance(error, _library_errors("dhmd_jax.workdir", "Busy")):
      return _stop(f"error: {_one_line(error)}", 3)  # workdir.BUSY_STATUS
    if isinstance(error, command.failures + _library_errors(
        "dhmd_jax.data", "DataError", "dhmd_jax.train", "TrainingError",
        "dhmd_jax.checkpoint", "CheckpointError", "dhmd_jax.workdir", "WriteError")):
      return _stop(f"error: {_one_line(error)}", 1)
    if _out_of_memory(error):
      return _stop(f"error: out of memory ({_first_line(error)}); {OUT_OF_MEMORY_ADVICE}", 1)
    raise
  return status if isinstance(status, int) else 0


OUT_OF_MEMORY_ADVICE = (
    "rerun with less to hold at once: model.remat=True (training: the same numbers), fewer seeds "
    "per run (train.seeds), a smaller train.eval_batch_size (predictions); a training run "
    "resumes from its last checkpoint")


def _out_of_memory(error):
  """A host MemoryError, or XLA's RESOURCE_EXHAUSTED (a device allocation that failed)."""
  jax_errors = sys.modules.get("jax.errors")
  return isinstance(error, MemoryError) or (
      jax_errors is not None and isinstance(error, jax_errors.JaxRuntimeError)
      and str(error).startswith("RESOURCE_EXHAUSTED"))


def _library_errors(*modules_and_names):
  """The named exception classes of the modules already imported: an error cannot come from a
  module that is not, and importing it (JAX with it) only to find out would take seconds."""
  pairs = zip(modules_and_names[::2], modules_and_names[1::2])
  return tuple(getattr(sys.modules[m], n) for m, n in pairs if m in sys.modules)


def _start_absl_program():
  logging.use_absl_handler()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    faulthandler.enable()
  except (AttributeError, OSError, RuntimeError):  # no usable stderr: nothing to dump to
    pass


def _stop(line, status):
  print(line, file=sys.stderr, flush=True)
  return status


def _one_line(error):
  return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


class _Help(Exception):
  """--help was asked for; the message is the help text."""


# ----------------------------------------------------------------------------- parsing


def parse(command, argv, flag_values=flags.FLAGS):
  """Parses argv (program name first) into `flag_values` and returns [program name]; raises
  UsageError (one line) for any mistake, before a config override is applied."""
  try:
    argv = flag_values.read_flags_from_files(argv, force_gnu=False)  # expands --flagfile=
  except flags.Error as e:
    raise UsageError(_first_line(e)) from None
  has_config = "config" in flag_values
  argv, config_arg, overrides, wants_help = _scan(flag_values, argv, has_config)
  given = config_arg is not None
  if has_config and not given:  # the default file, given explicitly: its overrides apply too
    config_arg = flag_values["config"].default_unparsed
    argv.insert(1, f"--config={config_arg}")
  fields = {}
  if has_config:
    try:
      config = validation.load_config_file(config_arg)
    except validation.ConfigError as e:
      raise UsageError(str(e)) from None
    fields = validation.config_fields(config)
  if wants_help:
    raise _Help(_help(command, flag_values, fields, config_arg, full=wants_help == "full"))
  for name, arg in overrides:
    if name not in fields:
      raise UsageError(_unknown_field(name, arg, fields, command.prog))
  _ARGV[:] = argv
  try:
    with _quiet_config_loading():
      rest = flag_values(argv)
  except flags.UnrecognizedFlagError as e:
    raise UsageError(_unknown_flag(e.flagname, flag_values, fields, command.prog)) from None
  except flags.IllegalFlagValueError as e:
    raise UsageError(_bad_value(str(e), flag_values, fields)) from None
  except (flags.Error, ValueError) as e:  # e.g. absl's "--noflag=1 does not take an argument"
    raise UsageError(_first_line(e)) from None
  finally:
    _ARGV.clear()
  if has_config:
    flag = flag_values["config"]
    if not given:  # as if the default had not been named: explicit_fields
      flag.present, flag.using_default_value = 0, True
    for name, value in flag.override_values.items():
      problem = _type_problem(value, fields[name])
      if problem:
        raise UsageError(_not_a(f"--config.{name}", repr(value), fields[name], problem))
  for name in command.required:
    if flag_values[name].value is None:
      raise UsageError(f"--{name} is required ({command.prog} --help lists the flags)")
  if len(rest) > 1:
    raise UsageError(f"unexpected argument {rest[1]!r}: flags are written --name=value "
                     f"({command.prog} --help lists them)")
  return rest


def _scan(flag_values, argv, has_config):
  """(argv for absl, the --config argument or None, [(override field, its argument)], the help
  asked for: None, "short" or "full"). In absl's argv, --config=FILE comes first
  (ml_collections refuses overrides before it; they mean the same after it) and dashed flag
  names are underscored. A flag that would take the next flag as its value is a mistake."""
  config_arg, config_args, args, overrides, wants_help = None, [], [], [], None
  rest = argv[1:]
  i = 0
  while i < len(rest):
    arg = rest[i]
    i += 1
    if arg == "--":
      args += rest[i - 1:]
      break
    if arg in _HELP_ARGS:
      wants_help = wants_help or "short"
      continue
    if arg in _HELPFULL_ARGS:
      wants_help = "full"
      continue
    if not arg.startswith("-"):
      args.append(arg)
      continue
    dashes = arg[:len(arg) - len(arg.lstrip("-"))]
    name, equals, value = arg[len(dashes):].partition("=")
    if name not in flag_values and name.replace("-", "_") in flag_values:
      name = name.replace("-", "_")
      arg = f"{dashes}{name}{equals}{value}"
    override = re.match(r"(?:no)?config\.(.*)", name) if has_config else None
    if override:
      overrides.append((override.group(1), arg))
      args.append(arg)
      continue
    flag = flag_values[name] if name in flag_values else None
    taken = [arg]
    if flag is not None and not flag.boolean:
      if not equals:  # absl takes the next argument as the value
        if i == len(rest):
          raise UsageError(f"--{name} needs a value (--{name}=...)")
        value = rest[i]
        taken.append(value)
        i += 1
      if value.startswith("-") and not re.match(r"-\.?\d", value):  # not a negative number
        raise UsageError(f"--{name} needs a value (--{name}=...), got {value!r}")
    if has_config and name == "config":
      config_arg, config_args = value, taken
    else:
      args += taken
  return [argv[0], *config_args, *args], config_arg, overrides, wants_help


def _unknown_field(name, arg, fields, prog):
  hint = (validation.did_you_mean(name, fields) or
          f"every field is declared in {_SCHEMA_NAME} ({prog} --helpfull lists them)")
  return f"unknown config field {name or arg}; {hint}"


def _unknown_flag(name, flag_values, fields, prog):
  candidates = [f"--{n}" for n in flag_values if not n.startswith("config.")]
  candidates += [f"--config.{n}" for n in fields]
  hint = validation.did_you_mean(f"--{name}", candidates) or f"{prog} --help lists the flags"
  return f"unknown flag --{name}; {hint}"


def _bad_value(message, flag_values, fields):
  """One line from absl's 'flag --name=value: reason'."""
  match = re.match(r"flag --([^=]*)=(.*?): (.*)", message, re.DOTALL)
  if not match:
    return _first_line(message)
  name, value, reason = match.groups()
  field = name[len("config."):] if name.startswith("config.") else None
  if field in fields:
    return _not_a(f"--{name}", repr(value), fields[field], _describe(fields[field]))
  if name in flag_values and flag_values[name].boolean:  # absl's reason is a tuple's repr
    reason = f"write --{name}, --no{name} or --{name}=true|false"
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


def _own_flags(flag_values):
  """The command's flags in definition order (--config first), not the overrides; of absl's
  process-wide flags, those of dhmd_jax and of the script run (not absl's logging flags,
  orbax's)."""
  names = [n for n in flag_values if flag_values[n].name == n and not n.startswith("config.")]
  if flag_values is flags.FLAGS:
    ours = {id(f) for module, defined in flag_values.flags_by_module_dict().items()
            if module.split(".")[0] == "dhmd_jax" or module in (sys.argv[0], "__main__")
            for f in defined}
    names = [n for n in names if id(flag_values[n]) in ours]
  return sorted(names, key=lambda n: n != "config")


def _value_text(command, name, flag, *, choices):
  """How --help writes a flag with its value: --workdir=DIR, --mode=train|evaluate, --[no]x."""
  if name == "config":
    return "--config=FILE[:ARG]"
  if flag.boolean:
    return f"--[no]{name}"
  values = getattr(flag.parser, "enum_values", None)
  if choices and values:
    return f"--{name}={'|'.join(values)}"
  kind = {"int": "INT", "float": "NUMBER"}.get(flag.flag_type(), name.upper())
  return f"--{name}={command.placeholders.get(name, kind)}"


def _help(command, flag_values, fields, config_arg, *, full):
  wrap = lambda text, indent: textwrap.wrap(text, width=96, initial_indent=indent,
                                            subsequent_indent=indent)
  names = _own_flags(flag_values)
  items = []
  for name in names:
    shown = _value_text(command, name, flag_values[name], choices=False)
    items.append(shown if name in command.required else f"[{shown}]")
    if name == "config":
      items.append("[--config.FIELD=VALUE ...]")
  lines, line = [], f"usage: {command.prog}"
  for item in items:  # the items whole, wrapped under the first
    if len(line) + 1 + len(item) > 96 and line.strip() != f"usage: {command.prog}":
      lines.append(line)
      line = " " * len(f"usage: {command.prog}")
    line += " " + item
  lines += [line, ""]
  lines += wrap(command.summary, "")
  lines += ["", "flags:"]
  for name in names:
    flag = flag_values[name]
    text = re.sub(r"^<[^>]*>: ", "", flag.help)  # absl's enum flags start with their choices
    if name == "config":
      default = os.path.relpath(flag.default_unparsed)
    else:
      default = None if flag.default is None else repr(flag.default)
    text += " Required." if name in command.required else ""
    text += f" Default {default}." if default is not None else ""
    shown = "  " + _value_text(command, name, flag, choices=True)
    described = wrap(text, " " * 34)
    if len(shown) < 34:
      lines += [shown.ljust(34) + described[0].lstrip(), *described[1:]]
    else:
      lines += [shown, *described]
  if "config" in flag_values:
    lines += _field_help(command, fields, config_arg, full=full)
  return "\n".join(lines)


def _field_help(command, fields, config_arg, *, full):
  docs = validation.field_docs()
  wrap = lambda text, indent: textwrap.wrap(text, width=96, initial_indent=indent,
                                            subsequent_indent=indent)
  leaves = [n for n in fields if not isinstance(fields[n], ml_collections.ConfigDict)]
  if full:
    shown = [n for n in docs if n in leaves] + [n for n in leaves if n not in docs]
  else:
    shown = [n for n in command.common_fields if n in fields]
  path, colon, arg = config_arg.partition(":")
  lines = [""]
  lines += wrap(f"config fields: --config.FIELD=VALUE overrides one field of the config file. "
                f"Every field is declared and documented in {_SCHEMA_NAME}. "
                + ("All fields" if full else
                   f"The common ones ({command.prog} --helpfull lists all)")
                + f", with their values in {os.path.relpath(path)}{colon}{arg}:", "")
  for name in shown:
    lines.append(f"  --config.{name}={fields[name]!r}")
    doc = docs.get(name) or docs.get(name.rsplit(".", 1)[0], "")  # a group's fields share its doc
    allowed = validation.describe(name)
    lines += wrap(doc + (f" Allowed: {allowed}." if allowed else ""), " " * 6)
  return lines
