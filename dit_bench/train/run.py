"""A training run: run directory, Trainer, resume, summary.json.

Run directory `runs/<experiment>/<UTC time>-<config hash>/`, named by content so concurrent runs
never collide; a rerun of the same config finds the directory by its hash and resumes from
`checkpoints/last.ckpt` (or does nothing if `summary.json` says it finished).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import pickle
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image

from dit_bench.backbones import Cond
from dit_bench.config import (
    ConfigError,
    ExperimentConfig,
    OutOfMemory,
    build_config,
    check_installed,
    read_yaml,
)
from dit_bench.data import DataInfo, data_info
from dit_bench.data.module import DiffusionDataModule
from dit_bench.fast import (
    NO_CXX_COMPILER,
    allow_tf32,
    device_name,
    lacks_cxx_compiler,
    no_nan_fill,
    shared_cores_note,
    trains_on_cuda,
)
from dit_bench.files import (
    NOFOLLOW,
    WAITING,
    flock,
    holder_line,
    note_holder,
    open_lock,
    redact,
    replacing,
    try_lock,
    unlock,
    write_json_atomic,
    write_text_atomic,
)
from dit_bench.sampling import randn, sampler_options
from dit_bench.train.callbacks import (
    AtomicCheckpointIO,
    CSVMetrics,
    ProgressLines,
    SampleGrid,
    StepMetrics,
    StepProgressBar,
    WriteMetricsRow,
    gather_in_index_order,
    mid_step,
    raised_in,
)
from dit_bench.train.module import (
    DiffusionModule,
    check_class_names,
    images_seen,
    non_finite,
    training_flops,
)
from dit_bench.train.trackers import (
    TENSORBOARD_DIR,
    WANDB_DIR,
    TrackerHooks,
    log_grid,
    tracking,
    wandb_refused,
)

GRID_SEED = 1234  # same noise at every step and in every run: grids are comparable


def _no_litlogger(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def _quiet_lightning() -> None:
    """Drop Lightning's advertising and warnings that do not apply to this module's design."""
    # one function, which addFilter adds once: a sweep worker or an ablation trains many runs
    # in one process, and a new lambda each run grew the logger's filters by one a run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_litlogger)
    # The EMA copy is kept in eval mode on purpose; the LeafSpec note is Lightning's own.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # A resumed run keeps its step-N checkpoints (keep_every) in the folder on purpose.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # A run moved or copied to another folder (rsync to a laptop) resumes from its own files:
    # it tracks no best model, so the "won't be reloaded" of Lightning's notes loses nothing.
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from ")


# -- run directories ---------------------------------------------------------------------------
def find_run_dir(out: Path, cfg: ExperimentConfig) -> Path | None:
    # not a hidden name: pathlib's glob matches those too, and macOS copies onto exFAT or a
    # share leave a `._<name>` file beside each run (ablate's run_index skips them as well)
    hits = sorted(
        p for p in (Path(out) / cfg.experiment).glob(f"*-{cfg.hash}") if not p.name.startswith(".")
    )
    return hits[-1] if hits else None


def new_run_dir(out: Path, cfg: ExperimentConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run = Path(out) / cfg.experiment / f"{stamp}-{cfg.hash}"
    run.mkdir(parents=True, exist_ok=False)
    write_run_config(run, cfg)
    return run


def write_run_config(run: Path, cfg: ExperimentConfig) -> None:
    write_text_atomic(run / "config.yaml", cfg.to_yaml())  # sample and eval read it


def check_run_config(run: Path, cfg: ExperimentConfig) -> None:
    """Before resuming `run` with `cfg`: its config.yaml must be `cfg` (the directory is found
    by the hash in its name; a hand-edited config.yaml would be ignored by the training and
    then read by sample and eval). A missing one, lost in a crash, is written again."""
    if not (run / "config.yaml").is_file():
        if _launch_rank() == 0:
            write_run_config(run, cfg)
        return
    recorded = load_run_config(run).hash
    if recorded != cfg.hash:
        raise ValueError(
            f"{run}/config.yaml (hash {recorded}) is not the config of this run (hash "
            f"{cfg.hash}): edited by hand? Restore it, or train the edited config as a new run"
        )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents; a truncated or foreign file is a ValueError naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refused what is not weights (a colleague's file, another program's);
        # torch's 8 lines, with terminal escapes, told how to load it anyway, which would run
        # whatever code the file holds
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:  # "Unsupported operand 103": a damaged pickle stream, not code
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise ValueError(
                f"{path} is not a readable checkpoint (damaged: "
                f"{why[1].strip() if why else type(e).__name__})"
            ) from None
        raise ValueError(
            f"{path} holds pickled Python objects, not only weights ({found[1]} among them): "
            "refused, as loading it could run code (a dit-bench checkpoint holds tensors, "
            "numbers and plain containers only)"
        ) from None
    except Exception as e:  # truncated zip, empty file, not a torch file at all
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    keys = {"state_dict", "global_step", "pytorch-lightning_version"}  # what resuming reads
    if not isinstance(ckpt, dict) or not keys <= set(ckpt):
        raise ValueError(f"{path} is not a dit-bench checkpoint (no {', '.join(sorted(keys))})")
    return ckpt


def exit_with_parent(poll: float = 1.0) -> None:
    """In a spawned worker (ablate --jobs, sweep --workers): exit when the parent dies.

    A parent killed with SIGKILL (or by the OOM killer) runs no cleanup, and its workers would
    train on as orphans, holding their runs' locks and memory. Exiting is a kill -9 of the
    worker: its run resumes from the last checkpoint next time. Once per process (a pool's
    worker calls it for each of its tasks)."""
    import multiprocessing
    import threading

    if any(t.name == "exit-with-parent" for t in threading.enumerate()):
        return
    # Windows' getppid() keeps a dead parent's pid: the parent multiprocessing started us from
    # (its sentinel: a pipe's end on POSIX, a process handle on Windows) tells everywhere
    parent, process = os.getppid(), multiprocessing.parent_process()

    def watch() -> None:
        while os.getppid() == parent and (process is None or process.is_alive()):
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _launch_rank() -> int:
    """0 for the process that makes the run directory, else > 0: the global rank from torchrun
    or SLURM; under Lightning's own launcher, where a node's processes share NODE_RANK, the
    node's rank, then the local one (only node 0's first process counts as 0).

    SLURM_PROCID counts only where SLURM started the tasks (Lightning's SLURMEnvironment: an
    allocation whose job is named `bash` or `interactive` is Lightning's own launcher's, and
    the processes it starts inherit the shell's SLURM_PROCID=0: each would take the lock)."""
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    if _slurm_tasks():
        return int(os.environ["SLURM_PROCID"])
    node, local = (int(os.environ.get(v) or 0) for v in ("NODE_RANK", "LOCAL_RANK"))
    return node or local


def _slurm_tasks() -> bool:
    """Whether SLURM started this process as one task of a job step (`_launch_rank`)."""
    env = os.environ
    return (
        "SLURM_NTASKS" in env
        and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
        and bool(env.get("SLURM_PROCID"))
    )


def _launch_id() -> str | None:
    """The launch this process is one process of, the same in each of them and in no other
    launch at the same time: torchrun's (its run id and store, which a second one cannot bind)
    or srun's (job, step and requeue count: a requeued job keeps its id). None for a process of
    its own, or under Lightning's launcher, which starts its other processes once rank 0 holds
    the run's lock."""
    env = os.environ
    if env.get("RANK"):
        if not env.get("TORCHELASTIC_RUN_ID"):
            return None
        # not its restart count: an agent that joins later counts its own (from 0)
        addr = env.get("MASTER_ADDR", "")
        store = f"{addr}:{env.get('MASTER_PORT', '')}"
        if addr in ("localhost", "::1") or addr.startswith("127."):
            # torchrun's default (127.0.0.1:29500, run id "none"): that store keeps a second
            # launch off this host only, and every rank of this launch is on it
            store += f" on {platform.node()}"
        return f"torchrun {env['TORCHELASTIC_RUN_ID']} {store}"
    if _slurm_tasks() and env.get("SLURM_JOB_ID"):
        step, requeue = env.get("SLURM_STEP_ID", ""), env.get("SLURM_RESTART_COUNT") or "0"
        return f"slurm {env['SLURM_JOB_ID']}.{step} requeue {requeue}"
    return None


@contextlib.contextmanager
def _run_lock(out: Path, cfg: ExperimentConfig) -> Iterator[None]:
    """One process trains a config at a time. A second one (another terminal, a sweep worker
    retrying a trial whose worker is slow but alive) waits for it, then resumes its run or finds
    it finished: two writers in one run directory would clobber its checkpoints and metrics.
    Only the launching rank locks; the others follow the run directory it makes.

    A waiting process names the holder (its pid and host, from the lock file): a double launch
    or a requeued job whose old process still runs (another node, a forgotten terminal) is
    found without a search. A holder killed with kill -9 blocks nothing (files.try_lock).

    The other ranks of a torchrun or srun launch wait for rank 0 to hold it, which its line in
    the lock file says (`_wait_for_launch_lock`)."""
    folder = out / cfg.experiment
    launch = _launch_id()
    if _launch_rank() != 0:
        if launch is not None:
            _wait_for_launch_lock(out, cfg, launch)
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open_lock(folder / f".{cfg.hash}.lock") as f:
        if (holder := try_lock(f, launch)) is not None:
            print(
                f"[dit-bench] another process{f' ({holder})' if holder else ''} is training "
                f"config {cfg.hash} in {folder}; waiting for it to finish or stop",
                file=sys.stderr,
                flush=True,
            )
            if launch is not None:  # this launch's other ranks wait with it, not time out
                f.write(f"{WAITING}{holder_line(launch)}\n")
                f.flush()
            flock(f)
            note_holder(f, launch)
        try:
            yield
        finally:
            unlock(f)


def _wait_for_launch_lock(
    out: Path, cfg: ExperimentConfig, launch: str, timeout: float = 120.0
) -> None:
    # Ranks > 0 went on at once, whatever rank 0 waited for: with it waiting for another
    # process (a double launch, a requeued job whose old process still runs) they picked the
    # run directory and the checkpoint to resume from while that one still wrote them, then
    # failed: a new run at `_wait_for_run_dir` (2 minutes), an existing one in the process
    # group's set-up (30 minutes), and torchrun took the waiting rank 0 down with them. Now
    # they go on when rank 0 holds the lock (or the run is finished: rank 0 found it so and
    # took no lock), and wait as long as it does once its "waiting" line is there; only a
    # rank 0 that never comes (failed before the lock) ends the wait, after `timeout`.
    lock = out / cfg.experiment / f".{cfg.hash}.lock"
    mine = f", launch {launch}"
    deadline, came = time.monotonic() + timeout, False
    while True:
        lines = _lock_lines(lock)
        ours = [line for line in lines if line.endswith(mine)]
        if any(not line.startswith(WAITING) for line in ours):
            return
        if (run := find_run_dir(out, cfg)) is not None and (run / "summary.json").exists():
            return
        came = came or bool(ours)
        if not came and time.monotonic() > deadline:
            held = f" (it names {lines[0]})" if lines and not lines[0].startswith(WAITING) else ""
            raise TimeoutError(
                f"rank {_launch_rank()}: rank 0 of this launch ({launch}) took no lock "
                f"{lock}{held} in {timeout:.0f} s: did it fail before?"
            )
        time.sleep(0.5)


def _lock_lines(lock: Path) -> list[str]:
    # opened afresh each time: a file system shared by nodes (NFS) shows another node's
    # writes at an open; never through a link or blocking on a planted FIFO (files.open_lock)
    try:
        fd = os.open(lock, os.O_RDONLY | NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return []
    with os.fdopen(fd, errors="replace") as f:
        return [line.strip() for line in f.read(1 << 16).splitlines()]


def _wait_for_run_dir(out: Path, cfg: ExperimentConfig, timeout: float = 120.0) -> Path:
    # Ranks > 0 of an externally launched job (torchrun, srun) use the directory rank 0 makes;
    # `out` must be on a file system every node sees. Timed on the monotonic clock: the wall
    # clock of a node can be stepped (NTP) while it waits, and ended the wait at once.
    deadline = time.monotonic() + timeout
    while (run := find_run_dir(out, cfg)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {_launch_rank()}: rank 0 made no run directory under {out}")
        time.sleep(0.5)
    return run


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        return build_config(read_yaml(path), stored=True)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_module(run_dir: Path, checkpoint: str = "last.ckpt") -> DiffusionModule:
    """The trained module of a run directory, in eval mode, on the CPU."""
    from dit_bench.metrics.evaluate import check_checkpoint

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    # a name of the run's checkpoints/ only, as eval checks: a misspelt one listed them not,
    # and asked whether a run of many checkpoints had trained; a path (../other/last.ckpt,
    # /abs/x.ckpt) loaded another run's weights under this run's name
    path = check_checkpoint(run_dir, checkpoint)
    # eager, whatever the run trained with: sample and eval compile when asked (--compile);
    # nothing recomputed (sampling runs under no_grad, where a checkpointed block runs plainly)
    plain = {
        "compile": False,
        "cudagraphs": False,
        "activation_checkpointing": False,
        "activation_checkpointing_every": 1,
    }
    eager = cfg.train.model_copy(update=plain)
    ckpt = read_checkpoint(path)
    info = _checkpoint_data_info(cfg, ckpt)
    # its random initial weights are replaced by the checkpoint's: drawn from the caller's
    # generator, they moved a notebook's seeded random numbers after each load (and eval)
    with torch.random.fork_rng(devices=[]):
        module = DiffusionModule(cfg.model_copy(update={"train": eager}), info)
    check_class_names(ckpt, module.info, str(path))  # before the weights' size mismatch
    # another family's checkpoint: torch names every key (16 KB for a U-Net-XS in a DiT run)
    ours, theirs = module.state_dict().keys(), ckpt["state_dict"].keys()
    missing, foreign = sorted(ours - theirs), sorted(theirs - ours)
    if missing or foreign:
        raise ValueError(
            f"{path} does not fit {run_dir}/config.yaml (another run's checkpoint, or an edited "
            f"config?): {len(missing)} of the model's weights missing (e.g. "
            f"{', '.join(missing[:3]) or '-'}), {len(foreign)} it does not have (e.g. "
            f"{', '.join(foreign[:3]) or '-'})"
        )
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # a weight of another shape: another size of the family
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(
            f"{path} does not fit {run_dir}/config.yaml (was it edited?): {first}"
        ) from None
    module.checkpoint_step = int(ckpt["global_step"])
    module.checkpoint_data = ckpt.get("DiffusionDataModule")
    # a diverged run's weights (a checkpoint written before train refused them): said now,
    # not after eval has drawn all its samples (10,000 DDPM-250 ones: half an hour of an H100)
    bad = non_finite(ckpt["state_dict"])
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} weight tensors are not finite (e.g. {', '.join(bad[:3])}): the "
            f"run diverged by step {module.checkpoint_step}; nothing is sampled from them"
        )
    return module.eval()


def _checkpoint_data_info(cfg: ExperimentConfig, ckpt: dict[str, Any]) -> DataInfo:
    """The run's data info: from its data, or, for a folder run whose data.root is not on this
    machine (a run copied from a cluster to a laptop, or a relative root read from another
    directory), from its config and the class names its checkpoint records. Sampling needs no
    image; a folder that is there is still checked against those names (check_class_names),
    and eval, which scores against the held-out images, still needs them."""
    d = cfg.data
    names = ckpt.get("class_names")
    if d.name != "folder" or names is None or os.path.exists(d.root):
        return data_info(d)
    return DataInfo(3, d.image_size, len(names), tuple(names))


# -- sampling from a module ---------------------------------------------------------------------
@torch.no_grad()
def sample_images(
    module: DiffusionModule,
    labels: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    cfg_scale: float,
    seed: int,
    use_ema: bool = True,
    seeds: Sequence[int] | None = None,
    **options,
) -> torch.Tensor:
    """Samples (N, C, H, W) for the given class labels: images in [-1, 1], or latents.

    `seeds`: one seed per sample (then `seed` is unused): sample i's starting noise and every
    later draw come from its own generator, so it does not depend on the batch it is in.
    `options` override the run's eval settings: eta, sde_scale, cfg_interval, cfg_channels,
    clip_x0 (eta / sde_scale are passed only to the sampler that takes them).
    """
    info = module.info
    e = module.cfg.eval
    settings = {
        "eta": e.eta,
        "sde_scale": e.sde_scale,
        "cfg_interval": e.cfg_interval,
        "cfg_channels": e.cfg_channels,
        "clip_x0": e.clip_x0,
    }
    unknown = set(options) - set(settings)
    if unknown:
        raise TypeError(f"sample_images got unknown options {sorted(unknown)}")
    settings.update(options)
    own = sampler_options(sampler)  # e.g. eval.eta is ignored when sampling with --sampler ddpm
    for key in ("eta", "sde_scale"):
        if key not in own:
            settings.pop(key)
    net = module.eval_net(use_ema)
    if seeds is not None and len(seeds) != len(labels):
        raise ValueError(f"got {len(seeds)} seeds for {len(labels)} labels")
    device = next(net.parameters()).device
    # CPU generators, their draws moved to the device (sampling.randn): a CUDA generator's
    # stream is another (Philox, not the CPU's Mersenne Twister), so a seed drew other samples
    # on a GPU, and eval's key, which leaves out the device, mixed the two in one record
    if seeds is None:
        g = torch.Generator().manual_seed(seed)
    else:
        g = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (len(labels), info.channels, info.image_size, info.image_size)
    noise = randn(shape, g, device=device)
    labels = labels.to(device)
    was_training = net.training
    net.eval()
    try:  # a failed sample (bad option, Ctrl-C) must not leave a training net in eval mode
        x = module.objective.sample(
            net,
            noise,
            Cond(labels=labels),
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            uncond=Cond(labels=torch.full_like(labels, info.num_classes)),
            generator=g,
            **settings,
        )
    finally:
        net.train(was_training)
    # latents are not bounded (DiT samples them unclipped); images are clamped to [-1, 1]
    return x if module.cfg.data.name == "latents" else x.clamp(-1, 1)


@functools.lru_cache(maxsize=2)
def _load_decoder(path: str, root: str):
    from dit_bench.data.latents import load_decoder

    return load_decoder(path, root)  # on the CPU; moved to the samples' device when used


def to_images(cfg: ExperimentConfig, x: torch.Tensor) -> torch.Tensor | None:
    """Samples as images in [-1, 1] on the CPU: pixel samples as they are, latent samples
    decoded with data.vae on the samples' device; None for latents when the run names no VAE
    (nothing to look at)."""
    if not draws_grids(cfg):
        return None
    if cfg.data.name != "latents":
        return x
    from dit_bench.data.latents import (
        decode_latents,
        manifest_scaling_factor,
        manifest_shift_factor,
    )

    vae = _load_decoder(str(cfg.data.vae), str(cfg.data.root)).to(x.device)
    root = cfg.data.root
    return decode_latents(vae, x, manifest_scaling_factor(root), manifest_shift_factor(root))


def save_grid(images: torch.Tensor, path: Path, ncol: int) -> None:
    """Tile (N, C, H, W) images in [-1, 1] into a PNG, `ncol` per row, 2-pixel gutters."""
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    pad = 2
    grid = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, img in enumerate(images.float().cpu()):
        r, q = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top : top + h, left : left + w] = img
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    with replacing(path) as tmp:  # a kill while saving leaves no torn PNG behind
        Image.fromarray(arr[..., 0] if c == 1 else arr).save(tmp, format="PNG")


# A grid shows every class up to this many, else this many spread evenly over the classes:
# ImageNet's 1000 rows of 256-pixel images (8 a row: 2066 x 258002 pixels) would take
# minutes of sampling, a 6 GB float canvas, and a PNG PIL refuses to open as a bomb
GRID_MAX_CLASSES = 32


def class_grid_labels(info: DataInfo, per_class: int) -> torch.Tensor:
    """The labels of a grid, one row per class (`per_class` each): every class, or
    GRID_MAX_CLASSES of them evenly spaced from the first to the last."""
    n = info.num_classes
    if n <= GRID_MAX_CLASSES:
        classes = torch.arange(n)
    else:
        classes = torch.linspace(0, n - 1, GRID_MAX_CLASSES).round().long()
    return classes.repeat_interleave(per_class)


def draws_grids(cfg: ExperimentConfig) -> bool:
    """Whether the run has grids to look at: not latents without data.vae (run.to_images)."""
    return cfg.data.name != "latents" or bool(cfg.data.vae)


def grid_size(cfg: ExperimentConfig, info: DataInfo) -> int:
    return len(class_grid_labels(info, cfg.eval.samples_per_class))


def grid_sampler(cfg: ExperimentConfig):
    """`sample_fn(trainer, module, path)`: the run's sample grid (eval settings, one row per
    class), saved by rank 0 as a PNG at `path`; nothing for latents without data.vae.

    Every process must call it, at the same point (it gathers): rank r draws grid positions
    r, r + world, ... in chunks of train.batch_size, and position i depends on (GRID_SEED, i)
    only (per-sample seeds, metrics.evaluate.generate), so the grid is the one a single process
    draws. Drawn by rank 0 alone, the others would wait for all of it: 1000 DDPM-250 samples
    of DiT-XL/2 take about 3 minutes on one H100.
    """

    def sample_fn(trainer, module: DiffusionModule, path: Path) -> None:
        if not draws_grids(cfg):  # the same on every process: none waits in the gather
            return
        from dit_bench.metrics.evaluate import generate  # scipy with it: only when a grid is drawn

        e = cfg.eval
        labels = class_grid_labels(module.info, e.samples_per_class)
        n, rank, world = len(labels), trainer.global_rank, trainer.world_size
        images = generate(
            module,
            range(rank, n, world),
            seed=GRID_SEED,
            labels=labels,
            sampler=e.sampler,
            steps=e.sample_steps,
            cfg_scale=e.cfg_scale,
            use_ema=e.use_ema,
            batch_size=cfg.train.batch_size,
        )
        # float: an empty share comes back float32 whatever the weights' dtype, and the gather
        # needs one dtype; latents are gathered, not the images rank 0 decodes from them (48x
        # larger with the SD VAE at 256 px, and all_gather leaves them on every process)
        images = images.float().to(module.device)  # NCCL gathers, and rank 0 decodes, there
        images = gather_in_index_order(trainer, images, n, module.device)
        if rank != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(to_images(cfg, images), path, ncol=e.samples_per_class)
        log_grid(trainer, path)

    return sample_fn


# -- summary ------------------------------------------------------------------------------------
def package_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Python's version and the packages that decide a run's numbers (and `extra`)."""
    out = {"python": platform.python_version()}
    for pkg in ("dit-bench", "torch", "torchvision", "lightning", "pydantic", "numpy", *extra):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str | None:
    """The commit of the dit-bench code that runs when a git repository tracks it (a checkout,
    an editable install); None for an installed copy. One usually sits in the user's own
    repository (a .venv in their project), untracked there: that repository's commit is not
    the code's."""
    package = Path(__file__).resolve().parents[1]
    # git (2.35.2 on) refuses a repository another user owns: root in a container running a
    # checkout mounted from the host. One owned by the owner of this very code is trusted as
    # far as the code is (that user can rewrite it), so it is named safe for these two calls.
    trust = []
    repo = next((d for d in (package, *package.parents) if (d / ".git").exists()), None)
    with contextlib.suppress(OSError):
        owner = Path(__file__).resolve().stat().st_uid
        if repo and repo.stat().st_uid == (repo / ".git").stat().st_uid == owner:
            trust = ["-c", f"safe.directory={repo}"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *trust, *args],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        return git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None


# A session's first steps compile the backbone (and, with train.cudagraphs, record its graphs):
# the summary's steady_img_per_s leaves them out, img_per_s counts them
WARMUP_STEPS = 5


class _Timer(Callback):
    """The training loop's time, for the summary's img/s: module.train_seconds gains each step
    (forward, backward, optimiser, EMA) and each wait for the next batch (also in
    module.data_seconds); not validation, sample grids, FD or checkpoints. Steps after the
    session's first WARMUP_STEPS, with their waits, also go to module.steady_seconds/_steps.

    First in the callback list, so its batch-end hook runs before the ones that evaluate and
    save; the wait for data runs from the module's own batch-end hook (Lightning calls it after
    every callback's) to the next batch's start. Set-up and the first batch are not counted.

    On a GPU the host runs ahead of the device (the step reads nothing back), so a step's
    clock stops before its kernels finish; the callbacks that read the device (the loss of a
    log window, validation, checkpoints, grids, FD: every `sync_every` steps, and the last
    step) would then wait for that backlog on their own clock. On those steps the device is
    synchronised first, so the backlog counts as training time.
    """

    def __init__(self, sync_every: Sequence[int] = ()):
        self.sync_every = tuple(p for p in sync_every if p)
        self._step_seconds = 0.0  # the optimiser step's micro-batches so far, with their waits

    def syncs_at(self, step: int, max_steps: int) -> bool:
        return step == max_steps or any(step % p == 0 for p in self.sync_every)

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.wall_start = time.perf_counter()  # after a resume's checkpoint is loaded
        self._steps = 0  # optimiser steps of this session
        self._step_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()
        self._waited = 0.0
        if pl_module.batch_done_at is not None:
            self._waited = self._t - pl_module.batch_done_at
            pl_module.data_seconds += self._waited
            pl_module.train_seconds += self._waited

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # a micro-batch before the last of its step (train.accumulate_grad_batches) counts
        # towards its step's time; the step, its sync and its steady count come at the last
        accumulating = mid_step(trainer)
        if (
            not accumulating
            and pl_module.device.type == "cuda"
            and self.syncs_at(trainer.global_step, trainer.max_steps)
        ):
            torch.cuda.synchronize(pl_module.device)
        step = time.perf_counter() - self._t
        pl_module.train_seconds += step
        self._step_seconds += self._waited + step
        if accumulating:
            return
        self._steps += 1
        if self._steps == 1 and (name := device_name(pl_module.device)) not in pl_module.devices:
            pl_module.devices.append(name)
        if self._steps > WARMUP_STEPS:
            pl_module.steady_seconds += self._step_seconds
            pl_module.steady_steps += 1
        self._step_seconds = 0.0


def summary_val_loss(summary: dict) -> str:
    """A summary's final val loss for people: null means it was not finite (see below)."""
    loss = summary.get("val_loss")
    return "non-finite" if loss is None else f"{loss:.5f}"


def write_summary(
    run: Path,
    cfg: ExperimentConfig,
    module: DiffusionModule,
    device: torch.device,
    items_sha256: str | None = None,
) -> dict:
    """summary.json of a finished run; `device`: the one it trained on (after the fit, Lightning
    has moved the module to the CPU); `items_sha256`: its data module's fingerprint of the data."""
    fwd = module.net.flops(batch=1)
    spec = cfg.backbone.spec()
    n_img = images_seen(cfg)
    # the devices that ran its steps: train_seconds and img/s are theirs, over every session,
    # not this session's device's alone (one that resumed at the last step trained nothing)
    devices = module.devices or [device_name(device)]
    summary = {
        "experiment": cfg.experiment,
        "config_hash": cfg.hash,
        "seed": cfg.seed,
        "backbone": cfg.backbone.name,
        "family": spec["family"],
        "backbone_spec": spec,
        "tokens": getattr(module.net, "num_tokens", None),
        "conditioning": cfg.backbone.conditioning,
        "objective": cfg.objective.name,
        "data": cfg.data.name,
        # what the data were, which a folder's config does not say (its files can change
        # between runs of one config): the fingerprint resume and eval check, and the labels'
        "items_sha256": items_sha256,
        "class_names": list(module.info.class_names),
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        # how it validated (val_batch, val_grid): runs of one protocol share their noise and
        # measure one quantity; absent in runs of earlier versions
        **module.val_protocol(),
        # a run resumed from a checkpoint that validated otherwise: the step from which on its
        # val losses are of the protocol above (metrics.csv's earlier ones are not)
        "val_protocol_changed_at": module.val_protocol_changed_at,
        "images_seen": n_img,
        **{k.replace("/", "_"): v for k, v in module.last_val.items() if k != "step"},
        **{k.replace("/", "_"): v for k, v in module.last_fd.items()},
        "params": module.net.num_params(),
        "trainable_params": module.net.num_params(trainable_only=True),
        "macs": fwd["macs"],
        "flops": fwd["flops"],
        "train_flops": training_flops(fwd["flops"], n_img),
        "train_seconds": module.train_seconds,  # steps and data, not evaluation (_Timer)
        "data_seconds": module.data_seconds,
        # the fit's wall clock, evaluation and checkpoints included, over every session (None
        # where a resumed session's checkpoint predates it)
        "wall_seconds": module.elapsed_wall_seconds(),
        "img_per_s": n_img / module.train_seconds if module.train_seconds else None,
        # without each session's first WARMUP_STEPS: what a longer run of this config sustains
        # (None where a resumed session's checkpoint predates the count)
        "steady_img_per_s": (
            module.steady_steps * cfg.train.batch_size / module.steady_seconds
            if module.steady_seconds and module.steady_known
            else None
        ),
        "warmup_seconds": (
            module.train_seconds - module.steady_seconds if module.steady_known else None
        ),
        "device": " then ".join(devices),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # a sweep worker's argv holds its `--storage` URL: summaries travel with run folders
        "command": " ".join(map(redact, sys.argv)),
    }
    # a diverged run's NaN or inf metrics as null: JSON has no NaN (jq and other readers refuse it)
    summary = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()
    }
    write_json_atomic(run / "summary.json", summary, allow_nan=False)
    return summary


# -- the run ------------------------------------------------------------------------------------
# Lightning's deterministic mode: CUBLAS_WORKSPACE_CONFIG; seed_everything: the other two
_TRAIN_ENV = ("CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def _process_settings_kept() -> Iterator[None]:
    """The process-wide settings a run changes, restored when it returns or raises: `train`
    is called from notebooks and scripts that go on with work of their own. Left as the run
    set them, Lightning's deterministic mode refused the caller's own `put_` (on CUDA also
    `index_add_`, `scatter_add_`, ...) and NaN-filled each `torch.empty`; one run's
    train.threads became the torch default of the next run without it (which then trained,
    and said in its summary it trained, on that count); the caller's random numbers after a
    run were the run's seed's (as `features.train_small_net` keeps them, so does this); the
    warnings the run silences stay silenced only in the run. Lightning ignores SIGINT while it
    shuts down a stopped run and restores the handlers it noted as it set the run up: a Ctrl-C
    before then (a resume's checkpoint read) left every later Ctrl-C of the session ignored."""
    threads = torch.get_num_threads()
    # signal handlers are the main thread's to set (a run in a thread of a notebook's leaves them)
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = (
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    )
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory
    benchmark = torch.backends.cudnn.benchmark  # Lightning sets False in deterministic mode
    env = {k: os.environ.get(k) for k in _TRAIN_ENV}
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    # only a CUDA the caller has started: reading the state would start it on every GPU
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        # _quiet_lightning's filters are for the run's Trainer: kept, the caller's own
        # Lightning runs lost the eval-mode and non-empty-checkpoint-folder warnings
        with warnings.catch_warnings():
            yield
    finally:
        for signum, handler in handlers.items():
            if handler is not None:  # None: set outside Python, which it cannot restore
                signal.signal(signum, handler)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.benchmark = benchmark
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@_process_settings_kept()
def train(
    cfg: ExperimentConfig,
    out: str | Path = "runs",
    *,
    progress: bool | str = True,
    label: str = "dit-bench",
    callbacks: list[Callback] = (),
) -> Path:
    """Train `cfg` into its run directory (resuming it if it exists); returns the directory.

    `progress`: True, a bar on a terminal and `ProgressLines` elsewhere (a log file, a pipe);
    "bar" or "lines", that one ("lines": processes that share one output, ablate's and a
    sweep's workers; "bar": a notebook, whose output is no terminal); False, neither.
    `label` prefixes the lines. `callbacks` are added to the run's own (ablations and sweeps
    watch runs through them).
    """
    shown = progress_kind(progress)
    announce = label if shown else None  # the lines around sampling work between steps
    out = Path(out)
    t = cfg.train
    accelerator = t.accelerator
    on_gpu = trains_on_cuda(accelerator)
    # before looking for a finished run: the accelerator is not in the hash, so a GPU request
    # on a machine without one would otherwise be answered with a CPU run's results
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError(
            f"train.accelerator=gpu: torch {torch.__version__} sees no CUDA device "
            "(train.accelerator=auto uses one when there is one)"
        )
    if t.precision == "16-mixed" and not on_gpu:
        # Lightning would run bf16-mixed instead, under the hash and the name of 16-mixed
        raise ValueError("train.precision=16-mixed needs a GPU; on the CPU use bf16-mixed")
    check_fsdp_device(t.strategy, on_gpu)
    if (run := _finished_run(out, cfg)) is not None:
        return run
    try:
        return _build_and_fit(cfg, out, on_gpu, shown, announce, label, callbacks)
    finally:
        # A sweep worker trains trial after trial in one process, a notebook run after run.
        # The run's Trainer, module and callbacks refer to each other: only the collector's
        # full pass, which a training loop seldom sets off, frees them, so every earlier
        # run's net, EMA copy and optimiser state stayed in host memory (130 MB a run for an
        # 11M-parameter DiT; about 8 GB a DiT-XL/2 trial). The pass takes about 0.5 s. A run
        # stopped by an exception (a pruned trial) is held by its traceback here, and goes
        # at the next run's pass. ($DIT_BENCH_GC_AFTER_RUN=0 skips it: the test suite's
        # hundreds of tiny runs, 0.3 s a pass with torch and Lightning loaded.)
        _forget_module(callbacks)
        if os.environ.get(GC_AFTER_RUN_ENV) != "0":
            gc.collect()


GC_AFTER_RUN_ENV = "DIT_BENCH_GC_AFTER_RUN"


def _forget_module(callbacks: Sequence[Callback]) -> None:
    """Drops the module's `log` and `log_dict` that Lightning set on each of the caller's
    callbacks (bound methods: they hold the module). The caller keeps its callbacks past the
    run (a sweep's ValAtSteps through its trial's records, an ablation's for every run), and
    they held the module past the pass above: a sweep worker's trial's net, EMA copy and
    optimiser state stayed in memory through the next trial's training."""
    for cb in callbacks:
        own = getattr(cb, "__dict__", {})
        for name in ("log", "log_dict"):
            # only Lightning's: a callback's own attribute of the name is the callback's
            if isinstance(getattr(own.get(name), "__self__", None), L.LightningModule):
                del own[name]


def _build_and_fit(cfg, out, on_gpu, shown, announce, label, callbacks) -> Path:
    """`train` from its data and module on; returns with nothing of the run referred to."""
    t = cfg.train
    check_installed(t.loggers)
    if cfg.data.name == "latents" and cfg.data.vae:
        # it decodes the grids (and the FD's samples): a missing folder or another encoder
        # found at the first grid, or the last step, would cost the run; loaded once, cached
        _load_decoder(str(cfg.data.vae), str(cfg.data.root))
    if t.cudagraphs and not on_gpu:
        print(
            "[dit-bench] train.cudagraphs: no CUDA device here, so no CUDA graphs (the "
            "compiled step runs as with train.compile alone)",
            file=sys.stderr,
        )
    _quiet_lightning()
    if t.threads:
        torch.set_num_threads(t.threads)
    elif not on_gpu and (note := shared_cores_note()):
        print(f"[dit-bench] {note}", file=sys.stderr)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # weight init
    # The data and the module first: what refuses to run (a missing data folder, a bad
    # manifest) does so before a run directory exists, so no empty run is left behind.
    datamodule = DiffusionDataModule(cfg)
    datamodule.setup("fit")  # lists the images: an empty class or a non-image fails here
    if (n_val := len(datamodule.val_set)) < cfg.eval.val_images and _launch_rank() == 0:
        # not refused: the default (256) is more than a small data set's split holds (digits:
        # 180), and its runs are valid; but the loss is then over fewer images than asked for
        print(
            f"[dit-bench] eval.val_images={cfg.eval.val_images}: the {cfg.data.name} validation "
            f"split holds {n_val} images, so the val loss is over those {n_val} "
            "(data.val_fraction sets the split)",
            file=sys.stderr,
        )
    module = DiffusionModule(cfg, datamodule.info)
    fd = None
    if cfg.eval.fd_every:  # checks its feature net's weights file exists
        from dit_bench.train.callbacks import FrechetDistanceMetric

        held_out = len(datamodule.val_set.dataset)
        if held_out < 2:  # a Gaussian fit to one image's features
            raise ConfigError(
                f"eval.fd_every: the FD needs at least 2 held-out images; the split has "
                f"{held_out} (raise data.val_fraction)"
            )

        e = cfg.eval
        fd = FrechetDistanceMetric(cfg, e.fd_every, e.fd_samples, e.fd_features, announce)
    # the trackers' files closed and their runs ended in the lock, however the run ends
    with _run_lock(out, cfg), contextlib.ExitStack() as trackers:
        # again: while this process waited, another may have finished the run
        if (run := _finished_run(out, cfg)) is not None:
            return run
        return _fit(cfg, out, datamodule, module, fd, on_gpu, shown, label, callbacks, trackers)


def _drop_if_nothing_ran(run: Path, created: bool) -> None:
    """A run directory this call made and nothing but its config.yaml went into (refused by
    Lightning, or failed before a metric or checkpoint was written) is removed: there is no
    run to resume, and an empty directory would read as one. The trackers' folders
    (train.loggers) count as nothing: their runs' starts (the config as hyperparameters) are
    written before the first step."""
    left = {p.name for p in run.iterdir()} - {TENSORBOARD_DIR, WANDB_DIR}
    if created and left == {"config.yaml"}:
        shutil.rmtree(run)


def _finished_run(out: Path, cfg: ExperimentConfig) -> Path | None:
    run = find_run_dir(out, cfg)
    if run is None or not (run / "summary.json").exists():
        return None
    check_run_config(run, cfg)  # sample, eval and the reports read it: restore a lost one
    print(f"[dit-bench] already finished: {run}", file=sys.stderr)
    return run


def progress_kind(progress: bool | str) -> str | None:
    """train's `progress` as shown here: "bar", "lines" or None. True: the bar where it goes
    (Lightning's tqdm bar writes to stdout) is a terminal, else the lines."""
    if progress is True:
        return "bar" if sys.stdout.isatty() else "lines"
    if progress is False or progress is None:
        return None
    if progress in ("bar", "lines"):
        return progress
    raise ValueError(f"progress must be True, False, 'bar' or 'lines', got {progress!r}")


def _fit(cfg, out, datamodule, module, fd, on_gpu, shown, label, callbacks, trackers) -> Path:
    """`train` from the run directory on, in `_run_lock`; `trackers` (an ExitStack) ends the
    run's trackers (train.loggers) when the caller's block exits."""
    t = cfg.train
    run = find_run_dir(out, cfg)
    created = run is None and _launch_rank() == 0
    if run is None:
        run = new_run_dir(out, cfg) if created else _wait_for_run_dir(out, cfg)
        if created:  # stdout names it at the end only: a long run's log must say what to watch
            print(f"[{label}] new run: {run}", file=sys.stderr, flush=True)
    else:
        check_run_config(run, cfg)
        if _launch_rank() == 0:
            # a process killed mid-write leaves its temporary file (files.replacing names it
            # by pid); this one holds the run's lock, so no other is writing one now
            for tmp in run.glob("**/*.tmp"):
                tmp.unlink(missing_ok=True)
    last = run / "checkpoints" / "last.ckpt"
    # Lightning's SLURM auto-requeue (SIGUSR1, from `sbatch --signal=USR1@90`) saves the state
    # as hpc_ckpt_N.ckpt in the run directory, then requeues the job. Given last.ckpt, as here,
    # Lightning never reads them, and each requeue left one more full checkpoint (optimiser
    # state and EMA copy too) behind, to the end of the run: the newest state resumes, and
    # _DropRequeueCheckpoints removes them once every process has loaded it.
    requeued = sorted(run.glob("hpc_ckpt_*.ckpt"))
    start, resume_step = last, None
    for path in [last, *requeued]:
        if not path.exists():
            continue
        try:
            step = read_checkpoint(path)["global_step"]
        except ValueError as e:
            raise ValueError(f"{e}; delete it to train {run} again from its start") from None
        if resume_step is None or step > resume_step:
            start, resume_step = path, step
    if resume_step is not None:
        via = "" if start == last else f" (saved by Lightning's SLURM requeue: {start.name})"
        print(f"[dit-bench] resuming {run} from step {resume_step}{via}", file=sys.stderr)

    extra = trackers.enter_context(tracking(cfg, run, resume_step))
    metrics = StepMetrics(t.log_every, t.val_every)
    grid_label = label if shown and draws_grids(cfg) else None  # latents without a VAE: no grid
    callbacks = [
        # first: see its docstring; synchronised where the callbacks below read the device
        _Timer(
            (t.log_every, t.val_every, t.checkpoint_every, t.keep_every, t.sample_every)
            + ((fd.every,) if fd is not None else ())
        ),
        *callbacks,
        _DropRequeueCheckpoints(requeued, last if start != last else None),
        *_checkpointing(run / "checkpoints", t.checkpoint_every, t.keep_every),
        metrics,
        SampleGrid(
            run / "samples",
            t.sample_every,
            grid_sampler(cfg),
            what=f"{grid_size(cfg, datamodule.info)} samples ({cfg.eval.sampler}, "
            f"{cfg.eval.sample_steps} steps)",
            announce=grid_label,
        ),
    ]
    if extra:
        callbacks.append(TrackerHooks(cfg, extra, logged_metrics(cfg)))
    if fd is not None:  # after StepMetrics: the FD lands in the val-loss row of its step
        callbacks.append(fd)
    callbacks.append(WriteMetricsRow())  # after every callback that logs
    if shown == "bar":
        callbacks.append(StepProgressBar(refresh_rate=max(1, t.log_every // 5)))
    elif shown == "lines":  # after StepMetrics: a validation at its step is in its line
        # sampled after the last step: the steps' rate does not time them
        after = [f"the FD of {fd.num_samples} samples"] if fd is not None else []
        after += ["the sample grid"] if draws_grids(cfg) else []
        callbacks.append(ProgressLines(label, t.batch_size, after=" and ".join(after)))
    try:  # Lightning checks accelerator, strategy and devices here
        trainer = L.Trainer(
            # CUDA or the CPU, as on_gpu decided, never Lightning's own "auto": on an Apple
            # machine that picks MPS, which nothing here is built or tested for, and the
            # summary (device_name) would still say "cpu"
            accelerator="cuda" if on_gpu else "cpu",
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=_strategy(t.strategy, module),
            precision=t.precision,
            max_steps=t.steps,
            max_epochs=-1,
            # global_step, the lr schedule, clipping and the EMA (optimizer_step) go by
            # optimiser steps; the callbacks that work per step skip the micro-batches before
            # the last (callbacks.mid_step)
            accumulate_grad_batches=t.accumulate_grad_batches,
            num_sanity_val_steps=0,
            log_every_n_steps=t.log_every,
            gradient_clip_val=cfg.optim.grad_clip,
            # metrics.csv first: `trainer.logger`, the run's record; the trackers beside it
            logger=[CSVMetrics(run / "metrics.csv", resume_step, logged_metrics(cfg)), *extra],
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            # Flash attention's backward has no deterministic kernel: warn on GPU, insist on CPU.
            deterministic="warn" if on_gpu else True,
            enable_progress_bar=shown == "bar",
            enable_model_summary=False,
            default_root_dir=run,
        )
        check_sharding(t.strategy, trainer.world_size)
        check_launch(trainer.strategy, trainer.world_size)
    except Exception:
        _drop_if_nothing_ran(run, created)
        raise
    # TF32 for float32 matmuls on GPU: set around the fit, never at import time.
    tf32 = allow_tf32(True) if on_gpu and t.tf32 else contextlib.nullcontext()
    if t.num_nodes > 1 and _launch_rank() == 0:
        print(
            f"[dit-bench] waiting for {t.num_nodes} nodes x {t.devices} processes "
            "(launched by torchrun, srun or Lightning on each node)",
            file=sys.stderr,
        )
    try:
        with tf32, no_nan_fill():  # Lightning set the deterministic mode: not its NaN fill
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=start if resume_step is not None else None
            )
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1); callers (ablations, tests) need to know.
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    except Exception as e:  # an unreadable image at the first batch, say: nothing written yet
        if (stop := raised_in(e, KeyboardInterrupt)) is not None:  # Ctrl-C or SIGTERM
            # stopped, then an error in Lightning's teardown: a SIGTERM to the process group
            # (systemd, SLURM) kills the loader's workers too, and joining them raises
            # "DataLoader worker ... killed by signal". A stop all the same: it resumes.
            raise type(stop)() from None
        # the trackers ended first, as failed (W&B's run too): their files, closed, go with a
        # run directory that holds nothing else
        trackers.__exit__(type(e), e, e.__traceback__)
        _drop_if_nothing_ran(run, created)
        if out_of_memory(e):
            raise OutOfMemory(out_of_memory_message(e, cfg, trainer.global_step)) from None
        if (killed := loader_killed_message(e, cfg, trainer.global_step)) is not None:
            raise OutOfMemory(killed) from None
        if lacks_cxx_compiler(e):  # at the compiled backbone's first step
            raise ConfigError(f"train.compile: {NO_CXX_COMPILER}, or set it false") from None
        if (why := wandb_refused(e)) is not None:  # at the W&B run's start
            raise ConfigError(why) from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    # Lightning's teardown moved the module to the CPU: where it trained is the strategy's
    device = trainer.strategy.root_device
    if module.last_val.get("step") != t.steps:  # killed after the last checkpoint
        metrics.validate(trainer, module.to(device))
        trainer.logger.flush()
    grid = run / "samples" / f"step-{t.steps:07d}.png"
    # killed after the last checkpoint, in the final grid (on_train_end): a resume at the last
    # step trains nothing and Lightning calls no on_train_end, so draw it here; every process
    # draws its share, so all of them go by rank 0's look at the file (rank 0 may be writing
    # it from on_train_end still while the others look)
    if draws_grids(cfg) and trainer.strategy.broadcast(not grid.exists(), src=0):
        grid_sampler(cfg)(trainer, module.to(device), grid)
    if trainer.global_step % t.checkpoint_every or (
        start != last and trainer.global_step == resume_step
    ):
        # the final weights, which the summary and the last grid describe (sample and eval
        # read last.ckpt); every rank calls it, as Lightning's distributed saves need. Also
        # after a resume from a requeue checkpoint at the last step (nothing trained, so no
        # on_train_start resaved it), which goes below.
        trainer.save_checkpoint(last, weights_only=False)  # a full one, as the callback writes
    if trainer.is_global_zero:
        # this session's own, or ones a resume at the last step (no on_train_start) left
        for path in run.glob("hpc_ckpt_*.ckpt"):
            path.unlink(missing_ok=True)
        write_summary(run, cfg, module, device, datamodule.items_sha256)
        note = data_wait_note(module, cfg, device)
        if note:
            print(note, file=sys.stderr)
    return run


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation that failed: CUDA's OutOfMemoryError; on the CPU torch's
    allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text
    )


def out_of_memory_message(e: BaseException, cfg: ExperimentConfig, step: int) -> str:
    """One line for an out-of-memory run: torch's own words (how much it asked for), and the
    settings that lower it. Shown with its traceback, the allocator's line came last of 130."""
    t = cfg.train
    told = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    if "DefaultCPUAllocator" in told:  # "[enforce fail at alloc_cpu.cpp:127] err == 0. ..."
        told = told[told.index("DefaultCPUAllocator") :]
    fixes = []
    # an execution key: the same run (hash, numbers) in smaller forwards, where the two
    # settings after it train another
    per = t.batch_size // (t.devices * t.num_nodes)  # a process's images a step
    a = t.accumulate_grad_batches
    more = next((m for m in range(a + 1, per + 1) if per % m == 0), None)
    if more is not None and not t.cudagraphs:  # the pair is refused
        fixes.append(
            f"set train.accumulate_grad_batches={more} (the same run, {per // more} images "
            "a training forward)"
        )
    fixes.append(f"lower train.batch_size (now {t.batch_size})")
    fixes.append(f"pick a smaller backbone.name (now {cfg.backbone.name})")
    if not t.activation_checkpointing:
        fixes.append("set train.activation_checkpointing=true")
    return (
        f"out of memory at step {step} of {cfg.experiment} ({told}): "
        f"{', '.join(fixes[:-1])} or {fixes[-1]}"
    )


def loader_killed_message(e: BaseException, cfg: ExperimentConfig, step: int) -> str | None:
    """One line for a data loader process that died without a Python error: torch's
    "DataLoader worker (pid N) is killed by signal: Killed" (SIGKILL, the OOM killer's), or
    "DataLoader worker (pid(s) N) exited unexpectedly" where torch did not see the signal (it
    polls its workers); "killed by signal: Bus error" (SIGBUS: batches pass through /dev/shm,
    64 MB in a Docker container by default); None for other errors and other signals (a
    segfault: its traceback). Shown with its traceback, torch's line came last of 110."""
    signalled = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: (.*?)\.")
    exited = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")
    pids, seen = None, set()
    while e is not None and id(e) not in seen:
        if found := signalled.search(str(e)):
            if found[2].startswith("Bus error"):
                return (
                    f"a data loader process (pid {found[1]}) ran out of shared memory (SIGBUS "
                    f"at step {step} of {cfg.experiment}): batches pass through /dev/shm, "
                    "64 MB in a Docker container unless `docker run --shm-size=8g` (or "
                    "Kubernetes' emptyDir medium Memory); raise it, or lower data.num_workers "
                    f"(now {cfg.data.num_workers}); the same command then resumes from the "
                    "run's last checkpoint"
                )
            if not found[2].startswith("Killed"):  # macOS says "Killed: 9"
                return None
            pids, how = found[1], "was killed (SIGKILL: by the out-of-memory killer? `dmesg`"
            break
        if pids is None and (found := exited.search(str(e))):
            pids, how = found[1], "died (killed by the out-of-memory killer? `dmesg`"
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if pids is None:
        return None
    who = "data loader processes" if "," in pids else "a data loader process"
    return (
        f"{who} (pid {pids}) {how} names its victims) at step {step} of "
        f"{cfg.experiment}: lower data.num_workers (now {cfg.data.num_workers}) or "
        f"train.batch_size (now {cfg.train.batch_size}); the same command then resumes from "
        "the run's last checkpoint"
    )


class _DropRequeueCheckpoints(Callback):
    """Removes the hpc_ckpt_N.ckpt files of Lightning's SLURM requeue (see `_fit`) once every
    process has loaded its state; when one of them was the resume point, its state is saved
    as last.ckpt first (a kill before the next checkpoint must not go back further)."""

    def __init__(self, files: Sequence[Path], resave: Path | None):
        self.files, self.resave = list(files), resave

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.files:
            return
        if self.resave is not None:  # every process calls it, as Lightning's saves need
            trainer.save_checkpoint(self.resave, weights_only=False)
        trainer.strategy.barrier()  # every process has read the file it resumed from
        if trainer.is_global_zero:
            for path in self.files:
                path.unlink(missing_ok=True)


# A GPU that waits for batches this share of the training loop is worth a note
DATA_WAIT_SHARE = 0.1


def data_wait_note(
    module: DiffusionModule, cfg: ExperimentConfig, device: torch.device
) -> str | None:
    """A line for people when the accelerator waited for data (run._Timer's data_seconds);
    not on the CPU, where the loader's processes would take cores from the model's own."""
    if device.type == "cpu" or not module.train_seconds:
        return None
    share = module.data_seconds / module.train_seconds
    if share < DATA_WAIT_SHARE:
        return None
    return (
        f"[dit-bench] the training loop waited for data {share:.0%} of its time "
        f"({module.data_seconds:.1f} of {module.train_seconds:.1f} s): more loader processes "
        f"may keep the {'GPU' if device.type == 'cuda' else device.type} busy "
        f"(data.num_workers, now {cfg.data.num_workers})"
    )


def logged_metrics(cfg: ExperimentConfig) -> list[str]:
    """The metrics.csv columns a run logs (StepMetrics, FrechetDistanceMetric), but "step"."""
    from dit_bench.ablate import fd_column, val_levels

    val = ["val/loss"] + [f"val/loss_l{k}" for k in range(val_levels(cfg))]
    fd = fd_column(cfg)
    return ["lr", "train/loss", *val, *([fd] if fd else [])]


def _checkpointing(folder: Path, last_every: int, keep_every: int) -> list[ModelCheckpoint]:
    """last.ckpt every `last_every` steps (the resume point), and `step=N.ckpt` files kept every
    `keep_every` steps (0: none). One callback when the two coincide: Lightning refuses two
    checkpoint callbacks with the same schedule.

    The kept file's callback comes first (Lightning runs them in list order, as one callback
    saves its step file before last.ckpt): a kill between a step's two saves then leaves
    last.ckpt at the earlier step, and the resumed run redoes the step and writes both. The
    other order left last.ckpt at this step and its step-N file never written."""

    def make(every: int, keep: bool, last: bool) -> ModelCheckpoint:
        return _StepCheckpoint(
            dirpath=folder,
            filename="{step:07d}",
            every_n_train_steps=every,
            save_last=last,
            save_top_k=-1 if keep else 0,
            save_on_train_epoch_end=False,
            enable_version_counter=False,  # the run owns its folder: overwrite, never last-v1
        )

    if keep_every == last_every:
        return [make(last_every, keep=True, last=True)]
    kept = [make(keep_every, keep=True, last=False)] if keep_every else []
    return kept + [make(last_every, keep=False, last=True)]


class _StepCheckpoint(ModelCheckpoint):
    """Lightning's checkpoint callback, on optimiser-step boundaries only: with gradient
    accumulation, a resumed session's first micro-batches still read the resume step as
    global_step (the callback does not keep the step it last saved across sessions), and the
    checkpoint it wrote again there would hold the loop mid-step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not mid_step(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def check_sharding(strategy: str, world_size: int) -> None:
    """FSDP on one process only, where it falls back to NO_SHARD (tested on one GPU).

    Sharded, the EMA copy is sharded too (its blocks match the wrap policy; the rest lives in
    the root unit), but validation, sample grids and the in-training FD call it directly,
    outside the root's forward that gathers its parameters: they would compute with this
    rank's shards (empty views). The EMA update fails even sooner: over two gloo processes it
    stopped the first step with a size mismatch (a rank's empty shard against the whole
    tensor, `fast.ema_update`). Refused before training.
    """
    if strategy == "fsdp" and world_size > 1:
        raise ValueError(
            f"train.strategy=fsdp over {world_size} processes: sharded training is not "
            "supported yet (validation, sample grids and the FD use the EMA copy outside "
            "FSDP's forward); use train.strategy=ddp (each GPU holds the whole model: DiT-XL/2 "
            "trains in about 33 GiB at batch 64)"
        )


def check_fsdp_device(strategy: str, on_gpu: bool) -> None:
    """FSDP on CUDA only: Lightning refuses it on the CPU only when it builds the Trainer,
    after the data and the module, in its own words (`accelerator='cuda'`, no value of
    train.accelerator); torch's FSDP under it also wants an accelerator. Refused first."""
    if strategy == "fsdp" and not on_gpu:
        raise ValueError(
            f"train.strategy=fsdp needs a CUDA device; torch {torch.__version__} sees no CUDA "
            "device here (Lightning and torch's FSDP refuse the CPU): use train.strategy=ddp "
            "(several processes) or auto"
        )


def check_launch(strategy, world_size: int) -> None:
    """Several processes only where each is started as a program of its own: by Lightning's
    subprocess launcher (`dit-bench train`, a script) or torchrun/srun. In a notebook or
    `python -i`, Lightning starts forked processes for `train.strategy=auto`: they train, but
    hand nothing back to this process (no final validation, no summary: the run could never
    finish). Refused before training."""
    start = getattr(strategy, "_start_method", "popen")
    if world_size > 1 and start != "popen":
        raise ValueError(
            f"{world_size} processes from an interactive session (notebook, python -i): "
            f"Lightning would train in processes it starts by {start}, which hand nothing back "
            "to this one; run `dit-bench train` (or a script) for several devices, or set "
            "train.devices=1 here"
        )


def _strategy(name: str, module: DiffusionModule):
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    from dit_bench.fast import blocks_of

    # Shard at the granularity of the backbone's transformer/res blocks (its block lists'
    # members, as activation checkpointing and regional compilation take them; not the members
    # of every ModuleList inside them: the U-Net's EmbedSequential groups are ModuleLists, and
    # each Conv2d became a unit); the frozen EMA copy and positional tables need
    # use_orig_params (mixed requires_grad in one unit).
    blocks = blocks_of(module.net)
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    blocks = {type(b) for b in blocks if id(b) not in inside}
    return FSDPStrategy(auto_wrap_policy=blocks or None, use_orig_params=True)
