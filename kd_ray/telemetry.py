"""Where a run's time goes, as pure arithmetic on what the workers and teacher actors report.

The student side: every log line's window (seconds, seconds waiting for the next batch, optimizer
steps). The teacher side: each pool actor's running totals (rows, seconds busy in the forward).
A colocated teacher's side: the seconds its forwards took in the train workers. From these comes
one verdict: the student, the teacher (pool or colocated) or the input pipeline is what holds the
run back, with the setting that would help, the other teacher.placement included where it would.
"""

from __future__ import annotations

# The student waiting more than this fraction of its time means it is starved.
STARVED = 0.10
# Teacher actors busy more than this fraction of the time means the pool is at its limit.
SATURATED = 0.80
# A colocated teacher taking more than this fraction of the student's time is what holds it back.
TEACHER_HEAVY = 0.50
# The other placement (teacher.placement), where it would help: a pool whose stream starves the
# student pays its start-up and plumbing on the student's cores, which a colocated teacher does
# not; a colocated teacher that takes most of each step is better given devices of its own.
COLOCATE = ("; or, if the teacher fits beside the student, teacher.placement: colocated runs it in each train worker, "
            "with no pool to start or feed (docs/performance.md, \"Where the teacher runs\")")


def _worked(before: dict[str, tuple], now: dict[str, tuple]) -> list[tuple]:
    """Each actor's running totals between two snapshots, for the actors whose first total grew."""
    delta = [tuple(x - y for x, y in zip(v, before.get(a, (0,) * len(v)))) for a, v in now.items()]
    return [d for d in delta if d[0] > 0]


def pool_window(before: dict[str, tuple[int, float]], now: dict[str, tuple[int, float]], seconds: float) -> dict:
    """The pool between two snapshots of actor -> (rows, busy seconds): actors that did work,
    rows per second, and the fraction of those actors' time spent in the forward."""
    active = _worked(before, now)
    rows = sum(r for r, _ in active)
    busy = sum(b for _, b in active)
    return {
        "actors": len(active),
        "rows_per_second": rows / seconds if seconds > 0 else 0.0,
        "busy_fraction": min(1.0, busy / (seconds * len(active))) if active and seconds > 0 else 0.0,
    }


def pool_finished(now: dict[str, tuple[int, float]]) -> dict:
    """A pool that has finished its stream: the actors that worked, and its rows per second while
    they were in the forward (rows over each actor's mean busy seconds: they work side by side)."""
    rows = sum(r for r, _ in now.values())
    busy = sum(b for _, b in now.values())
    actors = sum(1 for r, _ in now.values() if r > 0)
    return {"done": True, "actors_worked": actors, "rows": rows,
            "rows_per_second_working": rows * actors / busy if busy > 0 else 0.0}


def rollout_window(before: dict[str, tuple], now: dict[str, tuple], seconds: float) -> dict:
    """The rollout actors (on-policy) between two snapshots of actor -> (prompts, tokens, busy
    seconds, seconds waiting for weights, staleness summed over prompts): tokens generated per
    second, the share of the actors' time spent generating and waiting for the student's next
    weights, and the mean staleness (steps) of the prompts generated."""
    active = _worked(before, now)
    prompts, tokens, busy, waited, stale = (sum(d[i] for d in active) for i in range(5))
    span = seconds * len(active)
    return {"actors": len(active), "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "busy_fraction": min(1.0, busy / span) if span > 0 else 0.0,
            "wait_fraction": min(1.0, waited / span) if span > 0 else 0.0,
            "staleness": stale / prompts if prompts else None, "prompts": prompts, "tokens": tokens}


# Workers poll (a barrier across the group, and a call to the run's control) every POLL_STEPS
# optimizer steps, or about every POLL_SECONDS when steps are faster than that: with a small
# student's 3 ms steps, a poll every 10 steps was 4% of the train worker's time and 0.09 of a
# core in Ray Train's synchronization actor (docs/performance.md, "Small students").
POLL_STEPS, POLL_SECONDS = 10, 1.0


def poll_every(window_seconds: float, window_steps: int) -> int:
    """Optimizer steps between two polls, from the last log window's pace. Every rank must poll
    on the same steps: they call this with the same all-reduced figures."""
    if window_steps <= 0 or window_seconds <= 0:
        return POLL_STEPS
    return max(POLL_STEPS, int(POLL_SECONDS * window_steps / window_seconds))


def seconds_per_step(windows: list[dict]) -> float | None:
    """The pace of the run's steps, evaluations and checkpoints included, from this attempt's log
    windows: the steady ones, or (before there is one) the first without its wait for the pipeline."""
    steady = [w for w in windows if not w.get("startup")]
    if steady:
        steps = sum(w["window_steps"] for w in steady)
        return sum(w["window_seconds"] for w in steady) / steps if steps else None
    steps = sum(w["window_steps"] for w in windows)
    return sum(w["window_seconds"] - w["data_wait_seconds"] for w in windows) / steps if steps else None


def verdict(wait_fraction: float, teacher_busy: float | None, teacher_share: float | None = None,
            rollouts: dict | None = None) -> tuple[str, str]:
    """(bottleneck, what to change). `teacher_busy`: a pool's busy fraction (None: no pool
    reported); `teacher_share`: the fraction of the student's time a colocated teacher took
    (None: the teacher is not colocated); `rollouts`: on-policy, the rollout actors' figures."""
    if wait_fraction < STARVED:
        if teacher_share is not None and teacher_share >= TEACHER_HEAVY:
            return "colocated teacher", (f"the teacher's forward takes {100 * teacher_share:.0f}% of the train workers' time: "
                                         "teacher.placement: pool runs it on devices of its own (teacher.pool.gpus_per_actor) beside "
                                         "the student, or cache its outputs (teacher.mode: cached)")
        return "student", ("the student rarely waits for data: a faster student step (bf16, compile, a larger "
                           "train.micro_batch_size) or more train.num_workers would speed the run")
    pooled = teacher_busy is not None
    if rollouts is not None and not (pooled and teacher_busy >= SATURATED):
        return "rollouts", ("the student waits for its rollouts (generation, then the teacher's scoring): raise "
                            "onpolicy.pool.actors, or onpolicy.max_staleness so that the next steps' generation overlaps training")
    if pooled and teacher_busy >= SATURATED:
        return "teacher pool", ("the student waits for teacher outputs and the teacher actors are busy: raise "
                                "teacher.pool.max_actors (or gpus), or cache the teacher's outputs (teacher.mode: cached)" + COLOCATE)
    return "input pipeline", ("the student waits for data but the teacher is not what is slow: reading and "
                              "preprocessing (in Ray Data's read tasks, or in the train workers for data held in memory) or the "
                              "transfer is; give them more CPUs or raise train.prefetch_batches" + (COLOCATE if pooled else ""))


def run_telemetry(events: list[dict]) -> dict:
    """The run's figures from its log-line events: each carries its window and, with a teacher
    pool that has reported, the pool's window (`teacher_pool`). The first window of each
    (re)start, which waits for the pipeline to start, counts apart, unless there is no other."""
    train_events = [e for e in events if not e.get("startup")] or events
    startup_wait = sum(e["data_wait_seconds"] for e in events if e.get("startup"))
    seconds = sum(e["window_seconds"] for e in train_events)
    wait = sum(e["data_wait_seconds"] for e in train_events)
    steps = sum(e["window_steps"] for e in train_events)
    wait_fraction = wait / seconds if seconds > 0 else 0.0
    out: dict = {
        "student_step_seconds": (seconds - wait) / steps if steps else None,
        "data_wait_seconds": round(wait, 3),
        "data_wait_fraction": round(wait_fraction, 4),
        "startup_wait_seconds": round(startup_wait, 3),
    }
    # The pool over the windows it worked in, the start included: on a fast teacher it may have
    # streamed the whole run out before the student's steady windows.
    pooled = [(e["teacher_pool"], e["window_seconds"]) for e in events if (e.get("teacher_pool") or {}).get("actors")]
    span = sum(t for _, t in pooled)
    busy = None
    if pooled and span > 0:
        actor_seconds = sum(w["actors"] * t for w, t in pooled)
        busy = sum(w["busy_fraction"] * w["actors"] * t for w, t in pooled) / actor_seconds if actor_seconds else 0.0
        out["teacher_pool"] = {
            "actors_max": max(w["actors"] for w, _ in pooled),
            "actors_mean": round(actor_seconds / span, 2),
            "rows_per_second": round(sum(w["rows_per_second"] * t for w, t in pooled) / span, 2),
            "busy_fraction": round(busy, 4),
        }
    rolled = [(e["rollouts"], e["window_seconds"]) for e in events if (e.get("rollouts") or {}).get("actors")]
    if rolled:
        span = sum(t for _, t in rolled)
        prompts = sum(w["prompts"] for w, _ in rolled)
        out["rollouts"] = {
            "tokens": sum(w["tokens"] for w, _ in rolled),
            "tokens_per_second": round(sum(w["tokens"] for w, _ in rolled) / span, 1) if span else None,
            "busy_fraction": round(sum(w["busy_fraction"] * t for w, t in rolled) / span, 4) if span else None,
            "wait_fraction": round(sum(w["wait_fraction"] * t for w, t in rolled) / span, 4) if span else None,
            "staleness_mean": round(sum((w["staleness"] or 0) * w["prompts"] for w, _ in rolled) / prompts, 3) if prompts else None,
        }
    colocated = [e for e in train_events if e.get("teacher_seconds") is not None]
    share = None
    if colocated and seconds - wait > 0:
        share = sum(e["teacher_seconds"] for e in colocated) / (seconds - wait)
        out["colocated_teacher_fraction"] = round(share, 4)
    out["bottleneck"], out["advice"] = verdict(wait_fraction, busy, share, out.get("rollouts"))
    return out
