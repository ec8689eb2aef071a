"""Fault injection and tracing for the tests, through kd_ray's callback hook (kd_ray.callbacks),
the same way a user's own callbacks reach a run: named in the job file, imported from the job
file's directory (the tests copy this file next to their job files, see `install`).

    Trace       each optimizer step's sample ids and positions, per rank and attempt
    DieAt       a real process exit (os._exit, no clean-up) after given steps, once each
    KillDriver  SIGKILL to a capture's driver once it has written some shards, once
    KillAt      SIGKILL to the actors of a class, or to the driver, after a given step, once
    Pace        each step held to at least the seconds written in a file (the test changes them)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid

from kd_ray.callbacks import Callback


def install(directory) -> None:
    """Put this module next to a job file, where kd_ray imports the job's callbacks from."""
    shutil.copy(__file__, os.path.join(str(directory), "faults.py"))


class Trace(Callback):
    """rank{R}.jsonl in `directory`: one line per optimizer step with its ids and positions, the
    attempt (an id rank 0 draws at each start, shared with every rank) and the world size."""

    def __init__(self, directory: str):
        self.directory = directory
        self.ids: list[int] = []
        self.positions: list[int] = []

    def on_start(self, info) -> None:
        from ray.train.collective import broadcast_from_rank_zero

        self.rank, self.world = info.rank, info.world_size
        self.attempt = broadcast_from_rank_zero(uuid.uuid4().hex[:12])

    def on_batch(self, batch: dict) -> None:
        self.ids += batch["id"].tolist()
        self.positions += batch["position"].tolist()

    def on_step_end(self, step: int) -> None:
        line = {"step": step, "ids": self.ids, "positions": self.positions, "attempt": self.attempt, "time": time.time(),
                "world": self.world}
        with open(os.path.join(self.directory, f"rank{self.rank}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
        self.ids, self.positions = [], []


class DieAt(Callback):
    """The worker of rank `rank` (default: the last) exits after each of `steps`, once each
    (a file in `marks` remembers it across restarts)."""

    def __init__(self, steps: list[int], marks: str, rank: int = -1):
        self.steps, self.marks, self.die_rank = set(steps), marks, rank

    def on_start(self, info) -> None:
        self.rank = info.rank
        if self.die_rank < 0:
            self.die_rank = info.world_size - 1

    def on_step_end(self, step: int) -> None:
        mark = os.path.join(self.marks, f"died_at_{step}")
        if step in self.steps and self.rank == self.die_rank and not os.path.exists(mark):
            open(mark, "w").close()
            os._exit(1)


class KillDriver(Callback):
    """In a capture's pool actor: SIGKILL the process whose pid the test wrote to `pid_file` once
    this actor has written `after` shards, then wait to be torn down with it (no more shards).
    Once: `mark` remembers it."""

    def __init__(self, after: int, pid_file: str, mark: str):
        self.after, self.pid_file, self.mark = after, pid_file, mark
        self.written = 0

    def on_shard_written(self, shard: dict) -> None:
        self.written += 1
        if self.written < self.after or os.path.exists(self.mark):
            return
        open(self.mark, "w").close()
        while not os.path.exists(self.pid_file):
            time.sleep(0.05)
        with open(self.pid_file) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        time.sleep(600)


class KillAt(Callback):
    """On rank 0, after optimizer step `step`, once (`mark` remembers it): SIGKILL each live Ray
    actor whose class name holds `actor` (found through Ray's state API), or the process whose pid
    the test wrote to `pid_file` (the driver). The run goes on (an actor) or ends (the driver)."""

    def __init__(self, step: int, mark: str, actor: str | None = None, pid_file: str | None = None):
        self.step, self.mark, self.actor, self.pid_file = step, mark, actor, pid_file

    def on_start(self, info) -> None:
        self.rank = info.rank

    def on_step_end(self, step: int) -> None:
        if step != self.step or self.rank != 0 or os.path.exists(self.mark):
            return
        open(self.mark, "w").close()
        if self.pid_file is not None:
            with open(self.pid_file) as f:
                os.kill(int(f.read()), signal.SIGKILL)
            time.sleep(600)  # torn down with the driver
        from ray.util.state import list_actors

        live = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
        pids = [a.pid for a in live if self.actor in (a.class_name or "")]
        assert pids, f"no live {self.actor} actor to kill"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


class Pace(Callback):
    """After each optimizer step, sleep the seconds written in `path` (read again at every step):
    a run kept going while nodes join and leave, then let go at full speed."""

    def __init__(self, path: str):
        self.path = path

    def on_step_end(self, step: int) -> None:
        with open(self.path) as f:
            time.sleep(float(f.read()))
