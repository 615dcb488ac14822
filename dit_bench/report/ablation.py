"""`dit-bench report ablation SOURCE -o reports/NAME`: report.md, seaborn figures and tables.

SOURCE is the folder `dit-bench ablate` wrote (`<out>/<name>-<profile>/`, with `ablation.json`:
variant order, base variant, metrics, reference ranking) or any folder of runs whose
`labels.json` name a variant (then the first variant in name order is the base). A folder with
neither (a sweep's trials, plain training runs) is refused: `dit-bench report scaling` reads
sweeps. A base without finished runs leaves the others reported, unpaired.

Out: `report.md`; figures `curves_<metric>.png` (metric against training steps and training
FLOPs, mean over seeds with a 95% t band; one logged at one step only against FLOPs alone),
`final_<metric>.png` (per-variant mean, CI and every seed), `paired_<metric>.png` (variant -
base per seed-pair, with CI); `samples/<variant>.png` (the final grid of each variant's first
seed) and `samples.png` (all of them side by side); tables as CSV and Parquet: `runs` (one row per run), `final` (per-variant CIs), `paired`
(comparisons against the base; `distinguishable` is empty where `undetermined`: no test;
`p_holm` and `distinguishable_holm` adjust each metric's comparisons by Holm-Bonferroni), `cost`
(params, MACs, throughput), `curves` (long table).
An optional `notes.md` in the report folder is kept and included as the closing discussion.

Reads tables only: no model is built or imported here.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import t as student_t

from dit_bench.files import NAME_MAX, read_record, windows_name_error, write_text_atomic
from dit_bench.report.axes import agg_figure, figure_theme, readable_log_ticks
from dit_bench.report.results import collect, curves, save_table, val_batches
from dit_bench.report.stats import (
    LEVEL,
    call,
    compare_to_base,
    format_p,
    format_relative,
    has_values,
    paired_columns,
    summarize,
)

NOTES = "notes.md"
# what `dit-bench ablate` allows in a variant's name (ablate.NAME; not imported: that module
# builds models): each names files of the report (samples/<variant>.png)
VARIANT = re.compile(r"[A-Za-z0-9_.-]+")


# -- reading ------------------------------------------------------------------------------------
def not_ablation_runs(table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The runs that are sweep trials (`trial.json`, or labels.json naming a sweep) and the
    runs whose labels.json names no variant (plain `dit-bench train` runs)."""
    trials, unlabelled = [], []
    for run in map(Path, table["run_dir"]):
        path = run / "labels.json"
        labels = read_record(path) if path.is_file() else {}
        if (run / "trial.json").is_file() or "sweep" in labels:
            trials.append(run.name)
        elif "variant" not in labels:
            unlabelled.append(run.name)
    return trials, unlabelled


def load_plan(source: Path, table: pd.DataFrame) -> dict:
    """ablation.json of SOURCE, or a plan inferred from the runs' labels. A folder with neither
    (a sweep's runs, plain training runs) is not an ablation: refused, naming what is missing,
    rather than reported with grid points or experiments posing as variants."""
    path = source / "ablation.json"
    if path.is_file():
        plan = read_record(path)
    else:
        trials, unlabelled = not_ablation_runs(table)
        if trials or unlabelled:
            scaling = f"`dit-bench report scaling {source} -o reports/NAME`"
            what = (
                f"{len(trials)} of its {len(table)} runs are sweep trials (trial.json; e.g. "
                f"{trials[0]}): for a sweep's runs use {scaling}"
                if trials
                else f"{len(unlabelled)} of its {len(table)} runs have no labels.json naming "
                f"a variant (e.g. {unlabelled[0]}): `dit-bench ablate` writes both; a sweep's "
                f"runs go to {scaling}"
            )
            raise ValueError(
                f"{source} is not an ablation folder: no ablation.json (the plan `dit-bench "
                f"ablate` writes), and {what}"
            )
        variants = sorted(table["variant"].unique())
        plan = {"name": source.name, "variants": variants, "base_variant": variants[0]}
    plan.setdefault("metrics", ["val_loss"])
    plan.setdefault("variants", sorted(table["variant"].unique()))
    plan.setdefault("base_variant", plan["variants"][0])
    return plan


def plan_runs(source: Path, table: pd.DataFrame, plan: dict) -> tuple[pd.DataFrame, int, list]:
    """The runs of the plan's configs (ablation.json lists them), how many other runs the
    folder holds (an ablation called with another --set writes beside them), and the names of
    the directories left out as copies of a run reported from another one.

    A planned run's variant is the plan's, whatever its labels.json says or lacks (a run
    killed between its summary.json and its labels.json has none); labels.json names the
    variant only of runs the plan does not list. Two directories of one config (folders merged
    from two machines) are one run: the newest, the one training would resume, is reported.
    Without a plan, two runs of one variant and seed are an error: pooling them would mix
    configs."""
    planned = {r["config_hash"]: r for r in plan.get("runs", [])}
    if planned and "config_hash" in table:
        variant = table["config_hash"].map(lambda h: planned.get(h, {}).get("variant"))
        table = table.assign(variant=variant.where(variant.notna(), table["variant"]))
    keep = table["config_hash"].isin(planned) if planned else pd.Series(True, table.index)
    table = table[keep]
    copies: list[str] = []
    if "config_hash" in table:
        names = table["run_dir"].map(lambda r: Path(r).name)
        newest_last = table.assign(name=names).sort_values("name", kind="stable")
        copy = newest_last["config_hash"].notna() & newest_last.duplicated(
            "config_hash", keep="last"
        )
        copies = sorted(newest_last.loc[copy, "name"])
        table = table.drop(index=newest_last.index[copy])
    twice = table[table.duplicated(["variant", "seed"], keep=False)]
    if len(twice):
        pairs = sorted({(v, int(s)) for v, s in zip(twice["variant"], twice["seed"], strict=True)})
        raise ValueError(
            f"{source}: several runs of one variant and seed {pairs} (configs "
            f"{sorted(twice['config_hash'])}): runs of other configs share the folder; move "
            "them out, or report from the ablation's own folder"
        )
    return table, int((~keep).sum()), copies


def metric_key(name: str) -> str:
    """summary.json and metrics.csv spell metrics differently (val_loss vs val/loss)."""
    return name.replace("/", "_")


def summary_nulls(table: pd.DataFrame) -> pd.Series:
    """Per run, the summary keys written as null (not finite: the run diverged before them)."""
    nulls = table.get("null_in_summary", pd.Series("", index=table.index))
    return nulls.fillna("").str.split(",")


def final_values(table: pd.DataFrame, long: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """`table` with one column per metric: the summary's value, else, where the summary has no
    such key, the run's last logged one (e.g. the in-training FD, which lives in metrics.csv
    only). A summary's null (not finite: the run diverged) stays NaN, and so does a last logged
    NaN: a diverged run never reports an earlier, finite value as its final one. All-missing
    metrics are dropped."""
    out = table.copy()
    long = long.assign(key=long["metric"].map(metric_key))
    # the last logged row, NaN included (groupby's last() would skip a NaN to an earlier value)
    last = long.sort_values("step", kind="stable").groupby(["run_dir", "key"]).tail(1)
    last = last.set_index(["run_dir", "key"])["value"]
    nulls = summary_nulls(out)
    for m in metrics:
        m = metric_key(m)
        from_curves = out["run_dir"].map(lambda r, m=m: last.get((r, m), np.nan))
        null = nulls.map(lambda keys, m=m: m in keys)
        out[m] = out[m].where(out[m].notna() | null, from_curves) if m in out else from_curves
        if out[m].isna().all():
            out = out.drop(columns=m)
    return out


# -- figures ------------------------------------------------------------------------------------
def _plt():
    import seaborn as sns

    return agg_figure, sns


def curve_bands(data: pd.DataFrame, x: str) -> pd.DataFrame:
    """Per variant and `x`: the mean over seeds of the logged values (NaN left out, as seaborn
    leaves it out) and `stats.mean_ci`'s interval of the finite ones, `lo` and `hi` (their
    mean where there is no interval), computed for all points at once. Handed to seaborn as an
    errorbar function, each point was a Python call (with seaborn's per-group overhead): a
    val curve of 10,000 points and 3 seeds took 140 s to draw."""
    data = data[data["value"].notna()]
    keys = [data["variant"], data[x]]
    finite = data["value"].where(np.isfinite(data["value"]))
    g = finite.groupby(keys)
    out = pd.DataFrame(
        {
            "mean": data["value"].groupby(keys).mean(),
            "fmean": g.mean(),
            "std": g.std(ddof=1),
            "n": g.count(),
        }
    )
    with np.errstate(invalid="ignore"):
        t = student_t.ppf((1 + LEVEL) / 2, df=out["n"] - 1)
    half = pd.Series(t, index=out.index) * out["std"] / np.sqrt(out["n"])
    out["lo"] = (out["fmean"] - half).where(out["n"] >= 2, out["fmean"])
    out["hi"] = (out["fmean"] + half).where(out["n"] >= 2, out["fmean"])
    out.index.names = ["variant", x]
    return out.drop(columns=["fmean", "std", "n"]).reset_index()


# seaborn's palette (ten colours) repeats past its end, each round with the next marker and
# dashes: husl's 40 hues were 9 degrees apart, and neighbouring variants looked alike
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("", (4, 1.5), (1, 1), (3, 1, 1, 1), (6, 2), (2, 2), (5, 1, 1, 1, 1, 1), (8, 2, 2, 2))
LEGEND_ROWS = 20


def variant_styles(order: list[str], colors: Sequence) -> dict[str, tuple]:
    """Each variant's (colour, marker, dashes): the n-th colour of `colors` and the marker and
    dashes of its round through them (80 variants before a style repeats)."""
    n = len(colors)
    return {
        v: (colors[i % n], MARKERS[i // n % len(MARKERS)], DASHES[i // n % len(DASHES)])
        for i, v in enumerate(order)
    }


def label_width(labels) -> float:
    """Inches that the longest of `labels` takes as a tick label (about 0.09 inch a character
    at seaborn's notebook size): a figure of fixed width gave 44-character variant names most
    of it and cut its title at the edge."""
    return 0.09 * max(map(len, map(str, labels)), default=0)


def wrap(text: str, chars: int) -> str:
    """`text` with each of its lines broken at spaces to at most `chars` characters (a word
    longer than that, a variant's name, stays whole)."""
    lines = text.split("\n")
    return "\n".join(
        textwrap.fill(line, max(chars, 20), break_long_words=False, break_on_hyphens=False)
        for line in lines
    )


@figure_theme()
def plot_curves(long: pd.DataFrame, metric: str, order: list[str], path: Path) -> bool:
    """The curves figure of `metric`; False, and no figure, where no run logged a value of it:
    a summary.json key (train_seconds) has a final value and no curve, and seaborn, drawing
    nothing, made no legend to move (AttributeError: the whole report failed)."""
    data = long[long["key"] == metric]
    if not data["value"].notna().any():
        path.unlink(missing_ok=True)  # an earlier report's figure would pass for this one's
        return False
    figure, sns = _plt()
    # seaborn's colour-blind palette: in its default one, the first ten variants share one
    # marker and one dash, and blue and purple (the 1st and 5th: adaln_zero and mmdit, the base
    # and the variant nearest it in reports/conditioning-cpu) are one colour to a protanope
    styles = variant_styles(order, sns.color_palette("colorblind"))
    palette = {v: c for v, (c, _, _) in styles.items()}
    # a variant that never logged this metric (FD in an evaluation-free variant) would get a
    # legend entry with no line; its colour stays its own, as in the other figures
    shown = [v for v in order if v in set(data["variant"])]
    # the legend sits beside the panels, in columns of LEGEND_ROWS: inside, 40 variants' entries
    # covered the lines and ran off the top of the figure
    ncol = max(1, math.ceil(len(shown) / LEGEND_ROWS))
    legend_w = ncol * (0.07 * max(map(len, shown), default=0) + 0.7)
    height = max(4.2, 0.19 * min(len(shown), LEGEND_ROWS) + 1.6)
    # logged at one step per variant (an FD of the last step): the steps panel was one column
    # of points, the final figure again; against FLOPs it still shows what each one cost
    steps = data.loc[data["value"].notna()].groupby("variant")["step"].unique()
    one_step = bool(steps.map(len).max() == 1)
    panels = [("train_flops", "training FLOPs (3 x forward x images)")]
    if not one_step:
        panels.insert(0, ("step", "training steps"))
    fig = figure(figsize=(6 * len(panels) + legend_w, height))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (x, label) in zip(axes, panels, strict=True):
        bands = curve_bands(data, x)
        sns.lineplot(
            data=bands,
            x=x,
            y="mean",
            hue="variant",
            hue_order=shown,
            palette={v: palette[v] for v in shown},
            style="variant",
            style_order=shown,
            markers={v: styles[v][1] for v in shown},
            dashes={v: styles[v][2] for v in shown},
            errorbar=None,
            markersize=4,
            ax=ax,
        )
        for v, band in bands.groupby("variant", sort=False):
            if len(band) == 1:  # one point (a metric of the last step): a band of no width
                # would not show, so its interval is a bar (about the finite values' mean: an
                # errorbar about an infinite one, a diverged seed's, has no size)
                ax.vlines(band[x], band["lo"], band["hi"], color=palette[v], lw=3, alpha=0.5)
                continue
            ax.fill_between(band[x], band["lo"], band["hi"], color=palette[v], alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        if x == "train_flops":
            ax.set_xscale("log")
        if ax is not axes[-1]:
            ax.get_legend().remove()
    if data["value"].min() > 0 and data["value"].max() / data["value"].min() > 20:
        axes[0].set_yscale("log")
    axes[-1].legend(
        title="variant", fontsize=8, ncol=ncol, loc="upper left", bbox_to_anchor=(1.02, 1)
    )
    title = f"{metric}: mean over seeds, {int(LEVEL * 100)}% t band"
    if one_step:
        at = {int(s) for s in itertools.chain.from_iterable(steps)}
        when = f"step {at.pop()} only" if len(at) == 1 else "one step per variant only"
        title = (
            f"{metric} at {when} (the final figure's values) against training FLOPs: mean "
            f"over seeds, {int(LEVEL * 100)}% t interval"
        )
    fig.suptitle(wrap(title, int(fig.get_figwidth() / 0.11)))
    readable_log_ticks(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# a paired interval reaching this many times the median reach is clipped; a final one this many
# times the median half-width
OFF_SCALE = 10
CLIPPED_KEY = ";\narrows: an interval past the axis, its numbers above it"  # in the title


def draw_clipped(ax, row: int, interval, view, label_at: float, color) -> tuple:
    """An interval (lo, mid, hi) past the axis' `view` (left, right) on row `row`: clipped to
    the view, an arrow at each edge it reaches, and its numbers written above the row at
    `label_at`. Returns the clipped lo, mid, hi and the marker's format: none for a mid past
    the edge, whose number alone says where it is."""
    left, right = view
    at = tuple(interval)
    lo, mid, hi = (float(np.clip(v, left, right)) for v in at)
    for edge, marker in ((left, "<"), (right, ">")):
        if edge in (lo, hi):
            ax.plot(edge, row, marker=marker, color=color, ms=8, clip_on=False)
    ax.annotate(
        f"{at[1]:.4g} [{at[0]:.4g}, {at[2]:.4g}]",
        (label_at, row),
        xytext=(0, 7),
        textcoords="offset points",
        ha="center",
        fontsize=8,
        color=color,
    )
    return lo, mid, hi, "o" if left < at[1] < right else "none"


@figure_theme()
def plot_final(runs: pd.DataFrame, metric: str, order: list[str], path: Path) -> None:
    figure, sns = _plt()
    fig = figure(figsize=(max(7, 5 + label_width(order)), 0.5 * len(order) + 2))
    ax = fig.subplots()
    state = np.random.get_state()  # seaborn jitters with NumPy's global generator: seeded, the
    np.random.seed(0)  # figure of the same runs is the same file every time
    try:
        sns.stripplot(
            data=runs, y="variant", x=metric, order=order, color="0.55", size=5, jitter=0.1, ax=ax
        )
    finally:
        np.random.set_state(state)
    s = summarize(runs, metric).set_index("variant").reindex(order)
    y = np.arange(len(order))
    vals = runs[metric].dropna()
    log = bool(len(vals) and vals.min() > 0 and vals.max() / vals.min() > 20)
    # Seeds within 20x of each other keep a linear axis, where one variant's interval a hundred
    # times wider than the rest (U-ViT's val loss, -0.09..0.30 against +-0.001) flattened every
    # other variant's seeds and interval onto one line: as in the paired figure, such an
    # interval is clipped at the scale the others set, with arrows and its numbers.
    half = ((s["hi"] - s["lo"]) / 2).to_numpy()
    finite = half[np.isfinite(half)]
    off = np.zeros(len(order), dtype=bool)
    if not log and len(finite) >= 3 and np.median(finite) > 0:
        off = np.nan_to_num(half) > OFF_SCALE * np.median(finite)
    if log:
        # a log axis has no place for a lower end at or below zero (U-ViT's FD in
        # reports/conditioning-cpu: [-1346, 2567]): it ran off the left edge with no arrow or
        # number, so such an interval is clipped at the seeds' scale as the others are
        off = np.nan_to_num(s["lo"].to_numpy(), nan=1.0) <= 0
    clipped = off.any() and (log or (~off).any())
    if clipped and log:
        # a diverged seed's inf has no place on the axis (it is left out of the mean too)
        ends = [*vals[np.isfinite(vals)], *s["lo"][s["lo"] > 0], *s["hi"][np.isfinite(s["hi"])]]
        pad = (max(ends) / min(ends)) ** 0.05  # 5% of the span each side, as the linear axis
        left, right = min(ends) / pad, max(ends) * pad
        ax.set_xlim(left, right)
    elif clipped:
        kept = runs.loc[runs["variant"].isin(s.index[~off]), metric]
        kept = kept[np.isfinite(kept)]
        left = np.nanmin([*s["lo"][~off], kept.min()])
        right = np.nanmax([*s["hi"][~off], kept.max()])
        left, right = left - 0.05 * (right - left), right + 0.05 * (right - left)
        ax.set_xlim(left, right)
    if clipped:
        middle = math.sqrt(left * right) if log else (left + right) / 2
        for i in np.flatnonzero(off):
            row = s.iloc[i]
            lo, m, hi, fmt = draw_clipped(
                ax, i, (row["lo"], row["mean"], row["hi"]), (left, right), middle, "C3"
            )
            ax.errorbar(m, i, xerr=[[m - lo], [hi - m]], fmt=fmt, color="C3", capsize=4)
    ax.errorbar(
        s["mean"][~off],
        y[~off],
        xerr=[(s["mean"] - s["lo"])[~off], (s["hi"] - s["mean"])[~off]],
        fmt="o",
        color="C3",
        capsize=4,
    )
    if log:
        ax.set_xscale("log")  # one runaway variant would flatten the others
    ax.set_ylim(len(order) - 0.5, -0.5)  # as the paired figure's rows: none on the frame
    # the key in the title: a legend inside the axes covered the interval of a lone variant
    title = f"final {metric} per variant\n(grey: seeds; red: mean, {int(LEVEL * 100)}% t CI"
    if clipped:
        title += CLIPPED_KEY
    ax.set_title(title + ")")
    readable_log_ticks(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@figure_theme()
def plot_paired(paired: pd.DataFrame, metric: str, path: Path) -> None:
    figure, _ = _plt()
    p = paired[paired["metric"] == metric]
    width = max(7, 5 + label_width(p["variant"]))
    fig = figure(figsize=(width, 0.5 * len(p) + 2.5))
    ax = fig.subplots()
    y = np.arange(len(p))
    # red: distinguishable, filled where it survives Holm's correction (the report's verdict)
    # and open where only the unadjusted p is below alpha; grey: not; grey, open and without
    # bars: undetermined (no test, no interval)
    calls = [call(d, u) for d, u in zip(p["distinguishable"], p["undetermined"], strict=True)]
    holm = [call(d, u) for d, u in zip(p["distinguishable_holm"], p["undetermined"], strict=True)]
    colors = {"yes": "C3", "no": "0.5", "undetermined": "0.4"}
    # One variant's interval a hundred times wider than the rest (U-ViT's FD, +-2000 against
    # +-20) flattened every other interval onto the zero line. Such intervals are clipped at a
    # scale the others set, drawn to the edge with an arrow and written out in numbers.
    reach = p[["diff", "diff_lo", "diff_hi"]].abs().max(axis=1)
    finite = reach[np.isfinite(reach)]
    off = (reach > OFF_SCALE * finite.median()) if len(finite) >= 3 else reach < 0
    limit = 1.15 * reach[~off].max() if off.any() and (~off).any() else None
    for i, row in enumerate(p.itertuples()):
        open_ = calls[i] == "undetermined"
        color = colors[calls[i]]
        mfc = "none" if open_ or holm[i] != calls[i] else color
        lo, d, hi = row.diff_lo, row.diff, row.diff_hi
        fmt = "o"
        if limit is not None and off.iloc[i]:
            lo, d, hi, fmt = draw_clipped(ax, i, (lo, d, hi), (-limit, limit), 0, color)
        ax.errorbar(
            d,
            i,
            xerr=None if open_ else [[d - lo], [hi - d]],
            fmt=fmt,
            color=color,
            mfc=mfc,
            capsize=4,
        )
    if limit is not None:
        ax.set_xlim(-limit, limit)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(y, p["variant"])
    # half a row about each (inverted: the first on top): matplotlib's 5% of the rows' span put
    # the first and last of two rows on the frame, their bars and caps drawn over it
    ax.set_ylim(len(p) - 0.5, -0.5)
    base = p["base"].iloc[0] if len(p) else ""
    # wrapped to the axes' width: a long base name or the whole key ran past the figure's edge
    chars = int((width - label_width(p["variant"]) - 1) / 0.1)
    ax.set_xlabel(wrap(f"{metric}: variant - {base} (paired over seeds)", chars))
    title = f"paired difference, {int(LEVEL * 100)}% CI (red: p < {1 - LEVEL:.2f}"
    if any(c == "yes" for c in calls):
        title += ", after Holm too" if holm == calls else "; open red: not after Holm"
    if "undetermined" in calls:
        title += "; open: undetermined, no test"
    if limit is not None:
        title += CLIPPED_KEY
    ax.set_title(wrap(title + ")", chars))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


GRID_COLUMNS = 8
GRID_TITLE_CHARS = 26  # of a variant's name above its grid, 2.6 inches wide at 9 points


def wrap_name(name: str, chars: int) -> str:
    """A variant's name in lines of at most `chars` characters, broken after its _ . -
    (names have no spaces); a part longer than that stays whole."""
    lines = [""]
    for part in re.findall(r"[^_.-]*[_.-]?", name):
        # the pattern's last match is empty: after a line too long already it began a blank one
        if lines[-1] and part and len(lines[-1]) + len(part) > chars:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


@figure_theme()
def sample_grids(runs: pd.DataFrame, order: list[str], out: Path) -> dict[str, str]:
    """Copy each variant's final grid (its first seed) to samples/<variant>.png; tile them."""
    from PIL import Image

    (out / "samples").mkdir(parents=True, exist_ok=True)
    found: dict[str, str] = {}
    for v in order:
        rows = runs[runs["variant"] == v].sort_values("seed")
        for row in rows.itertuples():
            # the run's own files only: a link out of a shared folder (samples/step-N.png ->
            # ~/.ssh/id_rsa) copied the reader's file into the report, which gets committed
            own = Path(row.run_dir).resolve()
            grids = sorted(
                p
                for p in (Path(row.run_dir) / "samples").glob("*.png")
                if p.resolve().is_relative_to(own)
            )
            if grids:
                stem = v
                if len(v) > NAME_MAX - len(".png") or windows_name_error(f"{v}.png"):
                    # results of an ablation made before `ablate` refused such a name: cut
                    # to a file name's 255 bytes, kept apart from another cut alike by a hash
                    # (a Windows device's, `aux`: the report opened the device there, and a
                    # report committed from Linux would not check out on Windows)
                    stem = f"{v[:240]}-{hashlib.sha256(v.encode()).hexdigest()[:10]}"
                shutil.copyfile(grids[-1], out / "samples" / f"{stem}.png")
                found[v] = f"samples/{stem}.png"
                break
    if found:
        figure, _ = _plt()
        # rows of GRID_COLUMNS: one row of 40 grids was 12,480 pixels wide, its titles run
        # together
        cols = min(len(found), GRID_COLUMNS)
        rows = math.ceil(len(found) / cols)
        width = max(2.6 * cols, 6.5)  # a lone grid's figure cut the suptitle at both edges
        fig = figure(figsize=(width, 3.4 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat[len(found) :]:
            ax.axis("off")
        for ax, (v, rel) in zip(axes.flat, found.items(), strict=False):
            img = np.asarray(Image.open(out / rel))
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_title(wrap_name(v, GRID_TITLE_CHARS), fontsize=9)
            ax.axis("off")
        fig.suptitle(
            wrap(
                "final sample grids (one row per class shown; first seed of each variant)",
                int(width / 0.11),
            )
        )
        fig.tight_layout()
        fig.savefig(out / "samples.png", dpi=120)
    return found


# -- tables -------------------------------------------------------------------------------------
# the config keys that pick a run's validation images (and training data)
VAL_IMAGE_KEYS = tuple(
    f"cfg.{k}"
    for k in (
        "data.name",
        "data.image_size",
        "data.root",
        "data.val_fraction",
        "data.split_seed",
        "data.split_by",
        "data.num_samples",
        "eval.val_images",
    )
)


def differing(runs: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    """The columns of `cols` (those in `runs`) whose values differ between runs."""
    # as text: a null (data.image_size: the native size) is one value, not a missing one
    return [c for c in cols if c in runs and runs[c].map(str).nunique() > 1]


def other_data(runs: pd.DataFrame) -> list[str]:
    """A line per data config whose runs saw different data (their summaries' items_sha256: a
    folder's files added, removed or renamed between runs of one config), naming each
    fingerprint's runs. Runs of versions before the fingerprint have none and are left out."""
    if "items_sha256" not in runs or runs["items_sha256"].nunique() < 2:  # nulls not counted
        return []
    known = runs[runs["items_sha256"].notna()]
    # not data.num_workers: how a run loads, not what (unhashed, config.EXECUTION_KEYS), so runs
    # of one plan can differ in it (`ablate --seeds 2 --set data.num_workers=8` elsewhere)
    cols = sorted(c for c in known if c.startswith("cfg.data.") and c != "cfg.data.num_workers")
    # as text: a null (data.root of a built-in set) is one value, not a missing one
    config = known[cols].map(str).agg("\0".join, axis=1) if cols else pd.Series("", known.index)
    lines = []
    for _, same in known.groupby(config, sort=False):
        if same["items_sha256"].nunique() < 2:
            continue
        parts = [
            ", ".join(
                f"{v} seed{'s' * (len(s) > 1)} {', '.join(map(str, s))}"
                for v, s in of.groupby("variant", sort=False)["seed"]
            )
            + f" ({sha[:12]})"
            for sha, of in same.groupby("items_sha256", sort=False)
        ]
        root = same["cfg.data.root"].iloc[0] if "cfg.data.root" in same else None
        lines.append(
            "**Not the same data in every run of one data config**"
            + (f" (data.root {root}: its files changed between runs?)" if root else "")
            + ": "
            + "; ".join(parts)
            + ". The runs of each data fingerprint (items_sha256 of summary.json) trained and "
            "validated on other images than the others', so comparisons across them are not "
            "like for like."
        )
    return lines


def protocol_changed(runs: pd.DataFrame) -> str:
    """The runs resumed from a checkpoint that validated otherwise (an older version's: summary's
    val_protocol_changed_at), naming each and the step: their curves' val losses up to it are
    of the old protocol, a jump, not training; their final ones of their summary's."""
    if "val_protocol_changed_at" not in runs or runs["val_protocol_changed_at"].isna().all():
        return ""
    changed = runs[runs["val_protocol_changed_at"].notna()]
    named = "; ".join(
        f"{v} seed{'s' * (len(of) > 1)} "
        + ", ".join(f"{r.seed} (step {r.val_protocol_changed_at:.0f})" for r in of.itertuples())
        for v, of in changed.groupby("variant", sort=False)
    )
    return (
        f"**Val losses of two protocols within a run**: {named}, resumed from a checkpoint of "
        "an earlier version that validated otherwise (summary.json's val_protocol_changed_at). "
        "Their val-loss curves up to that step measure another quantity than after it (a jump "
        "there is no training); their final val losses are of this version's protocol."
    )


def cost_table(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    cols = {
        "backbone": "first",
        "conditioning": "first",
        "params": "first",
        "macs": "first",
        "tokens": "first",
        "train_flops": "first",
        "img_per_s": "mean",
        "train_seconds": "mean",
    }
    cols = {k: v for k, v in cols.items() if k in runs}
    t = runs.groupby("variant").agg(cols).reindex(order).reset_index()
    t["seeds"] = runs.groupby("variant").size().reindex(order).to_numpy()
    if "device" in runs:
        by = runs.assign(device=_devices(runs)).groupby("variant")["device"]
        t["device"] = by.agg(lambda d: "; ".join(sorted(set(d)))).reindex(order).to_numpy()
        # a mean over devices is the throughput of none of them: a variant whose seeds ran on
        # several devices has no mean here (the report gives each device's)
        mixed = by.nunique().reindex(order).to_numpy() > 1
        for c in ("img_per_s", "train_seconds"):
            if c in t:
                t.loc[mixed, c] = np.nan
    return t


def _devices(runs: pd.DataFrame) -> pd.Series:
    """Each run's recorded device; '?' where its summary has none."""
    return runs["device"].fillna("?").astype(str)


def _per_device(runs: pd.DataFrame, variant: str, col: str, spec: str = ".0f") -> str:
    """A variant's mean of `col` on each of its devices: '120 (cpu ...); 3400 (NVIDIA H100)'."""
    mine = runs[runs["variant"] == variant]
    means = mine.groupby(_devices(mine))[col].mean()
    return "; ".join(f"{_fmt(m, spec)} ({d})" for d, m in means.items())


def loss_scales(runs: pd.DataFrame) -> dict[str, list[str]]:
    """The variants of each validation-loss scale: every objective and prediction target has
    its own (DDPM's eps-MSE, its v-MSE and flow matching's velocity-MSE are other quantities),
    and so has each DDPM schedule (timestep k is another noise level under linear and cosine)
    and validation grid (summary's val_grid: DDPM runs made before the midpoint grid have none,
    and an ablation rerun with new variants mixes them; its number of levels, eval.val_levels,
    and DDPM's T, where they differ between runs)."""
    scale = ("objective", "cfg.objective.prediction", "cfg.objective.schedule", "val_grid")
    parts = runs[[c for c in scale if c in runs]].astype(object)
    # the levels a run logged (its val_loss_l<k>): a run without any (failed) says nothing
    logged = runs[[c for c in runs if re.fullmatch(r"val_loss_l\d+", c)]].notna().sum(axis=1)
    if logged[logged > 0].nunique() > 1:
        parts["levels"] = logged.map(lambda n: f"{n} levels" if n else None)
    if "cfg.objective.num_timesteps" in runs and runs["cfg.objective.num_timesteps"].nunique() > 1:
        parts["T"] = runs["cfg.objective.num_timesteps"].map(lambda t: f"T {t:.0f}", "ignore")
    if parts.empty:
        return {}
    kind = parts.apply(lambda r: "-".join(str(v) for v in r if pd.notna(v)), axis=1)
    return {k: list(dict.fromkeys(runs.loc[kind == k, "variant"])) for k in dict.fromkeys(kind)}


def kendall_agreement(found: list[str], reference: list[str]) -> tuple[float, list[tuple]]:
    """Kendall's tau between two rankings of the same items and the pairs they disagree on."""
    items = [v for v in reference if v in found]
    pos = {v: found.index(v) for v in items}
    concordant = discordant = 0
    flips = []
    for i, a in enumerate(items):
        for b in items[i + 1 :]:  # reference says a before b
            if pos[a] < pos[b]:
                concordant += 1
            else:
                discordant += 1
                flips.append((a, b))
    total = concordant + discordant
    return ((concordant - discordant) / total if total else math.nan), flips


def _level_neighbours(runs: pd.DataFrame, metric: str, found: list[str]) -> str:
    """The places of a ranking that seed noise could swap: each pair of neighbours whose paired
    comparison is not distinguishable. tau counts the order of the means; three seeds put
    cross_attn 0.0002 above in_context, "the paper's order", where p = 0.88."""
    level = []
    for a, b in itertools.pairwise(found):
        pair = runs[runs["variant"].isin([a, b])]
        if not (has_values(pair, metric, a) and has_values(pair, metric, b)):
            continue
        c = compare_to_base(pair, metric, a).iloc[0]
        if call(c["distinguishable"], c["undetermined"]) != "yes":
            p = "undetermined" if c["undetermined"] else f"p = {format_p(c['p_value'])}"
            level.append(f"{a}/{b} ({p})")
    if not level:
        return ""
    return (
        " Neighbours in the order found that are not distinguishable from seed noise (paired "
        f"t, alpha = {1 - LEVEL:.2f}): {', '.join(level)}; the order within each of those "
        "pairs is not a finding, and tau counts it as if it were."
    )


def seed_notes(runs: pd.DataFrame, metric: str, finite: pd.Series, ranked: bool):
    """The report's lines on the seeds behind each variant's mean of `metric` (`finite`: the
    runs with a finite value, as mean_ci takes them): that they differ between variants, and
    which finished runs have no finite value (diverged) in a variant that has others. Those
    are left out of its mean, so a variant that diverged on two seeds of three was ranked
    first on its third, the table saying only "1 seed"."""
    lines = []
    # per metric: an inf FD of one seed made the val_loss ranking, of equal seeds, say its
    # means rest on different seeds; a variant without values has no mean to compare
    seed_sets = {tuple(sorted(g)) for _, g in runs.loc[finite, "seed"].groupby(runs["variant"])}
    if len(seed_sets) > 1:
        lines += [
            f"The variants' means of {metric} rest on different seeds (see the "
            + ("seeds column): the ranking and the means" if ranked else "n column): the means")
            + " compare them over different seed sets, not seed for seed.",
            "",
        ]
    lost = [
        f"{v} seed{'s' * (len(s) > 1)} {', '.join(str(int(x)) for x in sorted(s))}"
        for v, s in runs.loc[~finite, "seed"].groupby(runs.loc[~finite, "variant"], sort=False)
        if finite[runs["variant"] == v].any()
    ]
    if lost:
        lines += [
            f"**Finished runs without a finite {metric}** (diverged, or not evaluated): "
            + "; ".join(lost)
            + ". Each is left out of its variant's mean, so a variant that diverged on some "
            "seeds is ranked and compared by the seeds that did not.",
            "",
        ]
    return lines


def one_seed_note(final: pd.DataFrame, order: list[str]) -> str:
    """Why intervals read "–": the variants (and metrics) with one seed's value. Said once,
    where the intervals are explained: with one seed per variant every CI, std and paired p of
    the report was "–", and no line said why."""
    one = final[final["n"] == 1]
    if one.empty:
        return ""
    of = one.groupby("variant", sort=False)["metric"].agg(list)
    counted = final[final["n"] > 0].groupby("variant", sort=False)["metric"].agg(list)
    whole = [v for v in of.index if of[v] == counted[v]]  # one seed in each of its metrics
    many = len(of) > 1 and len(whole) < len(order)  # "every variant has"
    names = (
        "every variant"
        if len(whole) == len(order)
        else ", ".join(v if v in whole else f"{v} ({', '.join(of[v])})" for v in of.index)
    )
    return (
        f"**One seed gives no interval**: {names} {'have' if many else 'has'} one seed with a "
        f'value, so {"their" if many else "its"} std and {int(LEVEL * 100)}% CI read "–" (a t '
        "interval over n seeds has n - 1 degrees of freedom) and no paired test is possible; "
        "run more seeds with `dit-bench ablate ... --seeds` (e.g. 0-2)."
    )


def _holm_note(r, family: int) -> str:
    """What Holm's correction changes in a comparison's verdict: nothing said where the call
    stands, so a "distinguishable" that does not survive it is never read unqualified."""
    if call(r.distinguishable, r.undetermined) == call(r.distinguishable_holm, r.undetermined):
        return ""
    return (
        f" Not distinguishable after Holm's correction for the {family} comparisons of "
        f"{r.metric}: adjusted p = {format_p(r.p_holm)}."
    )


def _fmt(x, spec=".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- the report ---------------------------------------------------------------------------------
def build_report(source: str | Path, out: str | Path) -> Path:
    source, out = Path(source), Path(out)
    table = collect([source])
    if "variant" not in table:
        raise ValueError(f"{source}: runs carry no variant labels (labels.json)")
    plan = load_plan(source, table)
    table, left_out, copies = plan_runs(source, table, plan)
    have = set(table["config_hash"]) if "config_hash" in table else set()
    unfinished = [
        f"{r['variant']} seed {r['seed']}"
        for r in plan.get("runs", [])
        if r["config_hash"] not in have
    ]
    # a plan without its run list (older ablation.json) still names its variants
    listed = {r["variant"] for r in plan.get("runs", [])}
    unfinished += [
        f"all seeds of {v}"
        for v in plan["variants"]
        if v not in set(table["variant"]) and v not in listed
    ]
    if table.empty:  # e.g. a new `ablate --set` call into a folder of an earlier one's runs
        raise ValueError(
            f"{source}: none of the plan's runs has finished"
            + (f" (not finished: {', '.join(unfinished)})" if unfinished else "")
            + (f"; {left_out} finished runs of other configs left out" if left_out else "")
            + ": `dit-bench ablate` trains what is missing"
        )
    order = [v for v in plan["variants"] if v in set(table["variant"])]
    order += sorted(set(table["variant"]) - set(order))
    # a folder from someone else: "../x" or "/home/..." would put a grid outside the report
    if bad := [v for v in order if not isinstance(v, str) or not VARIANT.fullmatch(v)]:
        raise ValueError(
            f"{source}: variant names {bad} (ablation.json or labels.json) are not names "
            "`dit-bench ablate` writes (letters, digits, _ . -)"
        )
    base = plan["base_variant"]
    long = curves(table)
    long["key"] = long["metric"].map(metric_key)
    metrics = [metric_key(m) for m in plan["metrics"]]
    runs = final_values(table, long, metrics)
    rank = {v: i for i, v in enumerate(order)}
    runs = runs.sort_values(
        ["variant", "seed"], key=lambda c: c.map(rank) if c.name == "variant" else c
    )
    runs = runs.reset_index(drop=True)
    metrics = [m for m in metrics if m in runs]
    missing = [metric_key(m) for m in plan["metrics"] if metric_key(m) not in metrics]
    # a metric without values: never evaluated, or every run that reached it diverged (its
    # summary holds null): the report says which
    nulls = summary_nulls(runs)
    diverged = [m for m in missing if nulls.map(lambda k, m=m: m in k).any()]
    missing = [m for m in missing if m not in diverged]
    if not metrics:
        raise ValueError(
            f"{source}: no finished run has a value of any of the plan's metrics"
            + (f"; every run diverged before one of {', '.join(diverged)}" if diverged else "")
            + (f"; not evaluated: {', '.join(missing)}" if missing else "")
        )
    out.mkdir(parents=True, exist_ok=True)
    # report.md is written last: one stopped on the way (Ctrl-C, a crash) must not leave the
    # earlier report.md, whole to the eye, over the new tables and figures
    (out / "report.md").unlink(missing_ok=True)

    final = pd.concat([summarize(runs, m) for m in metrics], ignore_index=True)
    final["variant"] = pd.Categorical(final["variant"], order, ordered=True)
    final = final.sort_values(["metric", "variant"]).reset_index(drop=True)
    final["variant"] = final["variant"].astype(str)
    # a base without values of a metric (it diverged, or was not evaluated) leaves nothing to
    # pair with: that metric's comparisons are left out and the report says why
    unpaired = [m for m in metrics if not has_values(runs, m, base)]
    frames = [compare_to_base(runs, m, base) for m in metrics if m not in unpaired]
    paired = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=paired_columns())
    )
    cost = cost_table(runs, order)
    keep = [c for c in runs.columns if not c.startswith("cfg.")]
    # a U-Net has no patch, heads or tokens: an ablation of U-Nets left them null, and parquet's
    # null type made pd.read_parquet([this, other]) fail
    spec = {c: "Int64" for c in ("depth", "width", "heads", "patch", "tokens") if c in keep}
    save_table(runs[keep].astype(spec), out / "runs")
    save_table(final, out / "final")
    save_table(paired, out / "paired")
    save_table(cost, out / "cost")
    # each metric under the name the runs, final and paired tables give it (val_loss, not
    # metrics.csv's val/loss): a filter or join on final's `metric` finds its curve
    save_table(long.assign(metric=long["key"]).drop(columns="key"), out / "curves")

    curved = set()
    for m in metrics:
        if plot_curves(long, m, order, out / f"curves_{m}.png"):
            curved.add(m)
        plot_final(runs, m, order, out / f"final_{m}.png")
        if len(paired[paired["metric"] == m]):
            plot_paired(paired, m, out / f"paired_{m}.png")
    grids = sample_grids(runs, order, out)

    # -- report.md ---------------------------------------------------------------------------
    primary = metrics[0]
    fin = final[final["metric"] == primary].set_index("variant")
    ranking = fin.sort_values("mean").index.tolist()
    seeds = {v: sorted(runs.loc[runs["variant"] == v, "seed"].tolist()) for v in order}
    if len({tuple(s) for s in seeds.values()}) <= 1:
        counted = f"{len(order)} variants x seeds {next(iter(seeds.values()), [])}"
    else:
        counted = f"{len(order)} variants, seeds " + ", ".join(f"{v} {s}" for v, s in seeds.items())
    # the seeds behind each variant's mean (of any metric): unequal sets make the ranking and the
    # means compare different seeds (the paired comparisons use the shared seeds only)
    # finite values only, as mean_ci takes them: an inf (a diverged FD) is no value
    finite = {
        m: np.isfinite(pd.to_numeric(runs[m], errors="coerce").astype(float)) for m in metrics
    }
    title = plan.get("experiment", plan.get("name", source.name))
    md = [f"# Ablation report: {title}", ""]
    if plan.get("description"):
        md += [plan["description"], ""]
    if plan.get("profile_description"):
        md += [f"**Profile `{plan.get('profile')}`.** {plan['profile_description']}", ""]
        if plan.get("overrides"):  # the description is the file's: say what these runs changed
            sets = ", ".join(f"`--set {o}`" for o in plan["overrides"])
            md += [f"These runs change that profile with {sets}.", ""]
        own = plan.get("profile_seeds")  # the description's; --seeds replaced or added to them
        if own and sorted(own) != sorted(plan.get("seeds", own)):
            seeds, own = (", ".join(map(str, sorted(x))) for x in (plan["seeds"], own))
            md += [f"These runs are of seeds {seeds}; the profile's own are {own}.", ""]
    cmd = plan.get("command") or (
        f"dit-bench ablate {plan['source']} --profile {plan.get('profile', '?')}"
        + "".join(f" --set {o}" for o in plan.get("overrides", []))
        if "source" in plan
        else None  # no ablation.json: the runs' labels are all there is
    )
    # The validation noise is drawn per validation batch: of val_batch images where the summary
    # says so, of train.batch_size in runs made before that was fixed; shared between variants
    # only when those agree.
    shared = "same validation images and noise, same data order"
    if other_images := differing(runs, VAL_IMAGE_KEYS):
        # a variant of another resolution or data set validates on other images: its pairs
        # share a seed, not the quantity measured
        keys = ", ".join(c.removeprefix("cfg.") for c in other_images)
        shared = (
            f"but not on the same validation images: the variants' {keys} differ, so each "
            "pair compares losses on other images and other training data"
        )
    elif "batch_size" in runs and val_batches(runs).nunique() > 1 < runs["batch_size"].nunique():
        shared = (
            "same validation images; the variants' train.batch_size differ, and with it the "
            "batching of the validation noise (runs of a version before its batch was fixed), "
            "so the noise is not shared; same data order"
        )
    elif "batch_size" in runs and val_batches(runs).nunique() > 1:
        # one train.batch_size, old runs beside new (seeds added to a plan by a newer version):
        # the batch sizes do not differ, the versions do
        new = ", ".join(str(int(b)) for b in runs["val_batch"].dropna().unique())
        shared = (
            "same validation images; runs of a version before the validation batch was fixed "
            "(no val_batch in their summary.json) drew the validation noise in batches of "
            f"train.batch_size, the others in batches of {new}, so the noise is not shared "
            "between them; same data order"
        )
    md += [
        "Made with:",
        "",
        "```bash",
        *([cmd] if cmd else []),
        f"dit-bench report ablation {source} -o {out}",
        "```",
        "",
        *(
            [
                f"Left out: {left_out} finished runs in the folder whose configs are not in this "
                "plan (`ablation.json`: the last `dit-bench ablate` call's configs, all seeds).",
                "",
            ]
            if left_out
            else []
        ),
        *(
            [
                f"Copies: {', '.join(copies)} repeat the config of another finished run "
                "directory (folders merged from two machines?); each run is reported once, "
                "from its newest directory.",
                "",
            ]
            if copies
            else []
        ),
        *(
            [
                f"Not finished: {', '.join(unfinished)} (planned, but no summary.json: failed "
                "or still to run; `dit-bench ablate` again trains what is missing).",
                "",
            ]
            if unfinished
            else []
        ),
        f"{len(runs)} finished runs: {counted}; base variant **{base}**. Lower is better for "
        f"every metric. Intervals are two-sided {int(LEVEL * 100)}% t intervals over seeds "
        "(n - 1 degrees of freedom); "
        + (
            f"comparisons are paired by seed ({shared}), paired t-test, "
            f"alpha = {1 - LEVEL:.2f} per comparison (the distinguishable column: expect about "
            f"one false call in {round(1 / (1 - LEVEL))} comparisons of truly equal variants); "
            f"with {len(set(order) - {base})} comparisons per metric, the after-Holm column "
            "calls a difference only where the Holm-Bonferroni adjusted p over that metric's "
            "tested comparisons (p_holm; an undetermined one has no test) is below "
            f"{1 - LEVEL:.2f}, which keeps the chance of any false call per metric at "
            f"{1 - LEVEL:.2f}."
            if base in order and len(order) > 1
            # a lone variant was told of "0 comparisons" and an after-Holm column it lacks
            else f"no paired comparisons: the base variant {base} is the only variant; its "
            "mean and interval stand alone."
            if base in order
            else f"no paired comparisons: the base variant {base} has no finished runs, so "
            "there is nothing to pair the others with; the means and intervals stand alone."
        ),
        "",
    ]
    if note := one_seed_note(final, order):
        md += [note, ""]
    if missing:
        md += [f"Not evaluated in these runs (no values): {', '.join(missing)}.", ""]
    if diverged:
        md += [
            f"No values of {', '.join(diverged)}: every run diverged (not finite) before "
            "reporting one.",
            "",
        ]
    for line in other_data(runs):
        md += [line, ""]
    if note := protocol_changed(runs):
        md += [note, ""]

    scales = loss_scales(runs)
    scale_note = (
        [
            "**Validation losses of different objectives, targets, DDPM schedules or "
            "validation grids are not on one scale** (here: "
            + ", ".join(f"{k} ({', '.join(vs)})" for k, vs in scales.items())
            + "): each is its own objective's training MSE at its own noise levels, so compare "
            "val_loss only between variants of one scale, and across scales by samples (FD).",
            "",
        ]
        if len(scales) > 1
        else []
    )
    scale_of = {v: k for k, vs in scales.items() for v in vs}

    def off_scale(variant: str, m: str) -> str:
        # "higher (worse)" of a flow variant's velocity MSE against a DDPM base's eps MSE
        # compares two quantities, not two fits
        if not m.startswith("val_loss") or scale_of.get(variant) == scale_of.get(base):
            return ""
        return (
            f" Not like for like: {variant}'s {m} is {scale_of.get(variant)}'s MSE and "
            f"{base}'s is {scale_of.get(base)}'s (other scales), so this difference says "
            "nothing of which trains better; compare them by FD."
        )

    md += [f"## Ranking by final {primary}", ""]
    if primary.startswith("val_loss"):
        md += scale_note
    if {"steps", "batch_size"} <= set(runs) and (runs["steps"] * runs["batch_size"]).nunique() > 1:
        # final values after unequal numbers of images: the longer-trained variant wins for its
        # budget too (equal steps x batch is one budget, however it is split)
        budgets = runs.groupby("variant", sort=False)[["steps", "batch_size"]].first()
        md += [
            "**The variants train for different budgets** (steps x batch: "
            + ", ".join(
                f"{v} {b['steps']:.0f} x {b['batch_size']:.0f}" for v, b in budgets.iterrows()
            )
            + "): each is ranked and compared at its own last step, so a difference mixes the "
            "variants' own effect with the longer training; the curves against training FLOPs "
            "compare them at equal compute.",
            "",
        ]
    md += seed_notes(runs, primary, finite[primary], True)
    rows = []
    for i, v in enumerate(ranking, 1):
        r = fin.loc[v]
        c = cost.set_index("variant").loc[v]
        rows.append(
            [
                str(i),
                f"**{v}**" if v == base else v,
                # significant digits, as the per-metric tables: five decimals showed losses of
                # 1e-5 (a val_loss_l<k> at high noise) as ties, and an FD's CI to 1e-5
                _fmt(r["mean"], ".5g"),
                f"[{_fmt(r['lo'], '.5g')}, {_fmt(r['hi'], '.5g')}]",
                str(int(r["n"])),
                f"{int(c['params']):,}",
                _si(c["macs"]),
            ]
        )
    md += [
        _md_table(
            [
                "rank",
                "variant",
                f"{primary} mean",
                f"{int(LEVEL * 100)}% CI",
                "seeds",
                "params",
                "MACs",
            ],
            rows,
        ),
        "",
    ]
    ref = plan.get("reference")
    if ref and ref.get("ranking"):
        tau, flips = kendall_agreement(ranking, ref["ranking"])
        found = " < ".join(v for v in ranking if v in ref["ranking"])
        md += [
            f"Reference ranking ({ref.get('source', 'reference')}): "
            f"{' < '.join(ref['ranking'])}. "
            + (
                # one of them found (or none) is no order: tau of no pairs was "+nan"
                f"Found here: {found or 'none of them'}, so there is no order to compare."
                if math.isnan(tau)
                else f"Found here (by {primary}): {found}. Kendall tau = {tau:+.2f}"
            )
            + (
                "; swapped pairs: " + ", ".join(f"{a}/{b}" for a, b in flips) + "."
                if flips
                else ""
                if math.isnan(tau)
                else " (same order)."
            )
            + _level_neighbours(runs, primary, [v for v in ranking if v in ref["ranking"]]),
            "",
        ]

    for m in metrics:
        md += [f"## {m}", ""]
        if m.startswith("val_loss"):
            md += scale_note
        md += [f"![{m} curves](curves_{m}.png)", ""] if m in curved else []
        md += [f"![final {m}](final_{m}.png)", ""]
        if m != primary:  # the primary's notes stand above its ranking
            md += seed_notes(runs, m, finite[m], False)
        f = final[final["metric"] == m]
        md += [
            _md_table(
                ["variant", "mean", "std", f"{int(LEVEL * 100)}% CI", "n"],
                [
                    [
                        r.variant,
                        _fmt(r.mean, ".5g"),
                        _fmt(r.std, ".2g"),
                        f"[{_fmt(r.lo, '.5g')}, {_fmt(r.hi, '.5g')}]",
                        str(r.n),
                    ]
                    for r in f.itertuples()
                ],
            ),
            "",
        ]
        p = paired[paired["metric"] == m]
        if m in unpaired and any(v != base for v in order):
            why = (
                "the base has no finished runs"
                if base not in order
                else f"the base's runs have no {m} values"
            )
            md += [f"No paired comparison of {m} against {base}: {why}.", ""]
        if len(p):
            md += [f"### Paired against {base}", "", f"![paired {m}](paired_{m}.png)", ""]
            md += [
                _md_table(
                    [
                        "variant",
                        "mean diff",
                        "relative",
                        f"{int(LEVEL * 100)}% CI",
                        "p (paired t)",
                        "pairs",
                        "distinguishable",
                        "p (Holm)",
                        "after Holm",
                    ],
                    [
                        [
                            r.variant,
                            _fmt(r.diff, "+.3g"),
                            format_relative(r.relative),
                            f"[{_fmt(r.diff_lo, '+.3g')}, {_fmt(r.diff_hi, '+.3g')}]",
                            format_p(r.p_value),
                            str(r.n_pairs),
                            call(r.distinguishable, r.undetermined),
                            format_p(r.p_holm),
                            call(r.distinguishable_holm, r.undetermined),
                        ]
                        for r in p.itertuples()
                    ],
                ),
                "",
            ]
            tested = int(p["p_value"].notna().sum())  # Holm's family: the comparisons tested
            md += [
                f"- {r.verdict}{_holm_note(r, tested)}{off_scale(r.variant, m)}"
                for r in p.itertuples()
            ] + [""]

    md += ["## Cost", ""]
    # runs of several devices in one folder: each variant's throughput names its device(s)
    devices = sorted(set(_devices(runs))) if "device" in runs else ["?"]
    several = len(devices) > 1

    def timing(r, col: str) -> str:
        if several and ";" in r.device:  # seeds on several devices: one mean per device
            return _per_device(runs, r.variant, col)
        return _fmt(getattr(r, col), ".0f")

    md += [
        _md_table(
            [
                "variant",
                "backbone",
                "conditioning",
                "params",
                "MACs (fwd)",
                "tokens",
                "train FLOPs",
                "img/s",
                "train s",
                *(["device"] if several else []),
            ],
            [
                [
                    r.variant,
                    str(r.backbone),
                    str(r.conditioning),
                    f"{int(r.params):,}",
                    _si(r.macs),
                    _fmt(r.tokens, ".0f"),
                    _si(r.train_flops),
                    timing(r, "img_per_s"),
                    timing(r, "train_seconds"),
                    *([r.device] if several else []),
                ]
                for r in cost.itertuples()
            ],
        ),
        "",
        "MACs: forward pass, one multiply-add = 1 (the DiT paper's 'Gflops'); training FLOPs = "
        "3 x forward FLOPs x images seen. Throughput is the mean over seeds of images per "
        "second of training steps "
        + (
            f"on the recorded device ({devices[0]})"
            if not several
            else "on each variant's recorded device (the device column; the runs ran on "
            f"{len(devices)} devices: {', '.join(devices)}), per device where a variant's "
            "seeds ran on several"
        )
        + "; on a shared machine it is only indicative.",
        "",
    ]
    if grids:
        md += ["## Samples", "", "![sample grids](samples.png)", ""]
        md += [" · ".join(f"[{v}]({rel})" for v, rel in grids.items()), ""]
    md += [
        "## Tables",
        "",
        "`runs`, `final`, `paired`, `cost`, `curves` as `.csv` and `.parquet` in this folder.",
        "",
    ]
    notes = out / NOTES
    if notes.is_file():
        md += ["## Discussion", "", notes.read_text(encoding="utf-8").strip(), ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    return out / "report.md"


def main(source: str | Path, out: str | Path) -> int:
    path = build_report(source, out)
    print(f"wrote {path}")
    return 0
