"""Paired statistics of ablations on known cases (dit_bench.report.stats)."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dit_bench.report.stats import (
    call,
    compare_to_base,
    format_p,
    format_relative,
    has_values,
    holm,
    mean_ci,
    paired_compare,
    summarize,
    verdict,
)


def test_mean_ci_matches_the_t_formula():
    x = [1.0, 2.0, 4.0]
    ci = mean_ci(x)
    half = stats.t.ppf(0.975, 2) * np.std(x, ddof=1) / math.sqrt(3)
    assert ci.mean == pytest.approx(7 / 3)
    assert (ci.lo, ci.hi) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert math.isnan(mean_ci([1.0]).lo) and mean_ci([]).n == 0


def test_identical_variants_are_not_distinguishable():
    base = [0.101, 0.097, 0.104]
    c = paired_compare(base, base)
    assert c.diff == 0 and c.p_value == 1.0 and not c.distinguishable
    assert "not distinguishable from seed noise" in verdict(c, "b", "a", "val_loss")


def test_same_distribution_is_not_distinguishable_most_of_the_time():
    # seed noise shared by both (the pairing), plus independent noise: no true difference
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        seed_effect = rng.normal(0, 1.0, 3)
        a = 5 + seed_effect + rng.normal(0, 0.1, 3)
        b = 5 + seed_effect + rng.normal(0, 0.1, 3)
        hits += paired_compare(b, a).distinguishable
    assert hits / 400 < 0.09  # nominal false-positive rate 0.05


def test_planted_large_difference_is_detected_despite_seed_noise():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 1.0, 3)  # large seed noise, common to both
    base = 5 + seed_effect + rng.normal(0, 0.01, 3)
    variant = base + 0.5 + rng.normal(0, 0.01, 3)
    c = paired_compare(variant, base)
    assert c.distinguishable and c.p_value < 0.01 and c.lo > 0
    assert c.diff == pytest.approx(0.5, abs=0.05)
    assert stats.ttest_rel(variant, base).pvalue == pytest.approx(c.p_value)
    text = verdict(c, "adaln", "adaln_zero", "val_loss")
    assert text.startswith("adaln is distinguishable from seed noise") and "higher (worse)" in text
    # unpaired, the seed noise would hide it: why pairing matters
    assert stats.ttest_ind(variant, base).pvalue > 0.05


def test_constant_shift_without_spread_is_undetermined():
    # zero spread is noise the seeds failed to show, not a certain shift (t = 1 / 0)
    c = paired_compare([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert c.diff == 1.0 and c.undetermined and not c.distinguishable
    assert math.isnan(c.p_value) and math.isnan(c.t) and math.isnan(c.lo) and math.isnan(c.hi)
    text = verdict(c, "b", "a", "val_loss")
    assert "undetermined" in text and "distinguishable" not in text


def test_fewer_than_two_pairs_is_undetermined():
    c = paired_compare([1.0, 2.01], [0.0, math.nan])
    assert c.n == 1 and c.diff == 1.0
    assert c.undetermined and not c.distinguishable and math.isnan(c.p_value)
    assert "undetermined" in verdict(c, "b", "a", "val_loss")
    # two pairs: one degree of freedom, a valid (wide) test
    c = paired_compare([1.0, 2.01], [0.0, 1.0])
    p = stats.ttest_rel([1.0, 2.01], [0.0, 1.0]).pvalue
    assert c.n == 2 and c.p_value == pytest.approx(p) and not c.undetermined
    # NaN pairs are dropped first: two constant differences of 0.5 remain
    c = paired_compare([1.0, math.nan, 2.0, 3.5], [0.5, 1.0, math.nan, 3.0])
    assert c.n == 2 and c.diff == pytest.approx(0.5)
    assert c.undetermined and not c.distinguishable and math.isnan(c.p_value)
    assert paired_compare([], []).undetermined and paired_compare([], []).n == 0


@pytest.mark.parametrize("n", [3, 5])
def test_ci_covers_the_true_mean_at_its_nominal_rate(n):
    rng = np.random.default_rng(n)
    trials, true_mean = 4000, 0.3
    covered = 0
    for _ in range(trials):
        ci = mean_ci(rng.normal(true_mean, 2.0, n))
        covered += ci.lo <= true_mean <= ci.hi
    # binomial sd at p = 0.95, 4000 trials: 0.0034; allow ~4 sd
    assert covered / trials == pytest.approx(0.95, abs=0.014)


def test_paired_ci_covers_the_true_difference_at_its_nominal_rate():
    rng = np.random.default_rng(7)
    trials, covered = 3000, 0
    for _ in range(trials):
        seed_effect = rng.normal(0, 1.0, 3)
        base = seed_effect + rng.normal(0, 0.2, 3)
        variant = seed_effect + 0.1 + rng.normal(0, 0.2, 3)
        c = paired_compare(variant, base)
        covered += c.lo <= 0.1 <= c.hi
    assert covered / trials == pytest.approx(0.95, abs=0.016)


def test_tables_pair_by_seed_not_by_row_order():
    t = pd.DataFrame(
        {
            "variant": ["a", "a", "a", "b", "b", "b"],
            "seed": [0, 1, 2, 2, 0, 1],  # b's rows in another order
            "val_loss": [1.0, 2.0, 3.0, 3.4, 1.5, 2.6],
        }
    )
    p = compare_to_base(t, "val_loss", "a")
    assert list(p["variant"]) == ["b"]
    row = p.iloc[0]
    # by seed the differences are 0.5, 0.6, 0.4: tight; by row order they would be 2.4, -0.5, -0.4
    p_seed = stats.ttest_rel([1.5, 2.6, 3.4], [1.0, 2.0, 3.0]).pvalue
    assert row["diff"] == pytest.approx(0.5) and row["p_value"] == pytest.approx(p_seed)
    assert row["distinguishable"] and row["n_pairs"] == 3
    s = summarize(t, "val_loss").set_index("variant")
    assert s.loc["a", "mean"] == pytest.approx(2.0) and s.loc["b", "n"] == 3


def test_tables_report_a_constant_shift_as_undetermined():
    t = pd.DataFrame(
        {
            "variant": ["a"] * 3 + ["b"] * 3,
            "seed": [0, 1, 2] * 2,
            "val_loss": [1.0, 2.0, 3.0, 1.5, 2.5, 3.5],
        }
    )
    row = compare_to_base(t, "val_loss", "a").iloc[0]
    assert row["diff"] == pytest.approx(0.5) and row["undetermined"]
    # neither yes nor no: NA in the table, "undetermined" in the report's column
    assert pd.isna(row["distinguishable"])
    assert call(row["distinguishable"], row["undetermined"]) == "undetermined"
    assert math.isnan(row["p_value"]) and "undetermined" in row["verdict"]


def test_tables_say_yes_no_or_undetermined_per_comparison():
    t = pd.DataFrame(
        {
            "variant": ["a"] * 3 + ["same"] * 3 + ["worse"] * 3 + ["one"],
            "seed": [0, 1, 2] * 3 + [0],
            "val_loss": [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.5, 2.6, 3.4, 9.0],
        }
    )
    p = compare_to_base(t, "val_loss", "a").set_index("variant")
    calls = {v: call(r["distinguishable"], r["undetermined"]) for v, r in p.iterrows()}
    assert calls == {"same": "no", "worse": "yes", "one": "undetermined"}
    assert str(p["distinguishable"].dtype) == "boolean" and p["undetermined"].dtype == bool
    assert has_values(t, "val_loss", "a") and not has_values(t, "val_loss", "nobody")
    assert not has_values(t, "val_FD", "a")
    assert compare_to_base(t[t["variant"] == "a"], "val_loss", "a").empty  # only the base


def test_a_constant_shift_up_to_rounding_is_undetermined_not_certain():
    # 0.4 - 0.3, 0.8 - 0.7, 1.2 - 1.1 differ in the last bits: exact equality saw a spread of
    # ~1e-17 and called the shift certain (p ~ 1e-31)
    base = [0.3, 0.7, 1.1]
    c = paired_compare([x + 0.1 for x in base], base)
    assert np.ptp(np.subtract([x + 0.1 for x in base], base)) > 0  # the rounding is there
    assert c.undetermined and not c.distinguishable and math.isnan(c.p_value)
    assert c.diff == pytest.approx(0.1)
    # differences that are zero up to rounding: identical runs, not undetermined
    v = [0.1 + 0.2, 0.7, 1.1]
    c = paired_compare(v, [0.3, 0.7, 1.1])
    assert c.p_value == 1.0 and not c.undetermined and not c.distinguishable


def test_a_non_finite_value_is_left_out_as_diverged_and_the_verdict_says_so():
    base = [0.50, 0.52, 0.49]
    for bad in (math.inf, -math.inf, math.nan):
        variant = [0.55, bad, 0.53]  # one seed diverged
        c = paired_compare(variant, base)
        assert c.n == 2 and c.left_out == 1
        assert c.diff == pytest.approx(0.045) and math.isfinite(c.lo)
        text = verdict(c, "bf16", "fp32", "val_loss")
        assert "inf" not in text and "nan" not in text
        assert (
            "Left out: 1 seed(s) whose val_loss is missing (a run not finished, or not "
            "evaluated) or not finite (diverged)"
        ) in text
        ci = mean_ci(variant)
        assert ci.n == 2 and ci.mean == pytest.approx(0.54) and math.isfinite(ci.hi)
    # nothing left out: no such sentence
    assert "Left out" not in verdict(paired_compare([0.55, 0.6, 0.53], base), "b", "a", "x")


def test_a_variant_whose_every_seed_diverged_keeps_its_row_as_undetermined():
    """All-NaN (diverged, summary null) must read as inf does: a row, undetermined, 0 pairs,
    every seed left out. pivot_table's default dropped the all-NaN column and the row with it."""
    for bad in (math.nan, math.inf):
        table = pd.DataFrame(
            {
                "variant": ["base"] * 3 + ["good"] * 3 + ["diverged"] * 3,
                "seed": [0, 1, 2] * 3,
                "val_loss": [0.50, 0.52, 0.51, 0.49, 0.50, 0.50, bad, bad, bad],
            }
        )
        out = compare_to_base(table, "val_loss", "base").set_index("variant")
        assert list(out.index) == ["good", "diverged"]
        row = out.loc["diverged"]
        assert row["n_pairs"] == 0 and row["undetermined"] and pd.isna(row["distinguishable"])
        assert "Left out: 3 seed(s)" in row["verdict"]
    table.loc[table["variant"] == "base", "val_loss"] = math.nan  # nothing to pair with
    with pytest.raises(ValueError, match="base 'base' has no runs with val_loss"):
        compare_to_base(table, "val_loss", "base")


def test_a_constant_shift_of_large_values_is_undetermined_not_certain():
    """Every seed differs by exactly +0.3 (deterministic runs): no spread, so no test. At FD
    values in the thousands the rounding of v - b is ~1e-12, above the tolerance that is
    scaled by the difference (0.3) instead of by the values, and t ~ 1e11 calls it certain."""
    base = np.array([12345.6, 23456.7, 34567.8])
    c = paired_compare(base + 0.3, base)
    assert c.undetermined and not c.distinguishable, c


def test_seeds_only_a_third_variant_ran_are_not_left_out_of_a_pair():
    """Seeds 3 and 4 of `b` alone: `a` against the base was said to leave out 2 seeds
    "missing or not finite (diverged)" that neither ever ran. A seed that did run and
    diverged still counts."""
    rows = [("base", s, 1.0 + 0.01 * s) for s in range(3)]
    rows += [("a", s, 0.9 + 0.02 * s) for s in range(3)]
    rows += [("b", s, 1.1) for s in range(5)]
    table = pd.DataFrame(rows, columns=["variant", "seed", "val_loss"])
    out = compare_to_base(table, "val_loss", "base").set_index("variant")
    assert out.loc["a", "n_pairs"] == 3 and "Left out" not in out.loc["a", "verdict"]
    # b ran 3 and 4, the base did not: finished runs with no pair, not values "missing"
    assert "Left out" not in out.loc["b", "verdict"]
    assert (
        "Unpaired: 2 seed(s) with a run of only one of the two (b: 3, 4; base: none)"
        in (out.loc["b", "verdict"])
    )
    table.loc[(table["variant"] == "a") & (table["seed"] == 1), "val_loss"] = float("nan")
    out = compare_to_base(table, "val_loss", "base").set_index("variant")
    assert out.loc["a", "n_pairs"] == 2 and "Left out: 1 seed(s)" in out.loc["a", "verdict"]


def shift_with_p(p: float, scale: float = 1e-3) -> np.ndarray:
    """Per-seed differences (3 seeds, spread `scale`) whose paired t-test gives exactly `p`."""
    mean = stats.t.isf(p / 2, df=2) / math.sqrt(3)  # t = mean / (sd / sqrt(3)), sd = 1
    return scale * (mean + np.array([-1.0, 0.0, 1.0]))


def test_holm_adjusts_by_the_step_down_formula_over_the_tests_made():
    # sorted 0.005, 0.01, 0.03, 0.04 of m = 4 tests (NaN: no test, no member of the family):
    # 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    adjusted = holm([0.01, 0.04, 0.03, math.nan, 0.005])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3]) and adjusted[4] == pytest.approx(0.02)
    assert holm([0.3, 0.2]) == pytest.approx([0.4, 0.4]) and holm([]).size == 0  # monotone
    assert holm([0.6, 0.5, 0.4]).max() == 1.0  # capped


def test_five_equal_variants_are_called_distinguishable_at_a_family_wise_rate_of_alpha():
    """k = 5 variants equal to the base, 3 seeds: one comparison at a time is right 95% of the
    time, but some "yes" turned up in about 20% of such ablations. After Holm, at most 5%."""
    rng = np.random.default_rng(3)
    trials, any_raw, any_holm = 1000, 0, 0
    for _ in range(trials):
        seed_effect = rng.normal(0, 1.0, 3)
        base = seed_effect + rng.normal(0, 0.3, 3)
        cs = [paired_compare(seed_effect + rng.normal(0, 0.3, 3), base) for _ in range(5)]
        any_raw += any(c.distinguishable for c in cs)
        any_holm += bool((holm([c.p_value for c in cs]) < 0.05).any())
    assert any_raw / trials > 0.12  # the problem: many times alpha
    assert any_holm / trials < 0.07  # nominal family-wise rate 0.05


def test_holm_columns_stand_beside_the_per_comparison_ones():
    base = np.array([0.50, 0.52, 0.51])
    t = pd.DataFrame(
        {
            "variant": ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["one"],
            "seed": [0, 1, 2] * 3 + [0],
            "val_loss": [*base, *(base + shift_with_p(0.03)), *(base + shift_with_p(0.04)), 0.6],
        }
    )
    p = compare_to_base(t, "val_loss", "a").set_index("variant")
    assert p.loc["b", "p_value"] == pytest.approx(0.03) and p.loc["b", "distinguishable"]
    # two tests made ("one" has no test): 2 x 0.03 and max(0.06, 0.04)
    assert p["p_holm"].iloc[:2].tolist() == pytest.approx([0.06, 0.06])
    assert not p["distinguishable_holm"].iloc[:2].any()
    assert pd.isna(p.loc["one", "distinguishable_holm"]) and math.isnan(p.loc["one", "p_holm"])
    assert str(p["distinguishable_holm"].dtype) == "boolean"
    assert list(compare_to_base(t[t["variant"] == "a"], "val_loss", "a").columns)[-2:] == [
        "p_holm",
        "distinguishable_holm",
    ]


def test_a_p_value_just_below_alpha_never_reads_as_alpha():
    # 0.0497 to two digits is "0.05": "p = 0.05" beside "distinguishable" at alpha = 0.05
    base = [0.50, 0.52, 0.51]
    c = paired_compare(list(base + shift_with_p(0.0497)), base)
    assert c.distinguishable and c.p_value == pytest.approx(0.0497)
    text = verdict(c, "b", "a", "val_loss")
    assert "p = 0.0497," in text and "p = 0.05," not in text
    assert format_p(0.0497) == "0.0497" and format_p(0.05) == "0.05"
    assert format_p(0.0504) == "0.05" and format_p(0.0123) == "0.012"  # no change otherwise
    assert format_p(math.nan) == "–"


def test_relative_difference_is_a_fraction_of_the_base_mean():
    # the "(+x% of base)" of a verdict and the `relative` column: mean(v - b) / mean(b)
    base, variant = [2.0, 2.2, 1.8], [2.5, 2.6, 2.4]
    c = paired_compare(variant, base)
    assert c.relative == pytest.approx(0.5 / 2.0, rel=1e-12)
    assert "(+25.0% of a)" in verdict(c, "b", "a", "val_loss")


def test_a_small_distinguishable_difference_is_not_printed_as_zero_percent():
    # bf16 vs float32: a shift of 1e-4 on a loss of 0.3, consistent over seeds, is called
    # distinguishable; "(-0.0% of fp32)" beside "lower (better)" reads as no difference at all
    base = [0.30011, 0.31011, 0.30010]
    c = paired_compare([0.30001, 0.31002, 0.29999], base)
    assert c.distinguishable
    text = verdict(c, "bf16", "fp32", "val_loss")
    assert "-0.0%" not in text and "(-0.033% of fp32)" in text
    assert format_relative(-0.00033) == "-0.033%" and format_relative(0.0) == "+0.0%"
    assert format_relative(0.027) == "+2.7%" and format_relative(0.00096) == "+0.1%"
    assert format_relative(math.nan) == "–"


def test_a_planted_improvement_is_as_distinguishable_as_a_planted_regression():
    # the two-sided p of t and -t is the same: a lower (better) variant is no less significant
    base = np.array([0.50, 0.52, 0.51])
    worse = paired_compare(base + shift_with_p(0.01), base)
    better = paired_compare(base - shift_with_p(0.01), base)
    assert worse.p_value == pytest.approx(0.01) and better.p_value == pytest.approx(0.01)
    assert better.distinguishable and "lower (better)" in verdict(better, "b", "a", "val_loss")
