"""Runs of the run store as pandas DataFrames: one row per evaluation line, with the run's labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cptlab.training.rundir import RunDir
from cptlab.training.store import RunStore


def eval_frame(run: str | Path | RunDir, labels: dict[str, Any] | None = None) -> pd.DataFrame:
    """One run's evaluation lines: step, tokens, stage, lr, one ``val_<set>`` column per eval set, plus
    ``labels`` (default: the run's labels.json) as constant columns, ``run_id`` and ``done``."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    if labels is None:
        labels = run.labels()
    rows = []
    for rec in run.read_metrics():
        if "val" in rec:
            row = {"step": rec["step"], "tokens": rec["tokens"], "stage": rec["stage"], "lr": rec["lr"]}
            row.update({f"val_{k}": v for k, v in rec["val"].items()})
            rows.append(row)
    df = pd.DataFrame(rows)
    for key, value in labels.items():
        df[key] = [value] * len(df) if isinstance(value, (list, dict)) else value
    df["run_id"] = run.path.name
    df["done"] = run.done
    return df


def load_experiment(root: str | Path | RunStore, experiment: str | None = None) -> pd.DataFrame:
    """All runs of ``experiment`` (every experiment if None) in the run store ``root`` in one DataFrame,
    one row per evaluation line, with each run's labels (experiment, name, shift, replay, ...) as columns."""
    store = root if isinstance(root, RunStore) else RunStore(root)
    frames = [df for df in (eval_frame(run) for run in store.runs(experiment)) if len(df)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_runs(runs: list, root: str | Path | RunStore | None = None) -> pd.DataFrame:
    """The evaluation lines of ``runs`` (``cptlab.study.experiments.Run``) in the run store ``root``
    (default ``runs_root()``) in one DataFrame; each run's labels come from its builder, so a run shared
    by two experiments is labelled as each one asks."""
    store = root if isinstance(root, RunStore) else RunStore(root)
    frames = []
    seen = set()
    for run in runs:
        path = store.path(run.experiment, run.run_id)
        if path in seen:  # listed twice (e.g. the base model of each shift's ladder): its lines once
            continue
        seen.add(path)
        df = eval_frame(path, {"experiment": run.experiment, "name": run.name, **run.labels})
        if len(df):
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
