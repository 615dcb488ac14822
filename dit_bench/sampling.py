"""Samplers for trained diffusion backbones: pure functions, loop state in locals.

Every sampler has one shape, `sampler(denoise_fn, x, levels, *, prediction, generator,
clip_x0, progress, [its own option]) -> x`:
- `denoise_fn(x, timesteps) -> net output` is the net with its conditioning bound (`guided`);
- `x` is the starting noise, at the noisiest level;
- `levels` is any value object with three (N,) tensors, ordered from the least to the most noisy
  level the sampler visits: `timesteps` (what the net receives, on the 0..1000 scale),
  `alphas` and `sigmas` (float64: x_t = alpha x0 + sigma eps at that level). After level 0
  comes the clean data (alpha = 1, sigma = 0). A `DDPMChain` (the kept steps of a respaced
  DDPM) and a `NoiseLevels` (the time grid of flow matching) both are one;
- `prediction` names what the net outputs ("eps", "x0", "v", "velocity"); every sampler turns
  it into (x0_hat, eps_hat) with `to_x0_eps`, so any sampler runs any objective.

The deterministic and SDE samplers integrate in the rectified-flow coordinates of the path:
any Gaussian path x = alpha x0 + sigma eps is y = x / (alpha + sigma) = (1 - tau) x0 + tau eps
with tau = sigma / (alpha + sigma), whose probability-flow ODE is dy/dtau = eps_hat - x0_hat
(the flow-matching velocity; on the flow path y = x and tau = t). Euler in tau is exactly DDIM
with eta = 0. Every sampler ends with the same last step: from level 0 to the data it returns
x0_hat (DDPM's posterior mean at t = 0 is x0_hat, and an Euler step to t = 0 lands on it).
Samplers never own state between calls and never mutate `levels`.

Randomness: every fresh Gaussian comes from `randn(shape, generator, ...)`, where `generator` is
one `torch.Generator` or a sequence of B generators; with a sequence, sample i's noise at every
step comes from generator i only, so a sample does not depend on the batch it was drawn in.

References
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239):
  Algorithm 2 (ancestral sampling), eq. 6-7 (the posterior q(x_{t-1} | x_t, x_0)).
- Kingma, Salimans, Poole, Ho 2021, "Variational Diffusion Models" (arXiv:2107.00630), eq. 2-3
  and App. A: the transition and posterior of a general Gaussian path (alpha, sigma).
- Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (arXiv:2102.09672):
  eq. 15 (learned variance as an interpolation of beta and the posterior variance), §4
  (respacing: sampling on a subsequence of the training steps with betas recomputed from
  alpha_bar). `respace` reproduces improved-diffusion / DiT `space_timesteps` for one section.
- Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502): eq. 12
  (the generalised step), eq. 16 (sigma(eta)).
- Salimans, Ho 2022, "Progressive Distillation" (arXiv:2202.00512), §4: v = alpha eps - sigma x0.
- Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative
  Models" (EDM, arXiv:2206.00364): Algorithm 1 (Heun's 2nd-order method, Euler on the last step).
- Lipman et al. 2023 (arXiv:2210.02747), Liu et al. 2023 (arXiv:2209.03003), Esser et al. 2024
  (SD3, arXiv:2403.03206): the flow path x_t = (1 - t) x0 + t eps, velocity eps - x0.
- Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable
  Interpolant Transformers" (arXiv:2401.08740), §2.3 / eq. 8: the reverse SDE with any
  diffusion w(t), dx = [v_sit + w/2 score] dt_sit + sqrt(w) dW in SiT's time (noise to data),
  solved by Euler-Maruyama. Here w = sde_scale * sigma_t. SiT's code (transport/) names
  D = w / 2 its "diffusion" (drift v + D score, noise sqrt(2 D) dW), and its "sigma" form is
  D = diffusion_norm * sigma_t: SiT's default diffusion_norm = 1 is sde_scale = 2 here.
- Ho, Salimans 2022, "Classifier-Free Diffusion Guidance" (arXiv:2207.12598): eq. 6, written as
  out_u + s (out_c - out_u) as in DiT (s = 1 is the plain conditional model).
- Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models" (arXiv:2404.07724): guidance only inside a range
  of noise levels.
- Peebles, Xie 2023, "Scalable Diffusion Models with Transformers" (DiT, arXiv:2212.09748):
  the guided net is called once on the concatenated [cond, uncond] batch; the released code
  guides only the first three channels.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
PREDICTIONS = ("eps", "x0", "v", "velocity")


# --------------------------------------------------------------------------------------------
# Randomness: one generator, or one generator per sample
# --------------------------------------------------------------------------------------------


def randn(
    shape: Sequence[int],
    generator: GeneratorArg,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise of `shape` on `device`.

    `generator`: None (the global RNG), one `torch.Generator` (drawn on its own device, then
    moved), or a sequence of shape[0] generators: row i is drawn from generator i alone, so it
    equals what a batch of one would draw with that generator.
    """
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(
            device
        )
    gens = list(generator)
    if len(gens) != shape[0] or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(
            f"generator must be one torch.Generator or a sequence of {shape[0]} (one per "
            f"sample), got {len(gens)} items"
        )
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in gens]
    return torch.stack([r.to(device) for r in rows])


# --------------------------------------------------------------------------------------------
# Respacing (Nichol & Dhariwal 2021, §4)
# --------------------------------------------------------------------------------------------


def draw_slice(draw: Callable[[int], Tensor], n: int, batch_slice: tuple[int, int] | None):
    """`draw(total)[start : start + n]` for batch_slice=(start, total), else `draw(n)`.

    Data-parallel training: every process draws the randomness of the whole global batch from
    the same step generator and keeps its own rows, so a sample's noise does not depend on how
    many processes share the batch (one kernel per draw; no per-sample generators in the step).
    """
    if batch_slice is None:
        return draw(n)
    start, total = batch_slice
    if not 0 <= start <= total - n:
        raise ValueError(f"batch_slice={batch_slice} does not hold {n} rows")
    return draw(total)[start : start + n]


def respace(num_timesteps: int, steps: int) -> list[int]:
    """The `steps` training steps (0-based, ascending) kept when sampling with `steps` steps.

    Exactly improved-diffusion / DiT `space_timesteps(num_timesteps, str(steps))` for a single
    section: stride (T - 1) / (steps - 1), accumulated as a float and rounded (Python's
    round-half-to-even), so the first step 0 and the last step T - 1 are always kept.
    respace(1000, 250) -> [0, 4, 8, 12, ..., 995, 999].
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, num_timesteps={num_timesteps}], got {steps}")
    frac_stride = 1 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    # accumulate like the reference (not i * stride) so the rounding is bit-for-bit the same
    cur, kept = 0.0, []
    for _ in range(steps):
        kept.append(round(cur))
        cur += frac_stride
    return kept


def respaced_betas(alphas_cumprod: Tensor) -> Tensor:
    """Betas of the chain that keeps only the steps whose alpha_bar are given (ascending steps).

    beta_i = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}] with alpha_bar[k_{-1}] = 1: the kept
    alpha_bar (hence the marginals q(x_t | x_0) the net was trained on) are unchanged, only the
    transitions between kept steps are merged (improved-diffusion SpacedDiffusion).
    """
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / prev


@dataclass(frozen=True)
class NoiseLevels:
    """The levels a sampler visits, least noisy first (see the module docstring)."""

    timesteps: Tensor  # (N,) what the net receives, 0..1000 scale
    alphas: Tensor  # (N,) float64
    sigmas: Tensor  # (N,) float64


# --------------------------------------------------------------------------------------------
# Predictions: eps <-> x0 <-> v <-> velocity, at a level (alpha, sigma)
# --------------------------------------------------------------------------------------------


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")


def _check_flow_path(alpha: Any, sigma: Any) -> None:
    if not torch.allclose(torch.as_tensor(alpha + sigma, dtype=torch.float64),
                          torch.tensor(1.0, dtype=torch.float64), atol=1e-6):  # fmt: skip
        raise ValueError(
            "prediction='velocity' is defined on the rectified-flow path (alpha = 1 - t, "
            "sigma = t); use eps, x0 or v on other paths"
        )


def from_x0_eps(x0: Tensor, eps: Tensor, alpha: Any, sigma: Any, prediction: str) -> Tensor:
    """What a net with `prediction` should output at x = alpha x0 + sigma eps:
    eps; x0; v = alpha eps - sigma x0 (Salimans & Ho); velocity = eps - x0 = dx/dt on the
    flow path x = (1 - t) x0 + t eps. `alpha`, `sigma`: floats or tensors broadcasting to x0."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    _check_flow_path(alpha, sigma)
    return eps - x0


def to_x0_eps(pred: Tensor, x: Tensor, alpha: Any, sigma: Any, prediction: str):
    """(x0_hat, eps_hat) implied by the net output `pred` at x = alpha x0 + sigma eps.

    eps: x0 = (x - sigma eps) / alpha (needs alpha > 0); x0: eps = (x - alpha x0) / sigma
    (needs sigma > 0); v: x0 = (alpha x - sigma v) / (alpha^2 + sigma^2),
    eps = (sigma x + alpha v) / (alpha^2 + sigma^2); velocity (flow path, alpha + sigma = 1):
    x0 = x - sigma u, eps = x + alpha u.
    """
    _check_prediction(prediction)
    if prediction == "eps":
        if not torch.all(torch.as_tensor(alpha) > 0):
            raise ValueError("prediction='eps' cannot recover x0 where alpha = 0 (pure noise)")
        return (x - sigma * pred) / alpha, pred
    if prediction == "x0":
        if not torch.all(torch.as_tensor(sigma) > 0):
            raise ValueError("prediction='x0' cannot recover eps where sigma = 0 (clean data)")
        return pred, (x - alpha * pred) / sigma
    if prediction == "v":
        norm = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * pred) / norm, (sigma * x + alpha * pred) / norm
    _check_flow_path(alpha, sigma)
    return x - sigma * pred, x + alpha * pred


def split_output(out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
    """(prediction, learned-variance values or None) from a C- or 2C-channel net output."""
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    raise ValueError(
        f"net output has {out.shape[1]} channels; expected {channels} (fixed variance) "
        f"or {2 * channels} (learned sigma)"
    )


# --------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022)
# --------------------------------------------------------------------------------------------


def _cat_cond(cond: Any, uncond: Any) -> Any:
    """Batch-concatenate two conditionings: a `Cond`-like dataclass, a tensor, or None."""
    if cond is None and uncond is None:
        return None
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor):
        return torch.cat([cond, uncond])
    if dataclasses.is_dataclass(cond) and type(cond) is type(uncond):
        joined = {}
        for f in dataclasses.fields(cond):
            a, b = getattr(cond, f.name), getattr(uncond, f.name)
            if (a is None) != (b is None):
                raise ValueError(f"cond and uncond must set the same fields; {f.name!r} differs")
            joined[f.name] = None if a is None else torch.cat([a, b])
        return dataclasses.replace(cond, **joined)
    raise ValueError(
        f"cannot batch cond of type {type(cond).__name__} with uncond of type "
        f"{type(uncond).__name__}; both must be the same Cond dataclass, tensors, or None"
    )


def _null_cond(net: Callable, cond: Any) -> Any:
    """The unconditional counterpart of a Cond where it is implied: labels only, and a net that
    knows its null class (every registered backbone's `num_classes`), so DESIGN's
    `obj.sample(..., cfg_scale=s)` guides without an explicit `uncond`. None otherwise: a plain
    function has no null class, and text-style context has no implied empty prompt."""
    num_classes = getattr(net, "num_classes", None)
    labels = getattr(cond, "labels", None)
    if not dataclasses.is_dataclass(cond) or labels is None or not isinstance(num_classes, int):
        return None
    if getattr(cond, "context", None) is not None or getattr(cond, "pooled", None) is not None:
        return None
    return dataclasses.replace(cond, labels=torch.full_like(labels, num_classes))


def guided(
    net: Callable,
    cond: Any,
    uncond: Any = None,
    scale: float = 1.0,
    *,
    interval: tuple[float, float] | None = None,
    channels: int | None = None,
) -> DenoiseFn:
    """Bind conditioning to `net` and apply classifier-free guidance; returns `fn(x, timesteps)`.

    scale == 1: the plain conditional net (one call on B samples, `uncond` unused).
    `uncond` None: the null class of a net with `num_classes`, for labels-only conds.
    Otherwise the net runs once on the concatenated batch [cond, uncond] (2B samples, as DiT)
    and the prediction channels (the first C = x's channels) are combined as
    out_u + scale * (out_c - out_u). Extra channels (learned-variance values) are taken from
    the conditional half: guidance moves the mean, not the variance.
    `interval=(lo, hi)`: guide only where lo <= timesteps <= hi (the net's 0..1000 scale;
    Kynkaanniemi et al. 2024), the conditional net elsewhere.
    `channels=k`: guide only the first k prediction channels, the rest conditional: k = 3
    reproduces DiT's released `forward_with_cfg`; None (default) guides the whole prediction.
    """
    if scale == 1.0:
        return lambda x, t: net(x, t, cond)
    if uncond is None:
        uncond = _null_cond(net, cond)
    if uncond is None:
        raise ValueError(
            f"cfg_scale={scale} != 1 needs `uncond` (a Cond with null labels: "
            "given, or implied for labels-only conds by the net's `num_classes`)"
        )
    if interval is not None and not interval[0] <= interval[1]:
        raise ValueError(f"guidance interval must be (lo, hi) with lo <= hi, got {interval}")
    if channels is not None and channels < 1:
        raise ValueError(f"guidance channels must be a positive int or None, got {channels}")
    both = _cat_cond(cond, uncond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        inside = None
        if interval is not None:
            inside = (t >= interval[0]) & (t <= interval[1])  # (B,)
            if not bool(inside.any()):
                return net(x, t, cond)  # one call: nothing to guide at this level
        out = net(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, C or 2C, H, W)
        out_c, out_u = out.chunk(2)
        k = x.shape[1] if channels is None else min(channels, x.shape[1])
        mixed = out_u[:, :k] + scale * (out_c[:, :k] - out_u[:, :k])
        res = torch.cat([mixed, out_c[:, k:]], dim=1)
        if inside is not None:
            res = torch.where(inside.view(-1, *([1] * (x.dim() - 1))), res, out_c)
        return res

    return fn


def interval_error(timesteps: Tensor, interval: tuple[float, float]) -> str | None:
    """Why guiding only where lo <= t <= hi would guide none of the levels with net timesteps
    `timesteps` (the samples then exactly the unguided ones), or None."""
    t = torch.as_tensor(timesteps).to(torch.float32)  # as `_predict` hands them to the net
    lo, hi = interval
    if bool(((t >= lo) & (t <= hi)).any()):
        return None
    nearest = []
    if bool((t < lo).any()):
        nearest.append(f"{float(t[t < lo].max()):g}")
    if bool((t > hi).any()):
        nearest.append(f"{float(t[t > hi].min()):g}")
    return (
        f"[{lo:g}, {hi:g}] holds none of the {len(t)} sampling levels' net timesteps "
        f"(nearest: {', '.join(nearest)}): guidance would change nothing"
    )


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def _progress(it: Sequence[int], show: bool):
    if not show:
        return it
    from tqdm.auto import tqdm  # only imported when asked for: keeps the module light

    return tqdm(it, desc="sampling", leave=False)


def _level(levels: Any, i: int) -> tuple[float, float]:
    """(alpha, sigma) of level i as Python floats (float64); level -1 is the clean data."""
    if i < 0:
        return 1.0, 0.0
    return float(levels.alphas[i]), float(levels.sigmas[i])


def _predict(
    denoise_fn: DenoiseFn,
    x: Tensor,
    levels: Any,
    i: int,
    prediction: str,
    clip_x0: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x0_hat, eps_hat, learned-variance values or None) of the net at level i."""
    # float32 even for half-precision x: bf16 cannot represent every step index exactly
    t = torch.full((x.shape[0],), float(levels.timesteps[i]), dtype=torch.float32, device=x.device)
    pred, var_values = split_output(denoise_fn(x, t), x.shape[1])
    alpha, sigma = _level(levels, i)
    x0, eps = to_x0_eps(pred, x, alpha, sigma, prediction)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - alpha * x0) / sigma  # keep (x0, eps) consistent with x (as DDIM codes do)
    return x0, eps, var_values


def _transition(levels: Any, i: int) -> tuple[float, float, float, float, float]:
    """Gaussian-path coefficients from level i to level i - 1 (Kingma et al. 2021, eq. 2-3):
    alpha_t, sigma_t, alpha_s, sigma_s, and var_ts = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2,
    the variance of q(x_t | x_s) (beta of the respaced chain on a VP path)."""
    a_t, s_t = _level(levels, i)
    a_s, s_s = _level(levels, i - 1)
    var_ts = s_t**2 - (a_t / a_s) ** 2 * s_s**2
    return a_t, s_t, a_s, s_s, var_ts


def _check_steps(levels: Any) -> int:
    n = len(levels.timesteps)
    if not n == len(levels.alphas) == len(levels.sigmas) or n < 1:
        raise ValueError("levels must hold N >= 1 timesteps, alphas and sigmas")
    return n


def ddpm_ancestral(
    denoise_fn: DenoiseFn,
    x: Tensor,
    levels: Any,
    *,
    prediction: str = "eps",
    generator: GeneratorArg = None,
    clip_x0: bool = False,
    progress: bool = False,
) -> Tensor:
    """DDPM ancestral sampling: Ho et al. 2020, Algorithm 2, on a (respaced) chain.

    For i = N-1 .. 0: the net predicts at `levels.timesteps[i]` (a DDPM's original training
    step, as DiT's SpacedDiffusion); x_{i-1} = mu(x_i, x0_hat) + sigma_i z, with mu the mean of
    the posterior q(x_{i-1} | x_i, x0) (eq. 7; on any Gaussian path, Kingma et al. 2021) and
    sigma_i^2 the fixed small variance (the posterior variance) for a C-channel net, or the
    learned interpolation log var = f log var_ts + (1 - f) log posterior_var,
    f = (v + 1) / 2 (Nichol & Dhariwal eq. 15) for a 2C-channel net. The last step returns
    x0_hat, without noise. Runs on flow levels too (t = 1 has alpha = 0: the posterior mean
    is then alpha_s x0_hat). With the exact denoiser the samples are too narrow at few steps:
    the fixed variance ignores Var[x0 | x_t] (tests/test_sampling.py).
    """
    n = _check_steps(levels)
    for i in _progress(range(n - 1, -1, -1), progress):
        x0, _, var_values = _predict(denoise_fn, x, levels, i, prediction, clip_x0)
        if i == 0:
            x = x0.to(x.dtype)
            break
        a_t, s_t, a_s, s_s, var_ts = _transition(levels, i)
        post_var = var_ts * s_s**2 / s_t**2
        mean = (a_t / a_s * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * x0
        z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        if var_values is None:
            x = (mean + math.sqrt(post_var) * z).to(x.dtype)
        else:
            # exp(f log var_ts + (1 - f) log post) = sqrt(post) exp(f/2 log(var_ts / post)):
            # exactly the fixed small variance at v = -1
            frac = (var_values + 1) / 2
            std = math.sqrt(post_var) * torch.exp(0.5 * math.log(var_ts / post_var) * frac)
            x = (mean + std * z).to(x.dtype)
    return x


def ddim(
    denoise_fn: DenoiseFn,
    x: Tensor,
    levels: Any,
    *,
    eta: float = 0.0,
    prediction: str = "eps",
    generator: GeneratorArg = None,
    clip_x0: bool = False,
    progress: bool = False,
) -> Tensor:
    """DDIM: Song et al. 2021, eq. 12 with sigma(eta) of eq. 16, on any Gaussian path.

    x_{i-1} = alpha_{i-1} x0_hat + sqrt(sigma_{i-1}^2 - c^2) eps_hat + c z,
    c^2 = eta^2 * posterior variance. eta = 0: deterministic (Euler on the probability-flow
    ODE in tau = sigma / (alpha + sigma)); eta = 1: the same distribution per step as DDPM
    ancestral with the fixed small variance. The last step returns x0_hat.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    n = _check_steps(levels)
    for i in _progress(range(n - 1, -1, -1), progress):
        x0, eps, _ = _predict(denoise_fn, x, levels, i, prediction, clip_x0)
        if i == 0:
            x = x0.to(x.dtype)
            break
        _, s_t, a_s, s_s, var_ts = _transition(levels, i)
        c2 = eta**2 * var_ts * s_s**2 / s_t**2
        x_next = a_s * x0 + math.sqrt(max(s_s**2 - c2, 0.0)) * eps
        if c2 > 0:
            x_next = x_next + math.sqrt(c2) * randn(
                x.shape, generator, device=x.device, dtype=x.dtype
            )
        x = x_next.to(x.dtype)
    return x


def _tau(alpha: float, sigma: float) -> tuple[float, float]:
    """(scale, tau): x = scale * y with y = (1 - tau) x0 + tau eps on the flow path."""
    return alpha + sigma, sigma / (alpha + sigma)


def euler(
    denoise_fn: DenoiseFn,
    x: Tensor,
    levels: Any,
    *,
    prediction: str = "eps",
    generator: GeneratorArg = None,
    clip_x0: bool = False,
    progress: bool = False,
) -> Tensor:
    """Euler's method on the probability-flow ODE dy/dtau = eps_hat - x0_hat (the flow-matching
    ODE; SD3 / rectified-flow sampling), in the flow coordinates of the path: one net call per
    level, first order. Mathematically equal to DDIM with eta = 0 (Song et al. 2021 §4.3;
    Karras et al. 2022 §3). Deterministic: `generator` is unused."""
    n = _check_steps(levels)
    for i in _progress(range(n - 1, -1, -1), progress):
        x0, eps, _ = _predict(denoise_fn, x, levels, i, prediction, clip_x0)
        r_t, tau_t = _tau(*_level(levels, i))
        r_s, tau_s = _tau(*_level(levels, i - 1))
        x = (r_s * (x / r_t + (tau_s - tau_t) * (eps - x0))).to(x.dtype)
    return x


def heun(
    denoise_fn: DenoiseFn,
    x: Tensor,
    levels: Any,
    *,
    prediction: str = "eps",
    generator: GeneratorArg = None,
    clip_x0: bool = False,
    progress: bool = False,
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE dy/dtau = eps_hat - x0_hat:
    Karras et al. 2022, Algorithm 1 (deterministic, S_churn = 0) in the flow coordinates of the
    path. An Euler predictor, then the trapezoid of the slopes at both ends; the last step (to
    the data, tau = 0) is plain Euler, as in EDM. 2N - 1 net calls for N levels.
    Deterministic: `generator` is unused."""
    n = _check_steps(levels)
    for i in _progress(range(n - 1, -1, -1), progress):
        x0, eps, _ = _predict(denoise_fn, x, levels, i, prediction, clip_x0)
        r_t, tau_t = _tau(*_level(levels, i))
        r_s, tau_s = _tau(*_level(levels, i - 1))
        y, d = x / r_t, eps - x0
        if i == 0:
            x = (r_s * (y + (tau_s - tau_t) * d)).to(x.dtype)
            break
        x_euler = (r_s * (y + (tau_s - tau_t) * d)).to(x.dtype)
        x0_2, eps_2, _ = _predict(denoise_fn, x_euler, levels, i - 1, prediction, clip_x0)
        x = (r_s * (y + (tau_s - tau_t) * 0.5 * (d + (eps_2 - x0_2)))).to(x.dtype)
    return x


def euler_maruyama(
    denoise_fn: DenoiseFn,
    x: Tensor,
    levels: Any,
    *,
    sde_scale: float = 1.0,
    prediction: str = "eps",
    generator: GeneratorArg = None,
    clip_x0: bool = False,
    progress: bool = False,
) -> Tensor:
    """Euler-Maruyama on the reverse SDE of SiT (Ma et al. 2024, eq. 8), in flow coordinates.

    With w(tau) = sde_scale * tau (the noise variance per unit time) and the score
    -eps_hat / tau, a step from tau to tau - h is
    y <- y - h (eps_hat - x0_hat) - h sde_scale / 2 * eps_hat + sqrt(sde_scale tau h) z,
    which keeps the marginals of the path for any sde_scale >= 0 (0: Euler on the ODE).
    SiT's "sigma" diffusion form with diffusion_norm n is sde_scale = 2 n (its code adds
    sqrt(2 D) dW with D = n sigma_t), so SiT's default n = 1 is sde_scale = 2, not 1.
    The last step returns x0_hat without noise (SiT's "Mean" last step differs by O(h)).
    """
    if sde_scale < 0:
        raise ValueError(f"sde_scale must be >= 0, got {sde_scale}")
    n = _check_steps(levels)
    for i in _progress(range(n - 1, -1, -1), progress):
        x0, eps, _ = _predict(denoise_fn, x, levels, i, prediction, clip_x0)
        if i == 0:
            x = x0.to(x.dtype)
            break
        r_t, tau_t = _tau(*_level(levels, i))
        r_s, tau_s = _tau(*_level(levels, i - 1))
        h = tau_t - tau_s
        y = x / r_t - h * (eps - x0) - (0.5 * sde_scale * h) * eps
        if sde_scale > 0:
            noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
            y = y + math.sqrt(sde_scale * tau_t * h) * noise
        x = (r_s * y).to(x.dtype)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_ancestral,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "euler_maruyama": euler_maruyama,
}
_COMMON = {"prediction", "generator", "clip_x0", "progress"}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The registered sampler `name`; an unknown name raises, listing the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}") from None


def sampler_options(name: str) -> set[str]:
    """The sampler's own keyword options beyond the common ones (ddim: eta; SDE: sde_scale)."""
    params = inspect.signature(get_sampler(name)).parameters
    return {p for p, v in params.items() if v.kind is v.KEYWORD_ONLY} - _COMMON


def sample(
    net: Callable,
    noise: Tensor,
    cond: Any,
    levels: Any,
    *,
    prediction: str,
    sampler: str,
    cfg_scale: float = 1.0,
    uncond: Any = None,
    cfg_interval: tuple[float, float] | None = None,
    cfg_channels: int | None = None,
    generator: GeneratorArg = None,
    clip_x0: bool = False,
    progress: bool = False,
    **options: Any,
) -> Tensor:
    """Guide `net` (see `guided`) and run `sampler` from `noise` over `levels`. `options` are
    the sampler's own (eta for ddim, sde_scale for euler_maruyama); a None value means the
    sampler's default, an option the sampler does not take raises."""
    sample_fn = get_sampler(sampler)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - sampler_options(sampler)
    if unknown:
        takes = {o: n for n in SAMPLERS for o in sampler_options(n)}
        raise ValueError(
            f"sampler {sampler!r} does not take {sorted(unknown)}; "
            + ", ".join(f"{o} is for sampler={takes.get(o, '?')!r}" for o in sorted(unknown))
        )
    if cfg_scale != 1.0 and cfg_interval is not None:
        if problem := interval_error(levels.timesteps, cfg_interval):
            raise ValueError(f"cfg_interval={problem}")
    denoise = guided(net, cond, uncond, cfg_scale, interval=cfg_interval, channels=cfg_channels)
    return sample_fn(
        denoise,
        noise,
        levels,
        prediction=prediction,
        generator=generator,
        clip_x0=clip_x0,
        progress=progress,
        **options,
    )
