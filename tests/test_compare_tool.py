"""`tools/compare_with_dmd.py` without the DMD code: its arguments, its one-line errors, the
interleaving of its timed processes, and the arithmetic and layout of its two tables (fake
timings and differences). What needs torch is skipped where torch is missing."""

import importlib.util
import json
import pathlib
import stat
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tool = _load("compare_with_dmd")


def fake_checkout(root, *, config=True):
  for name in tool.dmd_reference.REF_FILES + ((tool.dmd_reference.CONFIG_FILE,) if config
                                             else ()):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("# stand-in\n")
  return root


def python_without_site_packages(tmp_path):
  """An interpreter that finds only the standard library: no torch, scikit-learn or tqdm."""
  path = tmp_path / "bare_python"
  path.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


def one_line_error(capsys, argv):
  assert tool.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("compare_with_dmd.py: "), err
  return err


# ---------------------------------------------------------------- arguments and errors


def test_arguments():
  opts = tool.parse_args(["--dmd=x"])
  assert opts.mode == "both" and opts.ref_python == sys.executable and opts.rounds == 3
  assert opts.cases == [("aligned", 16, 1), ("aligned", 64, 1), ("unaligned", 16, 1),
                        ("aligned", 16, 10)]
  assert opts.threads == len(tool.available_cpus())
  quick = tool.parse_args(["--dmd=x", "--quick"])
  assert quick.cases == [("aligned", 16, 1)] and quick.rounds == 2
  opts = tool.parse_args(["--dmd=x", "--quick", "--rounds=1", "--threads=1",
                          "--cases=unaligned:64x10,aligned:8", "--mode=speed"])
  assert (opts.rounds, opts.threads, opts.mode) == (1, 1, "speed")
  assert opts.cases == [("unaligned", 64, 10), ("aligned", 8, 1)]
  assert [tool.case_name(c) for c in opts.cases] == ["unaligned:64x10", "aligned:8"]


@pytest.mark.parametrize("argv, says", [
    ([], "--dmd"),
    (["--dmd=x", "--nonsense"], "--nonsense"),
    (["--dmd=x", "--mode=fast"], "--mode"),
    (["--dmd=x", "--cases=aligned:16:1"], "bad --cases entry 'aligned:16:1'"),
    (["--dmd=x", "--cases=sideways:16"], "bad --cases entry 'sideways:16'"),
    (["--dmd=x", "--cases=aligned:0"], "bad --cases entry"),
    (["--dmd=x", "--cases=aligned:16x0"], "bad --cases entry"),
    (["--dmd=x", "--rounds=0"], "--rounds=0"),
    (["--dmd=x", "--threads=100000"], "--threads=100000"),
])
def test_bad_arguments_are_one_line(capsys, argv, says):
  assert says in one_line_error(capsys, argv)


def test_missing_or_wrong_checkout_is_one_line(capsys, tmp_path):
  err = one_line_error(capsys, [f"--dmd={tmp_path / 'nowhere'}"])
  assert "does not exist" in err
  fake_checkout(tmp_path, config=False)
  (tmp_path / "run.py").unlink()
  err = one_line_error(capsys, [f"--dmd={tmp_path}", "--mode=parity"])
  assert "is not a DMD checkout (no run.py)" in err
  (tmp_path / "run.py").write_text("")
  # the speed mode also reads the DMD code's hyper-parameters
  err = one_line_error(capsys, [f"--dmd={tmp_path}", "--mode=speed"])
  assert "is not a DMD checkout (no config/config.json)" in err


def test_python_without_torch_is_one_line(capsys, tmp_path):
  checkout = fake_checkout(tmp_path / "dmd")
  err = one_line_error(capsys, [f"--dmd={checkout}",
                                f"--ref_python={python_without_site_packages(tmp_path)}"])
  assert "has no torch, sklearn, tqdm" in err
  assert "pip install torch scikit-learn tqdm" in err
  err = one_line_error(capsys, [f"--dmd={checkout}", f"--ref_python={tmp_path / 'nopython'}"])
  assert "is not an executable" in err


# ---------------------------------------------------------------- speed


def test_schedule_alternates():
  cases = tool.parse_args(["--dmd=x"]).cases
  order = tool.schedule(cases, 3)
  assert [side for _, _, side in order] == ["dmd", "jax"] * (3 * len(cases))
  pairs = [(order[i][:2], order[i + 1][:2]) for i in range(0, len(order), 2)]
  assert all(a == b for a, b in pairs)  # each DMD-code run is followed by ours on the same case
  assert [p[0] for p in pairs] == [(r, c) for r in (1, 2, 3) for c in cases]


def test_steps_per_case():
  for case in tool.parse_args(["--dmd=x"]).cases:
    warmup, timed = tool.steps_for(case, quick=False)
    quick_warmup, quick_timed = tool.steps_for(case, quick=True)
    assert warmup >= 1 and 2 <= timed <= 10 and 1 <= quick_timed <= timed
    assert quick_warmup == warmup
  assert tool.steps_for(("aligned", 16, 1), quick=False) == (2, 10)
  assert tool.steps_for(("unaligned", 16, 1), quick=False) == (1, 2)


def test_speed_table_medians_and_ratio():
  case, other = ("aligned", 16, 1), ("unaligned", 16, 10)
  timings = {(case, "dmd"): [300.0, 330.0, 310.0], (case, "jax"): [100.0, None, 150.0],
             (other, "dmd"): [None, None, None], (other, "jax"): [5.0, 6.0, 7.0]}
  lines, details = tool.speed_table(timings, [case, other])
  assert lines[0].startswith("| case | micro-batches per Adam step | DMD code ms/step |")
  assert lines[1] == "|---|---|---|---|---|---|"
  # medians 310 and 125 (the failed round left out); speed-up 310 / 125
  assert lines[2] == "| aligned, batch 16 | 1 | 310.0 | 125.0 | 2.48x | 3/3 / 2/3 |"
  assert lines[3] == "| unaligned, batch 16 | 10 | – | 6.0 | – | 0/3 / 3/3 |"
  assert details[0] == ("  aligned:16: DMD code ms/step ['300.0', '330.0', '310.0'], dhmd-jax "
                        "ms/step ['100.0', '–', '150.0'], speed-up per round "
                        "['3.00x', '–', '2.07x']")
  assert "unaligned:16x10" in details[1]


def test_run_speed_interleaves_pinned_processes(tmp_path, monkeypatch, capsys):
  """With a stand-in for the processes: the order of the calls, what each side runs, and that
  both get the same CPUs and thread count."""
  opts = tool.parse_args(["--dmd=/dmd", "--ref_python=/ref/python", "--threads=1", "--rounds=2",
                          "--cases=aligned:16,unaligned:16x10"])
  monkeypatch.setattr(tool, "write_pool", lambda path, layout, num: path.write_bytes(b""))
  calls = []
  times = iter([400.0, 100.0, 4000.0, 1000.0, 300.0, 200.0, 2000.0, 500.0])

  def runner(cmd, log, cwd, env, cpus):
    calls.append((cmd, cwd, env, cpus))
    result = pathlib.Path(next(a for a in cmd if a.startswith(("--json=", "--out=")))
                          .split("=", 1)[1])
    ms = next(times)
    data = {"ms_per_step": ms} if cmd[0] == "/ref/python" else {"results": [{"ms_per_step": ms}]}
    result.write_text(json.dumps(data))
    log.write_text("")
    return 0

  assert tool.run_speed(opts, ["--dmd=/dmd"], tmp_path, {"torch": "t"}, runner=runner)
  sides = ["dmd" if cmd[0] == "/ref/python" else "jax" for cmd, *_ in calls]
  assert sides == ["dmd", "jax"] * 4
  for (ref, _, ref_env, ref_cpus), (ours, cwd, env, cpus) in zip(calls[::2], calls[1::2]):
    assert ref[1].endswith("dmd_reference.py") and "--threads=1" in ref
    assert ours[:4] == [sys.executable, "-m", "dhmd_jax.benchmark", "--variant=dmd"]
    assert cwd == tool.REPO and ref_cpus == cpus == tool.available_cpus()[:1]
    assert ref_env["OMP_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "1"
    # the same case and the same number of timed steps on both sides
    ref_flags = dict(a[2:].split("=", 1) for a in ref[2:])
    layout, batch = ref_flags["layout"], ref_flags["batch"]
    assert f"--cases={layout}:{batch}:1" in ours
    assert f"--update_epochs={ref_flags['update_epochs']}" in ours
    assert f"--steps={ref_flags['steps']}" in ours
    assert pathlib.Path(ref_flags["data"]).name.startswith(f"pool_{layout}_")
  out = capsys.readouterr().out
  assert "| aligned, batch 16 | 1 | 350.0 | 150.0 | 2.33x | 2/2 / 2/2 |" in out
  assert "| unaligned, batch 16 | 10 | 3,000.0 | 750.0 | 4.00x | 2/2 / 2/2 |" in out
  assert "**Machine:**" in out and "**command:** `python tools/compare_with_dmd.py --dmd=/dmd`" \
      in out


def test_pool_is_the_benchmarks_batches(tmp_path):
  from dhmd_jax import benchmark  # pylint: disable=g-import-not-at-top
  tool.write_pool(tmp_path / "pool.npz", "unaligned", 3)
  expected = benchmark.synthetic_arrays("unaligned", 3)
  with np.load(tmp_path / "pool.npz") as z:
    assert sorted(z.files) == ["audio", "label", "text", "vision"]
    for key in z.files:
      np.testing.assert_array_equal(z[key], expected[key])
  # the benchmark draws max(batch x micro-batches x steps, 256) samples for its chunk
  assert tool.pool_size(("aligned", 16, 10), 2) == 320
  assert tool.pool_size(("aligned", 16, 1), 10) == 256


# ---------------------------------------------------------------- parity


def test_recorder_keeps_the_largest_difference_and_the_tests_verdict():
  test = tool.load_test_module()
  rec = tool.Recorder(test.Comparison, group=tool.gradient_group)
  ref = np.array([[3.0, -1.0], [0.5, 0.0]], np.float32)
  rec("grad proj_l/conv/kernel", ref + 1e-6, ref)
  rec("grad proj_l/conv/bias", ref, ref)
  rec("grad fusion_head/proj1/kernel", ref + np.float32(3e-3), ref)
  assert list(rec.rows) == ["grad proj_l", "grad fusion_head"]
  diff, rel, ok = rec.rows["grad proj_l"]
  assert ok and diff == pytest.approx(1e-6, rel=0.1) and rel == pytest.approx(diff / 3.0)
  diff, rel, ok = rec.rows["grad fusion_head"]
  assert not ok and diff == pytest.approx(3e-3, rel=1e-3)
  assert tool.scale_rel(np.zeros(2), np.zeros(3)) == (float("inf"), float("inf"))
  assert np.isnan(tool.scale_rel(np.array([np.nan]), np.array([1.0]))[0])


def test_parity_table():
  table = {"output_logit (prediction)": {"aligned": (1e-7, 2e-7, True),
                                         "unaligned": (3e-7, 4e-7, True)},
           "combined loss": {"aligned": (1e-6, 1e-7, True), "unaligned": (0.5, 0.05, False)}}
  lines, passed = tool.parity_table(table, ("aligned", "unaligned"), "TOL")
  assert not passed
  assert lines[0] == ("| quantity | aligned max abs diff | aligned max rel diff | unaligned max "
                      "abs diff | unaligned max rel diff | within tolerance |")
  assert lines[2] == ("| output_logit (prediction) | 1.00e-07 | 2.00e-07 | 3.00e-07 | 4.00e-07 "
                      "| yes |")
  assert lines[3] == "| combined loss | 1.00e-06 | 1.00e-07 | 5.00e-01 | 5.00e-02 | NO |"
  assert lines[-1] == "FAIL: 1 of 2 quantities differ from the DMD code beyond TOL: combined loss"
  del table["combined loss"]
  lines, passed = tool.parity_table(table, ("aligned", "unaligned"), "TOL")
  assert passed and lines[-1].startswith("PASS: all 1 quantities")


def test_fixture_loader_reads_what_the_writer_saves(tmp_path):
  fixture = _load("make_dmd_fixture")
  arrays = {"a/x": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(2.5),
            "meta": np.array(json.dumps({"config": "aligned"}))}
  fixture.save(tmp_path / "f.npz", arrays)
  meta, loaded = fixture.load(tmp_path / "f.npz")
  assert meta == {"config": "aligned"} and sorted(loaded) == ["a/x", "b"]
  np.testing.assert_array_equal(loaded["a/x"], arrays["a/x"])
  assert loaded["b"].shape == () and loaded["b"] == 2.5


def test_torch19_cosine_embedding_loss_on_2d_inputs():
  """On (B, d) inputs PyTorch's current loss agrees with the 1.9 kernel the tools use."""
  torch = pytest.importorskip("torch")
  x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
  for label in (1, -1):
    target = torch.full((5,), label)
    np.testing.assert_allclose(
        float(tool.dmd_reference.torch19_cosine_embedding_loss(x1, x2, target)),
        float(torch.nn.CosineEmbeddingLoss()(x1, x2, target)), rtol=1e-6)


def test_parity_settings_do_not_reach_the_timed_processes(monkeypatch):
  """The parity check compiles with the suite's quick XLA settings; the environment the speed
  mode hands its processes must not carry them."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  tool.start_jax_quickly()
  assert "XLA_FLAGS" not in tool.os.environ
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/dev/null")
  tool.start_jax_quickly()
  assert tool.os.environ["XLA_FLAGS"] == "--xla_dump_to=/dev/null"


@pytest.mark.skipif(not hasattr(tool.os, "sched_setaffinity"), reason="no CPU affinity here")
def test_timed_process_runs_on_the_given_cpus(tmp_path):
  cpus = tool.available_cpus()
  log = tmp_path / "child.log"
  code = "import os; print(sorted(os.sched_getaffinity(0)))"
  assert tool.run_one([sys.executable, "-c", code], log, None, None, cpus[-1:]) == 0
  assert log.read_text().strip() == str(cpus[-1:])
  assert tool.available_cpus() == cpus  # this process gets its own mask back


def test_parity_table_explains_zero_gradients():
  table = {"grad gd_homo": {"aligned": (5e-10, 1.0, True)}}
  lines, passed = tool.parity_table(table, ("aligned",), "TOL")
  assert passed and "is a gradient that is 0 in theory" in lines[-2]
  lines, _ = tool.parity_table({"grad gd_homo": {"aligned": (5e-10, 1e-7, True)}}, ("aligned",),
                               "TOL")
  assert not any("0 in theory" in line for line in lines)
