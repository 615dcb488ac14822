"""DiffusionModule: joins a backbone and an objective for Lightning.

No diffusion math lives here (the objective owns time sampling, noising, targets and the
per-sample loss); this module averages, drops labels for guidance, keeps the EMA and steps the
optimiser.

Randomness in a training step comes from a generator seeded by (seed, global step), never from
the global RNG: a resumed run draws exactly the noise, times and label drops of an
uninterrupted one, whatever happened before the restart.
"""

from __future__ import annotations

import copy
import math
import sys
import time

import lightning as L
import torch
from torch import nn

from dit_bench.backbones import Cond, build_net
from dit_bench.data import DataError, DataInfo
from dit_bench.data.module import VAL_BATCH
from dit_bench.fast import (
    EmaPairs,
    bf16_stream,
    checkpoint_blocks,
    compile_backbone,
    ema_pairs,
    ema_update,
    fused_adamw_default,
)
from dit_bench.objectives import build_objective
from dit_bench.sampling import draw_slice

# Fixed across runs, so the val losses of two runs are paired: batch k of the validation images
# (batches of data.module.VAL_BATCH, whatever train.batch_size) gets the noise of seed
# VAL_NOISE_SEED + k.
VAL_NOISE_SEED = 10_000


def val_protocol(objective) -> dict:
    """How `DiffusionModule.validation_metrics` measures with `objective` (a class or an
    instance), as summary.json, checkpoints and trial records say: the batch its noise is drawn
    in, and the grid's kind where the objective names one (DDPM's midpoints; none in runs of
    the versions before either)."""
    return {"val_batch": VAL_BATCH, "val_grid": getattr(objective, "VAL_GRID", None)}


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def build_objective_from(cfg):
    """The objective of `cfg.objective` (its fields are the objective's keyword arguments)."""
    kwargs = cfg.objective.model_dump()
    return build_objective(kwargs.pop("name"), **kwargs)


def check_class_names(checkpoint: dict, info: DataInfo, what: str) -> None:
    """The data's classes are those the weights of `checkpoint` learned. Labels are indices
    into the sorted class folders (or an encoding's manifest): a class folder added, removed
    or renamed since maps every label after it to another class, which the config (the same
    data.root) cannot show. Checkpoints written before this check carry no names."""
    trained = checkpoint.get("class_names")
    if trained is None or tuple(trained) == info.class_names:
        return
    added = sorted(set(info.class_names) - set(trained))
    removed = sorted(set(trained) - set(info.class_names))
    change = "; ".join(
        f"{verb} {', '.join(map(repr, names[:5]))}{' ...' if len(names) > 5 else ''}"
        for verb, names in (("added", added), ("removed", removed))
        if names
    )
    raise DataError(
        f"data: the classes changed since {what} was written ({change or 'reordered'}): its "
        f"label k is the k-th of the {len(trained)} class names it learned; restore "
        "those class folders (data.root), or train a new run"
    )


class DiffusionModule(L.LightningModule):
    def __init__(self, cfg, info: DataInfo):
        super().__init__()
        self.cfg = cfg
        self.info = info
        self.checkpoint_step: int | None = None  # the step of the weights `load_module` loaded
        # the data module's state in that checkpoint (the fingerprint of the files it trained on)
        self.checkpoint_data: dict | None = None
        self.net = build_net(cfg, info)
        if cfg.train.channels_last:  # before the EMA copy: both keep one layout
            self.net = self.net.to(memory_format=torch.channels_last)
        # before the EMA copy, which gets the same hooks; they act under autocast only, so the
        # float32 validation, grids and FD (outside Lightning's autocast) are not changed
        if cfg.train.bf16_stream:
            bf16_stream(self.net)
        # EMA of the weights (DiT samples from the EMA model); a submodule, so it is checkpointed.
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        if cfg.train.activation_checkpointing:
            # The trained net only, after the EMA copy: the copy runs under no_grad, where a
            # checkpointed block runs plainly anyway. Before or after compiling, the same.
            checkpoint_blocks(self.net, cfg.train.activation_checkpointing_every)
        if cfg.train.compile:
            # The backbone only, after the EMA copy (which stays eager: it samples and validates
            # rarely); in place, so parameter names and checkpoints are those of the eager net.
            # CUDA graphs (train.cudagraphs): the training step only, as the EMA copy serves
            # validation and samples (the config insists on eval.use_ema)
            compile_backbone(self.net, "reduce-overhead" if cfg.train.cudagraphs else None)
        self.objective = build_objective_from(cfg)
        # The training loop's time, accumulated over resumes (run._Timer), for img/s in the
        # summary; data_seconds is the part spent waiting for batches. steady_seconds/_steps:
        # the steps after each session's first run.WARMUP_STEPS (compilation, CUDA-graph recording),
        # for the throughput a long run sustains.
        self.train_seconds = self.data_seconds = self.steady_seconds = 0.0
        self.steady_steps = 0
        self.steady_known = True  # False: resumed from a checkpoint written before the count
        # the devices the steps timed above ran on, in order of first use (run._Timer): a run
        # resumed on another machine (copied from a cluster, finished on a laptop) ran on both
        self.devices: list[str] = []
        # Wall-clock time of the fit, everything included (validation, grids, checkpoints), also
        # over resumes: wall_seconds is the earlier sessions', and this one's runs since
        # wall_start (run._Timer sets it when training starts); None: unknown (a checkpoint of a
        # version before the wall clock was kept).
        self.wall_seconds: float | None = 0.0
        self.wall_start: float | None = None
        self.batch_done_at: float | None = None  # when the last batch's hooks had all run
        self._ema_pairs: EmaPairs | None = None  # optimizer_step's, made at the first step
        self._clip_params: list[nn.Parameter] | None = None  # the clipping's, likewise
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._loss_count = 0
        # Gradient accumulation (train.accumulate_grad_batches): the micro-batch of the step in
        # progress (the data stream of a session starts at micro-batch 0 of its first step), and
        # the step's loss so far, which joins the log window at its last micro-batch (a
        # checkpoint mid-step, as a SLURM requeue's, holds only whole steps)
        self._micro = 0
        self._step_loss: torch.Tensor | None = None
        self.last_train_loss: float | None = None  # the last window's mean, for the progress bar
        self.last_val: dict[str, float] = {}  # latest val metrics, with their "step"
        # the step of a resume from a checkpoint that validated otherwise (val_protocol): the
        # val losses up to it measure another quantity than those after it
        self.val_protocol_changed_at: int | None = None
        self.last_fd: dict[str, float] = {}  # latest in-training FD (eval.fd_every)

    # -- optimisation --------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        device = next(self.net.parameters()).device  # Lightning has moved the module by now
        opt = torch.optim.AdamW(
            self.net.parameters(),
            lr=o.lr,
            betas=o.betas,
            weight_decay=o.weight_decay,
            fused=fused_adamw_default(device) if o.fused is None else o.fused,
        )
        if not o.warmup_steps:
            return opt
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / o.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}

    def ema_decay(self, step: int) -> float:
        # Short runs would sample from weights that are still mostly the init with a plain
        # 0.9999 decay; warm the decay up as (1 + step) / (10 + step) (as in many DDPM codes).
        return min(self.cfg.optim.ema_decay, (1 + step) / (10 + step))

    def training_step(self, batch, batch_idx):
        x, y = batch  # this rank's rows of the global batch: (B, C, H, W), (B,)
        if self.cfg.train.cudagraphs:
            # The last step's gradients live in the graphs' memory pool, which this step's
            # replay overwrites; Lightning clears them only after the forward, and anything
            # reading them in between (a hook, the teardown after an error) would read garbage
            # or raise. Dropped first, then a new step: the graphs reuse the last one's memory.
            self.net.zero_grad(set_to_none=True)
            torch.compiler.cudagraph_mark_step_begin()
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # global_step is the optimiser step's: each of its micro-batches draws from the same
        # generator, so the draws are those of one step over the whole batch
        g = step_generator(self.cfg.seed, self.global_step, x.device)
        micro, a = self._micro, self.cfg.train.accumulate_grad_batches
        # Draws are made for the whole global batch and sliced (DataModule slices the data the
        # same way): the numbers do not depend on the number of processes nor micro-batches.
        rows = self.rows(x.shape[0], micro)
        # Label dropout for classifier-free guidance: the null class is index num_classes.
        u = draw_slice(lambda n: torch.rand(n, generator=g, device=x.device), len(y), rows)
        y = torch.where(u < self.cfg.train.label_dropout, self.info.num_classes, y)
        out = self.objective.loss(self.net, x, Cond(labels=y), generator=g, batch_slice=rows)
        loss = out["loss"].mean()
        # Summed on the device and read once per log window: no host sync in the step. (Not
        # `self.log(..., prog_bar=True)`: Lightning reads a logged tensor back every step.)
        # Micro-batches have equal rows: the step's loss is the mean of theirs. Lightning
        # divides the returned loss by A for the backward, so the summed gradients are the
        # global batch mean's; this one is returned undivided.
        part = loss.detach().double() if a == 1 else loss.detach().double() / a
        self._step_loss = part if micro == 0 else self._step_loss + part
        self._micro = (micro + 1) % a
        if self._micro == 0:
            self._loss_sum = self._loss_sum + self._step_loss
            self._loss_count += 1
        return loss

    def rows(self, n: int, micro: int = 0) -> tuple[int, int]:
        """(start, total): where micro-batch `micro` (n rows) of this process lies in the
        global batch: rank r holds rows r x n x A onwards, its micro-batches in turn
        (StepBatches cuts the data so)."""
        a, world = self.cfg.train.accumulate_grad_batches, self.trainer.world_size
        return ((self.global_rank * a + micro) * n, n * world * a)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        a = self.cfg.train.accumulate_grad_batches
        if a == 1 or self._micro:
            return
        # Lightning steps the optimiser after the batch that makes its count of the epoch's
        # batches a multiple of A, the count going on from the checkpoint's. The stream starts
        # each session at micro-batch 0 of the next step, but the count need not be a multiple
        # of A there: a checkpoint of a run with another A (an execution key), or one saved
        # mid-step by a SLURM requeue. Counted from this batch instead, so the optimiser steps
        # after the step's last micro-batch (a no-op when the count agrees).
        current = self.trainer.fit_loop.epoch_loop.batch_progress.current
        shift = (current.ready - 1) % a
        if shift:
            current.ready -= shift
            current.started -= shift
            current.processed -= shift
            current.completed -= shift

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Lightning calls this after every callback's batch-end hook (validation, checkpoints):
        # from here to the next batch's start, the loop waits for data.
        self.batch_done_at = time.perf_counter()

    def on_fit_start(self) -> None:
        # made again at this fit's first step: the lists are a fit's
        self._ema_pairs = self._clip_params = None

    def on_train_start(self) -> None:
        # the stream of this session starts at micro-batch 0 (DiffusionDataModule)
        self._micro = 0
        # optim.fused is an execution key: a resumed run updates as this call says. The
        # optimiser was built so (configure_optimizers), but its state from the checkpoint
        # brought the old run's `fused` into every group. Each `step` count goes where torch's
        # load_state_dict puts it for such a group: a float32 tensor on the parameter's device
        # for the fused kernel, on the CPU for the loop (which reads it every step)
        for opt in self.trainer.optimizers:
            fused = opt.defaults.get("fused")
            for group in opt.param_groups:
                if group.get("fused") == fused:
                    continue
                group["fused"] = fused
                for p in group["params"]:
                    step = opt.state.get(p, {}).get("step")
                    if not isinstance(step, torch.Tensor):
                        continue
                    if fused:
                        step = step.to(dtype=torch.float32, device=p.device)
                    elif not group.get("capturable"):
                        step = step.cpu()
                    opt.state[p]["step"] = step

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # The EMA moves with the weights, inside the step, so every checkpoint holds a matched
        # (weights, EMA) pair whatever order the callbacks run in. The parameter lists are
        # made at the first step (after Lightning's set-up, which moves the module but keeps
        # its parameter tensors), not at every one; FSDP may swap the tensors it hands out
        # (sharded and unsharded views), so there they are made each step.
        pairs = self._ema_pairs
        if pairs is None:
            pairs = ema_pairs(self.ema, self.net)
            if self.cfg.train.strategy != "fsdp":
                self._ema_pairs = pairs
        ema_update(self.ema, self.net, self.ema_decay(self.global_step), pairs)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        if not gradient_clip_val:
            return
        # Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales its
        # gradients in its own step (fused AdamW, the default), even under bf16-mixed, which has
        # no scaler. Clipped here instead: with a scaler (16-mixed; FSDP's ShardedGradScaler
        # too), unscaled first; the scaler's step then sees them unscaled and passes no scale
        # to the fused kernel.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        # Lightning's FSDP precision plugin refuses norm clipping; FSDP clips its own (sharded)
        # gradients with the global norm, which is the same rule.
        if hasattr(self.trainer.model, "clip_grad_norm_"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        # Listed once a fit, as the EMA's lists (optimizer_step): walking the module tree for
        # them took 0.17 ms a step for DiT-S/4's 132 parameters on this project's CPU (0.44 for
        # DiT-XL/2's 292), host time that a GPU step bound by its launches (DiT-S/4 with CUDA
        # graphs: 20 ms a step in the harness) waits for.
        params = self._clip_params
        if params is None:
            params = self._clip_params = list(self.net.parameters())
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def pop_train_loss(self) -> float:
        """Mean training loss since the last call, over all ranks (one sync per log window)."""
        local = self._loss_sum / max(self._loss_count, 1)
        # Equal rows per rank, so the mean over ranks is the global-batch mean.
        mean = self.trainer.strategy.reduce(local.to(self.device), reduce_op="mean").item()
        if not math.isfinite(mean):
            raise FloatingPointError(
                f"non-finite training loss before step {self.global_step}; {self._lr_hint()}"
            )
        self._loss_sum, self._loss_count = torch.zeros((), dtype=torch.float64), 0
        self.last_train_loss = mean
        return mean

    def _lr_hint(self) -> str:
        clip = self.cfg.optim.grad_clip
        hint = " or set optim.grad_clip (it is off)" if clip is None else f" (grad_clip {clip})"
        return f"lower optim.lr{hint}"

    def check_finite_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Refuse weights that are not finite. The loss guard (pop_train_loss) reads the
        losses of the steps so far, each computed from the weights before its update: the
        update of the last step (an overflowing gradient, a NaN through clipping) is unseen
        there, and a checkpoint of it would replace the last good resume point with weights
        every rerun resumes into. One device read a checkpoint, never one a step."""
        bad = non_finite(state_dict)
        if bad:
            raise FloatingPointError(
                f"non-finite weights at step {self.global_step} ({len(bad)} tensors, e.g. "
                f"{', '.join(bad[:3])}): not checkpointed (last.ckpt, if any, keeps earlier "
                f"finite ones); {self._lr_hint()}"
            )

    def elapsed_wall_seconds(self) -> float | None:
        """The fit's wall-clock time so far, earlier sessions of a resumed run included; None
        where an earlier session's is unknown."""
        if self.wall_seconds is None:
            return None
        now = time.perf_counter() - self.wall_start if self.wall_start is not None else 0.0
        return self.wall_seconds + now

    # -- validation: fixed images, fixed noise, fixed time grid ---------------------------
    def eval_net(self, use_ema: bool | None = None) -> nn.Module:
        """The EMA copy or the trained net (None: as the run's `eval.use_ema`)."""
        return self.ema if (self.cfg.eval.use_ema if use_ema is None else use_ema) else self.net

    @torch.no_grad()
    def validation_metrics(self, loader) -> dict[str, float]:
        """Val loss per noise level and its mean, on the fixed validation images."""
        sums, count = None, 0
        for batch_idx, (x, y) in enumerate(loader):
            x, y = x.to(self.device), y.to(self.device)
            levels = {"levels": self.cfg.eval.val_levels} if self.cfg.eval.val_levels else {}
            out = self.objective.val_loss(
                self.eval_net(), x, Cond(labels=y), seed=VAL_NOISE_SEED + batch_idx, **levels
            )
            per_level = out["per_level"].double() * x.shape[0]  # (L,), weighted by batch size
            sums = per_level if sums is None else sums + per_level
            count += x.shape[0]
        per_level = (sums / count).tolist()
        metrics = {"val/loss": sum(per_level) / len(per_level)}
        metrics.update({f"val/loss_l{i}": v for i, v in enumerate(per_level)})
        return metrics

    def val_protocol(self) -> dict:
        return val_protocol(self.objective)

    def _check_val_protocol(self, checkpoint) -> None:
        # A checkpoint without a protocol is of a version that drew the noise in batches of
        # train.batch_size and took DDPM's grid from both ends (flow at batch 32: the same)
        old = {"val_batch": self.cfg.train.batch_size, "val_grid": None}
        old.update(checkpoint.get("val_protocol", {}))
        now = self.val_protocol()
        # a checkpoint before any validation (an empty last_val) leaves no val loss behind
        if old == now or not checkpoint.get("last_val", True):
            return
        step = self.val_protocol_changed_at = checkpoint.get("global_step")
        self.last_val = {}  # of the old protocol: a resume at the last step validates again
        if self.global_rank == 0:
            what = {"val_batch": "validation noise in batches of", "val_grid": "val_grid"}
            changes = "; ".join(
                f"{what[k]} {old[k] or 'none'}, now {now[k] or 'none'}"
                for k in what
                if old[k] != now[k]
            )
            print(
                f"[dit-bench] the val loss's protocol changed at step {step} (the checkpoint "
                f"is of another version: {changes}): metrics.csv's val losses up to step "
                f"{step} measure another quantity than those after it (summary.json's "
                "val_protocol_changed_at); for one protocol throughout, train the run again "
                "from its start",
                file=sys.stderr,
            )

    # -- bookkeeping carried through checkpoints -------------------------------------------
    def on_save_checkpoint(self, checkpoint) -> None:
        self.check_finite_weights(checkpoint.get("state_dict", {}))
        checkpoint["train_seconds"] = self.train_seconds
        checkpoint["data_seconds"] = self.data_seconds
        checkpoint["steady"] = (self.steady_seconds, self.steady_steps, self.steady_known)
        checkpoint["devices"] = list(self.devices)
        checkpoint["last_train_loss"] = self.last_train_loss  # the progress bar's, on resume
        checkpoint["wall_seconds"] = self.elapsed_wall_seconds()
        checkpoint["loss_window"] = (self._loss_sum.item(), self._loss_count)
        checkpoint["config_hash"] = self.cfg.hash
        # a folder's labels are its sorted class folders: the config cannot tell them apart
        checkpoint["class_names"] = list(self.info.class_names)
        # a run stopped after its final checkpoint takes its FD and its last validation from
        # here (it validates again only if the checkpoint came first); a resumed run's
        # progress lines show the last val loss
        checkpoint["last_fd"] = dict(self.last_fd)
        checkpoint["last_val"] = dict(self.last_val)
        checkpoint["val_protocol"] = self.val_protocol()
        checkpoint["val_protocol_changed_at"] = self.val_protocol_changed_at

    def on_load_checkpoint(self, checkpoint) -> None:
        if checkpoint.get("config_hash") not in (None, self.cfg.hash):
            raise ValueError(
                f"checkpoint was written by config {checkpoint['config_hash']}, "
                f"not {self.cfg.hash}: refusing to resume a different experiment"
            )
        check_class_names(checkpoint, self.info, "the checkpoint")
        self.train_seconds = checkpoint.get("train_seconds", 0.0)
        self.data_seconds = checkpoint.get("data_seconds", 0.0)
        # an older checkpoint has no steady count: its train_seconds are not all warm-up
        before = (0.0, 0, not checkpoint.get("train_seconds"))
        seconds, steps, *known = checkpoint.get("steady", before)
        self.steady_seconds, self.steady_steps = seconds, steps
        self.steady_known = known[0] if known else True
        self.devices = list(checkpoint.get("devices", []))  # older checkpoints: unknown
        self.last_train_loss = checkpoint.get("last_train_loss")
        self.last_val = dict(checkpoint.get("last_val", {}))
        # an older checkpoint has no wall clock: its sessions' time is unknown, and this
        # session's alone would read as the whole fit's (less than its train_seconds)
        self.wall_seconds = checkpoint.get(
            "wall_seconds", None if checkpoint.get("train_seconds") else 0.0
        )
        total, count = checkpoint.get("loss_window", (0.0, 0))
        self._loss_sum = torch.tensor(total, dtype=torch.float64, device=self.device)
        self._loss_count = count
        self.last_fd = checkpoint.get("last_fd", {})
        self.val_protocol_changed_at = checkpoint.get("val_protocol_changed_at")
        self._check_val_protocol(checkpoint)


def non_finite(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of `state_dict` that hold a NaN or an inf
    (one device read for them all)."""
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point()}
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(v).all() for v in floats.values()]).cpu().tolist()
    return [k for k, ok in zip(floats, finite, strict=True) if not ok]


def images_seen(cfg) -> int:
    return cfg.train.steps * cfg.train.batch_size


def training_flops(forward_flops_per_image: int, n_images: int) -> int:
    """3 x forward FLOPs per image (forward + backward), as DiT and the scaling-law papers."""
    return 3 * forward_flops_per_image * n_images
