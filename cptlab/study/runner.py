"""Train a set of runs through the run store: skip finished ones, resume unfinished ones, train the
runs another depends on first, several side by side (two single-thread trainings on a laptop's two cores,
faster in total than one two-thread training of a small model; on a GPU as many as its memory holds, see
``scheduler.workers_for_memory``), optionally within a deadline, with a summary of what became of every
run and where its time went (``scheduler.write_summary``). The runner decides what runs when; an executor
(``executors.LocalWorkers``, persistent worker processes on this machine, by default) decides where."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

from cptlab.study import scheduler
from cptlab.study.executors import Executor, Job, LocalWorkers, Outcome
from cptlab.study.experiments import Run
from cptlab.study.scheduler import LATE, NEEDS_FAILED, NEEDS_UNDONE, RunRecord
from cptlab.training.rundir import RunDir
from cptlab.training.store import RunStore

Log = Callable[[str], None]
DEADLINE_ENV = "CPTLAB_DEADLINE_AT"  # a deadline as a Unix time, for run_all calls without one (notebooks)
STOP_GRACE_S = 60.0  # seconds a run has to stop after the deadline's stop before it is killed


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


def _on_cuda(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def default_workers(device: str = "auto", runs: list[Run] | None = None) -> int:
    """Two side-by-side processes on a CPU with at least two cores, else one; on CUDA as many as the
    GPU's free memory holds of the largest of ``runs`` (``scheduler.workers_for_memory``; 1 without runs);
    one on MPS."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available()
                                 and not torch.backends.mps.is_available())
    if on_cpu:
        return 2 if (os.cpu_count() or 1) >= 2 else 1
    if not _on_cuda(device) or not runs or not torch.cuda.is_available():
        return 1
    index = int(device.split(":")[1]) if ":" in device else 0
    free, _ = torch.cuda.mem_get_info(index)
    per_run = max(scheduler.run_memory_bytes(r.config) for r in runs)
    return scheduler.workers_for_memory(free, per_run, os.cpu_count() or 1)


def _deadline_at(deadline: float | None) -> float | None:
    """The deadline on the ``time.monotonic`` clock: ``deadline`` seconds from now, else the Unix time in
    ``$CPTLAB_DEADLINE_AT`` (set by ``cptlab batch --deadline`` for its notebooks), else None."""
    if deadline is not None:
        if not deadline > 0:
            raise ValueError(f"--deadline: must be > 0 seconds, got {deadline:g}")
        return time.monotonic() + deadline
    if os.environ.get(DEADLINE_ENV):
        return time.monotonic() + float(os.environ[DEADLINE_ENV]) - time.time()
    return None


def run_all(runs: list[Run], root: str | Path | RunStore | None = None, workers: int | None = None,
            quiet: bool = True, log: Log = print, *, deadline: float | None = None,
            order: tuple[str, ...] | None = None, summary: str | Path | None = None,
            executor: Executor | None = None, cluster: str | None = None, store_mode: str = "shared",
            keep_checkpoints: str = "final") -> dict[str, Path]:
    """Train every run not finished yet (and the runs they start from) in the run store ``root`` (default
    ``runs_root()``); return run_id -> DIR.

    ``workers=1`` trains in this process, one run after another; more trains up to ``workers`` runs side
    by side in persistent worker processes (default ``default_workers``; ``executor``: another executor,
    its ``slots`` runs side by side), each as soon as the runs it starts from are done,
    longest chains first (the experiments of ``order`` before the others, see ``scheduler.PRIORITY``).
    ``deadline``: seconds from now; a run that would not finish by then at the speed measured so far is not
    started, and the runs still training then are stopped. ``summary``: a folder to write runs_summary.md
    and runs_summary.json into. A failed run is reported and the others go on; an error listing the failed
    runs (not those the deadline stopped) is raised at the end.

    ``cluster``: train on a Ray cluster instead (``auto``, ``ray://HOST:PORT`` or ``local``; see
    ``ray_executor``), with the run store shared by every node (``store_mode="shared"``) or shipped to and
    from node-local stores (``"node"``, ``keep_checkpoints``: ``final``, ``none`` or ``all``)."""
    records, meta = train_runs(runs, root, workers, quiet, log, deadline=deadline, order=order,
                               executor=executor, cluster=cluster, store_mode=store_mode,
                               keep_checkpoints=keep_checkpoints)
    if summary is not None:
        paths = scheduler.write_summary(records, summary, meta)
        if any(r.status != "already done" for r in records):
            log(f"[runs] summary: {paths[0]}")
    failed = {r.run_id: r.error for r in records
              if r.status == "failed" or r.error in (NEEDS_FAILED, NEEDS_UNDONE)}
    if failed:
        lines = "\n".join(f"  {rid}: {why}" for rid, why in failed.items())
        raise RuntimeError(f"{len(failed)} runs failed:\n{lines}")
    store = as_store(root)
    return {r.run_id: run_dir(r, store) for r in _closure(runs, store)}


def train_runs(runs: list[Run], root: str | Path | RunStore | None = None, workers: int | None = None,
               quiet: bool = True, log: Log = print, *, deadline: float | None = None,
               order: tuple[str, ...] | None = None, executor: Executor | None = None,
               cluster: str | None = None, store_mode: str = "shared",
               keep_checkpoints: str = "final") -> tuple[list[RunRecord], dict]:
    """``run_all``'s work without its error: the summary's rows (every run and the runs they start from,
    needs first) and its header (device, workers, deadline, seconds and tokens/s of the whole, the
    seconds of every run's sections summed; on a cluster, its address and store mode)."""
    store = as_store(root)
    todo = _closure(runs, store)
    started, deadline_at = time.monotonic(), _deadline_at(deadline)
    device = todo[0].config.train.device if todo else "auto"
    pending = [r for r in todo if not is_done(r, store)]
    if cluster is not None and pending:
        if workers is not None or executor is not None:
            raise ValueError("--workers: not with --cluster (the cluster's resources say how many runs "
                             "train side by side)")
        with cluster_executor(cluster, pending, device, store_mode, keep_checkpoints) as on_cluster:
            return train_runs(runs, store, None, quiet, log, deadline=deadline, order=order,
                              executor=on_cluster)
    if executor is not None:
        workers = executor.slots
    elif workers is None:  # past the deadline nothing starts: no CUDA context to size the workers by
        late = deadline_at is not None and time.monotonic() >= deadline_at
        workers = 1 if late else default_workers(device, pending)
    if workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")
    tracker = scheduler.Tracker(todo, pending, store, log, deadline_at)
    if pending:
        log(f"[runs] {len(todo) - len(pending)} of {len(todo)} runs already done; training {len(pending)} "
            f"with {workers} worker{'s' * (workers > 1)}"
            + (f", deadline in {deadline_at - time.monotonic():.0f}s" if deadline_at is not None else ""))
    # One thread per run on a CPU, `workers` runs side by side: two single-thread trainings of a small
    # model beat one two-thread training, and one thread per core stays fast when the machine is busy
    # (OpenMP threads that wait for a core that is taken slow a step down many times).
    threads = scheduler.threads_per_worker(os.cpu_count() or 1, workers) if _on_cuda(device) else 1
    if workers <= 1 and executor is None:
        _train_one_by_one(pending, store, quiet, tracker, order)
    elif executor is not None:
        _train_side_by_side(pending, store, executor, tracker, order, threads)
    elif pending:
        with LocalWorkers(workers, threads) as local:
            _train_side_by_side(pending, store, local, tracker, order, threads)
    seconds = time.monotonic() - started
    trained = sum(r.tokens_trained for r in tracker.records.values() if r.status != "already done")
    if pending:
        log(f"[runs] trained {tracker.done} runs in {seconds:.0f}s ({trained / max(seconds, 1e-9):,.0f} "
            f"tokens/s in all)")
    meta = {"device": device, "workers": workers, **getattr(executor, "meta", {}),
            "deadline_s": None if deadline_at is None else round(deadline_at - started, 1),
            "order": ",".join(order) if order else "longest chains first", "train_s": round(seconds, 1),
            "tokens_trained": trained, "tokens_per_s": round(trained / max(seconds, 1e-9)),
            "run_seconds": scheduler.section_totals(list(tracker.records.values()))}
    return [tracker.records[r.run_id] for r in todo], meta


def _train_one_by_one(pending: list[Run], store: RunStore, quiet: bool, tracker: scheduler.Tracker,
                      order: tuple[str, ...] | None) -> None:
    """Train ``pending`` in this process, one after another: in the given order (needs come first), or by
    ``order``'s priority, each run once the runs it starts from are done."""
    from cptlab.training.train import train

    waiting = list(pending)
    if order is not None:
        waiting = scheduler.start_order(pending, _critical_paths(pending), order)
    stop = tracker.past_deadline if tracker.deadline_at is not None else None
    while waiting:
        run = next((r for r in waiting if tracker.blocked(r) or all(is_done(n, store) for n in r.needs)),
                   None)
        if run is None:
            break
        waiting.remove(run)
        late = tracker.past_deadline() or not tracker.may_start(run)
        why = tracker.blocked(run) or (LATE if late else None)
        if why:
            tracker.not_started(run, why)
            continue
        write_labels(run, store)
        t0 = time.monotonic()
        try:
            result = train(run.config, run_dir(run, store), quiet=quiet, runs_root=store.root, stop=stop)
        except Exception as exc:  # noqa: BLE001 - reported below, the other runs go on
            tracker.finished(run, time.monotonic() - t0, Outcome("failed", f"{type(exc).__name__}: {exc}"))
            continue
        tracker.finished(run, time.monotonic() - t0, Outcome(result.status, seconds=result.seconds))
    for run in waiting:
        tracker.not_started(run, NEEDS_UNDONE)


def _train_side_by_side(pending: list[Run], store: RunStore, executor: Executor,
                        tracker: scheduler.Tracker, order: tuple[str, ...] | None, threads: int) -> None:
    """Train ``pending`` through ``executor``, ``executor.slots`` at a time, each as soon as its needs are
    done, longest chains first; at the deadline, or on Ctrl-C (re-raised once they stopped), stop the
    ones still training (killed after ``STOP_GRACE_S``)."""
    running: dict[Future, tuple[Run, float]] = {}
    try:
        _schedule(pending, store, executor, tracker, order, threads, running)
    except KeyboardInterrupt:
        _stop_all(executor, running, tracker)
        raise


def _stop_all(executor: Executor, running: dict[Future, tuple[Run, float]],
              tracker: scheduler.Tracker) -> None:
    """Stop the runs of ``running`` (each checkpoints and ends, resumable), kill those still training after
    ``STOP_GRACE_S``, and record them."""
    executor.stop()
    if wait(running, timeout=STOP_GRACE_S).not_done:
        executor.kill()
    for fut in wait(running).done:
        run, t0 = running.pop(fut)
        outcome = fut.result()
        if outcome.status == "failed":  # killed
            outcome.status = "stopped"
        tracker.finished(run, time.monotonic() - t0, outcome)


def _schedule(pending: list[Run], store: RunStore, executor: Executor, tracker: scheduler.Tracker,
              order: tuple[str, ...] | None, threads: int, running: dict[Future, tuple[Run, float]]) -> None:
    """``_train_side_by_side``'s loop; ``running`` holds the runs training (future -> run, start)."""
    waiting = scheduler.start_order(pending, _critical_paths(pending), order)  # stable: ties keep the order
    while waiting or running:
        for run in [r for r in waiting if tracker.blocked(r)]:
            waiting.remove(run)
            tracker.not_started(run, tracker.blocked(run))
        for run in [r for r in waiting if all(is_done(n, store) for n in r.needs)]:
            if len(running) >= executor.slots or tracker.past_deadline():
                break
            if tracker.may_start(run):
                waiting.remove(run)
                write_labels(run, store)
                running[executor.submit(job_for(run, store, threads))] = (run, time.monotonic())
        if not running:  # nothing can start: a run they start from is not done, or no time is left
            break
        left = None if tracker.deadline_at is None else max(0.0, tracker.deadline_at - time.monotonic())
        finished, _ = wait(running, timeout=left, return_when=FIRST_COMPLETED)
        if not finished:  # the deadline: stop (each run checkpoints and ends, resumable), then kill
            _stop_all(executor, running, tracker)
        for fut in finished:
            run, t0 = running.pop(fut)
            tracker.finished(run, time.monotonic() - t0, fut.result())
    for run in waiting:
        tracker.not_started(run, LATE if tracker.deadline_at is not None else NEEDS_UNDONE)


def cluster_executor(cluster: str, runs: list[Run], device: str, store_mode: str = "shared",
                     keep_checkpoints: str = "final") -> Executor:
    """A ``RayExecutor`` on ``cluster`` for ``runs``: one CPU thread a run, and on CUDA the fraction of a
    GPU the largest run's memory estimate takes."""
    from cptlab.study.ray_executor import RayExecutor

    per_run = max(scheduler.run_memory_bytes(r.config) for r in runs) if device != "cpu" else None
    return RayExecutor(cluster, store_mode, keep_checkpoints, per_run_bytes=per_run)


def job_for(run: Run, root: str | Path | RunStore | None = None, threads: int = 1) -> Job:
    """Save the run's ``run.yaml`` in its run directory and return the job that trains it there (as
    ``cptlab train run.yaml --out DIR --runs ROOT`` would)."""
    store = as_store(root)
    out = run_dir(run, store)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "run.yaml"
    run.config.save(config)
    return Job(run.run_id, config, out, store.root, threads)
