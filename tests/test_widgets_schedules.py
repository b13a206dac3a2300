"""ScheduleExplorer through its state: set controls, check the plotted LR data against the formulas."""

import math

import numpy as np
import pytest

from cptlab import schedules as S
from cptlab.ui import ScheduleExplorer

STEPS = 100  # plot resolution per stage, small to keep the tests fast


@pytest.fixture
def ex():
    return ScheduleExplorer(kind="cosine", compare=(), n_stages=2, tokens_per_stage=1e6,
                            steps_per_stage=STEPS)


def test_plotted_curve_is_the_composed_schedule(ex):
    x, y = ex.lr_curve()
    plan = ex.current_schedule()
    assert [n for _, n in plan] == [STEPS, STEPS]
    np.testing.assert_array_equal(y, S.lr_values(plan))
    np.testing.assert_allclose(x, np.arange(2 * STEPS) * 1e6 / STEPS)
    assert ex.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert ex.error is None and "2 stages" in ex.status.value


def test_sliders_move_the_curve_as_the_formulas_say(ex):
    with ex.hold():
        ex.max_lr.value, ex.min_lr.value, ex.warmup.value = 1e-3, 1e-4, 10.0  # T_w = 10 steps
    _, y = ex.lr_curve()
    assert y[0] == 0.0 and y[5] == pytest.approx(5e-4, rel=1e-12) and y[10] == pytest.approx(1e-3, rel=1e-12)
    assert y[99] == pytest.approx(1e-4, rel=1e-12)
    assert y[100] == 0.0 and y[110] == pytest.approx(1e-3, rel=1e-12)  # the second stage re-warms
    ex.warmup.value = 0.0
    _, y = ex.lr_curve()
    assert y[0] == pytest.approx(1e-3) and y[100] == pytest.approx(1e-3)
    ex.n_stages.value = 3
    x, y = ex.lr_curve()
    assert len(y) == 3 * STEPS
    ex.tokens_per_stage.value = 2e9
    x, _ = ex.lr_curve()
    assert x[-1] == pytest.approx((3 * STEPS - 1) * 2e9 / STEPS)


def test_infinite_schedule_const_and_anneal(ex):
    with ex.hold():
        ex.kind.value = "infinite_inv_sqrt"
        ex.max_lr.value, ex.min_lr.value, ex.const_lr.value = 1e-3, 1e-4, 4e-4
        ex.warmup.value, ex.cooldown.value, ex.anneal.value, ex.alpha.value = 0.0, 50.0, 20.0, 3.0
    _, y = ex.lr_curve()
    # stage 0: cooldown over 50 steps (tau = 0.5 at 25), then const; stage 1 continues, anneals from 180
    h = lambda x: 1 / math.sqrt(1 + 3 * x) - 1
    assert y[25] == pytest.approx(1e-3 + (4e-4 - 1e-3) * h(0.5) / h(1), rel=1e-12)
    assert y[50] == pytest.approx(4e-4, rel=1e-12) and y[99] == pytest.approx(4e-4, rel=1e-12)
    assert y[100] == pytest.approx(4e-4, rel=1e-12) and y[180] == pytest.approx(4e-4, rel=1e-12)
    assert y[199] == pytest.approx(1e-4, rel=1e-12)
    ex.const_lr.value = 2e-4
    _, y = ex.lr_curve()
    assert y[150] == pytest.approx(2e-4, rel=1e-12)
    ex.anneal.value = 0.0
    _, y = ex.lr_curve()
    assert y[199] == pytest.approx(2e-4, rel=1e-12)


def test_wsd_decay_shape(ex):
    with ex.hold():
        ex.kind.value = "wsd"
        ex.max_lr.value, ex.min_lr.value, ex.warmup.value, ex.decay.value = 1e-3, 1e-4, 0.0, 10.0
        ex.decay_shape.value = "linear"
    _, y = ex.lr_curve()  # decay from step 190 to 199 of the last stage; p = 1/3 at 193
    assert y[100] == 1e-3 and y[189] == 1e-3
    assert y[193] == pytest.approx(1e-3 - 9e-4 / 3, rel=1e-12)
    ex.decay_shape.value = "1-sqrt"
    _, y = ex.lr_curve()
    assert y[193] == pytest.approx(1e-4 + 9e-4 * (1 - math.sqrt(1 / 3)), rel=1e-12)


def test_preset_button(ex):
    ex.max_lr.value = 1e-2
    ex.preset_button.click()
    assert (ex.max_lr.value, ex.min_lr.value, ex.const_lr.value) == (3e-4, 3e-5, 1.65e-4)
    assert (ex.warmup.value, ex.cooldown.value, ex.alpha.value) == (1.0, 60.0, 10.0)
    assert ex.n_stages.value == 3 and ex.tokens_per_stage.value == 100e9
    x, y = ex.lr_curve()
    assert y.max() == pytest.approx(3e-4) and y[-1] == pytest.approx(3e-5)
    assert x[STEPS] == pytest.approx(100e9)
    ex.kind.value = "infinite_cosine"
    _, y = ex.lr_curve()
    assert y[1] == pytest.approx(3e-4) and y[61] == pytest.approx(1.65e-4)  # T_w = 1, T_cd = 60 steps


def test_compare_overlay_and_pinned_schedules(ex):
    ex.compare.value = ("infinite_cosine", "wsd", "cosine")
    curves = ex.curves()
    assert set(curves) == {"cosine", "infinite_cosine", "wsd"}  # the selected kind is not drawn twice
    np.testing.assert_array_equal(curves["wsd"][1], S.lr_values(ex.current_schedule("wsd")))
    ex.add_button.click()
    pinned = "#1 cosine max 0.0003"
    assert pinned in ex.curves()
    before = ex.curves()[pinned][1].copy()
    ex.max_lr.value = 1e-3
    curves = ex.curves()
    np.testing.assert_array_equal(curves[pinned][1], before)  # a pinned schedule stays as it was
    assert curves["cosine"][1].max() == pytest.approx(1e-3)
    ex.clear_button.click()
    assert pinned not in ex.curves() and ex.pinned == []


def test_bad_values_show_the_error_and_keep_the_last_figure(ex):
    _, before = ex.lr_curve()
    ex.min_lr.value = 1e-2
    assert ex.error is not None and "min_lr" in ex.error and "min_lr" in ex.status.value
    np.testing.assert_array_equal(ex.lr_curve()[1], before)
    ex.add_button.click()
    assert ex.pinned == []  # nothing pinned while invalid
    ex.min_lr.value = 1e-5
    assert ex.error is None and ex.lr_curve()[1][-1] == pytest.approx(1e-5)


def test_widget_displays():
    ex = ScheduleExplorer(steps_per_stage=20)
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert set(ex.curves()) == {"cosine", "wsd", "infinite_cosine"}  # default: the paper's comparison


def test_a_law_draws_each_schedules_predicted_loss_under_it():
    from cptlab.analysis.laws import ScheduleLaw

    law = ScheduleLaw(L0=3.0, A=2.0, alpha=0.5, C=0.002, lam=0.99, lr_ref=1e-3, loss_set="en-docs",
                      runs=("infinite/sched-cosine", "infinite/sched-wsd"), tokens_per_step=4096, n_points=50,
                      rmse=0.03)
    ex = ScheduleExplorer(kind="wsd", compare=("cosine",), n_stages=2, tokens_per_stage=4096 * 300,
                          steps_per_stage=STEPS)
    assert ex.prediction == {} and ex.prediction_label.value == ""
    with ex.hold():
        ex.max_lr.value, ex.min_lr.value, ex.decay.value = 1e-3, 1e-4, 20.0
    ex.set_law(law)
    assert set(ex.prediction) == {"wsd", "cosine"} and len(ex.figure.axes) == 2
    assert "fitted on infinite/sched-cosine, infinite/sched-wsd" in ex.prediction_label.value
    # the real steps are tokens over the law's tokens per step (300 a stage), not the plot's resolution
    plan = S.multi_stage(ex.spec("wsd"), 2, 300)
    x, y = ex.prediction["wsd"]
    np.testing.assert_allclose(y, law.plan_loss(plan))
    np.testing.assert_allclose(x, np.arange(1, 601) * 4096)
    cosine = S.multi_stage(ex.spec("cosine"), 2, 300)
    np.testing.assert_allclose(ex.prediction["cosine"][1], law.plan_loss(cosine))
    ex.add_button.click()
    assert "#1 wsd max 0.001" in ex.prediction
    before = ex.prediction["wsd"][1][-1]
    ex.decay.value = 0.0  # no anneal at the end: a higher final loss
    assert ex.prediction["wsd"][1][-1] > before
    ex.tokens_per_stage.value = 1e12  # far more steps than the law computes: said, not drawn
    assert ex.prediction == {} and "no predicted loss" in ex.prediction_label.value
    ex.set_law(None)
    assert ex.prediction == {} and ex.prediction_label.value == "" and len(ex.figure.axes) == 1
