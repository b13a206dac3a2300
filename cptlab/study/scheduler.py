"""The runner's decisions, apart from the processes it starts: how many runs share a GPU (from its memory
and an estimate of one run's), in what order runs start, whether a run still finishes before a deadline,
and the per-run summary (``runs_summary.md`` / ``runs_summary.json``) of what became of every run."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cptlab.config import RunConfig
from cptlab.files import atomic_write_text
from cptlab.study.executors import Outcome
from cptlab.study.experiments import Run
from cptlab.training.model import GPT
from cptlab.training.rundir import RunDir, RunDirError
from cptlab.training.store import RunStore

# Why a run was not started: the first two count as failures (run_all raises), the deadline's do not.
NEEDS_FAILED = "a run it starts from failed"
NEEDS_UNDONE = "a run it starts from is not done"
LATE = "would not finish before the deadline"
NEEDS_LATE = "a run it starts from did not finish before the deadline"
# What became of a run: trained here, found finished, failed, stopped by the deadline, or never started
# (the deadline came first, or a run it starts from did not finish; ``error`` says which).
STATUSES = ("done", "already done", "failed", "stopped at deadline", "not started")
# The experiments whose runs start first when ``order`` asks for the paper's priority (``cptlab batch``
# with a deadline): the base model and the replay sweep (unions included) decide most findings, then the
# cheapest finding first. Within an experiment, and without ``order``, the longest chain starts first.
PRIORITY = ("base", "replay", "union", "d0_rewarm", "warmup", "scales", "infinite", "max_lr", "sequence",
            "modern")
CUDA_CONTEXT_BYTES = 600 * 2**20  # one process's CUDA context, cuBLAS workspace and allocator slack
MAX_GPU_WORKERS = 6  # more processes than this add little on one GPU and cost start-up and memory
# The sections of a run's wall time, in the summary's order (RunRecord's ``<section>_s``).
SECTIONS = ("startup", "data", "steps", "eval", "checkpoint", "rest")


def workers_for_memory(total_bytes: int, per_run_bytes: int, cpu_cores: int,
                       cap: int = MAX_GPU_WORKERS) -> int:
    """Runs to train side by side on one GPU: as many as fit in 90% of ``total_bytes`` at
    ``per_run_bytes`` each, one CPU core each with one left for the scheduler, at most ``cap``, at least 1."""
    if per_run_bytes <= 0:
        raise ValueError(f"per_run_bytes: must be > 0, got {per_run_bytes}")
    by_memory = int(0.9 * total_bytes) // per_run_bytes
    by_cores = max(1, cpu_cores - 1)
    return max(1, min(cap, by_memory, by_cores))


def threads_per_worker(cpu_cores: int, workers: int) -> int:
    """CPU threads for each of ``workers`` GPU training processes (data loading and the Python side):
    the host's cores but one, shared, between 1 and 4."""
    return max(1, min(4, (cpu_cores - 1) // max(1, workers)))


def run_memory_bytes(cfg: RunConfig) -> int:
    """An estimate of the GPU memory one training process of ``cfg`` takes: fp32 weights, gradients and
    AdamW's two moments (16 bytes a parameter), the activations of one micro-batch (bf16, ~34 d bytes a
    token a layer as in Korthikanti et al. with flash attention; logits and their gradient, 10 bytes a
    token a vocab entry), and the CUDA context."""
    vocab = 256 if cfg.tokenizer.kind == "byte" else cfg.tokenizer.vocab_size
    m = cfg.resolve(vocab_size=vocab).model
    t = cfg.train
    tokens = (t.micro_batch_size or t.batch_size) * t.seq_len
    activations = tokens * (34 * m.d_model * m.n_layer + 10 * m.vocab_size)
    return 16 * GPT.count_params(m) + activations + CUDA_CONTEXT_BYTES


def start_order(runs: list[Run], chain_tokens: dict[str, int],
                order: tuple[str, ...] | None = None) -> list[Run]:
    """``runs`` in the order they are started when ready: the experiments of ``order`` first, in that
    order (then the others), and within that the longest chain of tokens first (``chain_tokens``: run_id
    -> tokens of the longest chain that starts with it); ties keep the given order."""
    rank = {name: i for i, name in enumerate(order or ())}
    return sorted(runs, key=lambda r: (rank.get(r.experiment, len(rank)), -chain_tokens[r.run_id]))


def fits(seconds: float | None, now: float, deadline: float | None, margin: float = 1.1) -> bool:
    """Whether a run estimated to take ``seconds`` (None: nothing measured yet, assume it fits), started
    at ``now``, ends by ``deadline`` (same clock), with ``margin`` on the estimate."""
    return deadline is None or seconds is None or now + margin * seconds <= deadline


@dataclass
class RunRecord:
    """One row of the runs summary."""

    experiment: str
    name: str
    run_id: str
    tokens_planned: int
    tokens_trained: int = 0
    wall_s: float = 0.0
    status: str = "not started"
    error: str = ""
    train_tokens_per_s: float = 0.0  # the median of the trainer's own training lines (no start-up)
    # Where the wall time went (seconds): start-up (a new process's imports, waiting for a worker), data
    # loading, optimizer steps, evaluations, checkpoint writes, and the rest (model set-up, resume, stage
    # starts, the runner's own bookkeeping).
    startup_s: float = 0.0
    data_s: float = 0.0
    steps_s: float = 0.0
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    rest_s: float = 0.0
    # On a cluster (``--cluster``): the node and GPU(s) the run trained on, and how many times it started.
    node: str = ""
    gpu: str = ""
    tries: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Tokens trained over the wall time, the process start-up and checkpoints included."""
        return self.tokens_trained / self.wall_s if self.wall_s > 0 else 0.0

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "wall_s": round(self.wall_s, 1), "tokens_per_s": round(self.tokens_per_s),
                "train_tokens_per_s": round(self.train_tokens_per_s),
                **{f"{s}_s": round(getattr(self, f"{s}_s"), 2) for s in SECTIONS}}

    def set_seconds(self, wall_s: float, seconds: dict[str, float]) -> None:
        """The wall time and its sections (``Outcome.seconds``); the rest is what they leave."""
        self.wall_s = wall_s
        for section in SECTIONS[:-1]:
            setattr(self, f"{section}_s", float(seconds.get(section, 0.0)))
        self.rest_s = max(0.0, wall_s - sum(float(seconds.get(s, 0.0)) for s in SECTIONS[:-1]))



def section_totals(records: list[RunRecord]) -> dict[str, float]:
    """The seconds of each section summed over the runs trained (runs side by side each count theirs)."""
    trained = [r for r in records if r.status != "already done"]
    return {s: round(sum(getattr(r, f"{s}_s") for r in trained), 1) for s in SECTIONS}


def new_record(run: Run) -> RunRecord:
    return RunRecord(run.experiment, run.name, run.run_id, sum(s.tokens for s in run.config.stages))


def estimate_s(tokens: int, records: list[RunRecord]) -> float | None:
    """Seconds a run of ``tokens`` would take, from the runs trained to the end so far (None before one):
    their median start-up and checkpoint seconds (wall time beyond their tokens at the trainer's speed)
    plus ``tokens`` at their median training speed (measured as they shared the device)."""
    done = [r for r in records if r.status == "done" and r.tokens_trained > 0 and r.train_tokens_per_s > 0]
    if not done:
        return None
    rate = statistics.median(r.train_tokens_per_s for r in done)
    overhead = statistics.median(max(0.0, r.wall_s - r.tokens_trained / r.train_tokens_per_s) for r in done)
    return overhead + tokens / rate


def trained_tokens(run: Run, metrics: list[dict[str, Any]]) -> tuple[int, float]:
    """Tokens ``run`` trained and the median tokens/s of its training lines, from its metrics records (a
    run that starts from another's checkpoint counts from that checkpoint's tokens, where its first record,
    the starting evaluation, is)."""
    if not metrics:
        return 0, 0.0
    from_checkpoint = run.config.stages[0].init_from not in ("scratch", "previous")
    offset = metrics[0]["tokens"] if from_checkpoint else 0
    rates = [r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")]
    return max(0, int(metrics[-1]["tokens"]) - int(offset)), statistics.median(rates) if rates else 0.0


def write_summary(records: list[RunRecord], out: str | Path, meta: dict[str, Any]) -> list[Path]:
    """``out``/runs_summary.json (``meta`` and one row per run) and ``out``/runs_summary.md (a table),
    each written atomically; returns their paths."""
    out = Path(out)
    rows = [r.row() for r in records]
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    meta = {**meta, "counts": counts}
    json_path, md_path = out / "runs_summary.json", out / "runs_summary.md"
    atomic_write_text(json_path, json.dumps({**meta, "runs": rows}, indent=2) + "\n")
    atomic_write_text(md_path, "\n".join(_summary_lines(rows, meta, counts)) + "\n")
    return [md_path, json_path]


def _summary_lines(rows: list[dict[str, Any]], meta: dict[str, Any], counts: dict[str, int]) -> list[str]:
    """runs_summary.md's lines: the header, the counts, a table with a row per run (with the node, GPU and
    tries of each on a cluster)."""
    cluster = any(r["node"] for r in rows)
    lines = ["# Runs summary", "", ", ".join(f"{k}: {v}" for k, v in meta.items() if k != "counts"), "",
             ", ".join(f"{n} {s}" for s, n in counts.items() if n), "",
             "| run | run id | tokens planned | tokens trained | wall s | status | tokens/s "
             "| training tokens/s | start-up s | data s | steps s | eval s | checkpoint s | rest s |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if cluster:
        lines[-2] += " node | GPU | tries |"
        lines[-1] += "---|---|---:|"
    for r in rows:
        status = r["status"] + (f" ({r['error'].splitlines()[0][:120]})" if r["error"] else "")
        lines.append(f"| {r['experiment']}/{r['name']} | {r['run_id']} | {r['tokens_planned']:,} | "
                     f"{r['tokens_trained']:,} | {r['wall_s']:.0f} | {status.replace('|', '/')} | "
                     f"{r['tokens_per_s']:,} | {r['train_tokens_per_s']:,} | "
                     + " | ".join(f"{r[f'{s}_s']:.1f}" for s in SECTIONS) + " |"
                     + (f" {r['node'] or '-'} | {r['gpu'] or '-'} | {r['tries']} |" if cluster else ""))
    return lines


class Tracker:
    """What became of each run so far (the summary's rows), with a log line per finished run."""

    def __init__(self, todo: list[Run], pending: list[Run], store: RunStore, log: Callable[[str], None],
                 deadline_at: float | None):
        self.store, self.log, self.deadline_at = store, log, deadline_at
        self.total, self.done = len(pending), 0
        self.records = {r.run_id: new_record(r) for r in todo}
        to_train = {r.run_id for r in pending}
        for run in todo:
            if run.run_id not in to_train:
                self.records[run.run_id].status = "already done"
                self._read_progress(run)

    def _read_progress(self, run: Run) -> None:
        record = self.records[run.run_id]
        try:
            metrics = RunDir(self.store.path(run.experiment, run.run_id)).read_metrics()
            record.tokens_trained, record.train_tokens_per_s = trained_tokens(run, metrics)
        except (OSError, RunDirError, KeyError, ValueError):
            pass

    def past_deadline(self) -> bool:
        return self.deadline_at is not None and time.monotonic() >= self.deadline_at

    def blocked(self, run: Run) -> str | None:
        """Why ``run`` can no longer start (a run it starts from failed, or the deadline stopped it or
        kept it from starting), else None."""
        needs = [self.records[n.run_id] for n in run.needs]
        if any(r.status == "failed" or r.error in (NEEDS_FAILED, NEEDS_UNDONE) for r in needs):
            return NEEDS_FAILED
        if any(r.status == "stopped at deadline" or r.error in (LATE, NEEDS_LATE) for r in needs):
            return NEEDS_LATE
        return None

    def may_start(self, run: Run) -> bool:
        """Whether ``run`` finishes before the deadline at the speed measured so far."""
        if self.deadline_at is None:
            return True
        seconds = estimate_s(self.records[run.run_id].tokens_planned, list(self.records.values()))
        return fits(seconds, time.monotonic(), self.deadline_at)

    def not_started(self, run: Run, why: str) -> None:
        self.records[run.run_id].error = why

    def finished(self, run: Run, seconds: float, outcome: Outcome) -> None:
        """Record what became of ``run`` after ``seconds`` of wall time (``outcome``: status, sections)."""
        record = self.records[run.run_id]
        record.set_seconds(seconds, outcome.seconds)
        record.node, record.gpu, record.tries = outcome.node, outcome.gpu, outcome.tries
        self._read_progress(run)
        if self.store.is_done(run.experiment, run.run_id):  # a run stopped just after it finished is done
            record.status, record.error = "done", ""
            self.done += 1
            self.log(f"[runs] {self.done}/{self.total} {run.experiment}/{run.name} in {seconds:.0f}s "
                     f"({record.train_tokens_per_s:,.0f} tokens/s training, {record.tokens_per_s:,.0f} with "
                     f"start-up; start-up {record.startup_s:.1f}s)")
        elif outcome.status == "stopped":
            record.status = "stopped at deadline"
            self.log(f"[runs] stopped at deadline: {run.experiment}/{run.name} at {record.tokens_trained:,} "
                     f"of {record.tokens_planned:,} tokens")
        else:
            record.status, record.error = "failed", outcome.error or "failed"
