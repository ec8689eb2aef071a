"""Sources: parquet files or directories, numpy .npy/.npz, and built-in data sets.

Each source becomes a Ray Dataset in kd_ray's standard columns (id, x, y). Sample ids are stable:
  - parquet: a user id column, or Ray's `row_hash` (a hash of file path and row position);
  - numpy and built-ins: the row index.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from kd_ray.data import ID, X, Y
from kd_ray.errors import UserError
from kd_ray.storage import is_remote

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
        # 1797 real 8x8 handwritten digits (UCI), bundled inside scikit-learn: no download. Its
        # file (64 pixels and the label per row) is read directly: importing sklearn.datasets
        # (scipy and all) to read it cost ~2 s in every driver.
        import importlib.util

        root = os.path.dirname(importlib.util.find_spec("sklearn").origin)
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            rows = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return Arrays(np.ascontiguousarray(rows[:, :-1]), rows[:, -1].astype(np.int64))
        from sklearn.datasets import load_digits  # a scikit-learn that keeps it elsewhere

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
    if is_remote(path):
        return  # remote filesystems are checked when Ray Data opens them
    if not os.path.exists(path):
        raise UserError(field, f"{path} does not exist; fix the path (relative paths start at the job file's directory)")


def _parquet_schema(path: str, field: str):
    """The schema of a local parquet file or directory; refused if it holds no rows (the row
    counts are in the files' footers, so no data is read)."""
    import pyarrow.dataset as pads

    try:
        ds = pads.dataset(path, format="parquet")
        rows = ds.count_rows()
    except Exception as e:
        raise UserError(field, f"cannot read {path} as parquet: {e}") from None
    if not rows:
        _no_samples(path, field)
    return ds.schema


def _no_samples(path: str, field: str) -> None:
    raise UserError(field, f"{path} holds no samples; point {field} at data with at least one")


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
            if not is_remote(source):
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
        if not len(arrays.x):
            _no_samples(source, field)
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


# ---------------------------------------------------------------------------------------------
# Readers: a source as units (blocks of rows), each readable on its own in any Ray task.

UNIT_ROWS = 1024  # rows per unit of an in-memory source


class ArrayReader:
    """An in-memory source (numpy file or built-in), cut into units of UNIT_ROWS rows; the id of
    a sample is its row number."""

    random_access = True
    chunk_rows = UNIT_ROWS  # rows per chunk of a global shuffle (kd_ray.data.order.Layout)

    def __init__(self, arrays: Arrays, shape: list[int] | None):
        x = arrays.x.reshape((len(arrays.x), *shape)) if shape else arrays.x
        self.x, self.y = np.ascontiguousarray(x), arrays.y

    def unit_ids(self) -> list[np.ndarray]:
        n = len(self.y)
        return [np.arange(a, min(a + UNIT_ROWS, n), dtype=np.int64) for a in range(0, n, UNIT_ROWS)]

    def read(self, units: np.ndarray, rows: np.ndarray) -> dict:
        index = units * UNIT_ROWS + rows
        return {ID: index.astype(np.int64), X: self.x[index], Y: self.y[index]}

    def identity(self) -> str:
        """A digest of every sample's features."""
        h = hashlib.blake2b(repr(self.x.shape).encode(), digest_size=16)
        h.update(self.x.data)
        return h.hexdigest()


class ParquetReader:
    """Parquet files, one unit per row group, read with pyarrow (local paths or any filesystem
    pyarrow understands). The id of a sample is the user's id column, or else a hash of the file's
    path relative to the source and the row's number in that file."""

    random_access = False
    chunk_rows = UNIT_ROWS  # unused: without random access a chunk is `window` row groups

    def __init__(self, source: str, data: "DataSpec", field: str):
        import pyarrow.dataset as pads

        try:
            ds = pads.dataset(source, format="parquet")
            fragments = sorted(ds.get_fragments(), key=lambda f: f.path)
            self.filesystem = ds.filesystem
            self.units: list[tuple[str, int, int, int]] = []  # (file, row group, rows, first row in file)
            for frag in fragments:
                first = 0
                for rg in frag.ensure_complete_metadata() or frag.row_groups:
                    self.units.append((frag.path, rg.id, rg.num_rows, first))
                    first += rg.num_rows
        except Exception as e:
            raise UserError(field, f"cannot read {source} as parquet: {e}") from None
        self.root = source.rstrip("/")
        self.features, self.labels, self.id_column, self.shape = data.features, data.labels, data.id_column, data.shape

    def _file_key(self, path: str) -> int:
        rel = os.path.relpath(path, self.root) if path != self.root else os.path.basename(path)
        return zlib.crc32(rel.encode()) & 0x7FFFFFFF

    def _table(self, u: int, columns: list[str]):
        import pyarrow.parquet as pq

        path, rg, _, _ = self.units[u]
        with self.filesystem.open_input_file(path) as f:
            return pq.ParquetFile(f).read_row_group(rg, columns=columns)

    def _ids(self, u: int, table) -> np.ndarray:
        if self.id_column:
            return np.asarray(table.column(self.id_column).to_numpy(), dtype=np.int64)
        path, _, n, first = self.units[u]
        return (np.int64(self._file_key(path)) << np.int64(32)) | np.arange(first, first + n, dtype=np.int64)

    def unit_ids(self) -> list[np.ndarray]:
        cols = [self.id_column] if self.id_column else []
        return [self._ids(u, self._table(u, cols)) if cols else self._ids(u, None) for u in range(len(self.units))]

    def read(self, units: np.ndarray, rows: np.ndarray) -> dict:
        cols = [c for c in (self.features, self.labels, self.id_column) if c]

        def unit(u: int, picked: np.ndarray) -> dict:
            table = self._table(u, cols)
            batch = {self.features: to_numpy(table.column(self.features)), self.labels: to_numpy(table.column(self.labels)),
                     "row_hash": self._ids(u, table)}
            return {k: v[picked] for k, v in standardize(batch, self.features, self.labels, None, self.shape).items()}

        out = gather(units, rows, unit)
        if out is None:
            return {ID: np.zeros(0, np.int64), X: np.zeros((0, *(self.shape or [0])), np.float32), Y: np.zeros(0, np.int64)}
        return out

    def identity(self) -> str:
        """A digest of the files: paths relative to the source, sizes, rows per row group. The
        data pages are not read: a file rewritten to the same size and row groups goes unnoticed
        here (a cached run also compares each row's id and input digest as it reads the row)."""
        h = hashlib.blake2b(digest_size=16)
        sizes: dict[str, int] = {}
        for path, rg, rows, _ in self.units:
            if path not in sizes:
                sizes[path] = self.filesystem.get_file_info(path).size
            h.update(repr((os.path.relpath(path, self.root) if path != self.root else "", sizes[path], rg, rows)).encode())
        return h.hexdigest()


def gather(units: np.ndarray, rows: np.ndarray, unit_rows: Callable[[int, np.ndarray], dict]) -> dict | None:
    """Rows (units[i], rows[i]) as column arrays, in the order asked: each unit is asked once
    (`unit_rows(u, r)` gives rows r of unit u, as columns). None when nothing is asked."""
    out: dict | None = None
    for u in np.unique(units):
        picked = np.flatnonzero(units == u)
        part = unit_rows(int(u), rows[picked])
        if out is None:
            out = {k: np.empty((len(units), *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
        for k, v in part.items():
            out[k][picked] = v
    return out


def to_numpy(col) -> np.ndarray:
    """A parquet column as numpy: fixed-size lists and tensors as one array, lists row by row."""
    import pyarrow as pa

    col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        inner = col.flatten().to_numpy(zero_copy_only=False)
        return inner.reshape(len(col), col.type.list_size)
    if isinstance(col.type, pa.ExtensionType) and hasattr(col, "to_numpy"):
        return np.asarray(col.to_numpy())
    return col.to_numpy(zero_copy_only=False)


def open_source(source: str, data: "DataSpec", field: str = "data.source"):
    if kind(source) == "parquet":
        return ParquetReader(source, data, field)
    return ArrayReader(load_arrays(source, data, field), data.shape)


def read_ids(source: str, data: "DataSpec") -> np.ndarray:
    """Every sample id of a source, in source order."""
    ids = open_source(source, data).unit_ids()
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)
