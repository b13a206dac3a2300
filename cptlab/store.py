"""The run directory: resolved config, metrics.jsonl and checkpoints, written so a kill never corrupts it.

Layout of a run directory DIR::

    DIR/config.json          the resolved config (every default filled in)
    DIR/metrics.jsonl        one JSON object per line (see README, "metrics.jsonl")
    DIR/checkpoints/         stage-<name>.pt at every stage end (kept), step-<N>.pt rolling (last 2 kept)
    DIR/DONE                 written when every stage has finished

Every file is written to a temporary name, fsynced and renamed, so a reader sees the old or the new
version, never half of one. metrics.jsonl is appended line by line; each checkpoint records the file's
length at that moment, and resuming truncates the file back to it, so no line is lost or repeated.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from cptlab.config import RunConfig, atomic_write, atomic_write_text, diff

ROLLING_KEEP = 2


class RunDirError(RuntimeError):
    """The run directory holds something we must not overwrite or cannot read."""


class RunDir:
    """One run's directory on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_path = self.path / "config.json"
        self._metrics_file = None

    # -- config --------------------------------------------------------------------------------
    def claim(self, resolved: RunConfig) -> None:
        """Write config.json, or check that the one there is the same config (else refuse)."""
        new = resolved.to_dict()
        if self.config_path.exists():
            # read back through RunConfig: a field added since the run started takes its default
            old = RunConfig.from_dict(json.loads(self.config_path.read_text())).to_dict()
            changes = diff(old, new)
            if changes:
                raise RunDirError(
                    f"{self.path} holds a run of a different config; refusing to overwrite it. "
                    "What differs (in DIR -> requested):\n  " + "\n  ".join(changes))
            return
        if self.path.exists() and any(self.ckpt_dir.glob("*.pt")):
            raise RunDirError(f"{self.path} holds checkpoints but no config.json; refusing to use it")
        atomic_write_text(self.config_path, json.dumps(new, indent=2, sort_keys=True) + "\n")

    def load_config(self) -> RunConfig:
        return RunConfig.from_dict(json.loads(self.config_path.read_text()))

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def mark_done(self) -> None:
        atomic_write_text(self.path / "DONE", "")

    # -- metrics -------------------------------------------------------------------------------
    def open_metrics(self, keep_bytes: int) -> None:
        """Open metrics.jsonl for appending after cutting it back to ``keep_bytes`` (what the
        checkpoint being resumed had seen)."""
        self.path.mkdir(parents=True, exist_ok=True)
        size = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        if size < keep_bytes:
            raise RunDirError(
                f"{self.metrics_path} is shorter ({size} bytes) than its checkpoint recorded ({keep_bytes})")
        with open(self.metrics_path, "ab") as f:
            f.truncate(keep_bytes)
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, record: dict[str, Any]) -> None:
        self._metrics_file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._metrics_file.flush()

    def metrics_size(self) -> int:
        """Bytes of metrics.jsonl, made durable first (a checkpoint records it)."""
        self._metrics_file.flush()
        os.fsync(self._metrics_file.fileno())
        return self.metrics_path.stat().st_size

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any], name: str) -> Path:
        """Atomically write ``checkpoints/<name>.pt``; prune rolling ones beyond the last two."""
        path = self.ckpt_dir / f"{name}.pt"
        atomic_write(path, lambda f: torch.save(state, f), binary=True)
        rolling = sorted(self.ckpt_dir.glob("step-*.pt"))
        for old in rolling[:-ROLLING_KEEP]:
            old.unlink(missing_ok=True)
        return path

    def checkpoints(self) -> list[Path]:
        """Checkpoints newest first (by the run's step, stage ends before rolling at the same step)."""
        found = []
        for path in self.ckpt_dir.glob("*.pt"):
            found.append((_checkpoint_step(path), path.name.startswith("stage-"), path))
        return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint that loads; a corrupt one is reported by name and skipped.
        Temp files left by a write that was killed halfway are removed."""
        for stale in self.ckpt_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        for path in self.checkpoints():
            try:
                return load_checkpoint(path)
            except Exception as exc:  # noqa: BLE001 - any failure to read means: use an older one
                warnings.warn(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                              "falling back to the previous one", stacklevel=2)
        return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``RunDir.save_checkpoint`` (weights only, no pickled code)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise RunDirError(f"{path} is not a cptlab checkpoint")
    return state


def _checkpoint_step(path: Path) -> int:
    """The global step stored in a checkpoint's sidecar name or, for stage ends, in the file."""
    if path.name.startswith("step-"):
        return int(path.stem.split("-")[1])
    meta = path.with_suffix(".json")
    if meta.exists():
        try:
            return int(json.loads(meta.read_text())["step"])
        except (ValueError, KeyError):
            pass
    return -1


# -- loading runs for analysis ---------------------------------------------------------------------

def eval_frame(run_path: str | Path, labels: dict[str, Any] | None = None):
    """One run's evaluation lines as a pandas DataFrame: step, tokens, stage, lr, one ``val_<set>``
    column per eval set, plus ``labels`` (default: the run's labels.json) as constant columns."""
    import pandas as pd

    run = RunDir(run_path)
    if labels is None:
        path = run.path / "labels.json"
        labels = json.loads(path.read_text()) if path.exists() else {}
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


def load_experiment(root: str | Path, experiment: str | None = None):
    """All runs under ``root/<experiment>/`` (every experiment if None) in one DataFrame, one row per
    evaluation line, with each run's labels (experiment, name, shift, replay, ...) as columns."""
    import pandas as pd

    root = Path(root)
    pattern = f"{experiment}/*/metrics.jsonl" if experiment else "*/*/metrics.jsonl"
    frames = [eval_frame(p.parent) for p in sorted(root.glob(pattern))]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_runs(runs: list, root: str | Path = "runs"):
    """The evaluation lines of ``runs`` (``cptlab.experiments.Run``) in one DataFrame; each run's labels
    come from its builder, so a run shared by two experiments is labelled as each one asks."""
    import pandas as pd

    frames = []
    seen = set()
    for run in runs:
        path = Path(root) / run.experiment / run.run_id
        if path in seen:  # listed twice (e.g. the base model of each shift's ladder): its lines once
            continue
        seen.add(path)
        df = eval_frame(path, {"experiment": run.experiment, "name": run.name, **run.labels})
        if len(df):
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def runs_root() -> Path:
    """The run store's root: ``$CPTLAB_RUNS``, else ``runs``, as an absolute path (relative ones are taken
    from the current directory)."""
    return Path(os.environ.get("CPTLAB_RUNS", "runs")).resolve()
