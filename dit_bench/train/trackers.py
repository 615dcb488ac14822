"""Experiment trackers (train.loggers): TensorBoard and Weights & Biases, through Lightning's
own loggers, beside the run's metrics.csv.

metrics.csv (callbacks.CSVMetrics) stays the run's record: it is the Trainer's first logger
(`trainer.logger`), which the harness reads back (resume, reports); the trackers come after it
and receive what it receives (callbacks.log_metrics: the same numbers, at the same optimiser
steps), the config as hyperparameters, and the sample grids as images. Each tracker's package
is imported only for a run that asks for it. Lightning's loggers write from global rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger  # neither imports its package

from dit_bench.config import ExperimentConfig
from dit_bench.files import dotted

WANDB_PROJECT = "dit-bench"  # without $WANDB_PROJECT
TENSORBOARD_DIR = "tensorboard"  # in the run directory
WANDB_DIR = "wandb"  # in the run directory: W&B's own name for its folder in `save_dir`


def wandb_refused(e: BaseException) -> str | None:
    """One line for W&B's refusal to start a run (no API key without WANDB_MODE=offline, a
    project it may not write), or None for any other error."""
    if not type(e).__module__.startswith("wandb.errors"):
        return None
    return (
        f"train.loggers: W&B refused the run: {e} (WANDB_MODE=offline writes it into the run "
        "folder without an account, for `wandb sync` later)"
    )


def wandb_id(run: Path) -> str:
    """The W&B run id of a run directory: its name (`<UTC time>-<config hash>`), which a
    resumed run keeps, so it continues its W&B run; the time keeps apart the runs of one
    config in two --out folders."""
    return run.name


def hyperparameters(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config flattened to dotted keys (as the results table's cfg.* columns),
    and its hash."""
    return {**dotted(cfg.to_dict()), "config_hash": cfg.hash}


def build(cfg: ExperimentConfig, run: Path, resume_step: int | None) -> list:
    """Lightning's logger for each of the run's train.loggers, writing inside `run`."""
    loggers = []
    for name in cfg.train.loggers:
        if name == "tensorboard":
            # purge_step: events a stopped session logged past the checkpoint it resumes from
            # (redone now) are hidden by TensorBoard, as metrics.csv drops their rows
            loggers.append(
                TensorBoardLogger(
                    run,
                    name=TENSORBOARD_DIR,
                    version="",  # RUN_DIR/tensorboard/ itself: one run, no version_N folders
                    default_hp_metric=False,  # no `hp_metric = -1` scalar at step 0
                    purge_step=None if resume_step is None else resume_step + 1,
                )
            )
        elif name == "wandb":
            loggers.append(
                WandbLogger(
                    save_dir=run,  # RUN_DIR/wandb/ (`dir` is ignored beside a save_dir)
                    name=run.name,
                    id=wandb_id(run),
                    project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
                    # an ablation's or a sweep's runs share its experiment (<name>-<profile>)
                    group=cfg.experiment,
                    resume="allow",
                )
            )
    return loggers


@contextlib.contextmanager
def tracking(cfg: ExperimentConfig, run: Path, resume_step: int | None) -> Iterator[list]:
    """The run's trackers (`build`), ended when the block exits however it does: files closed,
    the W&B run finished (Lightning leaves it open, and the next run in this process, a
    sweep's next trial, would log into it). Logging after the Trainer's own teardown (the
    final validation of a run stopped after its last checkpoint) still reaches them."""
    loggers = build(cfg, run, resume_step)
    failed = True
    try:
        yield loggers
        failed = False
    except BaseException as e:
        # a sweep trial its pruner stopped ended as the sweep asked: a finished W&B run, where
        # a median pruner's many stops each read as a crash (state "failed")
        optuna = sys.modules.get("optuna")  # a pruned trial has imported it
        failed = optuna is None or not isinstance(e, optuna.TrialPruned)
        raise
    finally:
        for logger in loggers:
            _end(logger, failed)


def _end(logger, failed: bool) -> None:
    experiment = logger._experiment  # None: never started (not rank 0)
    if experiment is None:
        return
    if isinstance(logger, WandbLogger):
        # only the run this logger started: given a run already in progress (a notebook's
        # wandb.init), Lightning logs into that one, which is the notebook's to finish
        if experiment.id == logger._id:
            experiment.finish(exit_code=1 if failed else 0)
    else:
        experiment.close()  # a SummaryWriter, flushed


class TrackerHooks(L.Callback):
    """The config as each tracker's hyperparameters at the start of training, and
    TensorBoard's events on disk before each checkpoint: a run killed after it (kill -9, a
    lost node) resumes there, and the events a SummaryWriter held (it writes every 2
    minutes) would be a gap in TensorBoard that the resumed run never fills.

    Global rank 0 only, as Lightning's loggers write: before the Trainer sets the ranks, a
    second node's first process counts as rank 0."""

    def __init__(self, cfg: ExperimentConfig, loggers: Sequence, metrics: Sequence[str]):
        self.cfg, self.loggers, self.metrics = cfg, list(loggers), list(metrics)

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        params = hyperparameters(self.cfg)
        for logger in self.loggers:
            logger.log_hyperparams(params)
            if isinstance(logger, TensorBoardLogger):
                _tensorboard_hparams(logger, params, self.metrics)
                # Lightning's save() writes hparams.yaml only where there is none (its own
                # hyperparameters at the fit's start: none, `{}`)
                save_hparams_to_yaml(Path(logger.log_dir) / "hparams.yaml", params)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and logger._experiment is not None:
                logger._experiment.flush()


def _tensorboard_hparams(logger, params: dict[str, Any], metrics: Sequence[str]) -> None:
    # TensorBoard's HParams tab: the config, with the run's metrics.csv columns as its metrics
    # (their values are the scalars of the same tags). Lightning's log_hyperparams writes
    # these only with a metric value, logged at step 0 (its `hp_metric`).
    from torch.utils.tensorboard.summary import hparams

    shown = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in params.items()}
    writer = logger.experiment._get_file_writer()
    for summary in hparams(shown, dict.fromkeys(metrics, 0.0)):
        writer.add_summary(summary)


def log_grid(trainer, path: Path) -> None:
    """The sample grid just saved at `path` as an image of each tracker, at the step the
    Trainer is at (rank 0)."""
    trackers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger | WandbLogger)]
    if not trackers or trainer.global_rank != 0:
        return
    import numpy as np
    from PIL import Image

    step = trainer.global_step
    with Image.open(path) as image:
        pixels = np.asarray(image)  # (H, W) grey or (H, W, 3), uint8
    for logger in trackers:
        if isinstance(logger, WandbLogger):
            logger.log_image("samples", [pixels], step=step)
        else:
            layout = "HW" if pixels.ndim == 2 else "HWC"
            logger.experiment.add_image("samples", pixels, step, dataformats=layout)
