"""JobSpec -> the Ray Datasets the trainer consumes.

    train: chunks of every epoch, in the order of kd_ray.data.order, from the cursor on
           -> read + preprocess + augment (one task per chunk) -> teacher pool
           (a pool on CPUs reads its chunks itself: one actor call per chunk, see build_train)
           -> blocks of whole micro-batches (kd_ray.batching.micro_batches_per_block), for a
           group that may hold several workers; a lone worker cuts its own (whole_micro_batches)
           (teacher.mode: cached: the read task joins the cached outputs of the same rows, kd_ray.cache,
           and there is no pool)
    eval:  the eval split in source order -> read + preprocess

The train dataset is ONE ordered stream of the whole run, so the teacher pool starts once per
run (Ray Data re-executes a dataset, actor pools included, each time it is iterated). With
preserve_order, Ray's split hands each block to the consumer that has received the fewest rows,
so blocks of equal size go round-robin: worker r of W gets blocks r, r + W, ..., cuts them into
micro-batches itself, and optimizer step s trains exactly positions [s x G, (s + 1) x G). The
loop checks every row's position (the POS column) a block at a time (kd_ray.train.batches).

Where the stream starts is read at execution time from the run's control (`cursor`, kd_ray.run.control): Ray Train
restarts the dataset from the top after any failure or resize, and the chunks before the
cursor come out empty, so nothing consumed is read, sent to the teacher, or trained on again.

With no teacher pool (cached outputs, or no teacher) and a source held in memory, there is
nothing for Ray Data to disaggregate: each train worker reads its own micro-batches of the same
stream with the same chunk reader (LocalStream, below), starting at its checkpoint's position.
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from kd_ray.data import POS, X, order
from kd_ray.data.ids import is_eval
from kd_ray.data.transforms import augment, preprocess
from kd_ray.seeds import chunk_rng
from kd_ray.tasks import task_for

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from kd_ray.spec import JobSpec


def _split_layouts(spec: "JobSpec", reader, eval_reader) -> tuple[order.Layout, order.Layout, Any]:
    """(train layout, eval layout, eval reader): with no eval reader of its own, the split is a
    hash of the sample id."""
    data = spec.data
    ids = reader.unit_ids()
    window = data.shuffle_window

    def layout(units, r):
        return order.Layout(units, random_access=r.random_access, window=window, chunk_rows=r.chunk_rows)

    def every(i):
        return np.ones(len(i), dtype=bool)

    if eval_reader is not None:
        return layout(order.split_units(ids, every), reader), layout(order.split_units(eval_reader.unit_ids(), every), eval_reader), eval_reader
    train = order.split_units(ids, lambda i: ~is_eval(i, data.eval_split, spec.run.seed))
    held = order.split_units(ids, lambda i: is_eval(i, data.eval_split, spec.run.seed))
    return layout(train, reader), layout(held, reader), reader


class Sources:
    """The readers and layouts of a job's data, built once on the driver (the task says what a
    reader reads: kd_ray.tasks)."""

    def __init__(self, spec: "JobSpec"):
        self.reader, eval_reader = task_for(spec).readers()
        self.train, self.eval, self.eval_reader = _split_layouts(spec, self.reader, eval_reader)

    @functools.cached_property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample read on the driver, when first asked (only a teacher cache's checks ask: a
        parquet source's first row group can be large and remote)."""
        first, reader = (self.train, self.reader) if self.train.rows else (self.eval, self.eval_reader)
        return tuple(reader.read(*_first_row(first))[X].shape[1:]) if first.rows else (0,)

    @property
    def train_rows(self) -> int:
        return self.train.rows

    @property
    def eval_rows(self) -> int:
        return self.eval.rows


_CACHE: dict = {}


def _fetch(ref):
    """An object from the object store, once per worker process (not once per chunk)."""
    import ray

    key = ref.hex()
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


def _augment_chunk(batch: dict, seed: int, index: int, args: dict) -> dict:
    """Random views drawn from (run seed, chunk index): every epoch's chunks differ, and a replay
    of the run (after a failure) draws the same views. Done on the whole chunk before the cursor
    cuts it, so the views do not depend on where a resume started."""
    return augment(batch, rng=chunk_rng(seed, index), **args)


def _read_chunk(reader, layout, seed: int, shuffle: str, transform: dict, index: int, select, cache=None) -> dict | None:
    """The rows of chunk `index` whose positions pass `select` (positions -> mask): read, joined
    with their cached teacher outputs (given a kd_ray.cache.CacheReader), preprocessed and
    augmented, with their positions. None if no row passes."""
    (units, rows), positions, _ = order.positions_of_chunk(layout, seed, shuffle, index)
    keep = select(positions)
    if not keep.any():
        return None
    if not transform["augment"]:  # per-row work only: read just the rows kept
        units, rows, positions, keep = units[keep], rows[keep], positions[keep], slice(None)
    out = reader.read(units, rows)
    teacher = cache.read(units, rows, out) if cache is not None else {}
    if transform["preprocess"] is not None:
        out = preprocess(out, **transform["preprocess"])
    if transform["augment"]:
        out = _augment_chunk(out, seed, index, transform["augment"])
    return {**{k: v[keep] for k, v in {**out, **teacher}.items()}, POS: positions[keep]}


def read_chunks(batch: dict, reader, layout, seed: int, shuffle: str, transform: dict, control, end: int | None,
                cache=None) -> Iterator[dict]:
    """The rows of the chunks named in the batch, from the run's cursor (read from its
    kd_ray.run.control.RunControl) up to `end`. Chunks wholly outside [cursor, end) yield nothing: an empty block would need a
    schema of its own, and Ray cannot type an empty array of samples (it falls back to pickled
    objects, with a warning in every run's log)."""
    import ray

    reader, layout = _fetch(reader), _fetch(layout)
    cache = _fetch(cache) if cache is not None else None
    start = ray.get(control.cursor.remote()) if control is not None else 0

    def select(positions):
        return (positions >= start) & (positions < end if end is not None else True)

    parts = [p for index in np.asarray(batch["id"]).tolist()
             if (p := _read_chunk(reader, layout, seed, shuffle, transform, int(index), select, cache)) is not None]
    if parts:
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _transform(spec: "JobSpec", train: bool) -> dict:
    return task_for(spec).transform(train)


def _chunk_kwargs(spec: "JobSpec", reader, layout: order.Layout, shuffle: str, train: bool, control=None,
                  end: int | None = None, cache=None) -> dict:
    """read_chunks' arguments but the chunk ids, its large ones put in the object store once."""
    import ray

    return dict(reader=ray.put(reader), layout=ray.put(layout), seed=spec.run.seed, shuffle=shuffle,
                transform=_transform(spec, train), control=control, end=end, cache=ray.put(cache) if cache is not None else None)


def _stream(spec: "JobSpec", chunks: int, kwargs: dict) -> "ray.data.Dataset":
    import ray.data

    return ray.data.range(chunks, override_num_blocks=chunks).map_batches(
        read_chunks, batch_size=1, batch_format="numpy",
        # Reading and preprocessing stay CPU tasks spread over the cluster, one per chunk. Args
        # given by a function also keep Ray from fusing these tasks into the teacher's actors
        # (it fuses ops whose static remote args match, as they do on CPU): fused, they ran
        # serially with the teacher in one task holding many chunks, and nothing reached the
        # trainers until that whole task had finished.
        ray_remote_args_fn=_spread, fn_kwargs=kwargs)


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def _first_row(layout: order.Layout) -> tuple[np.ndarray, np.ndarray]:
    u = next(i for i, rows in enumerate(layout.units) if len(rows))
    return np.array([u]), layout.units[u][:1]


def with_teacher(ds: "ray.data.Dataset", spec: "JobSpec", board=None, end: int | None = None) -> "ray.data.Dataset":
    """`end`: where the stream ends, so the pool can tell the board when it has sent its last row."""
    from kd_ray.teacher import TeacherPredictor, pool_options

    return ds.map_batches(TeacherPredictor, fn_constructor_kwargs=dict(spec=spec, board=board, end=end),
                          **pool_options(spec.teacher))


def _reading_pool(spec: "JobSpec", chunks: int, kwargs: dict, board, end: int) -> "ray.data.Dataset":
    """A CPU pool whose actors read their own chunks (kd_ray.teacher.ReadingTeacher), one chunk per call."""
    import ray.data

    from kd_ray.teacher import ReadingTeacher, pool_options

    return ray.data.range(chunks, override_num_blocks=chunks).map_batches(
        ReadingTeacher, fn_constructor_kwargs=dict(spec=spec, read=functools.partial(read_chunks, **kwargs), board=board, end=end),
        **{**pool_options(spec.teacher), "batch_size": 1})


def build_eval(spec: "JobSpec", data: Sources | None = None, cache=None) -> "ray.data.Dataset":
    """The eval split, once through, in source order (with the cached teacher outputs of its
    rows, given the eval reader of a kd_ray.cache.TeacherCache)."""
    data = data or Sources(spec)
    return _stream(spec, data.eval.chunks_per_epoch("none"), _chunk_kwargs(spec, data.eval_reader, data.eval, "none", False, cache=cache))


def build_train(spec: "JobSpec", data: Sources, end: int, block_rows: int | None, control, board=None,
                cache=None) -> "ray.data.Dataset":
    """The training stream: positions from the control's cursor to `end`, in blocks of exactly
    `block_rows` rows (the last may be short), whole micro-batches (the unit the split deals out round-robin); None for a
    group of one worker, which cuts whatever blocks come into micro-batches itself
    (whole_micro_batches). The teacher's outputs come from the pool (which reports to `board`),
    or from `cache` (the train reader of a kd_ray.cache.TeacherCache).

    A pool of CPU actors reads its chunks itself: with a teacher on the CPU there are no idle
    cores for read tasks to use that the actors' own would not, and each operator of a Ray Data
    stream costs its coordinator per block (a small student's online run on 2 cores: 13.6k-15.6k
    samples/s against 11.4k-13.8k, benchmarks/README.md). A GPU pool keeps the read tasks, spread
    over the host's cores."""
    shuffle = spec.data.shuffle
    chunks = order.stream_chunks(data.train, shuffle, end)
    kwargs = _chunk_kwargs(spec, data.reader, data.train, shuffle, True, control, end, cache)
    pool = spec.teacher is not None and cache is None
    if pool and not spec.teacher.pool.gpus_per_actor:
        train = _reading_pool(spec, chunks, kwargs, board, end)
    else:
        train = _stream(spec, chunks, kwargs)
        if pool:
            train = with_teacher(train, spec, board, end)
    # The repartition is an operator of its own, with a task per block: a lone worker is spared it
    return train if block_rows is None else train.repartition(target_num_rows_per_block=block_rows, strict=True)


# ---------------------------------------------------------------------------------------------
# Read by the train workers themselves: no teacher pool, data in memory


@dataclass(frozen=True)
class LocalStream:
    """The training stream of a CPU run with no teacher pool (a cached teacher, or none) over a
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
    anyway, so it reads the row groups itself (benchmarks/README.md, "Small students"). GPU runs
    keep the stream too, where Ray Data spreads large samples' reading over the host's otherwise
    idle cores to keep a fast student fed (one reader thread per worker might not: not measured).

    Data in memory is read between steps, in the step's own thread; files are read ahead by a
    thread (train.prefetch_batches blocks), where waiting on storage lets the step run. A reader
    thread over data in memory fought the step for the GIL and cost it far more than the reading
    itself: a small student's steps ran 1.4x faster without it, and the CPU preset's cached run
    was no slower (benchmarks/README.md, "Small students")."""

    reader: Any  # ObjectRefs: put once by the driver, fetched once per worker process
    layout: Any
    cache: Any
    seed: int
    shuffle: str
    transform: dict
    end: int

    def read_ahead(self) -> bool:
        """By a thread: a source read from files (its reader has no random access)."""
        return not _fetch(self.reader).random_access


def local_stream(spec: "JobSpec", data: Sources, end: int, cache=None) -> LocalStream | None:
    """The stream the train workers read themselves, where the run allows it (see LocalStream)."""
    import ray

    pool = spec.teacher is not None and cache is None
    if pool or spec.data.stream == "ray_data" or spec.train.use_gpu:
        return None
    if not data.reader.random_access and spec.train.max_workers > 1:  # files: Ray Data reads each row group once for all
        return None
    return LocalStream(ray.put(data.reader), ray.put(data.train), ray.put(cache) if cache is not None else None,
                       spec.run.seed, spec.data.shuffle, _transform(spec, True), end)


def rank_blocks(stream: LocalStream, start: int, rank: int, world: int, micro_batch: int, per_block: int = 1) -> Iterator[dict]:
    """This rank's rows from position `start` on, in blocks of whole micro-batches (a chunk's,
    and a micro-batch that spans two chunks): the rows a Ray Data split of blocks of `per_block` micro-batches would deal it
    (kd_ray.batching.block_positions; kd_ray.train.batches checks every row). The same rows on the
    same rank as the Ray Data stream, so a run trains the same sums whichever way it is read. Each
    chunk is read once, for this rank's rows only."""
    reader, layout = _fetch(stream.reader), _fetch(stream.layout)
    cache = _fetch(stream.cache) if stream.cache is not None else None
    block = micro_batch * per_block

    def select(positions):
        return (positions >= start) & (positions < stream.end) & ((positions - start) // block % world == rank)

    first = start // max(layout.rows, 1) * layout.chunks_per_epoch(stream.shuffle)
    parts = (_read_chunk(reader, layout, stream.seed, stream.shuffle, stream.transform, index, select, cache)
             for index in range(first, order.stream_chunks(layout, stream.shuffle, stream.end)))
    yield from whole_micro_batches((p for p in parts if p is not None), micro_batch, np.concatenate)


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
