"""Data parallel training: two CPU processes (DDP over gloo) compute what one process computes
with the same global batch, and checkpoints move between the two."""

import csv
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_bench.config import build_config
from dit_bench.train.run import find_run_dir, train

SETTINGS = [
    "experiment=ddp",
    "data.name=digits",
    "backbone.name=dit-xs/4",
    "train.steps=8",
    "train.batch_size=8",
    "train.log_every=1",
    "train.val_every=4",
    "train.checkpoint_every=4",
    "train.keep_every=4",
    "train.accelerator=cpu",
    "train.threads=1",
    "optim.lr=1e-3",
    "optim.ema_decay=0.9",
    "eval.val_images=16",
    "eval.samples_per_class=1",
    "eval.sample_steps=2",
]
DDP = ["train.devices=2", "train.strategy=ddp"]


# `dit-bench` with run.sample_images counting, in each process, the samples it draws: one line
# per call to <SAMPLES_LOG>.rank<r> (Lightning starts rank 1 with this script too)
COUNTING_CLI = """
import os, sys
from pathlib import Path

import torch

from dit_bench import cli
from dit_bench.train import run

sample_images = run.sample_images


def counting(module, labels, **kwargs):
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with Path(f"{os.environ['SAMPLES_LOG']}.rank{rank}").open("a") as f:
        f.write(f"{len(labels)}\\n")
    return sample_images(module, labels, **kwargs)


run.sample_images = counting
sys.exit(cli.main())
"""


# `dit-bench` writing, at each process's exit, the graphs Dynamo compiled in it to
# <GRAPHS_LOG>.rank<r> (LOCAL_RANK: Lightning sets it for the processes it starts)
GRAPHS_CLI = """
import atexit, os, sys
from pathlib import Path

from torch._dynamo.utils import counters

from dit_bench import cli


def write() -> None:
    path = Path(f"{os.environ['GRAPHS_LOG']}.rank{os.environ.get('LOCAL_RANK', '0')}")
    path.write_text(str(counters["stats"]["unique_graphs"]))


atexit.register(write)
sys.exit(cli.main())
"""


def cli_train(
    out: Path, extra: list[str], samples_log: Path | None = None, graphs_log: Path | None = None
) -> None:
    """`dit-bench train` in a subprocess; with `samples_log`, counting each process's samples;
    with `graphs_log`, the graphs Dynamo compiled in each."""
    sets = [a for s in SETTINGS + extra for a in ("--set", s)]
    empty = out.parent / "empty.yaml"  # a config file: the types' defaults, as build_config
    empty.write_text("{}\n")
    if samples_log is not None and graphs_log is not None:
        raise ValueError("one of samples_log and graphs_log: each runs its own script")
    cmd = [sys.executable, "-m", "dit_bench.cli"]
    env = None
    for log, var, text in (
        (samples_log, "SAMPLES_LOG", COUNTING_CLI),
        (graphs_log, "GRAPHS_LOG", GRAPHS_CLI),
    ):
        if log is not None:
            script = out.parent / f"{var.lower()}_cli.py"
            script.write_text(text)
            cmd, env = [sys.executable, str(script)], {**os.environ, var: str(log)}
    subprocess.run(
        [*cmd, "train", str(empty), "--no-progress", "--out", str(out), *sets],
        check=True,
        capture_output=True,
        timeout=600,
        env=env,
    )


def samples_drawn(log: Path) -> dict[int, int]:
    """Samples each process drew in a cli_train with `samples_log=log`, by rank."""
    return {
        int(p.name.rsplit(".rank", 1)[1]): sum(int(n) for n in p.read_text().split())
        for p in log.parent.glob(f"{log.name}.rank*")
    }


def grid_pixels(run: Path) -> np.ndarray:
    return np.asarray(Image.open(run / "samples" / "step-0000008.png"), dtype=np.int16)


def metrics(run: Path) -> dict[str, list[float]]:
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows if r[k]] for k in rows[0] if k != "step"}


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), k
    sa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    sb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=k)


def restart_from_step_4(src: Path, out: Path) -> None:
    """A copy of run `src` as it was at its step-4 checkpoint (as if killed there)."""
    dst = out / "ddp" / src.name
    shutil.copytree(src, dst)
    (dst / "summary.json").unlink()
    shutil.copy(dst / "checkpoints" / "step=0000004.ckpt", dst / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The one-process run of SETTINGS, trained once for the tests that compare against it
    (read only: a test resuming from it copies it, restart_from_step_4)."""
    return train(build_config(None, SETTINGS), tmp_path_factory.mktemp("one"), progress=False)


def test_two_processes_equal_one_and_checkpoints_cross_over(tmp_path, one):
    """Also test_trackers' "only rank 0 writes TensorBoard under DDP" (its DDP run is this
    one's, with train.loggers=[tensorboard]: one launch of two processes for both)."""
    cfg = build_config(None, SETTINGS)
    # a tracker beside metrics.csv: not hashed, and it changes none of the numbers compared
    tensorboard = ["train.loggers=[tensorboard]"] if importlib.util.find_spec("tensorboard") else []
    cli_train(tmp_path / "two", DDP + tensorboard, samples_log=tmp_path / "two.samples")
    two = find_run_dir(tmp_path / "two", cfg)  # same hash: devices/strategy are not hashed
    assert two is not None and (two / "summary.json").exists()
    assert_same_run(one, two)
    if tensorboard:  # rank 0's event file alone, with metrics.csv's steps
        from test_trackers import csv_columns, scalars

        assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
        tb, csv = scalars(two / "tensorboard"), csv_columns(two)
        assert {k: [s for s, _ in v] for k, v in tb.items()} == {
            k: [s for s, _ in v] for k, v in csv.items()
        }
    # The final grid (10 classes x 1) is drawn half by each process (on rank 0 alone, rank 1
    # would wait for all of it) and is one process's grid: the weights agree to float
    # tolerance only, so a pixel may round the other way.
    assert samples_drawn(tmp_path / "two.samples") == {0: 5, 1: 5}
    assert np.abs(grid_pixels(one) - grid_pixels(two)).max() <= 1

    # Killed while drawing its final grid, after the last checkpoint: the rerun trains nothing
    # and both processes draw the grid again (a process that skipped it would hang the other).
    killed = tmp_path / "killed" / "ddp" / two.name
    shutil.copytree(two, killed)
    (killed / "summary.json").unlink()
    (killed / "samples" / "step-0000008.png").unlink()
    cli_train(tmp_path / "killed", DDP, samples_log=tmp_path / "killed.samples")
    assert samples_drawn(tmp_path / "killed.samples") == {0: 5, 1: 5}
    assert (grid_pixels(killed) == grid_pixels(two)).all()

    # A DDP checkpoint resumes in one process ...
    restart_from_step_4(two, tmp_path / "two_to_one")
    resumed = train(cfg, tmp_path / "two_to_one", progress=False)
    assert_same_run(one, resumed)
    # ... and a one-process checkpoint resumes under DDP.
    restart_from_step_4(one, tmp_path / "one_to_two")
    cli_train(tmp_path / "one_to_two", DDP)
    assert_same_run(one, find_run_dir(tmp_path / "one_to_two", cfg))


def test_two_processes_of_two_micro_batches_equal_one_process(tmp_path, one):
    """train.accumulate_grad_batches=2 under DDP: each process runs 2 micro-batches of 2 of
    the global 8 (Lightning skips the gradient all-reduce of the first), and the run is the one
    process's without accumulation: the same directory's numbers, rows and checkpoints."""
    cfg = build_config(None, SETTINGS)
    cli_train(tmp_path / "two", DDP + ["train.accumulate_grad_batches=2"])
    two = find_run_dir(tmp_path / "two", cfg)  # the key is not hashed
    assert two is not None and (two / "summary.json").exists()
    assert_same_run(one, two)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
        p.name for p in (one / "checkpoints").iterdir()
    )


@pytest.mark.slow
def test_two_compiled_processes_equal_one_compiled(tmp_path):
    """`train.compile` under DDP (the GPU ablation profiles train compiled on 8 GPUs): each
    process compiles (Dynamo's graph count in each), and the run ends with the numbers of one
    compiled process with the same global batch."""
    compiled = ["train.compile=true"]
    cfg = build_config(None, SETTINGS + compiled)
    one = train(cfg, tmp_path / "one", progress=False)
    cli_train(tmp_path / "two", DDP + compiled, graphs_log=tmp_path / "graphs")
    two = find_run_dir(tmp_path / "two", cfg)
    assert two is not None and (two / "summary.json").exists()
    graphs = {p.name: int(p.read_text()) for p in tmp_path.glob("graphs.rank*")}
    assert graphs.keys() == {"graphs.rank0", "graphs.rank1"} and min(graphs.values()) > 0, graphs
    assert_same_run(one, two)


@pytest.mark.slow  # two processes train and sample: ~15 s; the sharing of the samples is also
# checked in one process (test_loop_invariants: test_in_training_fd_samples_are_shared...)
def test_the_in_training_fd_is_sampled_by_every_process(tmp_path, monkeypatch):
    """Each process samples its share of the FD's samples (rank r: r, r + 2, ...; here 5
    samples, so 3 and 2) and rank 0 scores them all: the FD of one process's samples. On rank 0
    alone the other would wait in its next all-reduce for the whole sampling."""
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))  # the subprocess's too
    fd = ["eval.fd_every=8", "eval.fd_samples=5", "eval.fd_features=digits-net"]
    cfg = build_config(None, SETTINGS + fd)
    one = train(cfg, tmp_path / "one", progress=False)  # (trains and caches digits-net)
    cli_train(tmp_path / "two", DDP + fd)
    two = find_run_dir(tmp_path / "two", cfg)
    (a,), (b,) = metrics(one)["val/FD-digits-net"], metrics(two)["val/FD-digits-net"]
    assert math.isfinite(a) and b == pytest.approx(a, rel=1e-3)


def test_global_batch_must_split_over_processes():
    from dit_bench.data.module import StepBatches

    with pytest.raises(ValueError, match="train.batch_size=9 is the global batch"):
        StepBatches(list(range(10)), 9, 0, 0, 1, rank=0, world_size=2)


def test_rank_slices_tile_the_global_batch():
    from dit_bench.data.module import StepBatches

    data = [(torch.tensor([float(i)]), i) for i in range(50)]
    whole = [y.tolist() for _, y in StepBatches(data, 8, 3, 0, 5)]
    halves = [[y.tolist() for _, y in StepBatches(data, 8, 3, 0, 5, r, 2)] for r in (0, 1)]
    assert whole == [a + b for a, b in zip(*halves, strict=True)]
