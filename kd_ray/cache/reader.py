"""Training from a cache: the manifest compared with the job, every shard checked, then each
unit's rows read back into the stream (kd_ray.data.chunks.read_chunk joins them by row)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kd_ray.cache.files import MANIFEST, Store
from kd_ray.cache.manifest import (
    codec_class,
    codec_for,
    identity,
    mismatch,
    parts,
    read_manifest,
)
from kd_ray.core.columns import ID, INPUT
from kd_ray.core.errors import UserError
from kd_ray.core.hashing import sha256
from kd_ray.data.chunks import Sources
from kd_ray.data.sources import gather

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec
    from kd_ray.tasks.base import Task


# ---------------------------------------------------------------------------------------------
# Training from a cache

_DECODED: dict = {}  # (cache, shard file) -> its decoded outputs, in a process reading a random-access source


class CacheReader:
    """One source's cached outputs, as the training stream's columns (kd_ray.data), read by its
    task's codec: dense TEACHER logits, or the top-k columns with the tail at the job's
    temperature only."""

    def __init__(self, part: str, store: Store, codec, files: dict[int, str], keep: bool):
        self.field, self.store, self.codec, self.files = f"data.{part}", store, codec, files
        # Sources read at random shuffle rows across all units (every chunk touches every shard):
        # each process that reads them decodes each shard once and keeps it; others are read per
        # chunk. Never on the driver: it only checks the shards.
        self.keep = keep

    def _unit(self, unit: int):
        if not self.keep:
            return self._decoded(unit)
        key = (self.store.path, self.files[unit])
        if key not in _DECODED:
            if any(k[0] != self.store.path for k in _DECODED):  # one cache's at a time: a process reused by another run
                _DECODED.clear()
            _DECODED[key] = self._decoded(unit)
        return _DECODED[key]

    def _decoded(self, unit: int):
        data = self.store.read(self.files[unit])
        if data is None:
            raise RuntimeError(f"cache shard {self.files[unit]} vanished from {self.store.path} after it was checked")
        return self.codec.decode(data)

    def read(self, units: np.ndarray, rows: np.ndarray, raw: dict) -> dict:
        """The outputs for rows (units[i], rows[i]) of the source, whose columns as the source
        gave them (ids, inputs, before preprocessing) the caller read: `raw`."""
        out = gather(units, rows, lambda u, r: self.codec.rows(self._unit(u), r))
        if out is None:
            return self.codec.empty()
        changed = (out.pop(ID) != raw[ID]) | (out.pop(INPUT) != self.codec.digests(raw))
        if changed.any():
            # A RuntimeError, not a UserError: it is raised in a Ray task, and reaches the user as
            # the run's one-line failure either way.
            raise RuntimeError(f"{self.field}: {int(changed.sum())} of {len(changed)} rows read (the first with id "
                               f"{int(raw[ID][np.argmax(changed)])}) differ from the inputs the cache at {self.store.path} "
                               "was captured from: the data changed after the capture. Delete that cache (or choose a "
                               "new teacher.cache.path) and run `kd-ray cache JOB.yaml` again")
        return out


@dataclass
class TeacherCache:
    """A checked cache: readers for the training stream and for scoring the teacher on the eval split."""

    train: CacheReader
    eval: CacheReader
    manifest: dict


def open_for_training(spec: "JobSpec", task: "Task", data: Sources) -> TeacherCache:
    """The job's cache, compared with the job and checked shard by shard before any training.
    Each problem is a UserError naming the field (or the shard) and the fix."""
    store = Store(spec.teacher.cache.path)
    manifest = read_manifest(store)
    if manifest is None:
        raise UserError("teacher.cache.path", f"no teacher-output cache at {store.path} (no {MANIFEST}); write it with "
                        "`kd-ray cache JOB.yaml` (the same job file), then run again")
    if manifest.get("status") != "complete":
        raise UserError("teacher.cache.path", f"the cache at {store.path} is incomplete (its capture stopped part-way); run "
                        "`kd-ray cache JOB.yaml` again to finish it")
    problem = mismatch(manifest, identity(spec, task, data)[0], spec.distill.temperature, codec_class(task).CHECKED)
    if problem:
        raise UserError(problem[0], f"{problem[1]}; the cache at {store.path} was captured for another set-up: set it back, or "
                        "write a cache for this job with `kd-ray cache JOB.yaml` and a new teacher.cache.path")
    codec = codec_for(task, manifest["outputs"], spec.distill.temperature)  # the tail column of a temperature it holds
    _check_shards(store, manifest["shards"])
    readers = {}
    for part, reader in parts(data):
        entries = [s for s in manifest["shards"] if s["part"] == part]
        readers[part] = CacheReader(part, store, codec, {s["unit"]: s["file"] for s in entries}, reader.random_access)
    return TeacherCache(train=readers["source"], eval=readers.get("eval_source", readers["source"]), manifest=manifest)


def _check_shards(store: Store, shards: list[dict]) -> None:
    """Reads every shard and checks its SHA-256 (eight at a time: nothing is kept)."""
    def check(entry: dict) -> tuple[dict, str | None]:
        data = store.read(entry["file"])
        if data is None:
            return entry, "is missing"
        if sha256(data) != entry["sha256"]:
            return entry, "does not match its checksum (corrupt)"
        return entry, None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(check, shards))
    bad = [(entry, why) for entry, why in results if why]
    if bad:
        entry, why = bad[0]
        more = f" (and {len(bad) - 1} more shards are missing or corrupt)" if len(bad) > 1 else ""
        raise UserError("teacher.cache.path", f"shard {entry['file']} of the cache at {store.path} {why}{more}; run "
                        "`kd-ray cache JOB.yaml` again to rewrite it")
