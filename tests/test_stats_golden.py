"""Every number of a grid's results.md and results.csv is the one the statistics gave before.

The fixtures under tests/fixtures/ were written at commit e0ec1cc, by the hand-written statistics
(own Student t, sign-flip and bootstrap code) that preceded scipy.stats in dhmd_jax/stats.py:
`grid_results_golden_input.json` holds fake per-seed results of two grids (values drawn once,
rounded to 4 decimals; nothing is trained) and `grid_results_golden*.md|csv` what
`grid.write_report` wrote from them. Here the current code writes them again.

* table6 (5 seeds): a clear loss, noise, a variant identical to the reference, a constant
  difference (zero variance), differences of tied magnitude (multiples of 1/64, exact in %), and
  undefined values leaving n = 2, 1 and 0 pairs; a second table with renamed columns and an extra
  lower-is-better metric. Every statistic here is exact (t, exact bootstrap, exact sign-flip).
* sweep (18 seeds, some rows with holes: n = 10, 11, 12, 14, 16, 17, 18): the bootstrap exact
  up to n = 10 and Monte-Carlo above, the sign-flip test exact up to n = 16 (more patterns than
  its 9,999 resamples from n = 14) and Monte-Carlo above.

results.md is compared as text. results.csv holds full-precision floats: each must equal the
golden one to 1e-12 relative (the t distribution's CDF and quantile now come from SciPy's special
functions instead of a continued fraction and a bisection: at most 4e-14 apart here), except the
sign-flip p-values of n > 16: Monte-Carlo estimates whose random draws changed with SciPy, equal
within their Monte-Carlo error (`mc_p_tolerance`).

To rewrite the fixtures after a deliberate change of the report's wording (never of a number):
`python tests/test_stats_golden.py --rewrite`, then read the diff.
"""

import csv
import io
import json
import math
import os
import sys

import ml_collections
import pytest

from dhmd_jax.experiments import grid

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
INPUT = os.path.join(FIXTURES, "grid_results_golden_input.json")
GOLDEN = {"table6": "grid_results_golden", "sweep": "grid_results_golden_sweep"}
FLOAT_COLUMNS = ("mean", "std", "diff", "ci_low", "ci_high", "p", "p_perm", "boot_low",
                 "boot_high")
RTOL = 1e-12
MC_PERMUTATION_MIN_N = 17
MC_RESAMPLES = 9999  # compare()'s sign-flip resamples (its n_resamples - 1)


def mc_p_tolerance(p):
  """How far two independent Monte-Carlo estimates of a sign-flip p-value near p may differ: 4
  standard errors of their difference, 4 sqrt(2 p (1 - p) / 9999), plus 2/(9999 + 1) for the
  +1 of each estimate (a real difference exceeds it for 1 draw in 15,000)."""
  return 4 * math.sqrt(2 * p * (1 - p) / MC_RESAMPLES) + 2 / (MC_RESAMPLES + 1)


def render(name, workdir):
  """(results.md, results.csv) that grid.write_report writes for the fake grid `name`."""
  with open(INPUT) as f:
    spec = json.load(f)[name]
  base = ml_collections.ConfigDict({
      "dataset": {"name": "synthetic", "synthetic": {"like": "mosi"}},
      "train": {"seeds": spec["seeds"], "num_epochs": 3}})
  tables = [grid.Table(**t) for t in spec["tables"]]
  runs = [grid.Run(name=row, config=None, rows=(row,), overrides={})
          for row in spec["per_seed"]]
  outcome = {run.name: (None, "trained" if i % 2 else "skipped", 1.0)
             for i, run in enumerate(runs)}
  markdown = grid.write_report(workdir, kind=name, base_config=base, runs=runs, tables=tables,
                               outcome=outcome, per_seed=spec["per_seed"], split="test",
                               legend=f"Fake results of a {name} grid: nothing was trained.",
                               lower_is_better=spec["lower_is_better"])
  with open(os.path.join(workdir, "results.csv"), newline="") as f:
    return markdown, f.read()


def _read(path):
  with open(path, newline="") as f:
    return f.read()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_results_md_is_unchanged(name, tmp_path):
  markdown, _ = render(name, str(tmp_path))
  golden = _read(os.path.join(FIXTURES, GOLDEN[name] + ".md"))
  assert markdown.splitlines() == golden.splitlines()
  assert markdown == golden


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_results_csv_is_unchanged(name, tmp_path):
  _, text = render(name, str(tmp_path))
  rows = list(csv.DictReader(io.StringIO(text)))
  golden = list(csv.DictReader(io.StringIO(_read(os.path.join(FIXTURES, GOLDEN[name] + ".csv")))))
  assert [list(r) for r in rows] == [list(g) for g in golden]  # the same columns, rows, order
  monte_carlo = 0
  for row, gold in zip(rows, golden):
    where = f"{row['variant']} {row['metric']}"
    for column in gold:
      if column not in FLOAT_COLUMNS or gold[column] == "":
        assert row[column] == gold[column], (where, column, row[column], gold[column])
        continue
      value, expected = float(row[column]), float(gold[column])
      if column == "p_perm" and int(gold["n"]) >= MC_PERMUTATION_MIN_N:
        monte_carlo += 1
        assert abs(value - expected) < mc_p_tolerance(expected), (where, value, expected)
      else:
        assert math.isclose(value, expected, rel_tol=RTOL, abs_tol=1e-300), (
            where, column, value, expected)
  # Only the sweep has rows of more than 16 pairs: n = 18, 18, 18 and 17.
  assert monte_carlo == {"table6": 0, "sweep": 4}[name]


def test_goldens_cover_the_edge_cases():
  """The fixtures hold what they claim: every kind of note, n from 0 to 18, both verdicts."""
  notes, ns, verdicts = set(), set(), set()
  for name in GOLDEN:
    for row in csv.DictReader(io.StringIO(_read(os.path.join(FIXTURES, GOLDEN[name] + ".csv")))):
      notes.update(n.split(" ", 1)[-1] if n[:1].isdigit() else n for n in row["note"].split("; "))
      ns.add(int(row["n"]))
      verdicts.add(row["verdict"])
  assert {"", "reference", "identical on every seed", "n=1: no CI", "n=0: no CI",
          "seed(s) with a NaN value dropped",
          "zero variance of the differences: t-test degenerate, see p_perm"} <= notes, notes
  assert {0, 1, 2, 4, 5, 10, 11, 12, 14, 16, 17, 18} <= ns, ns
  assert {"better", "worse", "n.s."} <= verdicts, verdicts


def rewrite():
  """Writes the golden .md and .csv files from the current code."""
  import tempfile  # pylint: disable=g-import-not-at-top
  for name, stem in GOLDEN.items():
    with tempfile.TemporaryDirectory() as workdir:
      markdown, text = render(name, workdir)
    with open(os.path.join(FIXTURES, stem + ".md"), "w") as f:
      f.write(markdown)
    with open(os.path.join(FIXTURES, stem + ".csv"), "w", newline="") as f:
      f.write(text)
    print(f"wrote {stem}.md and {stem}.csv")


if __name__ == "__main__":
  if sys.argv[1:] != ["--rewrite"]:
    sys.exit("usage: python tests/test_stats_golden.py --rewrite (rewrites the golden files)")
  rewrite()
