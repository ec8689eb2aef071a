"""Checks of a teacher.cache block that both tasks make: where the cache goes, its temperatures,
and no random augmentation with a cache (one deterministic view per sample)."""

from __future__ import annotations

import os

from kd_ray.core import storage
from kd_ray.core.errors import UserError
from kd_ray.losses import tail_column
from kd_ray.spec import CACHE_MANIFEST, JobSpec, cache_temperatures


def check_cache_temperatures(spec: JobSpec) -> None:
    """A top-k cache's temperatures: each > 0, and the job's among them when it trains from it."""
    cache, distill = spec.teacher.cache, spec.distill
    if cache.temperatures is not None and (not cache.temperatures or min(cache.temperatures) <= 0):
        raise UserError("teacher.cache.temperatures", f"{cache.temperatures}: give one or more temperatures, all > 0")
    if spec.teacher.cached:
        try:
            tail_column(tuple(cache_temperatures(spec)), distill.temperature)
        except ValueError:
            raise UserError("distill.temperature", f"{distill.temperature} is not among teacher.cache.temperatures {cache.temperatures}: "
                            "a top-k cache holds the tail mass only for those; add it there (and recapture) or use one of them") from None



def check_cache_path(path: str) -> None:
    if storage.is_remote(path):
        storage.check_reachable(path, "teacher.cache.path")
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError("teacher.cache.path", f"{path} is a file; a cache is a directory (kd-ray cache writes it): choose another path")
    manifest = os.path.join(path, CACHE_MANIFEST)
    if os.path.exists(manifest) and not os.path.isfile(manifest):
        raise UserError("teacher.cache.path", f"{manifest} is not a file, so {path} is not a kd_ray cache; choose another path")


def refuse_augmentation(spec: JobSpec) -> None:
    if spec.data.augment.active:
        raise UserError("data.augment", "random augmentation gives new inputs every epoch, but a teacher-output cache holds one "
                        "deterministic view per sample; remove data.augment (override data.augment={}) or use teacher.mode: online")


def need_cache_block(spec: JobSpec) -> None:
    """teacher.mode: cached trains from teacher.cache, which the job must name."""
    if spec.teacher.cache is None:
        raise UserError("teacher.cache", "teacher.mode: cached reads the teacher's outputs from a cache; add teacher.cache: "
                        "{path: DIR} and write it with `kd-ray cache JOB.yaml`")
