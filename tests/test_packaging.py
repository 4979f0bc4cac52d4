"""The pinned versions: constraints.txt pins every dependency that setup.cfg declares, within
the ranges it declares, and the environment the tests run in is the pinned one."""

import configparser
import importlib.metadata
import os
import re

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins():
  pins = {}
  with open(os.path.join(REPO, "constraints.txt")) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        name, version = line.split("==")
        pins[_norm(name)] = version
  return pins


def _norm(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def _declared():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  lines = cfg["options"]["install_requires"].splitlines()
  for extra, text in cfg["options.extras_require"].items():
    if extra != "cuda12":  # jax[cuda12] needs a GPU machine; jax itself is pinned
      lines += text.splitlines()
  return [Requirement(l) for l in (l.split("#", 1)[0].strip() for l in lines) if l]


def test_every_declared_dependency_is_pinned_within_its_range():
  pins = _pins()
  for req in _declared():
    assert _norm(req.name) in pins, f"{req.name} is not pinned in constraints.txt"
    assert req.specifier.contains(pins[_norm(req.name)]), (req, pins[_norm(req.name)])


@pytest.mark.skipif(bool(os.environ.get("DHMD_JAX_UNPINNED")),
                    reason="DHMD_JAX_UNPINNED set: trying versions other than the pinned ones")
def test_the_tests_run_on_the_pinned_versions():
  pins = _pins()
  for req in _declared():
    installed = importlib.metadata.version(req.name)
    assert installed == pins[_norm(req.name)], (
        f"{req.name} {installed} is installed, constraints.txt pins {pins[_norm(req.name)]}: "
        f"install with -c constraints.txt, or set DHMD_JAX_UNPINNED=1 to test other versions")
