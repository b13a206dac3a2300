"""The run store and each run's directory: the only place that knows where a run's files are.

A run store is a folder of runs, ``<root>/<experiment>/<run id>/`` (``RunStore``), the run id being
``<name>-<config hash>`` (``run_id``), so the same config always lands in the same directory. The root is
``$CPTLAB_RUNS``, else ``./runs`` (``runs_root``). A run's directory (``RunDir``) holds::

    config.json          the resolved config (every default filled in)
    metrics.jsonl        one JSON object per line (see README, "metrics.jsonl")
    labels.json          what the run is (experiment, name, shift, replay, ...), for analysis
    checkpoints/         stage-<name>.pt (+ .json: its step) at every stage end, kept;
                         step-<N>.pt rolling, the last two kept
    DONE                 written when every stage has finished

Every file is written to a temporary name, fsynced and renamed, so a reader sees the old or the new
version, never half of one. metrics.jsonl is appended line by line; each checkpoint records the file's
length at that moment, and resuming truncates the file back to it, so no line is lost or repeated.

A run that starts from another run's checkpoint names it by reference (``RunRef``: experiment, run id,
stage), resolved against the store it lives in (``RunStore.checkpoint``): a store can be moved or copied
to another machine and every run is still found. Stores written when ``init_from`` held the checkpoint's
absolute path still load: such a path is read as the reference it spells (``legacy_reference``), and a run
whose directory is named by the hash of that older config is found by the hash of its referenced config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from cptlab.config import RunConfig, RunRef, diff
from cptlab.files import atomic_write, atomic_write_text

ROLLING_KEEP = 2


class RunDirError(RuntimeError):
    """The run directory holds something we must not overwrite or cannot read."""


def runs_root() -> Path:
    """The run store's root: ``$CPTLAB_RUNS``, else ``runs``, as an absolute path (relative ones are taken
    from the current directory)."""
    return Path(os.environ.get("CPTLAB_RUNS", "runs")).resolve()


def run_id(name: str, config: RunConfig) -> str:
    """The id of run ``name`` of ``config`` in a store: ``<name>-<config hash>``."""
    return f"{name}-{config.hash()}"


def run_path(root: Path, experiment: str, run_id: str) -> Path:
    """Where run ``run_id`` of ``experiment`` lives in the store at ``root``."""
    return root / experiment / run_id


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

    # -- config and labels -----------------------------------------------------------------------
    def claim(self, resolved: RunConfig) -> None:
        """Write config.json, or check that the one there is the same config (else refuse)."""
        if self.config_path.exists():
            # read back through RunConfig: a field added since the run started takes its default
            changes = diff(self.load_config().to_dict(), with_references(resolved).to_dict())
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
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

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


class RunStore:
    """The runs under ``root`` (default ``runs_root()``), one directory per (experiment, run id)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).resolve() if root is not None else runs_root()
        self._legacy_dirs: dict[tuple[str, str], Path] | None = None

    def path(self, experiment: str, run_id: str) -> Path:
        """The directory of run ``run_id`` of ``experiment`` (a store of older configs: see the module
        docstring); it need not exist yet."""
        path = run_path(self.root, experiment, run_id)
        if path.exists():
            return path
        return self._legacy().get((experiment, run_id), path)

    def run(self, experiment: str, run_id: str) -> RunDir:
        return RunDir(self.path(experiment, run_id))

    def is_done(self, experiment: str, run_id: str) -> bool:
        return self.run(experiment, run_id).done

    def checkpoint(self, ref: RunRef) -> Path:
        """The end-of-stage checkpoint ``ref`` names."""
        return self.run(ref.experiment, ref.run).stage_checkpoint(ref.stage)

    def runs(self, experiment: str | None = None) -> list[RunDir]:
        """Every run directory with a metrics.jsonl (of ``experiment``, or of all), sorted by path."""
        pattern = f"{experiment}/*/metrics.jsonl" if experiment else "*/*/metrics.jsonl"
        return [RunDir(p.parent) for p in sorted(self.root.glob(pattern))]

    def with_hash(self, config_hash: str) -> list[RunDir]:
        """The runs of any experiment and name whose config hashes to ``config_hash``, finished ones first."""
        found = set(self.root.glob(f"*/*-{config_hash}"))
        found |= {path for (_, rid), path in self._legacy().items() if rid.endswith(f"-{config_hash}")}
        return [RunDir(p) for p in sorted(found, key=lambda p: (not (p / "DONE").exists(), str(p)))]

    def _legacy(self) -> dict[tuple[str, str], Path]:
        """(experiment, run id of its referenced config) -> directory, for every run directory whose
        config.json holds a checkpoint path of a run store (named by the hash of that older config)."""
        if self._legacy_dirs is None:
            self._legacy_dirs = {}
            for config_path in self.root.glob("*/*/config.json"):
                self._index_legacy(RunDir(config_path.parent))
        return self._legacy_dirs

    def _index_legacy(self, run: RunDir) -> None:
        try:
            raw = RunConfig.from_dict(json.loads(run.config_path.read_text()))
        except (OSError, ValueError):
            return
        if with_references(raw) == raw:
            return  # no checkpoint path to read as a reference: named by its own config's hash
        cfg = run.load_config()
        # config.json has the tokenizer's vocab size filled in; the run's builder may have left it unset
        unset = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=None))
        name = run.path.name.rsplit("-", 1)[0]
        for variant in (cfg, unset):
            self._legacy_dirs[(run.path.parent.name, run_id(name, variant))] = run.path
