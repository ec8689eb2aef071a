"""Batch-size arithmetic: the one home of how a global batch becomes micro-batches and steps.

global batch = micro batch per worker x accumulation steps x world size, exactly. Everything
else (the train loop, the LR schedule, the summary) calls these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_ray.errors import UserError


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-steps per optimizer step; refuses a global batch that does not split evenly."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        lower = (global_batch // per_step) * per_step
        options = " or ".join(str(v) for v in (lower, lower + per_step) if v > 0)
        raise UserError(
            "train.global_batch_size",
            f"{global_batch} is not divisible by micro_batch_size x num_workers = {micro_batch} x {world_size} = {per_step}; "
            f"use {options}, or change train.micro_batch_size",
        )
    return global_batch // per_step


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Optimizer steps in one pass over `num_rows` training samples.

    Each worker receives floor(rows / world) rows (Ray's equal split), cut into full micro-batches,
    grouped into full accumulation windows; the nested floors collapse to floor(rows / global).
    Samples of an incomplete last global batch are not trained on in that epoch (the order changes
    every epoch, so a different remainder is left out each time).
    """
    return num_rows // global_batch


def total_steps(num_rows: int, global_batch: int, epochs: int | None, max_steps: int | None) -> int:
    per_epoch = steps_per_epoch(num_rows, global_batch)
    if per_epoch == 0:
        raise UserError(
            "train.global_batch_size",
            f"{global_batch} is larger than the {num_rows} training samples; use at most {num_rows}",
        )
    budget = [v for v in (epochs * per_epoch if epochs else None, max_steps) if v]
    return min(budget)


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int

    @property
    def epochs(self) -> int:
        """Passes over the data needed to reach total_steps (the last one may be partial)."""
        return -(-self.total_steps // self.steps_per_epoch)

    @property
    def loss_denominator(self) -> int:
        """Samples per worker per optimizer step: dividing each micro-batch's summed loss by this,
        then averaging over workers (DDP/FSDP all-reduce), normalises by the global batch."""
        return self.micro_batch * self.accumulation


def plan(num_rows: int, global_batch: int, micro_batch: int, world_size: int, epochs: int | None, max_steps: int | None) -> BatchPlan:
    return BatchPlan(
        global_batch=global_batch,
        micro_batch=micro_batch,
        world_size=world_size,
        accumulation=accumulation_steps(global_batch, micro_batch, world_size),
        steps_per_epoch=steps_per_epoch(num_rows, global_batch),
        total_steps=total_steps(num_rows, global_batch, epochs, max_steps),
    )
