"""The Trainer: what Ray Train runs on every student worker, as the recipe of seed 000.

    set up      build the student, wrap it (DDP / FSDP2), compile, optimizer, schedule, scaler
    restore     the newest whole checkpoint; the data cursor set, every rank agreeing on it
    for each micro-batch of this rank's stream (kd_ray.train.batches), in the planned order:
        step    teacher signal in (in the batch already, or from the teacher colocated in this
                worker: kd_ray.train.colocated) -> loss -> scaled backward; on the accumulation
                boundary, clip and step the optimizer
        log     one all-reduce per log line; evaluate at the end of each epoch
        save    every N steps or M minutes; poll for a preemption notice or a stop request
    finish      the final checkpoint (the driver exports its student)

Ray Train re-runs this from the top after any failure or resize, with whatever world size it
got: everything a restart needs is in the checkpoint and the cursor. Users and tests hook in
through kd_ray.callbacks (on_start, on_batch, on_step_end).
"""

from __future__ import annotations

import tempfile

import ray.train
import ray.train.torch
import torch
from ray.train.collective import broadcast_from_rank_zero

from kd_ray import batch_plan
from kd_ray.callbacks import Callbacks, StartInfo
from kd_ray.core.errors import reason
from kd_ray.core.imports import make_importable
from kd_ray.core.seeds import seed_torch, step_seed
from kd_ray.losses import mix
from kd_ray.models.precision import grad_scaler
from kd_ray.spec import JobSpec
from kd_ray.telemetry import POLL_STEPS, poll_every
from kd_ray.train import checkpoint
from kd_ray.train.batches import eval_batches, rank_batches
from kd_ray.train.colocated import teacher_in_trainer
from kd_ray.train.meter import Meter, Timer
from kd_ray.train.onpolicy import NoRollouts, rollouts_in_trainer
from kd_ray.train.optim import make_optimizer, make_scheduler
from kd_ray.train.parallel import all_reduce_sum, grad_sync, sync_buffers, wrap
from kd_ray.train.profile import StepProfiler
from kd_ray.train.step import global_denominator, optimizer_step

# The event rank 0 sends after an attempt's first optimizer step: the run is known to work (its
# models built, its data read, a backward and a step taken), and a previous run moved aside for it
# stays aside (kd_ray.run.directory.Aside).
FIRST_STEP = "first_step"


def train_loop_per_worker(config: dict) -> None:
    """config: spec (JobSpec), task (its kd_ray.tasks object), board (console), control (cursor, stop), train_rows, fingerprint,
    local_stream (a LocalStream, or None for the Ray Data stream), eval_rows, rollouts (on-policy: kd_ray.rollouts.actor.RolloutActors)."""
    try:
        Trainer(config).run()
    except Exception as e:
        # Ray restarts the group up to run.max_failures times (forever with -1) and says why only
        # after the last: the driver shows each failure's reason as it happens.
        try:
            ray.get(config["board"].push.remote({"kind": "error", "rank": ray.train.get_context().get_world_rank(),
                                                 "message": reason(e)}), timeout=10)
        except Exception:  # the board is only told; the error itself goes on to Ray
            pass
        raise


class Trainer:
    def __init__(self, config: dict):
        self.spec: JobSpec = config["spec"]
        self.board, self.control, self.config = config["board"], config["control"], config
        make_importable(self.spec.job_dir)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        t = self.spec.train
        # Re-derived at every (re)start from the world size of this attempt: the global batch, and
        # so what each optimizer step trains on, never changes.
        self.plan = batch_plan.plan(config["train_rows"], t.global_batch_size, t.micro_batch_size, self.world, t.epochs, t.max_steps)
        self.task, self.callbacks = config["task"], Callbacks(self.spec)
        self.timer, self.meter = Timer(self.spec.checkpoint.every_minutes), Meter(self.device)
        self.step = self.samples = self.micro = 0
        self.last_eval: dict = {}
        self.preempt_saved = False
        self.stop_query = None  # rank 0's question to the run's control, in flight between polls
        self.poll_every = self.spec.checkpoint.poll_every_steps or POLL_STEPS

    def say(self, kind: str, **fields) -> None:
        if self.rank == 0:
            self.board.push.remote({"kind": kind, **fields})

    # ---------------------------------------------------------------------------- set up, restore

    def set_up(self) -> None:
        t = self.spec.train
        if self.spec.run.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        student = self.task.build_student(self.device)
        model = wrap(student, t.strategy, t.precision, self.device, self.task.fsdp_units(student), t.activation_checkpointing)
        self.model = torch.compile(model, mode=t.compile) if t.compile else model
        self.optimizer = make_optimizer(self.model.parameters(), t.optimizer.model_dump(), self.device)
        self.scheduler = make_scheduler(self.optimizer, t.schedule.model_dump(), self.plan.total_steps)
        self.scaler = grad_scaler(t.precision, self.device)
        self.teacher = teacher_in_trainer(self.spec, self.task, self.device)
        onpolicy = rollouts_in_trainer(self.spec, self.device, self.config.get("rollouts"), self.control, self.rank, self.model,
                                       self.plan.accumulation, self.config.get("eval_rows", 0), self.teacher)
        # On-policy, the rollout and teacher actors are the teacher's signal, and the weights they generate from are published.
        self.teacher, self.rollouts = (onpolicy, onpolicy) if onpolicy else (self.teacher, NoRollouts())

    def restore(self) -> bool:
        """Load the newest whole checkpoint, if any; set the data cursor. Returns whether it resumed."""
        chosen, skipped = checkpoint.pick(self.spec.run_dir)
        for path, why in skipped:
            self.say("warning", message=f"checkpoint {path} cannot be used ({why}); "
                     + (f"resuming from {chosen} instead" if chosen else "no earlier checkpoint is whole: starting at step 0"))
        if chosen:
            counters = checkpoint.restore(chosen, self.model, self.optimizer, self.scheduler, self.scaler)
            self.step, self.samples = counters["step"], counters["samples"]
        self.resumed_step, self.resumed_samples = self.step, self.samples
        self.set_cursor()
        return chosen is not None

    @property
    def position(self) -> int:
        return self.step * self.plan.global_batch

    def set_cursor(self) -> None:
        """The stream (re-executed from the top by Ray after any restart) starts at the cursor.
        The broadcast is also the barrier that holds every rank back from the stream until it
        is set, and every rank must have restored the same step (a rank that reads the stream
        itself would not show a mismatch in its order check, which counts from its own step)."""
        if self.rank == 0:
            ray.get(self.control.set_cursor.remote(self.position))
        agreed = broadcast_from_rank_zero(self.position)
        if agreed != self.position:
            raise RuntimeError(f"rank {self.rank} restored step {self.step} but rank 0 restored position {agreed}: the "
                               "workers read different checkpoints; restart the run to resume from one")

    def announce(self, resumed: bool) -> None:
        p = self.plan
        self.say("start", world_size=self.world, accumulation=p.accumulation, total_steps=p.total_steps,
                 steps_per_epoch=p.steps_per_epoch, resumed_step=self.step if resumed else None, position=self.position)
        self.callbacks.on_start(StartInfo(self.rank, self.world, p.accumulation, self.step, p.total_steps, self.spec.run_dir))

    # ---------------------------------------------------------------------------- the run

    def run(self) -> None:
        self.set_up()
        self.announce(self.restore())
        self.rollouts.start(self.step)  # on-policy: the weights the first steps generate from, before the stream starts
        t = self.spec.train
        per_block = batch_plan.micro_batches_per_block(t.global_batch_size, t.micro_batch_size, *t.worker_range)
        batches = rank_batches(self.config.get("local_stream"), self.position, self.rank, self.world, self.plan.micro_batch,
                               per_block, t.prefetch_batches, self.device)
        self.order = batches.order
        self.score_teacher()
        self.logged_step = self.step
        self.profiler = StepProfiler(self.spec.profile, self.spec.run_dir, self.rank, self.device, self.step)
        try:
            stopped = self.train(batches)
        finally:
            self.profiler.close()
            batches.close()  # a local reader's thread stops here, not at the worker's exit
        if not stopped and self.step < self.plan.total_steps:  # never a final checkpoint of a plan not trained
            raise RuntimeError(f"the data stream ended at step {self.step}, before the plan's last step {self.plan.total_steps}")
        if not stopped:
            self.finish()

    def train(self, batches) -> bool:
        """Micro-steps until the plan's last step; True if a stop request ended it first."""
        # The teacher's time is the step's, not a wait for data: it runs outside the meter's clock.
        for batch, denominator in self.step_batches(self.teacher.signal(self.meter.timed(batches), self.meter)):
            if not self.micro_step(batch, denominator):
                continue
            lr, grad_norm = self.optimizer_step()
            if self.after_step(lr, grad_norm):
                return True
        return False

    def step_batches(self, batches):
        """(micro-batch, loss denominator) until the plan's last step. The denominator makes each
        step's gradient the mean over the global batch's loss units (DDP and FSDP2 average over
        ranks): its samples, known in advance (plan.loss_denominator), or its loss tokens, counted
        over the step's micro-batches on every rank (one all-reduce) before the first backward."""
        it, accumulation = iter(batches), self.plan.accumulation
        while self.step < self.plan.total_steps:  # every rank reaches the last step on the same micro-batch
            group = [b for _, b in zip(range(accumulation), it)]
            if len(group) < accumulation:
                return
            denominator = (self.plan.loss_denominator if self.task.fixed_count else
                           global_denominator([self.task.count(b).to(self.device) for b in group], self.world))
            yield from ((b, denominator) for b in group)

    def micro_step(self, batch: dict, denominator) -> bool:
        """One micro-batch's forward and backward; True on the accumulation boundary."""
        accumulation = self.plan.accumulation
        if self.micro % accumulation == 0:
            seed_torch(step_seed(self.spec.run.seed, self.step, self.rank), self.device)  # RNG (dropout...) is a function of the step
        boundary = (self.micro + 1) % accumulation == 0
        with grad_sync(self.model, boundary):  # gradients stay local before the accumulation boundary
            terms = self.task.micro_step(self.model, batch, denominator, self.device, self.scaler)
        # A fixed-count task's loss units are the micro-batch's samples: a number, no tensor made per micro-step
        self.meter.add(terms, self.plan.micro_batch if self.task.fixed_count else self.task.count(batch))
        if self.callbacks:
            self.callbacks.on_batch(batch)
        self.micro += 1
        return boundary

    def optimizer_step(self) -> tuple[float, torch.Tensor]:
        lr = self.scheduler.get_last_lr()[0]  # the LR this update uses
        grad_norm = optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.spec.train.grad_clip)
        self.step += 1
        self.samples += self.plan.global_batch
        self.rollouts.after_step(self.step)
        if self.step == self.resumed_step + 1:
            self.say(FIRST_STEP, step=self.step)
        self.callbacks.on_step_end(self.step)
        self.profiler.after_step(self.step)
        return lr, grad_norm

    def after_step(self, lr: float, grad_norm: torch.Tensor) -> bool:
        """Log, evaluate, checkpoint and poll as the step calls for; True to stop now."""
        p, step = self.plan, self.step
        epoch_ended = p.epochs_done(step) > p.epochs_done(step - 1)
        last = step == p.total_steps
        if step % self.spec.train.log_every == 0 or epoch_ended or last:
            self.log(lr, grad_norm)
        every = self.spec.eval.every_epochs
        if last or (epoch_ended and every and p.epochs_done(step) % every == 0):
            self.evaluate()
        if last:
            return False
        if self.spec.checkpoint.every_steps and step % self.spec.checkpoint.every_steps == 0:
            self.save(False, {})
        return step % self.poll_every == 0 and self.poll()

    # ---------------------------------------------------------------------------- log, evaluate

    def log(self, lr: float, grad_norm: torch.Tensor) -> None:
        kd, ce, correct, count, wait, teacher, elapsed = self.meter.collect(self.world)  # the one sync per log line
        has_teacher = self.spec.teacher is not None
        alpha = self.spec.distill.alpha if has_teacher else 0.0
        p = self.plan
        self.say("train", epoch=self.position / p.train_rows, step=self.step, total_steps=p.total_steps,
                 loss=mix(kd, ce, alpha) / count, kd_loss=kd / count if has_teacher else None,
                 ce_loss=ce / count, train_accuracy=correct / count, lr=lr,
                 grad_norm=float(grad_norm), samples_per_second=count / elapsed, unit=self.task.unit,
                 data_wait_seconds=wait, teacher_seconds=teacher if self.spec.colocated_teacher else None,
                 window_seconds=elapsed, window_steps=self.step - self.logged_step, samples=self.samples,
                 startup=self.logged_step == self.resumed_step)  # this window includes the stream's start
        if self.spec.checkpoint.poll_every_steps is None:
            self.poll_every = poll_every(elapsed, self.step - self.logged_step)
        self.logged_step = self.step

    def score_teacher(self) -> None:
        """A teacher colocated in the workers is scored on the eval split here, at each start of
        the group, as the driver scores a pool's (kd_ray.job.score_teacher) with the same sums."""
        sums = self.teacher.scores(self.eval_batches(), self.task, self.device)
        if sums is not None:
            scores = self.task.teacher_figures(all_reduce_sum(sums).tolist())
            self.say("teacher", step=self.step, line=self.task.teacher_line(scores), **scores)

    def eval_batches(self):
        return eval_batches(self.config.get("local_stream"), self.rank, self.world, self.spec.eval.batch_size, self.device)

    def evaluate(self) -> None:
        sync_buffers(self.model, self.spec.train.strategy)
        self.rollouts.before_eval(self.step)
        # On-policy, also the student's rollouts of held-out prompts, as the teacher scores them.
        self.last_eval = evaluate(self.model, self.task, self.eval_batches(), self.device,
                                  self.teacher.evaluation if self.spec.onpolicy else None)
        self.say("eval", epoch=self.plan.epochs_done(self.step), step=self.step, **self.last_eval)

    # ---------------------------------------------------------------------------- checkpoint, poll

    def save(self, final: bool, metrics: dict, why: str = "every") -> None:
        self.order.verify()
        sync_buffers(self.model, self.spec.train.strategy)
        p, s = self.plan, self.spec
        info = {"model": s.student.model, "kwargs": s.student.kwargs, "step": self.step, "metrics": metrics}
        resume = {"fingerprint": self.config["fingerprint"], "position": self.position,
                  "epoch": self.position // p.train_rows, "world_size": self.world, "accumulation": p.accumulation,
                  "rng": f"re-seeded from (run.seed={s.run.seed}, step, rank) at every step", "reason": why}
        if self.rank == 0:  # the records of the steps this checkpoint holds are in metrics.jsonl before it is
            ray.get(self.board.written.remote())
        with tempfile.TemporaryDirectory() as d:
            counters = {"step": self.step, "samples": self.samples}
            wrote = checkpoint.write(d, self.model, self.optimizer, self.scheduler, self.scaler, counters, info, resume,
                                     export=self.task.export if final else None)
            ray.train.report({**metrics, "step": self.step, "final": final},
                             checkpoint=ray.train.Checkpoint.from_directory(d) if wrote else None)
        self.rollouts.saved(self.step)
        self.timer.reset()

    def poll(self) -> bool:
        """A preemption notice, a stop request or the checkpoint timer; True to stop now. Every
        rank takes the same branch: the flags are rank 0's, shared by one all-reduce."""
        preempted = ray.train.get_preemption_info()  # a barrier across the group
        lead = self.rank == 0
        flags = torch.tensor([float(lead and self.stop_requested()), float(lead and self.timer.due())],
                             dtype=torch.float64, device=self.device)
        stop, due = (v > 0 for v in all_reduce_sum(flags).tolist())
        if preempted is not None and not self.preempt_saved:
            self.save(False, {}, why="preemption")
            self.preempt_saved = True
            self.say("warning", message=f"node(s) {', '.join(preempted.preempted_node_ids)} will be preempted: "
                     f"checkpoint taken at step {self.step}")
        elif stop:
            self.save(False, {}, why="stop")
            self.say("stopped", step=self.step)
            return True
        elif due:
            self.save(False, {}, why="timer")
        return False

    def stop_requested(self) -> bool:
        """Rank 0: whether the run's control holds a stop request, without waiting on the actor:
        the answer to the question asked at an earlier poll, and the question asked again. A stop
        lands a poll later; a small student no longer waits on an actor call every few steps."""
        if self.stop_query is not None:
            ready, _ = ray.wait([self.stop_query], timeout=0)
            if not ready:
                return False
            if ray.get(self.stop_query):
                return True
        self.stop_query = self.control.stop_requested.remote()
        return False

    def finish(self) -> None:
        self.save(True, {**self.last_eval, "samples": self.samples}, why="final")
        if self.rank == 0:  # waited for: the driver reads "done" to call the run finished
            ray.get(self.board.push.remote({"kind": "done", "step": self.step, "samples": self.samples,
                                            "resumed_samples": self.resumed_samples}))


def evaluate(model: torch.nn.Module, task, batches, device: torch.device, rolled=None) -> dict:
    """The student's scores on this rank's eval batches, summed over ranks (on-policy, `rolled` adds its rollouts of held-out prompts)."""
    if rolled is not None:
        batches = rolled(batches)
    return task.figures(all_reduce_sum(task.eval_sums(model, batches, device)).tolist())
