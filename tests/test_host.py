"""dhmd_jax.host: the CPU model and CPU count that reports record."""

import os
import platform

from dhmd_jax import host


def test_the_cpu_model_comes_from_cpuinfo_and_falls_back_to_the_platform(tmp_path, monkeypatch):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                  "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2\n\n"
                  "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n")
  assert host.cpu_model(str(info)) == "Intel(R) Xeon(R) Processor"
  monkeypatch.setattr(platform, "processor", lambda: "arm")
  info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n")  # an aarch64 file
  assert host.cpu_model(str(info)) == "arm"
  info.write_text("model name\t:   \n")  # a blank name is no name
  assert host.cpu_model(str(info)) == "arm"
  assert host.cpu_model(str(tmp_path / "missing")) == "arm"  # no /proc (macOS, Windows)
  monkeypatch.setattr(platform, "processor", lambda: "")
  monkeypatch.setattr(platform, "machine", lambda: "")
  assert host.cpu_model(str(tmp_path / "missing")) == "unknown"


def test_the_cpu_count_is_what_this_process_may_use(monkeypatch):
  if hasattr(os, "sched_getaffinity"):
    assert host.cpus() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")
  monkeypatch.setattr(os, "cpu_count", lambda: None)
  assert host.cpus() == 1
