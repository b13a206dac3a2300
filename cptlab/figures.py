"""Figures drawn from run results: paper figures 1 to 5 and 7, and the forgetting curves.

Each function takes the frame ``cptlab.store.load_runs`` gives for an experiment's runs (one row per
evaluation line: ``tokens``, ``val_<set>`` columns and the run's labels; ``role``, ``d0``, ``d1``,
``shift``, ``switch_tokens`` and the experiment's own labels) and returns a matplotlib ``Figure``.
``cptlab.plots`` re-exports them all; its docstring lists which function draws which figure.

Conventions shared by every figure:
- x is the tokens a run has seen (a continual run starts at B0, the base model's budget), with
  ``format_tokens`` ticks; the tokens at which the data switches are dotted vertical lines.
- Runs with the same label (several seeds) are averaged at each token count.
- The base model's curve is grey and ends at the switch; the union baseline is black and dashed, as a
  horizontal line at its final loss or as its curve.
- On loss-vs-tokens panels the y range fits the curves after the switch (and the union's final loss),
  so that their differences show; the base curve may enter from above.
- A missing run is skipped and named in the title; an empty frame gives an empty, titled figure.
- Functions that take ``final_df`` want one row per run, as ``cptlab.metrics.final_losses`` gives;
  they accept eval lines too, and then reduce each run to the mean of its last ``last`` evaluations
  (2 by default, as ``final_losses`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cptlab import experiments as E

BASE_STYLE: dict[str, Any] = {"color": "0.6", "linewidth": 2.5}
UNION_STYLE: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 1.3}
SWITCH_STYLE: dict[str, Any] = {"color": "0.3", "linestyle": ":", "linewidth": 1.2}
BASE_LABEL = "base model (D0 only)"
MARKERS = ("o", "D", "^", "v", "s", "P", "X")
SCHEDULE_NAMES = {"cosine": "repeated cosine", "infinite_cosine": "infinite cosine",
                  "infinite_inv_sqrt": "infinite inv-sqrt", "wsd": "WSD"}

AxesArg = Axes | Sequence[Axes] | None


# -- helpers ---------------------------------------------------------------------------------------

def _panels(axes: AxesArg, n: int, figsize: tuple[float, float]) -> tuple[Figure, list[Axes], bool]:
    """The given axes (n of them) and their figure, or a new figure with n panels side by side.
    The flag says whether the figure is ours (then the title goes above all panels)."""
    if axes is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, list(fig.subplots(1, n, squeeze=False)[0]), True
    given = [axes] if isinstance(axes, Axes) else list(axes)
    if len(given) != n:
        raise ValueError(f"axes: expected {n} axes, got {len(given)}")
    return given[0].figure, given, False


def _where(df: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    """The rows whose columns equal the given values; no rows if a column is missing."""
    if df.empty or any(col not in df.columns for col in equal):
        return df.iloc[0:0]
    mask = np.ones(len(df), dtype=bool)
    for col, value in equal.items():
        mask &= (df[col] == value).to_numpy()
    return df[mask]


def _first(df: pd.DataFrame, col: str) -> Any:
    """The first non-missing value of a column, or None."""
    if col not in df.columns:
        return None
    values = df[col].dropna()
    return values.iloc[0] if len(values) else None


def _groups(df: pd.DataFrame, key: str) -> list[tuple[Any, pd.DataFrame]]:
    """The rows split by the value of ``key``, in sorted order (rows without a value dropped)."""
    if df.empty or key not in df.columns:
        return []
    return list(df.groupby(key, sort=True))


def _curve(rows: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mean of ``col`` at each token count), sorted by tokens, missing values dropped."""
    if rows.empty or col not in rows.columns:
        return np.array([]), np.array([])
    mean = rows[["tokens", col]].dropna().groupby("tokens")[col].mean()
    return mean.index.to_numpy(dtype=float), mean.to_numpy(dtype=float)


def _draw(ax: Axes, rows: pd.DataFrame, col: str, **style: Any) -> bool:
    """Plot the rows' ``col`` against tokens; False if there was nothing to plot."""
    x, y = _curve(rows, col)
    if len(x):
        ax.plot(x, y, **style)
    return bool(len(x))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not np.isnan(value)


def _switches(rows: pd.DataFrame) -> list[float]:
    """The token counts at which the rows' runs switch data (their ``switch_tokens`` labels)."""
    found: set[float] = set()
    for value in rows["switch_tokens"] if "switch_tokens" in rows.columns else []:
        values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
        found.update(float(v) for v in values if _is_number(v))
    return sorted(found)


def _mark_switches(ax: Axes, tokens: Sequence[float], label: str = "switch to D1") -> None:
    for i, x in enumerate(tokens):
        ax.axvline(x, label=label if i == 0 else None, **SWITCH_STYLE)


def _tokens_axis(ax: Axes, label: str = "tokens") -> None:
    from cptlab.plots import format_tokens  # cptlab.plots imports this module, so import it here

    ax.set_xlabel(label)
    ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))


def _colors(n: int, cmap: str = "viridis") -> list[Any]:
    return list(colormaps[cmap](np.linspace(0.0, 0.85, n))) if n else []


def _one_shift(df: pd.DataFrame, shift: str | None, notes: list[str]) -> tuple[pd.DataFrame, str | None]:
    """The rows of one shift (the base run has none and is kept); the first shift if none is given."""
    if df.empty or "shift" not in df.columns:
        return df, shift
    is_base = (df["role"] == "base") if "role" in df.columns else pd.Series(False, index=df.index)
    shifts = sorted(str(s) for s in df.loc[~is_base, "shift"].dropna().unique())
    if shift is None:
        if not shifts:
            return df, None
        shift = shifts[0]
        if len(shifts) > 1:
            notes.append(f"showing the {shift} shift of {', '.join(shifts)}")
    return df[is_base | (df["shift"] == shift)], shift


def _sets(df: pd.DataFrame) -> tuple[str | None, str | None]:
    """The names of D0 and D1 (the ``d0`` and ``d1`` labels of the runs that are not the base)."""
    others = df[df["role"] != "base"] if "role" in df.columns else df
    return _first(df, "d0"), _first(others, "d1")


def _titled(title: str, shift: str | None = None, d0: str | None = None, d1: str | None = None) -> str:
    """The title with what the runs are about: "<title> (<shift> shift: <d0> → <d1>)"."""
    detail = f"{d0} → {d1}" if d0 and d1 else ""
    if shift and shift != "same":
        detail = f"{shift} shift: {detail}" if detail else f"{shift} shift"
    return f"{title} ({detail})" if detail else title


def _panel_title(i: int, name: str | None) -> str:
    return f"D{i}: {name}" if name else f"D{i}"


def _union(df: pd.DataFrame, compute: Any = None) -> pd.DataFrame:
    """The union baseline's rows: the one of ``compute`` tokens if there, else the smallest."""
    union = _where(df, role="union")
    if union.empty or "compute_tokens" not in union.columns:
        return union
    same = union[union["compute_tokens"] == compute]
    return same if len(same) else union[union["compute_tokens"] == union["compute_tokens"].min()]


def _reference(ax: Axes, union: pd.DataFrame, col: str, union_as: str) -> None:
    """The union baseline on one panel: its curve, or a horizontal line at its final loss."""
    if union_as == "curve":
        _draw(ax, union, col, label="union baseline (D0 ∪ D1)", **UNION_STYLE)
        return
    _, y = _curve(union, col)
    if len(y):
        ax.axhline(y[-1], label="union baseline (final)", **UNION_STYLE)


def _finals(df: pd.DataFrame, last: int) -> pd.DataFrame:
    """One row per run: the mean of its last ``last`` evaluations, with the run's labels."""
    key = [c for c in ("run_id", "name") if c in df.columns]
    if df.empty or not key or "tokens" not in df.columns:
        return df
    rows = []
    for _, run in df.sort_values("tokens").groupby(key, sort=False, dropna=False):
        row = run.iloc[-1].copy()
        tail = run.tail(last)
        for col in (c for c in run.columns if c.startswith("val_")):
            row[col] = tail[col].mean()
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def _finish(fig: Figure, axes: list[Axes], own: bool, title: str, notes: list[str],
            plotted: bool = True) -> Figure:
    """Grid, one legend (on the last panel, with every panel's labels once) and the title with its notes
    about what is missing."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if not plotted:
            ax.text(0.5, 0.5, "no runs to plot", transform=ax.transAxes, ha="center", va="center",
                    color="0.5")
    text = title + (f"\n({'; '.join(notes)})" if notes else "")
    if len(axes) == 1:
        axes[0].set_title(text)
    elif own:
        fig.suptitle(text)
    else:
        axes[0].set_title(f"{text}\n{axes[0].get_title()}")
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        axes[-1].legend(list(legend.values()), list(legend), fontsize="small")
    return fig


def _focus(ax: Axes, values: list[float]) -> None:
    """Fit the y range to ``values`` (the curves after the switch); earlier parts may run off the top."""
    values = [v for v in values if np.isfinite(v)]
    if values:
        low, high = min(values), max(values)
        pad = max(0.08 * (high - low), 1e-3)
        ax.set_ylim(low - pad, high + pad)


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
        _draw(ax, base, col, label=BASE_LABEL, **BASE_STYLE)
        seen = list(_curve(base, col)[1][-1:])
        for label, rows, style in series:
            plotted |= _draw(ax, rows, col, label=label, **style)
            seen += list(_curve(rows, col)[1])
        _reference(ax, union, col, union_as)
        x, y = _curve(union, col)
        seen += list(y[x >= min(switches)] if union_as == "curve" and switches else y[-1:])
        _mark_switches(ax, switches, switch_label)
        if switches:
            _focus(ax, seen)
        _tokens_axis(ax)
        ax.set_ylabel("validation loss" + (f" on {name}" if name else ""))
        if len(sets) > 1:
            ax.set_title(_panel_title(i, name))
    return plotted


def _replay_label(fraction: float) -> str:
    return "no replay" if fraction == 0 else f"{fraction * 100:g}% replay"


def _missing(expected: Sequence[float], found: Sequence[float], fmt: str) -> list[str]:
    absent = [fmt.format(v) for v in expected if not any(np.isclose(v, f) for f in found)]
    return [f"missing: {', '.join(absent)}"] if absent else []


def _by_name(runs: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The runs grouped by name (seeds of a run share it), constant LR first, then by max LR; each
    labelled by its ``variant`` label where it has one."""
    groups = _groups(runs, "name")

    def order(item: tuple[Any, pd.DataFrame]) -> tuple[bool, float]:
        rows = item[1]
        return _first(rows, "schedule") != "constant", float(_first(rows, "max_lr") or 0.0)

    return [(str(_first(rows, "variant") or name), rows) for name, rows in sorted(groups, key=order)]


# -- figure 1: compute vs average final loss -------------------------------------------------------

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
    fig, axes, own = _panels(ax, 1, (7.0, 4.5))
    ax = axes[0]
    notes: list[str] = []
    df, shift = _one_shift(final_df, shift, notes)
    df = _finals(df, last)
    d0, d1 = _sets(df)
    scale = flops_per_token or 1.0
    plotted = False
    if d0 and d1 and {f"val_{d0}", f"val_{d1}", "compute_tokens"} <= set(df.columns):
        df = df.assign(avg=(df[f"val_{d0}"] + df[f"val_{d1}"]) / 2, compute=df["compute_tokens"] * scale)
        union = _where(df, role="union").groupby("compute")["avg"].mean()
        if len(union):
            ax.plot(union.index.to_numpy(dtype=float), union.to_numpy(), marker="s", label="union baseline",
                    **UNION_STYLE)
            plotted = True
        else:
            notes.append("no union run")
        groups = _groups(_where(df, role="continual"), "replay")
        for i, ((frac, rows), color) in enumerate(zip(groups, _colors(len(groups), "plasma"))):
            points = rows.groupby("compute")["avg"].mean()
            ax.plot(points.index.to_numpy(dtype=float), points.to_numpy(), marker=MARKERS[i % len(MARKERS)],
                    markersize=9, markerfacecolor="none", markeredgewidth=2, linestyle="none", color=color,
                    label=f"continual, {_replay_label(frac)}")
            plotted = True
        if not groups:
            notes.append("no continual run")
        _mark_switches(ax, [s * scale for s in _switches(df)], "switch to D1 (continual runs)")
    if flops_per_token:
        ax.set_xlabel("compute (FLOPs)")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    else:
        _tokens_axis(ax, "compute (tokens)")
    ax.set_ylabel(f"average final validation loss\n({d0}, {d1})" if d0 and d1 else "average final loss")
    text = title or _titled("Compute vs average final loss", shift, d0, d1)
    return _finish(fig, axes, own, text, notes, plotted)


# -- figure 2: warmup length -----------------------------------------------------------------------

def plot_warmup(df: pd.DataFrame, shift: str | None = None, axes: AxesArg = None, show_base: bool = True,
                title: str | None = None) -> Figure:
    """D0 and D1 validation loss against tokens for each re-warming length (two panels).

    ``df``: ``experiments.warmup_ablation``'s runs (and the base run for its curve before the switch);
    needs tokens, role, warmup, d0, d1, switch_tokens and ``val_<d0>``, ``val_<d1>``.
    """
    fig, axes, own = _panels(axes, 2, (11.0, 4.2))
    notes: list[str] = []
    df, shift = _one_shift(df, shift, notes)
    d0, d1 = _sets(df)
    runs = _where(df, role="continual")
    groups = _groups(runs, "warmup")
    notes += _missing(E.WARMUPS, [w for w, _ in groups], "warmup {:.1%}")
    series = [(f"warmup {w:.1%}", rows, {"color": c}) for (w, rows), c in zip(groups, _colors(len(groups)))]
    base = _where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0, d1], series, base, df.iloc[0:0], "final", _switches(runs))
    text = title or _titled("Re-warming: length of the warmup", shift, d0, d1)
    return _finish(fig, axes, own, text, notes, plotted)


# -- figure 3: max LR ------------------------------------------------------------------------------

def plot_max_lr(df: pd.DataFrame, shift: str | None = None, axes: AxesArg = None, union_as: str = "final",
                show_base: bool = True, title: str | None = None) -> Figure:
    """D0 and D1 validation loss against tokens for constant LR, re-warming without re-decaying and
    re-warming + re-decaying at several max LRs, with the union baseline (two panels).

    ``df``: ``experiments.max_lr_ablation``'s runs plus the union run of the shift (and the base run);
    needs tokens, role, name, schedule, max_lr, variant, d0, d1, switch_tokens, compute_tokens and
    ``val_<d0>``, ``val_<d1>``. ``union_as``: "final" (a horizontal line) or "curve".
    """
    fig, axes, own = _panels(axes, 2, (11.0, 4.2))
    notes: list[str] = []
    df, shift = _one_shift(df, shift, notes)
    d0, d1 = _sets(df)
    runs = _where(df, role="continual")
    named = _by_name(runs)
    constants = [(label, rows) for label, rows in named if _first(rows, "schedule") == "constant"]
    decays = [(label, rows) for label, rows in named if _first(rows, "schedule") != "constant"]
    series = [(label, rows, {"color": c, "linestyle": "-."})
              for (label, rows), c in zip(constants, ("tab:green", "tab:brown", "tab:gray"))]
    colors = _colors(len(decays), "plasma")
    series += [(label, rows, {"color": c}) for (label, rows), c in zip(decays, colors)]
    expected = 2 + len(E.LR_FACTORS)
    if len(named) < expected:
        notes.append(f"{expected - len(named)} of {expected} runs missing")
    union = _union(df, _first(runs, "compute_tokens"))
    if union.empty:
        notes.append("no union run")
    base = _where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0, d1], series, base, union, union_as, _switches(runs))
    text = title or _titled("Re-warming: max learning rate", shift, d0, d1)
    return _finish(fig, axes, own, text, notes, plotted)


# -- figure 4: replay ------------------------------------------------------------------------------

def plot_replay_curves(df: pd.DataFrame, shift: str | None = None, axes: AxesArg = None,
                       union_as: str = "final", show_base: bool = True, title: str | None = None) -> Figure:
    """D0 and D1 validation loss against tokens for each replay fraction of one shift (two panels).

    ``df``: ``experiments.replay_sweep``'s runs (and the base run); needs tokens, role, replay, shift,
    d0, d1, switch_tokens, compute_tokens and ``val_<d0>``, ``val_<d1>``.
    """
    fig, axes, own = _panels(axes, 2, (11.0, 4.2))
    notes: list[str] = []
    df, shift = _one_shift(df, shift, notes)
    d0, d1 = _sets(df)
    runs = _where(df, role="continual")
    groups = _groups(runs, "replay")
    notes += _missing(E.REPLAY_FRACTIONS, [r for r, _ in groups], "{:.0%} replay")
    series = [(_replay_label(r), rows, {"color": c}) for (r, rows), c in zip(groups, _colors(len(groups)))]
    union = _union(df, _first(runs, "compute_tokens"))
    if union.empty:
        notes.append("no union run")
    base = _where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0, d1], series, base, union, union_as, _switches(runs))
    text = title or _titled("Replay: compute-equivalent replay of D0", shift, d0, d1)
    return _finish(fig, axes, own, text, notes, plotted)


def plot_replay_table(final_df: pd.DataFrame, shift: str | None = None, last: int = 2, axes: AxesArg = None,
                      title: str | None = None) -> Figure:
    """Table 2 as a figure: final D0, D1 and average loss against the replay fraction (three panels),
    with the union baseline and, on D0, the base model's loss before the switch.

    ``final_df``: ``experiments.replay_sweep``'s runs (and the base run), one row per run
    (``metrics.final_losses``) or eval lines, each run then reduced to the mean of its last ``last``
    evaluations; needs role, replay, shift, d0, d1 and ``val_<d0>``, ``val_<d1>``.
    """
    fig, axes, own = _panels(axes, 3, (12.0, 3.8))
    notes: list[str] = []
    df, shift = _one_shift(final_df, shift, notes)
    df = _finals(df, last)
    d0, d1 = _sets(df)
    plotted = False
    cols = (f"val_{d0}", f"val_{d1}", "avg")
    if d0 and d1 and set(cols[:2]) <= set(df.columns):
        df = df.assign(avg=(df[cols[0]] + df[cols[1]]) / 2)
        runs = _where(df, role="continual")
        notes += _missing(E.REPLAY_FRACTIONS, [r for r, _ in _groups(runs, "replay")], "{:.0%}")
        union = _union(df, _first(runs, "compute_tokens"))
        if union.empty:
            notes.append("no union run")
        base = _where(df, role="base")
        for ax, col in zip(axes, cols):
            values = runs.groupby("replay")[col].mean() if "replay" in runs.columns else pd.Series()
            if len(values):
                ax.plot(np.arange(len(values)), values.to_numpy(), marker="o", color="tab:blue",
                        label="continual + replay")
                ax.set_xticks(np.arange(len(values)), [f"{r * 100:g}%" for r in values.index])
                plotted = True
            if len(union):
                ax.axhline(union[col].mean(), label="union baseline", **UNION_STYLE)
            if col == cols[0] and len(base):
                ax.axhline(base[col].mean(), label="base model (before the switch)", **BASE_STYLE)
    for ax, panel in zip(axes, (_panel_title(0, d0), _panel_title(1, d1), "average of D0 and D1")):
        ax.set_title(panel)
        ax.set_xlabel("replay (compute-equivalent, of D0)")
        ax.set_ylabel("final validation loss")
    text = title or _titled("Replay: final losses", shift, d0, d1)
    return _finish(fig, axes, own, text, notes, plotted)


# -- figure 5: re-warming on D0 itself -------------------------------------------------------------

def plot_rewarm_same_data(df: pd.DataFrame, ax: Axes | None = None, show_base: bool = True,
                          title: str | None = None) -> Figure:
    """D0 validation loss against tokens when training continues on new D0 tokens, re-warmed to several
    max LRs or kept at a constant LR.

    ``df``: ``experiments.rewarm_same_data``'s runs (and the base run); needs tokens, role, name, d0, d1,
    schedule, max_lr, variant, switch_tokens and ``val_<d0>``.
    """
    fig, axes, own = _panels(ax, 1, (7.0, 4.5))
    notes: list[str] = []
    d0 = _first(df, "d0")
    runs = _where(df, role="continual")
    runs = runs[runs["d1"] == d0] if "d1" in runs.columns else runs
    named = _by_name(runs)
    series = [(label, rows, {"color": c}) for (label, rows), c in zip(named, _colors(len(named), "plasma"))]
    if len(named) < 3:
        notes.append(f"{3 - len(named)} of 3 runs missing")
    base = _where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0], series, base, df.iloc[0:0], "final", _switches(runs),
                           "continue on new D0 tokens")
    text = title or _titled("Re-warming on the same data", None, d0, d0)
    return _finish(fig, axes, own, text, notes, plotted)


# -- figure 7: infinite schedules ------------------------------------------------------------------

def plot_infinite(df: pd.DataFrame, eval_set: str | None = None, ax: Axes | None = None,
                  title: str | None = None) -> Figure:
    """Validation loss against tokens over 3 consecutive chunks: repeated cosine and the infinite
    schedules as lines, the models annealed at each chunk's end as markers in their schedule's colour.

    ``df``: ``experiments.infinite_schedules``'s runs; needs tokens, role (infinite|anneal), schedule,
    d1, switch_tokens (a list) and ``val_<eval_set>`` (default: the chunks' data, ``d1``).
    """
    fig, axes, own = _panels(ax, 1, (8.0, 4.5))
    ax = axes[0]
    notes: list[str] = []
    name = eval_set or _first(df, "d1")
    col = f"val_{name}"
    main = _where(df, role="infinite")
    anneal = _where(df, role="anneal")
    kinds = [k for k in E.INFINITE_KINDS if len(_where(main, schedule=k))]
    missing = [SCHEDULE_NAMES[k] for k in E.INFINITE_KINDS if k not in kinds]
    if missing:
        notes.append(f"missing: {', '.join(missing)}")
    plotted = False
    for i, (kind, color) in enumerate(zip(kinds, ("black", "tab:blue", "tab:orange", "tab:green"))):
        label = SCHEDULE_NAMES.get(kind, kind)
        plotted |= _draw(ax, _where(main, schedule=kind), col, label=label, color=color,
                         linewidth=2.0 if kind == "cosine" else 1.5)
        ends = [_curve(rows, col) for _, rows in _groups(_where(anneal, schedule=kind), "chunk")]
        ends = [(x[-1], y[-1]) for x, y in ends if len(x)]
        if ends:
            xs, ys = zip(*ends)
            ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], markersize=9, markerfacecolor="none",
                    markeredgewidth=2, linestyle="none", color=color, label=f"{label}, annealed")
    _mark_switches(ax, _switches(main), "new chunk")
    _tokens_axis(ax)
    ax.set_ylabel("validation loss" + (f" on {name}" if name else ""))
    text = title or "Infinite schedules over 3 chunks" + (f" of {name}" if name else "")
    return _finish(fig, axes, own, text, notes, plotted)


# -- forgetting curves -----------------------------------------------------------------------------

def plot_forgetting(df: pd.DataFrame, shift: str | None = None, replays: Sequence[float] | None = None,
                    axes: AxesArg = None, union_as: str = "curve", show_base: bool = True,
                    title: str | None = None) -> Figure:
    """D0 and D1 validation loss against tokens for the main strategies: continual pre-training without
    and with replay, and the union baseline trained from scratch on D0 ∪ D1 (two panels).

    ``df``: continual runs (e.g. ``experiments.replay_sweep``'s), the union run and the base run; needs
    tokens, role, replay, shift, d0, d1, switch_tokens, compute_tokens and ``val_<d0>``, ``val_<d1>``.
    ``replays``: the replay fractions to show (default: all in ``df``).
    """
    fig, axes, own = _panels(axes, 2, (11.0, 4.2))
    notes: list[str] = []
    df, shift = _one_shift(df, shift, notes)
    d0, d1 = _sets(df)
    runs = _where(df, role="continual")
    groups = _groups(runs, "replay")
    if replays is not None:
        notes += _missing(replays, [r for r, _ in groups], "{:.0%} replay")
        groups = [(r, rows) for r, rows in groups if any(np.isclose(r, want) for want in replays)]
    colors = [colormaps["tab10"](i) for i in (3, 0, 2, 4, 8, 9, 1, 5, 6, 7)]
    series = [(f"continual, {_replay_label(r)}", rows, {"color": colors[i % len(colors)]})
              for i, (r, rows) in enumerate(groups)]
    union = _union(df, _first(runs, "compute_tokens"))
    if union.empty:
        notes.append("no union run")
    base = _where(df, role="base") if show_base else df.iloc[0:0]
    plotted = _loss_curves(axes, [d0, d1], series, base, union, union_as, _switches(runs))
    plotted |= not union.empty
    text = title or _titled("Forgetting and adaptation", shift, d0, d1)
    return _finish(fig, axes, own, text, notes, plotted)
