"""DDPM objective: noise schedules, noising, eps / v targets, the learned-sigma hybrid loss.

The objective owns time sampling, noising, the target and the per-sample loss (STYLE 7); the
trainer only averages. Nets are any callable `net(x_t, timesteps, cond)`; `timesteps` is a float
tensor holding the training step index 0..T-1 (DiT's convention, also on a respaced chain).

References
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239):
  eq. 4 (q(x_t | x_0) = N(sqrt(ab) x_0, (1 - ab) I)), eq. 6-7 (posterior q(x_{t-1} | x_t, x_0)),
  eq. 14 (L_simple, the eps MSE), §4 (linear betas 1e-4 .. 0.02 over T = 1000).
- Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (arXiv:2102.09672):
  eq. 15 (learned variance: log Sigma = v log beta + (1 - v) log beta_tilde, v = (out + 1) / 2),
  eq. 16 (L_hybrid = L_simple + lambda L_vlb, lambda = 0.001, L_vlb's mean term with a
  stop-gradient), eq. 17 (cosine schedule, s = 0.008, betas clipped at 0.999), and the
  discretised Gaussian decoder L_0 of Ho et al. §3.3, all as in openai/improved-diffusion.
- Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
  (arXiv:2202.00512), §4 / App. D: v = sqrt(ab) eps - sqrt(1 - ab) x_0.
- Peebles, Xie 2023, "Scalable Diffusion Models with Transformers" (DiT, arXiv:2212.09748):
  linear schedule, learned sigma, hybrid loss, 250-step respaced ancestral sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dit_bench.objectives.losses import at_least_f32, mean_flat
from dit_bench.sampling import GeneratorArg, draw_slice, respace, respaced_betas, split_output
from dit_bench.sampling import sample as run_sampler

PREDICTIONS = ("eps", "v")


# --------------------------------------------------------------------------------------------
# Schedules: pure functions of T, float64 (DiT computes them in numpy float64)
# --------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int) -> Tensor:
    """Ho et al. 2020 §4: betas linear from 1e-4 to 0.02; scaled by 1000 / T as improved-diffusion
    so other T keep the same total noise (T = 1000: alpha_bar[999] = 4.0358e-5)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2;
    beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at 0.999 to avoid the singularity at t = T."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int], Tensor]] = {"linear": linear_betas, "cosine": cosine_betas}


# --------------------------------------------------------------------------------------------
# The chain: a value object holding every coefficient of a (possibly respaced) DDPM
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDPMChain:
    """The Gaussian chain on the kept steps `timesteps` (all of 0..T-1 for training).

    `alphas_cumprod[i]` is alpha_bar at training step `timesteps[i]`; every other coefficient is
    derived once, in float64 (improved-diffusion GaussianDiffusion.__init__). Methods take `i`,
    a (B,) or (1,) long tensor of chain indices (equal to the training step on the full chain).
    """

    alphas_cumprod: Tensor  # (N,) float64
    timesteps: Tensor  # (N,) long, the training step each chain index stands for
    betas: Tensor = field(init=False)
    sqrt_alphas_cumprod: Tensor = field(init=False)
    sqrt_one_minus_alphas_cumprod: Tensor = field(init=False)
    sqrt_recip_alphas_cumprod: Tensor = field(init=False)
    sqrt_recipm1_alphas_cumprod: Tensor = field(init=False)
    log_betas: Tensor = field(init=False)
    posterior_variance: Tensor = field(init=False)
    posterior_log_variance_clipped: Tensor = field(init=False)
    posterior_mean_coef1: Tensor = field(init=False)
    posterior_mean_coef2: Tensor = field(init=False)
    # (name, device, dtype) -> coefficient cast and copied once: a pure memo, so gathering
    # coefficients inside a training step never copies host-to-device (which syncs the stream)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ab = self.alphas_cumprod.to(torch.float64)
        betas = respaced_betas(ab)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        # eq. 7: beta_tilde = beta (1 - ab_prev) / (1 - ab); 0 at i = 0
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        # log(0) at i = 0: use beta_tilde_1 there, as improved-diffusion (only matters for the
        # learned-variance interpolation and the KL; no noise is added at i = 0)
        first = post_var[1:2] if len(ab) > 1 else betas[:1]
        sets = {
            "alphas_cumprod": ab,
            "betas": betas,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ab).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ab - 1.0).sqrt(),
            "log_betas": betas.log(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": torch.log(torch.cat([first, post_var[1:]])),
            "posterior_mean_coef1": betas * ab_prev.sqrt() / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * (1.0 - betas).sqrt() / (1.0 - ab),
        }
        for name, value in sets.items():
            object.__setattr__(self, name, value)  # frozen: derived once, never changed

    def _at(self, name: str, i: Tensor, like: Tensor) -> Tensor:
        """Coefficient `name` at chain indices i, shaped (B, 1, 1, ...) to broadcast against
        `like`, in like's dtype and device. Cast on the CPU before the copy: no float64 kernel
        on the device (MPS has none); casting before or after indexing gives the same values."""
        key = (name, like.device, like.dtype)
        coef = self._cache.get(key)
        if coef is None:
            coef = getattr(self, name).to(dtype=like.dtype).to(like.device)
            self._cache[key] = coef
        return coef[i.to(like.device)].view(-1, *([1] * (like.dim() - 1)))

    @property
    def alphas(self) -> Tensor:
        """(N,) float64 alpha of x_t = alpha x0 + sigma eps: the sampler interface (sampling.py)."""
        return self.sqrt_alphas_cumprod

    @property
    def sigmas(self) -> Tensor:
        """(N,) float64 sigma of x_t = alpha x0 + sigma eps."""
        return self.sqrt_one_minus_alphas_cumprod

    @classmethod
    def respaced(cls, alphas_cumprod: Tensor, steps: int) -> DDPMChain:
        """The chain on `respace(T, steps)` of a T-step schedule (steps = T: the full chain)."""
        kept = respace(len(alphas_cumprod), steps)
        return cls(alphas_cumprod[kept], torch.tensor(kept, dtype=torch.long))

    # -- forward process ---------------------------------------------------------------------

    def q_sample(self, x0: Tensor, noise: Tensor, i: Tensor) -> Tensor:
        """Ho et al. eq. 4: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps."""
        a = self._at("sqrt_alphas_cumprod", i, x0)
        s = self._at("sqrt_one_minus_alphas_cumprod", i, x0)
        return a * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, i: Tensor, prediction: str) -> Tensor:
        """What the net regresses: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho)."""
        if prediction == "eps":
            return noise
        if prediction == "v":
            a = self._at("sqrt_alphas_cumprod", i, x0)
            s = self._at("sqrt_one_minus_alphas_cumprod", i, x0)
            return a * noise - s * x0
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    def predict_x0(self, pred: Tensor, x_t: Tensor, i: Tensor, prediction: str) -> Tensor:
        """x0 implied by the net's eps or v prediction at x_t."""
        if prediction == "eps":  # x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab), improved-diffusion form
            r = self._at("sqrt_recip_alphas_cumprod", i, x_t)
            rm1 = self._at("sqrt_recipm1_alphas_cumprod", i, x_t)
            return r * x_t - rm1 * pred
        if prediction == "v":  # x0 = sqrt(ab) x_t - sqrt(1 - ab) v
            a = self._at("sqrt_alphas_cumprod", i, x_t)
            s = self._at("sqrt_one_minus_alphas_cumprod", i, x_t)
            return a * x_t - s * pred
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

    # -- reverse process ---------------------------------------------------------------------

    def q_posterior(self, x0: Tensor, x_t: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
        """Ho et al. eq. 6-7: mean and (clipped) log variance of q(x_{t-1} | x_t, x0)."""
        mean = (
            self._at("posterior_mean_coef1", i, x_t) * x0
            + self._at("posterior_mean_coef2", i, x_t) * x_t
        )
        return mean, self._at("posterior_log_variance_clipped", i, x_t).expand_as(x_t)

    def p_mean_log_var(
        self, out: Tensor, x_t: Tensor, i: Tensor, *, prediction: str, clip_x0: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, log variance and predicted x0 of p(x_{t-1} | x_t) from the raw net output.

        C output channels: fixed small variance (beta_tilde, clipped). 2C channels: the last C
        are v in [-1, 1], log var = frac log beta + (1 - frac) log beta_tilde_clipped,
        frac = (v + 1) / 2 (Nichol & Dhariwal eq. 15).
        """
        pred, var_values = split_output(out, x_t.shape[1])
        min_log = self._at("posterior_log_variance_clipped", i, x_t)
        if var_values is None:
            log_var = min_log.expand_as(x_t)
        else:
            frac = (var_values + 1) / 2
            log_var = frac * self._at("log_betas", i, x_t) + (1 - frac) * min_log
        x0 = self.predict_x0(pred, x_t, i, prediction)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, i)
        return mean, log_var, x0


# --------------------------------------------------------------------------------------------
# Likelihood pieces of L_vlb (in nats; converted to bits/dim by the caller)
# --------------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )  # fmt: skip


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    # the tanh approximation improved-diffusion and DiT use, kept for loss parity with them
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) under N(means, e^(2 log_scales)) discretised to 256 bins on [-1, 1]
    (Ho et al. 2020 §3.3, L_0), edge bins extended to +-inf; elementwise, in nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


class DDPM:
    """Discrete-time DDPM with eps or v prediction and optional learned sigma (iDDPM / DiT)."""

    VAL_LEVELS = 10  # the validation grid's levels unless eval.val_levels says otherwise
    # in summary.json: the grid's kind, so a report tells runs of the old grid (both ends, before
    # this was written; the key absent) from these: their val losses are other quantities
    VAL_GRID = "midpoints"

    # Nichol & Dhariwal eq. 16. L_vlb = sum_t L_t is estimated by T * L_t at a uniform t, so the
    # weight on the sampled term is lambda * T = 1 at T = 1000: exactly DiT's `mse + vb`.
    VLB_WEIGHT = 1e-3

    def __init__(
        self, *, schedule: str = "linear", prediction: str = "eps", num_timesteps: int = 1000
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        # improved-diffusion scales the linear betas by 1000 / T: beta_T = 20 / T reaches 1 at
        # T = 20 and alpha_bar hits 0 (every loss NaN); the same check as config.DDPMConfig
        if schedule == "linear" and num_timesteps <= 20:
            raise ValueError(
                f"num_timesteps={num_timesteps}: the linear schedule needs more than 20 (its "
                "last beta, 0.02 * 1000 / T, must stay below 1); or schedule: cosine"
            )
        self.schedule = schedule
        self.prediction = prediction
        self.num_timesteps = num_timesteps
        self.betas = SCHEDULES[schedule](num_timesteps)  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) float64
        # betas re-derived from alpha_bar, as DiT's SpacedDiffusion does even for training
        self.chain = DDPMChain.respaced(self.alphas_cumprod, num_timesteps)

    def __repr__(self) -> str:
        return (
            f"DDPM(schedule={self.schedule!r}, prediction={self.prediction!r}, "
            f"num_timesteps={self.num_timesteps})"
        )

    # -- training ----------------------------------------------------------------------------

    def loss(
        self,
        net: Callable,
        x0: Tensor,
        cond: Any,
        *,
        generator: torch.Generator | None = None,
        batch_slice: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training loss at t ~ U{0..T-1}.

        Draws from `generator` (on x0's device) in this order: t (randint), then the noise
        (randn like x0). Returns {"loss": (B,), "t": (B,)}; with a 2C-channel (learned sigma)
        net also "mse" (L_simple) and "vb" (L_t in bits/dim, computed with the mean prediction
        detached so it only trains the variance), loss = mse + lambda * T * vb.
        `batch_slice=(start, total)`: x0 is rows start.. of a global batch of `total` split over
        processes; the draws are made for the whole global batch and sliced (see `draw_slice`).
        """
        chain, channels = self.chain, x0.shape[1]
        t = draw_slice(
            lambda n: torch.randint(
                0, self.num_timesteps, (n,), device=x0.device, generator=generator
            ),
            x0.shape[0],
            batch_slice,
        )
        noise = draw_slice(
            lambda n: torch.randn(
                (n, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype
            ),
            x0.shape[0],
            batch_slice,
        )
        x_t = chain.q_sample(x0, noise, t)
        out = net(x_t, t.to(torch.float32), cond)
        pred, var_values = split_output(out, channels)
        target = chain.target(x0, noise, t, self.prediction)
        mse = mean_flat((at_least_f32(target) - at_least_f32(pred)) ** 2)
        if var_values is None:
            return {"loss": mse, "t": t}
        # stop-gradient on the mean (Nichol & Dhariwal §3.1): L_vlb only trains Sigma
        frozen = torch.cat([pred.detach(), var_values], dim=1)
        vb = self.vb_bits_per_dim(at_least_f32(frozen), x0, x_t, t)
        loss = mse + self.VLB_WEIGHT * self.num_timesteps * vb
        return {"loss": loss, "mse": mse, "vb": vb, "t": t}

    def vb_bits_per_dim(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_t of the variational bound, per sample, in bits/dim: KL(q posterior || p) for t > 0,
        the discretised Gaussian decoder NLL for t = 0 (improved-diffusion `_vb_terms_bpd`)."""
        x0, x_t = at_least_f32(x0), at_least_f32(x_t)
        true_mean, true_log_var = self.chain.q_posterior(x0, x_t, t)
        mean, log_var, _ = self.chain.p_mean_log_var(out, x_t, t, prediction=self.prediction)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_var)
        ) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def val_timesteps(self, levels: int) -> Tensor:
        """The validation grid: the midpoints of `levels` equal parts of 0..T-1 (50, 150, ...,
        950 at T = 1000, levels = 10), so its mean estimates the training loss at a uniform t;
        levels = T is every timestep. It took both ends (0, 111, ..., 999) before: t = 0,
        whose noise sd is 0.01, weighed 1/10 against training's 1/1000, and was 72% of a
        conditioning-cpu run's val loss, its seed noise most of the seed noise of the mean."""
        return ((torch.arange(levels) + 0.5) * self.num_timesteps / levels).long()  # (levels,)

    @torch.no_grad()
    def val_loss(
        self, net: Callable, x0: Tensor, cond: Any, *, seed: int = 0, levels: int = VAL_LEVELS
    ) -> dict[str, Tensor]:
        """Fixed validation protocol, comparable across runs: the simple eps / v MSE at the
        grid `val_timesteps(levels)`, noise from a CPU generator seeded with `seed` (so the same
        seed gives the same noise on every device), one draw per level, in order.
        Returns {"loss": scalar mean over levels, "per_level": (levels,) batch means}."""
        if not isinstance(levels, int) or not 1 <= levels <= self.num_timesteps:
            raise ValueError(f"levels must be an int in [1, {self.num_timesteps}], got {levels!r}")
        steps = self.val_timesteps(levels)
        gen = torch.Generator().manual_seed(seed)
        per_level = []
        for step in steps.tolist():
            noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            x_t = self.chain.q_sample(x0, noise, t)
            pred, _ = split_output(net(x_t, t.to(torch.float32), cond), x0.shape[1])
            target = self.chain.target(x0, noise, t, self.prediction)
            per_level.append(((at_least_f32(target) - at_least_f32(pred)) ** 2).mean())
        per_level_t = torch.stack(per_level)
        return {"loss": per_level_t.mean(), "per_level": per_level_t}

    # -- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        net: Callable,
        noise: Tensor,
        cond: Any,
        *,
        sampler: str = "ddpm",
        steps: int = 250,
        cfg_scale: float = 1.0,
        uncond: Any = None,
        generator: GeneratorArg = None,
        clip_x0: bool = False,
        progress: bool = False,
        cfg_interval: tuple[float, float] | None = None,
        cfg_channels: int | None = None,
        **options: Any,
    ) -> Tensor:
        """Samples from x_T = `noise` with `sampler` (any of sampling.SAMPLERS) on the chain
        respaced to `steps` steps; cfg_scale != 1 applies classifier-free guidance against
        `uncond` (see sampling.guided); `options`: the sampler's own (eta, sde_scale).
        `generator`: one torch.Generator or one per sample (sampling.randn)."""
        if steps < 2:  # respace keeps only t = 0: pure noise would be denoised as nearly clean
            raise ValueError(f"DDPM sampling needs 2 or more steps, got {steps}")
        return run_sampler(
            net,
            noise,
            cond,
            DDPMChain.respaced(self.alphas_cumprod, steps),
            prediction=self.prediction,
            sampler=sampler,
            cfg_scale=cfg_scale,
            uncond=uncond,
            cfg_interval=cfg_interval,
            cfg_channels=cfg_channels,
            generator=generator,
            clip_x0=clip_x0,
            progress=progress,
            **options,
        )
