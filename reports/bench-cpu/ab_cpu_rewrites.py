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
import statistics
import time

import torch
import torch.nn.functional as F

import dit_bench.backbones.layers as layers
from dit_bench.bench import BenchConfig, bench_inputs, build_impls, step_fn

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
    cfg = BenchConfig(image_size=16, channels=4, batch=32, compile=True, eager=False)
    device = torch.device("cpu")
    inputs = bench_inputs(cfg, device)
    steps = {}
    for v in VARIANTS:
        select(v)
        impl = build_impls("dit-s/2", cfg, device)[0]
        steps[v], _ = step_fn(impl, cfg, device, inputs)
        for _ in range(3):  # compile and warm up
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            select(v)
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    for v in VARIANTS:
        print(
            f"{v:<10} {statistics.median(times[v]) * 1e3:8.1f} ms/step (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
