"""The teacher's signal, as it travels in a batch and as the loss takes it.

A batch carries the teacher's output as numpy columns (kd_ray.data): dense logits (TEACHER) from
the live pool or a full cache, or a top-k (TOPK_VALUES, TOPK_INDICES, TAIL_LSE) from a top-k
cache. `teacher_output` turns those columns into what kd_ray.losses takes, the same way for the
online and the offline path. numpy has no bfloat16, so bfloat16 values travel as their uint16
bits: `to_columns` and `teacher_output` are the codec's two ends.
"""

from __future__ import annotations

import numpy as np
import torch

from kd_ray.core.columns import TAIL_LSE, TEACHER, TOPK_INDICES, TOPK_VALUES
from kd_ray.losses import TopK


def values_to_numpy(values: torch.Tensor) -> np.ndarray:
    """Top-k values as a numpy array: bfloat16 as its bits (uint16), other dtypes as they are."""
    return (values.view(torch.uint16) if values.dtype == torch.bfloat16 else values).numpy()


def values_from_column(values: torch.Tensor) -> torch.Tensor:
    """The inverse of values_to_numpy, on the tensor a batch column became."""
    return values.view(torch.bfloat16) if values.dtype == torch.uint16 else values


def to_columns(top: TopK) -> dict[str, np.ndarray]:
    """A top-k as a batch's (and a cache shard's) columns, with every tail it holds."""
    return {TOPK_VALUES: values_to_numpy(top.values), TOPK_INDICES: top.indices.numpy(), TAIL_LSE: top.tail_lse.numpy()}


def teacher_output(batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor | TopK | None:
    """What the student distills from: dense logits (the pool, or a full cache), a top-k from a
    cache (its tail column is the one for `temperature`, see kd_ray.cache), or None (no teacher)."""
    if TOPK_VALUES not in batch:
        return batch.get(TEACHER)
    return TopK(values_from_column(batch[TOPK_VALUES]), batch[TOPK_INDICES], batch[TAIL_LSE], (temperature,))


def as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A zero-copy tensor view of a (possibly read-only) numpy array column, or the tensor a
    micro-batch already holds (a colocated teacher's input). We never write to it."""
    import warnings

    if isinstance(array, torch.Tensor):
        return array

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.asarray(array))
