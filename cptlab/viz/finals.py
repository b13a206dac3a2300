"""Figures of final losses: paper figure 1 (compute against average final loss) and table 2 as a figure
(final losses against the replay fraction). Each takes one row per run (``metrics.final_losses``) or
evaluation lines, reduced by that same function; see ``cptlab.viz.common`` for the shared conventions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cptlab.study import paper
from cptlab.viz import common as C


def plot_compute_vs_loss(final_df: pd.DataFrame, shift: str | None = None, last: int = 2,
                         flops_per_token: float | None = None, ax: Axes | None = None,
                         title: str | None = None) -> Figure:
    """Average final validation loss (mean over D0 and D1) against compute: continual runs (one marker
    per replay fraction) and union baselines from scratch at several computes (a line).

    ``final_df``: ``experiments.compute_vs_loss``'s runs, one row per run (``metrics.final_losses``) or
    eval lines, each run then reduced to the mean of its last ``last`` evaluations; needs role, replay,
    compute_tokens, d0, d1, switch_tokens and ``val_<d0>``, ``val_<d1>``.
    ``flops_per_token``: if given, x is compute in FLOPs (tokens times it), else tokens.
    """
    fig, axes, own = C.panels(ax, 1, (7.0, 4.5))
    ax = axes[0]
    notes: list[str] = []
    df, shift = C.one_shift(final_df, shift, notes)
    df = C.finals(df, last)
    d0, d1 = C.sets(df)
    scale = flops_per_token or 1.0
    plotted = False
    if d0 and d1 and {f"val_{d0}", f"val_{d1}", "compute_tokens"} <= set(df.columns):
        df = df.assign(avg=(df[f"val_{d0}"] + df[f"val_{d1}"]) / 2, compute=df["compute_tokens"] * scale)
        union = C.where(df, role="union").groupby("compute")["avg"].mean()
        if len(union):
            ax.plot(union.index.to_numpy(dtype=float), union.to_numpy(), marker="s", label="union baseline",
                    **C.UNION_STYLE)
            plotted = True
        else:
            notes.append("no union run")
        groups = C.groups(C.where(df, role="continual"), "replay")
        for i, ((frac, rows), color) in enumerate(zip(groups, C.colors(len(groups), "plasma"))):
            points = rows.groupby("compute")["avg"].mean()
            ax.plot(points.index.to_numpy(dtype=float), points.to_numpy(),
                    marker=C.MARKERS[i % len(C.MARKERS)], markersize=9, markerfacecolor="none",
                    markeredgewidth=2, linestyle="none", color=color,
                    label=f"continual, {C.replay_label(frac)}")
            plotted = True
        if not groups:
            notes.append("no continual run")
        C.mark_switches(ax, [s * scale for s in C.switches(df)], "switch to D1 (continual runs)")
    if flops_per_token:
        ax.set_xlabel("compute (FLOPs)")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    else:
        C.tokens_axis(ax, "compute (tokens)")
    ax.set_ylabel(f"average final validation loss\n({d0}, {d1})" if d0 and d1 else "average final loss")
    text = title or C.titled("Compute vs average final loss", shift, d0, d1)
    return C.finish(fig, axes, own, text, notes, plotted)


def plot_replay_table(final_df: pd.DataFrame, shift: str | None = None, last: int = 2, axes: C.AxesArg = None,
                      title: str | None = None) -> Figure:
    """Table 2 as a figure: final D0, D1 and average loss against the replay fraction (three panels),
    with the union baseline and, on D0, the base model's loss before the switch.

    ``final_df``: ``experiments.replay_sweep``'s runs (and the base run), one row per run
    (``metrics.final_losses``) or eval lines, each run then reduced to the mean of its last ``last``
    evaluations; needs role, replay, shift, d0, d1 and ``val_<d0>``, ``val_<d1>``.
    """
    fig, axes, own = C.panels(axes, 3, (12.0, 3.8))
    notes: list[str] = []
    df, shift = C.one_shift(final_df, shift, notes)
    df = C.finals(df, last)
    d0, d1 = C.sets(df)
    plotted = False
    cols = (f"val_{d0}", f"val_{d1}", "avg")
    if d0 and d1 and set(cols[:2]) <= set(df.columns):
        df = df.assign(avg=(df[cols[0]] + df[cols[1]]) / 2)
        runs = C.where(df, role="continual")
        notes += C.missing(paper.REPLAY_FRACTIONS, [r for r, _ in C.groups(runs, "replay")], "{:.0%}")
        union = C.union(df, C.first(runs, "compute_tokens"))
        if union.empty:
            notes.append("no union run")
        base = C.where(df, role="base")
        for ax, col in zip(axes, cols):
            values = runs.groupby("replay")[col].mean() if "replay" in runs.columns else pd.Series()
            if len(values):
                ax.plot(np.arange(len(values)), values.to_numpy(), marker="o", color="tab:blue",
                        label="continual + replay")
                ax.set_xticks(np.arange(len(values)), [f"{r * 100:g}%" for r in values.index])
                plotted = True
            if len(union):
                ax.axhline(union[col].mean(), label="union baseline", **C.UNION_STYLE)
            if col == cols[0] and len(base):
                ax.axhline(base[col].mean(), label="base model (before the switch)", **C.BASE_STYLE)
    for ax, panel in zip(axes, (C.panel_title(0, d0), C.panel_title(1, d1), "average of D0 and D1")):
        ax.set_title(panel)
        ax.set_xlabel("replay (compute-equivalent, of D0)")
        ax.set_ylabel("final validation loss")
    text = title or C.titled("Replay: final losses", shift, d0, d1)
    return C.finish(fig, axes, own, text, notes, plotted)
