"""Reductions the objectives share: per-sample means, and losses kept in float32 under bf16."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_flat(x: Tensor) -> Tensor:
    """(B, ...) -> (B,): the mean over every axis but the batch."""
    return x.mean(dim=tuple(range(1, x.dim())))


def at_least_f32(x: Tensor) -> Tensor:
    # losses are reduced in float32 even under bf16/fp16 autocast
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
