"""A/B of deterministic mode's NaN fill of new tensors, in the DiT-S/2 training step.

    .venv/bin/python reports/bench-cpu/ab_nan_fill.py [--repeats 15] [--eager]

Lightning's `deterministic=True` / "warn" calls torch.use_deterministic_algorithms(True), which
also fills the memory of every new uninitialised tensor with NaN
(`torch.utils.deterministic.fill_uninitialized_memory`, on by default):
  fill     as Lightning leaves it
  no-fill  `fast.no_nan_fill`, as `dit-bench train` trains (the same weights bit for bit:
           tests/test_fast_paths.py)
Both under deterministic algorithms. Prints each variant's `aten::fill_` calls in one step
(torch.profiler) and its median step time, the variants interleaved in one process (ab.py).
"""

from __future__ import annotations

import argparse

import torch
from ab import interleaved_medians, print_medians

from dit_bench.bench import BenchConfig, bench_inputs, build_impls, step_fn

VARIANTS = ("fill", "no-fill")


def select(variant: str) -> None:
    torch.utils.deterministic.fill_uninitialized_memory = variant == "fill"


def fill_calls(compile: bool) -> dict[str, int]:
    """`aten::fill_` calls in one warmed-up step of each variant."""
    from torch.profiler import ProfilerActivity, profile

    cfg = BenchConfig(image_size=16, channels=4, batch=32, compile=compile, eager=not compile)
    device = torch.device("cpu")
    step, _ = step_fn(
        build_impls("dit-s/2", cfg, device)[0], cfg, device, bench_inputs(cfg, device)
    )
    calls = {}
    for v in VARIANTS:
        select(v)
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        calls[v] = sum(e.count for e in prof.key_averages() if e.key == "aten::fill_")
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--eager", action="store_true", help="time the eager step, not the compiled")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    try:
        print("aten::fill_ calls a step:", fill_calls(not args.eager))
        print_medians(
            interleaved_medians(VARIANTS, select, args.repeats, not args.eager), args.repeats
        )
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = True
        torch.use_deterministic_algorithms(False)


if __name__ == "__main__":
    main()
