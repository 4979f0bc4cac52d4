"""Library modules log through the `dhmd_jax` logger; only the command-line front ends print."""

import ast
import io
import logging
import pathlib
import sys

import dhmd_jax

PACKAGE = pathlib.Path(dhmd_jax.__file__).parent
FRONT_ENDS = {"cli.py"}  # the shared runner prints help and the one-line errors
COMMANDS = {"main", "run_command"}  # a command's entry point, and what it nests, may print


def _prints_outside_main(path):
  tree = ast.parse(path.read_text())
  found = []

  def visit(node, functions):
    for child in ast.iter_child_nodes(node):
      inner = functions
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        inner = functions + (child.name,)
      if (isinstance(child, ast.Call) and isinstance(child.func, ast.Name)
          and child.func.id == "print" and not COMMANDS & set(functions)):
        found.append(f"{path.relative_to(PACKAGE)}:{child.lineno} (in {functions or 'module'})")
      visit(child, inner)

  visit(tree, ())
  return found


def test_only_front_ends_print():
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.name not in FRONT_ENDS:
      found += _prints_outside_main(path)
  assert not found, f"print() outside a command's main(): {found}; log through " \
                    f"logging.getLogger(__name__) instead"


def test_info_to_stdout_warnings_to_stderr_without_prefix(monkeypatch):
  out, err = io.StringIO(), io.StringIO()
  monkeypatch.setattr(sys, "stdout", out)  # the handlers look the streams up when they write
  monkeypatch.setattr(sys, "stderr", err)
  log = logging.getLogger("dhmd_jax.train")
  log.info("epoch %d", 3)
  log.warning("warning: %s", "set aside")
  assert out.getvalue() == "epoch 3\n" and err.getvalue() == "warning: set aside\n"
  logging.getLogger("dhmd_jax").setLevel(logging.WARNING)
  try:
    log.info("silenced")
  finally:
    logging.getLogger("dhmd_jax").setLevel(logging.INFO)
  assert out.getvalue() == "epoch 3\n"
