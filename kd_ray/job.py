"""The driver: JobSpec -> datasets + TorchTrainer -> followed progress -> summary.

The driver holds no model. It starts (or joins) Ray, builds the datasets, submits the trainer,
prints a line per report while it runs, and writes `summary.json` in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable

import ray

from kd_ray import batching, telemetry
from kd_ray.data import pipeline
from kd_ray.errors import Failed, UserError, reason
from kd_ray.spec import JobSpec, changed_fields, fingerprint
from kd_ray.train import checkpoint

SUMMARY = "summary.json"


# ---------------------------------------------------------------------------------------------
# Ray


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

    The embedded instance keeps workers' and actors' own logs in Ray's session directory
    (printed on failure) unless `verbose`: kd_ray's progress lines are what a user follows.
    `teacher_pool`: whether the teacher's pool runs (default: unless the job reads a cache).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    train_cpus = spec.train.max_workers * spec.train.cpus_per_worker
    if teacher_pool is None:
        teacher_pool = spec.runs_teacher_pool
    teacher_cpus = spec.teacher.pool.max_actors * spec.teacher.pool.cpus_per_actor if teacher_pool else 0
    ray.init(
        address="local",  # a new instance, never a `ray start` cluster left on this machine
        num_cpus=local_cpu_budget(os.cpu_count() or 1, train_cpus, teacher_cpus),
        # The dashboard serves the state API that Train V2's placement-group cleaner polls.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",  # an embedded instance talks to itself over loopback only
        configure_logging=True,
        logging_level="warning",
        log_to_driver=verbose,
    )


def quiet_data() -> None:
    import logging

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Workers push report dicts here; the driver polls them (Train V2 keeps only metrics that come
    with a checkpoint, so this is how a run is followed live)."""

    def __init__(self):
        self.events: list[dict] = []
        self.pool: dict[str, tuple[int, float]] = {}
        self.pool_logged: dict[str, tuple[int, float]] = {}
        self.pool_logged_at = time.time()
        self.position = 0
        self.stop = False

    def push(self, event: dict) -> None:
        now = time.time()
        if event["kind"] == "train" and self.pool:
            # What the teacher pool did over the same window as the student's log line.
            event = {**event, "teacher_pool": telemetry.pool_window(self.pool_logged, self.pool, now - self.pool_logged_at)}
            self.pool_logged, self.pool_logged_at = dict(self.pool), now
        self.events.append({**event, "time": now})

    # Teacher actors' running totals (kd_ray.teacher.TeacherPredictor), a few times a minute.
    def teacher_report(self, actor: str, rows: int, busy: float) -> None:
        if not self.pool:
            self.pool_logged_at = time.time()
        self.pool[actor] = (rows, busy)

    def since(self, index: int) -> list[dict]:
        return self.events[index:]

    # The data cursor: rank 0 sets it after restoring a checkpoint, before anyone reads the
    # stream; the Ray Data stream's read tasks start from it (see kd_ray.data.pipeline; workers
    # that read the stream themselves start from their checkpoint's position).
    def set_cursor(self, position: int) -> None:
        self.position = position

    def cursor(self) -> int:
        return self.position

    # A stop request (SIGTERM or Ctrl-C to the driver): the workers checkpoint and return.
    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


# ---------------------------------------------------------------------------------------------
# Run directory


RESUMING = "resuming from its latest checkpoint"


def prepare_run_dir(spec: JobSpec, fresh: bool) -> str | None:
    """Returns a note for the user. A finished run (or --fresh) is moved aside, never deleted."""
    run_dir = spec.run_dir
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return None
    names = os.listdir(run_dir)
    if SUMMARY not in names and "checkpoint_manager_snapshot.json" not in names and not any(n.startswith("checkpoint_") for n in names):
        raise UserError("run.name", f"{run_dir} exists and is not a kd_ray run; choose another run.name or run.storage_path")
    finished = _read_summary(run_dir).get("status") == "finished"
    has_checkpoint = any(n.startswith("checkpoint_") for n in names)
    if fresh or finished or not has_checkpoint:
        archived = f"{run_dir}.{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(run_dir, archived)
        return f"previous run moved to {archived}"
    return RESUMING


def _read_summary(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# Progress lines


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _ms(e: dict) -> str:
    steps = e.get("window_steps") or 0
    return f"{1000 * (e['window_seconds'] - e['data_wait_seconds']) / steps:.0f} ms" if steps else "-"


def _pool(p: dict) -> str:
    return f"{p['actors']} actor(s) {p['rows_per_second']:.0f} rows/s busy {100 * p['busy_fraction']:.0f}%"


def format_event(e: dict) -> str | None:
    kind = e["kind"]
    if kind == "start":
        resumed = f", from step {e['resumed_step']} (data position {e['position']})" if e.get("resumed_step") is not None else ""
        return (f"start: world size {e['world_size']}, accumulation {e['accumulation']}, "
                f"{e['steps_per_epoch']:.1f} steps/epoch, {e['total_steps']} steps{resumed}")
    if kind == "warning":
        return f"warning: {e['message']}"
    if kind == "error":
        return f"warning: worker {e['rank']} failed: {e['message']}"
    if kind == "stopped":
        return f"stopped at step {e['step']} after a checkpoint"
    if kind == "train":
        return (f"epoch {e['epoch']:.2f} step {e['step']}/{e['total_steps']}  loss {_fmt(e['loss'])}  "
                f"kd {_fmt(e['kd_loss'])}  ce {_fmt(e['ce_loss'])}  lr {e['lr']:.2e}  grad {e['grad_norm']:.3f}  "
                f"{e['samples_per_second']:.0f} samples/s  step {_ms(e)}  data wait {e['data_wait_seconds']:.2f}s"
                + (f"  teacher {_pool(e['teacher_pool'])}" if e.get("teacher_pool") else ""))
    if kind == "eval":
        return f"eval  after epoch {e['epoch']} (step {e['step']}): student acc {e['eval_accuracy']:.4f} loss {e['eval_loss']:.4f}"
    return None


class FailureLines:
    """Which "error" events to show: each failed rank reports its reason, and each reason is shown
    once per attempt. An attempt begins at its "start" (rank 0's, once the group is up) or, for
    one that failed before that, when a rank that already failed fails again."""

    def __init__(self):
        self.shown: set[str] = set()
        self.ranks: set[int] = set()

    def show(self, e: dict) -> bool:
        if e["kind"] == "start" or (e["kind"] == "error" and e["rank"] in self.ranks):
            self.shown.clear()
            self.ranks.clear()
        if e["kind"] != "error":
            return True
        self.ranks.add(e["rank"])
        new = e["message"] not in self.shown
        self.shown.add(e["message"])
        return new


def follow(board, fit: Callable[[], Any], echo: Callable[[str], None]) -> tuple[Any, list[dict]]:
    """Run fit() in a thread and echo the board's events until it returns."""
    result: dict = {}

    def target():
        try:
            result["value"] = fit()
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    events: list[dict] = []
    failures = FailureLines()
    while True:
        alive = thread.is_alive()
        for e in ray.get(board.since.remote(len(events))):
            events.append(e)
            if not failures.show(e):
                continue
            line = format_event(e)
            if line:
                echo(line)
        if not alive:
            break
        thread.join(timeout=0.5)
    if "error" in result:
        raise result["error"]
    return result.get("value"), events


# ---------------------------------------------------------------------------------------------
# The run


def run(spec: JobSpec, fresh: bool = False, echo: Callable[[str], None] = print, verbose: bool = False) -> dict:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kd_ray.train.loop import train_loop_per_worker

    note = prepare_run_dir(spec, fresh)
    ensure_ray(spec, verbose)
    quiet_data()
    check_cluster(spec, echo)
    data = pipeline.Sources(spec)
    teacher_cache = _open_cache(spec, data, echo) if spec.teacher and spec.teacher.cached else None
    if not data.train_rows:  # no batch size can help
        if spec.data.eval_source:
            raise UserError("data.source", f"{spec.data.source} holds no training samples; point it at the training data")
        raise UserError("data.eval_split", f"{spec.data.eval_split} leaves no training samples; lower it, or give more data")
    low, high = spec.train.worker_range
    G, m = spec.train.global_batch_size, spec.train.micro_batch_size
    # Steps depend on the data and the global batch only, never on the world size.
    plan = batching.plan(data.train_rows, G, m, high, spec.train.epochs, spec.train.max_steps)
    fp = fingerprint(spec, data.train_rows)
    resumed = _resume_point(spec, fp, echo) if note == RESUMING else None
    echo(f"kd-ray: run {spec.run.name} -> {spec.run_dir}" + (f" ({note})" if note and note != RESUMING else ""))
    if resumed:
        echo(f"resuming run {spec.run.name} from step {resumed['step']} (checkpoint {os.path.basename(resumed['path'])})")
    workers = f"{low} workers" if low == high else f"{low} to {high} workers (elastic)"
    sizes = " or ".join(f"{m} x {G // (m * w)} accumulation x {w}" for w in range(low, high + 1))
    echo(f"data: {data.train_rows} train / {data.eval_rows} eval samples; {workers}; global batch {G} = {sizes}; {plan.total_steps} steps")

    summary: dict[str, Any] = {"status": "failed", "run": spec.run.name, "run_dir": spec.run_dir}

    def failed(e: Exception) -> Failed:
        summary["error"] = reason(e)
        _write_summary(spec.run_dir, summary)
        if _session_logs():
            echo(f"workers' and actors' logs: {_session_logs()}")
        return Failed("run", summary["error"])

    try:  # the eval split's stream (or its cached outputs) may fail as the training stream may
        teacher_scores = score_teacher(spec, data, echo, teacher_cache) if spec.teacher else None
    except UserError:
        raise
    except Exception as e:
        raise failed(e) from e
    board = ProgressBoard.remote()
    cached = teacher_cache.train if teacher_cache else None
    local = None if os.environ.get("KD_RAY_TEST_RAY_DATA_STREAM") else (  # tests cover both paths
        pipeline.local_stream(spec, data, plan.total_steps * G, cached))
    datasets = {"eval": pipeline.build_eval(spec, data)}
    if local is None:
        # One global batch past the last step: the split's end-of-stream balancing only ever
        # touches rows no step uses.
        datasets["train"] = pipeline.build_train(spec, data, end=(plan.total_steps + 1) * G, micro_batch=m, board=board, cache=cached)
    resources = dict(spec.train.resources_per_worker)
    resources["CPU"] = spec.train.cpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(), "board": board, "train_rows": data.train_rows, "fingerprint": fp,
                           "run_dir": spec.run_dir, "local_stream": local,
                           "test": {k: v for k, v in os.environ.items() if k.startswith("KD_RAY_TEST_")}},
        scaling_config=ScalingConfig(num_workers=spec.train.num_workers, use_gpu=spec.train.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=spec.train.resize_check_seconds),
        run_config=RunConfig(name=spec.run.name, storage_path=spec.run.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=spec.run.max_failures)),
        datasets=datasets,
        # The train stream holds the run in order; keep that order through the split.
        dataset_config=DataConfig(execution_options={"train": _ordered(), "eval": DataConfig.default_ingest_options()}),
    )
    started = time.time()
    try:
        with stop_on_signals(board, spec, echo):
            result, events = follow(board, trainer.fit, echo)
    except Exception as e:
        raise failed(e) from e
    summary.update(_summarize(spec, result, events, time.time() - started, plan, teacher_scores))
    _write_summary(spec.run_dir, summary)
    if summary["status"] == "stopped":
        raise RunStopped(f"stopped at step {summary['steps']} after a checkpoint; run the same command to resume")
    return summary


def _resume_point(spec: JobSpec, fp: dict, echo: Callable[[str], None]) -> dict | None:
    """The checkpoint a resumed run continues from; refuses a job file changed incompatibly."""
    chosen, skipped = checkpoint.pick(spec.run_dir)
    for path, why in skipped:
        echo(f"warning: checkpoint {os.path.basename(path)} cannot be used ({why}); "
             + (f"resuming from {os.path.basename(chosen)} instead" if chosen else "no earlier checkpoint is whole"))
    if chosen is None:
        return None
    state = checkpoint.read_resume(chosen)
    changes = changed_fields(state.get("fingerprint", {}), fp)
    if changes:
        raise UserError("job file", f"run {spec.run.name} was started with different values of {'; '.join(changes)}; "
                        f"put them back to resume it, or start afresh with --fresh (the old run is kept)")
    return {**state, "path": chosen}


@contextlib.contextmanager
def stop_on_signals(board, spec: JobSpec, echo: Callable[[str], None]):
    """SIGTERM or Ctrl-C: ask the workers to checkpoint and return (a second one aborts now)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked = []

    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        board.request_stop.remote()
        echo(f"stopping: the workers checkpoint within {spec.checkpoint.poll_every_steps} steps and return "
             "(send it again to abort without a checkpoint)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _session_logs() -> str | None:
    try:  # no public API names the session directory
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:
        return None


def _ordered():
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _open_cache(spec: JobSpec, data: "pipeline.Sources", echo: Callable[[str], None]):
    from kd_ray import cache

    opened = cache.open_for_training(spec, data)
    out = opened.manifest["outputs"]
    kind = f"top-{out['k']} {out['dtype']}" if out["format"] == "topk" else f"full {out['dtype']} logits"
    echo(f"teacher: cached outputs ({kind}) from {spec.teacher.cache.path}: {len(opened.manifest['shards'])} shards checked")
    return opened


def score_teacher(spec: JobSpec, data: "pipeline.Sources", echo: Callable[[str], None], teacher_cache=None) -> dict:
    """The teacher's accuracy on the eval split, once, before training: its pool runs and is
    gone before the student's workers and the training pool take their resources. From a
    cache, no pool: its outputs for the eval rows (a top-k gives the accuracy, not the loss)."""
    import math

    import torch

    from kd_ray.data import X
    from kd_ray.teacher import as_tensor
    from kd_ray.train.step import teacher_eval_sums

    sums = torch.zeros(3, dtype=torch.float64)
    if teacher_cache is None:
        scored = pipeline.with_teacher(pipeline.build_eval(spec, data), spec)
    else:
        scored = pipeline.build_eval(spec, data, cache=teacher_cache.eval)
    for batch in scored.iter_batches(batch_size=1024, batch_format="numpy"):
        sums += teacher_eval_sums([{k: as_tensor(v) for k, v in batch.items() if k != X}], torch.device("cpu"))
    loss, correct, count = sums.tolist()
    scores = {"accuracy": correct / max(count, 1), "loss": None if math.isnan(loss) else loss / max(count, 1)}
    echo(f"teacher on the eval split: acc {scores['accuracy']:.4f} loss {_fmt(scores['loss'])}")
    return scores


class RunStopped(Exception):
    exit_code = 130


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


def _summarize(spec: JobSpec, result, events: list[dict], wall: float, plan: batching.BatchPlan, teacher: dict | None) -> dict:
    starts = [e for e in events if e["kind"] == "start"]
    done = [e for e in events if e["kind"] == "done"]
    stopped = [e for e in events if e["kind"] == "stopped"]
    evals = [e for e in events if e["kind"] == "eval"]
    trains = [e for e in events if e["kind"] == "train"]
    last = evals[-1] if evals else {}
    end = done[-1] if done else (stopped[-1] if stopped else None)
    train_seconds = end["time"] - starts[0]["time"] if end else wall
    steps = end["step"] if end else 0
    samples = steps * plan.global_batch
    first_position = starts[0]["position"]  # where this driver's run began (a resume: its checkpoint)
    return {
        "status": "finished" if done else ("stopped" if stopped else "failed"),
        "steps": steps,
        "samples": samples,
        "epochs": round(samples / plan.train_rows, 3),
        "train_seconds": round(train_seconds, 3),
        "wall_seconds": round(wall, 3),
        # this driver's own samples: a resumed run's earlier ones were trained by an earlier one
        "samples_per_second": round((samples - first_position) / train_seconds, 2) if end and train_seconds > 0 else None,
        "resumed_from_step": starts[0]["resumed_step"],
        # worker-group (re)starts after a failure, a resize or a preemption, and their sizes
        "restarts": len(starts) - 1,
        "world_sizes": [e["world_size"] for e in starts],
        "world_size": starts[-1]["world_size"],
        "accumulation": starts[-1]["accumulation"],
        "student": {"accuracy": last.get("eval_accuracy"), "loss": last.get("eval_loss")},
        "teacher": {"accuracy": teacher["accuracy"], "loss": teacher["loss"]} if teacher else None,
        "student_weights": _export(result, spec.run_dir) if done else None,
        "telemetry": telemetry.run_telemetry(trains),
    }


def _export(result, run_dir: str) -> str | None:
    """Copy the final checkpoint's student (weights + JSON) to the top of the run directory."""
    if result is None or result.checkpoint is None:
        return None
    os.makedirs(run_dir, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for name in (checkpoint.STUDENT_WEIGHTS, checkpoint.STUDENT_INFO):
            shutil.copyfile(os.path.join(d, name), os.path.join(run_dir, name))
    return os.path.join(run_dir, checkpoint.STUDENT_WEIGHTS)


def _write_summary(run_dir: str, summary: dict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, SUMMARY + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, SUMMARY))


def _pool_summary(p: dict | None) -> str:
    if not p:
        return "-"
    return f"{p['actors_max']} actor(s) at most, {p['rows_per_second']:.0f} rows/s, busy {100 * p['busy_fraction']:.0f}%"


def print_summary(summary: dict, echo: Callable[[str], None] = print) -> None:
    t = summary.get("telemetry") or {}
    rows = [
        ("status", summary["status"]),
        ("steps", summary["steps"]),
        ("samples", summary["samples"]),
        ("epochs", f"{summary['epochs']:.2f}"),
        ("train seconds", f"{summary['train_seconds']:.1f}"),
        ("samples/s", summary["samples_per_second"]),
        ("restarts", f"{summary['restarts']} (world sizes {', '.join(map(str, summary['world_sizes']))})"),
        ("student accuracy", _fmt(summary["student"]["accuracy"])),
        ("student loss", _fmt(summary["student"]["loss"])),
        ("teacher accuracy", _fmt(summary["teacher"]["accuracy"]) if summary["teacher"] else "(no teacher)"),
        ("student step", f"{1000 * t['student_step_seconds']:.1f} ms" if t.get("student_step_seconds") else "-"),
        ("data wait", f"{100 * t.get('data_wait_fraction', 0):.0f}% of train time"),
        ("teacher pool", _pool_summary(t.get("teacher_pool"))),
        ("bottleneck", f"{t.get('bottleneck', '-')}: {t.get('advice', '')}"),
        ("student weights", summary["student_weights"]),
    ]
    width = max(len(k) for k, _ in rows)
    echo("-" * (width + 40))
    for k, v in rows:
        echo(f"{k:<{width}}  {v}")
    echo("-" * (width + 40))
    echo(f"run directory: {summary['run_dir']}")

