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
from typing import TYPE_CHECKING, Any

import numpy as np

from kd_ray.cache.files import MANIFEST, Store
from kd_ray.cache.samples import SampleCodec
from kd_ray.cache.tokens import TokenCodec
from kd_ray.core.errors import UserError
from kd_ray.data.chunks import Sources
from kd_ray.losses import tail_column
from kd_ray.spec import DATA_IDENTITY

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


def parts(data: "Sources") -> list[tuple[str, Any]]:
    """The sources a cache holds, by job-file field, with their readers: the eval rows have a
    shard of their own when they come from a reader of their own (data.eval_source, or a
    language model's held-out documents)."""
    return [("source", data.reader)] + ([("eval_source", data.eval_reader)] if data.eval_reader is not data.reader else [])


def identity(spec: "JobSpec", task: "Task", data: Sources) -> tuple[dict, dict[Key, int]]:
    """What the teacher's outputs are a function of, as this job describes it (JSON values), and
    the rows of each unit a cache of it holds."""
    out = {**codec_class(task).describe(spec, data, task), "data": {"source": None, "eval_source": None}}
    units: dict[Key, int] = {}
    for part, reader in parts(data):
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
