"""The A/B loop the scripts beside this file share: variants of the DiT-S/2 training step
(16x16x4, batch 32, float32, as `dit-bench bench` times it: DDPM loss with learned sigma,
backward, fused AdamW), compiled unless told otherwise, each built (and compiled) once, then
timed interleaved in one process, the order rotated every repeat."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from dit_bench.bench import BenchConfig, bench_inputs, build_impls, step_fn


def interleaved_medians(
    variants: Sequence[str], select: Callable[[str], None], repeats: int, compile: bool = True
) -> dict[str, float]:
    """Median seconds per step of each variant; `select(v)` switches the process to variant v
    (Dynamo must guard on what it changes, so each variant keeps its own compiled graphs).

    Every variant's graph is compiled static: Dynamo would compile the second variant of a
    block as a recompile and make whatever differs from the first (a size, a stride) dynamic.
    All variants are built before any is compiled (`compile_backbone` resets the compiler)."""
    torch._dynamo.config.automatic_dynamic_shapes = False
    cfg = BenchConfig(image_size=16, channels=4, batch=32, compile=compile, eager=not compile)
    device = torch.device("cpu")
    inputs = bench_inputs(cfg, device)
    steps = {}
    for v in variants:
        select(v)
        impl = build_impls("dit-s/2", cfg, device)[0]
        steps[v], _ = step_fn(impl, cfg, device, inputs)
    for v in variants:
        select(v)
        for _ in range(3):  # compile and warm up
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in variants}
    n = len(variants)
    for r in range(repeats):
        for v in [*variants[r % n :], *variants[: r % n]]:
            select(v)
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(ts) for v, ts in times.items()}


def print_medians(medians: dict[str, float], repeats: int) -> None:
    for v, s in medians.items():
        print(f"{v:<10} {s * 1e3:8.1f} ms/step (median of {repeats})")
