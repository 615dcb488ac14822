"""Math tests of the flow-matching objective (SD3 rectified flow): time densities, the shift,
oracle and optimal losses on Gaussian data, the fixed validation protocol; and the optimal loss
of every objective and prediction against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

from dit_bench.objectives import build_objective
from dit_bench.objectives.ddpm import DDPM
from dit_bench.objectives.flow import (
    Flow,
    f_mode,
    flow_levels,
    logit_normal_pdf,
    sample_time,
    shift_time,
)

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 0.5, 0.3


# ---------------------------------------------------------------------------- time


def test_shift_function():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    sh = shift_time(t, 3.0)
    assert sh[0] == 0 and sh[-1] == 1 and (sh.diff() > 0).all() and (sh >= t).all()
    assert shift_time(torch.tensor(0.5, dtype=torch.float64), 3.0).item() == pytest.approx(0.75)
    torch.testing.assert_close(shift_time(sh, 1 / 3.0), t)  # the inverse is the 1/a shift
    # SD3 eq. 23: the flow SNR ((1 - t) / t)^2 is divided by a^2
    inner = t[1:-1]
    snr = ((1 - inner) / inner) ** 2
    sh_in = shift_time(inner, 3.0)
    torch.testing.assert_close(((1 - sh_in) / sh_in) ** 2, snr / 9, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shift", [1e-6, 1e-3, 1 / 3, 0.1, 3.0, 1e6])
def test_shift_keeps_t_in_0_1_and_exactly_1_at_noise_in_float32(shift):
    # 1 + (a - 1) t cancels for a < 1 near t = 1: in float32 the training times came out as
    # 1.0000001 (a = 1/3, x_t with a negative alpha) or 0.987 at t = 1 (a = 1e-6, 1.3% off)
    t = torch.tensor([0.0, 2**-24, 0.5, 1 - 2**-24, 1.0])  # float32, as sample_t draws them
    sh = shift_time(t, shift)
    exact = shift * t.double() / (1 + (shift - 1) * t.double())
    assert sh[0] == 0 and sh[-1] == 1 and sh.max() <= 1
    torch.testing.assert_close(sh.double(), exact, rtol=1e-6, atol=0)
    assert flow_levels(1, shift).sigmas.item() == 1.0  # the grid's top level is pure noise


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.5, 0.7), (-1.0, 1.5)])
def test_logit_normal_moments(m, s):
    n = 200_000
    t = sample_time(n, "logit_normal", generator=torch.Generator().manual_seed(0),
                    logit_mean=m, logit_std=s).double()  # fmt: skip
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(logit.mean().item() - m) < 5 * s / math.sqrt(n)
    assert abs(logit.std().item() - s) < 5 * s / math.sqrt(2 * n)
    # the SD3 eq. 19 density integrates to 1, and its mean is the samples' mean
    grid = torch.linspace(1e-7, 1 - 1e-7, 400_001, dtype=torch.float64)
    pdf = logit_normal_pdf(grid, m, s)
    assert torch.trapezoid(pdf, grid).item() == pytest.approx(1.0, abs=1e-4)
    mean = torch.trapezoid(grid * pdf, grid).item()
    assert abs(t.mean().item() - mean) < 5 * t.std().item() / math.sqrt(n)


def test_mode_density():
    u = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    assert torch.equal(f_mode(u, 0.0), 1 - u)  # scale 0: uniform
    for scale in (1.29, -0.5, 1.75):
        f = f_mode(u, scale)
        assert f[0] == 1 and abs(f[-1].item()) < 1e-12 and (f.diff() <= 1e-15).all()  # onto [0,1]
        torch.testing.assert_close(f_mode(1 - u, scale), 1 - f)  # symmetric about t = 1/2
    n = 200_000
    for scale in (1.29, -0.5):
        t = sample_time(n, "mode", generator=torch.Generator().manual_seed(1), mode_scale=scale)
        var = torch.trapezoid((f_mode(u, scale) - 0.5) ** 2, u).item()  # E over u ~ U(0, 1)
        assert abs(t.double().mean().item() - 0.5) < 5 * math.sqrt(var / n)
        assert abs(t.double().var().item() - var) < 5 * var * math.sqrt(2 / n) * 1.5
        assert (var < 1 / 12) == (scale > 0)  # positive scale: more weight on the middle
    t = sample_time(n, "uniform", generator=torch.Generator().manual_seed(2))
    assert abs(t.mean().item() - 0.5) < 5 / math.sqrt(12 * n)


def test_sampling_grid():
    lv = flow_levels(4)
    torch.testing.assert_close(lv.sigmas, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(lv.alphas + lv.sigmas, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(lv.timesteps, 1000 * lv.sigmas)
    torch.testing.assert_close(flow_levels(4, 3.0).sigmas, shift_time(lv.sigmas, 3.0))


# ---------------------------------------------------------------------------- losses


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_oracle_gives_zero_loss(prediction, density):
    obj = Flow(prediction=prediction, density=density, shift=2.0)
    x0 = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # reproduce the objective's draws (t first, then noise) from the same seed
    g = torch.Generator().manual_seed(7)
    t_true = shift_time(sample_time(16, density, generator=g), 2.0)
    noise = torch.randn(x0.shape, generator=g)

    def oracle(x_t, t, cond):
        assert t.dtype == torch.float32 and torch.equal(t, 1000 * t_true)
        tt = t_true.view(-1, 1, 1, 1)
        assert torch.equal(x_t, (1 - tt) * x0 + tt * noise)
        return noise - x0 if prediction == "velocity" else x0

    out = obj.loss(oracle, x0, None, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out["t"], t_true) and out["loss"].shape == (16,)
    assert torch.equal(out["loss"], torch.zeros(16))


def _coeffs(prediction, a, s):
    """target = A x0 + B eps at x_t = a x0 + s eps."""
    return {"eps": (0 * a, 1 + 0 * a), "x0": (1 + 0 * a, 0 * a), "v": (-s, a),
            "velocity": (-1 + 0 * a, 1 + 0 * a)}[prediction]  # fmt: skip


def _path(obj, t):
    """(alpha, sigma) at the timesteps a net receives."""
    if isinstance(obj, DDPM):
        ab = obj.alphas_cumprod[t.long()]
        return ab.sqrt(), (1 - ab).sqrt()
    return 1 - t.double() / 1000, t.double() / 1000


def _optimal(obj):
    def net(x, t, cond):
        a, s = (c.view(-1, 1, 1, 1) for c in _path(obj, t))
        A, B = _coeffs(obj.prediction, a, s)
        d = a * a * S**2 + s * s
        return (A * MU + (A * a * S**2 + B * s) / d * (x.double() - a * MU)).float()

    return net


def _min_mse(prediction, a, s):
    """Per-dim Var[target | x_t] = Var(target) - Cov(target, x_t)^2 / Var(x_t)."""
    A, B = _coeffs(prediction, a, s)
    d = a * a * S**2 + s * s
    return A * A * S**2 + B * B - (A * a * S**2 + B * s) ** 2 / d


CASES = [
    dict(name="ddpm", prediction="eps"),
    dict(name="ddpm", prediction="v"),
    dict(name="ddpm", prediction="v", schedule="cosine"),
    dict(name="flow", prediction="velocity"),
    dict(name="flow", prediction="x0"),
    dict(name="flow", prediction="velocity", density="uniform"),
    dict(name="flow", prediction="velocity", density="mode", shift=3.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_optimal_loss_equals_analytic_value(case):
    kw = dict(case)
    obj = build_objective(kw.pop("name"), **kw)
    b, dim = 4096, 3 * 8 * 8
    x0 = MU + S * torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = obj.loss(_optimal(obj), x0, None, generator=torch.Generator().manual_seed(3))
    t_net = out["t"].double() if isinstance(obj, DDPM) else 1000 * out["t"].double()
    m = _min_mse(obj.prediction, *_path(obj, t_net))  # (B,) analytic minimum at the drawn t
    # given t, a sample's loss is m(t) chi2_D / D: variance 2 m^2 / D
    se = (2 * m.pow(2) / dim).sum().sqrt().item() / b
    assert abs(out["loss"].double().mean().item() - m.mean().item()) < 5 * se + 1e-6
    # and against the expectation over the time density (quadrature / all T steps)
    if isinstance(obj, DDPM):
        m_all = _min_mse(obj.prediction, obj.alphas_cumprod.sqrt(), (1 - obj.alphas_cumprod).sqrt())
        expected, spread = m_all.mean().item(), m_all.std().item()
    else:
        t = obj.sample_t(400_000, generator=torch.Generator().manual_seed(4)).double()
        m_all = _min_mse(obj.prediction, 1 - t, t)
        expected, spread = m_all.mean().item(), m_all.std().item()
    assert abs(out["loss"].double().mean().item() - expected) < 5 * (se + spread / math.sqrt(b))


def test_val_loss_protocol_uses_sd3_levels_and_reaches_the_optimum():
    obj = Flow()
    x0 = MU + S * torch.randn(2048, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    seen = []

    def net(x, t, cond):
        seen.append(float(t[0]))
        return _optimal(obj)(x, t, cond)

    res = obj.val_loss(net, x0, None, seed=0)
    assert seen == [0.0, 125.0, 250.0, 375.0, 500.0, 625.0, 750.0, 875.0]  # t = 1 left out
    t = torch.arange(8, dtype=torch.float64) / 8
    m = _min_mse("velocity", 1 - t, t)
    se = m * math.sqrt(2 / x0[0].numel() / x0.shape[0])
    assert ((res["per_level"].double() - m).abs() < 5 * se).all()
    again = obj.val_loss(net, x0, None, seed=0)
    assert torch.equal(res["per_level"], again["per_level"]) and res["loss"].shape == ()
    assert not torch.equal(res["per_level"], obj.val_loss(net, x0, None, seed=1)["per_level"])
    assert torch.equal(res["loss"], res["per_level"].mean())
    assert obj.val_loss(net, x0[:4], None, levels=3)["per_level"].shape == (3,)
    # not shifted: the same grid whatever the training shift
    seen.clear()
    Flow(shift=3.0).val_loss(net, x0[:2], None)
    assert seen[:3] == [0.0, 125.0, 250.0]


def test_bad_arguments_name_allowed_values():
    with pytest.raises(ValueError, match=r"prediction.*velocity.*x0"):
        Flow(prediction="eps")
    with pytest.raises(ValueError, match=r"density.*uniform.*logit_normal.*mode"):
        Flow(density="beta")
    with pytest.raises(ValueError, match="mode_scale"):
        Flow(mode_scale=3.0)
    with pytest.raises(ValueError, match="shift"):
        Flow(shift=0.0)
    with pytest.raises(ValueError, match="learn_sigma"):
        Flow().loss(lambda x, t, c: torch.cat([x, x], 1), torch.zeros(2, 3, 4, 4), None)
    with pytest.raises(ValueError, match="levels"):
        Flow().val_loss(lambda x, t, c: x, torch.zeros(2, 3, 4, 4), None, levels=0)


@pytest.mark.parametrize(
    "objective,out_channels",
    [
        (Flow(prediction="velocity"), 3),
        (Flow(prediction="x0", density="mode", shift=3.0), 3),
        (DDPM(prediction="eps"), 3),
        (DDPM(prediction="v", schedule="cosine"), 3),
        (DDPM(prediction="eps"), 6),  # learned sigma: the hybrid loss with its vb term
    ],
    ids=["flow-velocity", "flow-x0", "ddpm-eps", "ddpm-v", "ddpm-learned-sigma"],
)
def test_training_loss_reads_nothing_back_from_the_device(objective, out_channels):
    """The training loss never turns a device tensor into a Python value: on CUDA that is a
    host-device sync every step. On the meta device any such read (item(), bool(), allclose)
    raises, so this checks on a CPU what tests/test_cuda_fast_paths.py checks on a GPU."""

    def net(x, t, cond):
        return x.new_zeros(x.shape[0], out_channels, *x.shape[2:])

    x0 = torch.empty(4, 3, 8, 8, device="meta")
    out = objective.loss(net, x0, None)
    assert out["loss"].shape == (4,) and out["loss"].device.type == "meta"
