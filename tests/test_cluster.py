"""Runs on a Ray cluster (``runner.run_all(cluster=...)``, ``study.ray_executor``): the same evaluation lines
as the local executor's in both store modes, a worker killed mid-run retried and resumed to the same lines,
a config error reported once and not retried. A subset of the smoke batch (the base model and two replay
runs that start from it): the whole batch's 83 runs would take minutes. Skipped without Ray (the cluster
extra); the first test needs none."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from cptlab.config import ConfigError, RunRef
from cptlab.study import experiments as E
from cptlab.study import ray_executor, runner


def _eval_lines(run_dir: Path) -> list[dict]:
    return [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
            if "val" in r]


def _summary(root: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((root / "runs_summary.json").read_text())["runs"]}


def _smoke_runs() -> list[E.Run]:
    """The smoke base model and two replay runs that start from it."""
    return E.replay_sweep("weak", "smoke")[:2]


def _bad_run() -> E.Run:
    """A run that starts from a checkpoint no run has: a config error when it trains."""
    run = E.replay_sweep("weak", "smoke")[0]
    missing = RunRef("base", "missing-0123456789ab", "main")
    first = dataclasses.replace(run.config.stages[0], init_from=missing)
    return E.Run("replay", "bad", dataclasses.replace(run.config, stages=[first, *run.config.stages[1:]]))


def _long_base() -> E.Run:
    """The smoke base model trained 8 times longer, with a rolling checkpoint every 8 steps (a run long
    enough to kill mid-run)."""
    base = E.base_run("smoke")
    stage = dataclasses.replace(base.config.stages[0], tokens=8 * base.config.stages[0].tokens)
    train = dataclasses.replace(base.config.train, checkpoint_every_tokens=4096)
    return E.Run("base", "long", dataclasses.replace(base.config, stages=[stage], train=train))


def test_cluster_without_ray_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'cptlab\[cluster\]'"):
        ray_executor.check_options("local")
    with pytest.raises(ConfigError, match="--store"):
        ray_executor.check_options("local", store="nfs")
    with pytest.raises(ConfigError, match="--cluster: expected"):
        ray_executor.check_options("somewhere")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The runs trained by the local executor (persistent workers)."""
    root = tmp_path_factory.mktemp("local")
    runner.run_all([*_smoke_runs(), _long_base()], root, workers=2)
    return root


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ.update(ray_executor.BUSY_MACHINE_TIMEOUTS)
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow  # a local Ray, four smoke runs
def test_shared_store_matches_the_local_executor_and_a_config_error_is_not_retried(local_ray, reference,
                                                                                    tmp_path):
    runs = [*_smoke_runs(), _bad_run()]
    with pytest.raises(RuntimeError, match="1 runs failed") as failed:
        runner.run_all(runs, tmp_path, cluster="auto", summary=tmp_path)
    assert "bad" in str(failed.value) and "has no checkpoint" in str(failed.value)
    summary = _summary(tmp_path)
    assert summary["bad"]["status"] == "failed" and summary["bad"]["tries"] == 1
    for run in _smoke_runs():
        assert summary[run.name]["status"] == "done" and summary[run.name]["node"]
        assert _eval_lines(runner.run_dir(run, tmp_path)) == _eval_lines(runner.run_dir(run, reference))
    assert "| node | GPU | tries |" in (tmp_path / "runs_summary.md").read_text()


def _kill_the_task_mid_run(run_dir: Path, killed: list[int]) -> None:
    """Once ``run_dir`` has a rolling checkpoint, SIGKILL the Ray worker running its trainer (the parent of
    the process holding the run directory)."""
    import psutil

    while not (run_dir / "DONE").exists():
        holder = run_dir / ".holder.json"
        if list((run_dir / "checkpoints").glob("step-*.pt")) and holder.exists():
            worker = psutil.Process(json.loads(holder.read_text())["pid"]).parent()
            os.kill(worker.pid, signal.SIGKILL)
            killed.append(worker.pid)
            return
        time.sleep(0.02)


@pytest.mark.ray
@pytest.mark.slow  # a local Ray, one run of 256 steps, killed once
def test_a_killed_worker_is_retried_and_the_run_resumes_to_the_same_lines(local_ray, reference, tmp_path):
    run, killed = _long_base(), []
    killer = threading.Thread(target=_kill_the_task_mid_run, args=(runner.run_dir(run, tmp_path), killed))
    killer.start()
    runner.run_all([run], tmp_path, cluster="auto", summary=tmp_path)
    killer.join()
    assert killed, "the run finished before a rolling checkpoint was seen"
    assert _summary(tmp_path)["long"]["tries"] == 2
    assert _eval_lines(runner.run_dir(run, tmp_path)) == _eval_lines(runner.run_dir(run, reference))


@pytest.mark.ray
@pytest.mark.slow  # a local Ray, one run of 256 steps, stopped once and continued
def test_stop_checkpoints_every_task_and_a_later_batch_continues(local_ray, reference, tmp_path):
    run = _long_base()
    out = runner.run_dir(run, tmp_path)
    with ray_executor.RayExecutor("auto") as executor:  # the deadline's and Ctrl-C's stop
        runner.write_labels(run, tmp_path)
        future = executor.submit(runner.job_for(run, tmp_path))
        while not list((out / "checkpoints").glob("step-*.pt")) and not future.done():
            time.sleep(0.02)
        executor.stop()
        stopped = future.result()
    assert stopped.status == "stopped" and not (out / "DONE").exists()
    runner.run_all([run], tmp_path, cluster="auto")
    assert _eval_lines(out) == _eval_lines(runner.run_dir(run, reference))


@pytest.mark.ray
@pytest.mark.slow  # a two-node Ray cluster, three smoke runs shipped to node-local stores and back
def test_node_stores_on_two_nodes_match_the_local_executor(local_ray, reference, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    local_ray.shutdown()
    monkeypatch.setenv(ray_executor.NODE_RUNS_ENV, str(tmp_path / "nodes"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        local_ray.init(address=cluster.address)
        store = tmp_path / "head"
        runner.run_all(_smoke_runs(), store, cluster="auto", store_mode="node", keep_checkpoints="none",
                       summary=store)
        local_ray.shutdown()
    finally:
        cluster.shutdown()
    summary = _summary(store)
    for run in _smoke_runs():
        assert summary[run.name]["status"] == "done"
        assert _eval_lines(runner.run_dir(run, store)) == _eval_lines(runner.run_dir(run, reference))
        assert not list(runner.run_dir(run, store).glob("checkpoints/*.pt"))  # keep_checkpoints="none"
    assert len({r["node"] for r in summary.values()}) == 2  # the two replay runs train side by side
