"""The machine a run or a measurement ran on, as reports name it: the CPU's model and how many
CPUs this process may use. Float rounding (and with it the last digits of a run's metrics)
and every timing depend on the CPU, so results.json, the benchmark and the comparison with the
DMD code all record it from here."""

import os
import platform


def cpu_model(cpuinfo="/proc/cpuinfo"):
  """The CPU's model name ("model name" in Linux's /proc/cpuinfo; elsewhere, or where that
  file has none, what the platform module says), or "unknown"."""
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("model name") and ":" in line:
          name = line.split(":", 1)[1].strip()
          if name:
            return name
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown"


def cpus():
  """How many CPUs this process may run on (its affinity where the OS has one)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1
