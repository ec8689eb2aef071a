"""A job's rows in chunks: the driver's Sources (readers, layouts, transforms), and the pure
reading of one chunk of the run's stream, in the order of kd_ray.data.order, from the run's cursor
on, joined with cached teacher outputs where there are some, preprocessed and augmented.

Where the stream starts is read at execution time from the run's control (`cursor`,
kd_ray.run.control): Ray Train restarts the dataset from the top after any failure or resize, and
the chunks before the cursor come out empty, so nothing consumed is read, sent to the teacher, or
trained on again. The Ray Data streams (kd_ray.data.streams) and the workers' own reading
(kd_ray.data.local) read chunks with these same functions.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from kd_ray.core.columns import POS, X
from kd_ray.core.seeds import chunk_rng
from kd_ray.data import order
from kd_ray.data.ids import is_eval
from kd_ray.data.transforms import augment, preprocess

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec


def first_row(layout: order.Layout) -> tuple[np.ndarray, np.ndarray]:
    u = next(i for i, rows in enumerate(layout.units) if len(rows))
    return np.array([u]), layout.units[u][:1]


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
    """The readers and layouts of a job's data, and the task's transforms of its rows, built once
    on the driver (the task says what a reader reads and how rows are transformed: kd_ray.tasks)."""

    def __init__(self, spec: "JobSpec", task):
        self.reader, eval_reader = task.readers()
        self.train, self.eval, self.eval_reader = _split_layouts(spec, self.reader, eval_reader)
        self.transforms = {True: task.transform(True), False: task.transform(False)}  # train: augmented

    def transform(self, train: bool) -> dict:
        return self.transforms[train]

    @functools.cached_property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample read on the driver, when first asked (only a teacher cache's checks ask: a
        parquet source's first row group can be large and remote)."""
        first, reader = (self.train, self.reader) if self.train.rows else (self.eval, self.eval_reader)
        return tuple(reader.read(*first_row(first))[X].shape[1:]) if first.rows else (0,)

    @property
    def train_rows(self) -> int:
        return self.train.rows

    @property
    def eval_rows(self) -> int:
        return self.eval.rows


_CACHE: dict = {}


def fetch(ref):
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


def read_chunk(reader, layout, seed: int, shuffle: str, transform: dict, index: int, select, cache=None) -> dict | None:
    """The rows of chunk `index` whose positions pass `select` (positions -> mask): read, joined
    with their cached teacher outputs (given a kd_ray.cache.reader.CacheReader), preprocessed and
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

    reader, layout = fetch(reader), fetch(layout)
    cache = fetch(cache) if cache is not None else None
    start = ray.get(control.cursor.remote()) if control is not None else 0

    def select(positions):
        return (positions >= start) & (positions < end if end is not None else True)

    parts = [p for index in np.asarray(batch["id"]).tolist()
             if (p := read_chunk(reader, layout, seed, shuffle, transform, int(index), select, cache)) is not None]
    if parts:
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def chunk_kwargs(spec: "JobSpec", data: Sources, train: bool, control=None, end: int | None = None, cache=None) -> dict:
    """read_chunks' arguments but the chunk ids, for the train or the eval split, its large ones
    put in the object store once."""
    import ray

    reader, layout, shuffle = (data.reader, data.train, spec.data.shuffle) if train else (data.eval_reader, data.eval, "none")
    return dict(reader=ray.put(reader), layout=ray.put(layout), seed=spec.run.seed, shuffle=shuffle,
                transform=data.transform(train), control=control, end=end, cache=ray.put(cache) if cache is not None else None)
