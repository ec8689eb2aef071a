"""Run control: the data cursor and the stop flag, in a small actor of their own.

The cursor is where the training stream starts: rank 0 sets it after restoring a checkpoint,
before anyone reads the stream, and the Ray Data stream's read tasks read it when they run
(kd_ray.data.chunks; workers that read the stream themselves start from their checkpoint's
position). The stop flag is set by the driver on SIGTERM or Ctrl-C, and the workers poll it
every `checkpoint.poll_every_steps` steps (by default about once a second): they checkpoint and return.
On-policy, it also holds the Trainer's attempt (a number that grows at each start of the worker
group) and the newest version of the student's weights rank 0 has published in it
(kd_ray.rollouts): what a rollout actor checks before it reads one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

import ray

from kd_ray.spec import JobSpec
from kd_ray.telemetry import POLL_SECONDS, POLL_STEPS


@ray.remote(num_cpus=0)
class RunControl:
    def __init__(self):
        self.position = 0
        self.stop = False
        self.attempt, self.policy = 0, -1

    def new_attempt(self) -> int:
        """A start of the worker group (rank 0's): versions are published anew from here."""
        self.attempt, self.policy = self.attempt + 1, -1
        return self.attempt

    def publish(self, attempt: int, version: int) -> None:
        """The newest version of the student's weights on storage (kd_ray.rollouts.versions)."""
        if attempt == self.attempt:
            self.policy = version

    def policy_version(self) -> tuple[int, int]:
        return self.attempt, self.policy

    def set_cursor(self, position: int) -> None:
        self.position = position

    def cursor(self) -> int:
        return self.position

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop


@contextlib.contextmanager
def stop_on_signals(control, spec: JobSpec, echo: Callable[[str], None]):
    """SIGTERM or Ctrl-C: ask the workers to checkpoint and return (a second one aborts now)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    asked = []

    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        control.request_stop.remote()
        every = spec.checkpoint.poll_every_steps
        within = f"{every} steps" if every else f"{POLL_STEPS} steps or about {POLL_SECONDS:g} s, whichever is longer"
        echo(f"stopping: the workers checkpoint within {within} and return "
             "(send it again to abort without a checkpoint)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
