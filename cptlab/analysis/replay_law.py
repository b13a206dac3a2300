"""The replay law: the final losses of a replay sweep against the replay fraction, to answer "what replay
fraction keeps D0 within +x nats of the base model, and what does it cost on D1?" before training it.

Replay law (``fit_replay_law``): the final D0 and D1 losses of a replay sweep against the replay fraction
r, D0(r) = a + b ln(r + c) (D0 loss falls with the log of the D0 tokens the stage replays, plus c: what it
keeps without replay) and D1(r) = d + e ln(1 / (1 - r)) (D1 loss grows with the log of the D1 tokens
replay takes away); the smallest fraction whose forgetting stays under a tolerance, and its D1 cost
(``ReplayLaw.smallest_fraction``); each fraction predicted by the law fitted without it (``replay_loo``).
In the spirit of the critical mixture ratio of arXiv 2407.17467 and the replay term of Wang et al.
(arXiv 2505.07796), in a form of our own with as few parameters as a six-point sweep allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cptlab.study import paper

REPLAY_TOLERANCE = 0.1  # nats of D0 forgetting the report asks the replay law about
REPLAY_OFFSETS = tuple(float(c) for c in np.geomspace(1e-4, 10.0, 201))  # c of D0(r) = a + b ln(r + c)


@dataclass(frozen=True)
class ReplayLaw:
    """Final losses of a replay sweep against the replay fraction r: D0(r) = a + b ln(r + c) and
    D1(r) = d + e ln(1 / (1 - r)); ``base_d0``: the base model's D0 loss (forgetting = D0 - base_d0)."""

    shift: str
    fractions: tuple[float, ...]
    d0_params: tuple[float, float, float]
    d1_params: tuple[float, float]
    base_d0: float

    def d0(self, r: float | np.ndarray) -> float | np.ndarray:
        a, b, c = self.d0_params
        return a + b * np.log(np.asarray(r) + c)

    def d1(self, r: float | np.ndarray) -> float | np.ndarray:
        d, e = self.d1_params
        return d - e * np.log(1 - np.asarray(r))

    def forgetting(self, r: float | np.ndarray) -> float | np.ndarray:
        return self.d0(r) - self.base_d0

    def smallest_fraction(self, tolerance: float) -> float | None:
        """The smallest replay fraction whose forgetting is at most ``tolerance`` nats; None when it lies
        beyond the largest fraction of the sweep (the law is not extrapolated)."""
        if not tolerance >= 0:
            raise ValueError(f"tolerance: must be >= 0 nats, got {tolerance}")
        if self.forgetting(0.0) <= tolerance:
            return 0.0
        a, b, c = self.d0_params
        if b >= 0:
            return None  # in this fit replay does not lower D0
        r = math.exp((self.base_d0 + tolerance - a) / b) - c
        return r if 0 <= r <= max(self.fractions) else None

    def answer(self, tolerance: float) -> str:
        """The smallest fraction for ``tolerance``, its D1 cost, in words."""
        r = self.smallest_fraction(tolerance)
        top = max(self.fractions)
        if r is None:
            return (f"{self.shift}: forgetting stays above +{tolerance:g} nats up to {_percent(top)} "
                    f"replay (+{float(self.forgetting(top)):.3f} there); the law is not extrapolated beyond "
                    "the sweep")
        cost = float(self.d1(r) - self.d1(0.0))
        return (f"{self.shift}: {_percent(round(r, 4))} replay keeps D0 within +{tolerance:g} nats of the "
                f"base model ({self.base_d0:.3f}); D1 costs +{cost:.3f} nats over no replay")


def sweep_finals(finals: pd.DataFrame, shift: str) -> pd.DataFrame:
    """Per replay fraction of ``shift``'s continual runs: mean D0 and D1 over seeds, and base_D0."""
    if finals.empty or not {"role", "shift", "replay", "D0", "D1", "base_D0"} <= set(finals.columns):
        return pd.DataFrame(columns=["D0", "D1", "base_D0"])
    rows = finals[(finals["role"] == "continual") & (finals["shift"] == shift)]
    return rows.groupby("replay")[["D0", "D1", "base_D0"]].mean().sort_index()


def fit_replay_law(finals: pd.DataFrame, shift: str, leave_out: float | None = None) -> ReplayLaw:
    """Fit the replay law to the final losses ``finals`` (``metrics.add_forgetting(final_losses(...))`` of
    a replay sweep with its base model) of ``shift``; ``leave_out``: a fraction left out of the fit."""
    sweep = sweep_finals(finals, shift)
    if leave_out is not None:
        sweep = sweep[(sweep.index - leave_out).map(abs) > 1e-9]
    if len(sweep) < 4:
        raise ValueError(f"fractions: the replay law has 3 parameters for D0; fitting needs at least 4 "
                         f"replay fractions of the {shift} shift, got {len(sweep)}")
    if sweep["base_D0"].isna().all():
        raise ValueError(f"runs: the base model's final D0 loss is missing for the {shift} shift")
    r = sweep.index.to_numpy(dtype=float)
    d0 = _fit_log_offset(r, sweep["D0"].to_numpy(float))
    X = np.stack([np.ones_like(r), -np.log(1 - r)], axis=1)
    d1 = np.linalg.lstsq(X, sweep["D1"].to_numpy(float), rcond=None)[0]
    base_d0 = float(sweep["base_D0"].mean())
    return ReplayLaw(shift, tuple(r.tolist()), d0, (float(d1[0]), float(d1[1])), base_d0)


def _fit_log_offset(r: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of y = a + b ln(r + c) by least squares, c over ``REPLAY_OFFSETS``."""
    best = None
    for c in REPLAY_OFFSETS:
        X = np.stack([np.ones_like(r), np.log(r + c)], axis=1)
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        sse = float(np.sum((X @ coef - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, float(coef[0]), float(coef[1]), c)
    return best[1], best[2], best[3]


def replay_loo(finals: pd.DataFrame, shift: str) -> pd.DataFrame:
    """Each replay fraction predicted by the law fitted without it, against its run: D0 and D1 measured,
    predicted and the difference (nats); ``inside`` is False for the smallest and largest fractions, whose
    prediction extrapolates."""
    sweep = sweep_finals(finals, shift)
    rows = {}
    if len(sweep) < 5:  # a fraction left out must leave 4 to fit
        sweep = sweep.iloc[:0]
    for r, measured in sweep.iterrows():
        law = fit_replay_law(finals, shift, leave_out=r)
        rows[_percent(r)] = {"D0": measured["D0"], "D0 predicted": float(law.d0(r)),
                             "D0 error": float(law.d0(r) - measured["D0"]), "D1": measured["D1"],
                             "D1 predicted": float(law.d1(r)), "D1 error": float(law.d1(r) - measured["D1"]),
                             "inside": bool(sweep.index.min() < r < sweep.index.max())}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "left out"
    return table


def replay_laws(finals: pd.DataFrame) -> dict[str, ReplayLaw]:
    """The replay law of each shift that has enough fractions in ``finals`` (others are left out)."""
    laws = {}
    for shift in paper.SHIFTS:
        try:
            laws[shift] = fit_replay_law(finals, shift)
        except ValueError:
            continue
    return laws


def replay_table(laws: dict[str, ReplayLaw], tolerance: float = REPLAY_TOLERANCE) -> pd.DataFrame:
    """Per shift: the fitted parameters, the smallest fraction for ``tolerance`` and its D1 cost."""
    rows = {}
    for shift, law in laws.items():
        r = law.smallest_fraction(tolerance)
        a, b, c = law.d0_params
        d, e = law.d1_params
        rows[shift] = {"a": a, "b": b, "c": c, "d": d, "e": e, "base D0": law.base_d0,
                       "forgetting at 0%": float(law.forgetting(0.0)), f"fraction for +{tolerance:g}": r,
                       "D1 cost": float(law.d1(r) - law.d1(0.0)) if r is not None else math.nan}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "shift"
    return table


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"
