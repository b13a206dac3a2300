"""The run launcher and the results browser (ipywidgets); ``cptlab.widgets`` re-exports both.

Widgets:
    RunLauncher      describe a continual run (shift, replay, schedule, scale, device), train it in a
                     background thread while its D0 / D1 losses and LR are drawn live, stop and resume it
    ResultsBrowser   pick runs of the run store by experiment and settings, overlay their curves and show
                     their final losses next to the base model and the union baseline

Like ``ScheduleExplorer``, each is a plain class holding its controls; display it as a cell's last value.
Constructing or displaying one never trains anything. Their state is readable without a front end (tests
drive them by setting controls and calling ``button.click()``).
"""

from __future__ import annotations

import html
import json
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as W
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from cptlab import experiments as E
from cptlab import metrics as M
from cptlab import runner, store
from cptlab.plots import format_tokens
from cptlab.store import RunDir
from cptlab.widgets import ScheduleExplorer, _png

DEVICES = ("auto", "cpu", "cuda", "mps")
Record = dict[str, Any]


# -- helpers ---------------------------------------------------------------------------------------

def _error_html(text: str) -> str:
    return f"<span style='color:#b00'>{html.escape(text).replace(chr(10), '<br>')}</span>"


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


def _stored_twin(run: E.Run, root: Path) -> E.Run:
    """``run`` under the experiment and name of a stored run of the same config (a finished one first),
    so that a run another notebook trained is loaded instead of trained again; else ``run`` itself."""
    found = sorted(root.glob(f"*/*-{run.config.hash()}"), key=lambda p: (not (p / "DONE").exists(), str(p)))
    if not found:
        return run
    path = found[0]
    labels = dict(run.labels)
    if (path / "labels.json").exists():
        labels = json.loads((path / "labels.json").read_text())
        labels.pop("experiment", None)
        labels.pop("name", None)
    return E.Run(path.parent.name, path.name.rsplit("-", 1)[0], run.config, labels, run.needs)


def _tokens_axis(ax: Any) -> None:
    ax.set_xlabel("tokens")
    ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    ax.grid(alpha=0.3)


# -- RunLauncher -----------------------------------------------------------------------------------

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
    """

    def __init__(self, scale: str = "tiny", shift: str = "strong", replay: float = 0.25, device: str = "auto",
                 root: str | Path | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else store.runs_root()
        style = {"description_width": "8em"}
        self.shift = W.Dropdown(options=tuple(E.SHIFTS), value=shift, description="shift", style=style)
        self.replay = W.FloatSlider(value=100 * replay, min=0.0, max=90.0, step=1.0, description="replay %",
                                    readout_format=".0f", style=style)
        self.scale = W.Dropdown(options=tuple(E.SCALES), value=scale, description="scale", style=style)
        self.device = W.Dropdown(options=DEVICES, value=device, description="device", style=style)
        self.schedule = ScheduleExplorer(kind="cosine", compare=(), n_stages=1)
        self.schedule.tokens_per_stage.min = 3  # a smoke stage is a few thousand tokens
        self.schedule.figure.set_size_inches(7.0, 3.6)
        self.schedule.image.layout.width = "560px"  # the figure's own size (80 dpi), not stretched
        self.train_button = W.Button(description="Train", button_style="success", icon="play",
                                     tooltip="train (or resume, or load from the run store) this run")
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop", disabled=True,
                                    tooltip="stop at the next step, with a checkpoint; Train resumes")
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress", style=style)
        self.progress_text = W.HTML()
        self.status = W.HTML()
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
        self.scale.observe(lambda _: self._apply_scale(), names="value")
        ex = self.schedule
        for control in (self.shift, self.replay, self.device, ex.kind, ex.max_lr, ex.min_lr, ex.warmup,
                        ex.const_lr, ex.cooldown, ex.anneal, ex.alpha, ex.decay, ex.decay_shape):
            control.observe(lambda _: self._changed(), names="value")

        def column(title: str, *children: W.Widget) -> W.VBox:
            return W.VBox([W.HTML(f"<b>{title}</b>"), *children])

        self.widget = W.VBox([
            W.HBox([
                column("run", self.shift, self.replay, self.scale, self.device),
                column("schedule", ex.kind, ex.max_lr, ex.min_lr, ex.warmup),
                column("infinite_cosine, infinite_inv_sqrt", ex.const_lr, ex.cooldown, ex.anneal, ex.alpha),
                column("wsd", ex.decay, ex.decay_shape),
            ], layout=W.Layout(flex_flow="row wrap")),
            ex.status,
            ex.image,
            W.HBox([self.train_button, self.stop_button, self.progress, self.progress_text],
                   layout=W.Layout(flex_flow="row wrap")),
            self.status,
            self.image,
        ])
        self._apply_scale()

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
                              schedule=spec, device=self.device.value, root=str(self.root))
        run.config.validate()
        return _stored_twin(run, self.root)

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
        self.records = RunDir(runner.run_dir(run, self.root)).read_metrics()
        base = run.needs[0] if run.needs else None
        self.base_records = RunDir(runner.run_dir(base, self.root)).read_metrics() if base else []
        if runner.is_done(run, self.root):
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

    def stop(self) -> None:
        """What "Stop" does: the training stops at its next step and writes a checkpoint."""
        if self.running:
            self._stop.set()
            self._say("stopping at the next step (with a checkpoint)...")

    # -- training (in the thread) ----------------------------------------------------------------
    def _work(self, run: E.Run) -> None:
        try:
            base = run.needs[0] if run.needs else None
            if base is not None and not runner.is_done(base, self.root):
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
        from cptlab.train import train

        runner.write_labels(run, self.root)

        def on_record(record: Record) -> None:
            _append(records, record)
            self._progress(records, run)
            if "val" in record:
                self._redraw()
            if records is self.records:
                for listener in self.listeners:
                    listener(record)

        return train(run.config, runner.run_dir(run, self.root), quiet=True, stop=self._stop.is_set,
                     on_record=on_record)

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
        self.status.value = _error_html(self.error)

    def _last_losses(self) -> str:
        evals = [r for r in self.records if "val" in r]
        if not evals or self.current is None:
            return ""
        d0, d1 = self.current.labels.get("d0", E.D0), self.current.labels.get("d1")
        val = evals[-1]["val"]
        parts = [f"{key} ({name}) {val[name]:.3f}" for key, name in (("D0", d0), ("D1", d1)) if name in val]
        return "Last evaluation: " + ", ".join(parts)

    def _apply_scale(self) -> None:
        """Size the schedule preview to the scale's continual stage and take the scale's LRs and warmup."""
        s = E.get_scale(self.scale.value)
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
        self.progress.value, self.progress_text.value = 0.0, ""
        try:
            run = self.run()
        except ValueError as exc:
            self._fail(exc)
            self._redraw()
            return
        self.error = None
        path = runner.run_dir(run, self.root)
        if (path / "DONE").exists():
            state = "in the run store: Train loads it"
        elif path.exists():
            state = "partly trained: Train resumes it"
        else:
            base_done = not run.needs or runner.is_done(run.needs[0], self.root)
            state = "new: Train trains it" + ("" if base_done else " (after the base model of this scale)")
        self._say(f"{run.experiment}/{run.name}: {state}")
        self._redraw()

    def _redraw(self) -> None:
        """Draw the base model's and this run's D0 / D1 losses and this run's LR against tokens."""
        with self._draw_lock:
            run = self.current
            d0 = run.labels.get("d0", E.D0) if run else E.D0
            d1 = run.labels.get("d1") if run else E.SHIFTS[self.shift.value]
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
            self.lines = lines
            _tokens_axis(ax)
            ax.set_ylabel("validation loss")
            lr_ax.set_ylabel("learning rate")
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            if self.records:
                ax.axvline(self.records[0]["tokens"], color="0.6", ls=":", lw=1)
            handles = [lines["D0"], lines["D1"], lines["lr"]]
            ax.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="upper right")
            ax.set_title(f"{run.experiment}/{run.name}" if run else "press Train", fontsize="medium")
            if not self.records and not self.base_records:
                ax.text(0.5, 0.5, "nothing trained yet", transform=ax.transAxes, ha="center", color="0.5")
            self.image.value = _png(fig)


# -- ResultsBrowser --------------------------------------------------------------------------------

ANY = "any"
PANELS = ("D0", "D1", "avg")


class ResultsBrowser:
    """Runs of the run store, picked by experiment, scale and shift (``experiment``, ``scale``,
    ``shift``, then several in ``runs``), drawn as D0, D1 and average validation loss against tokens
    (``figure``, ``curves()``), with the base model they started from and the union baseline of the same
    shift and compute as dashed references (``references``), and their final losses as a table
    (``finals``, shown in ``table``). "refresh" scans the store again (runs a launcher just trained).
    ``select``: run names to pick first (default: every run that matches)."""

    def __init__(self, root: str | Path | None = None, experiment: str = "replay", shift: str | None = None,
                 select: Sequence[str] | None = None) -> None:
        self.root = Path(root).resolve() if root is not None else store.runs_root()
        style = {"description_width": "6em"}
        self.experiment = W.Dropdown(description="experiment", style=style)
        self.scale = W.Dropdown(description="scale", style=style)
        self.shift = W.Dropdown(description="shift", style=style)
        self.runs = W.SelectMultiple(description="runs", rows=8, style=style, layout=W.Layout(width="34em"))
        self.references = W.Checkbox(value=True, description="base model and union baseline")
        self.refresh_button = W.Button(description="refresh", icon="refresh",
                                       tooltip="scan the run store again")
        self.status = W.HTML()
        self.image = W.Image(format="png")
        self.table = W.HTML()
        self.figure = Figure(figsize=(12.0, 3.8))
        self.frame = pd.DataFrame()  # every stored run's evaluation lines, one row each
        self.finals = pd.DataFrame()  # the table: one row per selected run and reference
        self._busy = False

        self.experiment.observe(lambda _: self._filter(), names="value")
        self.scale.observe(lambda _: self._filter(), names="value")
        self.shift.observe(lambda _: self._filter(), names="value")
        self.runs.observe(lambda _: self.redraw(), names="value")
        self.references.observe(lambda _: self.redraw(), names="value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.widget = W.VBox([
            W.HBox([W.VBox([self.experiment, self.scale, self.shift, self.references, self.refresh_button]),
                    self.runs]),
            self.status, self.image, self.table,
        ])
        self.refresh(experiment, shift, select)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # -- the store -------------------------------------------------------------------------------
    def refresh(self, experiment: str | None = None, shift: str | None = None,
                select: Sequence[str] | None = None) -> None:
        """Scan the run store and rebuild the choices (keeping the current ones where they still exist)."""
        frames = []
        for path in sorted(self.root.glob("*/*/metrics.jsonl")):
            df = store.eval_frame(path.parent)
            if len(df):
                df["experiment"] = path.parent.parent.name
                df["run_id"] = f"{path.parent.parent.name}/{path.parent.name}"
                df["scale"] = _model_preset(path.parent)
                frames.append(df)
        self.frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        experiments = sorted(self.frame["experiment"].unique()) if len(self.frame) else []
        wanted = experiment or self.experiment.value
        self._busy = True
        try:
            self.experiment.options = experiments
            if experiments:
                self.experiment.value = wanted if wanted in experiments else experiments[0]
        finally:
            self._busy = False
        self._filter(shift=shift, select=select)

    def _filter(self, shift: str | None = None, select: Sequence[str] | None = None) -> None:
        """Offer the scales, shifts and runs of the chosen experiment."""
        if self._busy:
            return
        self._busy = True
        try:
            rows = self._experiment_rows()
            scales = [ANY, *sorted(rows["scale"].dropna().unique())] if len(rows) else [ANY]
            only = scales[1] if len(scales) == 2 else ANY
            keep = self.scale.value if self.scale.value in scales else only
            self.scale.options, self.scale.value = scales, keep
            if self.scale.value != ANY:
                rows = rows[rows["scale"] == self.scale.value]
            shifts = [ANY, *sorted(rows["shift"].dropna().unique())] if "shift" in rows.columns else [ANY]
            wanted = shift or self.shift.value
            self.shift.options, self.shift.value = shifts, wanted if wanted in shifts else ANY
            if self.shift.value != ANY:
                rows = rows[rows["shift"] == self.shift.value]
            runs = rows.drop_duplicates("run_id")
            options = [(_describe(r), r["run_id"]) for _, r in runs.iterrows()]
            previous = set(self.runs.value)
            self.runs.options = options
            ids = [rid for _, rid in options]
            if select is not None:
                chosen = [r["run_id"] for _, r in runs.iterrows() if r["name"] in set(select)]
            else:
                chosen = [rid for rid in ids if rid in previous] or ids
            self.runs.value = tuple(chosen)
        finally:
            self._busy = False
        self.redraw()

    def _experiment_rows(self) -> pd.DataFrame:
        if self.frame.empty or self.experiment.value is None:
            return self.frame
        return self.frame[self.frame["experiment"] == self.experiment.value]

    def selected(self) -> pd.DataFrame:
        """The evaluation lines of the selected runs."""
        if self.frame.empty:
            return self.frame
        return self.frame[self.frame["run_id"].isin(self.runs.value)]

    def reference_frame(self) -> pd.DataFrame:
        """The evaluation lines of the references: the base model(s) the selected runs started from and the
        union baselines of their shifts at the same compute (the same scale too)."""
        sel = self.selected()
        if sel.empty or not self.references.value:
            return self.frame.iloc[:0]
        ids: set[str] = set()
        for run_id in sel["run_id"].unique():
            base = _base_of(self.root / run_id)
            if base is not None:
                ids.add(base)
        columns = ("role", "shift", "scale", "compute_tokens")
        if all(c in self.frame.columns for c in columns):
            unions = self.frame[self.frame["role"] == "union"]
            for _, run in sel.drop_duplicates("run_id").iterrows():
                same = unions[(unions["shift"] == run.get("shift")) & (unions["scale"] == run.get("scale"))
                              & (unions["compute_tokens"] == run.get("compute_tokens"))]
                ids.update(same["run_id"].unique())
        ids -= set(sel["run_id"])
        return self.frame[self.frame["run_id"].isin(ids)]

    # -- drawing ---------------------------------------------------------------------------------
    def curves(self) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The plotted (tokens, loss) lines by panel ("D0", "D1", "avg") and label."""
        out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for panel, ax in zip(PANELS, self.figure.axes):
            out[panel] = {ln.get_label(): (np.asarray(ln.get_xdata(), dtype=float),
                                           np.asarray(ln.get_ydata(), dtype=float))
                          for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        return out

    def redraw(self) -> None:
        """Draw the selected runs and their references; rebuild the final-loss table."""
        if self._busy:
            return
        sel, refs = self.selected(), self.reference_frame()
        fig = self.figure
        fig.clear()
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
        axes = fig.subplots(1, 3)
        pairs = _set_pairs(sel)
        labels: set[str] = set()

        def draw(rows: pd.DataFrame, label: str, d0: str, d1: str | None, **style: Any) -> None:
            rows = rows.sort_values("tokens")
            x = rows["tokens"].to_numpy(dtype=float)
            ys = {"D0": rows.get(f"val_{d0}"), "D1": rows.get(f"val_{d1}") if d1 else None}
            if ys["D0"] is not None and ys["D1"] is not None:
                ys["avg"] = (ys["D0"] + ys["D1"]) / 2
            for panel, ax in zip(PANELS, axes):
                if ys.get(panel) is not None:
                    ax.plot(x, ys[panel].to_numpy(dtype=float), label=label, **style)

        for i, (run_id, rows) in enumerate(_by_run(sel)):
            first = rows.iloc[0]
            label = _unique(str(first.get("name", run_id)), run_id, labels)
            d0 = first.get("d0") if isinstance(first.get("d0"), str) else E.D0
            d1 = first.get("d1") if isinstance(first.get("d1"), str) else None
            draw(rows, label, d0, d1, color=f"C{i % 10}", lw=1.4)
        for run_id, rows in _by_run(refs):
            role = rows.iloc[0].get("role")
            for d0, d1 in pairs:
                if role == "union" and rows.iloc[0].get("d1") != d1:
                    continue
                what = "base model" if role == "base" else "union baseline"
                label = _unique(what if len(pairs) == 1 else f"{what} ({d1})", run_id, labels)
                draw(rows, label, d0, d1, color="black" if role == "base" else "0.5",
                     ls="--" if role == "base" else ":", lw=1.2)
        d0s = sorted({d0 for d0, _ in pairs}) or [E.D0]
        d1s = sorted({d1 for _, d1 in pairs if d1})
        titles = (f"D0 ({', '.join(d0s)})", f"D1 ({', '.join(d1s) or '-'})", "average of D0 and D1")
        for ax, title in zip(axes, titles):
            _tokens_axis(ax)
            ax.set_title(title, fontsize="medium")
        axes[0].set_ylabel("validation loss")
        if sel.empty:
            axes[1].text(0.5, 0.5, "no runs selected", transform=axes[1].transAxes, ha="center", color="0.5")
        elif axes[2].get_lines():
            axes[2].legend(fontsize="small")
        self.image.value = _png(fig)
        self.finals = _final_table(pd.concat([sel, refs], ignore_index=True), d1s)
        self.table.value = (self.finals.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}")
                            if len(self.finals) else "")
        self.status.value = (f"{len(self.runs.value)} of {len(self.runs.options)} runs selected; run store "
                             f"{html.escape(str(self.root))}") if len(self.frame) else \
            f"no runs in the run store {html.escape(str(self.root))} yet"


def _model_preset(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text())["model"].get("preset")
    except (OSError, ValueError, KeyError):
        return None


def _base_of(path: Path) -> str | None:
    """``<experiment>/<dir>`` of the run whose checkpoint the run in ``path`` started from."""
    try:
        init = json.loads((path / "config.json").read_text())["stages"][0].get("init_from", "")
    except (OSError, ValueError, KeyError, IndexError):
        return None
    if not init.endswith((".pt", ".pth")):
        return None
    run_dir = Path(init).parent.parent
    return f"{run_dir.parent.name}/{run_dir.name}"


def _describe(row: pd.Series) -> str:
    parts = [str(row.get("name", row["run_id"]))]
    if isinstance(row.get("scale"), str):
        parts.append(row["scale"])
    seed = row.get("seed")
    if seed is not None and not pd.isna(seed):
        parts.append(f"seed {int(seed)}")
    parts.append(row["run_id"].rsplit("-", 1)[-1])
    return " · ".join(parts) + ("" if row.get("done", True) else " (unfinished)")


def _by_run(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return list(df.groupby("run_id", sort=False)) if len(df) else []


def _unique(label: str, run_id: str, used: set[str]) -> str:
    if label in used:
        label = f"{label} [{run_id.rsplit('-', 1)[-1]}]"
    used.add(label)
    return label


def _set_pairs(rows: pd.DataFrame) -> list[tuple[str, str | None]]:
    """The (D0 set, D1 set) pairs of the runs in ``rows``."""
    if rows.empty:
        return []
    runs = rows.drop_duplicates("run_id")
    d0 = runs["d0"] if "d0" in runs.columns else pd.Series(E.D0, index=runs.index)
    d1 = runs["d1"] if "d1" in runs.columns else pd.Series(None, index=runs.index)
    return sorted({(a if isinstance(a, str) else E.D0, b if isinstance(b, str) else None)
                   for a, b in zip(d0, d1)}, key=str)


def _final_table(df: pd.DataFrame, d1s: list[str]) -> pd.DataFrame:
    """Final losses (``metrics.final_losses``) with forgetting; the base model's D1 is its loss on the D1
    set of the selected runs when they share one."""
    if df.empty:
        return pd.DataFrame()
    finals = M.add_forgetting(M.final_losses(df))
    if len(d1s) == 1 and "role" in finals.columns and f"val_{d1s[0]}" in finals.columns:
        base = finals["role"] == "base"
        finals.loc[base, "D1"] = finals.loc[base, f"val_{d1s[0]}"]
        finals.loc[base, "avg"] = (finals.loc[base, "D0"] + finals.loc[base, "D1"]) / 2
    columns = [c for c in ("name", "experiment", "role", "shift", "replay", "schedule", "max_lr", "tokens",
                           "D0", "D1", "avg", "forgetting", "n_evals") if c in finals.columns]
    if "replay" in finals.columns:
        finals["replay"] = finals["replay"].map(lambda r: "" if pd.isna(r) else M.replay_label(float(r)))
    order = {"continual": 0, "union": 1, "base": 2}
    if "role" in finals.columns:
        finals = finals.sort_values("role", key=lambda s: s.map(order).fillna(0), kind="stable")
    return finals[columns].reset_index(drop=True)
