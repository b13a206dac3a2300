"""Figures of weight averaging: D0 and D1 loss along the interpolation path between two runs' weights, from
``cptlab.interop.merge.interpolation_sweep``'s frame (``alpha`` and ``val_<set>`` columns; its ``attrs``
name the endpoints and the runs' D0 and D1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cptlab.viz import common as C


def plot_interpolation(sweep: pd.DataFrame, d0: str | None = None, d1: str | None = None,
                       endpoints: tuple[str, str] | None = None, ax: Axes | None = None) -> Figure:
    """D0 and D1 validation loss (and their mean) against the interpolation weight α, the weights being
    ``(1 - α) * A + α * B``; the endpoints (α 0 and 1) are marked and named. ``d0`` / ``d1``
    default to the sweep's ``attrs``, else its first two sets; ``endpoints`` to its ``run_a`` / ``run_b``."""
    attrs = sweep.attrs
    names = [c[4:] for c in sweep.columns if c.startswith("val_")]
    d0 = d0 or attrs.get("d0") or (names[0] if names else None)
    d1 = d1 or attrs.get("d1") or next((n for n in names if n != d0), None)
    a, b = endpoints or (attrs.get("run_a", "run A"), attrs.get("run_b", "run B"))
    fig, axs, own = C.panels(ax, 1, (6.5, 4.4))
    notes = [f"no {name} column" for name in (d0, d1) if name and f"val_{name}" not in sweep.columns]
    ordered = sweep.sort_values("alpha") if "alpha" in sweep.columns else sweep.iloc[0:0]
    x = ordered["alpha"].to_numpy(dtype=float) if len(ordered) else np.array([])
    curves = {i: ordered[f"val_{name}"].to_numpy(dtype=float) for i, name in ((0, d0), (1, d1))
              if name and f"val_{name}" in ordered.columns}
    for i, y in curves.items():
        axs[0].plot(x, y, marker=C.MARKERS[i], label=C.panel_title(i, d0 if i == 0 else d1))
    if len(curves) == 2:
        axs[0].plot(x, (curves[0] + curves[1]) / 2, color="0.5", linestyle="--", label="mean of D0 and D1")
    _mark_endpoints(axs[0], x, list(curves.values()), (f"A: {a}", f"B: {b}"))
    axs[0].set_xlabel("interpolation weight α: the weights are (1 - α) A + α B")
    axs[0].set_ylabel("validation loss")
    title = "Loss along the interpolation path" + (f" (D0 {d0}, D1 {d1})" if d0 and d1 else "")
    return C.finish(fig, axs, own, title, notes, plotted=bool(curves) and bool(len(x)))


def _mark_endpoints(ax: Axes, x: np.ndarray, curves: list[np.ndarray], names: tuple[str, str]) -> None:
    """A dotted line and a larger marker at α 0 and 1, each named after its run on the top axis."""
    for alpha in (0.0, 1.0):
        ax.axvline(alpha, **C.SWITCH_STYLE)
        at = np.isclose(x, alpha)
        for y in curves if at.any() else []:
            ax.plot([alpha], y[at][:1], marker="o", markersize=11, markerfacecolor="none", color="black")
    top = ax.secondary_xaxis("top")
    top.set_xticks([0.0, 1.0], list(names), fontsize="small")
