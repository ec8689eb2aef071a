"""Teacher outputs captured once, checked, and read back in place of the teacher pool.

`kd-ray cache JOB.yaml` runs the job's teacher over every sample of its data (data.source, and
data.eval_source if the job has one, so that the teacher's eval score needs no teacher either)
with the job's deterministic preprocessing, and writes at teacher.cache.path (a directory, or any
URI pyarrow opens: file://, s3://, gs://):

    manifest.json                       what the outputs are a function of: the teacher (model,
                                        kwargs, SHA-256 of its weights), its inputs (features,
                                        shape, preprocessing), the output format (full or top-k,
                                        k, dtype, temperatures, classes), a digest of each source;
                                        and, once complete, every shard with its rows and SHA-256.
                                        Written first as "incomplete", last as "complete".
    source-00000.<sha16>.parquet        one shard per unit of data.source (an in-memory block of
    eval_source-00000.<sha16>.parquet   1024 rows, or a parquet row group): every row of the unit,
                                        in order: id, row (with the shard's name, a reference to
                                        the source row), a 64-bit digest of the row's input as the
                                        source gave it, and the teacher's outputs.

Inputs are not stored: a cached run reads them from the source as an online run does, which its
ordered stream needs anyway, so a shard holds only what the teacher adds.

Shards are written under a temporary name and then renamed into place (on an object store the
upload itself is atomic), and the name carries the first 16 hex digits of the content's SHA-256:
a shard is whole if and only if its name is there and its bytes hash to it. A capture killed
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
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

import kd_ray
from kd_ray import weights
from kd_ray.data import ID, TAIL_LSE, TEACHER, X
from kd_ray.data.sources import gather, to_numpy
from kd_ray.data.transforms import preprocess
from kd_ray.errors import Failed, UserError, reason
from kd_ray.losses import tail_column, topk_compress
from kd_ray.callbacks import Callbacks
from kd_ray.checks import check_cache, check_model, refuse_augmentation
from kd_ray.cluster import check_cluster, ensure_ray, quiet_data
from kd_ray.signals import to_columns
from kd_ray.spec import DATA_IDENTITY, INPUT_IDENTITY, TEACHER_IDENTITY, cache_temperatures
from kd_ray.storage import filesystem

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from kd_ray.data.pipeline import Sources
    from kd_ray.spec import JobSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # of the layout above; a cache of another version is refused, not misread
ROW = "row"  # a sample's row within its unit
INPUT = "input_digest"  # input_digests of the sample's input, as the source gave it
_SHARD = re.compile(r"^(source|eval_source)-(\d+)\.([0-9a-f]{16})\.parquet$")
_TMP = ".tmp-"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Key = tuple[str, int]  # (the job-file field of the source: "source" or "eval_source", unit)


def shard_name(part: str, unit: int, sha256: str) -> str:
    return f"{part}-{unit:05d}.{sha256[:16]}.parquet"


# ---------------------------------------------------------------------------------------------
# The cache's format: pure functions, tested without Ray


def encode(logits: torch.Tensor, outputs: dict) -> dict[str, np.ndarray]:
    """A batch of the teacher's logits as the cache stores them: full logits in the cache's
    dtype, or a top-k (kd_ray.losses.topk_compress) with the tail at every cached temperature."""
    if outputs["format"] == "full":
        return {TEACHER: logits.float().numpy().astype(outputs["dtype"])}
    top = topk_compress(logits.float(), outputs["k"], temperatures=outputs["temperatures"], dtype=TORCH_DTYPES[outputs["dtype"]])
    return to_columns(top)


def input_digests(x: np.ndarray) -> np.ndarray:
    """A 64-bit BLAKE2b digest of each row of `x` (with its dtype and shape): what ties a cached
    output to the exact input the teacher saw."""
    x = np.ascontiguousarray(x)
    head = hashlib.blake2b(repr((x.dtype.str, x.shape[1:])).encode(), digest_size=8)
    out = np.empty(len(x), dtype=np.uint64)
    for i, row in enumerate(x):
        h = head.copy()
        h.update(row.data)
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def shard_table(ids: np.ndarray, digests: np.ndarray, columns: dict[str, np.ndarray]) -> "pa.Table":
    """One unit's rows: id, row, input digest, and each output as a fixed-size list per sample."""
    import pyarrow as pa

    arrays = {ID: pa.array(np.asarray(ids, dtype=np.int64)), ROW: pa.array(np.arange(len(ids), dtype=np.int32)),
              INPUT: pa.array(np.asarray(digests, dtype=np.uint64))}
    for name, values in columns.items():
        arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])
    return pa.table(arrays)


def to_parquet(table: "pa.Table") -> bytes:
    """The shard's bytes: the same table always gives the same bytes (same pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    # Dictionaries never pay for logits (nearly every value is distinct); splitting each value's
    # bytes into streams lets zstd find the repetition in exponents and high bytes. Measured on
    # a trained 1000-class teacher: 3,394 bytes/sample for fp32 logits, against 4,326 by default.
    pq.write_table(table, sink, compression="zstd", use_dictionary=False, use_byte_stream_split=True)
    return sink.getvalue().to_pybytes()


def decode(data: bytes) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data))
    return {name: to_numpy(table.column(name)) for name in table.column_names}


def schema(outputs: dict) -> dict[str, str]:
    """The shards' columns and types, for the manifest."""
    table = shard_table(np.zeros(0, np.int64), np.zeros(0, np.uint64), encode(torch.zeros((0, outputs["classes"])), outputs))
    return {field.name: str(field.type) for field in table.schema}


# ---------------------------------------------------------------------------------------------
# What a cache stands for, and how a job is compared with it


def _parts(spec: "JobSpec", data: "Sources") -> list[tuple[str, Any]]:
    """The sources a cache holds, by job-file field, with their readers."""
    return [("source", data.reader)] + ([("eval_source", data.eval_reader)] if spec.data.eval_source else [])


def identity(spec: "JobSpec", data: "Sources") -> tuple[dict, dict[Key, int]]:
    """What the teacher's outputs are a function of, as this job describes it (JSON values), and
    the rows of each unit a cache of it holds."""
    teacher, cache = spec.teacher, spec.teacher.cache
    classes = check_model(teacher, "teacher", spec.job_dir, data.sample_shape)
    check_cache(spec, classes)  # the spec checked it already if it knew the classes
    topk = cache.format == "topk"
    out = {
        "teacher": {"model": teacher.model, "kwargs": teacher.kwargs, "weights_sha256": weights.sha256(teacher.weights)},
        "inputs": {"features": spec.data.features, "shape": spec.data.shape, "preprocess": spec.data.preprocess.model_dump()},
        "outputs": {"format": cache.format, "k": cache.k if topk else None, "dtype": cache.value_dtype,
                    "temperatures": cache_temperatures(spec) if topk else None, "classes": classes},
        "data": {"source": None, "eval_source": None},
    }
    units: dict[Key, int] = {}
    for part, reader in _parts(spec, data):
        digest = hashlib.blake2b(reader.identity().encode(), digest_size=16)
        for u, ids in enumerate(reader.unit_ids()):
            digest.update(np.int64(len(ids)).tobytes() + np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            units[(part, u)] = len(ids)
        rows = [n for (p, _), n in units.items() if p == part]
        out["data"][part] = {"rows": sum(rows), "units": len(rows), "digest": digest.hexdigest()}
    return json.loads(json.dumps(out)), units  # tuples as lists, as they come back from the manifest


# (job-file field, manifest section, key): a cache stands for a job only if all of these match.
# The job's identity fields (kd_ray.spec) and the output format, each with its manifest section;
# the teacher's weights are compared by content, not by path.
CHECKED = (
    *((field, "teacher", key) for field, key in zip(TEACHER_IDENTITY, ("model", "kwargs", "weights_sha256"))),
    *((field, "inputs", field.rpartition(".")[2]) for field in INPUT_IDENTITY),
    *((field, "data", field.rpartition(".")[2]) for field in DATA_IDENTITY),
    *((f"teacher.cache.{key}", "outputs", key) for key in ("format", "k", "dtype")),
)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict) and "digest" in value:
        return f"data of {value['rows']} rows in {value['units']} units (digest {value['digest'][:12]})"
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return f"sha256 {value[:12]}..."
    return json.dumps(value, sort_keys=True)


def mismatch(manifest: dict, job: dict, temperature: float | None) -> tuple[str, str] | None:
    """The first job-file field on which a cache and a job differ, and how: (field, detail).

    `temperature` is the training job's distill.temperature, which a top-k cache must hold a tail
    for; None compares for a capture, whose temperatures must be the cache's exactly."""
    for field, section, key in CHECKED:
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


# ---------------------------------------------------------------------------------------------
# Where a cache lives


class Store:
    """A cache directory on any filesystem pyarrow opens (local paths, file://, s3://, gs://)."""

    def __init__(self, path: str):
        self.path = path
        self.fs, self.root = filesystem(path)

    def _at(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._at(name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Whole or not at all: written under a temporary name, then renamed into place."""
        tmp = self._at(f"{_TMP}{uuid.uuid4().hex[:12]}-{name}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self._at(name))

    def names(self) -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        return [i.base_name for i in self.fs.get_file_info(FileSelector(self.root, allow_not_found=True)) if i.type == FileType.File]

    def remove(self, name: str) -> None:
        self.fs.delete_file(self._at(name))

    def make(self) -> None:
        self.fs.create_dir(self.root, recursive=True)


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
                        "choose another teacher.cache.path, or delete that directory and capture again")
    return manifest


def write_manifest(store: Store, manifest: dict) -> None:
    store.write(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Capture: `kd-ray cache JOB.yaml`


def capture(spec: "JobSpec", echo: Callable[[str], None] = print, verbose: bool = False) -> dict:
    """Write (or finish) the job's teacher-output cache; returns figures for the user."""
    from kd_ray.data.pipeline import Sources

    if spec.teacher is None or spec.teacher.cache is None:
        raise UserError("teacher.cache", "kd-ray cache writes the teacher's outputs to teacher.cache.path; add a teacher section "
                        "with cache: {path: DIR} (format: full, or topk with k)")
    refuse_augmentation(spec)
    data = Sources(spec)
    store = Store(spec.teacher.cache.path)
    job, planned = identity(spec, data)
    manifest = read_manifest(store)
    if manifest is not None:
        problem = mismatch(manifest, job, temperature=None)
        if problem:
            raise UserError(problem[0], f"{problem[1]}: {store.path} holds the cache of another set-up; choose a new "
                            "teacher.cache.path, or delete that directory to capture there")
    kept, dropped = _whole_shards(store, planned)
    todo = [key for key in planned if key not in kept]
    head = {"kd_ray_cache": FORMAT_VERSION, **job, "kd_ray_version": kd_ray.__version__,
            "about": {"teacher.weights": spec.teacher.weights, "teacher.precision": spec.teacher.precision,
                      "data.source": spec.data.source, "data.eval_source": spec.data.eval_source}}
    summary = {"path": store.path, "shards": len(planned), "kept": len(kept), "written": 0, "rows": sum(planned.values())}
    if manifest is not None and manifest.get("status") == "complete" and not todo and not dropped:
        echo(f"cache: {store.path} is complete ({len(planned)} shards, every one checked); nothing to write")
        return {**summary, **_sizes(manifest)}
    if todo:
        # Before anything is written: a pool that asks for what an embedded Ray lacks would wait forever.
        ensure_ray(spec, verbose, teacher_pool=True)
        check_cluster(spec, echo, train=False, teacher_pool=True)
    store.make()
    for name in store.names():
        if name.startswith(_TMP):  # a write that a killed capture left half-done: never visible as a shard
            store.remove(name)
    write_manifest(store, {**head, "status": "incomplete"})
    echo(f"cache: {store.path}: {len(planned)} shards ({summary['rows']} samples); {len(kept)} already whole"
         + (f", {dropped} damaged or stray removed" if dropped else "") + f"; writing {len(todo)}")
    started = time.time()
    every = max(1, len(todo) // 20)
    try:
        for i, shard in enumerate(_write_shards(spec, data, store, job["outputs"], todo, planned, verbose), 1):
            kept[(shard["part"], shard["unit"])] = shard
            if i % every == 0 or i == len(todo):
                echo(f"cache: {i}/{len(todo)} shards written ({shard['file']}, {shard['rows']} rows)")
    except UserError:
        raise
    except Exception as e:  # in the pool: a unit that cannot be read, a teacher that fails on it...
        raise Failed("cache", f"{reason(e)} ({len(kept)} of {len(planned)} shards are whole and kept; fix the cause and run "
                     "`kd-ray cache JOB.yaml` again: it writes only the others)") from e
    seconds = time.time() - started
    shards = [kept[key] for key in planned]
    final = {**head, "status": "complete", "rows": summary["rows"], "schema": schema(job["outputs"]), "shards": shards}
    write_manifest(store, final)
    written_rows = sum(planned[key] for key in todo)
    summary.update(written=len(todo), seconds=round(seconds, 3), samples_per_second=round(written_rows / seconds, 1) if seconds else None,
                   **_sizes(final))
    echo(f"cache: complete: {summary['shards']} shards, {summary['rows']} samples, {summary['bytes']:,} bytes "
         f"({summary['bytes_per_sample']:.1f} bytes/sample on disk, teacher outputs {summary['payload_bytes_per_sample']} bytes/sample); "
         f"wrote {len(todo)} shards ({written_rows} samples) in {seconds:.1f} s, {summary['samples_per_second']} samples/s")
    return summary


def _sizes(manifest: dict) -> dict:
    from kd_ray.losses import bytes_per_sample

    out, total = manifest["outputs"], sum(s["bytes"] for s in manifest["shards"])
    k = out["k"] if out["format"] == "topk" else None
    payload = bytes_per_sample(out["classes"], k, TORCH_DTYPES[out["dtype"]], len(out["temperatures"] or [1]))
    return {"bytes": total, "bytes_per_sample": total / max(manifest["rows"], 1), "payload_bytes_per_sample": payload}


def _whole_shards(store: Store, planned: dict[Key, int]) -> tuple[dict[Key, dict], int]:
    """The shards already written whole (name there, bytes hash to it); the others are removed.
    Returns them by unit, and how many files were removed."""
    found: dict[Key, list[str]] = {}
    for name in store.names():
        m = _SHARD.match(name)
        if m:
            found.setdefault((m.group(1), int(m.group(2))), []).append(name)
    kept: dict[Key, dict] = {}
    removed = 0

    def digest(name: str) -> tuple[str, int]:
        data = store.read(name) or b""
        return _sha256(data), len(data)

    names = [name for key in found for name in found[key]]
    with ThreadPoolExecutor(8) as pool:  # reading and hashing release the GIL
        digests = dict(zip(names, pool.map(digest, names)))
    for key, candidates in found.items():
        for name in candidates:
            sha, size = digests[name]
            if key in planned and key not in kept and sha.startswith(_SHARD.match(name).group(3)):
                kept[key] = {"part": key[0], "unit": key[1], "file": name, "rows": planned[key], "sha256": sha, "bytes": size}
            else:
                store.remove(name)
                removed += 1
    return kept, removed


def _write_shards(spec: "JobSpec", data: "Sources", store: Store, outputs: dict, todo: list[Key], planned: dict[Key, int],
                  verbose: bool) -> Iterator[dict]:
    """The job's teacher pool (its actor count, CPUs, GPUs and batch size) over the missing units,
    one unit per call; yields each shard as it is written, in any order."""
    import ray

    from kd_ray.teacher import pool_options

    if not todo:
        return
    ensure_ray(spec, verbose, teacher_pool=True)
    quiet_data()
    items = [{"part": part, "unit": unit, "rows": planned[(part, unit)]} for part, unit in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardWriter,
        fn_constructor_kwargs=dict(spec=spec, readers={p: ray.put(r) for p, r in _parts(spec, data)}, outputs=outputs, store=store),
        **{**pool_options(spec.teacher), "batch_size": 1},
    )
    for row in ds.iter_rows():
        yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


class ShardWriter:
    """A teacher pool actor of the capture: for each unit it is given, every row read and
    preprocessed, the teacher run on consecutive slices of the pool's batch size (the same
    batches whenever the unit is captured, so the same bits), encoded, and written as a shard."""

    def __init__(self, spec: "JobSpec", readers: dict, outputs: dict, store: Store):
        import ray

        from kd_ray.teacher import TeacherPredictor

        # fp32 out of the predictor: the cache's own dtype is encode's to apply, once
        self.predictor = TeacherPredictor(spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"logits_dtype": "float32"})}))
        self.batch_size = spec.teacher.pool.batch_size
        self.readers = {part: ray.get(ref) for part, ref in readers.items()}
        self.transform, self.outputs, self.store = spec.data.preprocess.model_dump(), outputs, store
        self.callbacks = Callbacks(spec)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in ("part", "unit", "file", "rows", "sha256", "bytes")}
        for part, unit, rows in zip(batch["part"].tolist(), batch["unit"].tolist(), batch["rows"].tolist()):
            raw = self.readers[part].read(np.full(rows, unit, dtype=np.int64), np.arange(rows))
            digests = input_digests(raw[X])
            samples = preprocess(raw, **self.transform)
            logits = [self.predictor({X: samples[X][a:a + self.batch_size]})[TEACHER] for a in range(0, rows, self.batch_size)]
            logits = torch.from_numpy(np.concatenate(logits)) if logits else torch.zeros((0, self.outputs["classes"]))
            data = to_parquet(shard_table(samples[ID], digests, encode(logits, self.outputs)))
            digest = _sha256(data)
            name = shard_name(part, unit, digest)
            self.store.write(name, data)
            for k, v in zip(out, (part, unit, name, rows, digest, len(data))):
                out[k].append(v)
            self.callbacks.on_shard_written({k: v[-1] for k, v in out.items()})
        return {k: np.array(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Training from a cache


class CacheReader:
    """One source's cached outputs, as the training stream's columns (kd_ray.data): dense
    TEACHER logits, or the top-k columns with the tail at the job's temperature only."""

    def __init__(self, part: str, store: Store, outputs: dict, files: dict[int, str], temperature: float,
                 contents: dict[int, bytes] | None):
        self.field, self.store, self.files = f"data.{part}", store, files
        self.tail = tail_column(tuple(outputs["temperatures"]), temperature) if outputs["format"] == "topk" else None
        # In-memory sources shuffle rows across all units (every chunk touches every shard): their
        # outputs are decoded once here and travel with the reader; others are read per chunk.
        self.loaded = {u: self._select(decode(b)) for u, b in contents.items()} if contents is not None else None
        empty = self._select({ID: np.zeros(0, np.int64), **encode(torch.zeros((0, outputs["classes"])), outputs)})
        self.empty_columns = {k: v for k, v in empty.items() if k != ID}

    def _select(self, columns: dict) -> dict:
        out = {k: v for k, v in columns.items() if k != ROW}
        if self.tail is not None:
            out[TAIL_LSE] = np.ascontiguousarray(out[TAIL_LSE][:, self.tail:self.tail + 1])
        return out

    def _unit(self, unit: int) -> dict:
        if self.loaded is not None:
            return self.loaded[unit]
        data = self.store.read(self.files[unit])
        if data is None:
            raise RuntimeError(f"cache shard {self.files[unit]} vanished from {self.store.path} after it was checked")
        return self._select(decode(data))

    def read(self, units: np.ndarray, rows: np.ndarray, ids: np.ndarray, x: np.ndarray) -> dict:
        """The outputs for rows (units[i], rows[i]) of the source, whose ids and inputs (as the
        source gave them, before preprocessing) the caller read."""
        out = gather(units, rows, self._unit)
        if out is None:
            return dict(self.empty_columns)
        changed = (out.pop(ID) != ids) | (out.pop(INPUT) != input_digests(x))
        if changed.any():
            # A RuntimeError, not a UserError: it is raised in a Ray task, and reaches the user as
            # the run's one-line failure either way.
            raise RuntimeError(f"{self.field}: {int(changed.sum())} of {len(ids)} rows read (the first with id "
                               f"{int(ids[np.argmax(changed)])}) differ from the inputs the cache at {self.store.path} "
                               "was captured from: the data changed after the capture. Delete that cache (or choose a "
                               "new teacher.cache.path) and run `kd-ray cache JOB.yaml` again")
        return out


@dataclass
class TeacherCache:
    """A checked cache: readers for the training stream and for scoring the teacher on the eval split."""

    train: CacheReader
    eval: CacheReader
    manifest: dict


def open_for_training(spec: "JobSpec", data: "Sources") -> TeacherCache:
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
    problem = mismatch(manifest, identity(spec, data)[0], spec.distill.temperature)
    if problem:
        raise UserError(problem[0], f"{problem[1]}; the cache at {store.path} was captured for another set-up: set it back, or "
                        "write a cache for this job with `kd-ray cache JOB.yaml` and a new teacher.cache.path")
    in_memory = {part for part, reader in _parts(spec, data) if reader.random_access}
    contents = _checked_shards(store, manifest["shards"], in_memory)
    readers = {}
    for part, _ in _parts(spec, data):
        entries = [s for s in manifest["shards"] if s["part"] == part]
        readers[part] = CacheReader(part, store, manifest["outputs"], {s["unit"]: s["file"] for s in entries}, spec.distill.temperature,
                                    {s["unit"]: contents[s["file"]] for s in entries} if part in in_memory else None)
    return TeacherCache(train=readers["source"], eval=readers.get("eval_source", readers["source"]), manifest=manifest)


def _checked_shards(store: Store, shards: list[dict], keep_parts: set[str]) -> dict[str, bytes]:
    """Reads every shard and checks its SHA-256; returns the bytes of those in `keep_parts`."""
    def check(entry: dict) -> tuple[dict, str | None, bytes | None]:
        data = store.read(entry["file"])
        if data is None:
            return entry, "is missing", None
        if _sha256(data) != entry["sha256"]:
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
