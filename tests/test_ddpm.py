"""Math tests of the DDPM objective: schedules, oracle denoisers, the closed-form optimal
denoiser of Gaussian data, the fixed validation protocol, the learned-sigma hybrid loss."""

from __future__ import annotations

import math
import re

import pytest
import torch

from dit_bench.backbones import Cond
from dit_bench.objectives import OBJECTIVES, build_objective
from dit_bench.objectives.ddpm import DDPM, discretized_gaussian_log_likelihood

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000
MU, S = torch.tensor([0.5, -0.2, 0.1]), 0.3  # Gaussian data N(mu_c, S^2) per channel


def _ab(obj: DDPM, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar at the float timesteps a net receives, shaped (B, 1, 1, 1), float32."""
    return obj.alphas_cumprod[timesteps.long()].float().view(-1, 1, 1, 1)


def _optimal_eps(obj: DDPM):
    """E[eps | x_t] for x0 ~ N(mu, S^2 I): sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab S^2 + 1 - ab)."""

    def net(x, t, cond):
        ab = _ab(obj, t)
        mu = MU.view(1, -1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * S**2 + 1 - ab)

    return net


def _min_mse(ab: torch.Tensor) -> torch.Tensor:
    """Per-dim minimum eps MSE for Gaussian data: 1 - (1-ab) / (ab S^2 + 1 - ab)."""
    return 1 - (1 - ab) / (ab * S**2 + 1 - ab)


def _gaussian_x0(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU.view(1, -1, 1, 1) + S * torch.randn(n, 3, 8, 8, generator=g)


# ---------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_dit():
    obj = DDPM(schedule="linear")
    assert obj.betas.dtype == torch.float64 and obj.betas.shape == (T,)
    assert obj.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert obj.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert obj.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    # the chain re-derives betas from alpha_bar (SpacedDiffusion); equal to float64 rounding
    torch.testing.assert_close(obj.chain.betas, obj.betas, rtol=1e-9, atol=0)


def test_cosine_schedule_matches_eq17():
    obj = DDPM(schedule="cosine")

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    # alpha_bar telescopes to f((i+1)/T) / f(0) wherever no beta was clipped (all but the last)
    expected = torch.tensor([f((i + 1) / T) / f(0) for i in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(obj.alphas_cumprod[:-1], expected, rtol=1e-9, atol=1e-12)
    assert obj.betas[-1].item() == 0.999  # f(1) = 0 would give beta = 1: clipped
    assert (obj.betas[:-1] < 0.999).all()


# ---------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_oracle_gives_zero_loss(prediction):
    obj = DDPM(prediction=prediction)
    x0 = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # reproduce the objective's draws (t first, then noise) from the same seed
    g = torch.Generator().manual_seed(7)
    t_true = torch.randint(0, T, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def oracle(x_t, t, cond):
        assert t.dtype == torch.float32 and torch.equal(t, t_true.float())
        if prediction == "eps":
            return noise
        ab = obj.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return ab.sqrt().float() * noise - (1 - ab).sqrt().float() * x0  # Salimans & Ho v

    out = obj.loss(oracle, x0, Cond(), generator=torch.Generator().manual_seed(7))
    assert torch.equal(out["t"], t_true)
    assert out["loss"].shape == (16,)
    assert torch.equal(out["loss"], torch.zeros(16))


def test_v_target_is_consistent_with_x_t():
    # x0 = sqrt(ab) x_t - sqrt(1-ab) v and eps = sqrt(1-ab) x_t + sqrt(ab) v (Salimans & Ho)
    obj = DDPM(prediction="v")
    x0, eps = torch.randn(2, 8, 3, 4, 4, dtype=torch.float64)
    t = torch.arange(0, 1000, 125)
    x_t = obj.chain.q_sample(x0, eps, t)
    v = obj.chain.target(x0, eps, t, "v")
    torch.testing.assert_close(obj.chain.predict_x0(v, x_t, t, "v"), x0)
    ab = obj.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close((1 - ab).sqrt() * x_t + ab.sqrt() * v, eps)


# ---------------------------------------------------------------------------- Gaussian data


def test_gaussian_optimal_denoiser_reaches_analytic_minimum():
    obj = DDPM()
    b, d = 4096, 3 * 8 * 8
    x0 = _gaussian_x0(b, seed=2)
    out = obj.loss(_optimal_eps(obj), x0, Cond(), generator=torch.Generator().manual_seed(3))
    m = _min_mse(obj.alphas_cumprod[out["t"]].float())  # (B,) per-dim minimum at the drawn t
    # given t, a sample's loss is m(t) chi2_D / D: variance 2 m^2 / D
    se_given_t = (2 * m.pow(2) / d).sum().sqrt() / b
    assert abs(out["loss"].mean() - m.mean()) < 5 * se_given_t  # 5 sigma, se ~ 4e-4
    # against the minimum averaged over all T steps, adding the spread from sampling t
    m_all = _min_mse(obj.alphas_cumprod.float())
    tol = 5 * (se_given_t + m_all.std() / math.sqrt(b))
    assert abs(out["loss"].mean() - m_all.mean()) < tol


def test_val_loss_of_gaussian_optimum_per_level():
    obj = DDPM()
    x0 = _gaussian_x0(2048, seed=4)
    res = obj.val_loss(_optimal_eps(obj), x0, Cond(), seed=0, levels=10)
    steps = torch.tensor([50, 150, 250, 350, 450, 550, 650, 750, 850, 950])
    m = _min_mse(obj.alphas_cumprod[steps].float())
    se = m * math.sqrt(2 / x0[0].numel() / x0.shape[0])  # batch mean of m chi2_D / D
    assert (res["per_level"] - m).abs().max() < (5 * se).max()


# ---------------------------------------------------------------------------- val protocol


def test_val_loss_is_deterministic_and_uses_fixed_levels():
    obj = DDPM()
    x0 = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    seen = []

    def net(x, t, cond):
        seen.append(t.clone())
        return 0.5 * x

    a = obj.val_loss(net, x0, Cond(), seed=0, levels=10)
    assert torch.equal(torch.stack(seen)[:, 0], torch.tensor([50, 150, 250, 350, 450, 550, 650,
                                                              750, 850, 950.0]))  # fmt: skip
    b = obj.val_loss(net, x0, Cond(), seed=0, levels=10)
    c = obj.val_loss(net, x0, Cond(), seed=1, levels=10)
    assert a["per_level"].shape == (10,) and a["loss"].shape == ()
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["per_level"], b["per_level"])
    assert not torch.equal(a["per_level"], c["per_level"])
    assert torch.equal(a["loss"], a["per_level"].mean())
    assert obj.val_loss(net, x0, Cond(), levels=3)["per_level"].shape == (3,)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_val_loss_records_no_autograd_graph(name):
    # DDPM's no_grad had slid onto val_timesteps: called outside the module's own no_grad (a
    # notebook, a script), its validation kept every level's activations for a backward
    net = torch.nn.Conv2d(3, 6 if name == "ddpm" else 3, 1)
    obj = build_objective(name)
    out = obj.val_loss(lambda x, t, c: net(x), torch.randn(2, 3, 4, 4), Cond(), levels=2)
    assert not out["loss"].requires_grad and not out["per_level"].requires_grad


def test_the_val_grid_s_mean_estimates_the_training_loss_at_a_uniform_t():
    # The grid took both ends (0, 111, ..., 999): t = 0 weighed 1/10 against training's 1/1000,
    # and on Gaussian data the optimum's mean over it was 35% above the uniform-t average (72%
    # of a conditioning-cpu run's val loss was its t = 0 level).
    obj = DDPM()
    m = _min_mse(obj.alphas_cumprod.double())  # (T,) the optimum's per-dim MSE at each t
    assert m[obj.val_timesteps(10)].mean().item() == pytest.approx(m.mean().item(), rel=0.03)
    assert m[obj.val_timesteps(100)].mean().item() == pytest.approx(m.mean().item(), rel=0.01)
    assert obj.val_timesteps(T).tolist() == list(range(T))  # every timestep once
    assert obj.val_timesteps(1).tolist() == [T // 2]


def test_show_config_describe_names_the_val_grid_ddpm_validates_on():
    from dit_bench.config import build_config

    text = build_config({}).to_yaml(describe=True)  # `dit-bench show-config --describe`
    text = re.sub(r"\n *# *", " ", text)  # the comment blocks' lines joined
    (said,) = re.findall(r"val-loss grid[^\n]*", text)
    assert "50, 150, ..., 950" in said  # said "ddpm 10 steps 0..999", the grid before midpoints
    assert DDPM().val_timesteps(10)[[0, -1]].tolist() == [50, 950]


# ---------------------------------------------------------------------------- hybrid loss


def _posterior(obj: DDPM, t: torch.Tensor):
    """beta_t and the (clipped) posterior variance beta_tilde_t, float64, from scratch."""
    ab = obj.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    beta = 1 - ab / ab_prev
    post = beta * (1 - ab_prev) / (1 - ab)
    post[0] = post[1]
    return beta[t], post[t]


def test_hybrid_vb_is_zero_at_true_posterior_and_analytic_kl_at_beta():
    obj = DDPM()
    b = 32
    x0 = torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    g = torch.Generator().manual_seed(8)
    t_true = torch.randint(0, T, (b,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def net_with(v: float):
        # exact eps, and v = -1 (log var = posterior) or +1 (log var = log beta)
        return lambda x, t, c: torch.cat([noise, torch.full_like(noise, v)], dim=1)

    exact = obj.loss(net_with(-1.0), x0, Cond(), generator=torch.Generator().manual_seed(8))
    assert set(exact) == {"loss", "mse", "vb", "t"}
    assert torch.equal(exact["mse"], torch.zeros(b))
    pos = t_true > 0
    assert exact["vb"][pos].abs().max() < 1e-4  # KL of the true posterior with itself
    torch.testing.assert_close(exact["loss"], exact["mse"] + exact["vb"])  # lambda T = 1

    big = obj.loss(net_with(1.0), x0, Cond(), generator=torch.Generator().manual_seed(8))
    beta, post = _posterior(obj, t_true)
    # KL(N(m, post) || N(m, beta)) per dim, in bits
    kl = 0.5 * (-1 + torch.log(beta) - torch.log(post) + post / beta) / math.log(2)
    torch.testing.assert_close(big["vb"][pos].double(), kl[pos], rtol=1e-3, atol=1e-6)
    assert (big["vb"] >= -1e-6).all()  # KL >= 0 up to float32 cancellation (beta ~ post)


def test_vb_is_the_decoder_nll_at_t0_only_and_the_kl_from_t1():
    # the decoder term belongs to t = 0 alone: at t = 1 (and above) the exact eps with the
    # posterior variance (v = -1) matches q(x_0 | x_1, x0) exactly, a KL of 0; random t draws
    # rarely hit t = 1, so it is pinned here
    obj = DDPM()
    x0 = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(14)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(15))
    t = torch.tensor([0, 1, 2])
    x_t = obj.chain.q_sample(x0, noise, t)
    vb = obj.vb_bits_per_dim(torch.cat([noise, -torch.ones_like(noise)], 1), x0, x_t, t)
    assert vb[0] > 0.5  # the decoder NLL of continuous x0: about -log2 of a bin's share
    assert vb[1:].abs().max() < 1e-4


def test_decoder_nll_at_t0_matches_exact_normal_cdf():
    obj = DDPM()
    x0 = (torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(9))
          .float() / 127.5 - 1)  # fmt: skip
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(10))
    t = torch.zeros(4, dtype=torch.long)
    x_t = obj.chain.q_sample(x0, noise, t)
    out = torch.cat([noise, torch.zeros_like(noise)], dim=1)  # exact eps, v = 0
    vb = obj.vb_bits_per_dim(out, x0, x_t, t)
    # slow reference: exact Gaussian CDF over the 1/127.5-wide bin, edge bins to +-inf
    mean, log_var, _ = obj.chain.p_mean_log_var(out, x_t, t, prediction="eps")
    sd = (0.5 * log_var).exp().double()
    hi = torch.where(x0 > 0.999, torch.inf, x0.double() + 1 / 255)
    lo = torch.where(x0 < -0.999, -torch.inf, x0.double() - 1 / 255)
    m = mean.double()
    p = torch.special.ndtr((hi - m) / sd) - torch.special.ndtr((lo - m) / sd)
    ref = -torch.log(p).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb.double(), ref, rtol=1e-2, atol=0)  # tanh-approximated CDF
    assert (vb > 0).all()


def test_discretized_likelihood_sums_to_one_over_bins():
    bins = torch.arange(256).float() / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(
        bins, means=torch.full((256,), 0.1), log_scales=torch.full((256,), math.log(0.05))
    )
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("mean", [-0.99, 0.99])
def test_discretized_likelihood_edge_bins_take_the_tails(mean):
    # Ho et al. §3.3: the bins of -1 and 1 extend to -inf / +inf. With the mass near an edge,
    # a bin of plain width 2/255 there would drop the tail beyond it (0.42 of it here); the
    # decoder test's loose tolerance (tanh CDF) cannot see that on a few edge pixels
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    logp = discretized_gaussian_log_likelihood(
        bins, means=torch.full((256,), mean), log_scales=torch.full((256,), math.log(0.01))
    )
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)
    edge = 0 if mean < 0 else 255
    z = (1 / 255 - abs(bins[edge] - mean)) / 0.01  # the edge bin's inner border, standardised
    assert logp[edge].exp().item() == pytest.approx(float(torch.special.ndtr(z)), abs=2e-3)


def test_vb_gradient_does_not_reach_mean_channels():
    obj = DDPM()
    out = torch.randn(16, 6, 4, 4, generator=torch.Generator().manual_seed(11))
    out[:, 3:] = out[:, 3:].tanh()  # variance values in [-1, 1]
    out.requires_grad_(True)
    x0 = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(12)).clamp(-1, 1)
    res = obj.loss(lambda x, t, c: out, x0, Cond(), generator=torch.Generator().manual_seed(13))
    (g_vb,) = torch.autograd.grad(res["vb"].sum(), out, retain_graph=True)
    assert torch.equal(g_vb[:, :3], torch.zeros_like(g_vb[:, :3]))  # stop-gradient on the mean
    assert g_vb[:, 3:].abs().sum() > 0
    (g_mse,) = torch.autograd.grad(res["mse"].sum(), out)
    assert torch.equal(g_mse[:, 3:], torch.zeros_like(g_mse[:, 3:]))
    assert (res["vb"] >= 0).all()


# ---------------------------------------------------------------------------- bad arguments


def test_bad_arguments_name_allowed_values():
    assert OBJECTIVES["ddpm"] is DDPM
    assert isinstance(build_objective("ddpm", prediction="v"), DDPM)
    with pytest.raises(ValueError, match="ddpm"):
        build_objective("flowz")
    with pytest.raises(ValueError, match=r"schedule.*cosine.*linear"):
        DDPM(schedule="quadratic")
    with pytest.raises(ValueError, match=r"prediction.*eps.*v"):
        DDPM(prediction="x0")
    with pytest.raises(ValueError, match="num_timesteps"):
        DDPM(num_timesteps=1)
    obj = DDPM()
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="levels"):
        obj.val_loss(lambda x, t, c: x, x0, Cond(), levels=0)
    with pytest.raises(ValueError, match=r"expected 3 .* or 6"):
        obj.loss(lambda x, t, c: x[:, :2], x0, Cond())
    with pytest.raises(ValueError, match="ddpm"):
        obj.sample(lambda x, t, c: x, x0, Cond(), sampler="nope")
    with pytest.raises(ValueError, match="uncond"):
        obj.sample(lambda x, t, c: x, x0, Cond(), cfg_scale=4.0)
    with pytest.raises(ValueError, match="steps"):
        obj.sample(lambda x, t, c: x, x0, Cond(), steps=1001)
    with pytest.raises(ValueError, match="2 or more steps, got 1"):  # keeps only t = 0
        obj.sample(lambda x, t, c: x, x0, Cond(), steps=1)


@pytest.mark.parametrize("num_timesteps", [10, 20])
def test_linear_schedule_refuses_too_few_steps(num_timesteps):
    """The linear betas scaled by 1000 / T reach 1 at T = 20 (alpha_bar = 0, a NaN loss) and
    exceed it below; the Python API refuses them as the config layer does. Cosine clips."""
    with pytest.raises(ValueError, match=f"num_timesteps={num_timesteps}: .*more than 20"):
        DDPM(num_timesteps=num_timesteps)
    assert (DDPM(num_timesteps=21).betas < 1).all()
    obj = DDPM(schedule="cosine", num_timesteps=num_timesteps)
    loss = obj.loss(lambda x, t, c: 0 * x, torch.randn(64, 3, 4, 4), None)["loss"]
    assert torch.isfinite(loss).all()
