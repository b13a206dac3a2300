"""Figures of the sequence study: forgetting matrices side by side, and loss curves through the sequence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cptlab.analysis.sequences import forgetting_matrix
from cptlab.viz import common as C


def plot_forgetting_matrices(rows: pd.DataFrame, variants: Sequence[str], datasets: Sequence[str],
                             axes: C.AxesArg = None) -> Figure:
    """One heatmap per method variant: validation loss (colour, one scale for all) of the model after each
    dataset (rows) on every dataset (columns), with the values written in; rows a method has no model for
    are blank."""
    variants = [v for v in variants if v in set(rows.get("variant", []))]
    fig, axes, own = C.panels(axes, max(1, len(variants)), (3.1 * max(1, len(variants)), 3.2))
    matrices = [forgetting_matrix(rows, v, list(datasets)) for v in variants]
    values = np.concatenate([m.to_numpy(dtype=float).ravel() for m in matrices]) if matrices else np.array([])
    lo, hi = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0.0, 1.0)
    image = None
    for ax, variant, matrix in zip(axes, variants, matrices):
        image = ax.imshow(matrix.to_numpy(dtype=float), cmap="viridis_r", vmin=lo, vmax=hi)
        for (i, j), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > (lo + hi) / 2 else "black")
        ax.set_xticks(range(len(datasets)), list(datasets), rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(datasets)), [f"after {d}" for d in datasets] if ax is axes[0] else [],
                      fontsize=8)
        ax.set_title(variant, fontsize=9)
    if image is not None and own:
        fig.colorbar(image, ax=axes, shrink=0.8, label="validation loss")
    if own:
        fig.suptitle("Forgetting matrices: loss after each dataset (rows) on every dataset (columns)",
                     fontsize=10)
    return fig


def plot_sequence_curves(df: pd.DataFrame, variants: Sequence[str], datasets: Sequence[str],
                         axes: C.AxesArg = None) -> Figure:
    """Loss against tokens on each dataset (one panel per dataset) for each method variant through the
    sequence; the base model's curve (grey) leads into the continual methods', dotted lines mark where the
    data switches. ``df``: evaluation lines (``load_runs``) of the study's runs."""
    fig, axes, own = C.panels(axes, max(1, len(datasets)), (4.2 * max(1, len(datasets)), 3.4))
    role = df["role"] if "role" in df else pd.Series("", index=df.index)
    base, ours = df[role == "base"], df[role == "sequence"]
    palette = dict(zip(variants, C.colors(len(variants), "tab10")))
    for ax, dataset in zip(axes, datasets):
        col = f"val_{dataset}"
        if len(base) and col in base:
            C.draw(ax, base, col, label=C.BASE_LABEL, **C.BASE_STYLE)
        for variant in variants if len(ours) else ():  # none finished: the base model's curve alone
            rows = ours[(ours["variant"] == variant) & ~ours["name"].str.contains("anneal")]
            if col in rows and len(rows):
                C.draw(ax, rows, col, label=variant, color=palette[variant], linewidth=1.4)
        ax.set_title(dataset, fontsize=9)
        ax.set_ylabel("validation loss")
        C.tokens_axis(ax)
    for ax in axes:
        C.mark_switches(ax, C.switches(ours), label="next dataset")
    axes[0].legend(fontsize=7)
    if own:
        fig.suptitle("Loss on every dataset through the sequence", fontsize=10)
    return fig

