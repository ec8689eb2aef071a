"""What a user follows: the progress board the workers and teacher actors report to, one line
per event, the failure lines, and the summary table at the end."""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, Callable

import ray

from kd_ray import telemetry
from kd_ray.run.directory import DEFAULT_SCORES
from kd_ray.run.metrics import MetricsLog
from kd_ray.tasks.base import fmt_score as fmt


def say(line: str) -> None:
    """A line for the user: a warning to stderr, where it is seen even when the progress is
    piped away, and everything else to stdout."""
    print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Workers push report dicts here; the driver polls them (Train V2 keeps only metrics that come
    with a checkpoint, so this is how a run is followed live). Teacher actors report their
    running totals too, and each training line gets the pool's figures over the same window, the
    time since the run began and an estimate of the time left. Each event worth keeping is written
    to RUN_DIR/metrics.jsonl here, as it arrives (kd_ray.run.metrics)."""

    def __init__(self, run_dir: str | None = None):
        self.events: list[dict] = []
        self.pool: dict[str, tuple[int, float]] = {}
        self.pool_logged: dict[str, tuple[int, float]] = {}
        self.pool_logged_at = self.began = time.time()
        self.pool_done = False
        self.rollouts: dict[str, tuple] = {}  # on-policy: the rollout actors' running totals
        self.rollouts_logged: dict[str, tuple] = {}
        self.windows: list[dict] = []  # this attempt's log windows: the pace of its steps
        self.log = MetricsLog(run_dir) if run_dir else None

    def push(self, event: dict) -> None:
        now = time.time()
        event = {**event, "time": now, "elapsed_seconds": round(now - self.began, 3)}
        if event["kind"] == "start":  # a new attempt: a new stream, and its own pace
            self.windows, self.pool_done = [], False
        if event["kind"] == "train":
            event = self._train_figures(event, now)
        self.events.append(event)
        if self.log is not None:
            try:
                self.log.write(event)
            except OSError as e:  # the run goes on; the user hears of it once
                self.log = None
                self.events.append({"kind": "warning", "time": now, "message": f"metrics.jsonl is not written any more: {e}"})

    def _train_figures(self, event: dict, now: float) -> dict:
        self.windows.append(event)
        pace = telemetry.seconds_per_step(self.windows)
        event = {**event, "eta_seconds": round(pace * (event["total_steps"] - event["step"]), 1) if pace else None}
        if self.pool:
            # What the teacher pool did over the same window as the student's log line.
            window = telemetry.pool_window(self.pool_logged, self.pool, now - self.pool_logged_at)
            if self.pool_done:
                window.update(telemetry.pool_finished(self.pool))
            event["teacher_pool"] = window
            self.pool_logged, self.pool_logged_at = dict(self.pool), now
        if self.rollouts:
            event["rollouts"] = telemetry.rollout_window(self.rollouts_logged, self.rollouts, event["window_seconds"])
            self.rollouts_logged = dict(self.rollouts)
        return event

    # Teacher actors' running totals (kd_ray.teacher.TeacherPredictor), a few times a minute and
    # once more when one has sent the stream's last row (`done`).
    def teacher_report(self, actor: str, rows: int, busy: float, done: bool = False) -> None:
        if not self.pool:
            self.pool_logged_at = time.time()
        self.pool[actor] = (rows, busy)
        self.pool_done = self.pool_done or done

    # Rollout actors' running totals (kd_ray.rollouts.actor.RolloutActor), a few times a minute.
    def rollout_report(self, actor: str, prompts: int, tokens: int, busy: float, waited: float, staleness: float) -> None:
        self.rollouts[actor] = (prompts, tokens, busy, waited, staleness)

    def since(self, index: int) -> list[dict]:
        return self.events[index:]

    def written(self) -> bool:
        """Answers once every event pushed before the call is in metrics.jsonl (the actor runs
        its calls in order): the trainer asks before it takes a checkpoint."""
        return True


def _ms(e: dict) -> str:
    steps = e.get("window_steps") or 0
    return f"{1000 * (e['window_seconds'] - e['data_wait_seconds']) / steps:.0f} ms" if steps else "-"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def duration(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _pool(p: dict) -> str:
    if p.get("done"):  # its stream is all sent: the student reads what it queued
        return (f"teacher: done, {plural(p['actors_worked'], 'actor')}, "
                f"{p['rows_per_second_working']:,.0f} rows/s while working")
    return f"teacher: {plural(p['actors'], 'actor')} {p['rows_per_second']:,.0f} rows/s busy {100 * p['busy_fraction']:.0f}%"


def _clock(e: dict) -> str:
    left = f", ~{duration(e['eta_seconds'])} left" if e.get("eta_seconds") is not None else ""
    return f"  {duration(e['elapsed_seconds'])} elapsed{left}" if "elapsed_seconds" in e else ""


def _start_line(e: dict) -> str:
    resumed = f", from step {e['resumed_step']} (data position {e['position']})" if e.get("resumed_step") is not None else ""
    return (f"start: world size {e['world_size']}, accumulation {e['accumulation']}, "
            f"{e['steps_per_epoch']:.1f} steps/epoch, {e['total_steps']} steps{resumed}")


def _train_line(e: dict) -> str:
    ppl = f"  ppl {math.exp(min(e['ce_loss'], 50.0)):.2f}" if e.get("unit") == "tokens" else ""  # the window's, per token
    return (f"epoch {e['epoch']:.2f} step {e['step']}/{e['total_steps']}  loss {fmt(e['loss'])}  "
            f"kd {fmt(e['kd_loss'])}  ce {fmt(e['ce_loss'])}{ppl}  lr {e['lr']:.2e}  grad {e['grad_norm']:.3f}  "
            f"{e['samples_per_second']:.0f} {e.get('unit', 'samples')}/s  step {_ms(e)}  data wait {e['data_wait_seconds']:.2f}s"
            + (f"  {_pool(e['teacher_pool'])}" if e.get("teacher_pool") else "")
            + (f"  {_rollouts(e['rollouts'])}" if (e.get("rollouts") or {}).get("actors") else "") + _clock(e))


def _rollouts(r: dict) -> str:
    stale = f" staleness {r['staleness']:.2f}" if r.get("staleness") is not None else ""
    return (f"rollouts: {r['tokens_per_second']:,.0f} tok/s busy {100 * r['busy_fraction']:.0f}% "
            f"waiting for weights {100 * r['wait_fraction']:.0f}%{stale}")


_LINES: dict[str, Callable[[dict], str | None]] = {
    "start": _start_line,
    "warning": lambda e: f"warning: {e['message']}",
    # An attempt's failure is the run's progress (Ray Train restarts the workers, up to
    # run.max_failures), on stdout; the run's verdict is the one line on stderr.
    "error": lambda e: f"worker {e['rank']} failed: {e['message']}",
    "stopped": lambda e: f"stopped at step {e['step']} after a checkpoint",
    "train": _train_line,
    # The driver says a pool's or a cache's teacher scores itself; a colocated teacher's come from the workers.
    "teacher": lambda e: f"teacher on the eval split: {e['line']}" if "line" in e else None,
    "eval": lambda e: (f"eval  after epoch {e['epoch']} (step {e['step']}): student "
                       + (f"ppl {e['eval_perplexity']:.3f} " if "eval_perplexity" in e else "")
                       + f"acc {e['eval_accuracy']:.4f} loss {e['eval_loss']:.4f}"
                       + (f"; on its own samples: reverse KL {e['eval_reverse_kl']:.4f} (sampled {e['eval_sampled_kl']:.4f}), "
                          f"teacher NLL {e['eval_teacher_nll']:.4f}" if "eval_reverse_kl" in e else "")),
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


def follow(board, fit: Callable[[], Any], echo: Callable[[str], None],
           seen: Callable[[dict], None] = lambda e: None) -> tuple[Any, list[dict]]:
    """Run fit() in a thread and echo the board's events until it returns; `seen` gets each event."""
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
            seen(e)
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
    """Student and teacher on the eval split: the task's scores (Task.SCORES, kept in the summary)."""
    student, teacher = summary["student"], summary["teacher"]
    shown = summary.get("scores_shown") or DEFAULT_SCORES
    rows = [(f"student {name}", fmt(student.get(name), spec or ".4f")) for name, spec, _ in shown]
    if not teacher:
        return [*rows, ("teacher accuracy", "(no teacher)")]
    return rows + [(f"teacher {name}", fmt(teacher.get(name), spec or ".4f")) for name, spec, of_teacher in shown if of_teacher]


def _rollout_summary(r: dict) -> str:
    return (f"{r['tokens']:,} tokens, {fmt(r['tokens_per_second'], ',.0f')} tok/s, busy {100 * (r['busy_fraction'] or 0):.0f}%, "
            f"waiting for weights {100 * (r['wait_fraction'] or 0):.0f}%, staleness {fmt(r['staleness_mean'], '.2f')} steps")


def _own_samples(student: dict) -> list[tuple[str, str]]:
    """On-policy: the student's last evaluation on its own samples of held-out prompts."""
    if student.get("reverse_kl") is None:
        return []
    return [("student's own samples", f"reverse KL {student['reverse_kl']:.4f} (sampled {student['sampled_kl']:.4f}), "
             f"teacher NLL {student['teacher_nll']:.4f} per token")]


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
        *([("rollouts", _rollout_summary(t["rollouts"]))] if t.get("rollouts") else []),
        *_own_samples(summary["student"]),
        ("bottleneck", f"{t.get('bottleneck', '-')}: {t.get('advice', '')}"),
        ("student weights", summary["student_weights"]),
    ]
    width = max(len(k) for k, _ in rows)
    echo("-" * (width + 40))
    for k, v in rows:
        echo(f"{k:<{width}}  {v}")
    echo("-" * (width + 40))
    echo(f"run directory: {summary['run_dir']}")
