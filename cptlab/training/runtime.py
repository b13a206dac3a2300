"""Device, precision, optimizer and the training step shared by the trainer and the benchmark."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from cptlab.config import ConfigError, TrainConfig

# loss_fn(model, inputs, targets) -> (the loss to differentiate, the data loss to report)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# -- device and precision ------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. Anything else is passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), so bf16 matmuls are
    faster than fp32 ones; on other CPUs bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    # no /proc (macOS, Windows): trust oneDNN's view where torch exposes it
    mkldnn = getattr(torch.backends, "mkldnn", None)
    checker = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    if mkldnn is not None and mkldnn.is_available() and checker is not None:
        try:
            return bool(checker())
        except (RuntimeError, AttributeError):
            return False
    return False


def pick_precision(name: str, device: torch.device) -> str:
    """``auto``: ``bf16`` on CUDA with bf16 support and on CPUs with native bf16, else ``fp32``.
    ``fp32`` and ``bf16`` are returned as given."""
    if name in ("fp32", "bf16"):
        return name
    if name != "auto":
        raise ValueError(f"precision {name!r} not allowed; allowed: auto, fp32, bf16")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context for forward passes: bf16 autocast, or nothing for fp32. It may be entered again
    and again, one at a time (``train_step`` gives each of its threads a copy)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- optimizer -----------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on matrices (every parameter with ndim >= 2: Linear weights and
    the embeddings), none on biases and LayerNorm parameters (as GPT-NeoX and nanoGPT do)."""
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters are yielded once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def make_optimizer(model: nn.Module, train_cfg: TrainConfig, lr: float = 0.0,
                   kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW with the config's betas, eps and weight decay (see ``param_groups``). Uses the fused
    kernel (one pass over each parameter) where the device has it; ``lr`` is set per step by
    ``train_step``. ``kind`` ``schedulefree_adamw``: the ``schedulefree`` package's AdamW, in train mode
    (``eval_weights`` switches the model to its averaged weights)."""
    groups = param_groups(model, train_cfg.weight_decay)
    device = next(model.parameters()).device
    kwargs = dict(lr=lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps)
    if kind == "schedulefree_adamw":
        try:
            import schedulefree
        except ImportError:
            raise ConfigError("optimizer: schedulefree_adamw needs the schedulefree package: "
                              "pip install 'schedulefree>=1.4,<2'") from None
        optimizer = schedulefree.AdamWScheduleFree(groups, warmup_steps=0, **kwargs)
        optimizer.train()
        return optimizer
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps training weights apart from the weights it returns (schedule-free)."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside: the model holds the weights to evaluate and save (a schedule-free optimizer's average x);
    after: the weights it held before, bit for bit (the training weights y are copied back, not recomputed,
    so that evaluating or saving never changes the run). A no-op for other optimizers."""
    if not is_schedule_free(optimizer) or not optimizer.param_groups[0].get("train_mode", True):
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    training_weights = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        resume_training(optimizer, training_weights)


@torch.no_grad()
def resume_training(optimizer: torch.optim.Optimizer, training_weights: Sequence[torch.Tensor]) -> None:
    """Put a schedule-free optimizer back in train mode with its parameters set to ``training_weights``
    (its y, in ``param_groups`` order) rather than recomputed from x and z."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p, w in zip(params, training_weights, strict=True):
        p.copy_(w)
    for group in optimizer.param_groups:
        group["train_mode"] = True


# -- the step ------------------------------------------------------------------------------------


def step_workers(model: nn.Module, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """How many threads ``train_step`` splits each micro-batch across by default: 2 on a CPU with at
    least 2 torch threads, for a plain (not DDP-wrapped, not compiled) model without dropout, when
    every micro-batch has at least 2 rows; 1 otherwise.

    Two threads that each run a half batch with single-threaded ops are as fast as one thread running
    two-threaded ops on an idle machine, and several times faster when other work takes a core away
    (a two-threaded op waits for its slower half at every barrier; the two halves here only meet at
    the end of the backward pass).
    """
    params = [p for p in model.parameters()]
    if not params or params[0].device.type != "cpu" or torch.get_num_threads() < 2:
        return 1
    if hasattr(model, "no_sync") or hasattr(model, "_orig_mod"):  # DDP / torch.compile
        return 1
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return 1  # dropout draws from the global generator: threads would make it non-deterministic
    if any(x.size(0) < 2 for x, _ in micro_batches):
        return 1
    return 2


_POOLS: dict[tuple[int, int, int], ThreadPoolExecutor] = {}


def _worker_pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """A persistent pool of ``workers`` threads whose torch ops use ``threads`` threads each (one pool
    per process: a forked child gets its own)."""
    key = (workers, threads, os.getpid())
    if key not in _POOLS:
        main_threads = torch.get_num_threads()
        started = threading.Barrier(workers)

        def init() -> None:
            torch.set_num_threads(threads)
            torch.get_num_threads()  # fixes this thread's count now (torch reads it lazily, once per thread)
            started.wait()

        pool = ThreadPoolExecutor(workers, thread_name_prefix="cptlab-step", initializer=init)
        list(pool.map(lambda _: None, range(workers)))  # start every thread (they wait for each other)
        torch.set_num_threads(main_threads)  # set_num_threads in a thread also sets the process default
        _POOLS[key] = pool
    return _POOLS[key]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], lr: float, grad_clip: float,
               autocast: contextlib.AbstractContextManager | None = None,
               workers: int | None = None, loss_fn: LossFn | None = None,
               grad_hook: Callable[[nn.Module], None] | None = None) -> float:
    """One optimizer step over ``micro_batches`` (gradient accumulation): set ``lr``, forward and
    backward each micro-batch with its loss weighted by its share of the tokens, clip the global
    gradient norm to ``grad_clip`` (0: no clipping), step, zero the gradients. Returns the mean loss
    over all tokens of the step (a float: one sync per step).

    ``autocast`` is a context manager (e.g. ``autocast_context``) entered around each forward pass.
    Under ``DistributedDataParallel`` gradient sync is skipped on all but the last micro-batch.
    ``workers`` > 1 splits every micro-batch by rows across that many threads (CPU only; each runs its
    rows single-threaded and the gradients are summed in a fixed order, so results are deterministic);
    None picks ``step_workers(model, micro_batches)``. ``loss_fn(model, x, y)`` returns (the loss to
    differentiate, the data loss to report) of a micro-batch (default: the model's loss, both);
    ``grad_hook(model)`` runs after the backward pass, before clipping (a regularizer's penalty gradient).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    if workers is None:
        workers = step_workers(model, micro_batches)
    loss_fn = loss_fn or _model_loss
    if workers > 1:
        loss = _forward_backward_threads(model, micro_batches, autocast, workers, loss_fn)
    else:
        loss = _forward_backward(model, micro_batches, autocast, loss_fn)
    if grad_hook is not None:
        grad_hook(model)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _model_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, loss = model(x, y, return_logits=False)
    return loss, loss


def _forward_backward(model: nn.Module, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      autocast: contextlib.AbstractContextManager | None, loss_fn: LossFn) -> torch.Tensor:
    """Accumulate the gradients of all micro-batches into ``.grad``; the token-weighted mean loss."""
    total = sum(x.numel() for x, _ in micro_batches)
    no_sync = getattr(model, "no_sync", None)
    loss_sum = None
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with autocast if autocast is not None else contextlib.nullcontext():
                objective, loss = loss_fn(model, x, y)
            weight = x.numel() / total
            (objective * weight if len(micro_batches) > 1 else objective).backward()
        loss = loss.detach() * weight
        loss_sum = loss if loss_sum is None else loss_sum + loss
    return loss_sum


def _own_copy(context: contextlib.AbstractContextManager | None) -> contextlib.AbstractContextManager:
    """A copy of ``context`` that one thread can enter while another enters the original
    (``torch.autocast`` keeps the state it restores on the object)."""
    if context is None:
        return contextlib.nullcontext()
    try:
        return copy.copy(context)
    except (TypeError, copy.Error):
        return context


def _forward_backward_threads(model: nn.Module, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                              autocast: contextlib.AbstractContextManager | None,
                              workers: int, loss_fn: LossFn) -> torch.Tensor:
    """``_forward_backward`` with every micro-batch split by rows across ``workers`` threads."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(x.numel() for x, _ in micro_batches)
    shards = [[] for _ in range(workers)]
    for x, y in micro_batches:
        for w, (xs, ys) in enumerate(zip(x.tensor_split(workers), y.tensor_split(workers))):
            if xs.numel():
                shards[w].append((xs, ys))

    def run(w: int) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
        context = _own_copy(autocast)
        grads: list[torch.Tensor | None] = [None] * len(params)
        loss_sum = None
        for x, y in shards[w]:
            with context:
                objective, loss = loss_fn(model, x, y)
            weight = x.numel() / total
            new = torch.autograd.grad(objective * weight, params, allow_unused=True)
            grads = [n if g is None else (g if n is None else g.add_(n)) for g, n in zip(grads, new)]
            loss = loss.detach() * weight
            loss_sum = loss if loss_sum is None else loss_sum + loss
        return grads, loss_sum

    results = list(_worker_pool(workers, max(1, torch.get_num_threads() // workers)).map(run, range(workers)))
    for i, p in enumerate(params):
        for grads, _ in results:  # a fixed order: the same sums every time
            g = grads[i]
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
    losses = [loss for _, loss in results if loss is not None]
    return torch.stack(losses).sum()


# -- threads and malloc ----------------------------------------------------------------------------


def set_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` when ``n > 0`` (0 leaves torch's default: one per core)."""
    if n > 0:
        torch.set_num_threads(n)


_MALLOC_MARK = "CPTLAB_MALLOC_TUNED"


def tune_malloc_env() -> dict[str, str]:
    """glibc malloc settings that keep freed memory in the process for the next step instead of
    returning it to the OS and mapping it back (every fresh 4 KiB page costs a minor page fault; a
    step allocates and frees the same large tensors each time). The price: the process keeps its
    peak memory until it exits.

    - MALLOC_MMAP_MAX_=0: never serve large blocks with their own mmap (freed with munmap)
    - MALLOC_MMAP_THRESHOLD_: fixed at glibc's maximum, which also stops glibc from adapting the
      trim threshold
    - MALLOC_TRIM_THRESHOLD_: never trim the top of the heap back to the OS
    - MALLOC_TOP_PAD_: grow the heap 64 MiB at a time
    - MALLOC_ARENA_MAX=1: one heap for all threads (a thread arena cannot hold blocks over 64 MiB
      and would fall back to mmap)

    As environment variables they must be set before the process starts (``malloc_subprocess_env``,
    ``reexec_with_tuned_malloc``); ``tune_malloc`` applies the same settings to a running process.
    """
    return {
        "MALLOC_MMAP_MAX_": "0",
        "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
        "MALLOC_TRIM_THRESHOLD_": str(2**62),
        "MALLOC_TOP_PAD_": str(64 * 1024 * 1024),
        "MALLOC_ARENA_MAX": "1",
    }


# mallopt parameters, glibc <malloc.h>
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3,
            "MALLOC_MMAP_MAX_": -4, "MALLOC_ARENA_MAX": -8}


def tune_malloc() -> bool:
    """Apply ``tune_malloc_env``'s settings to this running process through glibc's ``mallopt``, so
    that no re-exec is needed. Blocks already mapped stay as they are; later ones follow the new
    settings. Returns True when every setting was accepted; False (changing nothing) off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for key, value in tune_malloc_env().items():
        ok &= mallopt(_MALLOPT[key], min(int(value), 2**31 - 1)) == 1
    return bool(ok)


def malloc_env_is_tuned(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(env.get(k) == v for k, v in tune_malloc_env().items())


def malloc_subprocess_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) with the tuned malloc settings added (values
    already set in ``base`` are kept)."""
    env = dict(os.environ if base is None else base)
    for k, v in tune_malloc_env().items():
        env.setdefault(k, v)
    return env


def reexec_with_tuned_malloc(argv: list[str] | None = None) -> None:
    """Replace this process by itself with the tuned malloc env, once (a marker variable stops a
    loop). Call it first thing in a script's ``main``; a no-op when already tuned or not on Linux."""
    if not sys.platform.startswith("linux") or os.environ.get(_MALLOC_MARK) or malloc_env_is_tuned():
        return
    env = malloc_subprocess_env()
    env[_MALLOC_MARK] = "1"
    if argv is None:  # the original command line, ``-m module`` included
        argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:])
    argv = [sys.executable, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
