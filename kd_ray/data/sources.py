"""Sources: parquet files or directories, numpy .npy/.npz, and built-in data sets.

Each source becomes a Ray Dataset in kd_ray's standard columns (id, x, y). Sample ids are stable:
  - parquet: a user id column, or Ray's `row_hash` (a hash of file path and row position);
  - numpy and built-ins: the row index.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kd_ray.data import ID, X, Y
from kd_ray.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from kd_ray.spec import DataSpec

BUILTIN_SOURCES = ("digits",)


@dataclass(frozen=True)
class Arrays:
    x: np.ndarray
    y: np.ndarray


def kind(source: str) -> str:
    if source.startswith("builtin:"):
        return "builtin"
    if source.endswith((".npy", ".npz")):
        return "numpy"
    return "parquet"


def load_builtin(name: str) -> Arrays:
    if name == "digits":
        # 1797 real 8x8 handwritten digits (UCI), bundled inside scikit-learn: no download.
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return Arrays(x.astype(np.float32), y.astype(np.int64))
    raise ValueError(name)


def load_numpy(path: str, features: str, labels: str, field: str) -> Arrays:
    if path.endswith(".npz"):
        with np.load(path) as z:
            for key, name in ((features, "data.features"), (labels, "data.labels")):
                if key not in z.files:
                    raise UserError(name, f"'{key}' is not an array in {os.path.basename(path)}; it holds: {', '.join(z.files)}")
            x, y = z[features], z[labels]
    else:
        if not labels.endswith(".npy"):
            raise UserError("data.labels", "with a .npy feature file, set data.labels to the path of a .npy file of labels")
        if not os.path.isfile(labels):
            raise UserError("data.labels", f"{labels} does not exist; fix the path")
        x, y = np.load(path, mmap_mode="r"), np.load(labels, mmap_mode="r")
    if len(x) != len(y):
        raise UserError(field, f"{len(x)} feature rows but {len(y)} labels in {os.path.basename(path)}; they must match")
    if not np.issubdtype(np.asarray(y[:1]).dtype, np.integer):
        raise UserError("data.labels", f"labels must be integer class ids, got {np.asarray(y[:1]).dtype}")
    return Arrays(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64))


def load_arrays(source: str, data: "DataSpec", field: str = "data.source") -> Arrays:
    if kind(source) == "builtin":
        return load_builtin(source.removeprefix("builtin:"))
    return load_numpy(source, data.features, data.labels, field)


def _check_path(path: str, field: str) -> None:
    if "://" in path:
        return  # remote filesystems are checked when Ray Data opens them
    if not os.path.exists(path):
        raise UserError(field, f"{path} does not exist; fix the path (relative paths start at the job file's directory)")


def _parquet_schema(path: str, field: str):
    import pyarrow.dataset as pads

    try:
        return pads.dataset(path, format="parquet").schema
    except Exception as e:
        raise UserError(field, f"cannot read {path} as parquet: {e}") from None


def check_source(data: "DataSpec") -> tuple[tuple[int, ...] | None, int | None]:
    """Spec-time checks: the files exist and hold the named columns with a usable shape and
    labels. Returns the per-sample feature shape and the largest label, where they are known
    without reading the data (None: decided at read time)."""
    sample_shape, max_label = None, None
    for source, field in ((data.source, "data.source"), (data.eval_source, "data.eval_source")):
        if source is None:
            continue
        k = kind(source)
        if k == "parquet":
            _check_path(source, field)
            if "://" not in source:
                schema = _parquet_schema(source, field)
                import pyarrow as pa

                for col, name in ((data.features, "data.features"), (data.labels, "data.labels"), (data.id_column, "data.id_column")):
                    if col is not None and col not in schema.names:
                        raise UserError(name, f"no column '{col}' in {source}; its columns are: {', '.join(schema.names)}")
                for col, name in ((data.labels, "data.labels"), (data.id_column, "data.id_column")):
                    if col is not None and not pa.types.is_integer(schema.field(col).type):
                        raise UserError(name, f"column '{col}' holds {schema.field(col).type}; it must hold integers")
            continue
        if k == "builtin":
            name = source.removeprefix("builtin:")
            if name not in BUILTIN_SOURCES:
                raise UserError(field, f"unknown built-in data set '{name}'; available: {', '.join('builtin:' + b for b in BUILTIN_SOURCES)}")
        else:
            _check_path(source, field)
        arrays = load_arrays(source, data, field)
        shape = tuple(arrays.x.shape[1:])
        if data.shape and math.prod(data.shape) != math.prod(shape):
            raise UserError("data.shape", f"{data.shape} holds {math.prod(data.shape)} values but each sample has {math.prod(shape)}; use a shape whose product is {math.prod(shape)}")
        if data.num_classes is not None and len(arrays.y) and (arrays.y.min() < 0 or arrays.y.max() >= data.num_classes):
            raise UserError("data.num_classes", f"labels in {os.path.basename(source)} run from {arrays.y.min()} to {arrays.y.max()}, outside 0..{data.num_classes - 1}; fix num_classes or the labels")
        sample_shape = tuple(data.shape) if data.shape else shape
        if len(arrays.y):
            max_label = max(int(arrays.y.max()), max_label if max_label is not None else -1)
    if data.shape:
        sample_shape = tuple(data.shape)
    return sample_shape, max_label


def standardize(batch: dict, features: str, labels: str, id_column: str | None, shape: list[int] | None) -> dict:
    """Rename a source batch to (id, x, y), stacking list columns and applying the sample shape."""
    x = batch[features]
    if x.dtype == object:  # parquet lists arrive as arrays of arrays
        x = np.stack([np.asarray(v) for v in x])
    x = np.asarray(x, dtype=np.float32)
    if shape:
        x = x.reshape((len(x), *shape))
    ids = batch[id_column] if id_column else batch["row_hash"]
    return {ID: np.asarray(ids).astype(np.int64), X: x, Y: np.asarray(batch[labels]).astype(np.int64)}


def arrays_to_dataset(arrays: Arrays, shape: list[int] | None, num_blocks: int = 8) -> "ray.data.Dataset":
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    n = len(arrays.x)
    x = arrays.x.reshape((n, *shape)) if shape else arrays.x
    ids = np.arange(n, dtype=np.int64)
    bounds = np.linspace(0, n, min(num_blocks, max(n, 1)) + 1).astype(int)
    tables = [
        pa.table({ID: ids[a:b], X: ArrowTensorArray.from_numpy(np.ascontiguousarray(x[a:b])), Y: arrays.y[a:b]})
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return ray.data.from_arrow(tables)


def read(source: str, data: "DataSpec", field: str = "data.source") -> "ray.data.Dataset":
    """The source as a Ray Dataset in standard columns; nothing is read until it is iterated."""
    import ray.data

    if kind(source) != "parquet":
        return arrays_to_dataset(load_arrays(source, data, field), data.shape)
    columns = [c for c in (data.features, data.labels, data.id_column) if c]
    ds = ray.data.read_parquet(source, columns=columns, include_row_hash=data.id_column is None)
    return ds.map_batches(
        standardize,
        fn_kwargs=dict(features=data.features, labels=data.labels, id_column=data.id_column, shape=data.shape),
        batch_format="numpy",
    )


def read_ids(source: str, data: "DataSpec") -> np.ndarray:
    """Only the sample ids, for counting the split without reading features."""
    if kind(source) != "parquet":
        return np.arange(len(load_arrays(source, data).y), dtype=np.int64)
    import ray.data

    col = data.id_column or "row_hash"
    ds = ray.data.read_parquet(source, columns=[data.id_column or data.labels], include_row_hash=data.id_column is None)
    return np.concatenate([np.asarray(b[col]).astype(np.int64) for b in ds.iter_batches(batch_format="numpy", batch_size=None)])
