"""The report figures' theme, and tick labels of their log axes readable at any span of the data."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

# Spans (in decades) below which a log axis is labelled at 1, 2 and 5 x 10^k rather than at its
# decades alone, which may be one or none.
FEW_DECADES = 2.0
LOG_MARK = ", log scale"


@contextlib.contextmanager
def figure_theme() -> Iterator[None]:
    """seaborn's theme for the report's figures only: reports are built from notebooks and
    scripts too, and with the theme set for good every later figure of the caller's was drawn
    in it (and with the backend switched to Agg for the report, its `plt.show()` showed none)."""
    import matplotlib
    import seaborn as sns

    with matplotlib.rc_context():
        sns.set_theme(style="whitegrid", context="notebook")
        yield


def agg_figure(**kwargs):
    """A figure drawn by Agg, outside pyplot: no backend to choose (the caller's stays) and no
    entry in the caller's list of open figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def readable_log_ticks(fig) -> None:
    """Relabel every log axis of `fig`. Where few decades are in view matplotlib labels the
    minor ticks too (2, 3, 4, 6 x 10^k; or every 0.05 x 10^12 across a few percent), and
    neighbouring labels run together. Labelled instead: the decades alone from FEW_DECADES up;
    1, 2 and 5 x 10^k from one decade; four or five evenly spaced values below one decade (where
    no 10^k may lie in view). Below FEW_DECADES the labels read as the report's tables (`.3g`),
    and the axis' label says it is a log axis: evenly stepped values at uneven distances (3e+11,
    4.5e+11, 6e+11) or 0.5, 0.75, 1 read as a linear axis, and the curves' slopes with them.
    Call it after the data and labels are drawn (the span is the axis' view) and before the
    layout."""
    from matplotlib import ticker

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "log":
                continue
            axis.set_minor_formatter(ticker.NullFormatter())
            lo, hi = sorted(axis.get_view_interval())
            if not (0 < lo < hi) or math.log10(hi / lo) >= FEW_DECADES:
                continue
            if math.log10(hi / lo) >= 1:
                axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            else:
                axis.set_major_locator(ticker.MaxNLocator(5))
            axis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:.3g}"))
            if axis.get_label_text() and LOG_MARK not in axis.get_label_text():
                axis.set_label_text(f"{axis.get_label_text()}{LOG_MARK}")
