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
import statistics
import time

import torch

import dit_bench.backbones.layers as layers
from dit_bench.bench import BenchConfig, bench_inputs, build_impls, step_fn

VARIANTS = ("permute", "unbind")
state = {"variant": "unbind"}
shipped = layers.split_heads


def split_heads(x: torch.Tensor, n: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    if state["variant"] == "unbind":
        return shipped(x, n, num_heads)
    b, s, _ = x.shape
    return x.reshape(b, s, n, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    layers.split_heads = split_heads  # Dynamo guards on `state`: one graph per variant
    cfg = BenchConfig(image_size=16, channels=4, batch=32, compile=True, eager=False)
    device = torch.device("cpu")
    inputs = bench_inputs(cfg, device)
    steps = {}
    for v in VARIANTS:
        state["variant"] = v
        impl = build_impls("dit-s/2", cfg, device)[0]
        steps[v], _ = step_fn(impl, cfg, device, inputs)
        for _ in range(3):  # compile and warm up
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            state["variant"] = v
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    for v in VARIANTS:
        print(f"{v:<8} {statistics.median(times[v]) * 1e3:8.1f} ms/step (median of {args.repeats})")


if __name__ == "__main__":
    main()
