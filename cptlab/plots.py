"""Figures of the lab, one function per paper figure, each returning a matplotlib ``Figure``.

Figure functions:
    plot_schedules   LR against tokens for one or more multi-stage schedules (paper figure 6)

Figures are built with ``matplotlib.figure.Figure`` (not pyplot), so nothing is kept in pyplot's
global state and nothing pops up on its own; show one in a notebook by making it a cell's last
value, or save it with ``fig.savefig(path)``. Every function takes ``ax=None`` to draw into an
existing axes instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cptlab import schedules as sched

StagePlan = Sequence[tuple[Any, int]]


# -- helpers ---------------------------------------------------------------------------------------

def _axes(ax: Axes | None, figsize: tuple[float, float] = (8.0, 4.0)) -> tuple[Figure, Axes]:
    """The given axes and its figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def format_tokens(n: float, _pos: Any = None) -> str:
    """A token count the way the paper writes it: 300B, 2.26M, 65.54k."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:.3g}"


def schedule_curve(stages: StagePlan, tokens_per_step: float = 1) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lr) at every step of a plan; tokens counts those seen before the step."""
    lr = np.array(sched.lr_values(stages))
    return np.arange(len(lr)) * tokens_per_step, lr


# -- figure 6: schedule shapes ---------------------------------------------------------------------

def plot_schedules(schedules: Mapping[str, StagePlan],
                   tokens_per_step: float | Mapping[str, float] = 1,
                   ax: Axes | None = None, title: str | None = None) -> Figure:
    """LR against tokens for one or more multi-stage schedules, stage boundaries as dotted lines.

    ``schedules``: label -> list of (spec, steps), as ``cptlab.schedules.compose`` takes.
    ``tokens_per_step``: one number for all schedules, or one per label. With 1 the x axis is steps.
    """
    fig, ax = _axes(ax)
    boundaries: set[float] = set()
    for label, stages in schedules.items():
        tps = tokens_per_step[label] if isinstance(tokens_per_step, Mapping) else tokens_per_step
        x, y = schedule_curve(stages, tps)
        ax.plot(x, y, label=label)
        boundaries.update(b * tps for b in sched.stage_boundaries(stages)[1:-1])
    for i, b in enumerate(sorted(boundaries)):
        ax.axvline(b, color="0.5", linestyle=":", linewidth=1, label="stage boundary" if i == 0 else None)
    in_steps = not isinstance(tokens_per_step, Mapping) and tokens_per_step == 1
    ax.set_xlabel("step" if in_steps else "tokens")
    if not in_steps:
        ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if schedules:
        ax.legend(fontsize="small")
    return fig
