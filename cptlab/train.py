"""Run a RunConfig stage by stage: data, model, schedule, evaluation, checkpoints, exact resume, DDP.

``train(cfg, out_dir)`` is what ``cptlab train`` calls. Reading it top to bottom:

1. set up (distributed if launched by torchrun), check the config, load tokenizer and token shards;
2. claim the run directory (refuse a different config) and resume from its newest good checkpoint;
3. for each stage: start from the previous stage, from scratch or from a checkpoint; reset the
   optimizer if asked; build the replay sampler (a corpus read as new data continues where earlier
   stages, or the checkpoint's run, stopped; a replayed corpus is read again from the start of its
   original order) and the stage's LR schedule; train, logging a line every
   ``train.log_every_steps`` steps, evaluating every ``eval.every_tokens`` tokens and at the stage end,
   writing a rolling checkpoint every ``train.checkpoint_every_tokens`` and a kept one at the stage end.

The LR is a pure function of (stage, step), the sampler's position is saved, and so are the RNG states:
a run killed at any moment and resumed writes the same metrics.jsonl as one never interrupted.

Strategies (``train.strategy``, with several processes under torchrun; one process ignores it):
- ``ddp``: every process holds the whole model; gradients are averaged by DistributedDataParallel.
- ``fsdp``: the model is sharded with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): each
  block is one unit and the rest (embeddings, final LayerNorm, output projection) the root unit, so every
  process holds 1/N of each parameter, gradient and AdamW moment; a unit's parameters are gathered just
  before its forward and backward and freed after. Parameters stay fp32 (bf16 comes from autocast, as
  with ddp), gradients are reduce-scattered after every micro-batch (so they stay sharded too).
``train.activation_checkpointing`` (any strategy) keeps only each block's input in the forward pass and
recomputes the block in the backward: much less activation memory for about a third more compute.

Checkpoints have one format whatever the strategy: a consolidated (unsharded) state on rank 0. ``model``
is ``GPT.state_dict()`` (full tensors on the CPU), ``optimizer`` is ``torch.optim.AdamW.state_dict()`` of
the unsharded model (parameters numbered in the order of its two parameter groups). Under fsdp the full
state is gathered to rank 0 to save (``torch.distributed.checkpoint.state_dict``) and every process reads
the file and keeps its shard to resume, so a run, or a stage's ``init_from``, can move between strategies
and process counts.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cptlab import data, runtime, schedules
from cptlab.config import ConfigError, RunConfig, Stage, atomic_write_text
from cptlab.model import GPT
from cptlab.store import RunDir, load_checkpoint

# Beyond this many passes over a corpus a stage warns: the first `small` design read en-man 26 times and
# its D0 validation loss rose from 3.67 (after ~5 passes) to 6.11.
MAX_EPOCHS_BEFORE_WARNING = 5


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


@dataclass
class TrainResult:
    out_dir: Path
    status: str  # "done" | "stopped"
    final_val: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0


@dataclass
class _Progress:
    """Counters that a checkpoint saves and a resume restores."""

    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done in the current stage
    step: int = 0  # optimizer steps in the whole run
    tokens: int = 0  # tokens trained on in the whole run
    tokens_by_source_done: dict[str, int] = field(default_factory=dict)  # finished stages
    sequences_done: dict[str, int] = field(default_factory=dict)  # new data read by finished stages
    next_eval_tokens: int = 0
    next_ckpt_tokens: int = 0
    window_loss: float = 0.0  # train loss summed since the last training line
    window_steps: int = 0


def _setup_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun. On GPUs each
    process uses the GPU of its local rank, NCCL for CUDA tensors and gloo for CPU ones (the loss)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    if world > 1:
        return dist.get_rank(), world
    return 0, 1


def _stage_sources(stage: Stage) -> list[str]:
    names = list(stage.data)
    if stage.replay is not None and stage.replay.fraction > 0 and stage.replay.source not in names:
        names.append(stage.replay.source)
    return names


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_sets: dict[str, np.ndarray], seq_len: int, batch_size: int,
             device: torch.device, autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Mean next-token loss over the same fixed validation tokens of each set."""
    was_training = model.training
    model.eval()
    out = {}
    for name, tokens in val_sets.items():
        n_seq = (len(tokens) - 1) // seq_len
        arr = torch.from_numpy(np.asarray(tokens[: n_seq * seq_len + 1], dtype=np.int64))
        x_all, y_all = arr[:-1].view(n_seq, seq_len), arr[1:].view(n_seq, seq_len)
        total = 0.0
        for i in range(0, n_seq, batch_size):
            x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
            with autocast:
                _, loss = model(x, y, return_logits=False)
            total += float(loss) * len(x)
        out[name] = total / n_seq
    model.train(was_training)
    return out


def train(cfg: RunConfig, out_dir: str | Path, *, quiet: bool = False,
          stop: Callable[[], bool] | None = None,
          on_record: Callable[[dict[str, Any]], None] | None = None,
          cache_dir: str | Path | None = None) -> TrainResult:
    """Run (or resume) ``cfg`` in ``out_dir``. ``stop()`` returning True ends the run at the next step
    with a checkpoint (resume by calling again); ``on_record`` sees every metrics line as it is written."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    rank, world = _setup_distributed()
    try:
        return _train(cfg, out_dir, rank, world, quiet, stop, on_record, cache_dir)
    finally:
        # A process group left to the interpreter's exit can abort it ("terminate called without an
        # active exception" from gloo's threads), so the group this call created ends with it.
        if world > 1 and owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: RunConfig, out_dir: str | Path, rank: int, world: int, quiet: bool,
           stop: Callable[[], bool] | None, on_record: Callable[[dict[str, Any]], None] | None,
           cache_dir: str | Path | None) -> TrainResult:
    registry = data.Registry(cfg.corpora)
    cfg.validate(registry.names())
    t = cfg.train
    share = t.batch_size // world
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by the {world} processes")
    micro = t.micro_batch_size or share
    if share % micro:
        raise ConfigError(f"train.micro_batch_size ({micro}) must divide the per-process batch ({share})")
    runtime.set_threads(t.threads)
    runtime.tune_malloc()  # glibc keeps freed memory: far fewer page faults per step (see runtime)

    tokenizer = data.load_tokenizer(cfg.tokenizer, registry, cache_dir=cache_dir)
    resolved = cfg.resolve(vocab_size=tokenizer.vocab_size)
    if resolved.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size ({resolved.model.vocab_size}) is smaller than the "
                          f"tokenizer's ({tokenizer.vocab_size})")
    run = RunDir(out_dir)
    if rank == 0:
        run.claim(resolved)
    if world > 1:
        dist.barrier()

    device = runtime.pick_device(t.device)
    precision = runtime.pick_precision(t.precision, device)
    autocast = runtime.autocast_context(device, precision)
    train_names = sorted({n for st in resolved.stages for n in _stage_sources(st)})
    shards = {n: data.token_shard(n, "train", tokenizer, registry, cache_dir=cache_dir) for n in train_names}
    val_sets = {n: data.val_tokens(n, tokenizer, registry, resolved.eval.tokens, cache_dir=cache_dir)
                for n in resolved.eval.sets}
    for name, tokens in val_sets.items():
        if len(tokens) < t.seq_len + 1:
            raise ConfigError(f"eval.sets: {name!r} has {len(tokens)} validation tokens, fewer than one "
                              f"sequence of train.seq_len + 1 = {t.seq_len + 1}")

    torch.manual_seed(t.seed)
    model = GPT(resolved.model).to(device)
    fsdp = world > 1 and t.strategy == "fsdp"
    if t.activation_checkpointing:
        _checkpoint_blocks(model)
    if fsdp:
        _shard(model)
    optimizer = runtime.make_optimizer(model, t)
    progress = _Progress(next_eval_tokens=resolved.eval.every_tokens,
                         next_ckpt_tokens=t.checkpoint_every_tokens)
    sampler_state = None
    last_val: dict[str, float] = {}

    ckpt = run.latest_checkpoint() if run.config_path.exists() else None
    if ckpt is not None:
        _load_model(model, ckpt["model"])
        _load_optimizer(model, optimizer, ckpt["optimizer"])
        progress = _Progress(**ckpt["progress"])
        sampler_state = ckpt["sampler"]
        last_val = dict(ckpt.get("last_val", {}))
        _set_rng_state(ckpt["rng"])
    if rank == 0:
        run.open_metrics(ckpt["metrics_bytes"] if ckpt is not None else 0)

    def log(record: dict[str, Any]) -> None:
        if rank == 0:
            run.log(record)
        if on_record is not None:
            on_record(record)

    def save(name: str, sampler: data.BatchSampler | None) -> None:
        model_state, optimizer_state = _full_state(model, optimizer)  # under fsdp every rank takes part
        if rank != 0:
            return
        state = {
            "model": model_state, "optimizer": optimizer_state,
            "progress": vars(progress).copy(), "sampler": sampler.state_dict() if sampler else None,
            "rng": _rng_state(), "last_val": last_val, "metrics_bytes": run.metrics_size(),
            "config_hash": resolved.hash(),
        }
        run.save_checkpoint(state, name)
        if name.startswith("stage-"):
            atomic_write_text(run.ckpt_dir / f"{name}.json", f'{{"step": {progress.step}}}\n')

    ddp_model = model
    if world > 1 and not fsdp:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    step_model = torch.compile(ddp_model) if t.compile else ddp_model
    status = "done"

    for si in range(progress.stage_index, len(resolved.stages)):
        stage = resolved.stages[si]
        starting = progress.stage_step == 0 and sampler_state is None
        base = None
        if starting:
            base = _begin_stage(stage, si, model, resolved)
            if stage.reset_optimizer or si == 0:
                optimizer = runtime.make_optimizer(model, t)
            if base is not None and not stage.reset_optimizer:
                _load_optimizer(model, optimizer, base["optimizer"])
            if base is not None and si == 0:  # continue the base model's counters so curves line up
                progress.step = base["progress"]["step"]
                progress.tokens = base["progress"]["tokens"]
                progress.sequences_done = dict(base["progress"].get("sequences_done", {}))
                progress.next_eval_tokens = progress.tokens + resolved.eval.every_tokens
                progress.next_ckpt_tokens = progress.tokens + t.checkpoint_every_tokens
        weights = stage.data
        sampler = data.BatchSampler(
            {n: shards[n] for n in _stage_sources(stage)}, weights, stage.replay, t.seq_len, t.batch_size,
            stage.tokens, seed=t.seed, rank=rank, world_size=world,
            start={n: progress.sequences_done.get(n, 0) for n in stage.data})
        if sampler_state is not None:
            sampler.load_state_dict(sampler_state)
            sampler_state = None
        for corpus, epochs in sampler.planned_epochs.items():
            if epochs > MAX_EPOCHS_BEFORE_WARNING and rank == 0:
                warnings.warn(f"stage {stage.name!r} reads corpus {corpus!r} {epochs:.1f} times over (more "
                              f"than {MAX_EPOCHS_BEFORE_WARNING}): expect it to overfit, its validation loss "
                              "to rise", stacklevel=2)
        n_steps = sampler.num_steps
        lr_at = schedules.build(stage.schedule.to_spec(), n_steps)
        batch_tokens = t.batch_size * t.seq_len

        if base is not None and si == 0 and val_sets:  # where the base model starts from
            last_val = evaluate(model, val_sets, t.seq_len, micro, device, autocast)
            log({"step": progress.step, "tokens": progress.tokens, "stage": stage.name,
                 "lr": lr_at(0), "val": last_val})

        bar = None
        if not quiet and rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_steps * batch_tokens, initial=progress.stage_step * batch_tokens,
                       desc=f"[{si + 1}/{len(resolved.stages)}] {stage.name}", unit="tok", unit_scale=True,
                       leave=True, dynamic_ncols=True)
        window_start, window_start_steps = time.perf_counter(), progress.window_steps
        while progress.stage_step < n_steps:
            if stop is not None and stop():
                save(f"step-{progress.step:09d}", sampler)
                status = "stopped"
                break
            lr = lr_at(progress.stage_step)
            x, y = sampler.next_batch()
            micro_batches = [(x[i:i + micro].to(device), y[i:i + micro].to(device))
                             for i in range(0, share, micro)]
            loss = runtime.train_step(step_model, optimizer, micro_batches, lr, t.grad_clip, autocast,
                                      workers=1 if fsdp else None)
            if world > 1:
                loss_t = torch.tensor([loss], dtype=torch.float64)
                dist.all_reduce(loss_t)
                loss = float(loss_t) / world
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss} at step {progress.step + 1} (stage {stage.name!r}, stage step "
                    f"{progress.stage_step + 1}); the last good checkpoint in {run.ckpt_dir} is kept")
            progress.stage_step += 1
            progress.step += 1
            progress.tokens += batch_tokens
            progress.window_loss += loss
            progress.window_steps += 1
            if bar is not None:
                bar.update(batch_tokens)
            last = progress.stage_step == n_steps
            if progress.stage_step % t.log_every_steps == 0 or last:
                elapsed = time.perf_counter() - window_start
                by_source = _add_counts(progress.tokens_by_source_done, sampler.tokens_by_source)
                mean_loss = progress.window_loss / progress.window_steps
                log({"step": progress.step, "tokens": progress.tokens, "stage": stage.name, "lr": lr,
                     "train_loss": mean_loss, "tokens_by_source": by_source,
                     "tokens_per_s": (progress.window_steps - window_start_steps) * batch_tokens
                     / max(elapsed, 1e-9)})
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", refresh=False)
                progress.window_loss, progress.window_steps = 0.0, 0
                window_start, window_start_steps = time.perf_counter(), 0
            due_eval = resolved.eval.every_tokens and progress.tokens >= progress.next_eval_tokens
            if val_sets and (due_eval or last):
                last_val = evaluate(model, val_sets, t.seq_len, micro, device, autocast)
                log({"step": progress.step, "tokens": progress.tokens, "stage": stage.name, "lr": lr,
                     "val": last_val})
            while resolved.eval.every_tokens and progress.next_eval_tokens <= progress.tokens:
                progress.next_eval_tokens += resolved.eval.every_tokens
            if last:
                progress.tokens_by_source_done = _add_counts(progress.tokens_by_source_done,
                                                             sampler.tokens_by_source)
                read = sampler.sequences_by_source
                progress.sequences_done = {**progress.sequences_done, **{
                    n: progress.sequences_done.get(n, 0) + read.get(n, 0) for n in stage.data}}
                progress.stage_index, progress.stage_step = si + 1, 0
                save(f"stage-{stage.name}", None)
                break
            elif t.checkpoint_every_tokens and progress.tokens >= progress.next_ckpt_tokens:
                while progress.next_ckpt_tokens <= progress.tokens:
                    progress.next_ckpt_tokens += t.checkpoint_every_tokens
                save(f"step-{progress.step:09d}", sampler)
        if bar is not None:
            bar.close()
        if status == "stopped":
            break
        if rank == 0 and not quiet and last_val:
            vals = "  ".join(f"{k} {v:.4f}" for k, v in last_val.items())
            print(f"stage {stage.name} done at {progress.tokens:,} tokens: val {vals}", flush=True)

    if rank == 0:
        if status == "done":
            run.mark_done()
        run.close()
    return TrainResult(Path(out_dir), status, last_val, progress.step, progress.tokens)


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per-corpus counts of finished stages plus the current stage's."""
    return {name: a.get(name, 0) + int(b.get(name, 0)) for name in {**a, **b}}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", getattr(model, "module", model))


def _begin_stage(stage: Stage, index: int, model: GPT, cfg: RunConfig) -> dict[str, Any] | None:
    """Set the model's starting weights for a stage: previous stage, scratch, or a checkpoint (returned)."""
    if stage.init_from == "scratch" and index > 0:
        torch.manual_seed(cfg.train.seed + index)
        _load_model(model, GPT(cfg.model).state_dict())
    elif stage.init_from not in ("previous", "scratch"):
        path = Path(stage.init_from)
        if not path.exists():
            raise ConfigError(f"stages[{index}] ({stage.name}).init_from: checkpoint {path} does not exist")
        state = load_checkpoint(path)
        try:
            _load_model(model, state["model"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"stages[{index}] ({stage.name}).init_from: {path} does not fit this model: "
                              f"{str(exc).splitlines()[0]}") from None
        return state
    return None


# -- strategies ----------------------------------------------------------------------------------

def _checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: each block's forward runs under ``torch.utils.checkpoint`` (its
    activations are recomputed in the backward pass instead of kept)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _fully_shard() -> Callable[..., Any]:
    """FSDP2's ``fully_shard`` (``torch.distributed.fsdp`` from torch 2.6, ``_composable.fsdp`` before)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise ConfigError(f"train.strategy: fsdp needs torch >= 2.4 (fully_shard); this is torch "
                              f"{torch.__version__}") from None
    return fully_shard


def _shard(model: GPT) -> None:
    """Shard ``model`` in place over all processes: one FSDP unit per block, the rest in the root unit."""
    fully_shard = _fully_shard()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def _is_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return isinstance(model, FSDPModule)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) in the checkpoint format (see the module docstring). Sharded, a
    collective: every process must call it; rank 0 gets the full tensors on the CPU, the others nothing."""
    if not _is_sharded(model):
        return _unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name
    if not by_name:
        return model_state, {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    optimizer_state = {
        "state": {index[name]: s for name, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}
    return model_state, optimizer_state


def _load_model(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load a full ``GPT.state_dict()``; a sharded model keeps its shard of each tensor."""
    if not _is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an unsharded ``AdamW.state_dict()``; a sharded model's optimizer keeps its shard."""
    if not _is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[i]: dict(s) for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
