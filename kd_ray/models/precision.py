"""The dtype policy: the one place that decides autocast, GradScaler and FSDP2 mixed precision."""

from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively: a GPU that has bf16, a CPU with AMX tiles.
    Without AMX, a CPU runs bf16 far slower than fp32 (a SmolLM2-135M forward on one thread of a
    2-core AVX512 machine: 56-59 tokens/s against 191-229 in fp32); with it, several times faster.
    torch's get_cpu_capability() says AVX512 on both, so the CPU's own flag is asked."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, present since torch 2.2
    return device.type == "cpu" and amx is not None and bool(amx())


def resolve(precision: str, device: torch.device) -> str:
    """A teacher's precision on `device`: `auto` is bf16 where it is native, else fp16 on a GPU and
    fp32 on a CPU; any other precision is itself."""
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device):
    """Autocast for the forward pass; fp32 runs plain. Losses switch it off themselves (fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return None


def fsdp_policy(precision: str):
    """FSDP2: compute in the low precision, reduce gradients in fp32 for an exact average."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)


def auto_note(precision: str, gpus: float) -> str | None:
    """What `auto` becomes for a teacher on this machine's CPU (gpus 0), or on GPUs, in words;
    None for a precision given outright."""
    if precision != "auto":
        return None
    if gpus:
        return "teacher precision: auto -> bf16 on GPUs that compute it, fp16 on older ones"
    chosen = resolve("auto", torch.device("cpu"))
    why = "this CPU has bf16 matrix units (AMX)" if chosen == "bf16" else "this CPU has no bf16 matrix units (AMX): bf16 would be slower"
    return f"teacher precision: auto -> {chosen} ({why})"
