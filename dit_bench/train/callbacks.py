"""Callbacks and loggers of a training run: CSV metrics, sample grids, progress, checkpoints."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from dit_bench.files import naming, replacing, write_text_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, then rename: a kill -9 mid-save never leaves a torn last.ckpt."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp, open(tmp, "wb") as f:
            # into a file of ours, not to the path: torch's own writer reports a full disk as
            # "[enforce fail at inline_container.cc:672] . unexpected pos 10890688 vs 10890576"
            # (a RuntimeError: a traceback, no word of the disk); through a Python file the
            # write's OSError (ENOSPC, EFBIG) is that error's context, and raised instead
            try:
                torch.save(checkpoint, f)
            except RuntimeError as e:
                if (failed := raised_in(e, OSError)) is None:
                    raise
                raise failed from None
            # on disk before the rename, as write_text_atomic: else a power cut can leave an
            # empty last.ckpt (XFS; ext4 without auto_da_alloc), and the run starts over
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        # Our checkpoints hold tensors, numbers and plain containers only.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


E = TypeVar("E", bound=BaseException)


def raised_in(e: BaseException | None, kind: type[E]) -> E | None:
    """The `kind` exception that `e` is, or was raised while handling (its cause or context,
    and theirs), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class CSVMetrics(Logger):
    """metrics.csv in the run directory: one row per logged step, one column per metric.

    On resume the rows after the checkpoint's step are dropped first, so an interrupted and
    resumed run ends with the same file as an uninterrupted one.

    A step's metrics (train loss, val loss, FD: logged by different callbacks) gather in one
    row, written when `flush()` is called (WriteMetricsRow, after the step's last metric and
    before its checkpoint), when a later step logs, or at `finalize`. With the run's metrics
    named up front (`columns`), every row is appended (and synced) to a file whose header
    already has them all, so `tail -f metrics.csv` follows the run: a file written whole and
    renamed (when a column is new) leaves `tail -f` on the old file, and a last row written
    again in place (a step's metrics after its row was flushed) makes GNU tail print the whole
    file again. Rewritten at every log, a run of 20,000 rows spent 100 ms a log window on it
    (this project's CPU), with the device idle after the window's loss read; a 1M-step sweep
    trial logging every 50 steps writes that many. Rewritten at every val (and FD) step, the
    run's logging grew with the square of its length: 16,000 rows with a val every 10 took 86 s.
    """

    def __init__(self, path: Path, resume_step: int | None = None, columns=()):
        super().__init__()
        self.path = Path(path)
        self.resume_step = resume_step
        self.rows: list[dict] | None = None  # read on first use, by rank 0 only
        self._keys: set[str] = set(columns)  # of every row but "step"
        self._pending: dict | None = None  # the row of the step being logged
        self._on_disk: tuple[list[str], int] | None = None  # the file's columns, rows written
        self._last_at = 0  # the byte where the file's last row starts

    def _load(self) -> list[dict]:
        if self.rows is None:
            self.rows = []
            if self.resume_step is not None and self.path.exists():
                # a row cut short by a kill in its append is the last, logged after the
                # checkpoint's step: read_metrics leaves it out, as the step would
                rows = read_metrics(self.path)
                self.rows = [r for r in rows if int(r["step"]) <= self.resume_step]
            self._keys |= {k for r in self.rows for k in r} - {"step"}
        return self.rows

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return "0"

    @property
    @rank_zero_experiment
    def experiment(self):
        return self

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved config is written to config.yaml by the run

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: _number(v) for k, v in metrics.items() if k != "epoch"}
        if self._pending is not None and self._pending["step"] != step:
            self.flush()
        if self._pending is None:
            self._pending = {"step": step}
        self._pending.update(row)

    @rank_zero_only
    def flush(self) -> None:
        """Write the row of the step being logged."""
        if self._pending is None:
            return
        row, self._pending = self._pending, None
        rows = self._load()
        self._keys.update(k for k in row if k != "step")
        if rows and str(rows[-1]["step"]) == str(row["step"]):
            # metrics of a step whose row was flushed (a SLURM requeue's finalize, mid-step)
            rows[-1].update(row)
        else:
            rows.append(row)
        columns = ["step"] + sorted(self._keys)
        if self._on_disk == (columns, len(rows) - 1) and self.path.exists():
            self._append(columns, row)
        elif self._on_disk == (columns, len(rows)) and self.path.exists():
            self._replace_last(columns)
        else:
            self._write(columns)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        # also Lightning's SLURM requeue, before the checkpoint it saves mid-step
        self.flush()

    def _lines(self, columns: list[str], rows: list[dict], header: bool) -> str:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=columns)
        if header:
            w.writeheader()
        w.writerows(rows)
        return text.getvalue()

    def _append(self, columns: list[str], row: dict) -> None:
        self._write_from(self.path.stat().st_size, self._lines(columns, [row], header=False))
        self._on_disk = (columns, len(self.rows))

    def _replace_last(self, columns: list[str]) -> None:
        # cut off before it is written again: a write stopped partway leaves the row cut short,
        # as a stopped append does (read_metrics drops it), never a mix of its two versions
        self._write_from(self._last_at, self._lines(columns, self.rows[-1:], header=False))

    def _write_from(self, offset: int, text: str) -> None:
        with naming(self.path), self.path.open("r+b") as f:
            f.seek(offset)
            f.truncate()
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        self._last_at = offset

    def _write(self, columns: list[str]) -> None:
        head = self._lines(columns, self.rows[:-1], header=True)
        # synced before it replaces the old file (write_text_atomic), as the run's other records
        write_text_atomic(self.path, head + self._lines(columns, self.rows[-1:], header=False))
        self._last_at = len(head.encode())
        self._on_disk = (columns, len(self.rows))


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics.csv, without a last row cut short: CSVMetrics appends them, and
    one whose write stopped partway (a kill, a full disk) lacks fields (None), or has them all
    with its last value cut short ("12,0.12" of "12,0.1234"). Every row CSVMetrics writes ends
    in a newline: a last line without one is cut short."""
    with Path(path).open(newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [r for r in csv.DictReader(io.StringIO(text)) if None not in r.values()]


def log_metrics(trainer, metrics: dict[str, float], step: int) -> None:
    """`metrics` at optimiser step `step` to every logger of the run: metrics.csv, then the
    trackers of train.loggers (`trainer.logger` is metrics.csv's alone)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def mid_step(trainer) -> bool:
    """Whether the batch that just ran was a micro-batch before the last of its optimiser step
    (train.accumulate_grad_batches): no step was taken, and global_step is still the last
    step's, whose work (logging, validation, grids, checkpoints) is done. The batch hooks of
    the callbacks that work per step return on these."""
    accumulate = getattr(trainer, "accumulate_grad_batches", 1)
    return accumulate > 1 and trainer.fit_loop._should_accumulate()


def _number(v) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimiser steps (the training stream has no epochs)."""

    @property
    def total_train_batches(self):
        return self.trainer.max_steps

    def on_train_epoch_start(self, trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description("train")
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        # the train loss of the last log window (a float, read once per window): a loss logged
        # each step for the bar would be read back from the device each step
        shown = super().get_metrics(trainer, pl_module)
        if pl_module.last_train_loss is not None:
            shown["loss"] = f"{pl_module.last_train_loss:.4g}"
        return shown

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if mid_step(trainer):
            return
        n = trainer.global_step
        bar = self.train_progress_bar
        if bar is not None and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


def gather_in_index_order(trainer, share: torch.Tensor, n: int, device) -> torch.Tensor:
    """The rows of samples 0..n-1 from every process, in sample order, where this process
    holds `share`, its rows of samples rank, rank + world, ... (the grid's and the FD's
    split). Every process must call it; each gets all n rows. One process: `share` itself.

    Shares are padded to every process's count for all_gather (on `device`: NCCL gathers
    device tensors), which stacks them by rank: sample r + k * world is row (r, k), and the
    padding lands past n."""
    world = trainer.world_size
    if world == 1:
        return share
    padded = torch.zeros(-(-n // world), *share.shape[1:], dtype=share.dtype, device=device)
    padded[: len(share)] = share
    gathered = trainer.strategy.all_gather(padded)  # (world, per process, ...)
    return gathered.transpose(0, 1).reshape(-1, *share.shape[1:])[:n]


@contextlib.contextmanager
def announced(trainer, what: str, label: str | None) -> Iterator[None]:
    """Lines before and after sampling work between steps (a grid, the FD; the last ones after
    the bar reached its end), by rank 0, prefixed with `label` (None: the run shows no
    progress, and no lines): 10,000 DDPM-250 samples take half an hour of an H100. Written
    through tqdm, which keeps a bar that is on screen whole."""
    if not label or trainer.global_rank != 0:
        yield
        return
    from tqdm import tqdm

    tqdm.write(f"[{label}] step {trainer.global_step}: {what}", file=sys.stderr)
    t0 = time.perf_counter()
    yield
    tqdm.write(f"[{label}] ... done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def duration(seconds: float) -> str:
    """A time span for people: 42 s, 12.5 min, 3.2 h, 4.1 d."""
    for unit, size, least in (("d", 86400, 2 * 86400), ("h", 3600, 3600), ("min", 60, 120)):
        if seconds >= least:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


PROGRESS_EVERY_DEFAULT = 30.0


def progress_every_s(strict: bool = True) -> float:
    """Seconds between progress lines: $DIT_BENCH_PROGRESS_EVERY, 30 if unset. A value that
    is not a number >= 0 is an error (the commands check it before they start anything), or
    with `strict=False` a warning and the default: inside a run (a sweep's trial, an
    ablation's run) an error would fail the run for a setting of its output."""
    raw = os.environ.get("DIT_BENCH_PROGRESS_EVERY")
    if raw is None:
        return PROGRESS_EVERY_DEFAULT
    try:
        every = float(raw)
    except ValueError:
        every = -1.0
    if every >= 0:  # not NaN
        return every
    msg = f"DIT_BENCH_PROGRESS_EVERY={raw!r}: the seconds between progress lines, a number >= 0"
    if strict:
        raise ValueError(msg)
    warnings.warn(f"{msg}; using {PROGRESS_EVERY_DEFAULT:g}", stacklevel=2)
    return PROGRESS_EVERY_DEFAULT


class ProgressLines(L.Callback):
    """A line of progress every `every_s` seconds (`progress_every_s`), where a bar does not
    fit: output that is not a terminal (a log file, SLURM's), or that several processes share
    (`ablate --jobs`'s and a sweep's workers, whose bars would overwrite each other). Rank 0
    only; for example

        [label] step 1200/4000 (30%): loss 0.1234, val 0.1301 (step 1000), 433 img/s,
            2.8 min in, ~6.5 min left   (one line)

    The loss is the last log window's and the val loss the last validation's, both already
    read by StepMetrics (no device read of its own); img/s and the time left are this
    session's steps over its wall clock, validations and grids included (what the rest of
    the run will take; the first lines count the compilation and CUDA-graph recording of the
    first steps too, so they overestimate the time left). `after`: the work after the last
    step, which no rate of the steps times ("the FD of 256 samples and the sample grid"): the
    lines name it after the time left, which then reads "~4 s left in the steps, then ..."."""

    def __init__(
        self,
        label: str,
        batch_size: int,
        every_s: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        after: str = "",
    ):
        self.label, self.batch_size, self.clock = label, batch_size, clock
        self.after = after
        self.every_s = progress_every_s(strict=False) if every_s is None else every_s
        self._t0 = self._last = 0.0
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = self.clock()
        self._step0 = trainer.global_step  # a resumed run's rate counts this session's steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        step, total = trainer.global_step, trainer.max_steps
        if mid_step(trainer):  # the step's last micro-batch says it
            return
        if trainer.global_rank != 0 or now - self._last < self.every_s or step >= total:
            return  # the last step's line is the run's own summary
        self._last = now
        parts = []
        if (loss := pl_module.last_train_loss) is not None:
            parts.append(f"loss {loss:.4g}")
        if "val/loss" in pl_module.last_val:
            parts.append(
                f"val {pl_module.last_val['val/loss']:.4g} (step {pl_module.last_val['step']})"
            )
        elapsed, done = now - self._t0, step - self._step0
        if done > 0 and elapsed > 0:
            parts.append(f"{done * self.batch_size / elapsed:.0f} img/s")
            left = f"{duration(elapsed)} in, ~{duration((total - step) * elapsed / done)} left"
            # a cpu profile's FD of 256 samples at the end took 17 s after "~4 s left"
            parts.append(f"{left} in the steps, then {self.after}" if self.after else left)
        print(
            f"[{self.label}] step {step}/{total} ({100 * step // total}%): " + ", ".join(parts),
            file=sys.stderr,
            flush=True,
        )


class SampleGrid(L.Callback):
    """Every `every` steps (and at the end), a grid of EMA samples: one row per class.

    `sample_fn(trainer, pl_module, path)` (run.grid_sampler) runs on every process at the same
    steps: the processes share the sampling and rank 0 gathers and saves the grid, so no rank
    may skip it (a rank_zero_only guard here would leave rank 0 waiting in the gather).
    """

    def __init__(
        self, out_dir: Path, every: int, sample_fn, what: str = "", announce: str | None = None
    ):
        self.out_dir, self.every, self.sample_fn = Path(out_dir), every, sample_fn
        self.what, self.announce = what, announce  # `announced`'s line

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if mid_step(trainer):
            return
        if self.every and step % self.every == 0 and step < trainer.max_steps:
            self._save(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, trainer.global_step)

    def _save(self, trainer, pl_module, step: int) -> None:
        with announced(trainer, f"sample grid, {self.what}", self.announce):
            self.sample_fn(trainer, pl_module, self.out_dir / f"step-{step:07d}.png")


class StepMetrics(L.Callback):
    """Train loss every `log_every` steps and val loss every `val_every` steps (both also at the
    end: the train loss of the last, shorter window), logged at the number of optimiser steps
    done.

    It runs in on_train_batch_end, before Lightning's checkpoint callbacks (which always run
    last), so a checkpoint at step k comes after every metric of step k: resuming from it
    neither loses nor repeats a row.
    """

    def __init__(self, log_every: int, val_every: int):
        self.log_every, self.val_every = log_every, val_every
        self._val_loader = None
        self._step_lr: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # the lr this step runs at: by batch end the scheduler has already moved to the next
        # step's (one warm-up increment ahead)
        self._step_lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if mid_step(trainer):
            return
        if step % self.log_every == 0 or step == trainer.max_steps:
            metrics = {"train/loss": pl_module.pop_train_loss(), "lr": self._step_lr}
            log_metrics(trainer, metrics, step)
        if step % self.val_every == 0 or step == trainer.max_steps:
            self.validate(trainer, pl_module)

    def validate(self, trainer, pl_module) -> dict[str, float]:
        if self._val_loader is None:
            self._val_loader = trainer.datamodule.fixed_val_loader()
        metrics = pl_module.validation_metrics(self._val_loader)
        log_metrics(trainer, metrics, trainer.global_step)
        pl_module.last_val = {**metrics, "step": trainer.global_step}
        return metrics


class WriteMetricsRow(L.Callback):
    """Writes the step's row of metrics.csv (CSVMetrics.flush): after every callback that logs
    at the step, before its checkpoint (Lightning runs checkpoint callbacks last), so a
    checkpoint at step k still comes after every metric of step k."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flush = getattr(trainer.logger, "flush", None)
        if flush is not None:
            flush()


class FrechetDistanceMetric(L.Callback):
    """Every `every` steps (and at the end), a cheap FD of `num_samples` samples against the
    held-out split, logged as `val/FD-<net>` beside the val loss (`val/FID` with Inception).

    The samples use the run's eval sampler settings and fixed per-sample seeds, so successive
    values differ only by the weights. Reference features are cached (dit_bench.metrics); the
    metrics package, and clean-fid with it, is imported only when this callback is enabled.
    """

    SEED = 4321  # one seed for every step and run: values along a run are comparable

    def __init__(
        self,
        cfg,
        every: int,
        num_samples: int,
        features: str | None = None,
        announce: str | None = None,
    ):
        from dit_bench.metrics.features import default_features, find_inception

        self.cfg, self.every, self.num_samples = cfg, every, num_samples
        self.announce = announce  # `announced`'s lines
        self.features = features or default_features(cfg.data.name)
        # A missing file stops the run before it starts, not at step N.
        if self.features == "inception":
            find_inception()
        if cfg.data.name == "latents":  # the samples are scored as images it decodes
            from dit_bench.data.latents import check_vae_dir

            check_vae_dir(cfg.data.vae, "eval.fd_every on latents: data.vae")
        self._net = self._ref = self._decode = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if mid_step(trainer):
            return
        if step % self.every == 0 or step == trainer.max_steps:
            e = self.cfg.eval
            what = f"FD of {self.num_samples} samples ({e.sampler}, {e.sample_steps} steps)"
            with announced(trainer, what, self.announce):
                self.measure(trainer, pl_module)

    def measure(self, trainer, pl_module) -> float:
        """The FD of the samples at this step, logged by rank 0 (NaN if a sample is not finite).

        Every process samples its share of the indices (rank r: r, r + world, ...) and rank 0
        gathers their features: sample i depends on (seed, i) only, so these are the samples
        one process would draw. Sampled by rank 0 alone, the others would wait in their next
        all-reduce for all of it: 10,000 DDPM-250 samples of DiT-XL/2 (the gpu profiles' FID)
        take over half an hour on one H100, past the process group's 30-minute timeout.
        """
        from dit_bench.metrics import distances
        from dit_bench.metrics.evaluate import generate, reference_images
        from dit_bench.metrics.features import load_feature_net
        from dit_bench.metrics.reference import reference_stats

        e = self.cfg.eval
        rank, world = trainer.global_rank, trainer.world_size
        if self._net is None:
            self._net = load_feature_net(self.features, device=pl_module.device)
            if rank == 0:  # the reference: rank 0 alone scores
                # latents: the held-out latents and the samples are scored as decoded images
                # the data module's split: the same images, without building the data set again
                split = getattr(getattr(trainer, "datamodule", None), "split", None)
                held_out, _, data_hash = reference_images(self.cfg, pl_module.device, split)
                self._decode = held_out.decode
                self._ref = reference_stats(held_out, self._net, data_hash=data_hash)
            elif self.cfg.data.name == "latents":  # the run's decoder, cached (run.to_images)
                from dit_bench.train.run import to_images

                self._decode = lambda z, device=pl_module.device: to_images(self.cfg, z.to(device))
        # a chunk (train.batch_size) at a time, reduced to its features before the next is drawn:
        # a process's whole share of the gpu profiles' 10,000 256x256 samples was 7.9 GB / world
        share, bs = range(rank, self.num_samples, world), self.cfg.train.batch_size
        rows = [torch.zeros(0, 1 + self._net.dim, dtype=torch.float64)]  # a share of none
        for start in range(0, len(share), bs):
            images = generate(
                pl_module,
                share[start : start + bs],
                seed=self.SEED,
                sampler=e.sampler,
                steps=e.sample_steps,
                cfg_scale=e.cfg_scale,
                use_ema=e.use_ema,
                batch_size=bs,
            )
            if self._decode is not None:
                images = self._decode(images)  # (B, 3, H, W) in [-1, 1]
            finite = torch.isfinite(images.flatten(1)).all(1)
            # one row per sample this process drew: a flag (1 finite, -1 not) and its features
            chunk = torch.zeros(len(finite), 1 + self._net.dim, dtype=torch.float64)
            chunk[:, 0] = finite.double() * 2 - 1
            if finite.any():
                chunk[finite, 1:] = torch.from_numpy(self._net.features(images[finite])[0])
            del images
            rows.append(chunk)
        rows = torch.cat(rows)
        rows = gather_in_index_order(trainer, rows, self.num_samples, pl_module.device)
        if rank != 0:
            return float("nan")
        rows = rows.cpu()
        key = f"val/{self._net.metric_prefix}"
        bad = int((rows[:, 0] < 0).sum())
        if bad:  # a diverged run: the FD says so, and the run goes on (the NaN guard decides)
            print(  # named by its run's label: ablate's and a sweep's workers share one output
                f"[{self.announce or 'dit-bench'}] step {trainer.global_step}: {bad} of "
                f"{self.num_samples} samples are not finite; {key} = nan",
                file=sys.stderr,
            )
            fd = float("nan")
        else:
            feats = rows[rows[:, 0] > 0, 1:].numpy()
            fd = distances.frechet_distance(
                *distances.gaussian_stats(feats), self._ref.mu, self._ref.sigma
            )
        log_metrics(trainer, {key: fd}, trainer.global_step)
        pl_module.last_fd = {key: fd}  # the final value lands in summary.json
        return fd


class ValAtSteps(L.Callback):
    """Val loss (StepMetrics' protocol) also at the given optimiser steps, e.g. the steps where a
    constant-lr run crosses a sweep's compute budgets; `on_val(step, metrics)` sees each value
    (a sweep reports it to its pruner, which may raise to stop the run).

    A step StepMetrics validates anyway (every `val_every`, the last) is read back from it
    rather than computed twice. Also keeps `step_seconds` (the training steps alone: this
    callback comes before the run's own but its timer, so its batch hooks bracket just forward,
    backward and optimiser step), `loop_seconds` (the step loop: steps plus data loading,
    Lightning's per-step work, train-loss logging and periodic checkpoints, without the
    validations this callback runs) and `val_seconds` (those validations); a sweep measures its
    overhead with them.
    """

    def __init__(self, steps, on_val=None):
        self.steps = {int(s) for s in steps}
        self.on_val = on_val
        self.step_seconds = self.val_seconds = self.loop_seconds = 0.0
        self._pending: int | None = None
        self._t = self._metrics = self._end = None
        self._val_since_end = 0.0
        # the module's, where a resume crossed validation protocols (a pruned run has no
        # summary.json to say so)
        self.val_protocol_changed_at: int | None = None

    def _step_metrics(self, trainer) -> StepMetrics:
        if self._metrics is None:
            self._metrics = next(c for c in trainer.callbacks if isinstance(c, StepMetrics))
        return self._metrics

    def _flush(self, pl_module) -> None:
        step, self._pending = self._pending, None
        if step is not None and pl_module.last_val.get("step") == step and self.on_val:
            self.on_val(step, {k: v for k, v in pl_module.last_val.items() if k != "step"})

    def on_train_start(self, trainer, pl_module) -> None:
        self._end = time.perf_counter()
        # after a resume's checkpoint is loaded; a module of another kind records none
        self.val_protocol_changed_at = getattr(pl_module, "val_protocol_changed_at", None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(pl_module)
        self._t = time.perf_counter()
        if self._end is not None:  # since the last step: data, hooks, logging, checkpoints
            self.loop_seconds += self._t - self._end - self._val_since_end
        self._val_since_end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end = time.perf_counter()
        self.step_seconds += self._end - self._t
        self.loop_seconds += self._end - self._t
        step = trainer.global_step
        if step not in self.steps or mid_step(trainer):
            return
        sm = self._step_metrics(trainer)
        if step % sm.val_every == 0 or step == trainer.max_steps:
            self._pending = step  # StepMetrics validates right after this hook
            return
        t = time.perf_counter()
        metrics = sm.validate(trainer, pl_module)
        self.val_seconds += time.perf_counter() - t
        self._val_since_end += time.perf_counter() - t
        if self.on_val:
            self.on_val(step, metrics)

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # the run's StepMetrics holds the module (Lightning's `log` on it): a sweep keeps this
        # callback through its trial's records, and the finished run's net, EMA copy and
        # optimiser state stayed in memory through the next trial's training
        self._metrics = None
