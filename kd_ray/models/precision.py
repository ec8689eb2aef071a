"""The dtype policy: the one place that decides autocast, GradScaler and FSDP2 mixed precision."""

from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
