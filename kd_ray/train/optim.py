"""Optimizer and LR schedule for the student."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_ratio` at `total_steps`. A pure function of the
    optimizer step, so a resumed or resized run continues the same curve."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, opt: dict, device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels do the whole update in one launch per group on CUDA; on CPU foreach is the fast path.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if opt["name"] == "adamw":
        return torch.optim.AdamW(params, lr=opt["lr"], weight_decay=opt["weight_decay"], betas=tuple(opt["betas"]), **fast)
    return torch.optim.SGD(params, lr=opt["lr"], weight_decay=opt["weight_decay"], momentum=opt["momentum"], **fast)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: dict, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule["warmup_steps"], total_steps, schedule["min_lr_ratio"])
    )
