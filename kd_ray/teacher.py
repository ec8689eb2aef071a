"""The frozen teacher, as a pool of Ray Data actors: batch in, batch + the teacher's signal out.

Each actor loads the teacher once, freezes it and runs it under `torch.inference_mode()` (no
autograd, version-counter or view tracking: the cheapest context for a model that never trains),
autocast to bf16/fp16 where the job asks, channels_last for conv nets, and optionally
torch.compile. What it sends is the task's (kd_ray.tasks): dense logits per sample for a
classifier, a top-k per token for a language model.

torch is imported where it is used, not at the top: Ray Data's coordinator actors (Ray Train's
DatasetManager and the stream's SplitCoordinator) unpickle the plan that names TeacherPredictor
and never call it; a top-level import cost each of them seconds of start-up and ~450 MB of memory.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import numpy as np

from kd_ray.data import POS

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kd_ray.spec import JobSpec, TeacherSpec


def load_teacher(spec: "JobSpec", device: "torch.device") -> "torch.nn.Module":
    """Build, load, freeze and place the teacher; the same function serves the pool and the capture."""
    import torch

    from kd_ray.models import is_conv_net
    from kd_ray.tasks import task_for

    model = task_for(spec).load_teacher(device)
    model.eval().requires_grad_(False)
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) <= 1:  # else placed across GPUs already
        model.to(device)
    if is_conv_net(model):
        model.to(memory_format=torch.channels_last)
    if spec.teacher.compile:
        model = torch.compile(model)
    return model


class TeacherPredictor:
    """A callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(min, max))`."""

    REPORT_EVERY_S = 2.0

    def __init__(self, spec: "JobSpec", board=None, end: int | None = None):
        import torch

        from kd_ray.registry import make_importable
        from kd_ray.tasks import task_for

        make_importable(spec.job_dir)
        use_cuda = torch.cuda.is_available() and spec.teacher.pool.gpus_per_actor > 0
        self.device = torch.device("cuda") if use_cuda else torch.device("cpu")
        self.model = load_teacher(spec, self.device)
        self.task, self.precision = task_for(spec), spec.teacher.precision
        # Running totals for the run's telemetry (kd_ray.telemetry), sent to the board now and then.
        self.board, self.name, self.clock = board, uuid.uuid4().hex[:8], time.perf_counter
        self.rows, self.busy, self.reported = 0, 0.0, float("-inf")
        self.last_position = end - 1 if end else None  # the stream's last row: once sent, the pool is done

    def __call__(self, batch: dict) -> dict:
        start = self.clock()
        # A new dict: the input batch (read-only zero-copy arrays) is left untouched.
        out = {**batch, **self.task.teacher_columns(self.model, batch, self.device, self.precision)}
        self.rows += len(next(iter(batch.values())))
        self.busy += self.clock() - start
        done = self.last_position is not None and POS in batch and int(np.max(batch[POS])) >= self.last_position
        if self.board is not None and (done or self.clock() - self.reported >= self.REPORT_EVERY_S):
            self.board.teacher_report.remote(self.name, self.rows, self.busy, done)
            self.reported = self.clock()
        return out


def pool_options(teacher: "TeacherSpec") -> dict:
    """Keyword arguments for map_batches that size and place the actor pool."""
    import ray.data

    pool = teacher.pool
    options = dict(
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        batch_size=pool.batch_size,
        num_cpus=pool.cpus_per_actor,
        batch_format="numpy",
    )
    if pool.gpus_per_actor:
        options["num_gpus"] = pool.gpus_per_actor
    if pool.resources:
        options["resources"] = dict(pool.resources)
    return options
