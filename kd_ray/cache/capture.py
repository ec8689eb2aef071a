"""`kd-ray cache`: the teacher's outputs over every unit of the job's sources, written as checked,
resumable shards by the job's own teacher pool (the layout: kd_ray.cache.manifest)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

import kd_ray
from kd_ray.cache.files import SHARD, TMP, Store, shard_name, to_parquet
from kd_ray.cache.manifest import (
    FORMAT_VERSION,
    Key,
    codec_for,
    identity,
    mismatch,
    parts,
    read_manifest,
    write_manifest,
)
from kd_ray.callbacks import Callbacks
from kd_ray.cluster import check_cluster, ensure_ray, quiet_data
from kd_ray.core.errors import Failed, UserError, as_users, raise_users, reason
from kd_ray.core.hashing import sha256
from kd_ray.core.imports import make_importable
from kd_ray.data.chunks import Sources
from kd_ray.models.precision import auto_note
from kd_ray.tasks.build import task_for
from kd_ray.tasks.cache_checks import refuse_augmentation
from kd_ray.teacher import pool_options

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec
    from kd_ray.tasks.base import Task


# ---------------------------------------------------------------------------------------------
# Capture: `kd-ray cache JOB.yaml`


def capture(spec: "JobSpec", echo: Callable[[str], None] = print, verbose: bool = False) -> dict:
    """Write (or finish) the job's teacher-output cache; returns figures for the user."""
    if spec.teacher is None or spec.teacher.cache is None:
        raise UserError("teacher.cache", "kd-ray cache writes the teacher's outputs to teacher.cache.path; add a teacher section "
                        "with cache: {path: DIR} (format: full, or topk with k)")
    refuse_augmentation(spec)
    ensure_ray(spec, verbose, teacher_pool=True)  # before the rows: a language model's are tokenized in Ray Data tasks
    quiet_data(verbose)
    task = task_for(spec)  # built once, passed down to the sources and the capture's pool
    data = as_users(lambda: Sources(spec, task))  # a language model's documents are tokenized in Ray Data tasks
    store = Store(spec.teacher.cache.path)
    job, planned = identity(spec, task, data)
    codec = codec_for(task, job["outputs"])
    manifest = read_manifest(store)
    if manifest is not None:
        problem = mismatch(manifest, job, None, codec.CHECKED)
        if problem:
            raise UserError(problem[0], f"{problem[1]}: {store.path} holds the cache of another set-up; choose a new "
                            "teacher.cache.path, or delete that directory to capture there")
    kept, dropped = _whole_shards(store, planned)
    todo = [key for key in planned if key not in kept]
    readers = dict(parts(data))
    items = {key: codec.items(readers[key[0]], key[1], rows) for key, rows in planned.items()}
    head = {"kd_ray_cache": FORMAT_VERSION, **job, "kd_ray_version": kd_ray.__version__,
            "about": {"teacher.weights": spec.teacher.weights, "teacher.precision": spec.teacher.precision,
                      "data.source": spec.data.source, "data.eval_source": spec.data.eval_source}}
    unit = codec.unit
    summary = {"path": store.path, "shards": len(planned), "kept": len(kept), "written": 0, "rows": sum(planned.values()),
               f"{unit}s": sum(items.values())}
    if manifest is not None and manifest.get("status") == "complete" and not todo and not dropped:
        echo(f"cache: {store.path} is complete ({len(planned)} shards, every one checked); nothing to write")
        return {**summary, **_sizes(manifest, codec)}
    if todo:
        # Before anything is written: a pool that asks for what an embedded Ray lacks would wait forever.
        check_cluster(spec, echo, train=False, teacher_pool=True)
        if note := auto_note(spec.teacher.precision, spec.teacher.pool.gpus_per_actor):
            echo(note)
    store.make()
    for name in store.names():
        if name.startswith(TMP):  # a write that a killed capture left half-done: never visible as a shard
            store.remove(name)
    write_manifest(store, {**head, "status": "incomplete"})
    echo(f"cache: {store.path}: {len(planned)} shards ({summary['rows']} rows, {summary[f'{unit}s']:,} {unit}s); {len(kept)} already whole"
         + (f", {dropped} damaged or stray removed" if dropped else "") + f"; writing {len(todo)}")
    started = time.time()
    _capture_shards(spec, task, data, store, job["outputs"], todo, planned, kept, echo, verbose)
    seconds = time.time() - started
    final = {**head, "status": "complete", "rows": summary["rows"], "items": summary[f"{unit}s"], "schema": codec.schema(),
             "shards": [kept[key] for key in planned]}
    write_manifest(store, final)
    written = sum(items[key] for key in todo)
    summary.update(written=len(todo), seconds=round(seconds, 3), **_sizes(final, codec),
                   **{f"{unit}s_per_second": round(written / seconds, 1) if seconds else None})
    echo(f"cache: complete: {summary['shards']} shards, {summary['rows']} rows, {summary[f'{unit}s']:,} {unit}s, {summary['bytes']:,} bytes "
         f"({summary[f'bytes_per_{unit}']:.1f} bytes/{unit} on disk, teacher outputs {summary[f'payload_bytes_per_{unit}']} bytes/{unit} "
         f"in memory); wrote {len(todo)} shards ({written:,} {unit}s) in {seconds:.1f} s, {summary[f'{unit}s_per_second']} {unit}s/s")
    return summary


def _capture_shards(spec: "JobSpec", task: "Task", data: Sources, store: Store, outputs: dict, todo: list[Key], planned: dict[Key, int],
                    kept: dict[Key, dict], echo: Callable[[str], None], verbose: bool) -> None:
    """The missing shards written by the job's pool, each added to `kept` as it lands."""
    every = max(1, len(todo) // 20)
    try:
        for i, shard in enumerate(_write_shards(spec, task, data, store, outputs, todo, planned, verbose), 1):
            kept[(shard["part"], shard["unit"])] = shard
            if i % every == 0 or i == len(todo):
                echo(f"cache: {i}/{len(todo)} shards written ({shard['file']}, {shard['rows']} rows)")
    except Exception as e:  # in the pool: a unit that cannot be read, a teacher that fails on it...
        raise_users(e)  # a mistake of the user's, raised in an actor: its one line, not Ray's traceback
        raise Failed("cache", f"{reason(e)} ({len(kept)} of {len(planned)} shards are whole and kept; fix the cause and run "
                     "`kd-ray cache JOB.yaml` again: it writes only the others)") from e


def _sizes(manifest: dict, codec) -> dict:
    """Bytes on disk per unit of the codec (sample, token), and what the loss takes in memory."""
    total, unit = sum(s["bytes"] for s in manifest["shards"]), codec.unit
    items = manifest.get("items", manifest["rows"])  # caches written before "items" held samples only
    return {"bytes": total, f"bytes_per_{unit}": total / max(items, 1), f"payload_bytes_per_{unit}": codec.payload()}


def _whole_shards(store: Store, planned: dict[Key, int]) -> tuple[dict[Key, dict], int]:
    """The shards already written whole (name there, bytes hash to it); the others are removed.
    Returns them by unit, and how many files were removed."""
    found: dict[Key, list[str]] = {}
    for name in store.names():
        m = SHARD.match(name)
        if m:
            found.setdefault((m.group(1), int(m.group(2))), []).append(name)
    kept: dict[Key, dict] = {}
    removed = 0

    def digest(name: str) -> tuple[str, int]:
        data = store.read(name) or b""
        return sha256(data), len(data)

    names = [name for key in found for name in found[key]]
    with ThreadPoolExecutor(8) as pool:  # reading and hashing release the GIL
        digests = dict(zip(names, pool.map(digest, names)))
    for key, candidates in found.items():
        for name in candidates:
            sha, size = digests[name]
            if key in planned and key not in kept and sha.startswith(SHARD.match(name).group(3)):
                kept[key] = {"part": key[0], "unit": key[1], "file": name, "rows": planned[key], "sha256": sha, "bytes": size}
            else:
                store.remove(name)
                removed += 1
    return kept, removed


def _write_shards(spec: "JobSpec", task: "Task", data: Sources, store: Store, outputs: dict, todo: list[Key], planned: dict[Key, int],
                  verbose: bool) -> Iterator[dict]:
    """The job's teacher pool (its actor count, CPUs, GPUs and batch size) over the missing units,
    one unit per call; yields each shard as it is written, in any order."""
    import ray

    if not todo:
        return
    items = [{"part": part, "unit": unit, "rows": planned[(part, unit)]} for part, unit in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardWriter,
        fn_constructor_kwargs=dict(spec=spec, task=task.handle, readers={p: ray.put(r) for p, r in parts(data)}, outputs=outputs,
                                   store=store),
        **{**pool_options(spec.teacher), "batch_size": 1},
    )
    for row in ds.iter_rows():
        yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


class ShardWriter:
    """A teacher pool actor of the capture: for each unit it is given, every row read as the
    source gives it, the task's capture (its codec's capturer: the teacher over the unit in the
    same batches whenever it is captured, so the same bits), and the shard written."""

    def __init__(self, spec: "JobSpec", task, readers: dict, outputs: dict, store: Store):
        """`task`: a TaskHandle (kd_ray.tasks), built here."""
        import ray

        make_importable(spec.job_dir)
        task = task()
        self.capture = codec_for(task, outputs).capturer(spec, task)
        self.readers = {part: ray.get(ref) for part, ref in readers.items()}
        self.store = store
        self.callbacks = Callbacks(spec)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in ("part", "unit", "file", "rows", "sha256", "bytes")}
        for part, unit, rows in zip(batch["part"].tolist(), batch["unit"].tolist(), batch["rows"].tolist()):
            raw = self.readers[part].read(np.full(rows, unit, dtype=np.int64), np.arange(rows))
            data = to_parquet(self.capture(raw))
            digest = sha256(data)
            name = shard_name(part, unit, digest)
            self.store.write(name, data)
            for k, v in zip(out, (part, unit, name, rows, digest, len(data))):
                out[k].append(v)
            self.callbacks.on_shard_written({k: v[-1] for k, v in out.items()})
        return {k: np.array(v) for k, v in out.items()}
