"""One tidy table of runs: a row per run directory, read from summary.json and config.yaml.

Columns: experiment, variant, seed, backbone, conditioning, objective, depth, width, heads,
patch, tokens, params, macs, flops, train_flops, steps, batch_size, val_loss, fd, ... (whatever
the summaries hold), plus `run_dir` and `null_in_summary` (the summary keys written as null: for
a metric, a value that was not finite). `curves` gives the long table of metrics.csv rows.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import yaml

from dit_bench.files import dotted, read_record, replacing

_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def files_named(root: str | Path, name: str) -> list[Path]:
    """Every file `name` at or below the folder `root`, sorted. Linked folders are followed,
    each real folder once (a second link to it, or a loop, adds nothing): a run moved to
    another disk and linked back is a run, as `train` and `ablate` find it (their glob follows
    the link), where Path.rglob, which does not follow links, left it out of the reports."""
    found: set[Path] = set()
    seen: set[str] = set()
    for parent, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()  # visited in name order: of two paths to one folder, the first
        if name in names and os.path.isfile(os.path.join(parent, name)):
            found.add(Path(parent) / name)
    return sorted(found)


def run_dirs(sources: Iterable[str | Path]) -> list[Path]:
    """Every finished run (a folder with summary.json) at or below the given paths."""
    found: set[Path] = set()
    for src in sources:
        src = Path(src)
        if not src.exists():
            raise FileNotFoundError(f"{src} does not exist")
        found.update(p.parent for p in files_named(src, "summary.json"))
    return sorted(found)


def read_config(run: Path) -> dict:
    """A run's config.yaml: libyaml's parser where PyYAML has it (10 ms a config in Python, a
    report of 1,000 runs), UTF-8 whatever the locale."""
    return read_record(Path(run) / "config.yaml", functools.partial(yaml.load, Loader=_SAFE_LOADER))


def run_row(run: Path) -> dict:
    summary = read_record(run / "summary.json")
    if not (run / "config.yaml").is_file():
        raise ValueError(
            f"{run}: no config.yaml (lost in a crash?); the command that trained the run "
            "(dit-bench train, ablate or sweep) writes it again, or delete this run"
        )
    cfg = read_config(run)
    labels = read_record(run / "labels.json") if (run / "labels.json").exists() else {}
    # one value a cell: class_names, a list, stays in the summary
    row = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    # A table cell cannot tell a null from an absent key, and they mean different things: null
    # is a value that was not finite (a diverged run), absent is one never computed.
    row["null_in_summary"] = ",".join(sorted(k for k, v in summary.items() if v is None))
    spec = summary.get("backbone_spec", {})
    row.update(
        {
            "variant": labels.get("variant", cfg["experiment"]),
            **{k: v for k, v in labels.items() if k != "variant"},
            "depth": spec.get("depth"),
            "width": spec.get("hidden_size"),
            "heads": spec.get("num_heads"),
            "patch": spec.get("patch_size"),
            "run_dir": str(run),
        }
    )
    row.update({f"cfg.{k}": v for k, v in dotted(cfg).items()})
    return row


def collect(sources: Iterable[str | Path]) -> pd.DataFrame:
    """The results table of every finished run under `sources` (one row per run)."""
    runs = run_dirs(sources)
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {list(map(str, sources))}")
    return pd.DataFrame([run_row(r) for r in runs])


def curves(table: pd.DataFrame) -> pd.DataFrame:
    """Long table of every run's metrics.csv: run_dir, step, metric, value (+ images/FLOPs)."""
    frames = []
    for row in table.itertuples():
        path = Path(row.run_dir) / "metrics.csv"
        try:
            m = pd.read_csv(path)
            # An empty cell is a metric not logged at that step; a logged non-finite value is
            # written `nan` (or `inf`) and stays, as NaN: dropped, it would leave a diverged
            # run's earlier finite value as its last one.
            logged = pd.read_csv(path, dtype=str, keep_default_na=False).ne("")
        except ValueError as e:  # pandas' parser and decoding errors name no file
            raise ValueError(f"{path}: unreadable ({e}); fix or delete this file") from None
        long = m.melt(id_vars="step", var_name="metric", value_name="value")
        was_logged = logged.melt(id_vars="step", var_name="metric", value_name="logged")
        long = long[was_logged["logged"].to_numpy()]
        long["run_dir"] = row.run_dir
        long["images"] = long["step"] * row.batch_size
        long["train_flops"] = 3 * row.flops * long["images"]
        frames.append(long)
    out = pd.concat(frames, ignore_index=True)
    keys = [c for c in ("run_dir", "experiment", "variant", "seed") if c in table]
    return out.merge(table[keys], on="run_dir")


def save_table(df: pd.DataFrame, path_stem: str | Path) -> None:
    """`<stem>.csv` and `<stem>.parquet`, beside each report."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    # Each through a temporary file: a crash mid-write leaves the previous table, not half a one.
    for suffix, write in ((".csv", df.to_csv), (".parquet", df.to_parquet)):
        with replacing(path_stem.with_suffix(suffix)) as tmp:
            write(tmp, index=False)


def val_batches(runs: pd.DataFrame) -> pd.Series:
    """Per run, the batch its validation noise was drawn in (one seed a batch): the summary's
    val_batch, else (a run of a version before it was fixed) its train.batch_size."""
    if "val_batch" not in runs:
        return runs["batch_size"]
    return runs["val_batch"].fillna(runs["batch_size"])
