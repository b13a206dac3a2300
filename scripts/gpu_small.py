"""Train a scale's reproduction (default ``small``) on one CUDA GPU within a hard wall-clock deadline, then
write its report from whatever finished.

    PYTHONUNBUFFERED=1 CPTLAB_CACHE=.gpucache python3 scripts/gpu_small.py --deadline-s 500 \\
        --root /tmp/cptlab-small-runs --out "$OUT" [--workers 3]
    # on a CPU, end to end in a minute or two:
    python scripts/gpu_small.py --scale smoke --device cpu --workers 1 --deadline-s 60 --out /tmp/smoke

Every run of every experiment (``cptlab.analysis.results.experiment_runs``) is trained as its own
``cptlab train`` subprocess, ``--workers`` of them side by side on the one GPU (small batches leave an H100
idle between kernels; a second and third process fill those gaps). Runs are started in priority order, each
as soon as the runs it starts from are done: the base model and the union baselines, the replay runs that
decide findings 2-4 and 9, then the experiments that give a finding for the fewest tokens (see ``ORDER``;
``--order`` changes it). A run is not started when, at the per-run speed measured so far, it would not
finish before the deadline; at the deadline the runs still going are killed and count as not run (the
report only judges finished runs). Then ``--out`` gets:

- ``runs_summary.md`` and ``runs_summary.json``: per run its name, planned and trained tokens, wall
  seconds, status (done / already done / failed / stopped at deadline / not started) and speed;
- ``run_store.tar.gz``: the run store's small files (config.json, labels.json, metrics.jsonl, DONE,
  run.yaml, train.log; no checkpoints), paths relative to ``--root``. Unpack it anywhere and report again:
  ``cptlab report DIR --scale small --runs WHERE --device cuda``;
- ``REPORT.md``: ``cptlab report`` for the scale (rows whose runs did not finish say "not run").

The token shards and the BPE tokenizer must already be in ``$CPTLAB_CACHE`` (``--build-cache`` builds
them, on a machine with ``datasets``): the script checks this before training anything.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the deadline counts from here, before the slow imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cptlab import data  # noqa: E402
from cptlab.analysis.report import write_report  # noqa: E402
from cptlab.analysis.results import experiment_runs  # noqa: E402
from cptlab.config import TokenizerConfig  # noqa: E402
from cptlab.study import paper, runner  # noqa: E402
from cptlab.study.experiments import Run  # noqa: E402
from cptlab.study.scales import SCALES, get_scale  # noqa: E402

# Experiments in the order their runs are started; a run shared by several is started with the first. The
# replay sweep is split: ``replay`` is the base model's first dependents, the runs that decide the most
# findings (0% and 50% replay per shift: findings 2-3; the chosen replay: 4, and 9, which is judged on the
# sweep's chosen run and 1x union), with the two unions, which need no base model and so start alongside
# it; ``replay_rest`` is the other fractions (6 runs for finding 1). Then the cheapest finding first:
# re-warming on D0 (2 runs of B1 for finding 7), warmup (3 runs, finding 6), the scale study (smaller
# models; findings 10-11), infinite schedules (4 x 3 chunks, finding 8), max LR (8 runs, finding 5), and
# compute's extra unions at 1.5x and 2x (no finding of their own).
ORDER = ("base", "replay", "d0_rewarm", "warmup", "replay_rest", "scales", "infinite", "max_lr", "compute")
SMALL_FILES = ("config.json", "labels.json", "metrics.jsonl", "DONE", "run.yaml", "train.log")


@dataclass
class Job:
    """One run to train and what became of it."""

    run: Run
    group: str  # the experiment (of ``ORDER``) that first lists the run
    tokens: int  # planned: the sum of its stages' tokens
    status: str = "pending"  # pending | running | done | already done | failed | stopped at deadline | ...
    proc: subprocess.Popen | None = None
    log: object | None = None  # the open train.log
    started: float = 0.0
    wall_s: float = 0.0
    trained: int = 0  # tokens trained so far (from metrics.jsonl)
    rate: float | None = None  # the latest training line's tokens/s
    error: str = ""
    needs: list[str] = field(default_factory=list)  # run_ids

    @property
    def label(self) -> str:
        return f"{self.run.experiment}/{self.run.name}"


def elapsed() -> float:
    return time.monotonic() - T0


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


# -- the plan --------------------------------------------------------------------------------------------

def _rank(run: Run) -> int | None:
    """A replay-sweep run's place among the first ones (unions first: they need no base model), or None
    for the other fractions (``replay_rest``)."""
    if run.labels.get("role") == "union":
        return 0
    first = [(shift, frac) for frac in (0.0, 0.5) for shift in paper.SHIFTS]
    first += [(shift, paper.CHOSEN_REPLAY[shift]) for shift in paper.SHIFTS]
    key = (run.labels.get("shift"), run.labels.get("replay"))
    return 1 + first.index(key) if key in first else None


def plan(scale: str, root: Path, device: str, order: tuple[str, ...]) -> list[Job]:
    """Every distinct run of the experiments in ``order`` (see ``ORDER``), in start order, each run
    before the runs that start from it."""
    by_group = experiment_runs(scale, device)
    sweep = by_group.pop("replay")
    by_group["replay"] = sorted((r for r in sweep if _rank(r) is not None), key=_rank)
    by_group["replay_rest"] = [r for r in sweep if _rank(r) is None]
    by_group["d0_rewarm"].sort(key=lambda r: r.name == "d0-constant-min")  # its finding needs 1x and 2x
    jobs: dict[str, Job] = {}
    for group in order:
        for run in by_group[group]:
            for need in run.needs:  # already listed in practice (base first, mains before anneals)
                if need.run_id not in jobs:
                    jobs[need.run_id] = Job(need, group, _tokens(need))
            if run.run_id not in jobs:
                jobs[run.run_id] = Job(run, group, _tokens(run), needs=[n.run_id for n in run.needs])
    return list(jobs.values())


def _tokens(run: Run) -> int:
    return sum(stage.tokens for stage in run.config.stages)


# -- running ---------------------------------------------------------------------------------------------

def check_cache(scale: str) -> None:
    """The tokenizer and every corpus's shards must be cached already (the GPU machine cannot build them:
    no ``datasets``); exit with a message if not."""
    s = get_scale(scale)
    registry = data.Registry()
    try:
        tokenizer = data.load_tokenizer(TokenizerConfig(kind="bpe", vocab_size=s.vocab_size), registry)
        metas = {name: data.shard_meta(name, tokenizer, registry) for name in registry.names()}
    except ImportError as exc:
        sys.exit(f"cache {data.cache_root()} lacks the vocab {s.vocab_size} tokenizer or shards and they "
                 f"cannot be built here ({exc}); build them with --build-cache where datasets is installed")
    sizes = ", ".join(f"{n} {m['tokens']['train']:,}" for n, m in metas.items())
    say(f"cache {data.cache_root()}: tokenizer {tokenizer.fingerprint} (vocab {tokenizer.vocab_size}), "
        f"train tokens {sizes}")


def start(job: Job, root: Path) -> None:
    """Launch ``runner.train_command`` for ``job`` (this checkout's cptlab, output to train.log)."""
    cmd, env = runner.train_command(job.run, root)
    runner.write_labels(job.run, root)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    job.log = open(runner.run_dir(job.run, root) / "train.log", "ab")  # noqa: SIM115 - closed in finish()
    job.proc = subprocess.Popen(cmd, env=env, stdout=job.log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    job.started, job.status = time.monotonic(), "running"


def read_progress(job: Job, root: Path) -> None:
    """Update ``job.trained`` and ``job.rate`` from its metrics.jsonl (a run that starts from a checkpoint
    counts on from the checkpoint's tokens, where its first line, the starting evaluation, is)."""
    path = runner.run_dir(job.run, root) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written
            break
    if not records:
        return
    from_checkpoint = job.run.config.stages[0].init_from not in ("scratch", "previous")
    offset = records[0]["tokens"] if from_checkpoint else 0
    job.trained = max(0, records[-1]["tokens"] - offset)
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    if rates:
        job.rate = rates[-1]


def finish(job: Job, root: Path, status: str | None = None) -> None:
    """Record how ``job``'s process ended: done, else ``status`` (a kill at the deadline), else failed."""
    job.wall_s = time.monotonic() - job.started
    if job.log is not None:
        job.log.close()
        job.log = None
    read_progress(job, root)
    if runner.is_done(job.run, root):  # a run killed just after it finished is done
        job.status = "done"
    elif status is not None:
        job.status = status
    else:
        job.status = "failed"
        log = runner.run_dir(job.run, root) / "train.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-8:] if log.exists() else []
        job.error = f"exit {job.proc.returncode}: " + " | ".join(tail)


def stop(job: Job, root: Path) -> None:
    """Kill a run at the deadline (its directory stays, unfinished: it is reported as not run)."""
    job.proc.terminate()
    try:
        job.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        job.proc.kill()
        job.proc.wait()
    finish(job, root, "stopped at deadline")


def estimate_s(job: Job, running: list[Job], last_rate: float | None, overhead_s: float) -> float:
    """Seconds ``job`` would take if started now: its tokens at the median speed of the running runs,
    shared by one more run (as if the GPU were saturated), plus the process start and the checkpoint."""
    rates = [j.rate for j in running if j.rate]
    if rates:
        rate = statistics.median(rates) * len(running) / (len(running) + 1)
    elif last_rate:
        rate = last_rate
    else:
        return 0.0  # nothing measured yet: assume it fits
    return overhead_s + job.tokens / rate


def gpu_busy() -> str:
    """'; GPU busy N%, M MiB used' from nvidia-smi (the share of time a kernel ran), or '' without it."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
        util, mem = (x.strip() for x in proc.stdout.splitlines()[0].split(","))
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return ""
    return f"; GPU busy {util}%, {mem} MiB used"


def train_all(jobs: list[Job], root: Path, workers: int, train_end: float, overhead_s: float,
              status_every_s: float, poll_s: float, on_gpu: bool) -> None:
    """Start the jobs in order as their needs finish, up to ``workers`` at a time, until every job is
    done or cannot be started, or ``train_end`` (seconds since start) comes: then kill what runs."""
    by_id = {j.run.run_id: j for j in jobs}
    for job in jobs:
        if runner.is_done(job.run, root):
            job.status = "already done"
            read_progress(job, root)
    last_rate: float | None = None
    overheads: list[float] = []  # seconds each finished run took beyond its tokens at its speed
    next_status = elapsed() + status_every_s
    while True:
        running = [j for j in jobs if j.status == "running"]
        for job in running:
            if job.proc.poll() is not None:
                finish(job, root)
                if job.status == "done" and job.rate:
                    overheads.append(job.wall_s - job.trained / job.rate)
                rate = job.trained / max(job.wall_s, 1e-9)
                say(f"{job.status}: {job.label} {job.trained:,} of {job.tokens:,} tokens in "
                    f"{job.wall_s:.0f}s ({rate:,.0f} tok/s with start-up; last {job.rate or 0:,.0f} tok/s)"
                    + (f"\n    {job.error}" if job.error else ""))
        running = [j for j in jobs if j.status == "running"]
        if elapsed() >= train_end:
            say(f"deadline: stopping {len(running)} running runs")
            for job in running:
                stop(job, root)
                say(f"{job.status}: {job.label} at {job.trained:,} of {job.tokens:,} tokens")
            break
        for job in running:
            read_progress(job, root)
        rates = [j.rate for j in running if j.rate]
        if rates:
            last_rate = statistics.median(rates)
        for job in jobs:  # a run whose base failed can never start
            if job.status == "pending" and any(by_id[n].status in ("failed", "blocked") for n in job.needs):
                job.status, job.error = "blocked", "a run it starts from failed"
        ready = [j for j in jobs if j.status == "pending"
                 and all(by_id[n].status in ("done", "already done") for n in j.needs)]
        for job in ready:
            if len(running) >= workers:
                break
            overhead = max(overhead_s, statistics.median(overheads)) if overheads else overhead_s
            if elapsed() + 1.1 * estimate_s(job, running, last_rate, overhead) > train_end:
                continue  # would not finish in time; a shorter one further down may
            start(job, root)
            running.append(job)
            say(f"start: {job.label} ({job.group}, {job.tokens:,} tokens); {len(running)} running")
        if not running:
            break  # nothing runs and nothing more can be started in time
        if elapsed() >= next_status:
            next_status += status_every_s
            parts = [f"{j.run.name} {j.trained / j.tokens:.0%} {j.rate or 0:,.0f} tok/s" for j in running]
            total = sum(j.rate or 0 for j in running)
            n_done = sum(j.status == "done" for j in jobs)
            say(f"{len(running)} running ({'; '.join(parts)}), together {total:,.0f} tok/s; {n_done} done"
                + (gpu_busy() if on_gpu else ""))
        time.sleep(poll_s)
    for job in jobs:
        if job.status == "pending":
            job.status = "not started"


# -- outputs ---------------------------------------------------------------------------------------------

def write_summary(jobs: list[Job], out: Path, meta: dict) -> None:
    """runs_summary.json and runs_summary.md: one row per run, in start order."""
    rows = [{"experiment": j.run.experiment, "name": j.run.name, "run_id": j.run.run_id, "group": j.group,
             "tokens_planned": j.tokens, "tokens_trained": j.trained, "wall_s": round(j.wall_s, 1),
             "finished": j.status in ("done", "already done"), "status": j.status,
             "last_tokens_per_s": round(j.rate or 0.0), "error": j.error} for j in jobs]
    (out / "runs_summary.json").write_text(json.dumps({**meta, "runs": rows}, indent=2) + "\n")
    lines = [f"# Runs of scale {meta['scale']} on {meta['gpu']}", "",
             ", ".join(f"{k}: {v}" for k, v in meta.items() if k not in ("scale", "gpu")), "",
             "| run | group | tokens planned | tokens trained | wall s | finished | status | last tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experiment']}/{r['name']} | {r['group']} | {r['tokens_planned']:,} | "
                     f"{r['tokens_trained']:,} | {r['wall_s']:.0f} | {'yes' if r['finished'] else 'no'} | "
                     f"{r['status']} | {r['last_tokens_per_s']:,} |")
    (out / "runs_summary.md").write_text("\n".join(lines) + "\n")


def write_tar(root: Path, out: Path) -> Path:
    """run_store.tar.gz: the small files of every run directory under ``root`` (no checkpoints)."""
    path = out / "run_store.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for run_dir in sorted(p.parent for p in root.glob("*/*/labels.json")):
            for name in SMALL_FILES:
                if (run_dir / name).exists():
                    tar.add(run_dir / name, arcname=str((run_dir / name).relative_to(root)))
    return path


def gpu_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(f"--device {device}: CUDA is not available (torch {torch.__version__})")
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, torch {torch.__version__})"
    return f"no GPU: device {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--device", default="cuda", help="the runs' train.device (part of their config)")
    parser.add_argument("--deadline-s", type=float, default=500.0,
                        help="wall-clock seconds from start by which all is done, the report included")
    parser.add_argument("--reserve-s", type=float, default=30.0,
                        help="seconds before the deadline at which training stops (kills, summary, report)")
    parser.add_argument("--root", default="/tmp/cptlab-small-runs", help="run store")
    parser.add_argument("--out", default="gpu_small_out", help="where the report, summary and tarball go")
    parser.add_argument("--workers", type=int, default=3, help="runs trained side by side")
    parser.add_argument("--order", default=",".join(ORDER),
                        help="experiments in start order, comma-separated; runs of those left out are "
                        f"not trained (default {','.join(ORDER)})")
    parser.add_argument("--overhead-s", type=float, default=15.0,
                        help="a run's start-up and checkpoint seconds, for the will-it-finish estimate "
                        "(at least; the median measured on finished runs once there is one)")
    parser.add_argument("--status-every-s", type=float, default=20.0)
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--build-cache", action="store_true",
                        help="only build the scale's tokenizer and shards in $CPTLAB_CACHE, then exit")
    args = parser.parse_args()

    if args.build_cache:
        check_cache(args.scale)
        return
    order = tuple(g.strip() for g in args.order.split(",") if g.strip())
    unknown = [g for g in order if g not in ORDER]
    if unknown:
        parser.error(f"--order: unknown {unknown}; allowed: {', '.join(ORDER)}")
    root, out = Path(args.root).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_name(args.device)
    say(f"GPU: {gpu}; python {sys.version.split()[0]}; scale {args.scale}, device {args.device}, "
        f"{args.workers} workers, deadline {args.deadline_s:.0f}s, run store {root}")
    check_cache(args.scale)
    jobs = plan(args.scale, root, args.device, order)
    say(f"{len(jobs)} runs, {sum(j.tokens for j in jobs):,} tokens in all; order {','.join(order)}")

    train_start = elapsed()
    train_all(jobs, root, args.workers, args.deadline_s - args.reserve_s, args.overhead_s,
              args.status_every_s, args.poll_s, args.device.startswith("cuda"))
    train_s = elapsed() - train_start
    trained = sum(j.trained for j in jobs if j.status not in ("already done", "not started"))
    counts = {s: sum(j.status == s for j in jobs) for s in dict.fromkeys(j.status for j in jobs)}
    say(f"training over after {train_s:.0f}s: {trained:,} tokens, {trained / max(train_s, 1e-9):,.0f} tok/s "
        f"over all runs; " + ", ".join(f"{n} {s}" for s, n in counts.items()))

    meta = {"scale": args.scale, "gpu": gpu, "device": args.device, "workers": args.workers,
            "deadline_s": args.deadline_s, "train_s": round(train_s, 1), "tokens_trained": trained,
            "tokens_per_s": round(trained / max(train_s, 1e-9)), "root": str(root), "order": ",".join(order)}
    write_summary(jobs, out, meta)
    tar = write_tar(root, out)
    say(f"wrote {out / 'runs_summary.md'}, {out / 'runs_summary.json'}, {tar} ({tar.stat().st_size:,} bytes)")
    write_report(out, scale=args.scale, runs=root, device=args.device, log=say)
    say("finished")


if __name__ == "__main__":
    main()
