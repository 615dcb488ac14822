"""The DataModule: step-indexed training batches and a fixed validation set.

Exact resume needs the batch drawn at step k to be a function of (seed, k) alone, not of how
many times the loader was restarted. So the training stream is an iterable that starts at the
trainer's global step and builds batch k from per-epoch permutations seeded by (seed, epoch):
stop anywhere, restart, and the remaining batches are the ones an uninterrupted run would see.
"""

from __future__ import annotations

import hashlib

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Subset

from dit_bench.data import DataError, DataInfo, data_info, load_datasets
from dit_bench.data.datasets import (  # StepBatches there: a spawned worker imports no Lightning
    ImageFolder,
    StepBatches,
    check_image_files,
    collate,
    name_bytes,
)
from dit_bench.data.latents import LatentShards
from dit_bench.fast import trains_on_cuda

# The validation images in batches of this size whatever train.batch_size: batch k gets the
# noise of seed train.module.VAL_NOISE_SEED + k, so image i's noise is a function of i alone and
# runs of different batch sizes are paired. In batches of train.batch_size, the same weights
# scored 0.3985 at batch 32 and 0.3929 at batch 64 (a shapes-scaling-cpu run; redrawing the
# noise moves it by 0.0018 sd). 32, the batch of the shipped cpu runs: their numbers stand.
VAL_BATCH = 32


def items_sha256(train: Subset, val: Subset) -> str:
    """sha256 of what a run's data are: the split's indices and, for a folder, each index's
    file (path below the root) and label; for latents, their shards' sha256. The built-in
    data sets are functions of the config."""
    full = train.dataset
    h = hashlib.sha256(f"{list(train.indices)}\0{list(val.indices)}".encode())
    if isinstance(full, ImageFolder):
        for name, (_, label) in zip(full.names(), full.samples, strict=True):
            h.update(name_bytes(f"{name}\0{label}\n"))
    elif isinstance(full, LatentShards):
        h.update("".join(s["sha256"] for s in full.shards).encode())
    return h.hexdigest()


class DiffusionDataModule(L.LightningDataModule):
    def __init__(self, cfg):
        """`cfg` is an ExperimentConfig; only data, train, eval and seed are read."""
        super().__init__()
        self.cfg = cfg
        self.info: DataInfo = data_info(cfg.data)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.items_sha256: str | None = None  # set by setup
        self.split: tuple[Dataset, Dataset] | None = None  # load_datasets' (train, val), whole

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            train, val = load_datasets(self.cfg.data)
            if isinstance(train.dataset, ImageFolder):
                # before any training, not an epoch in; said by one process of a run
                check_image_files(train.dataset, announce=rank_zero_only.rank == 0)
            self.train_set, self.split = train, (train, val)
            self.val_set = Subset(val, range(min(self.cfg.eval.val_images, len(val))))
            self.items_sha256 = items_sha256(train, val)

    # Lightning keeps these in the checkpoint and hands them back on resume, before training.
    def state_dict(self) -> dict:
        return {"items_sha256": self.items_sha256, "num_items": len(self.train_set.dataset)}

    def load_state_dict(self, state: dict) -> None:
        # A folder's files are not in the config: one deleted, added or renamed since (a
        # corrupt image removed after it stopped the run) gives the same config another split
        # and another stream of batches, and held-out images would train from here on.
        if state.get("items_sha256") in (None, self.items_sha256):  # None: older checkpoints
            return
        root = self.cfg.data.root
        raise DataError(
            f"data.root {root}: its files changed since the run's last checkpoint "
            f"({state['num_items']} items then, {len(self.train_set.dataset)} now, or renamed or "
            "re-encoded), so its train/val split and batches would change mid-run; restore "
            "them as they were (a corrupt image: a readable copy under its name), or train "
            "a new run"
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning restores the checkpoint before it asks for the loader, so global_step is
        # the resume point here.
        trainer = self.trainer
        stream = StepBatches(
            self.train_set,
            self.cfg.train.batch_size,
            self.cfg.seed,
            start_step=trainer.global_step if trainer is not None else 0,
            total_steps=self.cfg.train.steps,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            accumulate=self.cfg.train.accumulate_grad_batches,
        )
        workers = self.cfg.data.num_workers
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=trains_on_cuda(self.cfg.train.accelerator),  # not for cpu on a GPU host
            persistent_workers=workers > 0,
        )

    def fixed_val_loader(self) -> DataLoader:
        # Not `val_dataloader`: validation is the StepMetrics protocol, not Lightning's loop.
        return DataLoader(
            self.val_set,
            batch_size=VAL_BATCH,
            shuffle=False,
            collate_fn=collate,
            num_workers=0,
        )
