"""The student's weights as the rollout actors see them: numbered versions (the weights after v
optimizer steps), written by the Trainer's rank 0 as safetensors files under RUN_DIR/policy, and
the schedule of which version each step generates from.

Files, not object-store references: a version outlives the process that wrote it, so a run
killed anywhere (a worker, the driver) and resumed from a checkpoint at step r finds the versions
its next steps generate from, which are older than r when max_staleness > 0, and regenerates
exactly the rollouts the killed run trained on. The run's control actor (kd_ray.run.control)
holds the newest version published, which is what the rollout actors wait on.
"""

from __future__ import annotations

import re

from kd_ray.core import storage

POLICY_DIR = "policy"
_NAME = re.compile(r"^v(\d{9})\.safetensors$")


def version_for(step: int, sync_every: int, max_staleness: int) -> int:
    """w(s): the weights version optimizer step `step` (0-based: the weights it updates are
    version `step`) generates its rollouts from: the oldest published version (a multiple of
    sync_every) at most max_staleness steps old. The oldest, so that generation runs as far ahead
    of training as the staleness allows (with 0 they alternate). Needs sync_every <= max_staleness
    + 1 (kd_ray.tasks.causal_lm_checks), so that one exists."""
    oldest = max(step - max_staleness, 0)
    return -(-oldest // sync_every) * sync_every


def oldest_needed(checkpoints: list[int], steps_done: int, sync_every: int, max_staleness: int) -> int:
    """The oldest version anything may still generate from, after `steps_done` optimizer steps:
    this attempt's next steps, or a run resumed from a kept checkpoint at step r, whose next steps
    generate from versions as old as w(r). A start from scratch makes every version again, so
    without a checkpoint only this attempt's own needs keep a version."""
    return version_for(min([*checkpoints, steps_done]), sync_every, max_staleness)


def version_path(run_dir: str, version: int) -> str:
    return storage.join(run_dir, POLICY_DIR, f"v{version:09d}.safetensors")


def published(run_dir: str) -> list[int]:
    """The versions under RUN_DIR/policy, oldest first."""
    names = storage.listdir(storage.join(run_dir, POLICY_DIR))
    return sorted(int(m.group(1)) for n in names if (m := _NAME.match(n)))


def remove(run_dir: str, versions: list[int]) -> None:
    for v in versions:
        storage.delete(version_path(run_dir, v))
