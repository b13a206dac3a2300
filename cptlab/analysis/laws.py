"""The schedule law, fitted to finished runs to predict a loss curve before paying for the run.

Schedule law (Tissue et al., "Scaling Law with Learning Rate Annealing", arXiv 2408.11029). The validation
loss after s optimizer steps is

    L(s) = L0 + A * S1(s) ** -alpha - C * S2(s)
    S1(s) = sum_{i<s} eta_i                                      forward area (under the LR curve)
    S2(s) = sum_{i<s} m_i,   m_i = lam * m_{i-1} + (eta_{i-1} - eta_i)     annealing area

with eta the LR divided by ``lr_ref`` (the largest LR of the fitted runs), so S1 counts steps at that LR.
An LR decrease feeds the momentum m, whose memory ``lam`` makes the loss follow an anneal with a delay;
an increase (re-warming) takes from it, so the loss rises, as the paper discusses for continual
pre-training. The paper leaves warmup out: the first warmup from scratch adds nothing to S2 here (it still
counts in S1). S1 and S2 run over a run's whole history: a continual run's base model comes first
(``lr_history``). The law is in steps: a config's stage of T tokens takes T // (batch x seq_len) steps.

Fit (``fit_schedule_law``): least squares on the evaluation losses (the fixed validation set, logged 8
times per stage at tiny; not the training loss, which samples other batches at every line) of one or more
finished runs, the starting evaluation of a continual run left out. For each ``lam`` of ``LAMBDAS`` and
``alpha`` of ``ALPHAS`` the law is linear in (L0, A, C) and solved with numpy; the pair with the least
squared error wins. The paper's lam = 0.999 suits runs of tens of thousands of steps; a tiny stage has a
few hundred, so lam is fitted as well, on the fitted runs only.

Validation (``validation_plan``, ``validate``): for runs that share their data, fit on two (a cosine and a
constant LR) and predict the others; the error of the last evaluation and the mean error along the curve,
per held-out run. The law has no term for a change of data: a held-out run trained on other data than the
fitted ones (``same data`` is False in the table) shows how far off that takes it.

A model imported with ``cptlab import`` brings a past the lab did not train: its history here holds only
the continual stages. Where its labels record its published schedule (``past``: max / min LR, warmup,
steps and batch; Pythia's), the forward area of that past (``past_area``, in the continual run's steps) is
added to S1 (``past`` "published"); where they do not, that area is fitted as a sixth parameter over
``PAST_AREAS`` (``past`` "fitted"). The past's annealing momentum has long decayed; its constant part of
S2 is absorbed by L0. The law says which it did (``ScheduleLaw.describe``).

The replay law is ``cptlab.analysis.replay_law``'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cptlab import schedules as sched
from cptlab.analysis import results as T
from cptlab.analysis.runs import load_runs
from cptlab.config import RunConfig, RunRef
from cptlab.study import experiments as E
from cptlab.study import paper
from cptlab.study.scales import Scale, get_scale
from cptlab.training.store import RunStore

LAMBDAS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)  # memory of the annealing momentum
ALPHAS = tuple(round(0.01 * k, 2) for k in range(1, 301))  # 0.01 .. 3.00
PLAN_EXPERIMENTS = ("infinite", "replay", "max_lr", "warmup", "d0_rewarm")  # where validation_plan's runs are
MIN_POINTS = 6  # L0, A, C, alpha, lam: at least one evaluation more than parameters
MAX_STEPS = 200_000  # longest LR history the law computes (S2 is a loop over steps)
PAST_AREAS = (0.0, *np.geomspace(10.0, 1e7, 19).tolist())  # S1 of an unknown past, in steps at lr_ref


# -- LR histories ------------------------------------------------------------------------------------

def stage_steps(config: RunConfig) -> list[int]:
    """Optimizer steps of each stage: its tokens // (batch_size x seq_len), as the trainer takes them."""
    batch = config.train.batch_size * config.train.seq_len
    return [stage.tokens // batch for stage in config.stages]


def lr_history(run: E.Run | RunConfig, store: RunStore | None = None, until: str | None = None) -> np.ndarray:
    """The LR at every optimizer step of ``run``'s history, from scratch, up to the end of stage ``until``
    (default: all). A stage that starts from another run (``init_from`` a run of the store) continues that
    run's history at the end of the stage it names, found among ``run.needs`` or else in ``store``; a stage
    from ``scratch`` starts the history again. A stage from a checkpoint file is a ``ValueError``: the LR
    history of the model it holds is unknown."""
    return _history(run, store, until,
                    lambda stage, steps: sched.lr_values([(stage.schedule.to_spec(), steps)]))


def replay_history(run: E.Run | RunConfig, store: RunStore | None = None) -> np.ndarray:
    """The fraction of each optimizer step's batch that replays earlier data, over ``run``'s history as
    ``lr_history`` walks it (0 for a stage without replay)."""
    return _history(run, store, None,
                    lambda stage, steps: np.full(steps, stage.replay.fraction if stage.replay else 0.0))


def _history(run: E.Run | RunConfig, store: RunStore | None, until: str | None, values) -> np.ndarray:
    """``values(stage, steps)`` of every stage of ``run``'s history, concatenated (see ``lr_history``)."""
    config = run.config if isinstance(run, E.Run) else run
    history = np.zeros(0)
    for i, (stage, steps) in enumerate(zip(config.stages, stage_steps(config))):
        start = stage.init_from
        if isinstance(start, RunRef):
            history = _history(_parent(run, start, store), store, start.stage, values)
        elif start == "scratch" or (i == 0 and start == "previous"):
            history = np.zeros(0)
        elif start != "previous":
            raise ValueError(f"stages[{i}].init_from: {start!r} is a checkpoint file; the law needs the LR "
                             "history of the model it holds, so start from a run of the store")
        history = np.concatenate([history, values(stage, steps)])
        if len(history) > MAX_STEPS:
            raise ValueError(f"steps: the law takes at most {MAX_STEPS:,} steps, got {len(history):,}")
        if stage.name == until:
            return history
    if until is not None:
        raise ValueError(f"init_from.stage: the run has no stage {until!r}")
    return history


def _parent(run: E.Run | RunConfig, ref: RunRef, store: RunStore | None) -> E.Run:
    """The run ``ref`` names: one of ``run.needs``, else the run's config in ``store``."""
    for need in run.needs if isinstance(run, E.Run) else ():
        if need.experiment == ref.experiment and need.run_id == ref.run:
            return need
    found = store.run(ref.experiment, ref.run) if store is not None else None
    if found is None or not found.config_path.exists():
        raise ValueError(f"init_from: run {ref} is not in the run store"
                         + (f" {store.root}" if store is not None else ""))
    return E.Run(ref.experiment, found.name, found.load_config())


def schedule_areas(lr: np.ndarray, lam: float, lr_ref: float) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 after s = 0, 1, ..., len(lr) steps of the LR history ``lr`` (``lr[i]``: the LR of step
    i), with eta = lr / lr_ref; the first warmup from scratch adds nothing to S2."""
    eta = np.asarray(lr, dtype=float) / lr_ref
    s1 = np.concatenate([[0.0], np.cumsum(eta)])
    drops = np.concatenate([[0.0], eta[:-1] - eta[1:]])
    drops[: _first_warmup_end(eta) + 1] = 0.0
    momentum = np.empty_like(drops)
    m = 0.0
    for i, d in enumerate(drops.tolist()):
        m = lam * m + d
        momentum[i] = m
    return s1, np.concatenate([[0.0], np.cumsum(momentum)])


def _first_warmup_end(eta: np.ndarray) -> int:
    """The step where the LR first stops rising (0 if it does not rise at first)."""
    rises = np.diff(eta) > 0
    return len(eta) - 1 if rises.all() else int(np.argmin(rises))


# -- the schedule law --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleLaw:
    """L(s) = L0 + A * S1 ** -alpha - C * S2 on eval set ``loss_set``, fitted on ``runs``."""

    L0: float
    A: float
    alpha: float
    C: float
    lam: float
    lr_ref: float
    loss_set: str
    runs: tuple[str, ...]  # "experiment/name" of the runs fitted
    tokens_per_step: int
    n_points: int
    rmse: float
    s1_past: float = 0.0  # forward area before the history (an imported model's past), in steps at lr_ref
    past: str = "none"  # none (the lab trained it all) | published | fitted


    def loss(self, lr: np.ndarray, steps: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The predicted loss after each of ``steps`` (default: 1 .. len(lr)) of the LR history ``lr``;
        NaN where no LR has been applied yet (S1 = 0)."""
        if len(lr) > MAX_STEPS:
            raise ValueError(f"steps: the law takes at most {MAX_STEPS:,} steps, got {len(lr):,}")
        s1, s2 = schedule_areas(lr, self.lam, self.lr_ref)
        s1 = s1 + self.s1_past
        at = np.arange(1, len(lr) + 1) if steps is None else np.asarray(steps, dtype=int)
        if len(at) and (at.min() < 0 or at.max() > len(lr)):
            raise ValueError(f"steps: must lie in 0 .. {len(lr)} (the history's length)")
        forward = np.where(s1[at] > 0, s1[at], np.nan)
        return self.L0 + self.A * forward ** -self.alpha - self.C * s2[at]

    def plan_loss(self, plan: sched.StagePlan) -> np.ndarray:
        """The predicted loss after every step of a plan of (spec, steps) stages trained from scratch."""
        total = sched.stage_boundaries(plan)[-1]
        if total > MAX_STEPS:
            raise ValueError(f"steps: the law takes at most {MAX_STEPS:,} steps, got {total:,}")
        return self.loss(np.array(sched.lr_values(plan)))

    def formula(self) -> str:
        return (f"L = {self.L0:.3f} + {self.A:.4g} * S1^-{self.alpha:.2f} - {self.C:.4g} * S2 "
                f"(lambda {self.lam:g}, LR in units of {self.lr_ref:.3g})")

    def describe(self) -> str:
        """The formula, the loss it predicts and the runs it was fitted on."""
        past = {"none": "", "published": f"; the imported model's past from its published schedule "
                                         f"(S1 + {self.s1_past:.4g})",
                "fitted": f"; the imported model's past fitted (S1 + {self.s1_past:.4g})"}[self.past]
        return (f"{self.formula()}; {self.loss_set} loss, fitted on {', '.join(self.runs)} "
                f"({self.n_points} evaluations, rmse {self.rmse:.4f}){past}")


@dataclass
class Curve:
    """A run's measured loss on one eval set after ``steps`` steps of its LR history ``lr`` (the starting
    evaluation of a run that continues another is left out: it measures the model it starts from)."""

    run: str  # "experiment/name"
    loss_set: str
    steps: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    start: int  # steps of the history before the run's own stages (of the run it continues)
    tokens_per_step: int
    data: tuple[str, ...]  # corpora of its last stage, replay included
    past_area: float | None = 0.0  # LR x steps before the history (an imported past); None: unknown

    @property
    def tokens(self) -> np.ndarray:
        return self.steps * self.tokens_per_step

    def own_steps(self) -> np.ndarray:
        """1-based steps of the run's own stages (where its prediction is drawn)."""
        return np.arange(self.start + 1, len(self.lr) + 1)


def run_curve(run: E.Run, frame: pd.DataFrame, loss_set: str, store: RunStore | None = None) -> Curve:
    """``run``'s curve on ``loss_set`` from the evaluation lines ``frame`` (``load_runs``)."""
    rows = _rows_of(frame, run)
    name = f"{run.experiment}/{run.name}"
    if rows.empty or f"val_{loss_set}" not in rows.columns:
        raise ValueError(f"runs: {name} has no evaluation of {loss_set} in the frame")
    lr = lr_history(run, store)
    start = len(lr) - sum(stage_steps(run.config))
    rows = rows[(rows["step"] > start) & (rows["step"] <= len(lr))].dropna(subset=[f"val_{loss_set}"])
    last = run.config.stages[-1]
    replays = last.replay is not None and last.replay.fraction > 0
    data = tuple(last.sources()) if replays else tuple(last.data)
    t = run.config.train
    return Curve(name, loss_set, rows["step"].to_numpy(dtype=int), rows[f"val_{loss_set}"].to_numpy(float),
                 lr, start, t.batch_size * t.seq_len, data, past_area(run, store))


def past_area(run: E.Run, store: RunStore | None) -> float | None:
    """The forward area (sum of LRs, in ``run``'s steps) of the past of the imported model ``run`` starts
    from: 0 when the run does not start from an import, None when the import's schedule is unknown."""
    start = run.config.stages[0].init_from
    found = store.run(start.experiment, start.run) if isinstance(start, RunRef) and store else None
    labels = found.labels() if found is not None else {}
    if labels.get("role") != "pretrained":
        return 0.0
    past = labels.get("past")
    if not past:
        return None
    spec = sched.ScheduleConfig(kind=past["schedule"], max_lr=past["max_lr"], min_lr=past["min_lr"],
                                warmup=past["warmup"]).to_spec()
    t = run.config.train
    steps_per_past_step = past["batch_size"] * past["seq_len"] / (t.batch_size * t.seq_len)
    return float(np.sum(sched.lr_values([(spec, past["steps"])]))) * steps_per_past_step


def _rows_of(frame: pd.DataFrame, run: E.Run) -> pd.DataFrame:
    """The evaluation lines of ``run`` in ``frame``: by run id, else by experiment, name and seed (a frame
    built for another device)."""
    if frame.empty:
        return frame
    rows = frame[frame["run_id"] == run.run_id] if "run_id" in frame.columns else frame.iloc[:0]
    if rows.empty and {"experiment", "name"} <= set(frame.columns):
        rows = frame[(frame["experiment"] == run.experiment) & (frame["name"] == run.name)]
        if "seed" in rows.columns and "seed" in run.labels:
            rows = rows[rows["seed"] == run.labels["seed"]]
        if "run_id" in rows.columns and rows["run_id"].nunique() > 1:
            rows = rows.iloc[:0]  # ambiguous (several scales in one frame): found by run id only
    return rows.drop_duplicates("step").sort_values("step")


def fit_schedule_law(curves: Sequence[Curve]) -> ScheduleLaw:
    """Least-squares fit of the law to ``curves`` (all on one eval set); see the module docstring."""
    points = sum(len(c.steps) for c in curves)
    if points < MIN_POINTS:
        raise ValueError(f"runs: the law has 5 parameters; fitting needs at least {MIN_POINTS} evaluations, "
                         f"got {points} from {len(curves)} run(s)")
    sets = sorted({c.loss_set for c in curves})
    if len(sets) > 1:
        raise ValueError(f"loss_set: the curves fitted must share one eval set, got {', '.join(sets)}")
    lr_ref = max(float(c.lr.max()) for c in curves)
    y = np.concatenate([c.loss for c in curves])
    pasts = {c.past_area for c in curves}
    if len(pasts) > 1:
        raise ValueError("runs: the curves fitted must share one past (the same base model)")
    known = pasts.pop()
    offsets = PAST_AREAS if known is None else (known / lr_ref,)
    best = None
    for lam in LAMBDAS:
        areas = [schedule_areas(c.lr, lam, lr_ref) for c in curves]
        s1 = np.concatenate([a[0][c.steps] for a, c in zip(areas, curves)])
        s2 = np.concatenate([a[1][c.steps] for a, c in zip(areas, curves)])
        if not (s1 > 0).all():
            raise ValueError("runs: an evaluation was taken before any LR was applied (S1 = 0)")
        for offset in offsets:
            sse, alpha, coef = _best_alpha(s1 + offset, s2, y)
            if best is None or sse < best[0]:
                best = (sse, lam, alpha, coef, offset)
    sse, lam, alpha, (L0, A, C), offset = best
    runs = tuple(c.run for c in curves)
    past = "fitted" if known is None else ("published" if known else "none")
    return ScheduleLaw(float(L0), float(A), alpha, float(C), lam, lr_ref, sets[0], runs,
                       curves[0].tokens_per_step, points, math.sqrt(sse / points), float(offset), past)


def _best_alpha(s1: np.ndarray, s2: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(squared error, alpha, (L0, A, C)) of the least-squares fit with the best alpha of ``ALPHAS``."""
    best = None
    for alpha in ALPHAS:
        X = np.stack([np.ones_like(s1), s1 ** -alpha, -s2], axis=1)
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        sse = float(np.sum((X @ coef - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, alpha, coef)
    return best


def prediction_errors(law: ScheduleLaw, curve: Curve) -> dict[str, float]:
    """Measured and predicted loss at a curve's last evaluation, the error there and the mean error along
    the curve, both relative to the measured loss in percent."""
    predicted = law.loss(curve.lr, curve.steps)
    error = (predicted - curve.loss) / curve.loss
    return {"final": float(curve.loss[-1]), "predicted": float(predicted[-1]),
            "final error %": 100 * float(error[-1]), "mean error %": 100 * float(np.mean(np.abs(error)))}


# -- validation at a scale ---------------------------------------------------------------------------

@dataclass
class Family:
    """Runs that share a starting point: the law is fitted on ``fit`` and predicts ``held_out`` on the
    eval set each run's label ``loss_label`` names (``d0`` or ``d1``)."""

    name: str
    loss_label: str
    fit: list[E.Run]
    held_out: list[E.Run]


def validation_plan(scale: str | Scale = "tiny", device: str = "auto") -> list[Family]:
    """The runs the reproduction trains, grouped to fit and predict: from scratch over three chunks
    (fitted on repeated cosine and WSD's constant phase, predicting the infinite schedules and every
    annealing branch); per shift, the continual runs' D1 loss (fitted on the cosine re-warm and the
    re-warmed constant LR, predicting 0.5x / 2x max LR, constant at min and other warmups); the D0 loss of
    runs continuing the base model (fitted on runs that continue on D0, predicting 2x max LR on D0 and
    the runs that switch to D1: the data shift the law has no term for)."""
    s = get_scale(scale)
    chunks = {r.name: r for r in E.infinite_schedules(s, device)}
    fit = [chunks.pop("sched-cosine"), chunks.pop("sched-wsd")]
    plan = [Family("from scratch, three chunks", "d1", fit, list(chunks.values()))]
    zero = {sh: E.continual_run("replay", f"{sh}-replay0", sh, s, device=device) for sh in paper.SHIFTS}
    for shift in paper.SHIFTS:
        max_lr = {r.name: r for r in E.max_lr_ablation(shift, s, device) if r.experiment == "max_lr"}
        fit = [zero[shift], max_lr.pop(f"{shift}-rewarm-constant")]
        # the reproduction ablates the warmup on the weak shift only
        warm = E.warmup_ablation(shift, s, device) if shift == "weak" else []
        warm = [r for r in warm if r.experiment == "warmup"]
        plan.append(Family(f"continual, {shift} shift", "d1", fit, [*max_lr.values(), *warm]))
    same = {r.name: r for r in E.rewarm_same_data(s, device)}
    plan.append(Family("continual, D0 loss", "d0", [same["d0-maxlr1x"], same["d0-constant-min"]],
                       [same["d0-maxlr2x"], *zero.values()]))
    return plan


def plan_runs(plan: Sequence[Family]) -> list[E.Run]:
    """Every run of the plan once (to train with ``runner.run_all`` and load with ``load_runs``)."""
    runs = {}
    for family in plan:
        for run in (*family.fit, *family.held_out):
            runs.setdefault(run.run_id, run)
    return list(runs.values())


@dataclass
class Validation:
    """Per family: the law fitted, and each held-out run's curve with the law's prediction at its
    evaluations; ``table`` has one row per held-out run; ``skipped`` names what could not be done."""

    laws: dict[str, ScheduleLaw] = field(default_factory=dict)
    fitted: dict[str, list[Curve]] = field(default_factory=dict)
    predicted: dict[str, list[tuple[Curve, np.ndarray]]] = field(default_factory=dict)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    skipped: list[str] = field(default_factory=list)


def validate(plan: Sequence[Family], frame: pd.DataFrame, store: RunStore | None = None) -> Validation:
    """Fit each family's law on its fit runs found in ``frame`` and predict its held-out runs found there."""
    out = Validation()
    rows = []
    for family in plan:
        loss_set = family.fit[0].labels[family.loss_label]
        try:
            _check_finished(family.fit, store)
            fitted = [run_curve(r, frame, loss_set, store) for r in family.fit]
            law = fit_schedule_law(fitted)
        except ValueError as exc:
            out.skipped.append(f"{family.name}: {exc}")
            continue
        out.laws[family.name], out.fitted[family.name], out.predicted[family.name] = law, fitted, []
        fit_data = set().union(*(c.data for c in fitted))
        for run in family.held_out:
            try:
                _check_finished([run], store)
                curve = run_curve(run, frame, loss_set, store)
            except ValueError as exc:
                out.skipped.append(f"{family.name}: {exc}")
                continue
            if not len(curve.steps):
                continue
            out.predicted[family.name].append((curve, law.loss(curve.lr, curve.steps)))
            rows.append({"family": family.name, "run": curve.run, "trained on": ", ".join(curve.data),
                         "same data": set(curve.data) == fit_data, "evals": len(curve.steps),
                         **prediction_errors(law, curve)})
    out.table = pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()
    return out


def validate_scale(scale: str | Scale = "tiny", root: str | RunStore | None = None,
                   device: str = "auto") -> Validation:
    """``validate`` on the plan of ``scale`` with the finished runs of the run store ``root`` (default
    ``$CPTLAB_RUNS`` or ``runs``); ``skipped`` names the runs not finished there. ``device='auto'`` also
    finds the runs trained for a named device. A store that does not exist, or holds none of the plan's
    runs, is a ``ValueError`` that says how to train them."""
    store = open_store(root)
    plan = plan_in_store(scale, device, store)
    runs = plan_runs(plan)
    found = [r for r in runs if store.is_done(r.experiment, r.run_id)]
    if not found:
        names = ", ".join(f"{r.experiment}/{r.name}" for r in runs[:3])
        raise ValueError(f"root: the run store {store.root} holds none of the {len(runs)} finished runs the "
                         f"validation plan of scale {_scale_name(scale)} needs ({names}, ...); "
                         + _how_to_train(scale, device, store, "laws.plan_runs(plan)"))
    return validate(plan, load_runs(found, store), store)


def open_store(root: str | RunStore | None) -> RunStore:
    """The run store at ``root`` (default ``$CPTLAB_RUNS`` or ``runs``); a ``ValueError`` if there is none."""
    store = root if isinstance(root, RunStore) else RunStore(root)
    if not store.root.is_dir():
        raise ValueError(f"root: the run store {store.root} does not exist; give the folder the runs were "
                         "trained into (e.g. `make reproduce`'s runs/reproduce)")
    return store


def plan_in_store(scale: str | Scale, device: str, store: RunStore) -> list[Family]:
    """``validation_plan(scale, device)``; with ``device='auto'``, the plan for the device (auto, cpu, cuda,
    mps) whose runs ``store`` holds most of finished: a run's config names its device, so runs trained with
    ``device='cpu'`` are other runs than those of ``'auto'``."""
    def finished(plan: list[Family]) -> int:
        return sum(store.is_done(r.experiment, r.run_id) for r in plan_runs(plan))

    plan = validation_plan(scale, device)
    if device != "auto" or finished(plan) == len(plan_runs(plan)):
        return plan
    plans = [plan] + [validation_plan(scale, d) for d in ("cpu", "cuda", "mps")]
    return max(plans, key=finished)  # the first of equals: auto's


def _check_finished(runs: Sequence[E.Run], store: RunStore | None) -> None:
    """A ``ValueError`` naming the runs of ``runs`` that ``store`` does not hold finished (none without a
    store)."""
    missing = [f"{r.experiment}/{r.run_id}" for r in runs
               if store is not None and not store.is_done(r.experiment, r.run_id)]
    if missing:
        raise ValueError(f"runs: {', '.join(missing)} not finished in the run store {store.root}")


def _scale_name(scale: str | Scale) -> str:
    return repr(scale) if isinstance(scale, str) else "scale"


def _how_to_train(scale: str | Scale, device: str, store: RunStore, what: str) -> str:
    return (f"train them: `plan = laws.validation_plan({_scale_name(scale)}, {device!r}); "
            f"runner.run_all({what}, {str(store.root)!r})` (cptlab.study.runner)")


def validate_results(res: T.Results, device: str = "auto") -> Validation:
    """``validate`` on the plan of a reproduction's scale with its runs (``results.collect_results``)."""
    frames = [res.frame(key) for key in PLAN_EXPERIMENTS if len(res.frame(key))]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return validate(validation_plan(res.scale or "tiny", device), frame)


def summary(table: pd.DataFrame) -> str:
    """One sentence on a validation table: the held-out runs on the fitted runs' data and their errors."""
    same = table[table["same data"]] if len(table) else table
    if same.empty:
        return "No held-out run on the fitted runs' data was found."
    errors = same["final error %"].abs()
    return (f"{len(same)} held-out runs on the data of the fitted runs: |final-loss error| mean "
            f"{errors.mean():.2f}%, max {errors.max():.2f}% ({errors.idxmax()}); {int((errors <= 1).sum())} "
            f"within 1%; mean error along the curves {same['mean error %'].mean():.2f}%.")


def laws_table(validation: Validation) -> pd.DataFrame:
    """One row per family: the fitted parameters, the runs fitted and the rmse of the fit."""
    rows = {name: {"L0": law.L0, "A": law.A, "alpha": law.alpha, "C": law.C, "lambda": law.lam,
                   "LR unit": law.lr_ref, "loss": law.loss_set, "fitted on": ", ".join(law.runs),
                   "rmse": law.rmse} for name, law in validation.laws.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "family"
    return table


# -- laws for the widgets ----------------------------------------------------------------------------

def explorer_law(scale: str | Scale = "tiny", root: str | RunStore | None = None,
                 device: str = "auto") -> ScheduleLaw | None:
    """The law of training from scratch at ``scale``, fitted on its repeated-cosine and WSD runs of the
    infinite-schedule experiment in the run store ``root``; None, with a warning that names those runs and
    how to train them, while the store lacks them finished (the schedule explorer then draws no
    prediction). A store that does not exist is a ``ValueError``."""
    store = open_store(root)
    family = plan_in_store(scale, device, store)[0]
    try:
        _check_finished(family.fit, store)
    except ValueError as exc:
        warnings.warn(f"explorer_law: {exc}: the law is fitted on them, so there is none; "
                      + _how_to_train(scale, device, store, "plan[0].fit"), stacklevel=2)
        return None
    frame = load_runs(family.fit, store)
    return fit_schedule_law([run_curve(r, frame, r.labels["d1"], store) for r in family.fit])


def launcher_fit_runs(run: E.Run, store: RunStore, scale: str | Scale,
                      device: str = "auto") -> tuple[list[E.Run], str]:
    """The finished runs of the store that a law for ``run`` (a continual run from ``scale``'s base model,
    as the run launcher builds) is fitted on: the replay, max-LR and warmup experiments' runs that continue
    the same base model on the same data with the same replay fraction, any run of ``run``'s own config
    left out; if there are none, those of the nearest replay fraction. With a note saying which."""
    if not run.needs:
        return [], "the run does not continue a base model"
    base, own = run.needs[0].run_id, run.config.hash()
    runs = T.experiment_runs(scale, device)
    found = {r.run_id: r for key in ("replay", "max_lr", "warmup") for r in runs[key]
             if r.labels.get("role") == "continual" and r.needs and r.needs[0].run_id == base
             and r.labels.get("d1") == run.labels.get("d1") and r.config.hash() != own
             and store.is_done(r.experiment, r.run_id)}
    if not found:
        return [], f"the run store has no finished continual run of this base model on {run.labels.get('d1')}"
    fraction = run.labels.get("replay", 0.0)
    nearest = min({r.labels.get("replay", 0.0) for r in found.values()}, key=lambda f: (abs(f - fraction), f))
    fit = [r for r in found.values() if r.labels.get("replay", 0.0) == nearest]
    if abs(nearest - fraction) < 1e-9:
        return fit, f"{_percent(fraction)} replay, as this run"
    return fit, (f"{_percent(nearest)} replay, the nearest to this run's {_percent(fraction)} in the store: "
                 "the law has no replay term")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def fit_laws(runs: Sequence[E.Run], loss_sets: dict[str, str], store: RunStore) -> dict[str, ScheduleLaw]:
    """A law per key of ``loss_sets`` (key -> eval set, e.g. {"D0": "en-man", "D1": "de-man"}) fitted on
    the finished ``runs`` of ``store``; a ``ValueError`` if there are too few evaluations."""
    frame = load_runs(list(runs), store)
    return {key: fit_schedule_law([run_curve(r, frame, name, store) for r in runs])
            for key, name in loss_sets.items()}


def predict_run(law: ScheduleLaw, run: E.Run, store: RunStore | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, predicted loss) after every step of ``run``'s own stages (its history before them is the
    model it starts from)."""
    lr = lr_history(run, store)
    t = run.config.train
    steps = np.arange(len(lr) - sum(stage_steps(run.config)) + 1, len(lr) + 1)
    return steps * t.batch_size * t.seq_len, law.loss(lr, steps)
