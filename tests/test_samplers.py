"""Every sampler with every objective and prediction, fed the exact denoiser of Gaussian data
N(MU, S^2): moments of the samples, convergence order on the exact ODE, equivalences between
samplers, prediction conversions, guidance options and per-sample generators."""

from __future__ import annotations

import math

import pytest
import torch

from dit_bench.backbones import Cond
from dit_bench.objectives import build_objective
from dit_bench.objectives.ddpm import DDPM, DDPMChain
from dit_bench.objectives.flow import flow_levels
from dit_bench.sampling import (
    PREDICTIONS,
    NoiseLevels,
    ddim,
    ddpm_ancestral,
    euler,
    euler_maruyama,
    from_x0_eps,
    guided,
    heun,
    randn,
    to_x0_eps,
)

MU, S = 0.5, 0.3

OBJECTIVES = {
    "ddpm-eps": dict(name="ddpm"),
    "ddpm-v-cosine": dict(name="ddpm", schedule="cosine", prediction="v"),
    "flow-velocity": dict(name="flow"),
    "flow-x0": dict(name="flow", prediction="x0"),
    "flow-velocity-shift3": dict(name="flow", shift=3.0),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def make(key: str):
    kw = dict(OBJECTIVES[key])
    return build_objective(kw.pop("name"), **kw)


def target_coeffs(prediction, a, s):
    """(A, B) with target = A x0 + B eps at x = a x0 + s eps."""
    one = torch.ones_like(a)
    return {"eps": (0 * a, one), "x0": (one, 0 * a), "v": (-s, a), "velocity": (-one, one)}[
        prediction
    ]


def exact_net(obj):
    """E[target | x_t] for x0 ~ N(MU, S^2): A MU + Cov(target, x_t) / Var(x_t) (x_t - a MU),
    evaluated in float64 from the timesteps the net receives."""

    def net(x, t, cond):
        if isinstance(obj, DDPM):
            ab = obj.alphas_cumprod[t.long()]
            a, s = ab.sqrt(), (1 - ab).sqrt()
        else:
            a, s = 1 - t.double() / 1000, t.double() / 1000
        a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
        A, B = target_coeffs(obj.prediction, a, s)
        d = a * a * S**2 + s * s
        cov = A * a * S**2 + B * s
        return (A * MU + cov / d * (x.double() - a * MU)).to(x.dtype)

    return net


# ---------------------------------------------------------------------------- moments

# |std - S| bounds at `steps` levels, measured (all five objectives, steps 10..100) and padded
# ~1.5x: Euler / DDIM(0) first order (worst 1.28 / steps, ddpm linear), Heun second order
# (worst 13.5 / steps^2, flow with shift 3), Euler-Maruyama weakly first order (worst 0.8 /
# steps), DDPM ancestral / DDIM(1) with the fixed small variance under-dispersed by ~2.8 / steps
# (it drops Var[x0 | x_t]: order < 1, 0.0486 at 50 steps on the linear schedule).
STD_TOL = {
    "euler": lambda n: 2.0 / n,
    "ddim": lambda n: 2.0 / n,
    "heun": lambda n: 20.0 / n**2,
    "euler_maruyama": lambda n: 1.2 / n,
    "ddpm": lambda n: 4.0 / n,
    "ddim_eta1": lambda n: 4.0 / n,
}
# the linear schedule's x_T ~ N(0, 1) misses the true marginal N(sqrt(ab_999) MU, ...) by
# 0.0032 in mean: a mean offset of -S sqrt(ab_999) MU / sqrt(Var) ~ -9.5e-4 at any step count
MEAN_TOL = 1.5e-3


@pytest.mark.parametrize("sampler", ["euler", "ddim", "heun"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("key", list(OBJECTIVES))
def test_deterministic_samplers_recover_gaussian(key, steps, sampler):
    # a deterministic sampler with an affine denoiser is an affine map f of x_T ~ N(0, 1):
    # the samples' mean is f(0) and their std |f(1) - f(0)|, exactly, without Monte Carlo
    obj = make(key)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    y = obj.sample(exact_net(obj), x, None, sampler=sampler, steps=steps)
    mean, std = y[0].item(), (y[1] - y[0]).item()
    assert abs(mean - MU) < MEAN_TOL
    assert abs(std - S) < STD_TOL[sampler](steps), (mean, std)


@pytest.mark.parametrize(
    "sampler,opts", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_maruyama", {})]
)
@pytest.mark.parametrize("key", list(OBJECTIVES))
def test_stochastic_samplers_recover_gaussian(key, sampler, opts):
    obj, steps = make(key), 50
    x = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = obj.sample(exact_net(obj), x, None, sampler=sampler, steps=steps,
                   generator=torch.Generator().manual_seed(1), **opts)  # fmt: skip
    n = y.numel()
    tol = STD_TOL["ddim_eta1" if opts else sampler](steps)
    assert abs(y.mean().item() - MU) < MEAN_TOL + 5 * S / math.sqrt(n)
    assert abs(y.std().item() - S) < tol + 5 * S / math.sqrt(2 * n)


def test_euler_maruyama_std_converges_first_order():
    obj = make("flow-velocity")
    x = torch.randn(8192, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    err = {}
    for steps in (10, 40):
        y = obj.sample(exact_net(obj), x, None, sampler="euler_maruyama", steps=steps,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
        err[steps] = S - y.std().item()
    # measured 0.0215 -> 0.0051 (x4.2 for 4x the steps); Monte-Carlo se ~ 8e-4
    assert err[10] > 0.015 and 2.5 < err[10] / err[40] < 7


def test_euler_maruyama_sde_scale_2_is_sit_diffusion_norm_1():
    """SiT's Euler-Maruyama step (willisma/SiT transport/: drift v + D score, noise
    sqrt(2 D) dW, "sigma" form D = diffusion_norm * sigma_t) with diffusion_norm = 1, written in
    SiT's time t_sit = 1 - t, equals one step of ours with sde_scale = 2."""
    tau = torch.tensor([0.3, 0.6], dtype=torch.float64)
    levels = NoiseLevels(timesteps=1000 * tau, alphas=1 - tau, sigmas=tau)
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []

    def net(x_in, t):
        seen.append(x_in)
        return u  # a fixed velocity eps - x0, whatever the input

    euler_maruyama(net, x, levels, sde_scale=2.0, prediction="velocity",
                   generator=torch.Generator().manual_seed(2))  # fmt: skip
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, h = 0.6, 0.3
    eps = x + (1 - t) * u  # what the velocity implies at x = (1 - t) x0 + t eps
    v_sit, score, diffusion = -u, -eps / t, 1.0 * t  # SiT's sigma_t is our t
    sit = x + (v_sit + diffusion * score) * h + math.sqrt(2 * diffusion * h) * z
    torch.testing.assert_close(seen[1], sit, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- orders


def _ode_errors(sampler_name: str, shift: float, steps_list) -> list[float]:
    """Max |x - x_exact| over x_T on a grid: for Gaussian data the flow ODE keeps the
    standardised value, so x_T -> MU + S x_T exactly (t = 1 has x_1 = noise)."""
    obj = build_objective("flow", shift=shift)
    x_T = torch.linspace(-3, 3, 61, dtype=torch.float64).view(-1, 1, 1, 1)
    exact = MU + S * x_T
    return [
        (obj.sample(exact_net(obj), x_T, None, sampler=sampler_name, steps=n) - exact)
        .abs()
        .max()
        .item()
        for n in steps_list
    ]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_ode_convergence_order(sampler, order, shift):
    steps = [8, 16, 32, 64, 128, 256]
    err = _ode_errors(sampler, shift, steps)
    slopes = [math.log2(a / b) for a, b in zip(err[:-1], err[1:], strict=True)]
    # measured log2(err_n / err_2n), n = 8 .. 128: euler 0.93 -> 0.995 (shift 1), 0.88 -> 0.988
    # (shift 3); heun 2.08 -> 2.01 (shift 1), 1.44 -> 2.00 (shift 3: asymptotic from n ~ 32)
    assert all(abs(s - order) < 0.05 for s in slopes[-2:]), (err, slopes)
    assert all(abs(s - order) < 0.6 for s in slopes), (err, slopes)


# ---------------------------------------------------------------------------- equivalences


def _chain(n=20):
    return DDPMChain.respaced(DDPM().alphas_cumprod, n)


def _smooth(x, t):
    return 0.3 * x + 0.2 * torch.sin(x) + 1e-3 * t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("levels", [_chain(), flow_levels(20)], ids=["ddpm", "flow"])
def test_ddim_eta0_is_euler_and_sde_scale0_is_euler(levels):
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pred = "eps" if isinstance(levels, DDPMChain) else "velocity"
    e = euler(_smooth, x, levels, prediction=pred)
    torch.testing.assert_close(ddim(_smooth, x, levels, prediction=pred), e, rtol=1e-10, atol=1e-10)
    em = euler_maruyama(_smooth, x, levels, prediction=pred, sde_scale=0.0)
    torch.testing.assert_close(em, e, rtol=1e-10, atol=1e-10)


def test_ddim_eta1_is_ancestral_with_fixed_small_variance():
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for levels, pred in ((_chain(), "eps"), (flow_levels(20), "velocity")):
        a = ddpm_ancestral(_smooth, x, levels, prediction=pred, generator=torch.Generator())
        b = ddim(_smooth, x, levels, prediction=pred, eta=1.0, generator=torch.Generator())
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)  # same draws, same math


def test_heun_uses_2n_minus_1_calls_and_every_sampler_sees_level_timesteps():
    levels = flow_levels(5, shift=2.0)
    for fn, calls in ((euler, 5), (heun, 9), (ddim, 5), (ddpm_ancestral, 5)):
        seen = []

        def net(x, t, seen=seen):
            seen.append(float(t[0]))
            return torch.zeros_like(x)

        fn(net, torch.randn(2, 1, 2, 2), levels, prediction="velocity", generator=None)
        assert len(seen) == calls
        assert seen[0] == pytest.approx(1000.0)
        assert set(round(s, 3) for s in seen) <= set(round(float(t), 3) for t in levels.timesteps)


@pytest.mark.parametrize("levels", [_chain(), flow_levels(20)], ids=["ddpm", "flow"])
@pytest.mark.parametrize(
    "sampler,opts",
    [
        (ddpm_ancestral, {}),
        (ddim, {"eta": 1.0}),
        (euler, {}),
        (heun, {}),
        (euler_maruyama, {"sde_scale": 2.0}),
    ],
)
def test_every_sampler_ends_on_the_x0_of_its_last_prediction(levels, sampler, opts):
    # the last step, from level 0 to the data, returns x0_hat without noise (module docstring):
    # the moment tests allow ~1 / steps of error, so a stray term there would hide in them
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pred = "eps" if isinstance(levels, DDPMChain) else "velocity"
    seen = []

    def net(x_in, t):
        seen.append((x_in, t))
        return _smooth(x_in, t)

    out = sampler(net, x, levels, prediction=pred, generator=torch.Generator(), **opts)
    a, s = float(levels.alphas[0]), float(levels.sigmas[0])
    x_last, t_last = seen[-1]
    assert t_last[0] == float(levels.timesteps[0])
    x0_hat, _ = to_x0_eps(_smooth(x_last, t_last), x_last, a, s, pred)
    torch.testing.assert_close(out, x0_hat, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("path", ["vp", "flow"])
def test_prediction_round_trips_are_exact_in_float64(path):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, dtype=torch.float64, generator=g)
    eps = torch.randn(64, 3, dtype=torch.float64, generator=g)
    u = torch.rand(64, 1, dtype=torch.float64, generator=g) * 0.98 + 0.01
    a, s = ((1 - u).sqrt(), u.sqrt()) if path == "vp" else (1 - u, u)
    x = a * x0 + s * eps
    preds = [p for p in PREDICTIONS if p != "velocity" or path == "flow"]
    for p in preds:
        x0_hat, eps_hat = to_x0_eps(from_x0_eps(x0, eps, a, s, p), x, a, s, p)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)
        for q in preds:  # p -> (x0, eps) -> q equals the direct q target
            conv = from_x0_eps(x0_hat, eps_hat, a, s, q)
            torch.testing.assert_close(conv, from_x0_eps(x0, eps, a, s, q), rtol=0, atol=1e-12)
    if path == "flow":  # velocity = eps - x0 = v / (alpha + sigma)... on the flow path only
        torch.testing.assert_close(from_x0_eps(x0, eps, a, s, "velocity"), eps - x0)
    else:
        with pytest.raises(ValueError, match="rectified-flow path"):
            from_x0_eps(x0, eps, a, s, "velocity")


def test_conversions_refuse_what_is_not_identifiable():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="alpha = 0"):
        to_x0_eps(x, x, 0.0, 1.0, "eps")
    with pytest.raises(ValueError, match="sigma = 0"):
        to_x0_eps(x, x, 1.0, 0.0, "x0")
    with pytest.raises(ValueError, match=r"prediction must be one of"):
        to_x0_eps(x, x, 0.5, 0.5, "score")


# ---------------------------------------------------------------------------- guidance


def _label_net(x, t, cond):
    w = (cond.labels.float() + 1).view(-1, 1, 1, 1)
    return w * torch.sin(x) + 1e-3 * t.view(-1, 1, 1, 1)


def test_guidance_interval_and_channels():
    x = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = Cond(labels=torch.tensor([0, 1, 2, 3])), Cond(labels=torch.full((4,), 10))
    out_c, out_u = _label_net(x, torch.zeros(4), cond), _label_net(x, torch.zeros(4), uncond)
    full = out_u + 3.0 * (out_c - out_u)
    t_in, t_out = torch.full((4,), 500.0), torch.full((4,), 900.0)
    g = guided(_label_net, cond, uncond, 3.0, interval=(100.0, 600.0))
    torch.testing.assert_close(g(x, t_in), _label_net(x, t_in, uncond) + 3.0 * (
        _label_net(x, t_in, cond) - _label_net(x, t_in, uncond)))  # fmt: skip
    assert torch.equal(g(x, t_out), _label_net(x, t_out, cond))  # outside: conditional
    mixed = guided(_label_net, cond, uncond, 3.0)(x, torch.tensor([500.0, 900.0, 500.0, 0.0]))
    per = g(x, torch.tensor([500.0, 900.0, 500.0, 0.0]))  # per-sample decision
    assert torch.equal(per[[0, 2]], mixed[[0, 2]])
    dit = guided(_label_net, cond, uncond, 3.0, channels=3)(x, torch.zeros(4))
    torch.testing.assert_close(dit[:, :3], full[:, :3])  # DiT's released code: first 3 only
    assert torch.equal(dit[:, 3:], out_c[:, 3:])
    torch.testing.assert_close(guided(_label_net, cond, uncond, 3.0)(x, torch.zeros(4)), full)


def test_guidance_interval_includes_both_ends():
    # lo <= t <= hi (Kynkaanniemi et al.'s closed range): DiT's chain visits t = 0 and t = 999,
    # flow's grid t = 1000, so an interval named by its end levels must guide at them
    x = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = Cond(labels=torch.tensor([0, 1, 2, 3, 4])), Cond(labels=torch.full((5,), 10))
    t = torch.tensor([99.0, 100.0, 350.0, 600.0, 601.0])
    out = guided(_label_net, cond, uncond, 3.0, interval=(100.0, 600.0))(x, t)
    full = guided(_label_net, cond, uncond, 3.0)(x, t)
    assert torch.equal(out[1:4], full[1:4])
    assert torch.equal(out[[0, 4]], _label_net(x, t, cond)[[0, 4]])


@pytest.mark.parametrize(
    "key, interval, nearest",
    [("ddpm-eps", (500.0, 500.0), "489, 510"), ("flow-velocity", (0.0, 10.0), "20")],
)
def test_a_guidance_interval_between_the_grid_s_levels_is_refused(key, interval, nearest):
    # DDPM's 50 respaced steps skip t = 500 and flow's grid never reaches t = 0: guidance at
    # cfg_scale 3 ran as the plain conditional net, samples identical to cfg_scale 1
    obj = make(key)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = Cond(labels=torch.tensor([0, 1])), Cond(labels=torch.full((2,), 10))
    kw = dict(sampler="euler", steps=50, cfg_scale=3.0, uncond=uncond, cfg_interval=interval)
    with pytest.raises(ValueError, match=f"none of the 50 sampling levels.*nearest: {nearest}"):
        obj.sample(_label_net, x, cond, **kw)
    wider = (interval[0], interval[1] + 20.0)  # takes in a level: guided as before
    assert torch.isfinite(obj.sample(_label_net, x, cond, **(kw | {"cfg_interval": wider}))).all()


@pytest.mark.parametrize("key", ["ddpm-eps", "flow-velocity"])
@pytest.mark.parametrize("sampler", ["ddim", "heun", "euler_maruyama"])
def test_guided_sampling_scale1_is_conditional_and_null_label_is_unconditional(key, sampler):
    obj = make(key)
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = Cond(labels=torch.tensor([0, 1, 2, 3])), Cond(labels=torch.full((4,), 10))

    def run(c, scale, u=uncond):
        return obj.sample(_label_net, noise, c, sampler=sampler, steps=6, cfg_scale=scale,
                          uncond=u, generator=torch.Generator().manual_seed(1))  # fmt: skip

    assert torch.equal(run(cond, 1.0), run(cond, 1.0, None))
    torch.testing.assert_close(run(uncond, 4.0), run(uncond, 1.0))


# ---------------------------------------------------------------------------- generators


def test_randn_per_sample_rows_come_from_their_generator():
    gens = [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    z = randn((3, 2, 4), gens)
    for i, s in enumerate((3, 4, 5)):
        assert torch.equal(z[i], torch.randn(2, 4, generator=torch.Generator().manual_seed(s)))
    single = randn((1, 2, 4), torch.Generator().manual_seed(3))
    assert torch.equal(single[0], z[0])
    with pytest.raises(ValueError, match="one per"):
        randn((3, 2), gens[:2])


@pytest.mark.parametrize("key", ["ddpm-eps", "flow-velocity"])
@pytest.mark.parametrize(
    "sampler,opts",
    [("ddpm", {}), ("ddim", {"eta": 0.5}), ("euler_maruyama", {}), ("heun", {})],
)
def test_per_sample_generators_make_samples_independent_of_the_batch(key, sampler, opts):
    obj = make(key)
    seeds = [10, 11, 12, 13]
    noise = torch.stack([randn((3, 4, 4), torch.Generator().manual_seed(100 + s)) for s in seeds])

    def run(idx):
        gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
        return obj.sample(exact_net(obj), noise[idx], None, sampler=sampler, steps=8,
                          generator=gens, **opts)  # fmt: skip

    batch = run([0, 1, 2, 3])
    halves = torch.cat([run([0, 1]), run([2, 3])])
    singles = torch.cat([run([i]) for i in range(4)])
    torch.testing.assert_close(halves, batch, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(singles, batch, rtol=1e-6, atol=1e-6)
    one = obj.sample(exact_net(obj), noise[:1], None, sampler=sampler, steps=8,
                     generator=torch.Generator().manual_seed(seeds[0]), **opts)  # fmt: skip
    torch.testing.assert_close(one, batch[:1], rtol=1e-6, atol=1e-6)  # = a batch of one


# ---------------------------------------------------------------------------- errors


def test_sampler_option_errors_name_the_option():
    obj = make("flow-velocity")
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="eta is for sampler='ddim'"):
        obj.sample(exact_net(obj), x, None, sampler="euler", steps=2, eta=0.5)
    with pytest.raises(ValueError, match="eta must be in"):
        obj.sample(exact_net(obj), x, None, sampler="ddim", steps=2, eta=1.5)
    with pytest.raises(ValueError, match="sde_scale"):
        obj.sample(exact_net(obj), x, None, sampler="euler_maruyama", steps=2, sde_scale=-1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        obj.sample(exact_net(obj), x, None, sampler="dpm++", steps=2)
    with pytest.raises(ValueError, match="steps"):
        obj.sample(exact_net(obj), x, None, steps=0)
    x0 = obj.sample(lambda x, t, c: -10 * torch.ones_like(x), x, None, steps=2, clip_x0=True)
    assert x0.abs().max() <= 1  # clipping on request; off by default:
    assert obj.sample(lambda x, t, c: -10 * torch.ones_like(x), x, None, steps=2).abs().max() > 1
