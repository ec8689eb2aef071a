"""The per-worker training loop that Ray Train runs on every student worker.

Reads top to bottom as a recipe: build the student, wrap it, restore the newest whole checkpoint
and set the data cursor, then stream (inputs, teacher logits) micro-batches, the rest of the run
in order, from this worker's shard of the Ray Data stream (or read them itself: a LocalStream of
kd_ray.data.pipeline), take micro-steps, update on the accumulation boundary, log, evaluate at
the end of each epoch, checkpoint (every N steps or M minutes, on preemption notice, on a stop
request), and finally export the student.

Ray Train re-runs this function from the top after any failure or resize, with whatever world
size it got: everything a restart needs is in the checkpoint and the cursor.
"""

from __future__ import annotations

import tempfile
import time
import uuid

import numpy as np
import ray.train
import ray.train.torch
from ray.train.collective import broadcast_from_rank_zero
import torch

from kd_ray import batching
from kd_ray.data import ID, POS, pipeline
from kd_ray.data.ids import mix64
from kd_ray.errors import reason
from kd_ray.models import is_conv_net
from kd_ray.registry import build_model, make_importable
from kd_ray.train import checkpoint
from kd_ray.train.optim import make_optimizer, make_scheduler
from kd_ray.train.parallel import all_reduce_sum, sync_buffers, wrap
from kd_ray.train.precision import grad_scaler
from kd_ray.train.profile import StepProfiler
from kd_ray.train.step import micro_step, optimizer_step, student_eval_sums
from kd_ray.weights import load_into


def build_student(spec: dict, device: torch.device) -> torch.nn.Module:
    # The same seed on every rank: FSDP2 does not broadcast rank 0's initial weights as DDP does.
    torch.manual_seed(spec["run"]["seed"])
    student = build_model(spec["student"]["model"], spec["student"]["kwargs"], spec["job_dir"])
    if spec["student"]["weights"]:
        load_into(student, spec["student"]["weights"])
    student.to(device)
    if device.type == "cuda" and is_conv_net(student):
        student.to(memory_format=torch.channels_last)
    return student


def local_batches(stream, start: int, rank: int, world: int, micro_batch: int, prefetch: int):
    """This rank's micro-batches of a LocalStream (CPU runs only) as tensors, made `prefetch`
    ahead by a background thread, as Ray Data's iterator would."""

    def to_torch(rows: dict) -> dict:
        return {k: torch.from_numpy(v) for k, v in rows.items()}

    return pipeline.prefetched(map(to_torch, pipeline.rank_micro_batches(stream, start, rank, world, micro_batch)), prefetch)


def train_loop_per_worker(config: dict) -> None:
    try:
        _train(config)
    except Exception as e:
        # Ray restarts the group up to run.max_failures times (forever with -1) and says why only
        # after the last: the driver shows each failure's reason as it happens.
        try:
            ray.get(config["board"].push.remote({"kind": "error", "rank": ray.train.get_context().get_world_rank(),
                                                 "message": reason(e)}), timeout=10)
        except Exception:  # the board is only told; the error itself goes on to Ray
            pass
        raise


def _train(config: dict) -> None:
    spec, board = config["spec"], config["board"]
    make_importable(spec["job_dir"])
    train, distill, run = spec["train"], spec["distill"], spec["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Re-derived at every (re)start from the world size of this attempt: the global batch, and
    # so what each optimizer step trains on, never changes.
    plan = batching.plan(config["train_rows"], train["global_batch_size"], train["micro_batch_size"], world,
                         train["epochs"], train["max_steps"])
    has_teacher = spec["teacher"] is not None
    faults = Faults(config.get("test", {}), rank, world)
    if run["deterministic"]:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    def say(kind: str, **fields) -> None:
        if rank == 0:
            board.push.remote({"kind": kind, **fields})

    model = wrap(build_student(spec, device), train["strategy"], train["precision"], device)
    if train["compile"]:
        model = torch.compile(model, mode=train["compile"])
    optimizer = make_optimizer(model.parameters(), train["optimizer"], device)
    scheduler = make_scheduler(optimizer, train["schedule"], plan.total_steps)
    scaler = grad_scaler(train["precision"], device)

    step, samples = 0, 0
    chosen, skipped = checkpoint.pick(config["run_dir"])
    for path, why in skipped:
        say("warning", message=f"checkpoint {path} cannot be used ({why}); "
            + (f"resuming from {chosen} instead" if chosen else "no earlier checkpoint is whole: starting at step 0"))
    if chosen:
        counters = checkpoint.restore(chosen, model, optimizer, scheduler, scaler)
        step, samples = counters["step"], counters["samples"]
    resumed_samples = samples
    # The data cursor: the stream (re-executed from the top by Ray after any restart) starts here.
    if rank == 0:
        ray.get(board.set_cursor.remote(step * plan.global_batch))
    # Also the barrier that holds every rank back from the stream until the cursor is set. Every
    # rank must have restored the same step (a rank that read the stream itself would not show a
    # mismatch in its order check, which counts from its own step).
    faults.attempt, position = broadcast_from_rank_zero((uuid.uuid4().hex[:12], step * plan.global_batch))
    if position != step * plan.global_batch:
        raise RuntimeError(f"rank {rank} restored step {step} but rank 0 restored position {position}: the "
                           "workers read different checkpoints; restart the run to resume from one")
    say("start", world_size=world, accumulation=plan.accumulation, total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch, resumed_step=step if chosen else None, position=step * plan.global_batch)

    def save(final: bool, metrics: dict, why: str = "every") -> None:
        check_order()
        sync_buffers(model, train["strategy"])
        info = {"model": spec["student"]["model"], "kwargs": spec["student"]["kwargs"], "step": step, "metrics": metrics}
        resume = {"fingerprint": config["fingerprint"], "position": step * plan.global_batch,
                  "epoch": step * plan.global_batch // plan.train_rows, "world_size": world, "accumulation": plan.accumulation,
                  "rng": f"re-seeded from (run.seed={run['seed']}, step, rank) at every step", "reason": why}
        with tempfile.TemporaryDirectory() as d:
            counters = {"step": step, "samples": samples}
            wrote = checkpoint.write(d, model, optimizer, scheduler, scaler, counters, info, resume)
            ckpt = ray.train.Checkpoint.from_directory(d) if wrote else None
            ray.train.report({**metrics, "step": step, "final": final}, checkpoint=ckpt)
        timer.reset()

    eval_every, ckpt_every, log_every = spec["eval"]["every_epochs"], spec["checkpoint"]["every_steps"], train["log_every"]
    poll_every = spec["checkpoint"]["poll_every_steps"]
    timer = Timer(spec["checkpoint"]["every_minutes"])
    meter = Meter(device)
    last_eval: dict = {}
    micro = 0
    m, stride = plan.micro_batch, plan.micro_batch * world
    # Micro-batch j of this rank must hold positions start + (j x world + rank) x m + [0, m).
    expected = torch.arange(m, device=device) + step * plan.global_batch + rank * m
    out_of_order = torch.zeros((), dtype=torch.int64, device=device)

    def check_order() -> None:
        if int(all_reduce_sum(out_of_order.double().reshape(1)).item()):
            raise RuntimeError("the data stream delivered rows out of the planned order; the data cursor cannot be trusted")

    local = config.get("local_stream")
    if local is not None:  # no teacher pool, data in memory, CPU: read here (kd_ray.data.pipeline)
        batches = local_batches(local, step * plan.global_batch, rank, world, m, train["prefetch_batches"])
    else:
        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_torch_batches(batch_size=m, drop_last=True, device=device, prefetch_batches=train["prefetch_batches"],
                                           pin_memory=device.type == "cuda")
    stopped = False
    preempt_saved = False
    logged_step = resumed_step = step
    profiler = StepProfiler(spec["profile"], config["run_dir"], rank, device, step)
    for batch in meter.timed(batches):
        if step >= plan.total_steps:
            break  # every rank reaches the last step on the same micro-batch
        out_of_order += (batch[POS] != expected).sum()
        expected += stride
        if micro % plan.accumulation == 0:
            torch.manual_seed(step_seed(run["seed"], step, rank))  # RNG (dropout...) is a function of the step
        boundary = (micro + 1) % plan.accumulation == 0
        terms = micro_step(
            model, batch, temperature=distill["temperature"], alpha=distill["alpha"],
            denominator=plan.loss_denominator, precision=train["precision"], device=device,
            scaler=scaler, sync=boundary,
        )
        meter.add(terms, plan.micro_batch)
        faults.record(batch)
        micro += 1
        if not boundary:
            continue
        lr = scheduler.get_last_lr()[0]  # the LR this update uses
        grad_norm = optimizer_step(model, optimizer, scheduler, scaler, train["grad_clip"])
        step += 1
        samples += plan.global_batch
        faults.after_step(step)
        profiler.after_step(step)
        epoch_ended = plan.epochs_done(step) > plan.epochs_done(step - 1)
        last = step == plan.total_steps
        if step % log_every == 0 or epoch_ended or last:
            kd, ce, correct, count, wait, elapsed, window = meter.collect(world)  # the one sync per log line
            alpha = distill["alpha"] if has_teacher else 0.0
            say("train", epoch=step * plan.global_batch / plan.train_rows, step=step, total_steps=plan.total_steps,
                loss=(alpha * kd + (1 - alpha) * ce) / count, kd_loss=kd / count if has_teacher else None,
                ce_loss=ce / count, train_accuracy=correct / count, lr=lr,
                grad_norm=float(grad_norm), samples_per_second=window * world / elapsed,
                data_wait_seconds=wait, window_seconds=elapsed, window_steps=step - logged_step, samples=samples,
                startup=logged_step == resumed_step)  # this window includes the stream's start
            logged_step = step
        done_epochs = plan.epochs_done(step)
        if last or (epoch_ended and eval_every and done_epochs % eval_every == 0):
            sync_buffers(model, train["strategy"])
            last_eval = evaluate(model, spec, device)
            say("eval", epoch=done_epochs, step=step, **last_eval)
        if last:
            continue
        if ckpt_every and step % ckpt_every == 0:
            save(False, {})
        if step % poll_every == 0:
            # Every rank takes the same branch: the flags are rank 0's, shared by one all-reduce.
            preempted = ray.train.get_preemption_info()  # a barrier across the group
            flags = torch.tensor([float(rank == 0 and ray.get(board.stop_requested.remote())),
                                  float(rank == 0 and timer.due())], dtype=torch.float64, device=device)
            stop, due = (v > 0 for v in all_reduce_sum(flags).tolist())
            if preempted is not None and not preempt_saved:
                save(False, {}, why="preemption")
                preempt_saved = True
                say("warning", message=f"node(s) {', '.join(preempted.preempted_node_ids)} will be preempted: "
                    f"checkpoint taken at step {step}")
            elif stop:
                save(False, {}, why="stop")
                say("stopped", step=step)
                stopped = True
                break
            elif due:
                save(False, {}, why="timer")

    profiler.close()
    if local is not None:  # its reader thread stops here, not at the worker's exit
        batches.close()
    if stopped:
        return
    save(True, {**last_eval, "samples": samples}, why="final")
    if rank == 0:  # waited for: the driver reads "done" to call the run finished
        ray.get(board.push.remote({"kind": "done", "step": step, "samples": samples, "resumed_samples": resumed_samples}))


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(mix64(np.array([step * 65_537 + rank], dtype=np.int64), seed)[0] >> np.uint64(1))


class Timer:
    """The every-M-minutes checkpoint clock (rank 0's)."""

    def __init__(self, minutes: float | None):
        self.seconds = minutes * 60 if minutes else None
        self.reset()

    def reset(self) -> None:
        self.start = time.monotonic()

    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start >= self.seconds


class Faults:
    """Test-only hooks, set through KD_RAY_TEST_* environment variables of the driver:
    die (a real process exit, no clean-up) after given steps, once each, and record the sample
    ids of every optimizer step."""

    def __init__(self, hooks: dict, rank: int, world: int):
        self.rank, self.world = rank, world
        self.die_at = {int(s) for s in hooks.get("KD_RAY_TEST_DIE_AT", "").split(",") if s}
        die_rank = int(hooks.get("KD_RAY_TEST_DIE_RANK", "-1"))
        self.die_rank = die_rank if die_rank >= 0 else world - 1
        self.marks = hooks.get("KD_RAY_TEST_MARKS")
        self.trace = hooks.get("KD_RAY_TEST_TRACE")
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.attempt = ""

    def record(self, batch: dict) -> None:
        if self.trace:
            self.ids += batch[ID].tolist()
            self.positions += batch[POS].tolist()

    def after_step(self, step: int) -> None:
        import json
        import os

        if self.trace:
            with open(os.path.join(self.trace, f"rank{self.rank}.jsonl"), "a") as f:
                line = {"step": step, "ids": self.ids, "positions": self.positions, "attempt": self.attempt, "time": time.time(),
                        "world": self.world}
                f.write(json.dumps(line) + "\n")
            self.ids, self.positions = [], []
        if step in self.die_at and self.rank == self.die_rank and self.marks:
            mark = os.path.join(self.marks, f"died_at_{step}")
            if not os.path.exists(mark):
                open(mark, "w").close()
                os._exit(1)


class Meter:
    """Training sums and timings between two log lines, kept on the device until collected."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # kd, ce, correct, count
        self.wait = 0.0
        self.start = time.perf_counter()
        self.window = 0

    def timed(self, batches):
        """Yield batches, adding up the time spent waiting for each."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield batch

    def add(self, terms, n: int) -> None:
        self.sums += torch.stack([terms.kd_sum.double(), terms.ce_sum.double(), terms.correct.double(),
                                  torch.tensor(n, dtype=torch.float64, device=self.device)])
        self.window += n

    def collect(self, world: int) -> tuple:
        """All-reduce the window over ranks and reset it: (kd, ce, correct, count, mean data wait,
        seconds, samples on this rank)."""
        packed = torch.cat([self.sums, torch.tensor([self.wait], dtype=torch.float64, device=self.device)])
        kd, ce, correct, count, wait = all_reduce_sum(packed).tolist()
        out = (kd, ce, correct, count, wait / world, time.perf_counter() - self.start, self.window)
        self.sums.zero_()
        self.wait, self.window, self.start = 0.0, 0, time.perf_counter()
        return out


def evaluate(model: torch.nn.Module, spec: dict, device: torch.device) -> dict:
    shard = ray.train.get_dataset_shard("eval")
    batches = shard.iter_torch_batches(batch_size=spec["eval"]["batch_size"], device=device)
    loss, correct, count = all_reduce_sum(student_eval_sums(model, batches, spec["train"]["precision"], device)).tolist()
    return {"eval_loss": loss / max(count, 1), "eval_accuracy": correct / max(count, 1), "eval_samples": int(count)}
