"""The training step on CPU with torch.compile and with bf16 autocast, without Ray."""

from __future__ import annotations

import copy

import torch

from kd_ray.models import mlp
from kd_ray.models.precision import grad_scaler
from kd_ray.tasks.classify import micro_step
from kd_ray.train.optim import make_optimizer, make_scheduler
from kd_ray.train.step import optimizer_step

OPT = {"name": "adamw", "lr": 0.01, "weight_decay": 0.0, "betas": (0.9, 0.999), "momentum": 0.9}
SCHEDULE = {"warmup_steps": 0, "min_lr_ratio": 0.0}


def batches(n=3, size=16):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(size, 64, generator=g), "teacher_logits": torch.randn(size, 10, generator=g) * 3,
             "y": torch.randint(0, 10, (size,), generator=g)} for _ in range(n)]


def train(model, precision, data):
    device = torch.device("cpu")
    optimizer = make_optimizer(model.parameters(), OPT, device)
    scheduler = make_scheduler(optimizer, SCHEDULE, total_steps=len(data))
    losses = []
    for batch in data:
        terms = micro_step(model, batch, temperature=4.0, alpha=0.7, denominator=16, precision=precision,
                           device=device, scaler=grad_scaler(precision, device))
        assert terms.loss.dtype == torch.float32  # the loss is fp32 whatever the forward ran in
        optimizer_step(model, optimizer, scheduler, None, grad_clip=1.0)
        losses.append(terms.loss.detach())
    return torch.stack(losses)


def test_compiled_student_trains_like_eager():
    torch.manual_seed(0)
    eager = mlp(hidden=32, depth=1)
    compiled_base = copy.deepcopy(eager)
    data = batches()
    eager_losses = train(eager, "fp32", data)
    compiled_losses = train(torch.compile(compiled_base, mode="default"), "fp32", data)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled_base.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    torch.manual_seed(0)
    fp32 = mlp(hidden=32, depth=1)
    bf16 = copy.deepcopy(fp32)
    data = batches()
    ref, low = train(fp32, "fp32", data), train(bf16, "bf16", data)
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05)
    assert grad_scaler("bf16", torch.device("cpu")) is None  # bf16 has fp32's range: no scaler


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    """`auto`: bf16 on a CPU with AMX tiles (or a GPU with bf16), else fp32 on a CPU; a precision
    given outright is kept. torch says AVX512 on CPUs with and without AMX, so the flag decides."""
    from kd_ray.models import precision

    cpu = torch.device("cpu")
    for amx, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert precision.resolve("auto", cpu) == want
        assert precision.auto_note("auto", 0).startswith(f"teacher precision: auto -> {want} (")
        assert precision.resolve("bf16", cpu) == "bf16" and precision.resolve("fp32", cpu) == "fp32"
    assert precision.auto_note("fp32", 0) is None and "GPUs" in precision.auto_note("auto", 1)
