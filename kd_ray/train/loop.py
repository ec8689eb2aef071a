"""The per-worker training loop that Ray Train runs on every student worker.

Reads top to bottom as a recipe: build the student, wrap it, then stream (inputs, teacher
logits) micro-batches from this worker's shard (every pass over the data, in order), take
micro-steps, update on the accumulation boundary, log, evaluate at the end of each epoch,
checkpoint, and finally export the student.
"""

from __future__ import annotations

import tempfile
import time

import ray.train
import ray.train.torch
import torch

from kd_ray import batching
from kd_ray.models import is_conv_net
from kd_ray.registry import build_model, make_importable
from kd_ray.train import checkpoint
from kd_ray.train.optim import make_optimizer, make_scheduler
from kd_ray.train.parallel import all_reduce_sum, sync_buffers, wrap
from kd_ray.train.precision import grad_scaler
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


def train_loop_per_worker(config: dict) -> None:
    spec, board = config["spec"], config["board"]
    make_importable(spec["job_dir"])
    train, distill = spec["train"], spec["distill"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    plan = batching.plan(config["train_rows"], train["global_batch_size"], train["micro_batch_size"], world,
                         train["epochs"], train["max_steps"], stream_per_pass=config["stream_per_pass"])
    has_teacher = spec["teacher"] is not None

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
    resumed_samples = 0
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            counters = checkpoint.restore(d, model, optimizer, scheduler, scaler)
        step, samples = counters["step"], counters["samples"]
    resumed_samples = samples
    say("start", world_size=world, accumulation=plan.accumulation, total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch, resumed_step=step if resumed else None)

    def save(final: bool, metrics: dict) -> None:
        sync_buffers(model, train["strategy"])
        info = {"model": spec["student"]["model"], "kwargs": spec["student"]["kwargs"], "step": step, "metrics": metrics}
        with tempfile.TemporaryDirectory() as d:
            wrote = checkpoint.write(d, model, optimizer, scheduler, scaler, {"step": step, "samples": samples}, info)
            ckpt = ray.train.Checkpoint.from_directory(d) if wrote else None
            ray.train.report({**metrics, "step": step, "final": final}, checkpoint=ckpt)

    eval_every, ckpt_every, log_every = spec["eval"]["every_epochs"], spec["checkpoint"]["every_steps"], train["log_every"]
    meter = Meter(device)
    last_eval: dict = {}
    micro = 0
    shard = ray.train.get_dataset_shard("train")
    local = spec["data"]["shuffle"] == "local"

    def stream():
        """Every remaining pass, in order: one stream, or (parquet) one stream per pass."""
        rounds = plan.passes - config["first_epoch"] if config["stream_per_pass"] else 1
        for _ in range(rounds):
            yield from shard.iter_torch_batches(
                batch_size=plan.micro_batch, drop_last=True, device=device,
                prefetch_batches=train["prefetch_batches"], pin_memory=device.type == "cuda",
                local_shuffle_buffer_size=plan.micro_batch * 16 if local else None,
                local_shuffle_seed=spec["run"]["seed"] if local else None,
            )

    for batch in meter.timed(stream()):
        if step >= plan.total_steps:
            break  # every rank reaches the last step on the same micro-batch
        boundary = (micro + 1) % plan.accumulation == 0
        terms = micro_step(
            model, batch, temperature=distill["temperature"], alpha=distill["alpha"],
            denominator=plan.loss_denominator, precision=train["precision"], device=device,
            scaler=scaler, sync=boundary,
        )
        meter.add(terms, plan.micro_batch)
        micro += 1
        if not boundary:
            continue
        lr = scheduler.get_last_lr()[0]  # the LR this update uses
        grad_norm = optimizer_step(model, optimizer, scheduler, scaler, train["grad_clip"])
        step += 1
        samples += plan.global_batch
        epoch_ended = plan.epochs_done(step) > plan.epochs_done(step - 1)
        last = step == plan.total_steps
        if step % log_every == 0 or epoch_ended or last:
            kd, ce, correct, count, wait, elapsed, window = meter.collect(world)  # the one sync per log line
            alpha = distill["alpha"] if has_teacher else 0.0
            say("train", epoch=step * plan.global_batch / plan.train_rows, step=step, total_steps=plan.total_steps,
                loss=(alpha * kd + (1 - alpha) * ce) / count, kd_loss=kd / count if has_teacher else None,
                ce_loss=ce / count, train_accuracy=correct / count, lr=lr,
                grad_norm=float(grad_norm), samples_per_second=window * world / elapsed,
                data_wait_seconds=wait, samples=samples)
        done_epochs = plan.epochs_done(step)
        if last or (epoch_ended and eval_every and done_epochs % eval_every == 0):
            sync_buffers(model, train["strategy"])
            last_eval = evaluate(model, spec, device)
            say("eval", epoch=done_epochs, step=step, **last_eval)
        if ckpt_every and step % ckpt_every == 0 and not last:
            save(False, {})

    save(True, {**last_eval, "samples": samples})
    if rank == 0:  # waited for: the driver reads "done" to call the run finished
        ray.get(board.push.remote({"kind": "done", "step": step, "samples": samples, "resumed_samples": resumed_samples}))


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
