"""Batch-size arithmetic: the one home of how a global batch becomes micro-batches and steps.

global batch = micro batch per worker x accumulation steps x world size, exactly. Everything
else (the train loop, the LR schedule, the summary) calls these functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kd_ray.core.errors import UserError

# Rows per block of the Ray Data training stream, at most: about a chunk of the source, the size
# of the blocks the stream's read tasks (and a teacher pool's batches) already carry.
BLOCK_ROWS = 1024


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


def micro_batches_per_block(global_batch: int, micro_batch: int, low: int, high: int, rows: int = BLOCK_ROWS) -> int:
    """Micro-batches per block of the Ray Data training stream, whose split deals blocks out
    round-robin (each block costs Ray Data about the same, whatever it holds; the worker cuts it).
    Rank r's micro-batch j is then in block (j // k) x W + r, and an optimizer step (A micro-batches
    per rank) trains exactly its global batch's positions when k divides A at every world size W
    the group may take, or when the group is one worker, which gets every block."""
    most = max(1, rows // micro_batch)
    if high == 1:
        return most
    common = math.gcd(*(global_batch // (micro_batch * w) for w in range(low, high + 1)))
    return max(d for d in range(1, min(common, most) + 1) if common % d == 0)


def block_positions(start: int, rank: int, world: int, micro_batch: int, per_block: int, first: int, count: int) -> np.ndarray:
    """The stream positions of this rank's micro-batches first .. first + count - 1, in order,
    for a stream from `start` dealt round-robin in blocks of `per_block` micro-batches: its
    micro-batch j is number j % k of block (j // k) x world + rank."""
    j = np.arange(first, first + count, dtype=np.int64)
    firsts = start + ((j // per_block * world + rank) * per_block + j % per_block) * micro_batch
    return (firsts[:, None] + np.arange(micro_batch, dtype=np.int64)).reshape(-1)


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
