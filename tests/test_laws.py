"""The fitted laws (cptlab.analysis.laws): the areas S1 and S2 by hand, fits that recover the parameters of
curves the law itself generated, predictions that behave as the law says, the replay law on a synthetic
sweep, the validation of a scale's plan on a run store of synthetic runs, and bad inputs."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from cptlab import schedules as S
from cptlab.analysis import laws as L
from cptlab.analysis import replay_law as R
from cptlab.analysis.runs import load_runs
from cptlab.config import RunConfig
from cptlab.study import experiments as E
from cptlab.training.store import RunStore

# A law on the fit grids (alpha in ALPHAS, lambda in LAMBDAS), so that a fit can find it exactly.
TRUE = L.ScheduleLaw(L0=3.0, A=2.0, alpha=0.5, C=0.002, lam=0.99, lr_ref=1e-3, loss_set="d", runs=("true",),
                     tokens_per_step=1, n_points=0, rmse=0.0)
COSINE = {"kind": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 0.01}
CONSTANT = {"kind": "constant", "max_lr": 1e-3, "warmup": 0.01}


def curve(spec, steps=400, every=10, law=TRUE, name="run") -> L.Curve:
    """A curve the law ``law`` generates exactly for one stage of ``spec`` from scratch."""
    lr = np.array(S.lr_values([(spec, steps)]))
    at = np.arange(every, steps + 1, every)
    return L.Curve(name, law.loss_set, at, law.loss(lr, at), lr, 0, 1, ("d",))


def write_fake_run(store: RunStore, run: E.Run, law: L.ScheduleLaw, every: int = 2) -> None:
    """A finished run in ``store`` whose every eval set's loss is ``law``'s prediction for it, evaluated
    every ``every`` steps of its own stages (and at its start when it continues another run)."""
    lr = L.lr_history(run)
    own = sum(L.stage_steps(run.config))
    start = len(lr) - own
    steps = sorted({*range(start + every, len(lr) + 1, every), len(lr)} | ({start} if start else set()))
    loss = law.loss(lr, np.maximum(steps, 1))
    t = run.config.train
    path = store.path(run.experiment, run.run_id)
    path.mkdir(parents=True)
    lines = [{"step": s, "tokens": s * t.batch_size * t.seq_len, "stage": run.config.stages[-1].name,
              "lr": float(lr[s - 1]), "val": {name: float(v) for name in run.config.eval.sets}}
             for s, v in zip(steps, loss)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (path / "labels.json").write_text(json.dumps(run.labels))
    (path / "DONE").write_text("")


def sweep_finals(d0=(3.6, -0.3, 0.05), d1=(3.2, 0.4), base=3.7, shift="strong") -> pd.DataFrame:
    """Final losses of a replay sweep that follows the replay law with these parameters exactly."""
    law = R.ReplayLaw(shift, (), d0, d1, base)
    fractions = np.array([0.0, 0.01, 0.05, 0.1, 0.25, 0.5])
    return pd.DataFrame({"role": "continual", "shift": shift, "replay": fractions, "D0": law.d0(fractions),
                         "D1": law.d1(fractions), "base_D0": base})


# -- the areas ---------------------------------------------------------------------------------------

def test_s1_is_the_area_and_s2_the_decayed_sum_of_drops():
    s1, s2 = L.schedule_areas(np.array([1.0, 0.5, 0.5, 0.5]), lam=0.5, lr_ref=1.0)
    np.testing.assert_allclose(s1, [0, 1, 1.5, 2, 2.5])
    np.testing.assert_allclose(s2, [0, 0, 0.5, 0.75, 0.875])  # m = 0, 0.5, 0.25, 0.125


def test_s2_of_a_constant_schedule_after_its_warmup_is_zero():
    lr = np.array(S.lr_values([(CONSTANT, 500)]))
    for lam in L.LAMBDAS:
        s1, s2 = L.schedule_areas(lr, lam, 1e-3)
        assert np.all(s2 == 0)
        assert s1[-1] == pytest.approx(lr.sum() / 1e-3)


def test_s2_with_lambda_zero_is_the_lr_drop_and_a_rewarm_lowers_it():
    lr = np.array(S.lr_values([(COSINE, 100), (COSINE, 100)]))  # decay, then re-warm and decay again
    _, s2 = L.schedule_areas(lr, 0.0, 1e-3)
    peak = L._first_warmup_end(lr / 1e-3)
    for s in (50, 99, 150):
        assert s2[s + 1] == pytest.approx((lr[peak] - lr[s]) / 1e-3, abs=1e-12)  # the sum telescopes
    _, s2 = L.schedule_areas(lr, 0.99, 1e-3)
    assert s2[103] < s2[100]  # re-warming takes from the annealing area: the loss rises


# -- fit and predict ---------------------------------------------------------------------------------

def test_fit_recovers_the_parameters_of_curves_the_law_generated():
    law = L.fit_schedule_law([curve(COSINE, name="cosine"), curve(CONSTANT, name="constant")])
    assert (law.alpha, law.lam) == (TRUE.alpha, TRUE.lam)
    for key in ("L0", "A", "C"):
        assert getattr(law, key) == pytest.approx(getattr(TRUE, key), rel=1e-6)
    assert law.rmse < 1e-8 and law.n_points == 80 and law.runs == ("cosine", "constant")
    assert "fitted on cosine, constant" in law.describe()


def test_predictions_behave_as_the_law_says():
    wsd = {"kind": "wsd", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 0.01, "decay": 0.2}
    constant, decayed = TRUE.plan_loss([(CONSTANT, 1000)]), TRUE.plan_loss([(wsd, 1000)])
    np.testing.assert_allclose(decayed[:790], constant[:790])  # the same LR until the decay
    assert decayed[-1] < constant[-1] - 0.05  # annealing lowers the loss
    s1, _ = L.schedule_areas(np.array(S.lr_values([(CONSTANT, 1000)])), TRUE.lam, TRUE.lr_ref)
    assert math.isnan(constant[0])  # after the first step of warmup (LR 0) no LR has been applied
    np.testing.assert_allclose(constant[1:], TRUE.L0 + TRUE.A * s1[2:] ** -TRUE.alpha)  # S2 = 0: a power law
    at_min = {"kind": "constant", "max_lr": 1e-4, "warmup": 0.0}
    rewarm = TRUE.plan_loss([(COSINE, 300), (COSINE, 300)])
    held = TRUE.plan_loss([(COSINE, 300), (at_min, 300)])
    assert rewarm[310] > held[310]  # re-warming raises the loss at first


def test_fitted_on_cosine_and_constant_it_predicts_wsd():
    law = L.fit_schedule_law([curve(COSINE), curve(CONSTANT)])
    wsd = {"kind": "wsd", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 0.01, "decay": 0.1,
           "decay_shape": "1-sqrt"}
    held_out = curve(wsd, steps=800)
    errors = L.prediction_errors(law, held_out)
    assert abs(errors["final error %"]) < 1e-6 and errors["mean error %"] < 1e-6


def test_lr_history_continues_the_run_it_starts_from():
    base = E.base_run("smoke")
    run = E.continual_run("x", "c", "strong", "smoke")
    history = L.lr_history(run)
    n_base, n_own = sum(L.stage_steps(base.config)), sum(L.stage_steps(run.config))
    assert len(history) == n_base + n_own
    np.testing.assert_array_equal(history[:n_base], L.lr_history(base))
    anneal = next(r for r in E.infinite_schedules("smoke") if r.name == "anneal-wsd-chunk2")
    main = anneal.needs[0]
    head = sum(L.stage_steps(main.config)[:3])  # chunk1, chunk1-tail, chunk2
    assert len(L.lr_history(anneal)) == head + sum(L.stage_steps(anneal.config))


# -- bad inputs --------------------------------------------------------------------------------------

def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match=r"^runs: .* at least 6 evaluations, got 4"):
        L.fit_schedule_law([curve(COSINE, steps=40)])
    other = curve(CONSTANT)
    other.loss_set = "other"
    with pytest.raises(ValueError, match="^loss_set: "):
        L.fit_schedule_law([curve(COSINE), other])
    with pytest.raises(ValueError, match="^steps: the law takes at most"):
        TRUE.plan_loss([(CONSTANT, L.MAX_STEPS + 1)])
    cfg = RunConfig.from_dict({"stages": [{"name": "a", "data": {"en-man": 1}, "tokens": 4096,
                                           "init_from": "ckpt/model.pt"}]})
    with pytest.raises(ValueError, match=r"^stages\[0\]\.init_from: .* checkpoint file"):
        L.lr_history(cfg)
    with pytest.raises(ValueError, match="^init_from: run .* is not in the run store"):
        L.lr_history(E.continual_run("x", "c", "strong", "smoke").config)
    law = R.fit_replay_law(sweep_finals(), "strong")
    with pytest.raises(ValueError, match="^tolerance: must be >= 0"):
        law.smallest_fraction(-0.1)
    with pytest.raises(ValueError, match="^fractions: .* at least 4 .* got 3"):
        R.fit_replay_law(sweep_finals().iloc[:3], "strong")


# -- the replay law ----------------------------------------------------------------------------------

def test_replay_law_recovers_a_synthetic_sweep_and_picks_the_fraction():
    finals = sweep_finals()
    law = R.fit_replay_law(finals, "strong")
    np.testing.assert_allclose(law.d0_params, (3.6, -0.3, 0.05), rtol=0.02)
    np.testing.assert_allclose(law.d1_params, (3.2, 0.4), rtol=1e-9)
    forgetting = finals["D0"] - finals["base_D0"]  # 0.70 at 0%, falling to 0.17 at 50%
    for tol in (0.3, 0.5):
        r = law.smallest_fraction(tol)
        assert law.forgetting(r) == pytest.approx(tol, abs=1e-9)
        assert forgetting[finals["replay"] < r].min() > tol - 0.01
    assert law.smallest_fraction(1.0) == 0.0  # no replay needed
    assert law.smallest_fraction(0.05) is None  # beyond 50%: not extrapolated
    assert "D1 costs +" in law.answer(0.3) and "not extrapolated" in law.answer(0.05)
    loo = R.replay_loo(finals, "strong")
    assert list(loo.index) == ["0%", "1%", "5%", "10%", "25%", "50%"]
    assert loo.loc[loo["inside"], "D0 error"].abs().max() < 0.01 and loo["D1 error"].abs().max() < 1e-9
    assert R.replay_table({"strong": law}, 0.3).loc["strong", "fraction for +0.3"] == pytest.approx(
        law.smallest_fraction(0.3))


# -- validation on a run store -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """A run store holding every run of the smoke plan, finished, with losses the law generated."""
    store = RunStore(tmp_path_factory.mktemp("runs"))
    law = L.ScheduleLaw(**{**TRUE.__dict__, "lr_ref": 3e-3})
    for run in L.plan_runs(L.validation_plan("smoke")):
        write_fake_run(store, run, law)
    return store


def test_validation_on_a_store_predicts_every_held_out_run(fake_store):
    plan = L.validation_plan("smoke")
    v = L.validate_scale("smoke", fake_store)
    assert v.skipped == [] and set(v.laws) == {family.name for family in plan}
    held = {f"{r.experiment}/{r.name}" for family in plan for r in family.held_out}
    assert set(v.table.index) == held and len(held) >= 4
    assert v.table["final error %"].abs().max() < 1e-4 and v.table["mean error %"].max() < 1e-4
    # the D0 family predicts runs that switched to D1: the table says they were trained on other data
    d0 = v.table[v.table["family"] == "continual, D0 loss"]
    assert d0["same data"].tolist() == [True, False, False]
    params = L.laws_table(v)
    assert params.loc["from scratch, three chunks", "alpha"] == pytest.approx(0.5)
    assert "infinite/sched-cosine" in params.loc["from scratch, three chunks", "fitted on"]


def test_validation_skips_a_family_whose_fit_runs_are_missing(fake_store):
    plan = L.validation_plan("smoke")
    frame = load_runs(plan[0].held_out, fake_store)
    v = L.validate(plan[:1], frame, fake_store)
    assert not v.laws and len(v.skipped) == 1 and "has no evaluation" in v.skipped[0]


def test_explorer_law_needs_the_fit_runs(fake_store, tmp_path):
    law = L.explorer_law("smoke", fake_store)
    assert law.runs == ("infinite/sched-cosine", "infinite/sched-wsd") and law.alpha == 0.5
    assert math.isnan(law.loss(np.zeros(3), [1])[0])  # no LR applied yet: no prediction


# -- a run store that lacks the runs, or holds them for another device ---------------------------------------

LAW_CASES = [
    ("validate_scale, a store that does not exist", lambda tmp: L.validate_scale("smoke", tmp / "nowhere"),
     r"^root: the run store .*nowhere does not exist; give the folder the runs were trained into"),
    ("validate_scale, an empty store", lambda tmp: L.validate_scale("smoke", tmp),
     r"^root: the run store .* holds none of the \d+ finished runs the validation plan of scale "
     r"'smoke' needs \(infinite/sched-cosine, .*\); train them: `plan = "
     r"laws\.validation_plan\('smoke', 'auto'\); runner\.run_all\(laws\.plan_runs\(plan\), '.*'\)`"),
    ("explorer_law, a store that does not exist", lambda tmp: L.explorer_law("smoke", tmp / "nowhere"),
     r"^root: the run store .*nowhere does not exist"),
]


@pytest.mark.parametrize("name, call, words", LAW_CASES, ids=[c[0] for c in LAW_CASES])
def test_a_law_without_its_runs_is_an_error_naming_them(name, call, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        call(tmp_path)


def test_explorer_law_without_its_runs_is_none_with_a_warning_naming_them(tmp_path):
    with pytest.warns(UserWarning, match=r"^explorer_law: runs: infinite/sched-cosine-\w+, "
                      r"infinite/sched-wsd-\w+ not finished in the run store .*: the law is fitted on them, "
                      r"so there is none; train them: .*runner\.run_all\(plan\[0\]\.fit, "):
        assert L.explorer_law("smoke", tmp_path) is None


def test_validation_names_the_runs_not_finished(fake_store, tmp_path):
    store = RunStore(shutil.copytree(fake_store.root, tmp_path / "runs"))
    held = L.validation_plan("smoke")[0].held_out[0]
    (store.path(held.experiment, held.run_id) / "DONE").unlink()
    v = L.validate_scale("smoke", store)
    assert v.skipped == [f"from scratch, three chunks: runs: {held.experiment}/{held.run_id} not finished in "
                         f"the run store {store.root}"]


def test_runs_trained_for_the_cpu_are_found_with_device_auto(tmp_path):
    store = RunStore(tmp_path)
    law = L.ScheduleLaw(**{**TRUE.__dict__, "lr_ref": 3e-3})
    for run in L.plan_runs(L.validation_plan("smoke", "cpu")):
        write_fake_run(store, run, law)
    v = L.validate_scale("smoke", store)  # device="auto"
    assert v.skipped == [] and len(v.laws) == len(L.validation_plan("smoke"))
    assert L.explorer_law("smoke", store).alpha == 0.5
