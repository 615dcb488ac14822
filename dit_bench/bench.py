"""Throughput, memory and MFU of backbones: the training step and sampling, timed honestly.

What is timed
- The training step the harness repeats millions of times: zero_grad, forward under the
  configured precision, the objective's per-sample loss (DDPM, learned sigma: eps MSE + the
  VLB term, exactly `DDPM.loss`), backward, AdamW. Inputs, timesteps and labels are fixed;
  the objective draws its noise from a per-implementation generator.
- Sampling: 250-step DDPM ancestral sampling (no guidance) and 50-step Euler with
  classifier-free guidance (the guided net sees the doubled batch), img/s of one full run.

How
- Warm-up steps first (the first compiled step includes compilation: reported as
  `first_step_s`), then `repeats` timed steps; every timed region ends with a CUDA
  synchronisation. Implementations are timed in alternation, their order rotated every repeat,
  so machine noise (other jobs on a shared CPU) hits all of them alike. Medians are reported,
  with the interquartile range.
- Achieved FLOP/s = 3 x analytic forward FLOPs (`net.flops()`, matrix products only) x images
  / median step time; forward + backward = 3 x forward, as DiT and the scaling-law papers count.
- MFU against two peaks: the large square matrix product measured in the same process on the
  same device and dtype (what this machine really delivers), and on known GPUs the datasheet
  dense peak (H100 SXM / H200 bf16: 989 TFLOP/s, A100: 312).
- Memory, per implementation: its parameters, gradients and optimiser state plus the peak
  transient allocation of one step (CUDA: `torch.cuda.max_memory_allocated`; CPU: the
  allocator's totals in the profiler's memory events, `cpu_peak_transient_bytes`).

`--against diffusers` adds diffusers' `DiTTransformer2DModel` configured to compute the same
function (see `make_diffusers_dit`), timed in the same process, interleaved with ours.

Fast paths (`dit_bench.fast`, shared with training; each tested equal to the plain path in
tests/test_fast_paths.py and tests/test_cuda_fast_paths.py): `compile_backbone` (torch.compile of the backbone only; in
code compiled for the CPU, GELU(tanh) runs as x * sigmoid(2u) and short sequences attend by
batched products, each with a hand-written backward: see `layers.TanhGELU` and
`layers.attention`), bf16 autocast (float32 master weights), fused AdamW (ours on CUDA and the
CPU; the reference gets torch's default AdamW unless `fused` is set for both), TF32 matmuls
on GPU, channels-last for convolutional backbones, SDPA (flash / memory-efficient kernels on
GPU).

This module imports torch and dit_bench's backbones and objectives only (no pydantic, no
Lightning): the GPU check (`dit_bench.gpu_check`) uses it on machines that have only torch.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gc
import io
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dit_bench.backbones import Cond, build_backbone, check_geometry, resolve_preset
from dit_bench.fast import (
    NO_CXX_COMPILER,
    allow_tf32,
    compile_backbone,
    device_name,
    fused_adamw_default,
    lacks_cxx_compiler,
)
from dit_bench.objectives import build_objective

# Dense (no sparsity) datasheet peaks in TFLOP/s, by a substring of the CUDA device name; the
# first match wins, so the PCIe and NVL parts come before the SXM ones ("NVIDIA H100 80GB HBM3").
DATASHEET_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
PRECISIONS = ("fp32", "bf16")
SAMPLING = (  # (sampler, steps, guidance scale): DiT's 250-step DDPM; a 50-step guided ODE
    ("ddpm", 250, 1.0),
    ("euler", 50, 4.0),
)
REFERENCES = ("diffusers",)


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (float32 master weights, matmuls in bf16) or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Device, peaks
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_key(precision: str, device: torch.device, tf32: bool) -> str:
    """Which datasheet column a run's matmuls use: bf16, tf32 (fp32 with TF32 on GPU) or fp32."""
    if precision == "bf16":
        return "bf16"
    return "tf32" if device.type == "cuda" and tf32 else "fp32"


def datasheet_peak(name: str, key: str) -> float | None:
    """Dense datasheet peak in FLOP/s of a known GPU, or None."""
    for sub, peaks in DATASHEET_TFLOPS.items():
        if sub in name:
            return peaks[key] * 1e12
    return None


def matmul_peak(
    device: torch.device, precision: str, n: int | None = None, seconds: float = 1.0
) -> dict:
    """Measured peak: FLOP/s of an n x n x n matrix product in the run's dtype, median of runs.

    n defaults to 8192 on CUDA (large enough to saturate an H100) and 1024 on the CPU. Random
    operands (zeros run faster on some GPUs). Each run is a group of back-to-back products
    lasting about 20 ms between two synchronisations, so launch and sync latency do not count
    against the peak (one synchronised 8192^3 product at a time read 5% lower on an H100:
    690 against 731 TFLOP/s, reports/gpu/xl2_variants-113134.json). Timed for about `seconds`
    after a warm-up.
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    group = max(1, math.ceil(0.02 / ((time.perf_counter() - t0) / 3)))
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        for _ in range(group):
            torch.mm(a, b, out=out)
        sync(device)
        times.append((time.perf_counter() - t0) / group)
    med = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / med}


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block: what C++ code prints there (Kineto's
    profiler_start/stop lines, "gpuGetDeviceCount failed" on a machine without a GPU, the CPU
    allocator's note on blocks freed that were made before profiling) is not the user's news.
    Python's own exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_transient_bytes(step: Callable[[], object]) -> int | None:
    """The most bytes `step()` holds at once on the CPU above what was allocated before it.

    The CPU allocator keeps no statistics (CUDA's max_memory_allocated); the profiler's memory
    events carry its running total of bytes allocated since profiling began, eager and
    compiled code alike (Inductor allocates through the same allocator). The process's peak
    RSS would not do: it is one number for every implementation of the process, and it keeps
    pages malloc reused. None where this torch's profiler has no such events.

    Runs `step` twice: the total counts only blocks allocated while profiling, so a block
    made before it and freed in it (the last step's gradients, which zero_grad drops) would
    not come off, and its successor would count twice. The first, discarded, run allocates
    what the second frees.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # a private API: a future torch may move it
        return None
    with _native_stderr_silenced():  # the profiler's own log lines (and a GPU-less ERROR)
        for _ in range(2):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None or not hasattr(results, "experimental_event_tree"):
        return None
    events = []  # (time, bytes allocated (< 0: freed), the allocator's total after it)
    stack = list(results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            f = node.extra_fields
            events.append((node.start_time_ns, f.alloc_size, f.total_allocated))
        stack.extend(reversed(node.children))  # popped in the tree's order
    if not events:
        return None
    events.sort(key=lambda e: e[0])  # by time alone: a tie keeps the tree's order
    # the total runs on from earlier profiling in the process: taken from the step's start
    _, size, total = events[0]
    return max(0, max(e[2] for e in events) - (total - size))


# ---------------------------------------------------------------------------------------------
# Implementations: ours (eager, compiled) and the reference
# ---------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One thing to time: a module, the callable the objective calls, and a label."""

    label: str  # e.g. "dit-bench", "dit-bench+compile", "diffusers"
    impl: str  # "dit-bench" or a reference name
    compiled: bool
    net: nn.Module
    call: Callable  # (x, timesteps, cond) -> output, as every backbone


def make_ours(name: str, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """Our backbone `name` for the benchmark's input, seeded by cfg.seed and initialised on the
    device (seconds, not a minute, at XL)."""
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        return build_backbone(
            name,
            image_size=cfg.image_size,
            in_channels=cfg.channels,
            num_classes=cfg.num_classes,
            learn_sigma=cfg.learn_sigma,
        )


def make_diffusers_dit(
    name: str, *, image_size: int, channels: int, num_classes: int, learn_sigma: bool
):
    """diffusers' DiTTransformer2DModel computing DiT's function (DiT adaLN-Zero; with
    `learn_sigma`, the variance channels: as ours, or the two steps would differ in work).

    Its constructor covers heads, width, depth, patch, out_channels (2C or C) and norm_eps = 1e-6
    (DiT's; diffusers defaults to 1e-5). Two things it has no config flag for, set on the
    instances: the timestep sinusoid's `downscale_freq_shift` is hard-coded to 1 in
    `CombinedTimestepLabelEmbeddings` (exponent / (half - 1)); DiT uses 0 (exponent / half); and
    its label embedder drops labels at random in training mode (class_dropout_prob 0.1), which
    the harness does outside the backbone: set to 0. diffusers keeps one timestep/label
    embedder per block (weights copied from one in converted checkpoints): 28 small extra
    MLPs at XL, counted in its parameters but not in the FLOPs (less than 0.1%).
    """
    from dit_bench.data.latents import require_diffusers

    spec = resolve_preset(name)
    if spec["family"] != "dit":
        raise ValueError(f"--against diffusers needs a DiT preset (dit-*), got {name!r}")
    net = require_diffusers("--against diffusers").DiTTransformer2DModel(
        num_attention_heads=spec["num_heads"],
        attention_head_dim=spec["hidden_size"] // spec["num_heads"],
        in_channels=channels,
        out_channels=2 * channels if learn_sigma else channels,
        num_layers=spec["depth"],
        sample_size=image_size,
        patch_size=spec["patch_size"],
        num_embeds_ada_norm=num_classes,
        norm_eps=1e-6,
    )
    for block in net.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return net


def _ours_call(net: nn.Module) -> Callable:
    return net  # the backbone interface already is (x, timesteps, cond)


def _diffusers_call(net: nn.Module) -> Callable:
    def call(x, timesteps, cond):
        return net(x, timestep=timesteps, class_labels=cond.labels).sample

    return call


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What to time. Every field has a flag of the same name in `dit-bench bench`."""

    backbones: tuple[str, ...] = ("dit-s/2",)
    image_size: int = 32
    channels: int = 4
    batch: int = 64
    num_classes: int = 1000
    learn_sigma: bool = True
    precision: str = "fp32"  # fp32 | bf16 (autocast, float32 master weights)
    compile: bool = False  # also time the compiled backbone (beside the eager one)
    compile_mode: str | None = None
    eager: bool = True  # time the eager backbone (False with compile: compiled only)
    against: str | None = None  # "diffusers"
    # fused AdamW for every implementation; None: ours as the harness trains
    # (`fused_adamw_default`), the reference with torch's default AdamW, as its users build it
    fused: bool | None = None
    tf32: bool = True  # GPU only
    channels_last: bool = False  # convolutional backbones
    warmup: int = 3
    repeats: int = 10
    sample: bool = True
    sample_batch: int = 16
    sampling: tuple[tuple[str, int, float], ...] = SAMPLING
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.eager or self.compile):
            raise ValueError("--compiled-only needs --compile: nothing would be timed")
        if self.against == "diffusers":  # before any timing: a later refusal loses the rest
            others = [n for n in self.backbones if resolve_preset(n)["family"] != "dit"]
            if others:
                raise ValueError(f"--against diffusers needs DiT presets (dit-*), got {others}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(
                f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N"
            ) from None
        if device.type not in ("cpu", "cuda"):  # `sync` waits for CUDA's queue only
            raise ValueError(
                f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N (timing waits "
                f"for a CUDA device's queued work; {device.type} is not timed)"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: torch {torch.__version__} sees no GPU")
        return device


@dataclass
class Row:
    backbone: str
    impl: str
    label: str
    compiled: bool
    precision: str
    batch: int
    input: str
    tokens: int | None
    params: int
    fwd_gflops_per_img: float
    median_s: float
    iqr_s: float
    img_per_s: float
    tflops: float
    mfu_measured: float | None
    mfu_datasheet: float | None
    first_step_s: float
    peak_mem_gb: float | None
    vs_reference: float | None = None
    adamw: str = ""  # "fused" or "unfused" (torch's default: a loop over parameters on the CPU)
    extra: dict = field(default_factory=dict)


def _state_bytes(net: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = 0
    for p in net.parameters():
        total += p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def bench_inputs(cfg: BenchConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch every timed step sees: (x0 (B, C, H, W), labels (B,)), from cfg.seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.channels, cfg.image_size, cfg.image_size)
    x0 = torch.randn(shape, generator=g).to(device)
    if cfg.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=g).to(device)
    return x0, labels


def step_fn(
    impl: Impl,
    cfg: BenchConfig,
    device: torch.device,
    inputs: tuple,
    losses: list[torch.Tensor] | None = None,
    *,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
):
    """The training step of `impl` (closure) and its optimiser. With `losses`, each step
    appends its (detached, on-device: no sync) loss there. `after_backward` runs before the
    optimiser's step (gradient clipping), `after_step` after it (an EMA update)."""
    x0, labels = inputs
    objective = build_objective("ddpm")
    if cfg.fused is not None:
        fused = cfg.fused
    else:
        fused = fused_adamw_default(device) if impl.impl == "dit-bench" else None
    opt = torch.optim.AdamW(impl.net.parameters(), lr=1e-4, fused=fused)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    cond = Cond(labels=labels)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, cfg.precision):
            loss = objective.loss(impl.call, x0, cond, generator=g)["loss"].mean()
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        if after_step is not None:
            after_step()
        if losses is not None:
            losses.append(loss.detach())

    return step, opt


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def compiled_kinds(cfg: BenchConfig) -> list[bool]:
    """Which of our backbones to time: eager (False) unless compiled-only, compiled (True) if
    asked."""
    return ([False] if cfg.eager or not cfg.compile else []) + ([True] if cfg.compile else [])


def build_impls(name: str, cfg: BenchConfig, device: torch.device) -> list[Impl]:
    """Ours eager and/or compiled (same initial weights), then the reference if asked."""
    impls = []
    for compiled in compiled_kinds(cfg):
        net = make_ours(name, cfg, device)  # same seed: same initial weights
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if compiled:
            compile_backbone(net, cfg.compile_mode)
        label = "dit-bench+compile" if compiled else "dit-bench"
        impls.append(Impl(label, "dit-bench", compiled, net.train(), _ours_call(net)))
    if cfg.against == "diffusers":
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            ref = make_diffusers_dit(
                name,
                image_size=cfg.image_size,
                channels=cfg.channels,
                num_classes=cfg.num_classes,
                learn_sigma=cfg.learn_sigma,
            )
        impls.append(Impl("diffusers", "diffusers", False, ref.train(), _diffusers_call(ref)))
    elif cfg.against is not None:
        raise ValueError(f"--against must be one of {list(REFERENCES)}, got {cfg.against!r}")
    return impls


@contextlib.contextmanager
def _compiler_needed(name: str) -> Iterator[None]:
    """A missing C++ compiler (fast.lacks_cxx_compiler) as one line, naming the backbone."""
    try:
        yield
    except Exception as e:
        if not lacks_cxx_compiler(e):
            raise
        raise ValueError(f"--compile ({name}): {NO_CXX_COMPILER}, or leave out --compile") from None


def _freed_after(fn: Callable) -> Callable:
    """`fn`, then its nets freed before the next measurement reads the peak memory: a compiled
    module refers to itself (module.compile() keeps torch.compile of its own call), so the
    collector alone frees it, and only once `fn`'s frame (loop variables included) is gone."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out

    return run


@_freed_after
def bench_training(
    name: str,
    cfg: BenchConfig,
    *,
    peak: float | None = None,
    sheet: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Time the training step of backbone `name` for every implementation, interleaved."""
    device = cfg.resolved_device()
    impls = build_impls(name, cfg, device)
    inputs = bench_inputs(cfg, device)
    steps = {i.label: step_fn(i, cfg, device, inputs) for i in impls}

    first: dict[str, float] = {}
    for i in impls:  # warm-up, one implementation at a time (compilation happens here)
        step, _ = steps[i.label]
        _log(progress, f"  {name} {i.label}: warm-up ({cfg.warmup} steps)")
        for k in range(cfg.warmup):
            t0 = time.perf_counter()
            step()
            sync(device)
            if k == 0:
                first[i.label] = time.perf_counter() - t0
    times: dict[str, list[float]] = {i.label: [] for i in impls}
    _log(progress, f"  {name}: timing {cfg.repeats} repeats of {len(impls)} implementations")
    for r in range(cfg.repeats):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]  # rotate: no fixed position
        for i in order:
            step, _ = steps[i.label]
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[i.label].append(time.perf_counter() - t0)

    mem: dict[str, float | None] = {}
    for i in impls:
        step, opt = steps[i.label]
        if device.type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated(device)
            own = _state_bytes(i.net, opt)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync(device)
            transient = torch.cuda.max_memory_allocated(device) - before
            mem[i.label] = (own + transient) / 2**30
        else:  # the same accounting from the CPU allocator's totals
            transient = cpu_peak_transient_bytes(step)
            if transient is not None:
                mem[i.label] = (_state_bytes(i.net, opt) + transient) / 2**30
            else:
                mem[i.label] = None

    ours = impls[0].net
    fwd = ours.flops(batch=1)["flops"]
    rows = []
    for i in impls:
        ts = times[i.label]
        med = statistics.median(ts)
        # inclusive: quartiles between the timings; the default (exclusive) extrapolates past
        # them for a few repeats (two timings 1 s apart: an IQR of 1.5 s)
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [med] * 3
        achieved = 3 * fwd * cfg.batch / med
        rows.append(
            Row(
                backbone=name,
                impl=i.impl,
                label=i.label,
                compiled=i.compiled,
                precision=cfg.precision,
                batch=cfg.batch,
                input=f"{cfg.channels}x{cfg.image_size}x{cfg.image_size}",
                tokens=getattr(ours, "num_tokens", None),
                params=sum(p.numel() for p in i.net.parameters()),
                fwd_gflops_per_img=fwd / 1e9,
                median_s=med,
                iqr_s=q[2] - q[0],
                img_per_s=cfg.batch / med,
                tflops=achieved / 1e12,
                mfu_measured=achieved / peak if peak else None,
                mfu_datasheet=achieved / sheet if sheet else None,
                first_step_s=first.get(i.label, float("nan")),
                peak_mem_gb=mem[i.label],
                adamw="fused" if steps[i.label][1].defaults["fused"] else "unfused",
            )
        )
    ref = next((r for r in rows if r.impl != "dit-bench"), None)
    if ref is not None:
        for r in rows:
            r.vs_reference = ref.median_s / r.median_s  # throughput ratio
    return rows


# Kernel (CUDA) or op (CPU) names -> what they do; the first pattern that matches names the group.
KERNEL_GROUPS: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    # triton_tem_: Inductor's GEMM templates (max-autotune), before the elementwise ^triton_
    (
        "matmul",
        r"gemm|matmul|cutlass|xmma|nvjet|wgmma|cublas|^triton_tem_|aten::(b?mm|addmm|baddbmm)$",
    ),
    ("optimizer", r"adam|foreach"),
    ("fused elementwise (compiled)", r"^triton_|cpp_fused|CompiledFxGraph"),
)


def kernel_group(name: str) -> str:
    """The `KERNEL_GROUPS` group of a profiler event name ("other" when none matches)."""
    for group, pattern in KERNEL_GROUPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return group
    return "other"


def profile_step(step: Callable[[], None], device: torch.device, steps: int = 3) -> dict:
    """Where a (warmed-up) training step's time goes, from torch.profiler over `steps` steps.

    CUDA: device time per kernel; CPU: self time per op (what the host spends). Returns the
    total per step, the time per `KERNEL_GROUPS` group, the 15 costliest kernels and each
    group's 8 costliest, each in ms per step and as a share of the total. The total is the
    kernels' busy time, not wall time: on a GPU, wall time minus it is what the GPU waited for
    the host.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    kernels = []  # (name, ms per step, calls per step)
    for e in prof.key_averages():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if cuda and getattr(e, "is_user_annotation", False):
            # record_function ranges (e.g. "Optimizer.step#AdamW.step") also show on the GPU
            # timeline, spanning kernels already counted: counting them too double-counts
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            kernels.append((e.key, us / steps / 1e3, e.count / steps))
    total = sum(ms for _, ms, _ in kernels) or float("nan")
    groups: dict[str, float] = {}
    for name, ms, _ in kernels:
        g = kernel_group(name)
        groups[g] = groups.get(g, 0.0) + ms
    ranked = sorted(kernels, key=lambda k: -k[1])

    def entry(name: str, ms: float, calls: float) -> dict:
        return {
            "name": name[:160],
            "group": kernel_group(name),
            "ms": ms,
            "share": ms / total,
            "calls": calls,
        }

    by_group: dict[str, list[dict]] = {}
    for k in ranked:
        members = by_group.setdefault(kernel_group(k[0]), [])
        if len(members) < 8:
            members.append(entry(*k))
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms,  # profiled: a little slower than the timed steps
        "busy_ms_per_step": total,
        "timed": "device time per kernel" if cuda else "CPU self time per op",
        "groups": {
            g: {"ms": ms, "share": ms / total}
            for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top": [entry(*k) for k in ranked[:15]],
        "by_group": by_group,  # each group's 8 costliest: what "other" and the long tails are
    }


@_freed_after
@torch.no_grad()
def bench_sampling(
    name: str, cfg: BenchConfig, *, progress: Callable[[str], None] | None = None
) -> list[dict]:
    """img/s of one full run of each sampler in `cfg.sampling`, with the run's precision, for
    our backbone eager and/or compiled as for training (`compiled_kinds`). A short run of each
    sampler goes first (kernels, allocator; the compiled backbone compiles there: `warmup_s`).
    Guidance doubles the batch the backbone sees: the compiled backbone is compiled afresh for
    each sampler, so each gets static shapes (not the dynamic batch a second shape would get),
    as a user sampling one way does."""
    device = cfg.resolved_device()
    objective = build_objective("ddpm")
    b = cfg.sample_batch
    noise = torch.randn(b, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    labels = torch.arange(b, device=device) % cfg.num_classes
    uncond = Cond(labels=torch.full_like(labels, cfg.num_classes))
    rows = []
    for compiled in compiled_kinds(cfg):
        net = make_ours(name, cfg, device).eval()  # same seed: same weights for both kinds
        label = "dit-bench+compile" if compiled else "dit-bench"
        fwd = net.flops(batch=1)["flops"]
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        for sampler, steps, scale in cfg.sampling:
            if compiled:
                compile_backbone(net, cfg.compile_mode)

            def run(n_steps: int, net=net, g=g, sampler=sampler, scale=scale) -> None:
                with autocast(device, cfg.precision):
                    objective.sample(
                        net,
                        noise,
                        Cond(labels=labels),
                        sampler=sampler,
                        steps=n_steps,
                        cfg_scale=scale,
                        uncond=uncond,
                        generator=g,
                    )
                sync(device)

            _log(
                progress,
                f"  {name} {label}: sampling {sampler} {steps} steps, guidance {scale}, batch {b}",
            )
            t0 = time.perf_counter()
            run(2)
            warmup = time.perf_counter() - t0
            t0 = time.perf_counter()
            run(steps)
            seconds = time.perf_counter() - t0
            evals = steps * b * (2 if scale != 1.0 else 1)  # guidance doubles the batch
            rows.append(
                {
                    "backbone": name,
                    "label": label,
                    "compiled": compiled,
                    "sampler": sampler,
                    "steps": steps,
                    "cfg_scale": scale,
                    "batch": b,
                    "precision": cfg.precision,
                    "seconds": seconds,
                    "warmup_s": warmup,
                    "img_per_s": b / seconds,
                    "tflops": fwd * evals / seconds / 1e12,
                }
            )
        del net
    return rows


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Everything `dit-bench bench` reports, as one JSON-ready dict."""
    device = cfg.resolved_device()
    for name in cfg.backbones:  # fail before any timing: an unknown name, a patch too large
        check_geometry(resolve_preset(name), cfg.image_size)
    name_dev = device_name(device)
    key = peak_key(cfg.precision, device, cfg.tf32)
    # each backbone is seeded (make_ours): in the caller's generator, that reset a notebook's
    # or script's random numbers to those of cfg.seed after a benchmark
    with (
        allow_tf32(cfg.tf32) if device.type == "cuda" else contextlib.nullcontext(),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        _log(progress, f"matmul peak on {name_dev} ({key})")
        mm = matmul_peak(device, cfg.precision)
        sheet = datasheet_peak(name_dev, key) if device.type == "cuda" else None
        rows: list[Row] = []
        sampling: list[dict] = []
        for name in cfg.backbones:
            with _compiler_needed(name):
                rows += bench_training(
                    name, cfg, peak=mm["flops_per_s"], sheet=sheet, progress=progress
                )
                if cfg.sample:
                    sampling += bench_sampling(name, cfg, progress=progress)
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "device": name_dev,
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "matmul_peak": {**mm, "tflops": mm["flops_per_s"] / 1e12},
        "peak_key": key,
        "datasheet_tflops": sheet / 1e12 if sheet else None,
        "rows": [asdict(r) for r in rows],
        "sampling": sampling,
    }


# ---------------------------------------------------------------------------------------------
# Output: a table for people, JSON / CSV for reports
# ---------------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def format_table(result: dict) -> str:
    c = result["config"]
    mm = result["matmul_peak"]
    load = result.get("load_avg")
    lines = [
        f"training step (forward, DDPM loss, backward, AdamW), {c['precision']}, batch "
        f"{c['batch']}, input {c['channels']}x{c['image_size']}x{c['image_size']}, median of "
        f"{c['repeats']} after {c['warmup']} warm-up",
        f"device {result['device']}, torch {result['torch']}"
        + (f", load average {load[0]:.1f} on {result['cpu_count']} CPUs" if load else ""),
        f"measured matmul peak ({mm['n']}^3 {mm['dtype']}): {mm['tflops']:.3f} TFLOP/s"
        + (
            f"; datasheet {result['peak_key']} peak {result['datasheet_tflops']:.0f} TFLOP/s"
            if result["datasheet_tflops"]
            else ""
        ),
        "",
        f"{'backbone':<10} {'impl':<18} {'ms/step':>9} {'iqr ms':>8} {'img/s':>9} "
        f"{'TFLOP/s':>8} {'MFU meas':>8} {'MFU sheet':>9} {'mem GiB':>7} {'1st s':>7} {'vs ref':>7} "
        f"{'AdamW':<7}",
    ]
    for r in result["rows"]:
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        ratio = "-" if r["vs_reference"] is None else f"{r['vs_reference']:.3f}x"
        lines.append(
            f"{r['backbone']:<10} {r['label']:<18} {r['median_s'] * 1e3:>9.1f} "
            f"{r['iqr_s'] * 1e3:>8.1f} {r['img_per_s']:>9.1f} {r['tflops']:>8.3f} "
            f"{_pct(r['mfu_measured']):>8} {_pct(r['mfu_datasheet']):>9} {mem:>7} "
            f"{r['first_step_s']:>7.1f} {ratio:>7} {r['adamw']:<7}"
        )
    lines.append("mem GiB: weights, gradients, optimiser state and one step's peak transient")
    if result["sampling"]:
        lines += [
            "",
            f"sampling, batch {c['sample_batch']} (guidance doubles what the backbone sees)",
            f"{'backbone':<10} {'impl':<18} {'sampler':<8} {'steps':>5} {'cfg':>4} {'img/s':>9} "
            f"{'TFLOP/s':>8} {'warm-up s':>9}",
        ]
        for s in result["sampling"]:
            lines.append(
                f"{s['backbone']:<10} {s['label']:<18} {s['sampler']:<8} {s['steps']:>5} "
                f"{s['cfg_scale']:>4.1f} {s['img_per_s']:>9.2f} {s['tflops']:>8.3f} "
                f"{s['warmup_s']:>9.1f}"
            )
    return "\n".join(lines)


CSV_COLUMNS = (
    "backbone",
    "label",
    "impl",
    "compiled",
    "precision",
    "batch",
    "input",
    "tokens",
    "params",
    "fwd_gflops_per_img",
    "median_s",
    "iqr_s",
    "img_per_s",
    "tflops",
    "mfu_measured",
    "mfu_datasheet",
    "peak_mem_gb",
    "first_step_s",
    "vs_reference",
    "adamw",
)


SAMPLING_CSV_COLUMNS = (
    "backbone",
    "label",
    "compiled",
    "sampler",
    "steps",
    "cfg_scale",
    "batch",
    "precision",
    "seconds",
    "warmup_s",
    "img_per_s",
    "tflops",
)


def to_csv(result: dict, sampling: bool = False) -> str:
    """One row per (backbone, implementation), or with `sampling` per (backbone,
    implementation, sampler), plus the device and peaks as columns."""
    buf = io.StringIO()
    cols = SAMPLING_CSV_COLUMNS if sampling else CSV_COLUMNS
    w = csv.DictWriter(
        buf,
        fieldnames=[*cols, "device", "matmul_peak_tflops", "datasheet_tflops"],
        extrasaction="ignore",
    )
    w.writeheader()
    for r in result["sampling" if sampling else "rows"]:
        w.writerow(
            {
                **r,
                "device": result["device"],
                "matmul_peak_tflops": result["matmul_peak"]["tflops"],
                "datasheet_tflops": result["datasheet_tflops"],
            }
        )
    return buf.getvalue()


def parse_backbones(text: str | Sequence[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(s.strip() for s in items if s.strip())
    if not names:
        raise ValueError("--backbones: give at least one preset, e.g. dit-s/2")
    return names
