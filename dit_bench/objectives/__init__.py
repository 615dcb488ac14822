"""Training objectives: pure math (noising, targets, per-sample losses, samplers), no Lightning.

A new objective is one file plus one line in OBJECTIVES, and its typed config (whose fields are
the objective's keyword arguments) with its line in `dit_bench.config.OBJECTIVE_CONFIGS`.
"""

from __future__ import annotations

from typing import Any

from dit_bench.objectives.ddpm import DDPM
from dit_bench.objectives.flow import Flow

OBJECTIVES: dict[str, type] = {"ddpm": DDPM, "flow": Flow}


def build_objective(name: str, **kwargs: Any):
    """The objective registered as `name`, built with `kwargs`; unknown names raise."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)
