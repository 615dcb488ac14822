"""Scaling-law fits: pure functions of arrays and DataFrames (numpy, scipy, pandas only).

- `fit_power_law`: L(C) = E + A (C / C0)^-alpha, least squares on log-loss, several starts.
- `fit_chinchilla`: L(N, D) = E + A / N^a + B / D^b, Huber loss (delta 1e-3) on log-loss over a
  log-sum-exp parameterisation, multi-start L-BFGS from a grid of initialisations, as Hoffmann et
  al. 2022 (Chinchilla, approach 3, appendix D.2), then polished with a trust-region solve of the
  same objective.
- `fit_isoflop`: for each compute budget a parabola in log10(N); its vertex is the compute-optimal
  size N*(C), and N* = k C^a is fitted over budgets (Chinchilla approach 2).

Every fit reports a `status` from a convergence check: `ok`, `ill-conditioned` (parameters not
identified by the data: a near-singular Jacobian, starts that reach the same loss with different
parameters, or a parameter on its bound), `not converged`, or `insufficient data`. `fit_power_law`
has one more: `ok (E=0)`, the floor E on its lower bound 0 and the rest fitted as a pure power
law. Only an ok fit's numbers (`Fit.ok`: `ok` or `ok (E=0)`) are meant to be quoted; reports
print the status instead of a number otherwise.
`bootstrap` resamples whole runs (a run's points together) and refits, for percentile CIs.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import optimize
from threadpoolctl import threadpool_limits

# Tiny problems: a multi-threaded BLAS only spins (100x slower on a busy machine), so every fit
# runs with one BLAS thread.
COND_LIMIT = 1e4  # condition number of the relative Jacobian above which a fit is unidentified
AGREE_RTOL = 1e-2  # starts within this relative loss of the best must agree on the parameters
OK_E0 = "ok (E=0)"  # fit_power_law: E on its lower bound 0, alpha and A from the pure power law
OK_STATUSES = ("ok", OK_E0)


@dataclass(frozen=True)
class Fit:
    name: str
    formula: str
    params: dict[str, float]
    status: str  # ok | ok (E=0) | ill-conditioned | not converged | insufficient data
    detail: str
    n_points: int
    objective: float = math.nan
    cond: float = math.nan
    starts: int = 0
    starts_at_best: int = 0
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    boot_ok: float = math.nan  # fraction of bootstrap refits that were ok
    ci_why: str = ""  # why no bootstrap was run, where the design rules one out
    predict: Callable | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

    def value(self, key: str) -> float | None:
        """The parameter, or None when the fit is not ok (never print an unidentified number)."""
        return self.params.get(key) if self.ok else None


def _one_thread(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with threadpool_limits(limits=1):
            return fn(*args, **kwargs)

    return wrapped


def _insufficient(name: str, formula: str, n: int, why: str) -> Fit:
    return Fit(name, formula, {}, "insufficient data", why, n)


def _usable(*columns: np.ndarray) -> np.ndarray:
    """The points every fit can take: finite and positive in every column (the fits take logs).
    A diverged run's NaN loss is no point of a scaling law, and one of them turns every
    residual, and so the whole fit, into NaN."""
    keep = np.ones(len(columns[0]), bool)
    for col in columns:
        with np.errstate(invalid="ignore"):
            keep &= np.isfinite(col) & (col > 0)
    return keep


def _cond(jac: np.ndarray) -> float:
    s = np.linalg.svd(jac, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def _judge(
    cond: float, agree: bool, converged: bool, at_bound: list[str], detail: str
) -> tuple[str, str]:
    if not converged:
        return "not converged", detail or "optimiser did not report convergence"
    problems = []
    if not math.isfinite(cond) or cond > COND_LIMIT:
        problems.append(f"Jacobian condition number {cond:.2g} > {COND_LIMIT:.0g}")
    if not agree:
        problems.append("starts reaching the best loss disagree on the parameters")
    if at_bound:
        problems.append(f"on a bound: {', '.join(at_bound)}")
    if problems:
        return "ill-conditioned", "; ".join(problems)
    return "ok", detail


# -- L(C) = E + A (C/C0)^-alpha -------------------------------------------------------------------
POWER_FORMULA = "L(C) = E + A * C^-alpha"


@_one_thread
def fit_power_law(c: Sequence[float], loss: Sequence[float], name: str = "L(C)") -> Fit:
    """Least squares on log L of L = E + A (C/C0)^-alpha, C0 the geometric mean of C (for
    conditioning); the reported A is in units of C: A_C = A C0^alpha. E is bounded to
    [0, min L), alpha to [0, 5].

    When the best fit puts E on its lower bound (E < 1e-6 min L, zero up to the optimiser's
    tolerance), E is reported as exactly 0 and A, alpha come from the reduced model log L =
    log A - alpha log C, a linear least-squares fit, judged on its own; its status is `ok (E=0)`
    when that fit passes the checks. The three-parameter Jacobian cannot judge it: its E column
    vanishes with E, so a pure power law would always look ill-conditioned."""
    c, loss = np.asarray(c, float), np.asarray(loss, float)
    keep = _usable(c, loss)
    c, loss = c[keep], loss[keep]
    n = len(c)
    if n < 4 or len(np.unique(c)) < 4:
        return _insufficient(name, POWER_FORMULA, n, f"{len(np.unique(c))} distinct C (need 4)")
    c0 = float(np.exp(np.mean(np.log(c))))
    x = np.log(c / c0)
    y = np.log(loss)
    lmin = float(loss.min())

    # parameters p = (E / lmin, log A, alpha): all of order one
    def resid(p):
        return np.log(p[0] * lmin + np.exp(p[1] - p[2] * x)) - y

    lo, hi = [0.0, -30.0, 0.0], [1.0 - 1e-9, 30.0, 5.0]
    results = []
    for e0, a0 in itertools.product((0.0, 0.5, 0.9), (0.1, 0.5, 1.5)):
        la0 = math.log(max(float(np.mean(loss)) - e0 * lmin, 1e-12))
        try:
            r = optimize.least_squares(
                resid,
                [e0, la0, a0],
                bounds=(lo, hi),
                xtol=1e-15,
                ftol=1e-15,
                gtol=1e-15,
                max_nfev=5000,
            )
        except ValueError:
            continue
        results.append(r)
    if not results:
        return Fit(name, POWER_FORMULA, {}, "not converged", "no start finished", n)
    best = min(results, key=lambda r: r.cost)
    near = [r for r in results if r.cost <= best.cost * (1 + AGREE_RTOL) + 1e-20]
    spread = np.ptp(np.array([r.x for r in near]), axis=0) if len(near) > 1 else np.zeros(3)
    agree = bool(np.all(spread <= 1e-3 * (1 + np.abs(best.x))))
    p = best.x
    # Jacobian in relative parameters (d/dlog E, d/dlog A, d/dalpha): scale-free sensitivities
    e_val = p[0] * lmin
    jac = best.jac * np.array([p[0] if p[0] > 0 else 1.0, 1.0, 1.0])
    cond = _cond(jac)
    objective = float(2 * best.cost)
    if p[0] <= 1e-6:
        # E = 0 is an estimate (the data want no floor), not a failure: E drops out, and log L
        # is linear in (log A, alpha), solved exactly; only that fit's own checks apply
        coef, _, rank, _, _ = np.polyfit(x, y, 1, full=True)
        alpha = float(-coef[0])
        p = np.array([0.0, float(coef[1]), alpha])
        e_val = 0.0
        cond = _cond(np.stack([np.ones_like(x), -x], axis=1))
        objective = float(np.sum((coef[1] - alpha * x - y) ** 2))
        # the reduced fit is unconstrained: alpha past (0, 5) gets the full fit's bound verdict
        at_bound = [] if 1e-9 < alpha < 5 - 1e-9 else [f"alpha = {alpha:.3g}, outside (0, 5)"]
        status, detail = _judge(cond, True, rank == 2, at_bound, "")
        if status == "ok":
            status, detail = OK_E0, "E = 0 on its lower bound: pure power law, log-log fit"
        else:
            detail = f"E = 0 on its lower bound; pure power law: {detail}"
    else:
        at_bound = []
        if p[0] >= 1 - 1e-6:
            at_bound.append("E = min(L)")
        if p[2] <= 1e-9 or p[2] >= 5 - 1e-9:
            at_bound.append(f"alpha = {p[2]:.3g}")
        status, detail = _judge(cond, agree, best.success, at_bound, best.message)
    a_c = math.exp(p[1]) * c0 ** p[2]
    params = {"E": e_val, "A": a_c, "alpha": float(p[2])}

    def predict(cc, E=e_val, A=a_c, alpha=float(p[2])):
        return E + A * np.asarray(cc, float) ** -alpha

    return Fit(
        name,
        POWER_FORMULA,
        params,
        status,
        detail,
        n,
        objective,
        cond,
        len(results),
        len(near),
        predict=predict,
    )


# -- L(N, D) = E + A/N^a + B/D^b ------------------------------------------------------------------
CHINCHILLA_FORMULA = "L(N, D) = E + A / N^a + B / D^b"
HUBER_DELTA = 1e-3


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@_one_thread
def fit_chinchilla(
    n_params: Sequence[float],
    data: Sequence[float],
    loss: Sequence[float],
    name: str = "L(N, D)",
    *,
    starts: Sequence[np.ndarray] | None = None,
    delta: float = HUBER_DELTA,
) -> Fit:
    """Hoffmann et al.'s fit: minimise sum Huber_delta(LSE(a' - a log N, b' - b log D, e) - log L)
    with L-BFGS from a grid of starts (or `starts`), N and D normalised by their geometric means;
    then polish the best with least_squares(loss="huber") on the same residuals. Reported
    A = exp(a') N0^a, B = exp(b') D0^b, E = exp(e)."""
    nn, dd, ll = (np.asarray(v, float) for v in (n_params, data, loss))
    keep = _usable(nn, dd, ll)
    nn, dd, ll = nn[keep], dd[keep], ll[keep]
    n = len(ll)
    if n < 8 or len(np.unique(nn)) < 2 or len(np.unique(dd)) < 2:
        return _insufficient(
            name,
            CHINCHILLA_FORMULA,
            n,
            f"{n} points, {len(np.unique(nn))} distinct N, {len(np.unique(dd))} distinct D "
            "(need 8 points, 2 of each)",
        )
    n0, d0 = float(np.exp(np.mean(np.log(nn)))), float(np.exp(np.mean(np.log(dd))))
    xn, xd, y = np.log(nn / n0), np.log(dd / d0), np.log(ll)

    def lse(p):  # log(exp(t0) + exp(t1) + exp(t2)) and the softmax weights, stably
        t0, t1 = p[0] - p[3] * xn, p[1] - p[4] * xd
        m = np.maximum(np.maximum(t0, t1), p[2])
        e0, e1, e2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(p[2] - m)
        s = e0 + e1 + e2
        return m + np.log(s), (e0 / s, e1 / s, e2 / s)

    def resid(p):  # p = (a', b', e, a, b)
        return lse(p)[0] - y

    def objective(p):
        val, (w0, w1, w2) = lse(p)
        r = val - y
        g_r = np.clip(r, -delta, delta)  # Huber'
        grad = np.array(
            [
                np.dot(g_r, w0),
                np.dot(g_r, w1),
                np.dot(g_r, w2),
                -np.dot(g_r * w0, xn),
                -np.dot(g_r * w1, xd),
            ]
        )
        return float(np.sum(_huber(r, delta))), grad

    lmin = float(ll.min())
    bounds = [(-20, 20), (-20, 20), (-20, math.log(lmin)), (0.0, 3.0), (0.0, 3.0)]
    if starts is None:
        y_span = math.log(max(float(ll.max()) - 0.5 * lmin, 1e-9))
        starts = [
            np.array([a_, b_, e_, al, be])
            for e_ in (math.log(0.5 * lmin), math.log(0.9 * lmin))
            for a_, b_ in itertools.product((y_span - 2, y_span), repeat=2)
            for al, be in itertools.product((0.2, 0.6, 1.2), repeat=2)
        ]
    runs = []
    for s in starts:
        s = np.clip(s, [b[0] for b in bounds], [b[1] - 1e-9 for b in bounds])
        r = optimize.minimize(
            objective,
            s,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12},
        )
        runs.append(r)
    best = min(runs, key=lambda r: r.fun)
    tol = best.fun * AGREE_RTOL + 1e-14
    near = [r for r in runs if r.fun <= best.fun + tol]
    # polish: the same Huber objective by trust-region least squares (tight, and gives J)
    lo, hi = [b[0] for b in bounds], [b[1] for b in bounds]
    polished = False  # the polish converged and improved on (or matched) the best start
    try:
        pol = optimize.least_squares(
            resid,
            np.clip(best.x, lo, np.array(hi) - 1e-12),
            bounds=(lo, hi),
            loss="huber",
            f_scale=delta,
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
            max_nfev=20000,
        )
        improved = objective(pol.x)[0] <= best.fun + 1e-18
        p = pol.x if improved else best.x
        polished = bool(pol.success and improved)
        jac = pol.jac
    except ValueError:
        p, jac = best.x, None
    # Converged: L-BFGS said so, or the polish did from its point and did no worse. (Not
    # "objective(p) <= best.fun": p is chosen to satisfy that, so it was always true.)
    converged = bool(best.success or polished)
    if jac is None:
        eps = 1e-7
        jac = np.stack([(resid(p + eps * e) - resid(p)) / eps for e in np.eye(5)], axis=1)
    cond = _cond(jac)
    spread = np.ptp(np.array([r.x for r in near]), axis=0) if len(near) > 1 else np.zeros(5)
    # exponents and the irreducible loss must agree; a' and b' trade off with them in log units
    agree = bool(np.all(spread[[2, 3, 4]] <= 1e-2 * (1 + np.abs(p[[2, 3, 4]]))))
    at_bound = [
        k
        for k, v, (lo_, hi_) in zip(("A", "B", "E", "a", "b"), p, bounds, strict=True)
        if k in ("a", "b", "E") and (v <= lo_ + 1e-6 or v >= hi_ - 1e-6)
    ]
    status, detail = _judge(cond, agree, converged, at_bound, str(best.message))
    E, a, b = math.exp(p[2]), float(p[3]), float(p[4])
    A, B = math.exp(p[0]) * n0**a, math.exp(p[1]) * d0**b
    params = {"E": E, "A": A, "a": a, "B": B, "b": b}

    def predict(N, D, E=E, A=A, a=a, B=B, b=b):
        return E + A / np.asarray(N, float) ** a + B / np.asarray(D, float) ** b

    fit = Fit(
        name,
        CHINCHILLA_FORMULA,
        params,
        status,
        detail,
        n,
        objective(p)[0],
        cond,
        len(runs),
        len(near),
        predict=predict,
    )
    object.__setattr__(fit, "_raw", p)  # warm start for bootstrap refits
    return fit


# -- IsoFLOP profiles ------------------------------------------------------------------------------
@dataclass(frozen=True)
class IsoFlop:
    fit: Fit  # the N*(C) power law: params k, a
    vertices: pd.DataFrame  # budget, n_points, c0, c1, c2, log10_n_opt, n_opt, valid, why


def _parabola(logn: np.ndarray, loss: np.ndarray) -> dict:
    out = {"n_points": len(logn), "c2": np.nan, "c1": np.nan, "c0": np.nan}
    if len(np.unique(logn)) < 3:
        return {**out, "valid": False, "why": "fewer than 3 sizes", "log10_n_opt": np.nan}
    c2, c1, c0 = np.polyfit(logn, loss, 2)
    out.update(c2=c2, c1=c1, c0=c0)
    if c2 <= 0:
        return {**out, "valid": False, "why": "not convex", "log10_n_opt": np.nan}
    v = -c1 / (2 * c2)
    if not logn.min() <= v <= logn.max():
        # where it lies, not the extrapolated size itself: a parabola's vertex far outside
        # the sizes (6 parameters, say) is no estimate of anything
        if v < logn.min():
            why = f"minimum below the smallest size tried ({10 ** logn.min():.3g})"
        else:
            why = f"minimum above the largest size tried ({10 ** logn.max():.3g})"
        return {**out, "valid": False, "why": why, "log10_n_opt": v}
    return {**out, "valid": True, "why": "", "log10_n_opt": v}


@_one_thread
def fit_isoflop(points: pd.DataFrame, name: str = "N*(C)") -> IsoFlop:
    """`points`: columns budget, params, val_loss (one row per run and budget); points with a
    non-finite or non-positive loss or size are left out."""
    points = points[_usable(points["params"].to_numpy(float), points["val_loss"].to_numpy(float))]
    rows = []
    for budget, g in points.groupby("budget"):
        r = _parabola(np.log10(g["params"].to_numpy(float)), g["val_loss"].to_numpy(float))
        rows.append({"budget": budget, **r})
    # the columns even without rows (no usable point: e.g. the held-out fit of one budget)
    columns = ["budget", "n_points", "c2", "c1", "c0", "valid", "why", "log10_n_opt"]
    vert = pd.DataFrame(rows, columns=columns).astype({"valid": bool})
    vert["n_opt"] = 10 ** vert["log10_n_opt"]
    ok = vert[vert["valid"]]
    formula = "N*(C) = k * C^a"
    if len(ok) < 3:
        fit = _insufficient(
            name, formula, len(ok), f"{len(ok)} budgets with an interior minimum (need 3)"
        )
        return IsoFlop(fit, vert)
    x, y = np.log(ok["budget"].to_numpy(float)), np.log(ok["n_opt"].to_numpy(float))
    X = np.stack([np.ones_like(x), x], axis=1)
    coef, res, rank, sv = np.linalg.lstsq(X, y, rcond=None)
    Xs = np.stack([np.ones_like(x), x - x.mean()], axis=1)
    cond = _cond(Xs)
    status, detail = _judge(cond, True, rank == 2, [], f"{len(ok)} of {len(vert)} budgets")
    k, a = float(math.exp(coef[0])), float(coef[1])

    def predict(cc, k=k, a=a):
        return k * np.asarray(cc, float) ** a

    fit = Fit(
        name,
        formula,
        {"k": k, "a": a},
        status,
        detail,
        len(ok),
        float(np.sum(res)) if len(res) else 0.0,
        cond,
        1,
        1,
        predict=predict,
    )
    return IsoFlop(fit, vert)


# -- envelope, bootstrap, held-out -----------------------------------------------------------------
def envelope(points: pd.DataFrame) -> pd.DataFrame:
    """Lowest loss at each budget over runs (the loss-compute frontier, Chinchilla approach 1):
    columns budget, train_flops (of the best run at that budget), val_loss, run. Non-finite
    losses are left out (idxmin of a budget with no finite loss has no answer)."""
    points = points[np.isfinite(points["val_loss"].to_numpy(float))]
    idx = points.groupby("budget")["val_loss"].idxmin()
    return points.loc[idx, ["budget", "train_flops", "val_loss", "run"]].reset_index(drop=True)


MIN_BOOTSTRAP_RUNS = 3
# Fewer ok refits than this share: no interval. The failed ones are not random: for L(C) they
# are the resamples that lost a frontier run, so the ok ones share the estimate's envelope and
# their interval would collapse onto it and look certain.
MIN_BOOTSTRAP_OK = 0.5


@_one_thread
def bootstrap(
    points: pd.DataFrame,
    refit: Callable[[pd.DataFrame], Fit],
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[dict[str, tuple[float, float]], float]:
    """Percentile CIs of every parameter from refits on runs resampled with replacement.
    Returns (ci, fraction of refits that were ok). Every refit that converged enters the CIs,
    ok or not: those failing the checks are not a random share (L(N, D): E on its bound 0
    with a small exponent), and leaving them out cut one tail off, so that on synthetic
    sweeps of a known law the interval of `a` missed it in 3 of 7 draws. There are none
    (ci {}) when fewer than MIN_BOOTSTRAP_OK of the refits were ok."""
    rng = np.random.default_rng(seed)
    runs = points["run"].unique()
    if len(runs) < MIN_BOOTSTRAP_RUNS:
        # two runs resample to the pair itself or one run twice (no fit): the interval would
        # collapse onto the estimate and look certain. No interval instead.
        return {}, math.nan
    groups = {r: g for r, g in points.groupby("run")}
    samples: dict[str, list[float]] = {}
    ok = 0
    for _ in range(n_boot):
        pick = rng.choice(runs, size=len(runs), replace=True)
        parts = []
        for i, r in enumerate(pick):
            g = groups[r].copy()
            g["run"] = f"{r}#{i}"  # a run drawn twice counts as two runs
            parts.append(g)
        fit = refit(pd.concat(parts, ignore_index=True))
        ok += fit.ok
        # every converged refit counts, ok or not: the ones that fail the checks are not a
        # random subset (L(N, D): those with E on its bound 0 and a small exponent), and
        # dropping them truncates one tail of the interval
        if fit.params and fit.status != "not converged":
            for k, v in fit.params.items():
                if math.isfinite(v):  # a degenerate refit's NaN would make every bound NaN
                    samples.setdefault(k, []).append(v)
    if ok < MIN_BOOTSTRAP_OK * n_boot:
        return {}, ok / n_boot
    q = (1 - level) / 2
    ci = {k: (float(np.quantile(v, q)), float(np.quantile(v, 1 - q))) for k, v in samples.items()}
    return ci, ok / n_boot


def with_ci(fit: Fit, ci: dict, boot_ok: float, why: str = "") -> Fit:
    return replace(fit, ci=ci, boot_ok=boot_ok, ci_why=why)
