"""The Ray Datasets the trainers consume.

    train: chunks of every epoch, in the order of kd_ray.data.order, from the cursor on
           -> read + preprocess + augment (one task per chunk) -> teacher pool
           (a pool on CPUs reads its chunks itself: one actor call per chunk, see build_train)
           -> blocks of whole micro-batches (kd_ray.batch_plan.micro_batches_per_block), for a
           group that may hold several workers; a lone worker cuts its own
           (teacher.mode: cached: the read task joins the cached outputs of the same rows, kd_ray.cache,
           and there is no pool)
    eval:  the eval split in source order -> read + preprocess

The train dataset is ONE ordered stream of the whole run, so the teacher pool starts once per
run (Ray Data re-executes a dataset, actor pools included, each time it is iterated). With
preserve_order, Ray's split hands each block to the consumer that has received the fewest rows,
so blocks of equal size go round-robin: worker r of W gets blocks r, r + W, ..., cuts them into
micro-batches itself, and optimizer step s trains exactly positions [s x G, (s + 1) x G). The
loop checks every row's position (the POS column) a block at a time (kd_ray.train.batches).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from kd_ray.data import order
from kd_ray.data.chunks import Sources, chunk_kwargs, read_chunks

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from kd_ray.spec import JobSpec


def read_tasks(chunks: int, max_actors: float | None) -> "ray.data.TaskPoolStrategy | None":
    """Reading and preprocessing run as CPU tasks, one per chunk, spread over the cluster (Ray
    Data's default scheduling for small tasks is SPREAD), and never fused into the teacher's
    actors: fused, they ran serially with the teacher in one task holding many chunks, and
    nothing reached the trainers until that whole task had finished. Ray fuses a task stage into
    a following actor pool unless the task stage's size is set and differs from the pool's
    max_size (ray/data/_internal/logical/rules/operator_fusion.py, _fuse_compute_strategy). The
    size is the number of chunks, which limits nothing, or one fewer where that equals the pool's
    max_size (a size above the chunks makes Ray warn on the console). One chunk read by one actor
    has nothing to keep apart: None, Ray's default."""
    import ray.data

    if chunks != max_actors:
        return ray.data.TaskPoolStrategy(size=chunks)
    return ray.data.TaskPoolStrategy(size=chunks - 1) if chunks > 1 else None


def _stream(spec: "JobSpec", chunks: int, kwargs: dict) -> "ray.data.Dataset":
    import ray.data

    max_actors = spec.teacher.pool.max_actors if spec.teacher_in_stream else None
    return ray.data.range(chunks, override_num_blocks=chunks).map_batches(
        read_chunks, batch_size=1, batch_format="numpy", compute=read_tasks(chunks, max_actors), fn_kwargs=kwargs)


def build_eval(spec: "JobSpec", data: Sources, cache=None) -> "ray.data.Dataset":
    """The eval split, once through, in source order (with the cached teacher outputs of its
    rows, given the eval reader of a kd_ray.cache.reader.TeacherCache)."""
    return _stream(spec, data.eval.chunks_per_epoch("none"), chunk_kwargs(spec, data, False, cache=cache))


def build_train(spec: "JobSpec", data: Sources, end: int, block_rows: int | None, control, board=None,
                cache=None, pool=None) -> "ray.data.Dataset":
    """The training stream: positions from the control's cursor to `end`, in blocks of exactly
    `block_rows` rows (the last may be short), whole micro-batches (the unit the split deals out round-robin); None for a
    group of one worker, which cuts whatever blocks come into micro-batches itself
    (kd_ray.data.local.whole_micro_batches). The teacher's outputs come from `pool` (a
    kd_ray.teacher.TeacherPool, which reports to `board`), or from `cache` (the train reader of a
    kd_ray.cache.reader.TeacherCache), or from neither (no teacher). A pool that reads its
    own chunks (TeacherPool.reads_chunks: on CPUs) is handed chunk ids instead of rows."""
    chunks = order.stream_chunks(data.train, spec.data.shuffle, end)
    kwargs = chunk_kwargs(spec, data, True, control, end, cache)
    if pool is not None and pool.reads_chunks:
        train = pool.reading(chunks, functools.partial(read_chunks, **kwargs), board, end)
    else:
        train = _stream(spec, chunks, kwargs)
        if pool is not None:
            train = pool.after(train, board, end)
    # The repartition is an operator of its own, with a task per block: a lone worker is spared it
    return train if block_rows is None else train.repartition(target_num_rows_per_block=block_rows, strict=True)
