"""Data parallel training: two CPU processes (DDP over gloo) compute what one process computes
with the same global batch, and checkpoints move between the two."""

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def cli_train(out: Path, extra: list[str]) -> None:
    sets = [a for s in SETTINGS + extra for a in ("--set", s)]
    empty = out.parent / "empty.yaml"  # a config file: the types' defaults, as build_config
    empty.write_text("{}\n")
    cmd = [sys.executable, "-m", "dit_bench.cli", "train", str(empty), "--no-progress"]
    subprocess.run(
        [*cmd, "--out", str(out), *sets],
        check=True,
        capture_output=True,
        timeout=600,
    )


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


def test_two_processes_equal_one_and_checkpoints_cross_over(tmp_path):
    cfg = build_config(None, SETTINGS)
    one = train(cfg, tmp_path / "one", progress=False)
    cli_train(tmp_path / "two", DDP)
    two = find_run_dir(tmp_path / "two", cfg)  # same hash: devices/strategy are not hashed
    assert two is not None and (two / "summary.json").exists()
    assert_same_run(one, two)

    # A DDP checkpoint resumes in one process ...
    restart_from_step_4(two, tmp_path / "two_to_one")
    resumed = train(cfg, tmp_path / "two_to_one", progress=False)
    assert_same_run(one, resumed)
    # ... and a one-process checkpoint resumes under DDP.
    restart_from_step_4(one, tmp_path / "one_to_two")
    cli_train(tmp_path / "one_to_two", DDP)
    assert_same_run(one, find_run_dir(tmp_path / "one_to_two", cfg))


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
