"""Train a set of runs through the run store: skip finished ones, resume unfinished ones, train the
runs another depends on first, and use both cores of a laptop by running two single-thread trainings
side by side (faster in total than one two-thread training of a small model)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from cptlab.study.experiments import Run
from cptlab.training import runtime
from cptlab.training.rundir import RunDir
from cptlab.training.store import RunStore

Log = Callable[[str], None]


def as_store(root: str | Path | RunStore | None) -> RunStore:
    """``root`` as a ``RunStore`` (None: ``runs_root()``)."""
    return root if isinstance(root, RunStore) else RunStore(root)


def run_dir(run: Run, root: str | Path | RunStore | None = None) -> Path:
    """The trainer's DIR for ``run`` in the run store ``root``."""
    return as_store(root).path(run.experiment, run.run_id)


def is_done(run: Run, root: str | Path | RunStore | None = None) -> bool:
    return as_store(root).is_done(run.experiment, run.run_id)


def write_labels(run: Run, root: str | Path | RunStore | None = None) -> None:
    """Write ``labels.json`` (experiment, name and the builder's labels) into the run's directory once."""
    RunDir(run_dir(run, root)).write_labels({"experiment": run.experiment, "name": run.name, **run.labels})


def _closure(runs: list[Run], store: RunStore) -> list[Run]:
    """The runs and everything they need, each once (by directory), needs first."""
    seen: dict[Path, Run] = {}

    def visit(run: Run) -> None:
        for need in run.needs:
            visit(need)
        seen.setdefault(run_dir(run, store), run)

    for run in runs:
        visit(run)
    return list(seen.values())


def _critical_paths(runs: list[Run]) -> dict[str, int]:
    """run_id -> the tokens of the longest chain of runs that starts with it (itself and the runs that
    start from it, transitively). Starting the runs with the longest chains first keeps every worker busy
    until the end instead of leaving one long run alone at the tail."""
    dependents: dict[str, list[Run]] = {r.run_id: [] for r in runs}
    for run in runs:
        for need in run.needs:
            dependents.setdefault(need.run_id, []).append(run)
    paths: dict[str, int] = {}

    def path(run: Run) -> int:
        if run.run_id not in paths:
            own = sum(stage.tokens for stage in run.config.stages)
            paths[run.run_id] = own + max((path(d) for d in dependents[run.run_id]), default=0)
        return paths[run.run_id]

    for run in runs:
        path(run)
    return paths


def default_workers(device: str = "auto") -> int:
    """Two side-by-side processes on a CPU with at least two cores, else one."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available()
                                 and not torch.backends.mps.is_available())
    return 2 if on_cpu and (os.cpu_count() or 1) >= 2 else 1


def run_all(runs: list[Run], root: str | Path | RunStore | None = None, workers: int | None = None,
            quiet: bool = True, log: Log = print) -> dict[str, Path]:
    """Train every run not finished yet (and the runs they start from) in the run store ``root`` (default
    ``runs_root()``); return run_id -> DIR.

    ``workers=1`` trains in this process, one run after another; more trains up to ``workers`` runs side
    by side in subprocesses, each on one thread with glibc malloc tuned. A failed run is reported and the
    others go on; an error listing the failed runs is raised at the end."""
    store = as_store(root)
    todo = _closure(runs, store)
    pending = [r for r in todo if not is_done(r, store)]
    if workers is None:
        workers = default_workers(todo[0].config.train.device if todo else "auto")
    if pending:
        log(f"[runs] {len(todo) - len(pending)} of {len(todo)} runs already done; training {len(pending)} "
            f"with {workers} worker{'s' * (workers > 1)}")
    started = time.perf_counter()
    progress = _Progress(len(pending), log)
    if workers <= 1:
        _train_one_by_one(pending, store, quiet, progress)
    else:
        _train_side_by_side(pending, store, workers, progress)
    if pending:
        log(f"[runs] trained {progress.done} runs in {time.perf_counter() - started:.0f}s")
    if progress.failed:
        lines = "\n".join(f"  {rid}: {why}" for rid, why in progress.failed.items())
        raise RuntimeError(f"{len(progress.failed)} runs failed:\n{lines}")
    return {r.run_id: run_dir(r, store) for r in todo}


class _Progress:
    """Runs finished and failed so far, with a log line per finished run."""

    def __init__(self, total: int, log: Log):
        self.total, self.done, self.log = total, 0, log
        self.failed: dict[str, str] = {}

    def finished(self, run: Run, seconds: float) -> None:
        self.done += 1
        self.log(f"[runs] {self.done}/{self.total} {run.experiment}/{run.name} in {seconds:.0f}s")


def _train_one_by_one(pending: list[Run], store: RunStore, quiet: bool, progress: _Progress) -> None:
    """Train ``pending`` in this process, in order (needs come first)."""
    from cptlab.training.train import train

    for run in pending:
        if not all(is_done(n, store) for n in run.needs):
            progress.failed[run.run_id] = "a run it starts from failed"
            continue
        write_labels(run, store)
        t0 = time.perf_counter()
        try:
            train(run.config, run_dir(run, store), quiet=quiet, runs_root=store.root)
        except Exception as exc:  # noqa: BLE001 - reported below, the other runs go on
            progress.failed[run.run_id] = f"{type(exc).__name__}: {exc}"
            continue
        progress.finished(run, time.perf_counter() - t0)


def _train_side_by_side(pending: list[Run], store: RunStore, workers: int, progress: _Progress) -> None:
    """Train ``pending`` in subprocesses, ``workers`` at a time, each as soon as its needs are done,
    longest chains first."""
    # One thread per run, `workers` runs side by side: two single-thread trainings of a small model beat one
    # two-thread training, and one thread per core stays fast when the machine is busy (OpenMP threads that
    # wait for a core that is taken slow a step down many times).
    failed = progress.failed
    running: dict[Future, tuple[Run, float]] = {}
    paths = _critical_paths(pending)
    waiting = sorted(pending, key=lambda r: -paths[r.run_id])  # stable: ties keep the given order
    with ThreadPoolExecutor(workers) as pool:
        while waiting or running:
            for run in [r for r in waiting if any(n.run_id in failed for n in r.needs)]:
                waiting.remove(run)
                failed[run.run_id] = "a run it starts from failed"
            ready = [r for r in waiting if all(is_done(n, store) for n in r.needs)]
            for run in ready[: workers - len(running)]:
                waiting.remove(run)
                write_labels(run, store)
                running[pool.submit(_train_subprocess, run, store)] = (run, time.perf_counter())
            if not running:
                for run in waiting:  # nothing can start: a run they start from is not done
                    failed[run.run_id] = "a run it starts from is not done"
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                run, t0 = running.pop(fut)
                error = fut.result()
                if error:
                    failed[run.run_id] = error
                else:
                    progress.finished(run, time.perf_counter() - t0)


def train_command(run: Run, root: str | Path | RunStore | None = None) -> tuple[list[str], dict[str, str]]:
    """Save the run's ``run.yaml`` and return the command and environment that train it in a subprocess:
    ``python -m cptlab train`` on one thread with glibc malloc tuned."""
    store = as_store(root)
    out = run_dir(run, store)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "run.yaml"
    run.config.save(config)
    env = runtime.malloc_subprocess_env(dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    cmd = [sys.executable, "-m", "cptlab", "train", str(config), "--out", str(out), "--runs", str(store.root),
           "--quiet"]
    return cmd, env


def _train_subprocess(run: Run, store: RunStore) -> str | None:
    """Train ``run`` with ``train_command``; None on success, else the error."""
    cmd, env = train_command(run, store)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return f"exit {proc.returncode}: {tail}"
    return None
