"""Statistics over seeds for result tables: mean ± std, and paired comparisons with a reference.

Pure functions of per-seed values (NumPy and `scipy.stats`; no JAX):

* `summarize(values)`: mean, sample std (ddof=1) and n of one variant's per-seed values.
* `paired_t(values, reference)`: the paired difference d_i = values_i - reference_i over seeds
  (seed i of the variant against seed i of the reference), its mean, the 95% confidence interval
  mean(d) ± t_{0.975, n-1} · sd(d)/√n and the two-sided p-value of `scipy.stats.ttest_rel`.
* `paired_bootstrap_ci(...)`: the percentile bootstrap interval of mean(d), resampling seeds
  (pairs) with replacement; exact (every one of the n^n resamples, by multiset enumeration) for
  n <= 10, else `scipy.stats.bootstrap(method="percentile")` from a seeded generator.
* `sign_flip_p(...)`: the two-sided permutation p-value of mean(d) under random sign flips of
  the differences, `scipy.stats.permutation_test(permutation_type="samples")`: exact over all
  2^n sign patterns for n <= 16, else Monte-Carlo from a seeded generator.
* `compare(values, reference)`: all three, plus a "significant at alpha" flag from the chosen
  test and a note for the degenerate cases.
* `comparison_rows(table, reference)`: a {variant: {metric: [per-seed values]}} table -> one row
  per (variant, metric), and `markdown_table` / `write_csv` to render them.

Degenerate cases give NaN and a note, never an exception: n = 1 has no standard deviation, no
confidence interval and no test ("n=1: no CI"); differences that are all zero have no t statistic
(p NaN, as scipy gives) and are never significant ("identical on every seed"); a nonzero
difference with zero variance gives t = ±inf and p = 0 (as scipy), flagged in the note because
the t-test is then degenerate (compare the sign-flip p, at least 2/2^n). Pairs where either value
is NaN (e.g. Corr of constant predictions) are dropped, and the note says how many.

Hand-written because SciPy lacks it: the exact bootstrap (`scipy.stats.bootstrap` only samples;
5 seeds have just 126 distinct resamples), enumerated here as weighted multisets whose
percentiles `scipy.stats.quantile(weights=...)` takes (SciPy >= 1.17).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import math
from typing import Iterable, Mapping, Optional, Sequence
import warnings

import numpy as np

# Metrics for which a lower value is better; every other metric counts as higher-is-better.
LOWER_IS_BETTER = frozenset({"MAE", "loss", "valid_loss", "selection_loss"})

EXACT_BOOTSTRAP_MAX_N = 10  # C(2n-1, n) = 92,378 distinct resamples at n = 10
EXACT_PERMUTATION_MAX_N = 16  # 2^16 = 65,536 sign patterns


def _scipy_stats():
  """scipy.stats, imported at first use: it takes about a second to import, and the grid
  commands import this module at start, to answer a mistake on their command line at once."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return stats


# ----------------------------------------------------------------------------- one variant


@dataclasses.dataclass(frozen=True)
class Summary:
  """Mean and sample standard deviation (ddof=1) over the finite per-seed values."""
  mean: float
  std: float  # NaN for n < 2
  n: int


def _as_1d(values, name) -> np.ndarray:
  arr = np.asarray(values, dtype=np.float64)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D sequence of per-seed values, got shape {arr.shape}")
  return arr


def summarize(values: Sequence[float]) -> Summary:
  """Mean ± sample std (ddof=1) over the finite values; NaNs (e.g. an undefined Corr) skipped."""
  arr = _as_1d(values, "values")
  arr = arr[np.isfinite(arr)]
  n = int(arr.size)
  if n == 0:
    return Summary(math.nan, math.nan, 0)
  return Summary(float(arr.mean()), float(arr.std(ddof=1)) if n > 1 else math.nan, n)


# ----------------------------------------------------------------------------- paired tests


def _pairs(values, reference):
  """(x, r, dropped): the pairs of per-seed values where both are finite."""
  x, r = _as_1d(values, "values"), _as_1d(reference, "reference")
  if x.shape != r.shape:
    raise ValueError(f"paired comparison needs one value per seed on both sides, got "
                     f"{x.size} values and {r.size} reference values")
  keep = np.isfinite(x) & np.isfinite(r)
  return x[keep], r[keep], int((~keep).sum())


def paired_differences(values: Sequence[float], reference: Sequence[float]):
  """(d, dropped): d_i = values_i - reference_i over the pairs where both are finite."""
  x, r, dropped = _pairs(values, reference)
  return x - r, dropped


@dataclasses.dataclass(frozen=True)
class TTest:
  """Paired t-test of mean(values - reference) = 0, with its confidence interval."""
  n: int
  mean_diff: float
  std_diff: float  # sample std of the differences
  t: float
  df: int
  ci_low: float
  ci_high: float
  p: float


def paired_t(values, reference, *, confidence: float = 0.95) -> TTest:
  """Paired two-sided t-test and t confidence interval of the mean difference (values - ref)."""
  x, r, _ = _pairs(values, reference)
  n = int(x.size)
  if n < 2:
    mean = float(np.mean(x - r)) if n else math.nan
    return TTest(n, mean, math.nan, math.nan, max(n - 1, 0), math.nan, math.nan, math.nan)
  # A constant difference (zero variance) makes scipy warn (precision loss, division by zero);
  # it gives t = ±inf and p = 0 (NaN for no difference) and the interval [mean, mean], and
  # `compare` notes it instead.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    result = _scipy_stats().ttest_rel(x, r)
    ci = result.confidence_interval(confidence_level=confidence)
  d = x - r
  return TTest(n, float(d.mean()), float(d.std(ddof=1)), float(result.statistic),
               int(result.df), float(ci.low), float(ci.high), float(result.pvalue))


@functools.lru_cache(maxsize=None)
def _bootstrap_multisets(n: int):
  """Every distinct bootstrap resample of n items as counts (M, n), and how many of the n^n
  ordered resamples each stands for (multinomial coefficients, exact integers)."""
  combos = np.array(list(itertools.combinations_with_replacement(range(n), n)), np.int64)
  counts = np.zeros((combos.shape[0], n), np.int64)
  np.add.at(counts, (np.arange(combos.shape[0])[:, None], combos), 1)
  factorial = np.array([math.factorial(k) for k in range(n + 1)], np.int64)
  multiplicity = math.factorial(n) // np.prod(factorial[counts], axis=1)  # n! / prod c_i!
  return counts, multiplicity


def paired_bootstrap_ci(values, reference, *, confidence: float = 0.95,
                        n_resamples: int = 10000, seed: int = 0, method: str = "auto"):
  """Percentile bootstrap CI (low, high) of mean(values - reference), resampling seed pairs.

  method: "exact" enumerates all n^n resamples (as multisets with their multiplicities), "mc"
  is `scipy.stats.bootstrap(method="percentile")` with `n_resamples` from
  `np.random.default_rng(seed)`, "auto" is exact for n <= 10. Both take the percentiles with
  linear interpolation (numpy's default). (NaN, NaN) for n < 2.
  """
  d, _ = paired_differences(values, reference)
  n = int(d.size)
  if n < 2:
    return math.nan, math.nan
  if method not in ("auto", "exact", "mc"):
    raise ValueError(f"bootstrap method must be 'auto', 'exact' or 'mc', got {method!r}")
  alpha = 1.0 - confidence
  if method == "exact" or (method == "auto" and n <= EXACT_BOOTSTRAP_MAX_N):
    counts, multiplicity = _bootstrap_multisets(n)
    means = counts @ d / n  # (M,) the mean of each distinct resample
    low, high = _scipy_stats().quantile(means, [alpha / 2, 1 - alpha / 2], weights=multiplicity)
    return float(low), float(high)
  # Resampling d is resampling the pairs; scipy draws rng.integers(0, n, (n_resamples, n)).
  ci = _scipy_stats().bootstrap(
      (d,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
      vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
  return float(ci.low), float(ci.high)


def sign_flip_p(values, reference, *, n_resamples: int = 9999, seed: int = 0,
                method: str = "auto") -> float:
  """Two-sided sign-flip permutation p-value of mean(values - reference).

  Under the null the two variants are exchangeable within a seed, so each difference's sign is
  a fair coin: `scipy.stats.permutation_test` of the differences alone with
  `permutation_type="samples"` flips their signs. method: "exact" over all 2^n sign patterns,
  "mc" with `n_resamples` random patterns from `np.random.default_rng(seed)`
  (p = 2 min(#{T <= t} + 1, #{T >= t} + 1) / (n_resamples + 1), at most 1), "auto" is exact
  for n <= 16 (scipy alone would sample once 2^n exceeds `n_resamples`). Ties within 100 ulps
  of the observed mean count as extreme. NaN for n < 2; 1.0 when every difference is 0.
  """
  d, _ = paired_differences(values, reference)
  n = int(d.size)
  if n < 2:
    return math.nan
  if method not in ("auto", "exact", "mc"):
    raise ValueError(f"permutation method must be 'auto', 'exact' or 'mc', got {method!r}")
  exact = method == "exact" or (method == "auto" and n <= EXACT_PERMUTATION_MAX_N)
  result = _scipy_stats().permutation_test(
      (d,), np.mean, permutation_type="samples", vectorized=True,
      n_resamples=math.inf if exact else n_resamples, alternative="two-sided",
      rng=np.random.default_rng(seed))
  return float(result.pvalue)


# ----------------------------------------------------------------------------- one comparison


TESTS = ("t", "permutation", "bootstrap")


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A variant against the reference on one metric, over paired seeds (diff = variant - ref)."""
  n: int  # finite pairs
  mean_diff: float
  ci_low: float  # t interval
  ci_high: float
  p: float  # paired t-test
  boot_low: float  # percentile bootstrap interval
  boot_high: float
  p_perm: float  # sign-flip permutation
  significant: bool  # by `test` at `alpha`
  test: str
  note: str


def compare(values, reference, *, alpha: float = 0.05, test: str = "t", seed: int = 0,
            n_resamples: int = 10000) -> Comparison:
  """Paired comparison of a variant with the reference over seeds.

  `test` decides `significant`: "t" (p < alpha), "permutation" (p_perm < alpha) or "bootstrap"
  (the (1 - alpha) bootstrap interval excludes 0). All three are always computed.
  """
  if test not in TESTS:
    raise ValueError(f"test must be one of {TESTS}, got {test!r}")
  d, dropped = paired_differences(values, reference)
  tt = paired_t(values, reference, confidence=1.0 - alpha)
  boot = paired_bootstrap_ci(values, reference, confidence=1.0 - alpha,
                             n_resamples=n_resamples, seed=seed)
  p_perm = sign_flip_p(values, reference, n_resamples=n_resamples - 1, seed=seed)
  notes = []
  if dropped:
    notes.append(f"{dropped} seed(s) with a NaN value dropped")
  if tt.n < 2:
    notes.append(f"n={tt.n}: no CI")
    significant = False
  elif np.all(d == 0):
    notes.append("identical on every seed")
    significant = False
  else:
    if tt.std_diff == 0.0:
      notes.append("zero variance of the differences: t-test degenerate, see p_perm")
    if test == "t":
      significant = bool(tt.p < alpha)
    elif test == "permutation":
      significant = bool(p_perm < alpha)
    else:
      significant = bool(boot[0] > 0 or boot[1] < 0)
  return Comparison(n=tt.n, mean_diff=tt.mean_diff, ci_low=tt.ci_low, ci_high=tt.ci_high,
                    p=tt.p, boot_low=boot[0], boot_high=boot[1], p_perm=p_perm,
                    significant=significant, test=test, note="; ".join(notes))


# ----------------------------------------------------------------------------- tables


def default_decimals(metric: str, values=()) -> int:
  """4 for MAE, Corr, losses and metrics whose values all lie in [-1, 1] (fractions), else 2
  (accuracies and F1 in percent)."""
  if metric in ("MAE", "Corr") or "loss" in metric.lower():
    return 4
  finite = np.asarray(values, np.float64)
  finite = finite[np.isfinite(finite)]
  return 4 if finite.size and np.all(np.abs(finite) <= 1.0) else 2


def _fmt(value, decimals):
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "nan"
  if isinstance(value, float) and math.isinf(value):
    return "inf" if value > 0 else "-inf"
  return f"{value:.{decimals}f}".replace("-", "−")


def _fmt_diff(value, decimals):
  text = _fmt(value, decimals)
  return "+" + text if isinstance(value, float) and value > 0 else text


def _fmt_p(p):
  if p is None or math.isnan(p):
    return "nan"
  return "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_rows(table: Mapping[str, Mapping[str, Sequence[float]]], reference: str, *,
                    metrics: Optional[Iterable[str]] = None, alpha: float = 0.05,
                    test: str = "t", lower_is_better: Optional[Iterable[str]] = None,
                    seed: int = 0, n_resamples: int = 10000, decimals=None) -> list:
  """One row per (variant, metric) of a {variant: {metric: [per-seed values]}} table.

  Seeds are paired by position: value i of every variant must come from the same seed as value i
  of the reference. The reference's own rows carry no comparison (its diff fields are NaN).

  Args:
    table: per variant, per metric, the per-seed values (NaN allowed: that pair is dropped).
    reference: the variant the others are compared with ("full", "dhmd").
    metrics: which metrics, in this order (default: the reference's, in its order).
    alpha: significance level; "n.s." marks p >= alpha.
    test: which test decides significance, "t" (default), "permutation" or "bootstrap".
    lower_is_better: metrics where a lower value is better (default `LOWER_IS_BETTER`).
    seed, n_resamples: for the Monte-Carlo bootstrap/permutation (exact for small n anyway).
    decimals: None (`default_decimals`), an int, or {metric: int} for the formatted strings.

  Returns:
    dicts with keys variant, metric, is_reference, n, mean, std, mean_std (formatted), diff,
    ci_low, ci_high, p, p_perm, boot_low, boot_high, significant, verdict ("better", "worse",
    "n.s." or "" for the reference), lower_is_better, note.
  """
  if reference not in table:
    raise ValueError(f"reference variant {reference!r} is not in the table (variants: "
                     f"{sorted(table)})")
  lower = LOWER_IS_BETTER if lower_is_better is None else frozenset(lower_is_better)
  metrics = list(table[reference]) if metrics is None else list(metrics)
  rows = []
  for variant, by_metric in table.items():
    for metric in metrics:
      if metric not in by_metric or metric not in table[reference]:
        raise ValueError(f"metric {metric!r} missing for variant "
                         f"{variant if metric not in by_metric else reference!r}")
      auto = default_decimals(metric, table[reference][metric])
      dec = (auto if decimals is None else
             decimals if isinstance(decimals, int) else decimals.get(metric, auto))
      summary = summarize(by_metric[metric])
      mean_std = (f"{_fmt(summary.mean, dec)} ± {_fmt(summary.std, dec)}" if summary.n > 1
                  else f"{_fmt(summary.mean, dec)} (n={summary.n})")
      row = {"variant": variant, "metric": metric, "is_reference": variant == reference,
             "n": summary.n, "mean": summary.mean, "std": summary.std, "mean_std": mean_std,
             "lower_is_better": metric in lower, "decimals": dec, "alpha": alpha,
             "test": test}
      if variant == reference:
        row.update(diff=math.nan, ci_low=math.nan, ci_high=math.nan, p=math.nan,
                   p_perm=math.nan, boot_low=math.nan, boot_high=math.nan, significant=False,
                   verdict="", note="reference")
      else:
        c = compare(by_metric[metric], table[reference][metric], alpha=alpha, test=test,
                    seed=seed, n_resamples=n_resamples)
        if c.significant:
          improved = (c.mean_diff < 0) if metric in lower else (c.mean_diff > 0)
          verdict = "better" if improved else "worse"
        else:
          verdict = "n.s."
        row.update(diff=c.mean_diff, ci_low=c.ci_low, ci_high=c.ci_high, p=c.p,
                   p_perm=c.p_perm, boot_low=c.boot_low, boot_high=c.boot_high,
                   significant=c.significant, verdict=verdict, note=c.note)
        row["n"] = c.n if c.n else summary.n
      rows.append(row)
  return rows


def _diff_cell(row):
  """"Δ [CI] p" of a wide table: the interval and p-value of the test that decides `significant`
  (t: t interval and t-test p; permutation: t interval and sign-flip p; bootstrap: bootstrap
  interval and t-test p)."""
  dec = row["decimals"]
  if row["is_reference"]:
    return "reference"
  low, high = ((row["boot_low"], row["boot_high"]) if row["test"] == "bootstrap"
               else (row["ci_low"], row["ci_high"]))
  p = _fmt_p(row["p_perm"] if row["test"] == "permutation" else row["p"])
  cell = (f"{_fmt_diff(row['diff'], dec)} [{_fmt(low, dec)}, {_fmt(high, dec)}] "
          f"p{p if p.startswith('<') else '=' + p}")
  return cell + (" n.s." if not row["significant"] else "")


def markdown_table(rows: Sequence[Mapping], *, layout: str = "long", reference: str = "",
                   label: str = "variant") -> str:
  """Markdown for `comparison_rows` output (`label` heads the variant column).

  layout "long": one line per (variant, metric) with every statistic; "wide": one line per
  variant, one column per metric, each cell "mean ± std" and, below the reference, the
  difference with its 95% t interval and p ("n.s." when not significant).
  """
  if not rows:
    return ""
  ref = reference or next((r["variant"] for r in rows if r["is_reference"]), "reference")
  lower = sorted({r["metric"] for r in rows if r["lower_is_better"]})
  alpha, test = rows[0]["alpha"], rows[0]["test"]
  level = f"{100 * (1 - alpha):g}%"
  if layout == "long":
    how = (f"{level} CI from the t distribution, p from the paired two-sided t-test, sign-flip "
           f"p from the two-sided permutation test (exact for n <= 16; at least 2/2^n), "
           f"bootstrap CI by resampling seeds (percentile; exact for n <= 10)")
  elif test == "t":
    how = f"{level} CI from the t distribution, p from the paired two-sided t-test"
  elif test == "permutation":
    how = (f"{level} CI from the t distribution, p from the two-sided sign-flip permutation "
           f"test (exact for n <= 16; at least 2/2^n)")
  else:
    how = f"{level} percentile bootstrap CI over seeds, p from the paired two-sided t-test"
  by = {"t": "the paired t-test", "permutation": "the sign-flip permutation test",
        "bootstrap": "the bootstrap interval"}[test]
  foot = (f"\nΔ = {label} − {ref}, over seeds paired by position; {how}; n.s. = not "
          f"significant at {alpha:g} by {by}."
          + (f" Lower is better for {', '.join(lower)}." if lower else "") + "\n")
  if layout == "long":
    ci = f"{100 * (1 - alpha):g}% CI"
    lines = [f"| {label} | metric | n | mean ± std | Δ vs {ref} | {ci} (t) | p (t) | "
             f"p (sign-flip) | {ci} (bootstrap) | verdict | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      d = r["decimals"]
      if r["is_reference"]:
        lines.append(f"| {r['variant']} | {r['metric']} | {r['n']} | {r['mean_std']} | "
                     f"reference | | | | | | |")
        continue
      lines.append(
          f"| {r['variant']} | {r['metric']} | {r['n']} | {r['mean_std']} | "
          f"{_fmt_diff(r['diff'], d)} | [{_fmt(r['ci_low'], d)}, {_fmt(r['ci_high'], d)}] | "
          f"{_fmt_p(r['p'])} | {_fmt_p(r['p_perm'])} | "
          f"[{_fmt(r['boot_low'], d)}, {_fmt(r['boot_high'], d)}] | {r['verdict']} | "
          f"{r['note']} |")
    return "\n".join(lines) + "\n" + foot
  if layout != "wide":
    raise ValueError(f"layout must be 'long' or 'wide', got {layout!r}")
  metrics = list(dict.fromkeys(r["metric"] for r in rows))
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  cell = {(r["variant"], r["metric"]): r for r in rows}
  lines = [f"| {label} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
  for v in variants:
    cells = []
    for m in metrics:
      r = cell[(v, m)]
      cells.append(r["mean_std"] if r["is_reference"] else
                   f"{r['mean_std']}<br>Δ {_diff_cell(r)}")
    lines.append(f"| {v} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n" + foot


CSV_COLUMNS = ("variant", "metric", "is_reference", "n", "mean", "std", "mean_std", "diff",
               "ci_low", "ci_high", "p", "p_perm", "boot_low", "boot_high", "significant",
               "verdict", "lower_is_better", "note")


def write_csv(rows: Sequence[Mapping], path_or_file) -> None:
  """`comparison_rows` output as CSV (full precision floats; NaN written as empty)."""
  def value(v):
    if isinstance(v, float) and math.isnan(v):
      return ""
    return repr(v) if isinstance(v, float) else v

  def write(f):
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
      writer.writerow([value(r[c]) for c in CSV_COLUMNS])

  if isinstance(path_or_file, (str, bytes)) or hasattr(path_or_file, "__fspath__"):
    with open(path_or_file, "w", newline="") as f:
      write(f)
  else:
    write(path_or_file)


def csv_text(rows: Sequence[Mapping]) -> str:
  buf = io.StringIO()
  write_csv(rows, buf)
  return buf.getvalue()
