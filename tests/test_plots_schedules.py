"""plot_schedules draws exactly the schedules' LR values, against tokens, with stage boundaries."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from cptlab import schedules as S
from cptlab import viz
from cptlab.study import paper

COSINE = dict(kind="cosine", max_lr=1.0, min_lr=0.1, warmup=0.1)
INFINITE = dict(kind="infinite_cosine", max_lr=1.0, min_lr=0.1, const_lr=0.4, warmup=0.1, cooldown=0.5,
                anneal=0.2)


def lines_by_label(ax):
    return {ln.get_label(): ln for ln in ax.get_lines()}


def test_plot_schedules_data_boundaries_and_labels():
    repeated = [(COSINE, 50), (COSINE, 50)]
    infinite = S.multi_stage(INFINITE, 2, 50)
    fig = viz.plot_schedules({"repeated cosine": repeated, "infinite cosine": infinite},
                               tokens_per_step=1000)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    lines = lines_by_label(ax)
    x, y = lines["repeated cosine"].get_data()
    np.testing.assert_array_equal(x, np.arange(100) * 1000)
    assert y[0] == 0.0 and y[5] == pytest.approx(1.0) and y[49] == pytest.approx(0.1)  # T_w = 5
    assert y[50] == 0.0  # the second stage re-warms
    _, y_inf = lines["infinite cosine"].get_data()
    assert y_inf[49] == pytest.approx(0.4) and y_inf[50] == pytest.approx(0.4)  # no re-warm
    assert y_inf[99] == pytest.approx(0.1)
    # one dotted boundary at the shared stage start (50 steps = 50k tokens), labelled once
    boundary = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert len(boundary) == 1 and list(boundary[0].get_xdata()) == [50_000, 50_000]
    assert boundary[0].get_label() == "stage boundary"
    assert ax.get_xlabel() == "tokens" and ax.get_ylabel() == "learning rate"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["repeated cosine", "infinite cosine", "stage boundary"]


def test_plot_schedules_into_given_axes_per_label_scale_and_steps_axis():
    fig = Figure()
    ax = fig.add_subplot()
    out = viz.plot_schedules({"a": [(COSINE, 20)], "b": [(COSINE, 10), (COSINE, 10)]},
                               tokens_per_step={"a": 2.0, "b": 4.0}, ax=ax, title="t")
    assert out is fig and ax.get_title() == "t"
    lines = lines_by_label(ax)
    assert lines["a"].get_xdata()[-1] == 38.0 and lines["b"].get_xdata()[-1] == 76.0
    assert [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"] == [40.0]
    steps = viz.plot_schedules({"a": [(COSINE, 20)]})
    assert steps.axes[0].get_xlabel() == "step"


def test_figure_saves_as_png(tmp_path):
    plans = {name: S.multi_stage(spec, 3, 100) for name, spec in paper.SCHEDULES_405M.items()}
    fig = viz.plot_schedules(plans, tokens_per_step=2.26e6)
    path = tmp_path / "schedules.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_tokens():
    assert [viz.format_tokens(n) for n in (0, 512, 65_536, 2.26e6, 300e9, 1.2e12)] == [
        "0", "512", "65.54k", "2.26M", "300B", "1.2T"]
