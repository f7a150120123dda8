"""Processes, devices and model wrapping: single process, torchrun DDP (NCCL on GPUs, gloo on
CPUs) or FSDP2 (``torch.distributed.fsdp.fully_shard``), plus full-state (de)serialisation that
works the same for all three.

torchrun starts the processes and its rendezvous joins them, on one node or many::

    torchrun --nproc_per_node=8 -m usfmae_fast.cli pretrain ...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 --rdzv_id=RUN -m usfmae_fast.cli pretrain ...

This module reads the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` it sets.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this process group was initialised by us (and is ours to end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"system.device = {requested!r} but no CUDA device is available")
    if requested in ("auto", "cuda"):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(requested)


def setup(device: str = "auto") -> DistContext:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistContext(device=dev)
    started = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        started = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, started)


def teardown(ctx: DistContext) -> None:
    if ctx.started_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over ranks, in place (SUM then divide: gloo has no AVG)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= ctx.world_size
    return tensor


def broadcast_object(obj, ctx: DistContext):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every encoder and decoder block in the backward pass instead of keeping its
    activations; parameter names (and so checkpoints) stay as they are."""
    from torch.utils.checkpoint import checkpoint

    for block in [*model.blocks, *model.decoder_blocks]:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block),
                                          use_reentrant=False)


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str) -> nn.Module:
    """The module the training step calls: ``model`` itself, DDP around it, or ``model``
    sharded in place by FSDP2 (each block, then the root)."""
    if not ctx.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in [*model.blocks, *model.decoder_blocks]:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def no_grad_sync(train_model: nn.Module, skip: bool):
    """Context for one micro-step: no gradient all-reduce while accumulating (``skip``)."""
    if hasattr(train_model, "no_sync"):  # DDP
        return train_model.no_sync() if skip else contextlib.nullcontext()
    if hasattr(train_model, "set_requires_gradient_sync"):  # FSDP2
        train_model.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(model state, optimizer state)`` complete and on the CPU, the optimizer's keyed by
    parameter name, through ``torch.distributed.checkpoint``: the same format whether the model
    is plain, under DDP or sharded by FSDP2, so a checkpoint of one resumes in another. A
    sharded model is gathered (every rank must call this; rank 0 gets the state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """The inverse of :func:`full_state`; every rank loads the complete state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
