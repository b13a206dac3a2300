"""Training on several processes (torchrun) and the checkpoint format that does not depend on how many.

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

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from cptlab.config import ConfigError
from cptlab.training.model import GPT


def setup() -> tuple[int, int]:
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", getattr(model, "module", model))


def checkpoint_blocks(model: GPT) -> None:
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


def shard(model: GPT) -> None:
    """Shard ``model`` in place over all processes: one FSDP unit per block, the rest in the root unit."""
    fully_shard = _fully_shard()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
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


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) in the checkpoint format (see the module docstring). Sharded, a
    collective: every process must call it; rank 0 gets the full tensors on the CPU, the others nothing."""
    if not is_sharded(model):
        return unwrap(model).state_dict(), optimizer.state_dict()
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


def load_model(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load a full ``GPT.state_dict()``; a sharded model keeps its shard of each tensor."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an unsharded ``AdamW.state_dict()``; a sharded model's optimizer keeps its shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[i]: dict(s) for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
