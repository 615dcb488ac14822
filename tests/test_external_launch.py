"""Processes started outside Lightning (torchrun, srun) and Lightning's own launcher inside a
SLURM allocation: one run directory, one lock holder, the numbers of one process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_ddp import DDP, SETTINGS, assert_same_run

from dit_bench.config import build_config
from dit_bench.train import run

SLURM_VARS = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_NAME", "RANK", "NODE_RANK", "LOCAL_RANK")


def _cli(out: Path, env: dict[str, str], launcher: list[str], timeout: float):
    empty = out.parent / "empty.yaml"
    empty.write_text("{}\n")
    sets = [a for s in SETTINGS + DDP for a in ("--set", s)]
    clean = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    cmd = [*launcher, "-m", "dit_bench.cli", "train", str(empty), "--no-progress", "--out"]
    p = subprocess.Popen(
        [*cmd, str(out), *sets],
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a hung launch is killed whole: no rank left waiting on a lock
    )
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "env, rank",
    [
        ({"RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, 1),  # torchrun in SLURM
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NAME": "train"}, 1),  # srun
        # Lightning's launcher in an interactive allocation: its child inherits SLURM_PROCID=0
        (
            {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "bash", "LOCAL_RANK": "1"},
            1,
        ),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "interactive"}, 0),
    ],
)
def test_launch_rank(monkeypatch, env, rank):
    for k in SLURM_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run._launch_rank() == rank


def test_lightning_launcher_in_an_interactive_slurm_allocation(tmp_path):
    """`srun --pty bash`, then `dit-bench train --set train.devices=2`: Lightning ignores the
    SLURM environment (job name `bash`) and starts rank 1 itself, which inherits
    SLURM_PROCID=0. It used to take itself for the launching rank and wait for rank 0's lock
    while rank 0 waited for it in the process group's set-up: a hang."""
    env = {
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "4243",
        "SLURM_JOB_NAME": "bash",
        "SLURM_NODELIST": "127.0.0.1",
    }
    try:
        p = _cli(tmp_path / "runs", env, [sys.executable], timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("hung: rank 1 waits for the run's lock, rank 0 for rank 1")
    assert p.returncode == 0, p.stderr
    (folder,) = [p for p in (tmp_path / "runs" / "ddp").iterdir() if p.is_dir()]
    assert (folder / "summary.json").exists()


@pytest.mark.slow  # three trainings, two of them 2-process
def test_torchrun_equals_one_process(tmp_path):
    cfg = build_config(None, SETTINGS)
    one = run.train(cfg, tmp_path / "one", progress=False)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29633",
    ]
    p = _cli(tmp_path / "two", {}, launcher, timeout=300)
    assert p.returncode == 0, p.stderr
    (two,) = [p for p in (tmp_path / "two" / "ddp").iterdir() if p.is_dir()]  # one for both
    assert (two / "summary.json").exists()
    assert_same_run(one, two)
    again = _cli(tmp_path / "two", {}, launcher, timeout=300)  # finished: both ranks exit
    assert again.returncode == 0 and again.stderr.count("already finished") == 2, again.stderr


def test_a_rank_waiting_for_the_run_directory_times_out_by_elapsed_time(tmp_path, monkeypatch):
    # a wall clock stepped ahead while rank 1 waits (NTP on a node that booted with its clock
    # behind, a resumed VM) must not end the wait: rank 0 makes the directory a moment later
    cfg = build_config(None, ["experiment=tiny"])
    made = tmp_path / "tiny" / f"20261128T100000Z-{cfg.hash}"
    wall = iter([1e9, 1e9 + 3600.0])  # the step: an hour between two looks
    monkeypatch.setattr(run.time, "time", lambda: next(wall, 1e9 + 3600.0))
    monkeypatch.setattr(run.time, "sleep", lambda s: made.mkdir(parents=True))
    monkeypatch.setenv("RANK", "1")
    assert run._wait_for_run_dir(tmp_path, cfg) == made
