"""One run's directory: resolved config, metrics.jsonl and checkpoints, written so a kill never corrupts it,
and taken by one trainer at a time.

    config.json          the resolved config (every default filled in)
    metrics.jsonl        one JSON object per line (see docs/training.md, "The run directory")
    labels.json          what the run is (experiment, name, shift, replay, ...), for analysis
    checkpoints/         stage-<name>.pt (+ .json: its step) at every stage end, kept;
                         step-<N>.pt rolling, the last two kept
    DONE                 written when every stage has finished
    .lock, .holder.json  held by the trainer (``filelock``) and who that is

Every file is written to a temporary name, fsynced and renamed, so a reader sees the old or the new
version, never half of one. metrics.jsonl is appended line by line; each checkpoint records the file's
length at that moment, and resuming truncates the file back to it, so no line is lost or repeated.

A stage's ``init_from`` may hold the checkpoint path of another run of a run store, as configs did before
run references: such a path is read as the reference it spells (``legacy_reference``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from cptlab.config import RunConfig, RunRef, diff
from cptlab.files import atomic_write, atomic_write_text

ROLLING_KEEP = 2
LOCK_FILE, HOLDER_FILE = ".lock", ".holder.json"
# What a run directory may hold before the trainer writes config.json: the runner's files and the lock.
BEFORE_CONFIG = {"run.yaml", "labels.json", "train.log", LOCK_FILE, HOLDER_FILE}


class RunDirError(RuntimeError):
    """The run directory holds something we must not overwrite or cannot read."""


def legacy_reference(init_from: str) -> RunRef | None:
    """The reference a checkpoint path of a run store spells (``.../<experiment>/<run id>/checkpoints/
    stage-<stage>.pt``), or None for any other path."""
    parts = Path(init_from).parts
    if len(parts) < 4 or parts[-2] != "checkpoints" or not parts[-1].startswith("stage-"):
        return None
    if not parts[-1].endswith(".pt"):
        return None
    return RunRef(parts[-4], parts[-3], parts[-1][len("stage-"):-len(".pt")])


def with_references(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose stages' checkpoint paths inside a run store are read as references."""
    stages = []
    for st in cfg.stages:
        ref = legacy_reference(st.init_from) if isinstance(st.init_from, str) else None
        stages.append(dataclasses.replace(st, init_from=ref) if ref else st)
    return dataclasses.replace(cfg, stages=stages)


class RunDir:
    """One run's directory on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_path = self.path / "config.json"
        self.labels_path = self.path / "labels.json"
        self._metrics_file = None
        self._lock: FileLock | None = None

    @property
    def experiment(self) -> str:
        """The experiment of a run in a store (its folder's folder)."""
        return self.path.parent.name

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def name(self) -> str:
        """The run's name: its id without the config hash."""
        return self.run_id.rsplit("-", 1)[0]

    # -- taking the directory --------------------------------------------------------------------
    def check_usable(self) -> None:
        """Refuse a path that is a file, and a folder that holds files but is not a run of ours (its
        files are the user's: nothing is written there)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory")
        if self.path.is_dir() and not self.config_path.exists():
            if any(self.ckpt_dir.glob("*.pt")):
                raise RunDirError(f"{self.path} holds checkpoints but no config.json; refusing to use it")
            foreign = sorted(p.name for p in self.path.iterdir() if not _ours_before_config(p.name))
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise RunDirError(f"{self.path} is not a cptlab run directory (it holds {shown} and no "
                                  "config.json); refusing to write into it: give an empty or new folder")

    def lock(self, wait: bool = False) -> None:
        """Take the directory for this process until ``unlock``: another trainer (a process, or a thread
        of this one) is refused, naming who holds it, or waits for it with ``wait``."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.path / LOCK_FILE), timeout=-1 if wait else 0)
            lock.acquire()
        except (Timeout, RuntimeError):  # RuntimeError: held by another FileLock of this very thread
            raise RunDirError(f"{self.path} is being trained by {self._holder()}; wait for it to end or "
                              "stop it (cptlab train --wait waits)") from None
        except OSError as exc:
            raise RunDirError(f"cannot write the run directory {self.path}: {exc.strerror or exc}") from None
        self._lock = lock
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(self.path / HOLDER_FILE, json.dumps(holder) + "\n")

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _holder(self) -> str:
        try:
            h = json.loads((self.path / HOLDER_FILE).read_text())
            return f"process {h['pid']} on {h['host']} (since {h['since']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    # -- config and labels -----------------------------------------------------------------------
    def claim(self, resolved: RunConfig, tolerated: tuple[str, ...] = ()) -> None:
        """Write config.json, or check that the one there is the same config (else refuse). Differences
        in the ``tolerated`` dotted keys (settings that do not change the result) are let through; the
        run keeps the config.json it started with."""
        if self.config_path.exists():
            # read back through RunConfig: a field added since the run started takes its default
            changes = diff(self.load_config().to_dict(), with_references(resolved).to_dict())
            changes = [c for c in changes if c.split(":", 1)[0].split("[")[0] not in tolerated]
            if changes:
                raise RunDirError(
                    f"{self.path} holds a run of a different config; refusing to overwrite it. "
                    "What differs (in DIR -> requested):\n  " + "\n  ".join(changes))
            return
        if self.path.exists() and any(self.ckpt_dir.glob("*.pt")):
            raise RunDirError(f"{self.path} holds checkpoints but no config.json; refusing to use it")
        atomic_write_text(self.config_path, json.dumps(resolved.to_dict(), indent=2, sort_keys=True) + "\n")

    def load_config(self) -> RunConfig:
        """The run's resolved config (checkpoint paths of a run store read as references)."""
        return with_references(RunConfig.from_dict(json.loads(self.config_path.read_text())))

    def labels(self) -> dict[str, Any]:
        """labels.json ({} if the run has none)."""
        return json.loads(self.labels_path.read_text()) if self.labels_path.exists() else {}

    def write_labels(self, labels: dict[str, Any]) -> None:
        """Write labels.json once (a run keeps the labels it was first trained under)."""
        if not self.labels_path.exists():
            atomic_write_text(self.labels_path, json.dumps(labels, indent=2, sort_keys=True) + "\n")

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def mark_done(self) -> None:
        atomic_write_text(self.path / "DONE", "")

    # -- metrics ---------------------------------------------------------------------------------
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
        """metrics.jsonl's records. A line that is not JSON is an error naming the file and the line, but
        for an unfinished last line (a write in progress or cut short by a kill), which is left out."""
        if not self.metrics_path.exists():
            return []
        text = self.metrics_path.read_text()
        lines = text.splitlines()
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if i == len(lines) and not text.endswith("\n"):
                    break
                raise RunDirError(
                    f"{self.metrics_path} line {i} is not a JSON record: {line[:80]!r}") from None
        return records

    # -- checkpoints -----------------------------------------------------------------------------
    def stage_checkpoint(self, stage: str) -> Path:
        """The checkpoint kept at the end of ``stage``."""
        return self.ckpt_dir / f"stage-{stage}.pt"

    def save_stage_checkpoint(self, state: dict[str, Any], stage: str, step: int) -> Path:
        """Atomically write the end-of-stage checkpoint, then its step beside it."""
        path = self._save(state, self.stage_checkpoint(stage))
        atomic_write_text(path.with_suffix(".json"), f'{{"step": {step}}}\n')
        return path

    def save_rolling_checkpoint(self, state: dict[str, Any], step: int) -> Path:
        """Atomically write ``step-<step>.pt``; prune rolling ones beyond the last ``ROLLING_KEEP``."""
        path = self._save(state, self.ckpt_dir / f"step-{step:09d}.pt")
        for old in sorted(self.ckpt_dir.glob("step-*.pt"))[:-ROLLING_KEEP]:
            old.unlink(missing_ok=True)
        return path

    def merge_snapshot(self, stage: str, index: int) -> Path:
        """Weights ``index`` of those ``stage`` averages at its end (its ``merge``), in ``checkpoints/merge/``
        where no resume looks for a checkpoint."""
        return self.ckpt_dir / "merge" / f"{stage}-{index}.pt"

    def save_merge_snapshot(self, model_state: dict[str, Any], stage: str, index: int) -> Path:
        path = self.merge_snapshot(stage, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        return self._save({"model": model_state}, path)

    def clear_merge_snapshots(self, stage: str) -> None:
        """Remove ``stage``'s snapshots (once its merged checkpoint is written)."""
        for path in (self.ckpt_dir / "merge").glob(f"{stage}-*.pt"):
            path.unlink(missing_ok=True)

    def _save(self, state: dict[str, Any], path: Path) -> Path:
        atomic_write(path, lambda f: torch.save(state, f), binary=True)
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


def _ours_before_config(name: str) -> bool:
    """A file the runner or the trainer may have put in a run directory before its config.json: the
    runner's files, the lock, or an atomic write of ours in progress (``.<name>.<random>.tmp``)."""
    return name in BEFORE_CONFIG or (name.startswith(".") and name.endswith(".tmp"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``RunDir`` (weights only, no pickled code)."""
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
