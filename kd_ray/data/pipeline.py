"""JobSpec -> the Ray Datasets the trainer consumes.

    train: source -> split -> preprocess -> [per pass: shuffle(seed, epoch) -> augment] x passes
           -> teacher pool
    eval:  source -> split -> preprocess

The training data is ONE stream holding every pass over the data, in pass order, each row
tagged with its epoch. Ray Data re-executes a dataset, actor pools included, each time it is
iterated; iterating once per epoch would restart the teacher pool (process start, imports,
weights) every epoch. One stream starts the pool once per run, and gives every epoch an order
that is a function of (seed, epoch) alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kd_ray.data import EPOCH, ID, sources
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


def _sources(spec: "JobSpec") -> tuple["ray.data.Dataset", "ray.data.Dataset"]:
    data = spec.data
    source = sources.read(data.source, data)
    if data.eval_source:
        return source, sources.read(data.eval_source, data, "data.eval_source")
    return _split(source, spec, False), _split(source, spec, True)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(mix64(np.array([epoch], dtype=np.int64), seed)[0] >> np.uint64(33))


def _tag_and_augment(batch: dict, epoch: int, seed: int, augment_args: dict | None) -> dict:
    out = {**batch, EPOCH: np.full(len(batch[ID]), epoch, dtype=np.int64)}
    if augment_args and len(batch[ID]):
        # Seeded by (run seed, epoch, first id of the batch): new views every epoch, the same
        # views when the same run is replayed.
        first = np.asarray(batch[ID][:1])
        rng = np.random.default_rng([epoch_seed(seed, epoch), int(mix64(first, seed)[0] >> np.uint64(1))])
        out = augment(out, rng=rng, **augment_args)
    return out


def _one_pass(base: "ray.data.Dataset", spec: "JobSpec", epoch: int) -> "ray.data.Dataset":
    data, seed = spec.data, spec.run.seed
    ds = base
    if data.shuffle == "global":
        ds = ds.random_shuffle(seed=epoch_seed(seed, epoch))
    elif data.shuffle == "local":
        ds = ds.randomize_block_order(seed=epoch_seed(seed, epoch))
    a = data.augment
    augment_args = dict(noise_std=a.noise_std, shift=a.shift, hflip=a.hflip) if a.active else None
    return ds.map_batches(_tag_and_augment, fn_kwargs=dict(epoch=epoch, seed=seed, augment_args=augment_args), batch_format="numpy")


def with_teacher(ds: "ray.data.Dataset", spec: "JobSpec") -> "ray.data.Dataset":
    from kd_ray.teacher import TeacherPredictor, pool_options

    teacher = spec.teacher.model_dump()
    return ds.map_batches(TeacherPredictor, fn_constructor_kwargs=dict(teacher=teacher, job_dir=spec.job_dir), **pool_options(teacher))


def build_eval(spec: "JobSpec") -> "ray.data.Dataset":
    return _preprocessed(_sources(spec)[1], spec)


def build(spec: "JobSpec", passes: int, first_epoch: int = 0) -> dict[str, "ray.data.Dataset"]:
    """The train stream (passes `first_epoch` .. `passes - 1`, in order) and the eval split."""
    train_src, eval_src = _sources(spec)
    base = _preprocessed(train_src, spec)
    if sources.kind(spec.data.source) != "parquet":
        # Already held in memory whole: split and preprocess it once, not once per pass.
        base = base.materialize()
    views = [_one_pass(base, spec, e) for e in range(first_epoch, passes)]
    train = views[0].union(*views[1:]) if len(views) > 1 else views[0]
    if spec.teacher is not None:
        train = with_teacher(train, spec)
    return {"train": train, "eval": _preprocessed(eval_src, spec)}
