"""This rank's micro-batches, from wherever the run's stream is read, and the check that they are
the ones the plan says.

The stream reaches a rank one of two ways (kd_ray.data.streams, kd_ray.data.local): its shard of the Ray Data
stream, or a LocalStream the worker reads itself. Either way it comes in blocks of whole
micro-batches (a Ray Data block, or the rank's rows of a chunk read locally; a lone worker's
Ray Data blocks, of any size, are cut into them by kd_ray.data.local.whole_micro_batches),
made ahead by a prefetch thread; `rank_batches` checks each block's positions at once and cuts it into
micro-batches here, as views: per micro-batch, the step pays for a few slices and no copy, queue
hand-off or tensor arithmetic. The Trainer gets an iterator of tensor dicts on its device and
closes it when it is done. The eval split reaches it the same two ways (eval_batches).
"""

from __future__ import annotations

from typing import Iterator

import ray.train
import torch

from kd_ray.batch_plan import block_positions
from kd_ray.core.columns import POS
from kd_ray.data.local import (
    prefetched,
    rank_blocks,
    rank_eval_batches,
    whole_micro_batches,
)
from kd_ray.train.parallel import all_reduce_sum


class OrderCheck:
    """Every row of this rank's stream must be at the position the plan says (kd_ray.batch_plan.
    block_positions): its micro-batch j holds positions start + ((j // k) x world + rank) x k x m
    + (j % k) x m + [0, m), for k micro-batches per block of the stream (1 when the split deals
    single micro-batches). Checked a block at a time, counted on the device (no sync per block);
    `verify` all-reduces the count over the group."""

    def __init__(self, start: int, rank: int, world: int, micro_batch: int, per_block: int, device: torch.device):
        self.start, self.rank, self.world, self.micro_batch, self.per_block = start, rank, world, micro_batch, per_block
        self.device, self.seen = device, 0  # micro-batches checked so far
        self.out_of_order = torch.zeros((), dtype=torch.int64, device=device)

    def see(self, positions: torch.Tensor) -> int:
        """A block of this rank's rows (whole micro-batches); returns how many micro-batches it holds."""
        count = len(positions) // self.micro_batch
        expected = block_positions(self.start, self.rank, self.world, self.micro_batch, self.per_block, self.seen, count)
        if len(positions) != len(expected):
            self.out_of_order += len(positions)  # a block of part of a micro-batch: the stream is broken
        else:
            self.out_of_order += (positions != torch.from_numpy(expected).to(self.device)).sum()
        self.seen += count
        return count

    def verify(self) -> None:
        if int(all_reduce_sum(self.out_of_order.double().reshape(1)).item()):
            raise RuntimeError("the data stream delivered rows out of the planned order; the data cursor cannot be trusted")


class RankBatches:
    """Iterate this rank's micro-batches, cut from checked blocks; `close()` stops the prefetch thread."""

    def __init__(self, blocks: Iterator[dict], order: OrderCheck, micro_batch: int, close=None):
        self.blocks, self.order, self.micro_batch, self._close = blocks, order, micro_batch, close

    def __iter__(self):
        m = self.micro_batch
        for block in self.blocks:
            for i in range(self.order.see(block[POS])):
                yield {k: v[i * m:(i + 1) * m] for k, v in block.items()}

    def close(self) -> None:
        if self._close is not None:
            self._close()


def rank_batches(local_stream, start: int, rank: int, world: int, micro_batch: int, per_block: int, prefetch: int,
                 device: torch.device) -> RankBatches:
    """From `start` on, dealt in blocks of `per_block` micro-batches: a LocalStream's rows (CPU runs
    only: no pinning or copy; made `prefetch` blocks ahead by a thread when it reads files, see
    LocalStream), or this worker's Ray Data shard."""
    if local_stream is not None:
        order = OrderCheck(start, rank, world, micro_batch, per_block, device)
        rows = rank_blocks(local_stream, start, rank, world, micro_batch, per_block)
        made = prefetched(({k: torch.from_numpy(v) for k, v in r.items()} for r in rows),
                                   prefetch if local_stream.read_ahead() else 0)
        return RankBatches(made, order, micro_batch, made.close)
    shard = ray.train.get_dataset_shard("train")
    order = OrderCheck(start, rank, world, micro_batch, per_block, device)
    blocks = shard.iter_torch_batches(batch_size=None, device=device, prefetch_batches=prefetch, pin_memory=device.type == "cuda")
    return RankBatches(whole_micro_batches(blocks, micro_batch, torch.cat), order, micro_batch)


def eval_batches(local_stream, rank: int, world: int, batch_size: int, device: torch.device) -> Iterator[dict]:
    """This rank's eval batches, tensors on `device`: a LocalStream's eval split read by the worker
    itself (kd_ray.data.local.rank_eval_batches), or this worker's shard of the Ray Data eval stream."""
    if local_stream is not None:
        return ({k: torch.from_numpy(v).to(device) for k, v in b.items()}
                for b in rank_eval_batches(local_stream, rank, world, batch_size))
    return ray.train.get_dataset_shard("eval").iter_torch_batches(batch_size=batch_size, device=device)
