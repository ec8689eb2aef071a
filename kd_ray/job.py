"""The recipe of a run: JobSpec -> datasets + TorchTrainer -> followed progress -> summary.

The driver holds no model. It prepares the run directory (kd_ray.run.directory), starts or joins
Ray (kd_ray.cluster), builds the datasets (kd_ray.data.streams), submits the trainer
(kd_ray.train.loop), echoes a line per report while it runs (kd_ray.run.console), and writes
`summary.json`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from kd_ray import batch_plan
from kd_ray.cache.reader import open_for_training
from kd_ray.cluster import check_cluster, ensure_ray, quiet_data, session_logs
from kd_ray.core import storage
from kd_ray.core.columns import X
from kd_ray.core.errors import (
    Failed,
    UserError,
    as_users,
    raise_users,
    reason,
    user_error_in,
)
from kd_ray.data.chunks import Sources
from kd_ray.data.local import local_stream
from kd_ray.data.streams import build_eval, build_train
from kd_ray.models.precision import auto_note
from kd_ray.rollouts.actor import start_actors
from kd_ray.rollouts.samples import SAMPLES_FILE, write_samples
from kd_ray.run.console import ProgressBoard, follow, say
from kd_ray.run.control import RunControl, stop_on_signals
from kd_ray.run.directory import (
    MOVE_ASIDE,
    RESUMING,
    Aside,
    resume_point,
    run_dir_action,
    summarize,
    write_summary,
)
from kd_ray.run.report import draw_finished_run
from kd_ray.run.tracking import Trackers
from kd_ray.spec import JobSpec, fingerprint
from kd_ray.tasks.build import task_for
from kd_ray.teacher import TeacherPool
from kd_ray.teacher_signal import as_tensor
from kd_ray.train.loop import FIRST_STEP, train_loop_per_worker

Echo = Callable[[str], None]


class RunStopped(Exception):
    exit_code = 130


def run(spec: JobSpec, fresh: bool = False, echo: Echo = say, verbose: bool = False) -> dict:
    action = run_dir_action(spec, fresh)
    ensure_ray(spec, verbose)
    quiet_data(verbose)
    check_cluster(spec, echo)
    task = task_for(spec)  # built once, passed down to the sources, the teacher pool and the Trainer
    data = as_users(lambda: Sources(spec, task))  # a language model's documents are tokenized in Ray Data tasks
    teacher_cache = _open_cache(spec, task, data, echo) if spec.teacher and spec.teacher.cached else None
    _refuse_empty_splits(spec, data)
    # Steps depend on the data and the global batch only, never on the world size.
    plan = batch_plan.plan(data.train_rows, spec.train.global_batch_size, spec.train.micro_batch_size, spec.train.max_workers,
                         spec.train.epochs, spec.train.max_steps)
    fp = fingerprint(spec, data.train_rows)
    resumed = resume_point(spec, fp, echo) if action == RESUMING else None
    _announce(spec, data, plan, action, resumed, echo)
    try:  # the eval split's stream (or its cached outputs) may fail as the training stream may
        # A colocated teacher is scored by the train workers themselves (kd_ray.train.loop.Trainer.score_teacher).
        teacher_scores = score_teacher(spec, task, data, echo, teacher_cache) if spec.teacher and not spec.colocated_teacher else None
    except Exception as e:  # nothing of the run is written yet, and nothing moved
        raise_users(e)
        raise Failed("run", reason(e)) from e
    # Every check the driver can make has passed: a previous run is moved aside now, and for good
    # once the new run's workers have taken their first step (a failure before puts it back).
    aside = Aside(spec.run_dir) if action == MOVE_ASIDE else None
    try:
        summary = _train(spec, task, data, plan, fp, resumed, teacher_cache, teacher_scores, aside, echo)
    finally:
        if aside is not None:
            aside.settle()
    if summary["status"] == "stopped" and aside is not None and not aside.kept:
        raise RunStopped(f"stopped before the first step; the previous run is back in {storage.shown(spec.run_dir)}")
    if summary["status"] == "stopped":
        raise RunStopped(f"stopped at step {summary['steps']} after a checkpoint; run the same command to resume")
    return summary


def _train(spec: JobSpec, task, data: Sources, plan: batch_plan.BatchPlan, fp: dict, resumed: dict | None, teacher_cache,
           teacher_scores: dict | None, aside: Aside | None, echo: Echo) -> dict:
    """The TorchTrainer run, followed to its end; its summary written."""
    summary: dict[str, Any] = {"status": "failed", "run": spec.run.name, "run_dir": spec.run_dir}
    board, control = ProgressBoard.remote(spec.run_dir), RunControl.remote()
    trackers = Trackers(spec, echo)
    if teacher_scores:
        board.push.remote({"kind": "teacher", "step": resumed["step"] if resumed else 0, **teacher_scores})
    trainer = _trainer(spec, task, data, plan, fp, board, control, teacher_cache.train if teacher_cache else None)

    def seen(event: dict) -> None:
        trackers.record(event)
        if aside is not None and event["kind"] == FIRST_STEP and not aside.kept:
            echo(f"kd-ray: {aside.keep()}")

    started = time.time()
    try:
        with stop_on_signals(control, spec, echo):
            result, events = follow(board, trainer.fit, echo, seen)
    except Exception as e:
        trackers.close(summary)
        raise _failed(spec, summary, e, echo) from e
    summary.update(summarize(spec, task, result, events, time.time() - started, plan, teacher_scores))
    write_summary(spec.run_dir, summary)
    if summary["status"] == "finished" and spec.onpolicy and spec.onpolicy.samples:
        try:
            echo(f"samples of the student beside the teacher: {storage.shown(write_samples(spec, task, build_eval(spec, data)))}")
        except Exception as e:  # the run is finished and exported; its samples only illustrate it
            echo(f"warning: {SAMPLES_FILE} not written: {reason(e)}")
    if summary["status"] == "finished" and spec.logging.report:
        echo(draw_finished_run(spec.run_dir))
    trackers.close(summary)
    return summary


def prepare_data(spec: JobSpec, verbose: bool = False, echo: Echo = print) -> None:
    """`kd-ray prepare`: the task's stored rows (a language model's token shards), prepared where
    missing, every file of a finished preparation read through (a damaged one prepared again)."""
    task = task_for(spec)
    if not task.prepares:
        raise UserError("task", f"a {spec.task} job reads its data as it is, with nothing to prepare; run it with kd-ray run")
    ensure_ray(spec, verbose)
    quiet_data()
    echo(task.prepare(echo))


def _refuse_empty_splits(spec: JobSpec, data: Sources) -> None:
    """Both splits need rows: the student trains on one and every run is scored on the other
    (an empty eval split would report a perplexity of 1 and a teacher with no score)."""
    if not data.train_rows:  # no batch size can help otherwise
        if spec.data.eval_source:
            raise UserError("data.source", f"{spec.data.source} holds no training samples; point it at the training data")
        raise UserError("data.eval_split", f"{spec.data.eval_split} leaves no training samples; lower it, or give more data")
    if not data.eval_rows:
        if spec.data.eval_source:
            raise UserError("data.eval_source", f"{spec.data.eval_source} holds no samples to evaluate on; point it at held-out data")
        raise UserError("data.eval_split", f"{spec.data.eval_split} leaves no eval samples (it draws by a hash of each sample's or "
                        "document's id); raise it, or give data.eval_source")


def _announce(spec: JobSpec, data: Sources, plan: batch_plan.BatchPlan, action: str | None, resumed: dict | None,
              echo: Echo) -> None:
    aside = " (a previous run is there: it is moved aside once this one has taken its first step)" if action == MOVE_ASIDE else ""
    echo(f"kd-ray: run {spec.run.name} -> {storage.shown(spec.run_dir)}{aside}")
    if resumed:
        echo(f"resuming run {spec.run.name} from step {resumed['step']} (checkpoint {storage.basename(resumed['path'])})")
    low, high = spec.train.worker_range
    G, m = plan.global_batch, plan.micro_batch
    workers = f"{low} workers" if low == high else f"{low} to {high} workers (elastic)"
    sizes = " or ".join(f"{m} x {G // (m * w)} accumulation x {w}" for w in range(low, high + 1))
    echo(f"data: {data.train_rows} train / {data.eval_rows} eval samples; {workers}; global batch {G} = {sizes}; {plan.total_steps} steps")
    if spec.teacher is not None and not spec.teacher.cached and (note := auto_note(spec.teacher.precision, spec.teacher_gpus)):
        echo(note)


def _failed(spec: JobSpec, summary: dict, e: Exception, echo: Echo) -> Failed | UserError:
    """The run's one-line failure, recorded in its summary: a data mistake found where the data is
    read (kd_ray.data.sources.check_samples) is the user's to fix, and says so (exit 2)."""
    found = user_error_in(e)
    summary["error"] = f"{found.field}: {found.message}" if found else reason(e)
    write_summary(spec.run_dir, summary)
    if found:
        return found
    if session_logs():
        echo(f"workers' and actors' logs: {session_logs()}")
    return Failed("run", summary["error"])


def _trainer(spec: JobSpec, task, data: Sources, plan: batch_plan.BatchPlan, fp: dict, board, control, cached):
    """The TorchTrainer of the run: its workers, storage and failure policy, and its datasets."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    G = plan.global_batch
    local = local_stream(spec, data, plan.total_steps * G, cached)
    datasets = {}
    if local is None:  # else the workers read both splits themselves (kd_ray.data.local)
        datasets["eval"] = build_eval(spec, data)
        # One global batch past the last step: the split's end-of-stream balancing only ever
        # touches rows no step uses.
        per_block = batch_plan.micro_batches_per_block(G, plan.micro_batch, *spec.train.worker_range)
        lone = spec.train.max_workers == 1  # nothing to deal round-robin: the worker cuts its micro-batches itself
        pool = TeacherPool(spec, task) if spec.teacher_in_stream else None
        datasets["train"] = build_train(spec, data, end=(plan.total_steps + 1) * G, block_rows=None if lone else plan.micro_batch * per_block,
                                        control=control, board=board, cache=cached, pool=pool)
    ordered = DataConfig.default_ingest_options()
    ordered.preserve_order = True  # the train stream holds the run in order; keep that order through the split
    resources = {**spec.train.resources_per_worker, "CPU": spec.train.cpus_per_worker}
    fs, root = storage.filesystem(spec.run.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "task": task, "board": board, "control": control, "train_rows": data.train_rows,
                           "fingerprint": fp, "local_stream": local, "eval_rows": data.eval_rows,
                           "rollouts": start_actors(spec, task, control, board) if spec.onpolicy else None},
        scaling_config=ScalingConfig(num_workers=spec.train.num_workers, use_gpu=spec.train.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=spec.train.resize_check_seconds),
        # A URI's filesystem is opened here (its query, the endpoint, is no part of Ray's paths).
        run_config=RunConfig(name=spec.run.name, storage_path=root, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=spec.run.max_failures)),
        datasets=datasets,
        dataset_config=DataConfig(execution_options={"train": ordered, "eval": DataConfig.default_ingest_options()}),
    )


def _open_cache(spec: JobSpec, task, data: Sources, echo: Echo):
    opened = open_for_training(spec, task, data)
    echo(f"teacher: cached outputs ({opened.train.codec.describe_outputs()}) from {spec.teacher.cache.path}: {len(opened.manifest['shards'])} shards checked")
    return opened


def score_teacher(spec: JobSpec, task, data: Sources, echo: Echo, teacher_cache=None) -> dict:
    """The teacher's scores on the eval split, once, before training: its pool runs and is
    gone before the student's workers and the training pool take their resources. From a
    cache, no pool: its outputs for the eval rows (a top-k gives the accuracy, not the loss)."""
    if teacher_cache is None:
        scored = TeacherPool(spec, task).after(build_eval(spec, data))
    else:
        scored = build_eval(spec, data, cache=teacher_cache.eval)
    sums = None
    for batch in scored.iter_batches(batch_size=1024, batch_format="numpy"):
        part = task.teacher_eval_sums([{k: as_tensor(v) for k, v in batch.items() if k != X}], torch.device("cpu"))
        sums = part if sums is None else sums + part
    scores = task.teacher_figures(sums.tolist())
    echo(f"teacher on the eval split: {task.teacher_line(scores)}")
    return scores
