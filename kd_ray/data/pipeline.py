"""JobSpec -> the Ray Datasets the trainer consumes.

    train:        source -> split -> preprocess -> shuffle -> augment -> teacher pool
    eval:         source -> split -> preprocess
    teacher_eval: eval -> teacher pool (scored once, for the teacher's accuracy)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kd_ray.data import ID, sources
from kd_ray.data.ids import is_eval
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


def with_teacher(ds: "ray.data.Dataset", spec: "JobSpec") -> "ray.data.Dataset":
    from kd_ray.teacher import TeacherPredictor, pool_options

    teacher = spec.teacher.model_dump()
    return ds.map_batches(TeacherPredictor, fn_constructor_kwargs=dict(teacher=teacher, job_dir=spec.job_dir), **pool_options(teacher))


def _sources(spec: "JobSpec") -> tuple["ray.data.Dataset", "ray.data.Dataset"]:
    data = spec.data
    source = sources.read(data.source, data)
    if data.eval_source:
        return source, sources.read(data.eval_source, data, "data.eval_source")
    return _split(source, spec, False), _split(source, spec, True)


def build_eval(spec: "JobSpec") -> "ray.data.Dataset":
    return _preprocessed(_sources(spec)[1], spec)


def build(spec: "JobSpec") -> dict[str, "ray.data.Dataset"]:
    data = spec.data
    train_src, eval_src = _sources(spec)

    train = _preprocessed(train_src, spec)
    if data.shuffle == "global":
        train = train.random_shuffle()
    elif data.shuffle == "local":
        train = train.randomize_block_order()
    a = data.augment
    if a.active:
        train = train.map_batches(augment, fn_kwargs=dict(noise_std=a.noise_std, shift=a.shift, hflip=a.hflip), batch_format="numpy")
    evaluation = _preprocessed(eval_src, spec)
    datasets = {"train": train, "eval": evaluation}
    if spec.teacher is not None:
        datasets["train"] = with_teacher(train, spec)
        datasets["teacher_eval"] = with_teacher(evaluation, spec)
    return datasets
