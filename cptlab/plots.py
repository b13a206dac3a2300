"""Figures of the lab, one function per paper figure, each returning a matplotlib ``Figure``.

Figure functions (PAPER.md, "Figures worth regenerating at small scale"):
    1  plot_compute_vs_loss   compute vs average final loss: continual + replay vs union baselines
    2  plot_warmup            D0 and D1 loss vs tokens for each re-warming length
    3  plot_max_lr            D0 and D1 loss vs tokens: constant LR, re-warm, re-warm + re-decay, union
    4  plot_replay_curves     D0 and D1 loss vs tokens for each replay fraction of one shift
       plot_replay_table      final D0, D1 and average loss vs replay fraction (Table 2 as a figure)
    5  plot_rewarm_same_data  D0 loss vs tokens when re-warming on D0 itself
    6  plot_schedules         LR against tokens for one or more multi-stage schedules
       plot_paper_schedules   the paper's schedules over 3 stages: repeated cosine vs infinite / WSD
    7  plot_infinite          loss vs tokens over 3 chunks: repeated cosine vs infinite schedules
    -  plot_forgetting        D0 and D1 loss vs tokens: no replay, replay, union baseline
    -  plot_scale_forgetting  forgetting vs model size, no replay and chosen replay (scale study)
    -  plot_scale_compute     average final loss vs compute at each model size: continual vs union

Figure 6 is drawn from schedules and lives here; the others are drawn from runs (the frames that
``cptlab.store.load_runs`` returns) and live in ``cptlab.figures``, re-exported here.

Figures are built with ``matplotlib.figure.Figure`` (not pyplot), so nothing is kept in pyplot's
global state and nothing pops up on its own; show one in a notebook by making it a cell's last
value, or save it with ``fig.savefig(path)``. Every function takes ``ax=None`` (``axes=None`` for
several panels) to draw into existing axes instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cptlab import schedules as sched
from cptlab.figures import (
    plot_compute_vs_loss,
    plot_forgetting,
    plot_infinite,
    plot_max_lr,
    plot_replay_curves,
    plot_replay_table,
    plot_rewarm_same_data,
    plot_warmup,
)
from cptlab.scale_figures import plot_scale_compute, plot_scale_forgetting

__all__ = ["format_tokens", "save_figure", "schedule_curve", "plot_schedules", "plot_paper_schedules",
           "plot_compute_vs_loss", "plot_warmup", "plot_max_lr", "plot_replay_curves", "plot_replay_table",
           "plot_rewarm_same_data", "plot_infinite", "plot_forgetting", "plot_scale_forgetting",
           "plot_scale_compute"]

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


def plot_paper_schedules(n_stages: int = 3, stage_tokens: float = 100e9, steps_per_stage: int = 1000,
                         anneal: float = 0.1, axes: Sequence[Axes] | None = None,
                         title: str | None = None) -> Figure:
    """The paper's 405M schedules (``schedules.PAPER_405M``) over ``n_stages`` stages of ``stage_tokens``
    each, in two panels: repeated cosine against infinite cosine and inverse-sqrt (annealing over the
    last stage's final ``anneal`` fraction), and repeated cosine against WSD."""
    if axes is None:
        fig = Figure(figsize=(12.0, 4.0), layout="constrained")
        axes = fig.subplots(1, 2)
    else:
        fig = axes[0].figure
    paper = sched.PAPER_405M

    def plan(spec: Mapping[str, Any]) -> list[tuple[dict[str, Any], int]]:
        return sched.multi_stage(spec, n_stages, steps_per_stage)

    infinite = {"repeated cosine": plan(paper["cosine"]),
                "infinite cosine": plan(dict(paper["infinite_cosine"], anneal=anneal)),
                "infinite inv-sqrt": plan(dict(paper["infinite_inv_sqrt"], anneal=anneal))}
    wsd = {"repeated cosine": plan(paper["cosine"]), "WSD (1-sqrt decay)": plan(paper["wsd"])}
    tokens_per_step = stage_tokens / steps_per_stage
    plot_schedules(infinite, tokens_per_step, ax=axes[0], title="infinite schedules")
    plot_schedules(wsd, tokens_per_step, ax=axes[1], title="warmup-stable-decay")
    fig.suptitle(title or f"Schedules over {n_stages} stages of {format_tokens(stage_tokens)} tokens "
                 "(paper, 405M)")
    return fig


def save_figure(fig: Figure, out_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``out_dir/<name>.png`` (folders created) and return the path."""
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
