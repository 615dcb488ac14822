"""Typed, strict experiment configuration.

One frozen, keyword-only model per concern (data, backbone, objective, optim, train, eval),
composed into `ExperimentConfig`. YAML goes in through `load_config`, `--set key=value`
overrides are applied on the raw mapping and validated exactly like the file, and the resolved
config is what gets written to the run directory and hashed.

Every problem is reported before training starts, as one `ConfigError` whose lines name the
dotted key and what is allowed: unknown keys, wrong types, unknown registry names, and
impossible combinations (a patch size that does not divide the image, heads that do not divide
the width).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import operator
import os
import re
import sys
import textwrap
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from dit_bench.errors import (  # noqa: F401 (defined there, without torch: the CLI's `report`)
    USER_ERRORS,
    ConfigError,
    OutOfMemory,
    Terminated,
    raise_terminated,
)
from dit_bench.files import NAME_MAX, windows_name_error
from dit_bench.objectives import OBJECTIVES
from dit_bench.sampling import SAMPLERS


def _leaf_types(annotation: Any) -> set[Any]:
    args = get_args(annotation)
    return set().union(*map(_leaf_types, args)) if args else {annotation}


class _Strict(BaseModel):
    # Lax mode: YAML's `1.0e+5` may set an int field. But lax mode also reads `true` as 1 and
    # 1 as true, so a boolean given for a number, or a number for a boolean, is refused below. `.inf` passes `gt=0`: refused too.
    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=False, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
        values = value if isinstance(value, list | tuple) else [value]
        if bool not in leaves and leaves & {int, float} and any(type(v) is bool for v in values):
            raise ValueError(f"expected a number, got {value!r}")
        # and the other way: lax mode reads 1, 0, "yes" or "off" as booleans
        if (
            leaves
            and leaves <= {bool, type(None)}
            and any(type(v) not in (bool, type(None)) for v in values)
        ):
            raise ValueError(f"expected true or false, got {value!r}")
        return value


ConfigStrict = _Strict  # the sweep file's schema follows the same rules


class DataConfig(_Strict):
    name: Literal["mnist", "digits", "shapes", "folder", "latents"] = "mnist"
    image_size: int | None = Field(None, gt=0, description="None: the data set's native size")
    root: str | None = Field(None, description="image folder (folder) or shard folder (latents)")
    vae: str | None = Field(None, description="local diffusers VAE folder to decode latents")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(
        0, ge=0, lt=2**32, description="fixed train/val split, independent of the run seed"
    )
    split_by: Literal["position", "name"] = Field(
        "position",
        description="folder data: 'name' splits by a hash of each file's path, so files added "
        "to the folder leave the others where they were; 'position' (a permutation of the "
        "listing) reshuffles on any change",
    )
    num_samples: int = Field(20000, gt=0, description="size of the procedural `shapes` set")
    max_samples: int | None = Field(None, gt=0, description="cap on the training set size")
    num_workers: int = Field(0, ge=0)

    @field_validator("root", "vae")
    @classmethod
    def _home(cls, path: str | None) -> str | None:
        # `--set data.root=~/x` reaches us unexpanded: the shell expands ~ only at a word's start.
        # The path is hashed: `imgs/` (a shell's tab completion), `./imgs` and `imgs` name one
        # folder and must name one run. pathlib drops those spellings but keeps `..` (through a
        # symbolic link, a/../b need not be b) and a relative path relative.
        if path is not None and not path.strip():
            # `--set data.root=$ROOT` with ROOT unset: refused here, not as "folder '' does not
            # exist" once the data loads
            raise ValueError("an empty path; give a folder, or null for none")
        return path if not path else str(Path(os.path.expanduser(path)))

    @model_validator(mode="after")
    def _needs_root(self) -> DataConfig:
        if self.name == "folder" and (self.root is None or self.image_size is None):
            raise ValueError("data.name=folder needs data.root and data.image_size")
        if self.name == "latents" and self.root is None:
            raise ValueError("data.name=latents needs data.root (an encode-latents folder)")
        # A key the data set never reads would still change the hash: the same training in
        # another run directory, and a reader who thinks it mattered.
        for key, names in DATA_KEY_USERS.items():
            if (
                self.name not in names
                and getattr(self, key) != type(self).model_fields[key].default
            ):
                raise ValueError(
                    f"data.{key} applies to data.name={'|'.join(names)} only, not {self.name}; "
                    "remove it"
                )
        return self


# Which data sets read the keys that only some do.
DATA_KEY_USERS = {
    "root": ("folder", "latents"),
    "vae": ("latents",),
    "num_samples": ("shapes",),
    "split_by": ("folder",),
}


class BackboneConfig(_Strict):
    name: str = Field("dit-ti/4", description="a preset from `dit-bench info --list`")
    conditioning: str = Field(
        "adaln_zero",
        description="conditioning scheme, one the family implements (`dit-bench info --list`; "
        "dit adaln_zero|adaln|cross_attn|in_context, mmdit joint_attn, unet adagn, uvit "
        "in_context). Left out: the family's own (the first), written into the resolved config",
    )
    learn_sigma: bool = False
    # Optional overrides of the preset, the axes of a size sweep; None keeps the preset's value.
    depth: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    patch_size: int | None = Field(None, gt=0)
    qk_norm: bool | None = Field(None, description="MMDiT: RMSNorm on queries and keys (SD3)")

    @model_validator(mode="before")
    @classmethod
    def _family_default_conditioning(cls, data: Any) -> Any:
        # A U-Net or U-ViT preset named without a scheme gets its family's own, recorded
        # explicitly, so `--set backbone.name=unet-xs` alone is a valid config.
        if isinstance(data, dict) and "conditioning" not in data:
            from dit_bench.backbones import default_conditioning

            native = default_conditioning(data.get("name", "dit-ti/4"))
            if native is not None:
                data = {**data, "conditioning": native}
        return data

    def spec(self) -> dict:
        """The preset with this config's overrides: every size the net is built with (the
        config's own fields are None where the preset decides). Raises ValueError as
        `resolve_preset`."""
        from dit_bench.backbones import OVERRIDE_KEYS, resolve_preset

        return resolve_preset(self.name, **{k: getattr(self, k) for k in OVERRIDE_KEYS})


class DDPMConfig(_Strict):
    """DDPM (Ho et al. 2020; iDDPM; DiT). backbone.learn_sigma adds the hybrid VLB loss."""

    name: Literal["ddpm"] = "ddpm"
    schedule: Literal["linear", "cosine"] = Field("linear", description="DiT: linear")
    prediction: Literal["eps", "v"] = Field("eps", description="eps, or v (Salimans & Ho 2022)")
    num_timesteps: int = Field(1000, gt=1)

    @model_validator(mode="after")
    def _schedule_fits(self) -> DDPMConfig:
        # improved-diffusion scales the linear betas by 1000 / T: beta_T = 20 / T reaches 1 at
        # T = 20 and alpha_bar hits 0 (every loss NaN); the cosine schedule clips at 0.999
        if self.schedule == "linear" and self.num_timesteps <= 20:
            raise ValueError(
                f"objective.num_timesteps={self.num_timesteps}: the linear schedule needs more "
                "than 20 (its last beta, 0.02 * 1000 / T, must stay below 1); or schedule: cosine"
            )
        return self


class FlowConfig(_Strict):
    """Rectified flow as SD3: x_t = (1 - t) x0 + t noise, velocity target noise - x0."""

    name: Literal["flow"] = "flow"
    prediction: Literal["velocity", "x0"] = Field("velocity", description="the net's target")
    density: Literal["uniform", "logit_normal", "mode"] = Field(
        "logit_normal", description="training time density (SD3 §3.1)"
    )
    logit_mean: float = Field(0.0, description="m of density=logit_normal (SD3: 0)")
    logit_std: float = Field(1.0, gt=0, description="s of density=logit_normal (SD3: 1)")
    mode_scale: float = Field(
        1.29, ge=-1.0, le=2.0 / (3.141592653589793 - 2.0), description="s of density=mode"
    )
    # Bounded well inside where the float arithmetic of t' holds: below ~1e-45, a t is 0 in
    # float32 (t' = 0 / 0 at t = 1); above ~3e38, a t overflows the float32 training times
    # (every loss NaN at step 1). Resolution shifts (SD3: 3) are far inside.
    shift: float = Field(
        1.0,
        ge=1e-6,
        le=1e6,
        description="SD3 time shift t' = a t / (1 + (a - 1) t), training and sampling",
    )

    @model_validator(mode="after")
    def _density_params(self) -> FlowConfig:
        # a parameter of another density would be silently ignored: refuse it
        unused = {
            "logit_mean": (self.logit_mean != 0.0, "logit_normal"),
            "logit_std": (self.logit_std != 1.0, "logit_normal"),
            "mode_scale": (self.mode_scale != 1.29, "mode"),
        }
        for key, (changed, density) in unused.items():
            if changed and self.density != density:
                raise ValueError(
                    f"objective.{key} applies to objective.density={density} only "
                    f"(density is {self.density!r})"
                )
        return self


def _objective_tag(v: Any) -> str | None:
    # `name` may be left out: the default objective is ddpm
    return v.get("name", "ddpm") if isinstance(v, dict) else getattr(v, "name", None)


# objective.name -> its config, whose fields are the objective's keyword arguments. A new
# objective is its file and its line in objectives.OBJECTIVES, plus its config class and its
# line here: the `objective` union, its error message and the key checks read this dict.
OBJECTIVE_CONFIGS = {"ddpm": DDPMConfig, "flow": FlowConfig}


def objective_registry_errors(configs: dict[str, type], objectives: dict[str, type]) -> list[str]:
    """Where the two objective registries disagree ([]: nowhere). An objective with a line in
    OBJECTIVES only was refused as `objective.name must be one of` the others, as if unknown;
    a config field its constructor does not take failed at the run's start."""
    errors = [
        f"objective {n!r} is in objectives.OBJECTIVES but has no config class in "
        "config.OBJECTIVE_CONFIGS (whose fields are its keyword arguments)"
        for n in objectives
        if n not in configs
    ]
    errors += [
        f"objective {n!r} is in config.OBJECTIVE_CONFIGS but not in objectives.OBJECTIVES"
        for n in configs
        if n not in objectives
    ]
    for n in set(configs) & set(objectives):
        takes = inspect.signature(objectives[n]).parameters
        if any(p.kind is p.VAR_KEYWORD for p in takes.values()):
            continue
        extra = [f for f in configs[n].model_fields if f != "name" and f not in takes]
        if extra:
            errors.append(
                f"objective {n!r}: config fields {', '.join(extra)} of "
                f"{configs[n].__name__} are not keyword arguments of {objectives[n].__name__}"
            )
    return errors


if _errors := objective_registry_errors(OBJECTIVE_CONFIGS, OBJECTIVES):
    raise ImportError("; ".join(_errors))
ObjectiveConfig = Annotated[
    functools.reduce(operator.or_, (Annotated[c, Tag(n)] for n, c in OBJECTIVE_CONFIGS.items())),
    Discriminator(
        _objective_tag,
        custom_error_type="objective_name",
        custom_error_message="objective.name must be one of "
        + ", ".join(map(repr, OBJECTIVE_CONFIGS))
        + " (objective is a section: --set objective.name=flow, or objective: {name: flow} in "
        "a file)",
    ),
]


class OptimConfig(_Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW's decoupled decay, on every trained parameter (biases, norms and "
        "the label table too: one parameter group)",
    )
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    grad_clip: float | None = Field(1.0, gt=0, description="max grad norm; null disables")
    ema_decay: float = Field(
        0.9999,
        ge=0,
        lt=1,
        description="EMA decay, warmed up as min(ema_decay, (1 + step) / (10 + step)) "
        "(TensorFlow's num_updates rule; DiT keeps 0.9999 from step 0)",
    )
    warmup_steps: int = Field(
        0, ge=0, description="linear lr warm-up: step k runs at lr min(1, k / warmup_steps)"
    )
    fused: bool | None = Field(
        None,
        description="fused AdamW (one kernel updates every parameter); null: on when training "
        "on CUDA or the CPU. Same update as the unfused loop up to float rounding",
    )

    @model_validator(mode="after")
    def _decay_below_one(self) -> OptimConfig:
        # AdamW's decoupled decay multiplies every weight by 1 - lr * weight_decay each step:
        # at 1 or more the weights are zeroed or flip sign and grow (NaN validation and samples
        # after two steps, while the training loss still read finite)
        if self.lr * self.weight_decay >= 1:
            raise ValueError(
                f"optim.weight_decay={self.weight_decay:g} with optim.lr={self.lr:g}: AdamW "
                f"multiplies every weight by 1 - lr x weight_decay = "
                f"{1 - self.lr * self.weight_decay:g} each step; lr x weight_decay must be "
                f"below 1 (weight_decay < {1 / self.lr:g} at this lr)"
            )
        return self


# train.loggers' trackers -> the package each needs (tensorboard: torch's SummaryWriter writes
# with it, and it is the viewer) and the pip extra that installs it
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_installed(names: Sequence[str]) -> None:
    """Refuse, in one line naming the pip extra, a tracker whose package is not installed:
    before any data is read or step trained, not with Lightning's error at the Trainer. Here,
    not in train.trackers: a sweep's parent checks before its workers start, without Lightning."""
    for name in names:
        package, extra = TRACKER_PACKAGES[name]
        try:
            importlib.import_module(package)
        except ImportError:
            raise ConfigError(
                f"train.loggers: {name} needs the {package} package, not installed here: "
                f"pip install 'dit-bench[{extra}]' (or pip install {package})"
            ) from None


class TrainConfig(_Strict):
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(64, gt=0)
    label_dropout: float = Field(0.1, ge=0, lt=1, description="classifier-free guidance dropout")
    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="auto: a CUDA GPU when torch sees one, else the CPU (not Apple's MPS: "
        "nothing here is built for it); gpu: CUDA, refused without one",
    )
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    bf16_stream: bool = Field(
        False,
        description="with precision=bf16-mixed, transformers only: the residual stream kept in "
        "bf16 between blocks (Megatron-LM's default) instead of float32, halving the bytes of "
        "every LayerNorm, modulate and residual kernel; the adds round to bf16 (hashed)",
    )
    # Scale-out (Lightning strategies). batch_size is the GLOBAL batch, split across ranks, and
    # every random draw is per sample: the numbers do not depend on how many devices ran them.
    devices: int = Field(1, gt=0, description="devices per node")
    num_nodes: int = Field(1, gt=0)
    accumulate_grad_batches: int = Field(
        1,
        gt=0,
        description="gradient accumulation: each optimiser step sums the gradients of this "
        "many micro-batches per process (Lightning's name), each of train.batch_size / "
        "(processes x this) images; train.batch_size stays the global batch of one step, and "
        "the numbers do not depend on it",
    )
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    log_every: int = Field(25, gt=0)
    val_every: int = Field(500, gt=0)
    sample_every: int = Field(0, ge=0, description="sample grid every N steps; 0: only at the end")
    checkpoint_every: int = Field(250, gt=0, description="last.ckpt refresh (resume point)")
    keep_every: int = Field(0, ge=0, description="also keep step-N checkpoints; 0: never")
    threads: int | None = Field(None, gt=0, description="torch CPU threads; None: torch default")
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = Field(
        (),
        description="experiment trackers fed beside metrics.csv (always written): the same "
        "numbers at the same steps, the config and the sample grids; tensorboard into "
        "RUN_DIR/tensorboard/, wandb (project $WANDB_PROJECT or dit-bench, offline with "
        "WANDB_MODE=offline) into RUN_DIR/wandb/; each needs the pip extra of its name",
    )
    # Fast paths: each computes what the plain path computes, up to float rounding (tested in
    # tests/test_fast_paths.py); they say how a run executes, so they are left out of the hash.
    compile: bool = Field(
        False,
        description="torch.compile the backbone (not the LightningModule; the EMA copy stays "
        "eager); transformer blocks are compiled one by one, identical ones sharing a graph "
        "(regional compilation; the U-Net is compiled whole)",
    )
    cudagraphs: bool = Field(
        False,
        description="with train.compile on a CUDA device: each compiled graph replayed as a "
        "CUDA graph (torch.compile mode 'reduce-overhead'), without a launch per kernel; pays "
        "where the host cannot keep the GPU busy: a compiled bf16 step (batch 64) on an H100 "
        "1.8x faster for DiT-S/2, 1.2x for DiT-B/2, 1.01-1.07x for DiT-XL/2 (README, "
        "Performance)",
    )
    activation_checkpointing: bool = Field(
        False,
        description="each backbone block's activations recomputed in the backward instead of "
        "kept from the forward (torch.utils.checkpoint): the backward holds the blocks' inputs "
        "and one block's activations at a time, for a second forward of the blocks (up to a "
        "third more compute); DiT-XL/2 at batch 256, bf16: about 25 GiB instead of 109 (README, "
        "Performance)",
    )
    activation_checkpointing_every: int = Field(
        1,
        ge=1,
        description="with train.activation_checkpointing: every k-th block checkpointed "
        "(blocks 0, k, 2k, ...), the others keep their activations: in a stack of equal blocks "
        "(DiT, MMDiT) about 1/k of the recomputation for about 1/k of the saving (2: half of "
        "each)",
    )
    channels_last: bool = Field(
        False, description="channels-last memory format for the backbone and its inputs (U-Net)"
    )
    tf32: bool = Field(
        True,
        description="on GPU, float32 matmuls and convolutions in TF32 (Ampere+ tensor cores): "
        "a 32-true run's training, every run's validation, grids and FD; no effect on the CPU "
        "or on bf16 matmuls; hashed when false with 32-true only",
    )

    @field_validator("loggers", mode="before")
    @classmethod
    def _tracker_names(cls, value: Any) -> Any:
        # `--set train.loggers=tensorboard` (or `=tensorboard,wandb`) reaches us as one string;
        # `train.loggers=` and `=null` turn the trackers off, as `=[]` does
        if value is None:
            return ()
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        if isinstance(value, list | tuple):
            twice = sorted({v for v in value if isinstance(v, Hashable) and value.count(v) > 1})
            if twice:
                raise ValueError(f"{', '.join(map(str, twice))} given more than once")
        return value

    @model_validator(mode="after")
    def _fast_paths(self) -> TrainConfig:
        if self.bf16_stream and self.precision != "bf16-mixed":
            raise ValueError(
                f"train.bf16_stream needs train.precision=bf16-mixed (got {self.precision!r})"
            )
        if self.cudagraphs and not self.compile:
            raise ValueError(
                "train.cudagraphs replays compiled graphs: it needs train.compile=true"
            )
        if self.cudagraphs and self.accelerator == "cpu":
            raise ValueError("train.cudagraphs needs a CUDA device; train.accelerator is 'cpu'")
        if self.strategy == "fsdp" and self.accelerator == "cpu":
            raise ValueError(
                "train.strategy=fsdp needs a CUDA device (Lightning and torch's FSDP refuse the "
                "CPU); train.accelerator is 'cpu': use train.strategy=ddp (several processes) "
                "or auto"
            )
        if self.cudagraphs and self.strategy == "fsdp":
            raise ValueError(
                "train.cudagraphs with train.strategy=fsdp: FSDP gathers and frees the "
                "parameters every step, and a CUDA graph replays fixed addresses (use ddp)"
            )
        if self.activation_checkpointing_every != 1 and not self.activation_checkpointing:
            raise ValueError(
                "train.activation_checkpointing_every="
                f"{self.activation_checkpointing_every} needs train.activation_checkpointing=true"
                " (in a sweep, set both on the size choices that checkpoint)"
            )
        if self.cudagraphs and self.accumulate_grad_batches > 1:
            raise ValueError(
                f"train.cudagraphs with train.accumulate_grad_batches="
                f"{self.accumulate_grad_batches}: each training step drops the gradients "
                "before replaying the graphs (their memory is the graphs' pool), which would "
                "throw away the micro-batches accumulated so far; use "
                "train.accumulate_grad_batches=1 or train.cudagraphs=false (in a sweep whose "
                "size choices set train.cudagraphs, as the shipped gpu profile's S and B do, "
                "a choice's key wins over --set: take it out of those choices in the file)"
            )
        if self.cudagraphs and self.activation_checkpointing:
            raise ValueError(
                "train.cudagraphs with train.activation_checkpointing: not verified on a GPU "
                "(a checkpointed block recomputes its forward inside its compiled backward "
                "graph, which the graphs would replay); and where checkpointing is needed "
                "(DiT-XL/2) CUDA graphs gain 1-7%: turn one of them off"
            )
        return self


class EvalConfig(_Strict):
    val_images: int = Field(
        256,
        gt=0,
        description="fixed validation images for val loss (at most the validation split's size)",
    )
    val_levels: int | None = Field(
        None,
        gt=1,
        description="noise levels of the val-loss grid; None: the objective's own "
        "(ddpm 10, the midpoints t = 50, 150, ..., 950 of 0..999; flow SD3's 8 levels "
        "t = k/8 without t = 1)",
    )
    # the registry's names: a sampler added to SAMPLERS is a valid eval.sampler as it is a
    # valid `sample --sampler`
    sampler: Literal[tuple(SAMPLERS)] = "ddpm"
    sample_steps: int = Field(50, gt=0)
    eta: float = Field(0.0, ge=0, le=1, description="sampler=ddim: 0 deterministic, 1 ancestral")
    sde_scale: float = Field(
        1.0,
        ge=0,
        description="sampler=euler_maruyama: diffusion w(t) = sde_scale * t (SiT's default "
        "sampler, diffusion_norm 1: 2)",
    )
    cfg_scale: float = Field(1.5, ge=0)
    cfg_interval: tuple[float, float] | None = Field(
        None,
        description="guide only for net timesteps in [lo, hi] (flow 0..1000, DDPM 0..T-1); "
        "null: always",
    )
    cfg_channels: int | None = Field(
        None, gt=0, description="guide the first k channels only (DiT's code: 3); null: all"
    )
    clip_x0: bool = Field(False, description="clamp the predicted x0 to [-1, 1] while sampling")
    samples_per_class: int = Field(
        8,
        gt=0,
        description="sample grids: one row per class (every class up to 32, else 32 spread "
        "evenly from the first to the last), this many samples a row",
    )
    use_ema: bool = True
    fd_every: int = Field(
        0,
        ge=0,
        description="in-training FD of samples vs the held-out split every N steps (and at the "
        "end), logged beside the val loss as val/FD-<features>; 0: never",
    )
    fd_samples: int = Field(
        256, gt=1, description="samples per in-training FD (class-balanced, one seed per sample)"
    )
    fd_features: Literal["mnist-net", "digits-net", "shapes-net", "inception"] | None = Field(
        None,
        description="feature net of the in-training FD; null: the data set's own small net "
        "(inception for folder data)",
    )

    @model_validator(mode="after")
    def _sampler_options(self) -> EvalConfig:
        if self.eta != 0.0 and self.sampler != "ddim":
            raise ValueError(f"eval.eta applies to eval.sampler=ddim only (got {self.sampler})")
        if self.sde_scale != 1.0 and self.sampler != "euler_maruyama":
            raise ValueError(
                f"eval.sde_scale applies to eval.sampler=euler_maruyama only (got {self.sampler})"
            )
        unguided = [k for k in ("cfg_interval", "cfg_channels") if getattr(self, k) is not None]
        if unguided and self.cfg_scale == 1.0:
            raise ValueError(f"eval.{unguided[0]} applies to guided sampling (eval.cfg_scale != 1)")
        return self  # cfg_interval's range is the objective's: ExperimentConfig checks it


EXPERIMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # ExperimentConfig.experiment


class ExperimentConfig(_Strict):
    # A leading letter or digit: "." or ".." would put the runs beside or above --out. A
    # folder of --out, so at most a file name's 255 bytes (characters, in ASCII).
    experiment: str = Field("default", pattern=f"^{EXPERIMENT.pattern}$", max_length=NAME_MAX)
    seed: int = Field(0, ge=0, lt=2**32, description="numpy's and Lightning's seed range")
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    objective: ObjectiveConfig = DDPMConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _combinations(self, info: ValidationInfo) -> ExperimentConfig:
        # Imported here: the config module must stay importable without building any model.
        from dit_bench.backbones import CONDITIONINGS, FAMILIES, PRESETS, geometry_errors
        from dit_bench.data import data_info

        b = self.backbone
        try:
            spec = b.spec()
        except ValueError as e:  # unknown name, or an override the family does not have
            key = "backbone.name: " if b.name not in PRESETS else "backbone."
            raise ValueError(f"{key}{e}") from None
        allowed = CONDITIONINGS[spec["family"]]
        if b.conditioning not in allowed:
            raise ValueError(
                f"backbone.conditioning={b.conditioning!r} is not implemented for "
                f"{spec['family']!r}; allowed: {', '.join(allowed)}"
            )
        # Geometry is the family's business (patches and heads for transformers, downsampling
        # and GroupNorm widths for the U-Net); its messages name the backbone.* keys.
        image_size = self.data.image_size or data_info(self.data).image_size
        errors = geometry_errors(spec, image_size, prefix="backbone.")
        if errors:
            raise ValueError("; ".join(errors))
        if self.backbone.learn_sigma and self.objective.name == "flow":
            raise ValueError(
                "backbone.learn_sigma=true needs objective.name=ddpm (flow matching has no "
                "variance to learn)"
            )
        steps = getattr(self.objective, "num_timesteps", None)
        for key in ("sample_steps", "val_levels"):
            value = getattr(self.eval, key)
            if steps is not None and value is not None and value > steps:
                raise ValueError(
                    f"eval.{key}={value}: DDPM has objective.num_timesteps={steps} steps"
                )
        if steps is not None and self.eval.val_levels is None:
            from dit_bench.objectives.ddpm import DDPM

            if steps < DDPM.VAL_LEVELS:  # the default grid would fail at the first validation
                raise ValueError(
                    f"objective.num_timesteps={steps}: the validation grid has "
                    f"{DDPM.VAL_LEVELS} levels by default; set eval.val_levels to at most {steps}"
                )
        interval = self.eval.cfg_interval
        # net timesteps: flow's 1000 t, DDPM's steps 0..T-1 (T may exceed 1000: iDDPM's 4000)
        top = 1000 if steps is None else max(1000, steps - 1)
        if interval is not None and not 0 <= interval[0] <= interval[1] <= top:
            raise ValueError(f"eval.cfg_interval must be [lo, hi] with 0 <= lo <= hi <= {top}")
        # sampling guides where lo <= t <= hi and DDPM's net sees t in 0..T-1: the interval
        # is empty only when it starts past T-1 (a hi beyond T-1 just covers the top steps)
        if steps is not None and interval is not None and interval[0] > steps - 1:
            raise ValueError(
                f"eval.cfg_interval=[{interval[0]:g}, {interval[1]:g}]: DDPM's net timesteps "
                f"run 0..{steps - 1} (objective.num_timesteps={steps}); an interval starting "
                f"at {interval[0]:g} would guide nothing"
            )
        if steps is not None and self.eval.sample_steps < 2:
            raise ValueError(
                "eval.sample_steps=1: a DDPM chain respaced to one step keeps only t = 0, and the "
                "net would denoise pure noise labelled as nearly clean; use 2 or more"
            )
        # a run made before this refusal (stored: its config.yaml) still opens: `sample` and
        # `eval` check the interval against the grid they are asked to sample with
        stored = bool(info.context and info.context.get("stored"))
        if not stored and (why := windows_name_error(self.experiment)):
            raise ValueError(f"experiment={self.experiment}: the runs' folder {why}")
        if interval is not None and self.eval.cfg_scale != 1.0 and not stored:
            # [lo, hi] between two levels of the grids' and FD's sampling (DDPM's 50 steps skip
            # t = 500; flow's grid never reaches t = 0) left every one of them unguided
            from dit_bench.sampling import interval_error

            grid = self.sampling_timesteps()
            if grid is not None and (problem := interval_error(grid, interval)):
                raise ValueError(f"eval.cfg_interval={problem}")
        if problem := self.guidance_error(self.eval.cfg_scale):
            raise ValueError(f"eval.{problem}; set eval.cfg_scale=1 or a label_dropout > 0")
        if self.eval.fd_every and self.data.name == "latents" and not self.data.vae:
            raise ValueError(
                "eval.fd_every on latents needs data.vae: the samples are scored as images "
                "decoded by the VAE the latents were encoded with"
            )
        ranks = self.train.devices * self.train.num_nodes
        micro = self.train.accumulate_grad_batches
        if self.train.batch_size % (ranks * micro):
            raise ValueError(batch_split_error(self.train.batch_size, ranks, micro))
        if self.eval.cfg_channels is not None:
            channels = data_info(self.data).channels
            if self.eval.cfg_channels > channels:
                raise ValueError(
                    f"eval.cfg_channels={self.eval.cfg_channels}: the data has {channels} "
                    "channel(s)"
                )
        if self.train.cudagraphs and not self.eval.use_ema:
            raise ValueError(
                "train.cudagraphs with eval.use_ema=false: validation and samples would replay "
                "the trained net's CUDA graphs, whose outputs each next call overwrites; keep "
                "eval.use_ema=true (the EMA copy they use stays eager)"
            )
        if self.train.bf16_stream and not FAMILIES[spec["family"]].token_stream:
            streams = [k for k, f in FAMILIES.items() if f.token_stream]
            raise ValueError(
                f"train.bf16_stream applies to transformers ({', '.join(streams)}); "
                f"backbone.name={b.name!r} is a {spec['family']}"
            )
        return self

    # -- derived values (properties, so the recorded config is exactly what ran) -------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self, describe: bool = False) -> str:
        """The resolved config as YAML; `describe`: each key with its description and allowed
        values as comments (`show-config --describe`), read back by `load_config` as is."""
        if describe:
            return "".join(_described_lines(self, self.to_dict()))
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    def sampling_timesteps(self, steps: int | None = None):
        """The net timesteps of the objective's sampling grid at `steps` (default
        eval.sample_steps): DDPM's respaced steps, flow's shifted 1000 t; None for an objective
        whose grid the config does not know."""
        from dit_bench.objectives.flow import flow_levels
        from dit_bench.sampling import respace

        steps = self.eval.sample_steps if steps is None else steps
        if self.objective.name == "flow":
            return flow_levels(steps, self.objective.shift).timesteps
        T = getattr(self.objective, "num_timesteps", None)  # DDPM's chain; None: not known
        return None if T is None else respace(T, steps)

    def guidance_error(self, cfg_scale: float) -> str | None:
        """Why sampling this run's net with `cfg_scale` would be meaningless, or None: guidance
        contrasts with the null class, which a run without label dropout never trained (the
        config's own scale, and `sample --cfg` / `eval --cfg` on a finished run alike)."""
        if cfg_scale != 1.0 and self.train.label_dropout == 0:
            return (
                f"cfg_scale={cfg_scale} guides against the null class, which "
                "train.label_dropout=0 never trains"
            )
        return None

    @property
    def hash(self) -> str:
        """Short content hash of the resolved config: names the run directory.

        Keys that only say how a run executes (devices, strategy, threads, loader workers,
        the fast paths) are left out: they do not change its numbers, so a run resumes across them.
        One fast path does, beyond rounding: TF32 matmuls (a 10-bit mantissa) in a float32 run
        on a GPU; `train.tf32=false` with `32-true` is hashed (only then, so the runs made with
        the default keep their directories), so a true-float32 run is a run of its own. Not in
        a bf16-mixed run, although its validation, grids and FD are float32 work that TF32
        rounds: hashing it now would leave its runs' directories behind (see the README).
        """
        d = self.to_dict()
        for section, key in EXECUTION_KEYS:
            d[section].pop(key)
        if self.train.tf32 or self.train.precision != "32-true":  # TF32 on, or no fp32 matmuls
            d["train"].pop("tf32")
        for section, key, default in LATER_KEYS:
            if d[section][key] == default:
                d[section].pop(key)
        for section, key, default in HASHED_AS_DEFAULT:
            d[section][key] = default
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def batch_split_error(batch_size: int, ranks: int, micro: int) -> str:
    """Why a global batch of `batch_size` does not split over `ranks` processes of `micro`
    micro-batches each (the config's check, and the data module's against the processes the
    launcher started)."""
    if micro == 1:
        return (
            f"train.batch_size={batch_size} is the global batch: it must split evenly over "
            f"train.devices x train.num_nodes = {ranks} processes"
        )
    parts = ranks * micro
    text = (
        f"train.batch_size={batch_size} is the global batch: it must split evenly over "
        f"train.devices x train.num_nodes = {ranks} process{'es' * (ranks != 1)} x "
        f"train.accumulate_grad_batches = {micro} micro-batches (a multiple of {parts})"
    )
    if batch_size % ranks == 0:
        per = batch_size // ranks
        fits = ", ".join(str(a) for a in range(1, per + 1) if per % a == 0)
        text += f"; accumulate_grad_batches that split {per} a process: {fits}"
    return text


EXECUTION_KEYS = (
    ("train", "devices"),
    ("train", "num_nodes"),
    ("train", "accumulate_grad_batches"),
    ("train", "strategy"),
    ("train", "threads"),
    ("train", "loggers"),
    ("train", "compile"),
    ("train", "cudagraphs"),
    ("train", "activation_checkpointing"),
    ("train", "activation_checkpointing_every"),
    ("train", "channels_last"),
    ("optim", "fused"),
    ("data", "num_workers"),
)
# Execution keys found to be hashed after runs were made: hashed as their default, so a run
# with the default keeps its directory, and one with another value shares it (`accelerator=cpu`
# and `auto` on a CPU machine train the same numbers; a DDP run resumes on one device).
HASHED_AS_DEFAULT = (("train", "accelerator", "auto"),)
# Keys that change the numbers, added after runs were made without them: hashed only when set
# away from their default, so those runs keep their directories (and resume).
LATER_KEYS = (("train", "bf16_stream", False), ("data", "split_by", "position"))


# -- loading ----------------------------------------------------------------------------------
def experiment_error(name: str) -> str | None:
    """Why `name` cannot be an experiment (the folder of --out holding its runs), or None. An
    ablation's or a sweep's is `<name>-<profile>`: checked as the file is read, where each of
    its runs' configs named `experiment`, a key the file never sets."""
    if not EXPERIMENT.fullmatch(name):
        return "may hold only letters, digits, '_', '.' and '-', a letter or digit first"
    if len(name) > NAME_MAX:
        return f"is {len(name)} characters, more than a file name's {NAME_MAX}"
    return windows_name_error(name)


def yaml_kind(value: Any) -> str | None:
    """What YAML made of a name or text written plain (`2024`, `1e-3`, `off`), for a message
    that says to quote it: "number" or "boolean"; None for a string or anything else."""
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, int | float) else None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = e["loc"]
        if loc[:1] == ("objective",) and len(loc) > 1 and loc[1] in OBJECTIVE_CONFIGS:
            loc = loc[:1] + loc[2:]  # drop the union tag: objective.flow.shift -> objective.shift
        key = ".".join(str(p) for p in loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = loc[:-1]
            model = ExperimentConfig
            for p in parent:
                model = model.model_fields[p].annotation
                if p == "objective":
                    model = OBJECTIVE_CONFIGS[e["loc"][1]]
            allowed = ", ".join(model.model_fields)
            msg = f"unknown key; allowed keys here: {allowed}"
        elif e["type"] == "string_type" and (kind := yaml_kind(e["input"])):
            msg = f"got {e['input']!r}, which YAML reads as a {kind}; write it in quotes"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg}"
        elif e["type"] in ("tuple_type", "list_type"):  # `--set k=0.9,0.95`: one string
            msg = f"got {e['input']!r}; {msg}, written as a list: [a, b]"
        elif e["type"] == "missing" and isinstance(loc[-1], int):  # a pair given one value
            key = ".".join(str(p) for p in loc[:-1])
            msg = f"too few values (value {loc[-1] + 1} is missing); written as a list: [a, b]"
        # a check across keys names them in its message (loc: the section, or nothing)
        named = not key or msg.startswith(f"{key}.")
        lines.append(f"  {msg}" if named else f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML: `0.1` is a float, `null` is None)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from None
    return key.split("."), value


# Sections whose `name` picks a type with its own keys (objective: ddpm or flow).
UNION_SECTIONS = ("objective",)


def unknown_key(path: Sequence[str]) -> str | None:
    """Why the dotted key `path` names no config key (naming the keys allowed where it
    stops), or None: checked alone, so an error can be put on the `--set` that wrote it
    rather than on the first config it reached (an ablation's first variant)."""
    models: list[type[BaseModel]] = [ExperimentConfig]
    for depth, part in enumerate(path):
        fields = {f: m.model_fields[f] for m in models for f in m.model_fields}
        if part not in fields:
            where = ".".join(path[:depth]) or "the top level"
            return f"{'.'.join(path)}: unknown key; allowed in {where}: {', '.join(fields)}"
        if part in UNION_SECTIONS and depth == 0:
            models = list(OBJECTIVE_CONFIGS.values())
            continue
        annotation = fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None  # a value (a list, a scalar): what lies below it is the value's
        models = [annotation]
    return None


def section_replacement_error(key: str, value: Any, assign: str = ": ") -> str | None:
    """Why `key: value` among dotted overrides (an ablation variant, a sweep choice, a `--set`:
    `assign` "=") must be refused, or None: a mapping replaces the whole section, the base's
    other keys in it too. Only a section whose name picks its keys (UNION_SECTIONS) is meant
    to be replaced whole."""
    if isinstance(value, dict) and key not in UNION_SECTIONS:
        return (
            f"{key} is given a mapping, which would drop the base's other {key} keys; use one "
            f"dotted key per value (e.g. {key}.{next(iter(value), 'name')}{assign}...)"
        )
    return None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`raw` with each `key=value` set. `objective.name=ddpm` on a flow objective switches
    objectives: the section starts afresh from the new one's defaults (flow's `density` is
    not a DDPM key), and the other objective.* keys given apply on top, in any order.
    `backbone.name=unet-xs` on a DiT config switches families: a conditioning scheme the new
    family lacks gives way to its own, unless `backbone.conditioning` is given too."""
    out = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    parsed = [(item, *parse_override(item)) for item in overrides]
    given = {tuple(path) for _, path, _ in parsed}
    # Only the name that ends up in the config switches: `objective.name=ddpm` then
    # `objective.name=flow` on a flow file reset flow's density and shift to the defaults
    # on the way through DDPM (and `backbone.name=unet-xs` then `dit-s/4` dropped a DiT scheme).
    last = {tuple(path): i for i, (_, path, _) in enumerate(parsed)}
    for i, (_, path, value) in enumerate(parsed):
        if last[tuple(path)] != i:
            continue
        if len(path) == 2 and path[0] in UNION_SECTIONS and path[1] == "name":
            section = out.get(path[0])
            # a section that leaves out `name` has the default one (objective: ddpm)
            if not isinstance(section, dict) or _objective_tag(section) != value:
                out[path[0]] = {"name": value}
        if path == ["backbone", "name"] and ("backbone", "conditioning") not in given:
            section = out.get("backbone")
            if isinstance(section, dict) and "conditioning" in section:
                from dit_bench.backbones import CONDITIONINGS, PRESETS

                family = PRESETS.get(value, {}).get("family") if isinstance(value, str) else None
                if family and section["conditioning"] not in CONDITIONINGS[family]:
                    del section["conditioning"]  # BackboneConfig fills in the family's own
    dotted: dict[str, str] = {}  # section -> the first dotted key given in it
    for item, path, value in parsed:
        # `--set 'train={steps: 5}'` replaced the section: the file's batch_size, val_every,
        # precision ... fell back to the defaults without a word
        if len(path) == 1 and (problem := section_replacement_error(path[0], value, "=")):
            raise ConfigError(f"--set {item!r}: {problem}")
        # the whole objective after one of its keys replaced that key without a word
        # (`objective.shift=3` then `objective={name: flow}` trained shift 1)
        if len(path) == 1 and (before := dotted.get(path[0])):
            raise ConfigError(
                f"--set {item!r} replaces the whole {path[0]} section, dropping the "
                f"{before!r} given before it; give that key after it, or inside it"
            )
        if len(path) > 1:
            dotted.setdefault(path[0], item)
        node = out
        for p in path[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def build_config(
    raw: dict[str, Any] | None = None, overrides: list[str] = (), *, stored: bool = False
) -> ExperimentConfig:
    """`stored`: the config of a run that exists (its config.yaml, a trial's record), which
    skips the refusals of what only a new request can fix (ExperimentConfig._combinations)."""
    raw = apply_overrides(raw or {}, list(overrides))
    try:
        return ExperimentConfig.model_validate(raw, context={"stored": stored})
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last silently:
    a variant or setting written twice would vanish), and reads numbers as YAML 1.2 does:
    `1e3`, `1e-4` and `2.0e3` are floats (PyYAML's 1.1 wants a dot and a signed exponent:
    `train.steps=2.0e3` was the string "2.0e3"), `010` is ten (1.1: octal eight) and `1:30`
    stays a string (1.1: 90, in base 60); and `2024-06-01` is a string, not 1.1's date.

    On libyaml's parser where PyYAML has it (the constructor and resolver stay Python): the
    pure-Python one took 10 ms a run's config.yaml, 1.3 ms in C, and an ablate call of a plan
    whose runs are done reads each run's 3 times (a plan of 500: 15 s of parsing)."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # In place, once a node: its own keys (each once), then those of its `<<` mappings it
        # lacks, the first listed first. PyYAML's own dropped a merged key it had met by the
        # identity of its string, and one-letter strings are shared: in a chain (b: {<<: *a,
        # S: ...}, c: {<<: *b}) c got a's S, not b's; and b, flattened through c's alias before
        # its own turn, read as giving S twice.
        own, merged = [], []
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge":
                own.append((key_node, value_node))
            elif isinstance(value_node, yaml.SequenceNode):
                merged += value_node.value
            else:
                merged.append(value_node)
        seen: set = set()
        for key_node, _ in own:
            if (key := self._key(key_node)) in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        pairs = []
        for source in merged:
            if not isinstance(source, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"expected a mapping or list of mappings to merge, but found {source.id}",
                    source.start_mark,
                )
            self.flatten_mapping(source)
            for key_node, value_node in source.value:
                if (key := self._key(key_node)) not in seen:
                    seen.add(key)
                    pairs.append((key_node, value_node))
        node.value = pairs + own

    def _key(self, key_node: yaml.Node) -> Any:
        key = self.construct_object(key_node)
        if not isinstance(key, Hashable):  # `? [a, b]`: PyYAML's own message
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", None, "found unhashable key", key_node.start_mark
            )
        return key


class _Dumper(yaml.SafeDumper):
    """safe_dump that quotes the strings `_Loader` would read as numbers (`2.0e3`): a run's
    config.yaml reads back as written."""


# YAML 1.2's exponent forms; 1.1's own resolver still reads the signed ones with a dot
_EXPONENT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT, list("-+.0123456789"))


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int | str:
    text = loader.construct_scalar(node)
    if ":" in text:  # YAML 1.1's base 60: kept as written (the type check then names the key)
        return text
    value = text.replace("_", "")
    sign, digits = (-1, value[1:]) if value[0] == "-" else (1, value.lstrip("+"))
    if digits[:2].lower() in ("0x", "0o", "0b"):
        return sign * int(digits, 0)
    return sign * int(digits, 10)  # a leading zero is decimal, not 1.1's octal


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float | str:
    text = loader.construct_scalar(node)
    if ":" in text:  # base 60 again (1:30.0 was 90.0)
        return text
    return loader.construct_yaml_float(node)


# YAML 1.2 has no dates: `experiment: 2024-06-01`, or a folder so named, is the text written
# (1.1 read a date, which no key takes and the overrides' JSON copy failed on as a TypeError)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


# -- show-config --describe -----------------------------------------------------------------
DESCRIBE_WIDTH = 100  # a terminal's columns


def _number(v: Any) -> str:
    # the shortest spelling that is the bound itself: 1e-06, 4294967296, 1.7519383938841089
    return f"{v:g}" if isinstance(v, float) and float(f"{v:g}") == v else repr(v)


def _bound(metadata: Sequence[Any], *kinds: tuple[str, str]) -> tuple[Any, str] | None:
    for attr, bracket in kinds:
        for m in metadata:
            if getattr(m, attr, None) is not None:
                return getattr(m, attr), bracket
    return None


def _bounds(metadata: Sequence[Any]) -> str | None:
    """`> 0`, `[0, 1)`, `matches ^...$` from a field's pydantic / annotated-types metadata."""
    for m in metadata:
        if isinstance(m, FieldInfo):  # a bound inside an annotation: tuple[Annotated[float, ...]]
            return _bounds(m.metadata)
    lower = _bound(metadata, ("gt", "("), ("ge", "["))
    upper = _bound(metadata, ("lt", ")"), ("le", "]"))
    if lower and upper:
        return f"in {lower[1]}{_number(lower[0])}, {_number(upper[0])}{upper[1]}"
    if lower or upper:
        (value, bracket), op = (lower, ">") if lower else (upper, "<")
        return f"{op}{'=' * (bracket in '[]')} {_number(value)}"
    pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
    longest = next((m.max_length for m in metadata if getattr(m, "max_length", None)), None)
    if pattern and longest:
        return f"matches {pattern}, at most {longest} characters"
    return f"matches {pattern}" if pattern else None


def _allowed(annotation: Any, metadata: Sequence[Any]) -> str | None:
    """What a field takes beyond its type, read off its annotation and metadata: a Literal's
    choices (`one of: a, b`), a bound (`> 0`), each element's bound in a tuple; None: no limit."""
    args = get_args(annotation)
    nullable = type(None) in args and get_origin(annotation) is not Literal
    members = [a for a in args if a is not type(None)] if nullable else [annotation]
    if len(members) == 1 and get_origin(members[0]) is Literal:
        choices = [str(c) for c in get_args(members[0])] + ["null"] * nullable
        return "one of: " + ", ".join(choices)
    if len(members) == 1 and get_origin(members[0]) is tuple:
        kinds = get_args(members[0])
        if kinds[1:] == (Ellipsis,) and get_origin(kinds[0]) is Literal:  # a list of names
            return "a list, each one of: " + ", ".join(map(str, get_args(kinds[0])))
        inner = {_bounds(get_args(a)[1:]) for a in kinds}
        text = f"each {inner.pop()}" if len(inner) == 1 and None not in inner else None
    else:
        text = _bounds(metadata)
    return f"{text}, or null" if text and nullable else text


def _flow_lists(dumper: yaml.Dumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


class _OneLineDumper(_Dumper):
    """`betas: [0.9, 0.999]`: a list on its key's line, for the comment beside it."""


_OneLineDumper.add_representer(list, _flow_lists)


def _described_lines(model: BaseModel, values: dict[str, Any], section: str = "") -> list[str]:
    """`values` (`model` dumped) as YAML lines, each key with its field's description and
    allowed values as comments: beside it where the line fits DESCRIBE_WIDTH, else above it."""
    lines = []
    indent = "  " * bool(section)
    for key, value in values.items():
        sub = getattr(model, key)
        if isinstance(sub, BaseModel):
            lines += [f"{key}:\n", *_described_lines(sub, value, key)]
            continue
        field = type(model).model_fields[key]
        if section in UNION_SECTIONS and key == "name":  # the tag: every member's name
            allowed = "one of: " + ", ".join(OBJECTIVE_CONFIGS)
        else:
            allowed = _allowed(field.annotation, field.metadata)
        if (section, key) in EXECUTION_KEYS:
            allowed = f"{allowed} (not hashed)" if allowed else "not hashed"
        text = yaml.dump({key: value}, Dumper=_OneLineDumper, sort_keys=False, width=10**9)
        entry = [indent + line for line in text.splitlines()]
        inline = "; ".join(filter(None, [field.description, allowed]))
        if inline and len(entry) == 1 and len(f"{entry[0]}  # {inline}") <= DESCRIBE_WIDTH:
            lines.append(f"{entry[0]}  # {inline}\n")
            continue
        above = field.description or ""
        if allowed and len(entry) == 1 and len(f"{entry[0]}  # {allowed}") <= DESCRIBE_WIDTH:
            entry[0] += f"  # {allowed}"
        elif allowed:  # a value of several lines takes no comment after its first
            above = f"{above}; {allowed}" if above else allowed
        # a comment block above its key: a blank line sets it apart from the key before
        if above and lines and not lines[-1].endswith(":\n"):
            lines.append("\n")
        width = DESCRIBE_WIDTH - len(indent) - 2
        # unbroken words: `1.01-1.07x` and a pattern read as written
        wrapped = textwrap.wrap(above, width, break_long_words=False, break_on_hyphens=False)
        lines += [f"{indent}# {line}\n" for line in wrapped]
        lines += [line + "\n" for line in entry]
    return lines


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config, ablation or sweep file: a mapping, every key once."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # YAML files are UTF-8 (the YAML spec; the shipped ones hold "§"), not the locale's
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:  # an empty file (or only comments): no keys
        data = {}
    if not isinstance(data, dict):  # `[]`, `0`, `false` too: they read as no keys and trained
        raise ConfigError(f"{path}: top level must be a mapping of config sections")
    return data


# The repository's ablations/, sweeps/ and configs/ travel in the package (dit_bench/shipped/
# links to them; pyproject's package-data): a copy installed with pip has no checkout to run
# the README's `dit-bench ablate ablations/conditioning.yaml` from
SHIPPED = Path(__file__).parent / "shipped"


def shipped_or_given(path: str | Path | None) -> str | Path | None:
    """`path` where it names something; where it does not and is a shipped file's relative
    path (`ablations/conditioning.yaml` from another folder than a checkout's root), the copy
    installed with dit-bench, said on stderr."""
    if path is None or os.path.lexists(path) or Path(path).is_absolute():
        return path
    copy = SHIPPED / path
    if copy.parent.parent != SHIPPED:
        return path
    if copy.parent.is_file():  # a checkout without links (git on Windows, core.symlinks=false)
        # holds the link's target as text there: an editable install reads the folder it names
        copy = (SHIPPED / copy.parent.read_text().strip()).resolve() / copy.name
    if not copy.is_file():
        return path
    print(
        f"[dit-bench] {path}: not in {Path.cwd()}; reading the copy installed with dit-bench, "
        f"{copy} (copy it here to change it)",
        file=sys.stderr,
    )
    return str(copy)


# The default experiment (`dit-bench train` with no file, `make demo`): a class-conditional
# DiT-XS/2 (adaLN-Zero) on the real mnist digits at 16x16, about 6 minutes on a 2-core CPU.
# Flow matching with Euler sampling, because at this budget it draws clean digits where DDPM
# (eps, same net and steps) still draws noisy ones (measured: see the README's demo section).
DEFAULT_EXPERIMENT: dict[str, Any] = {
    "experiment": "mnist-demo",
    "data": {"name": "mnist", "image_size": 16},
    "backbone": {"name": "dit-xs/2", "conditioning": "adaln_zero"},
    "objective": {"name": "flow", "density": "logit_normal"},
    "optim": {"lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999},
    "train": {"steps": 2000, "batch_size": 64, "val_every": 500},
    "eval": {"sampler": "euler", "sample_steps": 50, "cfg_scale": 3.0, "samples_per_class": 8},
}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """The config file at `path` (unset keys keep the defaults of the config types), or the
    default experiment `DEFAULT_EXPERIMENT` when `path` is None. A shipped file's relative
    path reads the installed copy from any folder (`shipped_or_given`)."""
    path = shipped_or_given(path)
    return build_config(read_yaml(path) if path else DEFAULT_EXPERIMENT, overrides)
