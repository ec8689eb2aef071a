"""Checkpoint layout: the one place that knows what a kd_ray checkpoint directory holds.

    student.safetensors   the full student weights (gathered from FSDP2 shards)
    student.json          model spec and metrics (what `kd-ray eval` and users read)
    train_state.pt        optimizer, LR scheduler, GradScaler and counters (for resume)
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

from kd_ray import weights
from kd_ray.train.parallel import unwrap

STUDENT_WEIGHTS = "student.safetensors"
STUDENT_INFO = "student.json"
TRAIN_STATE = "train_state.pt"


def latest_step(run_dir: str) -> int:
    """The step of the checkpoint Ray Train will restore for this run directory (0 if none).

    Read from Ray's own record of registered checkpoints, so the driver can start the data
    stream at the pass that step is in, before the workers restore it.
    """
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            latest = json.load(f).get("latest_checkpoint_result") or {}
        return int(latest.get("metrics", {}).get("step", 0))
    except (OSError, ValueError, TypeError):
        return 0


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def write(directory: str, model: nn.Module, optimizer, scheduler, scaler, counters: dict, info: dict) -> bool:
    """Gather and write a checkpoint; a collective (every rank calls), rank 0 writes.
    Returns True on the rank that wrote."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer, options=_options(cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return False
    os.makedirs(directory, exist_ok=True)
    weights.save(model_sd, os.path.join(directory, STUDENT_WEIGHTS))
    state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None, "counters": counters}
    torch.save(state, os.path.join(directory, TRAIN_STATE))
    with open(os.path.join(directory, STUDENT_INFO), "w") as f:
        json.dump(info, f, indent=2)
    return True


def restore(directory: str, model: nn.Module, optimizer, scheduler, scaler) -> dict:
    """Load a checkpoint into every rank (rank 0 reads, FSDP2/DDP broadcast); returns counters."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd = weights.read_state_dict(os.path.join(directory, STUDENT_WEIGHTS))
    state = torch.load(os.path.join(directory, TRAIN_STATE), map_location="cpu", weights_only=False)
    set_state_dict(unwrap(model), optimizer, model_state_dict=model_sd, optim_state_dict=state["optimizer"], options=_options())
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return state["counters"]
