"""JobSpec -> the Ray Datasets the trainer consumes.

    train: passes over the training split -> preprocess -> augment -> teacher pool
    eval:  source -> split -> preprocess

Ray Data re-executes a dataset, actor pools included, each time it is iterated, so iterating
once per epoch restarts the teacher pool (process start, imports, weights) every epoch. For
sources held in memory (numpy, built-in) the train dataset is therefore ONE ordered stream of
every pass: a linear pipeline whose source emits pass p's rows in an order that is a function of
(seed, p) alone, so the pool starts once per run and the order survives preserve_order. A
parquet source is one pass, iterated once per epoch (`holds_all_passes` tells the loop which).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from kd_ray.data import EPOCH, ID, X, Y, sources
from kd_ray.data.ids import is_eval, mix64
from kd_ray.data.transforms import augment, preprocess

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from kd_ray.spec import JobSpec


def _keep(batch: dict, fraction: float, seed: int, want_eval: bool) -> dict:
    mask = is_eval(np.asarray(batch[ID]), fraction, seed) == want_eval
    return {k: v[mask] for k, v in batch.items()}


def split_rows(spec: "JobSpec") -> tuple[int, int]:
    """(train rows, eval rows), from the ids alone."""
    data = spec.data
    ids = sources.read_ids(data.source, data)
    if data.eval_source:
        return len(ids), len(sources.read_ids(data.eval_source, data))
    n_eval = int(is_eval(ids, data.eval_split, spec.run.seed).sum())
    return len(ids) - n_eval, n_eval


def _split(ds: "ray.data.Dataset", spec: "JobSpec", want_eval: bool) -> "ray.data.Dataset":
    return ds.map_batches(_keep, fn_kwargs=dict(fraction=spec.data.eval_split, seed=spec.run.seed, want_eval=want_eval), batch_format="numpy")


def _preprocessed(ds: "ray.data.Dataset", spec: "JobSpec") -> "ray.data.Dataset":
    p = spec.data.preprocess
    return ds.map_batches(preprocess, fn_kwargs=dict(scale=p.scale, mean=p.mean, std=p.std), batch_format="numpy")


def _sources(spec: "JobSpec", arrays: sources.Arrays | None = None) -> tuple["ray.data.Dataset", "ray.data.Dataset"]:
    """(train split, eval split) of the source; `arrays`: an in-memory source already loaded."""
    data = spec.data
    source = sources.arrays_to_dataset(arrays, data.shape) if arrays is not None else sources.read(data.source, data)
    if data.eval_source:
        return source, sources.read(data.eval_source, data, "data.eval_source")
    return _split(source, spec, False), _split(source, spec, True)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(mix64(np.array([epoch], dtype=np.int64), seed)[0] >> np.uint64(33))


CHUNK_ROWS = 1024  # rows per read task of an in-memory pass


def holds_all_passes(spec: "JobSpec") -> bool:
    return sources.kind(spec.data.source) != "parquet"


def _augment_views(batch: dict, seed: int, augment_args: dict, seeded: bool) -> dict:
    """Random views, before the teacher. `seeded` (in-memory passes, whose rows carry their
    epoch): drawn from (run seed, epoch, first id of the batch), so every epoch gets new views
    and a replay of the run the same ones. Otherwise (parquet) from fresh entropy."""
    if not len(batch[ID]):
        return batch
    if not seeded:
        return augment(batch, **augment_args)
    epoch, first = int(batch[EPOCH][0]), np.asarray(batch[ID][:1])
    rng = np.random.default_rng([epoch_seed(seed, epoch), int(mix64(first, seed)[0] >> np.uint64(1))])
    return augment(batch, rng=rng, **augment_args)


_ARRAYS: dict = {}


@functools.lru_cache(maxsize=2)
def _pass_order(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    """The order of pass `epoch`: computed once per process, not once per chunk."""
    return np.random.default_rng(epoch_seed(seed, epoch)).permutation(n) if shuffle else np.arange(n)


def _emit_chunk(batch: dict, arrays, n_chunks: int, offset: int, shuffle: bool, seed: int) -> dict:
    """Rows of chunk j of pass p, for each (pass, chunk) index in the batch."""
    import ray

    key = arrays.hex()
    if key not in _ARRAYS:  # once per worker process, not once per chunk
        _ARRAYS.clear()
        _ARRAYS[key] = ray.get(arrays)
    data = _ARRAYS[key]
    n = len(data[ID])
    parts = []
    for index in np.asarray(batch["id"]).tolist():
        epoch, j = divmod(int(index) + offset, n_chunks)
        rows = _pass_order(seed, epoch, n, shuffle)[j * n // n_chunks:(j + 1) * n // n_chunks]
        parts.append({ID: data[ID][rows], X: data[X][rows], Y: data[Y][rows], EPOCH: np.full(len(rows), epoch, dtype=np.int64)})
    return {k: np.concatenate([p[k] for p in parts]) for k in (ID, X, Y, EPOCH)}


def _in_memory_passes(spec: "JobSpec", arrays: sources.Arrays, first_epoch: int, passes: int) -> "ray.data.Dataset":
    import ray
    import ray.data

    data = spec.data
    ids = np.arange(len(arrays.y), dtype=np.int64)
    keep = np.ones(len(ids), dtype=bool) if data.eval_source else ~is_eval(ids, data.eval_split, spec.run.seed)
    x = arrays.x[keep]
    if data.shape:
        x = x.reshape((len(x), *data.shape))
    ref = ray.put({ID: ids[keep], X: np.ascontiguousarray(x), Y: arrays.y[keep]})
    n_chunks = max(1, -(-int(keep.sum()) // CHUNK_ROWS))
    count = (passes - first_epoch) * n_chunks
    return ray.data.range(count, override_num_blocks=count).map_batches(
        _emit_chunk, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(arrays=ref, n_chunks=n_chunks, offset=first_epoch * n_chunks, shuffle=data.shuffle == "global", seed=spec.run.seed),
    )


def _parquet_pass(spec: "JobSpec", train_src: "ray.data.Dataset") -> "ray.data.Dataset":
    if spec.data.shuffle == "global":
        return train_src.random_shuffle()  # a new order each time Ray re-executes it (each epoch)
    if spec.data.shuffle == "local":
        return train_src.randomize_block_order()
    return train_src


def with_teacher(ds: "ray.data.Dataset", spec: "JobSpec") -> "ray.data.Dataset":
    from kd_ray.teacher import TeacherPredictor, pool_options

    teacher = spec.teacher.model_dump()
    return ds.map_batches(TeacherPredictor, fn_constructor_kwargs=dict(teacher=teacher, job_dir=spec.job_dir), **pool_options(teacher))


def build_eval(spec: "JobSpec") -> "ray.data.Dataset":
    return _preprocessed(_sources(spec)[1], spec)


def build(spec: "JobSpec", passes: int, first_epoch: int = 0) -> dict[str, "ray.data.Dataset"]:
    """The train data (every pass from `first_epoch` in one ordered stream, or one pass for
    parquet: see `holds_all_passes`) and the eval split."""
    arrays = sources.load_arrays(spec.data.source, spec.data) if holds_all_passes(spec) else None  # loaded once
    train_src, eval_src = _sources(spec, arrays)
    if arrays is not None:
        train = _in_memory_passes(spec, arrays, min(first_epoch, passes - 1), passes)
    else:
        train = _parquet_pass(spec, train_src)
    train = _preprocessed(train, spec)
    a = spec.data.augment
    if a.active:
        args = dict(noise_std=a.noise_std, shift=a.shift, hflip=a.hflip)
        train = train.map_batches(_augment_views, fn_kwargs=dict(seed=spec.run.seed, augment_args=args, seeded=holds_all_passes(spec)), batch_format="numpy")
    if spec.teacher is not None:
        train = with_teacher(train, spec)
    return {"train": train, "eval": _preprocessed(eval_src, spec)}

