"""Figures of the fitted laws (``cptlab.analysis.laws``): predicted loss curves (dashed) over measured ones
(solid), the prediction errors per held-out run, the replay law's curves, and predicted losses of
schedules that were never trained. See ``cptlab.viz.common`` for the shared conventions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cptlab.analysis import cpt_validation as CPT
from cptlab.analysis import laws as L
from cptlab.analysis import replay_law as R
from cptlab.viz import common as C

FIT_STYLE = {"color": "0.55", "linewidth": 1.5}
TOLERANCE_STYLE = {"color": "C3", "linestyle": ":", "linewidth": 1.2}


def _draw_family(ax: Axes, law: L.ScheduleLaw, fitted: Sequence[L.Curve],
                 predicted: Sequence[tuple[L.Curve, np.ndarray]]) -> list[float]:
    """The fitted runs in grey, each held-out run measured (solid) and predicted (dashed) in one colour;
    returns the losses to focus the y range on."""
    shown: list[float] = []
    for i, curve in enumerate(fitted):
        ax.plot(curve.tokens, curve.loss, label="fitted runs" if i == 0 else None, **FIT_STYLE)
    for (curve, _), color in zip(predicted, C.colors(len(predicted), "plasma")):
        steps = curve.own_steps()
        name = curve.run.split("/")[-1]
        ax.plot(curve.tokens, curve.loss, "o-", ms=3.5, color=color, label=name)
        ax.plot(steps * curve.tokens_per_step, law.loss(curve.lr, steps), "--", color=color, lw=1.3)
    for curve in [*fitted, *(c for c, _ in predicted)]:
        shown += curve.loss[len(curve.loss) // 4:].tolist()  # the first evaluations run off the top
    return shown


def plot_predictions(validation: L.Validation, families: Sequence[str] | None = None,
                     axes: C.AxesArg = None, title: str | None = None) -> Figure:
    """One panel per family of a validation (``laws.validate``): its fitted runs in grey, every held-out
    run's measured loss (solid, with its evaluations) and the law's prediction (dashed, same colour)."""
    names = list(families) if families is not None else list(validation.laws)
    fig, panels, own = C.panels(axes, max(1, len(names)), (8.0 * max(1, len(names)), 5.0))
    for ax, name in zip(panels, names):
        law = validation.laws.get(name)
        if law is None:
            ax.set_title(f"{name}: not fitted")
            continue
        shown = _draw_family(ax, law, validation.fitted[name], validation.predicted.get(name, []))
        C.focus(ax, shown)
        C.tokens_axis(ax)
        ax.set_ylabel(f"validation loss ({law.loss_set})")
        ax.set_title(f"{name}\nfit: {', '.join(r.split('/')[-1] for r in law.runs)}", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2, title="measured (solid), predicted (dashed)",
                  title_fontsize="x-small")
    text = title or "Loss predicted by the schedule law (dashed) against the runs (solid)"
    if own:
        fig.suptitle(text)
    return fig


def plot_cpt_predictions(validation: CPT.ShiftValidation, axes: C.AxesArg = None,
                         title: str | None = None) -> Figure:
    """A shift's continual-pre-training law (``cpt_validation.validate_shift``): per eval set (D0, D1) every
    held-out run's measured loss (solid, its evaluations as dots) and the law's prediction at those
    evaluations (dashed, same colour)."""
    fig, panels, own = C.panels(axes, 2, (16.0, 5.0))
    runs = sorted({run for run, _ in validation.curves})
    colors = dict(zip(runs, C.colors(len(runs), "plasma")))
    for ax, key in zip(panels, ("D0", "D1")):
        shown: list[float] = []
        for (run, k), (curve, predicted) in validation.curves.items():
            if k != key:
                continue
            ax.plot(curve.tokens, curve.loss, "o-", ms=3.5, color=colors[run], label=run.split("/")[-1])
            ax.plot(curve.tokens, predicted, "--", color=colors[run], lw=1.3)
            shown += [*curve.loss.tolist(), *np.asarray(predicted).tolist()]
        law = validation.laws[key]
        C.focus(ax, shown)
        C.tokens_axis(ax)
        ax.set_ylabel(f"validation loss ({law.loss_set})")
        fitted = ", ".join(r.split("/")[-1] for r in validation.fit)
        ax.set_title(f"{validation.shift} shift, {key}\nfit: {fitted}", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2, title="measured (solid), predicted (dashed)",
                  title_fontsize="x-small")
    if own:
        fig.suptitle(title or "Continual-pre-training law: held-out runs predicted (dashed), measured")
    return fig


def plot_prediction_errors(table: pd.DataFrame, tolerance: float = 1.0, ax: Axes | None = None,
                           title: str | None = None) -> Figure:
    """The final-loss error (bar) and the mean error along the curve (dot) of every held-out run of a
    validation table (``Validation.table``), runs trained on other data than the fit hatched; the band
    is +-``tolerance`` percent."""
    fig, axes, _ = C.panels(ax, 1, (8.0, 0.32 * max(len(table), 4) + 1.4))
    ax = axes[0]
    if table.empty:
        return C.finish(fig, axes, True, title or "Prediction errors", [], plotted=False)
    y = np.arange(len(table))[::-1]
    colors = ["C0" if same else "C3" for same in table["same data"]]
    ax.barh(y, table["final error %"], color=colors, alpha=0.75, label="final loss")
    ax.plot(table["mean error %"], y, "k.", label="mean |error| along the curve")
    ax.axvspan(-tolerance, tolerance, color="0.9", zorder=0, label=f"±{tolerance:g}%")
    ax.set_yticks(y, [f"{run.split('/')[-1]}{'' if same else ' (other data)'}"
                      for run, same in zip(table.index, table["same data"])], fontsize="small")
    ax.set_xlabel("prediction error, % of the measured loss")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(title or "Schedule law: error of the predicted loss per held-out run (red: trained on "
                 "other data than the fit)", fontsize="medium")
    return fig


def _fraction(label: str) -> float:
    """0.05 from "5%" (the index of ``replay_law.replay_loo``)."""
    return float(label.rstrip("%")) / 100


def _draw_replay(ax_d0: Axes, ax_d1: Axes, law: R.ReplayLaw, finals: pd.DataFrame, tolerance: float) -> None:
    sweep = R.sweep_finals(finals, law.shift)
    loo = R.replay_loo(finals, law.shift)
    r = np.concatenate([[0.0], np.geomspace(1e-4, max(law.fractions), 300)])  # ln(r + c) bends near 0
    ax_d0.plot(r, law.forgetting(r), color="C0", label="law (fitted on all)")
    ax_d0.plot(sweep.index, sweep["D0"] - law.base_d0, "o", color="C0", label="runs")
    if len(loo):
        ax_d0.plot(loo.index.map(_fraction), loo["D0 predicted"] - law.base_d0, "x", color="C1", ms=8,
                   label="predicted, left out of the fit")
        ax_d1.plot(loo.index.map(_fraction), loo["D1 predicted"], "x", color="C1", ms=8,
                   label="predicted, left out of the fit")
    ax_d0.axhline(tolerance, label=f"tolerance +{tolerance:g}", **TOLERANCE_STYLE)
    best = law.smallest_fraction(tolerance)
    if best is not None:
        ax_d0.axvline(best, color="C3", lw=1, alpha=0.6, label=f"smallest fraction: {100 * best:.1f}%")
    ax_d1.plot(r, law.d1(r), color="C2", label="law (fitted on all)")
    ax_d1.plot(sweep.index, sweep["D1"], "o", color="C2", label="runs")
    ax_d0.set_ylabel("D0 forgetting (nats over the base model)")
    ax_d1.set_ylabel("final D1 loss")
    for ax in (ax_d0, ax_d1):
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, max(law.fractions) * 1.05)
        ax.set_xlabel("replay fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    ax_d0.set_title(f"{law.shift} shift: forgetting", fontsize="medium")
    ax_d1.set_title(f"{law.shift} shift: D1 loss", fontsize="medium")


def plot_replay_law(finals: pd.DataFrame, laws: Mapping[str, R.ReplayLaw],
                    tolerance: float = R.REPLAY_TOLERANCE, axes: C.AxesArg = None,
                    title: str | None = None) -> Figure:
    """Per shift, two panels: D0 forgetting and final D1 loss against the replay fraction, the runs
    (dots), the law fitted on all of them (line), each fraction predicted by the law fitted without it
    (crosses), the tolerance and the smallest fraction that meets it. ``finals``: as
    ``replay_law.fit_replay_law`` takes them."""
    shifts = list(laws)
    if axes is None:  # one row per shift
        fig = Figure(figsize=(11.0, 4.0 * max(1, len(shifts))), layout="constrained")
        panels, own = list(fig.subplots(max(1, len(shifts)), 2, squeeze=False).ravel()), True
    else:
        fig, panels, own = C.panels(axes, 2 * max(1, len(shifts)), (0.0, 0.0))
    for i, shift in enumerate(shifts):
        _draw_replay(panels[2 * i], panels[2 * i + 1], laws[shift], finals, tolerance)
    if not shifts:
        return C.finish(fig, panels, own, title or "Replay law", ["no replay sweep"], plotted=False)
    if own:
        fig.suptitle(title or "Replay law: D0 = a + b ln(r + c), D1 = d + e ln(1 / (1 - r))")
    return fig


def plot_predicted_losses(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], ax: Axes | None = None,
                          title: str | None = None) -> Figure:
    """Predicted loss against tokens of schedules never trained (label -> (tokens, loss)), dashed."""
    fig, axes, _ = C.panels(ax, 1, (8.0, 3.0))
    ax = axes[0]
    shown: list[float] = []
    for label, (x, y) in curves.items():
        ax.plot(x, y, "--", label=label)
        finite = y[np.isfinite(y)]
        shown += finite[len(finite) // 10:].tolist()  # the first steps' loss runs off the top
    C.focus(ax, shown)
    C.tokens_axis(ax)
    ax.set_ylabel("predicted loss")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    return fig
