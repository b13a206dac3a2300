"""The continual-pre-training law (``cpt_law``) validated on held-out runs, and the study of a scale that
notebook 09_predict and REPORT.md show.

Per shift, the law of D0 and of D1 is fitted on ``cpt_law.FIT_RUNS`` (and their base model's history) and
asked about every other continual run of the shift from the same base model: the replay sweep, the max-LR
and re-warming ablations, and today's recipes (``study.modern``: the constant-LR trunk, its decay-to-zero
and anneal tails, the microanneal of the shift's corpus). Targets: final D1 within ``D1_TOLERANCE``; D0's
forgetting within ``D0_TOLERANCE`` (nats, or a share of the measured forgetting, the larger), on
``TARGET_SHARE`` of the held-out runs. The law does not apply to a merge's averaged weights or to
schedule-free AdamW (``study.modern.OUTSIDE_THE_LAWS``): those runs are listed as outside it. The
three-chunk runs (``infinite``) train from scratch on one corpus: no change of data, the schedule law's
business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cptlab.analysis import cpt_law as C
from cptlab.analysis import laws as L
from cptlab.analysis.cpt_plan import planner_verdict
from cptlab.study import experiments as E
from cptlab.study import modern as MR
from cptlab.study import paper
from cptlab.study.scales import Scale, get_scale
from cptlab.training.store import RunStore

D1_TOLERANCE = 0.01  # relative error of the final D1 loss
D0_TOLERANCE = (0.02, 0.15)  # nats, or this share of the measured forgetting, whichever is larger
TARGET_SHARE = 0.8  # of the held-out runs


def shift_runs(shift: str, scale: str | Scale = "tiny",
               device: str = "auto") -> tuple[list[E.Run], list[E.Run]]:
    """(fit, held out): the continual runs of ``shift`` from the seed-0 base model that the reproduction
    trains, split into ``cpt_law.FIT_RUNS`` and the others the law applies to (see the module's docstring)."""
    s = get_scale(scale)
    runs = [*E.replay_sweep(shift, s, (0,), device), *E.max_lr_ablation(shift, s, device),
            *(E.warmup_ablation(shift, s, device) if shift == "weak" else []),
            *[r for r in _modern_runs(shift, s, device) if r.labels["recipe"] not in MR.OUTSIDE_THE_LAWS]]
    unique = {r.run_id: r for r in runs if r.labels.get("role") in ("continual", "modern", "microanneal")}
    names = {f.format(shift=shift) for f in C.FIT_RUNS}
    return ([r for r in unique.values() if r.name in names],
            [r for r in unique.values() if r.name not in names])


def outside_runs(shift: str, scale: str | Scale = "tiny", device: str = "auto") -> list[E.Run]:
    """The runs of today's recipes on ``shift`` that the law does not describe (``OUTSIDE_THE_LAWS``)."""
    return [r for r in _modern_runs(shift, scale, device) if r.labels["recipe"] in MR.OUTSIDE_THE_LAWS]


def _modern_runs(shift: str, scale: str | Scale, device: str) -> list[E.Run]:
    """Today's recipes' runs of ``shift`` from its base model (``study.modern``), its microanneal included."""
    d1 = paper.SHIFTS[shift]
    return [r for r in MR.modern_runs(scale, device)
            if r.labels.get("d1") == d1 and r.labels.get("role") in ("modern", "microanneal")]


@dataclass
class ShiftValidation:
    """A shift's laws (CPT and, for comparison, the schedule law fitted on the same runs), the runs fitted
    and ``table``: one row per held-out run and eval set."""

    shift: str
    laws: dict[str, C.CptLaw]
    schedule_laws: dict[str, L.ScheduleLaw]
    fit: list[str]
    table: pd.DataFrame
    curves: dict[tuple[str, str], tuple[L.Curve, np.ndarray]] = field(default_factory=dict)
    outside: dict[str, str] = field(default_factory=dict)  # "experiment/name" -> why the law does not apply


def validate_shift(shift: str, fit: Sequence[E.Run], held_out: Sequence[E.Run], frame: pd.DataFrame,
                   store: RunStore | None = None, open_model: bool = False,
                   outside: Sequence[E.Run] = ()) -> ShiftValidation:
    """Fit on ``fit``, predict every run of ``held_out`` found in ``frame``: per run and set, the final
    loss measured and predicted by both laws, the errors, and for D0 the forgetting and its target.
    ``outside``: runs the law does not apply to, listed with the reason where ``frame`` holds them."""
    laws = C.fit_shift(shift, fit, frame, store, open_model)
    schedule = {key: L.fit_schedule_law([L.run_curve(r, frame, law.loss_set, store) for r in fit])
                for key, law in laws.items()}
    out = ShiftValidation(shift, laws, schedule, [f"{r.experiment}/{r.name}" for r in fit], pd.DataFrame())
    rows = []
    for run in held_out:
        try:
            base_d0 = L.run_curve(C.lineage_root(run), frame, paper.D0, store).loss[-1]
            curves = {key: L.run_curve(run, frame, law.loss_set, store) for key, law in laws.items()}
        except ValueError:
            continue  # not in the frame: not trained
        switch, r = C.continual_history(run, store)
        for key, curve in curves.items():
            if not len(curve.steps):
                continue
            predicted = laws[key].loss(curve.lr, switch, curve.steps, r[curve.steps])
            out.curves[(curve.run, key)] = (curve, predicted)
            rows.append(_row(shift, key, curve, predicted, schedule[key], base_d0))
    out.table = pd.DataFrame(rows)
    for run in outside:
        try:
            L.run_curve(run, frame, paper.D0, store)
        except ValueError:
            continue  # not trained
        out.outside[f"{run.experiment}/{run.name}"] = MR.OUTSIDE_THE_LAWS[run.labels["recipe"]]
    return out


def _row(shift: str, key: str, curve: L.Curve, predicted: np.ndarray, schedule: L.ScheduleLaw,
         base_d0: float) -> dict[str, object]:
    """One row of the held-out table (see ``validate_shift``)."""
    measured = float(curve.loss[-1])
    old = float(schedule.loss(curve.lr, curve.steps[-1:])[0])
    row = {"shift": shift, "run": curve.run, "set": f"{key} ({curve.loss_set})", "measured": measured,
           "predicted": float(predicted[-1]), "error %": 100 * (predicted[-1] - measured) / measured,
           "mean error %": 100 * float(np.mean(np.abs(predicted - curve.loss) / curve.loss)),
           "schedule law": old, "schedule law error %": 100 * (old - measured) / measured}
    if key == "D1":
        row["target"] = f"|error| <= {100 * D1_TOLERANCE:g}%"
        row["met"] = bool(abs(row["error %"]) <= 100 * D1_TOLERANCE)
    else:
        forgetting = measured - base_d0
        tolerance = max(D0_TOLERANCE[0], D0_TOLERANCE[1] * abs(forgetting))
        row.update({"forgetting": forgetting, "predicted forgetting": float(predicted[-1]) - base_d0,
                    "target": f"|forgetting error| <= {tolerance:.3f}",
                    "met": bool(abs(predicted[-1] - measured) <= tolerance)})
    return row


def judge(table: pd.DataFrame) -> pd.DataFrame:
    """Per shift and set: held-out runs, how many met the target, and whether >= ``TARGET_SHARE`` did."""
    if table.empty:
        return pd.DataFrame(columns=["runs", "met", "share", "target met"])
    grouped = table.groupby(["shift", "set"])["met"]
    out = pd.DataFrame({"runs": grouped.size(), "met": grouped.sum().astype(int)})
    out["share"] = out["met"] / out["runs"]
    out["target met"] = out["share"] >= TARGET_SHARE
    return out


def params_table(laws: dict[str, dict[str, C.CptLaw]]) -> pd.DataFrame:
    """One row per shift and set: the fitted parameters, lambda and the rmse of the fit."""
    rows = {(shift, f"{key} ({law.loss_set})"): {**law.params, "lambda": law.lam, "rmse": law.rmse,
                                                 "points": law.n_points}
            for shift, pair in laws.items() for key, law in pair.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.names = ["shift", "set"]
    return table


def validate_frame(frame: pd.DataFrame, scale: str | Scale = "tiny", device: str = "auto",
                   store: RunStore | None = None, open_model: bool = False) -> dict[str, ShiftValidation]:
    """``validate_shift`` for each shift whose fit runs are in ``frame`` (others left out)."""
    out = {}
    for shift in paper.SHIFTS:
        fit, held = shift_runs(shift, scale, device)
        try:
            out[shift] = validate_shift(shift, fit, held, frame, store, open_model,
                                        outside_runs(shift, scale, device))
        except ValueError:
            continue
    return out


# -- the study of a scale (notebook 09_predict, REPORT.md) --------------------------------------------

@dataclass
class Study:
    """The law validated per shift (with the base model's history and as an open model without it), the
    planner's verdicts, and the tables that REPORT.md and notebook 09_predict show."""

    validations: dict[str, ShiftValidation]
    open_validations: dict[str, ShiftValidation]
    verdicts: pd.DataFrame

    def held_out(self) -> pd.DataFrame:
        parts = [v.table for v in self.validations.values() if not v.table.empty]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def params(self) -> pd.DataFrame:
        return params_table({shift: v.laws for shift, v in self.validations.items()})

    def open_models(self) -> pd.DataFrame:
        """Per shift and set: S1pt fitted without the base's history against the history's, and the
        held-out errors of both fits."""
        rows = {}
        for shift, v in self.open_validations.items():
            full = self.validations.get(shift)
            if full is None or v.table.empty or full.table.empty:
                continue
            for key, law in v.laws.items():
                known = full.laws[key]
                lr, switch = _any_history(full, key)
                mine, theirs = v.table[v.table["set"].str.startswith(key)], full.table
                theirs = theirs[theirs["set"].str.startswith(key)]
                rows[(shift, f"{key} ({law.loss_set})")] = {
                    "S1pt fitted": law.params["S1pt"],
                    "S1pt of the history": float(lr[:switch].sum() / known.lr_ref),
                    "|error| % open": float(mine["error %"].abs().mean()),
                    "|error| % with history": float(theirs["error %"].abs().mean()),
                    "met open": f"{int(mine['met'].sum())}/{len(mine)}",
                    "met with history": f"{int(theirs['met'].sum())}/{len(theirs)}"}
        table = pd.DataFrame.from_dict(rows, orient="index")
        if len(table):
            table.index.names = ["shift", "set"]
        return table


def _any_history(v: ShiftValidation, key: str) -> tuple[np.ndarray, int]:
    """The LR history and switch of a held-out run that starts where the base model ends (the one that
    starts earliest: a tail starts at its trunk's end)."""
    curve = min((c for (_, k), (c, _) in v.curves.items() if k == key), key=lambda c: c.start)
    return curve.lr, curve.start


def sweep_objective(shift: str, frame: pd.DataFrame, scale: str | Scale = "tiny", device: str = "auto",
                    w0: float = 1.0, w1: float = 1.0, store: RunStore | None = None) -> pd.Series:
    """Measured w0 D0 + w1 D1 at the last evaluation of each replay fraction of ``shift``'s sweep (seed 0)
    found in ``frame``."""
    out = {}
    for run in E.replay_sweep(shift, scale, (0,), device):
        if run.labels.get("role") != "continual":
            continue
        try:
            d0, d1 = (L.run_curve(run, frame, name, store).loss[-1] for name in (paper.D0, run.labels["d1"]))
        except (ValueError, IndexError):
            continue
        out[C.replay_of(run)] = w0 * d0 + w1 * d1
    return pd.Series(out, dtype=float).sort_index()


def study(frame: pd.DataFrame, scale: str | Scale = "tiny", device: str = "auto",
          store: RunStore | None = None, w0: float = 1.0, w1: float = 1.0) -> Study:
    """Validate the law on every shift in ``frame`` (with and without the base's history) and judge the
    planner's replay fraction against the replay sweep for weights ``w0``, ``w1``."""
    full = validate_frame(frame, scale, device, store)
    opened = validate_frame(frame, scale, device, store, open_model=True)
    rows = {}
    for shift, v in full.items():
        sweep = sweep_objective(shift, frame, scale, device, w0, w1, store)
        if len(sweep) >= 2:
            base = C.fit_runs(shift, scale, device)[0].needs[0]
            rows[shift] = planner_verdict(v.laws, base, sweep, scale, w0, w1, store)
    verdicts = pd.DataFrame.from_dict(rows, orient="index")
    verdicts.index.name = "shift"
    return Study(full, opened, verdicts)
