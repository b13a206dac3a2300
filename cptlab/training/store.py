"""The run store: a folder of runs, ``<root>/<experiment>/<run id>/``, and the only place that knows where a
run's directory is.

The run id is ``<name>-<config hash>`` (``run_id``), so the same config always lands in the same directory.
The root is ``$CPTLAB_RUNS``, else ``./runs`` (``runs_root``). A run that starts from another run's
checkpoint names it by reference (``RunRef``: experiment, run id, stage), resolved against the store it lives
in (``RunStore.checkpoint``): a store can be moved or copied to another machine and every run is still
found. Stores written when ``init_from`` held the checkpoint's absolute path still load: such a path is read
as the reference it spells (``rundir.legacy_reference``), and a run whose directory is named by the hash of
that older config is found by the hash of its referenced config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from cptlab.config import RunConfig, RunRef
from cptlab.training.rundir import RunDir, with_references


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
        cfg = with_references(raw)
        if cfg == raw:
            return  # no checkpoint path to read as a reference: named by its own config's hash
        # config.json has the tokenizer's vocab size filled in; the run's builder may have left it unset
        unset = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=None))
        for variant in (cfg, unset):
            self._legacy_dirs[(run.experiment, run_id(run.name, variant))] = run.path
