"""A/B of the two ways to cut a fused qkv projection into heads, in the compiled DiT-S/2 step.

    .venv/bin/python reports/bench-cpu/ab_split_heads.py [--repeats 15]

Both give the same q, k, v views (tests/test_fast_paths.py); their backwards differ:
  permute    x.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0): Inductor stacks the
             three gradients, then copies the stack into the projection's layout
  unbind     `layers.split_heads` (shipped): unbind(2), then transpose(1, 2): one stacking pass
Timed as `dit-bench bench` times the step (DDPM loss with learned sigma, backward, fused AdamW),
DiT-S/2 on 16x16x4, batch 32, float32, compiled, both variants in one process, interleaved.
"""

from __future__ import annotations

import argparse

import torch
from ab import interleaved_medians, print_medians

import dit_bench.backbones.layers as layers

VARIANTS = ("permute", "unbind")
state = {"variant": "unbind"}
shipped = layers.split_heads


def split_heads(x: torch.Tensor, n: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    if state["variant"] == "unbind":
        return shipped(x, n, num_heads)
    b, s, _ = x.shape
    return x.reshape(b, s, n, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def select(variant: str) -> None:
    state["variant"] = variant  # Dynamo guards on it: one graph per variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    layers.split_heads = split_heads
    print_medians(interleaved_medians(VARIANTS, select, args.repeats), args.repeats)


if __name__ == "__main__":
    main()
