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

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names each bad key and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, validate_default=True)


class DataConfig(_Strict):
    name: Literal["mnist", "digits", "shapes", "folder"] = "mnist"
    image_size: int | None = Field(None, gt=0, description="None: the data set's native size")
    root: str | None = Field(None, description="image folder (data.name=folder)")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = Field(0, description="fixed train/val split, independent of the run seed")
    num_samples: int = Field(20000, gt=0, description="size of the procedural `shapes` set")
    max_samples: int | None = Field(None, gt=0, description="cap on the training set size")
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _folder_needs_root(self) -> DataConfig:
        if self.name == "folder" and (self.root is None or self.image_size is None):
            raise ValueError("data.name=folder needs data.root and data.image_size")
        return self


class BackboneConfig(_Strict):
    name: str = Field("dit-ti/4", description="a preset from `dit-bench info --list`")
    conditioning: Literal["adaln_zero", "adaln", "cross_attn", "in_context"] = "adaln_zero"
    learn_sigma: bool = False
    # Optional overrides of the preset, the axes of a size sweep; None keeps the preset's value.
    depth: int | None = Field(None, gt=0)
    hidden_size: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    patch_size: int | None = Field(None, gt=0)


class DDPMConfig(_Strict):
    name: Literal["ddpm"] = "ddpm"
    schedule: Literal["linear", "cosine"] = "linear"
    prediction: Literal["eps", "v"] = "eps"
    num_timesteps: int = Field(1000, gt=1)


class OptimConfig(_Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0, description="max grad norm; null disables")
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0, description="linear lr warm-up")


class TrainConfig(_Strict):
    steps: int = Field(2000, gt=0)
    batch_size: int = Field(64, gt=0)
    label_dropout: float = Field(0.1, ge=0, lt=1, description="classifier-free guidance dropout")
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    log_every: int = Field(25, gt=0)
    val_every: int = Field(500, gt=0)
    sample_every: int = Field(0, ge=0, description="sample grid every N steps; 0: only at the end")
    checkpoint_every: int = Field(250, gt=0, description="last.ckpt refresh (resume point)")
    keep_every: int = Field(0, ge=0, description="also keep step-N checkpoints; 0: never")
    threads: int | None = Field(None, gt=0, description="torch CPU threads; None: torch default")


class EvalConfig(_Strict):
    val_images: int = Field(256, gt=0, description="fixed validation images for val loss")
    val_levels: int = Field(10, gt=1, description="fixed noise levels of the val-loss grid")
    sampler: Literal["ddpm"] = "ddpm"
    sample_steps: int = Field(50, gt=0)
    cfg_scale: float = Field(1.5, ge=0)
    samples_per_class: int = Field(8, gt=0)
    use_ema: bool = True


class ExperimentConfig(_Strict):
    experiment: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    objective: DDPMConfig = DDPMConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _combinations(self) -> ExperimentConfig:
        # Imported here: the config module must stay importable without building any model.
        from dit_bench.backbones import CONDITIONINGS, resolve_preset
        from dit_bench.data import data_info

        b = self.backbone
        try:
            spec = resolve_preset(
                b.name,
                depth=b.depth,
                hidden_size=b.hidden_size,
                num_heads=b.num_heads,
                patch_size=b.patch_size,
            )
        except ValueError as e:
            raise ValueError(f"backbone.name: {e}") from None
        allowed = CONDITIONINGS.get(spec["family"], ())
        if b.conditioning not in allowed:
            raise ValueError(
                f"backbone.conditioning={b.conditioning!r} is not implemented for "
                f"{spec['family']!r}; allowed: {', '.join(allowed)}"
            )
        if spec["hidden_size"] % spec["num_heads"]:
            raise ValueError(
                f"backbone.num_heads={spec['num_heads']} does not divide "
                f"backbone.hidden_size={spec['hidden_size']}"
            )
        image_size = self.data.image_size or data_info(self.data).image_size
        if image_size % spec["patch_size"]:
            raise ValueError(
                f"backbone.patch_size={spec['patch_size']} does not divide the image size "
                f"{image_size} (data.image_size); use a patch size in "
                f"{[p for p in (1, 2, 4, 8, 16) if image_size % p == 0]}"
            )
        return self

    # -- derived values (properties, so the recorded config is exactly what ran) -------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def hash(self) -> str:
        """Short content hash of the resolved config: names the run directory."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# -- loading ----------------------------------------------------------------------------------
def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            model = ExperimentConfig
            for p in parent:
                model = model.model_fields[p].annotation
            allowed = ", ".join(model.model_fields)
            msg = f"unknown key; allowed keys here: {allowed}"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg}"
        lines.append(f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML: `0.1` is a float, `null` is None)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for p in path[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    raw = apply_overrides(raw or {}, list(overrides))
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """The default experiment (a small DiT on mnist) when `path` is None."""
    return build_config(read_yaml(path) if path else {}, overrides)
