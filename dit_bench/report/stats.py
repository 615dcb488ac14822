"""Statistics for ablations over a few seeds: t-based confidence intervals and paired t-tests.

Why paired: every run of an ablation is evaluated on the same fixed validation images with the
same fixed noise, and variant and base share each seed's data order, so the seed-to-seed part
of the noise is common to both and cancels in the per-seed difference. The paired t-test on the
differences d_s = variant_s - base_s (s = seed) is the textbook test for that design (Student
1908; e.g. Wasserman, All of Statistics, 10.4). With n seeds it has n - 1 degrees of freedom, so
three seeds give wide intervals: a difference is called "distinguishable from seed noise" only
when the interval excludes zero (p < alpha), never from the point estimate.

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


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values with a two-sided t interval at `level` (NaN bounds when n < 2)."""

    mean: float
    std: float
    n: int
    lo: float
    hi: float
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean and its t-based confidence interval: mean +- t_{n-1, (1+level)/2} * s / sqrt(n)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
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

    @property
    def distinguishable(self) -> bool:
        return bool(self.n >= 2 and self.p_value < self.alpha)

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

    Degenerate cases are decided without dividing by zero: all differences exactly equal gives
    p = 1 when they are zero (identical runs) and p = 0 otherwise (a constant shift with no
    noise at all).
    """
    v = np.asarray(variant, dtype=float)
    b = np.asarray(base, dtype=float)
    if v.shape != b.shape:
        raise ValueError(f"paired values need the same seeds: {v.shape} vs {b.shape}")
    keep = ~(np.isnan(v) | np.isnan(b))
    v, b = v[keep], b[keep]
    d = v - b
    n = len(d)
    base_mean = float(b.mean()) if n else math.nan
    if n < 2:
        diff = float(d.mean()) if n else math.nan
        return PairedComparison(diff, math.nan, math.nan, math.nan, math.nan, n, base_mean, level)
    ci = mean_ci(d, level)
    if ci.std == 0:
        same = ci.mean == 0
        t = 0.0 if same else math.copysign(math.inf, ci.mean)
        return PairedComparison(
            ci.mean, ci.mean, ci.mean, 1.0 if same else 0.0, t, n, base_mean, level, 1 - level
        )
    t = ci.mean / (ci.std / math.sqrt(n))
    p = float(2 * stats.t.sf(abs(t), df=n - 1))
    return PairedComparison(ci.mean, ci.lo, ci.hi, p, float(t), n, base_mean, level, 1 - level)


def verdict(c: PairedComparison, name: str, base: str, metric: str, fmt: str = ".4g") -> str:
    """One plain sentence on `c` (lower metric values are better)."""
    if c.n < 2:
        return f"{name} vs {base}: {c.n} matched seed(s); no test is possible with fewer than 2."
    pct = f" ({c.relative:+.1%} of {base})" if not math.isnan(c.relative) else ""
    interval = f"{int(c.level * 100)}% CI [{c.lo:{fmt}}, {c.hi:{fmt}}]"
    if c.distinguishable:
        side = "higher (worse)" if c.diff > 0 else "lower (better)"
        return (
            f"{name} is distinguishable from seed noise: its {metric} is {side} than {base}'s "
            f"by {abs(c.diff):{fmt}}{pct}, {interval}, paired t p = {c.p_value:.2g}, "
            f"{c.n} seeds."
        )
    return (
        f"{name} is not distinguishable from seed noise: mean difference in {metric} "
        f"{c.diff:+{fmt}}{pct}, {interval} includes 0, paired t p = {c.p_value:.2g}, {c.n} seeds."
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
    """Each `by` group paired with the `base` group on `pair_on`: one row per non-base group."""
    wide = table.pivot_table(index=pair_on, columns=by, values=metric, aggfunc="mean")
    if base not in wide:
        raise ValueError(f"base {base!r} has no runs with {metric}; groups: {list(wide.columns)}")
    order = [g for g in table[by].drop_duplicates() if g != base and g in wide]
    rows = []
    for name in order:
        c = paired_compare(wide[name].to_numpy(), wide[base].to_numpy(), level)
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
                "distinguishable": c.distinguishable,
                "verdict": verdict(c, name, base, metric),
            }
        )
    # the columns even without rows (only the base has finished): callers select on "metric"
    columns = [by, "base", "metric", "n_pairs", "diff", "diff_lo", "diff_hi", "relative", "t"]
    columns += ["p_value", "distinguishable", "verdict"]
    return pd.DataFrame(rows, columns=columns)
