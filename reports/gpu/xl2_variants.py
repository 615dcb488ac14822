"""Compiled DiT-XL/2 training step under candidate GPU settings, one process, one GPU.

    PYTHONPATH=. python3 reports/gpu/xl2_variants.py [--budget 300] [--variants regional,whole,...]

The step `make gpu-check` times (DiT-XL/2, 32x32x4, batch 64, bf16 autocast with float32
master weights, DDPM loss with learned sigma, backward, fused AdamW), built afresh for each
variant (one model on the GPU at a time; Dynamo reset between variants), 3 warm-up steps
(the first compiles), then the median of `--repeats` steps, each timed by CUDA events:
  regional        the shipped setting: each identical block compiled once (compile_backbone)
  cudnn           + cuDNN's fused attention instead of flash (SDPA backend flags)
  coordesc        + Inductor's coordinate-descent tuning of its generated kernels
  whole           the whole backbone compiled as one graph (fusion across block boundaries)
  transposed      regional, with the token stream as it was before the patch embedding
                  made it contiguous: the convolution output's transposed view, which every
                  residual add then keeps (the CPU A/B: reports/bench-cpu/ab_token_layout.py)
  max-autotune    regional, mode="max-autotune-no-cudagraphs" (Triton GEMM templates tuned
                  against cuBLAS, epilogues fused into them); not in the default list: on an
                  H100 its autotuning ran past 3 minutes and cuBLAS beat every Triton
                  template at every shape it printed (16384x1152 @ 1152x4608: 0.244 ms
                  against 0.294 ms)
Also the bf16 matmul peak measured two ways: `bench.matmul_peak` and 20 back-to-back
products between two events (in the two committed JSONs "peak_synced_tflops" is
`bench.matmul_peak` as it then was, one synchronised product at a time: 5% under the
back-to-back rate, so it now times groups of products too).
Prints one line per variant and writes xl2_variants-<time>.json beside this file (and under
$OUT) after each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from dit_bench import bench
from dit_bench.backbones import layers

HERE = Path(__file__).resolve().parent
VARIANTS = ("regional", "cudnn", "coordesc", "max-autotune", "whole", "transposed")
# cudnn, coordesc and whole were measured on an H100 and dropped (JSONs beside this file)
DEFAULT = ("regional", "transposed")


def transposed_tokens(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D), token axis fastest


def back_to_back_peak(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    for _ in range(10):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        best = max(best, 2 * n**3 * reps / (start.elapsed_time(end) / 1e3))
    return best


def run_variant(variant: str, cfg: bench.BenchConfig, repeats: int) -> dict:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    dev = torch.device("cuda")
    sdp = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
    )
    coordesc = inductor_config.coordinate_descent_tuning
    patch_embed = layers.PatchEmbed.forward
    try:
        if variant == "transposed":
            layers.PatchEmbed.forward = transposed_tokens
        if variant == "cudnn":
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(True)
        if variant == "coordesc":
            inductor_config.coordinate_descent_tuning = True
        net = bench.make_ours("dit-xl/2", cfg, dev)
        if variant == "whole":
            net.compile()
        else:
            mode = "max-autotune-no-cudagraphs" if variant == "max-autotune" else None
            bench.compile_backbone(net, mode)
        impl = bench.Impl(variant, "dit-bench", True, net.train(), net)
        step, opt = bench.step_fn(impl, cfg, dev, bench.bench_inputs(cfg, dev))
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(2):
            step()
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        fwd = net.flops(batch=1)["flops"]
        med = statistics.median(times)
        del step, opt, impl, net
        return {
            "variant": variant,
            "ms": med * 1e3,
            "min_ms": min(times) * 1e3,
            "img_per_s": cfg.batch / med,
            "tflops": 3 * fwd * cfg.batch / med / 1e12,
            "first_step_s": first,
        }
    finally:
        torch.backends.cuda.enable_flash_sdp(sdp[0])
        torch.backends.cuda.enable_mem_efficient_sdp(sdp[1])
        torch.backends.cuda.enable_cudnn_sdp(sdp[2])
        inductor_config.coordinate_descent_tuning = coordesc
        layers.PatchEmbed.forward = patch_embed
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; no variant starts after")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--variants", default=",".join(DEFAULT), help=f"of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    deadline = time.perf_counter() + args.budget
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = bench.BenchConfig(
        backbones=("dit-xl/2",), image_size=32, channels=4, batch=64, precision="bf16"
    )
    name = torch.cuda.get_device_name()
    sheet = bench.datasheet_peak(name, "bf16")
    result: dict = {
        "device": name,
        "torch": torch.__version__,
        "peak_bench_tflops": bench.matmul_peak(torch.device("cuda"), "bf16")["flops_per_s"] / 1e12,
        "peak_back_to_back_tflops": back_to_back_peak() / 1e12,
        "datasheet_tflops": sheet / 1e12 if sheet else None,
        "variants": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}), flush=True)
    stem = f"xl2_variants-{time.strftime('%H%M%S')}.json"
    outs = [HERE / stem]
    if os.environ.get("OUT"):
        outs.append(Path(os.environ["OUT"]) / stem)
    for variant in args.variants.split(","):
        if time.perf_counter() > deadline:
            result["variants"].append({"variant": variant, "error": "skipped: budget spent"})
            continue
        try:
            row = run_variant(variant, cfg, args.repeats)
            if sheet:
                row["mfu_datasheet"] = row["tflops"] * 1e12 / sheet
        except Exception as e:  # noqa: BLE001 - record and go on to the next variant
            row = {"variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        result["variants"].append(row)
        print(json.dumps(row), flush=True)
        for path in outs:
            path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
