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


def total_steps(num_rows: int, global_batch: int, epochs: int | None, max_steps: int | None) -> int:
    """Optimizer steps in the run: `epochs` passes over `num_rows` samples, cut into full global
    batches (a batch may span two passes: the stream holds them in order), capped by max_steps."""
    if global_batch > num_rows:
        raise UserError(
            "train.global_batch_size",
            f"{global_batch} is larger than the {num_rows} training samples; use at most {num_rows}",
        )
    budget = [v for v in ((epochs * num_rows) // global_batch if epochs else None, max_steps) if v]
    return min(budget)


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int
    train_rows: int
    total_steps: int

    @property
    def passes(self) -> int:
        """Passes over the data the stream must hold to feed total_steps (the last may be cut short)."""
        return -(-self.total_steps * self.global_batch // self.train_rows)

    @property
    def steps_per_epoch(self) -> float:
        return self.train_rows / self.global_batch

    def epochs_done(self, step: int) -> int:
        """Complete passes over the data after `step` optimizer steps."""
        return step * self.global_batch // self.train_rows

    @property
    def loss_denominator(self) -> int:
        """Samples per worker per optimizer step: dividing each micro-batch's summed loss by this,
        then averaging over workers (DDP/FSDP all-reduce), normalises by the global batch."""
        return self.micro_batch * self.accumulation


def check_world_sizes(global_batch: int, micro_batch: int, low: int, high: int) -> None:
    """Every world size an elastic group may take must split the global batch evenly: kd_ray
    keeps the global batch (and so the optimisation) fixed and refuses world sizes that cannot."""
    bad = [w for w in range(low, high + 1) if global_batch % (micro_batch * w)]
    if not bad:
        return
    if low == high:
        accumulation_steps(global_batch, micro_batch, low)  # the fixed-size message, with its options
    fits = [m for m in range(micro_batch, 0, -1) if all(global_batch % (m * w) == 0 for w in range(low, high + 1))]
    listed = ", ".join(map(str, bad[:8])) + (f", ... ({len(bad)} in all)" if len(bad) > 8 else "")
    raise UserError(
        "train.num_workers",
        f"world size(s) {listed} in [{low}, {high}] do not split global_batch_size {global_batch} into "
        f"micro-batches of {micro_batch}; use a range whose every size divides {global_batch // micro_batch}"
        + (f", or train.micro_batch_size: {fits[0]}" if fits else ""),
    )


def plan(num_rows: int, global_batch: int, micro_batch: int, world_size: int, epochs: int | None, max_steps: int | None) -> BatchPlan:
    """The batch plan: the stream holds every epoch back to back, so a global batch may span two
    epochs and no row is dropped at an epoch's end."""
    return BatchPlan(
        global_batch=global_batch,
        micro_batch=micro_batch,
        world_size=world_size,
        accumulation=accumulation_steps(global_batch, micro_batch, world_size),
        train_rows=num_rows,
        total_steps=total_steps(num_rows, global_batch, epochs, max_steps),
    )
