"""Ablation and run-directory invariants a hand mutation audit of dit_bench/ablate.py and
dit_bench/train/run.py found unguarded.

How an ablation file expands into runs (which keys win, which seeds each variant gets), what
`run_ablation` skips and what it trains, the results table's rows, and the parts of `train()`
that decide what a rerun finds: the run directory, the summary of a run killed after its last
checkpoint, the checkpoints kept, the precision and clipping it trains with.

Most tests plant finished runs (config.yaml + summary.json, what `train()` leaves) instead of
training them, and replace the training call of `run_ablation` by a recorder: a few seconds.
The few that train use the tiny configs of test_train.py (a second or two each).
"""

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_ablate import TINY_BASE, write_ablation
from test_train import tiny

from dit_bench import ablate
from dit_bench.ablate import load_ablation, results_table, run_ablation, write_results
from dit_bench.config import ConfigError
from dit_bench.data import DataInfo
from dit_bench.train.run import (
    class_grid_labels,
    find_run_dir,
    new_run_dir,
    save_grid,
    train,
)


def plant_finished(out: Path, cfg, val_loss: float = 1.0) -> Path:
    """A finished run of `cfg` as train() leaves it, without training: its run directory with
    config.yaml and a summary.json."""
    run = new_run_dir(out, cfg)
    summary = {"experiment": cfg.experiment, "config_hash": cfg.hash, "seed": cfg.seed}
    (run / "summary.json").write_text(json.dumps({**summary, "val_loss": val_loss}))
    return run


def refuse(path: Path, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        load_ablation(path, *args, **kwargs)
    return str(e.value)


# -- expansion --------------------------------------------------------------------------------
def test_every_variant_runs_every_seed_in_the_given_order_under_that_seed(tmp_path):
    path = write_ablation(tmp_path, seeds=[2, 0, 5])
    ab = load_ablation(path, "cpu")
    expected = [(v, s) for v in ("adaln_zero", "adaln") for s in (2, 0, 5)]
    assert [(r.variant, r.seed) for r in ab.runs] == expected
    assert [r.index for r in ab.runs] == [1, 2, 3, 4, 5, 6]
    for r in ab.runs:  # the label, the plan and the config agree on the seed
        assert r.cfg.seed == r.seed and r.labels == {"variant": r.variant, "seed": r.seed}
    assert {r["seed"] for r in ab.plan_record()["runs"]} == {2, 0, 5}


def test_profile_seeds_replace_the_file_s_and_seeds_given_replace_both(tmp_path):
    profiles = {"cpu": {"seeds": [7, 8]}, "gpu": {}}
    path = write_ablation(tmp_path, seeds=[0, 1, 2], profiles=profiles)
    assert load_ablation(path, "cpu").seeds == (7, 8)
    assert {r.seed for r in load_ablation(path, "cpu").runs} == {7, 8}
    assert load_ablation(path, "gpu").seeds == (0, 1, 2)  # no seeds of its own: the file's
    assert load_ablation(path, "cpu", seeds=[4]).seeds == (4,)
    # the Python API takes any sequence of seeds, as its signature says (a range was refused)
    assert load_ablation(path, "cpu", seeds=range(3)).seeds == (0, 1, 2)
    # the profile's own are recorded beside them: its description counts those
    assert load_ablation(path, "cpu", seeds=[4]).plan_record()["profile_seeds"] == [7, 8]


def test_an_empty_seed_list_is_refused(tmp_path):
    assert "seeds must be a non-empty list" in refuse(write_ablation(tmp_path, seeds=[]), "cpu")
    path = write_ablation(tmp_path)
    assert "seeds must be a non-empty list" in refuse(path, "cpu", seeds=[])
    for changes in ({"seeds": None}, {"profiles": {"cpu": {"seeds": None}}}):  # was a TypeError
        path = write_ablation(tmp_path, **changes)
        assert "seeds must be a non-empty list" in refuse(path, "cpu")


def test_a_profile_s_own_variant_keys_win_over_the_file_s_variant_keys(tmp_path):
    variants = {"adaln_zero": {}, "adaln": {"backbone.conditioning": "adaln", "train.steps": 7}}
    profiles = {"cpu": {"set": {"train.steps": 5}, "variants": {"adaln": {"train.steps": 9}}}}
    ab = load_ablation(write_ablation(tmp_path, variants=variants, profiles=profiles), "cpu")
    steps = {r.variant: r.cfg.train.steps for r in ab.runs}
    assert steps == {"adaln_zero": 5, "adaln": 9}  # profile set < variant < profile variant


def test_command_line_sets_win_over_variant_keys(tmp_path):
    variants = {"adaln_zero": {}, "adaln": {"backbone.conditioning": "adaln", "train.steps": 8}}
    ab = load_ablation(
        write_ablation(tmp_path, variants=variants), "cpu", overrides=["train.steps=3"]
    )
    assert {r.variant: r.cfg.train.steps for r in ab.runs} == {"adaln_zero": 3, "adaln": 3}
    assert {r.cfg.backbone.conditioning for r in ab.runs} == {"adaln_zero", "adaln"}


def test_the_base_variant_is_the_first_unless_the_file_names_one(tmp_path):
    # every other variant is compared with it: the report's differences are against this one
    assert load_ablation(write_ablation(tmp_path), "cpu").base_variant == "adaln_zero"
    named = write_ablation(tmp_path, base_variant="adaln")
    assert load_ablation(named, "cpu").base_variant == "adaln"


def test_a_variant_s_values_reach_its_config_as_the_file_writes_them(tmp_path):
    # a variant's keys travel as `--set` items: YAML's null must stay null, not "None"
    variants = {
        "adaln_zero": {},
        "unclipped": {"optim.grad_clip": None, "optim.betas": [0.9, 0.95]},
    }
    by = {r.variant: r.cfg for r in load_ablation(write_ablation(tmp_path, variants=variants)).runs}
    assert by["unclipped"].optim.grad_clip is None and by["unclipped"].optim.betas == (0.9, 0.95)
    assert by["adaln_zero"].optim.grad_clip == 1.0


def test_profile_variants_must_name_variants_of_the_file(tmp_path):
    # a typo would silently train the base variant's config under the profile
    profiles = {"cpu": {"variants": {"adaln_zer0": {"train.steps": 9}}}}
    msg = refuse(write_ablation(tmp_path, profiles=profiles), "cpu")
    assert "profiles.cpu.variants must map existing variants" in msg


def test_a_reference_ranking_must_name_variants_of_the_file(tmp_path):
    ranking = {"source": "paper", "ranking": ["adaln_zero", "adaln_0"]}
    msg = refuse(write_ablation(tmp_path, reference=ranking), "cpu")
    assert "reference.ranking must list variants" in msg
    ok = {"source": "paper", "ranking": ["adaln", "adaln_zero"]}
    assert load_ablation(write_ablation(tmp_path, reference=ok), "cpu").reference == ok


def test_every_documented_loss_metric_form_is_accepted(tmp_path):
    # (FD metrics are checked against eval.fd_every as well: see test_ablate.py)
    metrics = ["val_loss", "val_loss_l3", "val_loss_l12", "train_loss"]
    base = {**TINY_BASE, "eval": {**TINY_BASE["eval"], "val_levels": 13}}  # levels 0..12
    ab = load_ablation(write_ablation(tmp_path, metrics=metrics, base=base), "cpu")
    assert ab.metrics == tuple(metrics)


# -- run_ablation: what it skips and what it trains ---------------------------------------------
@pytest.fixture
def recorded_training(monkeypatch):
    """run_ablation's training call replaced: each run it trains is recorded and planted as
    finished (val_loss = its seed + 1), so the rest of run_ablation runs as it would."""
    trained = []

    def fake_train(cfg, out, progress, label, callbacks=()):
        trained.append((cfg.hash, cfg.seed))
        run = find_run_dir(Path(out), cfg)
        if run is None:
            return str(plant_finished(Path(out), cfg, val_loss=cfg.seed + 1.0))
        (run / "summary.json").write_text(json.dumps({"seed": cfg.seed, "val_loss": 0.5}))
        return str(run)

    monkeypatch.setattr(ablate, "_train_one", fake_train)
    return trained


def test_finished_runs_are_skipped_and_partial_and_new_ones_trained(tmp_path, recorded_training):
    ab = load_ablation(write_ablation(tmp_path), "cpu")
    out = tmp_path / "runs"
    done, partial = ab.runs[0], ab.runs[2]
    plant_finished(out, done.cfg)
    new_run_dir(out, partial.cfg)  # interrupted: a run directory without summary.json
    run_ablation(ab, out, progress=False)
    assert recorded_training == [(r.cfg.hash, r.seed) for r in ab.runs if r is not done]
    for r in ab.runs:  # every run labelled, the one finished before this call too
        labels = json.loads((find_run_dir(out, r.cfg) / "labels.json").read_text())
        assert labels == {
            "variant": r.variant,
            "seed": r.seed,
            "ablation": "tiny",
            "profile": "cpu",
        }
    recorded_training.clear()
    run_ablation(ab, out, progress=False)  # all finished now: nothing trains again
    assert recorded_training == []


def test_results_rows_follow_the_variant_order_then_the_seed(tmp_path, recorded_training):
    # variants in file order (not alphabetical), seeds given out of order
    variants = {"zeta": {}, "alpha": {"backbone.conditioning": "adaln"}}
    path = write_ablation(tmp_path, variants=variants, seeds=[3, 1, 2])
    ab = load_ablation(path, "cpu")
    out = tmp_path / "runs"
    run_ablation(ab, out, progress=False)
    table = pd.read_csv(out / "tiny-cpu" / "results.csv")
    expected = [(v, s) for v in ("zeta", "alpha") for s in (1, 2, 3)]
    assert list(zip(table["variant"], table["seed"], strict=True)) == expected
    assert list(table["val_loss"]) == [s + 1.0 for _, s in expected]


def test_runs_of_other_seeds_join_the_table_and_other_configs_do_not(tmp_path):
    ab = load_ablation(write_ablation(tmp_path), "cpu", seeds=[0])
    out = tmp_path / "runs"
    for r in ab.runs:
        plant_finished(out, r.cfg)
    extra = load_ablation(write_ablation(tmp_path), "cpu", seeds=[4])  # an earlier --seeds 4
    plant_finished(out, extra.runs[1].cfg)
    other = load_ablation(write_ablation(tmp_path), "cpu", overrides=["optim.lr=2e-3"])
    plant_finished(out, other.runs[0].cfg)  # another --set: not this plan's
    table = results_table(ab, out)
    assert list(zip(table["variant"], table["seed"], strict=True)) == [
        ("adaln_zero", 0),
        ("adaln", 0),
        ("adaln", 4),
    ]


def test_a_plan_with_no_finished_run_removes_an_earlier_plan_s_table(tmp_path):
    out = tmp_path / "runs"
    first = load_ablation(write_ablation(tmp_path), "cpu", seeds=[0])
    for r in first.runs:
        plant_finished(out, r.cfg)
    stem = write_results(first, out)
    assert stem.with_suffix(".csv").is_file() and stem.with_suffix(".parquet").is_file()
    # the same folder, another --set: none of its runs has finished
    other = load_ablation(write_ablation(tmp_path), "cpu", seeds=[0], overrides=["optim.lr=2e-3"])
    assert write_results(other, out) is None
    assert not stem.with_suffix(".csv").exists() and not stem.with_suffix(".parquet").exists()


def test_a_call_with_more_seeds_extends_the_recorded_plan(tmp_path, recorded_training):
    out = tmp_path / "runs"
    path = write_ablation(tmp_path)
    run_ablation(load_ablation(path, "cpu", seeds=[0, 1]), out, progress=False)
    run_ablation(load_ablation(path, "cpu", seeds=[1, 2]), out, progress=False)
    plan = json.loads((out / "tiny-cpu" / "ablation.json").read_text())
    assert plan["seeds"] == [0, 1, 2]
    pairs = [(r["variant"], r["seed"]) for r in plan["runs"]]
    assert sorted(pairs) == sorted((v, s) for v in ("adaln_zero", "adaln") for s in (0, 1, 2))
    assert len(recorded_training) == 6  # seed 1 trained once


def test_missing_data_is_refused_once_before_any_run(tmp_path, recorded_training):
    """Latents not encoded yet (a gpu profile on a new machine): every run would stop at its
    start with the same error; it is raised once, before any run or folder."""
    from dit_bench.data.datasets import DataError

    missing = [f"data.root={tmp_path / 'no-latents'}", "data.name=latents", "data.image_size=8"]
    ab = load_ablation(write_ablation(tmp_path), "cpu", overrides=missing)
    with pytest.raises(DataError, match="no-latents has no manifest.json"):
        run_ablation(ab, tmp_path / "runs", progress=False)
    assert recorded_training == [] and not (tmp_path / "runs").exists()


def test_the_plan_record_is_merged_under_a_lock(tmp_path, recorded_training):
    """Each write of ablation.json merges the record on disk: two calls of one plan with other
    --seeds, each reading before the other wrote, would lose one call's runs. While another
    process holds the plan's lock, a call waits before its first write."""
    import threading

    from dit_bench.files import locked

    out = tmp_path / "runs"
    (out / "tiny-cpu").mkdir(parents=True)
    ab = load_ablation(write_ablation(tmp_path), "cpu", seeds=[0])
    call = threading.Thread(target=run_ablation, args=(ab, out), kwargs={"progress": False})
    with locked(out / "tiny-cpu" / ".ablation.lock"):
        call.start()
        call.join(timeout=1.0)
        assert call.is_alive() and not (out / "tiny-cpu" / "ablation.json").exists()
    call.join(timeout=30)
    assert not call.is_alive()
    plan = json.loads((out / "tiny-cpu" / "ablation.json").read_text())
    assert plan["seeds"] == [0] and len(recorded_training) == 2


def test_the_results_and_final_record_wait_for_the_plan_lock(
    tmp_path, recorded_training, monkeypatch
):
    """The table and the final ablation.json are written under the plan's lock too: a call
    that finishes its runs while another process holds it (that call's own read-modify-write
    of the record) waits, so neither writes over what the other just wrote."""
    import threading

    from dit_bench.files import locked

    out = tmp_path / "runs"
    ab = load_ablation(write_ablation(tmp_path), "cpu", seeds=[0])
    holding, release = threading.Event(), threading.Event()

    def hold():
        with locked(out / "tiny-cpu" / ".ablation.lock"):
            holding.set()
            release.wait(30)

    train_one = ablate._train_one  # recorded_training's

    def train_then_hold(*args, **kwargs):
        run = train_one(*args, **kwargs)
        if not holding.is_set():  # after the first run: another call takes the lock
            threading.Thread(target=hold, daemon=True).start()
            assert holding.wait(30)
        return run

    monkeypatch.setattr(ablate, "_train_one", train_then_hold)
    call = threading.Thread(target=run_ablation, args=(ab, out), kwargs={"progress": False})
    call.start()
    try:
        assert holding.wait(30)
        call.join(timeout=1.0)
        assert call.is_alive() and not (out / "tiny-cpu" / "results.csv").exists()
    finally:
        release.set()
    call.join(timeout=30)
    assert not call.is_alive() and len(recorded_training) == 2
    assert len(pd.read_csv(out / "tiny-cpu" / "results.csv")) == 2


def test_results_plan_and_report_hold_the_same_runs_when_earlier_configs_come_back(
    tmp_path, recorded_training, capsys
):
    # seeds 0 and 1, then another --set (a new plan in the same folder), then the first
    # configs again with seed 2: the results table took every finished run of those configs
    # (seeds 0, 1, 2) while ablation.json, and so the report, held seed 2 alone
    from dit_bench.report.ablation import load_plan
    from dit_bench.report.ablation import plan_runs as report_plan_runs
    from dit_bench.report.results import collect

    out = tmp_path / "runs"
    path = write_ablation(tmp_path)
    run_ablation(load_ablation(path, "cpu", seeds=[0, 1]), out, progress=False)
    lr = load_ablation(path, "cpu", seeds=[0], overrides=["optim.lr=2e-3"])
    run_ablation(lr, out, progress=False)
    capsys.readouterr()
    run_ablation(load_ablation(path, "cpu", seeds=[2]), out, progress=False)
    expected = [(v, s) for v in ("adaln_zero", "adaln") for s in (0, 1, 2)]
    table = pd.read_csv(out / "tiny-cpu" / "results.csv")
    assert list(zip(table["variant"], table["seed"], strict=True)) == expected
    plan = json.loads((out / "tiny-cpu" / "ablation.json").read_text())
    assert [(r["variant"], r["seed"]) for r in plan["runs"]] == expected
    assert plan["seeds"] == [0, 1, 2]
    found = collect([out / "tiny-cpu"])
    source = out / "tiny-cpu"
    reported, left_out, _ = report_plan_runs(source, found, load_plan(source, found))
    assert sorted(zip(reported["variant"], reported["seed"], strict=True)) == sorted(expected)
    assert left_out == 2  # the lr runs
    assert "results: 6 finished runs of the plan (seeds 0, 1, 2)" in capsys.readouterr().err
    assert len(recorded_training) == 4 + 2 + 2  # nothing trained twice
    from dit_bench.cli import main  # its summary line counts them too

    assert main(["ablate", str(path), "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    assert "2 of 2 runs; 6 finished runs of the plan in all" in capsys.readouterr().out


def test_a_run_whose_config_no_longer_loads_is_skipped_and_named(tmp_path, capsys):
    # a run of an older dit-bench (a key since removed) in the folder stopped every later call
    ab = load_ablation(write_ablation(tmp_path), "cpu", seeds=[0])
    out = tmp_path / "runs"
    for r in ab.runs:
        plant_finished(out, r.cfg)
    foreign = out / "tiny-cpu" / "20200101T000000Z-0000000000"
    foreign.mkdir()
    (foreign / "summary.json").write_text(json.dumps({"seed": 0, "val_loss": 1.0}))
    config = ab.runs[0].cfg.to_yaml() + "old_key: 1\n"
    (foreign / "config.yaml").write_text(config)
    stem = write_results(ab, out)
    table = pd.read_csv(stem.with_suffix(".csv"))
    assert list(zip(table["variant"], table["seed"], strict=True)) == [
        ("adaln_zero", 0),
        ("adaln", 0),
    ]
    err = capsys.readouterr().err
    assert "skipped 20200101T000000Z-0000000000: its config.yaml does not load" in err
    assert "old_key: unknown key" in err


def test_two_directories_of_one_config_give_one_row_from_the_newest(tmp_path):
    # folders merged from two machines: two finished copies of one run
    import shutil

    ab = load_ablation(write_ablation(tmp_path), "cpu", seeds=[0])
    out = tmp_path / "runs"
    for r in ab.runs:
        plant_finished(out, r.cfg)
    first = find_run_dir(out, ab.runs[1].cfg)
    h = ab.runs[1].cfg.hash
    for stamp, loss in (("20200101T000000Z", 7.0), ("29990101T000000Z", 9.0)):
        copy = out / "tiny-cpu" / f"{stamp}-{h}"
        shutil.copytree(first, copy)
        summary = json.loads((copy / "summary.json").read_text())
        (copy / "summary.json").write_text(json.dumps({**summary, "val_loss": loss}))
    newest = find_run_dir(out, ab.runs[1].cfg)
    assert newest.name.startswith("2999")
    table = results_table(ab, out)
    assert list(zip(table["variant"], table["seed"], strict=True)) == [
        ("adaln_zero", 0),
        ("adaln", 0),
    ]
    assert table.loc[1, "run_dir"] == str(newest) and table.loc[1, "val_loss"] == 9.0
    plan = ablate.plan_record(ab, out)
    assert [(r["variant"], r["seed"]) for r in plan["runs"]] == [("adaln_zero", 0), ("adaln", 0)]


def test_a_plan_s_runs_are_found_by_one_listing_not_one_each(
    tmp_path, recorded_training, monkeypatch
):
    """run_ablation (and the dry run's listing) find a plan's runs by one listing of the
    folder: found one by one (a glob each), a plan's calls grew with the square of its runs."""
    import dit_bench.train.run as run_module

    ab = load_ablation(write_ablation(tmp_path), "cpu", seeds=list(range(10)))
    out = tmp_path / "runs"
    for r in ab.runs[1:]:
        plant_finished(out, r.cfg)
    old = out / "tiny-cpu" / f"20000101T000000Z-{ab.runs[1].cfg.hash}"
    old.mkdir()  # an older copy of a finished run, unfinished: the newest is the run
    new_run_dir(out, ab.runs[0].cfg)  # interrupted
    real, calls = run_module.find_run_dir, []
    monkeypatch.setattr(
        run_module, "find_run_dir", lambda *a: calls.append(a) or real(*a), raising=True
    )
    assert ablate.describe(ab, out).count(" done") == len(ab.runs) - 1
    assert calls == []
    run_ablation(ab, out, progress=False)
    assert recorded_training == [(ab.runs[0].cfg.hash, ab.runs[0].seed)]
    assert len(calls) <= 2  # the one run to train: its status, its training (planted)
    index = ablate.run_index(out, ab.experiment)  # what find_run_dir finds, run by run
    for r in ab.runs:
        assert index[r.cfg.hash] == real(out, r.cfg)
    assert ablate.run_index(out, "nothing-here") == {}


def test_a_finished_run_s_labels_are_written_only_when_they_change(
    tmp_path, recorded_training, monkeypatch
):
    """Every call labels every finished run of the plan; a label file that already says so is
    left alone (rewritten and synced each, 1,000 done runs cost 7 s a call)."""
    ab = load_ablation(write_ablation(tmp_path), "cpu", seeds=[0, 1])
    out = tmp_path / "runs"
    for r in ab.runs:
        plant_finished(out, r.cfg)
    run_ablation(ab, out, progress=False)
    stale = find_run_dir(out, ab.runs[0].cfg) / "labels.json"
    stale.write_text('{"variant": "renamed"}')  # the variant renamed in the file since
    written = []
    real = ablate.write_json_atomic
    monkeypatch.setattr(
        ablate,
        "write_json_atomic",
        lambda path, *a, **k: written.append(path) or real(path, *a, **k),
    )
    run_ablation(ab, out, progress=False)
    assert [p for p in written if p.name == "labels.json"] == [stale]
    assert json.loads(stale.read_text())["variant"] == ab.runs[0].variant


# -- run directories --------------------------------------------------------------------------
def test_find_run_dir_takes_the_newest_directory_of_the_hash(tmp_path):
    cfg = tiny()
    for stamp in ("20240102T000000Z", "20250101T000000Z", "20231231T235959Z"):
        (tmp_path / cfg.experiment / f"{stamp}-{cfg.hash}").mkdir(parents=True)
    (tmp_path / cfg.experiment / f"20990101T000000Z-{tiny('seed=1').hash}").mkdir()
    assert find_run_dir(tmp_path, cfg).name == f"20250101T000000Z-{cfg.hash}"
    assert find_run_dir(tmp_path, tiny("seed=2")) is None


def test_a_hidden_name_of_the_hash_is_no_run_directory(tmp_path):
    # a copy made by macOS onto exFAT or a network share leaves `._<name>` files, whose name
    # ends in the hash too: find_run_dir took one (a file) for the run when the run itself was
    # gone, and told `ablate`, whose one listing (run_index) skips hidden names, otherwise
    cfg = tiny()
    folder = tmp_path / cfg.experiment
    folder.mkdir()
    (folder / f"._20250101T000000Z-{cfg.hash}").write_bytes(b"\x00\x05\x16\x07")
    assert find_run_dir(tmp_path, cfg) is None
    assert ablate.run_index(tmp_path, cfg.experiment) == {}
    (folder / f"20240101T000000Z-{cfg.hash}").mkdir()
    assert find_run_dir(tmp_path, cfg).name == f"20240101T000000Z-{cfg.hash}"


def test_a_run_killed_between_its_last_checkpoint_and_its_summary_is_completed(tmp_path):
    cfg = tiny("train.steps=4", "train.checkpoint_every=2", "train.val_every=2")
    run = train(cfg, tmp_path, progress=False)
    before = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()  # killed after last.ckpt (step 4), before the summary
    assert train(cfg, tmp_path, progress=False) == run
    after = json.loads((run / "summary.json").read_text())
    assert after["val_loss"] == before["val_loss"] and after["steps"] == 4


def test_half_precision_is_refused_on_the_cpu_before_any_run_directory(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("16-mixed is allowed where a GPU is")
    with pytest.raises(ValueError, match="16-mixed needs a GPU"):
        train(tiny("train.precision=16-mixed"), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "every, keep, kept",
    [
        (3, 2, [2, 4, 6]),  # step files on their own schedule
        (2, 2, [2, 4, 6]),  # one schedule for both
        (2, 0, []),  # last.ckpt only
    ],
)
def test_step_checkpoints_are_kept_every_keep_every_steps(tmp_path, every, keep, kept):
    cfg = tiny("train.steps=6", f"train.checkpoint_every={every}", f"train.keep_every={keep}")
    run = train(cfg, tmp_path, progress=False)
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert names == sorted(["last.ckpt", *(f"step={s:07d}.ckpt" for s in kept)])


def test_grad_clip_bounds_the_update_and_null_disables_it(tmp_path):
    def weights(*sets):
        run = train(tiny("train.steps=3", *sets), tmp_path, progress=False)
        return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    free, loose, tight = (
        weights("optim.grad_clip=null"),
        weights("optim.grad_clip=1e6"),  # never binds: the same update as no clipping
        weights("optim.grad_clip=1e-6"),  # binds at every step
    )
    assert all(torch.equal(free[k], loose[k]) for k in free)
    assert any(not torch.equal(free[k], tight[k]) for k in free if k.startswith("net."))


# -- sample grids -----------------------------------------------------------------------------
def test_grid_labels_give_each_class_one_row():
    info = DataInfo(channels=1, image_size=4, num_classes=3, class_names=("a", "b", "c"))
    assert class_grid_labels(info, 2).tolist() == [0, 0, 1, 1, 2, 2]
    # ImageNet: 32 rows, spread from the first class to the last, each class once
    many = DataInfo(channels=4, image_size=32, num_classes=1000, class_names=())
    rows = class_grid_labels(many, 1).tolist()
    assert len(rows) == len(set(rows)) == 32 and rows[0] == 0 and rows[-1] == 999
    assert all(31 <= b - a <= 33 for a, b in zip(rows, rows[1:], strict=False))
    assert class_grid_labels(many, 8).tolist() == [c for c in rows for _ in range(8)]


def test_grid_rows_past_32_classes_are_the_classes_nearest_even_steps():
    """Row k of a grid of n > 32 classes shows the class nearest k * (n - 1) / 31 (rounded,
    not truncated): which classes the grids of a data set show is fixed, comparable between
    runs."""
    for n in (33, 100, 1000):
        info = DataInfo(channels=1, image_size=4, num_classes=n, class_names=())
        assert class_grid_labels(info, 1).tolist() == [round(k * (n - 1) / 31) for k in range(32)]


def test_save_grid_places_image_i_at_row_i_div_ncol_and_column_i_mod_ncol(tmp_path):
    n, ncol, h, w, pad = 5, 2, 3, 4, 2
    # image i is filled with the grey level 10 * (i + 1) (PNG value)
    images = torch.stack([torch.full((1, h, w), 10.0 * (i + 1) / 127.5 - 1) for i in range(n)])
    save_grid(images, tmp_path / "grid.png", ncol=ncol)
    arr = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png")).astype(np.int64))
    rows = 3  # ceil(5 / 2): the last row holds one image
    assert arr.shape == (rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = i // ncol, i % ncol
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        assert (arr[top : top + h, left : left + w] == 10 * (i + 1)).all(), i
    top, left = pad + 2 * (h + pad), pad + (w + pad)  # the empty cell stays white
    assert (arr[top : top + h, left : left + w] == 255).all()


def test_a_finished_runs_line_gives_its_whole_time_and_its_training_time(tmp_path):
    """A tiny run's FD at its end can take ten times its steps: the line said 2 s for a run
    of 20."""
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"val_loss": 0.5, "wall_seconds": 20.4, "train_seconds": 2.2}))
    assert ablate._short(path) == "val_loss 0.50000, 20s, of which training 2s"
    # a run resumed from an older version's checkpoint (or a summary of one) has no whole
    # time: not "0s, of which training 2s"
    path.write_text(json.dumps({"val_loss": 0.5, "wall_seconds": None, "train_seconds": 2.2}))
    assert ablate._short(path) == "val_loss 0.50000, training 2s"


def test_parallel_workers_split_the_cpus_when_threads_are_unset(tmp_path, monkeypatch):
    """`--jobs 2` on the CPU: each worker's torch would take every core (the other worker's
    too); an unset train.threads becomes the workers' share, a set one stays; same hash."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ab = load_ablation(write_ablation(tmp_path), "cpu", overrides=["train.threads=null"])
    cfg = ab.runs[0].cfg
    assert cfg.train.threads is None
    assert ablate.worker_config(cfg, 2)["train"]["threads"] == 4
    assert ablate.worker_config(cfg, 16)["train"]["threads"] == 1
    set_ = load_ablation(write_ablation(tmp_path), "cpu", overrides=["train.threads=3"])
    assert ablate.worker_config(set_.runs[0].cfg, 2)["train"]["threads"] == 3
    from dit_bench.config import build_config

    assert build_config(ablate.worker_config(cfg, 2)).hash == cfg.hash


def test_an_unknown_set_key_is_the_sets_error_not_the_first_variants(tmp_path):
    """`--set train.foo=1` was reported as variant 'adaln_zero''s invalid config."""
    path = write_ablation(tmp_path)
    msg = refuse(path, "cpu", overrides=["train.foo=1"])
    assert "--set train.foo=1: train.foo: unknown key; allowed in train: steps" in msg
    assert "variant" not in msg
    assert "--set foo=1: foo: unknown key; allowed in the top level: experiment" in refuse(
        path, "cpu", overrides=["foo=1"]
    )
    # keys of either objective, and values below a key, are keys: the variants decide
    load_ablation(path, "cpu", overrides=["optim.betas=[0.9,0.95]", "train.steps=3"])
    from dit_bench.config import unknown_key

    assert unknown_key(["objective", "logit_std"]) is None
    assert unknown_key(["objective", "schedule"]) is None
    assert unknown_key(["eval", "cfg_interval", "0"]) is None


def test_the_time_this_session_is_elapsed_time_not_the_wall_clocks(
    tmp_path, recorded_training, monkeypatch, capsys
):
    # a wall clock stepped back an hour while the first run trained (NTP, a VM's clock
    # corrected) printed "-59.9 min this session"
    ab = load_ablation(write_ablation(tmp_path), "cpu")
    train_one, wall = ablate._train_one, time.time

    def train_then_step_back(*a, **kw):
        monkeypatch.setattr(time, "time", lambda: wall() - 3600)
        return train_one(*a, **kw)

    monkeypatch.setattr(ablate, "_train_one", train_then_step_back)
    run_ablation(ab, tmp_path / "runs", progress=False)
    session = re.findall(r"(-?[\d.]+) min this session", capsys.readouterr().err)
    assert session and all(float(m) >= 0 for m in session), session
