"""Figures of today's recipes beside the paper's (``cptlab.analysis.modern``'s tables, the runs' curves)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cptlab.viz import common as C


def plot_recipes(table: pd.DataFrame, shift: str, axes: Sequence[Axes] | None = None) -> Figure:
    """Final D0 and D1 loss of each recipe minus the paper recipe's (left of 0: better), one panel each;
    the number of training tokens since the base model is printed beside each bar."""
    fig, axs, own = C.panels(axes, 2, (11.0, 0.45 * max(len(table), 4) + 1.2))
    notes = [] if len(table) else ["no finished runs"]
    labels = list(table.index)[::-1]
    y = np.arange(len(labels))
    for ax, col in zip(axs, ("D0", "D1")):
        key = f"{col} vs paper"
        values = (table[key].reindex(labels).to_numpy(float) if key in table.columns
                  else np.full(len(labels), np.nan))
        ax.barh(y, values, color=["#b33" if v > 0 else "#3a7" for v in np.nan_to_num(values)])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, labels if ax is axs[0] else [""] * len(labels))
        ax.set_xlabel(f"final {col} loss minus the paper recipe's (nats)")
        for yi, v, tok in zip(y, values, table["tokens"].reindex(labels)):
            if np.isfinite(v):
                ax.annotate(f"{C.format_tokens(tok)}" if np.isfinite(tok) else "", (v, yi), fontsize=7,
                            xytext=(3 if v >= 0 else -3, 0), textcoords="offset points", va="center",
                            ha="left" if v >= 0 else "right")
    return C.finish(fig, axs, own, f"Today's recipes vs the paper's, {shift} shift", notes)


def plot_recipe_curves(frame: pd.DataFrame, names: dict[str, str], d0: str, d1: str,
                       axes: Sequence[Axes] | None = None) -> Figure:
    """D0 and D1 validation loss against tokens of the runs ``names`` (run name -> label in the legend)."""
    fig, axs, own = C.panels(axes, 2, (11.0, 4.2))
    notes = []
    colors = C.colors(len(names), "tab10")
    for (name, label), color in zip(names.items(), colors):
        rows = C.where(frame, name=name).sort_values("tokens") if len(frame) else frame
        if rows.empty:
            notes.append(f"{label}: not run")
            continue
        for ax, loss_set in zip(axs, (d0, d1)):
            C.draw(ax, rows, f"val_{loss_set}", color=color, label=label, marker=".", lw=1.2)
    for ax, loss_set, what in zip(axs, (d0, d1), ("D0 (forgetting)", "D1 (learning)")):
        C.tokens_axis(ax)
        ax.set_ylabel(f"{loss_set} validation loss")
        ax.set_title(what, fontsize=10)
    return C.finish(fig, axs, own, f"Loss curves: {d0} -> {d1}", notes)


def plot_chunk_ends(table: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """Loss on the chunks' data at each chunk end, one line per schedule (``analysis.modern.chunk_table``)."""
    fig, axs, own = C.panels(ax, 1, (6.5, 4.2))
    notes = [] if len(table) else ["no finished runs"]
    x = np.arange(1, len(table.columns) + 1)
    for (label, row), marker in zip(table.iterrows(), C.MARKERS):
        axs[0].plot(x, row.to_numpy(float), marker=marker, label=label)
    axs[0].set_xticks(x, list(table.columns))
    axs[0].set_ylabel("validation loss at the chunk's end")
    return C.finish(fig, axs, own, "Three chunks: cosine to 10%, D2Z, WSD and WSD-S", notes)


def plot_microanneal(table: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """How much a microanneal and the full run lower the mean of D0 and each candidate's loss below the
    base model's (``analysis.modern.microanneal_table``)."""
    fig, axs, own = C.panels(ax, 1, (6.5, 4.0))
    notes = [] if len(table) else ["no finished runs"]
    x = np.arange(len(table))
    for offset, col, color in ((-0.2, "microanneal gain", "#88c"), (0.2, "full run gain", "#336")):
        if col in table.columns:
            axs[0].bar(x + offset, table[col].to_numpy(float), width=0.4, color=color, label=col)
    axs[0].set_xticks(x, list(table.index))
    axs[0].set_ylabel("mean loss lowered below the base model's (nats)")
    return C.finish(fig, axs, own, "Screening candidate corpora with a microanneal", notes)
