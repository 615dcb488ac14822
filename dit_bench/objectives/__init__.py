"""Training objectives: pure math (noising, targets, per-sample losses, samplers), no Lightning.

A new objective is one file plus one line in OBJECTIVES, and its typed config (whose fields are
the objective's keyword arguments) with its line in `dit_bench.config.OBJECTIVE_CONFIGS`.

What the harness calls on an objective (DDPM and Flow are the worked examples):
    VAL_LEVELS                  class attribute: the validation grid's size by default
    VAL_GRID                    optional class attribute: the grid's kind, in summary.json's
                                val_grid; a new grid takes a new name, so a report tells runs
                                of the old grid (other val losses) from the new
    loss(net, x0, cond, *, generator=None, batch_slice=None) -> {"loss": (B,), ...}
        batch_slice=(start, total): x0 is rows start.. of a global batch of `total` split over
        processes; draw for the whole batch and slice (`sampling.draw_slice`)
    val_loss(net, x0, cond, *, seed=0, levels=VAL_LEVELS) -> {"loss": (), "per_level": (levels,)}
    sample(net, noise, cond, *, sampler, steps, cfg_scale, uncond, generator, clip_x0,
           cfg_interval, cfg_channels, **sampler options such as eta) -> (B, C, H, W)
An objective without one of these is refused when the registry is imported and when built.
"""

from __future__ import annotations

import inspect
from typing import Any

from dit_bench.objectives.ddpm import DDPM
from dit_bench.objectives.flow import Flow

OBJECTIVES: dict[str, type] = {"ddpm": DDPM, "flow": Flow}

# method -> the keywords the harness passes it (training step, validation, sample grids and eval)
INTERFACE = {
    "loss": ("generator", "batch_slice"),
    "val_loss": ("seed", "levels"),
    "sample": (
        "sampler", "steps", "cfg_scale", "uncond", "generator", "clip_x0", "cfg_interval",
        "cfg_channels",
    ),
}  # fmt: skip


def interface_errors(cls: type) -> list[str]:
    """What `cls` lacks of the interface in this module's docstring ([]: nothing)."""
    errors = [] if hasattr(cls, "VAL_LEVELS") else ["the class attribute VAL_LEVELS"]
    for method, keywords in INTERFACE.items():
        if not callable(getattr(cls, method, None)):
            errors.append(f"a method {method}()")
            continue
        params = inspect.signature(getattr(cls, method)).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            continue
        missing = [k for k in keywords if k not in {p.name for p in params}]
        if method == "sample":  # a sampler's own options (ddim's eta) pass through
            missing.append("**options")
        if missing:
            errors.append(f"{method}() keywords {', '.join(missing)}")
    return errors


def check_objective(name: str, cls: type) -> None:
    """Raise TypeError naming what `cls` lacks. A loss() written to the short API of DESIGN
    (no batch_slice) failed only at a run's first training step, and a missing VAL_LEVELS
    only when an ablation planned its metrics."""
    errors = interface_errors(cls)
    if errors:
        raise TypeError(
            f"objective {name!r} ({cls.__name__}) lacks {'; '.join(errors)}: every objective "
            "has the interface listed in dit_bench.objectives' docstring"
        )


for _name, _cls in OBJECTIVES.items():
    check_objective(_name, _cls)


def build_objective(name: str, **kwargs: Any):
    """The objective registered as `name`, built with `kwargs`; unknown names raise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    check_objective(name, OBJECTIVES[name])
    return OBJECTIVES[name](**kwargs)
