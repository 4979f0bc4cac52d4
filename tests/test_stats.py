"""dhmd_jax.stats against closed forms of the t distribution, brute-force enumerations, scipy.stats
on fixed inputs, and edge cases. (tests/test_stats_golden.py: grid reports unchanged.)"""

import io
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from dhmd_jax import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Five seeds of two variants (per-seed values paired by position), as a results table holds them.
REF = np.array([87.50, 86.72, 85.16, 88.10, 86.90])
VAR = np.array([86.10, 85.90, 84.00, 87.70, 85.20])


# ----------------------------------------------------------------------------- t distribution


@pytest.mark.parametrize("d", [[0.8, 0.3], [-2.0, 0.5], [0.1, 0.1 + 1e-6], [3.0, -2.9]])
def test_paired_t_df_1_matches_the_cauchy_closed_form(d):
  """n = 2 pairs: t has 1 degree of freedom (Cauchy), P(|T| >= t) = 2 atan(1/t)/pi (t > 0) and
  t_0.975 = tan(0.475 pi); independent of SciPy's special functions."""
  ours = stats.paired_t(d, [0.0, 0.0])
  mean, se = np.mean(d), np.std(d, ddof=1) / math.sqrt(2)
  t = mean / se
  np.testing.assert_allclose(ours.t, t, rtol=1e-12)
  np.testing.assert_allclose(ours.p, 2 * math.atan(1 / abs(t)) / math.pi, rtol=1e-9)
  half = math.tan(0.475 * math.pi) * se
  np.testing.assert_allclose([ours.ci_low, ours.ci_high], [mean - half, mean + half],
                             rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("d", [[0.8, 0.3, 0.5], [-2.0, 0.5, -0.25], [1.0, 1.0 + 1e-6, 1.0]])
def test_paired_t_df_2_matches_its_closed_form(d):
  """n = 3 pairs: with 2 degrees of freedom P(|T| >= t) = 1 - t/sqrt(2 + t^2) (t > 0; written
  without the cancellation for large t) and t_q = (2q - 1)/sqrt(2q(1 - q)); also at 90%."""
  mean, se = np.mean(d), np.std(d, ddof=1) / math.sqrt(3)
  t = mean / se
  for confidence in (0.95, 0.9):
    ours = stats.paired_t(d, [0.0, 0.0, 0.0], confidence=confidence)
    np.testing.assert_allclose(ours.t, t, rtol=1e-12)
    root = math.sqrt(2 + t * t)
    np.testing.assert_allclose(ours.p, 2 / (root * (root + abs(t))), rtol=1e-9)
    q = 0.5 + confidence / 2
    half = (2 * q - 1) / math.sqrt(2 * q * (1 - q)) * se
    np.testing.assert_allclose([ours.ci_low, ours.ci_high], [mean - half, mean + half],
                               rtol=1e-9)


@pytest.mark.parametrize("d", [[0.8, 0.3, 0.5, 0.1], [-2.0, 0.5, -0.25, -1.0],
                               [1.0, 2.0, 1.5, 9.0]])
def test_paired_t_df_3_matches_its_closed_form(d):
  """n = 4 pairs: with 3 degrees of freedom
  P(|T| >= t) = 1 - 2/pi (atan(t/sqrt(3)) + sqrt(3) t/(3 + t^2))."""
  mean, se = np.mean(d), np.std(d, ddof=1) / 2
  t = abs(mean / se)
  ours = stats.paired_t(d, [0.0] * 4)
  expected = 1 - 2 / math.pi * (math.atan(t / math.sqrt(3)) + math.sqrt(3) * t / (3 + t * t))
  np.testing.assert_allclose(ours.p, expected, rtol=1e-9)


# ----------------------------------------------------------------------------- mean ± std


def test_summarize_is_mean_and_sample_std():
  s = stats.summarize(REF)
  assert s.n == 5
  np.testing.assert_allclose(s.mean, REF.mean(), rtol=1e-15)
  np.testing.assert_allclose(s.std, REF.std(ddof=1), rtol=1e-15)
  one = stats.summarize([0.5])
  assert one.n == 1 and one.mean == 0.5 and math.isnan(one.std)
  with_nan = stats.summarize([0.8, np.nan, 0.6])
  assert with_nan.n == 2 and with_nan.mean == pytest.approx(0.7)
  empty = stats.summarize([np.nan])
  assert empty.n == 0 and math.isnan(empty.mean)


# ----------------------------------------------------------------------------- paired t


@pytest.mark.parametrize("x,r", [
    (VAR, REF),
    (np.array([0.51, 0.49, 0.53]), np.array([0.50, 0.50, 0.50])),
    (np.array([1.0, 2.0, 3.5, 4.0]), np.array([0.0, 1.0, 2.0, 2.2])),
    (np.linspace(0, 1, 12) ** 2, np.linspace(0, 1, 12) * 0.9),
])
def test_paired_t_matches_scipy_ttest_rel(x, r):
  ours = stats.paired_t(x, r)
  ref = sps.ttest_rel(x, r)
  ci = ref.confidence_interval(confidence_level=0.95)
  np.testing.assert_allclose(ours.t, ref.statistic, rtol=1e-12)
  np.testing.assert_allclose(ours.p, ref.pvalue, rtol=1e-9)
  assert ours.df == ref.df == len(x) - 1
  np.testing.assert_allclose([ours.ci_low, ours.ci_high], [ci.low, ci.high], rtol=1e-10)
  np.testing.assert_allclose(ours.mean_diff, np.mean(x - r), rtol=1e-12)
  # The interval is mean ± t.ppf(0.975, n-1) · sd/√n, with scipy's quantile.
  d = x - r
  half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  np.testing.assert_allclose(ours.ci_high - ours.ci_low, 2 * half, rtol=1e-10)
  # 90% interval too.
  ci90 = ref.confidence_interval(confidence_level=0.9)
  ours90 = stats.paired_t(x, r, confidence=0.9)
  np.testing.assert_allclose([ours90.ci_low, ours90.ci_high], [ci90.low, ci90.high], rtol=1e-10)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy on identical data
def test_paired_t_edge_cases():
  one = stats.paired_t([0.5], [0.4])
  assert one.n == 1 and math.isnan(one.p) and math.isnan(one.ci_low) and math.isnan(one.t)
  # Constant nonzero difference: t = inf and p = 0, as scipy.
  const = stats.paired_t([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
  with np.errstate(divide="ignore", invalid="ignore"):
    ref = sps.ttest_rel([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
  assert const.t == ref.statistic == math.inf and const.p == ref.pvalue == 0.0
  assert const.ci_low == const.ci_high == 1.0
  # No difference at all: t and p NaN, as scipy.
  same = stats.paired_t([0.3, 0.4], [0.3, 0.4])
  assert math.isnan(same.t) and math.isnan(same.p)
  with pytest.raises(ValueError, match="one value per seed"):
    stats.paired_t([1.0, 2.0], [1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("x,r", [
    (VAR, REF),
    (np.array([0.51, 0.49, 0.53, 0.55, 0.47, 0.52]), np.full(6, 0.5)),
    (np.array([3.0, 1.0, 2.0, 1.0]), np.array([1.0, 2.0, 0.0, -1.0])),  # tied |d| values
])
def test_sign_flip_p_matches_scipy_exact_permutation_test(x, r):
  ref = sps.permutation_test(
      (x, r), lambda a, b, axis: np.mean(a - b, axis=axis), permutation_type="samples",
      vectorized=True, n_resamples=np.inf, alternative="two-sided")
  np.testing.assert_allclose(stats.sign_flip_p(x, r), ref.pvalue, rtol=1e-12)


def test_sign_flip_p_monte_carlo_is_seeded_and_close_to_exact():
  rng = np.random.default_rng(3)
  r = rng.normal(size=18)
  x = r + rng.normal(0.35, 1.0, size=18)
  exact = stats.sign_flip_p(x, r, method="exact")  # 2^18 patterns
  mc = stats.sign_flip_p(x, r, method="mc", n_resamples=20000, seed=1)
  assert mc == stats.sign_flip_p(x, r, method="mc", n_resamples=20000, seed=1)
  assert mc != stats.sign_flip_p(x, r, method="mc", n_resamples=20000, seed=2)
  # Monte-Carlo standard error sqrt(p(1-p)/B) < 0.0036 here.
  assert abs(mc - exact) < 0.015, (mc, exact)
  # "auto" samples above EXACT_PERMUTATION_MAX_N pairs: the same draws as "mc".
  assert len(x) > stats.EXACT_PERMUTATION_MAX_N
  assert stats.sign_flip_p(x, r, n_resamples=20000, seed=1) == mc
  assert stats.sign_flip_p(x, r) == stats.sign_flip_p(x, r, method="mc")
  assert stats.sign_flip_p(x, r) != exact


@pytest.mark.parametrize("n", [2, 5, 9, 14, 16])
def test_sign_flip_p_equals_brute_force_enumeration(n):
  """Every one of the 2^n sign patterns, enumerated here: "auto" is exact up to 16 pairs, also
  where 2^n exceeds the 9,999 resamples (n = 14, 16). Ties of |d| (multiples of 1/8) included."""
  rng = np.random.default_rng(100 + n)
  r = rng.normal(size=n)
  x = r + rng.integers(-3, 5, size=n) / 8
  d = x - r
  patterns = np.array(list(itertools.product([1.0, -1.0], repeat=n)))  # (2^n, n)
  null = np.abs((patterns * d).mean(axis=1))
  observed = abs(d.mean())
  expected = np.mean(null >= observed * (1 - 1e-12))
  assert stats.sign_flip_p(x, r) == pytest.approx(expected, rel=1e-12)
  assert stats.sign_flip_p(x, r) * 2**n == pytest.approx(round(expected * 2**n), abs=1e-9)


def test_sign_flip_p_edge_cases():
  assert math.isnan(stats.sign_flip_p([1.0], [0.0]))
  assert stats.sign_flip_p([0.2, 0.3, 0.4], [0.2, 0.3, 0.4]) == 1.0
  # All differences positive and equal: only all-positive and all-negative are as extreme.
  assert stats.sign_flip_p([1.0] * 5, [0.0] * 5) == pytest.approx(2 / 32)


# ----------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_exact_bootstrap_equals_brute_force_enumeration(n):
  rng = np.random.default_rng(n)
  r = rng.normal(size=n)
  x = r + rng.normal(0.2, 0.5, size=n)
  d = x - r
  means = np.array([d[list(idx)].mean() for idx in itertools.product(range(n), repeat=n)])
  for conf in (0.95, 0.8):
    a = (1 - conf) / 2
    low, high = stats.paired_bootstrap_ci(x, r, confidence=conf, method="exact")
    np.testing.assert_allclose([low, high], np.percentile(means, [100 * a, 100 * (1 - a)]),
                               rtol=1e-12, atol=1e-15)


def test_bootstrap_matches_scipy_percentile_bootstrap():
  """Exact (n=5) and Monte-Carlo (n=14) against scipy.stats.bootstrap(method="percentile",
  paired) with many resamples: equal within the Monte-Carlo error of the quantiles."""
  for n, method in ((5, "auto"), (14, "mc")):
    rng = np.random.default_rng(10 + n)
    r = rng.normal(size=n)
    x = r + rng.normal(0.3, 0.6, size=n)
    ref = sps.bootstrap((x, r), lambda a, b, axis: np.mean(a - b, axis=axis), paired=True,
                        vectorized=True, method="percentile", n_resamples=100000,
                        rng=np.random.default_rng(0))
    low, high = stats.paired_bootstrap_ci(x, r, method=method, n_resamples=100000, seed=0)
    spread = (x - r).std(ddof=1) / math.sqrt(n)
    assert abs(low - ref.confidence_interval.low) < 0.03 * spread, (low, ref)
    assert abs(high - ref.confidence_interval.high) < 0.03 * spread, (high, ref)
  # "mc" resamples the pairs by np.random.default_rng(seed).integers(0, n, (n_resamples, n)),
  # the draws of the hand-written bootstrap it replaced: its intervals are unchanged.
  d = x - r
  draws = np.random.default_rng(7).integers(0, n, size=(5000, n))
  means = d[draws].mean(axis=1)
  np.testing.assert_allclose(
      stats.paired_bootstrap_ci(x, r, method="mc", n_resamples=5000, seed=7, confidence=0.9),
      np.percentile(means, [5, 95]), rtol=1e-12)
  # Seeded: the same seed gives the same interval, another seed another one.
  a = stats.paired_bootstrap_ci(x, r, method="mc", seed=4)
  assert a == stats.paired_bootstrap_ci(x, r, method="mc", seed=4)
  assert a != stats.paired_bootstrap_ci(x, r, method="mc", seed=5)


def test_bootstrap_edge_cases():
  assert all(math.isnan(v) for v in stats.paired_bootstrap_ci([1.0], [0.0]))
  assert stats.paired_bootstrap_ci([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == (0.5, 0.5)
  with pytest.raises(ValueError, match="method"):
    stats.paired_bootstrap_ci([1.0, 2.0], [0.0, 0.0], method="bca")


# ----------------------------------------------------------------------------- compare


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_compare_flags_and_notes():
  c = stats.compare(VAR, REF)
  ref = sps.ttest_rel(VAR, REF)
  assert c.significant == (ref.pvalue < 0.05)
  np.testing.assert_allclose(c.p, ref.pvalue, rtol=1e-9)
  assert c.boot_low <= c.mean_diff <= c.boot_high
  assert c.ci_low <= c.mean_diff <= c.ci_high
  # A clear difference over 5 seeds: significant by t and bootstrap; the sign-flip test cannot
  # go below 2/32 with 5 seeds, so it is not significant at 0.05.
  big = stats.compare(REF + np.array([1.0, 1.1, 0.9, 1.05, 0.95]), REF)
  assert big.significant and big.p < 0.001
  assert big.p_perm == pytest.approx(2 / 32)
  assert not stats.compare(REF + np.array([1.0, 1.1, 0.9, 1.05, 0.95]), REF,
                           test="permutation").significant
  assert stats.compare(REF + np.array([1.0, 1.1, 0.9, 1.05, 0.95]), REF,
                       test="bootstrap").significant
  noisy = stats.compare(REF + np.array([0.5, -0.6, 0.2, -0.1, 0.3]), REF)
  assert not noisy.significant and noisy.p > 0.05
  one = stats.compare([1.0], [0.5])
  assert one.n == 1 and not one.significant and "n=1: no CI" in one.note
  assert math.isnan(one.ci_low) and math.isnan(one.p) and math.isnan(one.p_perm)
  same = stats.compare([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
  assert not same.significant and "identical" in same.note and same.p_perm == 1.0
  const = stats.compare([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
  assert const.significant and "zero variance" in const.note and const.p == 0.0
  nan = stats.compare([0.8, np.nan, 0.7, 0.9], [0.7, 0.6, 0.6, 0.8])
  assert nan.n == 3 and "1 seed(s) with a NaN value dropped" in nan.note
  np.testing.assert_allclose(nan.p, sps.ttest_rel([0.8, 0.7, 0.9], [0.7, 0.6, 0.8]).pvalue)
  with pytest.raises(ValueError, match="test must be"):
    stats.compare(VAR, REF, test="wilcoxon")


# ----------------------------------------------------------------------------- tables


TABLE = {
    "full": {"Non0_acc_2": [90.1, 89.5, 91.0, 90.4, 89.9], "MAE": [0.50, 0.51, 0.49, 0.52, 0.50]},
    "no_dm": {"Non0_acc_2": [88.0, 87.9, 88.6, 88.2, 87.5], "MAE": [0.55, 0.57, 0.53, 0.58, 0.54]},
    "no_gd": {"Non0_acc_2": [90.3, 89.0, 91.2, 90.1, 90.2], "MAE": [0.51, 0.50, 0.49, 0.52, 0.51]},
    "mae_better": {"Non0_acc_2": [90.1, 89.5, 91.0, 90.4, 89.9],
                   "MAE": [0.45, 0.47, 0.44, 0.46, 0.46]},
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_comparison_rows_values_and_direction():
  rows = stats.comparison_rows(TABLE, "full")
  assert [(r["variant"], r["metric"]) for r in rows] == [
      (v, m) for v in TABLE for m in ("Non0_acc_2", "MAE")]
  by = {(r["variant"], r["metric"]): r for r in rows}
  ref_row = by[("full", "MAE")]
  assert ref_row["is_reference"] and ref_row["verdict"] == "" and math.isnan(ref_row["p"])
  assert ref_row["mean_std"] == "0.5040 ± 0.0114"
  for (v, m), r in by.items():
    if v == "full":
      continue
    ref = sps.ttest_rel(TABLE[v][m], TABLE["full"][m])
    np.testing.assert_allclose(r["p"], ref.pvalue, rtol=1e-9)
    np.testing.assert_allclose(r["diff"], np.mean(np.subtract(TABLE[v][m], TABLE["full"][m])))
    np.testing.assert_allclose(r["mean"], np.mean(TABLE[v][m]))
    np.testing.assert_allclose(r["std"], np.std(TABLE[v][m], ddof=1))
  # Higher accuracy is better; higher MAE is worse.
  assert by[("no_dm", "Non0_acc_2")]["verdict"] == "worse"
  assert by[("no_dm", "MAE")]["verdict"] == "worse" and by[("no_dm", "MAE")]["diff"] > 0
  assert by[("mae_better", "MAE")]["verdict"] == "better" and by[("mae_better", "MAE")]["diff"] < 0
  assert by[("no_gd", "Non0_acc_2")]["verdict"] == "n.s."
  assert by[("mae_better", "Non0_acc_2")]["note"] == "identical on every seed"
  # Overriding the direction flips the verdict.
  flipped = stats.comparison_rows(TABLE, "full", metrics=["MAE"], lower_is_better=())
  assert {r["variant"]: r["verdict"] for r in flipped}["mae_better"] == "worse"


def test_markdown_and_csv():
  rows = stats.comparison_rows(TABLE, "full")
  long = stats.markdown_table(rows)
  acc = TABLE["no_gd"]["Non0_acc_2"]
  d = np.subtract(acc, TABLE["full"]["Non0_acc_2"])
  ci = sps.ttest_rel(acc, TABLE["full"]["Non0_acc_2"]).confidence_interval()
  mean_std = f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f}"
  expected = (f"| no_gd | Non0_acc_2 | 5 | {mean_std} | {d.mean():.2f} | "
              f"[{ci.low:.2f}, {ci.high:.2f}] |").replace("-", "−")
  assert expected in long, (expected, long)
  assert "n.s." in long and "Lower is better for MAE" in long
  assert "| no_dm | MAE | 5 | 0.5540 ± 0.0207 | +0.0500 |" in long
  wide = stats.markdown_table(rows, layout="wide")
  assert wide.splitlines()[0] == "| variant | Non0_acc_2 | MAE |"
  full_acc = TABLE["full"]["Non0_acc_2"]
  assert (f"| full | {np.mean(full_acc):.2f} ± {np.std(full_acc, ddof=1):.2f} | "
          f"0.5040 ± 0.0114 |") in wide
  assert wide.splitlines()[4].startswith("| no_gd |") and "n.s." in wide.splitlines()[4]
  assert "p<0.001" in wide.splitlines()[3] and "n.s." not in wide.splitlines()[3]
  text = stats.csv_text(rows)
  import csv  # pylint: disable=g-import-not-at-top
  parsed = list(csv.DictReader(io.StringIO(text)))
  assert len(parsed) == len(rows)
  no_dm = next(p for p in parsed if p["variant"] == "no_dm" and p["metric"] == "MAE")
  np.testing.assert_allclose(float(no_dm["p"]),
                             sps.ttest_rel(TABLE["no_dm"]["MAE"], TABLE["full"]["MAE"]).pvalue)
  assert parsed[0]["p"] == ""  # the reference: NaN written as empty


def test_table_edge_cases():
  one_seed = {"full": {"MAE": [0.5]}, "no_dm": {"MAE": [0.6]}}
  rows = stats.comparison_rows(one_seed, "full")
  assert rows[1]["verdict"] == "n.s." and rows[1]["note"] == "n=1: no CI"
  assert rows[1]["mean_std"] == "0.6000 (n=1)"
  assert "nan" in stats.markdown_table(rows)
  with pytest.raises(ValueError, match="reference variant 'dhmd' is not in the table"):
    stats.comparison_rows(one_seed, "dhmd")
  with pytest.raises(ValueError, match="metric 'Corr' missing"):
    stats.comparison_rows(one_seed, "full", metrics=["Corr"])


def test_decimals_follow_the_values():
  fractions = {"full": {"Non0_acc_2": [0.8123, 0.8012]}, "v": {"Non0_acc_2": [0.7, 0.71]}}
  assert stats.comparison_rows(fractions, "full")[0]["mean_std"] == "0.8068 ± 0.0078"
  percent = {"full": {"Non0_acc_2": [81.23, 80.12]}, "v": {"Non0_acc_2": [70.0, 71.0]}}
  assert stats.comparison_rows(percent, "full")[0]["mean_std"] == "80.68 ± 0.78"
  assert stats.comparison_rows(percent, "full", decimals=1)[1]["mean_std"] == "70.5 ± 0.7"


def test_wide_cells_show_the_deciding_test():
  rows = stats.comparison_rows(TABLE, "full", metrics=["MAE"], test="permutation", alpha=0.1)
  wide = stats.markdown_table(rows, layout="wide").splitlines()
  p_perm = stats.sign_flip_p(TABLE["no_dm"]["MAE"], TABLE["full"]["MAE"])
  assert f"p={p_perm:.3f}" in wide[3] and "n.s." not in wide[3]  # 0.062 < 0.1
  assert "significant at 0.1 by the sign-flip permutation test" in wide[-1]
  rows = stats.comparison_rows(TABLE, "full", metrics=["MAE"], test="bootstrap")
  low, high = stats.paired_bootstrap_ci(TABLE["no_dm"]["MAE"], TABLE["full"]["MAE"])
  wide = stats.markdown_table(rows, layout="wide").splitlines()
  assert f"[{low:.4f}, {high:.4f}]" in wide[3]


def test_grid_commands_start_without_scipy():
  """scipy.stats takes about a second to import: stats.py imports it at first use, so a grid
  command (which imports stats.py) answers a mistake on its command line at once."""
  code = ("import sys; from dhmd_jax.experiments import grid; from dhmd_jax import stats; "
          "print(sorted(m for m in sys.modules if m.startswith('scipy.stats')))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
