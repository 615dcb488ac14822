"""A/B of the two rewrites compiled CPU code gets, in the compiled DiT-S/2 training step.

    .venv/bin/python reports/bench-cpu/ab_cpu_rewrites.py [--repeats 15]

Three variants of the same compiled backbone, timed interleaved (order rotated every repeat) in
one process, the step as `dit-bench bench` times it (DDPM loss with learned sigma, backward,
fused AdamW), DiT-S/2 on 16x16x4, batch 32, float32:
  plain      `F.gelu(approximate="tanh")` and `F.scaled_dot_product_attention`
  gelu       + GELU(tanh) as x * sigmoid(2u) with its hand-written backward
  gelu+attn  + short-sequence attention (the shipped code)
The rewrites are switched off by patching `layers` for this process only.
"""

from __future__ import annotations

import argparse

import torch.nn.functional as F
from ab import interleaved_medians, print_medians

import dit_bench.backbones.layers as layers

VARIANTS = ("plain", "gelu", "gelu+attn")
state = {"variant": "gelu+attn"}
shipped_gelu = layers.TanhGELU.forward
shipped_short = layers.SHORT_ATTENTION_TOKENS


def gelu_forward(self, x):
    if state["variant"] == "plain":
        return F.gelu(x, approximate="tanh")
    return shipped_gelu(self, x)


def select(variant: str) -> None:
    # Dynamo guards on both globals, so each variant keeps its own compiled graphs.
    state["variant"] = variant
    layers.SHORT_ATTENTION_TOKENS = shipped_short if variant == "gelu+attn" else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    layers.TanhGELU.forward = gelu_forward
    print_medians(interleaved_medians(VARIANTS, select, args.repeats), args.repeats)


if __name__ == "__main__":
    main()
