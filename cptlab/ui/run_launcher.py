"""The run launcher: describe a continual run (shift, replay, schedule, scale, device), see the D0 / D1
losses the schedule law predicts for it, train it in a background thread while its D0 / D1 losses and LR
are drawn live over the prediction, stop and resume it.

Like every widget of ``cptlab.ui`` it is a plain class holding its controls; display it as a cell's last
value. Constructing or displaying it never trains anything; its state is readable without a front end
(tests drive it by setting controls and calling ``button.click()``).
"""

from __future__ import annotations

import html
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from cptlab.analysis import cpt_law, cpt_plan, laws
from cptlab.interop import pretrained
from cptlab.study import experiments as E
from cptlab.study import paper, runner
from cptlab.study.scales import SCALES, get_scale
from cptlab.training.rundir import RunDir
from cptlab.training.store import RunStore
from cptlab.ui import common
from cptlab.ui.schedule_explorer import ScheduleExplorer
from cptlab.viz import format_tokens

DEVICES = ("auto", "cpu", "cuda", "mps")
Record = dict[str, Any]


def _seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    return f"{s / 60:.0f} min {s % 60:02.0f} s" if s >= 60 else f"{s:.0f} s"


def _append(records: list[Record], record: Record) -> None:
    """Add a metrics line, first dropping lines at or after its (step, is-eval) position: a resumed run
    re-writes what came after its checkpoint, and a curve must not hold those lines twice."""
    key = (record["step"], "val" in record)
    while records and (records[-1]["step"], "val" in records[-1]) >= key:
        records.pop()
    records.append(record)


def imported_bases(store: RunStore) -> list[tuple[str, str]]:
    """(label, run directory) of the scale's own base ("") and of every finished import in ``store``."""
    found = [run for run in store.runs(pretrained.EXPERIMENT)
             if run.done and run.labels().get("role") == "pretrained"]
    return [("the scale's base model", "")] + [(f"{run.run_id} (imported)", str(run.path)) for run in found]


def _stored_twin(run: E.Run, store: RunStore) -> E.Run:
    """``run`` under the experiment and name of a stored run of the same config (a finished one first),
    so that a run another notebook trained is loaded instead of trained again; else ``run`` itself."""
    found = store.with_hash(run.config.hash())
    if not found:
        return run
    twin = found[0]
    labels = twin.labels() or dict(run.labels)
    labels.pop("experiment", None)
    labels.pop("name", None)
    return E.Run(twin.experiment, twin.name, run.config, labels, run.needs)



class RunLauncher:
    """Train one continual run from the shared base model of a scale, watching it live.

    Controls: ``shift``, ``replay`` (percent of the stage's compute), the schedule (``schedule``, a
    ``ScheduleExplorer`` over the run's one continual stage: kind, max/min LR, warmup and the kind's own
    parameters; its preview is the exact LR per step), ``scale`` (picking one resets the LRs and warmup
    to the scale's) and ``device``. ``run()`` is the ``experiments.Run`` they describe; a stored run of
    the same config (e.g. one of the replay sweep) keeps its own experiment and name.

    "Train" (``train_button``) loads a finished run from the run store; otherwise it trains, in a
    background thread (``thread``), the base model of the scale if the store lacks it, then the run, in
    ``runner.run_dir(run, root)``. Each metrics line lands in ``records`` (the base model's in
    ``base_records``); each evaluation redraws ``figure`` (D0 and D1 validation loss and the LR against
    tokens; ``curves()``); ``progress`` / ``progress_text`` show tokens, tokens/s and the time left; then
    every callable in ``listeners`` gets the run's line (in the thread). "Stop" ends the training at the
    next step with a checkpoint; "Train" again resumes it exactly. Errors show in ``status`` and
    ``error``; ``result`` is the last ``train.TrainResult``; ``wait()`` joins the thread.

    Before Train, the figure shows the D0 and D1 losses predicted for the run, dashed (``prediction``:
    "D0" / "D1" -> (tokens, loss)): by the continual-pre-training law (``cptlab.analysis.cpt_law``) where
    the run store holds the shift's three fit runs finished (``cpt_plan.launcher_laws``), else by the
    schedule law fitted on the store's finished runs that continue the same base model on the same data,
    at the same replay fraction or else the nearest (``laws.launcher_fit_runs``); ``prediction_text``
    names the law and its runs, or says why there is no prediction. The live curves then land on it or
    off it. "suggest" (``suggest_button``) fills in the replay fraction and max LR (cosine) that the
    planner (``cpt_plan.plan``) predicts best for ``d0_weight`` on D0 and the rest on D1 (``plan``,
    ``plan_text``).
    """

    def __init__(self, scale: str = "tiny", shift: str = "strong", replay: float = 0.25, device: str = "auto",
                 root: str | Path | None = None) -> None:
        self.store = RunStore(root)
        self.root = self.store.root
        style = {"description_width": "8em"}
        self.shift = W.Dropdown(options=tuple(paper.SHIFTS), value=shift, description="shift", style=style)
        self.replay = W.FloatSlider(value=100 * replay, min=0.0, max=90.0, step=1.0, description="replay %",
                                    readout_format=".0f", style=style)
        self.scale = W.Dropdown(options=tuple(SCALES), value=scale, description="scale", style=style)
        self.device = W.Dropdown(options=DEVICES, value=device, description="device", style=style)
        self.base = W.Dropdown(options=imported_bases(self.store), value="", description="base",
                               style=style)
        self.schedule = ScheduleExplorer(kind="cosine", compare=(), n_stages=1)
        self.schedule.tokens_per_stage.min = 3  # a smoke stage is a few thousand tokens
        self.schedule.figsize = (7.0, 3.6)
        self.schedule.image.layout.width = "560px"  # the figure's own size (80 dpi), not stretched
        self.train_button = W.Button(description="Train", button_style="success", icon="play",
                                     tooltip="train (or resume, or load from the run store) this run")
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True,
                                    tooltip="stop at the next step, with a checkpoint; Train resumes")
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress", style=style)
        self.progress_text = W.HTML()
        self.status = W.HTML()
        self.prediction_text = W.HTML()
        self.prediction: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._fits: dict[tuple[str, ...], dict[str, laws.ScheduleLaw]] = {}  # by the run ids fitted on
        self._cpt_fits: dict[tuple[str, str, str], tuple[dict[str, cpt_law.CptLaw], str]] = {}
        self.d0_weight = W.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="D0 weight",
                                       readout_format=".2f", style=style)
        self.suggest_button = W.Button(description="suggest", icon="magic",
                                       tooltip="fill in the replay fraction and max LR that the continual-"
                                       "pre-training law predicts best for these weights of D0 and D1")
        self.plan_text = W.HTML()
        self.plan: cpt_plan.Plan | None = None
        self.image = W.Image(format="png", layout=W.Layout(width="720px"))
        self.figure = Figure(figsize=(9.0, 4.0))
        self.lines: dict[str, Line2D] = {}
        self.records: list[Record] = []
        self.base_records: list[Record] = []
        self.listeners: list[Callable[[Record], None]] = []
        self.thread: threading.Thread | None = None
        self.result: Any = None
        self.error: str | None = None
        self.current: E.Run | None = None  # the run the figure shows
        self._stop = threading.Event()
        self._draw_lock = threading.Lock()
        self._quiet = False

        self.train_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.suggest_button.on_click(lambda _: self.suggest())
        self.scale.observe(lambda _: self._apply_scale(), names="value")
        ex = self.schedule
        for control in (self.shift, self.replay, self.device, self.base, ex.kind, ex.max_lr, ex.min_lr,
                        ex.warmup,
                        ex.const_lr, ex.cooldown, ex.anneal, ex.alpha, ex.decay, ex.decay_shape):
            control.observe(lambda _: self._changed(), names="value")
        self.widget = self._layout()
        self._apply_scale()

    def _layout(self) -> W.VBox:
        ex, column = self.schedule, common.column
        return W.VBox([
            W.HBox([
                column("run", self.shift, self.replay, self.scale, self.device, self.base),
                column("schedule", ex.kind, ex.max_lr, ex.min_lr, ex.warmup),
                column("infinite_cosine, infinite_inv_sqrt", ex.const_lr, ex.cooldown, ex.anneal, ex.alpha),
                column("wsd", ex.decay, ex.decay_shape),
            ], layout=W.Layout(flex_flow="row wrap")),
            ex.status,
            ex.image,
            W.HBox([self.d0_weight, self.suggest_button, self.plan_text],
                   layout=W.Layout(flex_flow="row wrap")),
            W.HBox([self.train_button, self.stop_button, self.progress, self.progress_text],
                   layout=W.Layout(flex_flow="row wrap")),
            self.status,
            self.prediction_text,
            self.image,
        ])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- state -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def run(self) -> E.Run:
        """The continual run the controls describe; raises ``ValueError`` (with what is wrong) if invalid."""
        if self.schedule.error:
            raise ValueError(f"schedule: {self.schedule.error}")
        fraction = round(self.replay.value / 100, 4)
        spec = self.schedule.spec()
        name = f"{self.shift.value}-replay{fraction:g}-{spec['kind']}"
        run = E.continual_run("launcher", name, self.shift.value, self.scale.value, replay=fraction,
                              schedule=spec, device=self.device.value)
        if self.base.value:  # an imported model instead of the scale's base
            run = E.continue_imported(run, pretrained.base_settings(self.base.value))
        run.config.validate()
        return _stored_twin(run, self.store)

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The plotted (tokens, value) of "D0", "D1" and "lr" (this run) and "base D0", "base D1"."""
        return {key: (np.asarray(ln.get_xdata(), dtype=float), np.asarray(ln.get_ydata(), dtype=float))
                for key, ln in self.lines.items()}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the training thread; True when it has finished (or none was started)."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running

    # -- actions ---------------------------------------------------------------------------------
    def start(self) -> None:
        """What "Train" does: load the run if it is finished, else train (or resume) it in a thread."""
        if self.running:
            self._say("already training; Stop it first")
            return
        try:
            run = self.run()
        except ValueError as exc:  # ConfigError is a ValueError
            self._fail(exc)
            return
        self.error, self.result, self.current = None, None, run
        self._predict(run)
        self.records = RunDir(runner.run_dir(run, self.store)).read_metrics()
        self.base_records = self._base_records(run)
        if runner.is_done(run, self.store):
            self._progress(self.records, run)
            self._redraw()
            self._say(f"{run.experiment}/{run.name} is in the run store (already trained): loaded. "
                      f"{self._last_losses()}")
            return
        self._redraw()
        self._stop.clear()
        self.train_button.disabled, self.stop_button.disabled = True, False
        self.thread = threading.Thread(target=self._work, args=(run,), name="cptlab-launcher", daemon=True)
        self.thread.start()

    def _base_records(self, run: E.Run) -> list[Record]:
        """The metrics of the model ``run`` starts from: the scale's base run or the imported model."""
        if self.base.value:
            return RunDir(self.base.value).read_metrics()
        base = run.needs[0] if run.needs else None
        return RunDir(runner.run_dir(base, self.store)).read_metrics() if base else []

    def stop(self) -> None:
        """What "Stop" does: the training stops at its next step and writes a checkpoint."""
        if self.running:
            self._stop.set()
            self._say("stopping at the next step (with a checkpoint)...")

    # -- training (in the thread) ----------------------------------------------------------------
    def _work(self, run: E.Run) -> None:
        try:
            base = run.needs[0] if run.needs else None
            if base is not None and not runner.is_done(base, self.store):
                self._say(f"training the base model first ({base.experiment}/{base.run_id})...")
                if self._train(base, self.base_records).status == "stopped":
                    self._say("stopped while training the base model; Train resumes it")
                    return
            self._say(f"training {run.experiment}/{run.name}...")
            self.result = self._train(run, self.records)
            if self.result.status == "stopped":
                self._say(f"stopped at {format_tokens(self.result.tokens)} tokens (checkpoint written); "
                          "Train resumes it")
            else:
                self._say(f"done: {run.experiment}/{run.name}. {self._last_losses()}")
        except Exception as exc:  # noqa: BLE001 - shown in the widget; a thread must not die silently
            self._fail(exc)
        finally:
            self.train_button.disabled, self.stop_button.disabled = False, True

    def _train(self, run: E.Run, records: list[Record]) -> Any:
        from cptlab.training.train import train

        runner.write_labels(run, self.store)

        def on_record(record: Record) -> None:
            _append(records, record)
            self._progress(records, run)
            if "val" in record:
                self._redraw()
            if records is self.records:
                for listener in self.listeners:
                    listener(record)

        return train(run.config, runner.run_dir(run, self.store), quiet=True, stop=self._stop.is_set,
                     on_record=on_record, runs_root=self.store.root)

    def _progress(self, records: list[Record], run: E.Run) -> None:
        """Tokens done of the run's budget, tokens/s (of the last training line) and the time left."""
        if not records:
            return
        budget = sum(stage.tokens for stage in run.config.stages)
        from_checkpoint = run.config.stages[0].init_from not in ("previous", "scratch")
        start = records[0]["tokens"] if from_checkpoint else 0  # a continual run starts at the base's end
        done = records[-1]["tokens"] - start
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        speed = speeds[-1] if speeds else math.nan
        left = max(budget - done, 0) / speed if speeds and speed > 0 else math.nan
        self.progress.value = min(done / budget, 1.0) if budget else 0.0
        what = "base model" if run.labels.get("role") == "base" else run.name
        self.progress_text.value = (f"{html.escape(what)}: {format_tokens(done)} / {format_tokens(budget)} "
                                    f"tokens &middot; {format_tokens(speed) if speeds else '?'} tokens/s "
                                    f"&middot; ETA {_seconds(left) if done < budget else '0 s'}")

    # -- display ---------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        self.status.value = html.escape(text)

    def _fail(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.status.value = common.error_html(self.error)

    def _last_losses(self) -> str:
        evals = [r for r in self.records if "val" in r]
        if not evals or self.current is None:
            return ""
        d0, d1 = self.current.labels.get("d0", paper.D0), self.current.labels.get("d1")
        val = evals[-1]["val"]
        parts = [f"{key} ({name}) {val[name]:.3f}" for key, name in (("D0", d0), ("D1", d1)) if name in val]
        return "Last evaluation: " + ", ".join(parts)

    def _apply_scale(self) -> None:
        """Size the schedule preview to the scale's continual stage and take the scale's LRs and warmup."""
        s = get_scale(self.scale.value)
        ex = self.schedule
        self._quiet = True
        try:
            with ex.hold():
                ex.steps_per_stage = max(1, s.new_tokens // (s.seq_len * s.batch_size))
                ex.tokens_per_stage.value = s.new_tokens
                ex.max_lr.value, ex.min_lr.value, ex.warmup.value = s.max_lr, s.min_lr, 100 * s.warmup
        finally:
            self._quiet = False
        self._changed()

    def _changed(self) -> None:
        """A control moved: the next Train uses the new run; the figure keeps a run in flight."""
        if self._quiet or self.running:
            return
        self.current, self.records, self.base_records = None, [], []
        self.prediction, self.prediction_text.value = {}, ""
        self.progress.value, self.progress_text.value = 0.0, ""
        try:
            run = self.run()
        except ValueError as exc:
            self._fail(exc)
            self._redraw()
            return
        self.error = None
        stored = RunDir(runner.run_dir(run, self.store))
        if stored.done:
            state = "in the run store: Train loads it"
        elif stored.path.exists():
            state = "partly trained: Train resumes it"
        else:
            base_done = not run.needs or runner.is_done(run.needs[0], self.store)
            state = "new: Train trains it" + ("" if base_done else " (after the base model of this scale)")
        self._say(f"{run.experiment}/{run.name}: {state}")
        self._predict(run)
        self._redraw()

    def _predict(self, run: E.Run) -> None:
        """Fill ``prediction`` and ``prediction_text`` for ``run``: the continual-pre-training law where the
        store has its fit runs, else the schedule law (laws cached by the runs fitted on)."""
        self.prediction = {}
        cpt, note = self._cpt_laws()
        if cpt and run.needs:
            try:
                self.prediction = cpt_plan.predict_run(cpt, run, self.store)
                self.prediction_text.value = html.escape(f"predicted (dashed): {note}")
                return
            except ValueError as exc:
                note = str(exc)
        fit, why = laws.launcher_fit_runs(run, self.store, self.scale.value, self.device.value)
        if not fit:
            self.prediction_text.value = html.escape(f"no prediction: {why}")
            return
        key = tuple(r.run_id for r in fit)
        try:
            if key not in self._fits:
                sets = {"D0": run.labels.get("d0", paper.D0), "D1": run.labels["d1"]}
                self._fits[key] = laws.fit_laws(fit, sets, self.store)
            self.prediction = {name: laws.predict_run(law, run, self.store)
                               for name, law in self._fits[key].items()}
        except ValueError as exc:
            self.prediction_text.value = html.escape(f"no prediction: {exc}")
            return
        names = ", ".join(f"{r.experiment}/{r.name}" for r in fit)
        self.prediction_text.value = html.escape(
            f"predicted (dashed): schedule law fitted on {names} ({why}); {note}")

    def _cpt_laws(self) -> tuple[dict[str, cpt_law.CptLaw], str]:
        """The shift's continual-pre-training laws (cached while the store lacks none of their runs)."""
        key = (self.scale.value, self.shift.value, self.device.value)
        if key not in self._cpt_fits or not self._cpt_fits[key][0]:
            try:
                self._cpt_fits[key] = cpt_plan.launcher_laws(key[1], self.store, key[0], key[2])
            except ValueError as exc:
                self._cpt_fits[key] = ({}, str(exc))
        return self._cpt_fits[key]

    def suggest(self) -> None:
        """What "suggest" does: set the replay fraction, a cosine schedule and the max LR to the planner's
        choice for the weights (``d0_weight`` on D0, the rest on D1); ``plan`` and ``plan_text`` say it."""
        cpt, note = self._cpt_laws()
        if not cpt:
            self.plan, self.plan_text.value = None, html.escape(f"no suggestion: {note}")
            return
        w0 = self.d0_weight.value
        base = E.base_run(self.scale.value, device=self.device.value)
        tokens = int(self.schedule.tokens_per_stage.value)
        self.plan = p = cpt_plan.plan(cpt, base, self.scale.value, w0, 1 - w0, tokens, store=self.store)
        with self.schedule.hold():
            self.schedule.kind.value = "cosine"
            self.schedule.max_lr.value = p.max_lr
        self.replay.value = 100 * p.replay  # redraws the prediction for the suggested run
        self.plan_text.value = html.escape(
            f"suggested: {100 * p.replay:g}% replay, max LR {p.max_lr:.3g}; predicted final D0 {p.d0:.3f} "
            f"({p.d0_rise:+.3f} over the base model), D1 {p.d1:.3f}")

    def _redraw(self) -> None:
        """Draw the base model's and this run's D0 / D1 losses and this run's LR against tokens."""
        with self._draw_lock:
            run = self.current
            d0 = run.labels.get("d0", paper.D0) if run else paper.D0
            d1 = run.labels.get("d1") if run else paper.SHIFTS[self.shift.value]
            fig = self.figure
            fig.clear()
            fig.subplots_adjust(left=0.08, right=0.9, bottom=0.13, top=0.92)
            ax = fig.add_subplot()
            lr_ax = ax.twinx()

            def evals(records: list[Record], name: str | None) -> tuple[list[float], list[float]]:
                rows = [r for r in records if "val" in r and name in r["val"]]
                return [r["tokens"] for r in rows], [r["val"][name] for r in rows]

            lines = {
                "base D0": ax.plot(*evals(self.base_records, d0), color="C0", alpha=0.35, lw=1.2,
                                   label="_base D0")[0],
                "base D1": ax.plot(*evals(self.base_records, d1), color="C1", alpha=0.35, lw=1.2,
                                   label="_base D1")[0],
                "D0": ax.plot(*evals(self.records, d0), "o-", color="C0", ms=3, label=f"D0 ({d0})")[0],
                "D1": ax.plot(*evals(self.records, d1), "o-", color="C1", ms=3, label=f"D1 ({d1})")[0],
                "lr": lr_ax.plot([r["tokens"] for r in self.records], [r["lr"] for r in self.records],
                                 color="0.45", ls="--", lw=1.0, label="LR")[0],
            }
            for key, color in (("D0", "C0"), ("D1", "C1")):
                if key in self.prediction:
                    lines[f"predicted {key}"] = ax.plot(*self.prediction[key], "--", color=color, lw=1.3,
                                                        label=f"predicted {key}")[0]
            self.lines = lines
            common.tokens_axis(ax)
            ax.set_ylabel("validation loss")
            lr_ax.set_ylabel("learning rate")
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            if self.records:
                ax.axvline(self.records[0]["tokens"], color="0.6", ls=":", lw=1)
            handles = [lines[k] for k in ("D0", "D1", "predicted D0", "predicted D1", "lr") if k in lines]
            ax.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="upper right")
            ax.set_title(f"{run.experiment}/{run.name}" if run else "press Train", fontsize="medium")
            if not self.records and not self.base_records:
                text = "nothing trained yet" + (": the prediction is dashed" if self.prediction else "")
                ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", color="0.5")
            self.image.value = common.png(fig)
