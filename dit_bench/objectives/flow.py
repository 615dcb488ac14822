"""Flow matching (rectified flow) objective: time densities, the SD3 shift, velocity loss.

SD3 convention (DESIGN.md): x_t = (1 - t) x0 + t noise, t = 1 is pure noise, the velocity
dx_t/dt = noise - x0 is the target; the net receives timesteps 1000 t. The objective owns time
sampling, noising, the target and the per-sample loss (STYLE 7). The path is the Gaussian path
alpha = 1 - t, sigma = t, so every sampler of `dit_bench.sampling` runs it (NoiseLevels).

References
- Liu, Gong, Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
  Rectified Flow" (arXiv:2209.03003); Lipman et al. 2023, "Flow Matching for Generative
  Modeling" (arXiv:2210.02747): the linear path and its velocity target.
- Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
  (SD3, arXiv:2403.03206): §3.1 time densities, eq. 19 (logit-normal, m = 0, s = 1 default),
  eq. 20 (mode sampling with heavy tails, f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u)),
  §5.3.2 eq. 23 (resolution shift t' = a t / (1 + (a - 1) t)), §5.1 (validation loss at eight
  equally spaced t in [0, 1), t = 1 left out).
- Ma et al. 2024, "SiT" (arXiv:2401.08740): the same path in mirrored time (t_sit = 1 - t,
  v_sit = -v), uniform time density.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dit_bench.objectives.losses import at_least_f32, mean_flat
from dit_bench.sampling import GeneratorArg, NoiseLevels, draw_slice, from_x0_eps
from dit_bench.sampling import sample as run_sampler

PREDICTIONS = ("velocity", "x0")
DENSITIES = ("uniform", "logit_normal", "mode")
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))  # f_mode is monotone on [0, 1] (SD3 §3.1)


# --------------------------------------------------------------------------------------------
# Time: densities and the resolution shift (pure functions)
# --------------------------------------------------------------------------------------------


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 eq. 23: t' = a t / (1 + (a - 1) t). Keeps 0 and 1; a > 1 moves time towards noise,
    dividing the signal-to-noise ratio (1 - t)^2 / t^2 by a^2 (a = sqrt(m / n) for m pixels
    trained at n)."""
    if shift == 1.0:
        return t
    # 1 + (a - 1) t written as a t + (1 - t): a sum of two non-negative terms, where the
    # former cancels for a < 1 near t = 1 (float32 t = 1 gave 1.0000001 at a = 1/3, 0.987 at
    # a = 1e-6); this form keeps t' in [0, 1] and t = 1 at exactly 1 in every dtype
    return shift * t / (shift * t + (1 - t))


def f_mode(u: Tensor, scale: float) -> Tensor:
    """SD3 eq. 20: the map of u ~ U(0, 1) to t for mode sampling (scale = 0: uniform)."""
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def logit_normal_pdf(t: Tensor, m: float = 0.0, s: float = 1.0) -> Tensor:
    """SD3 eq. 19: pi_ln(t; m, s) = exp(-(logit t - m)^2 / (2 s^2)) / (s sqrt(2 pi) t (1 - t))."""
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def sample_time(
    n: int,
    density: str,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> Tensor:
    """(n,) float32 training times from `density` (SD3 §3.1), before any shift: uniform on
    [0, 1); logit_normal: sigmoid(m + s z), z ~ N(0, 1); mode: f_mode(u; mode_scale).
    One draw of n numbers from `generator`."""
    if density == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if density == "logit_normal":
        z = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(logit_mean + logit_std * z)
    if density == "mode":
        return f_mode(torch.rand(n, generator=generator, device=device), mode_scale)
    raise ValueError(f"density must be one of {list(DENSITIES)}, got {density!r}")


def flow_levels(steps: int, shift: float = 1.0) -> NoiseLevels:
    """The sampling grid: t_k = shift(k / steps), k = 1..steps (k = 0, the data, is implicit),
    equally spaced before the shift as in SD3 / diffusers' FlowMatchEulerDiscreteScheduler."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    t = shift_time(torch.arange(1, steps + 1, dtype=torch.float64) / steps, shift)
    return NoiseLevels(timesteps=1000 * t, alphas=1 - t, sigmas=t)


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


class Flow:
    """Rectified-flow matching with a velocity (or x0) target, SD3's time densities and shift.

    The loss is the plain MSE of the chosen target, unweighted: velocity (SD3's "rf") or x0
    (its MSE is the velocity MSE times t^2, i.e. a different weighting over t).
    """

    VAL_LEVELS = 8  # the validation grid's levels unless eval.val_levels says otherwise

    def __init__(
        self,
        *,
        prediction: str = "velocity",
        density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
        if density not in DENSITIES:
            raise ValueError(f"density must be one of {list(DENSITIES)}, got {density!r}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        lo, hi = MODE_SCALE_RANGE
        if not lo <= mode_scale <= hi:
            raise ValueError(f"mode_scale must be in [{lo}, {hi:.4f}] (monotone f_mode)")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.prediction = prediction
        self.density = density
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.shift = shift

    def __repr__(self) -> str:
        return (
            f"Flow(prediction={self.prediction!r}, density={self.density!r}, "
            f"logit_mean={self.logit_mean}, logit_std={self.logit_std}, "
            f"mode_scale={self.mode_scale}, shift={self.shift})"
        )

    def sample_t(self, n: int, *, generator=None, device=None) -> Tensor:
        """(n,) training times: the density, then the shift."""
        t = sample_time(
            n,
            self.density,
            generator=generator,
            device=device,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
        )
        return shift_time(t, self.shift)

    def _out(self, net: Callable, x_t: Tensor, t: Tensor, cond: Any, channels: int) -> Tensor:
        out = net(x_t, 1000 * t.to(torch.float32), cond)
        if out.shape[1] != channels:
            raise ValueError(
                f"net output has {out.shape[1]} channels; flow matching needs {channels} "
                "(it has no learned variance: set backbone.learn_sigma=false)"
            )
        return out

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
        """Per-sample loss at t from the time density: draws t first, then the noise, from
        `generator`. x_t = (1 - t) x0 + t noise; target noise - x0 (velocity) or x0.
        Returns {"loss": (B,), "t": (B,) float32 in [0, 1]}. `batch_slice`: as DDPM.loss."""
        b = x0.shape[0]
        t = draw_slice(
            lambda n: self.sample_t(n, generator=generator, device=x0.device), b, batch_slice
        )
        noise = draw_slice(
            lambda n: torch.randn(
                (n, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype
            ),
            b,
            batch_slice,
        )
        tt = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - tt) * x0 + tt * noise
        pred = self._out(net, x_t, t, cond, x0.shape[1])
        # the target written out, not from_x0_eps: its flow-path check on the tensor tt would
        # read the device every step (a host sync on CUDA); here the path holds by construction
        target = noise - x0 if self.prediction == "velocity" else x0
        return {"loss": mean_flat((at_least_f32(target) - at_least_f32(pred)) ** 2), "t": t}

    @torch.no_grad()
    def val_loss(
        self, net: Callable, x0: Tensor, cond: Any, *, seed: int = 0, levels: int = VAL_LEVELS
    ) -> dict[str, Tensor]:
        """Fixed validation protocol (SD3 §5.1): the training MSE at t = k / levels,
        k = 0..levels-1 (equally spaced, t = 1 left out; not shifted, so runs with different
        shifts compare), noise from a CPU generator seeded with `seed`, one draw per level in
        order. Returns {"loss": scalar mean over levels, "per_level": (levels,) batch means}.
        Not on the scale of DDPM's val loss (a different target and time grid)."""
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an int >= 1, got {levels!r}")
        gen = torch.Generator().manual_seed(seed)
        per_level = []
        for k in range(levels):
            noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
            t = torch.full((x0.shape[0],), k / levels, device=x0.device)
            x_t = (1 - k / levels) * x0 + (k / levels) * noise
            pred = self._out(net, x_t, t, cond, x0.shape[1])
            target = from_x0_eps(x0, noise, 1 - k / levels, k / levels, self.prediction)
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
        sampler: str = "euler",
        steps: int = 50,
        cfg_scale: float = 1.0,
        uncond: Any = None,
        generator: GeneratorArg = None,
        clip_x0: bool = False,
        progress: bool = False,
        cfg_interval: tuple[float, float] | None = None,
        cfg_channels: int | None = None,
        **options: Any,
    ) -> Tensor:
        """Samples from x_1 = `noise` with `sampler` (any of sampling.SAMPLERS) on the shifted
        grid of `steps` levels (`flow_levels`); guidance and options as DDPM.sample."""
        return run_sampler(
            net,
            noise,
            cond,
            flow_levels(steps, self.shift),
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
