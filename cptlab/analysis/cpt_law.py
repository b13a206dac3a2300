"""The continual-pre-training law: predict D0's forgetting and D1's learning across a change of data.

Law (Wang, Tissue et al., "Learning Dynamics in Continual Pre-Training for Large Language Models", ICML
2025, arXiv 2505.07796, its Eq. 4), per validation set, after s optimizer steps of a run's whole history:

    L(s) = L0 + A (S1pt + S1cpt) ** -alpha - C1 S2pt - C2 S2cpt + B(r) (1 - (1 + E S1cpt) ** -beta)

S1 and S2 are the schedule law's forward and annealing areas (``laws.schedule_areas``, LR in units of
``lr_ref``), split at the switch of data: ``pt`` sums the steps before it (the base model's history),
``cpt`` those after it. The annealing momentum crosses the switch: a decay at the end of pretraining
still lowers the loss after it, in S2cpt. The shift term is B > 0 on the old data's set (forgetting)
and B < 0 on the new data's (learning); at s <= switch it is zero and the law is the schedule law with
C = C1.

Replay (our reading of the paper's Eq. 8, which models the replay ratio with exponential terms after
the Data Mixing Law, Ye et al. 2024): B(r) = B exp(-kappa r), r the fraction of the stage's compute that
replays D0. Replay lowers both the forgetting of D0 and the learning of D1 by the same factor; the
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

Validation (``validate_shift``), the planner (``plan``, ``cheapest_replay``) and the judged row
(``planner_verdict``) follow; the schedule law is ``cptlab.analysis.laws``'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from cptlab import schedules as sched
from cptlab.analysis import laws as L
from cptlab.analysis.runs import load_runs
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
D1_TOLERANCE = 0.01  # relative error of the final D1 loss
D0_TOLERANCE = (0.02, 0.15)  # nats, or this share of the measured forgetting, whichever is larger
TARGET_SHARE = 0.8  # of the held-out runs
REPLAY_GRID = tuple(round(0.01 * k, 2) for k in range(0, 91))
LR_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # of the scale's max LR, tried by the planner


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
    histories: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, float]] = field(default_factory=list)

    def add(self, name: str, lr: np.ndarray, switch: int, steps: np.ndarray, loss: np.ndarray,
            replay: float) -> None:
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


def points_of(runs: Sequence[E.Run], frame: pd.DataFrame, loss_set: str, store: RunStore | None = None,
              open_model: bool = False) -> Points:
    """The evaluations of ``loss_set`` of the continual ``runs`` in ``frame`` and, unless ``open_model``,
    of their base models' histories (each once)."""
    points, bases = Points(), set()
    for run in runs:
        curve = L.run_curve(run, frame, loss_set, store)
        points.add(curve.run, curve.lr, curve.start, curve.steps, curve.loss, replay_of(run))
        base = run.needs[0] if run.needs else None
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
        parts.append([a[steps] for a in areas] + [np.full(len(steps), r)])
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


# -- validation at a scale ---------------------------------------------------------------------------

def shift_runs(shift: str, scale: str | Scale = "tiny",
               device: str = "auto") -> tuple[list[E.Run], list[E.Run]]:
    """(fit, held out): the continual runs of ``shift`` from the seed-0 base model that the reproduction
    trains (the replay sweep, the max-LR and warmup ablations), split into ``FIT_RUNS`` and the others."""
    s = get_scale(scale)
    runs = [*E.replay_sweep(shift, s, (0,), device), *E.max_lr_ablation(shift, s, device),
            *(E.warmup_ablation(shift, s, device) if shift == "weak" else [])]
    unique = {r.run_id: r for r in runs if r.labels.get("role") == "continual"}
    names = {f.format(shift=shift) for f in FIT_RUNS}
    return ([r for r in unique.values() if r.name in names],
            [r for r in unique.values() if r.name not in names])


def fit_shift(shift: str, fit: Sequence[E.Run], frame: pd.DataFrame, store: RunStore | None = None,
              open_model: bool = False) -> dict[str, CptLaw]:
    """The law of D0 and of D1 ("D0" / "D1" -> law) fitted on the continual runs ``fit`` of ``shift``
    found in ``frame`` (with their base model, unless ``open_model``)."""
    sets = {"D0": paper.D0, "D1": paper.SHIFTS[shift]}
    return {key: fit_cpt_law(points_of(fit, frame, name, store, open_model), name, open_model)
            for key, name in sets.items()}


@dataclass
class ShiftValidation:
    """A shift's laws (CPT and, for comparison, the schedule law fitted on the same runs), the runs fitted
    and ``table``: one row per held-out run and eval set."""

    shift: str
    laws: dict[str, CptLaw]
    schedule_laws: dict[str, L.ScheduleLaw]
    fit: list[str]
    table: pd.DataFrame
    curves: dict[tuple[str, str], tuple[L.Curve, np.ndarray]] = field(default_factory=dict)


def validate_shift(shift: str, fit: Sequence[E.Run], held_out: Sequence[E.Run], frame: pd.DataFrame,
                   store: RunStore | None = None, open_model: bool = False) -> ShiftValidation:
    """Fit on ``fit``, predict every run of ``held_out`` found in ``frame``: per run and set, the final
    loss measured and predicted by both laws, the errors, and for D0 the forgetting and its target."""
    laws = fit_shift(shift, fit, frame, store, open_model)
    schedule = {key: L.fit_schedule_law([L.run_curve(r, frame, law.loss_set, store) for r in fit])
                for key, law in laws.items()}
    out = ShiftValidation(shift, laws, schedule, [f"{r.experiment}/{r.name}" for r in fit], pd.DataFrame())
    rows = []
    for run in held_out:
        try:
            base_d0 = L.run_curve(run.needs[0], frame, paper.D0, store).loss[-1]
            curves = {key: L.run_curve(run, frame, law.loss_set, store) for key, law in laws.items()}
        except ValueError:
            continue  # not in the frame: not trained
        for key, curve in curves.items():
            if not len(curve.steps):
                continue
            predicted = laws[key].loss(curve.lr, curve.start, curve.steps, replay_of(run))
            out.curves[(curve.run, key)] = (curve, predicted)
            rows.append(_row(shift, key, curve, predicted, schedule[key], base_d0))
    out.table = pd.DataFrame(rows)
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


def params_table(laws: dict[str, dict[str, CptLaw]]) -> pd.DataFrame:
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
            out[shift] = validate_shift(shift, fit, held, frame, store, open_model)
        except ValueError:
            continue
    return out


# -- the planner -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """The planner's choice: replay fraction, peak LR, and the final D0 / D1 losses the laws predict."""

    replay: float
    max_lr: float
    d0: float
    d1: float
    base_d0: float  # the D0 law's loss at the switch (the base model's)
    objective: float

    @property
    def d0_rise(self) -> float:
        return self.d0 - self.base_d0


def stage_history(base: E.Run, scale: str | Scale, max_lr: float, tokens: int | None = None,
                  store: RunStore | None = None, schedule: dict | None = None) -> tuple[np.ndarray, int]:
    """(LR history, switch): ``base``'s history followed by a continual stage of ``tokens`` (default the
    scale's B1) with the scale's warmup + cosine at ``max_lr`` (or ``schedule``)."""
    s = get_scale(scale)
    pt = L.lr_history(base, store)
    steps = (tokens or s.new_tokens) // (s.batch_size * s.seq_len)
    spec = schedule or E.lr_schedule(s, max_lr=max_lr)
    return np.concatenate([pt, sched.lr_values([(spec, steps)])]), len(pt)


def plan(laws: dict[str, CptLaw], base: E.Run, scale: str | Scale, w0: float = 1.0, w1: float = 1.0,
         tokens: int | None = None, fractions: Sequence[float] = REPLAY_GRID,
         lr_factors: Sequence[float] = LR_FACTORS, store: RunStore | None = None) -> Plan:
    """The replay fraction (of ``fractions``) and peak LR (``lr_factors`` x the scale's) whose final
    w0 L_D0 + w1 L_D1, as ``laws`` predict, is least, for a stage of ``tokens`` from ``base``."""
    if w0 < 0 or w1 < 0 or w0 + w1 <= 0:
        raise ValueError(f"weights: w0 and w1 must be >= 0 and not both 0, got {w0}, {w1}")
    s, best = get_scale(scale), None
    r = np.asarray(fractions, dtype=float)
    for factor in lr_factors:
        lr, switch = stage_history(base, s, s.max_lr * factor, tokens, store)
        end = np.full(len(r), len(lr))
        d0, d1 = laws["D0"].loss(lr, switch, end, r), laws["D1"].loss(lr, switch, end, r)
        i = int(np.argmin(w0 * d0 + w1 * d1))
        if best is None or w0 * d0[i] + w1 * d1[i] < best.objective:
            base_d0 = float(laws["D0"].loss(lr, switch, [switch])[0])
            best = Plan(float(r[i]), s.max_lr * factor, float(d0[i]), float(d1[i]), base_d0,
                        float(w0 * d0[i] + w1 * d1[i]))
    return best


def cheapest_replay(laws: dict[str, CptLaw], base: E.Run, scale: str | Scale, bound: float,
                    max_lr: float | None = None, tokens: int | None = None,
                    fractions: Sequence[float] = REPLAY_GRID, store: RunStore | None = None) -> Plan | None:
    """The smallest replay fraction whose predicted final D0 rises at most ``bound`` nats over the base
    model's, at ``max_lr`` (default the scale's); None if none of ``fractions`` keeps it."""
    if not bound >= 0:
        raise ValueError(f"bound: must be >= 0 nats, got {bound}")
    s = get_scale(scale)
    for r in sorted(fractions):
        p = plan(laws, base, s, 1.0, 0.0, tokens, [r], [(max_lr or s.max_lr) / s.max_lr], store)
        if p.d0_rise <= bound:
            return Plan(p.replay, p.max_lr, p.d0, p.d1, p.base_d0, p.d0)
    return None


def planner_verdict(laws: dict[str, CptLaw], base: E.Run, sweep: pd.Series, scale: str | Scale,
                    w0: float = 1.0, w1: float = 1.0, store: RunStore | None = None) -> dict[str, object]:
    """Is the planner's replay fraction (at the scale's max LR, as the sweep, and within the sweep's range
    of fractions) within one step of the sweep's measured best? ``sweep``: measured w0 D0 + w1 D1 per
    replay fraction (index)."""
    fractions = sorted(float(f) for f in sweep.index)
    best = float(sweep.idxmin())
    grid = [r for r in REPLAY_GRID if fractions[0] <= r <= fractions[-1]]
    chosen = plan(laws, base, scale, w0, w1, fractions=grid, lr_factors=(1.0,), store=store).replay
    i = fractions.index(best)
    low, high = fractions[max(i - 1, 0)], fractions[min(i + 1, len(fractions) - 1)]
    return {"weights": f"w0 {w0:g}, w1 {w1:g}", "measured best": best, "planner": chosen,
            "one step": f"{low:g} .. {high:g}", "within": bool(low <= chosen <= high)}


# -- laws for the run launcher -----------------------------------------------------------------------

def predict_run(laws: dict[str, CptLaw], run: E.Run,
                store: RunStore | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """"D0" / "D1" -> (tokens, predicted loss) after every step of the continual ``run``'s own stage."""
    lr = L.lr_history(run, store)
    switch = len(lr) - sum(L.stage_steps(run.config))
    steps = np.arange(switch + 1, len(lr) + 1)
    t = run.config.train
    return {key: (steps * t.batch_size * t.seq_len, law.loss(lr, switch, steps, replay_of(run)))
            for key, law in laws.items()}


def launcher_laws(shift: str, store: RunStore, scale: str | Scale,
                  device: str = "auto") -> tuple[dict[str, CptLaw], str]:
    """The laws of ``shift`` fitted on the store's ``FIT_RUNS`` of ``scale`` and their base model, with a
    note naming them; ({}, why) when the store lacks one of them finished."""
    fit, _ = shift_runs(shift, scale, device)
    needed = [*fit, fit[0].needs[0]]
    missing = [f"{r.experiment}/{r.name}" for r in needed if not store.is_done(r.experiment, r.run_id)]
    if missing:
        return {}, f"the continual-pre-training law needs the finished runs {', '.join(missing)}"
    laws = fit_shift(shift, fit, load_runs(needed, store), store)
    return laws, f"continual-pre-training law fitted on {', '.join(f'{r.experiment}/{r.name}' for r in fit)}"


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
    """The LR history and switch of one of ``v``'s held-out runs (they share the base model's)."""
    curve, _ = next(c for (_, k), c in v.curves.items() if k == key)
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
        out[replay_of(run)] = w0 * d0 + w1 * d1
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
            base = shift_runs(shift, scale, device)[0][0].needs[0]
            rows[shift] = planner_verdict(v.laws, base, sweep, scale, w0, w1, store)
    verdicts = pd.DataFrame.from_dict(rows, orient="index")
    verdicts.index.name = "shift"
    return Study(full, opened, verdicts)
