"""The teacher's signal as the Trainer gets it: already in its micro-batches (a pool, a cache, no
teacher), or added by the teacher inside the train worker itself (teacher.placement: colocated,
seed 000's strategy table: the teacher beside the student).

A colocated teacher computes exactly the columns the pool would have sent, with the task's own
function (Task.teacher_tensors, which the pool calls too), on the worker's micro-batches as they
reach the step (after augmentation: the teacher sees what the student sees), and keeps them as
tensors on the worker's device (no numpy round trip). The losses never know which it was.

With train.strategy: fsdp over several workers the teacher is sharded as the student is, block by
block (kd_ray.train.parallel.shard_frozen), so a teacher one device cannot hold still fits: every
rank runs it on each of its micro-batches, which the plan makes equal in number on every rank,
so the gathers of its blocks meet.

On CUDA the teacher's forward for the next micro-batch is queued on a stream of its own before
the step on this one, so the GPU runs it beside the student's forward and backward; it holds one
micro-batch's teacher outputs more.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from kd_ray.core.errors import UserError
from kd_ray.spec import JobSpec
from kd_ray.teacher import placed_teacher
from kd_ray.train.meter import Meter
from kd_ray.train.parallel import is_distributed, shard_frozen

# The share of a GPU's free memory a colocated teacher's weights may take: the rest is the
# student's (weights, gradients, optimizer state, activations) and the teacher's activations.
TEACHER_SHARE = 0.5


class SignalInBatches:
    """The teacher's signal already travels in the batches (a pool, a cache), or there is none."""

    def signal(self, batches: Iterator[dict], meter: Meter | None = None) -> Iterator[dict]:
        return iter(batches)

    def scores(self, batches, task, device: torch.device) -> None:
        """The teacher's eval sums: none here, the driver scored the teacher before training (kd_ray.job)."""


class ColocatedTeacher:
    """The frozen teacher in a train worker: micro-batches in, the same with the teacher's signal out."""

    def __init__(self, spec: JobSpec, task, device: torch.device):
        sharded = spec.train.strategy == "fsdp" and is_distributed()
        world = torch.distributed.get_world_size() if sharded else 1
        self.task, self.device, self.sharded = task, device, sharded
        _, self.model, self.precision = placed_teacher(spec, task, device, before_placing=lambda m: self._prepare(m, world),
                                                        channels_last=not sharded)

    def _prepare(self, model: torch.nn.Module, shards: int) -> None:
        """Refuse a teacher the device cannot hold, before its weights are moved there; shard it."""
        if self.device.type == "cuda":
            check_fits(sum(p.numel() * p.element_size() for p in model.parameters()), shards,
                       torch.cuda.mem_get_info(self.device)[0])
        if self.sharded:
            shard_frozen(model, self.task.fsdp_units(model))

    def __call__(self, batch: dict, for_loss: bool = False) -> dict:
        """`for_loss`: rows only trained on (Task.teacher_tensors)."""
        return {**batch, **self.task.teacher_tensors(self.model, batch, self.device, self.precision, for_loss)}

    def signal(self, batches: Iterator[dict], meter: Meter | None = None) -> Iterator[dict]:
        """`batches` with the teacher's signal; the seconds its forwards take are added to
        `meter.teacher` (on CUDA, the time to queue them: a lower bound), for the run's telemetry."""
        meter = meter or Meter(self.device)
        if self.device.type == "cuda":
            return self._overlapped(batches, meter)
        return self._in_turn(batches, meter)

    def _in_turn(self, batches: Iterator[dict], meter: Meter) -> Iterator[dict]:
        for batch in batches:
            began = time.perf_counter()
            out = self(batch, for_loss=True)
            meter.teacher += time.perf_counter() - began
            yield out

    def _overlapped(self, batches: Iterator[dict], meter: Meter) -> Iterator[dict]:
        """Micro-batch i + 1's teacher forward queued on the side stream before micro-batch i is
        handed on; the main stream waits for it only when the step takes that micro-batch."""
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        ahead = None
        for batch in batches:
            began = time.perf_counter()
            side.wait_stream(main)  # the batch's copy to the device, queued on the main stream, comes first
            with torch.cuda.stream(side):
                out = self(batch, for_loss=True)
            meter.teacher += time.perf_counter() - began
            done = side.record_event()
            for v in batch.values():  # the allocator keeps its inputs until the side stream is done with them
                v.record_stream(side)
            if ahead is not None:
                yield _settled(*ahead, main)
            ahead = (out, done)
        if ahead is not None:
            yield _settled(*ahead, main)

    def scores(self, batches, task, device: torch.device) -> torch.Tensor:
        """The teacher's eval sums over this rank's eval batches (Task.teacher_eval_sums, as the driver's are)."""
        return task.teacher_eval_sums((self(b) for b in batches), device)


def _settled(batch: dict, done: torch.cuda.Event, main: torch.cuda.Stream) -> dict:
    main.wait_event(done)
    for v in batch.values():  # made on the side stream, used on the main one
        v.record_stream(main)
    return batch


def check_fits(weight_bytes: int, shards: int, free_bytes: int) -> None:
    """A colocated teacher whose weights (a 1/shards share of them, sharded) would take more than
    TEACHER_SHARE of the device's free memory is one line naming teacher.placement, not an
    out-of-memory error in a worker."""
    need = weight_bytes / shards
    if need > TEACHER_SHARE * free_bytes:
        gib = 2.0 ** 30
        raise UserError("teacher.placement", f"colocated, the teacher's weights take {need / gib:.2f} GiB on each train worker's "
                        f"device ({shards} shard{'s' if shards > 1 else ''}), more than half of its {free_bytes / gib:.2f} GiB free; "
                        "use teacher.placement: pool (its own devices), or train.strategy: fsdp over more workers to shard it")


def teacher_in_trainer(spec: JobSpec, task, device: torch.device) -> ColocatedTeacher | SignalInBatches:
    """Where the Trainer's teacher signal comes from (the setting is read here and nowhere else in the loop)."""
    return ColocatedTeacher(spec, task, device) if spec.colocated_teacher else SignalInBatches()
