"""dit-bench from Python (a notebook, a script): the functions the commands call, by name;
`train`, `load_module`, `sample_images` and `save_grid` from `dit_bench.train` (the name
`dit_bench.train` is that package's).

Imported when first used, so `import dit_bench` stays instant (torch and Lightning take
seconds) and the command line's `--help` imports none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what an IDE and a type checker read: neither calls __getattr__
    from dit_bench.ablate import load_ablation, run_ablation
    from dit_bench.config import build_config, load_config
    from dit_bench.errors import ConfigError
    from dit_bench.metrics.evaluate import EvalRequest, evaluate_run
    from dit_bench.sweep import load_sweep, run_sweep

_EXPORTS = {
    "load_config": "dit_bench.config",
    "build_config": "dit_bench.config",
    "ConfigError": "dit_bench.errors",  # no torch: `except ConfigError` costs no seconds
    "evaluate_run": "dit_bench.metrics.evaluate",
    "EvalRequest": "dit_bench.metrics.evaluate",
    "load_ablation": "dit_bench.ablate",
    "run_ablation": "dit_bench.ablate",
    "load_sweep": "dit_bench.sweep",
    "run_sweep": "dit_bench.sweep",
}

# a literal: static readers (an IDE, ruff, `from dit_bench import *` in a type checker) see it
__all__ = [
    "ConfigError",
    "EvalRequest",
    "build_config",
    "evaluate_run",
    "load_ablation",
    "load_config",
    "load_sweep",
    "run_ablation",
    "run_sweep",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dit_bench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
