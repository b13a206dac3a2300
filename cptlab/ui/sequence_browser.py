"""The sequence browser: pick continual-learning methods and datasets of the sequence study and see their
forgetting matrices side by side, their loss curves through the sequence and their summaries.

A plain class holding its controls, like every widget of ``cptlab.ui``; display it as a cell's last value.
Its state is readable without a front end: ``methods.value`` and ``datasets.value`` are the picks,
``figure`` the matrices and curves drawn, ``summary`` the table shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as W
import pandas as pd
from matplotlib.figure import Figure

from cptlab.analysis import sequences as A
from cptlab.ui import common
from cptlab.viz.sequences import plot_forgetting_matrices, plot_sequence_curves


class SequenceBrowser:
    """Forgetting matrices and loss curves of the sequence study's methods (``rows``: ``sequence_rows``;
    ``curves``: the study's evaluation lines, ``load_runs``). ``select``: the methods shown first."""

    def __init__(self, rows: pd.DataFrame, curves: pd.DataFrame, datasets: Sequence[str],
                 select: Sequence[str] | None = None) -> None:
        self.rows, self.curves = rows, curves
        variants = list(dict.fromkeys(rows["variant"])) if len(rows) else []
        style = {"description_width": "6em"}
        first = tuple(v for v in (select or variants[:3]) if v in variants)
        self.methods = W.SelectMultiple(options=variants, value=first, description="methods",
                                        rows=min(8, max(2, len(variants))), style=style)
        self.datasets = W.SelectMultiple(options=list(datasets), value=tuple(datasets),
                                         description="datasets", rows=len(datasets), style=style)
        self.image = W.Image(format="png")
        self.table = W.HTML()
        self.figure = Figure(figsize=(12.0, 7.0))
        self.summary = pd.DataFrame()
        self.methods.observe(lambda _: self.redraw(), names="value")
        self.datasets.observe(lambda _: self.redraw(), names="value")
        self.widget = W.VBox([W.HBox([self.methods, self.datasets]), self.image, self.table])
        self.redraw()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def redraw(self) -> None:
        """Draw the picked methods' matrices (on all datasets, rows included) and their curves on the picked
        datasets, and fill the summary table."""
        methods, picked = list(self.methods.value), list(self.datasets.value)
        everything = list(self.datasets.options)
        self.figure.clear()
        top = self.figure.subfigures(2, 1, height_ratios=[1.0, 1.0])
        if methods:
            plot_forgetting_matrices(self.rows, methods, everything,
                                     axes=list(top[0].subplots(1, len(methods), squeeze=False)[0]))
        if methods and picked:
            plot_sequence_curves(self.curves, methods, picked,
                                 axes=list(top[1].subplots(1, len(picked), squeeze=False)[0]))
        self.image.value = common.png(self.figure)
        table = A.summary_table(self.rows, everything)
        self.summary = table.loc[[m for m in methods if m in table.index]] if len(table) else table
        self.table.value = self.summary.round(3).to_html() if len(self.summary) else "<i>no method picked</i>"
