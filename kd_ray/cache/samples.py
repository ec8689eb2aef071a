"""A classifier's teacher outputs in cache shards, one row per sample (kd_ray.cache says how a
cache is captured, checked and read; this module, what a classifier's shard holds).

A shard holds every sample of one unit of the source, in order: its id, its row in the unit, a
64-bit digest of its input as the source gave it, and the teacher's outputs: full logits in the
cache's dtype, or a top-k (kd_ray.losses.topk_compress) with the exact tail mass at every cached
temperature. Inputs are not stored: a cached run reads them from the source as an online run
does, which its ordered stream needs anyway, so a shard holds only what the teacher adds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from kd_ray.cache.files import decode
from kd_ray.core.columns import ID, INPUT, ROW, TAIL_LSE, TEACHER, X
from kd_ray.core.hashing import file_sha256, input_digests
from kd_ray.data.transforms import preprocess
from kd_ray.losses import bytes_per_sample, tail_column, topk_compress
from kd_ray.spec import INPUT_IDENTITY, TEACHER_IDENTITY, cache_temperatures
from kd_ray.tasks.classify_checks import check_cache, check_model
from kd_ray.teacher import TeacherPredictor
from kd_ray.teacher_signal import to_columns

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from kd_ray.spec import JobSpec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encode(logits: torch.Tensor, outputs: dict) -> dict[str, np.ndarray]:
    """A batch of the teacher's logits as the cache stores them: full logits in the cache's
    dtype, or a top-k (kd_ray.losses.topk_compress) with the tail at every cached temperature."""
    if outputs["format"] == "full":
        return {TEACHER: logits.float().numpy().astype(outputs["dtype"])}
    top = topk_compress(logits.float(), outputs["k"], temperatures=outputs["temperatures"], dtype=TORCH_DTYPES[outputs["dtype"]])
    return to_columns(top)


def shard_table(ids: np.ndarray, digests: np.ndarray, columns: dict[str, np.ndarray]) -> "pa.Table":
    """One unit's rows: id, row, input digest, and each output as a fixed-size list per sample."""
    import pyarrow as pa

    arrays = {ID: pa.array(np.asarray(ids, dtype=np.int64)), ROW: pa.array(np.arange(len(ids), dtype=np.int32)),
              INPUT: pa.array(np.asarray(digests, dtype=np.uint64))}
    for name, values in columns.items():
        arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])
    return pa.table(arrays)


class SampleCodec:
    """What a classifier's cache holds and how it is compared, written and read (see
    kd_ray.cache for the methods' contract)."""

    unit = "sample"
    # (job-file field, manifest section, key): the job's identity fields (kd_ray.spec) and the
    # output format, each with its manifest section; the teacher's weights by content, not path.
    CHECKED = (
        *((field, "teacher", key) for field, key in zip(TEACHER_IDENTITY, ("model", "kwargs", "weights_sha256"))),
        *((field, "inputs", field.rpartition(".")[2]) for field in INPUT_IDENTITY),
        ("teacher.cache.format", "outputs", "format"), ("teacher.cache.k", "outputs", "k"), ("teacher.cache.dtype", "outputs", "dtype"),
    )

    def __init__(self, outputs: dict, temperature: float | None = None):
        self.outputs = outputs
        topk = outputs["format"] == "topk"
        self.tail = tail_column(tuple(outputs["temperatures"]), temperature) if topk and temperature is not None else None

    @staticmethod
    def describe(spec: "JobSpec", data, task) -> dict:
        """What a classifier's outputs are a function of, besides the data (JSON values)."""
        teacher, cache = spec.teacher, spec.teacher.cache
        classes = check_model(teacher, "teacher", spec.job_dir, data.sample_shape)
        check_cache(spec, classes)  # the spec checked it already if it knew the classes
        topk = cache.format == "topk"
        return {
            "teacher": {"model": teacher.model, "kwargs": teacher.kwargs, "weights_sha256": file_sha256(teacher.weights)},
            "inputs": {"features": spec.data.features, "shape": spec.data.shape, "preprocess": spec.data.preprocess.model_dump()},
            "outputs": {"format": cache.format, "k": cache.k if topk else None, "dtype": cache.value_dtype,
                        "temperatures": cache_temperatures(spec) if topk else None, "classes": classes},
        }

    def describe_outputs(self) -> str:
        o = self.outputs
        return f"top-{o['k']} {o['dtype']}" if o["format"] == "topk" else f"full {o['dtype']} logits"

    def schema(self) -> dict[str, str]:
        """The shards' columns and types, for the manifest."""
        table = shard_table(np.zeros(0, np.int64), np.zeros(0, np.uint64), encode(torch.zeros((0, self.outputs["classes"])), self.outputs))
        return {field.name: str(field.type) for field in table.schema}

    def payload(self) -> int:
        """Bytes per sample of the outputs as the loss takes them."""
        o = self.outputs
        k = o["k"] if o["format"] == "topk" else None
        return bytes_per_sample(o["classes"], k, TORCH_DTYPES[o["dtype"]], len(o["temperatures"] or [1]))

    def items(self, reader, unit: int, rows: int) -> int:
        return rows

    # ------------------------------------------------------------- capture (in a pool actor)

    def capturer(self, spec: "JobSpec", task) -> "SampleCapture":
        return SampleCapture(spec, self.outputs, task)

    # ------------------------------------------------------------- reading (in the training stream)

    def decode(self, data: bytes) -> dict[str, np.ndarray]:
        """A shard's rows as the training stream's columns (the tail at the job's temperature only)."""
        out = {k: v for k, v in decode(data).items() if k != ROW}
        if self.tail is not None:
            out[TAIL_LSE] = np.ascontiguousarray(out[TAIL_LSE][:, self.tail:self.tail + 1])
        return out

    def rows(self, unit: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[rows] for k, v in unit.items()}

    def digests(self, raw: dict) -> np.ndarray:
        return input_digests(raw[X])

    def empty(self) -> dict[str, np.ndarray]:
        columns = encode(torch.zeros((0, self.outputs["classes"])), self.outputs)
        if self.tail is not None:
            columns[TAIL_LSE] = columns[TAIL_LSE][:, :1]
        return columns


class SampleCapture:
    """In a capture's pool actor: a unit's rows as the source gave them -> its shard's table.
    The teacher runs on consecutive slices of the pool's batch size, the same batches whenever
    the unit is captured, so the same bits."""

    def __init__(self, spec: "JobSpec", outputs: dict, task):
        # fp32 out of the predictor: the cache's own dtype is encode's to apply, once (so its own task)
        full = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"logits_dtype": "float32"})})
        self.predictor = TeacherPredictor(full, type(task)(full))
        self.transform, self.outputs = spec.data.preprocess.model_dump(), outputs

    def __call__(self, raw: dict) -> "pa.Table":
        digests = input_digests(raw[X])
        samples = preprocess(raw, **self.transform)
        # The predictor runs the model on consecutive slices of teacher.pool.batch_size
        logits = torch.from_numpy(self.predictor({X: samples[X]})[TEACHER]) if len(samples[ID]) else torch.zeros((0, self.outputs["classes"]))
        return shard_table(samples[ID], digests, encode(logits, self.outputs))
