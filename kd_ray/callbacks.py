"""Hooks into a run, for users and tests alike: custom logging, early stop, fault injection.

Name them in the job file; each entry is an import path (the job file's directory is importable)
to a class or factory that returns a Callback, built once in every train worker (and in every
actor of a `kd-ray cache` capture):

    callbacks:
      - callable: my_hooks:PrintIds
        kwargs: {every: 100}

Every method is optional (subclass Callback). They run in the worker, on its training thread, and
what they raise fails the worker like any other exception (Ray Train restarts the group, up to
run.max_failures); a kd_ray UserError raised there ends the run as the user's one line. `kd-ray
validate` builds each one once on the driver too, so a wrong name, kwargs or constructor is found
before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kd_ray.core.errors import UserError, clip, shown
from kd_ray.core.imports import ModelNameError, check_kwargs, import_callable

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec


@dataclass(frozen=True)
class StartInfo:
    """Where a worker's attempt starts: called on every rank, at the same point (a collective
    such as ray.train.collective.broadcast_from_rank_zero is safe in on_start)."""

    rank: int
    world_size: int
    accumulation: int
    step: int  # the optimizer step it resumes from (0 on a fresh start)
    total_steps: int
    run_dir: str


class Callback:
    def on_start(self, info: StartInfo) -> None:
        """Once per attempt of a train worker, after its checkpoint is restored."""

    def on_batch(self, batch: dict) -> None:
        """Each micro-batch (tensors by column, kd_ray.data) after its backward pass."""

    def on_step_end(self, step: int) -> None:
        """After optimizer step `step` (counted from 1), before any log line or checkpoint of it."""

    def on_shard_written(self, shard: dict) -> None:
        """`kd-ray cache`: a shard is whole on the store (its part, unit, file, rows, sha256, bytes)."""


HOOKS = ("on_start", "on_batch", "on_step_end", "on_shard_written")


def build_callback(spec: JobSpec, index: int) -> Callback:
    """The job's callback number `index`, built; each mistake a UserError naming its field."""
    entry, field = spec.callbacks[index], f"callbacks.{index}"
    try:
        factory = import_callable(entry.callable, spec.job_dir)
    except ModelNameError as e:
        raise UserError(f"{field}.callable", str(e)) from None
    try:
        check_kwargs(entry.callable, factory, entry.kwargs)
    except ModelNameError as e:
        raise UserError(f"{field}.kwargs", str(e)) from None
    try:
        callback = factory(**entry.kwargs)
    except UserError:
        raise
    except (Exception, SystemExit) as e:  # a user's constructor can fail in any way; report it on one line
        raise UserError(f"{field}.kwargs", f"{entry.callable}({shown(entry.kwargs)}) failed: {type(e).__name__}: {e}; "
                        "fix the kwargs or the constructor") from None
    missing = [hook for hook in HOOKS if not callable(getattr(callback, hook, None))]
    if missing:
        raise UserError(f"{field}.callable", f"{entry.callable} returned {clip(type(callback).__name__, 60)}, which has no "
                        f"{', '.join(missing)}; name a subclass of kd_ray.callbacks.Callback (or a factory returning one)")
    return callback


class Callbacks:
    """The job's callbacks, called in the order the job file lists them."""

    def __init__(self, spec: "JobSpec"):
        self.items = [build_callback(spec, i) for i in range(len(spec.callbacks))]

    def __bool__(self) -> bool:
        return bool(self.items)

    def on_start(self, info: StartInfo) -> None:
        for c in self.items:
            c.on_start(info)

    def on_batch(self, batch: dict) -> None:
        for c in self.items:
            c.on_batch(batch)

    def on_step_end(self, step: int) -> None:
        for c in self.items:
            c.on_step_end(step)

    def on_shard_written(self, shard: dict) -> None:
        for c in self.items:
            c.on_shard_written(shard)
