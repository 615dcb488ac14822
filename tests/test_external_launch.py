"""Processes started outside Lightning (torchrun, srun) and Lightning's own launcher inside a
SLURM allocation: one run directory, one lock holder, the numbers of one process."""

import os
import signal
import subprocess
import sys
import time
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


@pytest.mark.slow  # Lightning's launcher starts a second process that trains: ~20 s
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


LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")


@pytest.mark.parametrize(
    "env, launch",
    [
        (
            {
                "RANK": "3",
                "TORCHELASTIC_RUN_ID": "none",
                "MASTER_ADDR": "n1",
                "MASTER_PORT": "29500",
            },
            "torchrun none n1:29500",
        ),
        (
            {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_JOB_NAME": "train"}
            | {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"},
            "slurm 77.0 requeue 0",
        ),
        (  # requeued: the same job id, but not the launch its old process belongs to
            {"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "train"}
            | {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "2"},
            "slurm 77.0 requeue 2",
        ),
        ({"LOCAL_RANK": "1", "MASTER_PORT": "4242"}, None),  # Lightning's launcher
        (  # ... in an interactive allocation
            {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "bash"}
            | {"SLURM_JOB_ID": "77", "LOCAL_RANK": "1"},
            None,
        ),
        ({}, None),
    ],
)
def test_launch_id(monkeypatch, env, launch):
    for k in SLURM_VARS + LAUNCH_VARS + ("SLURM_STEP_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert run._launch_id() == launch


def _as_ranks(monkeypatch):
    """This process as each rank of one torchrun launch: rank 0 in a thread named "rank0"."""
    import threading

    for k in SLURM_VARS + LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in {"RANK": "1", "TORCHELASTIC_RUN_ID": "b", "MASTER_ADDR": "n1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(
        run, "_launch_rank", lambda: 0 if threading.current_thread().name == "rank0" else 1
    )


def _ranks(out, cfg, names=("rank0", "rank1")):
    """Threads (not started) that enter `run._run_lock` as the ranks `names` (_as_ranks): each
    sets its event in `entered` once in, and holds the lock until `done` is set."""
    import threading

    entered = {n: threading.Event() for n in names}
    done, errors = threading.Event(), []

    def rank():
        try:
            with run._run_lock(out, cfg):
                entered[threading.current_thread().name].set()
                done.wait(10)
        except Exception as e:
            errors.append(e)

    threads = {n: threading.Thread(target=rank, name=n) for n in names}
    return threads, entered, done, errors


def _let_go(other, ranks, entered, done, errors) -> None:
    """The other process lets go of the lock it holds (`other`, open): every rank enters, then
    all leave, without an error."""
    import fcntl

    fcntl.flock(other, fcntl.LOCK_UN)
    other.close()
    assert all(e.wait(10) for e in entered.values()), errors
    done.set()
    for t in ranks.values():
        t.join(10)
    assert not errors


def test_the_other_ranks_wait_while_rank_0_waits_for_another_launch(tmp_path, monkeypatch):
    # A double launch of a torchrun or srun job, or a requeued one whose old process still
    # runs: rank 0 waits for the run's lock, and ranks > 0 went on without it, chose the run
    # directory and checkpoint while the other launch still wrote them, then failed in the
    # process group's set-up after 30 minutes (or at the run directory after 2), taking the
    # launch down: the README promises that a second launch waits.
    import fcntl

    from dit_bench.files import open_lock

    _as_ranks(monkeypatch)
    # past this, a rank 0 that never came ends the wait: one that waits must not
    monkeypatch.setattr(run, "_wait_for_launch_lock", _timed(run._wait_for_launch_lock, 1.0))
    cfg, out = build_config(None, ["experiment=tiny"]), tmp_path / "runs"
    (out / "tiny").mkdir(parents=True)
    other = open_lock(out / "tiny" / f".{cfg.hash}.lock")  # the launch already training
    fcntl.flock(other, fcntl.LOCK_EX)
    other.write("pid 1 on n0 since 2026-11-28T10:00:00+00:00, launch torchrun a n0:29500\n")
    other.flush()
    ranks, entered, done, errors = _ranks(out, cfg)
    for t in ranks.values():
        t.start()
    time.sleep(2.5)
    assert not errors and not any(e.is_set() for e in entered.values())
    _let_go(other, ranks, entered, done, errors)  # the other launch ends


def test_a_rank_whose_rank_0_never_takes_the_lock_says_so(tmp_path, monkeypatch):
    # rank 0 failed before the lock (or was never started): a bounded wait, naming the launch
    # and the lock file's last holder, not a process-group set-up timed out 30 minutes later
    _as_ranks(monkeypatch)
    cfg, out = build_config(None, ["experiment=tiny"]), tmp_path / "runs"
    lock = out / "tiny" / f".{cfg.hash}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("pid 1 on dead-host since 2020-01-01T00:00:00+00:00, launch torchrun a n0:1\n")
    monkeypatch.setattr(run, "_wait_for_launch_lock", _timed(run._wait_for_launch_lock, 1.0))
    with pytest.raises(TimeoutError, match=r"rank 0 of this launch \(torchrun b n1:29500\)"):
        with run._run_lock(out, cfg):
            pass
    # a run rank 0 found finished, so took no lock: the other ranks find it so too
    (lock.parent / f"20261128T100000Z-{cfg.hash}").mkdir()
    (lock.parent / f"20261128T100000Z-{cfg.hash}" / "summary.json").write_text("{}")
    with run._run_lock(out, cfg):
        pass


def _timed(wait, timeout: float):
    return lambda *a: wait(*a, timeout=timeout)


def test_a_loopback_launch_on_another_host_is_another_launch(tmp_path, monkeypatch):
    # torchrun's defaults (run id "none", store 127.0.0.1:29500) are the same for every
    # single-node launch; the store only keeps a second one off the same host. The same
    # command on two hosts that share the runs folder: the second's ranks > 0 read the
    # first's holder line as their rank 0's, went on at once and failed, as before the wait.
    import fcntl

    from dit_bench.files import holder_line, open_lock

    _as_ranks(monkeypatch)
    for k, v in {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(run, "_wait_for_launch_lock", _timed(run._wait_for_launch_lock, 1.0))
    with monkeypatch.context() as m:
        m.setattr(run.platform, "node", lambda: "other-host")
        theirs = holder_line(run._launch_id())
    cfg, out = build_config(None, ["experiment=tiny"]), tmp_path / "runs"
    (out / "tiny").mkdir(parents=True)
    other = open_lock(out / "tiny" / f".{cfg.hash}.lock")
    fcntl.flock(other, fcntl.LOCK_EX)
    other.write(theirs + "\n")
    other.flush()
    ranks, entered, done, errors = _ranks(out, cfg)
    for t in ranks.values():
        t.start()
    try:
        assert not entered["rank1"].wait(2.5), "rank 1 went on while its rank 0 waits"
        assert not errors
    finally:
        _let_go(other, ranks, entered, done, errors)


def test_the_other_ranks_wait_while_a_third_process_holds_the_lock(tmp_path, monkeypatch):
    # rank 0 waits for a run; when it stops, another waiting process (a plain `dit-bench
    # train` of the config) takes the lock before it. Its holder line replaced the file, rank
    # 0's "waiting" line with it, and a rank that came to the lock after that took its rank 0
    # for failed: a TimeoutError after 2 minutes, and torchrun took the waiting rank 0 down.

    from dit_bench.files import note_holder, open_lock, try_lock

    _as_ranks(monkeypatch)
    monkeypatch.setattr(run, "_wait_for_launch_lock", _timed(run._wait_for_launch_lock, 1.0))
    cfg, out = build_config(None, ["experiment=tiny"]), tmp_path / "runs"
    (out / "tiny").mkdir(parents=True)
    lock = out / "tiny" / f".{cfg.hash}.lock"
    other = open_lock(lock)
    assert try_lock(other) is None
    ranks, entered, done, errors = _ranks(out, cfg)
    rank0, rank1 = ranks["rank0"], ranks["rank1"]
    rank0.start()
    deadline = time.monotonic() + 10
    while "waiting: " not in lock.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    note_holder(other)  # the lock passed to the third process, which names itself
    rank1.start()
    try:
        time.sleep(2.5)
        assert not errors and not any(e.is_set() for e in entered.values())
    finally:
        _let_go(other, ranks, entered, done, errors)
