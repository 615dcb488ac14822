"""Math tests of the samplers: respacing, ancestral sampling of Gaussian data with its exact
denoiser, learned-variance path, x0 clipping, classifier-free guidance."""

from __future__ import annotations

import math

import pytest
import torch

from dit_bench.backbones import Cond
from dit_bench.objectives.ddpm import DDPM, DDPMChain
from dit_bench.sampling import (
    SAMPLERS,
    ddpm_ancestral,
    get_sampler,
    guided,
    respace,
    respaced_betas,
)

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 0.5, 0.3  # Gaussian data N(MU, S^2) in every dim


# ---------------------------------------------------------------------------- respacing


def test_respace_matches_dit_space_timesteps():
    kept = respace(1000, 250)
    assert len(kept) == 250
    assert kept[:4] == [0, 4, 8, 12] and kept[-2:] == [995, 999]
    stride = 999 / 249  # the closed form agrees with the accumulated one here (no ties)
    assert kept == [round(i * stride) for i in range(250)]
    assert respace(1000, 1000) == list(range(1000))
    assert respace(1000, 50)[:3] == [0, 20, 41] and respace(1000, 50)[-1] == 999
    assert respace(1000, 1) == [0]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            respace(1000, bad)


def test_respaced_chain_keeps_alpha_bar_at_kept_steps():
    ab = DDPM().alphas_cumprod
    chain = DDPMChain.respaced(ab, 250)
    kept = respace(1000, 250)
    assert chain.timesteps.tolist() == kept
    # the merged transitions compose back to the original marginals
    torch.testing.assert_close(torch.cumprod(1 - chain.betas, 0), ab[kept], rtol=1e-12, atol=0)
    torch.testing.assert_close(chain.betas[1], 1 - ab[4] / ab[0], rtol=1e-12, atol=0)
    assert chain.betas[0] == 1 - ab[0]
    torch.testing.assert_close(respaced_betas(ab[kept]), chain.betas)


# ---------------------------------------------------------------------------- Gaussian data


def _exact_eps(chain: DDPMChain, *, learned: bool):
    """E[eps | x_t] for N(MU, S^2) data; with `learned`, also the v in [-1, 1] whose
    interpolated variance (iDDPM eq. 15) equals the exact reverse variance
    Var[x_{t-1} | x_t] = beta_tilde + coef1^2 Var[x0 | x_t] of this (respaced) chain."""
    index = torch.full((int(chain.timesteps[-1]) + 1,), -1, dtype=torch.long)
    index[chain.timesteps] = torch.arange(len(chain.timesteps))  # training step -> chain index
    ab = chain.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    beta = 1 - ab / ab_prev
    post = beta * (1 - ab_prev) / (1 - ab)
    post_clipped = torch.cat([post[1:2], post[1:]])
    coef1 = beta * ab_prev.sqrt() / (1 - ab)
    var_x0 = S**2 * (1 - ab) / (ab * S**2 + 1 - ab)
    frac = (torch.log(post + coef1**2 * var_x0) - post_clipped.log()) / (
        beta.log() - post_clipped.log()
    )
    v_exact = 2 * frac - 1
    assert v_exact[1:].abs().max() <= 1  # the exact variance lies inside [beta_tilde, beta]
    v_exact = v_exact.clamp(-1, 1)  # i = 0 adds no noise: any v

    def net(x, t, cond):
        i = index[t.long()]
        a = ab[i].float().view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        if not learned:
            return eps
        return torch.cat([eps, v_exact[i].float().view(-1, 1, 1, 1).expand_as(eps)], dim=1)

    return net


def _chain_moments(chain: DDPMChain, *, learned: bool) -> tuple[float, float]:
    """Slow reference: every step maps x affinely plus Gaussian noise, so the mean and variance
    of the samples follow exactly from x_T ~ N(0, 1) (float64 scalar recursion)."""
    ab = chain.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    beta = 1 - ab / ab_prev
    post = beta * (1 - ab_prev) / (1 - ab)
    coef1, coef2 = beta * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)
    m, var = 0.0, 1.0
    for i in reversed(range(len(ab))):
        a, d = ab[i], ab[i] * S**2 + 1 - ab[i]
        # x0_hat = (x - sqrt(1-a) eps_hat) / sqrt(a) = gain x + offset
        gain, offset = S**2 * a.sqrt() / d, MU * (1 - a) / d
        m = (coef1[i] * gain + coef2[i]) * m + coef1[i] * offset
        var = (coef1[i] * gain + coef2[i]) ** 2 * var
        if i > 0:
            var = var + post[i] + (coef1[i] ** 2 * S**2 * (1 - a) / d if learned else 0)
    return float(m), math.sqrt(float(var))


@pytest.mark.parametrize("steps", [250, 50])
@pytest.mark.parametrize("learned", [False, True], ids=["fixed_small", "learned_exact"])
def test_ancestral_sampling_recovers_gaussian_data(steps, learned):
    chain = DDPMChain.respaced(DDPM().alphas_cumprod, steps)
    x_T = torch.randn(4096, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = ddpm_ancestral(
        lambda x, t: _exact_eps(chain, learned=learned)(x, t, None),
        x_T,
        chain,
        generator=torch.Generator().manual_seed(1),
    )
    n = x.numel()  # every dim is an independent draw (the denoiser acts elementwise)
    ref_mean, ref_std = _chain_moments(chain, learned=learned)
    # 5 standard errors: se(mean) = std / sqrt(n) ~ 6e-4, se(std) = std / sqrt(2n) ~ 4e-4
    assert abs(x.mean().item() - ref_mean) < 5 * ref_std / math.sqrt(n)
    assert abs(x.std().item() - ref_std) < 5 * ref_std / math.sqrt(2 * n)
    assert abs(ref_mean - MU) < 1e-3
    if learned:
        # exact mean and variance of every reverse step: the data distribution at any step
        # count, up to the variance of x0 given x_1 that the noise-free last step drops (~1e-4)
        assert abs(ref_std - S) < 1e-3
        assert abs(x.std().item() - S) < 5 * S / math.sqrt(2 * n) + 1e-3
    else:
        # fixed small variance ignores Var[x0 | x_t]: samples are under-dispersed, the more so
        # the fewer the steps (0.287 at 250 steps, 0.252 at 50, for S = 0.3)
        assert ref_std < S and (S - ref_std) < (0.02 if steps == 250 else 0.06)


def test_net_sees_original_float_timesteps():
    chain = DDPMChain.respaced(DDPM().alphas_cumprod, 25)
    seen = []

    def net(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    ddpm_ancestral(net, torch.randn(3, 2, 4, 4), chain, generator=torch.Generator())
    assert all(t.dtype == torch.float32 and t.shape == (3,) for t in seen)
    assert [int(t[0]) for t in seen] == respace(1000, 25)[::-1]


def test_learned_variance_at_minus_one_equals_fixed_small():
    chain = DDPMChain.respaced(DDPM().alphas_cumprod, 20)
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def net(x, t):
        return 0.1 * x + 0.01 * t.view(-1, 1, 1, 1) / 1000

    def net2(x, t):
        return torch.cat([net(x, t), -torch.ones_like(x)], dim=1)

    a = ddpm_ancestral(net, x_T, chain, generator=torch.Generator().manual_seed(1))
    b = ddpm_ancestral(net2, x_T, chain, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_clip_x0_only_when_asked():
    chain = DDPMChain.respaced(DDPM().alphas_cumprod, 10)
    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def wild(x, t):  # predicts an eps whose implied x0 is far outside [-1, 1]
        return -10 * torch.ones_like(x)

    clipped = ddpm_ancestral(wild, x_T, chain, generator=torch.Generator(), clip_x0=True)
    free = ddpm_ancestral(wild, x_T, chain, generator=torch.Generator())
    # the last step returns the posterior mean at i = 0, i.e. the predicted x0 itself
    assert clipped.abs().max() <= 1 and free.abs().max() > 1


# ---------------------------------------------------------------------------- guidance


def _label_net(calls=None):
    """Label-dependent analytic net with learned-variance channels: 2C out."""

    def net(x, t, cond):
        if calls is not None:
            calls.append(cond.labels.clone())
        w = (cond.labels.float() + 1).view(-1, 1, 1, 1)
        return torch.cat([w * x + 0.001 * t.view(-1, 1, 1, 1), -w * torch.ones_like(x)], dim=1)

    return net


def test_guided_is_eps_u_plus_s_times_difference():
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10.0, 500.0, 999.0, 0.0])
    cond, uncond = Cond(labels=torch.tensor([0, 1, 2, 3])), Cond(labels=torch.full((4,), 10))
    calls = []
    net = _label_net(calls)
    out = guided(net, cond, uncond, 4.0)(x, t)
    assert len(calls) == 1 and calls[0].tolist() == [0, 1, 2, 3, 10, 10, 10, 10]  # one 2B call
    out_c, out_u = _label_net()(x, t, cond), _label_net()(x, t, uncond)
    assert torch.equal(out[:, :3], out_u[:, :3] + 4.0 * (out_c[:, :3] - out_u[:, :3]))
    assert torch.equal(out[:, 3:], out_c[:, 3:])  # variance from the conditional half
    assert torch.equal(guided(net, cond, uncond, 1.0)(x, t), out_c)  # scale 1: conditional
    assert torch.equal(guided(net, cond, None, 1.0)(x, t), out_c)


def test_guidance_of_label_blind_net_is_unconditional():
    x, t = torch.randn(4, 3, 4, 4), torch.full((4,), 250.0)
    uncond = Cond(labels=torch.full((4,), 10))

    def blind(x, t, cond):
        return 2 * x - 0.001 * t.view(-1, 1, 1, 1)

    for s in (0.0, 1.5, 7.0):
        g = guided(blind, Cond(labels=torch.tensor([0, 1, 2, 3])), uncond, s)
        assert torch.equal(g(x, t), blind(x, t, uncond))
    # conditioning on the null label itself: guided == unconditional at any scale
    torch.testing.assert_close(guided(_label_net(), uncond, uncond, 3.0)(x, t),
                               _label_net()(x, t, uncond))  # fmt: skip


def test_guidance_needs_matching_conds():
    net = _label_net()
    with pytest.raises(ValueError, match="uncond"):
        guided(net, Cond(labels=torch.zeros(2, dtype=torch.long)), None, 2.0)
    with pytest.raises(ValueError, match="pooled"):
        guided(net, Cond(labels=torch.zeros(2), pooled=torch.zeros(2, 4)),
               Cond(labels=torch.zeros(2)), 2.0)  # fmt: skip


def test_guidance_of_a_backbone_defaults_uncond_to_its_null_class():
    # DESIGN's API, obj.sample(net, noise, cond, ..., cfg_scale=s, generator=g), names no
    # `uncond`: for a registered backbone (which knows num_classes) it is the null class.
    from dit_bench.backbones import build_backbone

    torch.manual_seed(0)
    net = build_backbone("dit-xs/4", image_size=8, in_channels=1, num_classes=3)
    for p in net.parameters():  # away from adaLN-Zero's zero output, so labels matter
        torch.nn.init.normal_(p, std=0.2)
    cond = Cond(labels=torch.tensor([0, 1, 2, 1]))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    obj = DDPM()
    runs = [
        obj.sample(
            net,
            noise,
            cond,
            sampler="ddim",
            steps=5,
            cfg_scale=3.0,
            uncond=uncond,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        for uncond in (None, Cond(labels=torch.full((4,), 3)))
    ]
    assert torch.equal(runs[0], runs[1])
    # text-style context has no implied unconditional counterpart: still an error
    with pytest.raises(ValueError, match="uncond"):
        guided(net, Cond(labels=cond.labels, context=torch.zeros(4, 2, 8)), None, 2.0)


def test_objective_sample_with_cfg_equals_explicit_composition():
    obj = DDPM()
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = Cond(labels=torch.tensor([0, 1, 2, 3])), Cond(labels=torch.full((4,), 10))
    net = _label_net()
    a = obj.sample(net, noise, cond, steps=10, cfg_scale=2.0, uncond=uncond,
                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    b = ddpm_ancestral(
        guided(net, cond, uncond, 2.0),
        noise,
        DDPMChain.respaced(obj.alphas_cumprod, 10),
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(a, b) and a.shape == noise.shape and torch.isfinite(a).all()


def test_sampler_registry():
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "heun", "euler_maruyama"}
    assert get_sampler("ddpm") is ddpm_ancestral
    with pytest.raises(ValueError, match=r"\['ddim', 'ddpm', 'euler', 'euler_maruyama', 'heun'\]"):
        get_sampler("ddim_typo")


def test_batch_slice_and_guidance_arguments_at_their_bounds():
    """A slice that runs past the global batch would come back short (the rows of another
    process, or none); guidance of 0 channels would silently not guide; an interval of one
    level (lo = hi) is a valid one."""
    from dit_bench.sampling import draw_slice

    draw = torch.arange
    assert draw_slice(draw, 2, (6, 8)).tolist() == [6, 7]
    with pytest.raises(ValueError, match=r"batch_slice=\(7, 8\) does not hold 2 rows"):
        draw_slice(draw, 2, (7, 8))
    net = lambda x, t, cond: x  # noqa: E731
    with pytest.raises(ValueError, match="guidance channels must be a positive int"):
        guided(net, torch.zeros(1), torch.ones(1), 2.0, channels=0)
    fn = guided(net, torch.zeros(1), torch.ones(1), 2.0, interval=(500.0, 500.0))
    assert fn(torch.ones(1, 2), torch.tensor([500.0])).shape == (1, 2)
