"""Scaling-law sweeps: a sweep file -> an Optuna study -> one training run per trial.

A sweep file (`sweeps/*.yaml`) declares the search space as data:

```yaml
name: shapes-scaling                 # study name; runs go to <out>/<name>-<profile>/
description: ...
base: {...}                          # an experiment config, the schema of `dit-bench train` files
space:                               # Optuna parameters, in this order
  size:                              # a bundle: each labelled choice sets several keys
    choices:
      S: {backbone.depth: 2, backbone.hidden_size: 64, backbone.num_heads: 2}
      M: {backbone.depth: 4, backbone.hidden_size: 96, backbone.num_heads: 3}
  backbone.patch_size: {choices: [2, 4, 8]}      # a plain categorical on one config key
  optim.lr: {low: 1.0e-4, high: 1.0e-3, log: true}   # a range (TPE / random samplers only)
budgets: [1.0e11, 3.0e11, 1.0e12]    # compute budgets, training FLOPs (3 x forward x images)
max_steps: null                      # optional cap on a run's steps (it reports what it crosses)
budget_mode: envelope                # envelope: one constant-lr run per point, val loss logged
                                     #   at every budget it crosses (trains to the largest);
                                     # per_budget: one run per (point, budget) (decaying lr)
sampler: grid                        # grid (every point once) | tpe | random
pruner: {name: none}                 # none | median | hyperband, at equal compute (budget index)
                                     #   among the trials of one model (size, tokens)
n_trials: null                       # grid: all points; tpe/random: required
heartbeat: {interval: 10, grace: 60, max_retry: 3}
profiles:                            # how big: cpu (minutes here) and gpu (paper scale)
  cpu:
    description: ...
    set: {train.threads: 1}          # dotted keys applied to the base
    budgets: [...]                   # any top-level key above except name/base/profiles:
    space: {...}                     #   replaces the file's value (no deep merge)
```

A trial's config is: base, the profile's `set`, `--set` items, the trial's parameters, then
`train.steps` from the budgets (`ceil(C / (3 * forward FLOPs * batch))` for the largest) and
`experiment = <name>-<profile>`. Runs are named by config hash, so a re-run trial resumes its
run directory.

Concurrency. The study lives in an RDB storage: a SQLite file next to the runs by default, a
PostgreSQL URL for many machines. Two guarantees are enforced by one primitive, an INSERT into a
`dit_bench_claims` table with a (study, key) primary key, which is atomic in both databases
(Optuna's own pop of a waiting trial is a read-then-write, which SQLite does not serialise):
grid points are enqueued once each (`point:<key>`) and every waiting trial is started by one
worker (`run:<trial id>`). A worker keeps a heartbeat on its running trial; a killed worker's
trial goes stale, is failed by the next worker that looks (`fail_stale_trials`) and is enqueued
again with the same parameters (`retry:<trial number>`, at most `heartbeat.max_retry` times),
and the re-run resumes the run directory from its last checkpoint. A claim and the enqueue it
stands for are two transactions (a stop held while the trial is enqueued): a worker killed
between them leaves a claim without its trial, which expires after the heartbeat grace (the
sweep waits for it meanwhile) and is made again; should the worker only have stalled, its
trial and the new one are both enqueued, and the later is failed as a duplicate before it
runs. A RUNNING trial without a heartbeat (earlier versions could leave one) gets one after
the grace, so it goes stale as a lost worker's. tpe/random trials
are enqueued too (`slot:<k>`), so every trial starts WAITING and gets its heartbeat before
RUNNING. A worker silent past the grace (paused, not dead) whose trial was failed and
re-queued meanwhile finishes its run without writing to the trial; the retry finds it done.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from dit_bench.config import (
    EXECUTION_KEYS,
    HASHED_AS_DEFAULT,
    USER_ERRORS,
    ConfigError,
    ConfigStrict,
    ExperimentConfig,
    Terminated,
    apply_overrides,
    build_config,
    experiment_error,
    parse_override,
    raise_terminated,
    read_yaml,
    section_replacement_error,
    shipped_or_given,
    yaml_kind,
)
from dit_bench.files import (
    dotted,
    engine_url,
    optuna_settings_kept,
    out_of_room,
    redact,
    sqlite_file,
    write_json_atomic,
)

Scalar = bool | int | float | str


class _Strict(ConfigStrict):
    """A config's rules for numbers: `budgets: [.inf]` passed `> 0` and the plan died on an
    OverflowError, and lax mode read `max_steps: yes` as 1."""


# -- the sweep file schema ----------------------------------------------------------------------
class Choices(_Strict):
    """A categorical parameter: plain values of one config key, or labelled bundles of keys."""

    choices: list[Scalar] | dict[str, dict[str, Any]] = Field(min_length=1)

    @field_validator("choices", mode="before")
    @classmethod
    def _labels_are_text(cls, choices: Any) -> Any:
        # `2:` or `off:` failed both halves of the union, in their own words
        for label in choices if isinstance(choices, dict) else ():
            if kind := yaml_kind(label):
                raise ValueError(f"label {label!r}: YAML reads it as a {kind}; write it in quotes")
        return choices

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Scalar] | dict[str, dict[str, Any]]):
        if isinstance(choices, list) and len(set(choices)) != len(choices):
            raise ValueError(f"repeated choices {choices}: their trials would be one run")
        for label, bundle in choices.items() if isinstance(choices, dict) else ():
            for key, value in bundle.items():
                if problem := section_replacement_error(key, value):
                    raise ValueError(f"{label}: {problem}")
        return choices

    @property
    def labels(self) -> list[Scalar]:
        return list(self.choices) if isinstance(self.choices, dict) else list(self.choices)


class Range(_Strict):
    """A numeric parameter for TPE / random sampling: float or int in [low, high]."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)
    type: Literal["float", "int"] = "float"

    @field_validator("high")
    @classmethod
    def _ordered(cls, high: float, info) -> float:
        if "low" in info.data and high <= info.data["low"]:
            raise ValueError(f"high={high} must exceed low={info.data['low']}")
        return high


class Pruner(_Strict):
    name: Literal["none", "median", "hyperband"] = "none"
    n_startup_trials: int = Field(
        4, ge=0, description="median: complete trials of a model before its trials are pruned"
    )
    n_warmup_steps: int = Field(1, ge=0, description="median: budgets before pruning starts")
    reduction_factor: int = Field(3, ge=2, description="hyperband")


class Heartbeat(_Strict):
    interval: int = Field(10, gt=0, description="seconds between a running trial's heartbeats")
    grace: int = Field(
        60, gt=0, description="seconds without one before the trial is failed (>= 2 x interval)"
    )
    max_retry: int = Field(3, ge=0, description="re-runs of a trial whose worker died")

    @field_validator("grace")
    @classmethod
    def _longer_than_the_beats(cls, grace: int, info) -> int:
        # a live worker beats every `interval` s: a shorter grace fails its trial between beats
        interval = info.data.get("interval")
        if interval is not None and grace < 2 * interval:
            raise ValueError(
                f"grace={grace} must be at least twice interval={interval} (a live worker's "
                "trial would be failed as stale between two of its heartbeats)"
            )
        return grace


# A parameter with `choices` is categorical, any other a range: one set of errors, not both.
Parameter = Annotated[
    Annotated[Choices, Tag("choices")] | Annotated[Range, Tag("range")],
    Discriminator(
        lambda v: "choices" if "choices" in (v if isinstance(v, dict) else vars(v)) else "range"
    ),
]

# Keys every trial gets from the sweep itself: a space or --set over them would be overwritten.
SET_BY_SWEEP = {
    "train.steps": "the largest budget's steps, or max_steps",
    "experiment": "<name>-<profile>",
}


class SweepSpec(_Strict):
    """A sweep file with its profile applied: everything a worker needs."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    profile: str
    description: str = ""
    profile_description: str = ""
    base: dict[str, Any]
    space: dict[str, Parameter] = Field(min_length=1)
    budgets: list[float] = Field(min_length=1)
    budget_mode: Literal["envelope", "per_budget"] = "envelope"
    sampler: Literal["grid", "tpe", "random"] = "grid"
    seed: int = 0
    pruner: Pruner = Pruner()
    max_steps: int | None = Field(
        None, gt=0, description="cap on a run's steps: it reports the budgets it crosses by then"
    )
    n_trials: int | None = Field(None, gt=0)
    workers: int = Field(1, gt=0)
    heartbeat: Heartbeat = Heartbeat()

    @field_validator("space")
    @classmethod
    def _not_set_by_the_sweep(cls, space: dict[str, Choices | Range]):
        for key, entry in space.items():
            keys = [key]
            if isinstance(entry, Choices) and isinstance(entry.choices, dict):
                keys += [k for bundle in entry.choices.values() for k in bundle]
            for k in keys:
                if k in SET_BY_SWEEP:
                    raise ValueError(f"{key}: {k} is set by the sweep ({SET_BY_SWEEP[k]})")
        return space

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        if any(b <= 0 for b in v) or len(set(v)) != len(v):
            raise ValueError("budgets must be distinct positive training-FLOP levels")
        return sorted(float(b) for b in v)


FILE_KEYS = set(SweepSpec.model_fields) - {"profile", "profile_description"} | {"profiles"}
PROFILE_KEYS = {"description", "set"} | (FILE_KEYS - {"name", "base", "profiles", "description"})


# -- the resolved sweep -------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialPlan:
    """What one trial trains: its config and the steps at which it crosses each budget."""

    params: dict[str, Scalar]
    cfg: ExperimentConfig
    forward_flops: int  # per image (2 x MACs)
    macs: int
    num_params: int
    tokens: int | None
    # the data's side: data.image_size, or the data set's own where that is unset (latents,
    # whose folder has the size); the report's D counts the patches of it
    image_size: int
    budgets: list[float]  # the budgets this run reports (per_budget: its own one)
    budget_steps: list[int]  # optimiser step at which each budget is crossed

    @property
    def point(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params.items())


@dataclass(frozen=True)
class Sweep:
    spec: SweepSpec
    source: str = ""
    overrides: tuple[str, ...] = field(default=())

    def with_settings(self, *, n_trials: int | None = None, workers: int | None = None) -> Sweep:
        """This sweep with the command line's `--n-trials` / `--workers` in place of the
        file's (not in its identity: a rerun may change them), so the dry run lists, and
        validation checks, what the command will run."""
        update = {k: v for k, v in (("n_trials", n_trials), ("workers", workers)) if v is not None}
        if not update:
            return self
        spec = type(self.spec).model_validate({**self.spec.model_dump(), **update})
        return replace(self, spec=spec)

    @property
    def experiment(self) -> str:
        return f"{self.spec.name}-{self.spec.profile}"

    @property
    def study_name(self) -> str:
        return self.experiment

    # -- the search space ---------------------------------------------------------------------
    def grid_space(self) -> dict[str, list[Scalar]]:
        """Optuna parameter -> its choices (grid axes; budget is one in per_budget mode)."""
        out = {k: v.labels for k, v in self.spec.space.items() if isinstance(v, Choices)}
        if self.spec.budget_mode == "per_budget":
            out["budget"] = list(self.spec.budgets)
        return out

    def points(self) -> list[dict[str, Scalar]]:
        """Every grid point in file order (the Cartesian product of the categorical axes)."""
        space = self.grid_space()
        return [
            dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())
        ]

    def overrides_of(self, params: dict[str, Scalar]) -> dict[str, Any]:
        """Dotted config keys set by a trial's parameters (bundles expanded)."""
        out: dict[str, Any] = {}
        for key, entry in self.spec.space.items():
            value = params[key]
            if isinstance(entry, Choices) and isinstance(entry.choices, dict):
                out.update(entry.choices[value])
            else:
                out[key] = int(value) if isinstance(entry, Range) and entry.type == "int" else value
        return out

    def base_raw(self) -> dict[str, Any]:
        return apply_overrides(self.spec.base, list(self.overrides))

    def identity(self) -> dict[str, Any]:
        """What decides the study's trials and numbers: the base config (by hash: keys that
        only say how a run executes are not in it), the space, budgets, sampler and pruner.
        Not n_trials, workers or heartbeat: a rerun may change those and go on with the study."""
        keys = ("space", "budgets", "budget_mode", "sampler", "seed", "pruner", "max_steps")
        spec = self.spec.model_dump(mode="json", include=set(keys))
        return {"base_config_hash": build_config(self.base_raw()).hash, **spec}

    def identity_changes(self, recorded: dict[str, Any]) -> list[str]:
        """The keys of `identity()` that differ from a study's recorded identity."""
        now = self.identity()
        return [k for k in sorted({*now, *recorded}) if now.get(k) != recorded.get(k)]

    def plan(self, params: dict[str, Scalar], *, dry_run: bool = False) -> TrialPlan:
        """The config of a trial (validated), its size and its budget steps. Builds no weights.
        `dry_run`: latents not encoded yet are sized as `planned_data_info` assumes."""
        from dit_bench.data import data_info, planned_data_info

        sets = [f"{k}={json.dumps(v)}" for k, v in self.overrides_of(params).items()]
        sets.append(f"experiment={self.experiment}")
        raw = apply_overrides(self.base_raw(), sets)
        try:
            cfg = build_config(raw)
        except ConfigError as e:
            raise ConfigError(f"trial {params}: {e}") from None
        info = planned_data_info(cfg.data)[0] if dry_run else data_info(cfg.data)
        f, num_params, tokens = _measure(cfg, info)
        per_step = 3 * f["flops"] * cfg.train.batch_size  # training FLOPs of one step
        budgets = [float(params["budget"])] if "budget" in params else list(self.spec.budgets)
        steps = [max(1, math.ceil(b / per_step)) for b in budgets]
        if self.spec.max_steps:  # budgets beyond the cap are not reached by this run
            budgets = [b for b, s in zip(budgets, steps, strict=True) if s <= self.spec.max_steps]
            steps = [s for s in steps if s <= self.spec.max_steps]
        if not steps:
            raise ConfigError(
                f"trial {params}: max_steps={self.spec.max_steps} reaches no budget "
                f"(one step is {per_step:.3g} training FLOPs)"
            )
        cfg = build_config(apply_overrides(raw, [f"train.steps={max(steps)}"]))
        return TrialPlan(
            params=dict(params),
            cfg=cfg,
            forward_flops=f["flops"],
            macs=f["macs"],
            num_params=num_params,
            tokens=tokens,
            image_size=info.image_size,
            budgets=budgets,
            budget_steps=steps,
        )

    def describe(self) -> str:
        """The search space, sampler, budgets and every grid point with its size and compute."""
        s = self.spec
        lines = [
            f"sweep {s.name} (profile {s.profile}): {self.source}",
            f"  study {self.study_name}; sampler {s.sampler}, pruner {s.pruner.name}, "
            f"budget_mode {s.budget_mode}, workers {s.workers}",
            "  budgets (training FLOPs = 3 x forward FLOPs x images): "
            + ", ".join(f"{b:.3g}" for b in s.budgets),
        ]
        if self.overrides:  # on the base of every trial, which the trial lines do not show
            lines.append("  base with " + " ".join(f"--set {o}" for o in self.overrides))
        lines.append("  space:")
        for key, entry in s.space.items():
            if isinstance(entry, Choices) and isinstance(entry.choices, dict):
                desc = "; ".join(
                    f"{lab}: " + " ".join(f"{k}={v}" for k, v in ov.items())
                    for lab, ov in entry.choices.items()
                )
            elif isinstance(entry, Choices):
                desc = ", ".join(map(str, entry.choices))
            else:
                desc = f"{entry.type} [{entry.low}, {entry.high}]" + (" log" if entry.log else "")
            lines.append(f"    {key}: {desc}")
        if s.sampler == "grid":
            pts = self.points()[: s.n_trials]
            lines.append(f"  {len(pts)} trials (grid points):")
            total = 0.0
            for i, p in enumerate(pts):
                plan = self.plan(p, dry_run=True)
                total += 3 * plan.forward_flops * plan.cfg.train.steps * plan.cfg.train.batch_size
                lines.append(
                    f"    {i:3d} {plan.point:<48} params {plan.num_params:>10,} "
                    f"tokens {plan.tokens!s:>4} MACs {plan.macs:>12,} steps "
                    f"{plan.cfg.train.steps:>6} hash {plan.cfg.hash}"
                )
            lines.append(f"  total training compute {total:.3g} FLOPs")
            if pts:
                from dit_bench.data import planned_data_info

                note = planned_data_info(plan.cfg.data)[1]
                lines += [f"  note: {note}"] if note else []
        else:
            lines.append(f"  {s.n_trials} trials sampled by {s.sampler}")
        return "\n".join(lines)

    def validate(self, *, dry_run: bool = False) -> None:
        """Every grid point (or each range's corners) builds a valid config; raises ConfigError.
        `dry_run`: as `plan`'s."""
        s = self.spec
        if s.sampler == "grid":
            ranges = [k for k, v in s.space.items() if isinstance(v, Range)]
            if ranges:
                raise ConfigError(
                    f"{self.source}: sampler grid needs choices only; ranges {ranges}"
                )
            params_list = self.points()
        else:
            if s.n_trials is None:
                raise ConfigError(f"{self.source}: sampler {s.sampler} needs n_trials")
            corners = {
                k: (v.labels if isinstance(v, Choices) else [v.low, v.high])
                for k, v in s.space.items()
            }
            params_list = [
                dict(zip(corners, c, strict=True)) for c in itertools.product(*corners.values())
            ]
            if s.budget_mode == "per_budget":
                params_list = [{**p, "budget": b} for p in params_list for b in s.budgets]
        if s.pruner.name != "none" and s.budget_mode == "per_budget":
            raise ConfigError(
                f"{self.source}: pruner needs budget_mode envelope (a value per budget)"
            )
        if s.pruner.name == "hyperband" and len(s.budgets) < 2:
            raise ConfigError(f"{self.source}: pruner hyperband needs at least 2 budgets")
        for key, entry in s.space.items():
            if isinstance(entry, Choices) and isinstance(entry.choices, dict):
                for label, ov in entry.choices.items():
                    if not isinstance(ov, dict) or not ov:
                        raise ConfigError(f"{self.source}: space.{key}.{label} must set some keys")
        scales: dict[tuple, str] = {}  # val-loss scale -> the first point of it
        for p in params_list:
            try:
                plan = self.plan(p, dry_run=dry_run)
            except ConfigError as e:  # its message names the trial
                raise ConfigError(f"{self.source}: {e}") from None
            scales.setdefault(val_loss_scale(plan.cfg), plan.point)
        if len(scales) > 1:
            # The study minimises val/loss and the report fits its envelope: across objectives,
            # targets or validation grids the lower number is the other quantity's, not the
            # better model's (shipped cpu runs: flow's velocity MSE 0.4-0.9, DDPM's eps 0.11).
            each = "; ".join(f"{point} ({scale_text(k)})" for k, point in scales.items())
            raise ConfigError(
                f"{self.source}: the trials' val losses are not on one scale: {each}; every "
                "trial needs one objective, prediction target, DDPM schedule and validation "
                "grid (eval.val_levels, eval.val_images): sweep each in a file of its own"
            )


def val_loss_scale(cfg: ExperimentConfig) -> tuple:
    """What a run's val loss is a measurement of, beyond its weights: runs of one value compare.
    (The flow density and shift are not in it: the validation grid is unshifted.)"""
    from dit_bench.ablate import val_levels

    o = cfg.objective
    return (
        ("objective", o.name),
        *((k, getattr(o, k)) for k in ("prediction", "schedule", "num_timesteps") if hasattr(o, k)),
        ("eval.val_levels", val_levels(cfg)),
        ("eval.val_images", cfg.eval.val_images),
    )


def scale_text(scale: tuple) -> str:
    return " ".join(f"{k} {v}" for k, v in scale)


def _err(source: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {msg}")


def load_sweep(
    path: str | Path | dict, profile: str = "cpu", overrides: Sequence[str] = ()
) -> Sweep:
    """A sweep file with `profile` applied and `overrides` (`key=value`) on its base config. A
    shipped file's relative path reads the installed copy from any folder (`shipped_or_given`)."""
    path = path if isinstance(path, dict) else shipped_or_given(path)
    raw = dict(path) if isinstance(path, dict) else read_yaml(path)
    source = "<dict>" if isinstance(path, dict) else str(path)
    unknown = set(raw) - FILE_KEYS
    if unknown:
        raise _err(source, f"unknown keys {sorted(unknown)}; allowed {sorted(FILE_KEYS)}")
    profiles = raw.pop("profiles", None) or {}
    if profiles and profile not in profiles:
        raise _err(source, f"no profile {profile!r}; profiles: {list(profiles)}")
    prof = profiles.get(profile) or {}
    if not isinstance(prof, dict):
        raise _err(source, f"profiles.{profile} must be a mapping, got {prof!r}")
    prof = dict(prof)
    bad = set(prof) - PROFILE_KEYS
    if bad:
        raise _err(
            source,
            f"profiles.{profile}: unknown keys {sorted(bad)}; allowed {sorted(PROFILE_KEYS)}",
        )
    sets = prof.pop("set", None) or {}
    if not isinstance(sets, dict):
        raise _err(source, f"profiles.{profile}.set must be a mapping of dotted keys to values")
    spec_raw = {**raw, **{k: v for k, v in prof.items() if k != "description"}}
    spec_raw["profile"] = profile
    spec_raw["profile_description"] = prof.get("description", "")
    spec_raw["base"] = apply_overrides(
        raw.get("base") or {}, [f"{k}={json.dumps(v)}" for k, v in sets.items()]
    )
    try:
        spec = SweepSpec.model_validate(spec_raw)
    except ValidationError as e:
        lines = []
        for x in e.errors():
            loc = x["loc"]
            if loc[:1] == ("space",) and len(loc) > 2:
                loc = loc[:2] + loc[3:]  # drop the Parameter tag: space.<key>.range.high
            key = ".".join(map(str, loc)) or "<file>"
            lines.append(f"  {key}: {x['msg'].removeprefix('Value error, ')}")
        raise _err(source, "invalid sweep:\n" + "\n".join(lines)) from None
    if why := experiment_error(f"{spec.name}-{profile}"):
        raise _err(source, f"name and profile: the runs' folder {spec.name}-{profile} {why}")
    base = spec.base
    given = {"experiment"} & set(base) | {"train.steps"} & {
        f"train.{k}" for k in base.get("train", {})
    }
    given -= set(sets)  # the profile's: named as its own below, not as the file's `base:`
    for key in sorted(given):
        raise _err(source, f"base: {key} is set by the sweep ({SET_BY_SWEEP[key]})")
    # the keys every trial's parameters set: a --set of one would reach no run (a key only
    # some choices set, e.g. the gpu profile's activation checkpointing, reaches the others,
    # where it agrees with those choices)
    searched = {}
    bundled: dict[str, list[tuple[str, str, Any]]] = {}  # key -> (parameter, choice, value)
    for name, entry in spec.space.items():
        if isinstance(entry, Choices) and isinstance(entry.choices, dict):
            bundles = [set(b) for b in entry.choices.values()]
            searched |= {k: name for k in set.intersection(*bundles)}
            for label, bundle in entry.choices.items():
                for k, v in bundle.items():
                    bundled.setdefault(k, []).append((name, label, v))
        else:
            searched[name] = name
    # A profile's `set` is a layer under the space as --set is: a key the trials set was kept
    # out of every run without a word (`backbone.patch_size: 4` over a space of patches)
    layers = [
        (f"profiles.{profile}.set {k}={json.dumps(v)}", "the profile's set", k, v)
        for k, v in sets.items()
    ]
    for item in overrides:
        path, value = parse_override(item)
        layers.append((f"--set {item}", "--set", ".".join(path), value))
    for where, layer, key, value in layers:
        if key in SET_BY_SWEEP:
            raise _err(source, f"{where}: {key} is set by the sweep ({SET_BY_SWEEP[key]})")
        if key in searched:
            raise _err(
                source,
                f"{where}: {key} is set by each trial (the space's {searched[key]!r}); "
                "change the space in the sweep file, or copy it",
            )
        # a trial's parameters come after --set: a choice that sets the key to another value
        # would keep its own, silently (the same value, or a key no choice sets, is fine)
        other = [(n, c, v) for n, c, v in bundled.get(key, []) if v != value]
        if other:
            said = ", ".join(f"{n}={c} sets {v!r}" for n, c, v in other)
            raise _err(
                source,
                f"{where}: {said}, and a trial's parameters come after {layer}; change "
                "those choices in the sweep file, or copy it",
            )
    sweep = Sweep(spec, source, tuple(overrides))
    build_config(sweep.base_raw())  # the base itself, with a message naming the bad key
    if problem := _preset_sizes_overridden(sweep, searched):
        raise _err(source, problem)
    return sweep


def _preset_sizes_overridden(sweep: Sweep, searched: dict[str, str]) -> str | None:
    """Why a searched preset name would not train its preset: the base (or --set) gives one of
    its sizes, which a trial's `backbone.name` does not undo (a size is an override on whatever
    preset is named). `backbone.name: [dit-xs/2, dit-s/8]` over a base with `patch_size: 4`
    trained both at patch 4, labelled /2 and /8. A size the space itself sets is meant."""
    from dit_bench.backbones import OVERRIDE_KEYS, PRESETS

    given = sweep.base_raw().get("backbone") or {}
    given = {k: given[k] for k in OVERRIDE_KEYS if given.get(k) is not None}
    for param, entry in sweep.spec.space.items():
        if not isinstance(entry, Choices):
            continue
        if isinstance(entry.choices, dict):
            named = {lab: b for lab, b in entry.choices.items() if "backbone.name" in b}
        elif param == "backbone.name":
            named = {name: {"backbone.name": name} for name in entry.choices}
        else:
            continue
        for label, bundle in named.items():
            name = bundle["backbone.name"]
            preset = PRESETS.get(name, {})
            what = name if label == name else f"{label} names preset {name}"
            for k, v in given.items():
                key = f"backbone.{k}"
                if key in bundle or key in searched or k not in preset:
                    continue
                if json.loads(json.dumps(preset[k])) != v:
                    return (
                        f"space.{param}: {what} ({k} {preset[k]}), but the base sets "
                        f"{key}={v!r}, which every trial "
                        f"keeps over its preset's; drop {key} from the base (and --set), or "
                        "set it in the space"
                    )
    return None


# -- storage and claims -------------------------------------------------------------------------
def default_storage(sweep: Sweep, out: str | Path, *, make_folder: bool = True) -> str:
    """`sqlite:///<out>/<name>-<profile>/study.db`: the study file next to the sweep's runs."""
    folder = Path(out).resolve() / sweep.experiment
    if make_folder:
        folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'study.db'}"


def make_storage(url: str, heartbeat: Heartbeat):
    import optuna
    import sqlalchemy

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 120}}  # wait for a writer instead of failing
    if (path := sqlite_file(url)) is not None:  # not SQLite in memory: no file to make
        if not path.parent.is_dir():
            raise ValueError(f"storage {url}: no folder {path.parent} for the study file")
        # made here with the umask's mode: SQLite makes it 0644 whatever the umask, and a
        # group sharing the runs folder (umask 002) could write the runs but not the study
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    for attempt in range(8):
        try:
            storage = optuna.storages.RDBStorage(
                engine_url(url),
                engine_kwargs=kwargs,
                heartbeat_interval=heartbeat.interval,
                grace_period=heartbeat.grace,
            )
            if url.startswith("postgres"):
                _utc_sessions(storage.engine)
            return storage
        except Exception as e:
            # Workers that start together on a fresh database race to create Optuna's tables
            # (PostgreSQL: duplicate pg_type rows); the loser retries and finds them made. A
            # bad URL or a missing driver does not get better.
            final = isinstance(e, sqlalchemy.exc.ArgumentError) or "import" in str(e).lower()
            if attempt == 7 or final:
                raise ValueError(
                    f"storage {redact(url)}: {type(e).__name__}: {str(e).splitlines()[0]}"
                ) from e
            time.sleep(0.5 + 0.5 * attempt)


def _utc_sessions(engine) -> None:
    """Every PostgreSQL session of `engine` in UTC from here on. Optuna stores heartbeats as
    naive wall times of the session's time zone, the server's (initdb takes its host's) or
    PGTZ: where that zone moves its clocks (DST), every live trial's last beat looked an hour
    old at the spring change, and was failed as stale and re-run. UTC never moves.

    Set by a statement on each new connection, not libpq's `options` startup parameter:
    PgBouncer before 1.20 refuses that parameter (every connection through it failed), and
    given, it replaced the user's PGOPTIONS (a search_path, a statement_timeout)."""
    import sqlalchemy

    def utc(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.close()
        dbapi_connection.commit()  # the pool rolls back a returned connection: kept, committed

    sqlalchemy.event.listen(engine, "connect", utc)
    engine.dispose()  # the set-up's connections, made before: the next ones are UTC


def storage_status(sweep: Sweep, url: str, *, default: bool = False) -> str:
    """A dry run's line on the storage. It connects, so a bad URL, driver or password fails
    here rather than in every worker, and it counts the study's trials so far. It makes no
    file: a SQLite study that is not there yet is only named. `default`: the run makes the
    default study file's folder itself."""
    path = sqlite_file(url)
    if path is not None and not path.exists() and (default or path.parent.is_dir()):
        return f"storage: {url} (no study yet; the first run makes it)"
    storage = make_storage(url, sweep.spec.heartbeat)
    try:
        study_id = storage.get_study_id_from_name(sweep.study_name)
        trials = storage.get_all_trials(study_id, deepcopy=False)
        attrs = storage.get_study_user_attrs(study_id)
    except KeyError:
        return f"storage: {redact(url)} (connected; no study {sweep.study_name} yet)"
    finally:
        storage.engine.dispose()
    check_identity(sweep, url, attrs.get("identity"), attrs.get("sweep"))
    states = Counter(t.state.name.lower() for t in trials)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no trials"
    return f"storage: {redact(url)} (study {sweep.study_name}: {counts})"


@contextlib.contextmanager
def stops_deferred():
    """A Ctrl-C or SIGTERM held until the block ends, then raised as it would have been (a
    second one acts at once). Around an enqueue: a stop inside its commit is raised by Python
    only after the commit returns, so code that handled it could not tell whether the trial
    was stored. A claim left without its trial (a stop just before the enqueue, a kill -9)
    expires instead: `Worker._expire_lost_claims`. Main thread only, where handlers run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)

    def hold(signum, frame) -> None:
        held.append(signum)
        for s, handler in before.items():  # a second stop acts at once (a stuck database)
            signal.signal(s, handler)

    before = {s: signal.signal(s, hold) for s in stops}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if held:
            handler = before[held[0]]
            if callable(handler):
                handler(held[0], None)  # raises as it would have: KeyboardInterrupt, Terminated
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), held[0])  # the default action: the process ends


class Claims:
    """Atomic once-only claims in the study's database: INSERT into a table whose primary key is
    (study, key); the second INSERT of a key fails with an IntegrityError in SQLite and
    PostgreSQL alike, whatever the interleaving."""

    def __init__(self, storage, study_id: int, owner: str):
        import sqlalchemy as sa

        self.sa, self.study_id, self.owner = sa, study_id, owner
        self.engine = storage.engine
        meta = sa.MetaData()
        self.table = sa.Table(
            "dit_bench_claims",
            meta,
            sa.Column("study_id", sa.Integer, primary_key=True),
            sa.Column("key", sa.String(512), primary_key=True),
            sa.Column("owner", sa.String(255)),
            sa.Column("created", sa.Float),
        )
        for _ in range(10):  # two workers creating the table at once: one wins, the other retries
            try:
                meta.create_all(self.engine, checkfirst=True)
                break
            except sa.exc.SQLAlchemyError:
                time.sleep(0.2)

    def _now(self):
        """The database's clock in epoch seconds, as an SQL expression: claims are made and
        aged by it, not by each machine's own clock, which may be minutes off another's (a
        claim then expired at once, or never). Optuna times its heartbeats by it too."""
        sa, dialect = self.sa, self.engine.dialect.name
        if dialect == "postgresql":
            return sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Float)
        if dialect == "sqlite":  # one machine's clock anyway; julianday keeps milliseconds
            return (sa.func.julianday("now") - 2440587.5) * 86400.0
        if dialect in ("mysql", "mariadb"):
            return sa.cast(sa.func.unix_timestamp(sa.func.now(6)), sa.Float)
        return sa.literal(time.time())

    def claim(self, key: str) -> bool:
        sa = self.sa
        row = {"study_id": self.study_id, "key": key, "owner": self.owner, "created": self._now()}
        for attempt in range(60):
            try:
                with self.engine.begin() as conn:
                    conn.execute(self.table.insert().values(**row))
                return True
            except sa.exc.IntegrityError:
                return False
            except sa.exc.OperationalError as e:  # SQLite busy, a server restarting: try again
                last = e
                time.sleep(0.5 + 0.1 * attempt)
        first_line = str(last.orig if last.orig is not None else last).strip().splitlines()[0]
        raise RuntimeError(
            f"could not claim {key!r} in 60 tries over 3.5 minutes, the storage refusing with: "
            f"{first_line}"
        ) from last

    def release(self, key: str) -> None:
        """Give back this worker's own claim (the work it stood for was not done)."""
        t = self.table
        with self.engine.begin() as conn:
            conn.execute(
                t.delete().where(
                    (t.c.study_id == self.study_id) & (t.c.key == key) & (t.c.owner == self.owner)
                )
            )

    def expire(self, key: str, older_than: float) -> bool:
        """Delete the claim `key` if it was made more than `older_than` seconds ago; True if
        this call deleted it. Two workers that both find it old delete it once: the DELETE
        names the row's creation time, and the INSERT of the next `claim` is again atomic."""
        t = self.table
        q = self.sa.select(t.c.created, self._now()).where(
            (t.c.study_id == self.study_id) & (t.c.key == key)
        )
        with self.engine.begin() as conn:
            row = conn.execute(q).first()
            if row is None or row[1] - row[0] <= older_than:
                return False
            created = row[0]
            gone = conn.execute(
                t.delete().where(
                    (t.c.study_id == self.study_id) & (t.c.key == key) & (t.c.created == created)
                )
            )
            return gone.rowcount == 1

    def keys(self, prefix: str = "") -> list[str]:
        t = self.table
        q = self.sa.select(t.c.key).where(t.c.study_id == self.study_id)
        with self.engine.connect() as conn:
            return [k for (k,) in conn.execute(q) if k.startswith(prefix)]


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number`: one per trial, the same in every worker."""
    return (seed * 1_000_003 + number) % 2**32  # numpy's RandomState takes 32-bit seeds


def make_sampler(spec: SweepSpec):
    """grid: the workers enqueue every point (one claim each), so the sampler only replays
    their fixed parameters. Optuna's GridSampler is not used for that: its after_trial looks
    up a `grid_id` it gives only to trials it picked itself, and a one-point grid raised
    KeyError at the end of its trial.

    tpe/random: the sampler's random state is reseeded from (seed, trial number) before each
    trial. The workers do not share one sampler (each process builds its own, and a restarted
    worker a fresh one), and the sweep asks for trials itself rather than through
    `study.optimize`: seeded once, every worker drew the same sequence and a restart drew the
    start again. Per trial, a draw is reproducible (the same seed and trial number give it)
    and differs from the other trials'. TPE's constant liar counts the running trials of the
    other workers as bad, so concurrent workers do not all pick the same promising region."""
    import optuna

    if spec.sampler == "tpe":
        base, kwargs = optuna.samplers.TPESampler, {"constant_liar": True}
    else:
        base, kwargs = optuna.samplers.RandomSampler, {}

    class TrialSeeded(base):
        def before_trial(self, study, trial) -> None:
            seed = trial_seed(spec.seed, trial.number)
            # `_rng` is the state both samplers draw from (TPE's startup trials and its
            # fallback come from its inner RandomSampler); Optuna offers only a random reseed.
            self._rng.rng.seed(seed)
            if isinstance(self, optuna.samplers.TPESampler):
                self._random_sampler._rng.rng.seed(seed)
            super().before_trial(study, trial)

    return TrialSeeded(seed=spec.seed, **kwargs)


def _measure(cfg: ExperimentConfig, info) -> tuple[dict[str, int], int, int | None]:
    """A config's forward FLOPs and MACs per image, its parameters and tokens. Builds no
    weights: shapes and counts only, on the meta device."""
    import torch

    from dit_bench.backbones import build_net

    with torch.device("meta"):
        net = build_net(cfg, info)
    return net.flops(batch=1), net.num_params(), getattr(net, "num_tokens", None)


def model_key(plan: TrialPlan) -> str:
    """The model a trial trains, as the scaling laws see it: parameters, tokens, forward MACs."""
    return _model(plan.num_params, plan.tokens, plan.macs)


def _model(num_params: int, tokens: int | None, macs: int) -> str:
    return f"params={num_params},tokens={tokens},macs={macs}"


def trial_model(attrs: dict[str, Any]) -> str | None:
    """`model_key` of a trial from its user attributes. A trial of a study begun before the
    pruner raced trials by model has no `model`, but the config its worker recorded: measured
    from that, it races as its model; left out, a resumed sweep pruned its new trials against
    none of the finished ones (a trial far behind its size's trained to the last budget)."""
    if "model" in attrs or "config" not in attrs:
        return attrs.get("model")
    return _model_of_config(json.dumps(attrs["config"], sort_keys=True))


@functools.cache  # every pruning decision lists every trial
def _model_of_config(config: str) -> str | None:
    from dit_bench.data import data_info

    try:
        cfg = build_config(json.loads(config), stored=True)
        f, num_params, tokens = _measure(cfg, data_info(cfg.data))
    except (ValueError, OSError):  # its data gone or changed: raced with none, as before
        return None
    return _model(num_params, tokens, f["macs"])


class _OneModelStorage:
    """A study's storage that lists the trials of one model only (`trial_model`); everything
    else is the storage's own."""

    def __init__(self, storage, model: str | None):
        self._storage, self._model = storage, model

    def get_all_trials(self, study_id: int, deepcopy: bool = True, states=None) -> list:
        trials = self._storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        return [t for t in trials if trial_model(t.user_attrs) == self._model]

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


def make_pruner(spec: SweepSpec):
    """median / hyperband at equal compute (the budget index is the step), among the trials of
    the trial's own model only. Across sizes, equal compute is not a fair race: a larger model
    is behind at the small budgets and ahead at the large ones (that crossing is what the
    envelope and the IsoFLOP slices measure), so pruned against the smaller ones it stopped at
    the second budget, and the frontier and IsoFLOP parabolas of the larger budgets lacked
    the models that win there (the cpu profile with `median`: every L and XL trial pruned at
    2e10, 2 sizes left at 4e10 and above). Within one model (trials that differ in lr or
    another range) a trial behind at equal compute is worse, and is pruned."""
    import optuna

    p = spec.pruner
    if p.name == "median":
        base = optuna.pruners.MedianPruner
        kwargs = dict(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    elif p.name == "hyperband":
        base = optuna.pruners.HyperbandPruner
        kwargs = dict(
            min_resource=1, max_resource=len(spec.budgets), reduction_factor=p.reduction_factor
        )
    else:
        return optuna.pruners.NopPruner()

    class OneModel(base):
        def prune(self, study, trial) -> bool:
            # both pruners read the trials they compare with from `study._storage` (hyperband
            # through the bracket studies it builds on it)
            storage = _OneModelStorage(study._storage, trial.user_attrs.get("model"))
            view = optuna.study.Study(study.study_name, storage, study.sampler, self)
            return super().prune(view, trial)

    return OneModel(**kwargs)


def open_study(sweep: Sweep, storage_url: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(storage_url, sweep.spec.heartbeat)
    kwargs = dict(
        study_name=sweep.study_name,
        storage=storage,
        sampler=make_sampler(sweep.spec),
        pruner=make_pruner(sweep.spec),
        direction="minimize",
    )
    for _ in range(10):  # concurrent creation: the loser loads the winner's study
        try:
            study = optuna.create_study(load_if_exists=True, **kwargs)
            break
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(0.2)
    else:
        study = optuna.load_study(**{k: v for k, v in kwargs.items() if k != "direction"})
    recorded = study.user_attrs.get("identity")
    check_identity(sweep, storage_url, recorded, study.user_attrs.get("sweep"))
    if "sweep" not in study.user_attrs:
        study.set_user_attr(
            "sweep",
            {
                "source": sweep.source,
                "profile": sweep.spec.profile,
                "spec": sweep.spec.model_dump(mode="json"),
                "overrides": list(sweep.overrides),
            },
        )
    if recorded is None:  # (a study made before identities were recorded takes this one)
        study.set_user_attr("identity", sweep.identity())
    return study, storage


def base_changes(sweep: Sweep, made_by: dict[str, Any] | None) -> list[str]:
    """The base config's settings that differ from the sweep's that made the study (its
    `sweep` attribute: the base with its profile's set, and its --sets), as "key old -> new".
    Empty where the study recorded none or its base no longer builds."""
    try:
        old = apply_overrides(made_by["spec"]["base"], list(made_by["overrides"]))
        old = dotted(build_config(old, stored=True).to_dict())
    except (KeyError, TypeError, *USER_ERRORS):
        return []
    new = dotted(build_config(sweep.base_raw()).to_dict())
    # as the hash: a key that only says how a run executes changed no trial
    how = {f"{section}.{key}" for section, key, *_ in EXECUTION_KEYS + HASHED_AS_DEFAULT}
    keys = sorted(k for k in {*old, *new} - how if old.get(k) != new.get(k))
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in keys]


def check_identity(
    sweep: Sweep, url: str, recorded: dict[str, Any] | None, made_by: dict | None = None
) -> None:
    """A rerun with another base, space or budgets would add its trials to the old study and
    report the old numbers as its own: refused, saying what changed and how to keep both.
    `recorded`: the study's identity (None: a new study, or one made before identities);
    `made_by`: its `sweep` attribute, which names the base's changed settings."""
    changes = sweep.identity_changes(recorded) if recorded is not None else []
    if not changes:
        return
    # "base config changed" alone left the user to diff two files and their --sets
    base = ", ".join(base_changes(sweep, made_by)) if "base_config_hash" in changes else ""
    changed = ", ".join(changes).replace("base_config_hash", "base config")
    path = sqlite_file(url)
    where = f"delete {path}" if path else "delete it"
    # a study is found by its name (`name:`-profile) in the storage: another --out makes
    # another study only where the storage is the default one, the study file in --out's
    # folder; with --storage (a PostgreSQL server shared by machines) it met the same refusal
    default = path is not None and path.parts[-2:] == (sweep.experiment, "study.db")
    keep = (
        "another --out (or `name:` in the file)"
        if default
        else f"another `name:` in the file (its study's name in this storage, {sweep.experiment}"
        " now; --out names the runs folder only)"
    )
    raise ConfigError(
        f"study {sweep.study_name} in {redact(url)} was made by another sweep ({changed} "
        f"changed{f' ({base})' if base else ''}: a --set, the file or its profile). To keep "
        f"both, give this one {keep}; to start over, {where}"
    )


# -- the objective: trial -> config -> run -> number ---------------------------------------------
def suggest(trial, sweep: Sweep) -> dict[str, Scalar]:
    """The trial's parameters (fixed ones of an enqueued grid point are returned as they are)."""
    out: dict[str, Scalar] = {}
    for key, entry in sweep.spec.space.items():
        if isinstance(entry, Choices):
            out[key] = trial.suggest_categorical(key, entry.labels)
        elif entry.type == "int":
            out[key] = trial.suggest_int(
                key, int(entry.low), int(entry.high), step=int(entry.step or 1), log=entry.log
            )
        else:
            out[key] = trial.suggest_float(
                key, entry.low, entry.high, step=entry.step, log=entry.log
            )
    if sweep.spec.budget_mode == "per_budget":
        out["budget"] = trial.suggest_categorical("budget", list(sweep.spec.budgets))
    return out


def read_curve(run_dir: Path, plan: TrialPlan) -> list[dict[str, float]]:
    """Every val-loss row of the run's metrics.csv with its images and training FLOPs, and
    the in-training FD (eval.fd_every) where the row has one, under its summary name."""
    from dit_bench.ablate import fd_column, fd_metric
    from dit_bench.train.callbacks import read_metrics

    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    rows = []
    batch = plan.cfg.train.batch_size
    fd, logged = fd_metric(plan.cfg), fd_column(plan.cfg)
    for r in read_metrics(path):  # a row cut short by a failed append left out
        if r.get("val/loss") not in (None, ""):
            step = int(r["step"])
            row = {
                "step": step,
                "images": step * batch,
                "train_flops": 3.0 * plan.forward_flops * step * batch,
                "val_loss": float(r["val/loss"]),
            }
            if fd and r.get(logged) not in (None, ""):
                row[fd] = float(r[logged])
            rows.append(row)
    return rows


def run_summary(run_dir: Path | None) -> dict | None:
    """A trial's run's summary.json; None where there is none (a pruned run stops before it,
    a run that never started has no folder) or it cannot be read."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (TypeError, OSError, ValueError):
        return None


def run_device(summary: dict | None, cfg) -> str:
    """The device a run trained on, as its summary names it; else (a pruned run stops before
    its summary) the one `cfg` trains on here. The report names the machine its losses and
    timings are of: a trial record is all a report from a study has."""
    device = summary.get("device") if summary is not None else None
    if device is None:
        import torch

        from dit_bench.fast import device_name, trains_on_cuda

        # as train picks it: train.accelerator=cpu trains on the CPU of a GPU machine too
        on_gpu = trains_on_cuda(cfg.train.accelerator)
        # its train.threads: `train` gives the process its own count back when it stops, so
        # the count now is not the run's (a profile's threads: 1 read as "2 threads" on its
        # pruned runs, a second device in the report's "Trained on")
        device = device_name(torch.device("cuda" if on_gpu else "cpu"), cfg.train.threads)
    return device


def run_val_protocol(summary: dict | None, tracker) -> dict[str, Any]:
    """How a run validated (val_batch, val_grid) and where a resume crossed protocols, as its
    summary says: a trial that finds its run done by an earlier version (a retry, a study
    file removed) trained nothing, and its val losses are of that version's protocol (absent
    keys: one before they were recorded). Else (a pruned run stops before its summary) the
    step its `ValAtSteps` saw alone: the record keeps this version's protocol, the run's."""
    if summary is None:
        return {"val_protocol_changed_at": tracker.val_protocol_changed_at}
    return {k: summary.get(k) for k in ("val_batch", "val_grid", "val_protocol_changed_at")}


def trial_record(plan: TrialPlan, curve: list[dict]) -> dict[str, Any]:
    """What every trial keeps (user attrs and `trial.json`): sizes, compute and its curve."""
    from dit_bench.objectives import OBJECTIVES
    from dit_bench.report.scaling import setup_of
    from dit_bench.train.module import val_protocol

    by_step = {r["step"]: r["val_loss"] for r in curve}
    final = curve[-1] if curve and curve[-1]["step"] == plan.cfg.train.steps else {}
    spec = plan.cfg.backbone.spec()  # the preset's sizes where the sweep does not set them
    batch = plan.cfg.train.batch_size
    return {
        "point": plan.point,
        "experiment": plan.cfg.experiment,
        "config_hash": plan.cfg.hash,
        "backbone": plan.cfg.backbone.name,
        "depth": spec["depth"],
        "width": spec["hidden_size"],
        "heads": spec.get("num_heads"),
        "patch": spec.get("patch_size"),  # a U-Net has none
        "image_size": plan.image_size,
        "params": plan.num_params,
        "macs": plan.macs,
        "flops": plan.forward_flops,
        "tokens": plan.tokens,
        "batch_size": batch,
        "steps": plan.cfg.train.steps,
        "images": plan.cfg.train.steps * batch,
        "train_flops": 3 * plan.forward_flops * plan.cfg.train.steps * batch,
        "budgets": plan.budgets,
        "budget_steps": plan.budget_steps,
        "val_at_budget": [by_step.get(s) for s in plan.budget_steps],
        "curve": curve,
        "val_loss": final.get("val_loss"),
        "setup": setup_of(plan.cfg.to_dict()),  # objective, conditioning, data, seed, ...
        # how its val losses were measured (a finished run's summary.json's, `run_val_protocol`):
        # a study continued by a later version holds trials of both, which the scaling report
        # names
        **val_protocol(OBJECTIVES[plan.cfg.objective.name]),
        # the in-training FD at the last step, where eval.fd_every measured one
        **{k: v for k, v in final.items() if k.startswith(("val_FD-", "val_FID"))},
    }


class _Heartbeat:
    """Records the running trial's heartbeat every `interval` seconds from a daemon thread."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # a lost beat is retried at the next interval
                print(f"[sweep] heartbeat failed: {e}", file=sys.stderr)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Worker:
    """One worker process's loop over the study: claim a waiting trial (or make one), run it,
    tell the result; until no trial is waiting or running."""

    sweep: Sweep
    storage_url: str
    out: Path
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    progress: bool | str = False  # train()'s: spawned workers show lines, not bars
    poll: float = 2.0
    log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr, flush=True))
    started: float = field(default_factory=time.perf_counter)
    local_workers: int = 1  # workers sharing this machine's CPU threads
    # trial id -> time.monotonic() when this worker first saw it RUNNING without a heartbeat
    _unbeaten_since: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    # (time.time(), time.monotonic()) at the last look for stale trials, and the monotonic time
    # before which none is failed (`_fail_stale_trials`)
    _clocks: tuple[float, float] | None = field(default=None, init=False, repr=False)
    _stale_after: float = field(default=0.0, init=False, repr=False)

    def run(self, n_trials: int | None = None) -> int:
        """Run trials until the study is done; returns the number this worker finished."""
        import optuna

        # the training imports take seconds: made before any trial is started, where a trial
        # would sit RUNNING between its first heartbeat and the next, and counted in the
        # worker's start (worker_start_s), not in its first trial
        import dit_bench.train.run  # noqa: F401

        self.study, rdb = open_study(self.sweep, self.storage_url)
        self.storage = self.study._storage  # Optuna's (cached) view of `rdb`: keep one view
        self.claims = Claims(rdb, self.study._study_id, self.name)
        n_trials = n_trials or self.sweep.spec.n_trials
        self.record_request(n_trials)
        done, waiting = 0, False
        while True:
            self._beat_for_orphans()
            self._fail_stale_trials()
            pending = self._expire_lost_claims()
            self._enqueue_grid(n_trials)
            self._retry_failed()
            trial = self._pop_waiting() or self._new_trial(n_trials)
            if trial is None:
                trials = self.study.get_trials(deepcopy=False)
                states = {t.state for t in trials}
                active = {optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING}
                # a trial failed (stopped, or failed as stale by another worker) since this
                # poll's _retry_failed: the next poll re-queues it
                retries = set(self.claims.keys("retry:"))
                unretried = sum(
                    t.state == optuna.trial.TrialState.FAIL
                    and f"retry:{t.number}" not in retries
                    and self._retryable(t)
                    for t in trials
                )
                # others are running (or died: wait for their trials to go stale), or a claim
                # was made whose trial is not enqueued yet (or whose worker died: it expires)
                if states & active or pending or unretried:
                    if not waiting:
                        counts = {
                            what: sum(t.state == state for t in trials)
                            for what, state in (
                                ("running", optuna.trial.TrialState.RUNNING),
                                ("starting", optuna.trial.TrialState.WAITING),
                            )
                        }
                        counts["claimed, not yet enqueued"] = pending
                        counts["failed, due a retry"] = unretried
                        what = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
                        self.log(
                            f"[sweep {self.name}] waiting on other workers' trials ({what}; a "
                            "dead worker's trial is re-queued after "
                            f"{self.sweep.spec.heartbeat.grace} s without a heartbeat)"
                        )
                        waiting = True
                    time.sleep(self.poll)
                    continue
                return done
            self._run(trial)
            done, waiting = done + 1, False

    def record_request(self, n_trials: int | None) -> None:
        """This call's n_trials (and a grid's size) on the study: the report counts the trials
        never started against the latest call's request. The trials' own record of it said
        nothing of a grid cut short by --n-trials, nor of a later call asking for fewer (it
        made no trial to record it)."""
        grid = len(self.sweep.points()) if self.sweep.spec.sampler == "grid" else None
        self.study.set_user_attr("requested", {"n_trials": n_trials, "grid_points": grid})

    def _fail_stale_trials(self) -> None:
        """Optuna's failing of running trials without a heartbeat for the grace, held for one
        grace after this machine's wall clock jumped ahead of its monotonic one (a laptop's
        suspend, an NTP step). A study on this machine (SQLite) ages heartbeats by that wall
        clock: on resume every live trial's last beat looked as old as the suspend, and the
        first worker to look failed them all as lost (a retry spent each) before their
        workers beat again, within an interval. One still without a beat after the hold is
        failed as before; a study on a database elsewhere, whose clock did not jump, fails a
        suspended machine's trials meanwhile anyway, from its other machines' workers."""
        import optuna

        beat = self.sweep.spec.heartbeat
        wall, now = time.time(), time.monotonic()
        if self._clocks is not None:
            # a jump under the interval leaves a live beat younger than the grace
            if (wall - self._clocks[0]) - (now - self._clocks[1]) > beat.interval:
                self._stale_after = now + beat.grace
        self._clocks = (wall, now)
        if now < self._stale_after:
            return
        with warnings.catch_warnings():  # "experimental" in Optuna; its API is what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def _beat_for_orphans(self) -> None:
        """A heartbeat for each trial RUNNING without one for over the grace: Optuna fails as
        stale only trials with a heartbeat, so such a trial kept every worker waiting for good.
        Earlier versions made tpe/random trials RUNNING before their first heartbeat, and a
        worker killed in between left one; one grace after this beat it is failed and retried.
        The grace is timed from when this worker first saw the trial without a heartbeat, on
        its own monotonic clock: the trial's start time is its starting worker's wall clock,
        which may stand hours from this one's (a clock behind left an orphan unbeaten for as
        long)."""
        import optuna

        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        beating: set[int] = set()
        if running:
            ids = ",".join(str(int(t._trial_id)) for t in running)
            with self.claims.engine.connect() as conn:
                query = f"SELECT trial_id FROM trial_heartbeats WHERE trial_id IN ({ids})"
                beating = {r for (r,) in conn.exec_driver_sql(query)}
        now = time.monotonic()
        unbeaten = {t._trial_id: t for t in running if t._trial_id not in beating}
        self._unbeaten_since = {
            i: self._unbeaten_since.get(i, now) for i in unbeaten
        }  # forgets trials that ended or got a heartbeat
        for i, t in unbeaten.items():
            if now - self._unbeaten_since[i] > self.sweep.spec.heartbeat.grace:
                self.storage.record_heartbeat(i)
                del self._unbeaten_since[i]
                self.log(f"[sweep {self.name}] trial {t.number} ran without a heartbeat: given one")

    # -- which trial next -------------------------------------------------------------------
    def _enqueue_grid(self, n_trials: int | None) -> None:
        if self.sweep.spec.sampler != "grid":
            return
        claimed = set(self.claims.keys("point:"))  # one read, not an INSERT a point each poll
        for params in self.sweep.points()[:n_trials]:
            key = point_key(params)
            if key not in claimed:
                self._claim_and_enqueue(key, params, {"attempt": 1})

    def _claim_and_enqueue(self, key: str, params: dict, user_attrs: dict) -> bool:
        """Claim `key`, then enqueue the trial it stands for (tagged with the key's name), a
        stop during the enqueue held until it returns. The claim is kept if the enqueue fails:
        the trial may be stored all the same (a lost acknowledgement), and a claim without its
        trial expires."""
        if not self.claims.claim(key):  # a stop here: no claim, or one that will expire
            return False
        with stops_deferred():
            self.study.enqueue_trial(params, user_attrs=user_attrs)
        return True

    def _expire_lost_claims(self) -> int:
        """Claims whose trial is not in the study: the worker died, or its database call
        failed, between the claim and the enqueue (two transactions). Those older than the
        heartbeat grace are deleted, so the point, retry or slot is claimed and enqueued again
        (`_enqueue_grid`, `_retry_failed`, `_new_trial`); returns how many are younger (their
        workers may still enqueue them: the sweep is not done). The trials are read before the
        claims: a claim made and enqueued in between looks lost, but is young."""
        trials = self.study.get_trials(deepcopy=False)
        made = {claim_key(t) for t in trials}
        # trials of tpe/random sweeps made before slots were tagged: each stands for a slot
        untagged = sum(claim_key(t) is None for t in trials)
        lost = [k for k in self.claims.keys("point:") + self.claims.keys("retry:") if k not in made]
        slots = sorted(self.claims.keys("slot:"), key=lambda k: int(k.split(":")[1]))
        lost += [k for k in slots if k not in made][untagged:]
        pending = 0
        grace = self.sweep.spec.heartbeat.grace
        for key in lost:
            if self.claims.expire(key, grace):
                self.log(
                    f"[sweep {self.name}] {key} was claimed but its trial not enqueued within "
                    f"{grace} s (its worker died or stalled); claimed again"
                )
            else:
                pending += 1
        return pending

    def _retry_failed(self) -> None:
        """Enqueue again, once, each trial that failed because its worker died or was stopped
        (not one whose training raised an error: that would fail again). Workers lost
        (killed, out of memory) count towards heartbeat.max_retry; a stop the user asked for
        (Ctrl-C, SIGTERM: a preemption) does not, so a rerun always finishes the sweep."""
        import optuna

        claimed = set(self.claims.keys("retry:"))  # one read, not an INSERT a trial each poll
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            if f"retry:{t.number}" in claimed or not self._retryable(t):
                continue
            attempt = t.user_attrs.get("attempt", 1)
            stopped = t.user_attrs.get("interrupted", False)
            # its grid point (a trial lost before `suggest` drew nothing), and what it drew
            params = {**t.system_attrs.get("fixed_params", {}), **t.params}
            again = attempt if stopped else attempt + 1
            attrs = {"attempt": again, "retry_of": t.number}
            if self._claim_and_enqueue(f"retry:{t.number}", params, attrs):
                why = "stopped" if stopped else "worker lost"
                self.log(f"[sweep {self.name}] trial {t.number} failed ({why}); re-queued")

    def _retryable(self, t) -> bool:
        """Whether failed trial `t` is re-queued: lost or stopped, not erroring, retries left."""
        if "error" in t.user_attrs:
            return False
        stopped = t.user_attrs.get("interrupted", False)
        return stopped or t.user_attrs.get("attempt", 1) <= self.sweep.spec.heartbeat.max_retry

    def _pop_waiting(self):
        """Claim a waiting trial (`run:<trial id>`) and set it RUNNING. A worker that dies
        between the two leaves a claimed trial that is still WAITING, with no heartbeat to go
        stale: its claim expires after the heartbeat grace period, as a running trial without
        heartbeats would, and the next worker takes the trial. Setting RUNNING takes a moment,
        so a live claimant is long done (or, delayed past the grace, finds the trial taken:
        Optuna sets RUNNING only from WAITING)."""
        import optuna

        grace = self.sweep.spec.heartbeat.grace
        trials = self.study.get_trials(deepcopy=False)
        for t in trials:
            if t.state != optuna.trial.TrialState.WAITING:
                continue
            key = f"run:{t._trial_id}"
            if not self.claims.claim(key):
                if not (self.claims.expire(key, grace) and self.claims.claim(key)):
                    continue
                self.log(
                    f"[sweep {self.name}] trial {t.number} was claimed but not started for "
                    f"over {grace} s (its worker died); taking it"
                )
            first = duplicate_of(t, trials)
            if first is not None:
                # a worker that stalled past the grace here finds it dropped by another
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    self._drop_duplicate(t, first)
                continue
            started = False
            try:
                # a heartbeat before RUNNING: a running trial without one is never stale, so a
                # worker dying right after the next line would leave it RUNNING for good
                self.storage.record_heartbeat(t._trial_id)
                started = self.storage.set_trial_state_values(
                    t._trial_id, state=optuna.trial.TrialState.RUNNING
                )
                if started:
                    return optuna.Trial(self.study, t._trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            except KeyboardInterrupt:
                if not started:  # still WAITING: another worker may start it now
                    self.claims.release(key)
                    raise
                # RUNNING already: failed as stopped, as `_run` does, not left to go stale
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    self.storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                    self.storage.set_trial_state_values(
                        t._trial_id, state=optuna.trial.TrialState.FAIL
                    )
                raise
            except BaseException:  # the trial stays WAITING: another worker may start it now
                if not started:
                    self.claims.release(key)
                raise
        return None

    def _drop_duplicate(self, t, first: int) -> None:
        """Fail waiting trial `t`, which repeats trial `first`: a worker stalled past the grace
        between its claim and the enqueue, so another made the claim again (both enqueued).
        Not retried, and not a failure of the sweep (`failed_for_good` leaves it out)."""
        import optuna

        self.storage.set_trial_user_attr(t._trial_id, "duplicate_of", first)
        self.storage.set_trial_user_attr(
            t._trial_id, "error", f"duplicate of trial {first} (enqueued twice), not run"
        )
        self.storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
        self.log(f"[sweep {self.name}] trial {t.number} repeats trial {first}: not run")

    def _new_trial(self, n_trials: int | None):
        """tpe/random: a new trial while fewer than n_trials slots are taken (`slot:<k>`), then
        started as a waiting one is. Made WAITING, its slot in its user attributes (one
        transaction), and started by `_pop_waiting` (a heartbeat, then RUNNING): a worker
        stopped or killed anywhere in between leaves no RUNNING trial without a heartbeat,
        which would never go stale and keep every worker waiting for good."""
        if self.sweep.spec.sampler == "grid":
            return None
        taken = set(self.claims.keys("slot:"))
        for k in range(n_trials or 0):
            # n_trials on each: the report counts the slots of the latest call never started
            if f"slot:{k}" not in taken and self._claim_and_enqueue(
                f"slot:{k}", {}, {"attempt": 1, "slot": k, "n_trials": n_trials}
            ):
                return self._pop_waiting()  # this one, or one another worker made
        return None

    # -- one trial ------------------------------------------------------------------------
    def _run(self, trial) -> None:
        """Run `trial`. A stop anywhere in it (Ctrl-C, SIGTERM: the imports, the plan, the
        training, the records) fails it as stopped, re-run by the next call without counting
        against heartbeat.max_retry; left RUNNING, it went stale as a lost worker's."""
        import optuna

        try:
            self._run_trial(trial)
        except KeyboardInterrupt:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                trial.set_user_attr("interrupted", True)  # a retry candidate, like a kill
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        except OSError as e:
            if not out_of_room(e):
                raise
            # A full disk (a quota, a file-size limit) fails every trial after this one too,
            # each for good (a training error is not retried): the sweep stops instead, the
            # trial failed as stopped, and the same command, run again with room made, re-runs
            # it from its run's last checkpoint. A study on that disk may refuse the mark:
            # then the trial goes stale, and is retried as a lost worker's.
            with contextlib.suppress(Exception):
                trial.set_user_attr("interrupted", True)
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.log(
                f"[sweep {self.name}] trial {trial.number} stopped: {e}; make room, then run "
                "the same command again to resume it"
            )
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            if not self._taken_over(trial):
                raise
            # failed as stale (this worker paused or slow past the grace) and re-queued
            self.log(
                f"[sweep {self.name}] trial {trial.number} was failed as lost by another "
                "worker; left to its retry"
            )

    def _run_trial(self, trial) -> None:
        import optuna

        from dit_bench.train.callbacks import ValAtSteps
        from dit_bench.train.run import find_run_dir, train

        t0 = time.perf_counter()
        state, value = optuna.trial.TrialState.FAIL, None
        with _Heartbeat(self.storage, trial._trial_id, self.sweep.spec.heartbeat.interval):
            try:
                plan = self.sweep.plan(suggest(trial, self.sweep))
            except ConfigError as e:
                # A point inside a range that no model has (validate checks only the corners):
                # the trial fails with its error, so it is not retried, and the worker goes on.
                error = f"ConfigError: {e}"
                trial.set_user_attr("error", error)
                self.study.tell(trial, state=state)
                self.log(f"[sweep {self.name}] trial {trial.number} fail: {error}")
                return
            if plan.cfg.train.threads is None:
                from dit_bench.fast import cpu_threads_per_worker

                if (share := cpu_threads_per_worker(self.local_workers)) is not None:
                    plan = _with_threads(plan, share)
            trial.set_user_attr("worker", self.name)
            trial.set_user_attr("config_hash", plan.cfg.hash)
            trial.set_user_attr("config", plan.cfg.to_dict())
            trial.set_user_attr("model", model_key(plan))  # whom the pruner compares it with
            reported: set[int] = set()
            index = {s: i for i, s in enumerate(plan.budget_steps)}
            taken_over = False  # the trial was failed as stale and re-queued (see _taken_over)

            def on_val(step: int, metrics: dict[str, float]) -> None:
                nonlocal taken_over
                if step in index and index[step] not in reported and not taken_over:
                    try:
                        trial.report(metrics["val/loss"], step=index[step])
                    except optuna.exceptions.UpdateFinishedTrialError:
                        taken_over = True  # train on: the retry waits for this run, then has it
                        return
                    reported.add(index[step])
                    if step < plan.cfg.train.steps and trial.should_prune():
                        raise optuna.TrialPruned(
                            f"pruned at budget {plan.budgets[index[step]]:.3g} (step {step} of "
                            f"{plan.cfg.train.steps})"
                        )

            tracker = ValAtSteps(plan.budget_steps, on_val=on_val)
            self.log(
                f"[sweep {self.name}] trial {trial.number} {plan.point}: params "
                f"{plan.num_params:,}, {plan.cfg.train.steps} steps"
            )
            setup_s = time.perf_counter() - t0
            error = pruned = None
            try:
                run = train(
                    plan.cfg,
                    self.out,
                    progress=self.progress,
                    label=f"sweep trial {trial.number} {plan.point}",
                    callbacks=[tracker],
                )
                state = optuna.trial.TrialState.COMPLETE
            except optuna.TrialPruned as e:
                state, pruned = optuna.trial.TrialState.PRUNED, str(e)
            except OSError as e:
                if out_of_room(e):
                    raise  # the sweep stops (`_run`): it would fail every trial after this one
                error = f"{type(e).__name__}: {e}"
            except Exception as e:  # the trial fails; the sweep goes on
                error = f"{type(e).__name__}: {e}"
                if not isinstance(e, USER_ERRORS):  # a bug: the where, for the one who debugs
                    self.log(traceback.format_exc().rstrip())
            if taken_over or self._taken_over(trial):
                retried = trial.user_attrs.get("attempt", 1) <= self.sweep.spec.heartbeat.max_retry
                self.log(
                    f"[sweep {self.name}] trial {trial.number} was failed as lost by another "
                    f"worker while this one trained (no heartbeat for over "
                    f"{self.sweep.spec.heartbeat.grace} s: a paused process?); "
                    + (
                        "its run is left to the retry, which resumes or finds it done"
                        if retried
                        else "no retry is left (heartbeat.max_retry): its result stays out of "
                        "the study"
                    )
                )
                return
            run = find_run_dir(self.out, plan.cfg)
            record = trial_record(plan, read_curve(run, plan) if run else [])
            for i, v in enumerate(record["val_at_budget"]):
                if v is not None and i not in reported:
                    trial.report(v, step=i)  # values of a resumed run's earlier budgets
            value = record["val_loss"]
            if state == optuna.trial.TrialState.COMPLETE and value is None:
                state, error = optuna.trial.TrialState.FAIL, "no final val loss"
            elif state == optuna.trial.TrialState.COMPLETE and not math.isfinite(value):
                # Optuna would make a NaN value FAIL with no error, which _retry_failed takes
                # for a lost worker and re-runs; a diverged run diverges again: no retry
                state = optuna.trial.TrialState.FAIL
                error = f"final val loss {value} is not finite (the run diverged)"
            wall = time.perf_counter() - t0
            timing = {
                "wall_s": wall,
                "setup_s": setup_s,
                "train_steps_s": tracker.step_seconds,
                "train_loop_s": tracker.loop_seconds,
                "budget_val_s": tracker.val_seconds,
                "overhead_s": wall - tracker.step_seconds,
                "overhead_excl_val_s": wall - tracker.step_seconds - tracker.val_seconds,
                "harness_s": wall - tracker.loop_seconds - tracker.val_seconds,
                "worker_start_s": self.started_to_first(t0),
            }
            summary = run_summary(run)
            record.update(
                run_dir=str(run) if run else None,
                timing=timing,
                device=run_device(summary, plan.cfg),
                **run_val_protocol(summary, tracker),
            )
            if error:
                record["error"] = error
            for k, v in record.items():
                trial.set_user_attr(k, v)
            if run is not None:
                write_json_atomic(
                    run / "trial.json",
                    {
                        "study": self.study.study_name,
                        "storage": redact(self.storage_url),
                        "trial": trial.number,
                        "trial_params": plan.params,
                        "state": state.name,
                        "attempt": trial.user_attrs.get("attempt", 1),
                        **record,
                    },
                    default=str,
                )
                write_json_atomic(
                    run / "labels.json",
                    {"variant": plan.point, "sweep": self.sweep.spec.name, "trial": trial.number},
                )
        if state == optuna.trial.TrialState.COMPLETE:
            self.study.tell(trial, value)
        else:
            self.study.tell(trial, state=state)
        done = state == optuna.trial.TrialState.COMPLETE
        # a pruned trial's budget: "trial 3 pruned: pruned" said neither where nor how far
        msg = f"val loss {value:.5f}" if done else (error or pruned or state.name.lower())
        self.log(
            f"[sweep {self.name}] trial {trial.number} {state.name.lower()}: {msg} ({wall:.1f} s)"
        )

    def _taken_over(self, trial) -> bool:
        """Whether `trial` is no longer this worker's: another worker failed it as stale (no
        heartbeat within the grace, e.g. this process was paused) and re-queued it. Its state
        is final then, and Optuna refuses every later write to it."""
        return self.storage.get_trial(trial._trial_id).state.is_finished()

    def started_to_first(self, t0: float) -> float | None:
        """Process start to this worker's first trial (imports, storage), once per worker."""
        if getattr(self, "_first_done", False):
            return None
        self._first_done = True
        return t0 - self.started


def point_key(params: dict) -> str:
    """The claim of a grid point (its parameters), made once per sweep."""
    return "point:" + json.dumps(params, sort_keys=True)


def claim_key(t) -> str | None:
    """The claim that made trial `t`: `retry:<n>`, `slot:<k>` (tpe/random) or `point:<json>`
    (a grid point), as `Worker` writes them; None for a trial made before slots were tagged."""
    if "retry_of" in t.user_attrs:
        return f"retry:{t.user_attrs['retry_of']}"
    if "slot" in t.user_attrs:
        return f"slot:{t.user_attrs['slot']}"
    if "fixed_params" in t.system_attrs:
        return point_key(t.system_attrs["fixed_params"])
    return None


def duplicate_of(t, trials) -> int | None:
    """The number of an earlier trial that `t` repeats (the same claim: grid point, retry or
    slot, enqueued twice when a claim expired under a stalled worker), or None. Trial numbers
    are the study's order, so every worker picks the same one to keep."""
    key = claim_key(t)
    if key is None:
        return None
    order = (t.number, t._trial_id)  # the id breaks a tie, should numbers ever share one
    earlier = [u for u in trials if (u.number, u._trial_id) < order and claim_key(u) == key]
    return earlier[0].number if earlier else None


def failure(trial, max_retry: int) -> str:
    """One line on a failed trial no retry replaced: its point and why (its error, or how
    often its worker was lost)."""
    attempt = trial.user_attrs.get("attempt", 1)
    stopped = trial.user_attrs.get("interrupted", False)
    why = trial.user_attrs.get(
        "error",
        f"its worker was lost {attempt} times (heartbeat.max_retry={max_retry} retries spent)"
        if attempt > max_retry and not stopped
        else f"{'it was stopped' if stopped else 'its worker was lost'} (attempt {attempt}), "
        "not re-queued yet: run the same command again to retry it",
    )
    # a trial lost before it drew its parameters has none: its grid point, if any
    params = trial.params or trial.system_attrs.get("fixed_params", {})
    point = ",".join(f"{k}={v}" for k, v in params.items())
    return f"trial {trial.number} {point} failed: {why}"


def _with_threads(plan: TrialPlan, threads: int) -> TrialPlan:
    # train.threads is an execution key: it does not change the config hash
    cfg = build_config(apply_overrides(plan.cfg.to_dict(), [f"train.threads={threads}"]))
    return TrialPlan(**{**plan.__dict__, "cfg": cfg})


# -- launching workers ----------------------------------------------------------------------------
def _worker_main(
    spec, source, overrides, storage_url, out, n_trials, gpu, workers, progress, ready
) -> None:
    from dit_bench.train.run import exit_with_parent

    ready.set()  # past the start: a worker that dies before this died importing __main__
    started = time.perf_counter()
    exit_with_parent()
    # the parent passes a SIGTERM on: stop as Ctrl-C does (a trial in flight is failed as
    # stopped and re-run by the next call), also between trials, not die where it stands
    signal.signal(signal.SIGTERM, raise_terminated)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    sweep = Sweep(SweepSpec.model_validate(spec), source, tuple(overrides))
    # the workers share one output: lines (`ProgressLines`), each naming its trial, not bars
    try:
        Worker(
            sweep,
            storage_url,
            Path(out),
            progress="lines" if progress else False,
            started=started,
            local_workers=workers,
        ).run(n_trials)
    except KeyboardInterrupt:  # its trial is failed as stopped; the parent says what to do
        sys.exit(130)
    except OSError as e:
        if not out_of_room(e):
            raise
        # its trial's line named the file and what to do (`Worker._run`); a traceback after
        # it, in each worker, buried that line
        sys.exit(NO_ROOM_EXIT)


NO_ROOM_EXIT = 2  # a worker stopped by a full disk (a user error's exit status, as commands')


@optuna_settings_kept()
def run_sweep(
    sweep: Sweep,
    out: str | Path = "runs",
    *,
    storage: str | None = None,
    workers: int | None = None,
    n_trials: int | None = None,
    progress: bool = True,
):
    """Run the sweep to completion with `workers` local processes; returns the study.

    One worker runs in this process; several are spawned (one per GPU when there are GPUs),
    and this process waits for them.
    Stop it anywhere and run the same command again: finished trials stay, killed ones re-run
    and resume their run directories.
    """
    import multiprocessing as mp

    import optuna

    sweep.validate()
    from dit_bench.config import check_installed

    # each trial would fail at its start, and be re-queued
    check_installed(build_config(sweep.base_raw()).train.loggers)
    out = Path(out)
    storage = storage or default_storage(sweep, out)
    workers = workers or sweep.spec.workers
    open_study(sweep, storage)  # created once here, before workers race to create it
    if workers == 1:
        Worker(sweep, storage, out, progress=progress).run(n_trials)
    else:
        gpus = _gpu_count()
        ctx = mp.get_context("spawn")
        procs, ready = [], [ctx.Event() for _ in range(workers)]
        for i in range(workers):
            args = (
                sweep.spec.model_dump(mode="json"),
                sweep.source,
                list(sweep.overrides),
                storage,
                str(out),
                n_trials,
                i % gpus if gpus else None,
                workers,
                progress,
                ready[i],
            )
            procs.append(ctx.Process(target=_worker_main, args=args, name=f"sweep-worker-{i}"))
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated):  # Ctrl-C reached the workers too; a SIGTERM this one
                for p in procs:
                    if p.is_alive():
                        p.terminate()
            # for them to fail their trials as stopped; monotonic: a wall clock stepped ahead
            # (NTP) had them killed at once, their trials left to go stale (a retry spent each)
            deadline = time.monotonic() + 30
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
            for p in procs:
                if p.is_alive():  # a killed trial goes stale and re-runs on the next call
                    p.kill()
            raise
        full = sum(p.exitcode == NO_ROOM_EXIT for p in procs)
        bad = [p.exitcode for p in procs if p.exitcode and p.exitcode != NO_ROOM_EXIT]
        if full:
            print(
                f"[sweep] {full} of {workers} workers stopped: no room to write (above); make "
                "room, then run the same command again",
                file=sys.stderr,
            )
        if bad and not any(r.is_set() for r in ready):
            # every worker died in spawn's start, re-running the caller's __main__: a script
            # calling run_sweep at its top level, where each worker would start workers again
            raise RuntimeError(
                f"the sweep's {workers} worker processes died as they started, before any "
                "trial (their errors are above); from a script, call run_sweep with workers > 1 "
                'under `if __name__ == "__main__":` (each worker imports the script again)'
            )
        if bad:  # the others re-queue a dead worker's trial: the study says what is left
            then = (
                "the others took over their trials"
                if len(bad) + full < workers
                else "their trials are left to the next call of the same command"
            )
            print(
                f"[sweep] {len(bad)} of {workers} workers died (exit codes {bad}); {then}",
                file=sys.stderr,
            )
    return optuna.load_study(
        study_name=sweep.study_name, storage=make_storage(storage, sweep.spec.heartbeat)
    )


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def summarize(study) -> str:
    import optuna

    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    lines = [
        f"study {study.study_name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    ]
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in sorted(done, key=lambda t: t.value)[:5]:
        lines.append(f"  trial {t.number:3d} {t.user_attrs.get('point', t.params)}: {t.value:.5f}")
    return "\n".join(lines)
