"""Sweep invariants checked against hand-derived expectations: the search space a file declares
(profiles, grid order, per-budget axis, ranges), the checks `load_sweep` and `validate` make,
the budget bookkeeping of a plan, what a trial record holds, the sampler/pruner/study a sweep
builds, and the stale/lost-trial paths of a worker. No training: plans are sized on the meta
device and studies are driven by hand (ask/tell)."""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
import warnings

import optuna
import pytest
import yaml
from test_sweep import TINY, write_tiny  # the tiny sweep of the sweep tests

from dit_bench.config import ConfigError
from dit_bench.sweep import (
    Claims,
    Heartbeat,
    Range,
    Worker,
    load_sweep,
    make_pruner,
    make_storage,
    model_key,
    open_study,
    redact,
    suggest,
    summarize,
    trial_record,
)

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell by hand

WAITING = (optuna.trial.TrialState.WAITING,)


def tiny_spec(**changes) -> dict:
    spec = json.loads(json.dumps(TINY))
    spec.update(changes)
    return spec


def tiny_base(**backbone) -> dict:
    base = json.loads(json.dumps(TINY["base"]))
    base["backbone"].update(backbone)
    return base


def hand_worker(sweep, tmp_path, name: str = "w") -> Worker:
    """A worker wired to a fresh SQLite study, its loop driven by hand."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    w = Worker(sweep, url, tmp_path / "runs", name=name, log=lambda m: None)
    w.study, rdb = open_study(sweep, url)
    w.storage = w.study._storage
    w.claims = Claims(rdb, w.study._study_id, name)
    return w


def per_step_flops(plan) -> int:
    return 3 * 2 * plan.macs * plan.cfg.train.batch_size  # 3 x forward (2 x MACs) x batch


# -- the sweep file: profiles and what the sweep itself owns -------------------------------------
def test_a_profile_replaces_file_keys_and_its_set_lands_in_the_base(tmp_path):
    spec = tiny_spec(
        profiles={
            "cpu": {"budgets": [5.0e6], "set": {"train.batch_size": 4}},
            "gpu": {"description": "big"},
        }
    )
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cpu = load_sweep(path, "cpu")
    assert cpu.spec.budgets == [5.0e6]  # the profile's value, not the file's three
    assert cpu.spec.base["train"]["batch_size"] == 4
    assert cpu.plan(cpu.points()[0]).cfg.train.batch_size == 4
    gpu = load_sweep(path, "gpu")
    assert gpu.spec.budgets == TINY["budgets"]  # no profile value: the file's
    assert gpu.spec.base["train"]["batch_size"] == TINY["base"]["train"]["batch_size"]
    assert gpu.spec.profile_description == "big"
    assert (cpu.experiment, gpu.experiment) == ("tiny-cpu", "tiny-gpu")


def test_the_base_cannot_set_what_the_sweep_sets(tmp_path):
    base = json.loads(json.dumps(TINY["base"]))
    base["train"]["steps"] = 10
    with pytest.raises(ConfigError, match="base: train.steps is set by the sweep"):
        load_sweep(write_tiny(tmp_path / "a.yaml", base=base))
    base = {**TINY["base"], "experiment": "mine"}
    with pytest.raises(ConfigError, match="base: experiment is set by the sweep"):
        load_sweep(write_tiny(tmp_path / "b.yaml", base=base))


def test_a_bundle_cannot_set_what_the_sweep_sets(tmp_path):
    space = json.loads(json.dumps(TINY["space"]))
    space["size"]["choices"]["b"]["train.steps"] = 50
    with pytest.raises(ConfigError, match="size: train.steps is set by the sweep"):
        load_sweep(write_tiny(tmp_path / "a.yaml", space=space))


def test_a_range_needs_high_strictly_above_low():
    with pytest.raises(ValueError, match="must exceed"):
        Range(low=1.0, high=1.0)
    assert Range(low=1.0, high=1.5).high == 1.5


def test_documented_defaults():
    # the module docstring: heartbeat: {interval: 10, grace: 60, max_retry: 3}
    assert Heartbeat().model_dump() == {"interval": 10, "grace": 60, "max_retry": 3}


# -- the search space ---------------------------------------------------------------------------
def test_grid_points_are_the_product_in_file_order(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    # the first axis varies slowest: with n_trials, the first points are the ones run
    assert sweep.points() == [
        {"size": "a", "backbone.patch_size": 2},
        {"size": "a", "backbone.patch_size": 4},
        {"size": "b", "backbone.patch_size": 2},
        {"size": "b", "backbone.patch_size": 4},
    ]
    assert "budget" not in sweep.grid_space()  # envelope: one run reports every budget


def test_per_budget_mode_makes_budget_a_grid_axis_and_a_run_per_budget(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml", budget_mode="per_budget"))
    assert sweep.grid_space()["budget"] == TINY["budgets"]
    points = sweep.points()
    assert len(points) == 2 * 2 * 3
    assert sorted({p["budget"] for p in points}) == TINY["budgets"]
    for point in points[:3]:
        plan = sweep.plan(point)
        expected = math.ceil(point["budget"] / per_step_flops(plan))
        assert plan.budgets == [point["budget"]] and plan.budget_steps == [expected]
        assert plan.cfg.train.steps == expected
    sweep.validate()  # every (point, budget) builds


def test_overrides_expand_bundles_and_cast_only_int_ranges(tmp_path):
    space = {
        "size": TINY["space"]["size"],
        "optim.lr": {"low": 1e-4, "high": 1e-3},
        "train.batch_size": {"low": 4, "high": 8, "type": "int"},
    }
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml", space=space, sampler="random", n_trials=1))
    got = sweep.overrides_of({"size": "b", "optim.lr": 3.5e-4, "train.batch_size": 6.0})
    assert got == {
        "backbone.depth": 1,
        "backbone.hidden_size": 32,
        "backbone.num_heads": 2,
        "optim.lr": 3.5e-4,
        "train.batch_size": 6,
    }
    assert isinstance(got["train.batch_size"], int) and isinstance(got["optim.lr"], float)


# -- budgets ------------------------------------------------------------------------------------
def test_budget_steps_by_hand_and_max_steps_keeps_a_budget_reached_at_the_cap(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    point = {"size": "a", "backbone.patch_size": 4}
    plan = sweep.plan(point)
    per_step = per_step_flops(plan)
    steps = [math.ceil(b / per_step) for b in TINY["budgets"]]
    assert plan.budget_steps == steps and plan.cfg.train.steps == steps[-1]
    assert steps[0] < steps[1] < steps[2]
    # a cap exactly at the second budget's step: that budget is still reached, the third not
    capped = load_sweep(write_tiny(tmp_path / "c.yaml", max_steps=steps[1])).plan(point)
    assert capped.budgets == TINY["budgets"][:2]
    assert capped.budget_steps == steps[:2]
    assert capped.cfg.train.steps == steps[1]
    # one step short of it: only the first
    short = load_sweep(write_tiny(tmp_path / "s.yaml", max_steps=steps[1] - 1)).plan(point)
    assert short.budgets == TINY["budgets"][:1] and short.cfg.train.steps == steps[0]


def test_budgets_written_out_of_order_are_crossed_in_order(tmp_path):
    # budget index i is the pruner's step i and the report's i-th point: ascending compute
    shuffled = [TINY["budgets"][2], TINY["budgets"][0], TINY["budgets"][1]]
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml", budgets=shuffled))
    assert sweep.spec.budgets == TINY["budgets"]
    plan = sweep.plan({"size": "a", "backbone.patch_size": 4})
    assert plan.budget_steps == sorted(plan.budget_steps)
    assert plan.cfg.train.steps == plan.budget_steps[-1]


# -- validate -----------------------------------------------------------------------------------
def test_validate_checks_both_corners_of_a_range(tmp_path):
    base = tiny_base(depth=1, num_heads=2)

    def ranged(lo, hi):
        space = {"backbone.hidden_size": {"low": lo, "high": hi, "type": "int"}}
        return load_sweep(
            write_tiny(
                tmp_path / f"{lo}-{hi}.yaml", base=base, space=space, sampler="random", n_trials=2
            )  # fmt: skip
        )

    ranged(16, 20).validate()  # both corners multiples of 4 (the sin-cos table)
    with pytest.raises(ConfigError, match="hidden_size=18"):
        ranged(16, 18).validate()  # the high corner builds no model
    with pytest.raises(ConfigError, match="hidden_size=14"):
        ranged(14, 16).validate()  # the low corner builds no model


def test_pruners_need_a_value_per_budget(tmp_path):
    median = {"name": "median"}
    per_budget = load_sweep(write_tiny(tmp_path / "a.yaml", budget_mode="per_budget"))
    per_budget.validate()  # no pruner: fine
    with pytest.raises(ConfigError, match="pruner needs budget_mode envelope"):
        load_sweep(
            write_tiny(tmp_path / "b.yaml", budget_mode="per_budget", pruner=median)
        ).validate()
    load_sweep(write_tiny(tmp_path / "c.yaml", pruner=median)).validate()
    hyperband = {"name": "hyperband"}
    with pytest.raises(ConfigError, match="hyperband needs at least 2 budgets"):
        load_sweep(write_tiny(tmp_path / "d.yaml", pruner=hyperband, budgets=[8.0e6])).validate()
    load_sweep(write_tiny(tmp_path / "e.yaml", pruner=hyperband, budgets=[2.0e6, 8.0e6])).validate()


# -- what a trial keeps -------------------------------------------------------------------------
def test_trial_record_compute_budget_values_and_final_loss(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    plan = sweep.plan({"size": "a", "backbone.patch_size": 4})
    s0, s1, s2 = plan.budget_steps
    batch = plan.cfg.train.batch_size
    # the loss rises after its minimum: the final value is the last step's, not the best
    curve = [
        {"step": s0, "val_loss": 1.4},
        {"step": s1 + 1, "val_loss": 0.7},  # not a budget step
        {"step": s1, "val_loss": 0.9},
        {"step": s2, "val_loss": 1.1},
    ]
    curve = sorted(curve, key=lambda r: r["step"])
    rec = trial_record(plan, curve)
    assert rec["val_at_budget"] == [1.4, 0.9, 1.1]
    assert rec["val_loss"] == 1.1
    assert rec["steps"] == s2
    assert rec["images"] == s2 * batch
    assert rec["train_flops"] == 3 * 2 * plan.macs * s2 * batch
    assert rec["flops"] == 2 * plan.macs
    assert rec["budgets"] == TINY["budgets"]
    assert (rec["depth"], rec["width"], rec["heads"], rec["patch"]) == (1, 16, 1, 4)
    assert rec["point"] == "size=a,backbone.patch_size=4"
    assert rec["experiment"] == "tiny-cpu"
    # a budget whose step has no validation row yet (a run cut short) has no value
    assert trial_record(plan, curve[:1])["val_at_budget"] == [1.4, None, None]


def test_trial_record_counts_the_data_s_own_size_where_data_image_size_is_unset(tmp_path):
    # latents are trained with data.image_size unset (the folder's size), as is a data set at
    # its native size: the record held None, and the scaling report's D fell back to the
    # sequence length, the time and class tokens of in_context counted as data (66 for the 64
    # patches of 32x32 shapes at patch 4)
    from dit_bench.report.scaling import data_tokens

    base = copy.deepcopy(TINY["base"])
    del base["data"]["image_size"]  # shapes: 32x32
    base["backbone"]["conditioning"] = "in_context"
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml", base=base))
    plan = sweep.plan({"size": "a", "backbone.patch_size": 4})
    rec = trial_record(plan, [])
    assert (rec["image_size"], rec["tokens"]) == (32, 66)
    assert data_tokens(rec) == 64


def test_redact_hides_only_the_password():
    assert redact("postgresql://ann:s3cret@db.example:5432/sweeps") == (
        "postgresql://ann:***@db.example:5432/sweeps"
    )
    assert redact("postgresql://ann:p@ss@host/db") == "postgresql://ann:***@host/db"
    assert redact("sqlite:///runs/study.db") == "sqlite:///runs/study.db"
    # an @ in a path is not a password's end; a user without a password gains none
    assert redact("sqlite:////data/team@lab/study.db") == "sqlite:////data/team@lab/study.db"
    assert redact("postgresql://ann@host/db") == "postgresql://ann@host/db"
    # an @ in the query, past the host: the password ends at the "?" as at a "/"
    assert redact("postgresql://ann:pw@host?application_name=a@b") == (
        "postgresql://ann:***@host?application_name=a@b"
    )


def test_redact_hides_every_password_the_connection_reads():
    # SQLAlchemy reads `[^@]*` after the user's colon as the password, "/" included, and
    # libpq takes one from the query too: both connect, so both were shown and stored as typed
    assert redact("postgresql://ann:a/b@host/db") == "postgresql://ann:***@host/db"
    assert redact("postgresql://ann:a?b@host/db") == "postgresql://ann:***@host/db"
    assert redact("postgresql://ann@host/db?sslmode=require&password=s3cret") == (
        "postgresql://ann@host/db?sslmode=require&password=***"
    )
    assert redact("--storage=postgresql://ann:s3cret@host/db") == (
        "--storage=postgresql://ann:***@host/db"
    )
    assert (
        redact("sqlite:////data/a:b/team@lab/study.db") == "sqlite:////data/a:b/team@lab/study.db"
    )


# -- sampler, pruner, study ---------------------------------------------------------------------
def _ranged_sweep(tmp_path, name: str, **changes):
    space = {
        "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "backbone.hidden_size": {"low": 16, "high": 17, "type": "int"},
    }
    spec = dict(space=space, sampler="random", n_trials=40) | changes
    return load_sweep(write_tiny(tmp_path / f"{name}.yaml", **spec))


def _draws(sweep, url: str, n: int) -> list[dict]:
    study, _ = open_study(sweep, url)
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(suggest(trial, sweep))
        study.tell(trial, 1.0)
    return out


def test_random_sampler_draws_are_seeded_and_int_ranges_reach_both_ends(tmp_path):
    a = _draws(_ranged_sweep(tmp_path, "a", seed=3), f"sqlite:///{tmp_path / 'a.db'}", 40)
    b = _draws(_ranged_sweep(tmp_path, "b", seed=3), f"sqlite:///{tmp_path / 'b.db'}", 40)
    c = _draws(_ranged_sweep(tmp_path, "c", seed=4), f"sqlite:///{tmp_path / 'c.db'}", 40)
    assert a == b  # one seed, one sequence: a sweep is reproducible
    assert a != c
    assert {d["backbone.hidden_size"] for d in a} == {16, 17}  # [low, high], both included
    assert all(1e-4 <= d["optim.lr"] <= 1e-2 for d in a)
    assert all("budget" not in d for d in a)  # envelope: no budget parameter


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_workers_and_a_restarted_worker_draw_distinct_params_reproducibly(tmp_path, sampler):
    """Each worker builds its own sampler and asks for trials itself (no study.optimize): a
    sampler seeded once per process gave every worker, and every restart, the same draws."""

    def draws(folder):
        folder.mkdir()
        sweep = _ranged_sweep(folder, "w", sampler=sampler, n_trials=6)
        a, b = hand_worker(sweep, folder, name="a"), hand_worker(sweep, folder, name="b")
        out = [suggest(w._new_trial(6), sweep)["optim.lr"] for w in (a, b, a, b)]  # concurrent
        for t in a.study.get_trials(deepcopy=False):
            a.study.tell(t.number, 1.0)
        restarted = hand_worker(sweep, folder, name="a-restarted")  # a new process, new sampler
        return out + [suggest(restarted._new_trial(6), sweep)["optim.lr"]]

    first = draws(tmp_path / "first")
    assert len(set(first)) == len(first), first
    assert draws(tmp_path / "again") == first  # per trial number: reproducible


def test_trial_seeds_of_a_large_sweep_seed_are_ones_numpy_takes():
    import numpy as np

    from dit_bench.sweep import trial_seed

    for seed, number in ((0, 0), (4295, 1), (10**9, 123)):
        assert 0 <= trial_seed(seed, number) < 2**32
        np.random.RandomState(trial_seed(seed, number))  # the samplers' state: 32-bit seeds


def test_suggest_draws_a_budget_in_per_budget_mode(tmp_path):
    sweep = _ranged_sweep(tmp_path, "p", budget_mode="per_budget")
    draws = _draws(sweep, f"sqlite:///{tmp_path / 'p.db'}", 20)
    assert {d["budget"] for d in draws} == set(TINY["budgets"])


def test_the_study_minimizes_and_the_summary_lists_the_lowest_loss_first(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    study, _ = open_study(sweep, f"sqlite:///{tmp_path / 's.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.study_name == "tiny-cpu"
    for loss in (3.0, 1.0, 2.0):
        study.tell(study.ask(), loss)
    assert study.best_value == 1.0
    lines = summarize(study).splitlines()
    assert lines[0] == "study tiny-cpu: 3 complete"
    assert [float(line.rsplit(":", 1)[1]) for line in lines[1:]] == [1.0, 2.0, 3.0]


def test_median_pruner_waits_for_its_startup_trials_and_warmup_budgets(tmp_path):
    def pruned_at(pruner: dict, history: int) -> list[bool]:
        """`history` complete trials at loss 1.0 per budget, then a trial at 10.0: whether
        it is pruned at budget 0 and at budget 1."""
        sweep = load_sweep(write_tiny(tmp_path / "m.yaml", pruner=pruner))
        study = optuna.create_study(pruner=make_pruner(sweep.spec))
        for _ in range(history):
            t = study.ask()
            for i in range(3):
                t.report(1.0, step=i)
            study.tell(t, 1.0)
        bad = study.ask()
        out = []
        for i in range(2):
            bad.report(10.0, step=i)
            out.append(bad.should_prune())
        return out

    startup2 = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0}
    assert pruned_at(startup2, 1) == [False, False]  # one trial before: too early to prune
    assert pruned_at(startup2, 2) == [True, True]
    warmup1 = {"name": "median", "n_startup_trials": 0, "n_warmup_steps": 1}
    assert pruned_at(warmup1, 2) == [False, True]  # budget 0 is inside the warmup


# the two pruners that race trials, each pruning from the first trial it can
RACING_PRUNERS = [
    {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    {"name": "hyperband", "reduction_factor": 2},
]


def _behind(study, model: str) -> bool:
    """A trial of `model` reporting a loss of 2.0 at two budgets: whether it was pruned."""
    t = study.ask()
    t.set_user_attr("model", model)
    pruned = False
    for i in range(2):
        t.report(2.0, step=i)
        pruned |= t.should_prune()
    study.tell(t, state=optuna.trial.TrialState.FAIL)
    return pruned


@pytest.mark.parametrize("pruner", RACING_PRUNERS)
def test_the_pruner_races_a_trial_against_its_own_model_only(tmp_path, pruner):
    # At equal compute a larger model is behind at the small budgets and ahead at the large
    # ones. Raced against the smaller models, every L and XL trial of the cpu profile with
    # `median` was pruned at its second budget, leaving the envelope and the IsoFLOP slices of
    # the larger budgets two sizes. A trial behind others of its own model (another lr) is.
    sweep = load_sweep(write_tiny(tmp_path / "m.yaml", pruner=pruner))
    points = sweep.points()  # size a: patch 2, 4; size b: patch 2, 4
    small, large = model_key(sweep.plan(points[0])), model_key(sweep.plan(points[2]))
    assert small != large
    assert model_key(sweep.plan(points[0])) != model_key(sweep.plan(points[1]))  # tokens
    study = optuna.create_study(pruner=make_pruner(sweep.spec))
    for _ in range(8):  # enough for every hyperband bracket to hold some
        done = study.ask()
        done.set_user_attr("model", small)
        for i in range(3):
            done.report(1.0, step=i)
            assert not done.should_prune()  # (hyperband records its rungs here)
        study.tell(done, 1.0)

    assert [_behind(study, large) for _ in range(4)] == [False] * 4  # no trial of its model
    assert any(_behind(study, small) for _ in range(4))  # behind its own model's trials


@pytest.mark.parametrize("pruner", RACING_PRUNERS)
def test_trials_of_a_study_made_before_the_model_attribute_race_as_their_model(tmp_path, pruner):
    # A study resumed across the upgrade: its trials carry the config the worker recorded but
    # no `model`. Left out of every model, a resumed sweep raced its new trials against none
    # of them: a trial far behind finished trials of its own size trained to its last budget.
    sweep = load_sweep(write_tiny(tmp_path / "m.yaml", pruner=pruner))
    points = sweep.points()
    small, large = sweep.plan(points[0]), sweep.plan(points[2])
    study = optuna.create_study(pruner=make_pruner(sweep.spec))
    for _ in range(8):
        done = study.ask()
        done.set_user_attr("config", small.cfg.to_dict())  # as the worker wrote it then
        for i in range(3):
            done.report(1.0, step=i)
            done.should_prune()
        study.tell(done, 1.0)

    assert [_behind(study, model_key(large)) for _ in range(4)] == [False] * 4
    assert any(_behind(study, model_key(small)) for _ in range(4))


def test_hyperband_resources_are_budget_indices(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "h.yaml", pruner={"name": "hyperband"}))
    pruner = make_pruner(sweep.spec)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    # a trial reports budget i at step i: 1 .. number of budgets
    assert (pruner._min_resource, pruner._max_resource) == (1, len(TINY["budgets"]))
    assert pruner._reduction_factor == 3
    assert isinstance(make_pruner(load_sweep(write_tiny(tmp_path / "n.yaml")).spec),
                      optuna.pruners.NopPruner)  # fmt: skip


# -- stale and lost trials ----------------------------------------------------------------------
def test_a_trial_goes_stale_after_the_grace_period_not_the_interval(tmp_path):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    storage = make_storage(url, Heartbeat(interval=1, grace=6))
    study = optuna.create_study(storage=storage, study_name="g")
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.2)  # beyond the interval (and two of them), well within the grace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING


def test_a_lost_grid_trial_is_requeued_with_its_grid_point(tmp_path):
    """A worker that dies before `suggest` leaves a failed trial with no params: its retry is
    the grid point it was enqueued with (fixed params), not an empty one."""
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    w._enqueue_grid(None)
    trial = w._pop_waiting()
    point = w.study.trials[trial.number].system_attrs["fixed_params"]
    assert point == sweep.points()[0]
    w.study.tell(trial, state=optuna.trial.TrialState.FAIL)  # lost, no params suggested
    w._retry_failed()
    waiting = w.study.get_trials(states=WAITING)
    retries = [t for t in waiting if t.user_attrs.get("retry_of") == trial.number]
    assert len(retries) == 1
    assert retries[0].system_attrs["fixed_params"] == point
    assert retries[0].user_attrs["attempt"] == 2


def test_a_trial_claimed_by_a_worker_that_died_before_starting_it_is_taken_after_the_grace(
    tmp_path, monkeypatch
):
    """A worker killed between claiming `run:<trial id>` and setting the trial RUNNING leaves a
    WAITING trial with no heartbeat: its claim expires after the grace period (3 s in TINY)."""
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    dead = hand_worker(sweep, tmp_path, name="dead")
    dead._enqueue_grid(1)
    (waiting,) = dead.study.get_trials(deepcopy=False, states=WAITING)
    assert dead.claims.claim(f"run:{waiting._trial_id}")  # ... and the process is killed here
    other = hand_worker(sweep, tmp_path, name="other")
    assert other._pop_waiting() is None  # a claim that young may be a live worker's
    _later(other, sweep)
    trial = other._pop_waiting()
    assert trial is not None and trial.number == waiting.number
    assert other.study.trials[trial.number].state == optuna.trial.TrialState.RUNNING
    # and it has a heartbeat from the start: should this worker die too, the trial goes stale
    assert heartbeats(other, trial) == 1


def heartbeats(worker, trial) -> int:
    """The heartbeat rows Optuna's storage holds for `trial`."""
    with worker.claims.engine.connect() as conn:
        return conn.exec_driver_sql(
            f"SELECT count(*) FROM trial_heartbeats WHERE trial_id = {trial._trial_id}"
        ).scalar()


def test_a_new_trial_has_a_heartbeat_from_its_creation(tmp_path):
    """tpe/random: a trial is RUNNING from `_new_trial`, and Optuna fails as stale only
    running trials with a heartbeat: a worker dying before its run's heartbeat starts must
    leave one behind, or the trial stays RUNNING for good."""
    sweep = _ranged_sweep(tmp_path, "n", n_trials=2)
    dead = hand_worker(sweep, tmp_path, name="dead")
    trial = dead._new_trial(2)  # ... and the process is killed here
    assert dead.study.trials[trial.number].state == optuna.trial.TrialState.RUNNING
    assert heartbeats(dead, trial) == 1


def test_a_claim_is_given_back_when_starting_the_trial_raises(tmp_path, monkeypatch):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    w._enqueue_grid(1)

    def locked(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(w.storage, "set_trial_state_values", locked)
    with pytest.raises(RuntimeError, match="locked"):
        w._pop_waiting()
    monkeypatch.undo()
    other = hand_worker(sweep, tmp_path, name="other")
    assert other._pop_waiting() is not None  # at once, not after the grace period


def test_a_non_finite_final_loss_fails_its_trial_with_an_error_and_is_not_retried(
    tmp_path, monkeypatch
):
    import dit_bench.train.run as train_run

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    run = tmp_path / "runs" / "diverged"

    def diverging_train(cfg, out, **kwargs):  # finishes, its last val loss NaN: no exception
        run.mkdir(parents=True)
        rows = ["step,val/loss", "1,0.9", f"{cfg.train.steps},nan"]
        (run / "metrics.csv").write_text("\n".join(rows) + "\n")
        return run

    monkeypatch.setattr(train_run, "train", diverging_train)
    monkeypatch.setattr(train_run, "find_run_dir", lambda out, cfg: run)
    w._enqueue_grid(1)
    trial = w._pop_waiting()
    w._run(trial)
    done = w.study.trials[trial.number]
    assert done.state == optuna.trial.TrialState.FAIL
    assert "not finite" in done.user_attrs["error"]
    assert json.loads((run / "trial.json").read_text())["state"] == "FAIL"
    w._retry_failed()
    assert not w.study.get_trials(states=WAITING)  # deterministic: not re-run as a lost worker


def _age_claims(worker, seconds: float) -> None:
    """The claims made until now made `seconds` earlier, by the database's clock (claims are
    aged by it, not by the machine's)."""
    t = worker.claims.table
    with worker.claims.engine.begin() as conn:
        conn.execute(t.update().values(created=t.c.created - seconds))


def _later(worker, sweep) -> None:
    """Past the heartbeat grace: claims made until now are old."""
    _age_claims(worker, sweep.spec.heartbeat.grace + 1)


@pytest.mark.parametrize("kind", ["point", "retry"])
def test_a_claim_whose_worker_died_before_enqueuing_is_made_again_after_the_grace(
    tmp_path, monkeypatch, kind
):
    """Claim and enqueue are two transactions. A worker killed between them left a grid point
    (or a retry) claimed and never run, and the sweep ended without it (exit 0): the claim
    now counts as pending, so a worker waits, and after the grace it expires and is enqueued."""
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    dead = hand_worker(sweep, tmp_path, name="dead")
    if kind == "point":
        key = "point:" + json.dumps(sweep.points()[0], sort_keys=True)
        params = sweep.points()[0]
    else:  # trial 0 lost its worker; the claim of its retry is made, the enqueue is not
        dead._enqueue_grid(1)
        trial = dead._pop_waiting()
        params = dead.study.trials[trial.number].system_attrs["fixed_params"]
        dead.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        key = f"retry:{trial.number}"
    assert dead.claims.claim(key)  # ... and the process is killed here
    other = hand_worker(sweep, tmp_path, name="other")
    assert other._expire_lost_claims() == 1  # young: its worker may be about to enqueue
    other._enqueue_grid(1), other._retry_failed()
    assert not other.study.get_trials(states=WAITING)
    _later(other, sweep)
    assert other._expire_lost_claims() == 0
    other._enqueue_grid(1), other._retry_failed()
    (again,) = other.study.get_trials(states=WAITING)
    assert again.system_attrs["fixed_params"] == params
    assert again.user_attrs.get("retry_of") == (0 if kind == "retry" else None)
    assert other._expire_lost_claims() == 0  # enqueued: nothing left to expire
    assert key in other.claims.keys()


def test_the_worker_loop_waits_for_a_young_lost_claim_and_then_runs_its_point(
    tmp_path, monkeypatch
):
    """End to end through Worker.run (training stubbed): a sweep whose only point was claimed
    by a worker that died before enqueuing it runs that point, and does not end without it."""
    import dit_bench.train.run as train_run

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    dead = hand_worker(sweep, tmp_path, name="dead")
    assert dead.claims.claim("point:" + json.dumps(sweep.points()[0], sort_keys=True))
    ran = []
    monkeypatch.setattr(train_run, "train", lambda cfg, out, **kw: ran.append(cfg.hash))
    monkeypatch.setattr(train_run, "find_run_dir", lambda out, cfg: None)
    w = Worker(sweep, dead.storage_url, tmp_path / "runs", name="w", log=lambda m: None, poll=0)
    sleeps = []

    def sleep(s):  # each poll moves the claims' clock on by a second
        sleeps.append(s)
        _age_claims(w, 1.0)

    monkeypatch.setattr(time, "sleep", sleep)
    w.run(1)
    assert len(ran) == 1 and len(sleeps) > sweep.spec.heartbeat.grace - 1


def test_a_new_trial_stopped_before_it_starts_is_waiting_for_the_next_worker(tmp_path, monkeypatch):
    """tpe/random: a trial made RUNNING before its first heartbeat, by a worker stopped in
    between, stayed RUNNING for good (never stale) and every later worker waited on it. It
    is now made WAITING (its slot in the same transaction) and started as a waiting one is."""
    sweep = _ranged_sweep(tmp_path, "n", n_trials=2)
    w = hand_worker(sweep, tmp_path)

    def stopped(trial_id):
        raise KeyboardInterrupt

    monkeypatch.setattr(w.storage, "record_heartbeat", stopped)
    with pytest.raises(KeyboardInterrupt):
        w._new_trial(2)
    monkeypatch.undo()
    (t,) = w.study.trials
    assert t.state == optuna.trial.TrialState.WAITING and t.user_attrs["slot"] == 0
    other = hand_worker(sweep, tmp_path, name="other")
    assert other._pop_waiting().number == 0  # at once: the stopped worker gave its claim back
    assert heartbeats(other, t) == 1


@pytest.mark.parametrize("kind", ["grid", "tpe"])
def test_a_stop_during_the_enqueue_is_held_until_claim_and_trial_are_both_made(
    tmp_path, monkeypatch, kind
):
    """A Ctrl-C landing in the enqueue's commit is raised after it: handled there, the claim
    was given back with the trial stored, and the point was enqueued twice."""
    import signal

    if kind == "grid":
        sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    else:
        sweep = _ranged_sweep(tmp_path, "n", n_trials=2)
    w = hand_worker(sweep, tmp_path)
    real = w.study.enqueue_trial
    calls = []

    def interrupted(*args, **kwargs):  # the signal arrives mid-commit
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(w.study, "enqueue_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w._enqueue_grid(None) if kind == "grid" else w._new_trial(2)
    monkeypatch.undo()
    assert len(calls) == 1 and len(w.study.trials) == 1  # stored, and the rest not begun
    other = hand_worker(sweep, tmp_path, name="other")
    other._enqueue_grid(None)
    n = len(sweep.points()) if kind == "grid" else 2
    for _ in range(n):
        other._new_trial(2)
    origins = [
        (t.system_attrs.get("fixed_params"), t.user_attrs.get("slot")) for t in other.study.trials
    ]
    assert len(origins) == n and len({json.dumps(o, sort_keys=True) for o in origins}) == n


def test_a_slot_whose_worker_died_before_enqueuing_is_taken_again_after_the_grace(
    tmp_path, monkeypatch
):
    """tpe/random: a worker killed between claiming a slot and enqueuing its trial left the
    sweep one trial short, and a released slot below a taken one was never taken again."""
    # a grace of 30 s: TINY's 3 s passed on a loaded machine before the "young" check
    sweep = _ranged_sweep(tmp_path, "n", n_trials=2, heartbeat={"interval": 1, "grace": 30})
    dead = hand_worker(sweep, tmp_path, name="dead")
    assert dead.claims.claim("slot:0")  # ... and the process is killed here
    other = hand_worker(sweep, tmp_path, name="other")
    assert other._new_trial(2).number == 0 and other.study.trials[0].user_attrs["slot"] == 1
    assert other._new_trial(2) is None and other._expire_lost_claims() == 1  # young: waited for
    _later(other, sweep)
    assert other._expire_lost_claims() == 0
    assert other._new_trial(2).number == 1 and other.study.trials[1].user_attrs["slot"] == 0


def test_a_tpe_sweep_stopped_between_trials_reports_the_trials_never_started(tmp_path):
    """A random/tpe sweep stopped after 2 of its 5 trials left no waiting trial: its report
    fitted 2 trials as the whole sweep. The trials record the n_trials they were made for;
    the latest call's is the sweep's (a rerun with more trials extends it)."""
    from dit_bench.report import scaling

    w = hand_worker(_ranged_sweep(tmp_path, "n", n_trials=5), tmp_path)
    for _ in range(2):
        w.study.tell(w._new_trial(5).number, 1.0)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert scaling.unfinished_trials(url) == [
        f"study {w.study.study_name}: 2 trials finished; not finished: "
        "3 of n_trials 5 never started"
    ]
    w.study.tell(w._new_trial(3).number, 1.0)  # a rerun asking for 3: done
    assert scaling.unfinished_trials(url) == []


def test_a_later_call_asking_for_fewer_trials_is_the_sweep_s_request(tmp_path):
    """A call stopped after 2 of its 5 trials, then one asking for 2: that call made no trial
    to record its n_trials, and the report still counted 3 of the first call's 5 missing."""
    from dit_bench.report import scaling

    w = hand_worker(_ranged_sweep(tmp_path, "n", n_trials=5), tmp_path)
    w.record_request(5)
    for _ in range(2):
        w.study.tell(w._new_trial(5).number, 1.0)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert scaling.unfinished_trials(url)[0].endswith("3 of n_trials 5 never started")
    w.record_request(2)  # the next call: nothing left to start
    assert w._new_trial(2) is None and scaling.unfinished_trials(url) == []


def test_a_grid_cut_short_by_n_trials_reports_the_points_never_started(tmp_path):
    """--n-trials 1 on a grid of 4 points: the report read as one of the whole grid."""
    from dit_bench.report import scaling

    w = hand_worker(load_sweep(write_tiny(tmp_path / "t.yaml")), tmp_path)
    w.record_request(1)
    w._enqueue_grid(1)
    w.study.tell(w._pop_waiting().number, 1.0)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert scaling.unfinished_trials(url) == [
        f"study {w.study.study_name}: 1 trials finished; not finished: "
        "3 of the grid's 4 points never started (n_trials 1)"
    ]
    w.record_request(None)  # a call for the whole grid enqueues the rest
    w._enqueue_grid(None)
    assert scaling.unfinished_trials(url)[0].endswith("3 running or waiting")


def test_a_report_tells_a_dead_worker_s_trial_from_a_running_one(tmp_path):
    """A SIGKILLed machine's trial read as "running or waiting" until the next sweep call
    failed it as stale: its heartbeat, older than the grace, says its worker is likely gone."""
    import sqlite3

    from dit_bench.report import scaling

    # a grace of 60 s: the live trial's beat stays younger on a loaded machine
    heartbeat = {"interval": 1, "grace": 60}
    w = hand_worker(load_sweep(write_tiny(tmp_path / "t.yaml", heartbeat=heartbeat)), tmp_path)
    w._enqueue_grid(None)
    dead, live = w._pop_waiting(), w._pop_waiting()  # each RUNNING, with its heartbeat
    db = tmp_path / "study.db"
    with sqlite3.connect(db) as conn:  # the dead one's worker last beat 10 minutes ago
        conn.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime('now', '-600 seconds') "
            "WHERE trial_id = ?",
            (dead._trial_id,),
        )
    (line,) = scaling.unfinished_trials(f"sqlite:///{db}")
    assert line.startswith(
        f"study {w.study.study_name}: 0 trials finished; not finished: 3 running or waiting, "
        f"1 stale (trials [{dead.number}]: no heartbeat for 6"
    ), line
    assert "over heartbeat.grace 60 s: their workers are likely gone; the next `dit-bench " in line
    assert live.number != dead.number


def test_a_trial_enqueued_twice_runs_once_and_is_no_failure_of_the_sweep(tmp_path):
    """A worker stalled past the grace between its claim and the enqueue has its claim made
    again by another, and both enqueue: the later trial is failed as a duplicate when a
    worker would start it, not run, not retried and not reported as failed."""
    from dit_bench.report.scaling import failed_for_good

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    point = sweep.points()[0]
    w.study.enqueue_trial(point, user_attrs={"attempt": 1})
    w.study.enqueue_trial(point, user_attrs={"attempt": 1})  # the stalled worker's
    assert w._pop_waiting().number == 0
    assert w._pop_waiting() is None
    dup = w.study.trials[1]
    assert dup.state == optuna.trial.TrialState.FAIL and dup.user_attrs["duplicate_of"] == 0
    w._retry_failed()
    assert not w.study.get_trials(states=WAITING)
    assert failed_for_good(w.study.trials) == []


def test_a_paused_worker_whose_trial_was_taken_over_finishes_its_run_quietly(tmp_path, monkeypatch):
    """A worker silent past the grace (paused) has its trial failed and re-queued by another;
    when it wakes, every Optuna write to the old trial raises. It trained on and then crashed
    with a traceback, leaving no summary. Now it finishes training and leaves the trial to
    the retry."""
    import dit_bench.train.run as train_run

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    logs = []
    w.log = logs.append
    w._enqueue_grid(1)
    trial = w._pop_waiting()
    finished = []

    def train(cfg, out, callbacks, **kw):  # the other worker fails it while this one trains
        w.study.tell(optuna.Trial(w.study, trial._trial_id), state=optuna.trial.TrialState.FAIL)
        for step in sorted(callbacks[0].steps):
            callbacks[0].on_val(step, {"val/loss": 0.5})
        finished.append(cfg.hash)

    monkeypatch.setattr(train_run, "train", train)
    w._run(trial)  # no exception
    assert finished and "was failed as lost by another worker" in logs[-1]
    assert "left to the retry" in logs[-1]
    assert w.study.trials[trial.number].state == optuna.trial.TrialState.FAIL


def test_a_failed_trial_is_named_by_its_grid_point_and_how_it_failed(tmp_path):
    """A trial lost before `suggest` has no params: the line names its grid point. And a lost
    trial is 'max_retry spent' only when it is."""
    from dit_bench.sweep import failure

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    w._enqueue_grid(1)
    trial = w._pop_waiting()
    w.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    point = ",".join(f"{k}={v}" for k, v in sweep.points()[0].items())
    lost = w.study.trials[trial.number]
    assert failure(lost, 3) == (
        f"trial 0 {point} failed: its worker was lost (attempt 1), not re-queued yet: run the "
        "same command again to retry it"
    )
    assert failure(lost, 0).endswith("lost 1 times (heartbeat.max_retry=0 retries spent)")
    # at the boundary (attempt == max_retry) one retry is left (`Worker._retryable`): not spent
    assert failure(lost, 1).endswith("not re-queued yet: run the same command again to retry it")
    # a stop is no lost worker, and spends no retry: it is re-queued whatever max_retry says
    stopped = copy.deepcopy(lost)
    stopped.set_user_attr("interrupted", True)
    assert failure(stopped, 0).endswith(
        "failed: it was stopped (attempt 1), not re-queued yet: run the same command again to "
        "retry it"
    )


def test_claims_are_aged_by_the_databases_clock_not_the_machines(tmp_path, monkeypatch):
    """Workers on several machines share the study: a claim made on one whose clock is behind
    looked old at once to another (expired and made again: the work done twice), and one made
    ahead never expired. Claims now take the database's time."""
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    behind = hand_worker(sweep, tmp_path, name="behind")
    ahead = hand_worker(sweep, tmp_path, name="ahead")
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 3600)  # this machine's clock an hour behind
    assert behind.claims.claim("point:a")
    monkeypatch.setattr(time, "time", lambda: now + 3600)  # that one an hour ahead
    assert ahead.claims.claim("point:b")
    monkeypatch.undo()
    grace = sweep.spec.heartbeat.grace
    assert not ahead.claims.expire("point:a", grace)  # young, whoever looks
    assert not behind.claims.expire("point:b", grace)
    _later(ahead, sweep)
    assert ahead.claims.expire("point:a", grace) and behind.claims.expire("point:b", grace)


def test_a_claim_the_storage_keeps_refusing_says_what_the_storage_said(tmp_path, monkeypatch):
    """A server down or a table missing read "database stays locked" after 3.5 minutes."""
    import sqlalchemy as sa

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)

    class Refusing:
        dialect = w.claims.engine.dialect

        def begin(self):
            raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused\nmore"))

    monkeypatch.setattr(w.claims, "engine", Refusing())
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(RuntimeError, match=r"the storage refusing with: connection refused$"):
        w.claims.claim("point:x")


def test_sweep_set_of_a_key_a_choice_sets_otherwise_is_refused(tmp_path):
    """A trial's parameters come after --set: a choice setting the key to another value kept
    its own, silently (the gpu profile's S and B with --set train.cudagraphs=false)."""
    path = "sweeps/shapes-scaling.yaml"
    with pytest.raises(ConfigError, match="size=S sets True, size=B sets True"):
        load_sweep(path, "gpu", ["train.cudagraphs=false"])
    load_sweep(path, "gpu", ["train.activation_checkpointing=true"])  # what L and XL set


def test_grid_enqueues_each_point_once_and_n_trials_of_them(tmp_path):
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    w._enqueue_grid(3)
    w._enqueue_grid(3)  # a second worker's (or round's) enqueue adds nothing
    waiting = w.study.get_trials(states=WAITING)
    assert [t.system_attrs["fixed_params"] for t in waiting] == sweep.points()[:3]
    assert all(t.user_attrs == {"attempt": 1} for t in waiting)
    other = hand_worker(sweep, tmp_path, name="w2")
    other._enqueue_grid(None)  # all points: only the fourth is new
    waiting = other.study.get_trials(states=WAITING)
    assert [t.system_attrs["fixed_params"] for t in waiting] == sweep.points()


class _PruneAtBudget(optuna.pruners.BasePruner):
    """Asks to prune once the trial has reported budget index `at` (0-based)."""

    def __init__(self, at: int):
        self.at = at

    def prune(self, study, trial) -> bool:
        return trial.last_step is not None and trial.last_step >= self.at


@pytest.mark.parametrize(
    ("at", "state", "reported"),
    [(1, optuna.trial.TrialState.PRUNED, 2), (2, optuna.trial.TrialState.COMPLETE, 3)],
)
def test_a_trial_is_pruned_before_its_final_budget_never_at_it(
    tmp_path, monkeypatch, at, state, reported
):
    # At the last budget the run has trained all its steps: its value is final, and pruning it
    # there would throw away a finished result.
    import dit_bench.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "make_pruner", lambda spec: _PruneAtBudget(at))
    space = {"size": {"choices": {"a": TINY["space"]["size"]["choices"]["a"]}}}
    path = write_tiny(tmp_path / "t.yaml", space={**space, "backbone.patch_size": {"choices": [4]}})
    study = sweep_module.run_sweep(load_sweep(path), tmp_path / "runs", workers=1, progress=False)
    (trial,) = study.trials  # a one-point grid (Optuna's GridSampler raised at its end)
    assert len(set(trial.user_attrs["budget_steps"])) == 3  # three distinct budget steps
    assert trial.state == state
    assert sorted(trial.intermediate_values) == list(range(reported))
    # the pruner races it against the trials of its own model (set before training starts)
    assert trial.user_attrs["model"] == model_key(load_sweep(path).plan(trial.params))


def test_a_changed_sweep_does_not_reuse_the_study_of_the_old_one(tmp_path):
    # Rerunning with another lr on the same --out found the old study "finished" and printed
    # its numbers as the new sweep's. Keys that do not change the trials may change.
    from dit_bench.sweep import default_storage, storage_status

    path = write_tiny(tmp_path / "t.yaml")
    url = default_storage(load_sweep(path), tmp_path)  # the same --out's study file
    open_study(load_sweep(path), url)
    for sets, changed in [
        (["optim.lr=5e-3"], "base config changed"),
        (["data.num_samples=64"], "base config changed"),
    ]:
        sweep = load_sweep(path, overrides=sets)
        with pytest.raises(ConfigError, match=changed):
            open_study(sweep, url)
        with pytest.raises(ConfigError, match="another --out"):
            storage_status(sweep, url)  # the dry run says so too
    with pytest.raises(ConfigError, match="budgets changed"):
        open_study(load_sweep(write_tiny(tmp_path / "t.yaml", budgets=[2.0e6, 8.0e6])), url)
    # how it runs, how many trials, the heartbeat: the same study goes on
    same = write_tiny(tmp_path / "t.yaml", n_trials=2, heartbeat={"interval": 2, "grace": 9})
    study, _ = open_study(load_sweep(same, overrides=["train.threads=2"]), url)
    assert study.user_attrs["identity"]["budgets"] == sorted(TINY["budgets"])


def test_a_duplicate_another_worker_dropped_first_is_passed_over(tmp_path, monkeypatch):
    """Two workers can reach one duplicate (the first stalled past the grace holding its
    claim): the second to drop it finds it finished, and goes on instead of crashing."""
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    a, b = hand_worker(sweep, tmp_path, name="a"), hand_worker(sweep, tmp_path, name="b")
    point = sweep.points()[0]
    a.study.enqueue_trial(point, user_attrs={"attempt": 1})
    a.study.enqueue_trial(point, user_attrs={"attempt": 1})
    real = a._drop_duplicate

    def raced(t, first):  # b drops it while a is about to
        b._drop_duplicate(t, first)
        real(t, first)

    monkeypatch.setattr(a, "_drop_duplicate", raced)
    assert a._pop_waiting().number == 0
    assert a._pop_waiting() is None
    assert a.study.trials[1].user_attrs["duplicate_of"] == 0


def test_a_stop_before_training_fails_the_trial_as_stopped_not_lost(tmp_path, monkeypatch):
    """Ctrl-C in the imports, the plan or the records (outside `train`) left the trial RUNNING:
    stale after the grace and retried as a lost worker's, spending heartbeat.max_retry."""
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml", heartbeat={"interval": 1, "grace": 3,
                                                                   "max_retry": 0}))  # fmt: skip
    w = hand_worker(sweep, tmp_path)
    w._enqueue_grid(1)
    trial = w._pop_waiting()

    def stopped(self, params):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(w.sweep), "plan", stopped)
    with pytest.raises(KeyboardInterrupt):
        w._run(trial)
    t = w.study.trials[trial.number]
    assert t.state == optuna.trial.TrialState.FAIL and t.user_attrs["interrupted"] is True
    w._retry_failed()  # re-queued although max_retry is 0: a stop is no lost worker
    assert len(w.study.get_trials(states=WAITING)) == 1


def test_a_running_trial_without_a_heartbeat_gets_one_and_goes_stale(tmp_path, monkeypatch):
    """Earlier versions made tpe/random trials RUNNING before their first heartbeat; a worker
    killed in between left one that Optuna never fails, and every worker waited for good. The
    grace runs on this worker's clock from when it first saw the orphan: the trial's start is
    the wall clock of the machine that made it, here an hour ahead of this one's."""
    from datetime import datetime, timedelta

    import dit_bench.sweep as sweep_module

    sweep = _ranged_sweep(tmp_path, "n", n_trials=2)
    w = hand_worker(sweep, tmp_path)
    trial_id = w.storage.create_new_trial(w.study._study_id)  # RUNNING, no heartbeat
    ahead = (datetime.now() + timedelta(hours=1)).isoformat(" ")
    with w.claims.engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE trials SET datetime_start = '{ahead}'")
    (orphan,) = w.study.trials
    w._beat_for_orphans()
    assert heartbeats(w, orphan) == 0  # not seen for a grace yet: a live worker's, maybe

    grace = sweep.spec.heartbeat.grace
    clock = time.monotonic() + grace - 1
    monkeypatch.setattr(sweep_module.time, "monotonic", lambda: clock)
    w._beat_for_orphans()
    assert heartbeats(w, orphan) == 0  # still within the grace
    clock += 2
    w._beat_for_orphans()
    assert heartbeats(w, orphan) == 1 and orphan._trial_id == trial_id


def test_a_second_stop_while_one_is_held_acts_at_once():
    """A stop is held while a trial is enqueued, so claim and trial are made together; a
    second one (the database stuck, the user insisting) is not held."""
    import signal

    from dit_bench.sweep import stops_deferred

    reached = []
    with pytest.raises(KeyboardInterrupt), stops_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the first")
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the second")
    assert reached == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_trial_stopped_on_another_machine_is_rerun_not_abandoned(tmp_path, monkeypatch):
    """Two machines share the study. Machine B's trial is the last one; A waits for it. The
    user stops B (Ctrl-C): B fails its trial as stopped. If B's `tell` lands after A's
    `_retry_failed` of that poll but before A's exit check, A saw no RUNNING/WAITING trial and
    returned: the point is never run, and A's command prints it as 'failed'."""
    import dit_bench.train.run as train_run

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    b = hand_worker(sweep, tmp_path, name="b")
    b._enqueue_grid(1)
    b_trial = b._pop_waiting()  # B trains the sweep's only (n_trials=1) point

    ran = []
    monkeypatch.setattr(train_run, "train", lambda cfg, out, **kw: ran.append(cfg.hash))
    monkeypatch.setattr(train_run, "find_run_dir", lambda out, cfg: None)
    a = Worker(sweep, b.storage_url, tmp_path / "runs", name="a", log=lambda m: None, poll=0)
    real_pop = Worker._pop_waiting
    polls = []

    def pop_then_b_is_stopped(self):
        got = real_pop(self)
        polls.append(1)
        if len(polls) == 2:  # B's Ctrl-C handler (`Worker._run`) runs just now
            b.study._storage.set_trial_user_attr(b_trial._trial_id, "interrupted", True)
            b.study.tell(b_trial, state=optuna.trial.TrialState.FAIL)
        return got

    monkeypatch.setattr(Worker, "_pop_waiting", pop_then_b_is_stopped)
    monkeypatch.setattr("time.sleep", lambda s: None)
    a.run(1)
    trials = a.study.get_trials()
    retries = [t for t in trials if t.user_attrs.get("retry_of") == b_trial.number]
    assert retries, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert len(ran) == 1  # A re-ran the stopped point before it exited


def test_a_heartbeat_grace_under_two_intervals_is_refused(tmp_path):
    """heartbeat: {interval: 30, grace: 10} was accepted; every running trial then went stale
    between two beats of its live worker and was failed and re-queued by any waiting worker
    (the live one trained on and threw its result away), until max_retry failed it for good."""
    with pytest.raises(ConfigError, match=r"grace=5 must be at least twice interval=3"):
        load_sweep(write_tiny(tmp_path / "t.yaml", heartbeat={"interval": 3, "grace": 5}))
    assert load_sweep(write_tiny(tmp_path / "ok.yaml", heartbeat={"interval": 3, "grace": 6}))
    assert Heartbeat().grace >= 2 * Heartbeat().interval  # the defaults, 10 and 60


def test_a_worker_whose_trial_was_taken_over_before_training_goes_on_quietly(tmp_path, monkeypatch):
    """The worker paused (or slow: the first trial's torch/lightning imports run after
    `_pop_waiting`'s one heartbeat and before `_Heartbeat` starts) past the grace after
    starting its trial, and another worker failed it as stale and re-queued it. Its first
    write (`suggest`) raised UpdateFinishedTrialError out of `_run`: the worker process
    crashed with a traceback, instead of leaving the trial to the retry."""
    import dit_bench.sweep as sweep_module

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    w._enqueue_grid(1)
    trial = w._pop_waiting()
    real_suggest = sweep_module.suggest

    def taken_over_then_suggest(t, s):  # another worker fails it as stale just before
        w.study.tell(optuna.Trial(w.study, trial._trial_id), state=optuna.trial.TrialState.FAIL)
        return real_suggest(t, s)

    monkeypatch.setattr(sweep_module, "suggest", taken_over_then_suggest)
    w._run(trial)  # currently: optuna.exceptions.UpdateFinishedTrialError
    assert w.study.trials[trial.number].state == optuna.trial.TrialState.FAIL


def test_a_stop_just_after_a_waiting_trial_is_set_running_fails_it_as_stopped(
    tmp_path, monkeypatch
):
    """Ctrl-C / SIGTERM after `_pop_waiting` set the trial RUNNING (in the commit's return, or
    in `optuna.Trial(...)`'s reads and sampler hook): the claim was given back and the trial
    left RUNNING with one heartbeat. After the grace it is failed as a lost worker's, so the
    user's stop spends heartbeat.max_retry (here 0: the point is failed for good), and the
    command's 'run again' waits a grace first."""
    hb = {"interval": 1, "grace": 3, "max_retry": 0}
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml", heartbeat=hb))
    w = hand_worker(sweep, tmp_path)
    w._enqueue_grid(1)

    def stopped(self, study, trial_id):
        raise KeyboardInterrupt

    monkeypatch.setattr(optuna.Trial, "__init__", stopped)
    with pytest.raises(KeyboardInterrupt):
        w._pop_waiting()
    monkeypatch.undo()
    t = w.study.trials[0]
    assert t.state != optuna.trial.TrialState.RUNNING, "left RUNNING after the stop"
    w._retry_failed()
    assert len(w.study.get_trials(states=WAITING)) == 1  # re-queued as stopped, not lost


def test_when_every_worker_died_the_sweep_does_not_say_the_others_took_over(
    tmp_path, monkeypatch, capsys
):
    import multiprocessing

    from dit_bench.sweep import run_sweep

    class DeadProcess:  # a worker that died (the OOM killer, a crash) before finishing
        exitcode = -9

        def __init__(self, target, args, name):
            self.ready = args[-1]

        def start(self):
            self.ready.set()  # past spawn's start: it died in its trials

        def join(self, timeout=None):
            pass

        def is_alive(self):
            return False

    class Ctx:
        Process = DeadProcess
        Event = threading.Event

    monkeypatch.setattr(multiprocessing, "get_context", lambda kind: Ctx)
    monkeypatch.setattr("dit_bench.sweep._gpu_count", lambda: 0)
    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    run_sweep(sweep, tmp_path / "runs", workers=2, progress=False)
    err = capsys.readouterr().err
    assert "2 of 2 workers died" in err
    assert "the others took over" not in err, err


def test_a_suspend_of_the_machine_does_not_fail_its_live_trials_as_stale(tmp_path, monkeypatch):
    """A laptop running `sweep --workers 2` on its SQLite study is suspended for an hour: the
    heartbeats are by the wall clock, which moves on, so on resume every live trial's last beat
    is an hour old. The waiting worker polled before the training one's heartbeat thread beat
    again, failed that trial as a lost worker's (a retry spent) and re-queued it."""
    import dit_bench.sweep as sweep_module
    import dit_bench.train.run as train_run

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    b = hand_worker(sweep, tmp_path, name="b")
    b._enqueue_grid(1)
    b_trial = b._pop_waiting()  # B trains the sweep's only point; A waits for it
    monkeypatch.setattr(train_run, "train", lambda cfg, out, **kw: None)
    monkeypatch.setattr(train_run, "find_run_dir", lambda out, cfg: None)
    a = Worker(sweep, b.storage_url, tmp_path / "runs", name="a", log=lambda m: None, poll=0)
    wall, skipped = time.time, []

    def sleep(seconds):
        skipped.append(seconds)
        if len(skipped) == 1:  # the lid closes for an hour, while A waits
            monkeypatch.setattr(sweep_module.time, "time", lambda: wall() + 3600)
            with b.claims.engine.begin() as conn:
                conn.exec_driver_sql(
                    "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-3600 seconds')"
                )
        elif len(skipped) == 2:  # B's heartbeat thread beats again, B then finishes its trial
            b.storage.record_heartbeat(b_trial._trial_id)
            if not b.study.trials[b_trial.number].state.is_finished():
                b.study.tell(b_trial, 1.0)

    monkeypatch.setattr("time.sleep", sleep)
    a.run(1)
    trials = [(t.number, t.state.name, t.user_attrs.get("retry_of")) for t in a.study.trials]
    assert trials == [(b_trial.number, "COMPLETE", None)]


def test_a_trial_still_without_a_beat_one_grace_after_a_suspend_is_failed(tmp_path, monkeypatch):
    import dit_bench.sweep as sweep_module

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    w = hand_worker(sweep, tmp_path)
    w._enqueue_grid(1)
    trial = w._pop_waiting()  # its worker is suspended with the machine, and killed on resume
    w._fail_stale_trials()
    wall, mono = time.time, time.monotonic
    monkeypatch.setattr(sweep_module.time, "time", lambda: wall() + 3600)
    with w.claims.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-3600 seconds')"
        )
    w._fail_stale_trials()
    assert w.study.trials[trial.number].state == optuna.trial.TrialState.RUNNING
    grace = sweep.spec.heartbeat.grace
    monkeypatch.setattr(sweep_module.time, "monotonic", lambda: mono() + grace + 1)
    w._fail_stale_trials()
    assert w.study.trials[trial.number].state == optuna.trial.TrialState.FAIL


def test_a_stopped_sweep_gives_its_workers_their_30_s_by_elapsed_time(tmp_path, monkeypatch):
    """Ctrl-C: the workers have 30 s to fail their trials as stopped (re-run by the next call,
    no retry spent) before they are killed (left to go stale: a retry spent each). A wall
    clock stepped ahead just then (NTP) gave them none."""
    import itertools
    import multiprocessing

    from dit_bench.sweep import run_sweep

    sweep = load_sweep(write_tiny(tmp_path / "t.yaml"))
    waits = []

    class Worker:
        def __init__(self, target, args, name):
            pass

        def start(self):
            pass

        def join(self, timeout=None):
            if timeout is None:  # the user's Ctrl-C; the clock steps an hour after one look
                looks = itertools.count()
                monkeypatch.setattr(time, "time", lambda: wall() + 3600 * min(next(looks), 1))
                raise KeyboardInterrupt
            waits.append(timeout)

        def is_alive(self):
            return not waits

        def kill(self):
            pass

    class Context:
        Process = Worker
        Event = threading.Event

    wall = time.time
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: Context())
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path / "runs", workers=2)
    assert waits[0] > 25
