"""The same runs on the local executor and on a local Ray cluster, side by side in one session.

    .venv/bin/python benchmarks/cluster.py [--scale smoke] [--experiments base,replay] [--cpus 2]
        [--out DIR]

Trains the runs of the scale's experiments (all of them by default, ``--experiments`` a subset) twice into
fresh run stores under ``--out`` (default: a temp dir): first with the local executor (``cptlab batch``'s
persistent worker processes, one per CPU), then as Ray tasks on a Ray started in this process
(``ray.init(num_cpus=CPUS)``, ``runner.run_all(cluster=...)``, shared store). Prints each one's wall time,
Ray's start-up, and the overhead per task: the median start-up seconds of a run (from being handed to the
executor to its trainer's start) on each, and the wall time per run beyond the local one. Checks that
every run's evaluation lines are the same in the two stores. Prints figures; never fails on timing."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _eval_lines(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val" in r]


def _startups(root: Path) -> list[float]:
    rows = json.loads((root / "runs_summary.json").read_text())["runs"]
    return [r["startup_s"] for r in rows if r["status"] == "done"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="smoke")
    parser.add_argument("--experiments", default=None, help="comma-separated (default: all)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from cptlab.analysis.results import experiment_runs
    from cptlab.study import ray_executor, runner

    groups = experiment_runs(args.scale, "cpu")
    names = args.experiments.split(",") if args.experiments else list(groups)
    runs = [r for name in names for r in groups[name]]
    out = Path(args.out or tempfile.mkdtemp(prefix="cptlab-cluster-bench-"))
    local, on_ray = out / "local", out / "ray"
    start = time.perf_counter()
    done = runner.run_all(runs, local, workers=args.cpus, summary=local)
    local_s = time.perf_counter() - start
    import ray

    os.environ.update(ray_executor.BUSY_MACHINE_TIMEOUTS)
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False)
    ray_start_s = time.perf_counter() - start
    start = time.perf_counter()
    runner.run_all(runs, on_ray, cluster="auto", summary=on_ray)
    ray_s = time.perf_counter() - start
    ray.shutdown()
    same = all(_eval_lines(d) == _eval_lines(on_ray / d.relative_to(local)) for d in done.values())
    n = len(done)
    print(f"{n} runs of {args.scale} ({', '.join(names)}), {args.cpus} CPUs, ray {ray.__version__}")
    print(f"local executor: {local_s:.1f} s; Ray: {ray_s:.1f} s (+ {ray_start_s:.1f} s to start Ray)")
    print(f"median start-up per run: local {statistics.median(_startups(local)):.2f} s, "
          f"Ray {statistics.median(_startups(on_ray)):.2f} s")
    print(f"overhead per task: {(ray_s - local_s) * args.cpus / n:.2f} s of a slot's time "
          f"((Ray - local) x CPUs / runs)")
    print(f"evaluation lines identical in the two stores: {same}")


if __name__ == "__main__":
    main()
