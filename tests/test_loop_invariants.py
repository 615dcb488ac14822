"""Invariants of the training loop's bookkeeping: what gets logged, sampled and timed, and when.

The end-to-end tests train runs whose length is a multiple of every interval, never resume past
a logged row, and read only numbers that stay plausible when the bookkeeping is off by a step.
A mutation audit found one-line bugs in the callbacks, the data module and the bf16 stream hook
that survive them all, each of which gives a user wrong numbers or lost rows: a resumed
metrics.csv logging a step twice, no validation / FD / sample grid at a final step off the
interval, an in-training FD whose seed moves with the step, a sweep's pruner missing its
budgets, timing splits that count validations as training, a checkpoint torn by a kill,
loader workers that repeat steps, a validation set of the wrong size, integer tensors cast to
bf16.

One short training (its length off every interval, a ValAtSteps watching it) feeds the tests
that need Lightning's loop; the rest call the callbacks directly on small stubs, where the
clock, the samples or the step can be set by hand.
"""

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from test_train import InterruptAt, read_csv, tiny
from torch import nn
from torch.utils.data import DataLoader

from dit_bench.data.datasets import batch_indices
from dit_bench.data.module import DiffusionDataModule, StepBatches
from dit_bench.fast import bf16_stream
from dit_bench.train import callbacks
from dit_bench.train.callbacks import (
    AtomicCheckpointIO,
    CSVMetrics,
    FrechetDistanceMetric,
    SampleGrid,
    StepMetrics,
    ValAtSteps,
    read_metrics,
)
from dit_bench.train.module import DiffusionModule
from dit_bench.train.run import find_run_dir, grid_sampler, train

# Tiny models sampled in-process, outside train() (which sets train.threads): on one thread,
# as train() runs them (a grid of 100 small samples: 13 s on two shared threads, 1 s on one)
pytestmark = pytest.mark.usefixtures("one_thread")

# 10 steps against intervals of 4: the last step is on no interval, so only the "and at the
# end" clauses put a validation, a grid or an FD there.
STEPS = 10
BUDGETS = (3, 8, 10)  # off the val interval, on it, and the final step


class Recorder:
    """A logger stub: the (step, metrics) of each log_metrics call."""

    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """One training of STEPS steps with a ValAtSteps at BUDGETS, recording what its on_val sees
    and the step of every validation actually computed."""
    validated, reported = [], []
    original = DiffusionModule.validation_metrics

    def counting(self, loader):
        validated.append(self.global_step)
        return original(self, loader)

    tracker = ValAtSteps(BUDGETS, on_val=lambda step, m: reported.append((step, m["val/loss"])))
    cfg = tiny(f"train.steps={STEPS}", "train.sample_every=4")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiffusionModule, "validation_metrics", counting)
        run = train(cfg, tmp_path_factory.mktemp("watched"), progress=False, callbacks=[tracker])
    return SimpleNamespace(run=run, tracker=tracker, validated=validated, reported=reported)


# -- what a run logs and samples, and when ------------------------------------------------------
def test_sample_grids_come_at_every_interval_and_at_a_final_step_off_it(watched_run):
    grids = sorted(p.name for p in (watched_run.run / "samples").glob("*.png"))
    assert grids == ["step-0000004.png", "step-0000008.png", "step-0000010.png"]


def test_val_at_steps_reports_each_budget_once_with_the_logged_val_loss(watched_run):
    """A sweep prunes on these values: each budget step is reported exactly once, with the
    val loss metrics.csv holds for it, and a step StepMetrics validates anyway (on the interval,
    the final one) is read back from it, not validated a second time."""
    rows = {int(r["step"]): r for r in read_csv(watched_run.run / "metrics.csv")}
    assert [s for s, _ in watched_run.reported] == list(BUDGETS)
    for step, value in watched_run.reported:
        assert value == float(rows[step]["val/loss"]), step
    assert watched_run.validated == [3, 4, 8, 10]


def test_val_fd_and_grid_callbacks_fire_on_the_interval_and_at_a_final_step_off_it(tmp_path):
    trainer = SimpleNamespace(
        max_steps=STEPS,
        optimizers=[SimpleNamespace(param_groups=[{"lr": 0.1}])],
        loggers=[Recorder()],
        datamodule=SimpleNamespace(fixed_val_loader=lambda: None),
    )
    module = SimpleNamespace(
        pop_train_loss=lambda: 1.0,
        validation_metrics=lambda loader: {"val/loss": 2.0},
    )
    metrics = StepMetrics(log_every=100, val_every=4)
    fd = FrechetDistanceMetric(tiny(), every=4, num_samples=8, features="digits-net")
    measured, grids = [], []
    fd.measure = lambda trainer, pl_module: measured.append(trainer.global_step)
    grid = SampleGrid(tmp_path, every=4, sample_fn=lambda t, m, path: grids.append(path.name))
    for step in range(1, STEPS + 1):
        metrics.on_train_batch_start(trainer, module, None, step - 1)
        trainer.global_step = step
        for callback in (metrics, fd, grid):
            callback.on_train_batch_end(trainer, module, None, None, step - 1)
    grid.on_train_end(trainer, module)
    assert [s for s, m in trainer.loggers[0].calls if "val/loss" in m] == [4, 8, 10]
    assert [s for s, m in trainer.loggers[0].calls if "train/loss" in m] == [10]  # the last window
    assert module.last_val["step"] == STEPS
    assert measured == [4, 8, 10]
    assert grids == ["step-0000004.png", "step-0000008.png", "step-0000010.png"]


def test_a_resumed_metrics_csv_holds_each_step_once(tmp_path):
    """Rows logged after the checkpoint the run resumes from are dropped, then logged again by
    the resumed run: the file ends as an uninterrupted run's, no step twice."""
    cfg = tiny(f"train.steps={STEPS}", "train.log_every=1")  # checkpoints every 4 steps
    with pytest.raises(KeyboardInterrupt):
        # before step 7's rows, after those of 5 and 6, which lie past the step-4 checkpoint
        train(cfg, tmp_path, progress=False, callbacks=[InterruptAt(7)])
    run = find_run_dir(tmp_path, cfg)
    assert [int(r["step"]) for r in read_csv(run / "metrics.csv")] == list(range(1, 7))
    train(cfg, tmp_path, progress=False)
    assert [int(r["step"]) for r in read_csv(run / "metrics.csv")] == list(range(1, STEPS + 1))


def test_a_runs_metrics_csv_is_only_ever_appended_to_so_tail_f_follows_it(tmp_path, monkeypatch):
    """`tail -f metrics.csv` follows one file from its offset: a file written whole and
    renamed at the first validation (a new column) left it on the old file, and a last row
    written again in place (the step's val loss joining its train loss) made GNU tail print
    the whole file again. Every state of the file a step leaves is a prefix of the next."""

    class Snapshots(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, *_):
            path = Path(trainer.default_root_dir) / "metrics.csv"
            self.seen.append(path.read_bytes() if path.exists() else b"")

    written = []
    real = callbacks.write_text_atomic
    monkeypatch.setattr(
        callbacks, "write_text_atomic", lambda path, text: written.append(1) or real(path, text)
    )
    snapshots = Snapshots()
    cfg = tiny(f"train.steps={STEPS}", "train.log_every=1", "train.val_every=3")
    run = train(cfg, tmp_path, progress=False, callbacks=[snapshots])
    final = (run / "metrics.csv").read_bytes()
    assert len(snapshots.seen) == STEPS and all(final.startswith(s) for s in snapshots.seen)
    assert written == [1]  # the first row, under every column the run logs
    rows = read_csv(run / "metrics.csv")
    assert [r["step"] for r in rows] == [str(k) for k in range(1, STEPS + 1)]
    assert [r["step"] for r in rows if r["val/loss"]] == ["3", "6", "9", "10"]
    assert all(r["train/loss"] for r in rows)


def test_csv_metrics_on_resume_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    old = CSVMetrics(path)
    for step in (2, 4, 6, 8):
        old.log_metrics({"train/loss": float(step)}, step=step)
    old.flush()
    resumed = CSVMetrics(path, resume_step=4)
    resumed.log_metrics({"train/loss": 60.0}, step=6)
    resumed.flush()
    assert [(r["step"], r["train/loss"]) for r in read_csv(path)] == [
        ("2", "2.0"),
        ("4", "4.0"),
        ("6", "60.0"),
    ]


def _csv_as_rewritten(logs) -> bytes:
    """metrics.csv of `logs` ((step, metrics) in order) as a whole-file write makes it."""
    import csv as _csv
    import io

    rows: list[dict] = []
    for step, metrics in logs:
        if rows and rows[-1]["step"] == step:
            rows[-1].update(metrics)
        else:
            rows.append({"step": step, **metrics})
    text = io.StringIO(newline="")
    w = _csv.DictWriter(text, fieldnames=["step"] + sorted({k for r in rows for k in r} - {"step"}))
    w.writeheader()
    w.writerows(rows)
    return text.getvalue().encode()


def test_csv_metrics_appends_rows_and_rewrites_only_for_a_new_column(tmp_path, monkeypatch):
    """A log window's row is appended to metrics.csv, not the whole file written again (which
    grew with the run: 100 ms a window at 20,000 rows); a step's val metrics join its row
    before it is written; only a new column (the first val loss, an FD) writes it whole.
    The file is byte for byte a whole-file write's, also after a resume."""
    writes = []
    real = callbacks.write_text_atomic
    monkeypatch.setattr(
        callbacks, "write_text_atomic", lambda path, text: writes.append(1) or real(path, text)
    )
    logs = []
    for step in range(1, 121):
        logs.append((step, {"train/loss": 1.0 / step, "lr": 1e-3}))
        if step % 20 == 0:
            logs.append((step, {"val/loss": 2.0 / step, "val/loss_l0": 0.5}))
        if step == 100:
            logs.append((step, {"val/FD-mnist-net": 7.25}))
    path = tmp_path / "metrics.csv"
    log = CSVMetrics(path)
    for step, metrics in logs:
        log.log_metrics(metrics, step=step)
    log.flush()
    assert path.read_bytes() == _csv_as_rewritten(logs)
    assert len(writes) == 3  # the first row, the first val row, the FD
    # resumed from step 60: the rows after it go, the rest is logged again
    writes.clear()
    resumed = CSVMetrics(path, resume_step=60)
    for step, metrics in logs:
        if step > 60:
            resumed.log_metrics(metrics, step=step)
    resumed.finalize("success")
    assert path.read_bytes() == _csv_as_rewritten(logs)
    assert len(writes) == 1  # the rows up to the checkpoint; every column is in the file


def test_csv_metrics_val_rows_cost_the_same_at_any_length(tmp_path, monkeypatch):
    """A val (or FD) step's metrics join the row of its train loss without the whole file
    written again: rewritten at each, a run's logging grew with the square of its rows (16,000
    rows with a val every 10 took 86 s, 4 times the 8,000 rows' 24 s)."""
    written = []
    real = callbacks.write_text_atomic
    monkeypatch.setattr(
        callbacks,
        "write_text_atomic",
        lambda path, text: written.append(text.count("\n")) or real(path, text),
    )
    logs = []
    for step in range(1, 1001):
        logs.append((step, {"train/loss": 1.0 / step, "lr": 1e-3}))
        if step % 10 == 0:
            logs.append((step, {"val/loss": 2.0 / step}))
    path = tmp_path / "metrics.csv"
    log = CSVMetrics(path)
    for step, metrics in logs:
        log.log_metrics(metrics, step=step)
        log.flush()  # as WriteMetricsRow does after each step's callbacks
    assert path.read_bytes() == _csv_as_rewritten(logs)
    assert sum(written) < 50  # lines: the first row's file and the first val column's


def test_csv_metrics_on_resume_drops_a_val_row_cut_short_in_its_rewrite(tmp_path, monkeypatch):
    """A row whose step logs again after it was written (Lightning's SLURM requeue flushes
    mid-step) is written again in place; a write stopped partway (a kill, a full disk) leaves
    the row cut short, which resuming drops, never a mix of its old and new cells."""
    path = tmp_path / "metrics.csv"
    log = CSVMetrics(path)
    for step in (2, 4):
        log.log_metrics({"train/loss": 0.5, "lr": 0.1, "val/loss": 0.75}, step=step)
    log.log_metrics({"train/loss": 0.25, "lr": 0.1}, step=6)
    log.finalize("finished")

    def stops_partway(self, offset, text):  # the first 5 bytes of the row reach the disk
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.truncate()
            f.write(text.encode()[:5])
        raise OSError("No space left on device")

    monkeypatch.setattr(CSVMetrics, "_write_from", stops_partway)
    log.log_metrics({"val/loss": 0.125}, step=6)
    with pytest.raises(OSError):
        log.flush()
    assert [r["step"] for r in read_metrics(path)] == ["2", "4"]
    monkeypatch.undo()
    resumed = CSVMetrics(path, resume_step=4)
    resumed.log_metrics({"train/loss": 0.25, "lr": 0.1, "val/loss": 0.125}, step=6)
    resumed.flush()
    assert [(r["step"], r["val/loss"]) for r in read_csv(path)] == [
        ("2", "0.75"),
        ("4", "0.75"),
        ("6", "0.125"),
    ]


def _two_rows_and(path, cut: str):
    """metrics.csv with the rows of steps 2 and 4, then `cut`: a row a kill stopped short."""
    log = CSVMetrics(path)
    for step in (2, 4):
        log.log_metrics({"train/loss": 0.5, "lr": 0.1}, step=step)
    log.flush()
    with path.open("a", newline="") as f:
        f.write(cut)


def test_csv_metrics_on_resume_drops_a_row_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "metrics.csv"
    _two_rows_and(path, "1")  # step 10's row, killed after its first digit
    resumed = CSVMetrics(path, resume_step=4)
    resumed.log_metrics({"train/loss": 0.25, "lr": 0.1}, step=6)
    resumed.flush()
    assert [r["step"] for r in read_csv(path)] == ["2", "4", "6"]


def test_read_metrics_drops_a_last_row_whose_last_value_was_cut_short(tmp_path):
    # every field there, the last one cut ("0.1" of "0.1234"): only its missing newline tells
    path = tmp_path / "metrics.csv"
    _two_rows_and(path, "6,0.1,0.1")  # step 6's row "6,0.1,0.1234\n", stopped before its end
    assert [r["step"] for r in read_metrics(path)] == ["2", "4"]


def test_csv_metrics_leaves_out_lightnings_epoch_counter(tmp_path):
    # Lightning adds "epoch" to whatever a module logs with self.log(logger=True); the step
    # stream has no epochs, and a column of zeros would only mislead.
    path = tmp_path / "metrics.csv"
    log = CSVMetrics(path)
    log.log_metrics({"train/loss": 0.5, "epoch": 0}, step=2)
    log.flush()
    assert read_csv(path) == [{"step": "2", "train/loss": "0.5"}]


# -- the in-training FD ---------------------------------------------------------------------------
def fd_metric(cfg) -> FrechetDistanceMetric:
    """The FD callback with a stand-in feature net (four pixel sums: a NaN pixel makes its
    sample's features NaN, as with a real net) and reference statistics, so no feature net is
    trained or loaded."""
    fd = FrechetDistanceMetric(cfg, every=4, num_samples=8, features="digits-net")

    def features(images):
        return images.flatten(1).reshape(len(images), 4, -1).sum(-1).double().numpy(), None

    fd._net = SimpleNamespace(metric_prefix="FD-stub", features=features, dim=4)
    fd._ref = SimpleNamespace(mu=torch.zeros(4).numpy(), sigma=torch.eye(4).double().numpy())
    return fd


def test_in_training_fd_reduces_each_chunk_to_features_before_the_next(one_chunk_at_a_time):
    # each process sampled its whole share, then took features: 7.9 GB of float32 for the gpu
    # profiles' 10,000 256x256 samples on one process. A chunk (train.batch_size) at a time,
    # with the FD of all the samples at once.
    from dit_bench.metrics import distances, evaluate

    torch.manual_seed(0)
    cfg = tiny()  # train.batch_size=8
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    fd = fd_metric(cfg)
    fd.num_samples = 20
    features, real = fd._net.features, evaluate.generate
    sizes = one_chunk_at_a_time(evaluate, "generate", held="result")
    trainer = SimpleNamespace(global_step=4, loggers=[Recorder()], global_rank=0, world_size=1)
    value = fd.measure(trainer, module)
    assert sizes == [8, 8, 4]
    e = cfg.eval
    whole = real(module, range(20), seed=fd.SEED, sampler=e.sampler, steps=e.sample_steps,
                 cfg_scale=e.cfg_scale, use_ema=e.use_ema, batch_size=8)  # fmt: skip
    expected = distances.frechet_distance(
        *distances.gaussian_stats(features(whole)[0]), fd._ref.mu, fd._ref.sigma
    )
    assert math.isfinite(value) and value == expected


def test_in_training_fd_of_the_same_weights_is_the_same_at_any_step():
    """The samples use one fixed seed, so values along a run differ by the weights only."""
    torch.manual_seed(0)
    cfg = tiny()
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    fd = fd_metric(cfg)
    values = []
    for step in (4, 8):
        trainer = SimpleNamespace(
            global_step=step, loggers=[Recorder()], global_rank=0, world_size=1
        )
        values.append(fd.measure(trainer, module))
    assert math.isfinite(values[0]) and values[0] == values[1]


def test_in_training_fd_samples_are_shared_by_the_processes(monkeypatch):
    """Under DDP each process samples its share of the indices (rank r: r, r + world, ...) and
    rank 0 scores the gathered features: the FD of one process's samples, drawn in half the
    time (on rank 0 alone, the other process waited in its next all-reduce for all of it)."""
    from dit_bench.metrics import evaluate

    torch.manual_seed(0)
    cfg = tiny()
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    drawn = {}
    generate = evaluate.generate

    def spy(module, indices, **kwargs):
        drawn.setdefault(kwargs["seed"], []).append(list(indices))
        return generate(module, indices, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy)
    alone = fd_metric(cfg).measure(
        SimpleNamespace(global_step=4, loggers=[Recorder()], global_rank=0, world_size=1), module
    )
    gathered = []  # the processes' padded rows, in rank order, as all_gather stacks them

    def trainer(rank):
        def all_gather(rows):
            gathered.insert(rank, rows)
            return torch.stack(gathered)

        strategy = SimpleNamespace(all_gather=all_gather)
        return SimpleNamespace(
            global_step=4, loggers=[Recorder()], global_rank=rank, world_size=2, strategy=strategy
        )

    assert math.isnan(fd_metric(cfg).measure(trainer(1), module))  # rank 1 scores nothing
    logged = trainer(0)
    shared = fd_metric(cfg).measure(logged, module)
    assert list(drawn.values())[0] == [list(range(8)), [1, 3, 5, 7], [0, 2, 4, 6]]
    assert shared == pytest.approx(alone, rel=1e-9) and math.isfinite(shared)
    assert logged.loggers[0].calls == [(4, {"val/FD-stub": shared})]


def test_one_non_finite_sample_makes_the_fd_nan_and_the_run_goes_on(monkeypatch, capsys):
    from dit_bench.metrics import evaluate

    images = torch.rand(8, 1, 8, 8)
    images[5, 0, 3, 3] = float("nan")  # one sample of eight: a diverging run's first sign
    monkeypatch.setattr(evaluate, "generate", lambda *args, **kwargs: images)
    fd = fd_metric(tiny())
    trainer = SimpleNamespace(global_step=4, loggers=[Recorder()], global_rank=0, world_size=1)
    module = SimpleNamespace(device=torch.device("cpu"))
    # scored instead, the NaN features would make scipy raise: the run would die at this step
    assert math.isnan(fd.measure(trainer, module))
    assert math.isnan(trainer.loggers[0].calls[0][1]["val/FD-stub"])
    assert math.isnan(module.last_fd["val/FD-stub"])
    assert "1 of 8 samples are not finite; val/FD-stub = nan" in capsys.readouterr().err


def test_the_non_finite_fd_line_names_its_run(monkeypatch, capsys):
    # `ablate --jobs` and a sweep's workers share one output: "[dit-bench] step 4: ..." did
    # not say which of the runs in flight began to diverge
    from dit_bench.metrics import evaluate

    images = torch.rand(8, 1, 8, 8)
    images[5, 0, 3, 3] = float("nan")
    monkeypatch.setattr(evaluate, "generate", lambda *args, **kwargs: images)
    fd = fd_metric(tiny())
    fd.announce = "ablate run 2/4 adaln seed 1"
    trainer = SimpleNamespace(global_step=4, loggers=[Recorder()], global_rank=0, world_size=1)
    fd.measure(trainer, SimpleNamespace(device=torch.device("cpu")))
    assert capsys.readouterr().err.startswith("[ablate run 2/4 adaln seed 1] step 4: 1 of 8")


# -- the sample grid under DDP --------------------------------------------------------------------
def saved_grids(monkeypatch) -> list[torch.Tensor]:
    """The images run.save_grid is handed, one (N, C, H, W) tensor per grid saved."""
    from dit_bench.train import run

    saved = []
    monkeypatch.setattr(run, "save_grid", lambda images, path, ncol: saved.append(images.clone()))
    return saved


def process_stubs(world: int) -> list[SimpleNamespace]:
    """Trainer stubs of `world` processes sharing one all_gather: called last, rank 0 gets
    every process's tensor, stacked in rank order as all_gather stacks them."""
    shares = {}

    def trainer(rank):
        def all_gather(x):
            shares[rank] = x
            return torch.stack([shares[r] for r in sorted(shares)])

        strategy = SimpleNamespace(all_gather=all_gather)
        return SimpleNamespace(global_rank=rank, world_size=world, strategy=strategy, loggers=[])

    return [trainer(r) for r in range(world)]


def draw_grid(cfg, module, world: int, path) -> None:
    """The run's grid as `world` processes draw it (rank 0 last: it gathers and saves)."""
    from dit_bench.train.run import grid_sampler

    for trainer in reversed(process_stubs(world)):
        grid_sampler(cfg)(trainer, module, path)


@pytest.mark.parametrize("world", [2, 3, 12])
def test_the_grid_is_shared_by_the_processes_and_is_one_processes_grid(
    monkeypatch, tmp_path, world
):
    """Under DDP each process draws its share of the grid's positions (rank r: r, r + world,
    ...; 10 over 3 processes: 4, 3, 3, padded for the gather; over 12, two draw none and still
    gather) and rank 0 alone saves the gathered grid: exactly the tensor one process draws. On
    rank 0 alone, the others would wait for all of it (1000 DDPM-250 samples of DiT-XL/2:
    minutes)."""
    from dit_bench.metrics import evaluate

    torch.manual_seed(0)
    cfg = tiny("eval.samples_per_class=1")  # 10 classes, one row each
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    saved = saved_grids(monkeypatch)
    drawn = []
    generate = evaluate.generate

    def spy(module, indices, **kwargs):
        drawn.append(list(indices))
        return generate(module, indices, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy)
    draw_grid(cfg, module, 1, tmp_path / "one.png")
    draw_grid(cfg, module, world, tmp_path / "shared.png")
    shares = [list(range(r, 10, world)) for r in range(world)]
    assert drawn == [list(range(10)), *reversed(shares)]
    assert len(saved) == 2  # one grid each: rank 0's
    assert saved[0].shape == (10, 1, 8, 8) and torch.equal(saved[1], saved[0])


def test_grid_position_i_depends_on_the_grid_seed_and_i_only(monkeypatch, tmp_path):
    """Position i is the sample of class i // samples_per_class drawn from its own seed,
    sample_seed(GRID_SEED, i): the same image whether drawn alone, in chunks of any
    train.batch_size or by any number of processes (one generator for the whole grid would
    give position i noise that depends on every position drawn before it in its batch)."""
    from dit_bench.metrics.evaluate import sample_seed
    from dit_bench.train.run import GRID_SEED, class_grid_labels, sample_images

    torch.manual_seed(0)
    cfg = tiny("eval.samples_per_class=2")  # 20 positions, two per class row
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    saved = saved_grids(monkeypatch)
    for batch_size, world in [(1, 1), (16, 1), (4, 2), (2, 3)]:
        chunked = tiny("eval.samples_per_class=2", f"train.batch_size={batch_size}")
        draw_grid(chunked, module, world, tmp_path / "grid.png")
    labels = class_grid_labels(module.info, 2)
    e = cfg.eval
    alone = torch.cat(
        [
            sample_images(
                module,
                labels[i : i + 1],
                sampler=e.sampler,
                steps=e.sample_steps,
                cfg_scale=e.cfg_scale,
                seed=GRID_SEED,
                use_ema=e.use_ema,
                seeds=[sample_seed(GRID_SEED, i)],
            )
            for i in range(len(labels))
        ]
    )
    assert len(saved) == 4
    for grid in saved:
        assert torch.equal(grid, alone)


# -- ValAtSteps' timing splits --------------------------------------------------------------------
def test_val_at_steps_timing_splits_add_up_to_the_wall_clock(monkeypatch):
    """step_seconds: the steps alone; loop_seconds: steps plus everything between them except
    the validations ValAtSteps runs; val_seconds: those. So loop + val is the wall clock from
    the start of training to the last step, and a sweep's overhead is what lies outside it."""
    now = [0.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def validation_metrics(loader):
        now[0] += 5.0  # each validation
        return {"val/loss": 1.0}

    module = SimpleNamespace(validation_metrics=validation_metrics, last_val={})
    trainer = SimpleNamespace(
        max_steps=4,
        callbacks=[StepMetrics(log_every=1, val_every=4)],
        loggers=[Recorder()],
        datamodule=SimpleNamespace(fixed_val_loader=lambda: None),
    )
    tracker = ValAtSteps([2, 3])  # off the val interval: ValAtSteps validates them itself
    tracker.on_train_start(trainer, module)
    for step in range(1, 5):
        now[0] += 1.0  # data loading and hooks between steps
        tracker.on_train_batch_start(trainer, module, None, step - 1)
        now[0] += 2.0  # forward, backward, optimiser step
        trainer.global_step = step
        tracker.on_train_batch_end(trainer, module, None, None, step - 1)
    tracker.on_train_end(trainer, module)
    assert tracker.step_seconds == 4 * 2.0
    assert tracker.val_seconds == 2 * 5.0
    assert tracker.loop_seconds == 4 * (1.0 + 2.0)
    assert tracker.loop_seconds + tracker.val_seconds == now[0]


def test_the_timer_counts_steps_and_waits_and_the_steady_steps_after_the_warmup(monkeypatch):
    """run._Timer, on a clock set by hand: train_seconds is every step and every wait for a
    batch (not the first, nor the validations between steps), data_seconds the waits, and the
    steady count the steps after the session's first WARMUP_STEPS with their waits."""
    from dit_bench.train import run as run_module

    now = [0.0]
    monkeypatch.setattr(run_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    module = SimpleNamespace(
        device=torch.device("cpu"), devices=[], batch_done_at=None, wall_start=None,
        train_seconds=0.0, data_seconds=0.0, steady_seconds=0.0, steady_steps=0,
    )  # fmt: skip
    steps = run_module.WARMUP_STEPS + 3
    trainer = SimpleNamespace(global_step=0, max_steps=steps)
    timer = run_module._Timer()
    timer.on_train_start(trainer, module)
    for step in range(1, steps + 1):
        now[0] += 1.0  # waiting for the batch
        timer.on_train_batch_start(trainer, module, None, step - 1)
        now[0] += 2.0  # forward, backward, optimiser step
        trainer.global_step = step
        timer.on_train_batch_end(trainer, module, None, None, step - 1)
        now[0] += 10.0  # validation, checkpoints (the callbacks after the timer)
        module.batch_done_at = now[0]  # the module's own batch-end hook
    assert module.data_seconds == (steps - 1) * 1.0
    assert module.train_seconds == steps * 2.0 + (steps - 1) * 1.0
    assert module.steady_steps == 3 and module.steady_seconds == 3 * (1.0 + 2.0)
    assert len(module.devices) == 1


# -- checkpoints ----------------------------------------------------------------------------------
def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 4}, last)

    def killed(obj, f):  # the temporary file save_checkpoint opened
        f.write(b"torn")
        raise KeyboardInterrupt  # what a kill -9 mid-write leaves on disk, without the kill

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 8}, last)
    monkeypatch.undo()
    assert io.load_checkpoint(last) == {"global_step": 4}


# -- data -----------------------------------------------------------------------------------------
def test_loader_workers_hand_out_each_step_once_in_step_order():
    """With W workers, worker w builds steps w, w + W, ...: together every step once, and
    the DataLoader's round-robin puts them back in step order (resumed at step 3 here)."""
    dataset = [(torch.tensor([float(i)]), i) for i in range(10)]  # the label names the item
    stream = StepBatches(dataset, batch_size=4, seed=0, start_step=3, total_steps=11)
    expected = [batch_indices(step, 4, len(dataset), 0, {}) for step in range(3, 11)]
    for workers in (0, 2):
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        assert [y.tolist() for _, y in loader] == expected, workers


def test_a_spawned_loader_worker_imports_no_lightning(tmp_path):
    """A spawned worker (macOS; Python 3.14's forkserver) unpickles the training stream, which
    imports the stream's module: it was the DataModule's, which imports Lightning (6 of a
    worker's 10 s to start on the 2-core CPU, on every resume, for each of the workers)."""
    import pickle
    import subprocess
    import sys

    data = DiffusionDataModule(tiny())
    data.setup()
    stream = data.train_dataloader().dataset  # what each worker gets, pickled
    (tmp_path / "stream.pkl").write_bytes(pickle.dumps(stream))
    code = f"""
import pickle, sys
stream = pickle.loads(open({str(tmp_path / "stream.pkl")!r}, "rb").read())
images, labels = next(iter(stream))
print(sorted(m for m in ("lightning", "pydantic", "dit_bench.config") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_fixed_validation_set_holds_eval_val_images_images():
    data = DiffusionDataModule(tiny("eval.val_images=16"))
    data.setup()
    assert len(data.val_set.dataset) > 16  # the held-out split is larger: a real cut
    assert sum(len(y) for _, y in data.fixed_val_loader()) == 16
    # in the split's order, every time: the val loss of step k and step k' compare the same
    # images, batched alike (a shuffled loader would draw its order from the global RNG)
    in_order = [data.val_set[i][1] for i in range(16)]
    for _ in range(2):
        assert torch.cat([y for _, y in data.fixed_val_loader()]).tolist() == in_order


# -- the bf16 residual stream ---------------------------------------------------------------------
class Block(nn.Module):
    def forward(self, x, ids, mask, c):
        self.seen = [a.dtype for a in (x, ids, mask, c)]
        return x


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x, ids, mask, c):
        for block in self.blocks:
            x = block(x, ids, mask, c)
        return x


def test_bf16_stream_casts_only_floating_token_tensors():
    """Token streams (B, T, D) go to bf16; integer ids and boolean masks of the same rank keep
    their dtype (as bf16 an id above 256 rounds, a mask becomes a number), and the (B, D)
    conditioning is left to autocast."""
    net = bf16_stream(Stack())
    x, c = torch.randn(2, 3, 4), torch.randn(2, 4)
    ids = torch.arange(6 * 4).reshape(2, 3, 4) + 257
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, ids, mask, c)
    for block in net.blocks:
        assert block.seen == [torch.bfloat16, torch.int64, torch.bool, torch.float32]


def test_grid_positions_are_drawn_of_their_class_in_chunks_of_the_batch(monkeypatch, tmp_path):
    """Position i is drawn as class labels[i] (class i // samples_per_class) from seed
    sample_seed(GRID_SEED, i), whichever process draws it, and every process samples in chunks
    of at most train.batch_size (the whole grid in one batch could exhaust the device). What
    the samplers are asked, not the pixels: a freshly built DiT ignores its labels (adaLN-zero),
    so a grid drawn with the wrong classes looks the same in the tests that compare images."""
    from dit_bench.metrics.evaluate import sample_seed
    from dit_bench.train import run
    from dit_bench.train.run import GRID_SEED, class_grid_labels

    torch.manual_seed(0)
    # 20 positions, 7 a process at most
    cfg = tiny("eval.samples_per_class=2", "eval.sample_steps=2", "train.batch_size=3")
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    saved = saved_grids(monkeypatch)
    asked, sample_images = [], run.sample_images

    def recorded(module, labels, *, seeds, **kwargs):
        asked.append(list(zip(seeds, labels.tolist(), strict=True)))
        return sample_images(module, labels, seeds=seeds, **kwargs)

    monkeypatch.setattr(run, "sample_images", recorded)
    draw_grid(cfg, module, 3, tmp_path / "grid.png")
    assert len(saved) == 1 and saved[0].shape[0] == 20
    assert asked and max(len(chunk) for chunk in asked) <= 3
    labels = class_grid_labels(module.info, 2).tolist()
    want = {(sample_seed(GRID_SEED, i), label) for i, label in enumerate(labels)}
    drawn = [pair for chunk in asked for pair in chunk]
    assert len(drawn) == 20 and set(drawn) == want


def test_the_grid_shares_are_gathered_on_the_module_device(monkeypatch, tmp_path):
    """generate returns samples on the CPU; the shares go to the gather on the module's
    device (NCCL gathers device tensors only), and rank 0 saves what the gather returns. A
    stand-in device here: `meta`."""
    torch.manual_seed(0)
    cfg = tiny("eval.samples_per_class=1")
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    monkeypatch.setattr(module, "_device", torch.device("meta"))  # what module.to(device) sets
    saved = saved_grids(monkeypatch)
    stubs, gathered = process_stubs(2), []
    for trainer in stubs:

        def all_gather(x, gather=trainer.strategy.all_gather):
            gathered.append(x.device)
            return gather(x)

        trainer.strategy.all_gather = all_gather
    for trainer in reversed(stubs):  # rank 0 last: it gathers and saves
        grid_sampler(cfg)(trainer, module, tmp_path / "grid.png")
    assert gathered == [torch.device("meta")] * 2
    assert [g.device for g in saved] == [torch.device("meta")] and saved[0].shape[0] == 10


def test_latents_without_a_vae_draw_no_grid_on_any_process(monkeypatch, tmp_path, latents_root):
    """Latents without data.vae: nothing to look at, so no process samples a grid (none waits
    in a gather the others skip) and to_images gives None; with data.vae, grids are drawn."""
    from dit_bench.config import build_config
    from dit_bench.data import data_info
    from dit_bench.metrics import evaluate
    from dit_bench.train.run import draws_grids, to_images

    sets = ["data.name=latents", f"data.root={latents_root}", "backbone.name=dit-xs/2"]
    cfg = build_config(None, sets)
    drawn = []
    monkeypatch.setattr(evaluate, "generate", lambda module, indices, **kw: drawn.append(indices))
    saved = saved_grids(monkeypatch)
    module = SimpleNamespace(info=data_info(cfg.data))  # never sampled
    draw_grid(cfg, module, 2, tmp_path / "grid.png")
    assert drawn == [] and saved == [] and not (tmp_path / "grid.png").exists()
    assert not draws_grids(cfg)
    assert to_images(cfg, torch.zeros(1, 4, 32, 32)) is None
    assert draws_grids(build_config(None, [*sets, "data.vae=/vae"]))
    assert draws_grids(tiny())


def test_sample_grid_runs_on_every_process_and_draws_a_last_step_on_the_interval_once(
    monkeypatch, tmp_path
):
    """Every process calls sample_fn at the same steps (they share the sampling: on rank 0
    alone, rank 0 would wait in the gather for the others), and a last step on the interval
    is drawn once, at the end, not a second time just before."""
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)  # this process is not rank 0
    grids = []
    grid = SampleGrid(tmp_path, every=4, sample_fn=lambda t, m, path: grids.append(path.name))
    trainer = SimpleNamespace(max_steps=8)
    for step in range(1, 9):
        trainer.global_step = step
        grid.on_train_batch_end(trainer, None, None, None, step - 1)
    grid.on_train_end(trainer, None)
    assert grids == ["step-0000004.png", "step-0000008.png"]


def test_sampling_between_steps_is_announced_by_rank_zero_when_the_run_shows_progress(capsys):
    """A grid or an FD after the last step ran with the bar at its end and nothing said (10,000
    DDPM-250 samples: half an hour of an H100): a line before and one after, rank 0's."""
    from dit_bench.train.callbacks import announced

    for rank, label, lines in ((0, "dit-bench", 2), (1, "dit-bench", 0), (0, None, 0), (0, "w", 2)):
        trainer = SimpleNamespace(global_rank=rank, global_step=7)
        with announced(trainer, "FD of 32 samples", label):
            pass
        err = capsys.readouterr().err.splitlines()
        assert len(err) == lines
        if lines:
            assert err[0] == f"[{label}] step 7: FD of 32 samples"
            assert err[1].startswith(f"[{label}] ... done in ")


def _lines_at(times, steps, *, rank=0, max_steps=100, loss=None, val=None, every_s=30.0):
    """ProgressLines' output, its clock reading `times` (the first: train start) at `steps`."""
    clock = iter(times)
    lines = callbacks.ProgressLines("w", 8, every_s=every_s, clock=lambda: next(clock))
    trainer = SimpleNamespace(global_rank=rank, global_step=steps[0], max_steps=max_steps)
    module = SimpleNamespace(last_train_loss=loss, last_val=val or {})
    lines.on_train_start(trainer, module)
    for step in steps[1:]:
        trainer.global_step = step
        lines.on_train_batch_end(trainer, module, None, None, 0)


def test_progress_lines_come_every_interval_with_rate_and_time_left(capsys):
    """Where no bar is shown (a log file; ablate's and a sweep's workers share one output):
    a line every `every_s` seconds, rank 0's, none at the last step (the run's summary)."""
    # resumed at step 20; steps 30..100 at 0, 10, ..., 70 s after the start: 40 steps of 8
    # images in 30 s at step 60 (10.7 img/s; 40 steps left take 30 s), 70 in 60 s at step 90
    times = [100.0] + [100.0 + 10 * k for k in range(9)]
    val = {"val/loss": 0.25, "step": 40}
    _lines_at(times, [20, *range(30, 101, 10)], loss=0.123456, val=val)
    err = capsys.readouterr().err.splitlines()
    # 30 s after the start (step 60) and 30 s after that (step 90); not step 100, the last
    assert err == [
        "[w] step 60/100 (60%): loss 0.1235, val 0.25 (step 40), 11 img/s, 30 s in, ~30 s left",
        "[w] step 90/100 (90%): loss 0.1235, val 0.25 (step 40), 9 img/s, 60 s in, ~9 s left",
    ]
    _lines_at(times, [20, *range(30, 101, 10)], rank=1, loss=0.1)
    assert capsys.readouterr().err == ""  # other ranks say nothing
    _lines_at([0.0, 45.0], [0, 5])  # no loss or validation yet: the step and the rate
    assert capsys.readouterr().err.splitlines() == [
        "[w] step 5/100 (5%): 1 img/s, 45 s in, ~14.2 min left"
    ]
    _lines_at([0.0, 60.0], [0, 3990], max_steps=4000)  # not "100%" before the end
    assert capsys.readouterr().err.startswith("[w] step 3990/4000 (99%): ")
    _lines_at([0.0, 60.0], [0, 100])  # the last step, its interval due: the summary's, no line
    assert capsys.readouterr().err == ""


def test_progress_every_s_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DIT_BENCH_PROGRESS_EVERY", raising=False)
    assert callbacks.progress_every_s() == 30.0
    monkeypatch.setenv("DIT_BENCH_PROGRESS_EVERY", "2.5")
    assert callbacks.progress_every_s() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("DIT_BENCH_PROGRESS_EVERY", bad)
        with pytest.raises(ValueError, match="DIT_BENCH_PROGRESS_EVERY=.*a number >= 0"):
            callbacks.progress_every_s()
        # inside a run (a sweep's trial): a warning, not a failed trial that never re-runs
        with pytest.warns(UserWarning, match="DIT_BENCH_PROGRESS_EVERY=.*using 30"):
            assert callbacks.progress_every_s(strict=False) == 30.0


def test_a_bad_progress_interval_stops_the_commands_before_they_start(
    monkeypatch, capsys, tmp_path
):
    from dit_bench.cli import main

    monkeypatch.setenv("DIT_BENCH_PROGRESS_EVERY", "soon")
    assert main(["train", "--out", str(tmp_path), "--set", "train.steps=1"]) == 2
    assert "DIT_BENCH_PROGRESS_EVERY='soon'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started


def test_duration_reads_for_people():
    spans = (42, 119, 120, 750, 3599, 3600, 7199, 2 * 86400 - 1, 3 * 86400)
    assert [callbacks.duration(s) for s in spans] == [
        "42 s",
        "119 s",
        "2.0 min",
        "12.5 min",
        "60.0 min",
        "1.0 h",
        "2.0 h",
        "48.0 h",
        "3.0 d",
    ]


def test_step_metrics_logs_the_lr_the_step_ran_at():
    # by the step's end the scheduler has moved on: a warm-up's first row would say 2 * lr / w
    group = {"lr": 0.001}
    logged = []
    trainer = SimpleNamespace(
        max_steps=2,
        global_step=0,
        optimizers=[SimpleNamespace(param_groups=[group])],
        loggers=[SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))],
    )
    module = SimpleNamespace(pop_train_loss=lambda: 1.0)
    metrics = StepMetrics(log_every=1, val_every=100)
    metrics.validate = lambda trainer, pl_module: {}
    for step in (1, 2):
        metrics.on_train_batch_start(trainer, module, None, step - 1)
        group["lr"] += 0.001  # the scheduler's step, inside the optimiser step
        trainer.global_step = step
        metrics.on_train_batch_end(trainer, module, None, None, step - 1)
    assert [(s, m["lr"]) for s, m in logged] == [(1, 0.001), (2, 0.002)]


def test_the_in_training_fd_samples_as_the_runs_eval_settings_say(monkeypatch):
    # the EMA weights (DiT's FID is the EMA's), the run's sampler, steps and guidance, and the
    # one fixed seed; an FD of the raw weights reads worse early on and says nothing of the
    # samples `dit-bench eval` scores
    from dit_bench.metrics import evaluate

    asked = []
    images = torch.rand(8, 1, 8, 8)
    monkeypatch.setattr(evaluate, "generate", lambda m, i, **kw: asked.append(kw) or images)
    for use_ema in (True, False):
        cfg = tiny(f"eval.use_ema={str(use_ema).lower()}", "eval.cfg_scale=1.5")
        trainer = SimpleNamespace(global_step=4, loggers=[Recorder()], global_rank=0, world_size=1)
        fd_metric(cfg).measure(trainer, SimpleNamespace(device=torch.device("cpu")))
        e, kw = cfg.eval, asked.pop()
        assert (kw["use_ema"], kw["sampler"], kw["steps"], kw["cfg_scale"]) == (
            use_ema, e.sampler, e.sample_steps, 1.5
        )  # fmt: skip
        assert kw["seed"] == FrechetDistanceMetric.SEED
