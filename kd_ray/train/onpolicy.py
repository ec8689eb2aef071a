"""On-policy, the teacher's signal as the Trainer gets it: each micro-batch of the worker's stream
goes to a rollout actor (the student's rollouts of its prompts, kd_ray.rollouts.actor) and on
to a teacher actor (or the teacher colocated in this worker), and comes back as the rows the
step trains on. The same slots as the other sources of the signal (kd_ray.train.colocated):
`signal` for training, `scores` for the teacher's own scores, and `evaluation` for held-out
prompts; plus the publication of the student's weights the rollouts generate from.

Weights. Every onpolicy.sync_every optimizer steps, at each (re)start and before each
evaluation, rank 0 writes the student's weights as a version (kd_ray.rollouts.versions) and
tells the run's control. Optimizer step s generates from version w(s), the oldest published
within onpolicy.max_staleness steps: a micro-batch is sent once its version is published, and
the worker reads its stream (max_staleness + 1) steps ahead, so with max_staleness 1 the next
step's rollouts are generated while this one trains, and with 0 the two alternate.

At a (re)start from step r, versions past r (of an attempt that went further and failed) are
removed before anything is sent: the steps after r are trained again, and their rollouts must
come from the weights this attempt publishes. Versions before r stay: the steps from r on
generate from versions as old as r - max_staleness. A version is removed once no checkpoint the
run keeps could resume into a step that generates from it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator

import numpy as np
import ray
import torch
from ray.train.collective import broadcast_from_rank_zero

from kd_ray.core import storage
from kd_ray.core.columns import ID, POS
from kd_ray.models import weights
from kd_ray.rollouts.actor import RolloutActors, eval_prompts
from kd_ray.rollouts.versions import (
    oldest_needed,
    published,
    remove,
    version_for,
    version_path,
)
from kd_ray.spec import JobSpec
from kd_ray.train import checkpoint
from kd_ray.train.colocated import ColocatedTeacher
from kd_ray.train.meter import Meter
from kd_ray.train.parallel import unwrap


class NoRollouts:
    """An off-policy run: nothing to publish."""

    def start(self, step: int) -> None: ...

    def after_step(self, step: int) -> None: ...

    def saved(self, step: int) -> None: ...

    def before_eval(self, step: int) -> None: ...


class OnPolicy:
    def __init__(self, spec: JobSpec, device: torch.device, actors: RolloutActors, control, rank: int, model: torch.nn.Module,
                 accumulation: int, eval_rows: int, colocated: ColocatedTeacher | None):
        self.spec, self.o, self.device, self.actors, self.control = spec, spec.onpolicy, device, actors, control
        self.rank, self.model, self.accumulation, self.colocated = rank, model, accumulation, colocated
        self.eval_share = min(1.0, self.o.eval_prompts / max(eval_rows, 1))
        self.kept: list[int] = []  # steps of the checkpoints a resume may start from, oldest first
        self.last = -1  # the newest version published
        self.versions: set[int] = set()  # rank 0: the versions on storage
        self.turn = rank  # the actors each call goes to, in turn (ranks start apart)

    # ---------------------------------------------------------------------------- the weights

    def start(self, step: int) -> None:
        """At each start of the group, before any micro-batch is sent. A version past `step` is
        made again by this attempt: the actors key the weights they hold by (attempt, version)."""
        attempt = None
        if self.rank == 0:
            attempt = ray.get(self.control.new_attempt.remote())
            on_storage = published(self.spec.run_dir)  # listed once: rank 0 keeps the list from here on
            remove(self.spec.run_dir, [v for v in on_storage if v > step])
            self.versions = {v for v in on_storage if v <= step}
        self.attempt = broadcast_from_rank_zero(attempt)
        # The checkpoints a resume may fall back to (kd_ray.train.checkpoint.pick), this one included
        # (step 0 is no checkpoint: a start from scratch makes every version again).
        on_disk = [(checkpoint.read_resume(p) or {}).get("step") for p in checkpoint.candidates(self.spec.run_dir)]
        self.kept, self.last = sorted({*([step] if step else []), *(s for s in on_disk if s is not None)}), -1
        self.publish(step)

    def after_step(self, step: int) -> None:
        if step % self.o.sync_every == 0:
            self.publish(step)

    def saved(self, step: int) -> None:
        self.kept = sorted({*self.kept, step})[-self.spec.checkpoint.keep:]

    def before_eval(self, step: int) -> None:
        self.publish(step)  # an evaluation generates from the weights it evaluates

    def publish(self, version: int) -> None:
        if version == self.last:
            return
        if self.spec.train.strategy == "fsdp" or self.rank == 0:  # gathering an FSDP2 student's weights is a collective
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(unwrap(self.model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            run_dir = self.spec.run_dir
            storage.write_bytes(version_path(run_dir, version), weights.as_bytes(state))  # a directory or a bucket
            oldest = oldest_needed(self.kept, version, self.o.sync_every, self.o.max_staleness)
            gone = sorted(v for v in self.versions if v < oldest)
            remove(run_dir, gone)
            self.versions = (self.versions - set(gone)) | {version}
            ray.get(self.control.publish.remote(self.attempt, version))
        self.last = version

    # ---------------------------------------------------------------------------- the signal

    def _send(self, rows: dict, call) -> ray.ObjectRef:
        """Rows to a rollout actor (`call` names its method and arguments), and its answer on to a
        teacher actor, which sends training rows what their loss needs only (Task.teacher_tensors)."""
        rollout = self.actors.rollouts[self.turn % len(self.actors.rollouts)]
        ref = getattr(rollout, call[0]).remote({k: v.cpu().numpy() for k, v in rows.items()}, *call[1:])
        if self.actors.teachers:
            ref = self.actors.teachers[self.turn % len(self.actors.teachers)].score.remote(ref, call[0] == "training")
        self.turn += 1
        return ref

    def _received(self, ref: ray.ObjectRef, meter: Meter, for_loss: bool) -> dict:
        began = time.perf_counter()
        rows = ray.get(ref)
        meter.wait += time.perf_counter() - began  # the step waits for its rows, as for a stream's
        batch = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in rows.items()}
        if self.colocated is not None:
            began = time.perf_counter()
            batch = self.colocated(batch, for_loss)
            meter.teacher += time.perf_counter() - began
        return batch

    def signal(self, batches: Iterator[dict], meter: Meter | None = None) -> Iterator[dict]:
        """`batches` (this rank's micro-batches, in order) as the rows the steps train on: each sent
        as soon as the weights its step generates from are published, read (max_staleness + 1)
        steps ahead."""
        meter = meter or Meter(self.device)
        G, E, S = self.spec.train.global_batch_size, self.o.sync_every, self.o.max_staleness
        it, waiting, sent, ended = iter(batches), deque(), deque(), False
        while True:
            while not ended and len(waiting) + len(sent) < self.accumulation * (S + 1):
                batch = next(it, None)
                ended = batch is None
                if not ended:
                    waiting.append((int(batch[POS][0]) // G, batch))
            while waiting and version_for(waiting[0][0], E, S) <= self.last:
                step, batch = waiting.popleft()
                sent.append(self._send(batch, ("training", step, (self.attempt, version_for(step, E, S)))))
            if not sent:
                if waiting:  # the Trainer publishes every version a step it asks for needs: a bug if not
                    raise RuntimeError(f"step {waiting[0][0]} needs weights version {version_for(waiting[0][0], E, S)}, "
                                       f"but the newest published is {self.last}")
                return
            yield self._received(sent.popleft(), meter, for_loss=True)

    def evaluation(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Held-out batches as they are (the student's perplexity), then the student's rollouts of
        about onpolicy.eval_prompts of their prompts (fixed seeds), scored by the teacher, as one
        batch: every rank runs the same number of forwards (DDP's buffer broadcast, an FSDP2
        student's or a sharded teacher's gathers are collectives), so a rank that picked none of
        its rows sends its first."""
        picked, first = [], None
        for batch in batches:
            yield batch
            first = first or {k: v[:1] for k, v in batch.items()}
            keep = torch.from_numpy(eval_prompts(batch[ID].cpu().numpy(), self.spec.run.seed, self.eval_share))
            if bool(keep.any()):
                picked.append({k: v[keep.to(v.device)] for k, v in batch.items()})
        rows = {k: torch.cat([p[k] for p in picked]) for k in picked[0]} if picked else first
        if rows is not None:
            yield self._received(self._send(rows, ("evaluation", (self.attempt, self.last))), Meter(self.device), for_loss=False)

    def scores(self, batches, task, device: torch.device):
        """The teacher's eval sums where this worker runs it (colocated); else the driver's."""
        return self.colocated.scores(batches, task, device) if self.colocated is not None else None


def rollouts_in_trainer(spec: JobSpec, device: torch.device, actors: RolloutActors | None, control, rank: int,
                        model: torch.nn.Module, accumulation: int, eval_rows: int, teacher) -> OnPolicy | None:
    """On-policy, the source of the Trainer's teacher signal and the publisher of its weights."""
    if spec.onpolicy is None:
        return None
    return OnPolicy(spec, device, actors, control, rank, model, accumulation, eval_rows,
                    teacher if isinstance(teacher, ColocatedTeacher) else None)
