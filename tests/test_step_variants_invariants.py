"""`dit_bench.step_variants` against hand-made expectations: which variants parse, which process
switches a variant flips and restores, which compile mode it asks for, and the timing and
comparison arithmetic of a row (a fake clock and a fake step: numbers known in advance). CPU
only: the SDPA switches are process flags that a CPU build reads and writes too."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from test_step_variants import CPU, TINY

from dit_bench import bench, fast, step_variants
from dit_bench.backbones import layers

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dataclasses.replace(TINY, warmup=2)  # the step-variant tests' tiny net


def sdp_flags() -> tuple[bool, bool, bool]:
    return (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
    )


def set_sdp_flags(flash: bool, mem: bool, cudnn: bool) -> None:
    torch.backends.cuda.enable_flash_sdp(flash)
    torch.backends.cuda.enable_mem_efficient_sdp(mem)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)


@pytest.fixture
def keep_sdp_flags():
    before = sdp_flags()
    yield
    set_sdp_flags(*before)


# -- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["", "+", " + ", "regional+bf16-stream", "bf16-stream+x"])
def test_parse_variant_refuses_empty_and_unknown(variant):
    with pytest.raises(ValueError, match="unknown variant"):
        step_variants.parse_variant(variant)


@pytest.mark.parametrize(
    "variant",
    ["whole+max-autotune", "max-autotune+whole", "cudnn+flash", "bf16-stream+flash+cudnn"],
)
def test_parse_variant_refuses_tweaks_that_exclude_each_other(variant):
    with pytest.raises(ValueError, match="exclude each other"):
        step_variants.parse_variant(variant)


def test_parse_variant_tweak_sets():
    assert step_variants.parse_variant(" regional ") == frozenset()
    assert step_variants.parse_variant("whole+bf16-stream") == {"whole", "bf16-stream"}
    assert step_variants.parse_variant("cudnn + transposed") == {"cudnn", "transposed"}
    assert step_variants.GPU_CHECK_VARIANTS[0] == "regional"  # "vs first" is the shipped step


# -- process switches --------------------------------------------------------------------------
def test_sdp_switches_inside_each_variant_and_restored_after(keep_sdp_flags):
    set_sdp_flags(flash=False, mem=True, cudnn=False)
    with step_variants.variant_settings("cudnn"):
        assert sdp_flags() == (False, False, True)  # cuDNN's fused attention only
    assert sdp_flags() == (False, True, False)
    set_sdp_flags(flash=False, mem=True, cudnn=True)
    with step_variants.variant_settings("flash"):
        assert sdp_flags() == (True, True, False)  # flash on, cuDNN off, mem-efficient as was
    assert sdp_flags() == (False, True, True)
    set_sdp_flags(flash=True, mem=False, cudnn=True)
    with step_variants.variant_settings("bf16-stream"):
        assert sdp_flags() == (True, False, True)  # other variants leave them alone
    with pytest.raises(RuntimeError), step_variants.variant_settings("flash"):
        raise RuntimeError("a failing variant")
    assert sdp_flags() == (True, False, True)  # restored on an error too


def test_coordesc_and_transposed_are_switched_inside_the_variant_only():
    import torch._inductor.config as inductor_config

    before = inductor_config.coordinate_descent_tuning
    shipped = layers.PatchEmbed.forward
    try:
        with step_variants.variant_settings("coordesc+transposed"):
            assert inductor_config.coordinate_descent_tuning is True
            assert layers.PatchEmbed.forward is step_variants._transposed_tokens
        assert inductor_config.coordinate_descent_tuning == before
        assert layers.PatchEmbed.forward is shipped
        with step_variants.variant_settings("regional"):
            assert inductor_config.coordinate_descent_tuning == before
            assert layers.PatchEmbed.forward is shipped
    finally:
        inductor_config.coordinate_descent_tuning = before
        layers.PatchEmbed.forward = shipped


def test_deterministic_is_switched_as_lightning_does_inside_the_variant_only(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    # a Lightning run earlier in the process leaves its settings: start from known ones
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    try:
        with step_variants.variant_settings("deterministic"):
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            assert torch.backends.cudnn.benchmark is False
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            # as the harness trains: without the NaN fill of new tensors
            assert torch.utils.deterministic.fill_uninitialized_memory is False
        assert torch.utils.deterministic.fill_uninitialized_memory is True
        with step_variants.variant_settings("deterministic+nan-fill"):  # as Lightning alone
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.utils.deterministic.fill_uninitialized_memory is True
        with pytest.raises(ValueError, match="nan-fill is a setting of deterministic"):
            step_variants.parse_variant("cudagraphs+nan-fill")
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is True
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own is kept
        with step_variants.variant_settings("deterministic"):
            pass
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def test_deterministic_gives_back_a_strict_setting_as_it_found_it():
    """A process already deterministic without warn-only (an error on a non-deterministic op)
    is so again after the variant, not left warning only or switched off."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        with step_variants.variant_settings("deterministic"):
            assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_clip_and_ema_use_the_harness_gpu_runs_settings():
    """The bare step's clip and ema tweaks stand for gpu-check's harness run: the same clipping
    norm and the same EMA decay as that run's config."""
    from dit_bench import gpu_check
    from dit_bench.config import build_config

    cfg = build_config(None, gpu_check.plan(False)["harness"])
    assert step_variants.CLIP_NORM == cfg.optim.grad_clip
    assert step_variants.EMA_DECAY == cfg.optim.ema_decay


def test_main_times_the_step_at_the_asked_size_and_refuses_an_empty_one(
    monkeypatch, tmp_path, capsys
):
    """--image-size and --channels set the timed step's input shape; 0 for either is refused
    before anything is built."""
    timed = []
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(bench, "matmul_peak", lambda device, precision: {"flops_per_s": 1e12})
    monkeypatch.setattr(step_variants, "run_variants", lambda v, n, cfg, d, **kw: timed.append(cfg))
    args = ["--backbone", "dit-xs/4", "--variants", "regional", "--out", str(tmp_path)]
    step_variants.main([*args, "--image-size", "16", "--channels", "3"])
    (cfg,) = timed
    assert (cfg.image_size, cfg.channels) == (16, 3)
    for bad in (["--image-size", "0"], ["--channels", "0"]):
        with pytest.raises(SystemExit):
            step_variants.main([*args, *bad])
        assert "both must be >= 1" in capsys.readouterr().err
    assert len(timed) == 1


def test_main_times_the_step_at_the_asked_batch_and_refuses_an_empty_one(
    monkeypatch, tmp_path, capsys
):
    """--batch sets the timed step's batch (default 64, gpu-check's; 256: the shapes-scaling
    gpu profile's DiT-XL/2, where checkpointing's memory shows); 0 is refused before anything
    is built."""
    timed = []
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(bench, "matmul_peak", lambda device, precision: {"flops_per_s": 1e12})
    monkeypatch.setattr(step_variants, "run_variants", lambda v, n, cfg, d, **kw: timed.append(cfg))
    args = ["--backbone", "dit-xs/4", "--variants", "regional", "--out", str(tmp_path)]
    step_variants.main([*args, "--batch", "3"])
    step_variants.main(args)
    assert [cfg.batch for cfg in timed] == [3, 64]
    with pytest.raises(SystemExit):
        step_variants.main([*args, "--batch", "0"])
    assert "--batch 0: must be >= 1" in capsys.readouterr().err
    assert len(timed) == 2


def test_clip_and_ema_run_in_the_step_where_the_harness_runs_them(monkeypatch):
    """clip: the gradients the optimiser steps with have norm CLIP_NORM (they stay until the
    next step's zero_grad); ema: one update per step, after the optimiser's, of a copy that is
    not the trained net."""
    updates = []
    ema_update = fast.ema_update

    def recording(ema, net, decay, pairs=None):
        updates.append((ema, net, decay, [p.detach().clone() for p in net.parameters()]))
        ema_update(ema, net, decay, pairs)

    monkeypatch.setattr(fast, "ema_update", recording)
    monkeypatch.setattr(step_variants, "CLIP_NORM", 0.1)  # the tiny net's norm is below 1
    stepped_with = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):  # the gradients' norm as the optimiser sees them
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        stepped_with.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        return adamw_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    norms = {}
    for variant in ("regional", "clip+ema"):
        with step_variants.variant_settings(variant):
            net, step, _ = step_variants.build_variant(
                variant, "dit-xs/4", TINY, CPU, backend="eager"
            )
            before = [p.detach().clone() for p in net.parameters()]
            step()
            norms[variant] = stepped_with[-1]
    assert norms["regional"] > 0.1  # so clipping at 0.1 changes them
    assert norms["clip+ema"] == pytest.approx(0.1, rel=1e-4)
    ((ema, trained, decay, seen),) = updates
    assert trained is net and ema is not net and decay == step_variants.EMA_DECAY
    # after the optimiser's step: the weights the EMA moved towards are the updated ones
    assert any(not torch.equal(a, b) for a, b in zip(seen, before, strict=True))
    for e, b, w in zip(ema.parameters(), before, seen, strict=True):
        torch.testing.assert_close(e, decay * b + (1 - decay) * w)


def test_transposed_tokens_are_the_same_values_in_a_token_minor_layout():
    torch.manual_seed(0)
    embed = layers.PatchEmbed(image_size=8, patch_size=2, in_channels=4, hidden_size=16)
    x = torch.randn(3, 4, 8, 8)
    shipped = embed(x)
    tokens = step_variants._transposed_tokens(embed, x)
    assert tokens.shape == shipped.shape == (3, 16, 16)
    torch.testing.assert_close(tokens, shipped, rtol=0, atol=0)
    assert shipped.is_contiguous() and not tokens.is_contiguous()
    assert tokens.stride(1) == 1  # the token axis is the fastest one: the convolution's layout


# -- what build_variant compiles ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "mode"),
    [
        ("regional", None),
        ("bf16-stream+coordesc", None),
        ("max-autotune", "max-autotune-no-cudagraphs"),
        ("bf16-stream+max-autotune", "max-autotune-no-cudagraphs"),
        ("whole", "whole"),
    ],
)
def test_build_variant_compile_mode(variant, mode, monkeypatch):
    calls = []

    def compile_backbone(net, mode=None, backend="inductor"):
        calls.append((mode, backend))
        return net

    monkeypatch.setattr(fast, "compile_backbone", compile_backbone)
    with step_variants.variant_settings(variant, "eager"):
        net, step, losses = step_variants.build_variant(
            variant, "dit-xs/4", TINY, CPU, backend="eager"
        )
    if mode == "whole":  # one graph for the whole backbone, no per-block compile
        assert calls == [] and net._compiled_call_impl is not None
    else:
        assert calls == [(mode, "eager")] and net._compiled_call_impl is None
    assert losses == []


# -- the timing arithmetic ---------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def fake_build(durations: list[float], clock: FakeClock, fwd_flops: float, calls: list):
    """A `build_variant` whose step takes the next of `durations` on `clock` and logs loss i."""

    def build(variant, name, cfg, device, *, backend="inductor"):
        losses: list[torch.Tensor] = []

        def step() -> None:
            clock.now += durations[len(losses)]
            losses.append(torch.tensor(float(len(losses) + 1)))
            calls.append(variant)

        net = SimpleNamespace(flops=lambda batch: {"flops": fwd_flops * batch})
        return net, step, losses

    return build


@pytest.mark.parametrize(
    ("warmup", "durations", "first", "timed"),
    [
        (2, [5.0, 1.0, 0.1, 0.6, 0.2], 5.0, [0.1, 0.6, 0.2]),
        (0, [5.0, 0.1, 0.6, 0.2], 5.0, [0.1, 0.6, 0.2]),  # the first step is never timed
        (1, [5.0, 0.1, 0.6, 0.2], 5.0, [0.1, 0.6, 0.2]),
    ],
)
def test_run_variant_numbers_from_a_fake_clock(monkeypatch, warmup, durations, first, timed):
    clock, calls = FakeClock(), []
    monkeypatch.setattr(step_variants, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(step_variants, "build_variant", fake_build(durations, clock, 2e9, calls))
    cfg = dataclasses.replace(TINY, warmup=warmup, repeats=3)
    row = step_variants.run_variant("regional", "dit-xs/4", cfg, CPU)
    median = sorted(timed)[1]  # three timed steps
    assert len(calls) == len(durations)  # max(1, warmup) + repeats steps
    assert row["variant"] == "regional"
    assert row["ms"] == pytest.approx(median * 1e3)
    assert row["min_ms"] == pytest.approx(min(timed) * 1e3)
    assert row["first_step_s"] == pytest.approx(first)
    assert row["img_per_s"] == pytest.approx(4 / median)
    assert row["tflops"] == pytest.approx(3 * 2e9 * 4 / median / 1e12)
    assert row["loss_first"] == 1.0 and row["loss_last"] == float(len(durations))
    assert row["peak_mem_gb"] is None


def test_run_variants_compare_to_the_first_row_and_the_datasheet(monkeypatch):
    ms = {"regional": 10.0, "bf16-stream": 20.0, "transposed": 40.0}

    def fake_run(variant, name, cfg, device, *, backend="inductor", profile=False):
        if variant == "broken":
            raise RuntimeError("x" * 400)
        return {"variant": variant, "ms": ms[variant], "tflops": 2.0}

    monkeypatch.setattr(step_variants, "run_variant", fake_run)
    monkeypatch.setattr(bench, "datasheet_peak", lambda name, key: 1e15)
    printed: list[str] = []
    rows = step_variants.run_variants(
        ("regional", "broken", "bf16-stream", "transposed"),
        "dit-xs/4",
        TINY,
        CPU,
        rows=[],
        progress=printed.append,
    )
    assert [r["variant"] for r in rows] == ["regional", "broken", "bf16-stream", "transposed"]
    # first ms / this ms; the first row itself has none
    assert [r.get("vs_first") for r in rows] == [None, None, 0.5, 0.25]
    assert rows[1] == {"variant": "broken", "error": "RuntimeError: " + "x" * 300}
    for r in (rows[0], rows[2], rows[3]):
        assert r["mfu_datasheet"] == pytest.approx(2.0e12 / 1e15)
    assert [json.loads(p) for p in printed] == rows

    # a failed first variant: nothing to compare against, the others still run
    failed_first = step_variants.run_variants(
        ("broken", "regional", "bf16-stream"), "dit-xs/4", TINY, CPU, rows=[]
    )
    assert [r.get("vs_first") for r in failed_first] == [None, None, None]
    assert [r.get("ms") for r in failed_first] == [None, 10.0, 20.0]

    # off a known GPU: no datasheet MFU
    monkeypatch.setattr(bench, "datasheet_peak", lambda name, key: None)
    (row,) = step_variants.run_variants(("regional",), "dit-xs/4", TINY, CPU, rows=[])
    assert row["mfu_datasheet"] is None


def test_run_variants_past_the_deadline_records_every_variant_as_skipped(monkeypatch):
    ran = []
    monkeypatch.setattr(
        step_variants, "run_variant", lambda v, *a, **kw: ran.append(v) or {"ms": 1.0}
    )
    rows = step_variants.run_variants(
        ("regional", "bf16-stream", "transposed"), "dit-xs/4", TINY, CPU, rows=[], deadline=-1.0
    )
    assert ran == []
    assert rows == [
        {"variant": v, "error": "skipped: budget spent"}
        for v in ("regional", "bf16-stream", "transposed")
    ]
