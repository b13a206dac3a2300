"""Train a set of runs through the run store: skip finished ones, resume unfinished ones, train the
runs another depends on first, and use both cores of a laptop by running two single-thread trainings
side by side (faster in total than one two-thread training of a small model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from cptlab.config import atomic_write_text
from cptlab.experiments import Run


def run_dir(run: Run, root: str | Path = "runs") -> Path:
    """``<root>/<experiment>/<name>-<config hash>``: the trainer's DIR for this run."""
    return Path(root) / run.experiment / run.run_id


def is_done(run: Run, root: str | Path = "runs") -> bool:
    return (run_dir(run, root) / "DONE").exists()


def _closure(runs: list[Run], root: str | Path) -> list[Run]:
    """The runs and everything they need, each once (by directory), needs first."""
    seen: dict[Path, Run] = {}

    def visit(run: Run) -> None:
        for need in run.needs:
            visit(need)
        seen.setdefault(run_dir(run, root), run)

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


def run_all(runs: list[Run], root: str | Path = "runs", workers: int | None = None, quiet: bool = True,
            log=print) -> dict[str, Path]:
    """Train every run not finished yet (and the runs they start from); return run_id -> DIR.

    ``workers=1`` trains in this process, one run after another; more trains up to ``workers`` runs side
    by side in subprocesses, each on one thread with glibc malloc tuned. A failed run is reported and the
    others go on; an error listing the failed runs is raised at the end."""
    root = Path(root)
    todo = _closure(runs, root)
    dirs = {r.run_id: run_dir(r, root) for r in todo}
    pending = [r for r in todo if not is_done(r, root)]
    if workers is None:
        workers = default_workers(todo[0].config.train.device if todo else "auto")
    n_total, n_done = len(pending), 0
    if pending:
        log(f"[runs] {len(todo) - n_total} of {len(todo)} runs already done; training {n_total} "
            f"with {workers} worker{'s' * (workers > 1)}")
    failed: dict[str, str] = {}
    started = time.perf_counter()

    def ready(run: Run) -> bool:
        return all(is_done(n, root) for n in run.needs)

    if workers <= 1:
        from cptlab.train import train

        for run in pending:
            if not ready(run):
                failed[run.run_id] = "a run it starts from failed"
                continue
            write_labels(run, root)
            t0 = time.perf_counter()
            try:
                train(run.config, run_dir(run, root), quiet=quiet)
            except Exception as exc:  # noqa: BLE001 - reported below, the other runs go on
                failed[run.run_id] = f"{type(exc).__name__}: {exc}"
                continue
            n_done += 1
            log(f"[runs] {n_done}/{n_total} {run.experiment}/{run.name} in {time.perf_counter() - t0:.0f}s")
    else:
        # One thread per run, `workers` runs side by side: two single-thread trainings of a small model
        # beat one two-thread training, and one thread per core stays fast when the machine is busy
        # (OpenMP threads that wait for a core that is taken slow a step down many times).
        running: dict[Future, tuple[Run, float]] = {}
        paths = _critical_paths(pending)
        waiting = sorted(pending, key=lambda r: -paths[r.run_id])  # stable: ties keep the given order
        with ThreadPoolExecutor(workers) as pool:
            while waiting or running:
                for run in [r for r in waiting if any(n.run_id in failed for n in r.needs)]:
                    waiting.remove(run)
                    failed[run.run_id] = "a run it starts from failed"
                for run in [r for r in waiting if ready(r)][: workers - len(running)]:
                    waiting.remove(run)
                    write_labels(run, root)
                    running[pool.submit(_train_subprocess, run, root)] = (run, time.perf_counter())
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
                        continue
                    n_done += 1
                    log(f"[runs] {n_done}/{n_total} {run.experiment}/{run.name} in "
                        f"{time.perf_counter() - t0:.0f}s")
    if pending:
        log(f"[runs] trained {n_done} runs in {time.perf_counter() - started:.0f}s")
    if failed:
        lines = "\n".join(f"  {rid}: {why}" for rid, why in failed.items())
        raise RuntimeError(f"{len(failed)} runs failed:\n{lines}")
    return dirs


def write_labels(run: Run, root: Path) -> None:
    """Write ``labels.json`` (experiment, name and the builder's labels) into the run's directory once."""
    path = run_dir(run, root) / "labels.json"
    if not path.exists():
        labels = {"experiment": run.experiment, "name": run.name, **run.labels}
        atomic_write_text(path, json.dumps(labels, indent=2, sort_keys=True) + "\n")


def train_command(run: Run, root: str | Path) -> tuple[list[str], dict[str, str]]:
    """Save the run's ``run.yaml`` and return the command and environment that train it in a subprocess:
    ``python -m cptlab train`` on one thread with glibc malloc tuned."""
    from cptlab import runtime

    out = run_dir(run, root)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "run.yaml"
    run.config.save(config)
    env = runtime.malloc_subprocess_env(dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    return [sys.executable, "-m", "cptlab", "train", str(config), "--out", str(out), "--quiet"], env


def _train_subprocess(run: Run, root: Path) -> str | None:
    """Train ``run`` with ``train_command``; None on success, else the error."""
    cmd, env = train_command(run, root)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return f"exit {proc.returncode}: {tail}"
    return None
