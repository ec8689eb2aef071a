"""What a user follows: the progress board the workers and teacher actors report to, one line
per event, the failure lines, and the summary table at the end."""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

import ray

from kd_ray import telemetry


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Workers push report dicts here; the driver polls them (Train V2 keeps only metrics that come
    with a checkpoint, so this is how a run is followed live). Teacher actors report their
    running totals too, and each training line gets the pool's figures over the same window."""

    def __init__(self):
        self.events: list[dict] = []
        self.pool: dict[str, tuple[int, float]] = {}
        self.pool_logged: dict[str, tuple[int, float]] = {}
        self.pool_logged_at = time.time()

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


def fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _ms(e: dict) -> str:
    steps = e.get("window_steps") or 0
    return f"{1000 * (e['window_seconds'] - e['data_wait_seconds']) / steps:.0f} ms" if steps else "-"


def _pool(p: dict) -> str:
    return f"{p['actors']} actor(s) {p['rows_per_second']:.0f} rows/s busy {100 * p['busy_fraction']:.0f}%"


def _start_line(e: dict) -> str:
    resumed = f", from step {e['resumed_step']} (data position {e['position']})" if e.get("resumed_step") is not None else ""
    return (f"start: world size {e['world_size']}, accumulation {e['accumulation']}, "
            f"{e['steps_per_epoch']:.1f} steps/epoch, {e['total_steps']} steps{resumed}")


def _train_line(e: dict) -> str:
    ppl = f"  ppl {math.exp(min(e['ce_loss'], 50.0)):.2f}" if e.get("unit") == "tokens" else ""  # the window's, per token
    return (f"epoch {e['epoch']:.2f} step {e['step']}/{e['total_steps']}  loss {fmt(e['loss'])}  "
            f"kd {fmt(e['kd_loss'])}  ce {fmt(e['ce_loss'])}{ppl}  lr {e['lr']:.2e}  grad {e['grad_norm']:.3f}  "
            f"{e['samples_per_second']:.0f} {e.get('unit', 'samples')}/s  step {_ms(e)}  data wait {e['data_wait_seconds']:.2f}s"
            + (f"  teacher {_pool(e['teacher_pool'])}" if e.get("teacher_pool") else ""))


_LINES: dict[str, Callable[[dict], str]] = {
    "start": _start_line,
    "warning": lambda e: f"warning: {e['message']}",
    "error": lambda e: f"warning: worker {e['rank']} failed: {e['message']}",
    "stopped": lambda e: f"stopped at step {e['step']} after a checkpoint",
    "train": _train_line,
    "eval": lambda e: (f"eval  after epoch {e['epoch']} (step {e['step']}): student "
                       + (f"ppl {e['eval_perplexity']:.3f} " if "eval_perplexity" in e else "")
                       + f"acc {e['eval_accuracy']:.4f} loss {e['eval_loss']:.4f}"),
}


def format_event(e: dict) -> str | None:
    line = _LINES.get(e["kind"])
    return line(e) if line else None


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
            line = format_event(e) if failures.show(e) else None
            if line:
                echo(line)
        if not alive:
            break
        thread.join(timeout=0.5)
    if "error" in result:
        raise result["error"]
    return result.get("value"), events


def _pool_summary(p: dict | None) -> str:
    if not p:
        return "-"
    return f"{p['actors_max']} actor(s) at most, {p['rows_per_second']:.0f} rows/s, busy {100 * p['busy_fraction']:.0f}%"


def _scores(summary: dict) -> list[tuple[str, str]]:
    """Student and teacher on the eval split: accuracy and loss, and perplexity for a language model."""
    student, teacher = summary["student"], summary["teacher"]
    rows = [("student perplexity", fmt(student["perplexity"], ".3f"))] if "perplexity" in student else []
    rows += [("student accuracy", fmt(student.get("accuracy"))), ("student loss", fmt(student.get("loss")))]
    if teacher and "perplexity" in teacher:
        rows.append(("teacher perplexity", fmt(teacher["perplexity"], ".3f")))
    rows.append(("teacher accuracy", fmt(teacher["accuracy"]) if teacher else "(no teacher)"))
    return rows


def print_summary(summary: dict, echo: Callable[[str], None] = print) -> None:
    t = summary.get("telemetry") or {}
    rows = [
        ("status", summary["status"]),
        ("steps", summary["steps"]),
        ("samples", summary["samples"]),
        ("epochs", f"{summary['epochs']:.2f}"),
        ("train seconds", f"{summary['train_seconds']:.1f}"),
        ("samples/s", summary["samples_per_second"]),
        *([("tokens/s", summary["tokens_per_second"])] if "tokens_per_second" in summary else []),
        *([("teacher sends", f"{summary['teacher_bytes_per_token']} bytes/token")] if summary.get("teacher_bytes_per_token") else []),
        ("restarts", f"{summary['restarts']} (world sizes {', '.join(map(str, summary['world_sizes']))})"),
        *_scores(summary),
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
