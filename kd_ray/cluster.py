"""The Ray session: join a cluster or start an embedded one, check that it has what a job asks
for, and keep Ray Data quiet. The driver (kd_ray.job), the capture (kd_ray.cache) and
`kd-ray eval` (kd_ray.evaluate) all start here.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import ray

from kd_ray.core.errors import UserError
from kd_ray.core.storage import credentials_env
from kd_ray.run.ray_output import hold_back
from kd_ray.spec import JobSpec


def local_cpu_budget(physical: int, train_cpus: float, teacher_cpus: float) -> int:
    """Logical CPUs for an embedded Ray instance.

    Train workers and teacher actors each hold their CPUs for the whole run, and Ray Data needs
    CPUs of its own for read/transform tasks. With `num_cpus` = physical cores (2 on a laptop
    or CI box) the actor pool and the trainer wait on each other forever. Logical CPUs only gate
    scheduling; the work still shares the physical cores, which is what we want here.
    """
    data_tasks = 2
    return int(max(physical, train_cpus + teacher_cpus + data_tasks + 1))


def ensure_ray(spec: JobSpec, verbose: bool = False, teacher_pool: bool | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start an embedded one.

    Unless `verbose`, workers' and actors' logs stay in Ray's session directory (printed on
    failure), and so does what Ray itself prints in this process (kd_ray.run.ray_output): kd_ray's
    lines are what a user follows, and kd_ray reports a failed worker itself.
    `teacher_pool`: whether the teacher's pool runs (default: unless the job reads a cache).
    """
    if ray.is_initialized():
        return
    quiet = dict(configure_logging=True, logging_level="warning", log_to_driver=verbose)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=_worker_env(), **quiet)
    else:
        train_cpus = spec.train.max_workers * spec.train.cpus_per_worker
        if teacher_pool is None:
            teacher_pool = spec.runs_teacher_pool
        teacher_cpus = spec.teacher.pool.max_actors * spec.teacher.pool.cpus_per_actor if teacher_pool else 0
        # Ray starts its workers at nice 15, under its daemons: right for background work on a
        # shared cluster, but here the train workers and teacher actors are the job, and at 15
        # they lose their cores to any other process on the machine (on a busy 2-core host a
        # small student trained at a fraction of the speed of a plain script, which runs at 0).
        # Set before Ray starts: its raylet reads it. A value the user set is kept.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(
            address="local",  # a new instance, never a `ray start` cluster left on this machine
            num_cpus=local_cpu_budget(os.cpu_count() or 1, train_cpus, teacher_cpus),
            # The dashboard serves the state API that Train V2's placement-group cleaner polls.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",  # an embedded instance talks to itself over loopback only
            **quiet,
        )
    if not verbose:
        hold_back(session_logs() or tempfile.gettempdir())


def _worker_env() -> dict | None:
    """A driver started from a shell against a running cluster hands its storage credentials
    (kd_ray.core.storage.CREDENTIAL_ENV) to the job's workers, which reach the same bucket: nodes
    started earlier have their own environment. A submitted job's driver already runs in the
    cluster's environment (and in a runtime env of its own, which it keeps)."""
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return None
    env = credentials_env()
    return {"env_vars": env} if env else None


def quiet_data() -> None:
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def missing_resources(spec: JobSpec, have: dict, train: bool = True, teacher_pool: bool | None = None) -> list[tuple[str, str, float]]:
    """(job-file field, resource, amount) of what the job's processes ask for and the cluster
    resources `have` lack. `train`: the trainers run (not for `kd-ray cache`); `teacher_pool`:
    the teacher's pool runs (default: unless the job reads a cache)."""
    if teacher_pool is None:
        teacher_pool = spec.runs_teacher_pool
    wants = []
    if train:
        wants.append(("train.use_gpu", "GPU", 1 if spec.train.use_gpu else 0))
        wants += [("train.resources_per_worker", k, v) for k, v in spec.train.resources_per_worker.items()]
    if teacher_pool and spec.teacher is not None:
        wants.append(("teacher.pool.gpus_per_actor", "GPU", spec.teacher.pool.gpus_per_actor))
        wants += [("teacher.pool.resources", k, v) for k, v in spec.teacher.pool.resources.items()]
    return [(field, name, amount) for field, name, amount in wants if amount and have.get(name, 0) < amount]


def check_cluster(spec: JobSpec, echo: Callable[[str], None], train: bool = True, teacher_pool: bool | None = None) -> None:
    """Resources the job asks for that the cluster does not have. An autoscaling cluster (joined
    through RAY_ADDRESS) may add them on demand, so there it is a warning; an embedded instance
    never will, so there it is an error rather than a run that waits forever."""
    have = ray.cluster_resources()
    for field, name, _ in missing_resources(spec, have, train, teacher_pool):
        message = f"the Ray cluster has no '{name}' resource now (it has: {', '.join(sorted(have))})"
        if os.environ.get("RAY_ADDRESS"):
            echo(f"warning: {field}: {message}; waiting for the autoscaler to add it")
        else:
            raise UserError(field, f"{message}; remove it from the job or run on a cluster that has it")


def session_logs() -> str | None:
    """Where this Ray session keeps its workers' and actors' logs."""
    try:  # no public API names the session directory
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:
        return None
