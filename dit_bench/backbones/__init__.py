"""Backbones: the conditioning bundle, size presets, and the registry of backbone families.

Every backbone is an `nn.Module` with
    forward(x (B, C, H, W) float, timesteps (B,) float on the 0..1000 scale, cond: Cond)
        -> (B, C_out, H, W), C_out = 2C when learn_sigma (eps first, then variance values),
attributes `in_channels`, `out_channels`, `num_classes`, `image_size`, `learn_sigma`,
`conditioning` and `num_tokens` (the sequence length its attention sees; the U-Net reports its
input pixels), and methods `num_params(trainable_only=False)` and
`flops(batch=1) -> {"macs", "flops"}` (analytic, one multiply-add = 1 MAC, flops = 2 macs).

Families (one file each; references in each file's docstring):
    dit    DiT, Peebles & Xie 2023: adaln_zero | adaln | cross_attn | in_context
    mmdit  SD3's MMDiT, Esser et al. 2024: joint_attn (two streams, joint attention)
    unet   ADM U-Net, Dhariwal & Nichol 2021: adagn (scale-shift GroupNorm)
    uvit   U-ViT, Bao et al. 2023: in_context (time, class and patches as tokens, long skips)

A preset is a plain dict (a config, not a module) with a `family` key, so it serialises and
lands in result tables. A new family is one file, ending in `FAMILY = Family(...)` (the model,
its schemes, presets and geometry check; `family.py`), and its entry in the registry tuple
below; a family defined elsewhere (a script, a test) joins with `register_family`.
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
        None means unconditional: every sample gets the null class. Read by every family.
    context: (B, L, D) text-style tokens. Only MMDiT reads them (joint attention; they replace
        its label-derived context tokens). DiT (cross_attn included: it attends to [t, y]),
        U-Net and U-ViT condition on the label alone and raise ValueError when given context.
    pooled: (B, D) pooled text-style vector. Only MMDiT reads it (it replaces the label's
        pooled vector); the other families raise ValueError, as for context.
    """

    labels: torch.Tensor | None = None
    context: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


# The family modules type-check against Cond above, hence the late import.
from dit_bench.backbones import dit, mmdit, unet, uvit  # noqa: E402
from dit_bench.backbones.family import Family  # noqa: E402

# The registry and its views, filled by `register_family` below. Views: family -> model class;
# -> conditioning schemes (the first is the family's default); -> geometry_errors(spec,
# image_size, prefix=""); preset name -> preset. Other modules import these dicts by name, so
# they are filled in place, never rebound.
FAMILIES: dict[str, Family] = {}
BACKBONES: dict[str, Callable[..., nn.Module]] = {}
CONDITIONINGS: dict[str, tuple[str, ...]] = {}
GEOMETRY: dict[str, Callable[..., list[str]]] = {}
PRESETS: dict[str, dict] = {}


def register_family(family: Family) -> None:
    """Add a family to the registry and its views; raises ValueError on a clash.

    The package's own families are registered below, at import. A family defined outside the
    package (a script, a test) is registered the same way, at the script's top level: spawned
    workers (`run_ablation(jobs=2)`, sweep workers) re-import the main script but do not run
    its `if __name__ == "__main__":` block, so a family registered only there is unknown to
    them.
    """
    # A merged dict would let a later family silently take over another's presets (a copied
    # dit.py keeping "dit-s/2"), and a preset whose `family` key names another family would
    # build that family's model: every dit-* run would train something else.
    where = f"family {family.name!r} (its FAMILY record)"
    if family.name in FAMILIES:
        raise ValueError(f"{where}: a family named {family.name!r} is already registered")
    if not family.conditionings:
        raise ValueError(f"{where}: conditionings is empty; list its schemes, default first")
    for name, preset in family.presets.items():
        if preset.get("family") != family.name:
            raise ValueError(
                f"{where}: preset {name!r} has family={preset.get('family')!r}; "
                f"each of its presets needs family={family.name!r}"
            )
        if name in PRESETS:
            raise ValueError(
                f"{where}: preset {name!r} is already a {PRESETS[name]['family']!r} preset; "
                "give the new family's presets their own names"
            )
    FAMILIES[family.name] = family
    BACKBONES[family.name] = family.model
    CONDITIONINGS[family.name] = family.conditionings
    GEOMETRY[family.name] = family.geometry_errors
    PRESETS.update(family.presets)


# The registry: a new family is its file (ending in `FAMILY = Family(...)`) and its entry here.
for _family in (dit.FAMILY, mmdit.FAMILY, unet.FAMILY, uvit.FAMILY):
    register_family(_family)

# What the harness reads off every built backbone (the module docstring): summaries, `info`,
# `bench`, ablation plans and sampling.
INTERFACE = (
    "in_channels",
    "out_channels",
    "num_classes",
    "image_size",
    "learn_sigma",
    "conditioning",
    "num_tokens",
    "num_params",
    "flops",
)

# Size overrides a config may set; each applies to the presets that have the key.
OVERRIDE_KEYS = ("depth", "hidden_size", "num_heads", "patch_size", "qk_norm")


def resolve_preset(name: str, **overrides) -> dict:
    """The preset `name` with overrides applied (None keeps the preset's value). Builds nothing.

    Overrides: depth, hidden_size, num_heads, patch_size (positive ints) and qk_norm (bool), each
    only where the preset has that key (a U-Net has no patch size). Raises ValueError on an
    unknown name (listing the known ones), an unknown or inapplicable key, or a bad value; every
    message starts with the offending key. Geometry (patch | image, heads | width, ...) is
    checked by `check_geometry`.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; known presets: {sorted(PRESETS)}")
    out = dict(PRESETS[name])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in OVERRIDE_KEYS:
            raise ValueError(f"{key} is not a preset override; allowed: {list(OVERRIDE_KEYS)}")
        if key not in out:
            applies = [k for k in OVERRIDE_KEYS if k in out]
            raise ValueError(
                f"{key}={value!r} does not apply to {out['family']!r} presets; "
                f"overrides that apply to {name}: {applies}"
            )
        if isinstance(out[key], bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        out[key] = value
    return out


def geometry_errors(preset: dict, image_size: int, prefix: str = "") -> list[str]:
    """Why the resolved preset cannot run on image_size x image_size inputs; [] if it can."""
    return GEOMETRY[preset["family"]](preset, image_size, prefix)


def check_geometry(preset: dict, image_size: int) -> None:
    """Raise ValueError if the resolved preset cannot run on `image_size` x `image_size` inputs."""
    errors = geometry_errors(preset, image_size)
    if errors:
        raise ValueError("; ".join(errors))


def default_conditioning(name: str) -> str | None:
    """The native conditioning scheme of preset `name`'s family (None for an unknown name)."""
    if name not in PRESETS:
        return None
    return CONDITIONINGS[PRESETS[name]["family"]][0]


def build_backbone(
    name: str,
    *,
    image_size: int,
    in_channels: int,
    num_classes: int,
    conditioning: str | None = None,
    learn_sigma: bool = False,
    **overrides,
) -> nn.Module:
    """Build the preset `name` (with size overrides) for the given input geometry and classes.

    conditioning: one of `CONDITIONINGS[family]`; None takes the family's own (the first).
    overrides: depth, hidden_size, num_heads, patch_size, qk_norm, see `resolve_preset`.
    """
    preset = resolve_preset(name, **overrides)
    family = preset.pop("family")
    if conditioning is None:
        conditioning = CONDITIONINGS[family][0]
    if conditioning not in CONDITIONINGS[family]:
        raise ValueError(
            f"conditioning={conditioning!r} is not available for {family!r} backbones; "
            f"allowed: {list(CONDITIONINGS[family])}"
        )
    check_geometry(dict(preset, family=family), image_size)
    net = BACKBONES[family](
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        conditioning=conditioning,
        learn_sigma=learn_sigma,
        **preset,
    )
    # Refused here, before any training: the summary reads flops() and num_params() only
    # after the last step, so a family without them lost the whole run to an AttributeError.
    missing = [k for k in INTERFACE if not hasattr(net, k)]
    if missing:
        raise TypeError(
            f"{type(net).__name__} (family {family!r}) lacks {', '.join(missing)}: every "
            "backbone has the attributes and methods listed in dit_bench.backbones' docstring"
        )
    return net


def build_net(cfg, info) -> nn.Module:
    """The backbone of an ExperimentConfig `cfg` for data of DataInfo `info`. Here, not in
    train.module, so that sizing a plan (ablate and sweep's dry runs) does not import
    Lightning: 6 s of a 13 s `ablate --dry-run` on the 2-core CPU."""
    b = cfg.backbone
    return build_backbone(
        b.name,
        image_size=info.image_size,
        in_channels=info.channels,
        num_classes=info.num_classes,
        conditioning=b.conditioning,
        learn_sigma=b.learn_sigma,
        **{k: getattr(b, k) for k in OVERRIDE_KEYS},
    )


__all__ = [
    "BACKBONES",
    "CONDITIONINGS",
    "FAMILIES",
    "GEOMETRY",
    "INTERFACE",
    "OVERRIDE_KEYS",
    "PRESETS",
    "Cond",
    "build_backbone",
    "build_net",
    "check_geometry",
    "default_conditioning",
    "geometry_errors",
    "register_family",
    "resolve_preset",
]
