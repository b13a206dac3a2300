"""Figure 6: learning-rate schedules against tokens, drawn from their specs (nothing is trained)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cptlab import schedules as sched
from cptlab.study import paper
from cptlab.viz.common import format_tokens

StagePlan = Sequence[tuple[Any, int]]


def _axes(ax: Axes | None, figsize: tuple[float, float] = (8.0, 4.0)) -> tuple[Figure, Axes]:
    """The given axes and its figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def schedule_curve(stages: StagePlan, tokens_per_step: float = 1) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lr) at every step of a plan; tokens counts those seen before the step."""
    lr = np.array(sched.lr_values(stages))
    return np.arange(len(lr)) * tokens_per_step, lr


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


def plot_paper_schedules(n_stages: int = 3, stage_tokens: float = 100e9, steps_per_stage: int = 1000,
                         anneal: float = 0.1, axes: Sequence[Axes] | None = None,
                         title: str | None = None) -> Figure:
    """The paper's 405M schedules (``paper.SCHEDULES_405M``) over ``n_stages`` stages of ``stage_tokens``
    each, in two panels: repeated cosine against infinite cosine and inverse-sqrt (annealing over the
    last stage's final ``anneal`` fraction), and repeated cosine against WSD."""
    if axes is None:
        fig = Figure(figsize=(12.0, 4.0), layout="constrained")
        axes = fig.subplots(1, 2)
    else:
        fig = axes[0].figure
    specs = paper.SCHEDULES_405M

    def plan(spec: Mapping[str, Any]) -> list[tuple[dict[str, Any], int]]:
        return sched.multi_stage(spec, n_stages, steps_per_stage)

    infinite = {"repeated cosine": plan(specs["cosine"]),
                "infinite cosine": plan(dict(specs["infinite_cosine"], anneal=anneal)),
                "infinite inv-sqrt": plan(dict(specs["infinite_inv_sqrt"], anneal=anneal))}
    wsd = {"repeated cosine": plan(specs["cosine"]), "WSD (1-sqrt decay)": plan(specs["wsd"])}
    tokens_per_step = stage_tokens / steps_per_stage
    plot_schedules(infinite, tokens_per_step, ax=axes[0], title="infinite schedules")
    plot_schedules(wsd, tokens_per_step, ax=axes[1], title="warmup-stable-decay")
    fig.suptitle(title or f"Schedules over {n_stages} stages of {format_tokens(stage_tokens)} tokens "
                 "(paper, 405M)")
    return fig
