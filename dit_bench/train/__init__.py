"""Training: `from dit_bench.train import train, load_module, sample_images, save_grid`.

Imported when first used: `dit_bench.train.module` and the callbacks load without the run
machinery (an ablation's or a sweep's dry run imports no Lightning).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what an IDE and a type checker read: neither calls __getattr__
    from dit_bench.train.run import load_module, sample_images, save_grid, train

# a literal: static readers (an IDE, ruff, `from dit_bench.train import *` in a type checker)
# see it
__all__ = ["train", "load_module", "sample_images", "save_grid"]
_EXPORTS = tuple(__all__)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dit_bench.train' has no attribute {name!r}")
    return getattr(importlib.import_module("dit_bench.train.run"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
