"""A persistent trainer (``python -m cptlab worker``): reads jobs, one JSON object a line, on stdin and
trains them one after another in this process, answering each with one JSON line on stdout.

A job: ``{"config": run.yaml, "out": DIR, "runs": ROOT, "threads": N, "sent_at": Unix time}`` (what
``cptlab train CONFIG --out DIR --runs ROOT --quiet`` takes). The answer: ``{"status": "done" | "stopped"
| "failed", "error": str, "seconds": {"startup": ..., "data": ..., "steps": ..., "eval": ...,
"checkpoint": ...}}`` where start-up is the time from ``sent_at`` to the trainer's start (a new worker's
imports, or nothing). torch is imported once per worker; every run gets the process state a fresh
process would give it (``reset_torch``), so its metrics equal a fresh process's. SIGINT stops the run
being trained at its next step with a checkpoint (resumable) and every later job at once; a failed run
ends the worker after its answer (the runner starts a new one), so no half-torn-down state is reused.
Nothing else is written to stdout: stray prints go to stderr."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import traceback
from typing import IO, Any

import torch

from cptlab.config import RunConfig
from cptlab.training import runtime
from cptlab.training.train import train


def reset_torch(threads: int) -> None:
    """Put back the torch state a run may have changed, as a new process has it: ``threads`` CPU threads,
    fp32 default dtype, gradients on, nondeterministic algorithms allowed, no compiled graphs kept
    (the trainer seeds its own RNGs)."""
    runtime.set_threads(threads)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    if torch.are_deterministic_algorithms_enabled():  # the setter imports torch._inductor: seconds
        torch.use_deterministic_algorithms(False)
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


class _Stop:
    """SIGINT sets it: the run being trained stops at its next step, later jobs stop at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, *_: Any) -> bool:
        return self.requested

    def request(self, *_: Any) -> None:
        self.requested = True


def run_job(job: dict[str, Any], stop: _Stop) -> dict[str, Any]:
    """Train one job in this process; its answer (see the module docstring)."""
    started = time.time()
    reset_torch(int(job.get("threads", 1)))
    seconds = {"startup": max(0.0, started - float(job.get("sent_at", started)))}
    try:
        cfg = RunConfig.load(job["config"])
        result = train(cfg, job["out"], quiet=True, runs_root=job.get("runs"), stop=stop)
    except Exception as exc:  # noqa: BLE001 - reported to the runner, which reports it as a failed run
        traceback.print_exc(file=sys.stderr)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "seconds": seconds}
    finally:
        gc.collect()  # the last run's model and optimizer go before the next run's are built
    return {"status": result.status, "error": "", "seconds": {**seconds, **result.seconds}}


def serve(jobs: IO[str], answers: IO[str]) -> int:
    """Answer every job line of ``jobs`` on ``answers`` until end of input (or a failed run)."""
    stop = _Stop()
    # SIGINT is the runner's stop request: take it even where the parent left it ignored (a shell's `&`)
    # or blocked (threads of engines such as Ray), both of which a child inherits
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, stop.request)
    for line in jobs:
        if not line.strip():
            continue
        answer = run_job(json.loads(line), stop)
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
        if answer["status"] == "failed":
            return 1
    return 0


def main() -> int:
    """``cptlab worker``: keep the real stdout for the answers and send everything else to stderr."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import torch._dynamo  # noqa: F401 - every optimizer's constructor imports it (seconds): once, here

    return serve(sys.stdin, answers)
