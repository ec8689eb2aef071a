"""The frozen teacher, as a pool of Ray Data actors: batch in, batch + teacher logits out.

Each actor loads the teacher once, freezes it and runs it under `torch.inference_mode()` (no
autograd, version-counter or view tracking: the cheapest context for a model that never trains),
autocast to bf16/fp16 on CUDA, channels_last for conv nets, and optionally torch.compile.

torch is imported where it is used, not at the top: Ray Data's coordinator actors (Ray Train's
DatasetManager and the stream's SplitCoordinator) unpickle the plan that names TeacherPredictor
and never call it; a top-level import cost each of them seconds of start-up and ~450 MB of memory.
"""

from __future__ import annotations

import time
import uuid
import warnings
from typing import TYPE_CHECKING

import numpy as np

from kd_ray.data import TEACHER, X

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kd_ray.spec import TeacherSpec

LOGITS_DTYPES = {"float32": np.float32, "float16": np.float16}


def load_teacher(spec: "TeacherSpec", job_dir: str, device: torch.device) -> torch.nn.Module:
    """Build, load, freeze and place the teacher; the same function serves the pool and eval."""
    import torch

    from kd_ray.models import is_conv_net
    from kd_ray.registry import build_model
    from kd_ray.weights import load_into

    model = build_model(spec.model, spec.kwargs, job_dir)
    load_into(model, spec.weights)
    model.eval().requires_grad_(False)
    model.to(device)
    if is_conv_net(model):
        model.to(memory_format=torch.channels_last)
    if spec.compile:
        model = torch.compile(model)
    return model


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor view of a (possibly read-only) numpy array. We never write to it."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.asarray(array))


class TeacherPredictor:
    """A callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(min, max))`."""

    REPORT_EVERY_S = 2.0

    def __init__(self, teacher: "TeacherSpec", job_dir: str, board=None):
        import torch

        from kd_ray.models import is_conv_net
        from kd_ray.registry import make_importable

        make_importable(job_dir)
        use_cuda = torch.cuda.is_available() and teacher.pool.gpus_per_actor > 0
        self.device = torch.device("cuda") if use_cuda else torch.device("cpu")
        self.model = load_teacher(teacher, job_dir, self.device)
        self.channels_last = is_conv_net(self.model)
        self.precision = teacher.precision
        self.out_dtype = LOGITS_DTYPES[teacher.logits_dtype]
        # Running totals for the run's telemetry (kd_ray.telemetry), sent to the board now and then.
        self.board, self.name, self.clock = board, uuid.uuid4().hex[:8], time.perf_counter
        self.rows, self.busy, self.reported = 0, 0.0, float("-inf")

    def __call__(self, batch: dict) -> dict:
        import torch

        from kd_ray.train.precision import autocast

        start = self.clock()
        x = as_tensor(batch[X]).to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.precision, self.device):
            logits = self.model(x)
        # A new dict: the input batch (read-only zero-copy arrays) is left untouched.
        out = {**batch, TEACHER: logits.float().cpu().numpy().astype(self.out_dtype, copy=False)}
        self.rows += len(x)
        self.busy += self.clock() - start
        if self.board is not None and self.clock() - self.reported >= self.REPORT_EVERY_S:
            self.board.teacher_report.remote(self.name, self.rows, self.busy)
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
