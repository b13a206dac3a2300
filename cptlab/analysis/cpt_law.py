"""The continual-pre-training law: predict D0's forgetting and D1's learning across a change of data.

Law (Wang, Tissue et al., "Learning Dynamics in Continual Pre-Training for Large Language Models", ICML
2025, arXiv 2505.07796, its Eq. 4), per validation set, after s optimizer steps of a run's whole history:

    L(s) = L0 + A (S1pt + S1cpt) ** -alpha - C1 S2pt - C2 S2cpt + B(r) (1 - (1 + E S1cpt) ** -beta)

S1 and S2 are the schedule law's forward and annealing areas (``laws.schedule_areas``, LR in units of
``lr_ref``), split at the switch of data: ``pt`` sums the steps before it (the base model's history),
``cpt`` those after it. The annealing momentum crosses the switch: a decay at the end of pretraining
still lowers the loss after it, in S2cpt. The shift term is B > 0 on the old data's set (forgetting)
and B < 0 on the new data's (learning); at s <= switch it is zero and the law is the schedule law with
C = C1. A run's switch is the end of its lineage's first run (the base model it continues, through any
runs between, e.g. a tail from a trunk: ``continual_history``).

Replay (our reading of the paper's Eq. 8, which models the replay ratio with exponential terms after
the Data Mixing Law, Ye et al. 2024): B(r) = B exp(-kappa r), r the fraction of the compute since the
switch that replayed D0 (its mean over the steps so far, so a tail that changes the replay moves r
gradually). Replay lowers both the forgetting of D0 and the learning of D1 by the same factor; the
other parameters are shared by every replay fraction. Assumed, since the text we could read does not
fix which terms carry r.

Fit (``fit_cpt_law``): the paper's Huber loss (delta 1e-3) on the log of the loss, minimised with
L-BFGS-B (scipy) from several starting points, for each lambda of ``LAMBDAS`` when the runs' continual
stages are shorter than ``LONG_STAGE`` steps (a tiny stage has ~500; the paper's 0.999 remembers ~1000
steps), else at the paper's 0.999. Points: the evaluations of the continual runs (their first, which
measures the base model, left out) and of their base model's history.

Open models (``open_model=True``): the base model's history is unknown (a checkpoint from elsewhere).
S1pt becomes a fitted parameter, C1 S2pt merges into L0 (a constant after the switch), only evaluations
after the switch are fitted, and the continual stage's areas start at its own first LR (assumed: no jump
of LR at the switch; the base's anneal momentum is lost).

The held-out validation is ``cpt_validation``'s, the planner ``cpt_plan``'s; the schedule law is
``cptlab.analysis.laws``'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from cptlab.analysis import laws as L
from cptlab.study import experiments as E
from cptlab.study import paper
from cptlab.study.scales import Scale, get_scale
from cptlab.training.store import RunStore

PAPER_LAMBDA = 0.999
LAMBDAS = (0.0, 0.9, 0.95, 0.98, 0.99, 0.995)  # fitted when stages are short (see the docstring)
LONG_STAGE = 10_000  # continual steps from which the paper's lambda is used as is
HUBER_DELTA = 1e-3
N_STARTS = 4  # L-BFGS-B starting points per lambda
NAMES = ("L0", "A", "alpha", "C1", "C2", "B", "E", "beta", "kappa")
FIT_RUNS = ("{shift}-replay0", "{shift}-rewarm-constant", "{shift}-replay0.25")  # the three fitted


# -- areas split at the switch -----------------------------------------------------------------------

def split_areas(lr: np.ndarray, switch: int, lam: float, lr_ref: float,
                open_model: bool = False) -> tuple[np.ndarray, ...]:
    """(S1pt, S2pt, S1cpt, S2cpt) after s = 0 .. len(lr) steps of the LR history ``lr`` whose data
    changes after step ``switch``. ``open_model``: the history before the switch is unknown; S1pt and
    S2pt are zero and the continual stage's areas start at its own first LR."""
    if open_model:
        cpt = np.asarray(lr[switch:], dtype=float)
        s1, s2 = L.schedule_areas(np.concatenate([cpt[:1], cpt]), lam, lr_ref)
        s1c, s2c = s1[1:] - s1[1], s2[1:] - s2[1]
        zeros = np.zeros(switch + len(cpt) + 1)
        return zeros, zeros, np.concatenate([zeros[:switch], s1c]), np.concatenate([zeros[:switch], s2c])
    s1, s2 = L.schedule_areas(lr, lam, lr_ref)
    before = np.arange(len(s1)) <= switch
    s1pt, s2pt = np.where(before, s1, s1[switch]), np.where(before, s2, s2[switch])
    return s1pt, s2pt, s1 - s1pt, s2 - s2pt


# -- the law -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CptLaw:
    """The law on eval set ``loss_set`` with parameters ``params`` (``NAMES``, plus ``S1pt`` for an open
    model), fitted on ``runs``."""

    params: dict[str, float]
    lam: float
    lr_ref: float
    loss_set: str
    runs: tuple[str, ...]
    open_model: bool = False
    n_points: int = 0
    rmse: float = 0.0

    def loss(self, lr: np.ndarray, switch: int, steps: Sequence[int] | np.ndarray,
             replay: float | np.ndarray = 0.0) -> np.ndarray:
        """The predicted loss after each of ``steps`` of the LR history ``lr`` whose data changed after
        step ``switch`` to a stage with ``replay`` (fraction, or one per step)."""
        areas = split_areas(lr, switch, self.lam, self.lr_ref, self.open_model)
        at = np.asarray(steps, dtype=int)
        return _law([self.params[n] for n in _names(self.open_model)],
                    *(a[at] for a in areas), np.broadcast_to(replay, at.shape), self.open_model)

    def formula(self) -> str:
        p = self.params
        s1pt = f"{p['S1pt']:.4g} (fitted)" if self.open_model else "S1pt"
        return (f"L = {p['L0']:.3f} + {p['A']:.4g} ({s1pt} + S1cpt)^-{p['alpha']:.3f} - {p['C1']:.4g} S2pt "
                f"- {p['C2']:.4g} S2cpt + {p['B']:+.4f} exp(-{p['kappa']:.3g} r) (1 - (1 + {p['E']:.4g} "
                f"S1cpt)^-{p['beta']:.3f}) (lambda {self.lam:g}, LR in units of {self.lr_ref:.3g})")


def _names(open_model: bool) -> tuple[str, ...]:
    return (*NAMES, "S1pt") if open_model else NAMES


def _law(theta: Sequence[float], s1pt, s2pt, s1cpt, s2cpt, r, open_model: bool) -> np.ndarray:
    L0, A, alpha, C1, C2, B, Ec, beta, kappa = theta[:9]
    if open_model:
        s1pt = theta[9]
    forward = np.maximum(s1pt + s1cpt, 1e-9)
    shift = B * np.exp(-kappa * r) * (1 - (1 + Ec * s1cpt) ** -beta)
    return L0 + A * forward ** -alpha - C1 * s2pt - C2 * s2cpt + shift


# -- the points a law is fitted on -------------------------------------------------------------------

@dataclass
class Points:
    """Evaluations of one eval set: loss after ``steps`` of each run's history, the switch of data and
    the replay fraction of each point's run (flattened over runs)."""

    run: list[str] = field(default_factory=list)
    histories: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, float | np.ndarray]] = field(
        default_factory=list)

    def add(self, name: str, lr: np.ndarray, switch: int, steps: np.ndarray, loss: np.ndarray,
            replay: float | np.ndarray) -> None:
        if len(steps):
            self.run.append(name)
            self.histories.append((lr, switch, np.asarray(steps, int), np.asarray(loss, float), replay))

    @property
    def n(self) -> int:
        return sum(len(h[2]) for h in self.histories)


def replay_of(run: E.Run) -> float:
    """The replay fraction of ``run``'s last stage (0 without replay)."""
    replay = run.config.stages[-1].replay
    return float(replay.fraction) if replay is not None else 0.0


def lineage_root(run: E.Run) -> E.Run:
    """The first run of ``run``'s lineage (following ``needs``): the base model a continual run continues."""
    while run.needs:
        run = run.needs[0]
    return run


def continual_history(run: E.Run, store: RunStore | None = None) -> tuple[int, np.ndarray]:
    """(switch, r): the steps of ``run``'s history that its lineage's first run trained (before the data
    changed), and after each of the history's 0 .. n steps the mean replay fraction since the switch."""
    switch = len(L.lr_history(lineage_root(run), store))
    after = L.replay_history(run, store)[switch:]
    mean = np.cumsum(after) / np.arange(1, len(after) + 1)
    return switch, np.concatenate([np.zeros(switch + 1), mean])


def points_of(runs: Sequence[E.Run], frame: pd.DataFrame, loss_set: str, store: RunStore | None = None,
              open_model: bool = False) -> Points:
    """The evaluations of ``loss_set`` of the continual ``runs`` in ``frame`` and, unless ``open_model``,
    of their base models' histories (each once)."""
    points, bases = Points(), set()
    for run in runs:
        curve = L.run_curve(run, frame, loss_set, store)
        switch, r = continual_history(run, store)
        points.add(curve.run, curve.lr, switch, curve.steps, curve.loss, r[curve.steps])
        base = lineage_root(run) if run.needs else None
        if open_model or base is None or base.run_id in bases:
            continue
        bases.add(base.run_id)
        b = L.run_curve(base, frame, loss_set, store)
        points.add(b.run, b.lr, len(b.lr), b.steps, b.loss, 0.0)
    return points


# -- fit ---------------------------------------------------------------------------------------------

def fit_cpt_law(points: Points, loss_set: str, open_model: bool = False,
                lambdas: Sequence[float] | None = None) -> CptLaw:
    """The law fitted to ``points`` (Huber on log-loss, L-BFGS-B from ``N_STARTS`` points per lambda)."""
    n_params = len(_names(open_model))
    if points.n < n_params + 1:
        raise ValueError(f"runs: the law has {n_params} parameters; fitting needs at least {n_params + 1} "
                         f"evaluations of {loss_set}, got {points.n}")
    lr_ref = max(float(h[0][h[1] if open_model else 0:].max()) for h in points.histories)
    y = np.concatenate([h[3] for h in points.histories])
    if lambdas is None:
        longest = max(len(h[0]) - h[1] for h in points.histories)
        lambdas = (PAPER_LAMBDA,) if longest >= LONG_STAGE else LAMBDAS
    with threadpool_limits(1, user_api="blas"):  # L-BFGS-B's tiny BLAS calls: threads only cost (10x)
        # lambda chosen from one start each, then its fit refined from N_STARTS starting points
        tried = {lam: _minimise(_columns(points, lam, lr_ref, open_model), y, open_model, 1)
                 for lam in lambdas}
        lam = min(tried, key=lambda k: tried[k][0])
        refined = _minimise(_columns(points, lam, lr_ref, open_model), y, open_model, N_STARTS)
        _, theta = min(tried[lam], refined, key=lambda fit: fit[0])
    law = CptLaw(dict(zip(_names(open_model), map(float, theta))), lam, lr_ref, loss_set, tuple(points.run),
                 open_model, points.n)
    predicted = np.concatenate([law.loss(lr, sw, st, r) for lr, sw, st, _, r in points.histories])
    return CptLaw(**{**law.__dict__, "rmse": float(np.sqrt(np.mean((predicted - y) ** 2)))})


def _columns(points: Points, lam: float, lr_ref: float, open_model: bool) -> list[np.ndarray]:
    """(S1pt, S2pt, S1cpt, S2cpt, r) at every point, flattened over runs."""
    parts = []
    for lr, switch, steps, _, r in points.histories:
        areas = split_areas(lr, switch, lam, lr_ref, open_model)
        parts.append([a[steps] for a in areas] + [np.broadcast_to(np.asarray(r, float), steps.shape)])
    return [np.concatenate(col) for col in zip(*parts)]


def _minimise(cols: list[np.ndarray], y: np.ndarray, open_model: bool,
              starts: int) -> tuple[float, np.ndarray]:
    """The least Huber loss on log-loss over ``starts`` L-BFGS-B runs, and its parameters. L-BFGS-B
    works on x: ln A, ln E and ln S1pt, and C1, C2 in units of the largest |S2| (scales near 1)."""
    s1cpt = cols[2]
    units = np.ones(len(_names(open_model)))
    units[[3, 4]] = 1.0 / max(float(np.abs(np.concatenate(cols[1:4:2])).max()), 1e-9)
    units[6] = 1.0 / max(float(s1cpt.max()), 1e-9)
    logs = [1, 6, 9] if open_model else [1, 6]
    is_log = np.isin(np.arange(len(units)), logs)

    def unpack(x: np.ndarray) -> np.ndarray:
        theta = x * units
        theta[logs] = np.exp(x[logs]) * units[logs]
        return theta

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        theta = unpack(x)
        pred, grad = _law_and_gradient(theta, *cols, open_model)
        d = np.log(np.maximum(pred, 1e-6)) - np.log(y)
        a = np.abs(d)
        huber = np.where(a <= HUBER_DELTA, 0.5 * d ** 2, HUBER_DELTA * (a - 0.5 * HUBER_DELTA))
        slope = np.clip(d, -HUBER_DELTA, HUBER_DELTA) / np.maximum(pred, 1e-6)
        dtheta = grad @ slope
        scale = HUBER_DELTA * len(y)  # values near 1 for L-BFGS-B's tolerances
        return float(huber.sum()) / scale, dtheta * np.where(is_log, theta, units) / scale

    floor = 0.999 * float(y.min())
    bounds = [(0.0, floor), (-10, 10), (0.01, 3.0), (0, 20), (0, 20), (-5, 5), (-6, 6), (0.05, 5.0), (0, 30)]
    bounds += [(0.0, 14.0)] if open_model else []  # ln S1pt: 1 .. 1.2M steps at lr_ref
    rng = np.random.default_rng(0)
    best = None
    for k in range(starts):
        x0 = [0.5 * floor, math.log(max(float(y.max()) - 0.5 * floor, 1e-3)), 0.3 + 0.4 * k, 1.0, 1.0,
              0.1 * rng.standard_normal(), rng.uniform(-1, 2), rng.uniform(0.3, 2), rng.uniform(0, 5)]
        x0 += [math.log(max(float(s1cpt.max()), 10.0))] if open_model else []
        res = minimize(objective, np.array(x0), jac=True, method="L-BFGS-B", bounds=bounds)
        if best is None or res.fun < best[0]:
            best = (float(res.fun), res.x)
    return best[0], unpack(best[1])


def _law_and_gradient(theta: np.ndarray, s1pt, s2pt, s1cpt, s2cpt, r,
                      open_model: bool) -> tuple[np.ndarray, np.ndarray]:
    """The law at every point and its derivatives by each parameter (rows, in ``_names`` order)."""
    L0, A, alpha, C1, C2, B, Ec, beta, kappa = theta[:9]
    forward = np.maximum((theta[9] if open_model else s1pt) + s1cpt, 1e-9)
    power = forward ** -alpha
    g = 1 + Ec * s1cpt
    decay, gb = np.exp(-kappa * r), g ** -beta
    pred = L0 + A * power - C1 * s2pt - C2 * s2cpt + B * decay * (1 - gb)
    rows = [np.ones_like(pred), power, -A * power * np.log(forward), -s2pt, -s2cpt, decay * (1 - gb),
            B * decay * beta * gb / g * s1cpt, B * decay * gb * np.log(g), -r * B * decay * (1 - gb)]
    if open_model:
        rows.append(-alpha * A * power / forward)
    return pred, np.array(rows)


def fit_runs(shift: str, scale: str | Scale = "tiny", device: str = "auto") -> list[E.Run]:
    """The continual runs of ``shift`` the law is fitted on (``FIT_RUNS``: 0% replay with cosine and with
    a constant LR, 25% replay), from the seed-0 base model the reproduction trains."""
    s = get_scale(scale)
    names = {f.format(shift=shift) for f in FIT_RUNS}
    runs = [*E.replay_sweep(shift, s, (0,), device), *E.max_lr_ablation(shift, s, device)]
    return list({r.run_id: r for r in runs if r.name in names}.values())


def fit_shift(shift: str, fit: Sequence[E.Run], frame: pd.DataFrame, store: RunStore | None = None,
              open_model: bool = False) -> dict[str, CptLaw]:
    """The law of D0 and of D1 ("D0" / "D1" -> law) fitted on the continual runs ``fit`` of ``shift``
    found in ``frame`` (with their base model, unless ``open_model``)."""
    sets = {"D0": paper.D0, "D1": paper.SHIFTS[shift]}
    return {key: fit_cpt_law(points_of(fit, frame, name, store, open_model), name, open_model)
            for key, name in sets.items()}
