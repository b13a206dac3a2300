"""The results browser: pick runs of the run store by experiment, scale and shift, overlay their curves with
the base model and the union baseline as references, and read their final losses in a table.

Like every widget of ``cptlab.ui`` it is a plain class holding its controls; display it as a cell's last
value. Its state is readable without a front end (tests drive it by setting controls).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cptlab.analysis import metrics as M
from cptlab.analysis.runs import eval_frame
from cptlab.config import RunConfig, RunRef
from cptlab.study import paper
from cptlab.training.rundir import RunDir, RunDirError
from cptlab.training.store import RunStore
from cptlab.ui import common

ANY = "any"
PANELS = ("D0", "D1", "avg")


class ResultsBrowser:
    """Runs of the run store, picked by experiment, scale and shift (``experiment``, ``scale``,
    ``shift``, then several in ``runs``), drawn as D0, D1 and average validation loss against tokens
    (``figure``, ``curves()``), with the base model they started from and the union baseline of the same
    shift and compute as dashed references (``references``), and their final losses as a table
    (``finals``, shown in ``table``). "refresh" scans the store again (runs a launcher just trained).
    ``select``: run names to pick first (default: every run that matches)."""

    def __init__(self, root: str | Path | None = None, experiment: str = "replay", shift: str | None = None,
                 select: Sequence[str] | None = None) -> None:
        self.store = RunStore(root)
        self.root = self.store.root
        style = {"description_width": "6em"}
        self.experiment = W.Dropdown(description="experiment", style=style)
        self.scale = W.Dropdown(description="scale", style=style)
        self.shift = W.Dropdown(description="shift", style=style)
        self.runs = W.SelectMultiple(description="runs", rows=8, style=style, layout=W.Layout(width="34em"))
        self.references = W.Checkbox(value=True, description="base model and union baseline")
        self.refresh_button = W.Button(description="refresh", icon="refresh",
                                       tooltip="scan the run store again")
        self.status = W.HTML()
        self.image = W.Image(format="png")
        self.table = W.HTML()
        self.figure = Figure(figsize=(12.0, 3.8))
        self.frame = pd.DataFrame()  # every stored run's evaluation lines, one row each
        self.unreadable: list[str] = []  # runs left out, each with why (a metrics line that is not JSON)
        self.finals = pd.DataFrame()  # the table: one row per selected run and reference
        self._busy = False

        self.experiment.observe(lambda _: self._filter(), names="value")
        self.scale.observe(lambda _: self._filter(), names="value")
        self.shift.observe(lambda _: self._filter(), names="value")
        self.runs.observe(lambda _: self.redraw(), names="value")
        self.references.observe(lambda _: self.redraw(), names="value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.widget = W.VBox([
            W.HBox([W.VBox([self.experiment, self.scale, self.shift, self.references, self.refresh_button]),
                    self.runs]),
            self.status, self.image, self.table,
        ])
        self.refresh(experiment, shift, select)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- the store -------------------------------------------------------------------------------
    def refresh(self, experiment: str | None = None, shift: str | None = None,
                select: Sequence[str] | None = None) -> None:
        """Scan the run store and rebuild the choices (keeping the current ones where they still exist)."""
        frames, self.unreadable = [], []
        for run in self.store.runs():
            try:
                df = eval_frame(run)
            except RunDirError as exc:
                self.unreadable.append(str(exc))
                continue
            if len(df):
                df["experiment"] = run.experiment
                df["run_id"] = f"{run.experiment}/{run.run_id}"
                df["scale"] = _model_preset(run)
                frames.append(df)
        self.frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        experiments = sorted(self.frame["experiment"].unique()) if len(self.frame) else []
        wanted = experiment or self.experiment.value
        self._busy = True
        try:
            self.experiment.options = experiments
            if experiments:
                self.experiment.value = wanted if wanted in experiments else experiments[0]
        finally:
            self._busy = False
        self._filter(shift=shift, select=select)

    def _filter(self, shift: str | None = None, select: Sequence[str] | None = None) -> None:
        """Offer the scales, shifts and runs of the chosen experiment."""
        if self._busy:
            return
        self._busy = True
        try:
            rows = self._experiment_rows()
            scales = [ANY, *sorted(rows["scale"].dropna().unique())] if len(rows) else [ANY]
            only = scales[1] if len(scales) == 2 else ANY
            keep = self.scale.value if self.scale.value in scales else only
            self.scale.options, self.scale.value = scales, keep
            if self.scale.value != ANY:
                rows = rows[rows["scale"] == self.scale.value]
            shifts = [ANY, *sorted(rows["shift"].dropna().unique())] if "shift" in rows.columns else [ANY]
            wanted = shift or self.shift.value
            self.shift.options, self.shift.value = shifts, wanted if wanted in shifts else ANY
            if self.shift.value != ANY:
                rows = rows[rows["shift"] == self.shift.value]
            runs = rows.drop_duplicates("run_id")
            options = [(_describe(r), r["run_id"]) for _, r in runs.iterrows()]
            previous = set(self.runs.value)
            self.runs.options = options
            ids = [rid for _, rid in options]
            if select is not None:
                chosen = [r["run_id"] for _, r in runs.iterrows() if r["name"] in set(select)]
            else:
                chosen = [rid for rid in ids if rid in previous] or ids
            self.runs.value = tuple(chosen)
        finally:
            self._busy = False
        self.redraw()

    def _experiment_rows(self) -> pd.DataFrame:
        if self.frame.empty or self.experiment.value is None:
            return self.frame
        return self.frame[self.frame["experiment"] == self.experiment.value]

    def selected(self) -> pd.DataFrame:
        """The evaluation lines of the selected runs."""
        if self.frame.empty:
            return self.frame
        return self.frame[self.frame["run_id"].isin(self.runs.value)]

    def reference_frame(self) -> pd.DataFrame:
        """The evaluation lines of the references: the base model(s) the selected runs started from and the
        union baselines of their shifts at the same compute (the same scale too)."""
        sel = self.selected()
        if sel.empty or not self.references.value:
            return self.frame.iloc[:0]
        ids: set[str] = set()
        for run_id in sel["run_id"].unique():
            base = _base_of(self.store.run(*run_id.split("/")))
            if base is not None:
                ids.add(base)
        columns = ("role", "shift", "scale", "compute_tokens")
        if all(c in self.frame.columns for c in columns):
            unions = self.frame[self.frame["role"] == "union"]
            for _, run in sel.drop_duplicates("run_id").iterrows():
                same = unions[(unions["shift"] == run.get("shift")) & (unions["scale"] == run.get("scale"))
                              & (unions["compute_tokens"] == run.get("compute_tokens"))]
                ids.update(same["run_id"].unique())
        ids -= set(sel["run_id"])
        return self.frame[self.frame["run_id"].isin(ids)]

    # -- drawing ---------------------------------------------------------------------------------
    def curves(self) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The plotted (tokens, loss) lines by panel ("D0", "D1", "avg") and label."""
        out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for panel, ax in zip(PANELS, self.figure.axes):
            out[panel] = {ln.get_label(): (np.asarray(ln.get_xdata(), dtype=float),
                                           np.asarray(ln.get_ydata(), dtype=float))
                          for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        return out

    def redraw(self) -> None:
        """Draw the selected runs and their references; rebuild the final-loss table."""
        if self._busy:
            return
        sel, refs = self.selected(), self.reference_frame()
        fig = self.figure
        fig.clear()
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
        axes = fig.subplots(1, 3)
        pairs = _set_pairs(sel)
        labels: set[str] = set()

        def draw(rows: pd.DataFrame, label: str, d0: str, d1: str | None, **style: Any) -> None:
            rows = rows.sort_values("tokens")
            x = rows["tokens"].to_numpy(dtype=float)
            ys = {"D0": rows.get(f"val_{d0}"), "D1": rows.get(f"val_{d1}") if d1 else None}
            if ys["D0"] is not None and ys["D1"] is not None:
                ys["avg"] = (ys["D0"] + ys["D1"]) / 2
            for panel, ax in zip(PANELS, axes):
                if ys.get(panel) is not None:
                    ax.plot(x, ys[panel].to_numpy(dtype=float), label=label, **style)

        for i, (run_id, rows) in enumerate(_by_run(sel)):
            first = rows.iloc[0]
            label = _unique(str(first.get("name", run_id)), run_id, labels)
            d0 = first.get("d0") if isinstance(first.get("d0"), str) else paper.D0
            d1 = first.get("d1") if isinstance(first.get("d1"), str) else None
            draw(rows, label, d0, d1, color=f"C{i % 10}", lw=1.4)
        for run_id, rows in _by_run(refs):
            role = rows.iloc[0].get("role")
            for d0, d1 in pairs:
                if role == "union" and rows.iloc[0].get("d1") != d1:
                    continue
                base = role in BASE_ROLES
                what = "base model" if base else "union baseline"
                label = _unique(what if len(pairs) == 1 else f"{what} ({d1})", run_id, labels)
                draw(rows, label, d0, d1, color="black" if base else "0.5", ls="--" if base else ":", lw=1.2)
        d0s = sorted({d0 for d0, _ in pairs}) or [paper.D0]
        d1s = sorted({d1 for _, d1 in pairs if d1})
        titles = (f"D0 ({', '.join(d0s)})", f"D1 ({', '.join(d1s) or '-'})", "average of D0 and D1")
        for ax, title in zip(axes, titles):
            common.tokens_axis(ax)
            ax.set_title(title, fontsize="medium")
        axes[0].set_ylabel("validation loss")
        if sel.empty:
            axes[1].text(0.5, 0.5, "no runs selected", transform=axes[1].transAxes, ha="center", color="0.5")
        elif axes[2].get_lines():
            axes[2].legend(fontsize="small")
        self.image.value = common.png(fig)
        self.finals = _final_table(pd.concat([sel, refs], ignore_index=True), d1s)
        self.table.value = (self.finals.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}")
                            if len(self.finals) else "")
        self.status.value = (f"{len(self.runs.value)} of {len(self.runs.options)} runs selected; run store "
                             f"{html.escape(str(self.root))}") if len(self.frame) else \
            f"no runs in the run store {html.escape(str(self.root))} yet"
        if self.unreadable:
            self.status.value += common.error_html(
                f"; {len(self.unreadable)} runs left out: " + "; ".join(self.unreadable))


def _config(run: RunDir) -> RunConfig | None:
    try:
        return run.load_config()
    except (OSError, ValueError):
        return None


def _model_preset(run: RunDir) -> str | None:
    """The run's model preset; ``custom`` for a shape given in full (an imported model and the runs that
    continue it), so that choosing a scale never hides them without a word."""
    cfg = _config(run)
    return (cfg.model.preset or "custom") if cfg is not None else None


# Roles of the models continual runs start from: the lab's own base models and imported ones (cptlab import).
BASE_ROLES = ("base", "pretrained")


def _base_of(run: RunDir) -> str | None:
    """``<experiment>/<run id>`` of the run whose checkpoint ``run`` started from."""
    cfg = _config(run)
    init = cfg.stages[0].init_from if cfg is not None and cfg.stages else None
    return f"{init.experiment}/{init.run}" if isinstance(init, RunRef) else None


def _describe(row: pd.Series) -> str:
    parts = [str(row.get("name", row["run_id"]))]
    if isinstance(row.get("scale"), str):
        parts.append(row["scale"])
    seed = row.get("seed")
    if seed is not None and not pd.isna(seed):
        parts.append(f"seed {int(seed)}")
    parts.append(row["run_id"].rsplit("-", 1)[-1])
    return " · ".join(parts) + ("" if row.get("done", True) else " (unfinished)")


def _by_run(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return list(df.groupby("run_id", sort=False)) if len(df) else []


def _unique(label: str, run_id: str, used: set[str]) -> str:
    if label in used:
        label = f"{label} [{run_id.rsplit('-', 1)[-1]}]"
    used.add(label)
    return label


def _set_pairs(rows: pd.DataFrame) -> list[tuple[str, str | None]]:
    """The (D0 set, D1 set) pairs of the runs in ``rows``."""
    if rows.empty:
        return []
    runs = rows.drop_duplicates("run_id")
    d0 = runs["d0"] if "d0" in runs.columns else pd.Series(paper.D0, index=runs.index)
    d1 = runs["d1"] if "d1" in runs.columns else pd.Series(None, index=runs.index)
    return sorted({(a if isinstance(a, str) else paper.D0, b if isinstance(b, str) else None)
                   for a, b in zip(d0, d1)}, key=str)


def _final_table(df: pd.DataFrame, d1s: list[str]) -> pd.DataFrame:
    """Final losses (``metrics.final_losses``) with forgetting; the base model's D1 is its loss on the D1
    set of the selected runs when they share one."""
    if df.empty:
        return pd.DataFrame()
    finals = M.add_forgetting(M.final_losses(df))
    if len(d1s) == 1 and "role" in finals.columns and f"val_{d1s[0]}" in finals.columns:
        base = finals["role"].isin(BASE_ROLES)
        finals.loc[base, "D1"] = finals.loc[base, f"val_{d1s[0]}"]
        finals.loc[base, "avg"] = (finals.loc[base, "D0"] + finals.loc[base, "D1"]) / 2
    columns = [c for c in ("name", "experiment", "role", "shift", "replay", "schedule", "max_lr", "tokens",
                           "D0", "D1", "avg", "forgetting", "n_evals") if c in finals.columns]
    if "replay" in finals.columns:
        finals["replay"] = finals["replay"].map(lambda r: "" if pd.isna(r) else M.replay_label(float(r)))
    order = {"continual": 0, "union": 1, "base": 2, "pretrained": 2}
    if "role" in finals.columns:
        finals = finals.sort_values("role", key=lambda s: s.map(order).fillna(0), kind="stable")
    return finals[columns].reset_index(drop=True)
