"""Wrapping the student for data parallelism (DDP or FSDP2), and switching gradient sync."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from kd_ray.models.precision import fsdp_policy


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap(model: nn.Module, strategy: str, precision: str, device: torch.device, units: list[nn.Module] | None = None,
         checkpointing: bool = False) -> nn.Module:
    """DDP replicates the student; FSDP2 shards each of `units` (the task's blocks: a
    transformer's decoder layers, a classifier's top-level children) and then the root. With
    `checkpointing`, each unit's activations are recomputed in the backward pass."""
    units = [c for c in model.children() if any(p.requires_grad for p in c.parameters())] if units is None else units
    if checkpointing:
        units = checkpoint_units(model, units)
    if strategy == "fsdp" and dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_policy(precision)
        for unit in units:
            fully_shard(unit, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def shard_frozen(model: nn.Module, units: list[nn.Module]) -> None:
    """FSDP2 over a frozen model (a colocated teacher, seed 000's strategy table), in place: each of
    `units` (the task's blocks) holds 1/world of its parameters and gathers them for its forward
    only (reshard_after_forward); no gradients, so no reduce-scatter and no optimizer state. The
    root is left unsharded (its own few parameters, a language model's embeddings and head, stay
    whole on every rank): a task may call the teacher's parts, not its root (a decoder, then a
    head sliced to the vocabulary), and FSDP2 gathers a root's parameters only in its forward."""
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit, reshard_after_forward=True)


def checkpoint_units(model: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """Put each unit behind torch's (non-reentrant) activation checkpoint wrapper, in place;
    returns the wrappers. Their state-dict keys gain a prefix that kd_ray.models.weights.clean_key drops."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    wanted = {id(u) for u in units}
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                w = checkpoint_wrapper(child)
                setattr(parent, name, w)
                wrapped.append(w)
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module, without DDP or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """On micro-steps before the accumulation boundary, keep gradients local: no all-reduce
    (DDP `no_sync`) or reduce-scatter (FSDP2 `set_requires_gradient_sync(False)`)."""
    inner = getattr(model, "_orig_mod", model)
    if enabled:
        if hasattr(inner, "set_requires_gradient_sync"):
            inner.set_requires_gradient_sync(True)
        yield
        return
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        with inner.no_sync():
            yield
    elif hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(False)
        yield
    else:
        with nullcontext():
            yield


def sync_buffers(model: nn.Module, strategy: str) -> None:
    """FSDP2 shards parameters but leaves buffers (BatchNorm running stats) per rank, each fed
    by its own data; average them before evaluating or saving so every rank agrees. DDP
    broadcasts rank 0's buffers every forward already."""
    if strategy != "fsdp" or not is_distributed():
        return
    world = dist.get_world_size()
    for buf in unwrap(model).buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
        else:
            dist.broadcast(buf, src=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
