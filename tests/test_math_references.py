"""Coefficients, losses, sampler steps, metrics, fits and sweep bookkeeping checked against
independent references written here: closed forms from the papers, and brute-force loops.

Why a separate file: a mutation-testing audit found one-line changes to these formulas (a dropped
sqrt, eta instead of eta^2, the wrong k-NN radii, a whole-set p(y), idxmax for idxmin, ...) that
the behavioural tests elsewhere do not notice, because those tests check properties (moments of
samples, bounds, zero losses at an oracle) that the mutated formula still roughly satisfies.
Each test below recomputes the exact value from the paper's equation in plain Python or numpy
and compares it with the project's value, on inputs where the mutated formula is far off.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_sweep import write_tiny  # the tiny sweep of the sweep tests

from dit_bench.backbones import Cond
from dit_bench.config import ConfigError
from dit_bench.metrics.distances import inception_score, precision_recall
from dit_bench.objectives.ddpm import DDPM, DDPMChain
from dit_bench.report import fits
from dit_bench.sampling import ddim
from dit_bench.sweep import load_sweep, read_curve

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

# ============================================================================ DDPM posterior


def _posterior_reference(ab: list[float]) -> dict[str, list[float]]:
    """Ho et al. 2020 eq. 6-7 on a chain whose kept steps have alpha_bar `ab` (ascending t),
    one step at a time in Python floats. On a respaced chain the step from the previous kept
    step has beta_t = 1 - ab_t / ab_{t-1} (Nichol & Dhariwal §4), alpha_t = 1 - beta_t:
      mu~(x_t, x0) = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0
                     + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t,
      beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t,
    and the clipped log variance of improved-diffusion, log(append(beta~_1, beta~[1:])): beta~_0
    is 0, so index 0 borrows beta~_1 (not beta_1)."""
    coef1, coef2, var = [], [], []
    for i, ab_t in enumerate(ab):
        ab_prev = ab[i - 1] if i > 0 else 1.0
        beta = 1.0 - ab_t / ab_prev
        alpha = 1.0 - beta
        coef1.append(math.sqrt(ab_prev) * beta / (1.0 - ab_t))
        coef2.append(math.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab_t))
        var.append((1.0 - ab_prev) / (1.0 - ab_t) * beta)
    log_clipped = [math.log(var[1])] + [math.log(v) for v in var[1:]]
    return {
        "posterior_mean_coef1": coef1,
        "posterior_mean_coef2": coef2,
        "posterior_variance": var,
        "posterior_log_variance_clipped": log_clipped,
    }


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 50, 7])
def test_chain_posterior_coefficients_match_ho_eq7(schedule, steps):
    obj = DDPM(schedule=schedule)
    chain = DDPMChain.respaced(obj.alphas_cumprod, steps)
    kept = chain.timesteps.tolist()
    ab = [float(obj.alphas_cumprod[k]) for k in kept]
    ref = _posterior_reference(ab)
    for name, values in ref.items():
        # float64 throughout: a dropped sqrt(1 - beta) shifts coef2 by a relative beta / 2 >= 5e-5
        torch.testing.assert_close(
            getattr(chain, name),
            torch.tensor(values, dtype=torch.float64),
            rtol=1e-12,
            atol=0,
            msg=lambda m, name=name: f"{name} ({schedule}, {steps} steps): {m}",
        )


def test_q_posterior_mean_is_eq7_applied_to_x0_and_x_t():
    # the same coefficients seen through the method the sampler and the VLB use
    obj = DDPM()
    chain = DDPMChain.respaced(obj.alphas_cumprod, 25)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(25, 2, 3, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(25, 2, 3, 3, generator=g, dtype=torch.float64)
    i = torch.arange(25)
    mean, log_var = chain.q_posterior(x0, x_t, i)
    ref = _posterior_reference([float(obj.alphas_cumprod[k]) for k in chain.timesteps])
    c1 = torch.tensor(ref["posterior_mean_coef1"], dtype=torch.float64).view(-1, 1, 1, 1)
    c2 = torch.tensor(ref["posterior_mean_coef2"], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, c1 * x0 + c2 * x_t, rtol=1e-12, atol=1e-14)
    lv = torch.tensor(ref["posterior_log_variance_clipped"], dtype=torch.float64)
    torch.testing.assert_close(log_var, lv.view(-1, 1, 1, 1).expand_as(x_t), rtol=1e-12, atol=0)


# ============================================================================ hybrid loss


def _hybrid_reference(obj: DDPM, out: torch.Tensor, x0: torch.Tensor, seed: int):
    """Nichol & Dhariwal 2021 eq. 16 for an eps net with learned sigma, by hand in float64:
    L_simple = |eps - eps_hat|^2 (per-dim mean), L_t = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))
    per dim in bits (t > 0 only), with p's mean from eps_hat (Ho eq. 11: mu = (x_t - beta_t /
    sqrt(1 - ab_t) eps_hat) / sqrt(alpha_t)) and log var = f log beta_t + (1 - f) log beta~_t,
    f = (v + 1) / 2 (eq. 15). The loss draws t, then the noise, from the generator
    (DDPM.loss's documented order), so the same seed gives the same t and noise here."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, obj.num_timesteps, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    betas = [float(b) for b in obj.betas]
    abar, prod = [], 1.0
    for b in betas:  # alpha_bar_t = prod_{s <= t} (1 - beta_s), Ho eq. 4
        prod *= 1.0 - b
        abar.append(prod)
    mse, vb = [], []
    for n, step in enumerate(t.tolist()):
        ab, ab_prev, beta = abar[step], abar[step - 1] if step > 0 else 1.0, betas[step]
        xs, e, eps_hat = x0[n].double(), noise[n].double(), out[n, :3].double()
        frac = (out[n, 3:].double() + 1) / 2
        x_t = math.sqrt(ab) * xs + math.sqrt(1 - ab) * e
        mse.append(((e - eps_hat) ** 2).mean().item())
        assert step > 0, "pick a seed without t = 0 (the decoder term is tested elsewhere)"
        post_var = (1 - ab_prev) / (1 - ab) * beta
        c1 = math.sqrt(ab_prev) * beta / (1 - ab)
        c2 = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        true_mean = c1 * xs + c2 * x_t
        model_mean = (x_t - beta / math.sqrt(1 - ab) * eps_hat) / math.sqrt(1 - beta)
        log_var = frac * math.log(beta) + (1 - frac) * math.log(post_var)
        # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
        sq_err = (true_mean - model_mean) ** 2
        kl = 0.5 * (log_var - math.log(post_var) + (post_var + sq_err) / log_var.exp() - 1)
        vb.append(kl.mean().item() / math.log(2))
    return torch.tensor(mse, dtype=torch.float64), torch.tensor(vb, dtype=torch.float64), t


@pytest.mark.parametrize("num_timesteps", [1000, 400])
def test_hybrid_loss_is_mse_plus_lambda_t_times_vb_in_bits(num_timesteps):
    # eq. 16 with lambda = 1e-3 and L_vlb ~ T * L_t at a uniform t: weight lambda T on vb,
    # which is 1 at T = 1000 (DiT's `mse + vb`) and 0.4 at T = 400
    obj = DDPM(num_timesteps=num_timesteps)
    b = 16
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(b, 3, 4, 4, generator=g) * 2 - 1
    # a fixed, wrong output: vb is then of order 1 bit, so its weight shows in the loss
    out = torch.cat(
        [torch.randn(b, 3, 4, 4, generator=g), torch.rand(b, 3, 4, 4, generator=g) * 2 - 1], 1
    )
    seed = 21
    res = obj.loss(lambda x, t, c: out, x0, Cond(), generator=torch.Generator().manual_seed(seed))
    mse, vb, t = _hybrid_reference(obj, out, x0, seed)
    assert torch.equal(res["t"], t)
    torch.testing.assert_close(res["mse"].double(), mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res["vb"].double(), vb, rtol=1e-4, atol=1e-6)
    assert vb.min() > 1e-2  # the weight is visible: 1e-3 vb would differ from vb by > 1e-2
    weight = 1e-3 * num_timesteps
    torch.testing.assert_close(res["loss"].double(), mse + weight * vb, rtol=1e-4, atol=1e-6)
    if num_timesteps == 1000:  # exactly DiT's `loss = mse + vb`
        torch.testing.assert_close(res["loss"], res["mse"] + res["vb"], rtol=1e-6, atol=0)


# ============================================================================ DDIM step


def test_ddim_steps_match_song_eq12_with_sigma_of_eq16():
    """Song et al. 2021 eq. 12: x_{t-1} = sqrt(ab_{t-1}) x0_hat
    + sqrt(1 - ab_{t-1} - sigma_t^2) eps_hat + sigma_t z, with eq. 16
    sigma_t(eta) = eta sqrt((1 - ab_{t-1}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t-1}) and
    x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t). Every step of a 6-step chain, by hand,
    with a fixed eps prediction and the noise the sampler's generator draws (one randn per
    step, x's shape, float64)."""
    eta, seed, shape = 0.5, 4, (3, 2, 2, 2)
    obj = DDPM()
    chain = DDPMChain.respaced(obj.alphas_cumprod, 6)
    eps_hat = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_start = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []

    def denoise(x, t):
        seen.append(x.clone())
        return eps_hat

    result = ddim(denoise, x_start, chain, eta=eta, generator=torch.Generator().manual_seed(seed))

    ab = [float(obj.alphas_cumprod[k]) for k in chain.timesteps]
    g = torch.Generator().manual_seed(seed)
    x, expected = x_start, [x_start]
    for i in range(len(ab) - 1, 0, -1):
        a_t, a_prev = ab[i], ab[i - 1]
        x0_hat = (x - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma**2) * eps_hat + sigma * z
        expected.append(x)
    assert len(seen) == len(expected) == 6
    for k, (got, want) in enumerate(zip(seen, expected, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"net input {k}")
    x0_last = (x - math.sqrt(1 - ab[0]) * eps_hat) / math.sqrt(ab[0])
    torch.testing.assert_close(result, x0_last, rtol=1e-10, atol=1e-12)


# ============================================================================ precision / recall


def _manifold_share(points: np.ndarray, support: np.ndarray, k: int) -> float:
    """Kynkaanniemi et al. 2019, eq. 1-2, brute force: f(p, S) = 1 if p lies within the k-NN
    radius (k-th nearest other point of S) of some point of S; returns the mean of f over
    `points`. precision = share(fake, real), recall = share(real, fake): the radii always come
    from the set that defines the manifold."""
    radii = []
    for s in support:
        d = sorted(math.dist(s, o) for o in support)  # d[0] = 0 is the point itself
        radii.append(d[k])
    inside = 0
    for p in points:
        inside += any(math.dist(p, s) <= r for s, r in zip(support, radii, strict=True))
    return inside / len(points)


def test_precision_recall_use_each_sets_own_knn_radii():
    rng = np.random.default_rng(7)
    # real: a tight cluster; fake: spread wide around it. The fake balls are large, so the
    # whole real cluster is inside the fake manifold (recall 1); with the real set's tiny radii
    # around the fakes instead, almost no real point would be covered
    real = rng.normal(0.0, 0.05, (120, 2))
    fake = rng.normal(0.0, 1.0, (120, 2))
    for k in (3, 5):
        p, r = precision_recall(real, fake, k=k)
        assert p == pytest.approx(_manifold_share(fake, real, k), abs=1e-12)
        assert r == pytest.approx(_manifold_share(real, fake, k), abs=1e-12)
        assert r > 0.9 and p < 0.2  # the sets are far from symmetric: wrong radii would show
        # and the converse: swapping the roles swaps the numbers
        assert precision_recall(fake, real, k=k) == pytest.approx((r, p), abs=1e-12)


# ============================================================================ Inception Score


def _inception_score_reference(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """Salimans et al. 2016, as the original code (openai/improved-gan): for each of `splits`
    consecutive parts, exp(mean_x KL(p(y|x) || p_part(y))) with p_part(y) the mean of p(y|x)
    over that part only; (mean, std) of the parts' scores."""
    scores = []
    for part in np.array_split(logits, splits):
        p = [np.exp(row - row.max()) / np.exp(row - row.max()).sum() for row in part]
        py = sum(p) / len(p)
        kls = [
            sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(row, py, strict=True))
            for row in p
        ]
        scores.append(math.exp(sum(kls) / len(kls)))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_uses_each_splits_own_marginal():
    # first half confident on classes 0-4, second half on 5-9: each split's p(y) covers five
    # classes (score ~ 5); a whole-set p(y) would cover ten (score ~ 10)
    rng = np.random.default_rng(3)
    n, c = 400, 10
    labels = np.concatenate([rng.integers(0, 5, n // 2), rng.integers(5, 10, n // 2)])
    logits = rng.normal(0, 0.5, (n, c))
    logits[np.arange(n), labels] += 6.0
    for splits in (2, 4):
        mean, std = inception_score(logits, splits=splits)
        ref_mean, ref_std = _inception_score_reference(logits, splits)
        assert mean == pytest.approx(ref_mean, rel=1e-10)
        assert std == pytest.approx(ref_std, rel=1e-8, abs=1e-12)
        assert mean < 6.0
    # splits that mix both halves see all ten classes
    shuffled = logits[rng.permutation(n)]
    mixed = inception_score(shuffled, splits=2)[0]
    assert mixed == pytest.approx(_inception_score_reference(shuffled, 2)[0], rel=1e-10)
    assert mixed > 8.0


# ============================================================================ envelope, fit bounds


def test_envelope_keeps_the_lowest_loss_run_at_each_budget():
    rng = np.random.default_rng(0)
    rows = []
    for budget in (1e9, 1e10, 1e11):
        for r in range(4):
            rows.append(
                {
                    "budget": budget,
                    "train_flops": budget * (1 + 0.01 * r),
                    "val_loss": float(rng.uniform(1, 2)),
                    "run": f"r{r}",
                }
            )
    pts = pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # order must not matter
    env = fits.envelope(pts)
    assert env["budget"].tolist() == [1e9, 1e10, 1e11]
    for _, got in env.iterrows():
        # Chinchilla approach 1: the minimum over runs at a budget, brute force
        same = [r for r in rows if r["budget"] == got["budget"]]
        best = min(same, key=lambda r: r["val_loss"])
        assert got["val_loss"] == best["val_loss"] and got["run"] == best["run"]
        assert got["train_flops"] == best["train_flops"]  # the best run's own compute


def test_power_law_with_floor_at_min_loss_is_flagged_at_its_bound():
    # a curve that bottoms out and then rises (overfitting): L = E + A C^-alpha can only follow
    # it with the floor E pushed to its upper bound min(L), where E is not identified
    c = np.geomspace(1e10, 1e13, 8)
    loss = np.array([1.5, 1.2, 1.05, 1.0, 1.0, 1.01, 1.02, 1.03])
    f = fits.fit_power_law(c, loss)
    assert f.params["E"] == pytest.approx(loss.min(), rel=1e-6)
    assert not f.ok and f.status == "ill-conditioned", f
    assert "on a bound: E = min(L)" in f.detail
    assert f.value("E") is None and f.value("alpha") is None


# ============================================================================ sweep budgets, curve


def test_budgets_are_sorted_ascending_and_duplicates_refused(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "a.yaml", budgets=[3.2e7, 2.0e6, 8.0e6]))
    assert sweep.spec.budgets == [2.0e6, 8.0e6, 3.2e7]  # budget index = compute order (pruners)
    plan = sweep.plan({"size": "a", "backbone.patch_size": 4})
    assert plan.budgets == [2.0e6, 8.0e6, 3.2e7]
    assert plan.budget_steps == sorted(plan.budget_steps)
    with pytest.raises(ConfigError, match="distinct"):
        load_sweep(write_tiny(tmp_path / "b.yaml", budgets=[2.0e6, 8.0e6, 2.0e6]))


def test_read_curve_counts_three_forward_flops_per_image(tmp_path):
    # Kaplan et al. 2020 §2.1: training compute C = 3 x forward FLOPs x images seen (backward
    # ~ 2 forward), images = step x batch
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    plan = sweep.plan({"size": "a", "backbone.patch_size": 2})
    batch = plan.cfg.train.batch_size
    assert batch > 1
    run = tmp_path / "run"
    run.mkdir()
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "train/loss", "val/loss"])
        w.writerows(
            [[5, 1e-3, 1.3, ""], [10, 1e-3, 1.1, 0.9], [15, 1e-3, 1.0, ""], [20, 1e-3, 0.95, 0.8]]
        )
    curve = read_curve(run, plan)
    assert [r["step"] for r in curve] == [10, 20]  # only rows with a val loss
    for r in curve:
        assert r["images"] == r["step"] * batch
        assert r["train_flops"] == 3 * plan.forward_flops * r["step"] * batch
    assert [r["val_loss"] for r in curve] == [0.9, 0.8]
    assert read_curve(tmp_path / "missing", plan) == []
