"""Checkpoint layout: the one place that knows what a kd_ray checkpoint directory holds.

    student.safetensors   the full student weights (gathered from FSDP2 shards)
    student.json          model spec and metrics (what `kd-ray eval` and users read)
    train_state.pt        optimizer, LR scheduler and GradScaler state
    resume.json           step, data cursor, counters, the job's fingerprint, and a SHA-256 of
                          each file above; written last, so a checkpoint is whole only if every
                          file is there and matches

FSDP2 weights are gathered to one full state dict (not sharded per rank with DCP): a student is
small next to its teacher, a full file is what `kd-ray eval` and users load, and it resumes at
any world size, which an elastic group needs.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

from kd_ray.core import storage
from kd_ray.core.hashing import file_sha256
from kd_ray.models import weights
from kd_ray.models.weights import STUDENT_DIR, STUDENT_INFO, STUDENT_WEIGHTS  # noqa: F401 (the checkpoint's layout)
from kd_ray.train.parallel import unwrap

TRAIN_STATE = "train_state.pt"
RESUME = "resume.json"
_HASHED = (STUDENT_WEIGHTS, STUDENT_INFO, TRAIN_STATE)


def read_resume(directory: str) -> dict | None:
    """A checkpoint's resume.json (local or on object storage), None where it is missing or torn."""
    try:
        return json.loads(storage.read_bytes(storage.join(directory, RESUME)))
    except (OSError, ValueError):
        return None


def problem(directory: str) -> str | None:
    """Why a checkpoint directory cannot be resumed from (None: it is whole)."""
    state = read_resume(directory)
    if state is None:
        return f"{RESUME} is missing or unreadable (half-written?)"
    for name, digest in state.get("sha256", {}).items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its checksum (corrupt)"
    return None


def candidates(run_dir: str) -> list[str]:
    """The run's checkpoint directories, newest first: Ray names them checkpoint_DATE_TIME, so
    the name orders them by when they were written (after a fallback, the checkpoints written
    since come before the damaged one, whatever their steps)."""
    try:
        names = [n for n in storage.listdir(run_dir, dirs_only=True) if n.startswith("checkpoint_")]
    except OSError:
        return []
    return [storage.join(run_dir, n) for n in sorted(names, reverse=True)]


def pick(run_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest whole checkpoint of a run, and the newer ones skipped with the reason (on
    object storage, each is checked in a downloaded copy)."""
    skipped = []
    for path in candidates(run_dir):
        try:
            with storage.local_copy(path) as local:
                why = problem(local)
        except FileNotFoundError:
            # Listed but holding nothing: an object store (SeaweedFS's filer) can keep a moved or
            # deleted prefix's directory entries. Not a checkpoint, nor a damaged one.
            continue
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def write(directory: str, model: nn.Module, optimizer, scheduler, scaler, counters: dict, info: dict, resume: dict,
          export=None) -> bool:
    """Gather and write a checkpoint; a collective (every rank calls), rank 0 writes (and calls
    `export(directory, full state dict)`, the task's export, on the final one).
    Returns True on the rank that wrote."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer, options=_options(cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return False
    os.makedirs(directory, exist_ok=True)
    weights.save(model_sd, os.path.join(directory, STUDENT_WEIGHTS))
    state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None}
    torch.save(state, os.path.join(directory, TRAIN_STATE))
    with open(os.path.join(directory, STUDENT_INFO), "w") as f:
        json.dump(info, f, indent=2)
    if export is not None:
        export(directory, {weights.clean_key(k): v for k, v in model_sd.items()})
    digests = {name: file_sha256(os.path.join(directory, name)) for name in _HASHED}
    with open(os.path.join(directory, RESUME), "w") as f:
        json.dump({**resume, **counters, "sha256": digests}, f, indent=2)
    return True


def restore(directory: str, model: nn.Module, optimizer, scheduler, scaler) -> dict:
    """Load a checkpoint into every rank (rank 0 reads, FSDP2/DDP broadcast); returns counters."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    with storage.local_copy(directory) as local:
        model_sd = weights.read_state_dict(os.path.join(local, STUDENT_WEIGHTS))
        state = torch.load(os.path.join(local, TRAIN_STATE), map_location="cpu", weights_only=False)
    set_state_dict(unwrap(model), optimizer, model_state_dict=model_sd, optim_state_dict=state["optimizer"], options=_options())
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    resume = read_resume(directory)  # the counters' one home
    return {"step": resume["step"], "samples": resume["samples"]}
