"""`dit-bench report scaling` on a synthetic sweep folder (trial records of a known law): the
report, figures and tables appear, the fitted exponent is the law's, and report/ never imports
torch."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dit_bench.report import scaling

LAW = {"E": 0.3, "A": 30.0, "a": 0.35, "B": 200.0, "b": 0.3}
BUDGETS = [1e10, 2e10, 4e10, 8e10, 1.6e11, 3.2e11]


def fake_sweep(folder, noise=0.0, seed=0):
    """Run folders with trial.json as `dit_bench.sweep` writes them, losses from LAW."""
    rng = np.random.default_rng(seed)
    for i, (size, n) in enumerate({"S": 2e5, "M": 6e5, "L": 1.3e6, "XL": 2.5e6}.items()):
        for patch, tokens in ((2, 64), (4, 16)):
            flops = int(2 * n * tokens)  # forward FLOPs per image ~ 2 N tokens
            batch = 32
            steps = [int(np.ceil(b / (3 * flops * batch))) for b in BUDGETS]
            vals = []
            for s in steps:
                d = s * batch * tokens
                loss = LAW["E"] + LAW["A"] / n ** LAW["a"] + LAW["B"] / d ** LAW["b"]
                vals.append(float(loss * np.exp(rng.normal(0, noise))))
            h = f"{i}{patch}abcdefgh"[:10]
            run = folder / f"20260101T000000Z-{h}"
            run.mkdir(parents=True)
            curve = [
                {
                    "step": s,
                    "images": s * batch,
                    "train_flops": 3.0 * flops * s * batch,
                    "val_loss": v,
                }
                for s, v in zip(steps, vals, strict=True)
            ]
            rec = {
                "trial": len(list(folder.iterdir())), "trial_params": {"size": size,
                "backbone.patch_size": patch}, "state": "COMPLETE",
                "point": f"size={size},backbone.patch_size={patch}", "config_hash": h,
                "depth": 2, "width": 64, "heads": 2, "patch": patch, "image_size": 16,
                "params": int(n), "macs": flops // 2, "flops": flops, "tokens": tokens,
                "batch_size": batch, "steps": max(steps), "images": max(steps) * batch,
                "train_flops": 3 * flops * max(steps) * batch, "budgets": BUDGETS,
                "budget_steps": steps, "val_at_budget": vals, "curve": curve,
                "val_loss": vals[-1],
                "timing": {"wall_s": 60.0, "train_steps_s": 57.0, "budget_val_s": 1.0,
                           "overhead_s": 3.0, "overhead_excl_val_s": 2.0, "setup_s": 0.5,
                           "worker_start_s": 5.0 if i == 0 else None},
            }  # fmt: skip
            (run / "trial.json").write_text(json.dumps(rec))


def test_report_from_a_runs_folder(tmp_path):
    fake_sweep(tmp_path / "runs")
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=10)
    for name in ("report.md", "loss_vs_flops.png", "loss_vs_macs.png", "isoflop.png",
                 "predicted_vs_actual.png", "points.csv", "points.parquet", "fits.csv",
                 "runs.parquet", "curves.csv"):  # fmt: skip
        assert (out / name).is_file(), name
    f = pd.read_csv(out / "fits.csv")
    ch = f[f["fit"] == "L(N, D) all"].set_index("param")
    assert (ch["status"] == "ok").all()
    assert ch.loc["a", "value"] == pytest.approx(LAW["a"], rel=1e-4)  # noise-free: exact
    assert ch.loc["b", "value"] == pytest.approx(LAW["b"], rel=1e-4)
    text = (out / "report.md").read_text()
    assert "Compute convention" in text and "Held-out check" in text and "overhead" in text
    # an IsoFLOP vertex outside the sizes is no N*: its extrapolated size was printed as one
    iso = text.split("## IsoFLOP minima")[1].split("\n## ")[0]
    rows = [r.split(" | ") for r in iso.splitlines() if r.startswith("| ") and "e+" in r]
    invalid = [r for r in rows if r[4] == "False"]
    assert invalid and all(r[3] == "-" and "size tried (" in r[5] for r in invalid), iso
    pts = pd.read_parquet(out / "points.parquet")
    assert len(pts) == 8 * len(BUDGETS)
    assert np.allclose(pts["train_flops"], 3 * pts["images"] * pts["tokens"] * 0 + 3 * pts["images"]
                       * pts["macs"] * 2)  # fmt: skip


def test_a_report_leaves_the_callers_matplotlib_as_it_found_it(tmp_path, callers_matplotlib):
    # From a notebook: the report switched the backend to Agg (the caller's plt.show() then
    # showed nothing) and set seaborn's theme for every later figure of the caller's
    fake_sweep(tmp_path / "runs")
    before = callers_matplotlib()
    scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=10)
    assert (tmp_path / "report" / "isoflop.png").is_file()
    assert callers_matplotlib() == before


def test_the_report_says_what_its_runs_trained_and_which_setting_differs(tmp_path):
    """Which objective, conditioning, data and seed the losses are of: the trial records name
    them (`setup`), or, for records of sweeps that kept none, each run's config.yaml."""
    fake_sweep(tmp_path / "runs")
    paths = sorted((tmp_path / "runs").rglob("trial.json"))
    setup = {"data.name": "shapes", "data.image_size": 16, "objective.name": "flow",
             "objective.prediction": "velocity", "backbone.conditioning": "adaln_zero",
             "seed": 0, "train.batch_size": 32, "optim.lr": 0.001,
             "train.precision": "32-true"}  # fmt: skip
    for i, path in enumerate(paths[:-1]):
        rec = json.loads(path.read_text())
        if i == 0:  # an older record: its run's config.yaml
            config = "data: {name: shapes, image_size: 16}\nobjective: {name: flow, prediction: "
            config += "velocity}\nbackbone: {conditioning: adaln_zero}\nseed: 1\n"
            config += "train: {batch_size: 32, precision: 32-true}\noptim: {lr: 0.001}\n"
            (path.parent / "config.yaml").write_text(config)
        else:
            path.write_text(json.dumps({**rec, "setup": setup}))
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=10)
    head = (out / "report.md").read_text().split("## Headline")[0]
    assert (
        "Setup: data shapes; image size 16; objective flow; prediction velocity; conditioning "
        "adaln_zero; seed **differs**: 0 (6 runs), 1 (1 run); batch 32; lr 0.001; precision "
        "32-true (not recorded for 1 run)."
    ) in head
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["cfg.seed"].dropna()) == [0] * 6 + [1]


def test_the_report_names_the_devices_its_trials_ran_on(tmp_path):
    """Its losses and its overhead timings are of a machine: the report names it, from the trial
    records, or, for records of sweeps that kept none, from each run's summary.json."""
    fake_sweep(tmp_path / "runs")
    paths = sorted((tmp_path / "runs").rglob("trial.json"))
    rec = json.loads(paths[0].read_text())
    paths[0].write_text(json.dumps({**rec, "device": "NVIDIA H100 80GB HBM3"}))
    for path in paths[1:]:
        (path.parent / "summary.json").write_text(json.dumps({"device": "cpu (EPYC, 1 threads)"}))
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=10)
    head = (out / "report.md").read_text().split("## Headline")[0]
    assert "NVIDIA H100 80GB HBM3 (1 run)" in head and "cpu (EPYC, 1 threads) (7 runs)" in head
    table = (out / "report.md").read_text().split("## Runs")[1].split("##")[0]
    assert table.count(" NVIDIA H100 80GB HBM3 |") == 1, table  # which run ran where
    runs = pd.read_csv(out / "runs.csv")
    assert runs["device"].value_counts().to_dict() == {
        "cpu (EPYC, 1 threads)": 7,
        "NVIDIA H100 80GB HBM3": 1,
    }


def test_a_trial_run_linked_into_the_sweep_folder_is_reported(tmp_path):
    # a run moved to another disk and linked back: its trial was missing from the report
    fake_sweep(tmp_path / "runs")
    run = sorted((tmp_path / "runs").iterdir())[0]
    moved = tmp_path / "disk" / run.name
    moved.parent.mkdir()
    run.rename(moved)
    run.symlink_to(moved, target_is_directory=True)
    recs = scaling.load_records(tmp_path / "runs")
    assert len(recs) == 8 and {r["run_dir"] for r in recs} >= {str(run)}


@pytest.mark.parametrize("text", ['{"study": "s', "[]"])
def test_a_damaged_trial_record_is_named_in_a_one_line_error(tmp_path, capsys, text):
    # one trial.json of hundreds, cut short by a copy: the error named no file (or, holding a
    # list, was a traceback)
    from dit_bench.cli import main

    fake_sweep(tmp_path / "runs")
    path = sorted((tmp_path / "runs").rglob("trial.json"))[3]
    path.write_text(text)
    assert main(["report", "scaling", str(tmp_path / "runs"), "-o", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(f"dit-bench: {path}: ")


def test_the_loss_vs_macs_and_flops_legends_cover_no_data(tmp_path, monkeypatch):
    """Inside the panel, the budgets' legend covered the largest models' lines in
    reports/scaling-cpu/loss_vs_macs.png: both legends sit beside their panels."""
    import matplotlib.figure

    fake_sweep(tmp_path / "runs")
    overlaps = {}

    def spy(fig, path, *args, **kw):
        fig.canvas.draw()
        overlaps[Path(path).name] = [
            ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
            for ax in fig.axes
            if ax.get_legend()
        ]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    runs, points, curves = scaling.tables(scaling.load_records(tmp_path / "runs"))
    scaling.figures(runs, points, curves, scaling.fit_all(points, n_boot=2), tmp_path)
    assert overlaps["loss_vs_macs.png"] == [False, False]
    # the sizes' and patches' legend of loss vs FLOPs sat inside its panel too, over the curves
    # of the small models (ten sizes: most of the panel's upper half)
    assert overlaps["loss_vs_flops.png"] == [False]


def test_the_loss_vs_macs_legend_names_every_budget(tmp_path, monkeypatch):
    """One line per budget, so one legend entry per budget as the tables write it: a brief
    legend of the log colour scale named decades instead (1e+10 and 1e+11 for six budgets, one
    entry for budgets 2.5e9..8e10), which no line can be read off."""
    import matplotlib.figure

    fake_sweep(tmp_path / "runs")
    legends = {}

    def spy(fig, path, *args, **kw):
        legends[Path(path).name] = [
            [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
            for ax in fig.axes
        ]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    runs, points, curves = scaling.tables(scaling.load_records(tmp_path / "runs"))
    result = scaling.fit_all(points, n_boot=2)
    scaling.figures(runs, points, curves, result, tmp_path)
    assert legends["loss_vs_macs.png"][1] == [f"{b:.3g}" for b in BUDGETS]


def test_the_headline_quotes_each_fit_with_the_interval_of_its_bootstrap(tmp_path):
    """fit_all's own result (not a hand-built one) carries the bootstrap intervals to the
    headline, as fits.csv has them: end to end for L(N, D) (the fake sweep has no IsoFLOP
    profile), and in fit_all's result for both."""
    fake_sweep(tmp_path / "runs", noise=0.005)
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=10)
    row = pd.read_csv(out / "fits.csv").set_index(["fit", "param"]).loc[("L(N, D) all", "a")]
    assert row["status"] == "ok" and np.isfinite([row["ci_low"], row["ci_high"]]).all()
    head = (out / "report.md").read_text().split("## Headline")[1].split("##")[0]
    (said,) = [x for x in head.splitlines() if "L(N, D)" in x]
    assert f"[95% CI {row['ci_low']:.3f}, {row['ci_high']:.3f}]" in said, said
    # IsoFLOP profiles: 9 sizes at each of 5 budgets, N*(C) from each budget's parabola; two
    # runs (seeds) of each size, as an IsoFLOP interval needs
    rng = np.random.default_rng(0)
    rows = []
    for budget in np.geomspace(1e12, 1e16, 5):
        for i, n in enumerate(np.geomspace(1e4, 1e8, 9)):
            d = budget / (6 * n)
            for rep in range(2):
                loss = (LAW["E"] + LAW["A"] / n ** LAW["a"] + LAW["B"] / d ** LAW["b"]) * np.exp(
                    rng.normal(0, 0.003)
                )
                rows.append(
                    {"run": f"r{i}-{rep}", "size": f"s{i}", "patch": 2, "params": n,
                     "budget": budget, "tokens_seen": d, "train_flops": budget, "val_loss": loss}
                )  # fmt: skip
    result = scaling.fit_all(pd.DataFrame(rows), n_boot=10)
    listed = {f.name: f for f in result["fits"]}
    iso, ch = result["isoflop"]["all"].fit, result["chinchilla"]
    assert iso.ok and ch.ok and iso.ci and ch.ci
    assert iso.ci == listed["N*(C) all"].ci and ch.ci == listed["L(N, D) all"].ci


def test_the_isoflop_bootstrap_picks_each_sizes_best_patch_in_every_resample(monkeypatch):
    """N*(C) all takes each size's best patch at each budget: the refits must get every run
    and pick again, or the interval leaves out the uncertainty of that pick."""
    from dit_bench.report import fits

    rows = []
    for budget in np.geomspace(1e12, 1e16, 4):
        for i, n in enumerate(np.geomspace(1e4, 1e8, 5)):
            for patch in (2, 4):
                loss = 1 + 0.1 * (np.log10(n) - 6) ** 2 + 0.01 * patch
                rows.append({"run": f"s{i}p{patch}", "size": f"s{i}", "patch": patch,
                             "params": n, "budget": budget, "tokens_seen": 1e6,
                             "train_flops": budget, "val_loss": loss})  # fmt: skip
    seen = {}
    real = fits.bootstrap

    def spy(points, refit, **kw):
        seen[refit(points).name] = points
        return real(points, refit, **kw)

    monkeypatch.setattr(fits, "bootstrap", spy)
    scaling.fit_all(pd.DataFrame(rows), n_boot=2)
    assert set(seen["N*(C) all"]["patch"]) == {2, 4}  # every run, not the picked ones
    assert len(seen["N*(C) all"]) == len(rows)


def test_a_sweep_with_one_budget_reports_what_it_can(tmp_path, monkeypatch):
    """One budget reached (a sweep's first): no IsoFLOP profile and no held-out check, said so,
    not a KeyError from an empty IsoFLOP table."""
    monkeypatch.setattr(sys.modules[__name__], "BUDGETS", BUDGETS[:1])
    fake_sweep(tmp_path / "runs")
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=4)
    text = (out / "report.md").read_text()
    assert "N*(C) ~ C^a (IsoFLOP, best patch per size): a = not reported" in text


def test_overhead_leaves_out_retried_trials():
    # a retried trial resumes its run midway: its clock covers the rest only (0.5 s of 10)
    times = {"time_wall_s": [10.0, 12.0, 0.5], "time_train_steps_s": [8.0, 9.0, 0.1]}
    times |= {"time_overhead_s": [2.0, 3.0, 0.4], "time_overhead_excl_val_s": [1.0, 2.0, 0.3]}
    times |= {"time_budget_val_s": [1.0, 1.0, 0.1], "attempt": [1, 1, 2]}
    o = scaling.overhead_summary(pd.DataFrame(times))
    assert o["trials"] == 2 and o["wall_median_s"] == 11.0 and o["overhead_median_s"] == 2.5
    # records of sweeps that kept no attempt number: first attempts, all measured
    o = scaling.overhead_summary(pd.DataFrame(times | {"attempt": [None, None, 2]}))
    assert o["trials"] == 2 and o["wall_median_s"] == 11.0


def test_a_sweep_with_trials_still_waiting_is_incomplete(tmp_path):
    # enqueued grid points not yet claimed by a worker are as missing as running ones
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="grid", storage=url)
    study.tell(study.ask(), 1.0)
    study.enqueue_trial({})
    assert scaling.unfinished_trials(url) == [
        "study grid: 1 trials finished; not finished: 1 running or waiting"
    ]


def test_a_refused_report_writes_nothing(tmp_path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="no sweep trials"):
        scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=10)
    assert not (tmp_path / "report").exists()


def test_a_report_of_an_unfinished_sweep_says_so(tmp_path):
    # Fits from part of the grid read like fits of all of it: the report names what is missing.
    import optuna

    fake_sweep(tmp_path / "runs")
    url = scaling.study_url(tmp_path / "runs")
    assert url is None  # a runs folder without its study: nothing to check against
    url = f"sqlite:///{tmp_path / 'runs' / 'study.db'}"
    study = optuna.create_study(study_name="tiny-cpu", storage=url)
    study.tell(study.ask(), 1.0)  # complete
    lost = study.ask()
    lost.set_user_attr("attempt", 1)
    study.tell(lost, state=optuna.trial.TrialState.FAIL)  # lost, then re-run and finished
    retry = study.ask()
    retry.set_user_attr("retry_of", lost.number)
    study.tell(retry, 2.0)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # failed for good: trial 3
    study.ask()  # still running: trial 4
    assert scaling.study_url(tmp_path / "runs") == url.replace(
        str(tmp_path), str(tmp_path.resolve())
    )
    lines = scaling.unfinished_trials(url)
    assert lines == [
        "study tiny-cpu: 2 trials finished; not finished: 1 running or waiting, "
        "1 failed (trials [3])"
    ]
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=2)
    assert (
        f"**Incomplete sweep**: the fits use the finished trials only; {lines[0]}."
        in (out / "report.md").read_text()
    )


def _study_of_fake_sweep(tmp_path):
    """fake_sweep's trials, finished, in an Optuna study file (as a sweep's storage holds them)."""
    import optuna

    fake_sweep(tmp_path / "runs")
    db = tmp_path / "study.db"
    study = optuna.create_study(study_name="tiny-cpu", storage=f"sqlite:///{db}")
    for path in sorted((tmp_path / "runs").rglob("trial.json")):
        trial = study.ask()
        for key, value in json.loads(path.read_text()).items():
            trial.set_user_attr(key, value)
        study.tell(trial, 1.0)
    return db, study


def test_a_report_from_a_study_leaves_the_callers_optuna_verbosity(tmp_path):
    # From a notebook: after a report of a study, Optuna stayed at WARNING and the user's own
    # studies logged no trial lines
    import optuna

    db, _ = _study_of_fake_sweep(tmp_path)
    verbosity = optuna.logging.get_verbosity()
    try:
        optuna.logging.set_verbosity(optuna.logging.INFO)
        scaling.build_report(f"sqlite:///{db}", tmp_path / "report", n_boot=2)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(verbosity)


def test_a_report_from_a_study_reads_each_study_once(tmp_path, monkeypatch):
    """The records and the unfinished-trials line come from one read of the storage (each study
    loaded once: a PostgreSQL storage of many studies is not read twice)."""
    import optuna

    db, study = _study_of_fake_sweep(tmp_path)
    study.ask()  # still running
    loads = []
    load_study = optuna.load_study
    monkeypatch.setattr(
        optuna, "load_study", lambda **kw: loads.append(kw["study_name"]) or load_study(**kw)
    )
    out = scaling.build_report(db, tmp_path / "report", n_boot=2)
    assert loads == ["tiny-cpu"]
    text = (out / "report.md").read_text()
    assert "study tiny-cpu: 8 trials finished; not finished: 1 running or waiting" in text


def test_a_report_from_a_storage_url_names_no_password(tmp_path, monkeypatch):
    """report.md is committed and shared: its Source line shows the storage URL without the
    password it was read with, and so do the errors of a storage that cannot be read."""
    db, _ = _study_of_fake_sweep(tmp_path)
    studies = scaling.study_trials(f"sqlite:///{db}")
    url = "postgresql://ann:s3cret@db.example:5432/sweeps"
    with monkeypatch.context() as m:  # the PostgreSQL server stands in for the study file
        m.setattr(scaling, "study_trials", lambda u, study=None: studies if u == url else {})
        m.setattr(scaling, "figures", lambda *a: [])  # not what is checked, and most of the time
        out = scaling.build_report(url, tmp_path / "report", n_boot=2)
    text = (out / "report.md").read_text()
    assert "s3cret" not in text
    assert "Source: `postgresql://ann:***@db.example:5432/sweeps`" in text
    # no driver for it: refused before any connection, and the message keeps the URL's secret
    with pytest.raises(ValueError) as e:
        scaling.build_report("mysql://ann:s3cret@db.example/sweeps", tmp_path / "r2", n_boot=2)
    assert "s3cret" not in str(e.value) and "mysql://ann:***@db.example/sweeps" in str(e.value)


def test_a_failed_trials_points_stay_out_of_the_fits_and_the_report_says_so(tmp_path):
    # a trial that diverged after its third budget fails with an error, and keeps its record:
    # a NaN at the budget evaluated after divergence, finite losses before it
    fake_sweep(tmp_path / "runs")
    path = sorted((tmp_path / "runs").rglob("trial.json"))[0]
    rec = json.loads(path.read_text())
    rec |= {"state": "FAIL", "error": "FloatingPointError: non-finite training loss"}
    rec["val_at_budget"] = rec["val_at_budget"][:3] + [float("nan"), None, None]
    rec["curve"] = rec["curve"][:4]
    rec["curve"][3]["val_loss"] = float("nan")
    rec["val_loss"] = None
    path.write_text(json.dumps(rec))
    # a pruned trial's budgets up to its pruning are measurements: they stay
    pruned = sorted((tmp_path / "runs").rglob("trial.json"))[1]
    prec = json.loads(pruned.read_text())
    prec |= {"state": "PRUNED", "val_loss": None}
    prec["val_at_budget"] = prec["val_at_budget"][:2] + [None] * (len(BUDGETS) - 2)
    pruned.write_text(json.dumps(prec))

    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=5)
    pts = pd.read_parquet(out / "points.parquet")
    assert rec["config_hash"] not in set(pts["run"]) and pts["val_loss"].notna().all()
    assert len(pts[pts["run"] == prec["config_hash"]]) == 2
    assert len(pts) == 6 * len(BUDGETS) + 2
    runs = pd.read_parquet(out / "runs.parquet").set_index("run")
    assert runs.loc[rec["config_hash"], "state"] == "FAIL"  # listed, not fitted
    f = pd.read_csv(out / "fits.csv")
    assert (f[f["fit"] == "L(N, D) all"]["status"] == "ok").all()
    text = (out / "report.md").read_text()
    assert (
        "**Incomplete sweep**: the fits use the finished trials only; 1 trial(s) not finished "
        "(1 FAIL)." in text
    )


def test_a_report_of_a_sweep_whose_every_trial_failed_names_the_failures(tmp_path):
    # every trial diverged (an lr too high for all sizes): the refusal read "no finished trial
    # has a finite val loss at any budget yet", as of a sweep still to come, naming no failure
    import optuna

    fake_sweep(tmp_path / "runs")
    db = tmp_path / "study.db"
    study = optuna.create_study(study_name="tiny-cpu", storage=f"sqlite:///{db}")
    for path in sorted((tmp_path / "runs").rglob("trial.json")):
        rec = json.loads(path.read_text())
        error = f"FloatingPointError: non-finite weights at step {rec['trial']}"
        rec |= {"state": "FAIL", "val_loss": None, "error": error}
        path.write_text(json.dumps(rec))
        trial = study.ask()
        for key, value in rec.items():
            trial.set_user_attr(key, value)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    first = min(json.loads(p.read_text())["trial"] for p in (tmp_path / "runs").rglob("trial.json"))
    for source, left, number in (
        (tmp_path / "runs", "8 trial(s) not finished (8 FAIL)", first),
        (db, "study tiny-cpu: 0 trials finished; not finished: 8 failed (trials [0, 1, 2", 0),
    ):
        with pytest.raises(ValueError) as e:
            scaling.build_report(source, tmp_path / "report", n_boot=2)
        msg = str(e.value)
        assert " yet" not in msg and f"at any budget ({left}" in msg, msg
        # the first failure's error (the others most often share it)
        said = f"; trial {number} size=S,backbone.patch_size=2: FloatingPointError: non-finite"
        assert said in msg, msg
    assert not (tmp_path / "report").exists()


def test_the_runs_table_says_how_far_a_pruned_or_failed_run_trained(tmp_path):
    """A trial's `steps` is its plan: a pruned run stopped at its last validated budget, and the
    table said it trained all of them."""
    fake_sweep(tmp_path / "runs")
    path = sorted((tmp_path / "runs").rglob("trial.json"))[1]
    rec = json.loads(path.read_text())
    rec |= {"state": "PRUNED", "val_loss": None, "curve": rec["curve"][:2]}
    rec["val_at_budget"] = rec["val_at_budget"][:2] + [None] * (len(BUDGETS) - 2)
    path.write_text(json.dumps(rec))
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=2)
    table = (out / "report.md").read_text().split("## Runs")[1].split("##")[0]
    (row,) = [line for line in table.splitlines() if line.endswith("| PRUNED |")]
    assert f"| {rec['curve'][1]['step']} of {rec['steps']} |" in row, row
    runs = pd.read_csv(out / "runs.csv").set_index("run")
    assert runs.loc[rec["config_hash"], "steps_reached"] == rec["curve"][1]["step"]


def test_the_tables_do_not_depend_on_the_order_of_the_trial_records(tmp_path):
    """A runs folder lists a sweep's trials by directory name, its study by trial number: the
    report of one sweep from either source must print the same numbers. The fits read the
    points in their row order (the bootstrap draws runs by position, the L(N, D) optimiser
    sums residuals in order), so the two sources gave other intervals."""
    fake_sweep(tmp_path / "runs", noise=0.02)
    records = scaling.load_records(tmp_path / "runs")
    for got, backwards in zip(scaling.tables(records), scaling.tables(records[::-1]), strict=True):
        pd.testing.assert_frame_equal(got, backwards)


def test_a_storage_of_several_studies_reports_the_one_named_and_refuses_to_pool(
    tmp_path, monkeypatch
):
    # two sweeps in one storage (two profiles, or two sweep files on a shared database)
    import optuna

    from dit_bench.cli import main

    monkeypatch.setattr(scaling.build_report, "__defaults__", (2,))  # n_boot: the CLI's 200 is slow
    monkeypatch.setattr(scaling, "figures", lambda *args: [])  # plots are not checked here

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    for name, seed, scale in (("shapes-scaling-cpu", 0, 1.0), ("other-sweep-cpu", 1, 3.0)):
        fake_sweep(tmp_path / name, noise=0.01, seed=seed)
        study = optuna.create_study(study_name=name, storage=url)
        for path in sorted((tmp_path / name).rglob("trial.json")):
            rec = json.loads(path.read_text())
            rec["config_hash"] = name[:5] + rec["config_hash"]  # other configs
            rec["val_at_budget"] = [v * scale for v in rec["val_at_budget"]]  # other data
            trial = study.ask()
            for k, v in rec.items():
                trial.set_user_attr(k, v)
            study.tell(trial, rec["val_at_budget"][-1])
    with pytest.raises(ValueError, match=r"2 studies \['other-sweep-cpu', 'shapes-scaling-cpu'\]"):
        scaling.build_report(url, tmp_path / "pooled", n_boot=2)
    assert not (tmp_path / "pooled").exists()
    with pytest.raises(ValueError, match="no study 'nope'"):
        scaling.build_report(url, tmp_path / "nope", n_boot=2, study="nope")

    out = tmp_path / "one"
    assert main(["report", "scaling", url, "-o", str(out), "--study", "shapes-scaling-cpu"]) == 0
    for table in ("runs", "points"):
        df = pd.read_csv(out / f"{table}.csv")
        assert set(df["study"]) == {"shapes-scaling-cpu"}, table
    assert len(pd.read_csv(out / "runs.csv")) == 8  # its own runs, not both sweeps' 16
    assert "study `shapes-scaling-cpu`" in (out / "report.md").read_text()


def test_tick_labels_of_the_figures_log_axes_do_not_overlap(tmp_path, tick_label_overlaps):
    """Sizes of 2e5 to 2.5e6 parameters: the IsoFLOP profiles' log N axis labelled 2, 3, 4 and
    6 x 10^5 in 10^5 notation, 3 and 4 drawn over each other (reports/scaling-cpu/isoflop.png)."""
    fake_sweep(tmp_path / "runs")
    runs, points, curves = scaling.tables(scaling.load_records(tmp_path / "runs"))
    result = scaling.fit_all(points, n_boot=2)
    made = scaling.figures(runs, points, curves, result, tmp_path)
    assert tick_label_overlaps == {name: [] for name in made}


def test_a_diverged_run_a_pruner_stopped_stays_out_of_the_fits_and_figures(tmp_path, monkeypatch):
    # lr 1e8 under the median pruner: pruned at its first budget with a finite 3.6e17, it
    # entered the fits and stretched the log plots' loss axis to 1e17, where the same trial
    # without a pruner ends NaN, fails, and is left out
    import matplotlib.figure

    fake_sweep(tmp_path / "runs")
    path = sorted((tmp_path / "runs").rglob("trial.json"))[0]
    rec = json.loads(path.read_text())
    rec |= {"state": "PRUNED", "val_loss": None, "curve": rec["curve"][:1]}
    rec["val_at_budget"] = [3.6e17] + [None] * (len(BUDGETS) - 1)
    rec["curve"][0]["val_loss"] = 3.6e17
    path.write_text(json.dumps(rec))
    tops = {}

    def spy(fig, path, *args, **kw):
        tops[Path(path).name] = fig.axes[0].get_ylim()[1]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=2)
    assert tops["loss_vs_flops.png"] < 100 and tops["loss_vs_macs.png"] < 100, tops
    pts = pd.read_parquet(out / "points.parquet")
    assert rec["config_hash"] not in set(pts["run"]) and len(pts) == 7 * len(BUDGETS)
    runs = pd.read_parquet(out / "runs.parquet").set_index("run")
    assert runs.loc[rec["config_hash"], "diverged_at"] == BUDGETS[0]
    text = (out / "report.md").read_text()
    assert "Diverged: S/2 (at 1e+10): a val loss over 100x the lowest at that budget" in text
    assert "| PRUNED (diverged) |" in text and "Not at every budget" not in text


def _figure_points(tmp_path, monkeypatch, edit) -> dict[str, tuple[int, str]]:
    """Points drawn on each figure's first axes, and its title, for trial records `edit`ed."""
    import matplotlib.figure

    fake_sweep(tmp_path / "runs")
    for f in (tmp_path / "runs").glob("*/trial.json"):
        f.write_text(json.dumps(edit(json.loads(f.read_text()))))
    drawn = {}

    def spy(fig, path, *args, **kw):
        ax = fig.axes[0]
        n = sum(len(c.get_offsets()) for c in ax.collections)
        drawn[Path(path).name] = (n, ax.get_title())

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    runs, points, curves = scaling.tables(scaling.load_records(tmp_path / "runs"))
    scaling.figures(runs, points, curves, scaling.fit_all(points, n_boot=2), tmp_path)
    return drawn


def test_a_fit_not_made_is_named_on_the_predicted_vs_actual_figure(tmp_path, monkeypatch):
    """All runs of one size (a sweep over lr): no L(N, D) fit, and predicted_vs_actual.png drew
    an empty 0..1 frame without a word, beside an envelope titled "fit vs actual" and no fit."""
    import matplotlib.figure

    fake_sweep(tmp_path / "runs")
    for f in (tmp_path / "runs").glob("*/trial.json"):
        if json.loads(f.read_text())["params"] != 2e5:  # S only, patches 2 and 4
            shutil.rmtree(f.parent)
    drawn = {}

    def spy(fig, path, *args, **kw):
        drawn[Path(path).name] = [
            (ax.get_title(), [t.get_text() for t in ax.texts]) for ax in fig.axes
        ]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    runs, points, curves = scaling.tables(scaling.load_records(tmp_path / "runs"))
    result = scaling.fit_all(points, n_boot=2)
    assert not result["chinchilla"].ok and not result["envelope_fit"].ok
    scaling.figures(runs, points, curves, result, tmp_path)
    (left, texts), (right, _) = drawn["predicted_vs_actual.png"]
    assert left.endswith("[insufficient data]") and texts[0].startswith("not fitted:\n")
    assert "1 distinct N" in texts[0]
    assert right == "Loss-compute envelope: fit vs actual [insufficient data]"


def test_the_figures_of_a_unet_sweep_show_its_points(tmp_path, monkeypatch):
    """The ADM U-Net has no patch: its trial records say `patch: null`, and the figures, styled
    by patch, left out every point (an empty loss-vs-compute plot)."""

    def unet(rec):  # the U-Net's tokens are its input pixels: 64 x 64 for "patch" 2, 32 x 32
        side = 64 if rec["patch"] == 2 else 32
        return {**rec, "patch": None, "image_size": side, "tokens": side * side}

    drawn = _figure_points(tmp_path, monkeypatch, unet)
    assert drawn["loss_vs_flops.png"][0] == 8 * len(BUDGETS)
    assert drawn["loss_vs_macs.png"][0] == 8
    assert drawn["predicted_vs_actual.png"][0] > 0
    assert "marker: resolution" in drawn["loss_vs_flops.png"][1]


def test_the_figures_tell_apart_runs_at_several_resolutions_of_one_patch(tmp_path, monkeypatch):
    """A sweep over data.image_size at a fixed patch: one size at 16 and 32 px had one colour
    and one marker, and the title said the marker was the patch, which did not vary."""

    def resolution(rec):
        side = 32 if rec["patch"] == 2 else 16
        return {**rec, "patch": 4, "image_size": side}

    drawn = _figure_points(tmp_path, monkeypatch, resolution)
    assert "marker: patch @ resolution" in drawn["loss_vs_flops.png"][1]
    assert drawn["loss_vs_flops.png"][0] == 8 * len(BUDGETS)


def test_an_isoflop_slice_leaves_out_points_far_past_its_budget(tmp_path):
    """A point is the val loss at the step that crosses its budget; where one step passes the
    budget it lies far beyond it (XL/2 here: 3.1x at 1e10; a U-Net at batch 16: 115x, its one
    step standing at two budgets). The envelope and L(N, D) put a point at its own compute and
    tokens, an IsoFLOP slice at the budget: there it was set beside runs that spent the budget."""
    fake_sweep(tmp_path / "runs")
    _, points, _ = scaling.tables(scaling.load_records(tmp_path / "runs"))
    assert (points["train_flops"] > 3 * points["budget"]).any()  # in the points all the same
    slices = scaling._isoflop_points(points)
    assert (slices["train_flops"] <= 1.5 * slices["budget"]).all()
    assert set(slices.loc[slices["budget"] == BUDGETS[0], "size"]) == {"S", "M", "L"}
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=4)
    text = (out / "report.md").read_text()
    assert "Left out of the IsoFLOP slices: 6 (run, budget) point(s)" in text
    assert "(up to 3.07x, in 3 run(s)" in text


def test_a_report_of_runs_at_several_resolutions_says_the_fits_pool_them(tmp_path):
    """A sweep over data.image_size: the runs table showed the same size and patch with other
    token counts and no resolution, and nothing said that the fits (the IsoFLOP's "best patch
    per size" too) compared losses of images at different resolutions."""
    fake_sweep(tmp_path / "runs")
    for f in (tmp_path / "runs").glob("*/trial.json"):
        rec = json.loads(f.read_text())
        f.write_text(json.dumps({**rec, "image_size": 32 if rec["patch"] == 2 else 16}))
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=4)
    text = (out / "report.md").read_text()
    assert "Resolutions: 16, 32 px. A val loss is of its run's own images" in text
    runs = text.split("## Runs")[1].split("\n\n")[1].splitlines()
    assert runs[0].startswith("| size | patch | px | tokens |")
    assert len({row.count("|") for row in runs}) == 1


def test_the_runs_table_names_the_parameters_beside_size_and_patch(tmp_path):
    """A tpe sweep over optim.lr (or a seed axis): its runs table listed each size and patch
    several times over with nothing to tell the rows apart."""
    fake_sweep(tmp_path / "runs")
    for i, f in enumerate(sorted((tmp_path / "runs").glob("*/trial.json"))):
        rec = json.loads(f.read_text())
        point = f"{rec['point']},optim.lr={1e-3 * (i + 1) / 3},seed={i % 2}"
        f.write_text(json.dumps({**rec, "point": point, "trial_params": None}))
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=4)
    runs = (out / "report.md").read_text().split("## Runs")[1].split("\n\n")[1].splitlines()
    assert runs[0].endswith("| state | other parameters |")
    assert "| optim.lr=0.000333, seed=0 |" in "\n".join(runs)
    assert len({row.count("|") for row in runs}) == 1


def _one_run_frontier() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, points): S/4 lowest at the first five budgets, M/4 at the last, L/4 never."""
    rows = []
    for run, size, n, offset in (
        ("a", "S", 2e5, 0.0),
        ("b", "M", 6e5, 0.05),
        ("c", "L", 1.3e6, 0.1),
    ):
        for i, b in enumerate(BUDGETS):
            loss = 0.4 + 3.0 * (b / 1e10) ** -0.8 + offset
            if run == "b" and i == len(BUDGETS) - 1:
                loss = 0.3  # the larger model takes over at the last budget only
            rows.append(
                {"run": run, "size": size, "patch": 4, "params": n, "macs": n * 16, "tokens": 16,
                 "budget": b, "step": 10 * (i + 1), "images": 320 * (i + 1),
                 "tokens_seen": 5120 * (i + 1), "train_flops": b * 1.01, "val_loss": loss}
            )  # fmt: skip
    points = pd.DataFrame(rows)
    runs = points.drop_duplicates("run")[["run", "size", "patch", "params", "macs", "tokens"]]
    return runs.assign(state="COMPLETE", steps=60, val_loss=0.5, study="s"), points


def test_the_headline_says_when_the_envelope_is_mostly_one_runs_learning_curve(tmp_path):
    """reports/scaling-cpu: S/4 is lowest at 5 of the 6 budgets, S/2 at the last. The L(C) fit
    passes its checks (two runs on the frontier), but its alpha is mostly S/4's loss against its
    own steps: the headline quoted it as the loss-compute exponent with no word of that."""
    runs, points = _one_run_frontier()
    result = scaling.fit_all(points, n_boot=4)
    assert result["envelope_fit"].ok
    text = scaling.write_report("runs/s", runs, points, result, [], tmp_path)
    (said,) = [x for x in text.splitlines() if x.startswith("- Loss-compute envelope")]
    assert "S/4 at 5 of 6 budgets, M/4 at 1 of 6 budgets" in said, said
    assert "mostly S/4's learning curve" in said, said


def test_the_report_names_a_finished_run_without_a_point_at_some_budget(tmp_path):
    """reports/scaling-cpu: "12 runs, 71 (run, budget) points", and no word of which run
    lacks the 72nd (S/8: max_steps stops it at 1.6e11), though the envelope and the IsoFLOP
    slices at 3.2e11 are over the other runs only."""
    runs, points = _one_run_frontier()
    points = points[~((points["run"] == "c") & (points["budget"] == BUDGETS[-1]))]
    result = scaling.fit_all(points, n_boot=4)
    text = scaling.write_report("runs/s", runs, points, result, [], tmp_path)
    assert "Not at every budget: L/4 (3.2e+11): no point there" in text
    text = scaling.write_report("runs/s", runs, _one_run_frontier()[1], result, [], tmp_path)
    assert "Not at every budget" not in text


def test_the_report_lines_name_runs_of_one_size_and_patch_apart(tmp_path):
    """A sweep over optim.lr (one size, its worse rates pruned): "Not at every budget: S/4
    (...); S/4 (...); S/4 (...)" and the envelope's "S/4 at 5 of 6 budgets, S/4 at 1" named
    runs that only their learning rates tell apart."""
    runs, points = _one_run_frontier()
    runs = runs.assign(size="S", point=[f"size=S,optim.lr={lr}" for lr in (0.001, 0.003, 0.01)])
    points = points.assign(size="S")
    points = points[~((points["run"] == "c") & (points["budget"] == BUDGETS[-1]))]
    result = scaling.fit_all(points, n_boot=4)
    text = scaling.write_report("runs/s", runs, points, result, [], tmp_path)
    assert "Not at every budget: S/4 optim.lr=0.01 (3.2e+11): no point there" in text
    assert "S/4 optim.lr=0.001 at 5 of 6 budgets, S/4 optim.lr=0.003 at 1 of 6 budgets" in text
    assert "mostly S/4 optim.lr=0.001's learning curve" in text
    # runs of their own size and patch keep their short names
    assert "S/4 at 5 of 6" in scaling.frontier_runs(*_one_run_frontier()[::-1])


def test_a_report_stopped_while_rewritten_leaves_no_report_md_over_new_tables(
    tmp_path, monkeypatch
):
    # `report` again after more trials, stopped in its figures (Ctrl-C, a crash): the earlier
    # report.md stayed, whole to the eye, over the new tables and the figures it reached
    folder = tmp_path / "runs"
    fake_sweep(folder)
    out = tmp_path / "report"
    monkeypatch.setattr(scaling, "figures", lambda *a, **k: [])
    scaling.build_report(folder, out, n_boot=10)
    assert (out / "report.md").is_file()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scaling, "figures", stopped)
    with pytest.raises(KeyboardInterrupt):
        scaling.build_report(folder, out, n_boot=10)
    assert (out / "runs.csv").is_file() and not (out / "report.md").exists()


def test_a_runs_folder_report_names_the_trials_still_training(tmp_path):
    # A sweep with its study elsewhere (--storage) writes trial.json at a trial's end only: a
    # report of its runs folder mid-sweep fitted the finished trials and called it the sweep.
    fake_sweep(tmp_path / "runs")
    for name in ("20260102T000000Z-running001", "20260102T000000Z-running002"):
        run = tmp_path / "runs" / name  # as train leaves a run in training: no trial.json yet
        run.mkdir()
        (run / "config.yaml").write_text("experiment: tiny-cpu\n")
        (run / "metrics.csv").write_text("step,train/loss\n2,0.5\n")
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=2)
    text = (out / "report.md").read_text()
    assert "**Incomplete sweep**" in text
    assert "2 run folder(s) without a trial record (trial.json" in text
    assert "20260102T000000Z-running001" in text
    shutil.rmtree(tmp_path / "report")
    for name in ("20260102T000000Z-running001", "20260102T000000Z-running002"):
        shutil.rmtree(tmp_path / "runs" / name)
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=2)
    assert "Incomplete sweep" not in (out / "report.md").read_text()


def _points_under_legends(fig) -> list[tuple[float, float]]:
    """The data points (markers and line vertices, in display coordinates) that a legend of
    their own panel is drawn over."""
    from matplotlib.collections import PathCollection

    fig.canvas.draw()
    under = []
    for ax in fig.axes:
        if (legend := ax.get_legend()) is None:
            continue
        box = legend.get_window_extent()
        xy = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
        xy += [np.asarray(line.get_xydata()) for line in ax.lines]
        for x, y in ax.transData.transform(np.concatenate(xy)):
            if box.contains(x, y):
                under.append((x, y))
    return under


def test_the_isoflop_and_predicted_vs_actual_legends_cover_no_data(tmp_path, monkeypatch):
    """Inside the left panels, the budgets' legend of reports/scaling-cpu/isoflop.png covered
    the 4e10 profile and the 8e10 point of the largest size, and the fits' legend of
    predicted_vs_actual.png covered points near the diagonal: both sit beside their panels, as
    loss_vs_flops's and loss_vs_macs's do."""
    import matplotlib.figure

    fake_sweep(tmp_path / "runs", noise=0.05)
    under = {}

    def spy(fig, path, *args, **kw):
        under[Path(path).name] = _points_under_legends(fig)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    runs, points, curves = scaling.tables(scaling.load_records(tmp_path / "runs"))
    scaling.figures(runs, points, curves, scaling.fit_all(points, n_boot=2), tmp_path)
    assert {name: len(xy) for name, xy in under.items()} == dict.fromkeys(under, 0)


def test_a_study_continued_across_validation_protocols_names_the_runs_of_each(tmp_path):
    """A sweep of an earlier version continued by this one: its old trials (no val_batch in
    their records, noise in batches of train.batch_size; DDPM's grid of both ends) and new ones
    measured other quantities, which the study minimised and the fits pooled, unsaid."""
    fake_sweep(tmp_path / "runs")
    paths = sorted((tmp_path / "runs").rglob("trial.json"))
    for i, path in enumerate(paths):
        rec = json.loads(path.read_text())
        rec["setup"] = {"objective.name": "ddpm"}
        if i >= 2:  # the new version's trials
            rec.update(val_batch=32, val_grid="midpoints", val_protocol_changed_at=None)
        if i == 2:  # an old trial, retried by the new version: resumed at step 40
            rec["val_protocol_changed_at"] = 40
        path.write_text(json.dumps(rec))
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report", n_boot=10)
    head = (out / "report.md").read_text().split("## Headline")[0]
    label = scaling.run_labels(pd.read_csv(out / "runs.csv"))
    old = [label[json.loads(p.read_text())["config_hash"]] for p in paths[:2]]
    assert (
        f"**Val losses of other protocols**: {', '.join(old)} (noise in batches of 32, "
        "val_grid none), against 6 runs with noise in batches of 32, val_grid midpoints" in head
    )
    resumed = label[json.loads(paths[2].read_text())["config_hash"]]
    assert f"**Resumed across validation protocols**: {resumed} (step 40)" in head
    # flow's grid has no name in either version: old trials of batch 32 measured the same
    for path in paths:
        rec = {**json.loads(path.read_text()), "val_grid": None, "val_protocol_changed_at": None}
        rec["setup"] = {"objective.name": "flow"}
        path.write_text(json.dumps(rec))
    out = scaling.build_report(tmp_path / "runs", tmp_path / "report2", n_boot=10)
    assert "protocol" not in (out / "report.md").read_text().split("## Headline")[0]
