"""Where the runner's runs train. The runner decides what runs when; an executor only decides where: it
takes a ``Job`` (a run's saved config, run directory and run store) and returns a future of its
``Outcome``. ``LocalWorkers`` trains jobs in persistent worker processes on this machine (``python -m
cptlab worker``, see ``cptlab.training.worker``): torch is imported once per worker and a worker trains
runs one after another; a worker that dies or whose run fails is replaced by a new one for the next job.
An executor for a cluster engine implements the same four members (``slots``, ``submit``, ``stop``,
``kill``) and ``close``."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cptlab.training import runtime

STOPPED_BEFORE_START = "stopped at the deadline before it started"


@dataclass(frozen=True)
class Job:
    """One run to train: ``cptlab train CONFIG --out OUT --runs RUNS`` on ``threads`` CPU threads."""

    run_id: str
    config: Path  # the run's run.yaml, saved in its run directory
    out: Path
    runs: Path
    threads: int = 1


@dataclass
class Outcome:
    """What became of a job: ``done``, ``stopped`` (resumable) or ``failed`` (``error`` says why), and
    where its time went (``seconds``: startup, data, steps, eval, checkpoint; only startup for a run that
    failed); on a cluster, the node and GPU it trained on and how many times it was started (``tries``:
    more than one after a lost worker)."""

    status: str
    error: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    node: str = ""
    gpu: str = ""
    tries: int = 1


class Executor(Protocol):
    """The seam between the runner and the machines that train its runs."""

    slots: int  # runs it trains side by side

    def submit(self, job: Job) -> Future[Outcome]:
        """Start training ``job`` as soon as a slot is free."""

    def stop(self) -> None:
        """Stop every run training now at its next step, with a checkpoint; start no more."""

    def kill(self) -> None:
        """End every run still training now (after ``stop`` had its grace time)."""

    def close(self) -> None:
        """Let go of the workers (after the last outcome)."""


def worker_command(threads: int = 1) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a worker process on ``threads`` threads (OMP_NUM_THREADS; threads
    are not part of a run's config, so not of its identity) with glibc malloc tuned."""
    env = runtime.malloc_subprocess_env(dict(os.environ, OMP_NUM_THREADS=str(threads),
                                             MKL_NUM_THREADS=str(threads)))
    return [sys.executable, "-m", "cptlab", "worker"], env


class _Worker:
    """One ``cptlab worker`` process, with the last lines of its stderr (for the error of a run that
    kills it)."""

    def __init__(self, threads: int):
        cmd, env = worker_command(threads)
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.stderr: collections.deque[str] = collections.deque(maxlen=200)
        self.spent = False  # its last run failed: it is not given another
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def run(self, job: Job, sent_at: float) -> Outcome:
        """Send ``job`` and wait for its answer (or for the process to end)."""
        self.stderr.clear()
        request = {"config": str(job.config), "out": str(job.out), "runs": str(job.runs),
                   "threads": job.threads, "sent_at": sent_at}
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self._answer()
        except OSError:  # BrokenPipeError included: the process is gone
            answer = None
        if answer is None:  # the process ended: killed, or crashed outside a run
            self.spent = True
            code = self.proc.wait()
            time.sleep(0.05)  # let the drain thread read stderr's last lines
            tail = "\n".join([s for s in self.stderr if s.strip()][-5:])
            return Outcome("failed", f"exit {code}: {tail}", {"startup": time.time() - sent_at})
        self.spent = answer["status"] == "failed"
        return Outcome(answer["status"], answer["error"], answer["seconds"])

    def _answer(self) -> dict | None:
        """The next answer line on the worker's stdout (None at its end); any other line is kept with
        stderr's."""
        for line in self.proc.stdout:
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if isinstance(answer, dict) and "status" in answer:
                return answer
            self.stderr.append(line.rstrip("\n"))
        return None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def close(self, timeout: float = 10.0) -> None:
        """End of input: the worker exits; killed if it does not within ``timeout`` seconds."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LocalWorkers:
    """``slots`` persistent worker processes on this machine, each ``threads`` CPU threads; a worker is
    started when a job needs one and no idle one is left."""

    def __init__(self, slots: int, threads: int = 1):
        if slots < 1:
            raise ValueError(f"--workers: must be >= 1, got {slots}")
        self.slots, self.threads = slots, threads
        self.processes_started = 0
        self._pool = ThreadPoolExecutor(slots)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._stopping = False

    def submit(self, job: Job) -> Future[Outcome]:
        return self._pool.submit(self._train, job)

    def _train(self, job: Job) -> Outcome:
        sent_at = time.time()
        with self._lock:  # none starts once the deadline's stop began
            if self._stopping:
                return Outcome("stopped", STOPPED_BEFORE_START)
            worker = self._idle.pop() if self._idle else self._start()
            self._busy.add(worker)
        outcome = worker.run(job, sent_at)
        with self._lock:
            self._busy.discard(worker)
            keep = not worker.spent and not self._stopping
            if keep:
                self._idle.append(worker)
        if not keep:
            worker.close()
        return outcome

    def _start(self) -> _Worker:
        self.processes_started += 1
        return _Worker(self.threads)

    def _signal_busy(self, sig: int) -> None:
        with self._lock:
            self._stopping = True
            for worker in self._busy:
                worker.signal(sig)

    def stop(self) -> None:
        self._signal_busy(signal.SIGINT)

    def kill(self) -> None:
        self._signal_busy(signal.SIGKILL)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
