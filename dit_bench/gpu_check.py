"""The GPU check: one script, a few minutes on one GPU, one report to commit.

    python -m dit_bench.gpu_check                 # make gpu-check; writes reports/gpu/<date>-<device>.md
    python -m dit_bench.gpu_check --smoke         # tiny presets on whatever device (tests run this on CPU)

Sections, each guarded (an error is recorded in the report and the next section runs) and
each given a time cap inside a global budget (a section that would start with too little time
left is skipped, and one that overruns is interrupted by an alarm):
1. environment: device, torch, CUDA, the packages seen;
2. the measured matmul peak (8192^3 bf16);
3. training-step benchmark of DiT-XL/2 and DiT-B/2 on 32x32x4 latents, batch 64, bf16, eager
   and compiled (`dit_bench.bench`): img/s, TFLOP/s, MFU against the measured and datasheet
   peaks, compile time, peak memory;
4. where the compiled DiT-XL/2 step's time goes (`bench.profile_step`): GPU time by kernel
   group (matmul, attention, fused elementwise, optimiser, other) and the costliest kernels,
   and the budget against the target (`step_budget`): the TFLOP/s the linear layers and
   attention reach, and how long everything else may take for the step to reach 45% MFU;
5. the CUDA-marked tests (tests/test_cuda_fast_paths.py: every fast path equals the plain
   path), through pytest when it is installed, else as plain functions;
6. a small DiT trained on `shapes` at 64x64 for a few hundred steps (a plain torch loop over
   the objective, the data set and AdamW): the loss must fall;
7. the harness's own training path on the same data (`dit-bench train`: Lightning, bf16-mixed,
   the compiled backbone replayed as CUDA graphs, fused AdamW with gradient clipping, EMA,
   validation, checkpoints, a sample grid; the summary must name this GPU; then `dit-bench
   sample` of the run, on the device it picks), beside the bare
   compiled step of the same model, plain and with the harness's clipping, EMA and
   deterministic algorithms (what is left is Lightning's loop and the loader), when pydantic
   and Lightning import: skipped where they do not (the GPU
   machines have no pydantic: carry it as a wheel, README "Performance");
8. sampling img/s: 250-step DDPM and 50-step Euler with guidance, eager and compiled;
9. candidate settings for the compiled DiT-XL/2 step (`dit_bench.step_variants`: CUDA graphs
   and a bf16 residual stream, alone and together), the default one first, in the time left;
10. the sweep's batch: DiT-XL/2 at batch 256 with activation checkpointing on every block (the
   sweep's gpu profile) and on every other block: its speed and whether it fits the card;
11. the FSDP tests (tests/test_cuda_fsdp.py: FSDP from config alone on one GPU, against plain
   training, and its resume), through pytest, when pydantic and Lightning import; last, as
   they measure nothing the report's numbers need;
12. the harness's paths on the GPU (tests/test_cuda_harness.py: gradient accumulation under
   bf16-mixed against the whole batch, `eval --shard K/N --device cuda:0` merged against the
   unsharded eval, `sample` of a CPU-trained run on the GPU and of a GPU run on the CPU, pinned
   batches only for a CUDA run, TensorBoard's scalars against metrics.csv where tensorboard
   imports), as section 11: three short trainings, about 30 s.
The report (Markdown, with a JSON beside it) is rewritten after every section, so a run cut
short still leaves what it measured. Files go to reports/gpu/ and, when $OUT is set (the
device tool returns only what is under $OUT), there too.

Imports: torch, numpy, PIL and dit_bench's backbones, objectives, sampling and data.shapes.
Not pydantic (so not `dit_bench.config` nor the Lightning training path, whose config is a
pydantic model: section 7 imports them only when they are there), not Lightning, diffusers,
optuna, clean-fid, mlxtend or scikit-learn: the GPU machines have torch but not those.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from dit_bench import bench, fast, step_variants
from dit_bench.backbones import Cond, build_backbone
from dit_bench.objectives import build_objective

REPO = Path(__file__).resolve().parents[1]
CUDA_TESTS = "tests/test_cuda_fast_paths.py"
FSDP_TESTS = "tests/test_cuda_fsdp.py"  # three short trainings: the last section, not to delay
DEVICE_TESTS = "tests/test_cuda_harness.py"  # as FSDP_TESTS, after them
TARGET_MFU = 0.45  # issue 8: DiT-XL/2, 32x32x4, batch 64, bf16, compiled, of the datasheet peak


class SectionSkipped(Exception):
    """A section that cannot run on this machine (a missing package): reported, not an error."""


class SectionTimeout(BaseException):
    """The section's alarm. A BaseException, as KeyboardInterrupt: code that records an
    Exception and goes on (a failing test, a failing step variant) must not swallow it."""


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds` (no-op where SIGALRM is absent)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def handler(signum, frame):
        raise SectionTimeout(f"section cut off after its {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# Plans: the full check and the smoke version (tiny presets, CPU-friendly)
# ---------------------------------------------------------------------------------------------


# `dit-bench train --set ...` for the harness section: the settings of the shipped GPU profiles
# (bf16-mixed, fused AdamW, clipping at 1.0, EMA), one validation and sample grid at the end
HARNESS = (
    "experiment=gpu-check",
    "data.name=shapes",
    "objective.name=ddpm",
    "train.precision=bf16-mixed",
    "train.val_every=1000000",
    "train.checkpoint_every=100",
    "eval.samples_per_class=1",
    "eval.sampler=ddim",
    "eval.sample_steps=10",
)


# `sweep batch`: checkpointing every block first, then every other block
# (train.activation_checkpointing_every=2, what the sweep's gpu profile sets for L and XL)
SWEEP_BATCH_VARIANTS = ("checkpoint", "checkpoint-half")


def plan(smoke: bool) -> dict:
    if smoke:
        tiny = bench.BenchConfig(
            backbones=("dit-xs/4",),
            image_size=8,
            batch=2,
            num_classes=10,
            precision="fp32",
            compile=False,
            warmup=1,
            repeats=2,
            sample=False,
        )
        return {
            "bench": [("dit-xs/4", tiny)],
            "matmul_n": 128,
            "profile": ("dit-xs/4", tiny),
            "sample": (
                "dit-xs/4",
                dict(
                    image_size=8,
                    sample_batch=2,
                    num_classes=10,
                    sampling=(("ddpm", 4, 1.0), ("euler", 3, 4.0)),
                ),
            ),
            "train": dict(
                backbone="dit-xs/4", image_size=8, batch=8, steps=30, lr=1e-3, num_samples=64
            ),
            "harness": [
                *HARNESS,
                "data.image_size=16",
                "data.num_samples=256",
                "backbone.name=dit-xs/4",
                "train.steps=20",
                "train.batch_size=16",
                "train.log_every=5",
                "optim.lr=1e-3",
                "eval.val_images=32",
            ],
            "harness_bare": (
                ("regional", "clip+ema+deterministic"),
                replace(
                    tiny, image_size=16, channels=3, batch=16, precision="bf16", learn_sigma=False
                ),
                "eager",
            ),
            # Dynamo's eager backend: the variants' code paths without Inductor's compile time
            "variants": (
                "dit-xs/4",
                replace(tiny, precision="bf16"),
                ("regional", "bf16-stream"),
                "eager",
            ),
            "sweep_batch": (
                "dit-xs/4",
                replace(tiny, precision="bf16", batch=4),
                SWEEP_BATCH_VARIANTS,
                "eager",
            ),
        }
    full = dict(
        image_size=32,
        channels=4,
        batch=64,
        precision="bf16",
        compile=True,
        warmup=3,
        repeats=10,
        sample=False,
    )
    return {
        "bench": [
            ("dit-xl/2", bench.BenchConfig(backbones=("dit-xl/2",), **full)),
            ("dit-b/2", bench.BenchConfig(backbones=("dit-b/2",), **full)),
        ],
        "matmul_n": 8192,
        "profile": ("dit-xl/2", bench.BenchConfig(**{**full, "eager": False})),
        "sample": (
            "dit-xl/2",
            dict(image_size=32, sample_batch=32, precision="bf16", compile=True),
        ),
        "train": dict(
            backbone="dit-s/4", image_size=64, batch=64, steps=300, lr=3e-4, num_samples=2048
        ),
        "harness": [
            *HARNESS,
            "data.image_size=64",
            "data.num_samples=4096",
            "backbone.name=dit-s/4",
            "train.steps=200",
            "train.batch_size=64",
            "train.log_every=20",
            "train.compile=true",
            "train.cudagraphs=true",  # what a sweep of small models on a GPU would want
            # the shapes render on first access: rendered in the loop's own process, they kept
            # the H100 waiting 3.7 s of the 24.5 s loop (reports/gpu/2026-11-27-*-021349.md)
            f"data.num_workers={min(8, os.cpu_count() or 1)}",
            "optim.lr=3e-4",
            "eval.val_images=256",
        ],
        # the harness's model and batch in the bare compiled step (`step_variants`), CUDA graphs
        # as the harness; then with its clipping, EMA and deterministic algorithms: what is
        # left to the second is Lightning's loop and the data loader; last (cut first when
        # short), with deterministic mode's NaN fill, which the harness turns off
        "harness_bare": (
            (
                "cudagraphs",
                "cudagraphs+clip+ema+deterministic",
                "cudagraphs+clip+ema+deterministic+nan-fill",
            ),
            bench.BenchConfig(
                **{**full, "image_size": 64, "channels": 3, "repeats": 30},
                learn_sigma=False,  # as the harness's config: no variance output, no VB term
                num_classes=10,  # shapes' classes
            ),
            "inductor",
        ),
        "variants": (
            "dit-xl/2",
            bench.BenchConfig(backbones=("dit-xl/2",), **full),
            step_variants.GPU_CHECK_VARIANTS,
            "inductor",
        ),
        # the sweep's gpu profile trains DiT-L and XL at batch 256 with activation
        # checkpointing on every block; every other block (half the recomputation) was
        # counted to fit an 80 GB card but never timed there
        "sweep_batch": (
            "dit-xl/2",
            bench.BenchConfig(
                backbones=("dit-xl/2",), **{**full, "batch": 256, "warmup": 2, "repeats": 5}
            ),
            SWEEP_BATCH_VARIANTS,
            "inductor",
        ),
    }


# ---------------------------------------------------------------------------------------------
# Sections: each takes the shared context and returns a JSON-ready dict
# ---------------------------------------------------------------------------------------------


def section_environment(ctx: dict) -> dict:
    dev = ctx["device"]
    out = {
        "device": fast.device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            memory_gb=round(p.total_memory / 2**30, 1),
        )
    have = {}
    for pkg in ("lightning", "pytest", "numpy", "PIL", "pydantic", "diffusers", "triton"):
        have[pkg] = importlib.util.find_spec(pkg) is not None
    out["packages_present"] = have
    return out


def section_matmul(ctx: dict) -> dict:
    dev = ctx["device"]
    out = {}
    for precision in ("bf16", "fp32"):
        with fast.allow_tf32(True) if dev.type == "cuda" else contextlib.nullcontext():
            mm = bench.matmul_peak(dev, precision, n=ctx["plan"]["matmul_n"])
        key = bench.peak_key(precision, dev, tf32=True)
        sheet = bench.datasheet_peak(fast.device_name(dev), key) if dev.type == "cuda" else None
        out[precision] = {
            **mm,
            "tflops": mm["flops_per_s"] / 1e12,
            "peak_key": key,
            "datasheet_tflops": sheet / 1e12 if sheet else None,
        }
        log(f"matmul {key}: {mm['flops_per_s'] / 1e12:.1f} TFLOP/s (n={mm['n']})")
    ctx["matmul"] = out
    return out


def section_bench(ctx: dict, cfg: bench.BenchConfig) -> dict:
    dev = ctx["device"]
    cfg = replace(cfg, device=str(dev))
    precision_peak = ctx.get("matmul", {}).get(cfg.precision)
    key = bench.peak_key(cfg.precision, dev, cfg.tf32)
    # section_matmul measured fp32 with TF32 on: not the peak of an fp32 run without TF32
    same = precision_peak is not None and precision_peak["peak_key"] == key
    peak = precision_peak["flops_per_s"] if same else None
    if peak is None:  # matmul section failed, was skipped or measured another kind: here
        with fast.allow_tf32(cfg.tf32) if dev.type == "cuda" else contextlib.nullcontext():
            mm = bench.matmul_peak(dev, cfg.precision, n=ctx["plan"]["matmul_n"])
        peak = mm["flops_per_s"]
    sheet = bench.datasheet_peak(fast.device_name(dev), key) if dev.type == "cuda" else None
    rows = []
    with fast.allow_tf32(cfg.tf32) if dev.type == "cuda" else contextlib.nullcontext():
        for name in cfg.backbones:
            rows += bench.bench_training(name, cfg, peak=peak, sheet=sheet, progress=log)
    eager = {r.backbone: r for r in rows if not r.compiled}
    out = []
    for r in rows:
        ctx.setdefault("timed_s", {})[(r.backbone, r.label)] = r.median_s  # for the profile
        d = vars(r).copy()
        base = eager.get(r.backbone)
        if r.compiled and base is not None:
            d["speedup_vs_eager"] = base.median_s / r.median_s
            # the first compiled step = compilation + one step
            d["compile_s_est"] = r.first_step_s - base.median_s
        out.append(d)
        log(
            f"{r.backbone} {r.label}: {r.img_per_s:.1f} img/s, {r.tflops:.1f} TFLOP/s, "
            f"MFU {_pct(r.mfu_measured)} measured / "
            f"{_pct(r.mfu_datasheet)} datasheet, "
            f"first step {r.first_step_s:.1f} s"
        )
    return {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()},
        "peak_key": key,
        "matmul_peak_tflops": peak / 1e12,
        "datasheet_tflops": sheet / 1e12 if sheet else None,
        "rows": out,
    }


def section_profile(ctx: dict) -> dict:
    """The step `section_bench` timed, profiled: where its time goes (compiled if planned so)."""
    name, cfg = ctx["plan"]["profile"]
    dev = ctx["device"]
    cfg = replace(cfg, backbones=(name,), device=str(dev))
    impl = bench.build_impls(name, cfg, dev)[-1]
    step, _ = bench.step_fn(impl, cfg, dev, bench.bench_inputs(cfg, dev))
    with fast.allow_tf32(cfg.tf32) if dev.type == "cuda" else contextlib.nullcontext():
        for _ in range(cfg.warmup):  # compiles (from the cache the bench section filled)
            step()
        out = bench.profile_step(step, dev)
    shares = ", ".join(f"{g} {_pct(v['share'])}" for g, v in out["groups"].items())
    log(f"{name} {impl.label}: {out['busy_ms_per_step']:.1f} ms busy per step: {shares}")
    key = bench.peak_key(cfg.precision, dev, cfg.tf32)
    sheet = bench.datasheet_peak(fast.device_name(dev), key) if dev.type == "cuda" else None
    timed = ctx.get("timed_s", {}).get((name, impl.label))
    budget = step_budget(impl.net, cfg.batch, out, timed_s=timed, sheet=sheet)
    return {"backbone": name, "label": impl.label, "precision": cfg.precision, **out, **budget}


def _attention_flops(net: torch.nn.Module) -> int | None:
    """Forward FLOPs of a DiT's attention matmuls per image (Q K^T and attn @ V: 4 T^2 D a
    block), as `flops()` counts them; None for other backbones."""
    try:
        d = net.blocks[0].attn.proj.in_features
        return 4 * net.num_tokens**2 * d * len(net.blocks)
    except AttributeError:
        return None


def step_budget(
    net: torch.nn.Module, batch: int, prof: dict, timed_s: float | None, sheet: float | None
) -> dict:
    """The profiled step against the target: the rates its matrix products and attention
    reach (3 x forward FLOPs, as the benchmark counts), the time of the parts already at a
    hardware rate (matmul + attention + optimiser), and how long everything else (elementwise
    kernels, other, the GPU waiting) may take for the step to reach TARGET_MFU of `sheet`."""
    attn = _attention_flops(net)
    if attn is None:
        return {}
    step_flops = 3 * net.flops(batch=1)["flops"] * batch
    attn_flops = 3 * attn * batch
    ms = {g: v["ms"] for g, v in prof["groups"].items()}
    at_rate = ms.get("matmul", 0.0) + ms.get("attention", 0.0) + ms.get("optimizer", 0.0)
    timed_ms = 1e3 * timed_s if timed_s else None
    out = {
        "linear_tflop": (step_flops - attn_flops) / 1e12,
        "attention_tflop": attn_flops / 1e12,
        "matmul_tflops": (step_flops - attn_flops) / ms["matmul"] / 1e9
        if ms.get("matmul")
        else None,
        "attention_tflops": attn_flops / ms["attention"] / 1e9 if ms.get("attention") else None,
        "at_rate_ms": at_rate,
        "timed_ms": timed_ms,
        # elementwise, other and (with a timed step) GPU idle
        "rest_ms": (timed_ms or prof["busy_ms_per_step"]) - at_rate,
    }
    if sheet:
        out["target_step_ms"] = step_flops / (TARGET_MFU * sheet) * 1e3
        out["rest_budget_ms"] = out["target_step_ms"] - at_rate
    return out


def section_cuda_tests(ctx: dict, rel: str = CUDA_TESTS, requires: tuple[str, ...] = ()) -> dict:
    """The CUDA-marked tests of `rel`; skipped, naming them, where a module of `requires`
    does not import."""
    path = REPO / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    timeout = max(10.0, ctx["section_left"]() - 5)
    missing = []
    for module in requires:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SectionSkipped(
            f"needs {', '.join(missing)} (carry pydantic as a wheel: README, Performance)"
        )
    if importlib.util.find_spec("pytest") is not None:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "cuda",
            "-o",
            "addopts=-ra",
            str(path),
        ]
        log("running " + " ".join(cmd[1:]))
        proc = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
        tail = (proc.stdout + proc.stderr)[-4000:]
        summary = next(
            (ln for ln in reversed(tail.splitlines()) if re.search(r"passed|failed|skipped", ln)),
            "",
        )
        log(f"pytest exit {proc.returncode}: {summary.strip()}")
        return {
            "runner": "pytest",
            "returncode": proc.returncode,
            "summary": summary.strip(),
            # 5: no test collected, which on a GPU means the file's tests went missing
            "ok": proc.returncode == 0 or (proc.returncode == 5 and ctx["device"].type != "cuda"),
            "output_tail": tail,
        }
    # No pytest: import the file and call its test functions (they take no arguments).
    spec = importlib.util.spec_from_file_location("cuda_fast_path_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = {}
    for name in sorted(n for n in dir(mod) if n.startswith("test_")):
        try:
            getattr(mod, name)()
            results[name] = "passed"
        except Exception as e:  # noqa: BLE001 - recorded in the report
            results[name] = f"failed: {type(e).__name__}: {e}"[:500]
        log(f"{name}: {results[name]}")
    ok = all(v == "passed" for v in results.values())
    return {"runner": "plain functions (no pytest)", "results": results, "ok": ok}


def section_train(ctx: dict) -> dict:
    """A small DiT on `shapes`: plain loop (objective + data + AdamW, bf16 autocast on GPU)."""
    from dit_bench.data.shapes import SHAPE_CLASSES, ShapesDataset

    p = ctx["plan"]["train"]
    dev = ctx["device"]
    precision = "bf16" if dev.type == "cuda" else "fp32"
    t0 = time.perf_counter()
    ds = ShapesDataset(p["num_samples"], p["image_size"])
    images = torch.stack([ds[i][0] for i in range(len(ds))]).to(dev)  # (N, 3, S, S) in [-1, 1]
    labels = torch.tensor([ds[i][1] for i in range(len(ds))], device=dev)
    render_s = time.perf_counter() - t0
    log(f"rendered {len(ds)} shapes at {p['image_size']}px in {render_s:.1f} s")
    n_classes = len(SHAPE_CLASSES)
    torch.manual_seed(0)
    with torch.device(dev):
        net = build_backbone(
            p["backbone"], image_size=p["image_size"], in_channels=3, num_classes=n_classes
        )
    objective = build_objective("ddpm")
    opt = torch.optim.AdamW(
        net.parameters(), lr=p["lr"], fused=fast.fused_adamw_default(dev), weight_decay=0.0
    )
    g = torch.Generator(device=dev).manual_seed(0)
    losses = []
    t1 = time.perf_counter()
    with fast.allow_tf32(True) if dev.type == "cuda" else contextlib.nullcontext():
        for _ in range(p["steps"]):
            idx = torch.randint(0, len(ds), (p["batch"],), device=dev, generator=g)
            x, y = images[idx], labels[idx]
            drop = torch.rand(p["batch"], device=dev, generator=g) < 0.1  # guidance dropout
            y = torch.where(drop, n_classes, y)
            opt.zero_grad(set_to_none=True)
            with bench.autocast(dev, precision):
                loss = objective.loss(net, x, Cond(labels=y), generator=g)["loss"].mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(loss.detach())  # no host sync inside the loop
        curve = torch.stack(losses).float().cpu()
    seconds = time.perf_counter() - t1
    k = max(1, len(curve) // 10)
    first, last = curve[:k].mean().item(), curve[-k:].mean().item()
    ok = bool(torch.isfinite(curve).all()) and last < 0.5 * first
    log(
        f"train {p['backbone']}: loss {first:.4f} -> {last:.4f} in {p['steps']} steps, "
        f"{seconds:.1f} s ({'falls' if ok else 'DOES NOT FALL ENOUGH'})"
    )
    every = max(1, len(curve) // 20)
    return {
        **p,
        "precision": precision,
        "tokens": net.num_tokens,
        "params": net.num_params(),
        "loss_first": first,
        "loss_last": last,
        "ok": ok,
        "criterion": f"mean loss of the last {k} steps < 0.5 x that of the first {k}",
        "seconds": seconds,
        "img_per_s": p["steps"] * p["batch"] / seconds,
        "render_s": render_s,
        "curve": [round(v, 5) for v in curve[::every].tolist()],
    }


def section_harness(ctx: dict) -> dict:
    """`dit-bench train` itself, in a child process and a temporary folder: the loss must fall
    and the run finish. The plain loop above checks the model on the GPU; this, what users run
    (it would have caught the bf16-mixed gradient-clipping failure, which only a Lightning run
    shows). A child process, because Lightning's Trainer leaves process-wide settings behind
    (deterministic algorithms, cuDNN benchmarking off) that would change the timings after it."""
    try:
        import lightning  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as e:
        raise SectionSkipped(
            f"{e} (carry pydantic as a wheel: README, Performance, 'make gpu-check')"
        ) from None
    import csv
    import tempfile

    sets = list(ctx["plan"]["harness"])
    cmd = [sys.executable, "-m", "dit_bench.cli", "train", "--no-progress"]
    cmd += [a for kv in sets for a in ("--set", kv)]
    with tempfile.TemporaryDirectory(prefix="gpu-check-harness-") as tmp:
        # the section's alarm interrupts run(), which then kills the child
        proc = subprocess.run(
            [*cmd, "--out", tmp], cwd=REPO, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"dit-bench train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        (run,) = {p.parent for p in Path(tmp).glob("*/*/summary.json")}
        summary = json.loads((run / "summary.json").read_text())
        with (run / "metrics.csv").open(newline="") as f:
            curve = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
        grid = sorted((run / "samples").glob("*.png"))
        # `dit-bench sample` of the run, with its default --device auto: the GPU, as eval's
        # sampling (until 4920921 it drew on the CPU, and only stand-ins tested the move)
        drawn = Path(tmp) / "sample.png"
        sample_cmd = [sys.executable, "-m", "dit_bench.cli", "sample", str(run), "-o", str(drawn)]
        sampled = subprocess.run(
            [*sample_cmd, "--n", "8", "--quiet"], cwd=REPO, capture_output=True, text=True
        )
        sample_error = (
            None
            if sampled.returncode == 0 and drawn.is_file()
            else f"exit {sampled.returncode}: {sampled.stderr[-2000:]}"
        )
    if len(curve) < 2:
        raise RuntimeError(f"metrics.csv: {len(curve)} train/loss rows")
    # summary.json writes a non-finite val loss as null: a diverged run, reported as not ok
    finite = all(v is not None and math.isfinite(v) for v in [*curve, summary["val_loss"]])
    dev = ctx["device"]
    variants, bare_cfg, backend = ctx["plan"]["harness_bare"]
    name = summary["backbone"]
    steady = summary["steady_img_per_s"]
    bare: list[dict] = []
    # the same model's bare step; a failure is reported, not the run's. No step starts in the
    # section's last 30 s, and the alarm inside one leaves the run's result and the rows
    left = ctx.get("section_left", lambda: math.inf)()
    try:
        with fast.allow_tf32(True) if dev.type == "cuda" else contextlib.nullcontext():
            step_variants.run_variants(
                variants,
                name,
                replace(bare_cfg, backbones=(name,)),
                dev,
                rows=bare,
                deadline=time.perf_counter() + left - 30,
                skipped="the section's time is spent",
                backend=backend,
            )
    except SectionTimeout as e:  # (after the last row, in the tail of run_variants: no row)
        if len(bare) < len(variants):
            bare.append({"variant": variants[len(bare)], "error": f"SectionTimeout: {e}"})
        bare += [{"variant": v, "error": f"skipped: {e}"} for v in variants[len(bare) :]]
    keep = ("variant", "ms", "img_per_s", "first_step_s")
    for i, row in enumerate(bare):
        if "img_per_s" in row:
            bare[i] = {k: row[k] for k in keep}
            bare[i]["harness_vs"] = steady / row["img_per_s"] if steady else None
    timed = ", ".join(f"{r['variant']} {r['img_per_s']:.0f}" for r in bare if "img_per_s" in r)
    # the run trained where this check runs (its summary once named the CPU after a GPU run)
    here = dev.type != "cuda" or summary["device"] == fast.device_name(dev)
    ok = finite and curve[-1] < curve[0] and bool(grid) and here and sample_error is None
    log(
        f"harness {summary['backbone']}: train loss {curve[0]:.4f} -> {curve[-1]:.4f}, val loss "
        f"{_f(summary['val_loss'], '{:.4f}')}, {summary['img_per_s']:.0f} img/s, steady "
        f"{steady or 0:.0f} img/s; bare step img/s: {timed or 'none'}; dit-bench sample "
        f"{sample_error or 'ok'} ({'ok' if ok else 'FAILED'})"
    )
    return {
        "command": " ".join(["dit-bench", *cmd[3:]]),
        "backbone": summary["backbone"],
        "steps": summary["steps"],
        "batch": summary["batch_size"],
        "train_loss_first": curve[0],
        "train_loss_last": curve[-1],
        "val_loss": summary["val_loss"],
        "img_per_s": summary["img_per_s"],
        "train_seconds": summary["train_seconds"],
        "steady_img_per_s": steady,
        "warmup_seconds": summary["warmup_seconds"],
        "data_seconds": summary["data_seconds"],
        "bare_steps": bare,
        "device": summary["device"],
        "sample_error": sample_error,  # None: `dit-bench sample` of the run drew its grid
        "ok": ok,
    }


def section_sampling(ctx: dict) -> dict:
    """Eager, then (if the plan compiles) compiled: a compiled run cut off by the section's
    alarm still leaves the eager rows in the report."""
    name, kw = ctx["plan"]["sample"]
    dev = ctx["device"]
    cfg = bench.BenchConfig(backbones=(name,), device=str(dev), **{**kw, "compile": False})
    result: dict = {}
    with fast.allow_tf32(True) if dev.type == "cuda" else contextlib.nullcontext():
        rows = bench.bench_sampling(name, cfg, progress=log)
        if kw.get("compile"):
            try:
                rows += bench.bench_sampling(
                    name, replace(cfg, compile=True, eager=False), progress=log
                )
            except SectionTimeout as e:
                result["compiled"] = str(e)
    for r in rows:
        log(
            f"{name} {r['label']} {r['sampler']} {r['steps']} steps cfg {r['cfg_scale']}: "
            f"{r['img_per_s']:.2f} img/s"
        )
    return {"rows": rows, **result}


def section_variants(ctx: dict, key: str = "variants") -> dict:
    """Candidate settings for the compiled step (`step_variants`), the shipped one first, in
    the time left: a variant cut off by the alarm leaves the rows before it. `key`: the plan's
    entry, "variants" (batch 64) or "sweep_batch" (the sweep's batch 256, checkpointed)."""
    name, cfg, variants, backend = ctx["plan"][key]
    dev = ctx["device"]
    result: dict = {"backbone": name, "precision": cfg.precision, "batch": cfg.batch, "rows": []}
    try:
        with fast.allow_tf32(True) if dev.type == "cuda" else contextlib.nullcontext():
            step_variants.run_variants(
                variants,
                name,
                replace(cfg, device=str(dev)),
                dev,
                rows=result["rows"],
                progress=log,
                backend=backend,
            )
    except SectionTimeout as e:
        result["cut_off"] = str(e)
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def _f(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table_cell(text: str, n: int = 120) -> str:
    """An error message as one Markdown table cell: one line, no column bars, at most n chars."""
    return " ".join(str(text).split()).replace("|", "/")[:n]


def render_markdown(report: dict) -> str:
    s = report["sections"]
    env = s.get("environment", {}).get("result", {})
    lines = [
        f"# GPU check: {env.get('device', '?')}, {report['started']}",
        "",
        f"`{report['command']}`: torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, "
        f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget"
        + (" (smoke: tiny presets, not a measurement)" if report["smoke"] else "")
        + ".",
        "",
    ]
    head = report.get("headline")
    if head:
        lines += ["## Headline", "", head, ""]
    mm = s.get("matmul", {}).get("result")
    if mm:
        lines += [
            "## Measured matmul peak",
            "",
            "| dtype | n | TFLOP/s | datasheet |",
            "|---|---|---|---|",
        ]
        for v in mm.values():
            lines.append(
                f"| {v['peak_key']} | {v['n']} | {v['tflops']:.1f} | "
                f"{_f(v['datasheet_tflops'], '{:.0f}')} |"
            )
        lines.append("")
    bench_rows = [
        row
        for name, sec in s.items()
        if name.startswith("bench ") and sec.get("result")
        for row in sec["result"]["rows"]
    ]
    if bench_rows:
        lines += [
            "## Training step (forward, DDPM loss with learned sigma, backward, AdamW)",
            "",
            "FLOPs = 3 x analytic forward FLOPs; MFU against the matmul peak measured above and "
            "against the datasheet dense peak.",
            "",
            "| backbone | impl | precision | batch | input | ms/step | img/s | TFLOP/s | "
            "MFU measured | MFU datasheet | peak mem GiB | first step s | vs eager |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in bench_rows:
            lines.append(
                f"| {r['backbone']} | {r['label']} | {r['precision']} | {r['batch']} | "
                f"{r['input']} | {1e3 * r['median_s']:.1f} | {r['img_per_s']:.1f} | "
                f"{r['tflops']:.1f} | {_pct(r['mfu_measured'])} | "
                f"{_pct(r['mfu_datasheet'])} | "
                f"{_f(r['peak_mem_gb'], '{:.2f}')} | {r['first_step_s']:.1f} | "
                f"{_f(r.get('speedup_vs_eager'), '{:.2f}x')} |"
            )
        lines.append("")
    pr = s.get("profile", {}).get("result")
    if pr:
        lines += [
            f"## Where the {pr['backbone']} step's time goes ({pr['label']}, {pr['precision']})",
            "",
            f"torch.profiler over {pr['steps']} steps, {pr['timed']}: "
            f"{pr['busy_ms_per_step']:.1f} ms busy per step of {pr['wall_ms_per_step']:.1f} ms "
            "wall (profiled).",
            "",
            "| group | ms/step | share |",
            "|---|---|---|",
        ]
        for g, v in pr["groups"].items():
            lines.append(f"| {g} | {v['ms']:.2f} | {_pct(v['share'])} |")
        if pr.get("at_rate_ms") is not None:
            lines += ["", budget_text(pr)]
        lines += ["", "| kernel | group | ms/step | share | calls/step |", "|---|---|---|---|---|"]
        shown = {k["name"] for k in pr["top"]}
        rest = [k for ks in pr.get("by_group", {}).values() for k in ks if k["name"] not in shown]
        lines += [_kernel_row(k) for k in pr["top"]]
        if rest:
            lines.append("| *each group's costliest beyond those* | | | | |")
            lines += [_kernel_row(k) for k in rest]
        lines.append("")
    tr = s.get("train", {}).get("result")
    if tr:
        lines += [
            "## Training a small DiT on shapes",
            "",
            f"{tr['backbone']} ({tr['params']:,} parameters, {tr['tokens']} tokens) on "
            f"`shapes` at {tr['image_size']}x{tr['image_size']}, batch {tr['batch']}, "
            f"{tr['steps']} steps, lr {tr['lr']}, {tr['precision']}: loss {tr['loss_first']:.4f}"
            f" -> {tr['loss_last']:.4f} ({'falls' if tr['ok'] else 'DOES NOT FALL ENOUGH'}; "
            f"{tr['criterion']}), {tr['img_per_s']:.0f} img/s.",
            "",
            f"Loss curve (every {max(1, tr['steps'] // 20)} steps): {tr['curve']}",
            "",
        ]
    hs = s.get("harness", {}).get("result")
    if hs:
        lines += [
            "## The harness's training path (`dit-bench train`)",
            "",
            f"{hs['backbone']} on `shapes`, {hs['steps']} steps of {hs['batch']} "
            f"({hs['device']}): train loss {hs['train_loss_first']:.4f} -> "
            f"{hs['train_loss_last']:.4f}, val loss {_f(hs['val_loss'], '{:.4f}')}, "
            f"{hs['img_per_s']:.0f} img/s; ok: {hs['ok']}.",
            "",
            f"`{hs['command']}`",
            "",
        ]
        if "sample_error" in hs:  # (reports before it had no such check)
            said = table_cell(hs["sample_error"]) if hs["sample_error"] else "8 samples drawn"
            lines += [f"`dit-bench sample RUN --n 8` of the run (--device auto): {said}.", ""]
        if hs.get("steady_img_per_s"):
            lines += [
                f"Throughput: {hs['img_per_s']:.0f} img/s over all {hs['steps']} steps "
                f"({hs['warmup_seconds']:.1f} s in the first steps: compilation, warm-up), "
                f"{hs['steady_img_per_s']:.0f} img/s after them; waiting for data "
                f"{hs['data_seconds']:.2f} s of {hs['train_seconds']:.1f} s. Beside it, the bare "
                "compiled step of the same model and batch (`step_variants`; no Lightning, no "
                "data loader):",
                "",
                "| bare step | ms | img/s | the harness at |",
                "|---|---|---|---|",
            ]
            for r in hs.get("bare_steps", []):
                if "error" in r:
                    lines.append(f"| {r['variant']} | {table_cell(r['error'])} | | |")
                else:
                    lines.append(
                        f"| {r['variant']} | {r['ms']:.1f} | {r['img_per_s']:.0f} | "
                        f"{r['harness_vs']:.2f}x |"
                    )
            lines += [""]
    sp = s.get("sampling", {}).get("result")
    if sp:
        lines += [
            "## Sampling",
            "",
            "| backbone | impl | sampler | steps | guidance | batch | precision | img/s | TFLOP/s "
            "| warm-up s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sp["rows"]:
            lines.append(
                f"| {r['backbone']} | {r['label']} | {r['sampler']} | {r['steps']} | "
                f"{r['cfg_scale']} | {r['batch']} | {r['precision']} | {r['img_per_s']:.2f} | "
                f"{r['tflops']:.1f} | {r['warmup_s']:.1f} |"
            )
        if "compiled" in sp:
            lines.append(f"\nCompiled sampling: {sp['compiled']}.")
        lines.append("")
    for sec_name, title in (
        ("variants", "Candidate settings for the compiled {backbone} step"),
        ("sweep batch", "The sweep's batch: {backbone} at batch {batch}, checkpointed"),
    ):
        va = s.get(sec_name, {}).get("result")
        if not va:
            continue
        lines += [f"## {title.format(**va)}", ""]
        if sec_name == "sweep batch":
            card = env.get("memory_gb")
            lines += [
                "The sweep's gpu profile trains DiT-L and XL at batch 256 with "
                "`train.activation_checkpointing` on every other block "
                "(`train.activation_checkpointing_every=2`, `checkpoint-half`): half the "
                "recomputation of every block (`checkpoint`), if its peak memory fits the card"
                + (f" ({card:.0f} GiB; the harness adds the EMA and the loader)." if card else ".")
                + " A variant that does not fit shows its out-of-memory error.",
                "",
            ]
        lines += [
            f"`dit_bench.step_variants`, {va['precision']}, batch {va['batch']}, one process, "
            "each built and compiled afresh; the losses (same seed, batch and noise) compare "
            "the numerics: the first step's and the last of the timed ones.",
            "",
            "| variant | ms/step | img/s | TFLOP/s | MFU datasheet | vs first | first step s | "
            "peak mem GiB | loss first | loss last |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in va["rows"]:
            if "error" in r:  # an out-of-memory error keeps the peak it reached
                peak = "" if r.get("peak_mem_gb") is None else f" {r['peak_mem_gb']:.2f}"
                lines.append(f"| {r['variant']} | {table_cell(r['error'])} | | | | | |{peak} | | |")
                continue
            lines.append(
                f"| {r['variant']} | {r['ms']:.1f} | {r['img_per_s']:.1f} | {r['tflops']:.1f} | "
                f"{_pct(r['mfu_datasheet'])} | {_f(r['vs_first'], '{:.3f}x')} | "
                f"{r['first_step_s']:.1f} | {_f(r['peak_mem_gb'], '{:.2f}')} | "
                f"{r['loss_first']:.5f} | {r['loss_last']:.5f} |"
            )
        if "cut_off" in va:
            lines.append(f"\nLater variants not timed: {va['cut_off']}.")
        lines.append("")
    for key, title in (
        ("cuda tests", CUDA_TESTS),
        ("fsdp tests", FSDP_TESTS),
        ("device tests", DEVICE_TESTS),
    ):
        ct = s.get(key, {}).get("result")
        if not ct:
            continue
        lines += [f"## CUDA-marked tests: {title}", "", f"Runner: {ct['runner']}; ok: {ct['ok']}."]
        if "summary" in ct:
            lines += ["", f"`{ct['summary']}`", "", "```", ct["output_tail"][-2500:], "```"]
        else:
            lines += [""] + [f"- {k}: {v}" for k, v in ct["results"].items()]
        lines.append("")
    lines += ["## Sections", "", "| section | status | seconds |", "|---|---|---|"]
    for name, sec in s.items():
        lines.append(f"| {name} | {sec['status']} | {sec.get('seconds', 0):.1f} |")
    errors = [(n, sec) for n, sec in s.items() if sec.get("error")]
    if errors:
        lines += ["", "## Errors", ""]
        for name, sec in errors:
            lines += [f"### {name}", "", "```", sec["error"][-3000:], "```", ""]
    if env:
        lines += ["", "## Environment", "", "```", json.dumps(env, indent=2), "```"]
    return "\n".join(lines) + "\n"


def _kernel_row(k: dict) -> str:
    name = k["name"].replace("|", "/")[:90]
    return f"| `{name}` | {k['group']} | {k['ms']:.2f} | {_pct(k['share'])} | {k['calls']:.0f} |"


def budget_text(pr: dict) -> str:
    step = f"{pr['timed_ms']:.1f} ms timed step" if pr.get("timed_ms") else "busy time"
    waiting = ", the GPU waiting" if pr.get("timed_ms") and pr["timed"].startswith("device") else ""
    text = (
        f"Linear layers {pr['linear_tflop']:.3g} TFLOP a step at "
        f"{_f(pr['matmul_tflops'], '{:.3g}')} TFLOP/s, attention {pr['attention_tflop']:.3g} "
        f"TFLOP at {_f(pr['attention_tflops'], '{:.3g}')} TFLOP/s; matmul + attention + "
        f"optimiser take {pr['at_rate_ms']:.1f} ms, the rest of the {step} (elementwise "
        f"kernels, other{waiting}) {pr['rest_ms']:.1f} ms."
    )
    if pr.get("target_step_ms") is not None:
        text += (
            f" At {100 * TARGET_MFU:.0f}% of the datasheet peak the step takes "
            f"{pr['target_step_ms']:.1f} ms: with matmul, attention and optimiser as they are, "
            f"the rest may take {pr['rest_budget_ms']:.1f} ms."
        )
    return text


def headline(report: dict) -> str | None:
    for sec_name, sec in report["sections"].items():
        if not sec_name.startswith("bench dit-xl/2") or not sec.get("result"):
            continue
        for r in sec["result"]["rows"]:
            if r["compiled"]:
                mfu = r["mfu_datasheet"]
                verdict = (
                    ""
                    if mfu is None
                    else f" Target >= {100 * TARGET_MFU:.0f}% of the datasheet peak: "
                    + ("met." if mfu >= TARGET_MFU else "NOT met.")
                )
                return (
                    f"DiT-XL/2, {r['input']} latents, batch {r['batch']}, {r['precision']}, "
                    f"compiled: **{r['img_per_s']:.0f} img/s, {r['tflops']:.0f} TFLOP/s, MFU "
                    f"{_pct(r['mfu_measured'])} of the measured "
                    f"matmul peak ({sec['result']['matmul_peak_tflops']:.0f} TFLOP/s), "
                    f"{_pct(mfu)} of the datasheet peak "
                    f"({_f(sec['result']['datasheet_tflops'], '{:.0f}')} TFLOP/s)**." + verdict
                )
    return None


def write_report(report: dict, out_dirs: list[Path]) -> list[Path]:
    report["elapsed_s"] = time.perf_counter() - report["_t0"]
    report["headline"] = headline(report)
    md = render_markdown(report)
    data = {k: v for k, v in report.items() if not k.startswith("_")}
    written = []
    for folder in out_dirs:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stem = folder / report["stem"]
            stem.with_suffix(".md").write_text(md, encoding="utf-8")
            stem.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
            written.append(stem.with_suffix(".md"))
        except OSError as e:
            log(f"could not write the report to {folder}: {e}")
    return written


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dit_bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--smoke", action="store_true", help="tiny presets (runs on a CPU)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds in all (default 420)")
    ap.add_argument("--out", default=str(step_variants.reports_gpu()), help="report folder")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads (smoke runs on a CPU)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads: expected a positive integer, got {args.threads}")

    t0 = time.perf_counter()
    deadline = t0 + args.budget
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = bench.BenchConfig(device=args.device).resolved_device()
    except ValueError as e:  # --device cuda on a machine without one
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    name = fast.device_name(device)
    started = datetime.now(timezone.utc)
    out_dirs = [Path(args.out)]
    if os.environ.get("OUT"):
        out_dirs.append(Path(os.environ["OUT"]) / "reports" / "gpu")
    if device.type != "cuda" and not args.smoke:
        log("no CUDA device: this is not a GPU measurement (use --smoke for a CPU dry run)")
    stem = f"{started:%Y-%m-%d}-{_slug(name)}" + ("-smoke" if args.smoke else "")
    if (out_dirs[0] / f"{stem}.md").exists():  # a second check that day keeps the first
        stem += f"-{started:%H%M%S}"
    report = {
        "_t0": t0,
        "stem": stem,
        "started": started.isoformat(timespec="seconds"),
        "command": "python -m dit_bench.gpu_check " + " ".join(argv or sys.argv[1:]),
        "smoke": args.smoke,
        "budget_s": args.budget,
        "sections": {},
    }
    ctx: dict = {"device": device, "plan": plan(args.smoke)}
    # (name, function, cap in seconds, least time worth starting with). The budget bounds the
    # whole run: a section starts only with `least` seconds left and stops at min(cap, left);
    # on an H200 the whole check took 89 s of a 400 s budget (reports/gpu/).
    scale = 1.0 if not args.smoke else 0.5
    sections = [
        ("environment", section_environment, 30, 1),
        ("matmul", section_matmul, 30, 5),
    ]
    for key, cfg in ctx["plan"]["bench"]:
        cap = 170 if key == "dit-xl/2" else 90
        sections.append((f"bench {key}", lambda c, cfg=cfg: section_bench(c, cfg), cap, 30))
    sections += [
        ("profile", section_profile, 60, 20),
        ("cuda tests", section_cuda_tests, 80, 20),
        ("train", section_train, 50, 10),
        ("harness", section_harness, 150, 30),
        ("sampling", section_sampling, 120, 10),
        ("variants", section_variants, 200, 40),
        ("sweep batch", lambda c: section_variants(c, "sweep_batch"), 120, 40),
        # Lightning's training path (pydantic) and pytest's tmp_path
        (
            "fsdp tests",
            lambda c: section_cuda_tests(c, FSDP_TESTS, ("pytest", "pydantic", "lightning")),
            90,
            45,
        ),
        (
            "device tests",
            lambda c: section_cuda_tests(c, DEVICE_TESTS, ("pytest", "pydantic", "lightning")),
            90,
            45,
        ),
    ]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    log(f"device {name}; budget {args.budget:.0f} s; report {out_dirs[0] / report['stem']}.md")
    for sec_name, fn, cap, least in sections:
        left = deadline - time.perf_counter()
        rec: dict = {}
        report["sections"][sec_name] = rec
        if sec_name in skip or sec_name.split()[0] in skip:
            rec["status"] = "skipped (--skip)"
            continue
        if left < least * scale:
            rec["status"] = f"skipped: {left:.0f} s left of the budget"
            log(f"{sec_name}: {rec['status']}")
            continue
        limit = min(cap, left)
        end = time.perf_counter() + limit
        ctx["section_left"] = lambda end=end: end - time.perf_counter()
        log(f"{sec_name}: start (cap {limit:.0f} s)")
        s0 = time.perf_counter()
        try:
            with alarm(limit):
                rec["result"] = fn(ctx)
            # a section that ran but whose check failed (tests, a loss that did not fall, the
            # harness) says so in the table and the exit status, not only in its body
            failed = isinstance(rec["result"], dict) and rec["result"].get("ok") is False
            rec["status"] = "failed checks" if failed else "ok"
        except SectionSkipped as e:
            rec["status"] = f"skipped: {e}"
            log(f"{sec_name}: {rec['status']}")
        except BaseException as e:  # noqa: BLE001 - record and go on (Ctrl-C still stops)
            if isinstance(e, KeyboardInterrupt):
                rec["status"] = "interrupted"
                rec["seconds"] = time.perf_counter() - s0
                write_report(report, out_dirs)
                raise
            rec["status"] = f"error: {type(e).__name__}"
            rec["error"] = traceback.format_exc()
            log(f"{sec_name}: {type(e).__name__}: {e}")
        finally:
            rec["seconds"] = time.perf_counter() - s0
            gc.collect()  # a section's compiled nets refer to themselves: the collector frees them
            if device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
        written = write_report(report, out_dirs)
        log(f"{sec_name}: {rec['status']} in {rec['seconds']:.1f} s")
    written = write_report(report, out_dirs)
    if report.get("headline"):
        log(report["headline"].replace("**", ""))
    for path in written:
        log(f"wrote {path} (+ .json)")
    if not written:  # every measurement is lost: say so in the exit status too
        log(f"no report written (see above): {', '.join(map(str, out_dirs))}")
        return 2
    failed = [
        n for n, sec in report["sections"].items() if sec["status"].startswith(("error", "failed"))
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
