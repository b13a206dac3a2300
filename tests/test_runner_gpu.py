"""The runner's scheduling without a GPU: workers from memory, start order, the deadline (with a fake
trainer command), the runs summary, and ``cptlab batch --workers/--deadline`` reaching the runner."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import pytest
import torch

from cptlab import batch, cli
from cptlab.config import ConfigError
from cptlab.study import executors, runner, scheduler
from cptlab.study import experiments as E
from cptlab.study.scales import get_scale
from cptlab.training.store import RunStore

GIB = 2**30


def test_workers_for_memory():
    assert scheduler.workers_for_memory(140 * GIB, 6 * GIB, 16) == scheduler.MAX_GPU_WORKERS  # capped
    assert scheduler.workers_for_memory(16 * GIB, 6 * GIB, 16) == 2  # 90% of 16 GiB holds two
    assert scheduler.workers_for_memory(4 * GIB, 6 * GIB, 16) == 1  # at least one
    assert scheduler.workers_for_memory(140 * GIB, 1 * GIB, 3) == 2  # a core each, one for the scheduler
    assert scheduler.workers_for_memory(140 * GIB, 1 * GIB, 64, cap=12) == 12
    with pytest.raises(ValueError, match="per_run_bytes: must be > 0, got 0"):
        scheduler.workers_for_memory(GIB, 0, 4)


def test_threads_per_worker():
    assert scheduler.threads_per_worker(16, 3) == 4
    assert scheduler.threads_per_worker(16, 6) == 2
    assert scheduler.threads_per_worker(2, 2) == 1


def test_run_memory_grows_with_the_batch():
    run = E.base_run("smoke")
    one = scheduler.run_memory_bytes(run.config)
    assert one > scheduler.CUDA_CONTEXT_BYTES
    run.config.train.batch_size *= 4
    assert scheduler.run_memory_bytes(run.config) > one
    assert runner.default_workers("cpu", [run]) in (1, 2)  # the CPU rule ignores the runs


def test_start_order_puts_the_priority_experiments_first():
    runs = [E.union_run("weak", "smoke"), *E.infinite_schedules("smoke")[:2], E.base_run("smoke")]
    paths = runner._critical_paths(runs)
    by_chain = scheduler.start_order(runs, paths)
    assert by_chain[0].experiment in ("union", "base")
    by_priority = scheduler.start_order(runs, paths, ("infinite", "base"))
    assert [r.experiment for r in by_priority] == ["infinite", "infinite", "base", "union"]


def test_fits():
    assert scheduler.fits(None, 0.0, 1.0)  # nothing measured: assume it fits
    assert scheduler.fits(10.0, 0.0, None)  # no deadline
    assert scheduler.fits(10.0, 0.0, 11.0) and not scheduler.fits(10.0, 0.0, 10.9)


def test_estimate_counts_the_start_up():
    done = scheduler.RunRecord("e", "a", "a-1", 1000, tokens_trained=1000, wall_s=15.0, status="done",
                               train_tokens_per_s=200.0)  # 5 s training, 10 s start-up and checkpoints
    assert scheduler.estimate_s(2000, [done]) == pytest.approx(10.0 + 10.0)
    assert scheduler.estimate_s(2000, [scheduler.RunRecord("e", "b", "b-1", 1000)]) is None


_FAKE_WORKER = """
import json, pathlib, signal, sys, time
signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})  # as `cptlab worker` takes its stop request
signal.signal(signal.SIGINT, signal.default_int_handler)
for line in sys.stdin:
    job = json.loads(line)
    time.sleep({seconds})
    if {fail}:
        raise SystemExit("boom")
    out = pathlib.Path(job["out"])
    tokens = sum(s["tokens"] for s in __import__("yaml").safe_load(open(job["config"]))["stages"])
    (out / "metrics.jsonl").write_text('{{"tokens": 0}}\\n{{"tokens": %d}}\\n' % tokens)
    (out / "DONE").write_text("")
    answer = {{"status": "done", "error": "", "seconds": {{"startup": 0.5, "steps": 0.25}}}}
    print(json.dumps(answer), flush=True)
"""


def _fake_trainer(monkeypatch, seconds: float, fail: bool = False) -> None:
    """Worker processes replaced by ones that sleep ``seconds`` per job, then write metrics and DONE (or
    die with 'boom')."""
    def command(threads=1):
        code = _FAKE_WORKER.format(seconds=seconds, fail=fail)
        return [sys.executable, "-c", code], {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(threads)}

    monkeypatch.setattr(executors, "worker_command", command)


def test_deadline_stops_the_running_and_starts_nothing_after(tmp_path, monkeypatch):
    _fake_trainer(monkeypatch, seconds=60)
    runs = [E.continual_run("replay", "weak-replay0.25", "weak", "smoke", replay=0.25),
            E.union_run("weak", "smoke")]
    logs: list[str] = []
    t0 = time.monotonic()
    runner.run_all(runs, tmp_path / "runs", workers=2, deadline=1.5, summary=tmp_path, log=logs.append)
    assert time.monotonic() - t0 < 15  # SIGINT ended the sleeping trainers at once
    summary = json.loads((tmp_path / "runs_summary.json").read_text())
    assert summary["deadline_s"] == pytest.approx(1.5, abs=0.1) and summary["counts"]["not started"] == 1
    rows = {r["name"]: r for r in summary["runs"]}
    assert rows["base"]["status"] == rows["union-weak"]["status"] == "stopped at deadline"
    assert rows["weak-replay0.25"]["status"] == "not started"
    assert rows["weak-replay0.25"]["error"] == scheduler.NEEDS_LATE
    assert "stopped at deadline" in (tmp_path / "runs_summary.md").read_text()
    assert any("deadline in" in line for line in logs)


def test_a_run_that_would_not_finish_is_not_started(tmp_path):
    runs = [E.base_run("smoke"), E.union_run("weak", "smoke")]
    store = RunStore(tmp_path)
    tracker = scheduler.Tracker(runs, runs, store, lambda s: None, time.monotonic() + 5)
    done = tracker.records[runs[0].run_id]
    done.status, done.tokens_trained, done.wall_s = "done", 1000, 10.0
    done.train_tokens_per_s = 100.0  # 100 tokens/s measured, no start-up
    assert tracker.records[runs[1].run_id].tokens_planned > 500  # 5 s at 100 tokens/s is too short
    assert not tracker.may_start(runs[1])
    tracker.deadline_at = time.monotonic() + 1e6
    assert tracker.may_start(runs[1])


def test_summary_of_done_already_done_and_failed(tmp_path, monkeypatch):
    _fake_trainer(monkeypatch, seconds=0)
    base = E.base_run("smoke")
    runner.run_all([base], tmp_path / "runs", workers=2, summary=tmp_path, log=lambda s: None)
    summary = json.loads((tmp_path / "runs_summary.json").read_text())
    row = summary["runs"][0]
    assert row["status"] == "done" and row["tokens_trained"] == row["tokens_planned"] > 0
    assert row["tokens_per_s"] > 0 and summary["workers"] == 2 and summary["counts"]["done"] == 1
    assert row["startup_s"] == 0.5 and row["steps_s"] == 0.25 and row["eval_s"] == 0.0  # the worker's answer
    assert row["rest_s"] == pytest.approx(max(0.0, row["wall_s"] - 0.75), abs=0.1)  # what the others leave
    assert summary["run_seconds"]["startup"] == 0.5
    assert "| start-up s |" in (tmp_path / "runs_summary.md").read_text()
    line = batch.time_line(tmp_path, 12.0, 30.0, 2.0)
    assert line.startswith("[batch] time: runs 12s (summed over runs: start-up 0s, data 0s, steps 0s")
    assert line.endswith(", notebooks 30s, report 2s")
    _fake_trainer(monkeypatch, seconds=0, fail=True)
    runs = [base, E.continual_run("replay", "weak-replay0.25", "weak", "smoke", replay=0.25),
            E.union_run("weak", "smoke")]
    with pytest.raises(RuntimeError, match="2 runs failed"):
        runner.run_all(runs, tmp_path / "runs", workers=2, summary=tmp_path, log=lambda s: None)
    rows = {r["name"]: r for r in json.loads((tmp_path / "runs_summary.json").read_text())["runs"]}
    assert rows["base"]["status"] == "already done"
    assert rows["weak-replay0.25"]["status"] == "failed" and "boom" in rows["weak-replay0.25"]["error"]
    assert rows["union-weak"]["status"] == "failed"


def test_batch_passes_workers_and_deadline(tmp_path, monkeypatch):
    seen = {}

    def run_all(runs, **kw):
        seen.update(kw, n=len(runs), env=runner.DEADLINE_ENV in __import__("os").environ)

    monkeypatch.setattr(runner, "run_all", run_all)
    monkeypatch.setattr(batch, "_execute", lambda *a: True)
    monkeypatch.setattr("cptlab.analysis.report.write_report", lambda *a, **k: None)
    monkeypatch.setattr(batch.os, "cpu_count", lambda: 4)  # --workers is at most the cores
    assert cli.main(["batch", "--scale", "smoke", "--device", "cpu", "--out", str(tmp_path),
                     "--workers", "3", "--deadline", "120"]) == 0
    assert seen["workers"] == 3 and seen["summary"] == tmp_path.resolve() and seen["env"] and seen["n"] > 10
    assert seen["order"] == scheduler.PRIORITY
    assert runner.DEADLINE_ENV not in __import__("os").environ
    with pytest.raises(ConfigError, match="--deadline: must be > 0 seconds, got -5"):
        batch.run_batch(scale="smoke", out=tmp_path, deadline=-5)
    with pytest.raises(ConfigError, match="--workers: must be >= 1, got 0"):
        batch.run_batch(scale="smoke", out=tmp_path, workers=0)


def _benchmark(name: str = "throughput"):
    """``benchmarks/<name>.py`` loaded as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_bf16_peak_and_mfu():
    bench = _benchmark()
    assert bench.dense_bf16_peak("NVIDIA H200") == ("NVIDIA H200 SXM", 989e12)
    assert bench.dense_bf16_peak("NVIDIA H100 80GB HBM3") == ("NVIDIA H100 SXM", 989e12)
    assert bench.dense_bf16_peak("NVIDIA H100 PCIe")[1] == 756e12
    assert bench.dense_bf16_peak("NVIDIA A100-SXM4-80GB")[1] == 312e12
    assert bench.dense_bf16_peak("NVIDIA L40S")[1] == 362e12
    assert bench.dense_bf16_peak("NVIDIA L4")[1] == 121e12
    assert bench.dense_bf16_peak("Tesla T4") is None
    assert bench.mfu(290e3, 1.8e8, 989e12) == pytest.approx(290e3 * 1.8e8 / 989e12)
    unknown = bench.gpu_peak("Tesla T4", 1e12)
    assert unknown["peak_dense_bf16"] is None and "unknown GPU" in bench.gpu_peak_line(unknown)
    known = bench.gpu_peak("NVIDIA H200", 98.9e12)
    assert known["mfu_dense_bf16"] == pytest.approx(0.1) and "NVIDIA H200 SXM" in bench.gpu_peak_line(known)


def test_profile_splits_a_step_by_operator_kind():
    bench = _benchmark()
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(2, 2, 8, 16, requires_grad=True)  # (B, H, T, hd): the CPU flash kernel, one operator

    def step():
        h = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        torch.nn.functional.gelu(lin(h)).sum().backward()

    split = bench.profile_split(step, steps=2, top=3)
    ms = split["ms_per_step"]
    assert set(ms) == {kind for kind, _ in bench.PROFILE_KINDS} | {"other"}
    assert ms["attention"] > 0 and ms["matmul"] > 0 and ms["norm + activation"] > 0
    assert ms["optimizer"] == 0.0 and ms["softmax + loss"] == 0.0  # neither in this step
    assert split["total_ms_per_step"] >= max(ms.values())
    assert len(split["top"]) == 3 and split["top"][0][1] >= split["top"][-1][1]


def test_step_parts_lists_every_matmul_of_the_step():
    parts = _benchmark("step_parts")
    rows, d, ff, vocab, n_layer = 256, 48, 192, 1024, 2
    shapes = parts.step_matmuls(rows, d, ff, vocab, n_layer)
    flops = sum(2 * m * k * n * count for _, m, k, n, count in shapes)
    weights = n_layer * (d * 3 * d + d * d + 2 * d * ff) + d * vocab  # every Linear's and the head's
    assert flops == 6 * rows * weights  # forward 2, backward 4 FLOPs per weight and row
    variants = parts.attention_variants(2, 4, 32, 12)
    assert list(variants) == ["sdpa (flash kernel)", "sdpa, head padded to 16", "blocked, 32 rows",
                              "blocked, 16 rows"]  # blocks no longer than the sequence
    for run in variants.values():
        run()


def test_in_process_deadline_stops_the_run_resumably(tmp_path):
    # a base model of 4M tokens cannot finish within the deadline, however warm the caches
    scale = dataclasses.replace(get_scale("smoke"), base_tokens=4_000_000)
    runs = [E.continual_run("replay", "weak-replay0.25", "weak", scale, replay=0.25)]
    records, meta = runner.train_runs(runs, tmp_path, workers=1, log=lambda s: None, deadline=0.5)
    status = {r.name: (r.status, r.error) for r in records}
    assert status["base"][0] == "stopped at deadline"  # train(stop=...) ends at the next step
    assert status["weak-replay0.25"][0] == "not started" and status["weak-replay0.25"][1] != ""
    assert meta["workers"] == 1 and meta["deadline_s"] == pytest.approx(0.5, abs=0.1)


def test_gpu_threads_leave_the_run_identity_alone(tmp_path):
    run = E.base_run("smoke")
    job = runner.job_for(run, tmp_path, threads=4)
    cmd, env = executors.worker_command(job.threads)
    assert env["OMP_NUM_THREADS"] == "4" and cmd[-1] == "worker" and job.out == runner.run_dir(run, tmp_path)
    saved = job.config.read_text()
    runner.job_for(run, tmp_path, threads=1)
    assert job.config.read_text() == saved  # threads are not config
