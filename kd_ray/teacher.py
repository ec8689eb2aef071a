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

from kd_ray.core.columns import POS
from kd_ray.core.imports import make_importable

if TYPE_CHECKING:  # pragma: no cover
    import ray.data
    import torch

    from kd_ray.spec import JobSpec, TeacherSpec


def placed_teacher(spec: "JobSpec", task, device: "torch.device | None" = None,
                   before_placing=None, channels_last: bool = True) -> tuple["torch.device", "torch.nn.Module", str]:
    """The teacher where this process runs it: its device (`device`, a train worker's for a
    colocated teacher; else a GPU where the pool asks for one), the model built, loaded, frozen
    and placed, and its precision there (teacher.precision, with `auto` resolved for this device).
    `before_placing(model)` checks or shards the loaded model before it moves to the device; a
    conv net goes channels_last unless `channels_last` is False (FSDP2 shards contiguous
    parameters only). The same function serves the pool, the capture and the colocated teacher."""
    import torch

    from kd_ray.models import (  # torch: see the module's docstring
        is_conv_net,
        precision,
    )

    if device is None:
        use_cuda = torch.cuda.is_available() and spec.teacher.pool.gpus_per_actor > 0
        device = torch.device("cuda") if use_cuda else torch.device("cpu")
    model = task.load_teacher(device)
    model.eval()
    if before_placing is not None:
        before_placing(model)
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) <= 1:  # else placed across GPUs already
        model.to(device)
    if is_conv_net(model) and channels_last:
        model.to(memory_format=torch.channels_last)
    model.requires_grad_(False)
    if spec.teacher.compile:
        model = torch.compile(model)
    return device, model, precision.resolve(spec.teacher.precision, device)


def as_columns(tensors: dict) -> dict[str, np.ndarray]:
    """The teacher's signal (Task.teacher_tensors) as the numpy columns a pool sends in a batch
    (never bfloat16: a pool sends float16 top-k values and float32 or float16 logits)."""
    return {k: v.cpu().numpy() for k, v in tensors.items()}


class TeacherPredictor:
    """A callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(min, max))`."""

    REPORT_EVERY_S = 2.0

    def __init__(self, spec: "JobSpec", task, board=None, end: int | None = None):
        """`task`: the job's task (kd_ray.tasks), or a torch-free handle that builds it
        (Task.handle), which is what a pool's plan carries (see the module's docstring)."""
        make_importable(spec.job_dir)
        task = task() if callable(task) else task
        self.device, self.model, self.precision = placed_teacher(spec, task)
        self.task, self.batch_size = task, spec.teacher.pool.batch_size
        # Running totals for the run's telemetry (kd_ray.telemetry), sent to the board now and then.
        self.board, self.name, self.clock = board, uuid.uuid4().hex[:8], time.perf_counter
        self.rows, self.busy, self.reported = 0, 0.0, float("-inf")
        self.last_position = end - 1 if end else None  # the stream's last row: once sent, the pool is done

    def __call__(self, batch: dict, began: float | None = None, for_loss: bool = False) -> dict:
        """`began`: when the work on this batch began, if before the call (a reading pool's read);
        `for_loss`: rows only trained on (Task.teacher_tensors)."""
        start = self.clock() if began is None else began
        rows = len(next(iter(batch.values())))
        # A CPU pool is handed whole blocks (pool_options) and the model sees consecutive slices of
        # teacher.pool.batch_size: Ray Data's per-batch work (the numpy <-> Arrow conversions of
        # each batch, a thread hand-off, the output buffer) cost a CPU pool actor several times its
        # model's time with 100-row batches (docs/performance.md, "Small students"). An empty
        # block still gets one (empty) call, for columns of the right types.
        parts = [as_columns(self.task.teacher_tensors(self.model, {k: v[a:a + self.batch_size] for k, v in batch.items()},
                                                      self.device, self.precision, for_loss))
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
    """A CPU pool's actor that also reads its chunks (kd_ray.data.streams.build_train): chunk ids
    in, their rows from the run's cursor on + the teacher's signal out, a chunk at a time. The
    actor's busy time counts the reading too. Ray Data runs a generator's body on the actor's
    task thread, one call at a time (max_concurrency 1, its default for pool actors): the running
    totals need no lock."""

    def __init__(self, spec: "JobSpec", task, read, board=None, end: int | None = None):
        super().__init__(spec, task, board, end)
        self.read = read  # chunk ids -> their rows (kd_ray.data.chunks.read_chunks, its arguments given)

    def __call__(self, batch: dict):
        chunks = iter(self.read(batch))
        while True:
            began = self.clock()
            rows = next(chunks, None)
            if rows is None:
                return
            yield super().__call__(rows, began)


class TeacherPool:
    """The teacher as a stage of a Ray Data stream: a pool of TeacherPredictor actors, sized and
    placed by teacher.pool (kd_ray.data.streams.build_train takes one)."""

    def __init__(self, spec: "JobSpec", task):
        self.spec, self.task = spec, task

    @property
    def reads_chunks(self) -> bool:
        """A pool of CPU actors reads its chunks itself: with a teacher on the CPU there are no
        idle cores for read tasks to use that the actors' own would not, and each operator of a
        Ray Data stream costs its coordinator per block (a small student's online run on 2 cores:
        13.6k-15.6k samples/s against 11.4k-13.8k, docs/performance.md). A GPU pool keeps the
        read tasks, spread over the host's cores."""
        return not self.spec.teacher.pool.gpus_per_actor

    def after(self, ds: "ray.data.Dataset", board=None, end: int | None = None) -> "ray.data.Dataset":
        """`ds` with the teacher's signal added. `end`: where the stream ends, so the pool can
        tell the board when it has sent its last row."""
        return ds.map_batches(TeacherPredictor, fn_constructor_kwargs=dict(spec=self.spec, task=self.task.handle, board=board, end=end),
                              **pool_options(self.spec.teacher))

    def reading(self, chunks: int, read, board, end: int) -> "ray.data.Dataset":
        """Chunks `0..chunks-1` read by the pool's actors themselves (ReadingTeacher, one chunk per call)."""
        import ray.data

        return ray.data.range(chunks, override_num_blocks=chunks).map_batches(
            ReadingTeacher, fn_constructor_kwargs=dict(spec=self.spec, task=self.task.handle, read=read, board=board, end=end),
            **{**pool_options(self.spec.teacher), "batch_size": 1})
