"""The training stream read by the train workers themselves (no teacher pool, data in memory or a
lone worker's files), with its eval split, and the pieces both ways of reading share: whole
micro-batches from blocks of any size, and a bounded read-ahead thread."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from kd_ray.core.columns import POS
from kd_ray.data import order
from kd_ray.data.chunks import Sources, fetch, read_chunk

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec


@dataclass(frozen=True)
class LocalStream:
    """The training stream of a CPU run with no teacher pool in it (a cached or colocated teacher, on-policy, or none) over a
    source held in memory, read by each train worker itself instead of through Ray Data.

    Ray Data costs about 0.5 ms of CPU per sample here (a task per chunk, the re-cut into
    micro-batch blocks, the split coordinator, the conversion in the worker: measured alone on 2
    cores with 3x32x32 samples), a third of what the CPU preset's student step costs, and on a CPU
    run those are the cores the student trains on. Without a pool there is nothing to
    disaggregate, and the rows are already in the object store, shared by the workers of a node:
    each worker reads just its own rows of each chunk (augmenting the whole chunk, as its views
    are drawn per chunk), with the same functions and in the same order as the Ray Data stream.
    Sources read from files (parquet) keep the Ray Data stream when the group may have several
    workers: it reads each row group once for all of them. A single worker reads every row
    anyway, so it reads the row groups itself (docs/performance.md, "Small students"). GPU runs
    keep the stream too, where Ray Data spreads large samples' reading over the host's otherwise
    idle cores to keep a fast student fed (one reader thread per worker might not: not measured).

    Data in memory is read between steps, in the step's own thread; files are read ahead by a
    thread (train.prefetch_batches blocks), where waiting on storage lets the step run. A reader
    thread over data in memory fought the step for the GIL and cost it far more than the reading
    itself: a small student's steps ran 1.4x faster without it, and the CPU preset's cached run
    was no slower (docs/performance.md, "Small students").

    The eval split is read the same way (rank_eval_batches): a Ray Data eval stream's first pass in
    a worker took 3.7 s of a 2-core machine (its executor, split coordinator and read tasks
    starting), longer than a small student's whole run of 2,000 steps."""

    reader: Any  # ObjectRefs: put once by the driver, fetched once per worker process
    layout: Any
    cache: Any
    seed: int
    shuffle: str
    transform: dict
    end: int
    eval_reader: Any
    eval_layout: Any
    eval_transform: dict

    def read_ahead(self) -> bool:
        """By a thread: a source read from files (its reader has no random access)."""
        return not fetch(self.reader).random_access


def local_stream(spec: "JobSpec", data: Sources, end: int, cache=None) -> LocalStream | None:
    """The stream the train workers read themselves, where the run allows it (see LocalStream)."""
    import ray

    if spec.teacher_in_stream or spec.data.stream == "ray_data" or spec.train.use_gpu:
        return None
    if not data.reader.random_access and spec.train.max_workers > 1:  # files: Ray Data reads each row group once for all
        return None
    reader = ray.put(data.reader)
    return LocalStream(reader, ray.put(data.train), ray.put(cache) if cache is not None else None,
                       spec.run.seed, spec.data.shuffle, data.transform(True), end,
                       reader if data.eval_reader is data.reader else ray.put(data.eval_reader), ray.put(data.eval), data.transform(False))


def rank_blocks(stream: LocalStream, start: int, rank: int, world: int, micro_batch: int, per_block: int = 1) -> Iterator[dict]:
    """This rank's rows from position `start` on, in blocks of whole micro-batches (a chunk's,
    and a micro-batch that spans two chunks): the rows a Ray Data split of blocks of `per_block` micro-batches would deal it
    (kd_ray.batch_plan.block_positions; kd_ray.train.batches checks every row). The same rows on the
    same rank as the Ray Data stream, so a run trains the same sums whichever way it is read. Each
    chunk is read once, for this rank's rows only."""
    reader, layout = fetch(stream.reader), fetch(stream.layout)
    cache = fetch(stream.cache) if stream.cache is not None else None
    block = micro_batch * per_block

    def select(positions):
        return (positions >= start) & (positions < stream.end) & ((positions - start) // block % world == rank)

    first = start // max(layout.rows, 1) * layout.chunks_per_epoch(stream.shuffle)
    parts = (read_chunk(reader, layout, stream.seed, stream.shuffle, stream.transform, index, select, cache)
             for index in range(first, order.stream_chunks(layout, stream.shuffle, stream.end)))
    yield from whole_micro_batches((p for p in parts if p is not None), micro_batch, np.concatenate)


def eval_batch_bounds(rows: int, rank: int, world: int, batch_size: int) -> np.ndarray:
    """The eval positions where this rank's batches start, and one past its last: its share is
    the contiguous [rows x rank / world, rows x (rank + 1) / world), cut into as many batches as
    every other rank's (an FSDP2 student's or a sharded teacher's forwards are collectives, and
    DDP broadcasts buffers at each), of at most batch_size + 1 rows. Every row is in one rank's
    batch, unless there are fewer rows than ranks: then no rank has a batch (as Ray Data's equal
    split gives none)."""
    lo, hi = rows * rank // world, rows * (rank + 1) // world
    count = -(-(rows // world) // batch_size)  # from the smallest share, so that no batch is empty
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    return lo + (hi - lo) * np.arange(count + 1, dtype=np.int64) // count


def rank_eval_batches(stream: LocalStream, rank: int, world: int, batch_size: int) -> Iterator[dict]:
    """This rank's eval batches (eval_batch_bounds), read from the eval split in source order."""
    reader, layout = fetch(stream.eval_reader), fetch(stream.eval_layout)
    bounds = eval_batch_bounds(layout.rows, rank, world, batch_size)
    if len(bounds) < 2:
        return
    lo, hi = int(bounds[0]), int(bounds[-1])

    def select(positions):
        return (positions >= lo) & (positions < hi)

    parts = (read_chunk(reader, layout, stream.seed, "none", stream.eval_transform, index, select)
             for index in range(layout.chunks_per_epoch("none")))
    yield from sized_batches((p for p in parts if p is not None), np.diff(bounds).tolist())


def sized_batches(blocks: Iterator[dict], sizes: list[int]) -> Iterator[dict]:
    """Blocks of numpy rows in order -> batches of the given sizes, in order (rows past them are dropped)."""
    blocks, held, have = iter(blocks), [], 0
    for size in sizes:
        while have < size:
            block = next(blocks, None)
            if block is None:
                return
            held.append(block)
            have += len(block[POS])
        joined = held[0] if len(held) == 1 else {k: np.concatenate([b[k] for b in held]) for k in held[0]}
        yield {k: v[:size] for k, v in joined.items()}
        held, have = ([{k: v[size:] for k, v in joined.items()}] if have > size else []), have - size


def whole_micro_batches(blocks: Iterator[dict], micro_batch: int, cat) -> Iterator[dict]:
    """Blocks of rows in stream order (numpy arrays or tensors, joined by `cat`) -> blocks of whole
    micro-batches in the same order: each block's whole micro-batches as a view of it, and a
    micro-batch split across blocks joined (a copy of at most one micro-batch per block). Rows
    past the last whole micro-batch come out last, as a block of their own: a run never reaches
    them (its stream ends on whole global batches, past the plan's last step), and if it did, the
    order check would count them as out of order rather than let a short stream pass."""
    held = None
    for block in blocks:
        rows = len(block[POS])
        first = 0
        if held is not None:
            first = min(micro_batch - len(held[POS]), rows)
            held = {k: cat([held[k], v[:first]]) for k, v in block.items()}
            if len(held[POS]) < micro_batch:
                continue
            yield held
            held = None
        whole = first + (rows - first) // micro_batch * micro_batch
        if whole > first:
            yield {k: v[first:whole] for k, v in block.items()} if (first, whole) != (0, rows) else block
        if whole < rows:
            held = {k: v[whole:] for k, v in block.items()}
    if held is not None:
        yield held


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterator, depth: int) -> Iterator:
    """`items`, produced up to `depth` ahead by a background thread, so that reading overlaps the
    step (numpy's copies and arithmetic release the GIL). An error comes out where its item
    would have; closing the generator stops the thread."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Raised(e))

    threading.Thread(target=produce, name="kd_ray-prefetch", daemon=True).start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
