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
        self.task, self.precision, self.batch_size = task_for(spec), spec.teacher.precision, spec.teacher.pool.batch_size
        # Running totals for the run's telemetry (kd_ray.telemetry), sent to the board now and then.
        self.board, self.name, self.clock = board, uuid.uuid4().hex[:8], time.perf_counter
        self.rows, self.busy, self.reported = 0, 0.0, float("-inf")
        self.last_position = end - 1 if end else None  # the stream's last row: once sent, the pool is done

    def __call__(self, batch: dict, began: float | None = None) -> dict:
        """`began`: when the work on this batch began, if before the call (a reading pool's read)."""
        start = self.clock() if began is None else began
        rows = len(next(iter(batch.values())))
        # A CPU pool is handed whole blocks (pool_options) and the model sees consecutive slices of
        # teacher.pool.batch_size: Ray Data's per-batch work (the numpy <-> Arrow conversions of
        # each batch, a thread hand-off, the output buffer) cost a CPU pool actor several times its
        # model's time with 100-row batches (benchmarks/README.md, "Small students"). An empty
        # block still gets one (empty) call, for columns of the right types.
        parts = [self.task.teacher_columns(self.model, {k: v[a:a + self.batch_size] for k, v in batch.items()},
                                           self.device, self.precision)
                 for a in range(0, max(rows, 1), self.batch_size)]
        columns = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        # A new dict: the input batch (read-only zero-copy arrays) is left untouched.
        out = {**batch, **columns}
        self.rows += rows
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
        # CPU pools take whole blocks and cut them into the model's batches themselves
        # (TeacherPredictor); Ray Data requires a batch size of pools that ask for GPUs.
        batch_size=pool.batch_size if pool.gpus_per_actor else None,
        num_cpus=pool.cpus_per_actor,
        batch_format="numpy",
    )
    if pool.gpus_per_actor:
        options["num_gpus"] = pool.gpus_per_actor
    if pool.resources:
        options["resources"] = dict(pool.resources)
    return options


class ReadingTeacher(TeacherPredictor):
    """A CPU pool's actor that also reads its chunks (kd_ray.data.pipeline.build_train): chunk ids
    in, their rows from the run's cursor on + the teacher's signal out, a chunk at a time. The
    actor's busy time counts the reading too. Ray Data runs a generator's body on the actor's
    task thread, one call at a time (max_concurrency 1, its default for pool actors): the running
    totals need no lock."""

    def __init__(self, spec: "JobSpec", read, board=None, end: int | None = None):
        super().__init__(spec, board, end)
        self.read = read  # chunk ids -> their rows (kd_ray.data.pipeline.read_chunks, its arguments given)

    def __call__(self, batch: dict):
        chunks = iter(self.read(batch))
        while True:
            began = self.clock()
            rows = next(chunks, None)
            if rows is None:
                return
            yield super().__call__(rows, began)
