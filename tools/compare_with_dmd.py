"""Checks dhmd-jax against the official DMD code (github.com/mdswyz/DMD) from your checkout of it.

  python tools/compare_with_dmd.py --dmd=PATH/TO/DMD-checkout              # parity, then speed
  python tools/compare_with_dmd.py --dmd=PATH --mode=parity
  python tools/compare_with_dmd.py --dmd=PATH --mode=speed --quick --ref_python=PATH/TO/python

Two claims, each printed as one table ready to paste:

parity  The DMD model (`model.use_dm=False`) computes what the DMD code computes. The DMD code
        builds its model at tiny sizes with random weights (`tools/make_dmd_fixture.py`, with a
        seed other than the committed fixtures'), runs one training step of its own on an
        aligned and an unaligned (unequal lengths) batch, and saves weights, outputs, losses and
        gradients; the same weights go into our model, computed with both stack computations,
        and every output, loss and gradient is compared with the tolerance and the name mapping
        of `tests/test_dmd_reference.py`. Prints max |diff| and max |diff| / max |reference| per
        quantity and a PASS or FAIL line; exits 1 on FAIL.
speed   The DMD code's own training step (`tools/dmd_reference.py`: its model, both GD-Units,
        every loss, backward, gradient clipping, Adam) against
        `python -m dhmd_jax.benchmark --variant=dmd`, on the same MOSEI-shaped random batches
        (the benchmark's own generator), interleaved (DMD code, ours, DMD code, ours, ...) in
        separate processes with the same thread count, pinned to the same CPUs. Prints the
        medians over rounds per case and the speed-up (DMD code time / ours), headed by the
        machine, date, versions and command.

The DMD code runs in `--ref_python` (default: this interpreter), which needs torch, scikit-learn
and tqdm (its package imports them); nothing else in dhmd-jax needs torch. Run the speed mode on
an otherwise idle machine: both sides share the cores.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile

TOOLS = pathlib.Path(__file__).resolve().parent
REPO = TOOLS.parent
for _path in (str(TOOLS), str(REPO)):
  if _path not in sys.path:
    sys.path.insert(0, _path)
import dmd_reference  # noqa: E402  pylint: disable=wrong-import-position
from dhmd_jax import host  # noqa: E402  pylint: disable=wrong-import-position
import make_dmd_fixture  # noqa: E402  pylint: disable=wrong-import-position

PROG = "compare_with_dmd.py"
LAYOUTS = ("aligned", "unaligned")
DEFAULT_CASES = "aligned:16,aligned:64,unaligned:16,aligned:16x10"
QUICK_CASES = "aligned:16"
# What the DMD code's package imports (name -> what to pip install).
REF_MODULES = {"torch": "torch", "sklearn": "scikit-learn", "tqdm": "tqdm"}


class UsageError(Exception):
  """A one-line message for the user."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
  p = _Parser(prog=f"python tools/{PROG}", description=__doc__.split("\n\n")[0],
              epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--dmd", required=True, help="a checkout of github.com/mdswyz/DMD")
  p.add_argument("--mode", choices=["parity", "speed", "both"], default="both")
  p.add_argument("--ref_python", default=sys.executable,
                 help="the Python that runs the DMD code, with torch (default: this one)")
  p.add_argument("--cases", default=None,
                 help=f"speed cases LAYOUT:BATCH[xMICRO],... with MICRO micro-batches per\n"
                      f"Adam step (10 in the DMD protocol); default {DEFAULT_CASES}")
  p.add_argument("--rounds", type=int, default=None,
                 help="interleaved rounds per speed case (default 3, --quick 2)")
  p.add_argument("--threads", type=int, default=None,
                 help="threads per process and CPUs pinned (default: all this process may use)")
  p.add_argument("--quick", action="store_true",
                 help=f"speed: only {QUICK_CASES} (unless --cases), fewer steps")
  p.add_argument("--seed", type=int, default=1, help="parity: weights and batch (default 1)")
  p.add_argument("--out", default=None, help="folder for logs and JSON (default: a new temp one)")
  opts = p.parse_args(argv)
  opts.cases = parse_cases(opts.cases or (QUICK_CASES if opts.quick else DEFAULT_CASES))
  if opts.rounds is None:
    opts.rounds = 2 if opts.quick else 3
  if opts.rounds < 1:
    raise UsageError(f"--rounds={opts.rounds}: need at least 1")
  cpus = available_cpus()
  if opts.threads is None:
    opts.threads = len(cpus)
  if not 1 <= opts.threads <= len(cpus):
    raise UsageError(f"--threads={opts.threads}: choose 1 to {len(cpus)} (the CPUs available)")
  return opts


def parse_cases(text):
  """[(layout, batch, micro-batches per update)] of `--cases`; UsageError for a bad entry."""
  cases = []
  for entry in text.split(","):
    layout, _, size = entry.strip().partition(":")
    batch, _, micro = size.partition("x")
    if (layout not in LAYOUTS or not batch.isdigit() or int(batch) < 1
        or (micro and (not micro.isdigit() or int(micro) < 1))):
      raise UsageError(f"bad --cases entry {entry!r}: write LAYOUT:BATCH or LAYOUT:BATCHxMICRO "
                       f"with LAYOUT {' or '.join(LAYOUTS)}, e.g. --cases=aligned:16,aligned:16x10")
    cases.append((layout, int(batch), int(micro or 1)))
  return cases


def case_name(case):
  layout, batch, micro = case
  return f"{layout}:{batch}" + (f"x{micro}" if micro > 1 else "")


def available_cpus():
  if hasattr(os, "sched_getaffinity"):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def check_reference(ref_dir, ref_python, need_config):
  """The one-line problem with the checkout or the reference's Python, else None."""
  problem = dmd_reference.checkout_problem(ref_dir, need_config=need_config)
  if problem:
    return problem
  if not (os.path.isfile(ref_python) and os.access(ref_python, os.X_OK)):
    return f"--ref_python={ref_python} is not an executable; pass the Python that has torch"
  probe = ("import importlib.util, json; print(json.dumps([m for m in %r "
           "if importlib.util.find_spec(m) is None]))" % list(REF_MODULES))
  try:
    proc = subprocess.run([ref_python, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=False)
    missing = json.loads(proc.stdout.strip().splitlines()[-1])
  except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
    return f"--ref_python={ref_python} does not run Python; pass the Python that has torch"
  if missing:
    return (f"{ref_python} has no {', '.join(missing)}, which the DMD code needs: "
            f"pip install {' '.join(REF_MODULES[m] for m in missing)} (the CPU build of torch "
            f"is enough), or pass --ref_python=<a Python that has them>")
  return None


def run_logged(cmd, log, **kwargs):
  """Runs `cmd` with stdout and stderr into `log`; the return code."""
  with open(log, "w", encoding="utf-8") as f:
    return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False, **kwargs).returncode


def last_line(log):
  lines = pathlib.Path(log).read_text(encoding="utf-8", errors="replace").strip().splitlines()
  return lines[-1] if lines else "(no output)"


def git_version():
  """`<commit>` of this checkout, `+ uncommitted changes` when there are any, or "unknown"."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           check=True, capture_output=True, text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + (" + uncommitted changes" if dirty else "")


def machine():
  return (f"{host.cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
          f"{platform.release()}")


def header(opts, argv, versions):
  """The lines heading a table: machine, date, versions, command (the docs' format)."""
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  command = shlex.join(["python", f"tools/{PROG}", *argv])
  return [f"**Machine:** {machine()} · **date:** {now} · **commit:** {git_version()} · "
          f"**command:** `{command}`",
          "**Versions:** " + "; ".join(f"{k} {v}" for k, v in versions.items())]


# ---------------------------------------------------------------- parity


def scale_rel(ours, reference):
  """(max |ours - reference|, that / max |reference|): the difference relative to the array's
  scale (elementwise relative differences blow up at entries near 0)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  ours = np.asarray(ours, np.float64)
  reference = np.asarray(reference, np.float64)
  if ours.shape != reference.shape:
    return float("inf"), float("inf")
  diff = float(np.max(np.abs(ours - reference), initial=0.0))
  if np.isnan(ours).any() or np.isnan(reference).any():
    diff = float("nan")
  scale = float(np.max(np.abs(reference), initial=0.0))
  return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))


class Recorder:
  """A `compare(name, ours, reference)` for the test's comparisons that keeps, per row, the
  largest differences and whether the test's tolerance held (the test decides: its Comparison)."""

  def __init__(self, comparison_class, group=None):
    self.comparison_class = comparison_class
    self.group = group or (lambda name: name)
    self.rows = {}  # row name -> [max abs, max rel, ok]

  def __call__(self, name, ours, reference):
    check = self.comparison_class()
    check(name, ours, reference)
    diff, rel = scale_rel(ours, reference)
    row = self.rows.setdefault(self.group(name), [0.0, 0.0, True])
    row[0], row[1] = _nanmax(row[0], diff), _nanmax(row[1], rel)
    row[2] = row[2] and not check.failures


def _nanmax(a, b):
  return a if b != b else (b if a != a else max(a, b))  # NaN stays NaN


def gradient_group(name):
  """"grad proj_l/conv/kernel" -> "grad proj_l": one row per module of the top level."""
  return "/".join(name.split("/")[:1])


def load_test_module():
  """tests/test_dmd_reference.py: its name mapping, model runs, comparisons and tolerance."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = REPO / "tests" / "test_dmd_reference.py"
  spec = importlib.util.spec_from_file_location("_test_dmd_reference", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except ImportError as e:
    raise UsageError(f"the parity check uses {path.name}, which needs {e.name}: "
                     f"pip install -e '.[test]'") from e
  return module


def compare_parity(arrays_by_config, test):
  """{row: {config: (max abs, max rel, ok)}} over both stack computations, and the rows of
  reference parameters without a place in our tree (a failure)."""
  table, unplaced = {}, []
  for config_name, (meta, arrays) in arrays_by_config.items():
    params, unused = test.reference_params(arrays, meta)
    expected, unused_grads = test.reference_params(arrays, meta, kind="grad")
    unplaced += sorted(unused | unused_grads)
    rows = {}
    for compute in test.COMPUTES:
      config = test.dmd_config(meta, compute)
      out, inter, grads = test.run_model(config, params, arrays, with_grads=True)
      outputs = Recorder(test.Comparison)
      test.compare_outputs(outputs, out, inter, arrays)
      test.compare_losses(outputs, config, out, arrays)
      gradients = Recorder(test.Comparison, group=gradient_group)
      ours, theirs = test._paths_values(grads), test._paths_values(expected)  # pylint: disable=protected-access
      for path in sorted(theirs):
        gradients(f"grad {path}", ours[path], theirs[path])
      for name, (diff, rel, ok) in {**outputs.rows, **gradients.rows}.items():
        old = rows.get(name, (0.0, 0.0, True))
        rows[name] = (_nanmax(old[0], diff), _nanmax(old[1], rel), old[2] and ok)
    for name, value in rows.items():
      table.setdefault(name, {})[config_name] = value
  return table, unplaced


def parity_table(table, configs, tolerance):
  """Markdown rows and the PASS/FAIL line; returns (lines, passed)."""
  cols = " | ".join(f"{c} max abs diff | {c} max rel diff" for c in configs)
  lines = [f"| quantity | {cols} | within tolerance |",
           "|---|" + "---|" * (2 * len(configs)) + "---|"]
  failed = []
  for name, by_config in table.items():
    cells, ok = [], True
    for c in configs:
      diff, rel, good = by_config.get(c, (float("nan"), float("nan"), False))
      cells += [f"{diff:.2e}", f"{rel:.2e}"]
      ok &= good
    if not ok:
      failed.append(name)
    lines.append(f"| {name} | {' | '.join(cells)} | {'yes' if ok else 'NO'} |")
  lines.append("")
  if any(by_config.get(c, (0, 0))[1] > 0.5 and by_config[c][0] < 1e-7
         for by_config in table.values() for c in configs):
    lines.append("(A max rel diff near 1 beside a tiny max abs diff is a gradient that is 0 in "
                 "theory, rounding noise in the DMD code and exactly 0 here: the GD-Unit biases "
                 "and the attention key biases, which the softmaxes cancel.)")
  if failed:
    lines.append(f"FAIL: {len(failed)} of {len(table)} quantities differ from the DMD code "
                 f"beyond {tolerance}: {', '.join(failed)}")
  else:
    lines.append(f"PASS: all {len(table)} quantities (outputs, losses, gradients; "
                 f"{' and '.join(configs)}; both stack computations) within {tolerance}")
  return lines, not failed


def start_jax_quickly():
  """Starts JAX's CPU backend with the test suite's XLA settings (less optimised code, compiled
  several times faster; the same functions, and the settings the tolerance was measured with).
  Only this process gets them: the environment is restored for the timed processes."""
  before = os.environ.get("XLA_FLAGS")
  flags = [f for f in ("--xla_backend_optimization_level=0",
                       "--xla_cpu_use_fusion_emitters=false")
           if f.split("=")[0] not in (before or "")]
  os.environ["XLA_FLAGS"] = " ".join([before or "", *flags]).strip()
  try:
    import jax  # pylint: disable=import-outside-toplevel
    jax.devices()  # the backend reads XLA_FLAGS once, here
  finally:
    if before is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = before


def run_parity(opts, argv, out, ref_versions):
  fixture_dir = out / "parity"
  fixture_dir.mkdir(parents=True, exist_ok=True)
  log = fixture_dir / "make_dmd_fixture.log"
  cmd = [opts.ref_python, str(TOOLS / "make_dmd_fixture.py"), f"--dmd={opts.dmd}",
         f"--out={fixture_dir}", f"--seed={opts.seed}"]
  print(f"parity: running the DMD code (seed {opts.seed}) ...", flush=True)
  if run_logged(cmd, log, env=dict(os.environ, OMP_NUM_THREADS="1")):
    raise UsageError(f"the DMD code failed ({last_line(log)}); its log: {log}")
  configs = tuple(make_dmd_fixture.CONFIGS)
  arrays_by_config = {c: make_dmd_fixture.load(fixture_dir / f"dmd_reference_{c}.npz")
                      for c in configs}
  print("parity: running dhmd-jax on the same weights ...", flush=True)
  start_jax_quickly()
  test = load_test_module()
  table, unplaced = compare_parity(arrays_by_config, test)
  tolerance = (f"|diff| <= {test.ATOL:g} + {test.RTOL:g} |reference| + {test.SCALE_TOL:g} "
               f"max |reference|")
  lines, passed = parity_table(table, configs, tolerance)
  if unplaced:
    passed = False
    lines.append(f"FAIL: reference parameters without a place in our model: {unplaced}")
  print_report("Parity: the DMD code and dhmd-jax's DMD model (dictionary matching off) on the "
               f"same weights, float32, seed {opts.seed}; max rel diff = max |diff| / max "
               f"|reference|", opts, argv, ref_versions, lines)
  return passed


def print_report(title, opts, argv, ref_versions, lines):
  """A table as printed for pasting: its title, the header (machine, date, commit, versions,
  command), the table."""
  import jax  # pylint: disable=import-outside-toplevel
  print()
  print(title)
  print()
  for line in header(opts, argv, {**ref_versions, "jax": jax.__version__}):
    print(line)
  print()
  print("\n".join(lines))


# ---------------------------------------------------------------- speed


def steps_for(case, quick):
  """(DMD code warm-up steps, timed steps) of a case: about the same work per case."""
  layout, batch, micro = case
  work = batch * micro * (8 if layout == "unaligned" else 1)  # unaligned: 500-frame audio/vision
  timed = max(2, min(10, 160 // work))
  if quick:
    timed = max(1, timed // 2)
  return (2 if work <= 16 else 1), timed


def schedule(cases, rounds):
  """[(round, case, side)]: per round and case the DMD code, then ours (A, B, A, B, ...)."""
  return [(r, case, side) for r in range(1, rounds + 1) for case in cases
          for side in ("dmd", "jax")]


def pool_size(case, timed):
  layout, batch, micro = case
  del layout
  return max(batch * micro * timed, 256)  # what the benchmark draws for one chunk


def write_pool(path, layout, num):
  """The benchmark's own batches (`dhmd_jax.benchmark.synthetic_arrays`), for the DMD code."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from dhmd_jax import benchmark  # pylint: disable=import-outside-toplevel
  arrays = benchmark.synthetic_arrays(layout, num)
  np.savez(path, **{k: arrays[k] for k in ("text", "vision", "audio", "label")})


def commands(opts, case, side, out, tag):
  """(command, json path, cwd) of one timed process."""
  layout, batch, micro = case
  warmup, timed = steps_for(case, opts.quick)
  result = out / f"{tag}.json"
  if side == "dmd":
    return ([opts.ref_python, str(TOOLS / "dmd_reference.py"), f"--dmd={opts.dmd}",
             f"--data={out / f'pool_{layout}_{pool_size(case, timed)}.npz'}",
             f"--layout={layout}", f"--batch={batch}", f"--update_epochs={micro}",
             f"--warmup={warmup}", f"--steps={timed}", f"--threads={opts.threads}",
             f"--json={result}"], result, None)
  # The benchmark's first call compiles and runs the chunk (the warm-up); one timed chunk.
  return ([sys.executable, "-m", "dhmd_jax.benchmark", "--variant=dmd",
           f"--cases={layout}:{batch}:1", f"--update_epochs={micro}", f"--steps={timed}",
           "--repeats=1", "--eval_samples=16", "--eval_batch_size=16", f"--out={result}"],
          result, REPO)


def read_ms(side, path):
  """ms per optimizer update from a process's JSON, or None."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    return float(data["ms_per_step"] if side == "dmd" else data["results"][0]["ms_per_step"])
  except (OSError, ValueError, KeyError, IndexError, TypeError):
    return None


def run_one(cmd, log, cwd, env, cpus):
  """Runs one timed process pinned to `cpus`; its return code.

  The child inherits the CPU mask of the thread that starts it, so this thread takes the mask
  for the call (a `preexec_fn` would run Python in a forked child of a process whose JAX
  threads may hold locks)."""
  if not hasattr(os, "sched_setaffinity"):
    return run_logged(cmd, log, cwd=cwd, env=env, timeout=3600)
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cpus)
  try:
    return run_logged(cmd, log, cwd=cwd, env=env, timeout=3600)
  finally:
    os.sched_setaffinity(0, before)


def speed_table(timings, cases):
  """Markdown lines of the medians: timings {(case, side): [ms or None per round]}."""
  lines = ["| case | micro-batches per Adam step | DMD code ms/step | dhmd-jax ms/step "
           "| speed-up (DMD code time ÷ dhmd-jax time) | rounds ok (DMD code / dhmd-jax) |",
           "|---|---|---|---|---|---|"]
  details = []
  for case in cases:
    dmd, ours = timings.get((case, "dmd"), []), timings.get((case, "jax"), [])
    dmd_ok, ours_ok = [t for t in dmd if t], [t for t in ours if t]
    dmd_med = statistics.median(dmd_ok) if dmd_ok else None
    ours_med = statistics.median(ours_ok) if ours_ok else None
    ratio = dmd_med / ours_med if dmd_med and ours_med else None
    lines.append(f"| {case[0]}, batch {case[1]} | {case[2]} | {_fmt(dmd_med, 1)} | "
                 f"{_fmt(ours_med, 1)} | {_fmt(ratio, 2, 'x')} | {len(dmd_ok)}/{len(dmd)} "
                 f"/ {len(ours_ok)}/{len(ours)} |")
    per_round = [_fmt(a / b if a and b else None, 2, "x") for a, b in zip(dmd, ours)]
    details.append(f"  {case_name(case)}: DMD code ms/step {[_fmt(t, 1) for t in dmd]}, "
                   f"dhmd-jax ms/step {[_fmt(t, 1) for t in ours]}, speed-up per round "
                   f"{per_round}")
  return lines, details


def _fmt(x, digits, suffix=""):
  return "–" if x is None else f"{x:,.{digits}f}{suffix}"


def run_speed(opts, argv, out, ref_versions, runner=run_one):
  cpus = available_cpus()[:opts.threads]
  env = dict(os.environ, **{k: str(opts.threads) for k in (
      "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
  # Rounds after the first load the compiled step (compile time is never in ms/step).
  env["JAX_COMPILATION_CACHE_DIR"] = str(out / "xla_cache")
  pools = {(c[0], pool_size(c, steps_for(c, opts.quick)[1])) for c in opts.cases}
  for layout, num in sorted(pools):
    path = out / f"pool_{layout}_{num}.npz"
    if not path.exists():
      write_pool(path, layout, num)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  if load is not None and load > 0.5 * len(available_cpus()):
    print(f"WARNING: the machine is busy (load average {load:.1f} on {os.cpu_count()} CPUs); "
          f"the times will be distorted", flush=True)
  timings = {}
  for r, case, side in schedule(opts.cases, opts.rounds):
    tag = f"{side}_{case_name(case).replace(':', '_')}_r{r}"
    cmd, result, cwd = commands(opts, case, side, out, tag)
    log = out / f"{tag}.log"
    rc = runner(cmd, log, cwd, env, cpus)
    ms = read_ms(side, result) if rc == 0 else None
    timings.setdefault((case, side), []).append(ms)
    who = "DMD code" if side == "dmd" else "dhmd-jax"
    state = f"{ms:,.1f} ms/step" if ms else f"FAILED (rc {rc}; see {log})"
    print(f"round {r}/{opts.rounds} {case_name(case)} {who}: {state}", flush=True)
  lines, details = speed_table(timings, opts.cases)
  print_report(f"Speed: the DMD code's training step against `python -m dhmd_jax.benchmark "
               f"--variant=dmd`, MOSEI shapes, same random batches; medians over {opts.rounds} "
               f"interleaved round(s); {opts.threads} thread(s) per process, pinned to CPUs "
               f"{','.join(map(str, cpus))}; load average at the start "
               f"{'unknown' if load is None else f'{load:.1f}'}", opts, argv, ref_versions, lines)
  print()
  print("Per round:")
  print("\n".join(details))
  print(f"(speed-up > 1: dhmd-jax is faster. Logs and JSON: {out})")
  return all(t for ts in timings.values() for t in ts)


# ---------------------------------------------------------------- main


def reference_versions(opts):
  """{"DMD code": fingerprint, "torch": ..., "python (DMD code)": ...} of the reference side."""
  code = "import json, platform, torch; print(json.dumps([torch.__version__, " \
      "platform.python_version()]))"
  proc = subprocess.run([opts.ref_python, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False)
  try:
    torch_version, python = json.loads(proc.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError) as e:
    error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise UsageError(f"torch does not import in {opts.ref_python} ({error}); reinstall it: "
                     f"pip install torch") from e
  return {"DMD code (sha256 of its files)": dmd_reference.fingerprint(opts.dmd)[:12],
          "torch": torch_version, "python (DMD code)": python,
          "python (dhmd-jax)": platform.python_version()}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  try:
    opts = parse_args(argv)
    opts.dmd = str(pathlib.Path(opts.dmd).expanduser().resolve())
    problem = check_reference(opts.dmd, opts.ref_python, need_config=opts.mode != "parity")
    if problem:
      raise UsageError(problem)
    out = pathlib.Path(opts.out or tempfile.mkdtemp(prefix="compare_with_dmd."))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    versions = reference_versions(opts)
    ok = True
    if opts.mode in ("parity", "both"):
      ok &= run_parity(opts, argv, out, versions)
    if opts.mode in ("speed", "both"):
      if opts.mode == "both":
        print()
      ok &= run_speed(opts, argv, out, versions)
  except UsageError as e:
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
