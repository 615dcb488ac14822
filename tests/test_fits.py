"""Scaling-law fitters: exact on noise-free laws, within their CIs on noisy ones, and an
unidentified fit is reported as such instead of as a number."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dit_bench.report import fits

LAW = {"E": 0.25, "A": 40.0, "a": 0.4, "B": 300.0, "b": 0.3}


def chinchilla_law(n, d, p=LAW):
    return p["E"] + p["A"] / n ** p["a"] + p["B"] / d ** p["b"]


def grid(n_sizes=5, n_data=6):
    n = np.repeat(np.geomspace(1e4, 1e6, n_sizes), n_data)
    d = np.tile(np.geomspace(1e5, 1e8, n_data), n_sizes)
    return n, d


def test_power_law_exact_from_noise_free_data():
    c = np.geomspace(1e10, 1e13, 8)
    f = fits.fit_power_law(c, 0.3 + 5.0 * c**-0.2)
    assert f.ok, f.detail
    assert f.params["alpha"] == pytest.approx(0.2, rel=1e-6)
    assert f.params["E"] == pytest.approx(0.3, rel=1e-6)
    assert f.params["A"] == pytest.approx(5.0, rel=1e-5)


def test_chinchilla_exact_from_noise_free_data():
    n, d = grid()
    f = fits.fit_chinchilla(n, d, chinchilla_law(n, d))
    assert f.ok, f.detail
    for k, v in LAW.items():
        assert f.params[k] == pytest.approx(v, rel=1e-5), k
    assert f.starts_at_best > 1  # the multi-start L-BFGS agrees


def test_isoflop_exact_from_parabolas():
    # losses exactly parabolic in log10 N with vertex N* = 1e3 * C^0.5
    rows = []
    for c in np.geomspace(1e8, 1e12, 5):
        v = np.log10(1e3 * c**0.5)
        for ln in v + np.linspace(-1, 1, 5):
            rows.append({"budget": c, "params": 10**ln, "val_loss": 1 + 0.3 * (ln - v) ** 2})
    iso = fits.fit_isoflop(pd.DataFrame(rows))
    assert iso.fit.ok and iso.vertices["valid"].all()
    assert iso.fit.params["a"] == pytest.approx(0.5, abs=1e-9)
    assert iso.fit.params["k"] == pytest.approx(1e3, rel=1e-6)


def _noisy_points(seed: int, sigma: float = 0.01) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n, d = grid(6, 6)
    loss = chinchilla_law(n, d) * np.exp(rng.normal(0, sigma, len(n)))
    # a "run" is one size (its points share a run, as a constant-lr run over budgets)
    return pd.DataFrame(
        {"run": [f"r{int(x)}" for x in n], "params": n, "tokens_seen": d, "val_loss": loss}
    )


def test_chinchilla_recovers_exponents_within_bootstrap_ci():
    pts = _noisy_points(0)
    full = fits.fit_chinchilla(pts["params"], pts["tokens_seen"], pts["val_loss"])
    assert full.ok, full.detail

    def refit(d):
        raw = full._raw
        return fits.fit_chinchilla(
            d["params"], d["tokens_seen"], d["val_loss"], starts=[raw, raw + 0.1]
        )

    ci, ok = fits.bootstrap(pts, refit, n_boot=40, seed=1)
    assert ok > 0.8
    for k in ("a", "b"):
        lo, hi = ci[k]
        assert lo <= LAW[k] <= hi, (k, lo, hi, full.params[k])


def test_power_law_recovers_alpha_within_bootstrap_ci():
    rng = np.random.default_rng(3)
    c = np.repeat(np.geomspace(1e10, 1e13, 8), 4)
    pts = pd.DataFrame(
        {"run": np.tile([f"r{i}" for i in range(4)], 8), "budget": c, "train_flops": c}
    )
    pts["val_loss"] = (0.3 + 5.0 * c**-0.2) * np.exp(rng.normal(0, 0.005, len(c)))
    fit = fits.fit_power_law(pts["train_flops"], pts["val_loss"])
    ci, ok = fits.bootstrap(
        pts, lambda d: fits.fit_power_law(d["train_flops"], d["val_loss"]), n_boot=100
    )
    assert fit.ok and ok > 0.8
    assert ci["alpha"][0] <= 0.2 <= ci["alpha"][1]
    two = pts[pts["run"].isin(["r0", "r1"])]  # every resample: the pair, or one run twice
    ci, ok = fits.bootstrap(
        two, lambda d: fits.fit_power_law(d["train_flops"], d["val_loss"]), n_boot=20
    )
    assert ci == {} and math.isnan(ok)  # no interval, rather than a zero-width one


@pytest.mark.slow  # default run under 10 minutes (13 s on the 2-core CI machine)
def test_a_bootstrap_with_mostly_failed_refits_gives_no_interval():
    """The refits that fail are not random (L(C): those that lost a frontier run), so the ok
    ones alone can collapse onto the estimate: under MIN_BOOTSTRAP_OK of them ok, no interval."""
    c = np.geomspace(1e10, 1e13, 8)
    pts = pd.DataFrame(
        {"run": np.repeat(["r0", "r1", "r2"], 8), "train_flops": np.tile(c, 3)}
    ).assign(val_loss=lambda d: 0.3 + 5.0 * d["train_flops"] ** -0.2)

    def refit(need):  # ok only when run r0 was drawn at least `need` times
        def fit(d):
            if d.loc[d["run"].str.startswith("r0#"), "run"].nunique() < need:
                return fits.Fit("x", "", {}, "insufficient data", "", 0)
            return fits.fit_power_law(d["train_flops"], d["val_loss"])

        return fit

    # P(r0 at least twice in 3 draws) = 7/27; at least once: 19/27
    ci, ok = fits.bootstrap(pts, refit(2), n_boot=200, seed=0)
    assert ci == {} and 0.15 < ok < fits.MIN_BOOTSTRAP_OK
    ci, ok = fits.bootstrap(pts, refit(1), n_boot=200, seed=0)
    assert ok > fits.MIN_BOOTSTRAP_OK and ci["alpha"] == pytest.approx((0.2, 0.2))


def test_badly_conditioned_fit_is_reported_not_printed():
    n, d = grid()
    # every point at (almost) one model size: A / N^a cannot be told from E
    n1 = np.full_like(n, 1e5) * (1 + 1e-9 * np.arange(len(n)))
    f = fits.fit_chinchilla(n1, d, chinchilla_law(n1, d))
    assert f.status == "ill-conditioned", f
    assert f.value("a") is None  # never quoted
    # a pure power law with no floor, sampled where E is not identified from A C^-alpha
    c = np.geomspace(1e10, 1.1e10, 6)
    g = fits.fit_power_law(c, 2.0 * (c / 1e10) ** -0.3 + 0.5)
    assert g.status != "ok" and g.value("alpha") is None


def test_too_little_data_is_insufficient():
    assert fits.fit_power_law([1, 2, 3], [3, 2, 1]).status == "insufficient data"
    n = np.full(10, 1e5)
    assert fits.fit_chinchilla(n, np.geomspace(1, 10, 10), np.ones(10)).status == (
        "insufficient data"
    )


def test_pure_power_law_reports_e_on_its_bound_and_the_exact_exponent():
    # E = 0: the floor sits on its lower bound, which is an estimate, not an unidentified fit
    for c, a, alpha in (
        (np.geomspace(1e10, 1e13, 8), 5.0, 0.2),
        (np.geomspace(1e15, 1e19, 9), 30.0, 0.08),
    ):
        f = fits.fit_power_law(c, a * c**-alpha)
        assert f.status == fits.OK_E0 and f.ok, f
        assert "lower bound" in f.detail
        assert f.params["E"] == 0.0
        assert f.value("alpha") == pytest.approx(alpha, rel=1e-6)
        assert f.params["A"] == pytest.approx(a, rel=1e-6)
        assert f.cond < fits.COND_LIMIT
        assert f.predict(c) == pytest.approx(a * c**-alpha, rel=1e-9)


def test_power_law_without_floor_bootstraps_alpha():
    rng = np.random.default_rng(2)
    c = np.repeat(np.geomspace(1e10, 1e13, 8), 4)
    pts = pd.DataFrame(
        {"run": np.tile([f"r{i}" for i in range(4)], 8), "budget": c, "train_flops": c}
    )
    pts["val_loss"] = 5.0 * c**-0.2 * np.exp(rng.normal(0, 0.005, len(c)))
    fit = fits.fit_power_law(pts["train_flops"], pts["val_loss"])
    assert fit.status == fits.OK_E0, fit
    ci, ok = fits.bootstrap(
        pts, lambda d: fits.fit_power_law(d["train_flops"], d["val_loss"]), n_boot=100
    )
    assert ok > 0.8
    assert ci["alpha"][0] <= 0.2 <= ci["alpha"][1]
    assert ci["E"][0] == 0.0


def test_power_law_with_e_on_its_bound_still_checks_the_exponent():
    # E = 0 is fine, but alpha = 6 is past its bound 5: the reduced fit is judged, not waved on
    c = np.geomspace(10, 1e3, 8)
    f = fits.fit_power_law(c, 5.0 * (c / 10) ** -6.0)
    assert f.status == "ill-conditioned" and f.value("alpha") is None
    assert "E = 0 on its lower bound" in f.detail and "alpha = 6" in f.detail


def test_a_non_finite_loss_is_left_out_of_every_fit():
    # a diverged run's NaN (or inf) loss is no point of the law: each fit equals the fit
    # without it, where one NaN made every residual NaN (LinAlgError in the Jacobian's SVD)
    c = np.geomspace(1e10, 1e13, 8)
    loss = 0.3 + 5.0 * c**-0.2
    clean = fits.fit_power_law(c, loss)
    dirty = fits.fit_power_law(np.append(c, [2e11, 3e11]), np.append(loss, [np.nan, np.inf]))
    assert dirty.ok and dirty.n_points == 8
    assert dirty.params == pytest.approx(clean.params, rel=1e-9)

    n, d = grid()
    loss = chinchilla_law(n, d)
    clean = fits.fit_chinchilla(n, d, loss)
    dirty = fits.fit_chinchilla(np.append(n, 1e5), np.append(d, 1e6), np.append(loss, np.nan))
    assert dirty.ok and dirty.n_points == len(n)
    assert dirty.params == pytest.approx(clean.params, rel=1e-6)

    rows = []
    for c in np.geomspace(1e8, 1e12, 5):
        v = np.log10(1e3 * c**0.5)
        for ln in v + np.linspace(-1, 1, 5):
            rows.append({"budget": c, "params": 10**ln, "val_loss": 1 + 0.3 * (ln - v) ** 2})
    rows.append({"budget": 1e8, "params": 1e7, "val_loss": np.nan})
    iso = fits.fit_isoflop(pd.DataFrame(rows))
    assert iso.fit.ok and iso.vertices["valid"].all()
    assert iso.fit.params["a"] == pytest.approx(0.5, abs=1e-9)
    env = fits.envelope(pd.DataFrame(rows).assign(train_flops=lambda p: p["budget"], run="r"))
    assert np.isfinite(env["val_loss"]).all()


def test_chinchilla_stopped_by_its_iteration_limits_is_not_converged(monkeypatch):
    n, d = grid()
    loss = chinchilla_law(n, d)
    minimize, least_squares = fits.optimize.minimize, fits.optimize.least_squares

    def one_iteration(*args, **kwargs):
        return minimize(*args, **{**kwargs, "options": {**kwargs["options"], "maxiter": 1}})

    monkeypatch.setattr(fits.optimize, "minimize", one_iteration)
    monkeypatch.setattr(
        fits.optimize, "least_squares", lambda *a, **k: least_squares(*a, **{**k, "max_nfev": 1})
    )
    f = fits.fit_chinchilla(n, d, loss)
    assert f.status == "not converged" and not f.ok, (f.status, f.detail)
    monkeypatch.undo()
    assert fits.fit_chinchilla(n, d, loss).ok  # the same data, allowed to finish


def test_bootstrap_resamples_whole_runs_never_single_points():
    """A run's points share its errors (one model, one training trajectory), so they are one
    draw of the sweep, not several: on synthetic sweeps with a per-run offset a bootstrap over
    points gives the exponents' intervals a fraction of the width they need. Each resample
    must be whole runs, as many as the sweep has, a run drawn twice counting as two."""
    c = np.geomspace(1e10, 1e13, 8)
    sizes = {"r0": 4, "r1": 6, "r2": 8, "r3": 5}  # runs of different lengths (pruned early)
    pts = pd.concat(
        [
            pd.DataFrame({"run": r, "train_flops": c[:k], "val_loss": 1.0 + i + c[:k] * 1e-14})
            for i, (r, k) in enumerate(sizes.items())
        ],
        ignore_index=True,
    )
    seen = []

    def refit(d):
        seen.append(d.copy())
        return fits.Fit("x", "", {}, "insufficient data", "", 0)

    fits.bootstrap(pts, refit, n_boot=30, seed=0)
    assert len(seen) == 30
    for d in seen:
        labels = d["run"].unique()
        assert len(labels) == len(sizes)  # as many draws as runs
        for label, g in d.groupby("run"):
            run = label.split("#")[0]
            whole = pts[pts["run"] == run]
            np.testing.assert_array_equal(g["val_loss"].to_numpy(), whole["val_loss"].to_numpy())


def test_bootstrap_interval_is_the_2_5_and_97_5_percentiles_of_every_converged_refit():
    # a refit whose parameter is the resample's mean loss: the CI must be the 2.5/97.5%
    # percentiles of exactly the values the converged refits returned (ok or not), never
    # those of a refit that did not converge, nor a NaN
    pts = pd.DataFrame(
        {"run": np.repeat([f"r{i}" for i in range(6)], 2), "val_loss": np.arange(12.0) ** 1.5}
    )
    kept: dict[str, list[float]] = {"m": [], "sometimes_nan": []}
    calls = []

    def refit(d):
        calls.append(len(d))
        i, m = len(calls), float(d["val_loss"].mean())
        status = "not converged" if i % 7 == 0 else "ill-conditioned" if i % 3 == 0 else "ok"
        nan = math.nan if i % 5 == 0 else m
        if status != "not converged":
            kept["m"].append(m)
            if i % 5:
                kept["sometimes_nan"].append(nan)
        return fits.Fit("x", "", {"m": m, "sometimes_nan": nan}, status, "", len(d))

    ci, ok = fits.bootstrap(pts, refit, n_boot=300, seed=4)
    assert calls == [12] * 300  # six whole runs of two points per resample
    assert ok == pytest.approx(sum(1 for i in range(1, 301) if i % 7 and i % 3) / 300)
    for k, v in kept.items():
        assert ci[k] == pytest.approx(tuple(np.quantile(v, [0.025, 0.975])), rel=1e-12), k
    assert ci["m"][0] < ci["m"][1]


def test_a_concave_isoflop_profile_has_no_minimum():
    # loss = 1 - 0.5 (log10 N - 5)^2: its vertex (log10 N = 5, inside the sizes) is a maximum
    logn = np.linspace(4, 6, 5)
    out = fits._parabola(logn, 1 - 0.5 * (logn - 5) ** 2)
    assert out["c2"] == pytest.approx(-0.5)
    assert not out["valid"] and out["why"] == "not convex"
    flat = fits._parabola(logn, 1 - 1e-3 * (logn - 5) ** 2)  # barely concave: still no minimum
    assert not flat["valid"] and flat["why"] == "not convex"


def test_an_isoflop_vertex_outside_the_sizes_says_on_which_side():
    # loss = (log10 N - 3)^2 over sizes 1e4..1e6: the vertex, N = 1e3, lies below them all
    logn = np.linspace(4, 6, 5)
    below = fits._parabola(logn, (logn - 3) ** 2)
    assert below["log10_n_opt"] == pytest.approx(3)
    assert not below["valid"] and below["why"] == "minimum below the smallest size tried (1e+04)"
    above = fits._parabola(logn, (logn - 7) ** 2)
    assert not above["valid"] and above["why"] == "minimum above the largest size tried (1e+06)"


def test_chinchilla_objective_is_the_huber_loss_of_the_log_residuals():
    # Hoffmann et al.: sum of Huber_delta(log L_hat - log L), delta = 1e-3, quadratic up to
    # delta and linear past it; a 20% outlier puts some residuals on each side
    n, d = grid()
    loss = chinchilla_law(n, d) * np.exp(np.random.default_rng(5).normal(0, 2e-3, len(n)))
    loss[3] *= 1.2
    f = fits.fit_chinchilla(n, d, loss)
    r = np.log(f.predict(n, d)) - np.log(loss)
    delta = 1e-3
    assert fits.HUBER_DELTA == delta
    assert (np.abs(r) > delta).any() and (np.abs(r) < delta).any()
    huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * np.abs(r) - 0.5 * delta**2)
    assert f.objective == pytest.approx(huber.sum(), rel=1e-6)


def test_envelope_leaves_out_a_budget_with_no_finite_loss():
    # every run diverged at 2e10: that budget has no frontier point (idxmin has no answer)
    pts = pd.DataFrame(
        {
            "run": ["r0", "r1", "r0", "r1"],
            "budget": [1e10, 1e10, 2e10, 2e10],
            "train_flops": [1e10, 1e10, 2e10, 2e10],
            "val_loss": [0.5, 0.4, np.nan, np.inf],
        }
    )
    env = fits.envelope(pts)
    assert env.to_dict("records") == [
        {"budget": 1e10, "train_flops": 1e10, "val_loss": 0.4, "run": "r1"}
    ]


def test_an_isoflop_profile_needs_three_sizes_and_the_fit_three_budgets():
    # two sizes determine no parabola (polyfit returns one of infinitely many, and a vertex
    # anywhere); two vertices determine a line exactly, with nothing left to check it
    two = fits._parabola(np.array([4.0, 5.0]), np.array([1.2, 1.0]))
    assert not two["valid"] and two["why"] == "fewer than 3 sizes"
    rows = []
    for c in (1e8, 1e10):
        v = np.log10(1e3 * c**0.5)
        for ln in v + np.linspace(-1, 1, 5):
            rows.append({"budget": c, "params": 10**ln, "val_loss": 1 + 0.3 * (ln - v) ** 2})
    iso = fits.fit_isoflop(pd.DataFrame(rows))
    assert iso.vertices["valid"].all()
    assert iso.fit.status == "insufficient data" and iso.fit.value("a") is None


def test_a_small_floor_is_fitted_not_rounded_to_zero():
    # E is 0.7% of the lowest loss: small, but identified by noise-free data over seven
    # decades, so it is an estimate of E, not "E = 0 on its lower bound"
    c = np.geomspace(1e6, 1e13, 12)
    loss = 1e-4 + 5.0 * c**-0.2
    assert 1e-4 / loss.min() < 0.01
    f = fits.fit_power_law(c, loss)
    assert f.status == "ok", f
    assert f.params["E"] == pytest.approx(1e-4, rel=1e-4)
    assert f.params["alpha"] == pytest.approx(0.2, rel=1e-6)


def test_a_zero_loss_or_size_is_left_out_like_a_non_finite_one():
    # the fits take logs: log 0 = -inf would make every residual of the fit infinite
    c = np.geomspace(1e10, 1e13, 8)
    loss = 0.3 + 5.0 * c**-0.2
    clean = fits.fit_power_law(c, loss)
    dirty = fits.fit_power_law(np.append(c, [2e11, 0.0]), np.append(loss, [0.0, 0.5]))
    assert dirty.ok and dirty.n_points == 8
    assert dirty.params == pytest.approx(clean.params, rel=1e-9)


def test_each_fits_predict_is_its_formula_at_the_reported_parameters():
    # held-out checks and plots read predict(), the tables read params: they must agree
    c = np.geomspace(1e10, 1e13, 8)
    f = fits.fit_power_law(c, 0.3 + 5.0 * c**-0.2)
    p = f.params
    assert f.predict(3e11) == pytest.approx(p["E"] + p["A"] * 3e11 ** -p["alpha"], rel=1e-12)
    n, d = grid()
    g = fits.fit_chinchilla(n, d, chinchilla_law(n, d))
    assert g.predict(3e5, 2e6) == pytest.approx(chinchilla_law(3e5, 2e6, g.params), rel=1e-12)
    assert g.predict(3e5, 2e6) == pytest.approx(chinchilla_law(3e5, 2e6), rel=1e-6)
    rows = []
    for b in np.geomspace(1e8, 1e12, 5):
        v = np.log10(1e3 * b**0.5)
        for ln in v + np.linspace(-1, 1, 5):
            rows.append({"budget": b, "params": 10**ln, "val_loss": 1 + 0.3 * (ln - v) ** 2})
    iso = fits.fit_isoflop(pd.DataFrame(rows)).fit
    assert iso.predict(1e13) == pytest.approx(1e3 * 1e13**0.5, rel=1e-6)
