"""The run directory (run.storage_path/run.name): created or resumed, a finished run moved aside,
`summary.json` written from the run's events, and the final student exported to its top.

    summary.json                          status, counters, scores, telemetry (kd_ray.telemetry)
    metrics.jsonl                         the run's time series (kd_ray.run.metrics)
    tensorboard/, mlflow.json, report.png what the run's trackers and its picture keep (kd_ray.run.tracking, .report)
    student.safetensors, student.json     the exported student (kd_ray.train.checkpoint's files)
    checkpoint_*/                         Ray Train's checkpoints (kd_ray.train.checkpoint's layout)
    profile/                              an optional profiled window (kd_ray.train.profile)
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

from kd_ray import batch_plan, telemetry
from kd_ray.core import storage
from kd_ray.core.errors import UserError
from kd_ray.run.metrics import METRICS
from kd_ray.spec import JobSpec, changed_fields
from kd_ray.train import checkpoint

SUMMARY = "summary.json"
STUDENT_FIGURES = ("eval_accuracy", "eval_loss", "eval_perplexity", "eval_reverse_kl", "eval_sampled_kl", "eval_teacher_nll")
RESUMING = "resuming from its latest checkpoint"
MOVE_ASIDE = "move the previous run aside"


def run_dir_action(spec: JobSpec, fresh: bool) -> str | None:
    """What a run will do with its directory: None (nothing there), RESUMING, or MOVE_ASIDE (a
    finished run, or --fresh). Only decides: the driver moves a run aside (`Aside`) after every
    check that can fail on the driver has passed, and puts it back unless the new run takes its
    first step, so a mistake found late (after Ray has started, in a worker) leaves the finished
    run where `kd-ray eval` looks for it."""
    run_dir = spec.run_dir
    names = storage.listdir(run_dir)
    if not names:
        return None
    has_checkpoint = any(n.startswith("checkpoint_") for n in names)
    if not {SUMMARY, METRICS, "checkpoint_manager_snapshot.json"} & set(names) and not has_checkpoint:
        raise UserError("run.name", f"{storage.shown(run_dir)} exists and is not a kd_ray run; choose another run.name or run.storage_path")
    finished = read_summary(run_dir).get("status") == "finished"
    return MOVE_ASIDE if fresh or finished or not has_checkpoint else RESUMING


class Aside:
    """A previous run, moved to NAME.<timestamp>/ (never deleted) to make room for a new run, for
    good only once the new run is known to work: its workers have built their models and taken
    their first step (`keep`). A new run that ends before that (a mistake only a worker meets, a
    stop, an abort) is removed and the previous run put back where it was (`settle`). On object
    storage a move is a copy of every object and then a delete (kd_ray.core.storage.move)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.archived = storage.with_suffix(run_dir, f".{time.strftime('%Y%m%d-%H%M%S')}")
        storage.move(run_dir, self.archived)
        self.kept = False

    def keep(self) -> str:
        """The new run has taken its first step; returns the note for the user."""
        self.kept = True
        return f"previous run moved to {storage.shown(self.archived)}"

    def settle(self) -> None:
        if self.kept:
            return
        storage.delete_dir(self.run_dir)  # what the new run wrote before its first step: a start, a failure
        if not storage.exists(self.run_dir):  # never a move into a directory that is still there
            storage.move(self.archived, self.run_dir)


def read_summary(run_dir: str) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(run_dir, SUMMARY)))
    except (OSError, ValueError):
        return {}


def write_summary(run_dir: str, summary: dict) -> None:
    storage.write_bytes(storage.join(run_dir, SUMMARY), json.dumps(summary, indent=2).encode())


def resume_point(spec: JobSpec, fp: dict, echo: Callable[[str], None]) -> dict | None:
    """The checkpoint a resumed run continues from; refuses a job file changed incompatibly."""
    chosen, skipped = checkpoint.pick(spec.run_dir)
    for path, why in skipped:
        echo(f"warning: checkpoint {storage.basename(path)} cannot be used ({why}); "
             + (f"resuming from {storage.basename(chosen)} instead" if chosen else "no earlier checkpoint is whole"))
    if chosen is None:
        return None
    state = checkpoint.read_resume(chosen)
    changes = changed_fields(state.get("fingerprint", {}), fp)
    if changes:
        raise UserError("job file", f"run {spec.run.name} was started with different values of {'; '.join(changes)}; "
                        f"put them back to resume it, or start afresh with --fresh (the old run is kept)")
    return {**state, "path": chosen}


def export(result, run_dir: str) -> str | None:
    """Copy the final checkpoint's student (weights + JSON, and a language model's Hugging Face
    directory) to the top of the run directory."""
    if result is None or result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as d:
        for name in (checkpoint.STUDENT_WEIGHTS, checkpoint.STUDENT_INFO):
            storage.put(os.path.join(d, name), storage.join(run_dir, name))
        if os.path.isdir(os.path.join(d, checkpoint.STUDENT_DIR)):
            storage.copy_out(os.path.join(d, checkpoint.STUDENT_DIR), storage.join(run_dir, checkpoint.STUDENT_DIR))
    return storage.join(run_dir, checkpoint.STUDENT_WEIGHTS)


def _by_kind(events: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {k: [] for k in ("start", "done", "stopped", "eval", "train")}
    for e in events:
        out.setdefault(e["kind"], []).append(e)
    return out


def _scored_in_workers(teacher_events: list[dict]) -> dict | None:
    """A colocated teacher's scores, from the record its workers made (kd_ray.train.loop.Trainer.score_teacher)."""
    if not teacher_events:
        return None
    return {k: v for k, v in teacher_events[-1].items() if k not in ("kind", "step", "line", "time", "elapsed_seconds")}


# The scores a summary shows (name, format, also the teacher's), the task's first: Task.SCORES,
# recorded in each summary; a summary without them (a classifier's, from before they were) shows these.
DEFAULT_SCORES = (("accuracy", None, True), ("loss", None, False))


def summarize(spec: JobSpec, task, result, events: list[dict], wall: float, plan: batch_plan.BatchPlan, teacher: dict | None) -> dict:
    """summary.json's figures from the run's events (and Ray Train's result, for the export)."""
    ev = _by_kind(events)
    starts, done = ev["start"], ev["done"]
    last = ev["eval"][-1] if ev["eval"] else {}
    end = done[-1] if done else (ev["stopped"][-1] if ev["stopped"] else None)
    train_seconds = end["time"] - starts[0]["time"] if end else wall
    steps = end["step"] if end else 0
    samples = steps * plan.global_batch
    first_position = starts[0]["position"]  # where this driver's run began (a resume: its checkpoint)
    return {
        "status": "finished" if done else ("stopped" if ev["stopped"] else "failed"),
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
        "student": {k.removeprefix("eval_"): v for k, v in last.items() if k in STUDENT_FIGURES} or
                   {"accuracy": None, "loss": None},
        "teacher": teacher or _scored_in_workers(ev.get("teacher", [])),
        "student_weights": export(result, spec.run_dir) if done else None,
        "telemetry": telemetry.run_telemetry(ev["train"]),
        "scores_shown": [list(s) for s in task.SCORES],
        **task.run_figures(ev["train"]),
    }
