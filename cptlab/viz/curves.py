"""Figures of losses against tokens: paper figures 2 (warmup), 3 (max LR), 4 (replay curves), 5 (re-warming
on D0 itself), 7 (infinite schedules over chunks) and the forgetting curves.

Each function takes the frame ``cptlab.analysis.runs.load_runs`` gives for an experiment's runs (one row per
evaluation line: ``tokens``, ``val_<set>`` columns and the run's labels; ``role``, ``d0``, ``d1``,
``shift``, ``switch_tokens`` and the experiment's own labels) and returns a matplotlib ``Figure``; the
conventions they share are in ``cptlab.viz.common``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cptlab.study import paper
from cptlab.viz import common as C


def _reference(ax: Axes, union: pd.DataFrame, col: str, union_as: str) -> None:
    """The union baseline on one panel: its curve, or a horizontal line at its final loss."""
    if union_as == "curve":
        C.draw(ax, union, col, label="union baseline (D0 ∪ D1)", **C.UNION_STYLE)
        return
    _, y = C.curve(union, col)
    if len(y):
        ax.axhline(y[-1], label="union baseline (final)", **C.UNION_STYLE)


def _loss_curves(axes: list[Axes], sets: Sequence[str | None], series: list[tuple[str, pd.DataFrame, dict]],
                 base: pd.DataFrame, union: pd.DataFrame, union_as: str, switches: Sequence[float],
                 switch_label: str = "switch to D1") -> bool:
    """Per panel (one eval set each): the base curve, one curve per series, the union baseline and the
    switches, with the y range fitted to what follows the switch. Returns whether a curve was drawn."""
    if union_as not in ("final", "curve"):
        raise ValueError(f"union_as: expected 'final' or 'curve', got {union_as!r}")
    plotted = False
    for i, (ax, name) in enumerate(zip(axes, sets)):
        col = f"val_{name}"
        C.draw(ax, base, col, label=C.BASE_LABEL, **C.BASE_STYLE)
        seen = list(C.curve(base, col)[1][-1:])
        for label, rows, style in series:
            plotted |= C.draw(ax, rows, col, label=label, **style)
            seen += list(C.curve(rows, col)[1])
        _reference(ax, union, col, union_as)
        x, y = C.curve(union, col)
        seen += list(y[x >= min(switches)] if union_as == "curve" and switches else y[-1:])
        C.mark_switches(ax, switches, switch_label)
        if switches:
            C.focus(ax, seen)
        C.tokens_axis(ax)
        ax.set_ylabel("validation loss" + (f" on {name}" if name else ""))
        if len(sets) > 1:
            ax.set_title(C.panel_title(i, name))
    return plotted


def _by_name(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The runs grouped by name (seeds of a run share it), constant LR first, then by max LR; each
    labelled by its ``variant`` label where it has one."""
    groups = C.groups(runs, "name")

    def order(item: tuple[Any, pd.DataFrame]) -> tuple[bool, float]:
        rows = item[1]
        return C.first(rows, "schedule") != "constant", float(C.first(rows, "max_lr") or 0.0)

    return [(str(C.first(rows, "variant") or name), rows) for name, rows in sorted(groups, key=order)]


def plot_warmup(df: pd.DataFrame, shift: str | None = None, axes: C.AxesArg = None, show_base: bool = True,
                title: str | None = None) -> Figure:
    """D0 and D1 validation loss against tokens for each re-warming length (two panels).

    ``df``: ``experiments.warmup_ablation``'s runs (and the base run for its curve before the switch);
    needs tokens, role, warmup, d0, d1, switch_tokens and ``val_<d0>``, ``val_<d1>``.
    """
    fig, axes, own = C.panels(axes, 2, (11.0, 4.2))
    notes: list[str] = []
    df, shift = C.one_shift(df, shift, notes)
    d0, d1 = C.sets(df)
    runs = C.where(df, role="continual")
    groups = C.groups(runs, "warmup")
    notes += C.missing(paper.WARMUPS, [w for w, _ in groups], "warmup {:.1%}")
    series = [(f"warmup {w:.1%}", rows, {"color": c}) for (w, rows), c in zip(groups, C.colors(len(groups)))]
    base = C.where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0, d1], series, base, df.iloc[0:0], "final", C.switches(runs))
    text = title or C.titled("Re-warming: length of the warmup", shift, d0, d1)
    return C.finish(fig, axes, own, text, notes, plotted)


def plot_max_lr(df: pd.DataFrame, shift: str | None = None, axes: C.AxesArg = None, union_as: str = "final",
                show_base: bool = True, title: str | None = None) -> Figure:
    """D0 and D1 validation loss against tokens for constant LR, re-warming without re-decaying and
    re-warming + re-decaying at several max LRs, with the union baseline (two panels).

    ``df``: ``experiments.max_lr_ablation``'s runs plus the union run of the shift (and the base run);
    needs tokens, role, name, schedule, max_lr, variant, d0, d1, switch_tokens, compute_tokens and
    ``val_<d0>``, ``val_<d1>``. ``union_as``: "final" (a horizontal line) or "curve".
    """
    fig, axes, own = C.panels(axes, 2, (11.0, 4.2))
    notes: list[str] = []
    df, shift = C.one_shift(df, shift, notes)
    d0, d1 = C.sets(df)
    runs = C.where(df, role="continual")
    named = _by_name(runs)
    constants = [(label, rows) for label, rows in named if C.first(rows, "schedule") == "constant"]
    decays = [(label, rows) for label, rows in named if C.first(rows, "schedule") != "constant"]
    series = [(label, rows, {"color": c, "linestyle": "-."})
              for (label, rows), c in zip(constants, ("tab:green", "tab:brown", "tab:gray"))]
    colors = C.colors(len(decays), "plasma")
    series += [(label, rows, {"color": c}) for (label, rows), c in zip(decays, colors)]
    expected = 2 + len(paper.LR_FACTORS)
    if len(named) < expected:
        notes.append(f"{expected - len(named)} of {expected} runs missing")
    union = C.union(df, C.first(runs, "compute_tokens"))
    if union.empty:
        notes.append("no union run")
    base = C.where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0, d1], series, base, union, union_as, C.switches(runs))
    text = title or C.titled("Re-warming: max learning rate", shift, d0, d1)
    return C.finish(fig, axes, own, text, notes, plotted)


def plot_replay_curves(df: pd.DataFrame, shift: str | None = None, axes: C.AxesArg = None,
                       union_as: str = "final", show_base: bool = True, title: str | None = None) -> Figure:
    """D0 and D1 validation loss against tokens for each replay fraction of one shift (two panels).

    ``df``: ``experiments.replay_sweep``'s runs (and the base run); needs tokens, role, replay, shift,
    d0, d1, switch_tokens, compute_tokens and ``val_<d0>``, ``val_<d1>``.
    """
    fig, axes, own = C.panels(axes, 2, (11.0, 4.2))
    notes: list[str] = []
    df, shift = C.one_shift(df, shift, notes)
    d0, d1 = C.sets(df)
    runs = C.where(df, role="continual")
    groups = C.groups(runs, "replay")
    notes += C.missing(paper.REPLAY_FRACTIONS, [r for r, _ in groups], "{:.0%} replay")
    series = [(C.replay_label(r), rows, {"color": c}) for (r, rows), c in zip(groups, C.colors(len(groups)))]
    union = C.union(df, C.first(runs, "compute_tokens"))
    if union.empty:
        notes.append("no union run")
    base = C.where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0, d1], series, base, union, union_as, C.switches(runs))
    text = title or C.titled("Replay: compute-equivalent replay of D0", shift, d0, d1)
    return C.finish(fig, axes, own, text, notes, plotted)


def plot_rewarm_same_data(df: pd.DataFrame, ax: Axes | None = None, show_base: bool = True,
                          title: str | None = None) -> Figure:
    """D0 validation loss against tokens when training continues on new D0 tokens, re-warmed to several
    max LRs or kept at a constant LR.

    ``df``: ``experiments.rewarm_same_data``'s runs (and the base run); needs tokens, role, name, d0, d1,
    schedule, max_lr, variant, switch_tokens and ``val_<d0>``.
    """
    fig, axes, own = C.panels(ax, 1, (7.0, 4.5))
    notes: list[str] = []
    d0 = C.first(df, "d0")
    runs = C.where(df, role="continual")
    runs = runs[runs["d1"] == d0] if "d1" in runs.columns else runs
    named = _by_name(runs)
    series = [(label, rows, {"color": c}) for (label, rows), c in zip(named, C.colors(len(named), "plasma"))]
    if len(named) < 3:
        notes.append(f"{3 - len(named)} of 3 runs missing")
    base = C.where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0], series, base, df.iloc[0:0], "final", C.switches(runs),
                           "continue on new D0 tokens")
    text = title or C.titled("Re-warming on the same data", None, d0, d0)
    return C.finish(fig, axes, own, text, notes, plotted)


def plot_infinite(df: pd.DataFrame, eval_set: str | None = None, ax: Axes | None = None,
                  title: str | None = None) -> Figure:
    """Validation loss against tokens over 3 consecutive chunks: repeated cosine and the infinite
    schedules as lines, the models annealed at each chunk's end as markers in their schedule's colour.

    ``df``: ``experiments.infinite_schedules``'s runs; needs tokens, role (infinite|anneal), schedule,
    d1, switch_tokens (a list) and ``val_<eval_set>`` (default: the chunks' data, ``d1``).
    """
    fig, axes, own = C.panels(ax, 1, (8.0, 4.5))
    ax = axes[0]
    notes: list[str] = []
    name = eval_set or C.first(df, "d1")
    col = f"val_{name}"
    main = C.where(df, role="infinite")
    anneal = C.where(df, role="anneal")
    kinds = [k for k in paper.CHUNK_SCHEDULES if len(C.where(main, schedule=k))]
    missing = [C.SCHEDULE_NAMES[k] for k in paper.CHUNK_SCHEDULES if k not in kinds]
    if missing:
        notes.append(f"missing: {', '.join(missing)}")
    plotted = False
    for i, (kind, color) in enumerate(zip(kinds, ("black", "tab:blue", "tab:orange", "tab:green"))):
        label = C.SCHEDULE_NAMES.get(kind, kind)
        plotted |= C.draw(ax, C.where(main, schedule=kind), col, label=label, color=color,
                         linewidth=2.0 if kind == "cosine" else 1.5)
        ends = [C.curve(rows, col) for _, rows in C.groups(C.where(anneal, schedule=kind), "chunk")]
        ends = [(x[-1], y[-1]) for x, y in ends if len(x)]
        if ends:
            xs, ys = zip(*ends)
            ax.plot(xs, ys, marker=C.MARKERS[i % len(C.MARKERS)], markersize=9, markerfacecolor="none",
                    markeredgewidth=2, linestyle="none", color=color, label=f"{label}, annealed")
    C.mark_switches(ax, C.switches(main), "new chunk")
    C.tokens_axis(ax)
    ax.set_ylabel("validation loss" + (f" on {name}" if name else ""))
    text = title or "Infinite schedules over 3 chunks" + (f" of {name}" if name else "")
    return C.finish(fig, axes, own, text, notes, plotted)


def plot_forgetting(df: pd.DataFrame, shift: str | None = None, replays: Sequence[float] | None = None,
                    axes: C.AxesArg = None, union_as: str = "curve", show_base: bool = True,
                    title: str | None = None) -> Figure:
    """D0 and D1 validation loss against tokens for the main strategies: continual pre-training without
    and with replay, and the union baseline trained from scratch on D0 ∪ D1 (two panels).

    ``df``: continual runs (e.g. ``experiments.replay_sweep``'s), the union run and the base run; needs
    tokens, role, replay, shift, d0, d1, switch_tokens, compute_tokens and ``val_<d0>``, ``val_<d1>``.
    ``replays``: the replay fractions to show (default: all in ``df``).
    """
    fig, axes, own = C.panels(axes, 2, (11.0, 4.2))
    notes: list[str] = []
    df, shift = C.one_shift(df, shift, notes)
    d0, d1 = C.sets(df)
    runs = C.where(df, role="continual")
    groups = C.groups(runs, "replay")
    if replays is not None:
        notes += C.missing(replays, [r for r, _ in groups], "{:.0%} replay")
        groups = [(r, rows) for r, rows in groups if any(np.isclose(r, want) for want in replays)]
    colors = [colormaps["tab10"](i) for i in (3, 0, 2, 4, 8, 9, 1, 5, 6, 7)]
    series = [(f"continual, {C.replay_label(r)}", rows, {"color": colors[i % len(colors)]})
              for i, (r, rows) in enumerate(groups)]
    union = C.union(df, C.first(runs, "compute_tokens"))
    if union.empty:
        notes.append("no union run")
    base = C.where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0, d1], series, base, union, union_as, C.switches(runs))
    plotted |= not union.empty
    text = title or C.titled("Forgetting and adaptation", shift, d0, d1)
    return C.finish(fig, axes, own, text, notes, plotted)
