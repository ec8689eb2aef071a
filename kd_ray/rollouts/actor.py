"""The rollout actors and, on-policy, the teacher's: plain Ray actors the train workers call.

A train worker sends each of its micro-batches to a rollout actor, which replaces the first
round(onpolicy.fraction x micro_batch_size) rows (the order is shuffled already) by the
student's rollouts of their prompts (the rest keep the data's responses: GKD's mix), and the
result straight on to a teacher actor (the reference is passed on, the rows do not come back
between), which adds the teacher's signal as a pool actor does (kd_ray.teacher.TeacherPredictor).
A colocated teacher scores them in the worker instead.

Not a Ray Data stage: step s's rollouts wait for weights only training step s - 1 can publish,
and a Ray Data task hands its output on only when it ends, holding whatever rows it was given,
of any number of steps; the workers know which step each micro-batch is for and send it as soon
as its weights are published (kd_ray.train.onpolicy).

Both kinds of actor are restarted by Ray if they die, and the calls they had in hand are made
again (max_task_retries): a rollout is a pure function of its prompt, its weights version and
its seed, so a retried call returns the same rows.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import ray
import torch

from kd_ray.core.columns import DOCS, ID, POS, ROLLOUT, SAMPLE_LOGPROB, TARGETS, TOKENS
from kd_ray.core.imports import make_importable
from kd_ray.core.seeds import EVAL_ROLLOUT, rollout_seed
from kd_ray.models.decoder import decoder_and_head, sliced_head
from kd_ray.models.precision import autocast
from kd_ray.models.weights import read_state_dict
from kd_ray.rollouts.sampling import generate, hf_decoder, prompt_length, rollout_row
from kd_ray.rollouts.versions import version_path
from kd_ray.teacher import TeacherPredictor

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec

# Rollout seeds are 63-bit; a held-out prompt is picked when its seed falls below share x this.
_SEED_RANGE = float(1 << 63)


def on_policy_rows(positions: np.ndarray, micro_batch: int, fraction: float) -> np.ndarray:
    """Which rows of the stream the student generates: the first round(fraction x micro_batch)
    of each micro-batch (a fixed share of every micro-batch, so of every step on every rank)."""
    return positions % micro_batch < round(fraction * micro_batch)


def eval_prompts(ids: np.ndarray, seed: int, share: float) -> np.ndarray:
    """Which held-out rows get a rollout at each evaluation: a fixed `share` of them, by their id."""
    return np.array([rollout_seed(seed, EVAL_ROLLOUT, int(i)) < share * _SEED_RANGE for i in ids], dtype=bool)


class RolloutWorker:
    """A copy of the student that turns rows into rollout rows (kd_ray.rollouts.sampling)."""

    REPORT_EVERY_S = 2.0
    WAIT_S = 0.02  # between two questions to the run's control, for a version not yet published

    def __init__(self, spec: "JobSpec", task, control, board=None):
        make_importable(spec.job_dir)
        task = task() if callable(task) else task
        o = spec.onpolicy
        self.spec, self.o, self.control, self.board = spec, o, control, board
        self.device = torch.device("cuda" if torch.cuda.is_available() and o.pool.gpus_per_actor > 0 else "cpu")
        torch.set_num_threads(max(1, int(o.pool.cpus_per_actor)))
        self.student = task.build_student(self.device).eval().requires_grad_(False)
        decoder, head = decoder_and_head(self.student.lm)
        self.decoder, self.head = hf_decoder(decoder), sliced_head(head, task.vocab, spec.train.precision, self.device)
        self.eos = task.tokenizer.eos_token_id if o.stop_on_eos else None
        self.width = o.prompt_tokens or spec.data.max_seq_len - 1  # every prompt fits: a fixed shape
        self.version = None
        # Running totals for the run's telemetry (kd_ray.telemetry.rollout_window).
        self.name, self.clock = uuid.uuid4().hex[:8], time.perf_counter
        self.prompts = self.tokens = 0
        self.busy = self.waited = self.staleness = 0.0
        self.reported = float("-inf")

    def training(self, rows: dict, step: int, version: tuple[int, int]) -> dict:
        """A micro-batch of optimizer step `step` with its on-policy share generated from weights
        `version`: (the Trainer's attempt, the version number; see _load)."""
        picked = np.flatnonzero(on_policy_rows(rows[POS], self.spec.train.micro_batch_size, self.o.fraction))
        seeds = [rollout_seed(self.spec.run.seed, step, int(i)) for i in rows[ID][picked]]
        out = self._with_rollouts(rows, picked, seeds, version)
        self.staleness += len(picked) * (step - version[1])
        self._report()
        return out

    def evaluation(self, rows: dict, version: tuple[int, int]) -> dict:
        """Held-out rows, every one generated with the seed its prompt has at every evaluation."""
        seeds = [rollout_seed(self.spec.run.seed, EVAL_ROLLOUT, int(i)) for i in rows[ID]]
        return self._with_rollouts(rows, np.arange(len(rows[ID])), seeds, version)

    def _with_rollouts(self, rows: dict, picked: np.ndarray, seeds: list[int], version: tuple[int, int]) -> dict:
        """`rows` marked as the data's, with the rows `picked` replaced by their rollouts."""
        n, length = len(rows[TOKENS]), rows[TOKENS].shape[1]
        out = {**{k: np.array(v) for k, v in rows.items()}, SAMPLE_LOGPROB: np.zeros((n, length), np.float32),
               ROLLOUT: np.full(n, -1, np.int32)}
        if not len(picked):
            return out
        self._load(version)
        began = self.clock()
        cut = [prompt_length(out[TOKENS][i], out[TARGETS][i], out[DOCS][i], self.o.prompt_tokens) for i in picked]
        made = self._generate([out[TOKENS][i][:p] for i, p in zip(picked, cut)], seeds, [length - p for p in cut])
        for i, p, r in zip(picked, cut, made):
            for k, v in rollout_row({k: v[i] for k, v in out.items()}, p, r, version[1]).items():
                out[k][i] = v
        self.busy += self.clock() - began
        self.prompts += len(picked)
        self.tokens += sum(len(r.tokens) for r in made)
        return out

    def _generate(self, prompts: list[np.ndarray], seeds: list[int], room: list[int]):
        o = self.o
        with autocast(self.spec.train.precision, self.device):
            return generate(self.decoder, self.head, prompts, seeds, [min(o.max_new_tokens, r) for r in room], width=self.width,
                            batch=o.pool.batch_size, temperature=o.temperature, top_p=o.top_p, eos=self.eos, device=self.device)

    def _load(self, key: tuple[int, int]) -> None:
        """The student's weights of version key[1], once published in the Trainer's attempt key[0]
        (waited for and counted: a worker sends a call once its version is published, but rank 0
        may still be writing it). Held under (attempt, version): an attempt that restarts from a
        checkpoint publishes the versions after it again, from the weights it trains. A call of an
        attempt that has ended (its caller is gone; Ray does not cancel a running call) raises
        instead of waiting for a version that will never come, which would hold the actor."""
        if key == self.version:
            return
        attempt, version = key
        began = self.clock()
        while True:
            current, published = ray.get(self.control.policy_version.remote())
            if current > attempt:
                raise RuntimeError(f"a call of the Trainer's attempt {attempt}, which has ended (now {current})")
            if current == attempt and published >= version:
                break
            time.sleep(self.WAIT_S)
        self.waited += self.clock() - began
        path = version_path(self.spec.run_dir, version)
        try:
            state = read_state_dict(path)
        except FileNotFoundError:
            raise RuntimeError(f"the student's weights version {version} ({path}) is gone: a run resumed from a checkpoint "
                               "older than the versions kept cannot regenerate its rollouts; start the run afresh") from None
        self.student.load_state_dict(state)
        self.version = key

    def _report(self) -> None:
        if self.board is not None and self.clock() - self.reported >= self.REPORT_EVERY_S:
            self.board.rollout_report.remote(self.name, self.prompts, self.tokens, self.busy, self.waited, self.staleness)
            self.reported = self.clock()


class ScoringTeacher:
    """The teacher's actor on-policy: rows in, rows with the teacher's signal out."""

    def __init__(self, spec: "JobSpec", task, board=None):
        self.predict = TeacherPredictor(spec, task, board)

    def score(self, rows: dict, for_loss: bool = False) -> dict:
        """`for_loss`: training rows (Task.teacher_tensors), not held-out ones, which are scored."""
        return self.predict(rows, for_loss=for_loss)


class RolloutActors(NamedTuple):
    rollouts: list  # RolloutWorker handles
    teachers: list  # ScoringTeacher handles (none: the teacher is colocated)


def start_actors(spec: "JobSpec", task, control, board) -> RolloutActors:
    """The run's rollout actors and (a pool placement) its teacher actors, restarted by Ray when
    they die, their calls in hand made again."""
    o, pool = spec.onpolicy.pool, spec.teacher.pool
    retry = dict(max_restarts=-1, max_task_retries=-1)
    worker = ray.remote(RolloutWorker).options(num_cpus=o.cpus_per_actor, num_gpus=o.gpus_per_actor, resources=dict(o.resources),
                                               **retry)
    rollouts = [worker.remote(spec, task.handle, control, board) for _ in range(o.actors)]
    teachers = []
    if not spec.colocated_teacher:
        scorer = ray.remote(ScoringTeacher).options(num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor,
                                                    resources=dict(pool.resources), **retry)
        teachers = [scorer.remote(spec, task.handle, board) for _ in range(pool.max_actors)]
    return RolloutActors(rollouts, teachers)
