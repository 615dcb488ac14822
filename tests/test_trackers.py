"""Experiment trackers (train.loggers): TensorBoard and W&B get what metrics.csv gets."""

import math
import re
import subprocess
import sys
import time

import lightning as L
import pytest
import yaml
from test_train import InterruptAt, tiny

from dit_bench.config import ConfigError, build_config
from dit_bench.train.callbacks import read_metrics
from dit_bench.train.run import find_run_dir, train


def test_loggers_is_an_execution_key_checked_by_name():
    plain = tiny()
    both = tiny("train.loggers=[tensorboard, wandb]")
    assert both.train.loggers == ("tensorboard", "wandb")
    assert both.hash == plain.hash  # a run resumes with or without a tracker
    assert tiny("train.loggers=tensorboard").train.loggers == ("tensorboard",)  # --set's one name
    for off in ("train.loggers=", "train.loggers=null", "train.loggers=[]"):  # all mean none
        assert tiny("train.loggers=[tensorboard]", off).train.loggers == (), off
    with pytest.raises(ConfigError, match=r"train.loggers.0: got 'tb'; .*'tensorboard' or 'wandb'"):
        tiny("train.loggers=[tb]")
    with pytest.raises(ConfigError, match="train.loggers: wandb given more than once"):
        tiny("train.loggers=[wandb, tensorboard, wandb]")
    assert build_config(yaml.safe_load(both.to_yaml())) == both


@pytest.mark.parametrize(("name", "package"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_refused_before_training(tmp_path, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # its import fails
    cfg = tiny(f"train.loggers=[{name}]")
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path, progress=False)
    assert str(e.value).count("\n") == 0
    assert f"pip install 'dit-bench[{name}]'" in str(e.value)
    assert find_run_dir(tmp_path, cfg) is None  # refused before a run directory was made


def test_an_ablation_refuses_a_missing_tracker_package_before_its_first_run(monkeypatch):
    from dit_bench.ablate import check_data

    monkeypatch.setitem(sys.modules, "wandb", None)
    check_data([tiny()])  # no tracker: nothing to import
    with pytest.raises(ConfigError, match=r"pip install 'dit-bench\[wandb\]'"):
        check_data([tiny(), tiny("train.loggers=[wandb]", "seed=1")])


def test_the_check_of_the_tracker_packages_imports_no_lightning():
    # A sweep's parent checks them before starting its workers: it imported Lightning for that
    # (train.trackers), seconds before any worker started, and again in each spawned one that
    # ran an unguarded script's sweep.
    code = (
        "import sys; from dit_bench.config import check_installed; "
        "check_installed(['tensorboard']); print('lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def csv_columns(run) -> dict[str, list[tuple[int, float]]]:
    rows = read_metrics(run / "metrics.csv")
    keys = [k for k in rows[0] if k != "step"]
    return {k: [(int(r["step"]), float(r[k])) for r in rows if r[k] != ""] for k in keys}


def test_tensorboard_gets_the_numbers_of_metrics_csv_at_its_steps_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # two micro-batches a step: logged at optimiser steps, as metrics.csv is
    cfg = tiny("train.loggers=[tensorboard]", "train.accumulate_grad_batches=2")
    # stopped at step 7: step 6's train loss was logged, the checkpoint is step 4's
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False, callbacks=[InterruptAt(7)])
    run = find_run_dir(tmp_path, cfg)
    assert [s for s, _ in scalars(run / "tensorboard")["train/loss"]] == [2, 4, 6]
    assert train(cfg, tmp_path, progress=False) == run

    csv = csv_columns(run)
    tb = scalars(run / "tensorboard")
    assert set(tb) == set(csv)
    for key, rows in csv.items():  # every step once (the redone step 6 too), float32 values
        assert [s for s, _ in tb[key]] == [s for s, _ in rows], key
        assert [v for _, v in tb[key]] == pytest.approx([v for _, v in rows], rel=1e-6), key
    assert [s for s, _ in csv["val/loss"]] == [4, 8, 12]

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (grid,) = events.Images("samples")  # the final grid, at the last step
    assert grid.step == 12 and grid.height > grid.width > 0
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    hparams = yaml.safe_load((run / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["config_hash"] == cfg.hash and hparams["train.batch_size"] == 8
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.csv",
        "samples",
        "summary.json",
        "tensorboard",
    ]


def wandb_records(path):
    """The records of an offline W&B run file (LevelDB's log format: 32 KiB blocks of chunks,
    each a 4-byte CRC, 2-byte length, 1-byte type; after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a record's whole or last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B writes a key one way or the other


@pytest.fixture
def fresh_wandb():
    """W&B's settings read afresh from the environment: its process-wide singleton keeps the
    ones of its first run (WANDB_MODE and all) until torn down."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield
    wandb.teardown()


def test_wandb_offline_writes_in_the_run_folder_and_a_resume_keeps_its_run(
    tmp_path, monkeypatch, fresh_wandb
):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "elsewhere" / var))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    cfg = tiny("train.loggers=[wandb]")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "runs", progress=False, callbacks=[InterruptAt(7)])
    run = train(cfg, tmp_path / "runs", progress=False)
    import wandb

    assert wandb.run is None  # finished: the next run in this process starts its own
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>: a second session started within the same second is <id>-1
    name = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run.name)}(-\d+)?")
    assert len(sessions) == 2 and all(name.fullmatch(s.name) for s in sessions), sessions
    path, deadline = next(sessions[1].glob("*.wandb")), time.monotonic() + 60
    # W&B's service may still be writing the file when finish() returns: up to its exit record
    # (0.17 writes its stats, summary, final and footer records after it)
    while True:
        records = list(wandb_records(path))
        ended = any(r.WhichOneof("record_type") == "exit" for r in records)
        if ended or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.run_id, info.run_group, info.project) == (run.name, "tiny", "dit-bench")
    config = {
        item_key(u): yaml.safe_load(u.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for u in r.config.update
    }
    assert config["config_hash"] == cfg.hash and config["train.steps"] == 12
    logged = [
        {item_key(i): yaml.safe_load(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    train_loss = [(h["trainer/global_step"], h["train/loss"]) for h in logged if "train/loss" in h]
    csv = dict(csv_columns(run)["train/loss"])
    assert [s for s, _ in train_loss] == [6, 8, 10, 12]  # the resumed session, from step 4
    assert all(math.isclose(v, csv[s], rel_tol=1e-12) for s, v in train_loss)
    assert any("samples" in "".join(h) for h in logged)  # the final grid


# Only rank 0 writes TensorBoard under DDP, with metrics.csv's steps: checked in test_ddp's
# test_two_processes_equal_one_and_checkpoints_cross_over, whose two-process run logs to
# TensorBoard too (a launch of two processes, Lightning imported in each: ~12 s, made once)


def test_wandb_without_an_account_is_refused_in_one_line(tmp_path, monkeypatch, fresh_wandb):
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "HOME"):
        monkeypatch.setenv(var, str(tmp_path / "elsewhere" / var))  # no ~/.netrc key either
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    cfg = tiny("train.loggers=[wandb]")
    with pytest.raises(ConfigError, match=r"^train.loggers: W&B refused the run: .*WANDB_MODE="):
        train(cfg, tmp_path / "runs", progress=False)
    assert find_run_dir(tmp_path / "runs", cfg) is None  # nothing ran: no run left behind


class FailAtFirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise RuntimeError("an unreadable batch")


def test_a_run_that_fails_before_its_first_step_leaves_no_run_dir_for_its_tracker(tmp_path):
    # TensorBoard's hyperparameters are written at the start of training: a run directory
    # holding them and its config.yaml alone read as a run begun (ablate: "partial")
    pytest.importorskip("tensorboard")
    cfg = tiny("train.loggers=[tensorboard]")
    with pytest.raises(RuntimeError, match="an unreadable batch"):
        train(cfg, tmp_path, progress=False, callbacks=[FailAtFirstBatch()])
    assert find_run_dir(tmp_path, cfg) is None


def test_a_pruned_sweep_trial_finishes_its_wandb_run_and_a_failed_one_fails_it(
    tmp_path, monkeypatch
):
    import optuna
    from lightning.pytorch.loggers import WandbLogger

    from dit_bench.train import trackers

    ended = []

    class Run:  # the W&B run the logger started
        id = "run-id"

        def finish(self, exit_code):
            ended.append(exit_code)

    logger = WandbLogger.__new__(WandbLogger)  # ending a run needs no wandb package
    logger._experiment, logger._id = Run(), "run-id"
    monkeypatch.setattr(trackers, "build", lambda *args: [logger])
    for stop in (optuna.TrialPruned, RuntimeError, KeyboardInterrupt):
        with pytest.raises(stop), trackers.tracking(tiny(), tmp_path, None):
            raise stop
    with trackers.tracking(tiny(), tmp_path, None):
        pass
    assert ended == [0, 1, 1, 0]
