"""Invariants behind the numbers the reports and the benchmark print, each checked against a
value this file computes itself from synthetic inputs (no training, no real timing).

Why: a mutation-testing audit found one-line changes to these functions that the rest of the
suite let through, each of which would put a wrong number in a report: a run's final metric
taken from its first logged row, curve values overriding the summary, cost rows under the wrong
variant, the ranking upside down, FLOPs with the wrong factor, a failed attempt shadowing the
finished one, held-out checks that peek at the budget they claim to predict, MFU against the
wrong peak, an inverted speed ratio, label adherence counting the misses, a dead worker's trial
queued once per worker that notices it.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_report_ablation import fake_run
from test_scaling import BUDGETS, LAW, fake_sweep
from test_sweep import write_tiny
from torch import nn

from dit_bench import bench
from dit_bench.metrics.evaluate import score
from dit_bench.report import fits, scaling
from dit_bench.report.ablation import build_report, cost_table, final_values
from dit_bench.report.results import collect, curves

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


# -- ablation report --------------------------------------------------------------------------
def test_final_value_is_the_summary_value_else_the_last_logged_one():
    table = pd.DataFrame({"run_dir": ["r1", "r2"], "val_loss": [0.5, np.nan]})
    # rows out of step order, as concatenated logs can be: "last" means the largest step
    rows = [
        ("r1", 300, "val/loss", 0.9),
        ("r1", 100, "val/loss", 0.7),
        ("r1", 200, "val/loss", 0.8),
        ("r2", 200, "val/loss", 0.4),
        ("r2", 100, "val/loss", 0.6),
        ("r1", 100, "val/FD-x", 30.0),
        ("r1", 300, "val/FD-x", 10.0),
        ("r1", 200, "val/FD-x", 20.0),
        ("r2", 100, "val/FD-x", 50.0),
        ("r2", 200, "val/FD-x", 40.0),
    ]
    long = pd.DataFrame(rows, columns=["run_dir", "step", "metric", "value"])
    expected_last = {}
    for run, step, metric, value in rows:
        key = (run, metric.replace("/", "_"))
        if key not in expected_last or step > expected_last[key][0]:
            expected_last[key] = (step, value)

    out = final_values(table, long, ["val_loss", "val_FD-x"]).set_index("run_dir")
    # r1 has a summary val_loss: it wins over the curve (0.9)
    assert out.loc["r1", "val_loss"] == 0.5
    # r2's summary lacks it: the curve's value at its largest step
    assert out.loc["r2", "val_loss"] == expected_last[("r2", "val_loss")][1] == 0.4
    # FD lives in metrics.csv only: the last evaluation, not the first
    assert out.loc["r1", "val_FD-x"] == expected_last[("r1", "val_FD-x")][1] == 10.0
    assert out.loc["r2", "val_FD-x"] == expected_last[("r2", "val_FD-x")][1] == 40.0


def test_cost_table_rows_follow_the_plan_order_and_belong_to_their_variant():
    # plan order is deliberately not alphabetical, and each variant has its own seed count
    order = ["zero", "adaln", "context"]
    per_variant = {"zero": (1004, 3), "adaln": (1005, 2), "context": (1007, 1)}
    runs = pd.DataFrame(
        [
            {"variant": v, "seed": s, "params": p, "macs": 13e6, "img_per_s": 100.0 + s}
            for v, (p, n) in per_variant.items()
            for s in range(n)
        ]
    )
    t = cost_table(runs, order)
    assert t["variant"].tolist() == order
    for row in t.itertuples():
        params, seeds = per_variant[row.variant]
        assert row.params == params, row.variant
        assert row.seeds == seeds, row.variant
        assert row.img_per_s == pytest.approx(100.0 + (seeds - 1) / 2)  # mean over its seeds


def test_ranking_puts_the_lowest_mean_loss_first(tmp_path):
    source = tmp_path / "runs" / "toy"
    offsets = {"zero": 0.0, "adaln": -0.03, "context": 0.04}  # plan order, not loss order
    for variant, offset in offsets.items():
        for seed in range(3):
            fake_run(source, variant, seed, offset)
    plan = {"name": "toy", "variants": list(offsets), "base_variant": "zero"}
    plan["metrics"] = ["val_loss"]
    (source / "ablation.json").write_text(json.dumps(plan))

    losses: dict[str, list[float]] = {}
    for summary in source.glob("*/summary.json"):
        labels = json.loads((summary.parent / "labels.json").read_text())
        losses.setdefault(labels["variant"], []).append(json.loads(summary.read_text())["val_loss"])
    expected = sorted(losses, key=lambda v: np.mean(losses[v]))
    assert expected == ["adaln", "zero", "context"]

    md = build_report(source, tmp_path / "report").read_text()
    section = md.split("## Ranking by final val_loss", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    found = [(int(r[1]), r[2].strip().strip("*")) for r in rows]
    assert found == list(enumerate(expected, 1))


def test_curves_count_images_as_steps_times_batch_and_flops_as_3_fwd_images(tmp_path):
    run = fake_run(tmp_path / "runs", "adaln", 0, 0.0)
    summary = json.loads((run / "summary.json").read_text())
    long = curves(collect([run]))
    expected_images = long["step"] * summary["batch_size"]
    assert (long["images"] == expected_images).all()
    assert (long["train_flops"] == 3 * summary["flops"] * expected_images).all()
    # at the run's last step the curve's FLOPs are the summary's training FLOPs
    last = long[long["step"] == summary["steps"]]
    assert (last["train_flops"] == summary["train_flops"]).all()


# -- scaling report ---------------------------------------------------------------------------
def _trial(path: Path, **fields) -> None:
    path.mkdir(parents=True)
    (path / "trial.json").write_text(json.dumps(fields))


def test_a_rerun_trials_complete_record_wins_over_its_failed_attempt(tmp_path):
    # read in path order: the failed attempt comes first, the finished re-run after it
    _trial(tmp_path / "a-first", config_hash="h1", state="FAIL", val_loss=None)
    _trial(tmp_path / "b-rerun", config_hash="h1", state="COMPLETE", val_loss=0.42)
    _trial(tmp_path / "c-other", config_hash="h2", state="COMPLETE", val_loss=0.5)
    recs = {r["config_hash"]: r for r in scaling.load_records(tmp_path)}
    assert sorted(recs) == ["h1", "h2"]
    assert recs["h1"]["state"] == "COMPLETE" and recs["h1"]["val_loss"] == 0.42
    assert recs["h1"]["run_dir"].endswith("b-rerun")


def test_the_size_label_is_the_size_choice_when_the_sweep_has_one(tmp_path):
    fake_sweep(tmp_path)  # every size shares depth 2 and width 64: only the choice tells them
    recs = scaling.load_records(tmp_path)
    runs, points, _ = scaling.tables(recs)
    by_hash = {r["config_hash"]: r["trial_params"]["size"] for r in recs}
    assert dict(zip(runs["run"], runs["size"], strict=True)) == by_hash
    assert set(points["size"]) == {"S", "M", "L", "XL"}
    # without a size choice the label falls back to the architecture
    bare = {**recs[0], "trial_params": {"backbone.patch_size": 2}, "point": "backbone.patch_size=2"}
    assert scaling.tables([bare])[0]["size"].tolist() == ["d2-w64"]


def test_scaling_runs_table_names_each_runs_experiment_not_its_overridden_preset(tmp_path):
    # DESIGN's results table: one row per run with its experiment among the columns. The
    # backbone's name is left out: a trial's sizes and patch override it (size L at patch 2
    # read "dit-xs/4"), and depth, width, heads and patch name the model instead
    fake_sweep(tmp_path)
    recs = scaling.load_records(tmp_path)
    recs[0] = {**recs[0], "experiment": "sweep-cpu", "backbone": "dit-xs/4"}
    runs, _, _ = scaling.tables(recs)
    assert runs.loc[0, "experiment"] == "sweep-cpu" and "backbone" not in runs
    assert {"depth", "width", "heads", "patch"} <= set(runs)


def test_isoflop_points_keep_the_lowest_loss_patch_per_budget_and_size():
    rng = np.random.default_rng(0)
    points = pd.DataFrame(
        [
            {"budget": b, "train_flops": b, "size": s, "patch": p, "val_loss": rng.uniform(1, 2)}
            for b in (1e10, 2e10)
            for s in ("S", "M")
            for p in (2, 4, 8)
        ]
    )
    picked = scaling._isoflop_points(points)
    assert len(picked) == 4
    for row in picked.itertuples():
        same = points[(points["budget"] == row.budget) & (points["size"] == row.size)]
        assert row.val_loss == min(same["val_loss"])


def test_heldout_checks_fit_without_the_largest_budget_and_predict_it(tmp_path):
    # the law holds exactly except at the largest budget, where every loss is 2% higher: a fit
    # that never saw that budget predicts the law's value there, one that saw it would not
    fake_sweep(tmp_path)
    recs = scaling.load_records(tmp_path)
    # by the law one run is best at every budget, a frontier of one run (no L(C) is fitted to
    # a learning curve): a twin of it (another seed, say) a hair better at the first budget
    # makes the frontier two runs on the same curve
    _, points, _ = scaling.tables(recs)
    best = points.loc[points["val_loss"].idxmin(), "run"]
    twin = copy.deepcopy(next(r for r in recs if r["config_hash"] == best))
    twin["config_hash"] = "twin"
    twin["val_at_budget"][0] *= 1 - 1e-12
    recs.append(twin)
    bump = 1.02
    law_at_cmax = {}
    for r in recs:
        law_at_cmax[r["config_hash"]] = r["val_at_budget"][-1]
        r["val_at_budget"][-1] *= bump
    _, points, _ = scaling.tables(recs)
    cmax = max(BUDGETS)
    held = {h["fit"]: h for h in scaling.fit_all(points, n_boot=1)["heldout"]}

    # L(C): the envelope is one curve, an exact power law below cmax
    env = points.loc[points.groupby("budget")["val_loss"].idxmin()]
    inner = env[env["budget"] < cmax]
    fit = fits.fit_power_law(inner["train_flops"], inner["val_loss"])
    last = env[env["budget"] == cmax].iloc[0]
    pred = float(fit.predict(last["train_flops"]))
    h = held["L(C) all"]
    assert h["budget"] == cmax
    assert h["predicted"] == pytest.approx(pred, rel=1e-9)
    assert h["predicted"] == pytest.approx(law_at_cmax[last["run"]], rel=1e-6)
    assert h["actual"] == pytest.approx(last["val_loss"], rel=1e-12)
    # the report's column: predicted / actual - 1 (negative: the fit under-predicts the bump)
    assert h["rel_error"] == pytest.approx(h["predicted"] / h["actual"] - 1, rel=1e-9)
    assert h["rel_error"] == pytest.approx(1 / bump - 1, rel=1e-6)

    # L(N, D): fitted on the other budgets, it recovers LAW and predicts the unbumped losses
    h = held["L(N, D) all"]
    at_cmax = points[points["budget"] == cmax]
    law = LAW["E"] + LAW["A"] / at_cmax["params"] ** LAW["a"]
    law = law + LAW["B"] / at_cmax["tokens_seen"] ** LAW["b"]
    assert h["predicted"] == pytest.approx(float(law.mean()), rel=1e-4)
    assert h["actual"] == pytest.approx(float(at_cmax["val_loss"].mean()), rel=1e-12)
    assert h["rel_error"] == pytest.approx(1 - 1 / bump, rel=1e-3)


def test_overhead_fraction_is_the_median_over_trials():
    walls, overheads = [10.0, 10.0, 10.0], [1.0, 2.0, 6.0]  # fractions .1 .2 .6: mean .3
    runs = pd.DataFrame(
        {
            "time_wall_s": walls,
            "time_train_steps_s": [9.0, 8.0, 4.0],
            "time_overhead_s": overheads,
            "time_overhead_excl_val_s": [0.5, 1.0, 3.0],
            "time_budget_val_s": [0.5, 1.0, 3.0],
        }
    )
    o = scaling.overhead_summary(runs)
    expected = statistics.median(x / w for x, w in zip(overheads, walls, strict=True))
    assert o["overhead_fraction_median"] == pytest.approx(expected) == pytest.approx(0.2)
    # trials of unequal length: the median of the fractions, not a ratio of two medians (0.2)
    runs = runs.assign(time_wall_s=[10.0, 20.0, 40.0], time_overhead_s=[1.0, 6.0, 4.0])
    assert scaling.overhead_summary(runs)["overhead_fraction_median"] == pytest.approx(0.1)


# -- bench ------------------------------------------------------------------------------------
class _Clock:
    """A stand-in for `time` whose clock moves only when told: timings are exact."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_matmul_peak_counts_2_n_cubed_flops_per_product(monkeypatch):
    clock = _Clock(tick=0.5)  # every timed group reads exactly 0.5 s
    monkeypatch.setattr(bench, "time", clock)
    n = 4
    out = bench.matmul_peak(torch.device("cpu"), "fp32", n=n, seconds=0.0)
    # 0.5 s per timing call pair -> groups of one product: n^3 multiply-adds = 2 n^3 FLOPs
    assert out["flops_per_s"] == pytest.approx(2 * n**3 / 0.5)


class _FakeNet(nn.Module):
    num_tokens = 16

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))

    def flops(self, batch: int = 1) -> dict:
        return {"flops": 1e6 * batch}


def test_bench_rows_median_iqr_mfu_and_speed_ratio_from_known_step_times(monkeypatch):
    clock = _Clock()
    durations = {
        "dit-bench": [0.5, 0.25, 1.0, 0.75, 2.0],
        "diffusers": [1.5, 1.5, 1.5, 1.5, 1.5],
    }
    impls = [
        bench.Impl("dit-bench", "dit-bench", False, _FakeNet(), None),
        bench.Impl("diffusers", "diffusers", False, _FakeNet(), None),
    ]

    def fake_step_fn(impl, cfg, device, inputs):
        left = list(durations[impl.label])

        def step():
            clock.now += left.pop(0)

        return step, SimpleNamespace(defaults={"fused": False})

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "build_impls", lambda name, cfg, device: impls)
    monkeypatch.setattr(bench, "bench_inputs", lambda cfg, device: None)
    monkeypatch.setattr(bench, "step_fn", fake_step_fn)
    monkeypatch.setattr(bench, "cpu_peak_transient_bytes", lambda step: None)  # no more steps
    cfg = bench.BenchConfig(warmup=0, repeats=5, batch=4, device="cpu")
    peak, sheet = 1e8, 4e8
    rows = {r.label: r for r in bench.bench_training("fake", cfg, peak=peak, sheet=sheet)}

    ours, ref = rows["dit-bench"], rows["diffusers"]
    ts = durations["dit-bench"]
    med = float(np.median(ts))
    q25, q75 = np.percentile(ts, [25, 75])  # numpy's linear: statistics' "inclusive"
    assert ours.median_s == med == 0.75
    assert ours.iqr_s == pytest.approx(q75 - q25) == pytest.approx(0.5)
    achieved = 3 * 1e6 * cfg.batch / med
    assert ours.mfu_measured == pytest.approx(achieved / peak)
    assert ours.mfu_datasheet == pytest.approx(achieved / sheet)
    # throughput ratio: the reference's time over ours, > 1 when ours is faster
    assert ours.vs_reference == pytest.approx(1.5 / 0.75) == pytest.approx(2.0)
    assert ref.vs_reference == pytest.approx(1.0)


# -- eval -------------------------------------------------------------------------------------
def test_label_adherence_is_the_fraction_classified_as_their_label():
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]  # classified as 0, 1, 2, 1
    labels = torch.tensor([0, 1, 1, 1])
    net = SimpleNamespace(suffix="-toy", metric_prefix="FD-toy")
    out = score(np.zeros((4, 2)), logits, None, net, [], labels=labels)
    hits = sum(int(np.argmax(row)) == int(y) for row, y in zip(logits, labels, strict=True))
    assert out["adherence-toy"] == hits / len(labels) == 0.75


# -- sweep ------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_dead_workers_trial_is_requeued_once_however_many_workers_notice(tmp_path):
    import optuna

    from dit_bench.sweep import Claims, Worker, load_sweep, open_study

    sweep = load_sweep(write_tiny(tmp_path / "tiny.yaml"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    workers = []
    for name in ("w1", "w2"):
        w = Worker(sweep, url, tmp_path / "runs", name=name, log=lambda m: None)
        w.study, rdb = open_study(sweep, url)
        w.storage = w.study._storage
        w.claims = Claims(rdb, w.study._study_id, name)
        workers.append(w)
    study = workers[0].study
    lost = study.ask()
    lost.set_user_attr("attempt", 1)
    study.tell(lost, state=optuna.trial.TrialState.FAIL)  # as fail_stale_trials leaves it

    for w in (*workers, workers[0]):  # both workers' loops, and w1's next round
        w._retry_failed()
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].user_attrs == {"attempt": 2, "retry_of": lost.number}


def _fake_bench(monkeypatch, durations: dict[str, list[float]], calls: list[str], cuda=False):
    """bench_training over fake implementations whose steps take `durations` (in turn) on a
    fake clock, each step's label appended to `calls`. `cuda`: a fake CUDA device, where a
    step only queues its work and the clock moves when `torch.cuda.synchronize` waits for it,
    and every step allocates 1000 bytes above what was allocated before it."""
    clock = _Clock()
    queued = [0.0]
    impls = [bench.Impl(k, k, False, _FakeNet(), None) for k in durations]

    def fake_step_fn(impl, cfg, device, inputs):
        left = list(durations[impl.label])

        def step():
            calls.append(impl.label)
            if cuda:
                queued[0] += left.pop(0)
            else:
                clock.now += left.pop(0)

        return step, SimpleNamespace(defaults={"fused": False}, state={})

    def synchronize(device):
        clock.now += queued[0]
        queued[0] = 0.0

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "build_impls", lambda name, cfg, device: impls)
    monkeypatch.setattr(bench, "bench_inputs", lambda cfg, device: None)
    monkeypatch.setattr(bench, "step_fn", fake_step_fn)
    monkeypatch.setattr(bench, "cpu_peak_transient_bytes", lambda step: None)  # no more steps
    if cuda:
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5000)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 6000)
        monkeypatch.setattr(bench.BenchConfig, "resolved_device", lambda self: torch.device("cuda"))


@pytest.mark.parametrize("cuda", [False, True])
def test_bench_rotates_the_first_implementation_and_waits_for_each_step(monkeypatch, cuda):
    """Noise that drifts over the timed steps (another job starting, clocks settling) hits
    every implementation alike only if none always steps first; `first_step_s` is the first
    warm-up step, where a compiled backbone compiles, not a later warm one. On a GPU a step
    only queues its kernels: every time read waits for them (a fake device whose clock moves
    at the synchronisation), and the memory is the state plus the step's peak above it."""
    calls: list[str] = []
    durations = {"dit-bench": [9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "diffusers": [7.0] + [2.0] * 6}
    _fake_bench(monkeypatch, durations, calls, cuda=cuda)
    cfg = bench.BenchConfig(warmup=2, repeats=4, batch=4, device="cpu")
    rows = {r.label: r for r in bench.bench_training("fake", cfg)}
    timed = calls[2 * cfg.warmup : 2 * (cfg.warmup + cfg.repeats)]
    assert [timed[2 * r] for r in range(cfg.repeats)] == ["dit-bench", "diffusers"] * 2
    assert rows["dit-bench"].first_step_s == 9.0 and rows["diffusers"].first_step_s == 7.0
    assert rows["dit-bench"].median_s == 1.0 and rows["diffusers"].median_s == 2.0
    if cuda:  # 3 float32 weights, no gradients or moments; 6000 - 5000 bytes at the peak
        assert rows["dit-bench"].peak_mem_gb == pytest.approx((12 + 1000) / 2**30)


def test_matmul_peak_divides_each_timed_group_by_its_products(monkeypatch):
    """Products are timed in groups of about 20 ms (launch and sync latency off the peak): a
    group's time is that of `group` products, each 2 n^3 FLOPs."""
    clock = _Clock()
    dt = 0.004  # every product's; groups of ceil(0.02 / dt) = 5
    mm = torch.mm

    def timed_mm(a, b, out):
        clock.now += dt
        return mm(a, b, out=out)

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(torch, "mm", timed_mm)
    n = 4
    out = bench.matmul_peak(torch.device("cpu"), "fp32", n=n, seconds=0.0)
    assert out["flops_per_s"] == pytest.approx(2 * n**3 / dt)
