"""This rank's micro-batches, from wherever the run's stream is read, and the check that they are
the ones the plan says.

The stream reaches a rank one of two ways (kd_ray.data.pipeline): its shard of the Ray Data
stream, or a LocalStream the worker reads itself. `rank_batches` hides which: the Trainer gets
an iterator of tensor dicts on its device and closes it when it is done.
"""

from __future__ import annotations

from typing import Iterator

import ray.train
import torch

from kd_ray.data import POS, pipeline
from kd_ray.train.parallel import all_reduce_sum


class RankBatches:
    """Iterate this rank's micro-batches; `close()` stops a local reader's prefetch thread."""

    def __init__(self, batches: Iterator[dict], close=None):
        self.batches, self._close = batches, close

    def __iter__(self):
        return iter(self.batches)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def rank_batches(local_stream, start: int, rank: int, world: int, micro_batch: int, prefetch: int,
                 device: torch.device) -> RankBatches:
    """From `start` on: a LocalStream's micro-batches (CPU runs only: no pinning or copy), made
    `prefetch` ahead by a thread as Ray Data's iterator would, or this worker's Ray Data shard."""
    if local_stream is not None:
        rows = pipeline.rank_micro_batches(local_stream, start, rank, world, micro_batch)
        made = pipeline.prefetched(({k: torch.from_numpy(v) for k, v in r.items()} for r in rows), prefetch)
        return RankBatches(made, made.close)
    shard = ray.train.get_dataset_shard("train")
    return RankBatches(shard.iter_torch_batches(batch_size=micro_batch, drop_last=True, device=device,
                                                prefetch_batches=prefetch, pin_memory=device.type == "cuda"))


class OrderCheck:
    """Micro-batch j of this rank must hold positions start + (j x world + rank) x m + [0, m).
    Counted on the device (no sync per batch); `verify` all-reduces the count over the group."""

    def __init__(self, start: int, rank: int, world: int, micro_batch: int, device: torch.device):
        self.expected = torch.arange(micro_batch, device=device) + start + rank * micro_batch
        self.stride = micro_batch * world
        self.out_of_order = torch.zeros((), dtype=torch.int64, device=device)

    def see(self, batch: dict) -> None:
        self.out_of_order += (batch[POS] != self.expected).sum()
        self.expected += self.stride

    def verify(self) -> None:
        if int(all_reduce_sum(self.out_of_order.double().reshape(1)).item()):
            raise RuntimeError("the data stream delivered rows out of the planned order; the data cursor cannot be trusted")
