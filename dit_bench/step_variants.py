"""Candidate settings for the compiled training step, timed side by side in one process.

    python -m dit_bench.step_variants [--backbone dit-xl/2] [--variants regional,bf16-stream]
        [--image-size 32 --channels 4] [--batch 64]

The step `make gpu-check` times (default DiT-XL/2, 32x32x4, batch 64, bf16 autocast with float32
master weights, DDPM loss with learned sigma, backward, fused AdamW), built afresh for each
variant (one model on the device at a time, the compiler reset between variants), `warmup`
steps (the first compiles), then the median of `repeats` steps (each between two
synchronisations, as `dit-bench bench` times them). A variant is the shipped setting plus
tweaks joined by "+" (e.g. "bf16-stream+cudagraphs"):
  regional      no tweak: the shipped step, each identical block compiled once (compile_backbone)
  bf16-stream   the residual stream between the blocks kept in the autocast dtype
                (`fast.bf16_stream`, shipped as `train.bf16_stream`, off by default: it
                changes the numbers). Under autocast the stream is float32, so every
                LayerNorm, modulate and residual add of a block reads and writes it in
                float32: on an H100 those memory-bound kernels took 30% of the step
  cudagraphs    compile_backbone(mode="reduce-overhead"): each block graph replayed as a CUDA
                graph (no launch overhead; the profile saw about 5 ms a step with the GPU idle);
                shipped as `train.cudagraphs`, off by default
  compiled-loss the learned-sigma loss's variational-bound term (`DDPM.vb_bits_per_dim`)
                compiled: eager, it is about 190 of the step's 456 top-level ops (DiT-XS/4 on
                the CPU), tiny elementwise kernels launched one by one while the GPU has
                little else queued
  flash         SDPA's flash kernel instead of cuDNN's (torch 2.11 picks cuDNN on an H100, where
                at DiT-XL's 256 tokens and heads of 72 it reached 170 TFLOP/s)
  cudnn         SDPA restricted to cuDNN's fused attention (flash and memory-efficient off)
  transposed    the token stream as it was before the patch embedding made it contiguous: the
                convolution output's transposed view, which every residual add then keeps
  coordesc      Inductor's coordinate-descent tuning of its generated kernels
  whole         the whole backbone compiled as one graph (fusion across block boundaries)
  max-autotune  mode="max-autotune-no-cudagraphs": Triton GEMM templates tuned against cuBLAS,
                epilogues fused into them (minutes of tuning on an H100)
  tma           with max-autotune: Inductor's persistent TMA GEMM templates among the choices
                (`triton.enable_persistent_tma_matmul`: Hopper's tensor-memory loads, the
                kind of Triton GEMM that comes near cuBLAS there). The plain templates lost to
                cuBLAS at every shape of DiT-XL/2 (0.294 against 0.244 ms for 16384x1152 @
                1152x4608), so the GELU, gate and residual epilogues they could fuse never paid.
                On that product + GELU alone these came within 1% of cuBLAS, not past it (H100,
                reports/gpu/tma_probe.py); the whole step with them is not measured
  checkpoint    activation checkpointing per block (`fast.checkpoint_blocks`, shipped as
                `train.activation_checkpointing`, off by default): each block's forward
                recomputed in the backward, for the memory of its activations; its row's
                peak_mem_gb and ms are the trade (--batch 256: the shapes-scaling gpu
                profile's DiT-XL/2). With cudagraphs: unverified (the config refuses the pair)
  checkpoint-half  every other block only (`train.activation_checkpointing_every=2`): half the
                recomputation, for half the saving
What the harness's step does beyond this bare one (`dit-bench train` trains with all three;
gpu-check's harness section times "cudagraphs+clip+ema+deterministic" beside it, so what is
left between the two is Lightning's loop and the data loader; then "+nan-fill" too):
  clip          gradient clipping at norm 1.0 before the optimiser's step (the GPU profiles)
  ema           the EMA update after it (`fast.ema_update`, decay 0.9999, an eager copy)
  deterministic torch's deterministic algorithms in warn-only mode and cuDNN's autotuner off,
                as Lightning sets them for `dit-bench train` on a GPU, without their NaN fill of
                new tensors (`fast.no_nan_fill`, as the harness trains). Not quite Lightning's:
                torch reads CUBLAS_WORKSPACE_CONFIG (":4096:8") once a process, so after earlier
                cuBLAS work (gpu-check's sections) it does not apply here
  nan-fill      with deterministic: the NaN fill left on, as Lightning alone leaves it (an
                extra write of every new buffer: 256 fill kernels a compiled DiT-S/4 step)
Measured on an H100 (reports/gpu/: xl2_variants-*.json, 2026-11-27-*.md, step-variants-*.json;
the README's Performance section). Dropped: cudnn (already the default), coordesc (slower),
whole (same step, 54 s of compile), max-autotune (cuBLAS won every shape), flash (as fast as
cuDNN), compiled-loss (under 1% on top of bf16-stream+cudagraphs, 71 s of compile),
transposed (4% slower: the contiguous stream stays). Kept: cudagraphs (`train.cudagraphs`;
DiT-XL/2 1.01-1.07x, DiT-B/2 1.2x, DiT-S/2 1.8x) and bf16-stream (3.5 ms less
elementwise time a DiT-XL/2 step; `train.bf16_stream`). checkpoint, DiT-XL/2 on an H100: 0.75x
the speed at batch 64 (11.0 against 27-29 GiB peak); 18.5 GiB at batch 256. The harness's
extra work on DiT-S/4 (clip, ema, deterministic): 0.44 ms more kernel time a step, the rest
of its cost host-side launches; nan-fill 11% of the step.
`gpu_check` runs `GPU_CHECK_VARIANTS` in its last section with the budget left; this command
prints one line per variant and writes `step-variants-<time>.json` to --out (and under $OUT).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dit_bench import bench, fast
from dit_bench.backbones import layers
from dit_bench.objectives.ddpm import DDPM

REPO = Path(__file__).resolve().parents[1]


def reports_gpu(repo: Path = REPO) -> Path:
    """Where the GPU reports go by default: a checkout's reports/gpu; an installed copy's
    parent is site-packages, which holds no reports/ and is no place to write one, so
    reports/gpu under the working directory."""
    return repo / "reports" / "gpu" if (repo / "reports").is_dir() else Path("reports", "gpu")


TWEAKS = (
    "bf16-stream",
    "cudagraphs",
    "compiled-loss",
    "flash",
    "cudnn",
    "transposed",
    "coordesc",
    "whole",
    "max-autotune",
    "tma",
    "checkpoint",
    "checkpoint-half",
    "clip",
    "ema",
    "deterministic",
    "nan-fill",
)
CUDA_ONLY = {"cudagraphs", "flash", "cudnn", "tma"}
EMA_DECAY = 0.9999  # DiT's (the "ema" tweak)
CLIP_NORM = 1.0  # the GPU profiles' optim.grad_clip (the "clip" tweak)
# The shipped step first (the others' "vs first"); the last ones are cut off first when short
GPU_CHECK_VARIANTS = (
    "regional",
    "cudagraphs",
    "bf16-stream+cudagraphs",
    "bf16-stream",
    "checkpoint",  # train.activation_checkpointing: its price in time, its saving in memory
    "checkpoint-half",  # train.activation_checkpointing_every=2
)


# What a variant's row keeps of `bench.profile_step` (--profile): not each group's kernels
PROFILE_KEYS = ("busy_ms_per_step", "wall_ms_per_step", "groups", "top")


def parse_variant(variant: str) -> frozenset[str]:
    """A variant's tweaks: none for "regional", {a, b} for "a+b" (each one of TWEAKS)."""
    parts = [p.strip() for p in variant.split("+") if p.strip()]
    if variant.strip() == "regional":
        return frozenset()
    bad = [p for p in parts if p not in TWEAKS]
    if bad or not parts:
        raise ValueError(
            f"unknown variant {variant!r}: 'regional' or tweaks joined by '+', of {list(TWEAKS)}"
        )
    exclusive = ({"whole", "max-autotune"}, {"flash", "cudnn"}, {"checkpoint", "checkpoint-half"})
    if any(pair <= set(parts) for pair in exclusive):
        raise ValueError(f"variant {variant!r} combines tweaks that exclude each other")
    if "nan-fill" in parts and "deterministic" not in parts:
        raise ValueError(f"variant {variant!r}: nan-fill is a setting of deterministic")
    if "tma" in parts and "max-autotune" not in parts:
        raise ValueError(f"variant {variant!r}: tma is a setting of max-autotune")
    return frozenset(parts)


def _transposed_tokens(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D), token axis fastest


@contextlib.contextmanager
def variant_settings(variant: str, backend: str | Callable = "inductor") -> Iterator[None]:
    """The process-wide switches the variant flips (and a clean compiler), restored on exit."""
    import torch._inductor.config as inductor_config

    tweaks = parse_variant(variant)
    torch.compiler.reset()
    vb_bits_per_dim = DDPM.vb_bits_per_dim
    sdp = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
    )
    coordesc = inductor_config.coordinate_descent_tuning
    tma = inductor_config.triton.enable_persistent_tma_matmul
    patch_embed = layers.PatchEmbed.forward
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    try:
        if "deterministic" in tweaks:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = "nan-fill" in tweaks
            torch.backends.cudnn.benchmark = False
            # as Lightning sets it (else every cuBLAS call warns that it is not deterministic)
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        if "transposed" in tweaks:
            layers.PatchEmbed.forward = _transposed_tokens
        if "cudnn" in tweaks:
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(True)
        if "flash" in tweaks:
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch.backends.cuda.enable_flash_sdp(True)
        if "coordesc" in tweaks:
            inductor_config.coordinate_descent_tuning = True
        if "tma" in tweaks:
            inductor_config.triton.enable_persistent_tma_matmul = True
        if "compiled-loss" in tweaks:
            DDPM.vb_bits_per_dim = torch.compile(vb_bits_per_dim, backend=backend)
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(sdp[0])
        torch.backends.cuda.enable_mem_efficient_sdp(sdp[1])
        torch.backends.cuda.enable_cudnn_sdp(sdp[2])
        inductor_config.coordinate_descent_tuning = coordesc
        inductor_config.triton.enable_persistent_tma_matmul = tma
        layers.PatchEmbed.forward = patch_embed
        DDPM.vb_bits_per_dim = vb_bits_per_dim
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = deterministic[2]
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[4]
        if deterministic[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = deterministic[3]


def build_variant(
    variant: str,
    name: str,
    cfg: bench.BenchConfig,
    device: torch.device,
    *,
    backend: str | Callable = "inductor",
) -> tuple[torch.nn.Module, Callable[[], None], list[torch.Tensor]]:
    """Backbone `name` with the variant's module tweaks, compiled, and its training step:
    (net, step, losses), each step appending its loss to `losses`. Call it, and the step,
    inside `variant_settings(variant, backend)`. `backend`: torch.compile's (tests pass a
    cheap one)."""
    tweaks = parse_variant(variant)
    if device.type != "cuda" and tweaks & CUDA_ONLY:
        raise ValueError(f"{sorted(tweaks & CUDA_ONLY)} need a CUDA device")
    net = bench.make_ours(name, cfg, device)
    if "bf16-stream" in tweaks:
        fast.bf16_stream(net)
    hooks = {}
    if "clip" in tweaks:
        hooks["after_backward"] = lambda: torch.nn.utils.clip_grad_norm_(
            net.parameters(), CLIP_NORM
        )
    if "ema" in tweaks:  # copied before compilation, as the harness does: it stays eager
        ema = copy.deepcopy(net).requires_grad_(False).eval()
        pairs = fast.ema_pairs(ema, net)  # listed once, as the harness does
        hooks["after_step"] = lambda: fast.ema_update(ema, net, EMA_DECAY, pairs)
    if tweaks & {"checkpoint", "checkpoint-half"}:  # after the EMA copy, as the harness does
        fast.checkpoint_blocks(net, 2 if "checkpoint-half" in tweaks else 1)
    if "whole" in tweaks:
        net.compile(backend=backend)
    else:
        modes = {"cudagraphs": "reduce-overhead", "max-autotune": "max-autotune-no-cudagraphs"}
        mode = next((modes[t] for t in sorted(tweaks) if t in modes), None)
        fast.compile_backbone(net, mode, backend=backend)
    impl = bench.Impl(variant, "dit-bench", True, net.train(), net)
    losses: list[torch.Tensor] = []
    plain, _ = bench.step_fn(impl, cfg, device, bench.bench_inputs(cfg, device), losses, **hooks)
    if "cudagraphs" not in tweaks:
        return net, plain, losses

    def step() -> None:
        # a new iteration of the graph tree: the last step's graph outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
        plain()

    return net, step, losses


def run_variant(
    variant: str,
    name: str,
    cfg: bench.BenchConfig,
    device: torch.device,
    *,
    backend: str | Callable = "inductor",
    profile: bool = False,
) -> dict:
    """Build the variant (`build_variant`), time `cfg.warmup` + `cfg.repeats` steps.

    Returns {variant, ms, min_ms, img_per_s, tflops, first_step_s, loss_first, loss_last,
    peak_mem_gb (CUDA max allocated; None elsewhere)}. Same seed, batch and noise in every
    variant, so the losses compare the numerics too (the first step's is that of the
    initialised net; the last, after warmup + repeats AdamW steps). `profile`: then 3 more
    steps under torch.profiler (`bench.profile_step`: where the variant's time goes), as
    "profile" {busy_ms_per_step, wall_ms_per_step, groups, top}; the losses stay those of the
    timed steps.
    """
    cuda = device.type == "cuda"
    if cuda:
        # a compiled module refers to itself (module.compile() keeps torch.compile of its own
        # call): a caller's compiled net is freed by the collector only, and counted in this
        # peak until then (2.5 GiB of gpu-check's sampling net in run 5's first variant)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with variant_settings(variant, backend):
        net, step, losses = build_variant(variant, name, cfg, device, backend=backend)
        times = []  # synchronised wall time of each step, as `bench` times its rows
        for _ in range(max(1, cfg.warmup) + cfg.repeats):
            bench.sync(device)
            t0 = time.perf_counter()
            step()
            bench.sync(device)
            times.append(time.perf_counter() - t0)
        first, times = times[0], times[max(1, cfg.warmup) :]
        fwd = net.flops(batch=1)["flops"]
        med = statistics.median(times)
        loss_first, loss_last = losses[0].item(), losses[-1].item()
        prof = bench.profile_step(step, device) if profile else None
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None  # GiB, as bench
    return {
        "variant": variant,
        "ms": med * 1e3,
        "min_ms": min(times) * 1e3,
        "img_per_s": cfg.batch / med,
        "tflops": 3 * fwd * cfg.batch / med / 1e12,
        "first_step_s": first,
        "loss_first": loss_first,
        "loss_last": loss_last,
        "peak_mem_gb": peak_gb,
        **({"profile": {k: prof[k] for k in PROFILE_KEYS}} if prof else {}),
    }


def run_variants(
    variants: tuple[str, ...],
    name: str,
    cfg: bench.BenchConfig,
    device: torch.device,
    *,
    rows: list[dict],
    deadline: float | None = None,
    skipped: str = "budget spent",
    progress: Callable[[str], None] | None = None,
    backend: str | Callable = "inductor",
    profile: bool = False,
) -> list[dict]:
    """Each variant in turn, appended to `rows` as it finishes (a caller cut off keeps the rows
    before); a failing variant is recorded as {variant, error} and the next one runs; none
    starts after `deadline` (time.perf_counter()), each recorded as "skipped: `skipped`". The
    MFU is against the datasheet peak (None off known GPUs); `vs_first` against the first
    variant."""
    key = bench.peak_key(cfg.precision, device, cfg.tf32)
    sheet = bench.datasheet_peak(fast.device_name(device), key)
    for variant in variants:
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({"variant": variant, "error": f"skipped: {skipped}"})
            continue
        try:
            row = run_variant(variant, name, cfg, device, backend=backend, profile=profile)
            row["mfu_datasheet"] = row["tflops"] * 1e12 / sheet if sheet else None
            base = rows[0] if rows and "ms" in rows[0] else None
            row["vs_first"] = base["ms"] / row["ms"] if base else None
        except Exception as e:  # noqa: BLE001 - record it and go on to the next variant
            row = {"variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if device.type == "cuda" and isinstance(e, torch.OutOfMemoryError):
                # how far it got: run_variant reset the peak before it built the net
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        # the variant's net and optimiser are garbage now (also after an error, whose
        # traceback held them): free them before the next one is built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            progress(json.dumps(row))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m dit_bench.step_variants",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--backbone", default="dit-xl/2")
    ap.add_argument("--variants", default=",".join(GPU_CHECK_VARIANTS))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; no variant starts after")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=32, help="latent/image side (gpu-check: 32)")
    ap.add_argument("--channels", type=int, default=4, help="4: latents; 3: images (`shapes`)")
    ap.add_argument("--batch", type=int, default=64, help="images a step (gpu-check: 64)")
    ap.add_argument(
        "--profile", action="store_true", help="also profile each variant (bench.profile_step)"
    )
    ap.add_argument("--out", default=str(reports_gpu()))
    args = ap.parse_args(argv)
    if args.image_size < 1 or args.channels < 1:
        ap.error(f"--image-size {args.image_size}, --channels {args.channels}: both must be >= 1")
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: must be >= 1")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    try:
        for v in variants:
            parse_variant(v)  # fail before building anything
    except ValueError as e:
        ap.error(str(e))
    deadline = time.perf_counter() + args.budget
    cfg = bench.BenchConfig(  # gpu-check's step: 32x32x4 latents, batch 64, bf16
        backbones=(args.backbone,),
        image_size=args.image_size,
        channels=args.channels,
        batch=args.batch,
        precision="bf16",
        repeats=args.repeats,
    )
    device = cfg.resolved_device()
    sheet = bench.datasheet_peak(
        fast.device_name(device), bench.peak_key(cfg.precision, device, cfg.tf32)
    )
    result: dict = {
        "device": fast.device_name(device),
        "torch": torch.__version__,
        "backbone": args.backbone,
        "config": {"image_size": cfg.image_size, "channels": cfg.channels, "batch": cfg.batch},
        "precision": cfg.precision,
        "peak_tflops": bench.matmul_peak(device, cfg.precision)["flops_per_s"] / 1e12,
        "datasheet_tflops": sheet / 1e12 if sheet else None,
        "variants": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}), flush=True)
    stem = f"step-variants-{time.strftime('%Y%m%d-%H%M%S')}.json"
    outs = [Path(args.out) / stem]
    if os.environ.get("OUT"):
        outs.append(Path(os.environ["OUT"]) / stem)

    def progress(line: str) -> None:
        print(line, flush=True)
        for path in outs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")

    with fast.allow_tf32(True) if device.type == "cuda" else contextlib.nullcontext():
        run_variants(
            variants,
            args.backbone,
            cfg,
            device,
            rows=result["variants"],
            deadline=deadline,
            progress=progress,
            profile=args.profile,
        )


if __name__ == "__main__":
    main()
