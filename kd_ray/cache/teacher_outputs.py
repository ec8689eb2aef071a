"""Teacher outputs captured once, checked, and read back in place of the teacher pool.

`kd-ray cache JOB.yaml` runs the job's teacher over every row of its data (data.source, and its
eval rows when they come from a reader of their own: data.eval_source, or a language model's
held-out documents, so that the teacher's eval score needs no teacher either) with the job's
deterministic preprocessing, and writes at teacher.cache.path (a directory, or any URI pyarrow
opens: file://, s3://, gs://):

    manifest.json                       what the outputs are a function of: the teacher (model,
                                        kwargs, SHA-256 of its weights), its inputs (a
                                        classifier's features, shape and preprocessing; a language
                                        model's tokenizer, vocabulary, row length, packing and
                                        loss mask), the output format (full or top-k, k, dtype,
                                        temperatures), a digest of each source's rows; and, once
                                        complete, every shard with its rows and SHA-256.
                                        Written first as "incomplete", last as "complete".
    source-00000.<sha16>.parquet        one shard per unit of data.source (an in-memory block of
    eval_source-00000.<sha16>.parquet   rows, or a parquet row group): every row of the unit, in
                                        order: id, row, a 64-bit digest of the row's input as the
                                        source gave it, and the teacher's outputs: per sample for
                                        a classifier (kd_ray.cache.samples), per token for a
                                        language model (kd_ray.cache.tokens).

Shards are written under a temporary name and then renamed into place, and the name carries the
first 16 hex digits of the content's SHA-256 (kd_ray.cache.files): a shard is whole if and only if its
name is there and its bytes hash to it. A capture killed
part-way therefore resumes: the next one keeps the shards that check out and writes the rest,
byte for byte what one go writes, since a shard is a function of its unit alone (the teacher
always sees a unit in the same batches).

A cached run (`teacher.mode: cached`) keeps the run's ordered stream (kd_ray.data.order): each
chunk's inputs are read from the source as before, and the teacher's outputs are joined from the
shards of the same units, ids and input digests checked. So resume, the data cursor, elastic groups and the
exactly-once order work unchanged, while no teacher is loaded and no pool starts. Before
training, the manifest is compared with the job (a difference is one error naming the job-file
field) and every shard's SHA-256 is checked. The manifest's digest of a parquet source covers its
files' sizes and row groups, not every data page (reading them all at each start would cost a
pass over the data); so each row's input is also compared with its digest in the shard as the
stream reads it, and a source rewritten in place in the same shape stops the run before any of
its changed rows reach a student.

Why an online run does not write the cache as it goes: its rows reach the teacher in shuffled
chunks dealt to several workers, a restart resumes the stream at the cursor (rows before it are
never sent to the teacher again, so the outputs of shards cut by a crash would be lost), the
stream holds the pool for the whole run (it cannot drop it once the cache is full), and random
augmentation makes outputs that no cache may hold. One capture pass is simpler and exact.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

import kd_ray
from kd_ray.cache.files import MANIFEST, SHARD, TMP, Store, shard_name, to_parquet
from kd_ray.cache.samples import SampleCodec
from kd_ray.cache.tokens import TokenCodec
from kd_ray.callbacks import Callbacks
from kd_ray.cluster import check_cluster, ensure_ray, quiet_data
from kd_ray.core.columns import ID, INPUT
from kd_ray.core.errors import Failed, UserError, reason
from kd_ray.core.hashing import sha256
from kd_ray.core.imports import make_importable
from kd_ray.data.chunks import Sources
from kd_ray.data.sources import gather
from kd_ray.losses import tail_column
from kd_ray.models.precision import auto_note
from kd_ray.spec import DATA_IDENTITY
from kd_ray.tasks.build import task_for
from kd_ray.tasks.cache_checks import refuse_augmentation
from kd_ray.teacher import pool_options

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec
    from kd_ray.tasks.base import Task

FORMAT_VERSION = 3  # of the layout above; a cache of another version is refused, not misread (3: vectorised input digests)

Key = tuple[str, int]  # (the job-file field of the source: "source" or "eval_source", unit)

# What a task's cache holds, and how it is compared, written and read: a codec, by the unit of
# the task's signal (per sample, or per token: Task.unit), with
#   describe(spec, data)  the teacher, inputs and outputs sections of the manifest (JSON values)
#   CHECKED               (job-file field, manifest section, key): what a job must match
#   capturer(spec, task)  in a pool actor: a unit's rows as the source gives them -> a shard's table
#   decode(bytes), rows(unit, rows), digests(raw rows), empty()   the training stream's side
#   schema(), payload(), items(reader, rows), unit, describe_outputs()   for the manifest and the user
_BY_UNIT = {"samples": SampleCodec, "tokens": TokenCodec}


def codec_class(task: "Task") -> type:
    return _BY_UNIT[task.unit]


def codec_for(task: "Task", outputs: dict, temperature: float | None = None):
    return codec_class(task)(outputs, temperature)


# ---------------------------------------------------------------------------------------------
# What a cache stands for, and how a job is compared with it


def _parts(data: "Sources") -> list[tuple[str, Any]]:
    """The sources a cache holds, by job-file field, with their readers: the eval rows have a
    shard of their own when they come from a reader of their own (data.eval_source, or a
    language model's held-out documents)."""
    return [("source", data.reader)] + ([("eval_source", data.eval_reader)] if data.eval_reader is not data.reader else [])


def identity(spec: "JobSpec", task: "Task", data: Sources) -> tuple[dict, dict[Key, int]]:
    """What the teacher's outputs are a function of, as this job describes it (JSON values), and
    the rows of each unit a cache of it holds."""
    out = {**codec_class(task).describe(spec, data, task), "data": {"source": None, "eval_source": None}}
    units: dict[Key, int] = {}
    for part, reader in _parts(data):
        digest = hashlib.blake2b(reader.identity().encode(), digest_size=16)
        for u, ids in enumerate(reader.unit_ids()):
            digest.update(np.int64(len(ids)).tobytes() + np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            units[(part, u)] = len(ids)
        rows = [n for (p, _), n in units.items() if p == part]
        out["data"][part] = {"rows": sum(rows), "units": len(rows), "digest": digest.hexdigest()}
    return json.loads(json.dumps(out)), units  # tuples as lists, as they come back from the manifest


DATA_CHECKED = tuple((field, "data", field.rpartition(".")[2]) for field in DATA_IDENTITY)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict) and "digest" in value:
        return f"data of {value['rows']} rows in {value['units']} units (digest {value['digest'][:12]})"
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32,64}", value):
        return f"digest {value[:12]}..." if len(value) < 64 else f"sha256 {value[:12]}..."
    return json.dumps(value, sort_keys=True)


def mismatch(manifest: dict, job: dict, temperature: float | None, checked: tuple = SampleCodec.CHECKED) -> tuple[str, str] | None:
    """The first job-file field on which a cache and a job differ, and how: (field, detail).

    `checked` is the task's codec's CHECKED; `temperature` is the training job's
    distill.temperature, which a top-k cache must hold a tail for; None compares for a capture,
    whose temperatures must be the cache's exactly."""
    for field, section, key in (*checked, *DATA_CHECKED):
        have, want = manifest.get(section, {}).get(key), job[section][key]
        if have != want:
            return field, f"the cache was captured with {_show(have)}, this job has {_show(want)}"
    cached = manifest["outputs"].get("temperatures")
    if temperature is None:
        if cached != job["outputs"]["temperatures"]:
            return "teacher.cache.temperatures", f"the cache holds the top-k tail for temperatures {cached}, this job asks for {job['outputs']['temperatures']}"
    elif cached is not None:
        try:
            tail_column(tuple(cached), temperature)
        except ValueError:
            return "distill.temperature", f"the top-k cache holds the tail mass only for temperatures {cached}, not {temperature}"
    return None


def read_manifest(store: Store) -> dict | None:
    data = store.read(MANIFEST)
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("kd_ray_cache") != FORMAT_VERSION:
        raise UserError("teacher.cache.path", f"{store.path}/{MANIFEST} is not a kd_ray cache manifest of format {FORMAT_VERSION}; "
                        "choose another teacher.cache.path, or delete that directory and capture again (a cache of an "
                        "older format, from an older kd_ray, is captured again the same way)")
    return manifest


def write_manifest(store: Store, manifest: dict) -> None:
    store.write(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------
# Capture: `kd-ray cache JOB.yaml`


def capture(spec: "JobSpec", echo: Callable[[str], None] = print, verbose: bool = False) -> dict:
    """Write (or finish) the job's teacher-output cache; returns figures for the user."""
    if spec.teacher is None or spec.teacher.cache is None:
        raise UserError("teacher.cache", "kd-ray cache writes the teacher's outputs to teacher.cache.path; add a teacher section "
                        "with cache: {path: DIR} (format: full, or topk with k)")
    refuse_augmentation(spec)
    ensure_ray(spec, verbose, teacher_pool=True)  # before the rows: a language model's are tokenized in Ray Data tasks
    quiet_data()
    task = task_for(spec)  # built once, passed down to the sources and the capture's pool
    data = Sources(spec, task)
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
    readers = dict(_parts(data))
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
    except UserError:
        raise
    except Exception as e:  # in the pool: a unit that cannot be read, a teacher that fails on it...
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
        fn_constructor_kwargs=dict(spec=spec, task=task.handle, readers={p: ray.put(r) for p, r in _parts(data)}, outputs=outputs,
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


# ---------------------------------------------------------------------------------------------
# Training from a cache


class CacheReader:
    """One source's cached outputs, as the training stream's columns (kd_ray.data), read by its
    task's codec: dense TEACHER logits, or the top-k columns with the tail at the job's
    temperature only."""

    def __init__(self, part: str, store: Store, codec, files: dict[int, str], contents: dict[int, bytes] | None):
        self.field, self.store, self.codec, self.files = f"data.{part}", store, codec, files
        # In-memory sources shuffle rows across all units (every chunk touches every shard): their
        # outputs are decoded once here and travel with the reader; others are read per chunk.
        self.loaded = {u: codec.decode(b) for u, b in contents.items()} if contents is not None else None

    def _unit(self, unit: int):
        if self.loaded is not None:
            return self.loaded[unit]
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
    in_memory = {part for part, reader in _parts(data) if reader.random_access}
    contents = _checked_shards(store, manifest["shards"], in_memory)
    readers = {}
    for part, _ in _parts(data):
        entries = [s for s in manifest["shards"] if s["part"] == part]
        readers[part] = CacheReader(part, store, codec, {s["unit"]: s["file"] for s in entries},
                                    {s["unit"]: contents[s["file"]] for s in entries} if part in in_memory else None)
    return TeacherCache(train=readers["source"], eval=readers.get("eval_source", readers["source"]), manifest=manifest)


def _checked_shards(store: Store, shards: list[dict], keep_parts: set[str]) -> dict[str, bytes]:
    """Reads every shard and checks its SHA-256; returns the bytes of those in `keep_parts`."""
    def check(entry: dict) -> tuple[dict, str | None, bytes | None]:
        data = store.read(entry["file"])
        if data is None:
            return entry, "is missing", None
        if sha256(data) != entry["sha256"]:
            return entry, "does not match its checksum (corrupt)", None
        return entry, None, data if entry["part"] in keep_parts else None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(check, shards))
    bad = [(entry, why) for entry, why, _ in results if why]
    if bad:
        entry, why = bad[0]
        more = f" (and {len(bad) - 1} more shards are missing or corrupt)" if len(bad) > 1 else ""
        raise UserError("teacher.cache.path", f"shard {entry['file']} of the cache at {store.path} {why}{more}; run "
                        "`kd-ray cache JOB.yaml` again to rewrite it")
    return {entry["file"]: data for entry, _, data in results if data is not None}
