"""`dit-bench bench`: what it reports, the reference it compares with, and the GPU check's dry
run on the CPU with the packages a GPU machine lacks blocked."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_bench import bench, fast
from dit_bench.backbones import Cond, build_backbone

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(image_size=8, channels=2, batch=2, num_classes=10, warmup=1, repeats=2)
REPO = Path(__file__).resolve().parents[1]


def test_run_bench_leaves_the_callers_random_numbers_alone():
    # From a notebook: the backbones' seeding reset the caller's generator to cfg.seed's
    cfg = bench.BenchConfig(backbones=("dit-xs/4",), device="cpu", sample=False, **TINY)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    bench.run_bench(cfg)
    assert torch.equal(torch.rand(3), expected)


def test_run_bench_reports_throughput_mfu_memory_and_sampling():
    cfg = bench.BenchConfig(
        backbones=("dit-xs/4",),
        sample_batch=2,
        sampling=(("ddpm", 3, 1.0), ("euler", 2, 4.0)),
        device="cpu",
        **TINY,
    )
    result = bench.run_bench(cfg)
    json.dumps(result)  # JSON-ready
    (row,) = result["rows"]
    net = build_backbone("dit-xs/4", image_size=8, in_channels=2, num_classes=10, learn_sigma=True)
    flops = net.flops(batch=1)["flops"]
    assert row["fwd_gflops_per_img"] == pytest.approx(flops / 1e9)
    # training = 3 x forward FLOPs, per image, per second
    assert row["tflops"] == pytest.approx(3 * flops * 2 / row["median_s"] / 1e12)
    assert row["img_per_s"] == pytest.approx(2 / row["median_s"])
    assert row["mfu_measured"] == pytest.approx(
        row["tflops"] / result["matmul_peak"]["tflops"], rel=1e-6
    )
    assert row["mfu_datasheet"] is None and result["datasheet_tflops"] is None  # CPU
    # weights, gradients and AdamW's two moments (4 x 4 bytes a parameter), plus the step's
    # activations: more than the state alone
    assert row["peak_mem_gb"] * 2**30 > 16 * row["params"]
    assert [s["sampler"] for s in result["sampling"]] == ["ddpm", "euler"]
    assert {s["label"] for s in result["sampling"]} == {"dit-bench"}  # eager only
    for s, evals in zip(result["sampling"], [3 * 2, 2 * 2 * 2], strict=True):  # guidance: 2x
        assert s["img_per_s"] == pytest.approx(2 / s["seconds"])
        assert s["tflops"] == pytest.approx(flops * evals / s["seconds"] / 1e12)
        assert s["warmup_s"] > 0
    table = bench.format_table(result)
    assert "dit-xs/4" in table and "MFU" in table and "euler" in table
    csv_text = bench.to_csv(result)
    assert csv_text.splitlines()[0].startswith("backbone,label,impl")
    assert len(csv_text.splitlines()) == 2
    sampling_csv = bench.to_csv(result, sampling=True).splitlines()
    assert sampling_csv[0].startswith("backbone,label,compiled,sampler,steps,cfg_scale")
    assert [line.split(",")[3] for line in sampling_csv[1:]] == ["ddpm", "euler"]


@pytest.mark.slow
def test_sampling_times_the_compiled_backbone_beside_the_eager_one():
    cfg = bench.BenchConfig(
        backbones=("dit-xs/4",),
        compile=True,
        sample_batch=2,
        sampling=(("ddpm", 3, 1.0), ("euler", 2, 4.0)),
        device="cpu",
        **TINY,
    )
    rows = bench.bench_sampling("dit-xs/4", cfg)
    got = [(r["label"], r["compiled"], r["sampler"]) for r in rows]
    assert got == [
        ("dit-bench", False, "ddpm"),
        ("dit-bench", False, "euler"),
        ("dit-bench+compile", True, "ddpm"),
        ("dit-bench+compile", True, "euler"),
    ]
    assert all(r["img_per_s"] > 0 for r in rows)
    only = bench.bench_sampling("dit-xs/4", dataclasses.replace(cfg, eager=False))
    assert [r["label"] for r in only] == ["dit-bench+compile"] * 2


def test_unet_channels_last():
    cfg = bench.BenchConfig(
        backbones=("unet-xs",),
        channels_last=True,
        sample=False,
        device="cpu",
        **{**TINY, "image_size": 16, "repeats": 1},
    )
    (row,) = bench.run_bench(cfg)["rows"]
    assert row["backbone"] == "unet-xs" and row["median_s"] > 0


def test_cli_bench_json(capsys, tmp_path):
    from dit_bench.cli import main

    args = ["bench", "--backbones", "dit-xs/4", "--image-size", "8", "--channels", "2"]
    args += ["--batch", "2", "--num-classes", "10", "--warmup", "1", "--repeats", "1"]
    args += [
        "--no-sample",
        "--json",
        "--quiet",
        "--device",
        "cpu",
        "--csv",
        str(tmp_path / "new" / "b.csv"),  # a folder that does not exist yet
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"][0]["backbone"] == "dit-xs/4"
    assert (tmp_path / "new" / "b.csv").read_text().count("\n") == 2
    # a sampling table of an earlier call is not left beside this call's, which sampled nothing
    stale = tmp_path / "new" / "b-sampling.csv"
    stale.write_text("backbone,img_per_s\ndit-xs/4,1.0\n")
    assert main(args) == 0
    capsys.readouterr()
    assert not stale.exists()
    args[-1] = str(tmp_path / "b.csv")
    assert main([*args[:-1], str(tmp_path)]) == 2  # refused before it benchmarks anything
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(args) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a cold first step would be timed in the median
        main(["bench", "--warmup", "0"])
    assert "--warmup: expected a positive integer, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "b-sampling.csv").exists()  # --no-sample
    with_sampling = [a for a in args if a != "--no-sample"] + ["--sample-batch", "1"]
    assert main(with_sampling) == 0
    lines = (tmp_path / "b-sampling.csv").read_text().splitlines()
    assert [line.split(",")[3] for line in lines[1:]] == ["ddpm", "euler"]
    assert main(["bench", "--backbones", "dit-q/2", "--device", "cpu"]) == 2  # unknown preset


def test_cli_bench_threads_are_the_benchs_alone(capsys, monkeypatch):
    # main([...]) from a notebook or script: --threads was left as the caller's torch default
    # (its next work ran, and a later bench or train without --threads said it ran, on it)
    from dit_bench.cli import main
    from dit_bench.config import ConfigError

    before = torch.get_num_threads()
    threads = before % 3 + 1  # another count than the caller's
    args = ["bench", "--backbones", "dit-xs/4", "--image-size", "8", "--channels", "2"]
    args += ["--batch", "2", "--num-classes", "10", "--warmup", "1", "--repeats", "1"]
    args += ["--no-sample", "--json", "--quiet", "--device", "cpu", "--threads", str(threads)]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == threads  # the bench ran on them
    assert torch.get_num_threads() == before

    def fails(cfg, progress=None):
        raise ConfigError("no such bench")

    monkeypatch.setattr(bench, "run_bench", fails)
    assert main(args) == 2
    assert torch.get_num_threads() == before


def test_cpu_name_says_which_cpu_generation_made_a_number(monkeypatch):
    # A VM's model name can be as vague as "AMD EPYC": family and model tell the generations
    # apart (this project's machine gave 0.40 and 0.19 TFLOP/s float32 peaks on two of them)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    two = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu avx512f\n\n"
        "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: other\n\n"
    )
    assert fast.cpu_name(two) == "AMD EPYC, family 25 model 17, AVX512"
    intel = "model name\t: Intel(R) Xeon(R) Platinum 8480+\ncpu family\t: 6\nmodel\t\t: 143\n"
    assert fast.cpu_name(intel) == "Intel(R) Xeon(R) Platinum 8480+, family 6 model 143, AVX512"
    # no /proc/cpuinfo (macOS) or no model name in it (aarch64): the platform's processor name
    monkeypatch.setattr(fast.platform, "processor", lambda: "arm")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert fast.cpu_name("") == "arm"
    assert fast.cpu_name("processor\t: 0\nBogoMIPS\t: 50.00\n") == "arm"
    name = fast.device_name(torch.device("cpu"))
    assert name.startswith("cpu (") and name.endswith(f", {torch.get_num_threads()} threads)")


def test_datasheet_peaks():
    assert bench.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert bench.datasheet_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert bench.datasheet_peak("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert bench.datasheet_peak("NVIDIA H100 NVL", "bf16") == pytest.approx(835.5e12)
    assert bench.datasheet_peak("NVIDIA H200 NVL", "tf32") == pytest.approx(417.5e12)
    assert bench.datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert bench.datasheet_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    assert bench.peak_key("fp32", torch.device("cuda"), tf32=True) == "tf32"
    assert bench.peak_key("fp32", torch.device("cpu"), tf32=True) == "fp32"


# -- the reference: diffusers' DiT computes our function ------------------------------------------


def _ours_to_diffusers(ours: dict, ref: dict, depth: int) -> dict:
    """Our DiT state dict in diffusers' DiTTransformer2DModel names (its embedders are per
    block: every block gets a copy of ours)."""
    out = dict(ref)
    put = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1"}
    put["proj_out_2"] = "final_layer.linear"
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        emb = f"{d}.norm1.emb"
        put |= {
            f"{emb}.timestep_embedder.linear_1": "t_embedder.mlp.0",
            f"{emb}.timestep_embedder.linear_2": "t_embedder.mlp.2",
            f"{d}.norm1.linear": f"{b}.adaLN_modulation.1",
            f"{d}.attn1.to_out.0": f"{b}.attn.proj",
            f"{d}.ff.net.0.proj": f"{b}.mlp.fc1",
            f"{d}.ff.net.2": f"{b}.mlp.fc2",
        }
        out[f"{emb}.class_embedder.embedding_table.weight"] = ours[
            "y_embedder.embedding_table.weight"
        ]
        for kind in ("weight", "bias"):
            q, k, v = ours[f"{b}.attn.qkv.{kind}"].chunk(3, dim=0)
            out |= {f"{d}.attn1.to_q.{kind}": q, f"{d}.attn1.to_k.{kind}": k}
            out[f"{d}.attn1.to_v.{kind}"] = v
    for theirs, mine in put.items():
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = ours[f"{mine}.{kind}"]
    return out


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_diffusers_reference_computes_the_same_function(learn_sigma):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ours = build_backbone(
        "dit-xs/2", image_size=8, in_channels=4, num_classes=10, learn_sigma=learn_sigma
    )
    with torch.no_grad():  # leave the zero init: every path must carry signal
        for p in ours.parameters():
            if p.requires_grad:  # not the fixed position table
                p.add_(0.05 * torch.randn_like(p))
    ref = bench.make_diffusers_dit(
        "dit-xs/2", image_size=8, channels=4, num_classes=10, learn_sigma=learn_sigma
    )
    torch.testing.assert_close(ref.pos_embed.pos_embed, ours.pos_embed)  # same 2-D sin-cos
    ref.load_state_dict(_ours_to_diffusers(ours.state_dict(), ref.state_dict(), depth=4))
    call = bench._diffusers_call(ref)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 417.0, 999.0])
    cond = Cond(labels=torch.tensor([0, 7, 10]))  # 10: the null class
    for train in (False, True):  # training mode too: its label dropout is off
        ours.train(train), ref.train(train)
        out, expect = call(x, t, cond), ours(x, t, cond)
        assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
        torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    # diffusers' own timestep sinusoid (downscale_freq_shift=1) is a different function
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1
    assert (call(x, t, cond) - ours(x, t, cond)).abs().max() > 1e-3


def test_against_diffusers_interleaved():
    pytest.importorskip("diffusers")
    cfg = bench.BenchConfig(
        backbones=("dit-xs/4",),
        against="diffusers",
        sample=False,
        device="cpu",
        **{**TINY, "repeats": 1},
    )
    rows = bench.run_bench(cfg)["rows"]
    assert [r["impl"] for r in rows] == ["dit-bench", "diffusers"]
    assert rows[1]["vs_reference"] == pytest.approx(1.0)
    # ours with fused AdamW as the harness trains; the reference with torch's default
    assert [r["adamw"] for r in rows] == ["fused", "unfused"]
    same = bench.run_bench(dataclasses.replace(cfg, fused=True))["rows"]  # --fused: for both
    assert [r["adamw"] for r in same] == ["fused", "fused"]
    assert rows[0]["params"] < rows[1]["params"]  # diffusers: one embedder per block
    with pytest.raises(ValueError, match="DiT preset"):
        bench.make_diffusers_dit(
            "unet-xs", image_size=8, channels=4, num_classes=10, learn_sigma=True
        )


def test_kernel_groups_name_cuda_kernels_and_cpu_ops():
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "matmul",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN": "matmul",
        "aten::addmm": "matmul",
        "aten::bmm": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128>>": "attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "triton_per_fused__softmax_3": "attention",
        "triton_poi_fused_add_mul_native_layer_norm_7": "fused elementwise (compiled)",
        "triton_tem_fused_addmm_gelu_1": "matmul",  # max-autotune's GEMM template, epilogue fused
        "## Call CompiledFxGraph fh7uwx ##": "fused elementwise (compiled)",
        "void at::native::(anonymous)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": (
            "optimizer"
        ),
        "aten::_fused_adamw_": "optimizer",
        "Memcpy DtoD (Device -> Device)": "other",
    }
    assert {n: bench.kernel_group(n) for n in names} == names


# -- the GPU check, dry run on the CPU -------------------------------------------------------------

BLOCKED = (
    "pydantic",
    "diffusers",
    "optuna",
    "optuna_integration",
    "cleanfid",
    "mlxtend",
    "sklearn",
    "tensorboard",  # train.loggers' trackers: imported only for a run that asks for one
    "wandb",
)


def test_gpu_check_smoke_without_the_packages_gpu_machines_lack(tmp_path):
    """`python -m dit_bench.gpu_check --smoke` on the CPU, with every package the GPU machines
    lack made unimportable (PYTHONPATH shadows them, also in the pytest it starts): every
    section runs and the report is written, also under $OUT."""
    block = tmp_path / "block"
    block.mkdir()
    for name in BLOCKED:
        (block / f"{name}.py").write_text(f"raise ImportError('{name} is blocked')\n")
    env = {**os.environ, "PYTHONPATH": str(block), "OUT": str(tmp_path / "out")}
    cmd = [sys.executable, "-m", "dit_bench.gpu_check", "--smoke", "--device", "cpu"]
    cmd += ["--out", str(tmp_path / "reports"), "--threads", "1", "--budget", "240"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (md,) = (tmp_path / "reports").glob("*-smoke.md")
    data = json.loads(md.with_suffix(".json").read_text())
    statuses = {name: sec["status"] for name, sec in data["sections"].items()}
    # the harness's training path needs pydantic: skipped, saying why, not an error
    harness = statuses.pop("harness")
    assert harness.startswith("skipped: pydantic is blocked") and "wheel" in harness
    fsdp = statuses.pop("fsdp tests")  # so do the FSDP tests, which train through Lightning
    assert fsdp.startswith("skipped: needs pydantic") and "wheel" in fsdp
    device = statuses.pop("device tests")  # and the harness's paths on the GPU
    assert device.startswith("skipped: needs pydantic") and "wheel" in device
    assert statuses == dict.fromkeys(
        [
            "environment",
            "matmul",
            "bench dit-xs/4",
            "profile",
            "cuda tests",
            "train",
            "sampling",
            "variants",
            "sweep batch",
        ],
        "ok",
    ), statuses
    prof = data["sections"]["profile"]["result"]
    assert prof["groups"]["matmul"]["ms"] > 0
    assert sum(g["share"] for g in prof["groups"].values()) == pytest.approx(1.0)
    assert set(prof["by_group"]) == set(prof["groups"])
    for g, ks in prof["by_group"].items():  # each group's costliest, costliest first
        assert [k["group"] for k in ks] == [g] * len(ks) and 1 <= len(ks) <= 8
        assert [k["ms"] for k in ks] == sorted((k["ms"] for k in ks), reverse=True)
        assert sum(k["ms"] for k in ks) <= prof["groups"][g]["ms"] * (1 + 1e-9)
    assert data["sections"]["cuda tests"]["result"]["ok"]  # collected (and skipped: no CUDA)
    text = md.read_text()
    assert "## Training step" in text and "## Sampling" in text and "## Training a small" in text
    assert "## Where the dit-xs/4 step's time goes" in text
    assert [r["variant"] for r in data["sections"]["variants"]["result"]["rows"]] == [
        "regional",
        "bf16-stream",
    ]
    assert "## Candidate settings for the compiled dit-xs/4 step" in text
    sweep_batch = data["sections"]["sweep batch"]["result"]
    assert [r["variant"] for r in sweep_batch["rows"]] == ["checkpoint", "checkpoint-half"]
    assert all("error" not in r for r in sweep_batch["rows"]), sweep_batch["rows"]
    assert "## The sweep's batch: dit-xs/4 at batch 4, checkpointed" in text
    assert "matmul + attention + optimiser take" in text  # the budget line (no target on CPU)
    assert (tmp_path / "out" / "reports" / "gpu" / md.name).is_file()


@pytest.mark.slow  # default run under 10 minutes (26 s on the 2-core CI machine)
def test_gpu_check_harness_section_trains_with_the_gpu_profile_settings(
    render_gpu_section, monkeypatch
):
    """Where pydantic and Lightning import, the GPU check also runs `dit-bench train` itself:
    bf16-mixed with fused AdamW and clipping (the failure a plain loop cannot show), EMA,
    validation, a sample grid. The full plan's settings validate here, before any GPU time."""
    from dit_bench import gpu_check, step_variants
    from dit_bench.config import build_config
    from dit_bench.data import data_info

    full = build_config(None, gpu_check.plan(False)["harness"])
    assert (full.train.precision, full.train.compile, full.optim.grad_clip) == (
        "bf16-mixed",
        True,
        1.0,
    )
    assert full.optim.fused is None and full.backbone.name == "dit-s/4"
    assert full.train.cudagraphs  # the GPU run checks CUDA graphs through Lightning too
    for smoke in (False, True):  # the bare step beside it: the harness's model size and batch
        p = gpu_check.plan(smoke)
        cfg = build_config(None, p["harness"])
        variants, bare, _ = p["harness_bare"]
        assert (bare.image_size, bare.channels, bare.batch) == (
            cfg.data.image_size,
            3,
            cfg.train.batch_size,
        )
        # the same model: its output channels (no learned variance, no VB term) and classes
        info = data_info(cfg.data)
        assert (bare.learn_sigma, bare.num_classes) == (cfg.backbone.learn_sigma, info.num_classes)
        for v in variants:
            assert ("cudagraphs" in v) == cfg.train.cudagraphs
        # the second: the harness's step without Lightning (it clips: the GPU profiles do)
        assert step_variants.parse_variant(variants[1]) >= {"clip", "ema", "deterministic"}
        assert cfg.optim.grad_clip == 1.0

    ctx = {"device": torch.device("cpu"), "plan": gpu_check.plan(True)}
    result = gpu_check.section_harness(ctx)
    assert result["ok"] and "--set train.precision=bf16-mixed" in result["command"]
    assert result["train_loss_last"] < result["train_loss_first"]
    assert result["steady_img_per_s"] > 0
    plain, like = result["bare_steps"]
    assert (plain["variant"], like["variant"]) == ("regional", "clip+ema+deterministic")
    for r in (plain, like):
        assert r["harness_vs"] == pytest.approx(result["steady_img_per_s"] / r["img_per_s"])
    text = render_gpu_section("harness", result)
    assert "## The harness's training path" in text and "ok: True" in text
    # `dit-bench sample` of the run, on the device it picks (on a GPU machine: the GPU)
    assert result["sample_error"] is None and "--n 8` of the run (--device auto): 8 samples" in text
    assert f"| clip+ema+deterministic | {like['ms']:.1f} | " in text
    assert f"| {like['harness_vs']:.2f}x |" in text
    # a variant's error (often several lines, with bars) stays one table cell
    failed = {**result, "bare_steps": [{"variant": "cudagraphs", "error": "E: a|b\n  c"}]}
    assert "| cudagraphs | E: a/b c | | |" in render_gpu_section("harness", failed)
    # On a GPU the run must have trained there: a summary naming another device is a failure
    # (Lightning moves the module to the CPU after the fit; summary.json once named the CPU)
    monkeypatch.setattr(gpu_check.fast, "device_name", lambda d: "NVIDIA H100 80GB HBM3")
    elsewhere = gpu_check.section_harness({**ctx, "device": torch.device("cuda")})
    assert elsewhere["device"].startswith("cpu") and not elsewhere["ok"]


def stand_in_harness_run(monkeypatch) -> dict:
    """gpu-check's `dit-bench train` child replaced by the run folder it would leave (no
    training), and its `dit-bench sample` child by the grid; returns the summary, which a test
    may change between calls."""
    from dit_bench import gpu_check

    # fast.device_name may ask platform (`uname -p`, through subprocess.run, cached): before the stub
    gpu_check.fast.device_name(torch.device("cpu"))
    summary = {
        "backbone": "dit-xs/4", "steps": 10, "batch_size": 16, "val_loss": 0.4,
        "img_per_s": 60.0, "train_seconds": 2.0, "steady_img_per_s": 80.0,
        "warmup_seconds": 1.0, "data_seconds": 0.1, "device": "cpu",
    }  # fmt: skip

    def child(cmd, **kwargs):  # `dit-bench train`'s run folder, as the run would leave it
        if "sample" in cmd:  # then `dit-bench sample` of it: its grid
            Path(cmd[cmd.index("-o") + 1]).write_bytes(b"png")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        run = Path(cmd[cmd.index("--out") + 1]) / "gpu-check" / "run"
        (run / "samples").mkdir(parents=True)
        (run / "samples" / "step-0000010.png").write_bytes(b"png")
        (run / "metrics.csv").write_text("step,train/loss\n5,1.0\n10,0.5\n")
        (run / "summary.json").write_text(json.dumps(summary))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", child)
    return summary


def test_gpu_check_harness_bare_steps_keep_the_run_when_time_is_short_or_a_variant_fails(
    render_gpu_section, monkeypatch
):
    """The bare steps timed beside the harness's run (a stand-in run here, no training): a
    failing variant is one error row and the next is still timed, memory is collected after
    each; under 30 s of the section left none starts and the run's result is kept; a run
    without a steady img/s still times them, with no ratio, and renders without the table."""
    from dit_bench import gpu_check

    summary = stand_in_harness_run(monkeypatch)
    timed, collected = [], []

    def run_variant(variant, name, cfg, device, backend, profile=False):
        timed.append(variant)
        if "clip" in variant:
            raise RuntimeError("out of memory |\n  at step 1")
        return {"variant": variant, "ms": 100.0, "img_per_s": 160.0, "first_step_s": 1.0}

    monkeypatch.setattr(gpu_check.step_variants, "run_variant", run_variant)
    monkeypatch.setattr(gpu_check.step_variants.gc, "collect", lambda: collected.append(len(timed)))
    ctx = {"device": torch.device("cpu"), "plan": gpu_check.plan(True)}
    result = gpu_check.section_harness({**ctx, "section_left": lambda: 40.0})
    plain, failed = result["bare_steps"]
    assert result["ok"] and plain["harness_vs"] == pytest.approx(80.0 / 160.0)
    assert failed == {
        "variant": "clip+ema+deterministic",
        "error": "RuntimeError: out of memory |\n  at step 1",
    }
    assert timed == ["regional", "clip+ema+deterministic"] and collected == [1, 2]
    timed.clear()
    short = gpu_check.section_harness({**ctx, "section_left": lambda: 29.0})
    assert short["ok"] and timed == []
    assert [r["variant"] for r in short["bare_steps"]] == ["regional", "clip+ema+deterministic"]
    assert all(r["error"].startswith("skipped") for r in short["bare_steps"])
    summary |= {"steady_img_per_s": None, "warmup_seconds": None}  # too short a run
    unsteady = gpu_check.section_harness(ctx)
    assert unsteady["bare_steps"][0] == {**plain, "harness_vs": None}
    text = render_gpu_section("harness", unsteady)
    assert "## The harness's training path" in text and "| bare step |" not in text

    def cut_off(variant, name, cfg, device, backend, profile=False):  # the alarm in a step
        timed.append(variant)
        raise gpu_check.SectionTimeout("section cut off after its 150 s")

    timed.clear()
    monkeypatch.setattr(gpu_check.step_variants, "run_variant", cut_off)
    kept = gpu_check.section_harness(ctx)  # the run's result and a row per variant stay
    assert kept["ok"] and timed == ["regional"]
    assert [r["error"] for r in kept["bare_steps"]] == [
        "SectionTimeout: section cut off after its 150 s",
        "skipped: section cut off after its 150 s",
    ]
    summary |= {"val_loss": None}  # diverged: summary.json writes a non-finite loss as null
    diverged = gpu_check.section_harness(ctx)
    assert diverged["ok"] is False and diverged["val_loss"] is None
    assert "val loss -," in render_gpu_section("harness", diverged)


def test_gpu_check_harness_rows_name_their_variant_when_cut_off_or_out_of_time(monkeypatch):
    """The bare step the section's alarm cuts off is reported under its own variant and the
    ones after it as skipped with the alarm's reason; under 30 s left, every row says the
    section's time is spent (not another budget's)."""
    from dit_bench import gpu_check

    stand_in_harness_run(monkeypatch)

    def cut_off(variant, name, cfg, device, backend, profile=False):  # the alarm in a step
        raise gpu_check.SectionTimeout("section cut off after its 150 s")

    monkeypatch.setattr(gpu_check.step_variants, "run_variant", cut_off)
    ctx = {"device": torch.device("cpu"), "plan": gpu_check.plan(True)}
    variants = list(ctx["plan"]["harness_bare"][0])
    assert len(variants) >= 2
    kept = gpu_check.section_harness(ctx)
    assert [r["variant"] for r in kept["bare_steps"]] == variants
    assert kept["bare_steps"][0]["error"] == "SectionTimeout: section cut off after its 150 s"
    short = gpu_check.section_harness({**ctx, "section_left": lambda: 29.0})
    assert [r["variant"] for r in short["bare_steps"]] == variants
    assert {r["error"] for r in short["bare_steps"]} == {"skipped: the section's time is spent"}


def test_step_budget_against_counted_flops():
    """The profile's budget: attention FLOPs as torch's FLOP counter sees the math kernel's
    batched matmuls, the linear layers' rate and the time left at the target, by hand."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dit_bench import gpu_check

    net = build_backbone("dit-xs/2", image_size=8, in_channels=4, num_classes=10)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3) * 999, torch.randint(0, 10, (3,))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, t, Cond(labels=y))
    bmm = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(op))
    assert gpu_check._attention_flops(net) * 3 == bmm

    prof = {
        "busy_ms_per_step": 9.0,
        "groups": {
            "matmul": {"ms": 4.0},
            "attention": {"ms": 1.0},
            "optimizer": {"ms": 0.5},
            "fused elementwise (compiled)": {"ms": 3.5},
        },
    }
    b = gpu_check.step_budget(net, 64, prof, timed_s=0.010, sheet=1e12)
    step = 3 * net.flops(batch=64)["flops"]
    attn = 3 * 64 * gpu_check._attention_flops(net)
    assert b["matmul_tflops"] == pytest.approx((step - attn) / 4e-3 / 1e12)
    assert b["attention_tflops"] == pytest.approx(attn / 1e-3 / 1e12)
    assert b["at_rate_ms"] == pytest.approx(5.5) and b["rest_ms"] == pytest.approx(4.5)
    assert b["target_step_ms"] == pytest.approx(step / (gpu_check.TARGET_MFU * 1e12) * 1e3)
    assert b["rest_budget_ms"] == pytest.approx(b["target_step_ms"] - 5.5)
    unet = build_backbone("unet-xs", image_size=8, in_channels=4, num_classes=10)
    assert gpu_check.step_budget(unet, 2, prof, None, None) == {}  # not a DiT: no budget


def test_gpu_check_sampling_keeps_eager_rows_when_compiled_sampling_is_cut_off(
    monkeypatch, render_gpu_section
):
    """The sampling section times eager, then compiled; the section's alarm cutting the
    compiled run off leaves the eager rows and says why in the report."""
    from dit_bench import gpu_check

    timed = bench.bench_sampling

    def compiled_overruns(name, cfg, **kw):
        if cfg.compile:
            raise gpu_check.SectionTimeout("section cut off after its 120 s")
        return timed(name, cfg, **kw)

    monkeypatch.setattr(bench, "bench_sampling", compiled_overruns)
    kw = dict(image_size=8, sample_batch=2, num_classes=10, sampling=(("ddpm", 2, 1.0),))
    ctx = {"device": torch.device("cpu"), "plan": {"sample": ("dit-xs/4", {**kw, "compile": True})}}
    result = gpu_check.section_sampling(ctx)
    assert [r["label"] for r in result["rows"]] == ["dit-bench"]
    assert result["compiled"] == "section cut off after its 120 s"
    text = render_gpu_section("sampling", result)
    assert "| dit-xs/4 | dit-bench | ddpm | 2 |" in text
    assert "Compiled sampling: section cut off after its 120 s." in text


def test_bench_settings_that_would_time_nothing_or_crash_are_refused():
    with pytest.raises(ValueError, match="--compiled-only needs --compile"):
        bench.BenchConfig(eager=False)
    with pytest.raises(ValueError, match=r"needs DiT presets \(dit-\*\), got \['unet-xs'\]"):
        bench.BenchConfig(backbones=("dit-xs/4", "unet-xs"), against="diffusers")
    with pytest.raises(ValueError, match="--device 'tpu': expected auto, cpu, cuda or cuda:N"):
        bench.BenchConfig(device="tpu").resolved_device()
    with pytest.raises(ValueError, match="--device 'mps': .* mps is not timed"):
        bench.BenchConfig(device="mps").resolved_device()  # its queue is never waited for
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: .* sees no GPU"):
            bench.BenchConfig(device="cuda").resolved_device()


@pytest.mark.slow  # default run under 10 minutes (57 s on the 2-core CI machine)
def test_gpu_check_says_when_it_cannot_run_or_write(tmp_path, capsys, monkeypatch):
    from dit_bench import gpu_check

    monkeypatch.delenv("OUT", raising=False)  # (a device machine sets it: a second folder)

    skip_all = [
        "--skip",
        "environment,matmul,bench,profile,cuda,train,harness,sampling,variants,device",
    ]
    if not torch.cuda.is_available():  # --device cuda without one: a message, not a traceback
        assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "gpu_check: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--threads", "-1"])
    # a report that could be written nowhere is a failed check (every number is lost)
    blocked = tmp_path / "file"
    blocked.write_text("")
    args = ["--smoke", "--device", "cpu", *skip_all]
    assert gpu_check.main([*args, "--out", str(blocked)]) == 2
    # a second check on the same day and device keeps the first report
    assert gpu_check.main([*args, "--out", str(tmp_path / "r")]) == 0
    assert gpu_check.main([*args, "--out", str(tmp_path / "r")]) == 0
    assert len(list((tmp_path / "r").glob("*.md"))) == 2
    # a section that ran but whose check failed (a loss that did not fall, failing CUDA tests)
    # shows in the sections table and the exit status, not only in its body
    real = gpu_check.section_train
    monkeypatch.setattr(gpu_check, "section_train", lambda ctx: {**real(ctx), "ok": False})
    only_train = [
        "--skip",
        "environment,matmul,bench,profile,cuda,harness,sampling,variants,device",
    ]
    args = ["--smoke", "--device", "cpu", *only_train, "--out", str(tmp_path / "f")]
    assert gpu_check.main(args) == 1
    (report,) = (tmp_path / "f").glob("*.json")
    assert json.loads(report.read_text())["sections"]["train"]["status"] == "failed checks"


@pytest.mark.parametrize("tf32", [True, False])
def test_gpu_check_bench_uses_a_peak_of_its_own_matmul_kind(monkeypatch, tf32):
    # section_matmul measures fp32 with TF32 on; an fp32 run without TF32 must not be held
    # against that peak (its own is measured, TF32 off), one with TF32 reuses it.
    from dit_bench import gpu_check

    measured, given = [], []

    def matmul_peak(dev, precision, n):
        measured.append((precision, torch.backends.cuda.matmul.allow_tf32))
        return {"flops_per_s": 50e12, "n": n}

    monkeypatch.setattr(bench, "matmul_peak", matmul_peak)
    monkeypatch.setattr(bench, "bench_training", lambda *a, peak, **k: given.append(peak) or [])
    monkeypatch.setattr(gpu_check.fast, "device_name", lambda dev: "NVIDIA H100 80GB HBM3")
    ctx = {
        "device": torch.device("cuda"),
        "plan": {"matmul_n": 64},
        "matmul": {"fp32": {"flops_per_s": 400e12, "peak_key": "tf32"}},
    }
    cfg = bench.BenchConfig(backbones=("dit-xs/4",), precision="fp32", tf32=tf32)
    result = gpu_check.section_bench(ctx, cfg)
    assert result["peak_key"] == ("tf32" if tf32 else "fp32")
    assert given == [400e12 if tf32 else 50e12]
    assert measured == ([] if tf32 else [("fp32", False)])
    assert result["datasheet_tflops"] == pytest.approx(494.7 if tf32 else 66.9)


def test_cpu_peak_transient_bytes_counts_what_the_step_holds_at_once():
    keep = torch.empty(4 << 20, dtype=torch.uint8)  # allocated before: not the step's

    def step():
        a = torch.empty(4 << 20, dtype=torch.uint8)
        b = torch.empty(8 << 20, dtype=torch.uint8)
        del a  # 12 MiB held at once, then 8
        c = torch.empty(2 << 20, dtype=torch.uint8)
        return b, c

    peak = bench.cpu_peak_transient_bytes(step)
    assert (12 << 20) <= peak < (12 << 20) + (64 << 10)  # the profiler's own small buffers
    del keep
    # a block made before the step and freed in it comes off: a training step drops the last
    # step's gradients (zero_grad) before its backward makes new ones; here nothing is added
    held = [torch.empty(8 << 20, dtype=torch.uint8)]

    def replace():
        held.pop()
        held.append(torch.empty(8 << 20, dtype=torch.uint8))

    assert bench.cpu_peak_transient_bytes(replace) < 64 << 10


def test_cpu_peak_transient_bytes_prints_nothing_of_the_profilers(capfd):
    """Kineto's profiler_start/stop lines, its "gpuGetDeviceCount failed" ERROR on a machine
    without a GPU and the allocator's note on blocks made before profiling went to the
    terminal of every CPU bench; the step's own Python errors still propagate."""
    held = [torch.empty(1 << 20, dtype=torch.uint8)]

    def replace():
        held[0] = torch.empty(1 << 20, dtype=torch.uint8)

    capfd.readouterr()
    bench.cpu_peak_transient_bytes(replace)
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError, match="the step's own"):
        bench.cpu_peak_transient_bytes(
            lambda: (_ for _ in ()).throw(RuntimeError("the step's own"))
        )
    print("stderr is back", file=sys.stderr)
    assert capfd.readouterr().err == "stderr is back\n"


def test_cpu_peak_transient_bytes_of_a_step_that_only_frees_is_not_negative():
    """A step that frees what was allocated before it and allocates nothing holds nothing
    above its start: 0 (the allocator's total falls below where it began)."""
    held = []

    def free_every_other_call():  # the first (discarded) run allocates, the measured one frees
        if held:
            held.clear()
        else:
            held.append(torch.empty(8 << 20, dtype=torch.uint8))

    assert 0 <= bench.cpu_peak_transient_bytes(free_every_other_call) < 64 << 10


def test_a_backbone_that_cannot_run_at_the_size_is_refused_before_any_timing(monkeypatch):
    """`--image-size 18` for a /4 patch: refused before the matmul peak's seconds."""
    monkeypatch.setattr(bench, "matmul_peak", lambda *a: pytest.fail("timed before refusing"))
    cfg = bench.BenchConfig(backbones=("dit-xs/4",), image_size=18, device="cpu")
    with pytest.raises(ValueError, match="patch_size=4 must divide the image size 18"):
        bench.run_bench(cfg)


def test_gpu_check_harness_alarm_after_the_last_bare_step_keeps_every_row(monkeypatch):
    """The section's alarm in the tail of run_variants, every row already in: no IndexError
    (which would lose the harness run's result), the rows as they were."""
    from dit_bench import gpu_check

    stand_in_harness_run(monkeypatch)

    def all_then_alarm(variants, name, cfg, device, *, rows, **kwargs):
        rows += [{"variant": v, "ms": 100.0, "img_per_s": 160.0, "first_step_s": 1.0}
                 for v in variants]  # fmt: skip
        raise gpu_check.SectionTimeout("section cut off after its 150 s")

    monkeypatch.setattr(gpu_check.step_variants, "run_variants", all_then_alarm)
    ctx = {"device": torch.device("cpu"), "plan": gpu_check.plan(True)}
    result = gpu_check.section_harness(ctx)
    assert result["ok"] and all("error" not in r for r in result["bare_steps"])
    assert len(result["bare_steps"]) == len(ctx["plan"]["harness_bare"][0])


def test_a_compiled_net_is_freed_when_its_measurement_returns(monkeypatch):
    """A compiled module refers to itself, so only the collector frees it: left alive, it
    counted in the next measurement's peak memory (2.5 GiB of DiT-XL/2 in gpu-check run 5's
    first step variant). Automatic collection off, as between two quick measurements."""
    import gc
    import weakref

    from dit_bench import fast

    monkeypatch.setattr(  # Dynamo without Inductor: the same self-reference, no compile time
        bench, "compile_backbone", lambda net, mode=None: fast.compile_backbone(net, mode, "eager")
    )
    built = []
    real = bench.build_impls

    def spy(*args, **kwargs):
        impls = real(*args, **kwargs)
        built.extend(weakref.ref(i.net.blocks[0]) for i in impls)
        return impls

    monkeypatch.setattr(bench, "build_impls", spy)
    cfg = bench.BenchConfig(backbones=("dit-xs/4",), device="cpu", compile=True, **TINY)
    gc.disable()
    try:
        bench.bench_training("dit-xs/4", cfg)
        assert len(built) == 2 and [b() for b in built] == [None, None]
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("steps_s", "iqr_s"), [((1.0, 2.0), 0.5), ((1.0, 2.0, 3.0), 1.0), ((4.0,), 0.0)]
)
def test_iqr_of_a_few_repeats_lies_within_the_timings(monkeypatch, steps_s, iqr_s):
    """`--repeats 2` printed an IQR of 1.5 times the gap between its two steps (quartiles
    extrapolated beyond the data), `--repeats 3` the full range: a spread no timing had."""
    clock = [0.0]
    durations = iter((0.5, *steps_s))  # the warm-up step, then the timed ones
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(bench, "cpu_peak_transient_bytes", lambda step: 0)
    real_step_fn = bench.step_fn

    def step_fn(impl, cfg, device, inputs):
        _, opt = real_step_fn(impl, cfg, device, inputs)

        def step() -> None:
            clock[0] += next(durations)

        return step, opt

    monkeypatch.setattr(bench, "step_fn", step_fn)
    cfg = bench.BenchConfig(
        backbones=("dit-xs/4",), device="cpu", **{**TINY, "repeats": len(steps_s)}
    )
    (row,) = bench.bench_training("dit-xs/4", cfg)
    assert row.median_s == pytest.approx(statistics.median(steps_s))
    assert row.iqr_s == pytest.approx(iqr_s)


def test_compile_without_a_cxx_compiler_is_one_line_not_a_traceback(monkeypatch):
    """Inductor's CPU code needs a C++ compiler: where there is none, `bench --compile` said
    so in a hundred-line traceback of Dynamo internals."""
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler(gm, example_inputs):
        raise InvalidCxxCompiler()

    real_compile = bench.compile_backbone
    monkeypatch.setattr(
        bench, "compile_backbone", lambda net, mode: real_compile(net, mode, backend=no_compiler)
    )
    monkeypatch.setattr(bench, "matmul_peak", lambda *a: {"n": 1, "dtype": "x", "flops_per_s": 1})
    cfg = bench.BenchConfig(
        backbones=("dit-xs/4",), device="cpu", compile=True, eager=False, sample=False, **TINY
    )
    with pytest.raises(ValueError, match=r"--compile \(dit-xs/4\): .* no working C\+\+ compiler"):
        bench.run_bench(cfg)

    def broken(gm, example_inputs):
        raise RuntimeError("boom")

    monkeypatch.setattr(
        bench, "compile_backbone", lambda net, mode: real_compile(net, mode, backend=broken)
    )
    with pytest.raises(RuntimeError, match="boom") as e:  # any other failure: torch's report
        bench.run_bench(cfg)
    assert not isinstance(e.value, ValueError)
