"""Samplers for trained diffusion backbones: pure functions, loop state in locals.

Every sampler has one shape, `sampler(denoise_fn, x, chain, *, generator, ...) -> x`:
`denoise_fn(x, timesteps) -> prediction` is the net with its conditioning already bound (see
`guided`), `x` is the starting noise x_T, and `chain` is the schedule value object of the
objective (for DDPM a `dit_bench.objectives.ddpm.DDPMChain`). Samplers never own state between
calls and never mutate the chain.

References
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239):
  Algorithm 2 (ancestral sampling), eq. 6-7 (the posterior q(x_{t-1} | x_t, x_0)).
- Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (arXiv:2102.09672):
  eq. 15 (learned variance as an interpolation of beta and the posterior variance), §4
  (respacing: sampling on a subsequence of the training steps with betas recomputed from
  alpha_bar). `respace` reproduces improved-diffusion / DiT `space_timesteps` for one section.
- Ho, Salimans 2022, "Classifier-Free Diffusion Guidance" (arXiv:2207.12598): eq. 6, written as
  eps_u + s (eps_c - eps_u) as in DiT (s = 1 is the plain conditional model).
- Peebles, Xie 2023, "Scalable Diffusion Models with Transformers" (DiT, arXiv:2212.09748):
  the guided net is called once on the concatenated [cond, uncond] batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # the chain is duck-typed: sampling never imports an objective at run time
    from dit_bench.objectives.ddpm import DDPMChain

DenoiseFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Respacing (Nichol & Dhariwal 2021, §4)
# --------------------------------------------------------------------------------------------


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


def guided(net: Callable, cond: Any, uncond: Any = None, scale: float = 1.0) -> DenoiseFn:
    """Bind conditioning to `net` and apply classifier-free guidance; returns `fn(x, timesteps)`.

    scale == 1: the plain conditional net (one call on B samples, `uncond` unused).
    Otherwise the net runs once on the concatenated batch [cond, uncond] (2B samples, as DiT)
    and the first C output channels (the eps / v prediction; C = x's channels) are combined as
    out_u + scale * (out_c - out_u). Extra channels (learned-variance values) are taken from
    the conditional half: guidance moves the mean, not the variance.
    """
    if scale == 1.0:
        return lambda x, t: net(x, t, cond)
    if uncond is None:
        raise ValueError(f"cfg_scale={scale} != 1 needs `uncond` (a Cond with null labels)")
    both = _cat_cond(cond, uncond)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        out = net(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, C or 2C, H, W)
        out_c, out_u = out.chunk(2)
        c = x.shape[1]
        mixed = out_u[:, :c] + scale * (out_c[:, :c] - out_u[:, :c])
        return torch.cat([mixed, out_c[:, c:]], dim=1)

    return fn


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def _progress(it: Sequence[int], show: bool):
    if not show:
        return it
    from tqdm.auto import tqdm  # only imported when asked for: keeps the module light

    return tqdm(it, desc="sampling", leave=False)


def ddpm_ancestral(
    denoise_fn: DenoiseFn,
    x: Tensor,
    chain: DDPMChain,
    *,
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    clip_x0: bool = False,
    progress: bool = False,
) -> Tensor:
    """DDPM ancestral sampling: Ho et al. 2020, Algorithm 2, on a (respaced) chain.

    For i = N-1 .. 0: the net predicts eps (or v) at the original training step
    `chain.timesteps[i]` (as a float, the scale it was trained on, as DiT's SpacedDiffusion);
    x_{i-1} = mu_theta(x_i) + sigma_i z with mu from the posterior mean (eq. 7) of the predicted
    x0, and sigma_i^2 the fixed small variance (the posterior variance, clipped at i = 0 as in
    improved-diffusion) when the net outputs C channels, or the learned interpolation of
    Nichol & Dhariwal eq. 15 when it outputs 2C. No noise is added at the last step.
    `clip_x0` clamps the predicted x0 to [-1, 1] (off by default: DiT samples latents).
    """
    b = x.shape[0]
    for i in _progress(range(len(chain.timesteps) - 1, -1, -1), progress):
        idx = torch.full((1,), i, dtype=torch.long, device=x.device)  # broadcasts over the batch
        # float32 even for half-precision x: bf16 cannot represent every step index exactly
        t = torch.full((b,), float(chain.timesteps[i]), dtype=torch.float32, device=x.device)
        out = denoise_fn(x, t)
        mean, log_var, _ = chain.p_mean_log_var(out, x, idx, prediction=prediction, clip_x0=clip_x0)
        if i > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (mean + torch.exp(0.5 * log_var) * z).to(x.dtype)
        else:
            x = mean.to(x.dtype)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm_ancestral}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The registered sampler `name`; an unknown name raises, listing the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}") from None
