"""The planner of a shift's continual-pre-training law (``cpt_law``): the replay fraction and peak LR that
minimise a weighted sum of the final D0 and D1 losses, the cheapest replay that bounds D0's rise, the
judged row of REPORT.md (is the planner's fraction within one step of the replay sweep's best?), and the
laws and predicted curves the run launcher shows before Train."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cptlab import schedules as sched
from cptlab.analysis import laws as L
from cptlab.analysis.cpt_law import CptLaw, continual_history, fit_runs, fit_shift
from cptlab.analysis.runs import load_runs
from cptlab.study import experiments as E
from cptlab.study.scales import Scale, get_scale
from cptlab.training.store import RunStore

REPLAY_GRID = tuple(round(0.01 * k, 2) for k in range(0, 91))
LR_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # of the scale's max LR, tried by the planner


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


# -- the laws of the run launcher -----------------------------------------------------------------------

def predict_run(laws: dict[str, CptLaw], run: E.Run,
                store: RunStore | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """"D0" / "D1" -> (tokens, predicted loss) after every step of the continual ``run``'s own stage."""
    lr = L.lr_history(run, store)
    switch, r = continual_history(run, store)
    steps = np.arange(len(lr) - sum(L.stage_steps(run.config)) + 1, len(lr) + 1)
    t = run.config.train
    return {key: (steps * t.batch_size * t.seq_len, law.loss(lr, switch, steps, r[steps]))
            for key, law in laws.items()}


def launcher_laws(shift: str, store: RunStore, scale: str | Scale,
                  device: str = "auto") -> tuple[dict[str, CptLaw], str]:
    """The laws of ``shift`` fitted on the store's ``FIT_RUNS`` of ``scale`` and their base model, with a
    note naming them; ({}, why) when the store lacks one of them finished."""
    fit = fit_runs(shift, scale, device)
    needed = [*fit, fit[0].needs[0]]
    missing = [f"{r.experiment}/{r.name}" for r in needed if not store.is_done(r.experiment, r.run_id)]
    if missing:
        return {}, f"the continual-pre-training law needs the finished runs {', '.join(missing)}"
    laws = fit_shift(shift, fit, load_runs(needed, store), store)
    return laws, f"continual-pre-training law fitted on {', '.join(f'{r.experiment}/{r.name}' for r in fit)}"
