"""Statistics for ablations over a few seeds: t-based confidence intervals and paired t-tests.

Why paired: every run of an ablation is evaluated on the same fixed validation images with the
same fixed noise, and variant and base share each seed's data order, so the seed-to-seed part
of the noise is common to both and cancels in the per-seed difference. The paired t-test on the
differences d_s = variant_s - base_s (s = seed) is the textbook test for that design (Student
1908; e.g. Wasserman, All of Statistics, 10.4). With n seeds it has n - 1 degrees of freedom, so
three seeds give wide intervals: a difference is called "distinguishable from seed noise" only
when the interval excludes zero (p < alpha), never from the point estimate. Fewer than
MIN_PAIRS matched seeds, or differences with no spread at all, leave the seed noise unmeasured:
no test (NaN p-value), and the comparison is undetermined rather than distinguishable. A value
that is not finite (a run that diverged: inf, NaN) is no measurement of the metric: it is left
out like a missing one, and a comparison says how many seeds it lost that way.

Why Holm: an ablation compares k variants with one base, each at alpha = 0.05; with k = 5 truly
equal variants and 3 seeds, at least one of them is called distinguishable in about 20% of
ablations, not 5%. The Holm-Bonferroni step-down adjustment (Holm 1979) of each metric's k
p-values bounds that family-wise rate by alpha under any dependence (the comparisons share the
base's runs), and is uniformly more powerful than Bonferroni: `p_holm` and
`distinguishable_holm` stand beside the per-comparison `p_value` and `distinguishable`.

Pure functions of numbers and DataFrames; nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
# The least that estimates the seed noise at all (n - 1 = 1 degree of freedom). The test stays
# valid there, only wide: with 2 pairs p < 0.05 needs |t| > 12.7.
MIN_PAIRS = 2
# Differences whose standard deviation is below this fraction of max(1, |mean|) have no spread:
# a constant shift computed in floating point (0.4 - 0.3 vs 0.8 - 0.7) differs in the last bits,
# and t = d / (rounding noise) would call it certain.
ZERO_SPREAD_RTOL = 1e-12


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values with a two-sided t interval at `level` (NaN bounds when n < 2)."""

    mean: float
    std: float
    n: int
    lo: float
    hi: float
    level: float = LEVEL


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and its t-based confidence interval: mean +- t_{n-1, (1+level)/2} * s / sqrt(n).
    Values that are not finite (NaN: missing or diverged; inf: diverged) are left out."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, 0, math.nan, math.nan, level)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, n, math.nan, math.nan, level)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, df=n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half, level)


@dataclass(frozen=True)
class PairedComparison:
    """variant - base over matched seeds: mean difference, its CI, the paired t-test."""

    diff: float  # mean of d_s = variant_s - base_s
    lo: float
    hi: float
    p_value: float
    t: float
    n: int  # matched seeds
    base_mean: float
    level: float = LEVEL
    alpha: float = 1 - LEVEL
    left_out: int = 0  # seeds without a finite value on one side (missing, or diverged)

    @property
    def distinguishable(self) -> bool:
        return bool(self.n >= MIN_PAIRS and self.p_value < self.alpha)

    @property
    def undetermined(self) -> bool:
        """No test was possible (too few pairs, or no spread): neither verdict applies."""
        return math.isnan(self.p_value)

    @property
    def relative(self) -> float:
        """The mean difference as a fraction of the base's mean."""
        return self.diff / self.base_mean if self.base_mean else math.nan


def paired_compare(
    variant: Sequence[float],
    base: Sequence[float],
    level: float = LEVEL,
) -> PairedComparison:
    """Paired t-test of `variant` against `base` (same length, element i = seed i).

    Pairs with a value that is not finite on either side (NaN: missing or diverged; inf:
    diverged) are dropped and counted in `left_out`. The comparison is undetermined (p, t and the
    interval NaN; `distinguishable` False; `undetermined` True) when fewer than MIN_PAIRS = 2
    pairs remain, or when every difference is the same nonzero number: zero spread is not "no
    noise" but noise the seeds failed to show (too few, or runs deterministic in the seed), and
    t = d / 0 would call any such shift certain. The one zero-spread case with an
    answer is all differences zero (identical runs): p = 1, t = 0, not distinguishable. "No
    spread" and "zero" are up to floating-point rounding (ZERO_SPREAD_RTOL), not exact.
    """
    v = np.asarray(variant, dtype=float)
    b = np.asarray(base, dtype=float)
    if v.shape != b.shape:
        raise ValueError(f"paired values need the same seeds: {v.shape} vs {b.shape}")
    keep = np.isfinite(v) & np.isfinite(b)
    left_out = int((~keep).sum())
    v, b = v[keep], b[keep]
    d = v - b
    n = len(d)
    base_mean = float(b.mean()) if n else math.nan
    diff = float(d.mean()) if n else math.nan
    nan = math.nan
    tail = (level, 1 - level, left_out)
    if n < MIN_PAIRS:
        return PairedComparison(diff, nan, nan, nan, nan, n, base_mean, *tail)
    ci = mean_ci(d, level)
    # rounding in v - b scales with the values, not with their difference
    scale = max(1.0, abs(ci.mean), float(np.abs(v).max()), float(np.abs(b).max()))
    if ci.std <= ZERO_SPREAD_RTOL * scale:
        if abs(ci.mean) <= ZERO_SPREAD_RTOL * max(1.0, abs(base_mean)):  # identical runs
            return PairedComparison(0.0, 0.0, 0.0, 1.0, 0.0, n, base_mean, *tail)
        return PairedComparison(ci.mean, nan, nan, nan, nan, n, base_mean, *tail)
    t = ci.mean / (ci.std / math.sqrt(n))
    p = float(2 * stats.t.sf(abs(t), df=n - 1))
    return PairedComparison(ci.mean, ci.lo, ci.hi, p, float(t), n, base_mean, *tail)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values of one family of tests, in the input order: the i-th
    smallest of m is max over j <= i of min(1, (m - j + 1) p_(j)). NaN (no test: undetermined)
    stays NaN and is no member of the family: m counts the tests that were made."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def format_p(p: float, alpha: float = 1 - LEVEL) -> str:
    """p with two significant digits, more where two would round it across alpha: 0.0496 is
    "0.0496", not the "0.05" that reads as not below alpha = 0.05 beside a "yes"."""
    if math.isnan(p):
        return "–"
    shown = float(f"{alpha:.6g}")  # alpha as the report prints it: 1 - 0.95 is 0.05000000000000004
    for digits in range(2, 7):
        text = f"{p:.{digits}g}"
        if (float(text) < shown) == (p < alpha):
            return text
    return text


def format_relative(r: float) -> str:
    """A relative difference in percent, one decimal, with two significant digits where one
    decimal would round it to zero: bf16 against float32 moving a loss by -0.03% (and called
    distinguishable) is "-0.03%", not the "-0.0%" that reads as no difference."""
    if math.isnan(r):
        return "–"
    text = f"{r:+.1%}"
    if r and float(text[:-1]) == 0:
        text = f"{100 * r:+.2g}%"
    return text


def verdict(
    c: PairedComparison,
    name: str,
    base: str,
    metric: str,
    fmt: str = ".4g",
    unpaired: tuple[Sequence, Sequence] = ((), ()),
) -> str:
    """One plain sentence on `c` (lower metric values are better), and one more when seeds
    were left out for a value that is missing or not finite, and one on `unpaired`: the seeds
    of which only `name` has a run, and those of which only `base` has (runs with nothing to
    pair, not missing values)."""
    # "0 matched seed(s); no test is possible with fewer than 2" read as runs still to come
    if c.n == 0 and not c.left_out and all(unpaired):
        text = f"{name} vs {base}: undetermined, no seed in common; no paired test is possible."
    else:
        text = _verdict(c, name, base, metric, fmt)
    if c.left_out:
        text += (
            f" Left out: {c.left_out} seed(s) whose {metric} is missing (a run not finished, "
            f"or not evaluated) or not finite (diverged) for {name} or {base}."
        )
    if k := sum(map(len, unpaired)):
        seeds = "; ".join(
            f"{who}: {', '.join(map(str, sorted(s))) or 'none'}"
            for who, s in zip((name, base), unpaired, strict=True)
        )
        text += f" Unpaired: {k} seed(s) with a run of only one of the two ({seeds})."
    return text


def _verdict(c: PairedComparison, name: str, base: str, metric: str, fmt: str) -> str:
    pct = f" ({format_relative(c.relative)} of {base})" if not math.isnan(c.relative) else ""
    if c.n < MIN_PAIRS:
        return (
            f"{name} vs {base}: undetermined, {c.n} matched seed(s); no test is possible with "
            f"fewer than {MIN_PAIRS}."
        )
    if c.undetermined:
        return (
            f"{name} vs {base}: undetermined, every one of {c.n} seeds differs in {metric} by "
            f"exactly {c.diff:+{fmt}}{pct}; with no spread the seed noise is unmeasured, so no "
            "test is possible."
        )
    interval = f"{int(c.level * 100)}% CI [{c.lo:{fmt}}, {c.hi:{fmt}}]"
    p = format_p(c.p_value, c.alpha)
    if c.distinguishable:
        side = "higher (worse)" if c.diff > 0 else "lower (better)"
        return (
            f"{name} is distinguishable from seed noise: its {metric} is {side} than {base}'s "
            f"by {abs(c.diff):{fmt}}{pct}, {interval}, paired t p = {p}, {c.n} seeds."
        )
    return (
        f"{name} is not distinguishable from seed noise: mean difference in {metric} "
        f"{c.diff:+{fmt}}{pct}, {interval} includes 0, paired t p = {p}, {c.n} seeds."
    )


# -- DataFrames ---------------------------------------------------------------------------------
def summarize(
    table: pd.DataFrame, metric: str, by: str = "variant", level: float = LEVEL
) -> pd.DataFrame:
    """Mean, std, n and t-based CI of `metric` per `by` group (one row per group)."""
    rows = []
    for key, group in table.groupby(by, sort=False):
        ci = mean_ci(group[metric].to_numpy(dtype=float), level)
        rows.append({by: key, "metric": metric, **asdict(ci)})
    return pd.DataFrame(rows)


def compare_to_base(
    table: pd.DataFrame,
    metric: str,
    base: str,
    *,
    by: str = "variant",
    pair_on: str = "seed",
    level: float = LEVEL,
) -> pd.DataFrame:
    """Each `by` group paired with the `base` group on `pair_on`: one row per non-base group.

    `distinguishable` is a nullable boolean: True, False, or NA where the comparison is
    `undetermined` (no test: fewer than MIN_PAIRS pairs, or no spread); `call` turns the two
    into the report's word. Raises ValueError when `base` has no value of `metric`."""
    # dropna=False: a group whose every run diverged (NaN) keeps its column, so it gets its
    # row ("undetermined, 0 matched seeds"), as one whose runs logged inf does
    wide = table.pivot_table(index=pair_on, columns=by, values=metric, aggfunc="mean", dropna=False)
    if base not in wide or not wide[base].notna().any():  # callers check first (has_values)
        raise ValueError(f"base {base!r} has no runs with {metric}; groups: {list(wide.columns)}")
    order = [g for g in table[by].drop_duplicates() if g != base and g in wide]
    rows = []
    for name in order:
        # the seeds both ran: a seed only a third group ran is no pair "left out", and one only
        # one of the two ran is a run with nothing to pair, not a value "missing"
        mine, theirs = (set(table.loc[table[by] == g, pair_on]) for g in (name, base))
        ran = wide.index.isin(mine & theirs)
        c = paired_compare(wide.loc[ran, name].to_numpy(), wide.loc[ran, base].to_numpy(), level)
        rows.append(
            {
                by: name,
                "base": base,
                "metric": metric,
                "n_pairs": c.n,
                "diff": c.diff,
                "diff_lo": c.lo,
                "diff_hi": c.hi,
                "relative": c.relative,
                "t": c.t,
                "p_value": c.p_value,
                # three answers, not two: NA (no test) where the comparison is undetermined,
                # so the table never reads "not distinguishable" where the verdict says
                # "undetermined"
                "distinguishable": pd.NA if c.undetermined else c.distinguishable,
                "undetermined": c.undetermined,
                "verdict": verdict(c, name, base, metric, unpaired=(mine - theirs, theirs - mine)),
            }
        )
    # the columns even without rows (only the base has finished): callers select on "metric"
    out = pd.DataFrame(rows, columns=paired_columns(by))
    out["distinguishable"] = out["distinguishable"].astype("boolean")
    out["undetermined"] = out["undetermined"].astype(bool)
    # the family is this metric's comparisons against the base (see the module's docstring)
    out["p_holm"] = holm(out["p_value"].to_numpy(dtype=float))
    alpha = 1 - level
    out["distinguishable_holm"] = pd.array(
        [
            pd.NA if u else bool(p < alpha)
            for p, u in zip(out["p_holm"], out["undetermined"], strict=True)
        ],
        dtype="boolean",
    )
    return out


def paired_columns(by: str = "variant") -> list[str]:
    """The columns of `compare_to_base`'s table."""
    columns = [by, "base", "metric", "n_pairs", "diff", "diff_lo", "diff_hi", "relative", "t"]
    columns += ["p_value", "distinguishable", "undetermined", "verdict"]
    return columns + ["p_holm", "distinguishable_holm"]


def call(distinguishable, undetermined) -> str:
    """A comparison's answer in one word: "yes", "no" or "undetermined" (no test possible)."""
    if undetermined or pd.isna(distinguishable):
        return "undetermined"
    return "yes" if distinguishable else "no"


def has_values(table: pd.DataFrame, metric: str, group: str, by: str = "variant") -> bool:
    """Whether `group` has at least one run with a value of `metric` (a base to pair with)."""
    if metric not in table:
        return False
    return bool(table.loc[table[by] == group, metric].notna().any())
