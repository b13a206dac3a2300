"""What every figure of the lab shares: styles, the token axis, panels, the title and legend, and helpers
that pick runs out of an evaluation frame.

Conventions of the figures drawn from runs (``cptlab.viz.curves``, ``cptlab.viz.finals``):
- x is the tokens a run has seen (a continual run starts at B0, the base model's budget), with
  ``format_tokens`` ticks; the tokens at which the data switches are dotted vertical lines.
- Runs with the same label (several seeds) are averaged at each token count.
- The base model's curve is grey and ends at the switch; the union baseline is black and dashed, as a
  horizontal line at its final loss or as its curve.
- On loss-vs-tokens panels the y range fits the curves after the switch (and the union's final loss),
  so that their differences show; the base curve may enter from above.
- A missing run is skipped and named in the title; an empty frame gives an empty, titled figure.
- Functions that take ``final_df`` want one row per run, as ``cptlab.analysis.metrics.final_losses``
  gives; they accept evaluation lines too, and reduce them with that same function (``finals``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cptlab.analysis.metrics import final_losses

BASE_STYLE: dict[str, Any] = {"color": "0.6", "linewidth": 2.5}
UNION_STYLE: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 1.3}
SWITCH_STYLE: dict[str, Any] = {"color": "0.3", "linestyle": ":", "linewidth": 1.2}
BASE_LABEL = "base model (D0 only)"
MARKERS = ("o", "D", "^", "v", "s", "P", "X")
SCHEDULE_NAMES = {"cosine": "repeated cosine", "infinite_cosine": "infinite cosine",
                  "infinite_inv_sqrt": "infinite inv-sqrt", "wsd": "WSD"}

AxesArg = Axes | Sequence[Axes] | None


def format_tokens(n: float, _pos: Any = None) -> str:
    """A token count the way the paper writes it: 300B, 2.26M, 65.54k."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:.3g}"


def save_figure(fig: Figure, out_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``out_dir/<name>.png`` (folders created) and return the path."""
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def panels(axes: AxesArg, n: int, figsize: tuple[float, float]) -> tuple[Figure, list[Axes], bool]:
    """The given axes (n of them) and their figure, or a new figure with n panels side by side.
    The flag says whether the figure is ours (then the title goes above all panels)."""
    if axes is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, list(fig.subplots(1, n, squeeze=False)[0]), True
    given = [axes] if isinstance(axes, Axes) else list(axes)
    if len(given) != n:
        raise ValueError(f"axes: expected {n} axes, got {len(given)}")
    return given[0].figure, given, False


def where(df: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    """The rows whose columns equal the given values; no rows if a column is missing."""
    if df.empty or any(col not in df.columns for col in equal):
        return df.iloc[0:0]
    mask = np.ones(len(df), dtype=bool)
    for col, value in equal.items():
        mask &= (df[col] == value).to_numpy()
    return df[mask]


def first(df: pd.DataFrame, col: str) -> Any:
    """The first non-missing value of a column, or None."""
    if col not in df.columns:
        return None
    values = df[col].dropna()
    return values.iloc[0] if len(values) else None


def groups(df: pd.DataFrame, key: str) -> list[tuple[Any, pd.DataFrame]]:
    """The rows split by the value of ``key``, in sorted order (rows without a value dropped)."""
    if df.empty or key not in df.columns:
        return []
    return list(df.groupby(key, sort=True))


def curve(rows: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mean of ``col`` at each token count), sorted by tokens, missing values dropped."""
    if rows.empty or col not in rows.columns:
        return np.array([]), np.array([])
    mean = rows[["tokens", col]].dropna().groupby("tokens")[col].mean()
    return mean.index.to_numpy(dtype=float), mean.to_numpy(dtype=float)


def draw(ax: Axes, rows: pd.DataFrame, col: str, **style: Any) -> bool:
    """Plot the rows' ``col`` against tokens; False if there was nothing to plot."""
    x, y = curve(rows, col)
    if len(x):
        ax.plot(x, y, **style)
    return bool(len(x))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not np.isnan(value)


def switches(rows: pd.DataFrame) -> list[float]:
    """The token counts at which the rows' runs switch data (their ``switch_tokens`` labels)."""
    found: set[float] = set()
    for value in rows["switch_tokens"] if "switch_tokens" in rows.columns else []:
        values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
        found.update(float(v) for v in values if is_number(v))
    return sorted(found)


def mark_switches(ax: Axes, tokens: Sequence[float], label: str = "switch to D1") -> None:
    for i, x in enumerate(tokens):
        ax.axvline(x, label=label if i == 0 else None, **SWITCH_STYLE)


def tokens_axis(ax: Axes, label: str = "tokens") -> None:
    ax.set_xlabel(label)
    ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))


def colors(n: int, cmap: str = "viridis") -> list[Any]:
    return list(colormaps[cmap](np.linspace(0.0, 0.85, n))) if n else []


def one_shift(df: pd.DataFrame, shift: str | None, notes: list[str]) -> tuple[pd.DataFrame, str | None]:
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


def sets(df: pd.DataFrame) -> tuple[str | None, str | None]:
    """The names of D0 and D1 (the ``d0`` and ``d1`` labels of the runs that are not the base)."""
    others = df[df["role"] != "base"] if "role" in df.columns else df
    return first(df, "d0"), first(others, "d1")


def titled(title: str, shift: str | None = None, d0: str | None = None, d1: str | None = None) -> str:
    """The title with what the runs are about: "<title> (<shift> shift: <d0> → <d1>)"."""
    detail = f"{d0} → {d1}" if d0 and d1 else ""
    if shift and shift != "same":
        detail = f"{shift} shift: {detail}" if detail else f"{shift} shift"
    return f"{title} ({detail})" if detail else title


def panel_title(i: int, name: str | None) -> str:
    return f"D{i}: {name}" if name else f"D{i}"


def union(df: pd.DataFrame, compute: Any = None) -> pd.DataFrame:
    """The union baseline's rows: the one of ``compute`` tokens if there, else the smallest."""
    union = where(df, role="union")
    if union.empty or "compute_tokens" not in union.columns:
        return union
    same = union[union["compute_tokens"] == compute]
    return same if len(same) else union[union["compute_tokens"] == union["compute_tokens"].min()]


def finals(df: pd.DataFrame, last: int) -> pd.DataFrame:
    """One row per run: ``df`` itself when it already has one row per run (``metrics.final_losses``'
    output, or a frame without run ids), else the final losses of its evaluation lines over the last
    ``last`` evaluations (``metrics.final_losses``)."""
    one_per_run = "run_id" not in df.columns or not df["run_id"].duplicated().any()
    if df.empty or "n_evals" in df.columns or one_per_run:
        return df
    return final_losses(df, k=last)


def finish(fig: Figure, axes: list[Axes], own: bool, title: str, notes: list[str],
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


def focus(ax: Axes, values: list[float]) -> None:
    """Fit the y range to ``values`` (the curves after the switch); earlier parts may run off the top."""
    values = [v for v in values if np.isfinite(v)]
    if values:
        low, high = min(values), max(values)
        pad = max(0.08 * (high - low), 1e-3)
        ax.set_ylim(low - pad, high + pad)


def replay_label(fraction: float) -> str:
    return "no replay" if fraction == 0 else f"{fraction * 100:g}% replay"


def missing(expected: Sequence[float], found: Sequence[float], fmt: str) -> list[str]:
    absent = [fmt.format(v) for v in expected if not any(np.isclose(v, f) for f in found)]
    return [f"missing: {', '.join(absent)}"] if absent else []

