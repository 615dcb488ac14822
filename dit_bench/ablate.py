"""Ablation files -> runs -> one results table.

An ablation file (`ablations/*.yaml`) is data, not code:

```yaml
name: conditioning                  # runs go to <out>/<name>-<profile>/
description: DiT Figure 5 ...
base: {...}                         # an experiment config, the schema of `dit-bench train` files
base_variant: adaln_zero            # what every other variant is compared with (default: first)
variants:                           # name -> dotted keys overriding the base (one level)
  adaln_zero: {}
  adaln: {backbone.conditioning: adaln}
seeds: [0, 1, 2]
metrics: [val_loss]                 # final metrics the report compares (summary.json keys or
                                    # metrics.csv columns, `/` written `_`); lower is better
reference:                          # optional: a published ranking the report checks against
  source: DiT Fig. 5 (FID-50K, XL/2, 400K steps)
  ranking: [adaln_zero, adaln, cross_attn, in_context]     # best first
profiles:                           # how big: cpu (minutes here) and gpu (paper scale)
  cpu:
    description: ...
    set: {train.steps: 600}         # dotted keys applied to the base
    variants: {mmdit: {backbone.depth: 4}}   # per-variant keys of this profile only
    seeds: [0, 1, 2]                # optional, replaces the file's seeds
    metrics: [val_loss, val_FID]    # optional, replaces the file's metrics (an FD metric must
                                    # be the one the runs log: val_FD-<net>, or val_FID)
```

A run's config is, in order: base, profile `set`, the variant's keys (the profile's own keys for
that variant last), `--set` items from the command line, `seed`; `experiment` is
`<name>-<profile>`. There is no inheritance beyond that one level. The profile's `set` is a
layer of its own: a variant's `objective.name` starts that section afresh from it, and its
`backbone.name` drops a conditioning scheme the new family lacks (sizes given stay: they
override whatever preset is named).

Running reuses `train()`: runs are named by config hash, so a finished run is skipped and an
interrupted one resumes exactly; the ablation adds only `labels.json` (variant, seed, ablation)
in each run directory, `ablation.json` (the plan) and `results.{csv,parquet}` (one row per run)
in `<out>/<name>-<profile>/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dit_bench.config import (
    EXECUTION_KEYS,
    HASHED_AS_DEFAULT,
    USER_ERRORS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    experiment_error,
    parse_override,
    read_yaml,
    section_replacement_error,
    shipped_or_given,
    unknown_key,
    yaml_kind,
)
from dit_bench.files import (
    NAME_MAX,
    locked,
    out_of_room,
    read_record,
    windows_name_error,
    write_json_atomic,
)

FILE_KEYS = {
    "name",
    "description",
    "base",
    "base_variant",
    "variants",
    "seeds",
    "metrics",
    "reference",
}
FILE_KEYS_REQUIRED = {"name", "base", "variants", "profiles"}
NAME = re.compile(r"[A-Za-z0-9_.-]+")
VARIANT_MAX = NAME_MAX - len(".png")  # a variant names samples/<variant>.png of the report
METRIC = re.compile(r"train_loss|val_loss(_l\d+)?|val_FD-[A-Za-z0-9-]+|val_FID")
PROFILE_KEYS = {"description", "set", "variants", "seeds", "metrics"}
# keys left out of a run's hash: two variants differing only in them are one config
EXECUTION_KEY_NAMES = {f"{s}.{k}" for s, k, *_ in (*EXECUTION_KEYS, *HASHED_AS_DEFAULT)}


@dataclass(frozen=True)
class PlannedRun:
    index: int  # 1-based position in the plan
    variant: str
    seed: int
    cfg: ExperimentConfig

    @property
    def labels(self) -> dict[str, Any]:
        return {"variant": self.variant, "seed": self.seed}


@dataclass(frozen=True)
class Ablation:
    name: str
    profile: str
    description: str
    profile_description: str
    base_variant: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    runs: tuple[PlannedRun, ...]
    source: str = ""
    overrides: tuple[str, ...] = field(default=())
    reference: dict[str, Any] | None = None
    profile_seeds: tuple[int, ...] = ()  # the file's (or profile's) own, which --seeds replaces

    @property
    def experiment(self) -> str:
        return f"{self.name}-{self.profile}"

    def plan_record(self) -> dict[str, Any]:
        """What `ablation.json` holds: the report reads variant order, base and metrics here."""
        return {
            "name": self.name,
            "profile": self.profile,
            "experiment": self.experiment,
            "description": self.description,
            "profile_description": self.profile_description,
            "base_variant": self.base_variant,
            "variants": list(self.variants),
            "seeds": list(self.seeds),
            "profile_seeds": list(self.profile_seeds),
            "metrics": list(self.metrics),
            "source": self.source,
            "overrides": list(self.overrides),
            "reference": self.reference,
            "runs": [
                {"variant": r.variant, "seed": r.seed, "config_hash": r.cfg.hash} for r in self.runs
            ],
            # each variant's config with its seed left out: which runs belong to this plan
            "variant_configs": {r.variant: unseeded_hash(r.cfg) for r in self.runs},
        }


def unseeded_hash(cfg: ExperimentConfig) -> str:
    """The config hash with the seed set to 0: one value for every seed of a variant."""
    return cfg.model_copy(update={"seed": 0}).hash


# -- loading ------------------------------------------------------------------------------------
def _err(source: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {msg}")


def _dotted(raw: Any, where: str, source: str) -> dict[str, Any]:
    """A variant / profile `set` block: a mapping of dotted keys (one level) to values."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _err(source, f"{where} must be a mapping of dotted keys to values, got {raw!r}")
    for key, value in raw.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            raise _err(source, f"{where}: bad key {key!r} (expected e.g. backbone.conditioning)")
        if problem := section_replacement_error(key, value):
            raise _err(source, f"{where}: {problem}")
        if key in ("seed", "experiment"):  # set per run by the ablation (after these keys)
            raise _err(source, f"{where}: {key} is set by the ablation (seeds: the file's `seeds`)")
    return dict(raw)


def _metrics(raw: Any, where: str, source: str) -> list[str]:
    if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw):
        raise _err(source, f"{where} must be a non-empty list of metric names, got {raw!r}")
    for m in raw:
        if not METRIC.fullmatch(m):
            raise _err(
                source,
                f"{where}: unknown {m!r}; a metric is val_loss, val_loss_l<k> (one noise "
                "level), train_loss, val_FD-<features> or val_FID (with eval.fd_every)",
            )
    return raw


def fd_metric(cfg: ExperimentConfig) -> str | None:
    """The summary key of a run's in-training FD (eval.fd_every), or None without one."""
    from dit_bench.metrics.features import default_features, fd_metric_prefix

    if not cfg.eval.fd_every:
        return None
    return f"val_{fd_metric_prefix(cfg.eval.fd_features or default_features(cfg.data.name))}"


def fd_column(cfg: ExperimentConfig) -> str | None:
    """The metrics.csv column of a run's in-training FD (val/FD-<net>, val/FID), or None."""
    fd = fd_metric(cfg)
    return fd.replace("_", "/", 1) if fd else None


def val_levels(cfg: ExperimentConfig) -> int:
    """How many noise levels a run's validation grid has (its val_loss_l<k> columns)."""
    from dit_bench.objectives import OBJECTIVES

    return cfg.eval.val_levels or OBJECTIVES[cfg.objective.name].VAL_LEVELS


def _seeds(raw: Any, where: str, source: str) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        # `seeds: 3` reads as "three seeds" and ran one, seed 3: a report without error bars
        count = ", ".join(map(str, range(raw))) if raw <= 5 else f"0, 1, ..., {raw - 1}"
        raise _err(
            source,
            f"{where}: {raw} is one number, not a list of seeds; write [{raw}] for seed {raw} "
            "alone" + (f", or [{count}] for {raw} seeds" if raw > 1 else ""),
        )
    if (
        not isinstance(raw, list)
        or not raw
        or any(isinstance(s, bool) or not isinstance(s, int) for s in raw)
    ):
        raise _err(source, f"{where} must be a non-empty list of integers, got {raw!r}")
    if len(set(raw)) != len(raw):
        raise _err(source, f"{where} has repeated seeds: {raw}")
    return tuple(raw)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2` (or `0-4`) -> (0, 1, 2)."""
    try:
        if "-" in text.strip("-") and "," not in text:
            lo, hi = text.split("-", 1)
            return tuple(range(int(lo), int(hi) + 1))
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected e.g. 0,1,2 or 0-4") from None


def _override_items(keys: dict[str, Any]) -> list[str]:
    # values go through JSON, which YAML parses back exactly (parse_override uses safe_load)
    return [f"{k}={json.dumps(v)}" for k, v in keys.items()]


def load_ablation(
    path: str | Path,
    profile: str = "cpu",
    *,
    seeds: Sequence[int] | None = None,
    overrides: Sequence[str] = (),
) -> Ablation:
    """Read, expand and validate an ablation file: every run's config is built (and so checked)
    here, before anything trains. Errors name the file, the variant and the key. A shipped
    file's relative path reads the installed copy from any folder (`shipped_or_given`)."""
    path = shipped_or_given(path)
    source = str(path)
    raw = read_yaml(path)
    unknown = set(raw) - FILE_KEYS - FILE_KEYS_REQUIRED
    if unknown:
        allowed = ", ".join(sorted(FILE_KEYS | FILE_KEYS_REQUIRED))
        raise _err(source, f"unknown keys {sorted(unknown)}; allowed: {allowed}")
    missing = FILE_KEYS_REQUIRED - set(raw)
    if missing:
        raise _err(source, f"missing keys {sorted(missing)}")
    name = raw["name"]
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise _err(source, f"name must be letters, digits, - or _, got {name!r}")
    base = raw["base"] or {}
    if not isinstance(base, dict):
        raise _err(source, "base must be a mapping (an experiment config)")
    if "experiment" in base or "seed" in base:
        raise _err(source, "base: leave out `experiment` and `seed` (the ablation sets them)")
    variants_raw = raw["variants"]
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise _err(source, "variants must be a non-empty mapping name -> dotted overrides")
    for v in variants_raw:  # a variant names folders and files of the report
        if kind := yaml_kind(v):  # `1e-3:` or `off:`, as the check below would have it
            raise _err(source, f"variant name {v!r}: YAML reads it as a {kind}; write it in quotes")
        if not isinstance(v, str) or not NAME.fullmatch(v):
            raise _err(source, f"variant name {v!r}: use letters, digits, '.', '-' or '_'")
        if len(v) > VARIANT_MAX:  # found by the report, after all the training
            raise _err(
                source,
                f"variant name {v!r}: {len(v)} characters; the report's samples/<variant>.png "
                f"needs a name of at most {VARIANT_MAX} (file names end at {NAME_MAX} bytes)",
            )
        if why := windows_name_error(f"{v}.png"):
            raise _err(source, f"variant name {v!r}: the report's samples/{v}.png {why}")
    folded: dict[str, str] = {}
    for v in variants_raw:  # macOS and Windows file systems ignore case: one file for both
        if (other := folded.setdefault(v.casefold(), v)) != v:
            raise _err(
                source,
                f"variant names {other!r} and {v!r} differ only in case; the report's "
                f"samples/{v}.png would be one file on macOS or Windows: rename one",
            )
    variants = {v: _dotted(keys, f"variants.{v}", source) for v, keys in variants_raw.items()}
    base_variant = raw.get("base_variant", next(iter(variants)))
    if base_variant not in variants:
        raise _err(source, f"base_variant {base_variant!r} is not a variant: {list(variants)}")
    for item in overrides:
        if parse_override(item)[0][0] in ("seed", "experiment"):
            raise _err(source, f"--set {item}: the ablation sets seed and experiment (--seeds)")

    profiles = raw["profiles"]
    if not isinstance(profiles, dict) or profile not in profiles:
        known = list(profiles) if isinstance(profiles, dict) else []
        raise _err(source, f"no profile {profile!r}; profiles: {known}")
    if why := experiment_error(f"{name}-{profile}"):
        raise _err(source, f"name and profile: the runs' folder {name}-{profile} {why}")
    prof = profiles[profile] or {}
    if not isinstance(prof, dict):
        raise _err(source, f"profiles.{profile} must be a mapping, got {prof!r}")
    bad = set(prof) - PROFILE_KEYS
    if bad:
        raise _err(
            source,
            f"profiles.{profile}: unknown keys {sorted(bad)}; allowed {sorted(PROFILE_KEYS)}",
        )
    prof_set = _dotted(prof.get("set"), f"profiles.{profile}.set", source)
    prof_variants = prof.get("variants") or {}
    if not isinstance(prof_variants, dict) or set(prof_variants) - set(variants):
        raise _err(
            source,
            f"profiles.{profile}.variants must map existing variants ({list(variants)}) "
            f"to dotted overrides",
        )
    where = f"profiles.{profile}.metrics" if "metrics" in prof else "metrics"
    metrics = _metrics(prof.get("metrics", raw.get("metrics", ["val_loss"])), where, source)
    own = _seeds(prof.get("seeds", raw.get("seeds", [0])), "seeds", source)
    if seeds is None:
        seeds = own
    else:
        seeds = _seeds(list(seeds) if isinstance(seeds, (tuple, range)) else seeds, "seeds", source)

    for item in overrides:  # a --set's own key error: not the first variant's to carry
        if problem := unknown_key(parse_override(item)[0]):
            raise _err(source, f"--set {item}: {problem}")
    experiment = f"{name}-{profile}"
    # The profile's keys are a layer of their own, under the variants': a variant that switches
    # objectives (objective.name) or families (backbone.name) starts that section afresh, as
    # from a base with those keys written in. Applied with the variant's, a profile's
    # `objective.schedule` was carried into a flow variant, which has no such key.
    try:
        base = apply_overrides(base, _override_items(prof_set))
    except ConfigError as e:
        raise _err(source, f"profiles.{profile}.set: {e}") from None
    runs: list[PlannedRun] = []
    first_seed_hash: dict[str, str] = {}
    given: dict[str, dict[str, Any]] = {}  # each variant's own keys
    for variant, keys in variants.items():
        keys = {
            **keys,
            **_dotted(prof_variants.get(variant), f"profiles.{profile}.variants.{variant}", source),
        }
        items = [
            *_override_items(keys),
            *overrides,
            f"experiment={experiment}",
        ]
        for seed in seeds:
            try:
                cfg = build_config(base, [*items, f"seed={seed}"])
            except ConfigError as e:
                raise _err(source, f"variant {variant!r} (profile {profile}): {e}") from None
            runs.append(PlannedRun(len(runs) + 1, variant, seed, cfg))
        h = unseeded_hash(runs[-1].cfg)
        for other, oh in first_seed_hash.items():
            if oh == h:
                # a compile-vs-eager ablation: say why the two are one config
                unhashed = sorted((set(keys) | set(given[other])) & EXECUTION_KEY_NAMES)
                one = len(unhashed) == 1
                why = (
                    f": {', '.join(unhashed)} only {'says' if one else 'say'} how a run "
                    f"executes, not what it computes, and {'is' if one else 'are'} left out of "
                    "its hash (compare their speed with `dit-bench bench`)"
                    if unhashed
                    else " (do their keys repeat values the config has already?)"
                )
                raise _err(
                    source,
                    f"variants {other!r} and {variant!r} resolve to the same config "
                    f"(profile {profile}); they would share their runs{why}",
                )
        first_seed_hash[variant] = h
        given[variant] = keys
        for m in metrics:  # a metric the runs do not log would only show up in the report
            if m.startswith(("val_FD-", "val_FID")) and m != (logged := fd_metric(runs[-1].cfg)):
                raise _err(
                    source,
                    f"metrics: variant {variant!r} (profile {profile}) does not compute {m}; its "
                    f"runs log {logged or 'no FD (eval.fd_every is 0)'}",
                )
            level = re.fullmatch(r"val_loss_l(\d+)", m)
            if level and int(level[1]) >= (levels := val_levels(runs[-1].cfg)):
                raise _err(
                    source,
                    f"metrics: {m}: the val-loss grid of variant {variant!r} (profile {profile}) "
                    f"has levels 0..{levels - 1} (eval.val_levels)",
                )
    reference = raw.get("reference")
    if reference is not None:
        ranking = reference.get("ranking") if isinstance(reference, dict) else None
        if not isinstance(ranking, list) or set(ranking) - set(variants):
            raise _err(
                source, f"reference.ranking must list variants (best first), got {ranking!r}"
            )
    return Ablation(
        reference=reference,
        name=name,
        profile=profile,
        description=str(raw.get("description", "")).strip(),
        profile_description=str(prof.get("description", "")).strip(),
        base_variant=base_variant,
        variants=tuple(variants),
        seeds=seeds,
        profile_seeds=own,
        metrics=tuple(metrics),
        runs=tuple(runs),
        source=source,
        overrides=tuple(overrides),
    )


# -- inspecting a plan --------------------------------------------------------------------------
def run_status(
    out: str | Path, cfg: ExperimentConfig, index: dict[str, Path] | None = None
) -> tuple[str, Path | None]:
    """'done' (summary.json), 'partial' (a run directory without it) or 'new'. `index`: the
    `run_index` of the experiment's folder, for the status of many runs."""
    if index is None:
        from dit_bench.train.run import find_run_dir  # Lightning: only where no index is given

        run = find_run_dir(Path(out), cfg)
    else:
        run = index.get(cfg.hash)
    if run is None:
        return "new", None
    return ("done" if (run / "summary.json").exists() else "partial"), run


def run_index(out: str | Path, experiment: str) -> dict[str, Path]:
    """Config hash -> the run directory `find_run_dir` finds for it (the newest name), from one
    listing of `<out>/<experiment>/`. Found one by one, by a listing each, the runs of a plan
    cost the square of their number: 2,000 listings of 1,000 names for a plan of 1,000."""
    folder = Path(out) / experiment
    if not folder.is_dir():
        return {}
    # find_run_dir's `*-<hash>`: a name not hidden, the hash after its last dash; sorted, the
    # newest name of a hash comes last and wins
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and "-" in n)
    return {n.rsplit("-", 1)[1]: folder / n for n in names}


def cost(cfg: ExperimentConfig) -> dict[str, Any]:
    """Params, forward MACs, tokens and training FLOPs of one run, without building weights
    (nor needing its latents: `note` says what was assumed in their place)."""
    import torch

    from dit_bench.backbones import build_net
    from dit_bench.data import planned_data_info

    info, note = planned_data_info(cfg.data)
    with torch.device("meta"):  # shapes and counts only
        net = build_net(cfg, info)
    f = net.flops(batch=1)
    images = cfg.train.steps * cfg.train.batch_size
    return {
        "params": net.num_params(),
        "macs": f["macs"],
        "tokens": net.num_tokens,
        "images": images,
        "train_flops": 3 * f["flops"] * images,
        "note": note,
    }


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def describe(ab: Ablation, out: str | Path) -> str:
    """The dry-run listing: one line per run with its size, compute and status."""
    lines = [
        f"ablation {ab.name!r}, profile {ab.profile}: {len(ab.variants)} variants x "
        f"{len(ab.seeds)} seeds = {len(ab.runs)} runs -> {Path(out) / ab.experiment}",
    ]
    if ab.profile_description:
        lines.append(f"  {ab.profile_description.splitlines()[0]}")
    if ab.overrides:  # the description is the file's: `--set train.steps=100` still read 500
        lines.append("  with " + " ".join(f"--set {o}" for o in ab.overrides) + " on every run")
    w = max(16, *(len(v) for v in ab.variants))
    lines.append(
        f"{'#':>3}  {'variant':<{w}} {'seed':>4}  {'backbone':<12} {'conditioning':<12} "
        f"{'objective':<17} {'params':>13} {'MACs':>8} {'steps':>6} {'batch':>5} "
        f"{'train FLOPs':>11}  {'hash':<10} status"
    )
    total = 0
    costs: dict[str, dict] = {}
    index = run_index(out, ab.experiment)
    status_of = {r.index: run_status(out, r.cfg, index)[0] for r in ab.runs}
    for r in ab.runs:
        c = costs.setdefault(r.variant, cost(r.cfg))
        total += c["train_flops"]
        status = status_of[r.index]
        o = r.cfg.objective
        obj = f"{o.name}-{getattr(o, 'prediction', '')}"
        if o.name == "flow":
            obj = f"flow-{o.density}"
        lines.append(
            f"{r.index:>3}  {r.variant:<{w}} {r.seed:>4}  {r.cfg.backbone.name:<12} "
            f"{r.cfg.backbone.conditioning:<12} {obj:<17} {c['params']:>13,} "
            f"{_si(c['macs']):>8} {r.cfg.train.steps:>6} {r.cfg.train.batch_size:>5} "
            f"{_si(c['train_flops']):>11}  {r.cfg.hash:<10} {status}"
        )
    todo = sum(costs[r.variant]["train_flops"] for r in ab.runs if status_of[r.index] != "done")
    lines += sorted({f"note: {c['note']}" for c in costs.values() if c["note"]})
    lines.append(
        f"estimated training compute: {_si(total)}FLOPs in all (3 x forward FLOPs x images), "
        f"{_si(todo)}FLOPs still to run; MACs: forward, one multiply-add = 1"
    )
    return "\n".join(lines)


# -- running ------------------------------------------------------------------------------------
def write_labels(run_dir: Path, ab: Ablation, r: PlannedRun) -> None:
    labels = {**r.labels, "ablation": ab.name, "profile": ab.profile}
    path = run_dir / "labels.json"
    with contextlib.suppress(OSError, ValueError):  # missing or unreadable: written below
        if read_record(path) == labels:
            # every call labels every finished run of the plan: a write synced each, a plan
            # of 1,000 done runs spent 7 s rewriting what was there
            return
    write_json_atomic(path, labels)


def _train_one(
    cfg: ExperimentConfig, out: str, progress: bool | str, label: str, callbacks=()
) -> str:
    from dit_bench.train.run import train

    return str(train(cfg, out, progress=progress, label=label, callbacks=list(callbacks)))


def _label(r: PlannedRun, n: int) -> str:
    """What a run's progress lines start with: the run as ablate's own lines name it."""
    return f"ablate run {r.index}/{n} {r.variant} seed {r.seed}"


def worker_config(cfg: ExperimentConfig, jobs: int) -> dict:
    """A run's config for one of `jobs` workers sharing this machine's CPUs: train.threads,
    if unset, is the worker's share (`fast.cpu_threads_per_worker`, as sweep's workers). An
    execution key: the run's hash does not change."""
    from dit_bench.fast import cpu_threads_per_worker

    d = cfg.to_dict()
    if d["train"]["threads"] is None:
        d["train"]["threads"] = cpu_threads_per_worker(jobs)
    return d


def _worker(cfg_dict: dict, out: str, progress: bool, label: str) -> str:
    # in a fresh (spawned) process: rebuild the config from plain data, train without a bar
    # (the workers' bars would overwrite each other): progress lines, prefixed with `label`
    import signal

    from dit_bench.config import raise_terminated
    from dit_bench.train.run import exit_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    # the parent's SIGTERM (or a preemption's) stops the run where it is, as at a step: with
    # Lightning's handler (installed only where none is) it waited for the step's end, past a
    # validation or an in-training FD of minutes; the checkpoint is the resume point either way
    signal.signal(signal.SIGTERM, raise_terminated)
    exit_with_parent()
    return _train_one(build_config(cfg_dict), out, "lines" if progress else False, label)


def _log(msg: str) -> None:
    print(f"[ablate] {msg}", file=sys.stderr, flush=True)


def _short(summary_path: Path) -> str:
    try:
        s = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return ""
    from dit_bench.train.run import summary_val_loss

    # the run's whole time (validations, grids and the FD after the last step included), then
    # its training loop's: an FD of 256 samples can take longer than a tiny run's steps
    wall, steps = s.get("wall_seconds"), s.get("train_seconds") or 0
    if wall is None:  # resumed from an older version's checkpoint: its earlier time unknown
        return f"val_loss {summary_val_loss(s)}, training {steps:.0f}s"
    return f"val_loss {summary_val_loss(s)}, {wall:.0f}s, of which training {steps:.0f}s"


class RunsFailed(RuntimeError):
    """Some runs of an ablation raised; the others trained and the results table holds them."""

    def __init__(self, failures: list[tuple[PlannedRun, str]], root: Path):
        self.failures, self.root = failures, root
        lines = [f"  run {r.index} {r.variant} seed {r.seed}: {err}" for r, err in failures]
        super().__init__(f"{len(failures)} run(s) failed:\n" + "\n".join(lines))


def run_ablation(
    ab: Ablation,
    out: str | Path = "runs",
    *,
    jobs: int = 1,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    command: str | None = None,
) -> Path:
    """Train every run of the plan that is not finished; returns `<out>/<experiment>/`.

    Finished runs are skipped, interrupted ones resume (train() does both, by config hash).
    A run that raises (a diverged variant, say) is logged and the others go on; the results
    are written, then `RunsFailed` names the failed runs. Ctrl-C stops everything; so does a
    full disk (its OSError, after the runs in flight end), which would fail every later run.
    `jobs` > 1 trains that many runs at once in separate processes (progress lines then, not
    bars: `ProgressLines`, each prefixed with its run).
    `callbacks` go to each run's Trainer (in-process only, jobs=1). `command` (the command line
    that ran it) is recorded in ablation.json for the report.
    """
    out = Path(out)
    root = out / ab.experiment
    index = run_index(out, ab.experiment)  # one listing of the folder, not one a run
    check_data([r.cfg for r in ab.runs if run_status(out, r.cfg, index)[0] != "done"])
    root.mkdir(parents=True, exist_ok=True)
    # written first, so that an interrupted call leaves its plan; again at the end (below).
    # Each record merges the one on disk: under a lock, or another call's runs could be lost
    with locked(root / ".ablation.lock"):
        write_json_atomic(root / "ablation.json", plan_record(ab, out, command))
    from dit_bench.train.run import check_run_config

    n = len(ab.runs)
    todo = []
    for r in ab.runs:
        status, run_dir = run_status(out, r.cfg, index)
        if status == "done":
            check_run_config(run_dir, r.cfg)  # a config.yaml lost in a crash is written again
            write_labels(run_dir, ab, r)
            _log(f"run {r.index}/{n} {r.variant} seed {r.seed}: already finished ({run_dir.name})")
        else:
            todo.append(r)
    t0 = time.monotonic()  # not the wall clock, which NTP may step while runs train
    done = n - len(todo)

    def finished(r: PlannedRun, run_dir: Path) -> None:
        nonlocal done
        done += 1
        write_labels(run_dir, ab, r)
        elapsed = time.monotonic() - t0
        _log(
            f"run {r.index}/{n} {r.variant} seed {r.seed} done ({_short(run_dir / 'summary.json')})"
            f"; {done}/{n} finished, {elapsed / 60:.1f} min this session"
        )

    failures: list[tuple[PlannedRun, str]] = []

    def failed(r: PlannedRun, e: BaseException) -> None:
        failures.append((r, f"{type(e).__name__}: {e}"))
        _log(f"run {r.index}/{n} {r.variant} seed {r.seed} FAILED: {failures[-1][1]}")

    if jobs <= 1 or len(todo) <= 1:
        for r in todo:
            status, _ = run_status(out, r.cfg)
            verb = "resuming" if status == "partial" else "starting"
            _log(f"run {r.index}/{n} ({done}/{n} finished): {verb} {r.variant} seed {r.seed}")
            try:
                run_dir = Path(_train_one(r.cfg, str(out), progress, _label(r, n), callbacks))
            except Exception as e:  # this run fails; the ablation goes on
                if out_of_room(e):
                    _stopped_for_room(r, n, e)
                    raise
                if not isinstance(e, USER_ERRORS):
                    _log(traceback.format_exc().rstrip())
                failed(r, e)
                continue
            finished(r, run_dir)
    else:
        _run_parallel(ab, todo, out, jobs, finished, failed, progress)
    # the runs that finished meanwhile join the record as they join the table: the two agree
    with locked(root / ".ablation.lock"):  # the table and record of what is on disk now
        found = plan_runs(ab, out)
        write_json_atomic(root / "ablation.json", plan_record(ab, out, command, found))
        write_results(ab, out, found)
    if failures:
        raise RunsFailed(failures, root)
    return root


def _run_parallel(
    ab: Ablation, todo: list[PlannedRun], out: Path, jobs: int, finished, failed, progress: bool
) -> None:
    """Train `todo` in a pool of `jobs` worker processes.

    A worker that dies (the OOM killer, a kill -9) breaks its whole pool: every run in flight
    ends in BrokenProcessPool, and the pool cannot say whose worker died. So a new pool takes
    over and the runs that were in flight are tried again (from their last checkpoints); a run
    in flight at two pool deaths in a row is failed. Those "suspects" are tried one at a time
    (beside runs that are not suspects): a healthy run is then never in flight at both deaths
    of a run that kills its worker, and is not failed for it."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    n = len(ab.runs)
    queue = list(todo)
    deaths: dict[int, int] = {}  # run index -> pool deaths in a row it was in flight at
    while queue:
        # spawn: a clean interpreter per worker (forking a process that holds torch threads is
        # not)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            in_flight = _train_in_pool(
                pool, queue, jobs, deaths, out, n, finished, failed, progress
            )
        again = []
        for r in in_flight:
            deaths[r.index] = deaths.get(r.index, 0) + 1
            if deaths[r.index] < 2:
                again.append(r)
            else:
                failed(
                    r,
                    BrokenProcessPool(
                        "its worker process died at two tries in a row (killed: out of "
                        "memory? `dmesg` names the OOM killer's victims)"
                    ),
                )
        if in_flight:
            names = ", ".join(f"{r.variant} seed {r.seed}" for r in in_flight)
            _log(
                f"a worker process died (killed: out of memory?) and took its pool with it; "
                f"in flight: {names}"
                + (
                    f"; trying {', '.join(f'{r.variant} seed {r.seed}' for r in again)} again "
                    "in a new pool, one suspect at a time"
                    if again
                    else ""
                )
            )
        queue[:0] = again  # first: they have checkpoints to resume from


def _next_run(
    queue: list[PlannedRun], running: Sequence[PlannedRun], deaths: dict[int, int]
) -> PlannedRun | None:
    """Takes the first run of the queue that may start now: a suspect (in flight at a pool
    death) waits while another suspect runs. None: none may."""
    suspect_running = any(deaths.get(r.index) for r in running)
    for i, r in enumerate(queue):
        if not (suspect_running and deaths.get(r.index)):
            return queue.pop(i)
    return None


def _train_in_pool(
    pool,
    queue: list[PlannedRun],
    jobs: int,
    deaths: dict[int, int],
    out: Path,
    n: int,
    finished,
    failed,
    progress: bool,
) -> list[PlannedRun]:
    """Train the queue's runs in `pool` until none is left (returns []) or a worker dies:
    returns the runs then in flight (the pool is broken; their futures all say so). A run
    that found the disk full starts no more: its OSError is raised once those in flight end."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    pending = {}
    no_room: BaseException | None = None  # a run found the disk full: no run starts after it
    try:
        # every worker started before any run: the pool watches for a dead worker only among
        # those it had when its watcher last woke, and CPython starts a worker with a task
        # after waking it; a worker started with a run could die unnoticed until another ended
        started = [pool.submit(os.getpid) for _ in range(jobs)]
        wait(started)
        if any(isinstance(f.exception(), BrokenProcessPool) for f in started):
            # no run was in flight, so none is a suspect and a new pool would die alike, for
            # ever: a worker that dies as it starts dies so every time
            raise RuntimeError(
                "the ablation's worker processes died as they started, before any run (their "
                "errors are above); from a script, call run_ablation with jobs > 1 under "
                '`if __name__ == "__main__":` (each worker imports the script again)'
            )
        while (queue and no_room is None) or pending:
            broken = False
            while (
                no_room is None
                and len(pending) < jobs
                and (r := _next_run(queue, list(pending.values()), deaths))
            ):
                cfg = worker_config(r.cfg, jobs)
                try:
                    fut = pool.submit(_worker, cfg, str(out), progress, _label(r, n))
                except BrokenProcessPool:  # a worker died since the last wait (idle, or its
                    # run's end not yet seen): this run never started and waits for a new pool
                    queue.insert(0, r)
                    broken = True
                    break
                again = " again (its last worker died)" if deaths.get(r.index) else ""
                _log(f"run {r.index}/{n}: starting {r.variant} seed {r.seed}{again} (in a worker)")
                pending[fut] = r
            wait(pending, return_when=FIRST_COMPLETED)
            if broken or any(
                isinstance(f.exception(), BrokenProcessPool) for f in pending if f.done()
            ):
                wait(pending)  # the pool fails every future in flight at once
                # a survivor of the pool's SIGTERM (one deep in a long kernel) would train on
                # beside its run's next try
                _signal_workers(pool, "kill")
                broken = True
            in_flight = []
            for fut in [f for f in pending if f.done()]:
                r = pending.pop(fut)
                e = fut.exception()
                if isinstance(e, BrokenProcessPool):
                    in_flight.append(r)
                    continue
                deaths.pop(r.index, None)  # it ran through: no longer a suspect
                if e is None:
                    finished(r, Path(fut.result()))
                    continue
                if out_of_room(e):  # those in flight end as they will: done, or stopped too
                    _stopped_for_room(r, n, e)
                    no_room = no_room or e
                    continue
                # the run raised in its worker; the others go on
                if e.__cause__ is not None and not isinstance(e, USER_ERRORS):
                    _log(str(e.__cause__).rstrip())  # the worker's traceback, as text
                failed(r, e)
            if broken:  # the pool takes no more runs: a new one takes over the queue
                if no_room is None:
                    return in_flight
                break  # no new pool for a full disk: its runs resume on the next call
    except BaseException:
        for fut in pending:
            fut.cancel()
        _signal_workers(pool, "terminate")  # a stopped run resumes from its last checkpoint
        raise
    if no_room is not None:  # raised here, not above: the idle workers leave unsignalled
        # (a SIGTERM to one waiting for a run printed its traceback)
        raise no_room
    return []


def _stopped_for_room(r: PlannedRun, n: int, e: BaseException) -> None:
    # A full disk (a quota, a file-size limit) fails every run after this one too, each at its
    # first checkpoint: the ablation stops instead, as a sweep does, and the same command, run
    # again with room made, resumes the runs from their last checkpoints
    _log(
        f"run {r.index}/{n} {r.variant} seed {r.seed} stopped: {e}; make room, then run the "
        "same command again to resume it"
    )


def _signal_workers(pool, how: str) -> None:
    """`terminate` (SIGTERM) or `kill` (SIGKILL) the pool's live worker processes."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(ValueError):  # a process object the pool closed: gone
            if proc.is_alive():
                getattr(proc, how)()


class PlanRun(NamedTuple):
    """A finished run of the plan, found in its folder (`plan_runs`)."""

    variant: str
    seed: int
    config_hash: str
    run_dir: Path


def check_data(cfgs: Sequence[ExperimentConfig]) -> None:
    """Raise the error every run to train would stop with at its start, once, before any:
    data not there (latents not encoded, a folder without class folders), a data.vae that
    is not a VAE folder, or a tracker of train.loggers not installed. Each data config is
    read once."""
    from dit_bench.config import check_installed
    from dit_bench.data import data_info
    from dit_bench.data.latents import check_vae_dir

    check_installed(sorted({name for cfg in cfgs for name in cfg.train.loggers}))
    seen = set()
    for cfg in cfgs:
        key = cfg.data.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        data_info(cfg.data)
        if cfg.data.name == "latents" and cfg.data.vae:
            check_vae_dir(cfg.data.vae, "data.vae")


def plan_runs(ab: Ablation, out: str | Path, *, log: bool = True) -> list[PlanRun]:
    """The finished runs that belong to the plan: every run directory of `<out>/<experiment>/`
    with a summary.json whose config, seed left out, is the config of one of the plan's
    variants. Runs of other `--seeds` of the same configs join (adding seeds accumulates), runs
    of another `--set` do not. The plan record (ablation.json), the results table and so the
    report all take their runs from here: the three agree.

    One directory per config hash: folders merged from two machines can hold two finished
    copies of a run; the one `find_run_dir` would resume (the newest name) is taken. A run whose
    config.yaml is missing or no longer loads (a run of another dit-bench version) is skipped
    with a line naming it (`log`): one foreign directory must not stop every later call."""
    from dit_bench.train.run import load_run_config

    root = Path(out) / ab.experiment
    variant_of = {unseeded_hash(r.cfg): r.variant for r in ab.runs}
    found: dict[str, PlanRun] = {}
    # in name order, that is by start time: a later copy of a config replaces an earlier one
    for summary in sorted(root.glob("*/summary.json")):
        run_dir = summary.parent
        if not (run_dir / "config.yaml").is_file():  # lost in a crash; not a run of this plan
            if log:
                _log(
                    f"skipped {run_dir.name}: no config.yaml (an ablate call that plans it, or "
                    "dit-bench train with its config, writes it again)"
                )
            continue
        try:
            cfg = load_run_config(run_dir)
        except USER_ERRORS as e:  # an unknown key, a value no longer allowed, broken YAML
            why = " ".join(str(e).split())  # one line
            if log:
                _log(
                    f"skipped {run_dir.name}: its config.yaml does not load ({why}); a run of "
                    f"another dit-bench version? Move it out of {root}"
                )
            continue
        variant = variant_of.get(unseeded_hash(cfg))
        if variant is None:  # another --set or ablation file writing to the same folder
            continue
        if cfg.hash in found and log:
            _log(
                f"{found[cfg.hash].run_dir.name} and {run_dir.name} are one run (config "
                f"{cfg.hash}), finished twice: {run_dir.name}, the newer, is taken"
            )
        found[cfg.hash] = PlanRun(variant, cfg.seed, cfg.hash, run_dir)
    order = {v: i for i, v in enumerate(ab.variants)}
    return sorted(found.values(), key=lambda r: (order[r.variant], r.seed))


def plan_record(
    ab: Ablation,
    out: str | Path,
    command: str | None = None,
    finished: Sequence[PlanRun] | None = None,
) -> dict[str, Any]:
    """What ablation.json holds after a call of `ab` (`Ablation.plan_record` plus): the call's
    runs, the finished ones of `plan_runs` (the same configs under other seeds) and, from the
    ablation.json of an earlier call of the same configs, its runs that never finished (failed
    or interrupted: the report lists them as not finished). `command` is the call's command;
    `finished`: `plan_runs` if already at hand."""
    record = {**ab.plan_record(), **({"command": command} if command else {})}
    runs: dict[str, dict[str, Any]] = {}
    previous = Path(out) / ab.experiment / "ablation.json"
    if previous.is_file():
        old = read_record(previous)
        if old.get("variant_configs") == record["variant_configs"]:
            runs = {r["config_hash"]: r for r in old["runs"]}
    if finished is None:
        finished = plan_runs(ab, out, log=False)
    for r in [*record["runs"], *(r._asdict() for r in finished)]:
        runs[r["config_hash"]] = {k: r[k] for k in ("variant", "seed", "config_hash")}
    order = {v: i for i, v in enumerate(ab.variants)}
    record["runs"] = sorted(runs.values(), key=lambda r: (order[r["variant"]], r["seed"]))
    record["seeds"] = sorted({r["seed"] for r in record["runs"]})
    return record


def results_table(ab: Ablation, out: str | Path, finished: Sequence[PlanRun] | None = None):
    """One row per finished run of the plan (`plan_runs`, or `finished` if at hand):
    results.collect's columns plus variant, ablation and profile, in variant order, then by
    seed."""
    import pandas as pd

    from dit_bench.report.results import run_row

    rows = []
    for r in plan_runs(ab, out) if finished is None else finished:
        row = run_row(r.run_dir)
        row.update({"variant": r.variant, "ablation": ab.name, "profile": ab.profile})
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(
    ab: Ablation, out: str | Path, finished: Sequence[PlanRun] | None = None
) -> Path | None:
    from dit_bench.report.results import save_table

    table = results_table(ab, out, finished)
    stem = Path(out) / ab.experiment / "results"
    if table.empty:  # no run of this plan finished: an earlier plan's table would mislead
        for suffix in (".csv", ".parquet"):
            stem.with_suffix(suffix).unlink(missing_ok=True)
        return None
    save_table(table, stem)
    # the plan's runs, other calls' seeds included: this call's own count can be fewer
    seeds = ", ".join(map(str, sorted(set(table["seed"]))))
    _log(f"results: {len(table)} finished runs of the plan (seeds {seeds}) in {stem}.csv")
    return stem
