"""`dit-bench report scaling STUDY_OR_RUNS -o reports/NAME`: scaling laws from a sweep.

Input: a sweep's runs folder (each run has `trial.json`, written by `dit_bench.sweep`), or its
Optuna study (a `study.db` file, `sqlite:///...` or `postgresql://...` URL; the trials' user
attributes hold the same records). Output in the report folder: `report.md`, seaborn figures
(PNG), the tables as CSV and Parquet (`runs`, `points`, `curves`, `fits`, `isoflop`).

Compute convention: training FLOPs C = 3 x forward FLOPs x images seen, forward FLOPs = 2 x
forward MACs (one multiply-add = 1 MAC, DiT's "Gflops" are MACs). N = parameters (the frozen
position table included), D = training tokens seen (images x patches per image: a conditioning
scheme's own tokens are no data). A run's point at a
budget is its val loss at the first step where C >= the budget; fits use that step's actual C.

Pure functions of DataFrames: nothing here imports torch or a model (fits in `fits.py`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from dit_bench.files import (
    engine_url,
    optuna_settings_kept,
    read_record,
    redact,
    sqlite_file,
    write_text_atomic,
)
from dit_bench.report import fits
from dit_bench.report.axes import agg_figure, figure_theme, readable_log_ticks
from dit_bench.report.results import files_named, read_config, save_table, val_batches

N_BOOT = 200
# The trials whose points enter the fits. A pruned trial's budgets up to its pruning are
# measurements like any other (leaving them out would fit the better configs only); a failed
# one's are not: it diverged (its last losses already on the way there) or its worker was lost
# and a retry, if any, stands for it.
FINISHED = ("COMPLETE", "PRUNED")
# The L(C) fits' intervals are labelled, not called CIs. L(C) is fitted to the envelope, the
# lowest loss over runs at each budget, and its interval comes from refits on runs resampled
# with replacement. A resample holds about 63% of the distinct runs and never a better one than
# the sweep's, so its envelope can only rise: the refits lie to one side of the estimate, which
# sits at (or near) the interval's edge. The bootstrap of a minimum is not consistent (Bickel
# and Freedman 1981), so no percentile of it is a 95% CI. A residual bootstrap of the envelope
# fit would centre an interval on the estimate, but with one point per budget it measures the
# scatter about the curve only, not the uncertainty that matters here (which runs, and how many,
# reach the frontier); so the run-resampling range stays, named for what it is: how far the law
# moves when runs are missing from the frontier.
ENVELOPE_RANGE = "runs-dropped range"
ENVELOPE_NOTE = (
    f"{ENVELOPE_RANGE}: L(C) is fitted to the envelope (the lowest loss over runs at each "
    "budget). A resample of runs can drop the best runs but never add a better one, so its "
    "envelope only rises and the refits lie to one side of the estimate: the 2.5/97.5% "
    "percentiles show how far the law moves when runs are missing from the frontier, not a 95% "
    "CI (a bootstrap of a minimum is not consistent; Bickel and Freedman 1981)."
)


def interval_kind(fit_name: str) -> str:
    """What a fit's interval is: a bootstrap CI, or (L(C), an envelope) a runs-dropped range."""
    return ENVELOPE_RANGE if fit_name.startswith("L(C)") else "95% CI"


COMPUTE_CONVENTION = (
    "training FLOPs C = 3 x forward FLOPs x images seen; forward FLOPs = 2 x forward MACs "
    "(one multiply-add = 1 MAC; DiT's 'Gflops' are forward MACs). N = parameters; D = training "
    "tokens seen = images x patches per image (a conditioning scheme's own tokens, such as "
    "in_context's time and class, are not data)."
)


# -- loading ------------------------------------------------------------------------------------
def _records_from_runs(folder: Path) -> list[dict]:
    recs = []
    for path in files_named(folder, "trial.json"):
        rec = read_record(path)
        rec["run_dir"] = str(path.parent)
        recs.append(rec)
    return recs


def pick_study(names: list[str], study: str | None, where: str) -> list[str]:
    """The one study a report is about: `study`, or the only one there is. Several sweeps (two
    profiles, two sweep files) share a storage, above all a PostgreSQL one; pooled into one fit,
    they would read as one law of different data and models."""
    if study is not None:
        if study not in names:
            raise ValueError(f"{where}: no study {study!r}; studies: {sorted(names)}")
        return [study]
    if len(names) > 1:
        raise ValueError(
            f"{where} holds {len(names)} studies {sorted(names)}: name the one to report with "
            "--study NAME"
        )
    return list(names)


class StudyTrials(list):
    """A study's trials, read with its latest sweep call's request (`Worker.record_request`:
    what the report counts trials never started against), and its running trials whose
    heartbeat is older than the sweep's grace (trial number -> seconds since it)."""

    def __init__(self, trials=()):
        super().__init__(trials)
        self.requested: dict = {}
        self.stale: dict[int, float] = {}
        self.grace: float | None = None


def stale_trials(loaded, grace: float) -> dict[int, float]:
    """Running trials of study `loaded` with no heartbeat for over `grace` seconds, by the
    database's clock (as Optuna ages them): their workers are likely gone (a machine killed),
    and they read as running until the next sweep call failed and re-queued them."""
    import sqlalchemy as sa

    engine = getattr(loaded._storage, "_backend", loaded._storage).engine
    query = (
        "SELECT t.number, h.heartbeat FROM trials t JOIN trial_heartbeats h "
        "ON h.trial_id = t.trial_id WHERE t.study_id = :study AND t.state = 'RUNNING'"
    )
    with engine.connect() as conn:
        now = conn.execute(sa.select(sa.func.now())).scalar()
        beats = conn.execute(sa.text(query), {"study": loaded._study_id}).all()

    def naive_utc(v):  # SQLite hands back text; PostgreSQL's now() is zone-aware
        v = datetime.fromisoformat(v) if isinstance(v, str) else v
        return v.astimezone(timezone.utc).replace(tzinfo=None) if v.tzinfo else v

    ages = {n: (naive_utc(now) - naive_utc(b)).total_seconds() for n, b in beats}
    return {n: age for n, age in ages.items() if age > grace}


def study_trials(url: str, study: str | None = None) -> dict[str, list]:
    """The study's trials (`study`, or the storage's only study), read once: the records and the
    unfinished-trials line of a report both come from them."""
    import optuna

    if (path := sqlite_file(url)) is not None and not path.is_file():
        raise ValueError(f"{url}: no such study file")  # optuna would create an empty one
    storage = engine_url(url)
    with optuna_settings_kept():
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            names = optuna.get_all_study_names(storage=storage)
        except Exception as e:  # not a database, an unknown dialect, a server that refuses
            raise ValueError(
                f"{redact(url)}: cannot read an Optuna study ({type(e).__name__}: {e})"
            ) from None
        studies = {}
        for name in pick_study(names, study, redact(url)):
            loaded = optuna.load_study(study_name=name, storage=storage)
            studies[name] = StudyTrials(loaded.get_trials(deepcopy=False))
            studies[name].requested = loaded.user_attrs.get("requested") or {}
            made_by = loaded.user_attrs.get("sweep") or {}
            grace = made_by.get("spec", {}).get("heartbeat", {}).get("grace")
            if grace is not None:  # a study a sweep made: its heartbeats are in the storage
                studies[name].grace = grace
                studies[name].stale = stale_trials(loaded, grace)
        return studies


def _records_from_study(
    url: str, studies: dict[str, list] | None = None, study: str | None = None
) -> list[dict]:
    """Trial records of the study (`studies`: as `study_trials(url, study)` read them)."""
    recs = []
    for name, trials in (study_trials(url, study) if studies is None else studies).items():
        for t in trials:
            if "curve" not in t.user_attrs:
                continue
            recs.append(
                {
                    **t.user_attrs,
                    "study": name,
                    "trial": t.number,
                    "trial_params": t.params,
                    "state": t.state.name,
                }
            )
    return recs


def study_url(source: str | Path) -> str | None:
    """The Optuna storage behind SOURCE: the URL or study file itself, or the `study.db` a
    sweep keeps in its runs folder (None: a runs folder without one)."""
    s = str(source)
    if "://" in s:
        return s
    path = Path(s) / "study.db" if Path(s).is_dir() else Path(s)
    return f"sqlite:///{path.resolve()}" if path.is_file() else None


def failed_for_good(trials) -> list:
    """Failed trials that no retry replaced: their points are missing from the results (an
    error in training, or a worker lost more than heartbeat.max_retry times)."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return [
        t
        for t in trials
        if t.state.name == "FAIL" and t.number not in retried and "duplicate_of" not in t.user_attrs
    ]


def never_started(trials, requested: dict | None = None) -> str:
    """What the latest sweep call asked for and no trial was made for: tpe/random slots of its
    n_trials, or grid points past its --n-trials ("" when none). A sweep stopped between
    trials left no waiting trial to tell of the rest. `requested`: the study's record of the
    latest call (`Worker.record_request`); without it (older sweeps) the latest tpe/random
    trial's n_trials, and nothing of a grid."""
    requested = requested or {}
    grid = requested.get("grid_points")
    if grid:
        made = {json.dumps(t.system_attrs.get("fixed_params"), sort_keys=True) for t in trials}
        made.discard("null")
        unmade = max(grid - len(made), 0)
        asked = requested.get("n_trials")
        if not unmade:
            return ""
        return f"{unmade} of the grid's {grid} points never started (n_trials {asked})"
    slotted = [t for t in trials if "slot" in t.user_attrs]
    asked = requested.get("n_trials")
    if asked is None:  # a call before requests were recorded: its trials name it
        if not slotted or "n_trials" not in slotted[-1].user_attrs:  # older sweeps recorded none
            return ""
        asked = slotted[-1].user_attrs["n_trials"]
    # the latest call's request: one that asked for fewer than an earlier, stopped one wants
    # no more trials, and the report counts none missing
    unmade = max(asked - len({t.user_attrs["slot"] for t in slotted}), 0)
    return f"{unmade} of n_trials {asked} never started" if unmade else ""


def unfinished_trials(url: str, studies: dict[str, list] | None = None) -> list[str]:
    """One line per study whose trials are not all done: running or waiting ones, failed ones
    that no retry replaced (their points are missing from the fits), and tpe/random trials of
    n_trials never started. `studies`: as `study_trials(url)` read them."""
    lines = []
    for name, trials in (study_trials(url) if studies is None else studies).items():
        stale = getattr(trials, "stale", {})
        left = [
            t for t in trials if t.state.name in ("RUNNING", "WAITING") and t.number not in stale
        ]
        failed = failed_for_good(trials)
        unmade = never_started(trials, getattr(trials, "requested", None))
        if left or failed or unmade or stale:
            done = sum(finished(t.state.name) for t in trials)
            parts = [f"{len(left)} running or waiting"] if left else []
            # "running" read as a live sweep until the next call: a killed machine's trial
            parts += (
                [
                    f"{len(stale)} stale (trials {sorted(stale)}: no heartbeat for "
                    f"{min(stale.values()):.0f} s or more, over heartbeat.grace {trials.grace:g} "
                    "s: their workers are likely gone; the next `dit-bench sweep` call "
                    "re-queues them)"
                ]
                if stale
                else []
            )
            parts += (
                [f"{len(failed)} failed (trials {[t.number for t in failed]})"] if failed else []
            )
            parts += [unmade] if unmade else []
            lines.append(f"study {name}: {done} trials finished; not finished: {', '.join(parts)}")
    return lines


def records_not_finished(runs: pd.DataFrame) -> list[str]:
    """The records' own line on the trials left out of the fits, where no study is at hand to
    say it (a runs folder)."""
    left_out = runs[~runs["state"].map(finished)]
    if not len(left_out):
        return []
    states = ", ".join(f"{n} {k}" for k, n in sorted(left_out["state"].value_counts().items()))
    return [f"{len(left_out)} trial(s) not finished ({states})"]


def nothing_to_fit(records: list[dict], runs: pd.DataFrame, unfinished: list[str]) -> str:
    """Why a study has no point to fit. Every trial failed (diverged: an lr too high; an error)
    read as a sweep still to come ("... at any budget yet"), naming no failure: the trials
    left out, and the first error, which the others most often share."""
    unfinished = unfinished or records_not_finished(runs)
    failed = [r for r in records if r.get("error") and not finished(r.get("state"))]
    why = f" ({'; '.join(unfinished)})" if unfinished else ""
    if not failed:  # trials still to come
        return f"no finished trial has a finite val loss at any budget yet{why}"
    first = min(failed, key=lambda r: r.get("trial") or 0)
    return (
        f"no finished trial has a finite val loss at any budget{why}; trial {first.get('trial')} "
        f"{first.get('point')}: {first['error']}"
    )


def runs_without_record(records: list[dict]) -> list[str]:
    """The run folders beside the records' runs that have no trial.json: trials still training
    (a sweep writes the record at a trial's end), or stopped before it. A runs folder whose
    study is elsewhere (--storage) tells of them by these folders only."""
    folders = {Path(r["run_dir"]).parent for r in records if r.get("run_dir")}
    return sorted(
        path.parent.name
        for folder in folders
        for path in folder.glob("*/config.yaml")
        if not (path.parent / "trial.json").is_file()
    )


def load_records(
    source: str | Path, studies: dict[str, list] | None = None, study: str | None = None
) -> list[dict]:
    """Trial records of one study: from a runs folder, a study file or a storage URL
    (`studies`: the storage's trials if already read, `study_trials(study_url(source), study)`).
    `study`: its name, needed where the source holds several."""
    s = str(source)
    source = redact(s)  # as it is shown: a storage URL's password is not
    if "://" in s:
        recs = _records_from_study(s, studies, study)
    elif Path(s).is_file():
        recs = _records_from_study(f"sqlite:///{Path(s).resolve()}", studies, study)
    elif Path(s).is_dir():
        recs = _records_from_runs(Path(s))
        names = sorted({r["study"] for r in recs if r.get("study")})
        if names:  # trial.json names its study: the same choice as in a storage
            keep = pick_study(names, study, source)
            recs = [r for r in recs if r.get("study") in keep]
        elif study is not None:
            raise ValueError(f"{source}: its trial records name no study; cannot pick {study!r}")
    else:
        raise FileNotFoundError(f"{source} is neither a runs folder, a study file nor a URL")
    if not recs:
        raise FileNotFoundError(f"no sweep trials (trial.json / trial records) in {source}")
    for r in recs:
        # records of sweeps that kept no device, nor how they validated: the run's summary.json
        # says (read once for both)
        if r.get("run_dir") and (r.get("device") is None or "val_batch" not in r):
            s = {}
            with contextlib.suppress(OSError, ValueError):
                s = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
            s = s if isinstance(s, dict) else {}
            if r.get("device") is None:
                r["device"] = s.get("device")
            if "val_batch" not in r:
                r.update({k: s[k] for k in VAL_PROTOCOL if k in s})
        if r.get("setup") is None and r.get("run_dir"):  # nor the setup: its config.yaml
            with contextlib.suppress(OSError, ValueError):
                r["setup"] = setup_of(read_config(Path(r["run_dir"])))
    # one record per run: its last attempt (a re-run trial resumes the same run), but never
    # one that did not complete in place of one that did
    by_run: dict[str, dict] = {}
    for r in recs:
        key = r.get("config_hash") or r.get("run_dir")
        old = by_run.get(key)
        if old is None or r.get("state") == "COMPLETE" or old.get("state") != "COMPLETE":
            by_run[key] = r
    return list(by_run.values())


def finished(state: str | None) -> bool:
    """Whether a trial's points go into the fits (a record without a state: an older one)."""
    return (state or "COMPLETE") in FINISHED


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def data_tokens(r: dict) -> int:
    """Tokens of data in one image: its patches. A record's `tokens` is the sequence the
    attention sees, which also holds a conditioning scheme's own tokens (in_context DiT and
    U-ViT: time and class; MMDiT: the label context). Counted as data, D grew with them by a
    factor that depends on the patch (1.5 at patch 8 of a 16x16 image, 1.03 at patch 2), which
    bends L(N, D)'s data exponent. Without a patch (the U-Net): `tokens` as recorded."""
    patch, side = r.get("patch"), r.get("image_size")
    if patch and side:
        return (side // patch) ** 2
    return r.get("tokens") or 1


# A run's point at a budget is the val loss at the step that crosses it, which overshoots the
# budget: from three steps on by at most 1.5x, without bound where one step passes the budget.
# The envelope and L(N, D) place a point at its own compute and tokens; an IsoFLOP slice places
# it at the budget, so a point beyond this factor is left out of the slices (a U-Net at batch
# 16 stood in the slice of 1e9 with its first step's 1.15e11 FLOPs), and the report says so.
BUDGET_OVERSHOOT = 1.5


def overshot(points: pd.DataFrame) -> pd.Series:
    """Points whose compute exceeds their budget by more than BUDGET_OVERSHOOT."""
    return points["train_flops"] > BUDGET_OVERSHOOT * points["budget"]


# A run whose val loss at a budget is this many times the lowest there has diverged (an lr far
# too high): sizes and token counts at one compute differ by a few times, not a hundred.
DIVERGED = 100.0


def diverged_at(points: pd.DataFrame) -> pd.Series:
    """Run -> the first budget at which it diverged (DIVERGED). Such a run, left to train, most
    often ends non-finite and fails, out of the fits; pruned first (a median pruner stops it at
    its first budget), its finite 3.6e17 entered them and stretched every log plot's axis."""
    if points.empty:
        return pd.Series(dtype=float)
    best = points.groupby("budget")["val_loss"].transform("min")
    return points[points["val_loss"] > DIVERGED * best].groupby("run")["budget"].min()


def point_labels(point: str | None) -> dict[str, str]:
    """A trial's `point` ("size=S,backbone.patch_size=4,optim.lr=0.001") as {name: value}."""
    return dict(kv.split("=", 1) for kv in (point or "").split(",") if "=" in kv)


def tables(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(runs, points, curves): one row per run; per run and budget; per run and val step.
    Every run is in `runs` with its state; `points` and `curves` (what the fits and figures
    use) hold the finished trials' finite losses only."""
    runs, points, curves = [], [], []
    for r in records:
        labels = r.get("trial_params") or point_labels(r.get("point"))
        size = labels.get("size") or f"d{r['depth']}-w{r['width']}"
        run = r["config_hash"]
        timing = r.get("timing") or {}
        base = {
            "study": r.get("study"),
            "run": run,
            "size": size,
            "patch": r.get("patch"),
            "image_size": r.get("image_size"),
            "params": r["params"],
        }
        runs.append(
            {
                **base,
                # DESIGN's results-table key. Not the backbone's name: that is the preset the
                # trial's sizes and patch override (every cpu-profile trial is "dit-xs/4"), and
                # the columns below name the model; a searched backbone.name is in `point`
                "experiment": r.get("experiment"),
                "point": r.get("point"),
                "trial": r.get("trial"),
                "attempt": r.get("attempt"),  # a retry's timings cover the rest of its run only
                "state": r.get("state"),
                "depth": r.get("depth"),
                "width": r.get("width"),
                "heads": r.get("heads"),
                "tokens": r.get("tokens"),
                "macs": r.get("macs"),
                "flops": r.get("flops"),
                "batch_size": r.get("batch_size"),
                "steps": r.get("steps"),  # planned: a pruned or failed run stops short
                # its last validated step: where a pruned run stopped (its last budget)
                "steps_reached": max((c["step"] for c in r.get("curve") or []), default=None),
                "images": r.get("images"),
                "train_flops": r.get("train_flops"),
                "val_loss": r.get("val_loss"),
                **{k: v for k, v in r.items() if k.startswith(("val_FD-", "val_FID"))},
                "device": r.get("device"),
                **{k: r.get(k) for k in VAL_PROTOCOL},
                **{f"cfg.{k}": v for k, v in _setup(r).items()},
                **{f"time_{k}": v for k, v in timing.items()},
                "run_dir": r.get("run_dir"),
            }
        )
        if not finished(r.get("state")):
            continue
        fwd, batch, tokens = r["flops"], r["batch_size"], data_tokens(r)
        for budget, step, loss in zip(
            r["budgets"], r["budget_steps"], r["val_at_budget"], strict=True
        ):
            if not _finite(loss):  # not reached (None), or diverged there
                continue
            images = step * batch
            points.append(
                {
                    **base,
                    "macs": r.get("macs"),
                    "tokens": tokens,
                    "budget": float(budget),
                    "step": step,
                    "images": images,
                    "tokens_seen": images * tokens,
                    "train_flops": 3.0 * fwd * images,
                    "val_loss": float(loss),
                }
            )
        curves += [{**base, **c} for c in r.get("curve") or [] if _finite(c.get("val_loss"))]

    # In the runs' order, not the records': a runs folder lists them by directory name, a study
    # by trial number, and the report of one sweep must not depend on which source it read (the
    # bootstrap draws runs by position; the L(N, D) optimiser sums residuals in row order).
    def by_run(rows: list[dict], *keys: str) -> pd.DataFrame:
        df = pd.DataFrame(rows)
        return df.sort_values(["run", *keys], kind="stable").reset_index(drop=True) if rows else df

    # Measurements that may be null in every record (only a worker's first trial records the
    # worker's start time: a folder of later trials has none; every trial pruned: no final loss)
    # are floats still: as parquet's null type, reading runs.parquet with another report's
    # failed (pyarrow casts no double to null).
    runs = by_run(runs)
    measured = ("val_loss", "steps_reached", "time_", "val_FD-", "val_FID")
    runs = runs.astype({c: float for c in runs if c.startswith(measured) and runs[c].isna().all()})
    # the cfg.* columns too: a setting null in every record (no setup recorded) is of its type
    runs = runs.astype({f"cfg.{k}": t for k, _, t in SETUP_KEYS if f"cfg.{k}" in runs})
    runs = runs.astype({k: t for k, t in VAL_PROTOCOL.items() if k in runs})
    points, curves = by_run(points, "budget"), by_run(curves, "step")
    # a diverged run is left out whole, as one that failed non-finite is; the runs table says so
    gone = diverged_at(points)
    if "run" in runs:  # (no records: no columns)
        runs["diverged_at"] = runs["run"].map(gone).astype(float)
    if len(gone):
        points = points[~points["run"].isin(gone.index)].reset_index(drop=True)
        curves = curves[~curves["run"].isin(gone.index)].reset_index(drop=True)
    return runs, points, curves


# -- the fits ---------------------------------------------------------------------------------------
def _envelope_fit(points: pd.DataFrame, name: str) -> fits.Fit:
    env = fits.envelope(points)
    if env["run"].nunique() < 2:  # one run best at every budget: its own learning curve
        why = (
            f"{env['run'].nunique()} run on the frontier: its learning curve, not a frontier "
            "over models (a wider budget range, or more sizes)"
        )
        return fits.Fit(name, fits.POWER_FORMULA, {}, "insufficient data", why, len(env))
    return fits.fit_power_law(env["train_flops"], env["val_loss"], name=name)


def _isoflop_points(points: pd.DataFrame) -> pd.DataFrame:
    # per (budget, size): the best patch (the compute-optimal token count for that size),
    # among the points that spent about that budget
    points = points[~overshot(points)]
    idx = points.groupby(["budget", "size"])["val_loss"].idxmin()
    return points.loc[idx]


def _chinchilla(points: pd.DataFrame, name: str, warm: fits.Fit | None = None) -> fits.Fit:
    starts = None
    if warm is not None and hasattr(warm, "_raw"):
        raw = warm._raw
        starts = [
            raw,
            raw + np.array([0.5, 0.5, 0.0, 0.1, 0.1]),
            raw - np.array([0.5, 0.5, 0.1, 0.1, 0.1]),
        ]
    return fits.fit_chinchilla(
        points["params"], points["tokens_seen"], points["val_loss"], name=name, starts=starts
    )


def _single_run_sizes(points: pd.DataFrame) -> str:
    """Why an IsoFLOP fit gets no bootstrap interval ("" when it can have one): a size with one
    run. A resample without that run (a third of them) fits the parabolas through the other
    sizes, another design rather than another draw of this one; with one run of every size (a
    grid sweep's per-patch profile) the refits are the fit and its leave-sizes-out variants, a
    handful of values. On synthetic sweeps shaped like sweeps/shapes-scaling.yaml (4 sizes, 6
    budgets, 1% noise) their 2.5/97.5% percentiles covered the true exponent in 71% of draws,
    80% with half the noise a per-run offset. No interval from one run per size sees such
    offsets: they move every budget's vertex together, tilting the line of N* without
    scattering it (with offsets alone, a t-interval from that scatter covered 9% of draws).
    Replicate runs (seeds) of each size can."""
    runs = points.groupby("size")["run"].nunique()
    alone = [str(s) for s, k in runs.items() if k < 2]
    return (
        f"one run of size {', '.join(alone)}: no resampling of runs keeps its sizes"
        if alone
        else ""
    )


def fit_all(points: pd.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Every fit of the report, with bootstrap CIs (over runs) and held-out checks."""
    out: dict = {"fits": [], "isoflop": {}, "heldout": [], "n_boot": n_boot}
    cmax = points["budget"].max()
    inner = points[points["budget"] < cmax]

    def add(fit, refit, no_ci=""):
        if fit.status == "insufficient data":
            out["fits"].append(fit)
            return fit
        if no_ci:
            fit = fits.with_ci(fit, {}, math.nan, no_ci)
        else:
            ci, ok = fits.bootstrap(points_for[fit.name], refit, n_boot=n_boot, seed=seed)
            fit = fits.with_ci(fit, ci, ok)
        out["fits"].append(fit)
        return fit

    points_for: dict[str, pd.DataFrame] = {}
    # L(C), overall and per patch
    groups = [("all", points)] + [(f"patch {p}", g) for p, g in points.groupby("patch")]
    for label, g in groups:
        name = f"L(C) {label}"
        points_for[name] = g
        fit = add(_envelope_fit(g, name), lambda d, n=name: _envelope_fit(d, n))
        if label == "all":
            held = _envelope_fit(g[g["budget"] < cmax], name + " without the largest budget")
            env = fits.envelope(g)
            last = env[env["budget"] == cmax]
            if held.ok and len(last):
                pred = float(held.predict(last["train_flops"].iloc[0]))
                act = float(last["val_loss"].iloc[0])
                out["heldout"].append(
                    {
                        "fit": name,
                        "budget": cmax,
                        "predicted": pred,
                        "actual": act,
                        "rel_error": pred / act - 1,
                    }
                )
            else:
                out["heldout"].append({"fit": name, "budget": cmax, "note": held.status})
            out["envelope_fit"] = fit
    # L(N, D)
    name = "L(N, D) all"
    points_for[name] = points
    full = _chinchilla(points, name)  # its warm start (_raw) is not carried by `add`'s copy
    out["chinchilla"] = add(full, lambda d: _chinchilla(d, name, warm=full))
    held = _chinchilla(inner, name + " without the largest budget", warm=full)
    last = points[points["budget"] == cmax]
    if held.ok and len(last):
        pred = held.predict(last["params"], last["tokens_seen"])
        err = pred / last["val_loss"].to_numpy() - 1
        out["heldout"].append(
            {
                "fit": name,
                "budget": cmax,
                "predicted": float(np.mean(pred)),
                "actual": float(last["val_loss"].mean()),
                "rel_error": float(np.mean(np.abs(err))),
                "note": f"mean |relative error| over {len(last)} runs",
            }
        )
        out["chinchilla_heldout"] = held
    else:
        out["heldout"].append({"fit": name, "budget": cmax, "note": held.status})
    # IsoFLOP: overall (best patch per size) and per patch
    # "all" picks each size's best patch from the runs it is given: each bootstrap refit picks
    # again from its resample, so the interval counts that choice's uncertainty too
    # per patch too: each size's best run of the patch (a tpe sweep's lr, another resolution)
    iso_groups = [("all", points, _isoflop_points)] + [
        (f"patch {p}", g, _isoflop_points) for p, g in points.groupby("patch")
    ]
    for label, g, pick in iso_groups:
        name = f"N*(C) {label}"
        iso = fits.fit_isoflop(pick(g), name=name)
        points_for[name] = g

        def refit(d: pd.DataFrame, n: str = name, pick=pick) -> fits.Fit:
            return fits.fit_isoflop(pick(d), name=n).fit

        iso = fits.IsoFlop(add(iso.fit, refit, _single_run_sizes(g)), iso.vertices)
        out["isoflop"][label] = iso
        if label == "all":
            h = fits.fit_isoflop(pick(g[g["budget"] < cmax]), name=name + " held out")
            v = iso.vertices[iso.vertices["budget"] == cmax]
            if h.fit.ok and len(v) and bool(v["valid"].iloc[0]):
                pred, act = float(h.fit.predict(cmax)), float(v["n_opt"].iloc[0])
                out["heldout"].append(
                    {
                        "fit": name,
                        "budget": cmax,
                        "predicted": pred,
                        "actual": act,
                        "rel_error": pred / act - 1,
                        "note": "N* from the parabola at that budget",
                    }
                )
            else:
                why = h.fit.status if not h.fit.ok else "no interior minimum at the largest budget"
                out["heldout"].append({"fit": name, "budget": cmax, "note": why})
    return out


# A text column that keeps a missing value missing: pandas 3's "str" does; on pandas 2 "str" is
# str() of each value (a fit without parameters had param 'None', an unrecorded setup 'None'),
# and its nullable text type is "string".
TEXT = "str" if int(pd.__version__.split(".")[0]) >= 3 else "string"

# fits.csv/.parquet's columns and types, whatever the fits: a report where no fit had enough
# points (a first look at a small sweep) wrote its value and interval columns as parquet's null
# type and left out cond, starts_at_best and bootstrap_ok, so reading it with another report's
# (pd.read_parquet of both, a pyarrow dataset) failed on the cast from string to null.
FITS_COLUMNS = {
    "fit": TEXT,
    "formula": TEXT,
    "param": TEXT,
    "value": float,
    "ci_low": float,
    "ci_high": float,
    "ci_kind": TEXT,
    "status": TEXT,
    "detail": TEXT,
    "n_points": int,
    "cond": float,
    "starts_at_best": TEXT,
    "bootstrap_ok": float,
}


def fits_table(fit_list: list[fits.Fit]) -> pd.DataFrame:
    rows = []
    for f in fit_list:
        if not f.params:
            rows.append(
                {
                    "fit": f.name,
                    "formula": f.formula,
                    "param": None,
                    "value": None,
                    "ci_low": None,
                    "ci_high": None,
                    "status": f.status,
                    "detail": f.detail,
                    "n_points": f.n_points,
                    "ci_kind": interval_kind(f.name),
                }
            )
        for k, v in f.params.items():
            lo, hi = f.ci.get(k, (math.nan, math.nan))
            rows.append(
                {
                    "fit": f.name,
                    "formula": f.formula,
                    "param": k,
                    "value": v,
                    "ci_low": lo,
                    "ci_high": hi,
                    "ci_kind": interval_kind(f.name),
                    "status": f.status,
                    "detail": f.detail,
                    "n_points": f.n_points,
                    "cond": f.cond,
                    "starts_at_best": f"{f.starts_at_best}/{f.starts}",
                    "bootstrap_ok": f.boot_ok,
                }
            )
    return pd.DataFrame(rows, columns=list(FITS_COLUMNS)).astype(FITS_COLUMNS)


# -- figures ------------------------------------------------------------------------------------------
def _size_order(runs: pd.DataFrame) -> list[str]:
    return list(runs.groupby("size")["params"].mean().sort_values().index)


def _token_axis(points: pd.DataFrame) -> str:
    """What the figures' markers tell apart: the patch, as DiT's figures do. A U-Net has no
    patch, and seaborn leaves out every point whose style is missing: its figures were empty.
    Runs at several resolutions of one patch have other token counts (and other data) under one
    marker: their marker names the resolution too."""
    if points["patch"].isna().all():
        return "resolution"
    if points["patch"].isna().any() or points["image_size"].nunique() > 1:
        return "patch @ resolution"
    return "patch"


def _with_token_axis(frame: pd.DataFrame, axis: str) -> pd.DataFrame:
    if axis == "patch":
        return frame
    side = frame["image_size"].map(lambda s: "?" if pd.isna(s) else f"{int(s)} px")
    if axis == "resolution":
        return frame.assign(**{axis: side})
    patch = frame["patch"].map(lambda p: "-" if pd.isna(p) else f"/{p:g}")
    return frame.assign(**{axis: patch + " @ " + side})


@figure_theme()
def figures(runs, points, curves, result, out: Path) -> list[str]:
    import matplotlib
    import seaborn as sns

    order = _size_order(runs)
    marker = _token_axis(points)
    points, curves = _with_token_axis(points, marker), _with_token_axis(curves, marker)
    patches = sorted(points[marker].unique())
    # one encoding for every figure: a size keeps its colour and a patch its marker throughout
    by_size_patch = dict(
        hue="size", hue_order=order, style=marker, style_order=patches, palette="viridis"
    )
    made = []

    # 1. loss vs training FLOPs, coloured by size, styled by patch (DiT Figs. 6, 8)
    fig = agg_figure(figsize=(10, 5))  # the legend beside the panel takes 2.5 inches
    ax = fig.subplots()
    sns.lineplot(
        data=curves,
        x="train_flops",
        y="val_loss",
        **by_size_patch,
        units="run",
        estimator=None,
        ax=ax,
        alpha=0.35,
        legend=False,
    )
    sns.scatterplot(
        data=points,
        x="train_flops",
        y="val_loss",
        **by_size_patch,
        s=45,
        ax=ax,
    )
    f = result.get("envelope_fit")
    if f is not None and f.ok:
        c = np.geomspace(points["train_flops"].min(), points["train_flops"].max(), 100)
        ax.plot(
            c, f.predict(c), "k--", lw=1.5, label=f"envelope fit: E + A C^-{f.params['alpha']:.3f}"
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs C (3 x forward x images)",
        ylabel="val loss",
        title=f"Loss vs training compute (colour: size, marker: {marker})",
    )
    # beside the panel: inside, ten sizes' entries covered the small models' curves
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    readable_log_ticks(fig)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_flops.png", dpi=130)
    made.append("loss_vs_flops.png")

    # 2. loss vs forward MACs per image, at each budget (DiT Fig. 8 style)
    fig = agg_figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2)
    last = points.loc[points.groupby("run")["budget"].idxmax()]
    sns.scatterplot(
        data=last,
        x="macs",
        y="val_loss",
        **by_size_patch,
        s=70,
        ax=axes[0],
    )
    axes[0].set(
        xscale="log",
        xlabel="forward MACs per image",
        ylabel="val loss at its last budget",
        title="Final loss vs model compute",
    )
    sns.lineplot(
        data=points,
        x="macs",
        y="val_loss",
        hue="budget",
        palette="rocket_r",
        hue_norm=matplotlib.colors.LogNorm(),
        marker="o",
        estimator=None,
        units="budget",
        sort=True,
        ax=axes[1],
        # every budget: a brief legend of the log colour scale names decades, not the lines
        legend="full",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="forward MACs per image",
        ylabel="val loss",
        title="Loss vs forward MACs at each budget",
    )
    for text in axes[1].get_legend().get_texts():  # as the tables write budgets, not 1e10 digits
        text.set_text(f"{float(text.get_text()):.3g}")
    axes[1].get_legend().set_title("budget C")
    for ax in axes:  # beside the panel: inside, it covered the lines of the large models
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    readable_log_ticks(fig)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_macs.png", dpi=130)
    made.append("loss_vs_macs.png")

    # 3. IsoFLOP profiles and the frontier N*(C)
    iso = result["isoflop"]["all"]
    g = _isoflop_points(points)
    fig = agg_figure(figsize=(12, 4.5))  # 1 inch of it the budgets legend's
    axes = fig.subplots(1, 2)
    pal = sns.color_palette("rocket_r", n_colors=g["budget"].nunique())
    for color, (budget, gb) in zip(pal, g.groupby("budget"), strict=True):
        axes[0].scatter(gb["params"], gb["val_loss"], color=color, label=f"{budget:.2g}")
        v = iso.vertices[iso.vertices["budget"] == budget].iloc[0]
        if np.isfinite(v["c2"]):
            ln = np.linspace(np.log10(gb["params"].min()), np.log10(gb["params"].max()), 50)
            axes[0].plot(10**ln, v["c2"] * ln**2 + v["c1"] * ln + v["c0"], color=color, lw=1)
        if v["valid"]:
            axes[0].axvline(v["n_opt"], color=color, ls=":", lw=0.8)
    axes[0].set(
        xscale="log",
        xlabel="parameters N",
        ylabel="val loss (best patch per size)",
        title="IsoFLOP profiles (parabola in log N)",
    )
    # beside the panel: inside, it covered a profile and a point of the largest size
    axes[0].legend(title="budget C", fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ok = iso.vertices[iso.vertices["valid"]]
    axes[1].scatter(ok["budget"], ok["n_opt"], color="k", label="parabola minimum")
    if iso.fit.ok:
        cc = np.geomspace(points["budget"].min(), points["budget"].max(), 50)
        axes[1].plot(cc, iso.fit.predict(cc), "k--", label=f"N* = k C^{iso.fit.params['a']:.3f}")
    if len(ok):
        axes[1].set(xscale="log", yscale="log")
        axes[1].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "no budget with an interior minimum", ha="center",
                     transform=axes[1].transAxes)  # fmt: skip
    axes[1].set(xlabel="training FLOPs C", ylabel="N*(C)", title="Compute-optimal size")
    readable_log_ticks(fig)
    fig.tight_layout()
    fig.savefig(out / "isoflop.png", dpi=130)
    made.append("isoflop.png")

    # 4. predicted vs actual: L(N, D) in-sample and held out; the envelope fit
    fig = agg_figure(figsize=(13, 4.5))  # 2 inches of it the fits' legend
    axes = fig.subplots(1, 2)
    ch, held = result.get("chinchilla"), result.get("chinchilla_heldout")
    cmax = points["budget"].max()
    if ch is not None and ch.predict is not None:
        pp = points.assign(
            predicted=ch.predict(points["params"], points["tokens_seen"]), fit="all budgets"
        )
        parts = [pp]
        if held is not None:
            hp = points.assign(
                predicted=held.predict(points["params"], points["tokens_seen"]),
                fit=np.where(
                    points["budget"] == cmax, "held out (largest budget)", "fit without it"
                ),
            )
            parts.append(hp)
        sns.scatterplot(
            data=pd.concat(parts),
            x="val_loss",
            y="predicted",
            hue="fit",
            style=marker,
            ax=axes[0],
            s=35,
        )
        lo, hi = points["val_loss"].min() * 0.95, points["val_loss"].max() * 1.05
        axes[0].plot([lo, hi], [lo, hi], "k:", lw=1)
        axes[0].set(
            xscale="log",
            yscale="log",
            title=f"{ch.formula} [{ch.status}]",
            xlabel="actual val loss",
            ylabel="predicted",
        )
        # beside the panel: inside, the fits' and patches' entries covered points near the
        # diagonal
        sns.move_legend(axes[0], "upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    elif ch is not None:  # an empty 0..1 frame beside the envelope's said nothing of why
        axes[0].text(0.5, 0.5, "not fitted:\n" + textwrap.fill(ch.detail, 40), ha="center",
                     va="center", transform=axes[0].transAxes)  # fmt: skip
        axes[0].set(title=f"{ch.formula} [{ch.status}]", xticks=[], yticks=[])
    env = fits.envelope(points)
    f = result.get("envelope_fit")
    axes[1].scatter(env["train_flops"], env["val_loss"], color="k", label="envelope (best run)")
    if f is not None and f.predict is not None:
        cc = np.geomspace(env["train_flops"].min(), env["train_flops"].max(), 100)
        axes[1].plot(cc, f.predict(cc), "k--", label=f"fit [{f.status}]")
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs C",
        ylabel="val loss",
        # a fit not made (one run on the frontier) is named, as the L(N, D) panel's
        title="Loss-compute envelope: fit vs actual"
        + (f" [{f.status}]" if f is not None and f.predict is None else ""),
    )
    axes[1].legend(fontsize=8)
    readable_log_ticks(fig)
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_actual.png", dpi=130)
    made.append("predicted_vs_actual.png")
    return made


# -- report.md ----------------------------------------------------------------------------------------
def _num(v, fmt=".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def _fit_rows(fit_list: list[fits.Fit]) -> list[str]:
    lines = [
        "| fit | parameter | value | 95% CI (bootstrap over runs; L(C): "
        f"{ENVELOPE_RANGE}) | status | check |",
        "|---|---|---|---|---|---|",
    ]
    for f in fit_list:
        check = (
            (
                f"cond {f.cond:.2g}, {f.starts_at_best}/{f.starts} starts at best, "
                + (
                    f"{_num(100 * f.boot_ok, '.0f')}% bootstrap refits ok"
                    + (
                        f" (under {fits.MIN_BOOTSTRAP_OK:.0%}: no interval)"
                        if f.boot_ok < fits.MIN_BOOTSTRAP_OK
                        else ""
                    )
                    if math.isfinite(f.boot_ok)
                    else f"no bootstrap ({f.ci_why or f'fewer than {fits.MIN_BOOTSTRAP_RUNS} runs'})"
                )
            )
            if f.params
            else f.detail
        )
        if not f.ok:
            lines.append(f"| {f.name} | - | **{f.status}** | - | {f.status} | {f.detail} |")
            continue
        for k, v in f.params.items():
            lo, hi = f.ci.get(k, (math.nan, math.nan))
            lines.append(
                f"| {f.name} | {k} | {_num(v)} | [{_num(lo)}, {_num(hi)}] | {f.status} | {check} |"
            )
    return lines


def overhead_summary(runs: pd.DataFrame) -> dict:
    t = runs.dropna(subset=["time_wall_s"]) if "time_wall_s" in runs else runs.iloc[0:0]
    if "attempt" in t:  # a retried trial resumed its run midway: its times cover the rest only
        t = t[t["attempt"].fillna(1) <= 1]
    if t.empty:
        return {}
    out = {
        "trials": len(t),
        "wall_median_s": float(t["time_wall_s"].median()),
        "train_steps_median_s": float(t["time_train_steps_s"].median()),
        "overhead_median_s": float(t["time_overhead_s"].median()),
        "overhead_max_s": float(t["time_overhead_s"].max()),
        "overhead_excl_val_median_s": float(t["time_overhead_excl_val_s"].median()),
        "budget_val_median_s": float(t["time_budget_val_s"].median()),
        "overhead_fraction_median": float((t["time_overhead_s"] / t["time_wall_s"]).median()),
        "worker_start_s": [float(v) for v in t.get("time_worker_start_s", pd.Series()).dropna()],
    }
    if "time_harness_s" in t:
        out["loop_median_s"] = float(t["time_train_loop_s"].median())
        out["harness_median_s"] = float(t["time_harness_s"].median())
        out["harness_max_s"] = float(t["time_harness_s"].max())
        out["harness_fraction_median"] = float((t["time_harness_s"] / t["time_wall_s"]).median())
    return out


def _steps(r) -> str:
    """A run's steps: planned, or for one that stopped short (pruned, failed) how far it got."""
    reached = getattr(r, "steps_reached", None)
    if r.state != "COMPLETE" and reached is not None and math.isfinite(reached):
        if reached < r.steps:
            return f"{int(reached)} of {r.steps}"
    return str(r.steps)


# What the runs were, beyond the size and patch the sweep varies: without it a report does not
# say which objective, conditioning, data or seed its losses are of. (config key, as shown)
SETUP_KEYS = (
    ("data.name", "data", TEXT),
    ("data.image_size", "image size", "Int64"),
    ("objective.name", "objective", TEXT),
    ("objective.prediction", "prediction", TEXT),
    ("backbone.conditioning", "conditioning", TEXT),
    ("seed", "seed", "Int64"),
    ("train.batch_size", "batch", "Int64"),
    ("optim.lr", "lr", float),
    ("train.precision", "precision", TEXT),
)  # (config key, as shown, its column's type: nullable, an older record may name none)


# summary.json's record of how a run validated (absent in runs of earlier versions), and its
# column's type in the runs table: nullable, as in a study continued by a later version
VAL_PROTOCOL = {"val_batch": "Int64", "val_grid": TEXT, "val_protocol_changed_at": "Int64"}


def _setup(r: dict) -> dict:
    """A record's SETUP_KEYS values; the image size the runs trained at where the config left
    it to the data set (null: its native size, which "image size None" did not say)."""
    setup = {k: (r.get("setup") or {}).get(k) for k, _, _ in SETUP_KEYS}
    if r.get("setup") and setup["data.image_size"] is None:
        setup["data.image_size"] = r.get("image_size")
    return setup


def setup_of(config: dict) -> dict:
    """SETUP_KEYS' values of a resolved config (config.yaml, ExperimentConfig.to_dict())."""
    out = {}
    for key, _, _ in SETUP_KEYS:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return out


def setup_line(runs: pd.DataFrame) -> str:
    """The setup every run shares, and each setting that differs with its runs per value."""
    columns = [f"cfg.{k}" for k, _, _ in SETUP_KEYS]
    known = runs[columns].notna().any(axis=1) if set(columns) <= set(runs) else runs.index < 0
    if not known.any():
        return "not recorded (no trial record or config.yaml at hand names it)"
    parts = []
    for key, shown, _ in SETUP_KEYS:
        # a column with a run not recorded is of floats: 16.0 is the image size 16
        counts = runs.loc[known, f"cfg.{key}"].map(_setting).value_counts(sort=False)
        if len(counts) == 1:
            parts.append(f"{shown} {counts.index[0]}")
        else:
            each = ", ".join(f"{v} ({_runs(n)})" for v, n in sorted(counts.items()))
            parts.append(f"{shown} **differs**: {each}")
    missing = int((~known).sum())
    return "; ".join(parts) + (f" (not recorded for {_runs(missing)})" if missing else "")


def _setting(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


def devices_line(runs: pd.DataFrame) -> str:
    """The devices the runs trained on, with how many runs each: the losses and the overhead
    timings are of these machines."""
    devices = runs.get("device", pd.Series(index=runs.index, dtype=object))
    counts = devices.fillna("not recorded").value_counts()
    return "; ".join(f"{d} ({_runs(n)})" for d, n in sorted(counts.items()))


def _run_name(size, patch) -> str:
    """S/4 for a DiT, S for a U-Net (no patch)."""
    return f"{size}/{patch:g}" if pd.notna(patch) else str(size)


def run_labels(runs: pd.DataFrame) -> dict[str, str]:
    """Run -> its name in the report's lines: S/4, and its other parameters where runs of one
    size and patch differ in them (a sweep over optim.lr: "Not at every budget: S/4 (8e+10);
    S/4 (8e+10)" named neither run)."""
    names = {r.run: _run_name(r.size, r.patch) for r in runs.itertuples()}
    repeated = {n for n, k in collections.Counter(names.values()).items() if k > 1}
    points = runs.set_index("run")["point"] if "point" in runs else {}
    for run, name in names.items():
        if name in repeated and (others := _other_parameters(points.get(run))):
            names[run] = f"{name} {others}"
    return names


def frontier_runs(points: pd.DataFrame, runs: pd.DataFrame | None = None) -> str:
    """Which runs make the loss-compute envelope, and a warning where one run holds most of its
    budgets: L(C) is then mostly that run's learning curve (its loss against its own steps),
    and its alpha no exponent of compute across models, however good the fit's checks.
    `runs`: the runs table, whose points name the runs of one size and patch apart."""
    if not {"run", "size", "patch", "val_loss"} <= set(points):  # a table of budgets only
        return ""
    env = fits.envelope(points)
    if env.empty:
        return ""
    label = run_labels(points.drop_duplicates("run") if runs is None else runs)
    counts = env["run"].value_counts()
    text = f" Envelope of {len(counts)} run(s): " + ", ".join(
        f"{label[r]} at {k} of {len(env)} budgets" for r, k in counts.items()
    )
    if counts.iloc[0] > len(env) / 2:
        most = "mostly" if len(counts) > 1 else "entirely"
        text += (
            f"; {most} {label[counts.index[0]]}'s learning curve, so alpha says how that run's "
            "loss falls with its steps more than how the best loss falls with compute across "
            "models (more sizes, or a wider budget range, widen the frontier)"
        )
    return text + "."


def short_runs(runs: pd.DataFrame, points: pd.DataFrame) -> str:
    """The finished runs without a point at some budget (the sweep's max_steps stopped them
    first, or the loss there was not finite): the envelope and the IsoFLOP slices at those
    budgets hold fewer runs than the "N runs" of the report's first line."""
    if "run" not in points or "run" not in runs:
        return ""
    budgets = sorted(points["budget"].unique())
    have = points.groupby("run")["budget"].agg(set)
    short, label = [], run_labels(runs)
    kept = runs["state"].map(finished)
    if "diverged_at" in runs:  # left out whole: the Diverged line names it
        kept &= runs["diverged_at"].isna()
    for r in runs[kept].itertuples():
        lacking = [b for b in budgets if b not in have.get(r.run, set())]
        if lacking:
            lacks = ", ".join(f"{b:.3g}" for b in lacking)
            short.append(f"{label[r.run]} ({lacks})")
    if not short:
        return ""
    return (
        f"Not at every budget: {'; '.join(short)}: no point there (pruned, or its steps stop "
        "before the budget, as the sweep's max_steps caps them, or its loss there is not "
        "finite), so the envelope and the IsoFLOP slices at those budgets leave the run out."
    )


def _other_parameters(point) -> str:
    """A trial's parameters beside its size and patch (a tpe sweep's lr, a seed axis): without
    them the runs table listed one size and patch several times over, telling nothing apart."""
    out = []
    for key, value in point_labels(point).items():
        if key in ("size", "backbone.patch_size"):
            continue
        try:
            value = f"{float(value):.3g}" if "." in value or "e" in value else value
        except ValueError:
            pass
        out.append(f"{key}={value}")
    return ", ".join(out)


def val_protocols(runs: pd.DataFrame) -> str:
    """The runs whose val losses were measured otherwise than the others' (a study continued by
    a later version: trials of an earlier one record no val_batch, and drew the noise in
    batches of train.batch_size on DDPM's grid of both ends), and those resumed across two
    protocols: the study minimised, and the fits pool, other quantities."""
    if "run" not in runs or "val_batch" not in runs:
        return ""
    label = run_labels(runs)
    batch = val_batches(runs).map(_setting)
    # flow's grid has no name, in either version: batch 32 is the same measurement there
    protocol = "noise in batches of " + batch + ", val_grid " + runs["val_grid"].fillna("none")
    lines = []
    if protocol.nunique() > 1:
        groups = runs.groupby(protocol, sort=False)["run"].agg(list)
        groups = groups.loc[groups.map(len).sort_values(ascending=False, kind="stable").index]
        most, *others = groups.items()
        named = "; ".join(f"{', '.join(label[r] for r in rs)} ({p})" for p, rs in others)
        lines.append(
            f"**Val losses of other protocols**: {named}, against {_runs(len(most[1]))} with "
            f"{most[0]} (summary.json's val_batch and val_grid; none recorded: a trial of an "
            "earlier version, whose batch was train.batch_size). Their val losses are other "
            "quantities: the study minimised, and the fits below pool, both; report each "
            "protocol's runs apart (rerun the others' trials in a new study) where that matters."
        )
    if "val_protocol_changed_at" in runs and runs["val_protocol_changed_at"].notna().any():
        changed = runs[runs["val_protocol_changed_at"].notna()]
        named = "; ".join(
            f"{label[r.run]} (step {r.val_protocol_changed_at:.0f})" for r in changed.itertuples()
        )
        lines.append(
            f"**Resumed across validation protocols**: {named}, a trial of an earlier version "
            "resumed by a later one: its curve and budget points up to that step are of the "
            "earlier protocol, after it of its summary's."
        )
    return " ".join(lines)


def diverged_runs(runs: pd.DataFrame) -> str:
    """The runs `tables` left out as diverged, and where."""
    gone = runs[runs["diverged_at"].notna()] if "diverged_at" in runs else runs.iloc[:0]
    if gone.empty:
        return ""
    label = run_labels(runs)
    named = "; ".join(f"{label[r.run]} (at {r.diverged_at:.3g})" for r in gone.itertuples())
    return (
        f"Diverged: {named}: a val loss over {DIVERGED:g}x the lowest at that budget. Left out "
        "of the fits and figures, as a run whose loss ends non-finite is (it fails); a pruner "
        "stopped this one while its loss was still finite."
    )


def write_report(source, runs, points, result, figs, out: Path, unfinished=(), pending=()) -> str:
    ft = result["fits"]
    env, ch = result.get("envelope_fit"), result.get("chinchilla")
    iso = result["isoflop"]["all"].fit
    o = overhead_summary(runs)
    several = "device" in runs and runs["device"].nunique(dropna=False) > 1  # which ran where
    names = sorted(runs["study"].dropna().unique()) if "study" in runs else []
    named = f", study `{names[0]}`" if len(names) == 1 else ""
    unfinished = list(unfinished) or records_not_finished(runs)
    if pending:  # a runs folder without its study: trials in training have no record yet
        unfinished = [
            *unfinished,
            f"{len(pending)} run folder(s) without a trial record (trial.json: trials still "
            f"training, or stopped before their end; e.g. {pending[0]}), whose points are "
            "missing (the sweep's storage, `dit-bench report scaling STORAGE_URL`, lists every "
            "trial)",
        ]
    over = points[overshot(points)] if len(points) else points
    sides = sorted(runs["image_size"].dropna().unique()) if "image_size" in runs else []
    others = runs["point"].map(_other_parameters) if "point" in runs else pd.Series(dtype=str)
    others = others if others.astype(bool).any() else None
    lines = [
        "# Scaling-law report",
        "",
        f"Source: `{source}`{named} ({len(runs)} runs, {len(points)} (run, budget) points, "
        f"budgets {', '.join(f'{b:.3g}' for b in sorted(points['budget'].unique()))} FLOPs).",
        "",
        *(
            [
                f"Left out of the IsoFLOP slices: {len(over)} (run, budget) point(s) whose "
                f"step crossing the budget spent more than {BUDGET_OVERSHOOT:g}x it (up to "
                f"{(over['train_flops'] / over['budget']).max():.3g}x, in "
                f"{over['run'].nunique()} run(s) whose first steps pass those budgets: larger "
                "budgets, or a smaller batch, measure them).",
                "",
            ]
            if len(over)
            else []
        ),
        *(
            [
                "**Incomplete sweep**: the fits use the finished trials only; "
                + "; ".join(unfinished)
                + ".",
                "",
            ]
            if unfinished
            else []
        ),  # fmt: skip
        *(
            [
                f"Resolutions: {', '.join(f'{x:g}' for x in sides)} px. A val loss is of its "
                "run's own images, so losses at two resolutions are of different data, and "
                "every fit below pools them (the IsoFLOP 'best patch per size' picks among "
                "resolutions too): report each resolution's runs apart (their own sweep, or "
                "a runs folder of their own) where that matters.",
                "",
            ]
            if len(sides) > 1
            else []
        ),
        *([note, ""] if (note := short_runs(runs, points)) else []),
        *([note, ""] if (note := diverged_runs(runs)) else []),
        *([note, ""] if (note := val_protocols(runs)) else []),
        f"Setup: {setup_line(runs)}.",
        "",
        f"Trained on: {devices_line(runs)}.",
        "",
        f"Compute convention: {COMPUTE_CONVENTION}",
        "",
        "## Headline",
        "",
    ]

    def q(f, k):
        if f is None or not f.ok:
            return f"not reported ({f.status if f else 'missing'})"
        if k not in f.ci:  # say why there is none (see "Fitted constants")
            why = (
                f"only {100 * f.boot_ok:.0f}% of bootstrap refits ok"
                if math.isfinite(f.boot_ok)
                else f.ci_why or f"fewer than {fits.MIN_BOOTSTRAP_RUNS} runs"
            )
            return f"{f.params[k]:.3f} (no {interval_kind(f.name)}: {why})"
        lo, hi = f.ci[k]
        return f"{f.params[k]:.3f} [{interval_kind(f.name)} {_num(lo, '.3f')}, {_num(hi, '.3f')}]"

    lines += [
        f"- Loss-compute envelope L(C) = E + A C^-alpha: alpha = {q(env, 'alpha')}."
        + (frontier_runs(points, runs) if env is not None and env.ok else ""),
        f"- L(N, D) = E + A/N^a + B/D^b: a = {q(ch, 'a')}, b = {q(ch, 'b')}, E = {q(ch, 'E')}.",
        f"- Compute-optimal size N*(C) ~ C^a (IsoFLOP, best patch per size): a = {q(iso, 'a')}.",
        "",
        "## Fitted constants",
        "",
        *_fit_rows(ft),
        "",
        "Status `ok` means: the optimiser converged, the starts that reach the best loss agree on "
        "the parameters, no parameter sits on its bound, and the Jacobian of the residuals in "
        f"relative parameters has condition number below {fits.COND_LIMIT:.0e}. `ok (E=0)`: "
        "the floor E of L(C) sits on its bound 0 and the rest is a pure power law, fitted as a "
        "line in log-log with the same checks. Any other status "
        "is printed instead of a number. CIs are 2.5/97.5% percentiles of refits on runs "
        f"resampled with replacement ({result['n_boot']} resamples; every refit that "
        "converged counts, ok or not, since those that fail the checks are not a random "
        f"share; a fit with fewer than {fits.MIN_BOOTSTRAP_OK:.0%} ok refits gets no "
        "interval, nor does an N*(C) fit with a size of one run, whose resamples drop sizes). "
        f"L(C) intervals are a {ENVELOPE_NOTE}",
        "",
        "## Held-out check (fit without the largest budget, predict it)",
        "",
        "| fit | budget | predicted | actual | error | note |",
        "|---|---|---|---|---|---|",
    ]
    for h in result["heldout"]:
        lines.append(
            f"| {h['fit']} | {h['budget']:.3g} | {_num(h.get('predicted'))} | "
            f"{_num(h.get('actual'))} | {_num(100 * h['rel_error'], '+.1f') + '%' if 'rel_error' in h else '-'} | "
            f"{h.get('note', '')} |"
        )
    vert = result["isoflop"]["all"].vertices
    lines += [
        "",
        "## IsoFLOP minima (best patch per size)",
        "",
        "| budget | sizes | c2 | N* | valid | why not |",
        "|---|---|---|---|---|---|",
    ]
    for v in vert.itertuples():
        n_opt = _num(v.n_opt, ".3g") if v.valid else "-"  # an invalid vertex is no N*
        lines.append(
            f"| {v.budget:.3g} | {v.n_points} | {_num(v.c2)} | {n_opt} | {v.valid} | {v.why} |"
        )
    lines += [
        "",
        "## Runs",
        "",
        "| size | patch |"
        + (" px |" if len(sides) > 1 else "")
        + " tokens | params | fwd MACs | steps | final val loss | state |"
        + (" device |" if several else "")
        + (" other parameters |" if others is not None else ""),
        "|---|---|---|---|---|---|---|---|"
        + ("---|" * (int(len(sides) > 1) + int(several) + int(others is not None))),
    ]
    for r in runs.sort_values(["params", "patch"]).itertuples():
        lines.append(
            f"| {r.size} | {r.patch} |"
            + (f" {r.image_size} |" if len(sides) > 1 else "")
            + f" {r.tokens} | {r.params:,} | {r.macs:,} | {_steps(r)} | "
            f"{_num(r.val_loss, '.4f')} | {r.state}"
            f"{' (diverged)' if pd.notna(getattr(r, 'diverged_at', None)) else ''} |"
            + (f" {r.device if isinstance(r.device, str) else 'not recorded'} |" if several else "")
            + (f" {others[r.Index]} |" if others is not None else "")
        )
    if o:
        frac60 = o["overhead_median_s"] / 60
        lines += [
            "",
            "## Harness overhead per trial",
            "",
            "Measured on every trial: wall time from claiming the trial to telling its result, minus "
            "the training steps themselves (forward, backward, optimiser step; timed by the sweep's "
            "`ValAtSteps` callback). The overhead includes config and model set-up, data set "
            "rendering, the val-loss evaluations at the budgets, checkpoints, the final sample grid, "
            "summary and study writes.",
            "",
            f"- trials measured: {o['trials']}; median wall {o['wall_median_s']:.1f} s, of which "
            f"training steps {o['train_steps_median_s']:.1f} s",
            f"- overhead per trial: median {o['overhead_median_s']:.2f} s (max "
            f"{o['overhead_max_s']:.2f} s), of which val-loss evaluations at budgets "
            f"{o['budget_val_median_s']:.2f} s; without them {o['overhead_excl_val_median_s']:.2f} s",
            f"- as a share of a trial: median {100 * o['overhead_fraction_median']:.1f}%; of a "
            f"60-second CPU trial: {100 * frac60:.1f}% (target <= 10%)",
            "- worker process start (imports, storage) before its first trial, once per worker: "
            + ", ".join(f"{v:.1f} s" for v in o["worker_start_s"]),
        ]
        if "harness_median_s" in o:
            lines += [
                "",
                "The harness alone (the sweep, run set-up, Trainer start, final validation, sample "
                "grid, summary, trial records: the trial's wall time minus the training loop, "
                "i.e. steps with their data loading, Lightning's per-step work, train-loss "
                "logging and periodic checkpoints, and minus the budget validations, which are "
                "the measurement itself):",
                "",
                f"- median {o['harness_median_s']:.2f} s per trial (max "
                f"{o['harness_max_s']:.2f} s; training loop median {o['loop_median_s']:.1f} s); "
                f"median share of a trial {100 * o['harness_fraction_median']:.1f}%; of a 60-second "
                f"CPU trial {100 * o['harness_median_s'] / 60:.1f}% (target <= 10%)",
            ]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    lines += [
        "",
        "## Data",
        "",
        "`runs`, `points` (one row per run and budget), `curves` (every val-loss row), "
        "`fits` and `isoflop` as `.csv` and `.parquet` in this folder.",
        "",
    ]
    text = "\n".join(lines)
    write_text_atomic(out / "report.md", text)
    return text


def build_report(
    source: str | Path, out: str | Path, n_boot: int = N_BOOT, *, study: str | None = None
) -> Path:
    """The report of one study in SOURCE (`study`: its name, where SOURCE holds several)."""
    url = study_url(source)
    studies = study_trials(url, study) if url else None  # read once: records, unfinished trials
    records = load_records(source, studies, study)
    runs, points, curves = tables(records)
    # the report and its errors name SOURCE; a storage URL's password stays out of both
    source = redact(str(source))
    unfinished = unfinished_trials(url, studies) if url else []
    if points.empty:
        raise ValueError(f"{source}: {nothing_to_fit(records, runs, unfinished)}")
    result = fit_all(points, n_boot=n_boot)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused report leaves no empty folder
    # report.md is written last: one stopped on the way (Ctrl-C, a crash) must not leave the
    # earlier report.md, whole to the eye, over the new tables and figures
    (out / "report.md").unlink(missing_ok=True)
    save_table(runs, out / "runs")
    save_table(points, out / "points")
    save_table(curves, out / "curves")
    save_table(fits_table(result["fits"]), out / "fits")
    iso = pd.concat(
        [v.vertices.assign(group=k) for k, v in result["isoflop"].items()], ignore_index=True
    )
    save_table(iso, out / "isoflop")
    figs = figures(runs, points, curves, result, out)
    pending = [] if url else runs_without_record(records)
    write_report(source, runs, points, result, figs, out, unfinished, pending)
    return out


def main(source: str, out: str, study: str | None = None) -> int:
    path = build_report(source, out, study=study)
    print(f"wrote {path / 'report.md'}", file=sys.stderr)
    return 0
