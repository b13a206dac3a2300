"""The schedule explorer: move a learning-rate schedule's parameters and see it over several stages,
overlaid with other kinds or with pinned schedules (nothing is trained); given a fitted schedule law, the
loss it predicts for each schedule is drawn under the LR curves."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure

from cptlab import schedules as sched
from cptlab import viz
from cptlab.analysis.laws import MAX_STEPS, ScheduleLaw
from cptlab.study import paper
from cptlab.ui import common

StagePlan = list[tuple[dict[str, Any], int]]
# Plans beyond the kinds: a linear decay to zero (D2Z), and WSD-S (every stage decays; the next resumes
# from the decayed model at max LR, ``schedules.wsd_s``).
PLANS = (*sched.KINDS, "d2z", "wsd-s")


# -- ScheduleExplorer ------------------------------------------------------------------------------

class ScheduleExplorer:
    """Sliders for a schedule spec, drawn over ``n_stages`` stages of ``tokens per stage`` each.

    The current kind is planned with ``cptlab.schedules.multi_stage`` (cosine and linear re-warm and
    re-decay every stage; infinite schedules and wsd warm up once and anneal/decay at the end of the last
    stage); ``d2z`` is linear with min LR 0, and ``wsd-s`` decays every stage (``schedules.wsd_s``).
    Kinds ticked in ``compare`` are drawn with the same sliders; "add to comparison" pins a copy of the
    current schedule. ``steps_per_stage`` is only the plot's resolution: all lengths are
    fractions of a stage, so tokens per stage scales the x axis.

    ``law`` (a ``cptlab.analysis.laws.ScheduleLaw``, e.g. ``laws.explorer_law(scale)`` from the run
    store; ``set_law`` changes it): each drawn schedule's predicted loss, trained from scratch, is drawn
    under the LR curves (``prediction``: label -> (tokens, loss)); there the steps are real ones, tokens
    per stage divided by the tokens per step of the runs the law was fitted on. ``prediction_label``
    says which runs those were.
    """

    def __init__(self, kind: str = "infinite_cosine", compare: tuple[str, ...] = ("cosine", "wsd"),
                 n_stages: int = 3, tokens_per_stage: float = 100e9, steps_per_stage: int = 1000,
                 law: ScheduleLaw | None = None) -> None:
        p = paper.LR_405M
        self.steps_per_stage = steps_per_stage
        self.kind = W.Dropdown(options=PLANS, value=kind, description="kind")
        self.max_lr = common.log_slider("max LR", p["max_lr"], -6, -1)
        self.min_lr = common.log_slider("min LR", p["min_lr"], -7, -1)
        self.warmup = common.percent_slider("warmup %", 100 * p["warmup"], hi=20.0, step=0.1)
        self.const_lr = common.log_slider("const LR", p["const_lr"], -7, -1)
        self.cooldown = common.percent_slider("cooldown %", 100 * p["cooldown"])
        self.anneal = common.percent_slider("anneal %", 10.0)
        self.alpha = common.log_slider("alpha", p["alpha"], -1, 3, fmt=".3g")
        self.decay = common.percent_slider("decay %", 10.0)
        self.decay_shape = W.Dropdown(options=sched.DECAY_SHAPES, value="1-sqrt", description="decay shape")
        self.n_stages = W.IntSlider(value=n_stages, min=1, max=8, description="stages")
        self.tokens_per_stage = common.log_slider("tokens / stage", tokens_per_stage, 5, 13, fmt=".3g")
        self.compare = W.SelectMultiple(options=PLANS, value=tuple(compare), rows=len(PLANS),
                                        description="compare")
        self.preset_button = W.Button(description="paper 405M", tooltip="max 3e-4, min 3e-5, const 1.65e-4, "
                                      "warmup 1%, cooldown 60%, alpha 10; 3 stages of 100B tokens")
        self.add_button = W.Button(description="add to comparison")
        self.clear_button = W.Button(description="clear comparison")
        self.status = W.HTML()
        self.prediction_label = W.HTML()
        self.image = W.Image(format="png")
        self.figsize = (9.0, 4.0)  # of the LR panel; the predicted loss adds 60% below it
        self.figure = Figure(figsize=self.figsize)
        self.law = law
        self.prediction: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.error: str | None = None
        self.pinned: list[tuple[str, StagePlan, float]] = []  # (label, plan, tokens per step)
        self._hold = False

        self.preset_button.on_click(lambda _: self.apply_preset())
        self.add_button.on_click(lambda _: self.add_to_comparison())
        self.clear_button.on_click(lambda _: self.clear_comparison())
        for control in self._controls():
            control.observe(lambda _: self.redraw(), names="value")

        column = common.column
        self.widget = W.VBox([
            W.HBox([
                column("all kinds", self.kind, self.max_lr, self.min_lr, self.warmup),
                column("infinite_cosine, infinite_inv_sqrt", self.const_lr, self.cooldown, self.anneal,
                       self.alpha),
                column("wsd", self.decay, self.decay_shape),
                column("run", self.n_stages, self.tokens_per_stage, self.compare),
            ], layout=W.Layout(flex_flow="row wrap")),
            W.HBox([self.preset_button, self.add_button, self.clear_button]),
            self.status,
            self.prediction_label,
            self.image,
        ])
        self.redraw()

    def _controls(self) -> list[W.ValueWidget]:
        return [self.kind, self.max_lr, self.min_lr, self.warmup, self.const_lr, self.cooldown, self.anneal,
                self.alpha, self.decay, self.decay_shape, self.n_stages, self.tokens_per_stage, self.compare]

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Change several controls with one redraw at the end."""
        self._hold = True
        try:
            yield
        finally:
            self._hold = False
            self.redraw()

    # -- state -----------------------------------------------------------------------------------
    def spec(self, kind: str | None = None) -> dict[str, Any]:
        """The schedule spec the sliders describe, for ``kind`` (default: the selected kind)."""
        kind = kind or self.kind.value
        spec: dict[str, Any] = dict(kind=kind, max_lr=self.max_lr.value, min_lr=self.min_lr.value,
                                    warmup=self.warmup.value / 100)
        if kind == "d2z":
            spec.update(kind="linear", min_lr=0.0)
        if kind == "wsd-s":
            spec["kind"] = "wsd"
        if kind in sched.INFINITE_KINDS:
            spec.update(const_lr=self.const_lr.value, cooldown=self.cooldown.value / 100,
                        anneal=self.anneal.value / 100, alpha=self.alpha.value)
        if spec["kind"] == "wsd":
            spec.update(decay=self.decay.value / 100, decay_shape=self.decay_shape.value)
        return spec

    def current_schedule(self, kind: str | None = None) -> StagePlan:
        """The (spec, steps) stages drawn for ``kind`` (default: the selected kind)."""
        plan = sched.wsd_s if (kind or self.kind.value) == "wsd-s" else sched.multi_stage
        return plan(self.spec(kind), self.n_stages.value, self.steps_per_stage)

    def tokens_per_step(self) -> float:
        return self.tokens_per_stage.value / self.steps_per_stage

    def schedules(self) -> dict[str, tuple[StagePlan, float]]:
        """Every schedule to draw: label -> (stages, tokens per step); the selected kind last."""
        out = {label: (plan, tps) for label, plan, tps in self.pinned}
        tps = self.tokens_per_step()
        for kind in self.compare.value:
            if kind != self.kind.value:
                out[kind] = (self.current_schedule(kind), tps)
        out[self.kind.value] = (self.current_schedule(), tps)
        return out

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The (x, y) data of every schedule line in the figure, by label."""
        lines = self.figure.axes[0].get_lines() if self.figure.axes else []
        return {ln.get_label(): (np.asarray(ln.get_xdata()), np.asarray(ln.get_ydata()))
                for ln in lines if not ln.get_label().startswith("_") and ln.get_label() != "stage boundary"}

    def lr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The plotted (tokens, lr) of the selected kind."""
        return self.curves()[self.kind.value]

    # -- actions ---------------------------------------------------------------------------------
    def apply_preset(self) -> None:
        """The paper's 405M values (PAPER.md) over 3 stages of 100B tokens; kind, anneal and decay kept."""
        p = paper.LR_405M
        with self.hold():
            self.max_lr.value, self.min_lr.value = p["max_lr"], p["min_lr"]
            self.const_lr.value, self.alpha.value = p["const_lr"], p["alpha"]
            self.warmup.value, self.cooldown.value = 100 * p["warmup"], 100 * p["cooldown"]
            self.n_stages.value, self.tokens_per_stage.value = 3, 100e9

    def add_to_comparison(self) -> None:
        """Pin a copy of the current schedule (if valid) so that it stays drawn."""
        if self.error is None:
            spec = self.spec()
            label = f"#{len(self.pinned) + 1} {spec['kind']} max {spec['max_lr']:.2g}"
            self.pinned.append((label, self.current_schedule(), self.tokens_per_step()))
            self.redraw()

    def clear_comparison(self) -> None:
        self.pinned.clear()
        self.redraw()

    def set_law(self, law: ScheduleLaw | None) -> None:
        """Predict the loss with ``law`` (None: no prediction) and redraw."""
        self.law = law
        self.redraw()

    # -- prediction ------------------------------------------------------------------------------
    def _predict(self, drawn: dict[str, tuple[StagePlan, float]]) -> None:
        """Fill ``prediction`` for every drawn schedule (each plan's steps made real: its tokens over the
        law's tokens per step) and say where the law comes from in ``prediction_label``."""
        self.prediction = {}
        law = self.law
        if law is None:
            self.prediction_label.value = ""
            return
        tps = law.tokens_per_step
        plans = {label: [(spec, max(1, round(n * tokens / tps))) for spec, n in plan]
                 for label, (plan, tokens) in drawn.items()}
        longest = max(sched.stage_boundaries(plan)[-1] for plan in plans.values())
        if longest > MAX_STEPS:
            self.prediction_label.value = html.escape(
                f"no predicted loss: {longest:,} steps of {tps:,} tokens; the law takes at most "
                f"{MAX_STEPS:,} (fewer tokens / stage)")
            return
        for label, plan in plans.items():
            loss = law.plan_loss(plan)
            self.prediction[label] = (np.arange(1, len(loss) + 1) * tps, loss)
        self.prediction_label.value = html.escape(
            f"predicted {law.loss_set} loss (from scratch): {law.formula()}, fitted on "
            f"{', '.join(law.runs)}")

    def redraw(self) -> None:
        """Validate the sliders and draw; a bad spec shows its error and keeps the last figure."""
        if self._hold:
            return
        try:
            for kind in (self.kind.value, *self.compare.value):
                sched.validate_spec(self.spec(kind))
        except ValueError as exc:
            self.error = f"{kind}: {exc}"
            self.status.value = f"<span style='color:#b00'>{html.escape(self.error)}</span>"
            return
        self.error = None
        drawn = self.schedules()
        self._predict(drawn)
        self.figure.clear()
        rows = 1 if self.law is None else 2  # the predicted loss under the LR
        width, height = self.figsize
        self.figure.set_size_inches(width, height * (1.0 if rows == 1 else 1.6))
        # fixed margins: a layout engine would draw the figure twice per redraw
        self.figure.subplots_adjust(left=0.08, right=0.98, bottom=0.12 if rows == 1 else 0.08, top=0.96,
                                    hspace=0.3)
        ax = self.figure.add_subplot(rows, 1, 1)
        viz.plot_schedules({label: plan for label, (plan, _) in drawn.items()},
                             tokens_per_step={label: tps for label, (_, tps) in drawn.items()}, ax=ax)
        if rows == 2:
            viz.plot_predicted_losses(self.prediction, ax=self.figure.add_subplot(rows, 1, 2, sharex=ax))
        final = self.lr_curve()[1][-1]
        self.status.value = (f"{self.n_stages.value} stages of {self.tokens_per_stage.value:.3g} tokens; "
                             f"{self.kind.value} ends at lr {final:.3g}")
        self.image.value = common.png(self.figure)
