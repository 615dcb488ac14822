"""`dit-bench report ablation` on synthetic run directories with a planted difference."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from dit_bench.cli import main
from dit_bench.report.ablation import build_report, kendall_agreement

VARIANTS = {"adaln_zero": 0.0, "adaln": 0.0, "in_context": 0.05}  # planted val-loss offsets


def fake_run(root: Path, variant: str, seed: int, offset: float) -> Path:
    run = root / f"20260101T000000Z-{variant}{seed}"
    (run / "samples").mkdir(parents=True)
    seed_noise = [0.02, -0.01, 0.015][seed]  # shared by every variant of this seed: paired
    wiggle = 1e-3 * seed**2 if variant == "in_context" else 0.0  # adaln == adaln_zero exactly
    steps = [100, 200, 300]
    val = [0.5 + seed_noise + offset + wiggle + 0.3 / s * 100 for s in steps]
    rows = [
        {"step": s, "train/loss": v + 0.01, "val/loss": v} for s, v in zip(steps, val, strict=True)
    ]
    rows[-1]["val/FD-mnist-net"] = 10 + 100 * offset + seed
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"experiment": "toy-cpu", "seed": seed, "train": {"steps": 300}})
    )
    summary = {
        "experiment": "toy-cpu",
        "seed": seed,
        "backbone": "dit-xs/4",
        "conditioning": variant,
        "backbone_spec": {"depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": 4},
        "tokens": 16,
        "steps": 300,
        "batch_size": 32,
        "params": 1000 + len(variant),
        "macs": 13_000_000,
        "flops": 26_000_000,
        "train_flops": 3 * 26_000_000 * 300 * 32,
        "val_loss": val[-1],
        "img_per_s": 100.0,
        "train_seconds": 96.0,
        "device": "cpu (test)",
    }
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "labels.json").write_text(json.dumps({"variant": variant, "seed": seed}))
    Image.fromarray(np.full((8, 8), 40 * seed, np.uint8)).save(run / "samples" / "step-300.png")
    return run


def make_source(tmp_path: Path) -> Path:
    source = tmp_path / "runs" / "toy-cpu"
    for variant, offset in VARIANTS.items():
        for seed in range(3):
            fake_run(source, variant, seed, offset)
    plan = {
        "name": "toy",
        "profile": "cpu",
        "experiment": "toy-cpu",
        "description": "a toy ablation",
        "base_variant": "adaln_zero",
        "variants": list(VARIANTS),
        "metrics": ["val_loss", "val_FD-mnist-net", "val_FD-never"],
        "reference": {"source": "a paper", "ranking": ["adaln_zero", "adaln", "in_context"]},
        "command": "dit-bench ablate toy.yaml --profile cpu",
    }
    (source / "ablation.json").write_text(json.dumps(plan))
    return source


def test_report_finds_the_planted_difference_and_not_the_null(tmp_path):
    source = make_source(tmp_path)
    out = tmp_path / "reports" / "toy-cpu"
    (out).mkdir(parents=True)
    (out / "notes.md").write_text("Hand-written closing note.")
    assert main(["report", "ablation", str(source), "-o", str(out)]) == 0

    paired = pd.read_parquet(out / "paired.parquet")
    loss = paired[paired["metric"] == "val_loss"].set_index("variant")
    assert not loss.loc["adaln", "distinguishable"] and loss.loc["adaln", "p_value"] == 1.0
    assert loss.loc["in_context", "distinguishable"]
    assert loss.loc["in_context", "diff"] > 0.04
    assert "not distinguishable from seed noise" in loss.loc["adaln", "verdict"]

    final = pd.read_csv(out / "final.csv")
    assert set(final["metric"]) == {"val_loss", "val_FD-mnist-net"}  # FD "where evaluated"
    assert (final["lo"] <= final["mean"]).all() and (final["mean"] <= final["hi"]).all()
    for name in ("runs", "final", "paired", "cost", "curves"):
        assert (out / f"{name}.csv").exists() and (out / f"{name}.parquet").exists()
    for m in ("val_loss", "val_FD-mnist-net"):
        for kind in ("curves", "final", "paired"):
            assert (out / f"{kind}_{m}.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(
        f"{v}.png" for v in VARIANTS
    )
    assert (out / "samples.png").exists()

    md = (out / "report.md").read_text()
    assert "dit-bench ablate toy.yaml --profile cpu" in md
    assert "dit-bench report ablation" in md
    assert "in_context is distinguishable from seed noise" in md
    assert "Not evaluated in these runs (no values): val_FD-never" in md
    assert "Kendall tau" in md and "Hand-written closing note." in md
    assert "![val_loss curves](curves_val_loss.png)" in md
    assert "| rank | variant |" in md
    assert "paired by seed (same validation images and noise, same data order)" in md


def test_report_says_when_batch_sizes_keep_the_noise_from_being_shared(tmp_path):
    # the validation noise is drawn per validation batch of train.batch_size
    source = make_source(tmp_path)
    for summary in source.glob("*in_context*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "batch_size": 16}))
    md = build_report(source, tmp_path / "r").read_text()
    assert "the variants' train.batch_size differ" in md and "noise is not shared" in md


def test_report_without_a_plan_uses_the_labels(tmp_path):
    source = make_source(tmp_path)
    (source / "ablation.json").unlink()
    path = build_report(source, tmp_path / "r")
    md = path.read_text()
    assert "base variant **adaln**" in md  # first by name when no plan says otherwise


def test_kendall_agreement():
    assert kendall_agreement(["a", "b", "c"], ["a", "b", "c"]) == (1.0, [])
    tau, flips = kendall_agreement(["b", "a", "c"], ["a", "b", "c"])
    assert flips == [("a", "b")] and tau == 1 / 3


def test_report_of_an_interrupted_ablation_where_only_the_base_finished(tmp_path):
    source = make_source(tmp_path)
    for run in source.iterdir():
        if run.is_dir() and "adaln_zero" not in run.name:
            (run / "summary.json").unlink()  # the other variants never finished
    out = tmp_path / "r"
    assert main(["report", "ablation", str(source), "-o", str(out)]) == 0
    assert pd.read_csv(out / "paired.csv").empty
    md = (out / "report.md").read_text()
    assert "adaln_zero" in md and not (out / "paired_val_loss.png").exists()


def test_report_without_a_plan_refuses_to_pool_two_configs(tmp_path):
    source = make_source(tmp_path)
    (source / "ablation.json").unlink()
    twin = fake_run(source / "other", "adaln", 0, 0.2)  # another config's adaln, seed 0
    twin.rename(source / "20260102T000000Z-adaln0")
    for run in source.iterdir():  # real runs carry their config hash
        if (run / "summary.json").exists():
            summary = json.loads((run / "summary.json").read_text())
            summary["config_hash"] = run.name
            (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(
        ValueError, match=r"several runs of one variant and seed \[\('adaln', 0\)\]"
    ):
        build_report(source, tmp_path / "r")
    assert not (tmp_path / "r").exists()  # a refused report leaves no empty folder behind
