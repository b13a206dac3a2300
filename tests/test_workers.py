"""Persistent trainers (``cptlab worker`` behind ``executors.LocalWorkers``): a run trained in a reused
worker writes the same metrics as one trained in a fresh process, and a failed run's worker is replaced
without taking the next run with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cptlab.study import executors, runner, scheduler
from cptlab.study import experiments as E
from cptlab.training import worker
from cptlab.training.rundir import RunDir


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the one field that measures time."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


@pytest.mark.slow  # two worker processes, two smoke runs
def test_a_reused_worker_trains_as_a_fresh_process_and_a_failure_is_contained(tmp_path):
    base = E.base_run("smoke")
    with executors.LocalWorkers(1) as workers:
        bad = executors.Job("bad", tmp_path / "missing.yaml", tmp_path / "bad", tmp_path / "a")
        failed = workers.submit(bad).result()  # fails and ends its worker
        fresh = workers.submit(runner.job_for(base, tmp_path / "a")).result()  # a new worker's first run
        reused = workers.submit(runner.job_for(base, tmp_path / "b")).result()  # its second
        assert workers.processes_started == 2
    assert failed.status == "failed" and "missing.yaml" in failed.error
    assert fresh.status == reused.status == "done"
    assert set(reused.seconds) == {"startup", *scheduler.SECTIONS[1:-1]}
    assert reused.seconds["steps"] > 0 and reused.seconds["eval"] > 0
    assert _metrics(runner.run_dir(base, tmp_path / "b")) == _metrics(runner.run_dir(base, tmp_path / "a"))


def test_a_stop_request_stops_the_run_with_a_checkpoint(tmp_path):
    job = runner.job_for(E.base_run("smoke"), tmp_path)
    stop = worker._Stop()
    stop.request()  # what SIGINT does in a worker: the run stops at its next step
    answer = worker.run_job({"config": str(job.config), "out": str(job.out), "runs": str(job.runs)}, stop)
    assert answer["status"] == "stopped" and answer["error"] == ""
    assert RunDir(job.out).checkpoints() and not (job.out / "DONE").exists()
