"""Model weights on disk: safetensors (preferred) or `.pt` state dicts.

The one place that knows how a state dict is read, checked against a model, and written.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from kd_ray.core import storage
from kd_ray.core.errors import SHOWN_CHARS, UserError, clip
from kd_ray.core.storage import need_file

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


# The student's files in a checkpoint and in a finished run's directory (kd_ray.train.checkpoint).
STUDENT_WEIGHTS = "student.safetensors"
STUDENT_INFO = "student.json"
STUDENT_DIR = "student"  # a language model's export: a Hugging Face model directory (final checkpoint only)


class WeightsError(ValueError):
    """The file does not fit the model; the message names the tensors."""


def file_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, without loading the data where the format allows."""
    if storage.shown(path).endswith(".safetensors"):
        from safetensors import safe_open

        with storage.local_copy(path) as local, safe_open(local, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A local file, or one on object storage (downloaded to a temporary file first)."""
    if storage.is_remote(path):
        with storage.local_copy(path) as local:
            return read_state_dict(local)  # named as the object is, suffix and all
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def clean_key(key: str) -> str:
    """Drop the prefixes that DDP (`module.`), torch.compile (`_orig_mod.`) and activation
    checkpointing (`_checkpoint_wrapped_module.`) add."""
    for prefix in ("_orig_mod.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".").replace("_checkpoint_wrapped_module.", "")


def mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple], optional: set[str] = frozenset()) -> str | None:
    """A short description of missing, unexpected and mis-shaped tensors, or None if they fit.
    `optional` names may be missing (a tied weight: tied_names)."""
    found = {clean_key(k): v for k, v in found.items()}
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]

    def few(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")

    parts = []
    if missing:
        parts.append(f"missing {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {few(shapes)}")
    return "; ".join(parts) or None


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {clean_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def tied_names(model: nn.Module) -> set[str]:
    """State-dict names of tensors tied to another one (a language model's output head and its
    embedding): Hugging Face's save_pretrained writes such a tensor once, and loading ties them."""
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {clean_key(k) for k in model.state_dict(keep_vars=True) if k not in own}


def load_into(model: nn.Module, path: str) -> None:
    state = {clean_key(k): v for k, v in read_state_dict(path).items()}
    tied = tied_names(model)
    problem = mismatch(model_shapes(model), {k: tuple(v.shape) for k, v in state.items()}, tied)
    if problem:
        raise WeightsError(f"{storage.basename(path)} does not fit the model: {problem}")
    model.load_state_dict(state, strict=not (tied - set(state)))


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu").contiguous()
        # Tied weights (a language model's embedding and head) share storage, which safetensors
        # refuses: the second name gets its own copy, and loading ties them again.
        shared = v.untyped_storage().data_ptr() in seen and v.numel() > 0
        seen.add(v.untyped_storage().data_ptr())
        tensors[clean_key(k)] = v.clone() if shared else v
    return tensors


def save(state: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically (a reader never sees a half-written file)."""
    from safetensors.torch import save_file

    with storage.replaced(path) as tmp:
        save_file(_tensors(state), tmp, metadata=metadata)


def as_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as the bytes of a safetensors file (to write anywhere: storage.write_bytes)."""
    from safetensors.torch import save

    return save(_tensors(state))


def check_weights_file(path: str, field: str, model, model_name: str, fix: str) -> None:
    """A state-dict file that fits `model` (built on the meta device): names and shapes; a
    local file or one on object storage."""
    if storage.is_remote(path):
        storage.need_object(path, field, fix)
    else:
        need_file(path, field, fix)
    if not storage.shown(path).endswith(WEIGHT_SUFFIXES):
        raise UserError(field, f"{path}: use a .safetensors or .pt state dict")
    try:
        found = file_shapes(path)
        expected = model_shapes(model)
    except Exception as e:  # a user's file can fail in any way; report it on one line
        raise UserError(field, f"cannot read {path} as weights: {type(e).__name__}: {clip(str(e), SHOWN_CHARS)}") from None
    problem = mismatch(expected, found, tied_names(model))
    if problem:
        raise UserError(field, f"{storage.basename(path)} does not fit {model_name}: {problem}")
