"""A training run: run directory, Trainer, resume, summary.json.

Run directory `runs/<experiment>/<UTC time>-<config hash>/`, named by content so concurrent runs
never collide; a rerun of the same config finds the directory by its hash and resumes from
`checkpoints/last.ckpt` (or does nothing if `summary.json` says it finished).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image

from dit_bench.backbones import Cond
from dit_bench.config import ExperimentConfig, build_config
from dit_bench.data import DataInfo, data_info
from dit_bench.data.module import DiffusionDataModule
from dit_bench.train.callbacks import (
    AtomicCheckpointIO,
    CSVMetrics,
    SampleGrid,
    StepMetrics,
    StepProgressBar,
)
from dit_bench.train.module import DiffusionModule, images_seen, training_flops

GRID_SEED = 1234  # same noise at every step and in every run: grids are comparable


# -- run directories ---------------------------------------------------------------------------
def find_run_dir(out: Path, cfg: ExperimentConfig) -> Path | None:
    hits = sorted((Path(out) / cfg.experiment).glob(f"*-{cfg.hash}"))
    return hits[-1] if hits else None


def new_run_dir(out: Path, cfg: ExperimentConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run = Path(out) / cfg.experiment / f"{stamp}-{cfg.hash}"
    run.mkdir(parents=True, exist_ok=False)
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    return build_config(yaml.safe_load(path.read_text()))


def load_module(run_dir: Path, checkpoint: str = "last.ckpt") -> DiffusionModule:
    """The trained module of a run directory, in eval mode, on the CPU."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    path = run_dir / "checkpoints" / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint {checkpoint} (has it trained yet?)")
    module = DiffusionModule(cfg, data_info(cfg.data))
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return module.eval()


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
) -> torch.Tensor:
    """Images in [-1, 1], (N, C, H, W), for the given class labels."""
    info = module.info
    net = module.ema if use_ema else module.net
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (len(labels), info.channels, info.image_size, info.image_size)
    noise = torch.randn(shape, generator=g, device=device)
    labels = labels.to(device)
    x = module.objective.sample(
        net,
        noise,
        Cond(labels=labels),
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        uncond=Cond(labels=torch.full_like(labels, info.num_classes)),
        generator=g,
    )
    net.train(was_training)
    return x.clamp(-1, 1)


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
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)


def class_grid_labels(info: DataInfo, per_class: int) -> torch.Tensor:
    return torch.arange(info.num_classes).repeat_interleave(per_class)  # one row per class


def grid_sampler(cfg: ExperimentConfig):
    def sample_fn(module: DiffusionModule, path: Path) -> None:
        e = cfg.eval
        labels = class_grid_labels(module.info, e.samples_per_class)
        images = sample_images(
            module,
            labels,
            sampler=e.sampler,
            steps=e.sample_steps,
            cfg_scale=e.cfg_scale,
            seed=GRID_SEED,
            use_ema=e.use_ema,
        )
        save_grid(images, path, ncol=e.samples_per_class)

    return sample_fn


# -- summary ------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("dit-bench", "torch", "lightning", "pydantic", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(module: DiffusionModule) -> str:
    dev = next(module.parameters()).device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class _Timer(Callback):
    """Adds the wall time of the training steps (not set-up) to module.train_seconds."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.train_seconds += time.perf_counter() - self._t


def write_summary(run: Path, cfg: ExperimentConfig, module: DiffusionModule) -> dict:
    fwd = module.net.flops(batch=1)
    n_img = images_seen(cfg)
    summary = {
        "experiment": cfg.experiment,
        "config_hash": cfg.hash,
        "seed": cfg.seed,
        "backbone": cfg.backbone.name,
        "conditioning": cfg.backbone.conditioning,
        "objective": cfg.objective.name,
        "data": cfg.data.name,
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "images_seen": n_img,
        **{k.replace("/", "_"): v for k, v in module.last_val.items() if k != "step"},
        "params": module.net.num_params(),
        "trainable_params": module.net.num_params(trainable_only=True),
        "macs": fwd["macs"],
        "flops": fwd["flops"],
        "train_flops": training_flops(fwd["flops"], n_img),
        "train_seconds": module.train_seconds,
        "img_per_s": n_img / module.train_seconds if module.train_seconds else None,
        "device": device_name(module),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    tmp = run / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run / "summary.json")
    return summary


# -- the run ------------------------------------------------------------------------------------
def train(
    cfg: ExperimentConfig,
    out: str | Path = "runs",
    *,
    progress: bool = True,
    callbacks: list[Callback] = (),
) -> Path:
    """Train `cfg` into its run directory (resuming it if it exists); returns the directory.

    `callbacks` are added to the run's own (ablations and sweeps watch runs through them).
    """
    out = Path(out)
    run = find_run_dir(out, cfg)
    if run is not None and (run / "summary.json").exists():
        print(f"[dit-bench] already finished: {run}", file=sys.stderr)
        return run
    run = run or new_run_dir(out, cfg)
    last = run / "checkpoints" / "last.ckpt"
    resume_step = None
    if last.exists():
        resume_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        print(f"[dit-bench] resuming {run} from step {resume_step}", file=sys.stderr)

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # weight init
    datamodule = DiffusionDataModule(cfg)
    module = DiffusionModule(cfg, datamodule.info)
    t = cfg.train
    accelerator = t.accelerator
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    metrics = StepMetrics(t.log_every, t.val_every)
    callbacks = [
        *callbacks,
        ModelCheckpoint(
            dirpath=run / "checkpoints",
            every_n_train_steps=t.checkpoint_every,
            save_last=True,
            save_top_k=0,
            save_on_train_epoch_end=False,
        ),
        metrics,
        SampleGrid(run / "samples", t.sample_every, grid_sampler(cfg)),
        _Timer(),
    ]
    if t.keep_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=run / "checkpoints",
                filename="{step:07d}",
                every_n_train_steps=t.keep_every,
                save_top_k=-1,
                save_on_train_epoch_end=False,
            )
        )
    if progress:
        callbacks.append(StepProgressBar(refresh_rate=max(1, t.log_every // 5)))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=t.precision,
        max_steps=t.steps,
        max_epochs=-1,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every,
        gradient_clip_val=cfg.optim.grad_clip,
        logger=CSVMetrics(run / "metrics.csv", resume_step=resume_step),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        # Flash attention's backward has no deterministic kernel: warn on GPU, insist on CPU.
        deterministic="warn" if on_gpu else True,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=run,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.exists() else None)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1); callers (ablations, tests) need to know.
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    if module.last_val.get("step") != t.steps:  # killed after the last checkpoint
        metrics.validate(trainer, module)
    write_summary(run, cfg, module)
    return run
