"""The continual-pre-training law (cptlab.analysis.cpt_law, cpt_validation, cpt_plan): areas split at the
switch, a lineage's switch and replay, a fit that recovers the predictions of curves the law itself
generated (base model, replay, other LRs, tails of a trunk), the held-out validation and its targets, the
runs outside the law, the planner, open models, and bad inputs."""

import json

import numpy as np
import pandas as pd
import pytest

from cptlab import viz
from cptlab.analysis import cpt_law as C
from cptlab.analysis import cpt_plan as P
from cptlab.analysis import cpt_validation as V
from cptlab.analysis import laws as L
from cptlab.analysis.runs import load_runs
from cptlab.study import experiments as E
from cptlab.study import modern as MR
from cptlab.study import paper
from cptlab.training.store import RunStore

SHIFT = "strong"
PARAMS = {"L0": 3.0, "A": 1.0, "alpha": 0.5, "C1": 0.004, "C2": 0.004, "E": 0.05, "beta": 1.0, "kappa": 4.0}
TRUE = {"D0": C.CptLaw({**PARAMS, "B": 0.3}, 0.95, 3e-3, paper.D0, ("true",)),
        "D1": C.CptLaw({**PARAMS, "L0": 3.2, "B": -0.4}, 0.95, 3e-3, paper.SHIFTS[SHIFT], ("true",))}


def true_loss(run: E.Run, loss_set: str, steps: np.ndarray) -> np.ndarray:
    """The loss the true laws give ``run`` on ``loss_set`` (D1 law for any set that is not D0)."""
    lr = L.lr_history(run)
    switch, r = C.continual_history(run)
    law = TRUE["D0"] if loss_set == paper.D0 else TRUE["D1"]
    return law.loss(lr, switch, steps, r[steps])


def write_cpt_run(store: RunStore, run: E.Run, every: int = 2) -> None:
    """A finished run in ``store`` whose losses the true laws generated, every ``every`` steps."""
    lr = L.lr_history(run)
    start = len(lr) - sum(L.stage_steps(run.config))
    steps = sorted({*range(start + every, len(lr) + 1, every), len(lr)} | ({start} if start else set()))
    steps = np.array(steps)
    losses = {name: true_loss(run, name, steps) for name in run.config.eval.sets}
    t = run.config.train
    path = store.path(run.experiment, run.run_id)
    path.mkdir(parents=True)
    stage = run.config.stages[-1].name
    lines = [{"step": int(s), "tokens": int(s) * t.batch_size * t.seq_len, "stage": stage,
              "lr": float(lr[s - 1]), "val": {n: float(v[i]) for n, v in losses.items()}}
             for i, s in enumerate(steps)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (path / "labels.json").write_text(json.dumps(run.labels))
    (path / "DONE").write_text("")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Every continual run of the strong shift at smoke (today's recipes included), and the base model,
    from the true laws."""
    store = RunStore(tmp_path_factory.mktemp("cpt"))
    fit, held = V.shift_runs(SHIFT, "smoke")
    for run in (E.base_run("smoke"), *fit, *held, *V.outside_runs(SHIFT, "smoke")):
        write_cpt_run(store, run)
    return store


def frame_of(store: RunStore) -> pd.DataFrame:
    fit, held = V.shift_runs(SHIFT, "smoke")
    return load_runs([E.base_run("smoke"), *fit, *held, *V.outside_runs(SHIFT, "smoke")], store)


def test_areas_split_at_the_switch_and_add_up_to_the_schedule_laws():
    lr = np.concatenate([np.linspace(1e-3, 1e-4, 50), np.full(30, 1e-3)])
    s1pt, s2pt, s1cpt, s2cpt = C.split_areas(lr, 50, 0.9, 1e-3)
    s1, s2 = L.schedule_areas(lr, 0.9, 1e-3)
    np.testing.assert_allclose(s1pt + s1cpt, s1)
    np.testing.assert_allclose(s2pt + s2cpt, s2)
    assert (s1cpt[:51] == 0).all() and (s2cpt[:51] == 0).all() and s1pt[-1] == s1[50]
    assert s2cpt[-1] < 0  # the re-warm at the switch takes from the annealing area: the loss rises


def test_a_tail_switches_where_its_lineage_left_the_base_and_replays_on_average():
    """A tail continues a trunk that continued the base model: the switch is the base's end, and r the
    mean replay since it (the trunk's chosen replay, then the anneal's)."""
    tail = MR.tail_run(SHIFT, "anneal", "smoke")
    trunk, base = tail.needs[0], tail.needs[0].needs[0]
    switch, r = C.continual_history(tail)
    n_base, n_trunk = len(L.lr_history(base)), len(L.lr_history(trunk))
    n_tail = len(L.lr_history(tail)) - n_trunk
    assert switch == n_base and C.lineage_root(tail) is base and len(r) == n_trunk + n_tail + 1
    chosen = paper.CHOSEN_REPLAY[SHIFT]
    assert r[n_base] == 0 and r[n_trunk] == pytest.approx(chosen)
    mean = (chosen * (n_trunk - n_base) + MR.ANNEAL_REPLAY * n_tail) / (n_trunk + n_tail - n_base)
    assert r[-1] == pytest.approx(mean)


def test_fit_predicts_held_out_runs_of_curves_the_law_generated(store):
    fit, held = V.shift_runs(SHIFT, "smoke")
    outside = V.outside_runs(SHIFT, "smoke")
    v = V.validate_shift(SHIFT, fit, held, frame_of(store), store, outside=outside)
    assert len(v.table) == 2 * len(held)
    recipes = {r.labels.get("recipe") for r in held}
    assert {"stable", "decay", "anneal", "microanneal"} <= recipes and not recipes & set(MR.OUTSIDE_THE_LAWS)
    assert len(outside) == 4  # the merge tail and the three schedule-free runs
    assert set(v.outside) == {f"modern/{r.name}" for r in outside}
    assert v.table["error %"].abs().max() < 0.5 and v.table["met"].all()
    assert v.laws["D0"].params["B"] > 0 > v.laws["D1"].params["B"]  # forgetting, learning
    judged = V.judge(v.table)
    assert judged["target met"].all() and set(judged.index.get_level_values("set")) == {
        f"D0 ({paper.D0})", f"D1 ({paper.SHIFTS[SHIFT]})"}
    # the schedule law, fitted on the same runs, has no term for the shift nor for replay
    assert v.table["schedule law error %"].abs().max() > v.table["error %"].abs().max()


def test_the_planner_weighs_d0_against_d1(store):
    laws = C.fit_shift(SHIFT, V.shift_runs(SHIFT, "smoke")[0], frame_of(store), store)
    base = E.base_run("smoke")
    only_d1 = P.plan(laws, base, "smoke", w0=0.0, w1=1.0, lr_factors=(1.0,))
    only_d0 = P.plan(laws, base, "smoke", w0=1.0, w1=0.0, lr_factors=(1.0,))
    assert only_d1.replay == 0.0 and only_d0.replay == max(P.REPLAY_GRID)
    free = P.plan(laws, base, "smoke", 1.0, 1.0)
    assert free.max_lr in {f * 3e-3 for f in P.LR_FACTORS}
    assert free.objective <= P.plan(laws, base, "smoke", 1.0, 1.0, lr_factors=(1.0,)).objective
    at_1x = P.plan(TRUE, base, "smoke", 1.0, 1.0, lr_factors=(1.0,))  # within the fitted runs' LRs
    assert P.plan(laws, base, "smoke", 1.0, 1.0, lr_factors=(1.0,)).objective == pytest.approx(
        at_1x.objective, abs=2e-3)
    cheap = P.cheapest_replay(laws, base, "smoke", bound=0.5 * only_d1.d0_rise)
    assert cheap is not None and cheap.replay > 0 and cheap.d0_rise <= 0.5 * only_d1.d0_rise + 1e-9
    assert P.cheapest_replay(laws, base, "smoke", bound=0.0, fractions=[0.0]) is None  # 0% forgets
    sweep = pd.Series({r: float(laws["D0"].loss(*P.stage_history(base, "smoke", 3e-3), [48], r)[0]) for r in
                       (0.0, 0.01, 0.05, 0.1, 0.25, 0.5)})
    verdict = P.planner_verdict(laws, base, sweep, "smoke", 1.0, 0.0)
    assert verdict["measured best"] == 0.5 and verdict["within"]


def test_study_validates_open_models_and_judges_the_planner(store):
    st = V.study(frame_of(store), "smoke")
    assert set(st.validations) == {SHIFT} == set(st.open_validations) == set(st.verdicts.index)
    law = st.open_validations[SHIFT].laws["D1"]
    fit = C.fit_runs(SHIFT, "smoke")
    assert law.open_model and "(fitted)" in law.formula()
    assert set(law.runs) == {f"{r.experiment}/{r.name}" for r in fit}  # the base's history left out
    opened = st.open_models()
    assert opened.loc[(SHIFT, f"D1 ({paper.SHIFTS[SHIFT]})"), "|error| % open"] < 2.0
    history = L.lr_history(E.base_run("smoke")).sum() / 3e-3  # the base's forward area, at its max LR
    assert opened["S1pt of the history"].iloc[0] == pytest.approx(history)
    assert len(st.held_out()) == 2 * len(V.shift_runs(SHIFT, "smoke")[1])
    assert st.params().loc[(SHIFT, f"D0 ({paper.D0})"), "B"] > 0
    assert bool(st.verdicts.loc[SHIFT, "within"])  # the laws are the truth here
    fig = viz.plot_cpt_predictions(st.validations[SHIFT])  # measured and predicted, per held-out run
    held = len(V.shift_runs(SHIFT, "smoke")[1])
    assert len(fig.axes) == 2 and [len(ax.lines) for ax in fig.axes] == [2 * held, 2 * held]


def test_bad_inputs_name_the_field(store):
    laws = C.fit_shift(SHIFT, V.shift_runs(SHIFT, "smoke")[0], frame_of(store), store)
    with pytest.raises(ValueError, match="weights"):
        P.plan(laws, E.base_run("smoke"), "smoke", w0=0, w1=0)
    with pytest.raises(ValueError, match="bound"):
        P.cheapest_replay(laws, E.base_run("smoke"), "smoke", bound=-1)
    with pytest.raises(ValueError, match="runs: the law has 9 parameters"):
        C.fit_cpt_law(C.Points(), paper.D0)
