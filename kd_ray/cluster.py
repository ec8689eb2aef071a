"""The Ray session: join a cluster or start an embedded one, check that it has what a job asks
for, and keep Ray Data quiet. The driver (kd_ray.job), the capture (kd_ray.cache) and
`kd-ray eval` (kd_ray.evaluate) all start here.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import ray

from kd_ray.core.errors import UserError, clip
from kd_ray.core.network import unanswered
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
        join_cluster(os.environ["RAY_ADDRESS"], runtime_env=_worker_env(), **quiet)
    else:
        train_cpus = spec.train.max_workers * spec.train.cpus_per_worker
        if teacher_pool is None:
            teacher_pool = spec.runs_teacher_pool
        teacher_cpus = spec.teacher.pool.max_actors * spec.teacher.pool.cpus_per_actor if teacher_pool else 0
        if spec.onpolicy is not None:  # the rollout actors (kd_ray.rollouts)
            teacher_cpus += spec.onpolicy.pool.actors * spec.onpolicy.pool.cpus_per_actor
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


# How long the driver waits for a cluster's address to answer: an address that does not (a typo,
# a cluster torn down, a firewall that drops packets) made ray.init retry for a quarter of an hour.
CONNECT_SECONDS = 15
# Ray's default ports: the GCS of `ray start --head`, and the Ray Client server (ray://).
GCS_PORT, CLIENT_PORT = 6379, 10001
_FIX = "start the cluster (ray start --head) or fix RAY_ADDRESS, or unset RAY_ADDRESS to run on an embedded Ray"


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that RAY_ADDRESS names, or None for the names Ray resolves itself ("auto",
    "local"); a UserError for one that is not an address."""
    if address in ("auto", "local"):
        return None
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "ray"):
        raise UserError("RAY_ADDRESS", f"{clip(address, 200)}: a driver joins a cluster at HOST:PORT (its GCS, port {GCS_PORT}) or "
                        f"ray://HOST:PORT (Ray Client, port {CLIENT_PORT}); {scheme}:// is for `ray job submit --address`")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon:
        host, port = rest.rstrip("/"), str(CLIENT_PORT if scheme == "ray" else GCS_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError("RAY_ADDRESS", f"{clip(address, 200)} is not HOST:PORT (e.g. 127.0.0.1:{GCS_PORT}); {_FIX}")
    return host.strip("[]"), int(port)


def join_cluster(address: str, **init) -> None:
    """ray.init at RAY_ADDRESS, once something answers there within CONNECT_SECONDS: an address
    that does not is one line naming RAY_ADDRESS, not a quarter of an hour of Ray's retries."""
    endpoint = cluster_endpoint(address)
    why = unanswered(*endpoint, CONNECT_SECONDS) if endpoint is not None else None
    if why:
        raise UserError("RAY_ADDRESS", f"nothing answers at {clip(address, 200)} ({why}); {_FIX}")
    try:
        ray.init(**init)
    except ConnectionError as e:  # "auto" with no cluster on this machine, or a port that is not a GCS
        raise UserError("RAY_ADDRESS", f"cannot join the Ray cluster at {clip(address, 200)}: {clip(str(e), 300)}; {_FIX}") from None


def _worker_env() -> dict | None:
    """A driver started from a shell against a running cluster hands its storage credentials
    (kd_ray.core.storage.CREDENTIAL_ENV) to the job's workers, which reach the same bucket: nodes
    started earlier have their own environment. A submitted job's driver already runs in the
    cluster's environment (and in a runtime env of its own, which it keeps)."""
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return None
    env = credentials_env()
    return {"env_vars": env} if env else None


def quiet_data(verbose: bool = False) -> None:
    """No progress bars or start lines from Ray Data; and, unless `verbose`, none of its error
    lines either: a failed task is reported by kd_ray (the user's mistake as its one line, any
    other failure's reason), and its stack trace stays in the actor's log."""
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR if verbose else logging.CRITICAL)


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
