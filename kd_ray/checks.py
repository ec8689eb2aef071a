"""Checks of a job that need its files. `load_job` and `validate` are the way in: a job file (or a
dict) -> a JobSpec that has passed every check that can run before Ray starts, or a UserError
naming the field and the fix.

kd_ray.spec is the schema alone (types, ranges, overrides, paths). Here: what every job needs (its
storage, its worker counts, its precisions, its logging and callbacks); then the task checks its
own data, models, weights and cache block (kd_ray.tasks: Task.check).
"""

from __future__ import annotations

import os

from kd_ray.batch_plan import check_world_sizes
from kd_ray.callbacks import Callbacks
from kd_ray.core import storage
from kd_ray.core.errors import UserError
from kd_ray.run.tracking import check_logging
from kd_ray.spec import (
    JobSpec,
    parse,
    paths,
    read_job_file,
)
from kd_ray.tasks.build import task_for


def load_job(path: str, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read, override, validate and resolve a job file. Raises UserError on any mistake."""
    return validate(read_job_file(path, overrides), job_dir=os.path.dirname(os.path.abspath(path)))


def validate(raw: dict, job_dir: str = "") -> JobSpec:
    """A job as a dict (a parsed job file) -> a checked JobSpec."""
    spec = parse(raw, job_dir)
    _check(spec)
    return spec


def _check(spec: JobSpec) -> None:
    check_storage(spec)
    check_world_sizes(spec.train.global_batch_size, spec.train.micro_batch_size, *spec.train.worker_range)
    if spec.train.precision == "fp16" and not spec.train.use_gpu:
        raise UserError("train.precision", "fp16 needs CUDA (GradScaler is CUDA-only); set train.use_gpu: true, or use bf16 or fp32 on CPU")
    if spec.teacher is not None:
        check_teacher_placement(spec)
    check_logging(spec)
    check_distill(spec)
    Callbacks(spec)  # built once here, as every worker will: a wrong name, kwargs or constructor is found now
    task_for(spec).check()


def check_teacher_placement(spec: JobSpec) -> None:
    """Where the teacher runs (teacher.placement) and what that placement can do. Whether a
    colocated teacher fits its device is known only there (kd_ray.train.colocated.check_fits)."""
    t = spec.teacher
    if t.colocated and t.cached:
        raise UserError("teacher.placement", "colocated runs the teacher in each train worker, and teacher.mode: cached runs no "
                        "teacher at all (its outputs are read from teacher.cache); leave teacher.placement out (pool) with a cache, "
                        "or set teacher.mode: online")
    if t.colocated and t.pool.gpus_per_actor > 1:
        raise UserError("teacher.placement", "colocated, the teacher runs on each train worker's one device, and "
                        f"teacher.pool.gpus_per_actor: {t.pool.gpus_per_actor:g} asks for a teacher across several GPUs; shard it "
                        "with train.strategy: fsdp instead, or use teacher.placement: pool")
    if t.precision == "fp16" and not spec.teacher_gpus:
        fix = "set train.use_gpu: true (a colocated teacher runs on the train workers' devices)" if t.colocated else \
              "set teacher.pool.gpus_per_actor > 0"
        raise UserError("teacher.precision", f"fp16 needs CUDA; {fix}, or use bf16 or fp32 on CPU")


def check_distill(spec: JobSpec) -> None:
    """A field of the distill section the job's loss never reads: set, it says the user expects
    something that will not happen (the task refuses its own: kd_ray.tasks)."""
    d = spec.distill
    if "beta" in d.model_fields_set and d.divergence != "jsd":
        raise UserError("distill.beta", f"only applies to loss: jsd (this job's loss is {d.loss}); remove it, or set distill.loss: jsd")


def check_storage(spec: JobSpec) -> None:
    """run.storage_path: a local directory (or one to be made) that this user can write in, and
    no file where the run's directory goes; or a bucket that answers and takes a file. Checked
    before anything is created: a run that cannot write its summary fails while reporting its
    failure. Under `ray job submit`, no path may lie in Ray's copy of the working directory."""
    check_job_working_dir(spec)
    root = spec.run.storage_path
    if storage.is_remote(root):
        storage.check_reachable(root, "run.storage_path", write=True)
        return
    storage.need_writable_dir(root, "run.storage_path")
    if os.path.exists(spec.run_dir) and not os.path.isdir(spec.run_dir):
        raise UserError("run.name", f"{spec.run_dir} is a file, not a run directory; choose another run.name or move the file")


def check_job_working_dir(spec: JobSpec) -> None:
    """A submitted job runs in Ray's copy of --working-dir: what it writes there is deleted with
    the cluster's session (and a resubmitted job gets a new copy), and git-ignored files (runs/,
    weights) were never uploaded to it."""
    if spec.run.allow_job_working_dir:
        return
    for field, path in paths(spec):
        if storage.in_job_working_dir(path):
            raise UserError(field, f"{path} is inside the copy of --working-dir that Ray made for this job, which is deleted "
                            "with the cluster's session (and git-ignored files are not uploaded to it); give an absolute path "
                            "every node shares, or an s3:// or gs:// URI (or set run.allow_job_working_dir: true)")


