"""Figures of the scale study (``experiments.scale_ladder``): forgetting against model size, and average
final loss against compute for continual + replay and the union baseline at each size.

Both take the study's final losses (``metrics.final_losses`` of its runs, or its eval lines, reduced the
same way) and draw one panel per shift found, from ``metrics.scale_table``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cptlab.analysis import metrics as M
from cptlab.study import paper
from cptlab.viz import common as C


def _tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    finals = C.finals(df, M.K_FINAL)
    shifts = [s for s in paper.SHIFTS if "shift" in finals.columns and (finals["shift"] == s).any()]
    return {shift: M.scale_table(finals, shift) for shift in shifts}


def _params_label(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def plot_scale_forgetting(df: pd.DataFrame, axes: C.AxesArg = None) -> Figure:
    """Forgetting (final D0 loss minus the base model's, same size) against non-embedding parameters,
    with 0% and with the chosen replay; one panel per shift."""
    tables = _tables(df)
    fig, axs, own = C.panels(axes, max(1, len(tables)), (5.5 * max(1, len(tables)), 4.2))
    plotted = False
    for ax, (shift, table) in zip(axs, tables.items()):
        x = table.index.to_numpy(dtype=float)
        chosen = M.replay_label(paper.CHOSEN_REPLAY[shift])
        for i, (col, label) in enumerate((("forgetting 0%", "no replay"),
                                          ("forgetting chosen", "chosen replay"))):
            ax.plot(x, table[col].to_numpy(dtype=float), marker=C.MARKERS[i], label=label)
            plotted = plotted or bool(np.isfinite(table[col]).any())
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(x, [_params_label(v) for v in x])
        ax.minorticks_off()
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel(f"forgetting: D0 loss rise ({paper.D0})")
        ax.set_title(f"{shift} shift ({paper.D0} -> {paper.SHIFTS[shift]}), chosen replay {chosen}")
    return C.finish(fig, axs, own, "Forgetting against model size", [] if tables else ["no runs"], plotted)


def plot_scale_compute(df: pd.DataFrame, axes: C.AxesArg = None) -> Figure:
    """Average final loss against compute (FLOPs; a continual run counts only its own stage, the base
    model exists already) for continual + chosen replay and the union baseline, one point per size
    (labelled with its parameters); one panel per shift."""
    tables = _tables(df)
    fig, axs, own = C.panels(axes, max(1, len(tables)), (5.5 * max(1, len(tables)), 4.2))
    plotted = False
    for ax, (shift, table) in zip(axs, tables.items()):
        chosen = M.replay_label(paper.CHOSEN_REPLAY[shift])
        series: list[tuple[str, str, dict[str, Any]]] = [
            ("flops union", "avg union", {"label": "union baseline", "marker": "s", **C.UNION_STYLE}),
            ("flops chosen", "avg chosen", {"label": "continual, chosen replay", "marker": "o"})]
        for x_col, y_col, style in series:
            x, y = table[x_col].to_numpy(dtype=float), table[y_col].to_numpy(dtype=float)
            ax.plot(x, y, **style)
            plotted = plotted or bool(np.isfinite(y).any())
            for n, xi, yi in zip(table.index, x, y):
                if np.isfinite(xi) and np.isfinite(yi):
                    ax.annotate(_params_label(n), (xi, yi), textcoords="offset points", xytext=(4, 4),
                                fontsize="x-small")
        ax.set_xscale("log")
        ax.set_xlabel("compute (FLOPs)")
        ax.set_ylabel("average final validation loss (D0, D1)")
        ax.set_title(f"{shift} shift ({paper.D0} -> {paper.SHIFTS[shift]}), chosen replay {chosen}")
    return C.finish(fig, axs, own, "Compute vs average final loss at each model size",
                   [] if tables else ["no runs"], plotted)
