"""End-to-end training behaviour: determinism, exact resume, run directories, summary."""

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from dit_bench.config import ConfigError, build_config
from dit_bench.data.module import DiffusionDataModule
from dit_bench.train import run as run_module
from dit_bench.train.run import find_run_dir, git_commit, load_module, train

TINY = [
    "experiment=tiny",
    "data.name=digits",
    "backbone.name=dit-xs/4",
    "train.steps=12",
    "train.batch_size=8",
    "train.log_every=2",
    "train.val_every=4",
    "train.checkpoint_every=4",
    "train.threads=1",
    "optim.lr=1e-3",
    "optim.ema_decay=0.9",
    "eval.val_images=16",
    "eval.samples_per_class=1",
    "eval.sample_steps=4",
]


def tiny(*extra: str):
    return build_config(None, TINY + list(extra))


def test_the_summary_names_no_storage_password(tmp_path, monkeypatch):
    # a sweep worker's summary records its command line, `--storage postgresql://...` and all;
    # run folders are shared and moved between machines, the database password must stay out
    argv = ["dit-bench", "sweep", "s.yaml", "--storage", "postgresql://ann:s3cret@db/sweeps"]
    monkeypatch.setattr(sys, "argv", [*argv, "--storage=postgres://ann:s3cret@db/sweeps"])
    s = json.loads((train(tiny(), tmp_path, progress=False) / "summary.json").read_text())
    assert "s3cret" not in json.dumps(s)
    assert s["command"] == (
        "dit-bench sweep s.yaml --storage postgresql://ann:***@db/sweeps "
        "--storage=postgres://ann:***@db/sweeps"
    )


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def wait_for_checkpoint(out: Path, cfg, timeout: float = 120) -> None:
    """Until the run of `cfg` under `out` (trained by another process) has a last.ckpt."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = find_run_dir(out, cfg)
        if run and (run / "checkpoints" / "last.ckpt").exists():
            return
        time.sleep(0.05)


class InterruptAt(L.Callback):
    """Ctrl-C (or `stop`: a SIGTERM's cli.raise_terminated) at the given step."""

    def __init__(self, step: int, stop: type[BaseException] = KeyboardInterrupt):
        self.step, self.stop = step, stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise self.stop


class Watch(L.Callback):
    """What each training step ran under: deterministic algorithms, and the NaN fill of new
    tensors (which the harness turns off: fast.no_nan_fill)."""

    def __init__(self):
        self.seen = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flags = torch.are_deterministic_algorithms_enabled()
        self.seen.add((flags, torch.utils.deterministic.fill_uninitialized_memory))


def test_run_writes_everything(tmp_path):
    cfg = tiny()
    watch = Watch()
    run = train(cfg, tmp_path, progress=False, callbacks=[watch])
    assert watch.seen == {(True, False)}
    assert torch.utils.deterministic.fill_uninitialized_memory  # restored after the run
    assert run.parent == tmp_path / "tiny" and run.name.endswith(cfg.hash)
    assert (run / "config.yaml").read_text() == cfg.to_yaml()
    s = json.loads((run / "summary.json").read_text())
    for key in (
        "val_loss",
        "params",
        "macs",
        "train_flops",
        "img_per_s",
        "device",
        "versions",
        "seed",
        "config_hash",
        "git_commit",
        "train_seconds",
    ):
        assert key in s, key
    assert s["train_flops"] == 3 * s["flops"] * 12 * 8
    rows = read_csv(run / "metrics.csv")
    assert [r["step"] for r in rows if r.get("val/loss")] == ["4", "8", "12"]
    assert (run / "samples" / "step-0000012.png").exists()
    # A rerun of the same config does not train again.
    assert train(cfg, tmp_path, progress=False) == run


def test_git_commit_is_dit_benchs_not_the_users_repository(tmp_path, monkeypatch):
    """Installed into a .venv inside the user's own git project, the package must not record
    that project's commit as the commit of the dit-bench code that ran."""
    project = tmp_path / "project"
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@x"]
    installed = project / ".venv" / "lib" / "site-packages" / "dit_bench"
    vendored = project / "third_party" / "dit-bench" / "dit_bench"
    for package in (installed, project / "dit_bench", vendored, tmp_path / "dit_bench"):
        (package / "train").mkdir(parents=True)
        (package / "__init__.py").write_text("")
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "dit_bench", "third_party"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=project, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.strip()

    def commit_from(package):  # git_commit() as if its module were imported from `package`
        monkeypatch.setattr(run_module, "__file__", str(package / "train" / "run.py"))
        return git_commit()

    assert commit_from(installed) is None
    # a checkout (an editable install), or a copy committed into the project: its commit
    assert commit_from(project / "dit_bench") == commit_from(vendored) == head
    assert commit_from(tmp_path / "dit_bench") is None  # in no repository


def test_git_commit_of_a_checkout_another_user_owns(tmp_path, monkeypatch):
    """Root in a container running a checkout mounted from the host: git refuses the
    repository (dubious ownership), and the summary recorded no commit. The code's owner owns
    the repository, so the code trusts it as far as it trusts itself. (git's test switch makes
    the repository look foreign to this user, as a chown would to root.)"""
    checkout = tmp_path / "dit-bench"
    (checkout / "dit_bench" / "train").mkdir(parents=True)
    (checkout / "dit_bench" / "__init__.py").write_text("")
    (checkout / "dit_bench" / "train" / "run.py").write_text("")
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@x"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run([*git, *args], cwd=checkout, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, check=True
    ).stdout.strip()
    monkeypatch.setattr(run_module, "__file__", str(checkout / "dit_bench" / "train" / "run.py"))
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    refused = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True)
    if refused.returncode == 0:
        pytest.skip("this git has no ownership check")
    assert git_commit() == head


def test_the_last_shorter_window_logs_its_train_loss(tmp_path):
    """log_every 5 over 12 steps: windows end at 5, 10 and, shorter, at the last step."""
    run = train(tiny("train.log_every=5"), tmp_path, progress=False)
    steps = [r["step"] for r in read_csv(run / "metrics.csv") if r.get("train/loss")]
    assert steps == ["5", "10", "12"]


def test_summary_times_steps_and_data_but_not_evaluation(tmp_path, monkeypatch):
    """img/s counts the training loop: every wait for a batch (a slow loader lowers it) but not
    the validations, sample grids and checkpoints run between steps; steady img/s, not the
    first steps of the session either."""
    from dit_bench.data import datasets
    from dit_bench.train.module import DiffusionModule

    # the training batches' collate: StepBatches calls it by its own module's name, not the
    # DataModule's (which validation uses)
    collate, validate = datasets.collate, DiffusionModule.validation_metrics
    step = DiffusionModule.training_step
    calls = []

    def slow_collate(items):
        time.sleep(0.05)
        return collate(items)

    def slow_first_steps(self, batch, batch_idx):  # as compilation slows the first steps
        calls.append(batch_idx)
        if len(calls) <= 2:
            time.sleep(1.0)
        return step(self, batch, batch_idx)

    def slow_validation(self, loader):
        time.sleep(0.5)
        return validate(self, loader)

    monkeypatch.setattr(datasets, "collate", slow_collate)
    monkeypatch.setattr(DiffusionModule, "validation_metrics", slow_validation)
    monkeypatch.setattr(DiffusionModule, "training_step", slow_first_steps)
    t0 = time.perf_counter()
    s = json.loads((train(tiny(), tmp_path, progress=False) / "summary.json").read_text())
    wall = time.perf_counter() - t0
    # Lightning fetches one batch ahead: batches 0 and 1 come before step 0 (set-up, not
    # counted), then each of steps 1..10 waits for one of batches 2..11, 50 ms each at least
    assert s["data_seconds"] >= 10 * 0.05
    # the three validations (steps 4, 8, 12) slept 1.5 s between steps: none of it counts (the
    # steps' own compute, well under 1.5 s even on a loaded machine, and the 2 s the first two
    # slept are all that is left)
    assert s["train_seconds"] - s["data_seconds"] - 2.0 < 1.5 <= wall - s["train_seconds"]
    assert s["img_per_s"] == pytest.approx(12 * 8 / s["train_seconds"])
    # steady_img_per_s: steps 6..12 (after run.WARMUP_STEPS = 5), each with its wait for data,
    # without the first steps' 2 s of "compilation"
    steady_seconds = 7 * 8 / s["steady_img_per_s"]
    assert 7 * 0.05 <= steady_seconds < 1.5
    assert 2.0 <= s["warmup_seconds"] < 3.5
    # the wall clock of the fit counts them all, and not the set-up before it
    assert s["train_seconds"] + 1.5 < s["wall_seconds"] < wall


def test_the_training_loop_reads_the_device_once_per_log_window(tmp_path, monkeypatch, capfd):
    """No host-device sync in the step: three times the steps read back one value more per
    extra log window and checkpoint, not per step, also with the progress bar showing the
    loss. (Logging the step's loss through Lightning for the bar read it back every step.)"""
    reads = []
    for name in ("item", "tolist", "__float__"):
        read = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _r=read, **k: reads.append(1) or _r(self, *a, **k)
        )
    monkeypatch.setenv("DIT_BENCH_PROGRESS_EVERY", "0")  # the lines: one every step
    counts = {}
    for shown in ("bar", "lines"):
        for steps in (12, 36):
            reads.clear()
            cfg = tiny(
                f"train.steps={steps}",
                "train.log_every=12",
                "train.val_every=36",
                "train.checkpoint_every=12",
            )
            train(cfg, tmp_path / shown / str(steps), progress=shown)
            counts[shown, steps] = len(reads)
        if shown == "bar":
            assert re.search(r"train: 100%.*loss=\d", capfd.readouterr().out)  # the last window's
    # two more log windows and two more checkpoints (each keeps the loss window's sum, and
    # reads whether its weights are finite: one read for them all)
    assert counts["bar", 36] - counts["bar", 12] == 6, counts
    # the progress lines read nothing of their own: the same reads, and a line every step
    assert counts["lines", 12] == counts["bar", 12] and counts["lines", 36] == counts["bar", 36]
    err = capfd.readouterr().err
    assert len(re.findall(r"^\[dit-bench\] step \d+/(?:12|36) ", err, re.M)) == 11 + 35, err


def test_the_timer_waits_for_the_gpu_where_a_callback_reads_it(monkeypatch):
    """On a GPU, steps whose callbacks read the device (log windows, validation, checkpoints,
    grids, FD, the last step) are synchronised before the clock stops: the device's backlog
    is training time, not the callback's. Other steps, and the CPU, never wait."""
    from types import SimpleNamespace

    from dit_bench.train.run import _Timer

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    timer = _Timer((25, 0, 100))  # log_every 25, no grids (0), checkpoints every 100
    gpu = torch.device("cuda")
    module = SimpleNamespace(
        device=gpu, batch_done_at=None, train_seconds=0.0, data_seconds=0.0,
        steady_seconds=0.0, steady_steps=0, wall_start=None, devices=[],
    )  # fmt: skip
    trainer = SimpleNamespace(global_step=0, max_steps=130)
    timer.on_train_start(trainer, module)
    for step in range(1, 131):
        trainer.global_step = step
        timer.on_train_batch_start(trainer, module, None, step - 1)
        timer.on_train_batch_end(trainer, module, None, None, step - 1)
    assert len(synced) == len([25, 50, 75, 100, 125, 130]) and set(synced) == {gpu}
    assert module.steady_steps == 130 - 5 and module.devices == ["Some GPU"]
    synced.clear()
    module.device = torch.device("cpu")
    timer.on_train_batch_end(trainer, module, None, None, 0)  # step 130, on the CPU
    assert synced == []


def test_the_training_step_lists_the_parameters_once_a_fit(tmp_path, monkeypatch):
    """Gradient clipping and the EMA update take the backbone's parameter lists made at the
    first step, not a walk of its module tree every step (host time a launch-bound GPU step
    waits for): three times the steps list them as often; the clipped run's weights are the
    same, bit for bit, as those of clipping with the lists made afresh."""
    from dit_bench.backbones.dit import DiT

    listed = []
    real = torch.nn.Module.parameters

    def parameters(self, *a, **k):
        if isinstance(self, DiT):
            listed.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "parameters", parameters)
    counts = {}
    for steps in (4, 12):
        listed.clear()
        cfg = tiny(f"train.steps={steps}", "train.val_every=100", "train.checkpoint_every=100")
        assert cfg.optim.grad_clip
        run = train(cfg, tmp_path / str(steps), progress=False)
        counts[steps] = len(listed)
    assert counts[12] == counts[4], counts
    monkeypatch.setattr(torch.nn.Module, "parameters", real)
    from dit_bench.train.module import DiffusionModule

    cached = final_state(run)
    # never kept: listed afresh at every step, as before the lists were kept
    never = property(lambda self: None, lambda self, value: None)
    monkeypatch.setattr(DiffusionModule, "_clip_params", never, raising=False)
    fresh = final_state(train(cfg, tmp_path / "fresh", progress=False))
    assert cached.keys() == fresh.keys()
    assert all(torch.equal(cached[k], fresh[k]) for k in cached)


def test_the_timer_syncs_at_the_steps_where_a_callback_reads_the_device(tmp_path, monkeypatch):
    """The timer `train` builds synchronises at every step where a callback reads the device:
    log windows (2), validation (3), checkpoints (5), kept ones (7), grids (11), FD (13) and
    the last step, and at no other. Periods prime to each other: each has steps no other has."""
    from dit_bench.train import run as run_module
    from dit_bench.train.module import DiffusionModule

    timers, saved = [], []

    class Recorded(run_module._Timer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            timers.append(self)

    save = DiffusionModule.on_save_checkpoint

    def recorded_save(self, checkpoint):
        saved.append(self.global_step)
        return save(self, checkpoint)

    monkeypatch.setattr(run_module, "_Timer", Recorded)
    monkeypatch.setattr(DiffusionModule, "on_save_checkpoint", recorded_save)
    cfg = tiny(
        "train.steps=14",
        "train.val_every=3",
        "train.checkpoint_every=5",
        "train.keep_every=7",
        "train.sample_every=11",
        "eval.fd_every=13",
        "eval.fd_samples=10",
    )
    run = train(cfg, tmp_path, progress=False)
    rows = read_csv(run / "metrics.csv")
    read = {int(r["step"]) for r in rows if any(v for k, v in r.items() if k != "step")}
    read |= {int(p.stem.removeprefix("step-")) for p in (run / "samples").glob("step-*.png")}
    read |= set(saved)
    assert {13, 11} <= read and any("FD" in k and v for r in rows for k, v in r.items())
    (timer,) = timers
    assert {s for s in range(1, 15) if timer.syncs_at(s, 14)} == read == set(range(2, 15))


def test_a_resume_from_before_the_steady_count_has_no_steady_numbers(tmp_path):
    """steady img/s is the steady steps' images over their seconds and warm-up the rest of the
    loop's time; resumed from a checkpoint that predates the count, both are unknown (null),
    not the last session's alone, while img/s over every step stands."""
    from dit_bench.data.module import DiffusionDataModule
    from dit_bench.train.module import DiffusionModule
    from dit_bench.train.run import write_summary

    cfg = tiny()
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    module.train_seconds, module.steady_seconds, module.steady_steps = 30.0, 4.0, 6
    s = write_summary(tmp_path, cfg, module, torch.device("cpu"))
    assert s["steady_img_per_s"] == pytest.approx(6 * 8 / 4.0)
    assert s["warmup_seconds"] == pytest.approx(26.0)
    module.on_load_checkpoint({"train_seconds": 20.0})  # written before the steady count
    module.train_seconds += 10.0  # this session: 6 steps, 4 s of them steady
    module.steady_seconds, module.steady_steps = 4.0, 6
    s = write_summary(tmp_path, cfg, module, torch.device("cpu"))
    assert s["steady_img_per_s"] is None and s["warmup_seconds"] is None
    assert s["img_per_s"] == pytest.approx(12 * 8 / 30.0)
    assert s["wall_seconds"] is None  # nor the wall clock, which the checkpoint did not keep


def test_a_run_ends_with_the_data_wait_note_when_there_is_one(tmp_path, monkeypatch, capsys):
    """The note (on a CPU there is none) is printed for people after the summary, from the
    finished run's clocks and the device it trained on."""
    from dit_bench.train import run as run_module

    def note(module, cfg, device):
        return f"[dit-bench] waited {module.data_seconds > 0} on {device.type}, {cfg.hash}"

    monkeypatch.setattr(run_module, "data_wait_note", note)
    cfg = tiny()
    train(cfg, tmp_path, progress=False)
    assert f"[dit-bench] waited True on cpu, {cfg.hash}" in capsys.readouterr().err


def test_the_data_wait_note_starts_at_its_share_on_any_accelerator():
    """A wait of exactly DATA_WAIT_SHARE, 10% of the loop, is worth the note; accelerators other
    than CUDA get it too, by their own name."""
    from types import SimpleNamespace

    from dit_bench.train.run import data_wait_note

    cfg = tiny("data.num_workers=2")
    at_share = SimpleNamespace(train_seconds=20.0, data_seconds=2.0)
    note = data_wait_note(at_share, cfg, torch.device("cuda"))
    assert note is not None and "waited for data 10% of its time" in note
    note = data_wait_note(at_share, cfg, torch.device("mps"))
    assert note is not None and "keep the mps busy" in note


def test_a_gpu_waiting_for_data_gets_a_note_the_cpu_does_not():
    from types import SimpleNamespace

    from dit_bench.train.run import data_wait_note

    cfg = tiny("data.num_workers=2")
    waited = SimpleNamespace(train_seconds=20.0, data_seconds=5.0)
    note = data_wait_note(waited, cfg, torch.device("cuda"))
    assert "waited for data 25% of its time (5.0 of 20.0 s)" in note
    assert "data.num_workers, now 2" in note
    # the loader's processes would take the CPU's cores from the model
    assert data_wait_note(waited, cfg, torch.device("cpu")) is None
    kept_up = SimpleNamespace(train_seconds=20.0, data_seconds=1.9)
    assert data_wait_note(kept_up, cfg, torch.device("cuda")) is None
    nothing = SimpleNamespace(train_seconds=0.0, data_seconds=0.0)
    assert data_wait_note(nothing, cfg, torch.device("cuda")) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """tiny()'s run, trained once for the tests that compare another run against it (read
    only: nothing resumes or rewrites it)."""
    return train(tiny(), tmp_path_factory.mktemp("tiny_run"), progress=False)


def test_same_seed_same_numbers_other_seed_differs(tmp_path, tiny_run):
    a = json.loads((tiny_run / "summary.json").read_text())  # a training of its own, as b
    b = json.loads((train(tiny(), tmp_path / "b", progress=False) / "summary.json").read_text())
    c = json.loads(
        (train(tiny("seed=1"), tmp_path / "c", progress=False) / "summary.json").read_text()
    )
    assert a["val_loss"] == b["val_loss"]
    assert a["val_loss"] != c["val_loss"]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_run):
    cfg, ref = tiny(), tiny_run
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, callbacks=[InterruptAt(6)])
    cut = find_run_dir(tmp_path / "cut", cfg)
    assert not (cut / "summary.json").exists()
    first = torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["wall_seconds"]
    # what a kill -9 mid-write leaves (files.replacing's temporary names): gone on resume
    stale = [
        cut / "checkpoints" / "last.ckpt.4242.tmp",
        cut / "samples" / "step-0000008.png.4242.tmp",
    ]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"torn")
    t0 = time.perf_counter()
    resumed = train(cfg, tmp_path / "cut", progress=False)
    second = time.perf_counter() - t0
    assert resumed == cut and not any(path.exists() for path in stale)
    assert read_csv(ref / "metrics.csv") == read_csv(resumed / "metrics.csv")
    s_ref, s_res = (json.loads((r / "summary.json").read_text()) for r in (ref, resumed))
    assert s_ref["val_loss"] == s_res["val_loss"]
    assert first > 0 and first < s_res["wall_seconds"] < first + second  # both sessions
    a, b = final_state(ref), final_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class InterruptAtEnd(L.Callback):
    def on_train_end(self, trainer, pl_module):  # before the final grid: after the checkpoint
        raise KeyboardInterrupt


def test_killed_while_drawing_the_final_grid_the_rerun_draws_it(tmp_path, tiny_run):
    cfg, ref = tiny(), tiny_run
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, callbacks=[InterruptAtEnd()])
    cut = find_run_dir(tmp_path / "cut", cfg)
    final = "samples/step-0000012.png"
    assert (cut / "checkpoints" / "last.ckpt").exists() and not (cut / final).exists()
    resumed = train(cfg, tmp_path / "cut", progress=False)  # resumes at the last step
    assert (resumed / final).read_bytes() == (ref / final).read_bytes()
    assert sorted(p.name for p in (resumed / "samples").iterdir()) == sorted(
        p.name for p in (ref / "samples").iterdir()
    )


def test_the_final_grid_redraw_goes_by_rank_zeros_look_at_the_file(tmp_path, monkeypatch):
    """Every process draws a share of the final grid, so whether a resume at the last step
    draws it again is rank 0's look at the file, broadcast, not each process's own: a process
    that sees the file rank 0 is still writing would skip the gather rank 0 waits in. Here this
    process sees a half-written file and rank 0 (the stubbed broadcast) saw none: it draws."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    cfg = tiny()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False, callbacks=[InterruptAtEnd()])
    grid = find_run_dir(tmp_path, cfg) / "samples" / "step-0000012.png"
    grid.parent.mkdir(exist_ok=True)
    grid.write_bytes(b"half-written")
    broadcast, looked = SingleDeviceStrategy.broadcast, []

    def rank_zero_saw_no_grid(self, obj, src=0):
        if isinstance(obj, bool) and src == 0:
            looked.append(obj)  # this process's own look: "missing?"
            return True
        return broadcast(self, obj, src)

    monkeypatch.setattr(SingleDeviceStrategy, "broadcast", rank_zero_saw_no_grid)
    train(cfg, tmp_path, progress=False)
    assert looked == [False]  # the only decision broadcast: this one
    with Image.open(grid) as image:  # drawn over the half-written file
        assert image.size[1] > 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_run_lightning_refuses_leaves_no_run_dir(tmp_path, monkeypatch):
    from lightning.pytorch.strategies import FSDPStrategy

    from dit_bench.train import run as run_module

    cfg = tiny()
    # on the CPU, Lightning refuses FSDP when it builds the Trainer (train.strategy=fsdp is
    # refused before that, by the harness: handed to Lightning here as another strategy's)
    monkeypatch.setattr(run_module, "_strategy", lambda name, module: FSDPStrategy())
    with pytest.raises(Exception, match="(?i)fsdp"):
        train(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    assert find_run_dir(tmp_path, cfg) is None
    run = train(tiny(), tmp_path, progress=False)  # a run that did begin keeps its dir
    assert (run / "config.yaml").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_request_without_one_is_refused_even_with_a_finished_cpu_run(tmp_path):
    # the accelerator is not in the hash: a finished CPU run must not answer a GPU request
    run = train(tiny(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="train.accelerator=gpu: .* sees no CUDA device"):
        train(tiny("train.accelerator=gpu"), tmp_path, progress=False)
    assert train(tiny("train.accelerator=cpu"), tmp_path, progress=False) == run


def test_fsdp_is_refused_across_processes_and_allowed_on_one():
    from dit_bench.train.run import check_sharding

    check_sharding("fsdp", 1)  # NO_SHARD: the model whole on its one GPU
    check_sharding("ddp", 8)
    with pytest.raises(ValueError, match="train.strategy=fsdp over 2 processes.*strategy=ddp"):
        check_sharding("fsdp", 2)


def test_several_devices_from_an_interactive_session_are_refused_before_training(
    tmp_path, monkeypatch
):
    """In a notebook, Lightning's `auto` strategy over several devices trains in forked
    processes that hand nothing back: the run crashed after training, and again on every
    rerun. Refused before anything runs, with no run directory left."""
    from lightning.pytorch.trainer.connectors import accelerator_connector

    monkeypatch.setattr(accelerator_connector, "_IS_INTERACTIVE", True)
    cfg = tiny("train.devices=2", "train.accelerator=cpu")
    with pytest.raises(ValueError, match="2 processes from an interactive session.*starts by fork"):
        train(cfg, tmp_path, progress=False)
    assert find_run_dir(tmp_path, cfg) is None


def test_kill_9_then_rerun_resumes(tmp_path):
    """A real SIGKILL in the middle of a run loses nothing: the rerun finishes identically."""
    empty = tmp_path / "empty.yaml"  # a config file: the types' defaults, like tiny()
    empty.write_text("{}\n")
    args = [sys.executable, "-m", "dit_bench.cli", "train", str(empty), "--no-progress", "--out"]
    sets = [a for s in TINY + ["train.steps=40"] for a in ("--set", s)]
    cfg = tiny("train.steps=40")
    ref = train(cfg, tmp_path / "ref", progress=False)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        args + [str(out)] + sets,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_checkpoint(out, cfg)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run = find_run_dir(out, cfg)
    assert not (run / "summary.json").exists(), "killed too late to test resume"
    assert train(cfg, out, progress=False) == run
    assert read_csv(ref / "metrics.csv") == read_csv(run / "metrics.csv")
    a, b = final_state(ref), final_state(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_kill_between_a_steps_two_checkpoint_saves_loses_no_kept_checkpoint(
    tmp_path, monkeypatch
):
    """checkpoint_every=4, keep_every=8: at step 8 last.ckpt and step=0000008.ckpt are both due.
    A kill between the two saves must leave a run whose rerun keeps the same files as an
    uninterrupted one (with last.ckpt saved first, it resumed at step 9 and never wrote the
    step-8 file)."""
    from dit_bench.train import callbacks as cb

    save = cb.AtomicCheckpointIO.save_checkpoint
    saved: list[str] = []

    def kill_after_the_first_save_of_step_8(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] == 8 and saved.count("step 8") == 1:
            raise KeyboardInterrupt  # kill -9 or Ctrl-C between the two saves
        out = save(self, checkpoint, path, storage_options)
        saved.append(f"step {checkpoint['global_step']}")
        return out

    cfg = tiny("train.keep_every=8")
    ref = train(cfg, tmp_path / "ref", progress=False)
    monkeypatch.setattr(
        cb.AtomicCheckpointIO, "save_checkpoint", kill_after_the_first_save_of_step_8
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(cb.AtomicCheckpointIO, "save_checkpoint", save)
    run = train(cfg, tmp_path / "cut", progress=False)
    names = lambda r: sorted(p.name for p in (r / "checkpoints").iterdir())  # noqa: E731
    assert "step=0000008.ckpt" in names(ref)
    assert names(run) == names(ref)
    assert read_csv(ref / "metrics.csv") == read_csv(run / "metrics.csv")


class GroupsFused(L.Callback):
    def __init__(self):
        self.seen: set = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen |= {g["fused"] for opt in trainer.optimizers for g in opt.param_groups}


@pytest.mark.parametrize("before,after", [(True, False), (False, True)])
def test_a_resumed_run_updates_as_its_own_optim_fused_says(tmp_path, before, after):
    """optim.fused is an execution key: the checkpoint's optimiser state brought the old
    setting back into every group, so the resumed run kept it whatever --set said."""
    with pytest.raises(KeyboardInterrupt):
        train(tiny(f"optim.fused={before}"), tmp_path, progress=False, callbacks=[InterruptAt(5)])
    cfg = tiny(f"optim.fused={after}")
    groups = GroupsFused()
    run = train(cfg, tmp_path, progress=False, callbacks=[groups])
    assert groups.seen == {after}
    ref = train(cfg, tmp_path / "ref", progress=False)  # one setting throughout
    a, b = final_state(ref), final_state(run)
    for k in a:  # the two kernels round differently, nothing more
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False, callbacks=[InterruptAt(5)])
    run = find_run_dir(tmp_path, cfg)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["config_hash"] = "0123456789"
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="refusing to resume"):
        train(cfg, tmp_path, progress=False)


def test_a_refused_run_leaves_no_run_directory(tmp_path, monkeypatch):
    cfg = tiny("data.name=folder", f"data.root={tmp_path / 'missing'}", "data.image_size=8")
    with pytest.raises(ValueError, match="missing"):
        train(cfg, tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()  # the next, fixed command starts clean
    # an in-training FID without the Inception file: refused before step 1, not at fd_every
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIT_BENCH_INCEPTION", str(tmp_path / "no-inception.pt"))
    if Path("/tmp/inception-2015-12-05.pt").exists():
        pytest.skip("this machine has the Inception file where clean-fid looks")
    cfg = tiny("eval.fd_every=500", "eval.fd_features=inception")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        train(cfg, tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()
    # data refused when it is listed (a class folder without images): the images are listed
    # before the run directory is made too
    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / cls / f"{i}.png")
    (root / "c").mkdir()
    folder = ("data.name=folder", f"data.root={root}", "data.image_size=8")
    with pytest.raises(ValueError, match="c' has no images"):
        train(tiny(*folder), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()
    # an in-training FD over a held-out split of one image
    cfg = tiny("data.name=shapes", "data.num_samples=8", "data.val_fraction=0.125",
               "eval.fd_every=500")  # fmt: skip
    with pytest.raises(ConfigError, match="the FD needs at least 2 held-out images; the split"):
        train(cfg, tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()
    # an unreadable image: its header is read when the images are listed, named there
    (root / "c").rmdir()
    (root / "b" / "3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"1 of 8 files are not readable images: \S*b/3.png"):
        train(tiny(*folder), tmp_path / "runs", progress=False)
    # nothing was trained or written: no run directory to mistake for one
    assert find_run_dir(tmp_path / "runs", tiny(*folder)) is None


class _Payload:
    """Unpickled, it makes its marker file: code that a checkpoint sent by someone else may
    hold, and loading must not run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_holding_code_is_refused_in_one_line(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "last.ckpt"
    keys = {"state_dict": {}, "global_step": 1, "pytorch-lightning_version": "2.5"}
    torch.save({**keys, "extra": _Payload(marker)}, path)
    with pytest.raises(ValueError) as e:
        run_module.read_checkpoint(path)
    assert not marker.exists()
    message = str(e.value)
    assert re.fullmatch(
        r"\S*last.ckpt holds pickled Python objects, not only weights \(\S+ among them\): "
        r"refused, as loading it could run code \(.*\)",
        message,
    )
    # torch's own text told how to load it anyway (weights_only=False), in terminal escapes
    assert "weights_only" not in message and "\033" not in message


def test_a_damaged_checkpoint_is_unreadable_not_said_to_hold_code(tmp_path):
    # weights_only refuses a damaged pickle stream as it refuses code ("Unsupported operand
    # 103"): that is a broken file, not someone else's objects to be wary of
    path = tmp_path / "last.ckpt"
    keys = {"state_dict": {}, "global_step": 1, "pytorch-lightning_version": "2.5"}
    torch.save(keys, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:2] + b"garbage" + data[9:])
    with pytest.raises(ValueError) as e:
        run_module.read_checkpoint(path)
    message = str(e.value)
    assert re.fullmatch(r"\S*last.ckpt is not a readable checkpoint \(.*operand.*\)", message)
    assert "weights_only" not in message and "\n" not in message


def test_broken_run_files_are_errors_naming_the_file(tmp_path):
    cfg = tiny()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False, callbacks=[InterruptAt(5)])
    run = find_run_dir(tmp_path, cfg)
    config, last = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    text, good = config.read_text(), last.read_bytes()
    # a hand-edited config.yaml: resuming would ignore it, sample and eval would read it
    config.write_text(text.replace("lr: 0.001", "lr: 0.5"))
    with pytest.raises(ValueError, match=r"config.yaml \(hash \w+\) is not the config of this run"):
        train(cfg, tmp_path, progress=False)
    config.write_text(text.replace("name: dit-xs/4", "name: dit-xs/2"))
    with pytest.raises(ValueError, match="last.ckpt does not fit .*config.yaml"):
        load_module(run)
    # a config.yaml lost in a crash is written again; a truncated checkpoint is named
    config.unlink()
    last.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="last.ckpt is not a readable checkpoint.*delete it"):
        train(cfg, tmp_path, progress=False)
    assert config.read_text() == text
    with pytest.raises(ValueError, match="last.ckpt is not a readable checkpoint"):
        load_module(run)
    torch.save({"weights": torch.zeros(1)}, run / "checkpoints" / "other.ckpt")
    with pytest.raises(ValueError, match="other.ckpt is not a dit-bench checkpoint"):
        load_module(run, "other.ckpt")
    last.write_bytes(good)
    assert train(cfg, tmp_path, progress=False) == run  # and it finishes
    assert load_module(run).checkpoint_step == 12
    # a finished run's lost config.yaml: the reports name it; rerunning the command restores it
    from dit_bench.report.results import run_row

    config.unlink()
    with pytest.raises(ValueError, match="no config.yaml .*writes it again"):
        run_row(run)
    assert train(cfg, tmp_path, progress=False) == run
    assert config.read_text() == text and run_row(run)["seed"] == cfg.seed


def test_last_checkpoint_holds_the_final_weights(tmp_path):
    # 10 steps, a checkpoint every 4: last.ckpt was the step-8 weights while the summary and
    # the grid described step 10 (sample and eval read last.ckpt)
    run = train(tiny("train.steps=10"), tmp_path, progress=False)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10
    every_2 = train(tiny("train.steps=10", "train.checkpoint_every=2"), tmp_path, progress=False)
    a, b = ckpt["state_dict"], final_state(every_2)  # saved at step 10 by the schedule
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverged_run_ends_with_a_message(tmp_path, capsys):
    from dit_bench.cli import main

    sets = [a for kv in TINY + ["optim.lr=1e30"] for a in ("--set", kv)]
    assert main(["train", "--out", str(tmp_path), "--no-progress", *sets]) == 2
    err = capsys.readouterr().err
    assert (
        "dit-bench: non-finite training loss before step 2; lower optim.lr (grad_clip 1.0)" in err
    )
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*/summary.json"))  # no results for a run that failed


def test_a_multi_node_run_says_what_it_waits_for(tmp_path, monkeypatch, capsys):
    class Stop(Exception):
        pass

    def fit(*args, **kwargs):  # the real fit waits for the other node's processes
        raise Stop

    monkeypatch.setattr(L.Trainer, "fit", fit)
    with pytest.raises(Stop):
        train(tiny("train.num_nodes=2"), tmp_path, progress=False)
    assert "waiting for 2 nodes x 1 processes (launched by torchrun" in capsys.readouterr().err


def test_train_accelerator_auto_is_cuda_or_the_cpu_never_lightnings_pick(tmp_path, monkeypatch):
    # Lightning's "auto" takes MPS on an Apple machine, where the summary would say "cpu"
    class Stop(Exception):
        pass

    seen = {}

    def fit(trainer, *args, **kwargs):
        seen["accelerator"] = type(trainer.accelerator).__name__
        raise Stop

    monkeypatch.setattr(L.Trainer, "fit", fit)
    made = []
    real = L.Trainer.__init__

    def init(self, *args, **kwargs):
        made.append(kwargs["accelerator"])
        real(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", init)
    with pytest.raises(Stop):
        train(tiny("train.accelerator=auto"), tmp_path, progress=False)
    assert made == ["cpu"] and seen["accelerator"] == "CPUAccelerator"


def test_a_val_loss_over_fewer_images_than_asked_for_says_so(tmp_path, monkeypatch, capsys):
    class Stop(Exception):
        pass

    def fit(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(L.Trainer, "fit", fit)
    with pytest.raises(Stop):
        train(tiny("eval.val_images=5000"), tmp_path, progress=False)
    err = capsys.readouterr().err
    assert "eval.val_images=5000: the digits validation split holds 180 images" in err
    with pytest.raises(Stop):
        train(tiny(), tmp_path, progress=False)  # 16 of 180: nothing to say
    assert "val_images" not in capsys.readouterr().err


def test_two_processes_training_one_config_share_its_run(tmp_path):
    # Two `dit-bench train` of one config at once (two terminals, a sweep retry of a slow
    # trial): the second waits, then finds the run finished. Without the lock both made a run
    # directory (or clashed on the name) and wrote the same checkpoints.
    from dit_bench.config import load_config
    from dit_bench.train.run import _run_lock

    sets = [a for kv in TINY + ["train.steps=4"] for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "dit_bench.cli", "train", "--out", str(tmp_path / "runs")]
    logs = [tmp_path / f"{i}.log" for i in range(2)]
    cfg = load_config(None, [*TINY, "train.steps=4"])  # the CLI's config of these --set
    with _run_lock(tmp_path / "runs", cfg):  # both must wait for this one
        procs = [
            subprocess.Popen([*cmd, "--no-progress", *sets], stderr=log.open("w"), text=True)
            for log in logs
        ]
        deadline = time.time() + 120
        held = f"another process (pid {os.getpid()} on "  # this one, named by the lock file
        while not all(held in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    texts = [log.read_text() for log in logs]
    assert sum("already finished" in t for t in texts) == 1, texts
    assert len(list((tmp_path / "runs" / "tiny").glob("*/summary.json"))) == 1


def test_a_process_waiting_for_a_run_names_the_one_that_holds_it(tmp_path, capsys):
    # A double launch, or a requeued job whose old process still runs (another node, a
    # forgotten tmux session): "another process" left the user to find which one by hand.
    # A holder that died (kill -9) leaves its line in the lock file: the next holder's
    # replaces it, and its lock is free at once.
    import socket
    import threading

    from dit_bench.train.run import _run_lock

    cfg, out = tiny(), tmp_path / "runs"
    lock = out / cfg.experiment / f".{cfg.hash}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("pid 1 on dead-host since 2020-01-01T00:00:00+00:00\n")
    entered, seen = threading.Event(), []

    def second():
        with _run_lock(out, cfg):
            entered.set()

    with _run_lock(out, cfg):
        waiter = threading.Thread(target=second)
        waiter.start()
        deadline = time.time() + 10
        while not any("another process" in e for e in seen):
            assert time.time() < deadline and not entered.is_set()
            seen.append(capsys.readouterr().err)
            time.sleep(0.05)
    waiter.join(timeout=10)
    assert entered.is_set()
    (line,) = [e for e in seen if "another process" in e]
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line, line
    assert "dead-host" not in line and "dead-host" not in lock.read_text()


def test_slurm_requeue_checkpoints_resume_the_run_and_do_not_pile_up(tmp_path, monkeypatch, capsys):
    # `sbatch --signal=USR1@90`: Lightning's SLURM auto-requeue saves hpc_ckpt_N.ckpt in the
    # run directory and requeues the job. Given last.ckpt, Lightning never read them: each
    # requeue of a long run left one more full checkpoint (optimiser state, EMA copy) to the
    # end, and the requeued job went back to last.ckpt, up to checkpoint_every steps earlier.
    import signal

    slurm = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_ID": "4243", "SLURM_JOB_NAME": "train",
             "SLURM_NODELIST": "127.0.0.1"}  # fmt: skip
    for var in ("RANK", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)

    class Usr1At(L.Callback):  # SLURM's signal; its `scontrol requeue` fails here: no SLURM
        def __init__(self, *steps):
            self.steps = steps

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in self.steps:
                os.kill(os.getpid(), signal.SIGUSR1)

    cfg = tiny("train.checkpoint_every=4")
    with pytest.raises(KeyboardInterrupt):  # requeued: the job stops at step 7
        train(cfg, tmp_path, progress=False, callbacks=[Usr1At(2, 6), InterruptAt(7)])
    run = find_run_dir(tmp_path, cfg)
    assert len(list(run.glob("hpc_ckpt_*.ckpt"))) == 2  # Lightning's, at steps 2 and 6
    capsys.readouterr()
    train(cfg, tmp_path, progress=False, callbacks=[Usr1At(9)])
    assert "from step 6 (saved by Lightning's SLURM requeue" in capsys.readouterr().err
    assert not list(run.glob("hpc_ckpt_*.ckpt"))
    assert (run / "summary.json").exists()
    # requeued at the last step, before its checkpoint: the rerun trains nothing (no
    # on_train_start) and makes the requeue file last.ckpt before removing it
    cfg = tiny("train.checkpoint_every=4", "train.keep_every=0")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "end", progress=False, callbacks=[Usr1At(12), InterruptAt(12)])
    run = find_run_dir(tmp_path / "end", cfg)
    assert torch.load(run / "checkpoints" / "last.ckpt")["global_step"] == 8
    train(cfg, tmp_path / "end", progress=False)
    assert torch.load(run / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert not list(run.glob("hpc_ckpt_*.ckpt"))


@pytest.mark.parametrize(
    "env, zero",
    [
        ({}, True),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "3", "LOCAL_RANK": "0"}, False),  # torchrun: node 1's first process
        ({"SLURM_NTASKS": "16", "SLURM_PROCID": "8"}, False),  # srun
        ({"NODE_RANK": "1"}, False),  # Lightning's launcher on node 1: made its own run dir
        ({"NODE_RANK": "0", "LOCAL_RANK": "1"}, False),
    ],
)
def test_only_the_first_process_of_a_job_makes_the_run_directory(monkeypatch, env, zero):
    from dit_bench.train.run import _launch_rank

    for var in (
        "RANK",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_JOB_NAME",
        "NODE_RANK",
        "LOCAL_RANK",
    ):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert (_launch_rank() == 0) == zero


def test_load_module_leaves_the_callers_random_numbers_alone(tmp_path):
    # the module's initial weights, replaced by the checkpoint's, were drawn from the caller's
    # generator: a notebook's seeded numbers after a load (or an eval) were others
    run = train(tiny("train.steps=2"), tmp_path, progress=False)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_module(run)
    assert torch.equal(torch.rand(3), expected)


def test_pixel_samples_are_clamped_to_the_data_range(tmp_path):
    from dit_bench.train.run import sample_images

    module = load_module(train(tiny("train.steps=4"), tmp_path, progress=False))
    x = sample_images(module, torch.arange(4), sampler="ddpm", steps=4, cfg_scale=20.0, seed=0)
    assert x.abs().max() <= 1.0  # strong guidance overshoots; images live in [-1, 1]


def test_summary_val_loss_reads_null_as_non_finite():
    from dit_bench.train.run import summary_val_loss

    assert summary_val_loss({"val_loss": None}) == "non-finite"  # NaN/inf are written as null
    assert summary_val_loss({"val_loss": 0.1234567}) == "0.12346"


def test_out_naming_a_file_is_refused_by_name(tmp_path, capsys):
    from dit_bench.cli import main

    out = tmp_path / "runs"
    out.write_text("")
    for cmd in (["train"], ["ablate", "ablations/conditioning.yaml"]):
        assert main([*cmd, "--out", str(out)]) == 2
        assert f"--out {out} is a file" in capsys.readouterr().err


def test_a_run_trained_compiled_loads_eager(tmp_path):
    """sample and eval compile when asked (--compile): a run's train.compile and
    train.cudagraphs (execution keys: the same run directory) do not compile what they load,
    so `sample --no-ema` never replays the training's CUDA graphs."""
    import yaml

    run = train(tiny("train.steps=2"), tmp_path, progress=False)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"].update(compile=True, cudagraphs=True)  # as a cudagraphs run records it
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    module = load_module(run)
    assert (module.cfg.train.compile, module.cfg.train.cudagraphs) == (False, False)
    assert module.cfg.hash == tiny("train.steps=2").hash
    compiled = [m for m in module.modules() if getattr(m, "_compiled_call_impl", None)]
    assert compiled == []


def test_activation_checkpointing_trains_the_same_weights_in_the_same_run(tmp_path):
    """train.activation_checkpointing recomputes each block in the backward: the same
    gradients, so the same weights and EMA bit for bit, and the same run directory (an
    execution key: a run resumes across it)."""

    class Checkpointed(L.Callback):  # which runs trained with checkpointed blocks
        def __init__(self):
            self.seen = []

        def on_train_start(self, trainer, pl_module):
            self.seen.append(all("forward" in vars(b) for b in pl_module.net.blocks))

    watch = Checkpointed()
    plain = train(tiny("train.steps=4"), tmp_path / "plain", progress=False, callbacks=[watch])
    cfg = tiny("train.steps=4", "train.activation_checkpointing=true")
    checkpointed = train(cfg, tmp_path / "checkpointed", progress=False, callbacks=[watch])
    assert watch.seen == [False, True]
    assert cfg.hash == tiny("train.steps=4").hash and checkpointed.name.endswith(cfg.hash)
    assert plain.name.endswith(cfg.hash)
    a, b = final_state(plain), final_state(checkpointed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(checkpointed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


@pytest.mark.parametrize(
    ("backbone", "blocks"),
    [
        (["backbone.name=dit-xs/4"], {"AdaLNZeroBlock"}),
        (["backbone.name=uvit-xs/2"], {"UViTBlock"}),
        (["backbone.name=unet-xs", "backbone.conditioning=adagn"], {"EmbedSequential"}),
    ],
)
def test_fsdp_wraps_the_backbone_blocks_only(backbone, blocks):
    """train.strategy=fsdp: one FSDP unit per backbone block (the blocks activation
    checkpointing and regional compilation use), not every module class that some ModuleList
    holds: the U-Net's EmbedSequential groups are ModuleLists themselves, and a policy made
    from every ModuleList's members wrapped each of its 39 Conv2d layers in a unit of its own."""
    from dit_bench.data import data_info
    from dit_bench.train.module import DiffusionModule
    from dit_bench.train.run import _strategy

    cfg = tiny(*backbone)
    module = DiffusionModule(cfg, data_info(cfg.data))
    policy = _strategy("fsdp", module).kwargs["auto_wrap_policy"]
    assert {t.__name__ for t in policy._module_classes} == blocks


def test_config_refuses_fsdp_on_the_cpu():
    with pytest.raises(
        ValueError,
        match=r"train.strategy=fsdp needs a CUDA device.*"
        r"train.accelerator is 'cpu'.*train.strategy=ddp",
    ):
        tiny("train.accelerator=cpu", "train.strategy=fsdp")
    tiny("train.strategy=fsdp")  # auto: a GPU machine's run, decided where it trains


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_fsdp_without_a_gpu_is_refused_before_anything_is_built(tmp_path):
    """train.accelerator=auto on a machine without a GPU: Lightning (and torch's FSDP under
    it) refuse the CPU; refused by the config's key names before the data is read and the
    module built, with nothing written (Lightning's message named its own `accelerator='cpu'`
    and offered `accelerator='cuda'`, no value of train.accelerator)."""
    with pytest.raises(ValueError, match=r"train.strategy=fsdp needs a CUDA device.*no CUDA"):
        train(tiny("train.strategy=fsdp"), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_learning_rate_warms_up_linearly_from_the_first_step_as_logged(tmp_path):
    # optim.warmup_steps=W: the k-th optimiser step (1-based) runs at lr * min(1, k / W): the
    # first step already moves the weights. The row of step k (k steps done; its train/loss the
    # mean of the steps up to k) says the lr step k used (as Lightning's LearningRateMonitor
    # does), not the one of step k + 1, which at the final row never runs.
    lr, warmup, steps = 1e-3, 10, 6
    cfg = tiny(f"train.steps={steps}", "train.log_every=1", f"optim.warmup_steps={warmup}")
    train(cfg, tmp_path, progress=False)
    rows = [r for r in read_csv(find_run_dir(tmp_path, cfg) / "metrics.csv") if r.get("lr")]
    logged = {int(r["step"]): float(r["lr"]) for r in rows}
    assert sorted(logged) == list(range(1, steps + 1))
    for k, value in logged.items():
        assert value == pytest.approx(lr * min(1.0, k / warmup)), k


def test_a_stop_whose_teardown_fails_is_still_a_stop(tmp_path, monkeypatch):
    """A SIGTERM to the whole process group (systemd, SLURM, `kill -- -PGID`) also kills the
    data loader's workers: Lightning's teardown after the interrupt then raises "DataLoader
    worker (pid N) is killed by signal: Terminated." (a real one: the slow test below). The run
    was stopped, not failed: train must raise the interruption (the CLI exits 130 and says to
    rerun; a sweep re-runs the trial), not a RuntimeError (exit 1; a failed, unretried trial)."""
    from dit_bench.config import Terminated

    teardown = L.Trainer._teardown

    def workers_died_of_the_sigterm_too(self):
        teardown(self)
        if self.interrupted:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated. ")

    monkeypatch.setattr(L.Trainer, "_teardown", workers_died_of_the_sigterm_too)
    with pytest.raises(Terminated):
        train(tiny(), tmp_path, progress=False, callbacks=[InterruptAt(5, Terminated)])
    monkeypatch.setattr(L.Trainer, "_teardown", teardown)
    assert find_run_dir(tmp_path, tiny()) is not None  # kept: it resumes


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_is_an_interruption(tmp_path):
    """The real thing: `kill -TERM -- -PGID` of `dit-bench train` with data.num_workers=2 after
    its first checkpoint exits 130 ("interrupted"), and the rerun ends as an uninterrupted run."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    extra = ["train.steps=40", "data.num_workers=2"]
    args = [sys.executable, "-m", "dit_bench.cli", "train", str(empty), "--no-progress", "--out"]
    sets = [a for s in TINY + extra for a in ("--set", s)]
    cfg = tiny(*extra)
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        args + [str(out)] + sets,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_checkpoint(out, cfg)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    run = find_run_dir(out, cfg)
    assert not (run / "summary.json").exists(), "stopped too late to test it"
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; run the same command again to resume" in err
    ref = train(cfg, tmp_path / "ref", progress=False)
    assert train(cfg, out, progress=False) == run
    assert read_csv(ref / "metrics.csv") == read_csv(run / "metrics.csv")
    a, b = final_state(ref), final_state(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class KilledInWorkers(torch.utils.data.Dataset):
    """8x8 digits-shaped items; a loader process that reads one is killed as the OOM killer
    kills (SIGKILL). At module level: workers started by spawn or forkserver unpickle it."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(1, 8, 8), index % 10


def test_a_loader_process_killed_for_memory_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    # torch's "DataLoader worker (pid N) is killed by signal: Killed." came last of a 110-line
    # traceback, exit 1: the OOM killer's victim is the out-of-memory run the README answers
    # with one line naming what lowers it (exit 2)
    from dit_bench.config import OutOfMemory
    from dit_bench.data import module as data_module

    data = KilledInWorkers()
    split = (torch.utils.data.Subset(data, range(48)), torch.utils.data.Subset(data, range(48, 64)))
    monkeypatch.setattr(data_module, "load_datasets", lambda cfg: split)
    with pytest.raises(OutOfMemory) as raised:
        train(tiny("data.num_workers=2"), tmp_path, progress=False)
    message = str(raised.value)
    assert "\n" not in message and "data loader process" in message, message
    assert "out-of-memory killer" in message and "data.num_workers (now 2)" in message


def test_which_dead_loader_processes_are_said_to_be_out_of_memory():
    # torch says "killed by signal: Killed" where its SIGCHLD handler saw the death, else only
    # "exited unexpectedly" (found by polling); a segfault keeps its traceback
    import queue

    from dit_bench.train.run import loader_killed_message

    def exited(cause):
        e = RuntimeError("DataLoader worker (pid(s) 11, 12) exited unexpectedly")
        e.__cause__ = cause
        return e

    def signalled(name):
        return RuntimeError(f"DataLoader worker (pid 11) is killed by signal: {name}. ")

    cfg = tiny("data.num_workers=2")
    for e in (signalled("Killed"), signalled("Killed: 9"), exited(signalled("Killed"))):
        said = loader_killed_message(e, cfg, 3)
        assert said.startswith("a data loader process (pid 11) was killed (SIGKILL"), said
    said = loader_killed_message(exited(queue.Empty()), cfg, 3)
    assert said.startswith("data loader processes (pid 11, 12) died (killed by the out-of-memory")
    assert "at step 3 of tiny: lower data.num_workers (now 2) or train.batch_size (now 8)" in said
    for e in (exited(signalled("Segmentation fault")), RuntimeError("CUDA error")):
        assert loader_killed_message(e, cfg, 3) is None
    # a container's 64 MB /dev/shm: torch's line, then its traceback, exit 1
    said = loader_killed_message(exited(signalled("Bus error")), cfg, 3)
    assert said.startswith("a data loader process (pid 11) ran out of shared memory (SIGBUS")
    assert "--shm-size" in said and "data.num_workers (now 2)" in said


def two_class_folder(root: Path, per_class: int) -> Path:
    """An image folder of classes cat and dog, `per_class` 8x8 PNGs each."""
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (255 * c, 40 * i, 0)).save(root / name / f"{i}.png")
    return root


def interrupted_folder_run(tmp_path):
    """(image folder root, config, run dir): 8 images of 2 classes, a run stopped at step 3."""
    root = two_class_folder(tmp_path / "images", 4)
    folder = ["data.name=folder", f"data.root={root}", "data.image_size=8"]
    cfg = tiny(*folder, "data.val_fraction=0.25", "eval.val_images=2", "train.batch_size=2",
               "train.checkpoint_every=2")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "runs", progress=False, callbacks=[InterruptAt(3)])
    return root, cfg, find_run_dir(tmp_path / "runs", cfg)


def test_the_summary_names_the_data_the_run_saw(tmp_path):
    # a folder's files are not in its config: two runs of one config can see other images,
    # and the summary is what a report has of each run (the fingerprint resume and eval check)
    from dit_bench.data import load_datasets
    from dit_bench.data.module import items_sha256
    from dit_bench.report.results import run_row

    root = two_class_folder(tmp_path / "images", 3)
    cfg = tiny("data.name=folder", f"data.root={root}", "data.image_size=8", "train.steps=1",
               "data.val_fraction=0.25", "eval.val_images=2", "train.batch_size=2")  # fmt: skip
    run = train(cfg, tmp_path / "runs", progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["items_sha256"] == items_sha256(*load_datasets(cfg.data))
    assert summary["class_names"] == ["cat", "dog"]
    row = run_row(run)  # the runs table: the fingerprint a column, the names (a list) not one
    assert row["items_sha256"] == summary["items_sha256"] and "class_names" not in row


def test_a_folder_file_that_is_no_image_is_refused_before_training(tmp_path):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8)).save(root / name / f"{i}.png")
    (root / "dog" / "page.jpg").write_text("<html>404 Not Found</html>")  # a failed download
    (root / "dog" / "empty.png").write_bytes(b"")
    cfg = tiny("data.name=folder", f"data.root={root}", "data.image_size=8")
    # the data module's setup, before the model and the run directory, not the step that
    # first draws the file (an epoch in: hours, on a large folder)
    with pytest.raises(ValueError, match="2 of 10 files are not readable images") as error:
        DiffusionDataModule(cfg).setup("fit")
    assert "dog/empty.png" in str(error.value) and "dog/page.jpg" in str(error.value)
    with pytest.raises(ValueError, match="not readable images"):
        train(cfg, tmp_path / "runs", progress=False)
    assert find_run_dir(tmp_path / "runs", cfg) is None


def test_a_folder_whose_files_changed_is_not_resumed_on_another_split(tmp_path):
    root, cfg, run = interrupted_folder_run(tmp_path)
    # the image that stopped the run, deleted: 7 images, another split from step 3 on
    (root / "dog" / "2.png").rename(tmp_path / "2.png")
    with pytest.raises(ValueError, match=r"files changed since.*\(8 items then, 7 now"):
        train(cfg, tmp_path / "runs", progress=False)
    (tmp_path / "2.png").rename(root / "dog" / "2.png")
    assert train(cfg, tmp_path / "runs", progress=False) == run


def test_eval_of_a_folder_run_whose_files_changed_is_refused_by_position(tmp_path, monkeypatch):
    # one image added after training: by position the held-out split is another draw of the
    # folder, holding training images; eval scored the run against them without a word. The
    # check lists the folder once with the reference, and refuses before the reference's
    # features (it listed every file twice, and refused after them)
    from dit_bench.data import datasets
    from dit_bench.metrics import evaluate

    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))
    root, cfg, run = interrupted_folder_run(tmp_path)
    built, scored = [], []
    full_dataset, reference_stats = datasets.full_dataset, evaluate.reference_stats
    monkeypatch.setattr(datasets, "full_dataset", lambda cfg: built.append(1) or full_dataset(cfg))
    monkeypatch.setattr(
        evaluate, "reference_stats", lambda *a, **k: scored.append(1) or reference_stats(*a, **k)
    )
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "dog" / "new.png")
    request = evaluate.EvalRequest(metrics=("fd",), num_samples=2, steps=2, features="mnist-net")
    with pytest.raises(ValueError, match=r"changed since the run trained \(8 items then, 9 now"):
        evaluate.evaluate_run(run, request, progress=False)
    assert (len(built), scored) == (1, [])
    (root / "dog" / "new.png").unlink()
    assert evaluate.evaluate_run(run, request, progress=False)["metrics"]["FD-mnist-net"] >= 0
    assert (len(built), len(scored)) == (2, 1)


def test_a_folder_split_by_name_that_grew_is_evaluated_with_a_note(tmp_path, capsys):
    from dit_bench.data import load_datasets
    from dit_bench.metrics.evaluate import check_held_out_split

    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8)).save(root / name / f"{i}.png")
    cfg = tiny("data.name=folder", f"data.root={root}", "data.image_size=8", "data.split_by=name")
    data = DiffusionDataModule(cfg)
    data.setup("fit")
    trained = data.state_dict()
    check_held_out_split(cfg, trained, load_datasets(cfg.data))
    assert capsys.readouterr().err == ""
    Image.new("RGB", (8, 8)).save(root / "cat" / "5.png")  # what split_by=name is for
    check_held_out_split(cfg, trained, load_datasets(cfg.data))
    assert "(10 items then, 11 now, or renamed): the held-out split by name" in (
        capsys.readouterr().err
    )
    # a checkpoint from before the data module's state
    check_held_out_split(cfg, None, load_datasets(cfg.data))


def test_sample_labels_of_folders_named_by_numbers_say_which_class_they_are(tmp_path, capsys):
    # class folders 2, 9, 10 sort as text: 10, 2, 9. `--labels 2` drew the folder named 9
    # (and with folders 2 and 10 alone, the null class: unconditional samples), saying nothing
    from dit_bench.cli import main

    root = tmp_path / "images"
    for c, name in enumerate(["2", "9", "10"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (80 * c, 40 * i, 0)).save(root / name / f"{i}.png")
    cfg = tiny("data.name=folder", f"data.root={root}", "data.image_size=8", "train.steps=1",
               "data.val_fraction=0.25", "eval.val_images=2", "train.batch_size=2")  # fmt: skip
    run = train(cfg, tmp_path / "runs", progress=False)
    capsys.readouterr()
    grid = str(tmp_path / "g.png")
    sample = ["sample", str(run), "--n", "2", "--steps", "2", "-o", grid, "--labels"]
    assert main([*sample, "2,0"]) == 0
    err = capsys.readouterr().err
    assert (
        "--labels are indices of the sorted class names: 2 is '9' (the folder '2' is label 1)"
        in err
    )
    assert main([*sample, "1"]) == 0  # the folder named 2: nothing to say
    assert "--labels" not in capsys.readouterr().err


def test_a_folder_whose_classes_changed_is_refused_by_resume_and_by_load(tmp_path):
    root, cfg, run = interrupted_folder_run(tmp_path)
    assert load_module(run).info.class_names == ("cat", "dog")
    # renamed: as many classes, so the weights fit, but label 0 would now be "dog"
    (root / "cat").rename(root / "tabby")
    with pytest.raises(ValueError, match="classes changed.*added 'tabby'; removed 'cat'"):
        train(cfg, tmp_path / "runs", progress=False)
    with pytest.raises(ValueError, match="classes changed.*added 'tabby'; removed 'cat'"):
        load_module(run)
    # added: the label table no longer fits either; named, not a size mismatch of weights
    (root / "tabby").rename(root / "cat")
    (root / "ant").mkdir()
    Image.new("RGB", (8, 8)).save(root / "ant" / "0.png")
    with pytest.raises(ValueError, match="classes changed.*added 'ant'"):
        load_module(run)


def test_a_folder_run_copied_to_a_machine_without_its_images_still_samples(tmp_path):
    # trained on a cluster, copied to a laptop that has the run but not the images: `sample`
    # needs only the class names, which the checkpoint records, yet stopped at "data.root:
    # folder ... does not exist"
    import shutil

    from dit_bench.cli import main

    root, cfg, run = interrupted_folder_run(tmp_path)
    copy = tmp_path / "laptop" / run.name
    shutil.copytree(run, copy)
    shutil.rmtree(root)
    assert load_module(copy).info.class_names == ("cat", "dog")
    grid = tmp_path / "g.png"
    assert main(["sample", str(copy), "--n", "2", "--steps", "2", "-o", str(grid)]) == 0
    assert grid.is_file()
    # eval scores against the held-out images: without them it is refused, naming the folder
    from dit_bench.metrics.evaluate import EvalRequest, evaluate_run

    with pytest.raises(ValueError, match="does not exist"):
        evaluate_run(copy, EvalRequest(metrics=("fd",), num_samples=2, features="mnist-net"))


def test_a_run_finished_on_another_machine_names_the_devices_its_steps_ran_on(
    tmp_path, monkeypatch
):
    # trained on a cluster, copied and finished on a laptop: the summary named the laptop
    # alone, beside an img/s mostly of the cluster's steps (and a run killed between its last
    # checkpoint and its summary, finished elsewhere, named a device that trained no step)
    cfg = tiny("train.steps=4", "train.val_every=2", "train.checkpoint_every=2")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "a", progress=False, callbacks=[InterruptAt(3)])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", progress=False, callbacks=[InterruptAtEnd()])
    here = run_module.device_name(torch.device("cpu"), 1)  # train.threads=1
    monkeypatch.setattr(run_module, "device_name", lambda *a: "laptop")
    run = train(cfg, tmp_path / "a", progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"] == f"{here} then laptop"
    run = train(cfg, tmp_path / "b", progress=False)  # no step left to train
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"] == here


def test_a_run_moved_to_another_folder_resumes_without_lightnings_dirpath_warning(tmp_path):
    # `rsync -a` to a laptop, or `mv runs elsewhere/`: every resume warned that the checkpoint
    # folder changed and "`last_model_path` and `best_k_models` won't be reloaded", which reads
    # as a broken resume; the run keeps no best model, and resumes exactly (tested above)
    import shutil
    import warnings

    cfg = tiny("train.steps=4", "train.val_every=2", "train.checkpoint_every=2")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cluster", progress=False, callbacks=[InterruptAt(3)])
    shutil.move(tmp_path / "cluster", tmp_path / "laptop")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run = train(cfg, tmp_path / "laptop", progress=False)
    assert (run / "summary.json").is_file()
    assert not [w for w in seen if "dirpath has changed" in str(w.message)]


def test_runs_in_one_process_do_not_pile_up_logging_filters():
    # a sweep worker or an ablation trains run after run in one process, and each `train`
    # quiets Lightning again: a new filter a run grew the logger's list by one a run
    import logging

    from dit_bench.train import run

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    run._quiet_lightning()
    before = len(logger.filters)
    for _ in range(3):
        run._quiet_lightning()
    assert len(logger.filters) == before


@pytest.fixture
def modules_made(monkeypatch):
    """Weak references to every DiffusionModule the runs build, with the collector's automatic
    passes off: a full pass by chance must not free what the run itself has to."""
    import gc
    import weakref

    from dit_bench.train.module import DiffusionModule

    monkeypatch.setenv("DIT_BENCH_GC_AFTER_RUN", "1")  # conftest turns it off for the suite
    made = []

    class Recorded(DiffusionModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(run_module, "DiffusionModule", Recorded)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield made
    finally:
        if enabled:
            gc.enable()


def test_runs_in_one_process_free_the_models_of_the_runs_before(tmp_path, modules_made):
    # A sweep worker trains trial after trial in one process, a notebook run after run. A run's
    # Trainer and module refer to each other, and nothing but the collector's full pass frees
    # such cycles, which a training loop's allocations seldom set off: each finished (or
    # pruned) run's net, EMA copy and optimiser state stayed in memory, Lightning having moved
    # them to the host (4 of 6 tiny runs' modules alive, 130 MB more RSS a run for an 11M
    # parameter DiT; 8 GB for a DiT-XL/2 trial, by the same count)
    with pytest.raises(KeyboardInterrupt):  # a pruned or stopped trial, then the next
        train(tiny("train.steps=2", "seed=1"), tmp_path, progress=False, callbacks=[InterruptAt(1)])
    train(tiny("train.steps=2"), tmp_path, progress=False)
    assert [r() for r in modules_made] == [None, None]


def test_a_callback_the_caller_keeps_does_not_keep_the_runs_model(tmp_path, modules_made):
    # A sweep keeps its trial's ValAtSteps past train() (it reads the timings off it), an
    # ablation its callbacks for every run, a notebook its own. Lightning hands every callback
    # the module's `log` and `log_dict` (bound methods), so such a callback held the finished
    # run's module past the run's collector pass: in a sweep worker each trial's net, EMA copy
    # and optimiser state stayed in memory through the next trial's training
    from dit_bench.train.callbacks import ValAtSteps

    kept = ValAtSteps([1])  # as Worker._run_trial's tracker
    train(tiny("train.steps=2"), tmp_path, progress=False, callbacks=[kept])
    assert [r() for r in modules_made] == [None]


def process_settings() -> dict:
    """What a notebook or script that calls `train` has set up for its own work."""
    import random

    import numpy as np

    return {
        "threads": torch.get_num_threads(),
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "nan fill": torch.utils.deterministic.fill_uninitialized_memory,
        "cudnn benchmark": torch.backends.cudnn.benchmark,
        "env": {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED")},
        "random": (torch.randn(3).tolist(), np.random.rand(), random.random()),
        "warnings": list(warnings.filters),
        "signal handlers": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
    }


class InterruptInSetup(L.Callback):
    """Ctrl-C while Lightning sets the run up (a resume's checkpoint read, say), before it has
    noted the process's signal handlers to restore."""

    def setup(self, trainer, pl_module, stage):
        raise KeyboardInterrupt


@pytest.mark.parametrize("stop", [None, KeyboardInterrupt, InterruptInSetup])
def test_train_leaves_the_callers_process_settings_as_it_found_them(tmp_path, monkeypatch, stop):
    # From a notebook: Lightning's deterministic mode left on refused the user's own put_ (and
    # on CUDA index_add_, scatter_add_...) and NaN-filled every torch.empty; train.threads=1
    # stuck, so the next run without it trained (and said so in its summary) on 1 thread; and
    # the user's random numbers after a run were the run's seed's; and the run's warning
    # filters hid Lightning's eval-mode warning from the user's own Lightning runs. A Ctrl-C
    # in Lightning's setup left SIGINT ignored (Lightning ignores it while it shuts down and
    # restores only the handlers it had noted): every later Ctrl-C of the session did nothing
    import random

    import numpy as np

    for k in ("CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(k, raising=False)
    saved = (torch.get_num_threads(), torch.backends.cudnn.benchmark)
    try:
        torch.set_num_threads(2)  # not the tiny run's 1
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        seed = lambda: (torch.manual_seed(5), np.random.seed(5), random.seed(5))  # noqa: E731
        seed()
        expected = process_settings()
        seed()
        callbacks = [stop() if stop is InterruptInSetup else InterruptAt(4, stop)] if stop else []
        with pytest.raises(KeyboardInterrupt) if stop else contextlib.nullcontext():
            train(tiny("train.steps=4"), tmp_path, progress=False, callbacks=callbacks)
        assert process_settings() == expected
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = saved[1]


def test_a_run_out_of_memory_says_so_in_one_line_and_keeps_its_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """On the CPU torch's allocator raises a plain RuntimeError: `train` died with 130 lines of
    traceback, the allocator's last, and nothing said which setting to lower."""
    from dit_bench.cli import main
    from dit_bench.train.module import DiffusionModule

    step = DiffusionModule.training_step

    def runs_out_at_step_5(self, batch, batch_idx):
        if self.global_step == 5:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 3221225472 bytes. Error code 12 "
                "(Cannot allocate memory)"
            )
        return step(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", runs_out_at_step_5)
    empty = tmp_path / "empty.yaml"  # a config file: the types' defaults, like tiny()
    empty.write_text("{}\n")
    sets = [a for s in TINY for a in ("--set", s)]
    out = tmp_path / "runs"
    assert main(["train", str(empty), *sets, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "dit-bench: out of memory at step 5 of tiny (DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)): set "
        "train.accumulate_grad_batches=2 (the same run, 4 images a training forward), lower "
        "train.batch_size (now 8), pick a smaller backbone.name (now dit-xs/4) or set "
        "train.activation_checkpointing=true"
    )
    run = find_run_dir(out, tiny())
    assert final_state(run) and not (run / "summary.json").exists()  # step 4's, to resume


def test_a_session_of_one_step_names_the_device_it_ran_on(monkeypatch):
    # a run copied from a cluster one step before its end, finished on a laptop: that step is
    # the session's first and only one, and its img/s is partly the laptop's
    monkeypatch.setattr(run_module, "device_name", lambda *a: "laptop")
    from types import SimpleNamespace

    module = SimpleNamespace(
        device=torch.device("cpu"), devices=["cluster GPU"], batch_done_at=None, wall_start=None,
        train_seconds=0.0, data_seconds=0.0, steady_seconds=0.0, steady_steps=0,
    )  # fmt: skip
    trainer = SimpleNamespace(global_step=99, max_steps=100)
    timer = run_module._Timer()
    timer.on_train_start(trainer, module)
    timer.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 100
    timer.on_train_batch_end(trainer, module, None, None, 0)
    assert module.devices == ["cluster GPU", "laptop"]


def test_a_new_run_names_its_directory_when_it_starts(tmp_path, capsys):
    # it was named on stdout at the end only: a 400K-step run's log (or an ablation's, whose
    # variants share one experiment folder and are labelled when they finish) said nowhere
    # whose metrics.csv to watch, nor what a Ctrl-C left to resume
    with pytest.raises(KeyboardInterrupt):
        train(
            tiny(),
            tmp_path,
            progress="lines",
            label="ablate run 1/2 a seed 0",
            callbacks=[InterruptAt(2)],
        )
    run = find_run_dir(tmp_path, tiny())
    assert f"[ablate run 1/2 a seed 0] new run: {run}" in capsys.readouterr().err


def test_train_compile_without_a_cxx_compiler_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    # Inductor's CPU kernels are C++: without a compiler (no Xcode tools, no MSVC, a slim
    # container) train.compile=true ended in a hundred lines of Dynamo internals at step 1
    from torch._inductor.exc import InvalidCxxCompiler

    from dit_bench.config import ConfigError
    from dit_bench.fast import compile_backbone
    from dit_bench.train import module as module_module

    def no_compiler(gm, example_inputs):
        raise InvalidCxxCompiler()

    monkeypatch.setattr(
        module_module,
        "compile_backbone",
        lambda net, mode: compile_backbone(net, mode, backend=no_compiler),
    )
    with pytest.raises(ConfigError, match=r"train.compile: .* no working C\+\+ compiler"):
        train(tiny("train.steps=2", "train.compile=true"), tmp_path, progress=False)
    assert not list(tmp_path.rglob("summary.json"))


def test_progress_lines_say_the_time_left_leaves_out_the_final_fd_and_grid(
    tmp_path, capsys, monkeypatch
):
    # the time left is the steps' rate over the steps left; the FD and the grid after the last
    # step were in no line. The cpu profiles' only FD is that one (eval.fd_every = steps):
    # "~4 s left" at step 540 of 600, then 17 s of FD and 4 s of grid
    monkeypatch.setenv("DIT_BENCH_PROGRESS_EVERY", "0")
    train(tiny("eval.fd_every=12", "eval.fd_samples=8"), tmp_path, progress="lines")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " left" in ln]
    assert lines, "no progress line"
    assert all(
        ln.endswith(" left in the steps, then the FD of 8 samples and the sample grid")
        for ln in lines
    ), lines[-1]


def test_the_in_training_fd_builds_no_second_data_set(tmp_path, monkeypatch):
    # the FD's reference is the held-out split the data module loaded: it built the data set
    # (a folder: listed every file) again at the first FD, 0.23 s of a cpu profile's mnist run
    from dit_bench.data import datasets

    built = []
    full_dataset = datasets.full_dataset
    monkeypatch.setattr(datasets, "full_dataset", lambda cfg: built.append(1) or full_dataset(cfg))
    run_dir = train(tiny("eval.fd_every=12", "eval.fd_samples=8"), tmp_path, progress=False)
    assert len(built) == 1
    fd = json.loads((run_dir / "summary.json").read_text())["val_FD-digits-net"]
    assert fd == fd and fd > 0  # a number, not NaN
