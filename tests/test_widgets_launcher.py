"""RunLauncher and ResultsBrowser through their state: set controls, click, wait for the thread, read the
figure's data and the table. Everything trains at the smoke scale in the session's run store."""

import json

import numpy as np
import pytest
import torch

from cptlab import schedules as S
from cptlab.analysis import cpt_law, cpt_plan, laws
from cptlab.analysis import metrics as M
from cptlab.analysis.runs import eval_frame, load_runs
from cptlab.study import experiments as E
from cptlab.study import paper, runner
from cptlab.study.scales import SCALES
from cptlab.training.store import RunStore, runs_root
from cptlab.training.train import train
from cptlab.ui import ResultsBrowser, RunLauncher

SHIFT = "strong"


@pytest.fixture(scope="module")
def root():
    """The session's run store with the smoke base model, the strong shift's 0% and 25% replay runs and
    its union baseline (shared with the notebooks under nbmake, which reuse them)."""
    path = runs_root()
    sweep = E.replay_sweep(SHIFT, "smoke")
    runs = [r for r in sweep if r.labels.get("replay") in (0.0, 0.25) or r.labels["role"] == "union"]
    runner.run_all(runs, path, workers=1, log=lambda _: None)
    return path


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _comparable(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def launcher(root, **controls) -> RunLauncher:
    la = RunLauncher(scale="smoke")
    with la.schedule.hold():
        for name, value in controls.items():
            control = getattr(la, name, None) or getattr(la.schedule, name)
            control.value = value
    return la


def test_constructing_and_displaying_trains_nothing(tmp_path):
    la = RunLauncher(scale="smoke", root=tmp_path)
    assert "application/vnd.jupyter.widget-view+json" in la._repr_mimebundle_()
    assert la.thread is None and not any(tmp_path.iterdir())
    assert "new: Train trains it (after the base model" in la.status.value
    # the schedule preview is the continual stage's exact LR per step, before anything trains
    s = SCALES["smoke"]
    n_steps = s.new_tokens // (s.seq_len * s.batch_size)
    def planned() -> list[float]:
        lr_at = S.build(la.run().config.stages[0].schedule.to_spec(), n_steps)
        return [lr_at(t) for t in range(n_steps)]

    x, y = la.schedule.lr_curve()
    np.testing.assert_allclose(y, planned(), rtol=1e-12)
    assert x[1] == s.seq_len * s.batch_size and y.max() == pytest.approx(s.max_lr, rel=0.01)
    before = la.schedule.image.value
    la.schedule.max_lr.value = 1e-2
    x, y = la.schedule.lr_curve()
    np.testing.assert_allclose(y, planned(), rtol=1e-12)
    assert y.max() == pytest.approx(1e-2, rel=0.01) and la.schedule.image.value != before
    assert la.run().config.stages[0].schedule.max_lr == pytest.approx(1e-2)


def test_a_stored_run_of_the_same_config_is_loaded_not_trained(root):
    la = launcher(root, replay=25.0)
    run = la.run()
    assert (run.experiment, run.name) == ("replay", f"{SHIFT}-replay0.25")
    assert "Train loads it" in la.status.value
    la.train_button.click()
    assert la.thread is None and "already trained" in la.status.value
    evals = [r for r in _metrics(runner.run_dir(run, root)) if "val" in r]
    x, y = la.curves()["D0"]
    np.testing.assert_array_equal(x, [r["tokens"] for r in evals])
    np.testing.assert_array_equal(y, [r["val"][paper.D0] for r in evals])
    assert la.progress.value == 1.0 and len(la.curves()["base D0"][0]) > 0


def test_train_draws_every_evaluation_live(root):
    la = launcher(root, replay=10.0)
    run = la.run()
    assert run.experiment == "launcher" and not runner.is_done(run, root)
    seen = []  # the number of D0 points plotted when each evaluation line arrives
    la.listeners.append(lambda rec: seen.append(len(la.curves()["D0"][0])) if "val" in rec else None)
    la.train_button.click()
    assert la.thread is not None and la.stop_button.disabled is False
    assert la.wait(300), "the run did not finish"
    assert la.error is None, la.error
    assert la.result.status == "done" and runner.is_done(run, root)
    lines = _metrics(runner.run_dir(run, root))
    evals = [r for r in lines if "val" in r]
    assert seen == list(range(1, len(evals) + 1))
    curves = la.curves()
    d1 = paper.SHIFTS[SHIFT]
    np.testing.assert_array_equal(curves["D0"][0], [r["tokens"] for r in evals])
    np.testing.assert_array_equal(curves["D0"][1], [r["val"][paper.D0] for r in evals])
    np.testing.assert_array_equal(curves["D1"][1], [r["val"][d1] for r in evals])
    np.testing.assert_array_equal(curves["lr"][1], [r["lr"] for r in lines])
    assert la.progress.value == 1.0 and "tokens/s" in la.progress_text.value
    assert "done" in la.status.value and la.stop_button.disabled and not la.train_button.disabled
    labels = json.loads((runner.run_dir(run, root) / "labels.json").read_text())
    assert labels["experiment"] == "launcher" and labels["replay"] == 0.1


def test_stop_then_train_resumes_to_the_uninterrupted_result(root, tmp_path):
    la = launcher(root, replay=0.0, kind="wsd")
    run = la.run()
    la.listeners.append(lambda rec: la.stop_button.click() if len(la.records) == 3 else None)
    la.train_button.click()
    assert la.wait(300)
    assert la.error is None, la.error
    assert la.result.status == "stopped" and "Train resumes" in la.status.value
    path = runner.run_dir(run, root)
    assert not (path / "DONE").exists() and list((path / "checkpoints").glob("step-*.pt"))
    la.listeners.clear()
    la.train_button.click()
    assert la.wait(300)
    assert la.error is None, la.error
    assert la.result.status == "done"
    assert train(run.config, tmp_path / "uninterrupted", quiet=True, runs_root=root).status == "done"
    resumed, reference = _metrics(path), _metrics(tmp_path / "uninterrupted")
    assert _comparable(resumed) == _comparable(reference)
    evals = [r for r in reference if "val" in r]
    np.testing.assert_array_equal(la.curves()["D0"][1], [r["val"][paper.D0] for r in evals])


def test_the_laws_prediction_is_drawn_before_train(tmp_path):
    from test_laws import TRUE, write_fake_run  # finished runs whose losses the law generated

    store = RunStore(tmp_path / "runs")
    zero = E.max_lr_ablation(SHIFT, "smoke")  # 0% replay: cosine at 0.5x, 1x, 2x max LR, constants
    quarter = [r for r in E.replay_sweep(SHIFT, "smoke") if r.labels.get("replay") == 0.25]
    for run in (*zero, *quarter):
        write_fake_run(store, run, TRUE)
    la = RunLauncher(scale="smoke", shift=SHIFT, replay=0.0, root=store.root)
    la.schedule.kind.value = "wsd"  # no run of the store has this schedule: a prediction, not a fit
    run = la.run()
    assert run.experiment == "launcher" and set(la.prediction) == {"D0", "D1"}
    for key in ("D0", "D1"):
        x, y = la.prediction[key]
        true_x, true_y = laws.predict_run(TRUE, run)
        np.testing.assert_array_equal(x, true_x)
        np.testing.assert_allclose(y, true_y, rtol=1e-6)  # the fit found the law that made the runs
        np.testing.assert_array_equal(la.curves()[f"predicted {key}"][1], y)
    text = la.prediction_text.value
    assert "fitted on replay/strong-replay0, max_lr/strong-constant-min" in text
    assert "(0% replay, as this run)" in text
    la.replay.value = 25.0
    assert "fitted on replay/strong-replay0.25 (25% replay, as this run)" in la.prediction_text.value
    la.schedule.kind.value = "cosine"  # the sweep's own 25% run: never fitted on itself
    assert la.run().name == "strong-replay0.25" and "Train loads it" in la.status.value
    assert "0% replay, the nearest to this run&#x27;s 25%" in la.prediction_text.value
    empty = RunLauncher(scale="smoke", shift=SHIFT, root=tmp_path / "empty")
    assert empty.prediction == {} and "no prediction: the run store has no finished" in \
        empty.prediction_text.value


def test_the_cpt_law_predicts_and_suggests_before_train(tmp_path):
    from test_cpt_law import TRUE, write_cpt_run  # finished runs whose losses the CPT law generated

    store = RunStore(tmp_path / "runs")
    fit = cpt_law.fit_runs(SHIFT, "smoke")
    for run in (E.base_run("smoke"), *fit):
        write_cpt_run(store, run)
    la = RunLauncher(scale="smoke", shift=SHIFT, replay=0.1, root=store.root)
    assert "continual-pre-training law fitted on replay/strong-replay0" in la.prediction_text.value
    run = la.run()
    truth = cpt_plan.predict_run(TRUE, run)
    for key in ("D0", "D1"):
        np.testing.assert_array_equal(la.prediction[key][0], truth[key][0])
        np.testing.assert_allclose(la.prediction[key][1], truth[key][1], rtol=2e-3)  # 10%: not fitted on
        np.testing.assert_array_equal(la.curves()[f"predicted {key}"][1], la.prediction[key][1])
    la.d0_weight.value = 1.0  # only D0 counts: as much replay as the planner allows
    la.suggest_button.click()
    assert la.plan is not None and la.plan.replay == max(cpt_plan.REPLAY_GRID)
    assert la.replay.value == 100 * la.plan.replay and la.schedule.max_lr.value == la.plan.max_lr
    assert la.schedule.kind.value == "cosine" and "suggested: 90% replay" in la.plan_text.value
    assert la.run().labels["replay"] == la.plan.replay and len(la.prediction) == 2
    empty = RunLauncher(scale="smoke", shift=SHIFT, root=tmp_path / "empty")
    empty.suggest_button.click()
    assert empty.plan is None and "no suggestion: the continual-pre-training law needs" in \
        empty.plan_text.value


def test_bad_values_show_in_the_status_and_train_nothing(root):
    la = launcher(root)
    la.schedule.min_lr.value = 1e-1  # above max LR
    assert la.error is not None and "min_lr" in la.status.value
    la.train_button.click()
    assert la.thread is None and "min_lr" in la.status.value and "color:#b00" in la.status.value
    with pytest.raises(ValueError, match="min_lr"):
        la.run()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_run_shows_its_error(root):
    la = launcher(root, device="cuda")
    la.train_button.click()
    assert la.wait(300)
    assert "CUDA is not available" in la.error and "CUDA is not available" in la.status.value
    assert not la.train_button.disabled


def test_results_browser_overlays_runs_with_references(root):
    sweep = E.replay_sweep(SHIFT, "smoke")
    chosen = [r for r in sweep if r.labels.get("replay") in (0.0, 0.25)]
    base, union = E.base_run("smoke"), next(r for r in sweep if r.labels["role"] == "union")
    br = ResultsBrowser(root, experiment="replay", shift=SHIFT)
    assert "application/vnd.jupyter.widget-view+json" in br._repr_mimebundle_()
    ids = [f"{r.experiment}/{r.run_id}" for r in chosen]
    assert set(ids) <= {rid for _, rid in br.runs.options}
    br.runs.value = tuple(ids)
    curves = br.curves()
    names = [r.name for r in chosen]
    assert set(curves["D0"]) == {*names, "base model", "union baseline"}
    d1 = paper.SHIFTS[SHIFT]
    for run in chosen:
        df = eval_frame(runner.run_dir(run, root)).sort_values("tokens")
        x, y = curves["D0"][run.name]
        np.testing.assert_array_equal(x, df["tokens"])
        np.testing.assert_allclose(y, df[f"val_{paper.D0}"])
        np.testing.assert_allclose(curves["D1"][run.name][1], df[f"val_{d1}"])
        np.testing.assert_allclose(curves["avg"][run.name][1], (df[f"val_{paper.D0}"] + df[f"val_{d1}"]) / 2)
    base_df = eval_frame(runner.run_dir(base, root)).sort_values("tokens")
    np.testing.assert_allclose(curves["D1"]["base model"][1], base_df[f"val_{d1}"])

    expected = M.add_forgetting(M.final_losses(load_runs([base, union, *chosen], root)))
    table = br.finals.set_index("name")
    assert set(table.index) == {*names, "base", union.name}
    for _, row in expected.iterrows():
        assert table.loc[row["name"], "D0"] == pytest.approx(row["D0"])
        if row["role"] != "base":
            assert table.loc[row["name"], "avg"] == pytest.approx(row["avg"])
            assert table.loc[row["name"], "forgetting"] == pytest.approx(row["forgetting"])
    assert table.loc["base", "D1"] == pytest.approx(base_df[f"val_{d1}"].tail(M.K_FINAL).mean())
    assert table.loc[f"{SHIFT}-replay0.25", "replay"] == "25%" and "<table" in br.table.value

    br.references.value = False
    assert set(br.curves()["D0"]) == set(names) and set(br.finals["name"]) == set(names)
    br.runs.value = ids[:1]
    assert set(br.curves()["D0"]) == {names[0]} and len(br.finals) == 1
    picked = ResultsBrowser(root, experiment="replay", shift=SHIFT, select=names[1:])
    assert picked.runs.value == tuple(ids[1:]) and picked.references.value
    assert set(picked.curves()["D0"]) == {names[1], "base model", "union baseline"}


def test_results_browser_on_an_empty_store(tmp_path):
    br = ResultsBrowser(tmp_path)
    assert br.runs.options == () and "no runs" in br.status.value and br.finals.empty
