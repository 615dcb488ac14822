"""`dit_bench.step_variants`: the candidate settings gpu-check times for the compiled step.

Run on the CPU with Dynamo's eager backend (the variants' code paths without Inductor's
compile time); the CUDA-only tweaks are refused here, and recorded as such.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from dit_bench import bench, gpu_check, step_variants

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = bench.BenchConfig(
    backbones=("dit-xs/4",),
    image_size=8,
    batch=4,
    num_classes=10,
    precision="bf16",
    warmup=1,
    repeats=3,
    device="cpu",
)
CPU = torch.device("cpu")


def test_parse_variant():
    assert step_variants.parse_variant("regional") == frozenset()
    assert step_variants.parse_variant("bf16-stream+cudagraphs") == {"bf16-stream", "cudagraphs"}
    with pytest.raises(ValueError, match="unknown variant 'bf16'.*'bf16-stream'"):
        step_variants.parse_variant("bf16")
    with pytest.raises(ValueError, match="exclude each other"):
        step_variants.parse_variant("flash+cudnn")
    with pytest.raises(ValueError, match="tma is a setting of max-autotune"):
        step_variants.parse_variant("bf16-stream+tma")
    assert step_variants.parse_variant("max-autotune+tma") == {"max-autotune", "tma"}
    for v in step_variants.GPU_CHECK_VARIANTS:
        step_variants.parse_variant(v)


def test_tma_turns_on_persistent_tma_templates_inside_the_variant_only():
    import torch._inductor.config as inductor_config

    before = inductor_config.triton.enable_persistent_tma_matmul
    with step_variants.variant_settings("max-autotune+tma"):
        assert inductor_config.triton.enable_persistent_tma_matmul is True
    with step_variants.variant_settings("max-autotune"):
        assert inductor_config.triton.enable_persistent_tma_matmul is before
    assert inductor_config.triton.enable_persistent_tma_matmul is before
    with pytest.raises(ValueError, match=r"\['tma'\] need a CUDA device"):
        step_variants.build_variant("max-autotune+tma", "dit-xs/4", TINY, CPU, backend="eager")


def _block_input_dtypes(variant: str) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    with step_variants.variant_settings(variant):
        net, step, _ = step_variants.build_variant(variant, "dit-xs/4", TINY, CPU, backend="eager")
        for block in net.blocks:  # after the variant's own hook: sees what the block gets
            block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        step()
    return seen


def test_bf16_stream_feeds_every_block_the_autocast_dtype():
    """Under bf16 autocast the shipped stream is float32 between blocks (patch embedding plus
    the float32 position table, float32 residual adds); the variant makes it bf16 throughout."""
    depth = len(bench.make_ours("dit-xs/4", TINY, CPU).blocks)
    assert _block_input_dtypes("regional") == [torch.float32] * depth
    assert _block_input_dtypes("bf16-stream") == [torch.bfloat16] * depth


def test_compiled_loss_is_compiled_inside_the_variant_only():
    from dit_bench.objectives.ddpm import DDPM

    plain = DDPM.vb_bits_per_dim
    with step_variants.variant_settings("compiled-loss", backend="eager"):
        assert DDPM.vb_bits_per_dim is not plain
    with step_variants.variant_settings("bf16-stream"):
        assert DDPM.vb_bits_per_dim is plain
    assert DDPM.vb_bits_per_dim is plain


@pytest.mark.slow  # every step variant timed: ~17 s
def test_run_variants_rows_losses_errors_and_budget():
    rows: list[dict] = []
    variants = ("regional", "bf16-stream", "compiled-loss", "cudagraphs")
    step_variants.run_variants(variants, "dit-xs/4", TINY, CPU, rows=rows, backend="eager")
    base, stream, loss_compiled, cuda_only = rows
    # the same ops, traced: the same numbers
    assert (loss_compiled["loss_first"], loss_compiled["loss_last"]) == (
        base["loss_first"],
        base["loss_last"],
    )
    assert base["ms"] > 0 and base["vs_first"] is None and base["mfu_datasheet"] is None
    assert stream["vs_first"] == pytest.approx(base["ms"] / stream["ms"])
    # Same seed, batch and noise: the initialised nets (adaLN-Zero: identity blocks) agree...
    assert stream["loss_first"] == base["loss_first"]
    # ...and four AdamW steps later the bf16 stream is a rounding away, not another function.
    assert stream["loss_last"] == pytest.approx(base["loss_last"], rel=2e-2)
    assert stream["loss_last"] != base["loss_last"]
    assert base["loss_last"] != base["loss_first"]
    assert cuda_only == {
        "variant": "cudagraphs",
        "error": "ValueError: ['cudagraphs'] need a CUDA device",
    }
    late: list[dict] = []
    step_variants.run_variants(
        ("regional",), "dit-xs/4", TINY, CPU, rows=late, deadline=time.perf_counter() - 1
    )
    assert late == [{"variant": "regional", "error": "skipped: budget spent"}]


def test_gpu_check_variants_section_keeps_rows_when_cut_off(monkeypatch, render_gpu_section):
    """The section's alarm (a BaseException: run_variants records Exceptions and goes on) stops
    the section at the variant it interrupts; the rows before stay, the report says why."""
    timed = step_variants.run_variant

    def second_overruns(variant, *a, **kw):
        if variant != "regional":
            raise gpu_check.SectionTimeout("section cut off after its 150 s")
        return timed(variant, *a, **kw)

    monkeypatch.setattr(step_variants, "run_variant", second_overruns)
    plan = ("dit-xs/4", TINY, ("regional", "bf16-stream", "transposed"), "eager")
    result = gpu_check.section_variants({"device": CPU, "plan": {"variants": plan}})
    assert [r["variant"] for r in result["rows"]] == ["regional"]
    assert result["cut_off"] == "section cut off after its 150 s"
    text = render_gpu_section("variants", result)
    assert "## Candidate settings for the compiled dit-xs/4 step" in text
    assert (
        "| regional | " in text
        and "Later variants not timed: section cut off after its 150 s." in text
    )


def test_gpu_check_variants_section_keeps_an_error_in_one_table_cell(render_gpu_section):
    """A variant's error, often several lines and holding column bars, is one cell of its row:
    the table keeps its columns."""
    error = "RuntimeError: Triton failed |\n  File x.py, line 3\n    a | b"
    result = {"backbone": "dit-xs/4", "precision": "bf16", "batch": 4}
    result["rows"] = [{"variant": "cudagraphs", "error": error}]
    text = render_gpu_section("variants", result)
    row = "| cudagraphs | RuntimeError: Triton failed / File x.py, line 3 a / b | | | | | | | | |"
    assert row in text.splitlines()


def test_an_out_of_memory_variant_keeps_the_peak_it_reached(monkeypatch, render_gpu_section):
    """`sweep batch` asks whether checkpoint-half fits the card: a bare "out of memory" said
    no, not by how much. The row keeps the peak since the variant's start."""

    def out_of_memory(variant, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.25 GiB")

    monkeypatch.setattr(step_variants, "run_variant", out_of_memory)
    monkeypatch.setattr(step_variants.fast, "device_name", lambda d: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 77.5 * 2**30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = step_variants.run_variants(
        ("checkpoint-half",), "dit-xl/2", TINY, torch.device("cuda"), rows=[]
    )
    assert rows == [
        {
            "variant": "checkpoint-half",
            "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.25 GiB",
            "peak_mem_gb": 77.5,
        }
    ]
    result = {"backbone": "dit-xl/2", "precision": "bf16", "batch": 256, "rows": rows}
    row = "| checkpoint-half | OutOfMemoryError: CUDA out of memory. Tried to allocate 2.25 GiB "
    assert row + "| | | | | | 77.50 | | |" in render_gpu_section("sweep batch", result)


def test_profiled_variant_keeps_the_timed_losses():
    """--profile adds where the variant's time goes, after the timed steps: the losses reported
    are those of the same seeded timed steps as without it."""
    plain = step_variants.run_variant("regional", "dit-xs/4", TINY, CPU, backend="eager")
    profiled = step_variants.run_variant(
        "regional", "dit-xs/4", TINY, CPU, backend="eager", profile=True
    )
    assert "profile" not in plain
    assert (profiled["loss_first"], profiled["loss_last"]) == (
        plain["loss_first"],
        plain["loss_last"],
    )
    prof = profiled["profile"]
    assert set(prof) == set(step_variants.PROFILE_KEYS)
    assert prof["busy_ms_per_step"] > 0
    assert sum(g["ms"] for g in prof["groups"].values()) == pytest.approx(prof["busy_ms_per_step"])
    assert set(prof["groups"]) <= {g for g, _ in bench.KERNEL_GROUPS} | {"other"}


def test_reports_go_to_a_checkouts_reports_or_the_working_directory(tmp_path):
    """An installed copy's parent is site-packages: `python -m dit_bench.step_variants` (and
    gpu_check) wrote site-packages/reports/gpu there, into the install location."""
    assert step_variants.reports_gpu() == step_variants.REPO / "reports" / "gpu"
    assert step_variants.reports_gpu(tmp_path) == Path("reports", "gpu")
    assert not (tmp_path / "reports").exists()
