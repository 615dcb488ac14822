"""`dit-bench report ablation` on synthetic run directories with a planted difference."""

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from dit_bench.cli import main
from dit_bench.report.ablation import build_report, kendall_agreement, loss_scales

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
    # the validation noise was drawn per validation batch of train.batch_size before its
    # batch was fixed (summary.json's val_batch)
    source = make_source(tmp_path)
    for summary in source.glob("*in_context*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "batch_size": 16}))
    md = build_report(source, tmp_path / "r").read_text()
    assert "the variants' train.batch_size differ" in md and "noise is not shared" in md
    # runs that record their validation batch (every run since it was fixed) share the noise
    # whatever their train.batch_size
    for summary in source.glob("*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "val_batch": 32}))
    shared = build_report(source, tmp_path / "r1").read_text()
    assert "paired by seed (same validation images and noise, same data order)" in shared
    for summary in source.glob("*in_context*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "val_batch": None}))
    assert "noise is not shared" in build_report(source, tmp_path / "r1b").read_text()
    # fewer images at the same steps: a smaller budget, which the ranking must qualify
    assert "adaln_zero 300 x 32, adaln 300 x 32, in_context 300 x 16" in md
    # the same images split into twice the steps of half the batch: one budget
    for summary in source.glob("*in_context*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "steps": 600}))
    assert "different budgets" not in build_report(source, tmp_path / "r2").read_text()
    # one batch size, a variant's runs made before the fix: the versions differ, not the batch
    for summary in source.glob("*/summary.json"):
        s = {**json.loads(summary.read_text()), "batch_size": 64, "val_batch": 32}
        if "in_context" in summary.parent.name:
            del s["val_batch"]
        summary.write_text(json.dumps(s))
    mixed = build_report(source, tmp_path / "r1c").read_text()
    assert "train.batch_size differ" not in mixed  # was said, of runs all of batch 64
    assert "before the validation batch was fixed" in mixed and "batches of 32" in mixed


def test_report_says_when_variants_train_for_different_budgets(tmp_path):
    # e.g. patch sizes at equal compute: the final values compare 300 steps with 900
    source = make_source(tmp_path)
    for summary in source.glob("*in_context*/summary.json"):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "steps": 900}))
    md = build_report(source, tmp_path / "r").read_text()
    assert "**The variants train for different budgets** (steps x batch: " in md
    assert "adaln_zero 300 x 32, adaln 300 x 32, in_context 900 x 32" in md
    plain = build_report(make_source(tmp_path / "b"), tmp_path / "rb").read_text()
    assert "different budgets" not in plain


def test_report_says_when_variants_validate_on_other_images(tmp_path):
    # a variant at another resolution: its val loss is measured on other images
    source = make_source(tmp_path)
    for config in source.glob("*in_context*/config.yaml"):
        cfg = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**cfg, "data": {"image_size": 8}}))
    md = build_report(source, tmp_path / "r").read_text()
    assert "same validation images and noise" not in md
    assert "not on the same validation images: the variants' data.image_size differ" in md


def test_report_notes_runs_of_one_data_config_that_saw_other_data(tmp_path, no_figures):
    # a folder changed between seeds: its config is the same, its items are not; summaries of
    # versions before the fingerprint have none, and nothing is said of them
    source = make_source(tmp_path)
    for config in source.glob("*/config.yaml"):
        cfg = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**cfg, "data": {"name": "folder", "root": "/imgs"}}))
    md = build_report(source, tmp_path / "old").read_text()
    assert "Not the same data" not in md
    for summary in source.glob("*/summary.json"):
        sha = ("b" if summary.parent.name.endswith("2") else "a") * 64  # seed 2's folder changed
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "items_sha256": sha}))
    md = build_report(source, tmp_path / "new").read_text()
    assert (
        "**Not the same data in every run of one data config** (data.root /imgs: its files "
        "changed between runs?): adaln_zero seeds 0, 1, adaln seeds 0, 1, in_context seeds 0, "
        "1 (aaaaaaaaaaaa); adaln_zero seed 2, adaln seed 2, in_context seed 2 (bbbbbbbbbbbb)." in md
    )
    assert md.count("Not the same data") == 1
    assert pd.read_csv(tmp_path / "new" / "runs.csv")["items_sha256"].nunique() == 2
    # another data config (another image size) is other data by its config, said elsewhere
    for config in source.glob("*2/config.yaml"):
        cfg = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], "image_size": 8}}))
    assert "Not the same data" not in build_report(source, tmp_path / "sized").read_text()


def test_runs_of_one_data_config_loaded_by_other_worker_counts_are_one_data_config(
    tmp_path, no_figures
):
    # data.num_workers says how a run loads, not what (it is not hashed: `ablate --seeds 2 --set
    # data.num_workers=8` on a bigger machine joins the plan's runs); grouped by it, the seed
    # that saw a changed folder was a data config of its own, and nothing was said
    source = make_source(tmp_path)
    for config in source.glob("*/config.yaml"):
        workers = 8 if config.parent.name.endswith("2") else 0
        data = {"name": "folder", "root": "/imgs", "num_workers": workers}
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "data": data}))
    for summary in source.glob("*/summary.json"):
        sha = ("b" if summary.parent.name.endswith("2") else "a") * 64
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "items_sha256": sha}))
    md = build_report(source, tmp_path / "report").read_text()
    assert md.count("**Not the same data in every run of one data config**") == 1
    assert "in_context seed 2 (bbbbbbbbbbbb)." in md


def test_report_does_not_call_a_val_loss_of_another_scale_worse(tmp_path):
    # a 2x2 objective x conditioning: the flow variant's velocity MSE against a DDPM base
    source = make_source(tmp_path)
    for summary in source.glob("*/summary.json"):
        objective = "flow" if "in_context" in summary.parent.name else "ddpm"
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "objective": objective}))
    md = build_report(source, tmp_path / "r").read_text()
    assert "Not like for like: in_context's val_loss is flow's MSE and adaln_zero's is ddpm's" in md
    assert "adaln's val_loss is" not in md  # one scale with the base: its verdict stands


def test_report_does_not_compare_ddpm_val_losses_of_the_old_grid_with_the_new(tmp_path):
    # an ablation rerun with a new variant after DDPM's grid moved to midpoints: the finished
    # runs (no val_grid in their summaries) are skipped, not rerun, so old and new mix
    source = make_source(tmp_path)
    for summary in source.glob("*/summary.json"):
        s = {**json.loads(summary.read_text()), "objective": "ddpm"}
        if "in_context" in summary.parent.name:
            s["val_grid"] = "midpoints"
        summary.write_text(json.dumps(s))
    md = build_report(source, tmp_path / "r").read_text()
    assert "validation grids are not on one scale" in md
    assert "Not like for like: in_context's val_loss is ddpm-midpoints's MSE" in md
    assert "adaln's val_loss is" not in md


def test_report_does_not_compare_val_losses_of_other_numbers_of_levels(tmp_path):
    # eval.val_levels=5 against the default 10: other noise levels, another mean
    source = make_source(tmp_path)
    for summary in source.glob("*/summary.json"):
        s = json.loads(summary.read_text())
        levels = 5 if "in_context" in summary.parent.name else 10
        s.update({f"val_loss_l{k}": s["val_loss"] for k in range(levels)})
        summary.write_text(json.dumps(s))
    md = build_report(source, tmp_path / "r").read_text()
    assert "Not like for like: in_context's val_loss is 5 levels's MSE" in md
    assert "adaln's val_loss is" not in md


def test_report_without_a_plan_uses_the_labels(tmp_path):
    source = make_source(tmp_path)
    (source / "ablation.json").unlink()
    path = build_report(source, tmp_path / "r")
    md = path.read_text()
    assert "base variant **adaln**" in md  # first by name when no plan says otherwise


@pytest.mark.parametrize("where", ["labels", "plan"])
@pytest.mark.parametrize("absolute", [False, True])
def test_a_variant_name_that_is_a_path_writes_nothing_outside_the_report(
    tmp_path, monkeypatch, where, absolute
):
    # a shared folder's labels.json or ablation.json names the variant, and the variant names
    # samples/<variant>.png: "../../escaped" wrote a grid beside the report folder, and an
    # absolute name wrote it wherever that named
    from dit_bench.report import ablation

    for name in ("plot_curves", "plot_final", "plot_paired"):
        monkeypatch.setattr(ablation, name, lambda *a, **k: None)
    source = make_source(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    name = str(tmp_path / "elsewhere" / "escaped") if absolute else "../../escaped"
    if where == "plan":
        plan = json.loads((source / "ablation.json").read_text())
        plan["variants"][-1] = name
        (source / "ablation.json").write_text(json.dumps(plan))
    else:
        (source / "ablation.json").unlink()
    for path in source.glob("*in_context*/labels.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "variant": name}))
    with pytest.raises(ValueError, match="not names `dit-bench ablate` writes"):
        build_report(source, tmp_path / "reports" / "r")
    assert not [*tmp_path.glob("**/escaped.png")]


@pytest.mark.parametrize(
    ("file", "text"),
    [
        ("ablation.json", '{"name": "to'),  # a copy cut short
        ("ablation.json", "[1, 2]"),
        ("*adaln0/labels.json", "[]"),
        ("*adaln0/summary.json", "[]"),
        ("*adaln0/config.yaml", ""),
        ("*adaln0/metrics.csv", "\x00\xff garbage"),
    ],
)
def test_a_damaged_file_of_a_shared_folder_is_named_in_a_one_line_error(
    tmp_path, no_figures, capsys, file, text
):
    # an unreadable ablation.json said only "Unterminated string starting at: line 1 column
    # 10", and a list where a mapping belongs (or an empty config.yaml) was a traceback
    source = make_source(tmp_path)
    (path,) = source.glob(file)
    path.write_bytes(text.encode("latin-1"))
    assert main(["report", "ablation", str(source), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dit-bench: {path}: ") and "fix or delete this file" in err


def test_a_grid_linked_from_outside_its_run_is_not_copied_into_the_report(tmp_path, monkeypatch):
    # a shared folder's samples/step-N.png, a link to the reader's ~/.ssh/id_rsa: the report
    # copied the key into its samples/ (reports/ gets committed), then failed to draw it
    from dit_bench.report import ablation

    for name in ("plot_curves", "plot_final", "plot_paired"):
        monkeypatch.setattr(ablation, name, lambda *a, **k: None)
    source = make_source(tmp_path)
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    for run in source.glob("*in_context*"):
        (run / "samples" / "step-999.png").symlink_to(secret)
    build_report(source, tmp_path / "r")
    copied = (tmp_path / "r" / "samples" / "in_context.png").read_bytes()
    assert copied.startswith(b"\x89PNG") and b"PRIVATE KEY" not in copied


def test_results_of_a_variant_named_past_a_file_name_still_report(tmp_path, monkeypatch):
    # an ablation run before `ablate` refused variant names over 251 characters trained every
    # run, then its report failed on samples/<variant>.png ([Errno 36] File name too long),
    # and so did every later report of those results
    from dit_bench.report import ablation

    for name in ("plot_curves", "plot_final", "plot_paired"):
        monkeypatch.setattr(ablation, name, lambda *a, **k: None)
    source = make_source(tmp_path)
    long = "in_context_" + "x" * 250
    plan = json.loads((source / "ablation.json").read_text())
    plan["variants"] = [long if v == "in_context" else v for v in plan["variants"]]
    (source / "ablation.json").write_text(json.dumps(plan))
    for path in source.glob("*in_context*/labels.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "variant": long}))
    build_report(source, tmp_path / "r")
    (grid,) = (tmp_path / "r" / "samples").glob("in_context_x*.png")
    assert len(grid.name) <= 255 and grid.read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "r" / "samples.png").is_file()


def test_results_of_a_variant_named_as_a_windows_device_still_report(tmp_path, monkeypatch):
    # an ablation run before `ablate` refused Windows' device names: its report wrote
    # samples/aux.png, the device AUX on Windows, and a name no Windows checkout can hold
    from dit_bench.files import windows_name_error
    from dit_bench.report import ablation

    for name in ("plot_curves", "plot_final", "plot_paired"):
        monkeypatch.setattr(ablation, name, lambda *a, **k: None)
    source = make_source(tmp_path)
    plan = json.loads((source / "ablation.json").read_text())
    plan["variants"] = ["aux" if v == "in_context" else v for v in plan["variants"]]
    (source / "ablation.json").write_text(json.dumps(plan))
    for path in source.glob("*in_context*/labels.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "variant": "aux"}))
    md = build_report(source, tmp_path / "r").read_text()
    (grid,) = (tmp_path / "r" / "samples").glob("aux*.png")
    assert windows_name_error(grid.name) is None and grid.read_bytes().startswith(b"\x89PNG")
    assert f"samples/{grid.name}" in md


def test_each_variants_grid_is_its_first_seeds_final_grid(tmp_path, monkeypatch):
    from dit_bench.report import ablation

    for name in ("plot_curves", "plot_final", "plot_paired"):
        monkeypatch.setattr(ablation, name, lambda *a, **k: None)
    source = make_source(tmp_path)
    for run in source.glob("*-adaln[0-9]"):  # an earlier grid of each run, unlike its last
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(run / "samples" / "step-100.png")
    out = tmp_path / "r"
    build_report(source, out)
    # seed 0's step-300 grid is all 0 (fake_run: 40 x seed)
    assert np.asarray(Image.open(out / "samples" / "adaln.png")).max() == 0


def test_kendall_agreement():
    assert kendall_agreement(["a", "b", "c"], ["a", "b", "c"]) == (1.0, [])
    tau, flips = kendall_agreement(["b", "a", "c"], ["a", "b", "c"])
    assert flips == [("a", "b")] and tau == 1 / 3
    # normalised by the pairs (6 of 4 items), not the items: one swap of four is 2/3
    tau, flips = kendall_agreement(["b", "a", "c", "d"], ["a", "b", "c", "d"])
    assert flips == [("a", "b")] and tau == pytest.approx(2 / 3)


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


@pytest.fixture
def no_figures(monkeypatch):
    """Skip the figures (most of a report's time) in tests that read only its text and tables."""
    from dit_bench.report import ablation

    for name in ("plot_curves", "plot_final", "plot_paired"):
        monkeypatch.setattr(ablation, name, lambda *a, **k: None)
    monkeypatch.setattr(ablation, "sample_grids", lambda *a, **k: {})


def drop_runs(source: Path, variant: str, seeds=(0, 1, 2)) -> None:
    """Those runs of `variant` never finished (no summary.json)."""
    for seed in seeds:
        (source / f"20260101T000000Z-{variant}{seed}" / "summary.json").unlink()


def test_an_undetermined_comparison_reads_undetermined_in_table_csv_and_plot(tmp_path, monkeypatch):
    # in_context finished seed 0 only: one pair, no test; adaln pairs fully (p = 1, "no")
    source = make_source(tmp_path)
    drop_runs(source, "in_context", seeds=(1, 2))
    styles = []  # (variant row, colour, face colour) of every point the paired plot draws
    from matplotlib.axes import Axes

    errorbar = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        styles.append((y, kwargs.get("color"), kwargs.get("mfc")))
        return errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    from dit_bench.report import ablation

    for name in ("plot_curves", "plot_final"):  # only the paired plot is looked at here
        monkeypatch.setattr(ablation, name, lambda *a, **k: None)
    monkeypatch.setattr(ablation, "sample_grids", lambda *a, **k: {})
    out = tmp_path / "r"
    md = build_report(source, out).read_text()

    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if "| +" in line}
    assert rows["adaln"].rstrip().endswith("| no |")
    assert rows["in_context"].rstrip().endswith("| undetermined |")
    assert "in_context vs adaln_zero: undetermined" in md
    for paired in (pd.read_csv(out / "paired.csv"), pd.read_parquet(out / "paired.parquet")):
        loss = paired[paired["metric"] == "val_loss"].set_index("variant")
        assert loss.loc["in_context", "undetermined"] and pd.isna(
            loss.loc["in_context", "distinguishable"]
        )  # not False: the table never says "not distinguishable" where no test was made
        assert not loss.loc["adaln", "undetermined"] and not loss.loc["adaln", "distinguishable"]
    # the paired plot draws the undetermined point unlike a "no" (rows: adaln 0, in_context 1)
    assert styles and {s[0] for s in styles} == {0, 1}
    no = {s[1:] for s in styles if s[0] == 0}
    undetermined = {s[1:] for s in styles if s[0] == 1}
    assert no.isdisjoint(undetermined)


def test_report_without_the_base_reports_the_others_and_says_why_nothing_is_paired(
    tmp_path, no_figures
):
    source = make_source(tmp_path)
    drop_runs(source, "adaln_zero")  # the base diverged: no finished run
    out = tmp_path / "r"
    assert main(["report", "ablation", str(source), "-o", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Not finished: all seeds of adaln_zero" in md
    assert "the base variant adaln_zero has no finished runs" in md
    assert (
        "No paired comparison of val_loss against adaln_zero: the base has no finished runs" in md
    )
    assert "comparisons per metric" not in md  # no count of comparisons that were not made
    final = pd.read_csv(out / "final.csv")
    assert set(final["variant"]) == {"adaln", "in_context"} and final["n"].eq(3).all()
    assert pd.read_csv(out / "paired.csv").empty
    assert "| 1 | adaln |" in md and "| 2 | in_context |" in md


def test_report_leaves_out_the_comparisons_of_a_metric_the_base_lacks(tmp_path, no_figures):
    source = make_source(tmp_path)
    for seed in range(3):  # the base's runs never evaluated the FD
        csv = source / f"20260101T000000Z-adaln_zero{seed}" / "metrics.csv"
        pd.read_csv(csv).drop(columns="val/FD-mnist-net").to_csv(csv, index=False)
    out = tmp_path / "r"
    md = build_report(source, out).read_text()
    msg = "No paired comparison of val_FD-mnist-net against adaln_zero: the base's runs have no"
    assert msg in md
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["metric"]) == {"val_loss"} and len(paired) == 2
    # a base without FD values has no FD mean to compare: its seeds are no uneven seed set
    assert "different seed sets" not in md


def test_header_names_each_variants_seeds_when_they_differ(tmp_path, no_figures):
    source = make_source(tmp_path)
    drop_runs(source, "in_context", seeds=(1, 2))
    md = build_report(source, tmp_path / "r").read_text()
    assert (
        "7 finished runs: 3 variants, seeds adaln_zero [0, 1, 2], adaln [0, 1, 2], "
        "in_context [0]; base variant **adaln_zero**"
    ) in md
    assert "seeds [0, 1, 2];" not in md
    assert "compare them over different seed sets" in md
    # equal seed sets: the short form, and no such line
    md = build_report(make_source(tmp_path / "all"), tmp_path / "r2").read_text()
    assert "9 finished runs: 3 variants x seeds [0, 1, 2]; base" in md
    assert "different seed sets" not in md


def test_ranking_is_by_the_mean_not_by_an_interval_edge(tmp_path, no_figures):
    # a variant of spread-out seeds has the lowest lower bound, not the lowest mean
    source = tmp_path / "runs" / "toy"
    losses = {"tight": [0.50, 0.51, 0.52], "wide": [0.30, 0.55, 0.80]}
    for variant, values in losses.items():
        for seed, loss in enumerate(values):
            summary = fake_run(source, variant, seed, 0.0) / "summary.json"
            summary.write_text(json.dumps({**json.loads(summary.read_text()), "val_loss": loss}))
    plan = {"name": "toy", "variants": ["wide", "tight"], "base_variant": "wide"}
    (source / "ablation.json").write_text(json.dumps({**plan, "metrics": ["val_loss"]}))
    md = build_report(source, tmp_path / "report").read_text()
    assert "| 1 | tight |" in md and "| 2 | **wide** |" in md


def test_a_profile_changed_by_set_or_seeds_says_so_beside_its_description(tmp_path, no_figures):
    """The profile's description is the file's ("600 steps x 32 images"): runs made with
    `--set train.steps=20` must not be read as that run."""
    source = make_source(tmp_path)
    plan = json.loads((source / "ablation.json").read_text())
    plan |= {"profile_description": "600 steps x 32 images, 3 seeds.", "overrides": []}
    (source / "ablation.json").write_text(json.dumps(plan))
    md = build_report(source, tmp_path / "r").read_text()
    assert "**Profile `cpu`.** 600 steps x 32 images, 3 seeds." in md
    assert "These runs change that profile" not in md
    plan["overrides"] = ["train.steps=20", "eval.fd_every=0"]
    (source / "ablation.json").write_text(json.dumps(plan))
    md = build_report(source, tmp_path / "r2").read_text()
    expected = (
        "These runs change that profile with `--set train.steps=20`, `--set eval.fd_every=0`."
    )
    assert expected in md
    # "3 seeds" is the profile's own; `--seeds 0-4` made five (the header lists what ran)
    plan |= {"overrides": [], "seeds": [0, 1, 2], "profile_seeds": [0, 1, 2]}
    (source / "ablation.json").write_text(json.dumps(plan))
    assert "These runs are of seeds" not in build_report(source, tmp_path / "r3").read_text()
    plan["seeds"] = [0, 1, 2, 3, 4]
    (source / "ablation.json").write_text(json.dumps(plan))
    md = build_report(source, tmp_path / "r4").read_text()
    assert "These runs are of seeds 0, 1, 2, 3, 4; the profile's own are 0, 1, 2." in md


def test_study_is_refused_for_an_ablation_report(tmp_path, capsys):
    # --study picks one of a sweep storage's studies; an ablation report has none to pick, and
    # taking it silently would let `report ablation ... --study X` look like it chose something
    out = tmp_path / "r"
    assert main(["report", "ablation", str(tmp_path), "-o", str(out), "--study", "x"]) == 2
    assert "--study picks a sweep's study" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["sweep", "plain"])
def test_a_folder_that_is_not_an_ablation_is_refused(tmp_path, capsys, kind):
    source = tmp_path / "runs" / "shapes-cpu"
    for trial, point in enumerate(["d2-w64", "d4-w128"]):
        run = fake_run(source, "adaln", trial, 0.0)
        if kind == "sweep":  # what dit_bench.sweep writes beside each trial's run
            labels = {"variant": point, "sweep": "shapes", "trial": trial}
            (run / "labels.json").write_text(json.dumps(labels))
            (run / "trial.json").write_text(json.dumps({"trial": trial, "state": "COMPLETE"}))
        else:  # plain `dit-bench train` runs
            (run / "labels.json").unlink()
    out = tmp_path / "r"
    assert main(["report", "ablation", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{source} is not an ablation folder: no ablation.json" in err
    assert f"dit-bench report scaling {source}" in err
    assert ("sweep trials (trial.json" in err) == (kind == "sweep")
    assert not out.exists()


def test_the_final_metric_figure_is_the_same_file_each_time(tmp_path):
    # seaborn jitters the seeds' points with NumPy's global generator: a rerun of the same
    # report changed every committed figure
    from dit_bench.report.ablation import plot_final

    runs = pd.DataFrame(
        {"variant": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "val_loss": [1, 2, 3, 2, 3, 4]}
    )
    for seed, name in enumerate(("one.png", "two.png")):
        np.random.seed(seed)  # whatever state the caller left
        plot_final(runs, "val_loss", ["a", "b"], tmp_path / name)
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


def test_a_report_leaves_the_callers_matplotlib_as_it_found_it(tmp_path, callers_matplotlib):
    # From a notebook: the report switched the backend to Agg (the caller's plt.show() then
    # showed nothing) and set seaborn's theme for every later figure of the caller's
    before = callers_matplotlib()
    build_report(make_source(tmp_path), tmp_path / "report")
    assert (tmp_path / "report" / "final_val_loss.png").is_file()
    assert callers_matplotlib() == before


def test_a_final_value_that_is_not_finite_stays_missing_not_an_earlier_one(tmp_path, no_figures):
    """summary.json writes a non-finite final value as null; metrics.csv logs it as nan. Either
    way the run diverged: its final value is missing, never an earlier finite evaluation."""
    source = make_source(tmp_path)
    run = source / "20260101T000000Z-in_context0"
    m = pd.read_csv(run / "metrics.csv")
    m.loc[0:1, "val/FD-mnist-net"] = 3.0  # earlier FD evaluations, finite and the best
    m.loc[2, "val/FD-mnist-net"] = np.nan  # the final one: samples not finite
    m.to_csv(run / "metrics.csv", index=False, na_rep="nan")  # as CSVMetrics writes it
    summary = json.loads((run / "summary.json").read_text())
    summary["val_FD-mnist-net"] = None  # what write_summary makes of a non-finite value
    summary["val_loss"] = None  # and metrics.csv still holds finite val losses
    (run / "summary.json").write_text(json.dumps(summary))
    other = source / "20260101T000000Z-in_context1"
    m = pd.read_csv(other / "metrics.csv")
    m.loc[0:1, "val/FD-mnist-net"] = 3.0
    m.loc[2, "val/FD-mnist-net"] = np.nan  # no FD key in its summary: metrics.csv's last is nan
    m.to_csv(other / "metrics.csv", index=False, na_rep="nan")

    out = tmp_path / "r"
    build_report(source, out)
    runs = pd.read_csv(out / "runs.csv").set_index(["variant", "seed"])
    assert np.isnan(runs.loc[("in_context", 0), "val_FD-mnist-net"])
    assert np.isnan(runs.loc[("in_context", 0), "val_loss"])
    assert np.isnan(runs.loc[("in_context", 1), "val_FD-mnist-net"])
    assert runs.loc[("in_context", 2), "val_FD-mnist-net"] == 17.0  # absent key: from the curve
    final = pd.read_csv(out / "final.csv").set_index(["variant", "metric"])
    assert final.loc[("in_context", "val_FD-mnist-net"), "n"] == 1
    assert final.loc[("in_context", "val_loss"), "n"] == 2


def planned_source(tmp_path: Path) -> Path:
    """make_source's runs as `dit-bench ablate` leaves them: each summary with its config hash
    and ablation.json listing every run by it."""
    source = make_source(tmp_path)
    runs = []
    for run in sorted(p for p in source.iterdir() if p.is_dir()):
        labels = json.loads((run / "labels.json").read_text())
        h = f"{labels['variant']}{labels['seed']}"  # one hash per variant and seed
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "config_hash": h}))
        runs.append({"variant": labels["variant"], "seed": labels["seed"], "config_hash": h})
    plan = json.loads((source / "ablation.json").read_text())
    (source / "ablation.json").write_text(json.dumps({**plan, "runs": runs}))
    return source


def test_a_planned_run_without_labels_is_reported_under_its_planned_variant(tmp_path, no_figures):
    # the parent killed between a run's summary.json and its labels.json: the run was reported
    # as a new variant named after the experiment
    source = planned_source(tmp_path)
    (source / "20260101T000000Z-in_context1" / "labels.json").unlink()
    out = tmp_path / "r"
    md = build_report(source, out).read_text()
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(set(runs["variant"])) == ["adaln", "adaln_zero", "in_context"]
    assert sorted(runs.loc[runs["variant"] == "in_context", "seed"]) == [0, 1, 2]
    assert "9 finished runs: 3 variants x seeds [0, 1, 2]" in md and "toy-cpu |" not in md


def test_two_directories_of_one_run_are_reported_once_from_the_newest(tmp_path, no_figures):
    # folders merged from two machines: the copies were reported as "runs of other configs"
    import shutil

    source = planned_source(tmp_path)
    older = source / "20260101T000000Z-adaln1"
    newer = source / "20270101T000000Z-adaln1"
    shutil.copytree(older, newer)
    summary = json.loads((newer / "summary.json").read_text())
    (newer / "summary.json").write_text(json.dumps({**summary, "val_loss": 0.75}))
    out = tmp_path / "r"
    md = build_report(source, out).read_text()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 9 and not runs.duplicated(["variant", "seed"]).any()
    (row,) = runs[(runs["variant"] == "adaln") & (runs["seed"] == 1)].itertuples()
    assert row.run_dir == str(newer) and row.val_loss == 0.75
    assert f"Copies: {older.name} repeat the config of another finished run" in md
    assert "Left out:" not in md


def test_a_run_moved_to_another_disk_and_linked_back_is_reported(tmp_path, no_figures):
    # `mv RUN /big/disk && ln -s /big/disk/RUN RUN`: ablate counts the linked run as finished
    # (its glob follows the link), but the report's search skipped linked folders and called
    # the run "not finished"; a second link to one run is still one run
    import shutil

    source = planned_source(tmp_path)
    run = source / "20260101T000000Z-adaln1"
    moved = tmp_path / "disk" / run.name
    moved.parent.mkdir()
    shutil.move(run, moved)
    run.symlink_to(moved, target_is_directory=True)
    (source / "more").mkdir()
    (source / "more" / "again").symlink_to(moved, target_is_directory=True)
    (source / "more" / "loop").symlink_to(source, target_is_directory=True)
    out = tmp_path / "r"
    md = build_report(source, out).read_text()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 9 and not runs.duplicated(["variant", "seed"]).any()
    assert "Not finished" not in md and "9 finished runs" in md
    assert "Copies:" not in md  # the paths to one folder are one directory, not copies


def test_throughput_names_the_devices_and_never_averages_across_them(tmp_path, no_figures):
    # the note named the first run's device only, and a variant's img/s averaged a GPU's with
    # a CPU's
    source = make_source(tmp_path)
    gpu = {"device": "NVIDIA H100 80GB HBM3", "img_per_s": 5000.0, "train_seconds": 2.0}
    for run in [*source.glob("*-adaln[0-9]"), source / "20260101T000000Z-in_context2"]:
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, **gpu}))
    out = tmp_path / "r"
    md = build_report(source, out).read_text()
    cost = pd.read_csv(out / "cost.csv").set_index("variant")
    assert cost.loc["adaln_zero", "device"] == "cpu (test)"
    assert cost.loc["adaln", "device"] == "NVIDIA H100 80GB HBM3"
    assert cost.loc["adaln", "img_per_s"] == 5000.0 and cost.loc["adaln_zero", "img_per_s"] == 100
    assert cost.loc["in_context", "device"] == "NVIDIA H100 80GB HBM3; cpu (test)"
    assert pd.isna(cost.loc["in_context", "img_per_s"])  # no mean of a GPU's and a CPU's
    assert "the runs ran on 2 devices: NVIDIA H100 80GB HBM3, cpu (test)" in md
    (row,) = [line for line in md.splitlines() if line.startswith("| in_context | dit-xs/4")]
    assert "| 5000 (NVIDIA H100 80GB HBM3); 100 (cpu (test)) |" in row
    # each device's figure is the mean over that device's seeds
    run = source / "20260101T000000Z-in_context0"
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "img_per_s": 80.0}))
    md = build_report(source, tmp_path / "r2").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| in_context | dit-xs/4")]
    assert "| 5000 (NVIDIA H100 80GB HBM3); 90 (cpu (test)) |" in row


def _diverge(source: Path, metric: str, variants=tuple(VARIANTS)) -> None:
    """Every seed of `variants` diverged before `metric`: the summary holds null for it."""
    for run in source.iterdir():
        if run.is_dir() and json.loads((run / "labels.json").read_text())["variant"] in variants:
            summary = json.loads((run / "summary.json").read_text())
            (run / "summary.json").write_text(json.dumps({**summary, metric: None}))


def test_a_metric_every_run_diverged_on_is_named_as_such_not_as_not_evaluated(
    tmp_path, no_figures, capsys
):
    source = make_source(tmp_path)
    _diverge(source, "val_loss")
    md = build_report(source, tmp_path / "r").read_text()
    assert "No values of val_loss: every run diverged (not finite) before reporting one." in md
    assert "Not evaluated in these runs (no values): val_FD-never." in md
    assert "## Ranking by final val_FD-mnist-net" in md
    # a variant that diverged on every seed of a metric still gets its paired row
    source = make_source(tmp_path / "two")
    _diverge(source, "val_loss", ["in_context"])
    build_report(source, tmp_path / "r2")
    paired = pd.read_csv(tmp_path / "r2" / "paired.csv")
    row = paired[(paired["metric"] == "val_loss") & (paired["variant"] == "in_context")]
    assert len(row) == 1 and row["n_pairs"].item() == 0 and row["undetermined"].item()
    # no metric left at all: refused, saying why (exit 2, no traceback)
    source = make_source(tmp_path / "three")
    _diverge(source, "val_loss")
    for run in source.iterdir():
        if run.is_dir():  # no FD in summary or curves
            m = pd.read_csv(run / "metrics.csv").drop(columns="val/FD-mnist-net")
            m.to_csv(run / "metrics.csv", index=False)
    out = tmp_path / "r3"
    assert main(["report", "ablation", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no finished run has a value of any" in err
    assert "every run diverged before one of val_loss" in err
    assert "not evaluated: val_FD-mnist-net, val_FD-never" in err
    assert not out.exists()


def test_a_plan_none_of_whose_runs_finished_is_refused_naming_them(tmp_path, no_figures, capsys):
    """A new `ablate --set` call into a folder of an earlier call's runs, before any of its own
    finished: every finished run is another config's."""
    source = planned_source(tmp_path)
    plan = json.loads((source / "ablation.json").read_text())
    plan["runs"] = [{**r, "config_hash": "new-" + r["config_hash"]} for r in plan["runs"]]
    (source / "ablation.json").write_text(json.dumps(plan))
    out = tmp_path / "r"
    assert main(["report", "ablation", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "none of the plan's runs has finished" in err
    assert "adaln seed 0" in err and "9 finished runs of other configs left out" in err
    assert not out.exists()


def test_uneven_seed_note_counts_only_finite_values(tmp_path, monkeypatch):
    """A run whose last logged FD is inf has no FD value (mean_ci leaves it out): the
    variants' FD means then rest on different seeds, and the report must say so."""
    from dit_bench.report import ablation

    for name in ("plot_curves", "plot_final", "plot_paired"):
        monkeypatch.setattr(ablation, name, lambda *a, **k: None)
    monkeypatch.setattr(ablation, "sample_grids", lambda *a, **k: {})
    src = tmp_path / "runs" / "toy-cpu"
    for v, o in VARIANTS.items():
        for s in range(3):
            run = fake_run(src, v, s, o)
            if v == "in_context" and s == 1:
                m = pd.read_csv(run / "metrics.csv")
                m.loc[m.index[-1], "val/FD-mnist-net"] = np.inf
                m.to_csv(run / "metrics.csv", index=False)
    plan = {"name": "toy", "base_variant": "adaln_zero", "variants": list(VARIANTS),
            "metrics": ["val_loss", "val/FD-mnist-net"]}  # fmt: skip
    (src / "ablation.json").write_text(json.dumps(plan))
    text = ablation.build_report(src, tmp_path / "rep").read_text()
    assert "rest on different seeds" in text


def test_report_says_val_losses_of_different_objectives_are_not_on_one_scale(tmp_path, no_figures):
    # DDPM's eps-MSE and flow matching's velocity-MSE are different quantities: a report that
    # ranks and pairs them by val_loss must say so (objectives.yaml compares exactly these)
    source = make_source(tmp_path)
    for summary in source.glob("*/summary.json"):
        flow = "in_context" in summary.parent.name
        s = {**json.loads(summary.read_text()), "objective": "flow" if flow else "ddpm"}
        summary.write_text(json.dumps(s))
    md = build_report(source, tmp_path / "r").read_text()
    assert md.count("not on one scale") == 2  # the ranking (by val_loss) and its section
    assert "ddpm (adaln_zero, adaln), flow (in_context)" in md
    one = make_source(tmp_path / "one")  # one objective: no note
    assert "not on one scale" not in build_report(one, tmp_path / "r1").read_text()
    # DDPM's schedules too (timestep k is another noise level); flow has none
    runs = pd.DataFrame(
        {
            "variant": ["lin", "cos", "fm"],
            "objective": ["ddpm", "ddpm", "flow"],
            "cfg.objective.prediction": ["eps", "eps", "velocity"],
            "cfg.objective.schedule": ["linear", "cosine", None],
        }
    )
    assert loss_scales(runs) == {
        "ddpm-eps-linear": ["lin"],
        "ddpm-eps-cosine": ["cos"],
        "flow-velocity": ["fm"],
    }


def test_the_loss_scale_note_of_ddpm_schedules_does_not_call_them_objectives(tmp_path, no_figures):
    # linear vs cosine: one objective, two loss scales; the note said "losses of different
    # objectives" and "compare val_loss only between variants of one objective", which both are
    source = make_source(tmp_path)
    for config in source.glob("*/config.yaml"):
        schedule = "cosine" if "in_context" in config.parent.name else "linear"
        cfg = {**yaml.safe_load(config.read_text()), "objective": {"schedule": schedule}}
        config.write_text(yaml.safe_dump(cfg))
    md = build_report(source, tmp_path / "r").read_text()
    assert "linear (adaln_zero, adaln), cosine (in_context)" in md
    assert "variants of one objective" not in md and "DDPM schedules or" in md


# -- curves of long runs ----------------------------------------------------------------------
def test_curve_bands_are_mean_ci_of_each_point():
    """The band of a curve point is `mean_ci` of the seeds' finite values (the mean where it
    gives no interval), the line their mean (a missing value left out, an inf kept)."""
    from dit_bench.report.ablation import curve_bands
    from dit_bench.report.stats import mean_ci

    rng = np.random.default_rng(0)
    rows = []
    for variant in ("a", "b"):
        for step in range(1, 9):
            for seed in range(3):
                v = rng.normal()
                if (step, seed) == (2, 0):
                    v = np.nan  # not logged by one seed: 2 values left
                if (step, seed) == (3, 1) and variant == "b":
                    v = np.inf  # diverged: left out of the band, kept in the mean
                if step == 4 and seed > 0:
                    v = np.nan  # one value: no interval
                rows.append({"variant": variant, "step": step, "value": v})
    data = pd.DataFrame(rows)
    bands = curve_bands(data, "step").set_index(["variant", "step"])
    assert len(bands) == 16
    for (variant, step), group in data.groupby(["variant", "step"]):
        values = group["value"].dropna()
        ci = mean_ci(values)
        lo, hi = (ci.mean, ci.mean) if np.isnan(ci.lo) else (ci.lo, ci.hi)
        got = bands.loc[(variant, step)]
        assert got["mean"] == pytest.approx(values.mean(), nan_ok=True)
        assert (got["lo"], got["hi"]) == pytest.approx((lo, hi)), (variant, step)


def test_curve_figure_of_a_long_run_is_not_drawn_point_by_point(tmp_path, monkeypatch):
    """A curve point's band is no Python call each (seaborn's errorbar function): a val curve
    of 10,000 points and 3 seeds took 140 s to draw, a 100,000-step train_loss curve far more."""
    import seaborn

    from dit_bench.report import ablation

    calls = []  # seaborn asked to aggregate with a Python function
    real_lineplot = seaborn.lineplot
    monkeypatch.setattr(
        seaborn,
        "lineplot",
        lambda *a, **k: calls.append(1) if callable(k.get("errorbar")) else real_lineplot(*a, **k),
    )
    steps = np.arange(1, 501)
    long = pd.concat(
        pd.DataFrame(
            {
                "variant": v,
                "seed": s,
                "step": steps,
                "train_flops": steps * 1e9,
                "key": "train_loss",
                "value": 1 / steps + 0.01 * s,
            }
        )
        for v in ("a", "b")
        for s in range(3)
    )
    ablation.plot_curves(long, "train_loss", ["a", "b"], tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    assert calls == []


def set_final_losses(source: Path, losses: dict[str, list[float]]) -> None:
    """Each variant's final val_loss per seed, written into its runs' summary.json."""
    for variant, values in losses.items():
        for seed, value in enumerate(values):
            summary = source / f"20260101T000000Z-{variant}{seed}" / "summary.json"
            summary.write_text(json.dumps({**json.loads(summary.read_text()), "val_loss": value}))


def marginal_losses(scale: float = 1.0) -> dict[str, list[float]]:
    """adaln and in_context each just below alpha against adaln_zero (paired t p = 0.03 and
    0.04): "yes" one comparison at a time, "no" for both after Holm (adjusted p 0.06)."""
    from scipy import stats

    base = np.array([0.50, 0.52, 0.51])

    def shifted(p: float) -> list[float]:
        mean = stats.t.isf(p / 2, df=2) / np.sqrt(3)  # paired t = mean / (1 / sqrt(3))
        return list(scale * (base + 1e-3 * (mean + np.array([-1.0, 0.0, 1.0]))))

    return {"adaln_zero": list(scale * base), "adaln": shifted(0.03), "in_context": shifted(0.04)}


def test_report_names_the_holm_correction_and_qualifies_calls_it_overturns(tmp_path, no_figures):
    source = make_source(tmp_path)
    set_final_losses(source, marginal_losses())
    out = tmp_path / "r"
    md = build_report(source, out).read_text()
    paired = pd.read_csv(out / "paired.csv")
    loss = paired[paired["metric"] == "val_loss"].set_index("variant")
    assert loss["distinguishable"].all() and not loss["distinguishable_holm"].any()
    assert loss["p_holm"].tolist() == pytest.approx([0.06, 0.06])
    assert "Holm-Bonferroni adjusted p" in md and "p_holm" in md
    assert "| p (paired t) | pairs | distinguishable | p (Holm) | after Holm |" in md
    assert "| 0.03 | 3 | yes | 0.06 | no |" in md
    assert (
        "Not distinguishable after Holm's correction for the 2 comparisons of val_loss: "
        "adjusted p = 0.06."
    ) in md
    # the FD comparisons (one p = 1, one undetermined) keep their calls and get no such note
    assert md.count("after Holm's correction") == 2


def test_holms_note_counts_the_comparisons_tested_not_the_undetermined_ones(tmp_path, no_figures):
    # a fourth variant of one finished seed: one pair, no test, so not in Holm's family
    source = make_source(tmp_path)
    set_final_losses(source, marginal_losses())
    fake_run(source, "extra", 0, 0.0)
    plan = json.loads((source / "ablation.json").read_text())
    plan["variants"].append("extra")
    (source / "ablation.json").write_text(json.dumps(plan))
    md = build_report(source, tmp_path / "r").read_text()
    assert "extra vs adaln_zero: undetermined" in md
    assert (
        "Not distinguishable after Holm's correction for the 2 comparisons of val_loss: "
        "adjusted p = 0.06."
    ) in md


def test_the_ranking_table_shows_small_losses_to_their_differences(tmp_path, no_figures):
    # five decimals printed 5.0e-5 and 5.2e-5 both as 0.00005: a ranking of ties
    source = make_source(tmp_path)
    set_final_losses(source, marginal_losses(scale=1e-4))
    md = build_report(source, tmp_path / "r").read_text()
    ranking = md.split("## Ranking by final val_loss")[1].split("\n## ")[0]
    means = [row.split(" | ")[2] for row in ranking.splitlines() if row.startswith("| 1 |")]
    assert means == ["5.1e-05"]  # adaln_zero's mean, 5.1e-5, to its significant digits
    assert "0.00005 |" not in ranking


def test_tick_labels_of_a_narrow_log_axis_do_not_overlap(tmp_path, tick_label_overlaps):
    """An FD logged once per run sits at each variant's training FLOPs, 1.45e12 to 1.8e12: the
    log axis labelled every 0.05e12 in 10^12 notation, the labels run together unreadably
    (reports/conditioning-cpu/curves_val_FD-mnist-net.png)."""
    from dit_bench.report import ablation

    flops = {"a": 1.45e12, "b": 1.55e12, "c": 1.8e12}
    long = pd.DataFrame(
        [
            {"variant": v, "seed": s, "step": 600, "train_flops": f, "key": "fd", "value": 14.0 + s}
            for v, f in flops.items()
            for s in range(3)
        ]
    )
    runs = long.rename(columns={"value": "fd"})
    runs.loc[runs["variant"] == "c", "fd"] *= 40  # a runaway variant: the log x axis
    ablation.plot_curves(long, "fd", list(flops), tmp_path / "curves.png")
    ablation.plot_final(runs, "fd", list(flops), tmp_path / "final.png")
    assert tick_label_overlaps == {"curves.png": [], "final.png": []}


def test_the_paired_figure_marks_which_calls_survive_holm(tmp_path, monkeypatch):
    """The report's verdict is the after-Holm column, but the paired figure coloured every
    unadjusted p < 0.05 red like one that survives: reports/conditioning-cpu's FD figure showed
    adaln and mmdit as distinguishable from adaln_zero, neither of which is after Holm."""
    import matplotlib.figure

    from dit_bench.report.ablation import plot_paired

    drawn = {}

    def spy(fig, path, *args, **kwargs):
        (ax,) = fig.axes
        drawn["title"] = ax.get_title()
        points = [bar.lines[0] for bar in ax.containers]  # each comparison's errorbar
        drawn["markers"] = [(p.get_color(), p.get_mfc(), p.get_marker()) for p in points]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    paired = pd.DataFrame(
        {
            "variant": ["kept", "overturned", "equal"],
            "base": "b",
            "metric": "val_loss",
            "diff": [0.05, 0.02, 0.0],
            "diff_lo": [0.04, 0.001, -0.01],
            "diff_hi": [0.06, 0.039, 0.01],
            "distinguishable": [True, True, False],
            "distinguishable_holm": [True, False, False],
            "undetermined": False,
        }
    )
    plot_paired(paired, "val_loss", tmp_path / "p.png")
    kept, overturned, equal = drawn["markers"]
    assert overturned != kept and overturned != equal
    assert "Holm" in drawn["title"]


def test_an_off_scale_paired_interval_is_clipped_and_written_out(tmp_path, monkeypatch):
    """U-ViT's FD interval (about -1360..2550, the others within +-35) flattened every other
    comparison of reports/conditioning-cpu onto the zero line: such an interval is clipped at
    the others' scale, with arrows and its numbers; intervals of one scale are not clipped."""
    import matplotlib.figure

    from dit_bench.report.ablation import plot_paired

    drawn = []

    def spy(fig, path, *args, **kwargs):
        (ax,) = fig.axes
        drawn.append((ax.get_xlim(), [t.get_text() for t in ax.texts]))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    rows = {
        "a": (-2.7, -4.6, -0.8),
        "b": (14.7, -4.9, 34.3),
        "c": (-0.6, -3.5, 2.3),
        "wide": (594.6, -1362.0, 2551.0),
    }
    paired = pd.DataFrame(
        {
            "variant": list(rows),
            "base": "z",
            "metric": "fd",
            "diff": [r[0] for r in rows.values()],
            "diff_lo": [r[1] for r in rows.values()],
            "diff_hi": [r[2] for r in rows.values()],
            "distinguishable": [True, False, False, False],
            "distinguishable_holm": [True, False, False, False],
            "undetermined": False,
        }
    )
    plot_paired(paired, "fd", tmp_path / "p.png")
    (lo, hi), texts = drawn[-1]
    assert 34.3 < hi < 60 and -60 < lo < -34.3  # the others' scale, every one of them inside
    assert texts == ["594.6 [-1362, 2551]"]
    plot_paired(paired[paired["variant"] != "wide"], "fd", tmp_path / "q.png")
    (lo, hi), texts = drawn[-1]
    assert texts == [] and lo < -4.9 and hi > 34.3


def test_the_band_of_a_metric_logged_at_one_step_is_drawn(tmp_path, monkeypatch):
    """An FD evaluated at the end of each run only (the profiles' default) has one point per
    variant: its 95% band was a polygon of no width, invisible, so the curve figure under a
    "95% t band" title showed bare means (reports/*-cpu/curves_val_FD-mnist-net.png)."""
    import matplotlib.figure
    from matplotlib.collections import LineCollection, PolyCollection

    from dit_bench.report import ablation

    shown = []  # per axes: the (lo, hi) intervals drawn with an extent one can see

    def spy(fig, path, *args, **kwargs):
        for ax in fig.axes:
            spans = []
            for drawn in ax.collections:
                for v in (p.vertices for p in drawn.get_paths()):
                    bar = isinstance(drawn, LineCollection) and np.ptp(v[:, 1]) > 0
                    area = isinstance(drawn, PolyCollection) and np.ptp(v[:, 0]) > 0
                    if bar or area:
                        spans.append((v[:, 1].min(), v[:, 1].max()))
            shown.append(spans)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    long = pd.DataFrame(
        [
            {"variant": v, "seed": s, "step": 600, "train_flops": f, "key": "fd", "value": x + s}
            for v, f, x in (("a", 1.5e12, 14.0), ("b", 1.7e12, 30.0))
            for s in range(3)
        ]
    )
    ablation.plot_curves(long, "fd", ["a", "b"], tmp_path / "c.png")
    bands = ablation.curve_bands(long, "step")
    for spans in shown:  # the steps panel and the FLOPs panel
        for band in bands.itertuples():
            assert any(s == pytest.approx((band.lo, band.hi)) for s in spans), band.variant


def test_curves_legend_names_only_the_variants_with_values(tmp_path, monkeypatch):
    """A variant without a metric's values (no FD logged) had a legend entry and no line."""
    import matplotlib.figure

    from dit_bench.report import ablation

    legends = []

    def spy(fig, *args, **kwargs):
        legends.extend(
            t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()
        )

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    long = pd.DataFrame(
        [
            {
                "variant": v,
                "seed": s,
                "step": st,
                "train_flops": st * 1e9,
                "key": "fd",
                "value": 10.0 + s + st / 100,
            }
            for v in ("a", "c")
            for s in range(2)
            for st in (100, 200)
        ]
    )
    ablation.plot_curves(long, "fd", ["a", "b", "c"], tmp_path / "c.png")
    assert legends == ["a", "c"]


def test_the_reference_ranking_names_the_neighbours_seed_noise_could_swap(tmp_path, no_figures):
    """reports/conditioning-cpu: "Kendall tau = +1.00 (same order)" from means of 3 seeds in
    which every neighbour was within seed noise of the next (cross_attn 0.0002 above
    in_context, p = 0.88). Here adaln equals adaln_zero exactly and in_context is planted
    worse: the first place is no finding, the second is."""
    md = build_report(make_source(tmp_path), tmp_path / "r").read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("Reference ranking")]
    assert "Kendall tau = +1.00 (same order)." in line
    assert (
        "not distinguishable from seed noise (paired t, alpha = 0.05): adaln_zero/adaln (p = 1);"
        in line
    )
    assert "adaln/in_context" not in line


def test_a_report_stopped_while_rewritten_leaves_no_report_md_over_new_tables(
    tmp_path, no_figures, monkeypatch
):
    # `report` again after runs changed, stopped in its figures (Ctrl-C, a crash): the earlier
    # report.md stayed, whole to the eye, over the new runs' tables and the figures it reached
    from dit_bench.report import ablation

    source = make_source(tmp_path)
    out = tmp_path / "report"
    build_report(source, out)
    drop_runs(source, "in_context", seeds=(1, 2))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablation, "plot_curves", stopped)
    with pytest.raises(KeyboardInterrupt):
        build_report(source, out)
    assert len(pd.read_csv(out / "runs.csv")) == 7  # the new tables were written
    assert not (out / "report.md").exists()


def test_curves_table_names_each_metric_as_the_final_and_paired_tables_do(tmp_path, no_figures):
    # metrics.csv logs `val/loss`, summary.json and the other tables say `val_loss`: a user
    # filtering curves.csv by a metric of final.csv found no rows
    out = tmp_path / "r"
    build_report(make_source(tmp_path), out)
    final, paired = pd.read_csv(out / "final.csv"), pd.read_csv(out / "paired.csv")
    for suffix in (".csv", ".parquet"):
        curves = getattr(pd, f"read_{suffix[1:]}")(out / f"curves{suffix}")
        assert set(final["metric"]) | set(paired["metric"]) <= set(curves["metric"])
        assert set(curves["metric"]) == {"train_loss", "val_loss", "val_FD-mnist-net"}


def test_runs_tables_of_two_reports_read_as_one_when_a_column_is_null_in_one(tmp_path, no_figures):
    # a U-Net has no patch, heads or tokens: an ablation of U-Nets wrote those
    # columns as parquet's null type, and pd.read_parquet([unets, dits]) failed
    # ("Unsupported cast from int64 to null")
    dits = make_source(tmp_path / "a")
    unets = make_source(tmp_path / "b")
    for summary in unets.glob("*/summary.json"):
        record = json.loads(summary.read_text())
        record |= {"backbone_spec": {"depth": 2, "hidden_size": 64}, "tokens": None}
        summary.write_text(json.dumps(record))
    for source in (dits, unets):
        build_report(source, tmp_path / source.parent.parent.name)
    tables = [tmp_path / name / "runs.parquet" for name in ("b", "a")]
    both = pd.read_parquet(tables)  # the U-Nets' first: their schema is the dataset's
    assert len(both) == 18
    for column, value in (("patch", 4), ("heads", 4), ("tokens", 16)):
        assert both[column].isna().sum() == 9 and set(both[column].dropna()) == {value}


# 40 variants of 44-character names, as a learning-rate x warmup x conditioning grid names them
MANY = [
    f"dit-b2_{c}_lr{lr}_warmup{w}_ema9999"
    for w in range(1000, 11000, 1000)
    for c, lr in zip(("adaln_zero", "adaln", "in_context", "cross_attn"), ("1e-4", "3e-4", "1e-3", "3e-4"), strict=True)
]  # fmt: skip


def many_variants_source(tmp_path: Path, variants: list[str]) -> Path:
    source = tmp_path / "runs" / "big"
    for i, v in enumerate(variants):
        for seed in range(3):
            fake_run(source, v, seed, 0.003 * i + 1e-3 * ((i * 7 + seed * 3) % 5))
    plan = {"name": "big", "base_variant": variants[0], "variants": variants}
    plan["metrics"] = ["val_loss"]
    (source / "ablation.json").write_text(json.dumps(plan))
    return source


@pytest.mark.slow
@pytest.mark.parametrize("variants", [MANY, MANY[:1]], ids=["40-variants", "one-variant"])
def test_figures_of_many_long_named_variants_keep_text_on_the_figure(
    tmp_path, monkeypatch, variants
):
    """40 variants of 44-character names: the curves' legend of 40 entries ran off the top of the
    figure over the lines (tight_layout gave up), the final and paired figures cut their titles
    and the base's name in the x label at the right edge, and samples.png was one row of 40
    grids, 12,480 pixels wide, its titles running into each other. One variant: the titles of
    samples.png were cut at both edges and the final figure's legend covered its interval."""
    import matplotlib.figure

    seen: dict[str, list[str]] = {}

    def spy(fig, path, *args, **kwargs):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        box = fig.bbox.padded(1)
        texts = [t for t in _shown_texts(fig) if t.get_visible() and t.get_text()]
        bad = [f"off the figure: {t.get_text()[:40]}" for t in texts if not _within(t, r, box)]
        for ax in fig.axes:
            if (legend := ax.get_legend()) is not None:
                if legend.get_window_extent(r).overlaps(ax.get_window_extent(r)):
                    bad.append("legend over the data")
        if max(fig.get_size_inches()) * kwargs.get("dpi", fig.dpi) > 6000:
            bad.append(f"{fig.get_size_inches()} inches")
        if Path(path).name == "samples.png":
            heads = sorted(
                (t.get_window_extent(r) for ax in fig.axes for t in (ax.title,) if t.get_text()),
                key=lambda b: (round(b.y0), b.x0),
            )
            bad += ["grid titles overlap" for a, b in itertools.pairwise(heads) if a.overlaps(b)]
        seen[Path(path).name] = bad

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    source = many_variants_source(tmp_path, variants)
    build_report(source, tmp_path / "out")
    assert {"curves_val_loss.png", "final_val_loss.png", "samples.png"} <= set(seen)
    assert {k: v for k, v in seen.items() if v} == {}


def _shown_texts(fig) -> list:
    """Titles, axis labels, legend entries and the tick labels inside each axis' view."""
    texts = [fig._suptitle] if fig._suptitle else []
    for ax in fig.axes:
        texts += [ax.title, *((ax.xaxis.label, ax.yaxis.label) if ax.axison else ())]
        if ax.get_legend():
            texts += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
        for axis in (ax.xaxis, ax.yaxis) if ax.axison else ():
            lo, hi = sorted(axis.get_view_interval())
            ticks = axis.get_major_ticks() + axis.get_minor_ticks()
            texts += [t.label1 for t in ticks if lo <= t.get_loc() <= hi]
    return texts


def _within(text, renderer, box) -> bool:
    b = text.get_window_extent(renderer)
    return box.x0 <= b.x0 and b.x1 <= box.x1 and box.y0 <= b.y0 and b.y1 <= box.y1


def curve_legend(variants, tmp_path, monkeypatch) -> list[tuple[tuple, str]]:
    """The (colour as RGB, marker) of each legend entry of plot_curves' figure of `variants`
    (two seeds, two steps each; the figure is not written)."""
    import matplotlib.colors
    import matplotlib.figure

    from dit_bench.report import ablation

    entries = []

    def spy(fig, *args, **kwargs):
        legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend())
        entries.extend(
            (matplotlib.colors.to_rgb(line.get_color()), line.get_marker())
            for line in legend.get_lines()
        )

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    long = pd.DataFrame(
        [
            {"variant": v, "seed": s, "step": st, "train_flops": st * 1e9, "key": "fd",
             "value": 10.0 + i + s + st / 100}
            for i, v in enumerate(variants) for s in range(2) for st in (100, 200)
        ]
    )  # fmt: skip
    ablation.plot_curves(long, "fd", list(variants), tmp_path / "c.png")
    return entries


def test_curves_of_many_variants_draw_no_two_alike(tmp_path, monkeypatch):
    """Past seaborn's ten colours, husl's 40 hues were 9 degrees apart: neighbouring variants'
    lines and legend entries could not be told apart. Each variant's (colour, marker, dashes)
    differs from every other's in a colour of the palette's ten or in its marker."""
    styles = [
        (tuple(round(c, 3) for c in colour), marker)
        for colour, marker in curve_legend(MANY, tmp_path, monkeypatch)
    ]
    assert len(styles) == len(MANY) and len(set(styles)) == len(MANY)
    assert len({c for c, _ in styles}) <= 10


def test_a_lone_variant_is_not_told_of_comparisons_or_a_rank_correlation(tmp_path, no_figures):
    """One variant (the base): the report described "0 comparisons per metric" and an
    after-Holm column of a table it does not have, and gave "Kendall tau = +nan (same order)"
    for a reference ranking of which one variant was found."""
    source = many_variants_source(tmp_path, MANY[:1])
    plan = json.loads((source / "ablation.json").read_text())
    plan["reference"] = {"source": "a paper", "ranking": [MANY[0], "other"]}
    (source / "ablation.json").write_text(json.dumps(plan))
    md = build_report(source, tmp_path / "out").read_text()
    assert "0 comparisons" not in md and "after-Holm column" not in md
    assert "no paired comparisons" in md
    assert "nan" not in md and "Kendall tau" not in md
    assert f"Reference ranking (a paper): {MANY[0]} < other." in md


def test_a_summary_only_metric_gets_its_final_figure_and_no_curves(tmp_path, monkeypatch):
    """`metrics:` takes summary.json keys: train_seconds has a final value in every run and no
    column in metrics.csv. Its curves figure drew nothing, so seaborn made no legend to move
    and the whole report failed with AttributeError ('NoneType' object has no attribute
    'remove')."""
    from dit_bench.report import ablation

    drawn = []
    monkeypatch.setattr(ablation, "plot_final", lambda runs, m, *a: drawn.append(m))
    monkeypatch.setattr(ablation, "plot_paired", lambda *a, **k: None)
    monkeypatch.setattr(ablation, "sample_grids", lambda *a, **k: {})
    source = make_source(tmp_path)
    plan = json.loads((source / "ablation.json").read_text())
    plan["metrics"] = ["val_loss", "train_seconds"]
    (source / "ablation.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    out.mkdir()
    (out / "curves_train_seconds.png").write_bytes(b"an earlier report's")
    md = build_report(source, out).read_text()
    assert drawn == ["val_loss", "train_seconds"]
    assert "![val_loss curves](curves_val_loss.png)" in md
    assert "curves_train_seconds" not in md and "![final train_seconds]" in md
    assert not (out / "curves_train_seconds.png").exists()


@pytest.mark.parametrize(
    "name", ["a" * 30, "dit-b2_crossattentionconditioning0", "x_" + "b" * 40, "lr1e-4"]
)
def test_a_grid_title_wraps_without_a_blank_line(name):
    """A variant's name whose last part is longer than a title line (one word of 30 letters)
    ended in a line break: its grid's title got a blank last line, a gap between the name and
    its grid."""
    from dit_bench.report.ablation import GRID_TITLE_CHARS, wrap_name

    lines = wrap_name(name, GRID_TITLE_CHARS).split("\n")
    assert "".join(lines) == name and all(lines)


def _section(md: str, heading: str) -> str:
    """The text of `md` from `heading` to the next heading of its level or above."""
    start = md.index(heading + "\n")
    end = md.find("\n## ", start + len(heading))
    return md[start : end if end > 0 else len(md)]


def test_a_variant_that_diverged_on_some_seeds_is_not_ranked_first_unsaid(tmp_path, no_figures):
    # adaln diverged on seeds 1 and 2 (summary null): ranked first by seed 0 alone, the report
    # said only "seeds 1" and that the seed sets differ, never that two of its runs diverged
    source = make_source(tmp_path)
    set_final_losses(source, {"adaln": [0.40, None, None]})
    md = build_report(source, tmp_path / "r").read_text()
    ranking = _section(md, "## Ranking by final val_loss")
    assert "| 1 | adaln | 0.4 |" in ranking
    assert (
        "Finished runs without a finite val_loss** (diverged, or not evaluated): adaln seeds 1, 2"
        in ranking
    )
    # nothing to say of a metric where every run has a value
    assert "without a finite val_FD-mnist-net" not in md


def test_the_uneven_seed_note_sits_with_the_metric_whose_seeds_differ(tmp_path, no_figures):
    # one seed's FD is inf: the val_loss ranking, over equal seeds, said its means rest on
    # different seeds ("see the seeds column": all 3), and the FD section said nothing
    source = make_source(tmp_path)
    run = source / "20260101T000000Z-in_context1"
    m = pd.read_csv(run / "metrics.csv")
    m.loc[m.index[-1], "val/FD-mnist-net"] = np.inf
    m.to_csv(run / "metrics.csv", index=False)
    md = build_report(source, tmp_path / "r").read_text()
    assert "different seed" not in _section(md, "## Ranking by final val_loss")
    fd = _section(md, "## val_FD-mnist-net")
    assert "means of val_FD-mnist-net rest on different seeds (see the n column)" in fd
    assert (
        "without a finite val_FD-mnist-net** (diverged, or not evaluated): in_context seed 1" in fd
    )


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_row_of_the_final_and_paired_figures_sits_on_the_frame(tmp_path, monkeypatch, n):
    """The y view was matplotlib's 5% of the rows' span: the two rows of
    reports/precision-cpu/paired_*.png sat on the frame, their bars and caps drawn over it, and
    a lone variant's final figure was 0.05 of a row high, its seeds and mean on its edges."""
    import matplotlib.figure

    from dit_bench.report import ablation

    margins = {}

    def spy(fig, path, *args, **kwargs):
        (ax,) = fig.axes
        lo, hi = sorted(ax.get_ylim())
        margins[Path(path).name] = (-lo, hi - (n - 1))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    names = [f"v{i}" for i in range(n)]
    runs = pd.DataFrame(
        [
            {"variant": v, "seed": s, "m": 1.0 + i + 0.1 * s}
            for i, v in enumerate(names)
            for s in range(3)
        ]
    )
    paired = pd.DataFrame(
        {
            "variant": names,
            "base": "b",
            "metric": "m",
            "diff": 0.1,
            "diff_lo": 0.0,
            "diff_hi": 0.2,
            "distinguishable": False,
            "distinguishable_holm": False,
            "undetermined": False,
        }
    )
    ablation.plot_final(runs, "m", names, tmp_path / "final.png")
    ablation.plot_paired(paired, "m", tmp_path / "paired.png")
    assert set(margins) == {"final.png", "paired.png"}
    for name, (top, bottom) in margins.items():
        assert top >= 0.4 and bottom >= 0.4, (name, top, bottom)


def test_an_off_scale_final_interval_is_clipped_and_written_out(tmp_path, monkeypatch):
    """U-ViT's seeds (0.06, 0.063, 0.20 against 0.047-0.052) keep a linear axis, and its
    interval, -0.089..0.30, drew the five other variants of reports/conditioning-cpu's
    final_val_loss.png as one dot each at 0.05, their seeds and intervals unreadable: it is
    clipped at the others' scale with arrows and its numbers, as the paired figure's is."""
    import matplotlib.figure

    from dit_bench.report import ablation

    drawn = []

    def spy(fig, path, *args, **kwargs):
        (ax,) = fig.axes
        drawn.append((ax.get_xlim(), [t.get_text() for t in ax.texts], ax.get_title()))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    seeds = {
        "a": [0.0482, 0.0488, 0.0490],
        "b": [0.0503, 0.0506, 0.0508],
        "c": [0.0516, 0.0517, 0.0519],
        "d": [0.0477, 0.0480, 0.0487],
        "wide": [0.0600, 0.0630, 0.1975],
    }
    runs = pd.DataFrame(
        [{"variant": v, "seed": s, "m": x} for v, xs in seeds.items() for s, x in enumerate(xs)]
    )
    ablation.plot_final(runs, "m", list(seeds), tmp_path / "f.png")
    (lo, hi), texts, title = drawn[-1]
    assert 0.044 < lo < 0.0477 and 0.0519 < hi < 0.056  # the others' scale, all inside
    (text,) = texts
    assert text.startswith("0.1068 [") and "arrows" in title
    ablation.plot_final(runs[runs["variant"] != "wide"], "m", list(seeds)[:-1], tmp_path / "g.png")
    (lo, hi), texts, title = drawn[-1]
    assert texts == [] and "arrows" not in title


def test_a_log_axis_labelled_in_plain_numbers_says_it_is_log(tmp_path, monkeypatch):
    """Under two decades a log axis is labelled in plain numbers (3e+11, 4.5e+11, 6e+11 at
    shrinking distances; val loss 0.5, 0.75, 1): the FLOPs panel of
    reports/*-cpu/curves_val_loss.png and the scaling figures' loss axes read as linear ones,
    and the curves' shapes with them. A log axis labelled at its decades (10^k) needs no note."""
    import matplotlib.figure

    from dit_bench.report import ablation

    labels = {}

    def spy(fig, path, *args, **kwargs):
        labels[Path(path).name] = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    long = pd.DataFrame(
        [
            {"variant": v, "seed": s, "step": st, "train_flops": st * f, "key": "loss",
             "value": 0.5 + 0.1 * s + 20 / st}
            for v, f in (("a", 2.6e9), ("b", 2.9e9)) for s in range(3) for st in (100, 200, 300)
        ]
    )  # fmt: skip
    ablation.plot_curves(long, "loss", ["a", "b"], tmp_path / "c.png")
    (steps, _), (flops, _) = labels["c.png"]
    assert "log" not in steps and flops.endswith(", log scale")
    runs = pd.DataFrame({"variant": ["a", "b"] * 3, "seed": [0, 0, 1, 1, 2, 2]})
    runs["fd"] = [1.0, 10.0, 2.0, 300.0, 1.5, 1000.0]  # three decades: labelled 10^0..10^3
    ablation.plot_final(runs, "fd", ["a", "b"], tmp_path / "f.png")
    assert labels["f.png"] == [("fd", "variant")]


def test_the_curves_of_eight_variants_are_told_apart_by_a_colour_blind_reader(
    tmp_path, monkeypatch
):
    """The first ten variants' curves differ in colour alone (one marker, solid lines), and in
    seaborn's default palette the 1st and 5th (blue and purple: adaln_zero and mmdit in
    reports/conditioning-cpu/curves_*.png) are 0.04 apart in sRGB as a protanope sees them
    (Machado et al. 2009, full severity); every pair of eight variants' colours stays 0.07 apart
    for a protanope and a deuteranope."""
    names = [f"v{i}" for i in range(8)]
    srgb = np.array([colour for colour, _ in curve_legend(names, tmp_path, monkeypatch)])
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    machado = {
        "protan": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                   [-0.003882, -0.048116, 1.051998]],
        "deutan": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                   [-0.011820, 0.042940, 0.968881]],
    }  # fmt: skip
    assert len(srgb) == 8
    for kind, m in machado.items():
        seen = np.clip(linear @ np.array(m).T, 0, 1)
        seen = np.where(seen <= 0.0031308, 12.92 * seen, 1.055 * seen ** (1 / 2.4) - 0.055)
        for i, j in itertools.combinations(range(8), 2):
            assert np.linalg.norm(seen[i] - seen[j]) > 0.07, (kind, names[i], names[j])


def test_report_names_runs_resumed_across_validation_protocols(tmp_path):
    # an old partial run resumed by a version that validates otherwise: its val/loss curve
    # jumps at the resume step, which the curves figure showed as training
    source = make_source(tmp_path)
    assert "two protocols" not in build_report(source, tmp_path / "r0").read_text()
    for summary in source.glob("*in_context1/summary.json"):
        s = {**json.loads(summary.read_text()), "val_protocol_changed_at": 200}
        summary.write_text(json.dumps(s))
    for summary in source.glob("*adaln[02]/summary.json"):  # the others: recorded, none
        s = {**json.loads(summary.read_text()), "val_protocol_changed_at": None}
        summary.write_text(json.dumps(s))
    md = build_report(source, tmp_path / "r").read_text()
    assert "**Val losses of two protocols within a run**: in_context seed 1 (step 200)," in md


def test_one_seed_per_variant_says_once_why_its_intervals_are_blank(tmp_path, no_figures):
    """With one seed per variant every interval of the tables read "–", and no sentence said
    why (one seed gives no interval) or what to do (run more seeds)."""
    source = make_source(tmp_path)
    for v in VARIANTS:
        drop_runs(source, v, seeds=(1, 2))
    md = build_report(source, tmp_path / "r").read_text()
    assert "[–, –]" in md
    assert md.count("One seed gives no interval") == 1 and "--seeds" in md
    assert "every variant has one seed" in md
    three = build_report(make_source(tmp_path / "b"), tmp_path / "r2").read_text()
    assert "One seed gives no interval" not in three


def test_variants_with_no_seed_in_common_are_not_called_unfinished(tmp_path, no_figures):
    """The base finished seed 0 only and in_context seeds 1 and 2: its verdict left out "3
    seed(s) whose val_loss is missing (a run not finished, or not evaluated)", of three
    finished runs; they are unpaired (no run of the other to pair with), not missing."""
    source = make_source(tmp_path)
    drop_runs(source, "adaln_zero", seeds=(1, 2))
    drop_runs(source, "in_context", seeds=(0,))
    md = build_report(source, tmp_path / "r").read_text()
    line = next(x for x in md.splitlines() if x.startswith("- in_context vs adaln_zero"))
    assert "no seed in common" in line and "not finished" not in line and "missing" not in line
    assert "Unpaired: 3 seed(s)" in line and "in_context: 1, 2; adaln_zero: 0" in line
    line = next(x for x in md.splitlines() if x.startswith("- adaln vs adaln_zero"))
    assert "1 matched seed(s)" in line and "Unpaired: 2 seed(s)" in line and "missing" not in line


def test_a_log_axis_interval_below_zero_is_clipped_and_written_out(tmp_path, monkeypatch):
    """U-ViT's FD in reports/conditioning-cpu (seeds 15 to 1500: a log axis) has the interval
    [-1346, 2567]: its lower end, past zero, ran off the log axis's left edge with no arrow or
    number, the interval reading as if it began at the frame."""
    import matplotlib.figure

    from dit_bench.report import ablation

    drawn = []

    def spy(fig, path, *args, **kwargs):
        (ax,) = fig.axes
        edges = [line.get_xdata()[0] for line in ax.lines if line.get_marker() == "<"]
        drawn.append((ax.get_xscale(), ax.get_xlim(), edges, [t.get_text() for t in ax.texts]))
        drawn[-1] += (ax.get_title(),)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    seeds = {"a": [15.8, 16.0, 16.4], "b": [12.9, 13.4, 13.8], "uvit": [40.0, 260.0, 1530.0]}
    runs = pd.DataFrame(
        [{"variant": v, "seed": s, "m": x} for v, xs in seeds.items() for s, x in enumerate(xs)]
    )
    ablation.plot_final(runs, "m", list(seeds), tmp_path / "f.png")
    scale, (lo, hi), edges, texts, title = drawn[-1]
    assert scale == "log" and 0 < lo < 12.9 and hi > 1530
    assert edges == [pytest.approx(lo)]  # the arrow at the left edge
    (text,) = texts
    assert text.startswith("610 [-1388, ") and "arrows" in title


def test_a_log_axis_clipped_beside_a_diverged_seed_is_drawn(tmp_path, monkeypatch):
    # a seed's FD of inf (it diverged) beside an interval below zero (two seeds: 1 degree of
    # freedom): the clipped log axis took the inf for its right end, and `report ablation`
    # failed ("Axis limits cannot be NaN or Inf") after every run had trained
    import matplotlib.figure

    from dit_bench.report import ablation

    drawn = []
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig.axes[0])
    )
    seeds = {"a": [50.0, 60.0], "wide": [40.0, 400.0], "diverged": [55.0, np.inf]}
    runs = pd.DataFrame(
        [{"variant": v, "seed": s, "m": x} for v, xs in seeds.items() for s, x in enumerate(xs)]
    )
    ablation.plot_final(runs, "m", list(seeds), tmp_path / "f.png")
    (ax,) = drawn
    lo, hi = ax.get_xlim()
    assert ax.get_xscale() == "log" and 0 < lo < 40 and 400 < hi < np.inf


def test_a_metric_logged_at_one_step_is_drawn_against_flops_only(tmp_path, monkeypatch):
    """An FD of the last step only: the steps panel was one column of points, the final
    figure again; the FLOPs panel alone is new (the metric against the variants' compute)."""
    import matplotlib.figure

    from dit_bench.report import ablation

    drawn = []
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda fig, *a, **k: drawn.append(([ax.get_xlabel() for ax in fig.axes], fig)),
    )
    long = pd.DataFrame(
        [
            {"variant": v, "seed": s, "step": 600, "train_flops": f, "key": "fd", "value": x + s}
            for v, f, x in (("a", 1.5e12, 14.0), ("b", 1.7e12, 30.0))
            for s in range(3)
        ]
    )
    assert ablation.plot_curves(long, "fd", ["a", "b"], tmp_path / "c.png")
    labels, fig = drawn[-1]
    assert len(labels) == 1 and labels[0].startswith("training FLOPs")
    assert "step 600 only" in fig._suptitle.get_text()
    # logged at several steps: both panels, as before
    more = pd.concat([long, long.assign(step=300, train_flops=long["train_flops"] / 2)])
    ablation.plot_curves(more, "fd", ["a", "b"], tmp_path / "d.png")
    labels, fig = drawn[-1]
    assert len(labels) == 2 and "only" not in fig._suptitle.get_text()
