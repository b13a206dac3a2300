"""Runs on a Ray cluster (``cptlab batch --cluster ADDRESS``): an executor behind the runner's seam
(``executors.Executor``) that trains each job as a Ray task. The task runs today's trainer, a ``cptlab
worker`` process with the local executor's command and environment (``executors.worker_command``), for
that one job, on ``job.threads`` CPUs and, on CUDA, the fraction of a GPU the run's memory estimate takes
(``scheduler.run_memory_bytes``), so several small runs share a GPU. The runner still decides what runs
when (a continual run is submitted once the runs it starts from are done, longest chains first, the
deadline); this only decides where.

Two ways to keep one run store:

- ``store="shared"``: the run store is on a filesystem every node mounts; a task trains into it directly.
- ``store="node"``: no shared filesystem. The head ships the run's directory (its run.yaml, and what an
  earlier batch left of it) and the checkpoints it starts from through Ray's object store; the task trains
  into a store local to its node and returns the run directory the same way, which the head swaps into
  its store (``keep``: which checkpoints come back with a finished run: the stage ends, ``final``; none;
  or ``all``, the rolling ones too; a stopped run brings all back, to resume from). Run references make a
  run directory relocatable, so a directory trained on a node's store reads the same in the head's.

Faults: a task whose worker process or node dies is retried by Ray (``max_retries``), and so is one whose
trainer process ends without an answer (``TrainerLost``); the run resumes from its last rolling checkpoint.
A run that fails (a config error, a diverged run) is answered, not raised, so it is not retried. ``stop``
asks every task's trainer to checkpoint and end (SIGINT), ``kill`` ends them (SIGKILL), through a small
control actor the tasks poll."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from cptlab.config import ConfigError, RunConfig, RunRef
from cptlab.study.executors import STOPPED_BEFORE_START, Job, Outcome, worker_command
from cptlab.training.store import RunStore

RAY_RANGE = ">=2.46,<2.47"  # the cluster extra's pin (pyproject.toml)
RAY_MISSING = ("--cluster: Ray is not installed; install it with pip install 'cptlab[cluster]' "
               f"(or pip install 'ray[client]{RAY_RANGE}')")
STORE_MODES = ("shared", "node")
KEEP_CHECKPOINTS = ("final", "none", "all")
POLL_S = 0.5  # how often a task looks for a stop or kill
NODE_RUNS_ENV = "CPTLAB_NODE_RUNS"  # where a node keeps its local store (store="node")
LEFT_BEHIND = {".lock", ".holder.json"}  # files of a run directory never shipped
# Ray's start-up waits (its agents, its workers) for a local cluster on a busy machine: the defaults (30-60 s)
# end a start on a laptop whose cores are taken.
BUSY_MACHINE_TIMEOUTS = {"RAY_agent_register_timeout_ms": "300000", "RAY_raylet_start_wait_time_s": "60",
                         "RAY_worker_register_timeout_seconds": "300"}


class TrainerLost(RuntimeError):
    """The trainer process ended without an answer (killed, out of memory): Ray retries the task."""


def import_ray() -> Any:
    """The ``ray`` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def check_options(cluster: str, store: str = "shared", keep: str = "final") -> None:
    """One-line ConfigErrors for the cluster options, before any work (Ray missing included)."""
    if not (cluster in ("auto", "local") or cluster.startswith("ray://") or ":" in cluster):
        raise ConfigError(f"--cluster: expected auto, local, ray://HOST:PORT or HOST:PORT, got {cluster!r}")
    if store not in STORE_MODES:
        raise ConfigError(f"--store: expected one of {', '.join(STORE_MODES)}, got {store!r}")
    if keep not in KEEP_CHECKPOINTS:
        raise ConfigError(f"--keep-checkpoints: expected one of {', '.join(KEEP_CHECKPOINTS)}, got {keep!r}")
    import_ray()


def connect(cluster: str) -> bool:
    """Connect to the Ray cluster ``cluster`` (``local``: start one in this process); whether this call
    connected (an already connected process keeps its connection)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if cluster == "local":
        for key, value in BUSY_MACHINE_TIMEOUTS.items():
            os.environ.setdefault(key, value)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=cluster, log_to_driver=False)
    return True


class Control:
    """The tasks' control actor: whether they should run, stop or be killed, and how many times each run
    was started (a retried task starts again)."""

    def __init__(self) -> None:
        self.state = "run"
        self.starts: dict[str, int] = {}

    def start(self, run_id: str) -> str:
        self.starts[run_id] = self.starts.get(run_id, 0) + 1
        return self.state

    def get(self) -> str:
        return self.state

    def set(self, state: str) -> None:
        self.state = state

    def tries(self, run_id: str) -> int:
        return self.starts.get(run_id, 0)


# -- packing run directories (both ends) ------------------------------------------------------------

def pack(folder: Path, arcname: str, keep: str = "all") -> bytes:
    """``folder`` as an uncompressed tar under ``arcname`` (checkpoints are not compressible): with
    ``keep`` ``final`` without its rolling checkpoints, ``none`` without any, ``all`` with every one."""

    def wanted(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name)
        if name.name in LEFT_BEHIND or name.name.endswith(".tmp"):
            return None
        dropped = keep == "none" or (keep == "final" and name.name.startswith("step-"))
        if name.parent.name == "checkpoints" and dropped:
            return None
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=arcname, filter=wanted)
    return buffer.getvalue()


def unpack(archive: bytes, root: Path) -> None:
    """Extract a ``pack`` archive under ``root`` (only plain files and folders inside it)."""
    root.mkdir(parents=True, exist_ok=True)
    if not archive:
        return
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")


def receive(archive: bytes, out: Path) -> None:
    """Put the run directory ``archive`` holds in place of ``out``: extracted beside it, then swapped in,
    so a reader sees the old directory or the new one (DONE only ever with its whole run)."""
    incoming = out.parent / f".{out.name}.incoming"
    old = out.parent / f".{out.name}.old"
    for stale in (incoming, old):
        shutil.rmtree(stale, ignore_errors=True)
    unpack(archive, incoming)
    with contextlib.suppress(FileNotFoundError):
        out.rename(old)
    (incoming / out.name).rename(out)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(incoming, ignore_errors=True)


def _metrics_bytes(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    return path.stat().st_size if path.exists() else 0


# -- the task (on a node) ---------------------------------------------------------------------------

def _trainer_preexec() -> None:
    """In the trainer process before it starts: take SIGINT as a fresh process does (a Ray worker blocks
    or ignores it, and a child inherits both: the stop would never arrive), and be killed when the task's
    worker process dies (Linux), so a retried task finds the run directory free."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_trainer(request: dict[str, Any], control: Any, ray: Any) -> dict[str, Any]:
    """Train ``request`` (a worker job) in a new ``cptlab worker`` process; its answer. SIGINT when the
    control actor says stop, SIGKILL when it says kill; ``TrainerLost`` if it ends without an answer."""
    cmd, env = worker_command(int(request["threads"]))
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, preexec_fn=_trainer_preexec)
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.close()
        sent = None
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(POLL_S)
            state = ray.get(control.get.remote())
            if state == "kill":
                proc.kill()
                sent = state
            elif state == "stop" and sent is None:
                proc.send_signal(signal.SIGINT)
                sent = state
        answer = _answer(proc.stdout.read())
        if answer is not None:
            return answer
        if sent == "kill":
            return {"status": "failed", "error": "killed after the stop's grace time", "seconds": {}}
        err.seek(0)
        tail = "\n".join([s for s in err.read().splitlines() if s.strip()][-5:])
        raise TrainerLost(f"the trainer ended without an answer (exit {proc.returncode}): {tail}")


def _answer(stdout: str) -> dict[str, Any] | None:
    """The worker's answer among its stdout lines (a stray line is skipped), else None."""
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError):
            answer = json.loads(line)
            if isinstance(answer, dict) and "status" in answer:
                return answer
    return None


def node_store() -> Path:
    """This node's local run store (``$CPTLAB_NODE_RUNS``, else a folder in the temp dir), one per Ray
    node (several nodes of a test cluster share a machine)."""
    import ray

    base = Path(os.environ.get(NODE_RUNS_ENV) or Path(tempfile.gettempdir()) / "cptlab-node-runs")
    return base / ray.get_runtime_context().get_node_id()[:12]


def _place_on_node(spec: dict[str, Any], shipped: bytes, starts: list[bytes]) -> Path:
    """Unpack the run directory and the checkpoints it starts from into this node's store; its root.
    A directory this node already holds further along (a retried task) is kept."""
    root = node_store()
    out = root / spec["experiment"] / spec["run_id"]
    root.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(dir=root))
    unpack(shipped, incoming)
    if _metrics_bytes(out) <= _metrics_bytes(incoming / spec["run_id"]) or not out.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        (incoming / spec["run_id"]).rename(out)
    shutil.rmtree(incoming, ignore_errors=True)
    for archive in starts:
        unpack(archive, root)
    return root


def train_task(spec: dict[str, Any], control: Any, shipped: bytes | None, *starts: bytes) -> dict[str, Any]:
    """A Ray task: train one run (``spec``: the worker job, plus the run's experiment, id and the store
    mode); its answer with the node and GPU it ran on (and, ``store="node"``, the run directory)."""
    import ray

    node = f"{socket.gethostname()} ({ray.get_runtime_context().get_node_id()[:8]})"
    where = {"node": node, "gpu": ",".join(str(g) for g in ray.get_gpu_ids())}
    if ray.get(control.start.remote(spec["run_id"])) != "run":
        return {"status": "stopped", "error": STOPPED_BEFORE_START, "seconds": {}, **where}
    request = dict(spec["request"])
    if shipped is not None:
        root = _place_on_node(spec, shipped, list(starts))
        out = root / spec["experiment"] / spec["run_id"]
        request.update(config=str(out / "run.yaml"), out=str(out), runs=str(root))
    answer = {**run_trainer(request, control, ray), **where}
    if shipped is not None:
        done = answer["status"] == "done"
        answer["archive"] = pack(out, spec["run_id"], spec["keep"] if done else "all")
        if done and spec["keep"] == "none":  # the stage ends, for the runs that start from this one
            answer["starts_from"] = pack(out / "checkpoints", f"{spec['experiment']}/{spec['run_id']}/"
                                         "checkpoints", "final")
        if done:
            shutil.rmtree(out, ignore_errors=True)
    return answer


# -- the executor (at the head) ---------------------------------------------------------------------

def gpu_memory_bytes(ray: Any) -> int:
    """The memory of one of the cluster's GPUs: this machine's first, else a one-GPU probe task's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory

    def probe() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(ray.remote(num_gpus=1)(probe).remote(), timeout=300)


class RayExecutor:
    """Train jobs as Ray tasks on the cluster ``cluster`` (see the module docstring). ``per_run_bytes``:
    the GPU memory of the largest run (``scheduler.run_memory_bytes``) when runs train on CUDA; each task
    then asks for that fraction of a GPU. ``slots``: the runs the cluster trains side by side."""

    def __init__(self, cluster: str = "local", store: str = "shared", keep: str = "final", *,
                 threads: int = 1, per_run_bytes: int | None = None, max_retries: int = 3):
        check_options(cluster, store, keep)
        self.ray = import_ray()
        self.connected = connect(cluster)
        self.store, self.keep, self.max_retries = store, keep, max_retries
        self.meta = {"cluster": cluster, "store": store, "keep_checkpoints": keep}
        self.control = self.ray.remote(num_cpus=0)(Control).remote()
        resources = self.ray.cluster_resources()
        self.gpu_fraction = None
        slots = int(resources.get("CPU", 1) // max(1, threads))
        if per_run_bytes is not None and resources.get("GPU", 0) > 0:
            fraction = per_run_bytes / gpu_memory_bytes(self.ray)
            self.gpu_fraction = min(1.0, math.ceil(fraction * 100) / 100)
            slots = min(slots, int(resources["GPU"] / self.gpu_fraction))
        self.slots = max(1, slots)
        self._starts: dict[tuple[str, str, str], Any] = {}  # (experiment, run, stage) -> object ref
        self._lock = threading.Lock()
        self._pending: set[Any] = set()

    def submit(self, job: Job) -> Future[Outcome]:
        future: Future[Outcome] = Future()
        cfg = RunConfig.load(job.config)
        request = {"config": str(job.config), "out": str(job.out), "runs": str(job.runs),
                   "threads": job.threads, "sent_at": time.time()}
        spec = {"request": request, "experiment": job.out.parent.name, "run_id": job.run_id,
                "keep": self.keep}
        options: dict[str, Any] = {"num_cpus": job.threads, "max_retries": self.max_retries,
                                   "retry_exceptions": [TrainerLost], "name": f"cptlab:{job.run_id}"}
        if self.gpu_fraction is not None and cfg.train.device != "cpu":
            options["num_gpus"] = self.gpu_fraction
        args: list[Any] = [None]
        if self.store == "node":
            args = [pack(job.out, job.run_id)] + [self._start_checkpoint(ref, job.runs)
                                                  for ref in _references(cfg)]
        task = self.ray.remote(train_task).options(**options)
        ref = task.remote(spec, self.control, *args)
        with self._lock:
            self._pending.add(ref)
        threading.Thread(target=self._collect, args=(ref, job, future), daemon=True).start()
        return future

    def _start_checkpoint(self, ref: RunRef, runs: Path) -> Any:
        """The object holding the checkpoint ``ref`` names (packed under its run directory), put in the
        object store once for every run that starts from it."""
        key = (ref.experiment, ref.run, ref.stage)
        with self._lock:
            if key not in self._starts:
                checkpoints = RunStore(runs).run(ref.experiment, ref.run).ckpt_dir
                archive = b""  # none: the trainer says which checkpoint it misses
                if checkpoints.is_dir():
                    archive = pack(checkpoints, f"{ref.experiment}/{ref.run}/checkpoints", "final")
                self._starts[key] = self.ray.put(archive)
            return self._starts[key]

    def _collect(self, ref: Any, job: Job, future: Future[Outcome]) -> None:
        """Wait for the task of ``job``; put its run directory in place (``store="node"``); its outcome."""
        try:
            answer = self.ray.get(ref)
            if "archive" in answer:
                receive(answer.pop("archive"), job.out)
            if "starts_from" in answer:  # keep=none: the stage ends live in the object store only
                starts = self.ray.put(answer.pop("starts_from"))
                with self._lock:
                    for stage in RunConfig.load(job.config).stages:
                        self._starts.setdefault((job.out.parent.name, job.run_id, stage.name), starts)
            outcome = Outcome(answer["status"], answer["error"], answer["seconds"], node=answer["node"],
                              gpu=answer["gpu"])
        except Exception as exc:  # noqa: BLE001 - the task's error (retries spent, cancelled) is the outcome
            outcome = Outcome("failed", f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
        with contextlib.suppress(Exception):
            outcome.tries = self.ray.get(self.control.tries.remote(job.run_id))
        with self._lock:
            self._pending.discard(ref)
        future.set_result(outcome)

    def stop(self) -> None:
        self.control.set.remote("stop")

    def kill(self) -> None:
        self.control.set.remote("kill")

    def close(self) -> None:
        """Cancel the tasks still pending and, if this executor connected, disconnect (a ``local`` cluster
        ends with it)."""
        with self._lock:
            pending = list(self._pending)
        for ref in pending:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        with contextlib.suppress(Exception):
            self.ray.kill(self.control)
        if self.connected:
            self.ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _references(cfg: RunConfig) -> list[RunRef]:
    """The runs' checkpoints ``cfg``'s stages start from."""
    return [st.init_from for st in cfg.stages if isinstance(st.init_from, RunRef)]
