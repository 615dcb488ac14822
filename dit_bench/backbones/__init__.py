"""Backbones: the conditioning bundle, size presets, and the registry of backbone families.

Every backbone is an `nn.Module` with
    forward(x (B, C, H, W) float, timesteps (B,) float on the 0..1000 scale, cond: Cond)
        -> (B, C_out, H, W), C_out = 2C when learn_sigma (eps first, then variance values),
attributes `in_channels`, `out_channels`, `num_classes`, `image_size`, `learn_sigma`, and
methods `num_params(trainable_only=False)` and `flops(batch=1) -> {"macs", "flops"}`.

A preset is a plain dict (a config, not a module), so it serialises and lands in result tables.
A new family is one file plus one line in `BACKBONES` and one in `CONDITIONINGS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Cond:
    """Conditioning passed to every backbone.

    labels: (B,) long; the value `num_classes` is the null class (classifier-free guidance).
        None means unconditional: every sample gets the null class.
    context: (B, L, D) text-style tokens (cross-attention / joint-attention backbones).
    pooled: (B, D) pooled text-style vector.
    """

    labels: torch.Tensor | None = None
    context: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


from dit_bench.backbones import dit  # noqa: E402  (dit.py type-checks against Cond above)

# ---------------------------------------------------------------------------------------------
# Presets: DiT Table 1 sizes x patch sizes, plus small CPU sizes that train in minutes.
# ---------------------------------------------------------------------------------------------

_DIT_SIZES = {  # name: (depth, hidden_size, num_heads)
    "xs": (4, 128, 4),  # CPU: minutes on 2 cores
    "ti": (6, 192, 3),  # CPU: DeiT-Ti width
    "s": (12, 384, 6),  # DiT Table 1
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
}
PRESETS: dict[str, dict] = {
    f"dit-{size}/{patch}": dict(
        family="dit", depth=depth, hidden_size=width, num_heads=heads, patch_size=patch
    )
    for size, (depth, width, heads) in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}

# family -> builder(*, image_size, in_channels, num_classes, conditioning, learn_sigma,
#                   depth, hidden_size, num_heads, patch_size) -> nn.Module
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "dit": dit.build_dit,
}
# family -> conditioning schemes it implements now (the first is the default).
CONDITIONINGS: dict[str, tuple[str, ...]] = {
    "dit": dit.CONDITIONINGS,
}

_SIZE_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")


def resolve_preset(
    name: str,
    *,
    depth: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
) -> dict:
    """The preset `name` with overrides applied (None keeps the preset's value). Builds nothing.

    Raises ValueError on an unknown name (listing the known ones) or a non-positive override.
    Divisibility (patch | image, heads | width) is checked by `check_geometry`.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; known presets: {sorted(PRESETS)}")
    out = dict(PRESETS[name])
    overrides = dict(
        depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size
    )
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        out[key] = value
    return out


def check_geometry(preset: dict, image_size: int) -> None:
    """Raise ValueError if the resolved preset cannot run on `image_size` x `image_size` inputs."""
    p, width, heads = preset["patch_size"], preset["hidden_size"], preset["num_heads"]
    if image_size % p:
        raise ValueError(
            f"patch_size={p} must divide image_size={image_size}; "
            f"allowed patch sizes: {[q for q in range(1, image_size + 1) if image_size % q == 0]}"
        )
    if width % heads:
        raise ValueError(
            f"num_heads={heads} must divide hidden_size={width}; "
            f"allowed: {[h for h in range(1, width + 1) if width % h == 0]}"
        )


def build_backbone(
    name: str,
    *,
    image_size: int,
    in_channels: int,
    num_classes: int,
    conditioning: str = "adaln_zero",
    learn_sigma: bool = False,
    depth: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    patch_size: int | None = None,
) -> nn.Module:
    """Build the preset `name` (with size overrides) for the given input geometry and classes."""
    preset = resolve_preset(
        name, depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size
    )
    family = preset.pop("family")
    if conditioning not in CONDITIONINGS[family]:
        raise ValueError(
            f"conditioning={conditioning!r} is not available for {family!r} backbones; "
            f"allowed: {list(CONDITIONINGS[family])}"
        )
    check_geometry(preset, image_size)
    return BACKBONES[family](
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        conditioning=conditioning,
        learn_sigma=learn_sigma,
        **preset,
    )


__all__ = [
    "BACKBONES",
    "CONDITIONINGS",
    "PRESETS",
    "Cond",
    "build_backbone",
    "check_geometry",
    "resolve_preset",
]
