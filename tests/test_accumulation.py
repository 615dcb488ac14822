"""Gradient accumulation (train.accumulate_grad_batches): train.batch_size stays the global
batch of one optimiser step, built from A micro-batches per process, and a run's numbers do not
depend on A, as they do not depend on the number of processes."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from dit_bench.config import ConfigError, build_config
from dit_bench.data.module import StepBatches
from dit_bench.train import run as run_module
from dit_bench.train.callbacks import AtomicCheckpointIO, mid_step
from dit_bench.train.run import find_run_dir, train

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "experiment=accum",
    "data.name=digits",
    "backbone.name=dit-xs/4",
    "train.steps=8",
    "train.batch_size=8",
    "train.log_every=2",
    "train.val_every=4",
    "train.checkpoint_every=4",
    "train.keep_every=4",
    "train.threads=1",
    "optim.lr=1e-3",
    "optim.warmup_steps=3",  # the lr moves per optimiser step: one value a step in the rows
    "optim.grad_clip=0.05",  # clips: the norm is the whole step's gradient's
    "optim.ema_decay=0.9",
    "eval.val_images=16",
    "eval.samples_per_class=1",
    "eval.sample_steps=2",
]


def tiny(*extra: str):
    return build_config(None, TINY + list(extra))


def rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_run(a: Path, b: Path, rel: float = 1e-5) -> None:
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]  # one row a step, no repeats
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if x[k] or y[k]:
                assert float(y[k]) == pytest.approx(float(x[k]), rel=rel, abs=1e-7), (x["step"], k)
    ca, cb = last(a), last(b)
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()  # net and EMA
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, rtol=rel, atol=1e-6, msg=k)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == sorted(
        p.name for p in (b / "checkpoints").iterdir()
    )
    assert sorted(p.name for p in (a / "samples").iterdir()) == sorted(
        p.name for p in (b / "samples").iterdir()
    )


def test_two_micro_batches_train_what_the_whole_batch_trains(tmp_path):
    """Same losses, lr values, val losses, weights, EMA, checkpoints and grids as A=1: each
    micro-batch draws its rows of the step's label drops, times and noise, and Lightning's 1/A
    makes the summed gradient the batch mean's (clipped once, stepped once)."""
    one = train(tiny(), tmp_path / "one", progress=False)
    two = train(tiny("train.accumulate_grad_batches=2"), tmp_path / "two", progress=False)
    assert two.name.endswith(tiny().hash)  # not hashed: the run of A=1
    assert_same_run(one, two)
    lrs = [float(r["lr"]) for r in rows(two) if r["lr"]]
    assert lrs == pytest.approx([2e-3 / 3, 1e-3, 1e-3, 1e-3])  # steps 2, 4, 6, 8: per step
    # the steady count is of optimiser steps, not micro-batches (img/s per global batch)
    steady = last(two)["steady"]
    assert steady[1] == last(one)["steady"][1] == 8 - run_module.WARMUP_STEPS
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=1e-5)


def test_a_batch_that_does_not_split_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.accumulate_grad_batches = 3") as e:
        tiny("train.accumulate_grad_batches=3")
    assert "1, 2, 4, 8" in str(e.value)  # what would split the 8 images
    assert "= 1 process x" in str(e.value)
    with pytest.raises(ConfigError, match=r"train\.devices x train\.num_nodes = 2 processes x"):
        tiny("train.accumulate_grad_batches=8", "train.devices=2", "train.accelerator=cpu")
    # the processes a launcher started (torchrun) are checked again by the data
    with pytest.raises(ValueError, match="train.accumulate_grad_batches = 2"):
        StepBatches(list(range(10)), 8, 0, 0, 1, rank=0, world_size=8, accumulate=2)
    assert not (tmp_path / "accum").exists()


def test_cudagraphs_with_accumulation_is_refused():
    with pytest.raises(ConfigError, match="train.cudagraphs with train.accumulate_grad_batches"):
        tiny(
            "train.accumulate_grad_batches=2",
            "train.compile=true",
            "train.cudagraphs=true",
            "train.accelerator=gpu",
        )


def test_the_config_hash_does_not_depend_on_accumulation():
    assert tiny("train.accumulate_grad_batches=4").hash == tiny().hash


@pytest.mark.parametrize("workers", [1, 3])
def test_micro_batches_of_every_rank_tile_the_global_batch(monkeypatch, workers):
    """Rank r's micro-batch m holds global rows (r A + m) x n ..., in stream order, also when
    loader workers each build every W-th micro-batch (the DataLoader reads them round-robin)."""
    import dit_bench.data.datasets as datasets  # StepBatches' module: it calls its name there

    data = [(torch.tensor([float(i)]), i) for i in range(50)]
    whole = [y.tolist() for _, y in StepBatches(data, 8, 3, 2, 6)]  # steps 2..5

    def stream(rank: int) -> list[list[int]]:
        parts = []
        for w in range(workers):
            info = SimpleNamespace(id=w, num_workers=workers)
            monkeypatch.setattr(datasets, "get_worker_info", lambda info=info: info)
            parts.append([y.tolist() for _, y in StepBatches(data, 8, 3, 2, 6, rank, 2, 2)])
        # round-robin over the workers, as the DataLoader reads them
        return [parts[i % workers][i // workers] for i in range(sum(map(len, parts)))]

    r0, r1 = stream(0), stream(1)
    assert len(r0) == len(r1) == 4 * 2
    for step in range(4):
        assert whole[step] == r0[2 * step] + r0[2 * step + 1] + r1[2 * step] + r1[2 * step + 1]


class InterruptAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("first", "then", "keys"),
    [
        (2, 2, []),  # stopped at step 5 with A=2, resumed from its step-4 checkpoint
        # an A=1 checkpoint after an odd number of batches (step 3), resumed with A=2: Lightning's
        # count of batches goes on from 3, and would step after one micro-batch
        (1, 2, ["train.checkpoint_every=3", "train.keep_every=0"]),
    ],
)
def test_a_stopped_and_resumed_run_equals_one_that_was_not(
    tmp_path, monkeypatch, first, then, keys
):
    ref = train(tiny(*keys), tmp_path / "ref", progress=False)
    acc = "train.accumulate_grad_batches="
    with pytest.raises(KeyboardInterrupt):
        cfg = tiny(*keys, f"{acc}{first}")
        train(cfg, tmp_path / "cut", progress=False, callbacks=[InterruptAt(5)])
    cut = find_run_dir(tmp_path / "cut", tiny(*keys))
    assert last(cut)["global_step"] in (3, 4)
    saved = []
    save = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        saved.append((Path(path).name, checkpoint["global_step"]))
        return save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    resumed = train(tiny(*keys, f"{acc}{then}"), tmp_path / "cut", progress=False)
    assert resumed == cut  # the same run directory: the key is not hashed
    assert_same_run(ref, resumed)
    # on step boundaries after the resume point only: not again at the resume step, which
    # global_step still reads in the first micro-batches
    every = 3 if keys else 4
    assert {step for _, step in saved} == set(range(every * 2, 9, every)) | {8}, saved


class RequeueMidStep(L.Callback):
    """Saves as Lightning's SLURM requeue does (hpc_ckpt_1.ckpt, when its signal comes: here
    after micro-batch 0 of step 6), then stops the job."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 5 and mid_step(trainer):
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "hpc_ckpt_1.ckpt")
            raise KeyboardInterrupt


@pytest.mark.parametrize(("first", "then"), [(2, 2), (2, 4)])
def test_a_requeue_checkpoint_saved_mid_step_resumes_to_the_same_run(tmp_path, first, then):
    """The requeue's checkpoint holds Lightning's batch count mid-step (an odd count with A=2):
    the resumed stream starts at the step's first micro-batch, and the optimiser steps after
    its last (DiffusionModule.on_train_batch_start), also with another A."""
    ref = train(tiny(), tmp_path / "ref", progress=False)
    acc = "train.accumulate_grad_batches="
    with pytest.raises(KeyboardInterrupt):
        train(tiny(f"{acc}{first}"), tmp_path / "cut", progress=False, callbacks=[RequeueMidStep()])
    cut = find_run_dir(tmp_path / "cut", tiny())
    assert torch.load(cut / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 5
    resumed = train(tiny(f"{acc}{then}"), tmp_path / "cut", progress=False)
    assert_same_run(ref, resumed)
    assert not (resumed / "hpc_ckpt_1.ckpt").exists()


def test_a_checkpoint_mid_step_holds_only_whole_steps_in_the_loss_window():
    """A SLURM requeue saves when its signal comes, between micro-batches too: the resumed run
    redoes the step from its first micro-batch, so the half done must not be in the window."""
    from dit_bench.data import data_info
    from dit_bench.train.module import DiffusionModule

    cfg = tiny("train.accumulate_grad_batches=2")
    module = DiffusionModule(cfg, data_info(cfg.data))
    module.trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1)
    losses = iter([[1.0, 3.0], [5.0, 7.0], [2.0, 2.0]])
    module.objective.loss = lambda net, x, cond, **kw: {"loss": torch.tensor(next(losses))}
    x = torch.zeros(2, module.info.channels, module.info.image_size, module.info.image_size)
    for _ in range(3):  # one whole step (micro-batches 0 and 1), then micro-batch 0 of the next
        module.training_step((x, torch.arange(2)), 0)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["loss_window"] == (4.0, 1)  # (mean 2 + mean 6) / 2, one step


def test_out_of_memory_names_the_accumulation_that_keeps_the_run():
    """The OOM line offered only settings that change the run (a smaller batch or backbone)
    and activation checkpointing: the next train.accumulate_grad_batches that splits a
    process's batch trains the same run in smaller forwards."""
    from dit_bench.train.run import out_of_memory_message

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = out_of_memory_message(oom, tiny(), 3)
    assert "set train.accumulate_grad_batches=2 (the same run, 4 images a training forward)" in msg
    msg = out_of_memory_message(oom, tiny("train.accumulate_grad_batches=2"), 3)
    assert "train.accumulate_grad_batches=4 (the same run, 2 images a training forward)" in msg
    # one image a forward already: nothing left to split
    msg = out_of_memory_message(oom, tiny("train.accumulate_grad_batches=8"), 3)
    assert "accumulate_grad_batches" not in msg
