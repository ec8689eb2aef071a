"""The per-worker training loop that Ray Train runs on every student worker.

Reads top to bottom as a recipe: build the student, wrap it, then for each epoch stream
(inputs, teacher logits) batches from this worker's shard, take micro-steps, update on the
accumulation boundary, log, checkpoint, evaluate, and finally export the student.
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
from kd_ray.train.parallel import all_reduce_sum, wrap
from kd_ray.train.precision import grad_scaler
from kd_ray.train.step import micro_step, optimizer_step, student_eval_sums, teacher_eval_sums
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
    plan = batching.plan(config["train_rows"], train["global_batch_size"], train["micro_batch_size"], world, train["epochs"], train["max_steps"])
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

    step, start_epoch, samples = 0, 0, 0
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            counters = checkpoint.restore(d, model, optimizer, scheduler, scaler)
        step, start_epoch, samples = counters["step"], counters["epoch"], counters["samples"]
    say("start", world_size=world, accumulation=plan.accumulation, total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch, resumed_step=step if resumed else None)

    def save(final: bool, metrics: dict) -> None:
        info = {"model": spec["student"]["model"], "kwargs": spec["student"]["kwargs"], "step": step, "metrics": metrics}
        with tempfile.TemporaryDirectory() as d:
            wrote = checkpoint.write(d, model, optimizer, scheduler, scaler, {"step": step, "epoch": epoch + (1 if final or epoch_done else 0), "samples": samples}, info)
            ckpt = ray.train.Checkpoint.from_directory(d) if wrote else None
            ray.train.report({**metrics, "step": step, "final": final}, checkpoint=ckpt)

    train_shard = ray.train.get_dataset_shard("train")
    eval_every = spec["eval"]["every_epochs"]
    teacher_scored = not has_teacher
    last_eval: dict = {}
    epoch, epoch_done = start_epoch, False
    for epoch in range(start_epoch, plan.epochs):
        epoch_done = False
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # kd, ce, correct, count
        micro, epoch_steps, window_samples = 0, 0, 0
        window_start = time.perf_counter()
        wait = 0.0
        fetch_start = time.perf_counter()
        for batch in train_shard.iter_torch_batches(
            batch_size=plan.micro_batch, drop_last=True, device=device,
            prefetch_batches=train["prefetch_batches"], pin_memory=device.type == "cuda",
            local_shuffle_buffer_size=plan.micro_batch * 16 if spec["data"]["shuffle"] == "local" else None,
        ):
            wait += time.perf_counter() - fetch_start
            if epoch_steps >= plan.steps_per_epoch or step >= plan.total_steps:
                # Micro-batches past the last full global batch: drained so every rank ends the
                # epoch's stream together, but not trained on.
                fetch_start = time.perf_counter()
                continue
            boundary = (micro + 1) % plan.accumulation == 0
            terms = micro_step(
                model, batch, temperature=distill["temperature"], alpha=distill["alpha"],
                denominator=plan.loss_denominator, precision=train["precision"], device=device,
                scaler=scaler, sync=boundary,
            )
            sums += torch.stack([terms.kd_sum.double(), terms.ce_sum.double(), terms.correct.double(),
                                 torch.tensor(plan.micro_batch, dtype=torch.float64, device=device)])
            micro += 1
            if boundary:
                grad_norm = optimizer_step(model, optimizer, scheduler, scaler, train["grad_clip"])
                step += 1
                epoch_steps += 1
                samples += plan.global_batch
                window_samples += plan.global_batch
                if step % train["log_every"] == 0 or epoch_steps == plan.steps_per_epoch or step == plan.total_steps:
                    kd, ce, correct, count = all_reduce_sum(sums.clone()).tolist()  # the one sync per log line
                    elapsed = time.perf_counter() - window_start
                    wait_all = all_reduce_sum(torch.tensor([wait], dtype=torch.float64, device=device)).item() / world
                    say("train", epoch=epoch, step=step, total_steps=plan.total_steps,
                        loss=(distill["alpha"] * kd + (1 - distill["alpha"]) * ce) / count if has_teacher else ce / count,
                        kd_loss=kd / count if has_teacher else None, ce_loss=ce / count, train_accuracy=correct / count,
                        lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), samples_per_second=window_samples / elapsed,
                        data_wait_seconds=wait_all, samples=samples)
                    sums.zero_()
                    window_samples, wait, window_start = 0, 0.0, time.perf_counter()
                every = spec["checkpoint"]["every_steps"]
                if every and step % every == 0 and step < plan.total_steps:
                    save(False, {})
            fetch_start = time.perf_counter()

        epoch_done = True
        last_epoch = epoch == plan.epochs - 1 or step >= plan.total_steps
        if last_epoch or (eval_every and (epoch + 1) % eval_every == 0):
            last_eval = evaluate(model, spec, device, epoch)
            if not teacher_scored:
                last_eval.update(evaluate_teacher(device))
                teacher_scored = True
            say("eval", epoch=epoch, step=step, **last_eval)
        if step >= plan.total_steps:
            break

    save(True, {**last_eval, "samples": samples, "epochs": epoch + 1})
    say("done", step=step, samples=samples)


def evaluate(model: torch.nn.Module, spec: dict, device: torch.device, epoch: int) -> dict:
    shard = ray.train.get_dataset_shard("eval")
    batches = shard.iter_torch_batches(batch_size=spec["eval"]["batch_size"], device=device)
    loss, correct, count = all_reduce_sum(student_eval_sums(model, batches, spec["train"]["precision"], device)).tolist()
    return {"eval_loss": loss / max(count, 1), "eval_accuracy": correct / max(count, 1), "eval_samples": int(count)}


def evaluate_teacher(device: torch.device) -> dict:
    shard = ray.train.get_dataset_shard("teacher_eval")
    batches = shard.iter_torch_batches(batch_size=512, device=device)
    loss, correct, count = all_reduce_sum(teacher_eval_sums(batches, device)).tolist()
    return {"teacher_eval_loss": loss / max(count, 1), "teacher_eval_accuracy": correct / max(count, 1)}

