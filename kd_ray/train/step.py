"""The student's training step, as seed 000 describes it, and evaluation.

micro_step: forward under autocast -> fp32 loss scaled for accumulation -> (scaled) backward,
            without gradient sync before the accumulation boundary.
optimizer_step: unscale (fp16) -> clip -> step (skipped by GradScaler on inf/nan) -> zero_grad.
Nothing here calls `.item()`: values stay on the device until the loop logs them.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_ray.data import X, Y
from kd_ray.losses import LossTerms, TopK, distill_loss
from kd_ray.signals import teacher_output
from kd_ray.train.parallel import all_reduce_sum, grad_sync
from kd_ray.train.precision import autocast


def micro_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float,
    alpha: float,
    denominator: float,
    precision: str,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    sync: bool,
) -> LossTerms:
    with grad_sync(model, sync):
        with autocast(precision, device):
            logits = model(batch[X])
        teacher = teacher_output(batch, temperature)
        terms = distill_loss(logits, teacher, batch[Y], temperature=temperature, alpha=alpha, denominator=denominator)
        (scaler.scale(terms.loss) if scaler else terms.loss).backward()
    return terms


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


def score_sums(batches, logits_of, device: torch.device) -> torch.Tensor:
    """[cross-entropy sum, correct, count] over some batches; sums, so ranks can add them.

    `logits_of(batch)` gives the logits to score: the student's forward, or the teacher's
    outputs already in each batch. A top-k scores its top-1 exactly, but its cross-entropy sum is
    NaN: it needs the probability of labels outside the top k, which a top-k does not hold.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        logits = logits_of(batch)
        count = torch.tensor(len(batch[Y]), device=device, dtype=torch.float64)
        if isinstance(logits, TopK):
            correct = (logits.indices[:, 0].long() == batch[Y]).sum().double()
            sums += torch.stack([torch.tensor(float("nan"), dtype=torch.float64, device=device), correct, count])
            continue
        terms = distill_loss(logits, None, batch[Y], temperature=1.0, alpha=0.0, denominator=1.0)
        sums += torch.stack([terms.ce_sum.double(), terms.correct.double(), count])
    return sums


@torch.no_grad()
def student_eval_sums(model: nn.Module, batches, precision: str, device: torch.device) -> torch.Tensor:
    model.eval()
    try:
        with autocast(precision, device):
            return score_sums(batches, lambda b: model(b[X]), device)
    finally:
        model.train()


def teacher_eval_sums(batches, device: torch.device) -> torch.Tensor:
    return score_sums(batches, lambda b: teacher_output(b, temperature=1.0), device)  # a top-k: only its top-1 is scored
