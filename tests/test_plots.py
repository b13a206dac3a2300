"""The figures drawn from runs: exactly the given losses, against tokens, with the switches marked.

The frames are made up here with the columns ``cptlab.analysis.runs.load_runs`` gives (no run directory is
read).
"""

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cptlab import viz

B0, B1 = 1000, 500
BASE_TOKENS = [250, 500, 750, 1000]
NEW_TOKENS = [1000, 1250, 1500]  # a continual run's first evaluation is the base model's last
BASE_LOSS = {"en-man": [6.0, 5.0, 4.5, 4.0], "en-pydoc": [6.5, 6.0, 5.8, 5.6], "de-man": [7.0, 6.8, 6.7, 6.6]}
D1 = {"weak": "en-pydoc", "strong": "de-man"}


def run_frame(name, role, tokens, losses, **labels):
    """The eval lines of one run: ``losses`` maps an eval set to one loss per token count."""
    rows = []
    for i, t in enumerate(tokens):
        row = {"step": i, "tokens": t, "stage": role, "lr": 1e-3}
        row.update({f"val_{s}": values[i] for s, values in losses.items()})
        row.update(experiment=role, name=name, role=role, d0="en-man", **labels)
        row.update(run_id=f"{name}-{labels.get('seed', 0)}", done=True)
        rows.append(row)
    return pd.DataFrame(rows)


def base():
    return run_frame("base", "base", BASE_TOKENS, BASE_LOSS, seed=0, compute_tokens=B0)


def continual(name, shift="weak", d0_end=4.3, d1_end=5.0, **labels):
    """A continual run from the base: D0 loss rises to ``d0_end``, D1 loss falls to ``d1_end``."""
    d1 = labels.pop("d1", D1.get(shift))
    start = BASE_LOSS[d1][-1]
    losses = {d1: [start, (start + d1_end) / 2, d1_end], "en-man": [4.0, (4.0 + d0_end) / 2, d0_end]}
    defaults = dict(shift=shift, d1=d1, replay=0.0, seed=0, schedule="cosine", max_lr=3e-3, warmup=0.01,
                    switch_tokens=B0, compute_tokens=B0 + B1)
    return run_frame(name, "continual", NEW_TOKENS, losses, **{**defaults, **labels})


def union(shift="weak", compute=B0 + B1, d0_end=4.2, d1_end=5.1):
    tokens = list(np.linspace(compute / 4, compute, 4).astype(int))
    losses = {"en-man": [6.0, 5.0, 4.5, d0_end], D1[shift]: [6.5, 5.6, 5.3, d1_end]}
    return run_frame(f"union-{shift}-{compute}", "union", tokens, losses, shift=shift, d1=D1[shift], seed=0,
                     compute_tokens=compute)


def frame(*parts):
    return pd.concat(parts, ignore_index=True)


def lines(ax):
    """The labelled lines of an axes, by label."""
    return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def data(line):
    x, y = line.get_data()
    return list(np.asarray(x, dtype=float)), list(np.asarray(y, dtype=float))


def switch_xs(ax):
    """The x of every dotted vertical line (the switch markers)."""
    return sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":")


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def assert_labelled(fig, xlabel="tokens"):
    assert isinstance(fig, Figure)
    for ax in fig.axes:
        assert ax.get_xlabel() == xlabel and ax.get_ylabel()
    assert fig.axes[-1].get_legend() is not None


# -- figure 2 ----------------------------------------------------------------------------------------

def warmup_frame():
    runs = [continual(f"weak-warmup{w:g}", warmup=w, d0_end=4.2 + w * 10, d1_end=5.0 + w)
            for w in (0.0, 0.005, 0.01, 0.02)]
    return frame(base(), *runs)


def test_plot_warmup_draws_each_run_and_the_base_on_two_panels_with_the_switch():
    fig = viz.plot_warmup(warmup_frame())
    assert_labelled(fig)
    d0_ax, d1_ax = fig.axes
    assert [d0_ax.get_title(), d1_ax.get_title()] == ["D0: en-man", "D1: en-pydoc"]
    assert "weak shift: en-man → en-pydoc" in fig.get_suptitle()
    assert data(lines(d0_ax)["warmup 2.0%"]) == ([1000, 1250, 1500], [4.0, 4.2, 4.4])
    assert data(lines(d1_ax)["warmup 0.5%"]) == ([1000, 1250, 1500], [5.6, 5.3025, 5.005])
    assert data(lines(d1_ax)["base model (D0 only)"]) == (BASE_TOKENS, BASE_LOSS["en-pydoc"])
    assert switch_xs(d0_ax) == switch_xs(d1_ax) == [B0]
    assert legend_texts(d1_ax) == ["base model (D0 only)", "warmup 0.0%", "warmup 0.5%", "warmup 1.0%",
                                   "warmup 2.0%", "switch to D1"]
    low, high = d0_ax.get_ylim()  # fitted to the curves after the switch: the base's start runs off the top
    assert low < 4.0 and 4.4 < high < 6.0


def test_plot_warmup_names_missing_runs_and_can_leave_out_the_base():
    df = warmup_frame()
    fig = viz.plot_warmup(df[df["warmup"] != 0.005], show_base=False)
    assert "missing: warmup 0.5%" in fig.get_suptitle()
    assert set(lines(fig.axes[0])) == {"warmup 0.0%", "warmup 1.0%", "warmup 2.0%", "switch to D1"}


# -- figure 3 ----------------------------------------------------------------------------------------

def max_lr_frame():
    constant = dict(schedule="constant", warmup=0.0)
    runs = [continual("weak-constant-min", max_lr=3e-4, variant="constant at min LR", **constant),
            continual("weak-rewarm-constant", max_lr=3e-3, variant="re-warm, no re-decay", **constant)]
    runs += [continual(f"weak-maxlr{f:g}x", max_lr=3e-3 * f, d0_end=4.0 + f,
                       variant=f"re-warm, max {3e-3 * f:g}") for f in (2.0, 0.5, 1.0)]
    return frame(base(), union(), *runs)


def test_plot_max_lr_orders_variants_and_draws_the_union_final_loss():
    fig = viz.plot_max_lr(max_lr_frame())
    assert_labelled(fig)
    d0_ax, d1_ax = fig.axes
    drawn = lines(d0_ax)
    assert list(drawn) == ["base model (D0 only)", "constant at min LR", "re-warm, no re-decay",
                           "re-warm, max 0.0015", "re-warm, max 0.003", "re-warm, max 0.006",
                           "union baseline (final)", "switch to D1"]
    assert data(drawn["re-warm, max 0.006"]) == ([1000, 1250, 1500], [4.0, 5.0, 6.0])
    assert drawn["constant at min LR"].get_linestyle() == "-."
    assert list(drawn["union baseline (final)"].get_ydata()) == [4.2, 4.2]
    assert list(lines(d1_ax)["union baseline (final)"].get_ydata()) == [5.1, 5.1]
    assert switch_xs(d0_ax) == [B0]


def test_plot_max_lr_union_as_curve_and_missing_runs():
    df = max_lr_frame()
    fig = viz.plot_max_lr(df[(df["role"] != "union") & (df["name"] != "weak-maxlr2x")])
    assert "1 of 5 runs missing; no union run" in fig.get_suptitle()
    fig = viz.plot_max_lr(df, union_as="curve")
    union_curve = lines(fig.axes[0])["union baseline (D0 ∪ D1)"]
    assert data(union_curve) == ([375, 750, 1125, 1500], [6.0, 5.0, 4.5, 4.2])


# -- figure 4 ----------------------------------------------------------------------------------------

def replay_frame(shift="weak"):
    runs = [continual(f"{shift}-replay{r:g}", shift, replay=r, d0_end=4.5 - r, d1_end=5.0 + r)
            for r in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5)]
    return frame(base(), union(shift), *runs)


def test_plot_replay_curves_one_curve_per_fraction_averaging_seeds():
    df = replay_frame()
    seed1 = continual("weak-replay0.25", replay=0.25, seed=1, d0_end=4.45, d1_end=5.45)
    fig = viz.plot_replay_curves(frame(df, seed1))
    assert_labelled(fig)
    d0_ax, d1_ax = fig.axes
    labels = ["no replay", "1% replay", "5% replay", "10% replay", "25% replay", "50% replay"]
    assert [k for k in lines(d0_ax) if "replay" in k] == labels
    assert data(lines(d0_ax)["50% replay"]) == ([1000, 1250, 1500], [4.0, 4.0, 4.0])
    _, y = data(lines(d0_ax)["25% replay"])  # seeds 0 (4.25 at the end) and 1 (4.45): their mean
    assert y == pytest.approx([4.0, 4.175, 4.35])
    assert list(lines(d1_ax)["union baseline (final)"].get_ydata()) == [5.1, 5.1]
    assert switch_xs(d1_ax) == [B0]


def test_plot_replay_curves_picks_one_shift():
    df = frame(replay_frame("weak"), replay_frame("strong").query("role != 'base'"))
    fig = viz.plot_replay_curves(df, shift="strong")
    assert fig.axes[1].get_title() == "D1: de-man" and "showing" not in fig.get_suptitle()
    assert data(lines(fig.axes[1])["no replay"])[1] == pytest.approx([6.6, 5.8, 5.0])
    fig = viz.plot_replay_curves(df)
    assert "showing the strong shift of strong, weak" in fig.get_suptitle()


def test_plot_replay_table_final_losses_against_replay():
    df = replay_frame("strong")
    fig = viz.plot_replay_table(df.query("replay != 0.01"), last=2)
    assert_labelled(fig, "replay (compute-equivalent, of D0)")
    d0_ax, d1_ax, avg_ax = fig.axes
    assert "missing: 1%" in fig.get_suptitle()
    x, y = data(lines(d0_ax)["continual + replay"])
    assert x == [0, 1, 2, 3, 4]
    assert y == pytest.approx([(4.25 + 4.5) / 2, (4.225 + 4.45) / 2, (4.2 + 4.4) / 2, (4.125 + 4.25) / 2,
                               (4.0 + 4.0) / 2])  # the mean of each run's last 2 evaluations
    assert [t.get_text() for t in d0_ax.get_xticklabels()] == ["0%", "5%", "10%", "25%", "50%"]
    assert list(lines(d0_ax)["union baseline"].get_ydata()) == pytest.approx([4.35, 4.35])
    assert list(lines(d0_ax)["base model (before the switch)"].get_ydata()) == pytest.approx([4.25, 4.25])
    _, y_avg = data(lines(avg_ax)["continual + replay"])
    _, y_d1 = data(lines(d1_ax)["continual + replay"])
    assert y_avg == pytest.approx((np.array(y) + np.array(y_d1)) / 2)
    assert "base model (before the switch)" in legend_texts(avg_ax)


def test_plot_replay_table_takes_one_row_per_run():
    finals = replay_frame().groupby("run_id").tail(1)  # as metrics.final_losses gives
    fig = viz.plot_replay_table(finals)
    _, y = data(lines(fig.axes[1])["continual + replay"])
    assert y == pytest.approx([5.0, 5.01, 5.05, 5.1, 5.25, 5.5])
    assert "missing" not in fig.get_suptitle()


# -- figure 1 ----------------------------------------------------------------------------------------

def test_plot_compute_vs_loss_union_line_and_continual_markers():
    runs = [continual("weak-replay0.05", replay=0.05, d0_end=4.2, d1_end=5.0), continual("weak-replay0")]
    df = frame(*runs, union(compute=1500), union(compute=2250, d0_end=4.0, d1_end=4.8), union(compute=3000))
    fig = viz.plot_compute_vs_loss(df, last=1)
    assert_labelled(fig, "compute (tokens)")
    ax = fig.axes[0]
    drawn = lines(ax)
    assert data(drawn["union baseline"]) == ([1500, 2250, 3000], [4.65, 4.4, 4.65])
    assert data(drawn["continual, 5% replay"]) == ([1500], [4.6])
    assert data(drawn["continual, no replay"]) == ([1500], [4.65])
    assert switch_xs(ax) == [B0]
    flops = viz.plot_compute_vs_loss(df, last=1, flops_per_token=6.0)
    assert flops.axes[0].get_xlabel() == "compute (FLOPs)"
    assert data(lines(flops.axes[0])["union baseline"])[0] == [9000, 13500, 18000]
    assert switch_xs(flops.axes[0]) == [6 * B0]


# -- figure 5 ----------------------------------------------------------------------------------------

def test_plot_rewarm_same_data_d0_loss_with_variants():
    runs = [continual("d0-maxlr2x", "same", d1="en-man", max_lr=6e-3, variant="re-warm to 0.006"),
            continual("d0-constant-min", "same", d1="en-man", schedule="constant", max_lr=3e-4,
                      variant="constant at min LR", d0_end=3.9)]
    fig = viz.plot_rewarm_same_data(frame(base(), *runs))
    assert_labelled(fig)
    ax = fig.axes[0]
    drawn = lines(ax)
    assert list(drawn) == ["base model (D0 only)", "constant at min LR", "re-warm to 0.006",
                           "continue on new D0 tokens"]
    assert data(drawn["constant at min LR"]) == ([1000, 1250, 1500], [4.0, 3.95, 3.9])
    assert switch_xs(ax) == [B0]
    assert "1 of 3 runs missing" in ax.get_title() and "en-man → en-man" in ax.get_title()


# -- figure 7 ----------------------------------------------------------------------------------------

def infinite_frame():
    n, parts = 400, []
    for i, kind in enumerate(("cosine", "infinite_cosine", "infinite_inv_sqrt", "wsd")):
        tokens = list(range(100, 3 * n + 1, 100))
        loss = [7.0 - 0.1 * k - 0.01 * i for k in range(len(tokens))]
        parts.append(run_frame(f"sched-{kind}", "infinite", tokens, {"en-pydoc": loss}, schedule=kind,
                               d1="en-pydoc", switch_tokens=[n, 2 * n], compute_tokens=3 * n))
        if kind == "cosine":
            continue
        for c in (1, 2, 3):
            parts.append(run_frame(f"anneal-{kind}-chunk{c}", "anneal", [c * n - 50, c * n],
                                   {"en-pydoc": [6.0, 5.0 - c - 0.01 * i]}, schedule=kind, chunk=c,
                                   d1="en-pydoc", compute_tokens=c * n))
    return frame(*parts)


def test_plot_infinite_lines_anneal_markers_and_chunk_boundaries():
    fig = viz.plot_infinite(infinite_frame())
    assert_labelled(fig)
    ax = fig.axes[0]
    drawn = lines(ax)
    assert [k for k in drawn if "annealed" not in k] == ["repeated cosine", "infinite cosine",
                                                         "infinite inv-sqrt", "WSD", "new chunk"]
    x, y = data(drawn["infinite inv-sqrt"])
    assert x == list(range(100, 1201, 100)) and y == pytest.approx([6.98 - 0.1 * k for k in range(12)])
    marks = drawn["WSD, annealed"]
    assert data(marks) == ([400, 800, 1200], pytest.approx([3.97, 2.97, 1.97]))
    assert marks.get_linestyle() == "None" and marks.get_color() == drawn["WSD"].get_color()
    assert switch_xs(ax) == [400, 800]
    assert "3 chunks of en-pydoc" in ax.get_title()


def test_plot_infinite_names_a_missing_schedule():
    df = infinite_frame()
    fig = viz.plot_infinite(df[df["schedule"] != "wsd"], eval_set="en-pydoc")
    assert "missing: WSD" in fig.axes[0].get_title()
    assert "WSD" not in lines(fig.axes[0])


# -- forgetting curves -------------------------------------------------------------------------------

def test_plot_forgetting_strategies_and_union_curve():
    fig = viz.plot_forgetting(replay_frame("strong"), replays=[0.0, 0.25])
    assert_labelled(fig)
    d0_ax, d1_ax = fig.axes
    drawn = lines(d0_ax)
    assert list(drawn) == ["base model (D0 only)", "continual, no replay", "continual, 25% replay",
                           "union baseline (D0 ∪ D1)", "switch to D1"]
    assert data(drawn["continual, 25% replay"]) == ([1000, 1250, 1500], [4.0, 4.125, 4.25])
    assert data(lines(d1_ax)["union baseline (D0 ∪ D1)"]) == ([375, 750, 1125, 1500], [6.5, 5.6, 5.3, 5.1])
    assert switch_xs(d1_ax) == [B0]
    assert "strong shift: en-man → de-man" in fig.get_suptitle()


# -- every figure ------------------------------------------------------------------------------------

CURVES = [viz.plot_warmup, viz.plot_max_lr, viz.plot_replay_curves, viz.plot_forgetting]
ALL = CURVES + [viz.plot_replay_table, viz.plot_compute_vs_loss, viz.plot_rewarm_same_data,
                viz.plot_infinite]


@pytest.mark.parametrize("plot", ALL, ids=lambda f: f.__name__)
def test_empty_frame_gives_an_empty_titled_figure(plot):
    for df in (pd.DataFrame(), base(), base().drop(columns=["role"])):
        fig = plot(df)
        assert isinstance(fig, Figure)
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert "no runs to plot" in texts
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
        assert fig.get_suptitle() or fig.axes[0].get_title()


@pytest.mark.parametrize("plot", CURVES, ids=lambda f: f.__name__)
def test_draws_into_given_axes(plot):
    fig = Figure()
    axes = fig.subplots(1, 2)
    out = plot(replay_frame(), axes=axes, title="mine")
    assert out is fig and fig.get_suptitle() == ""
    assert axes[0].get_title().startswith("mine")
    with pytest.raises(ValueError, match="expected 2 axes"):
        plot(replay_frame(), axes=[axes[0]])


def test_figures_save_as_png(tmp_path):
    df = frame(replay_frame(), union(compute=3000))
    for i, fig in enumerate([viz.plot_replay_curves(df), viz.plot_compute_vs_loss(df),
                             viz.plot_infinite(infinite_frame())]):
        path = tmp_path / f"{i}.png"
        fig.savefig(path, dpi=40)
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_paper_schedules_three_stages_in_two_panels():
    fig = viz.plot_paper_schedules(n_stages=3, stage_tokens=100e9, steps_per_stage=100)
    left, right = fig.axes
    assert list(lines(left))[:3] == ["repeated cosine", "infinite cosine", "infinite inv-sqrt"]
    assert list(lines(right))[:2] == ["repeated cosine", "WSD (1-sqrt decay)"]
    assert switch_xs(left) == switch_xs(right) == [100e9, 200e9]
    x, y = data(lines(left)["infinite cosine"])
    assert x[-1] == pytest.approx(299e9) and y[-1] == pytest.approx(3e-5)  # annealed at the very end
    assert y[150] == pytest.approx(1.65e-4)  # no re-warming at the stage boundary
    assert left.get_xlabel() == "tokens" and left.get_legend() is not None
