"""The task-independent halves of the student's step, as seed 000 describes it.

global_denominator: what a step's summed loss is divided by when its loss units are counted.
optimizer_step: unscale (fp16) -> clip -> step (skipped by GradScaler on inf/nan) -> zero_grad.
The micro-step itself (forward, loss, scaled backward) is the task's (kd_ray.tasks); the Trainer
runs it without gradient sync before the accumulation boundary. Nothing here calls `.item()`.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_ray.train.parallel import all_reduce_sum


def global_denominator(counts: list[torch.Tensor], world: int) -> torch.Tensor:
    """The loss denominator of one optimizer step whose loss units (tokens) are counted, not
    planned: this rank's micro-batches' counts, summed over every rank (one all-reduce), over the
    world size. Each micro-batch's summed loss divided by it, then DDP's (or FSDP2's) average over
    ranks, gives the gradient of the mean over every loss token of the global batch, however the
    tokens fall across micro-batches and ranks."""
    total = all_reduce_sum(torch.stack(counts).sum().double().reshape(1))
    return total.clamp(min=1) / world


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> torch.Tensor:
    """One update on the accumulation boundary; returns the (pre-clip) gradient norm as a tensor."""
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach()
