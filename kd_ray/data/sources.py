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

from kd_ray.core import storage
from kd_ray.core.columns import ID, X, Y
from kd_ray.core.errors import SHOWN_CHARS, UserError, clip
from kd_ray.core.storage import is_remote, need_file
from kd_ray.data.ids import is_eval

if TYPE_CHECKING:  # pragma: no cover

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
        from sklearn.datasets import (
            load_digits,  # a scikit-learn that keeps it elsewhere
        )

        x, y = load_digits(return_X_y=True)
        return Arrays(x.astype(np.float32), y.astype(np.int64))
    raise ValueError(name)


def _read_npy(path: str, field: str, **kwargs) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except Exception as e:  # a file that is not what its name says, or an array of Python objects
        raise UserError(field, f"cannot read {path} as a numpy array ({type(e).__name__}: {clip(str(e), SHOWN_CHARS)}); "
                        "save numbers with numpy.save") from None


def _read_npz(path: str, features: str, labels: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            for key, name in ((features, "data.features"), (labels, "data.labels")):
                if key not in z.files:
                    raise UserError(name, f"'{key}' is not an array in {os.path.basename(path)}; it holds: {clip(', '.join(z.files), SHOWN_CHARS)}")
            return z[features], z[labels]
    except UserError:
        raise
    except Exception as e:
        raise UserError(field, f"cannot read {path} as a numpy .npz ({type(e).__name__}: {clip(str(e), SHOWN_CHARS)}); "
                        "save numbers with numpy.savez") from None


def load_numpy(path: str, features: str, labels: str, field: str) -> Arrays:
    if path.endswith(".npz"):
        x, y = _read_npz(path, features, labels, field)
    else:
        if not labels.endswith(".npy"):
            raise UserError("data.labels", "with a .npy feature file, set data.labels to the path of a .npy file of labels")
        need_file(labels, "data.labels", "fix the path")
        x, y = _read_npy(path, field, mmap_mode="r"), _read_npy(labels, "data.labels", mmap_mode="r")
    name = os.path.basename(path)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool) or x.ndim < 1:
        raise UserError("data.features", f"the features in {name} are {x.dtype} of shape {list(x.shape)}; they must be an array "
                        "of numbers with one row per sample (all rows of the same shape)")
    if len(x) != len(y):
        raise UserError(field, f"{len(x)} feature rows but {len(y)} labels in {name}; they must match")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise UserError("data.labels", f"labels must be integer class ids, one per sample; got {y.dtype} of shape {list(y.shape)}")
    return Arrays(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64))


def load_arrays(source: str, data: "DataSpec", field: str = "data.source") -> Arrays:
    if kind(source) == "builtin":
        return load_builtin(source.removeprefix("builtin:"))
    return load_numpy(source, data.features, data.labels, field)


def check_samples(x: np.ndarray, y: np.ndarray, where: str, first_row: int, classes: int | None) -> None:
    """The checks a pass over the data makes, on the rows as they are read (a numpy source at
    validation, a parquet row group in the task that reads it), before any reaches the student:
    every feature finite, every label a class. Names the file and the row (0-based, in the file)."""
    bad_label = (y < 0) | (y >= classes) if classes else y < 0
    if bad_label.any():
        row = int(np.flatnonzero(bad_label)[0])
        allowed = f"0..{classes - 1} ({classes} classes: data.num_classes, else the student's outputs)" if classes else "0 or more"
        raise UserError("data.labels", f"row {first_row + row} of {where} has label {int(y[row])}; labels must be class ids "
                        f"{allowed}; fix the data, or the number of classes")
    for a in range(0, len(x), 65_536):  # in blocks: no second copy of a large source
        finite = np.isfinite(x[a:a + 65_536].reshape(min(65_536, len(x) - a), -1)).all(axis=1)
        if not finite.all():
            row = a + int(np.flatnonzero(~finite)[0])
            raise UserError("data.features", f"row {first_row + row} of {where} has a NaN or infinite feature; "
                            "drop or fix that row (kd_ray trains on finite numbers only)")


def _check_path(path: str, field: str) -> None:
    if is_remote(path):
        storage.need_object(path, field, "fix the URI")
        return
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
        raise UserError(field, f"cannot read {path} as parquet: {clip(str(e), SHOWN_CHARS)}") from None
    if not rows:
        _no_samples(path, field)
    return ds.schema


def _no_samples(path: str, field: str) -> None:
    raise UserError(field, f"{path} holds no samples; point {field} at data with at least one")


def _numeric_type(t) -> bool:
    """Numbers, or lists (fixed-size or not, nested) or tensors of numbers."""
    import pyarrow as pa

    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    if isinstance(t, pa.ExtensionType):
        return True  # a tensor type (Ray's): its values are checked as they are read
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _check_parquet_columns(data: "DataSpec", source: str, field: str) -> None:
    import pyarrow as pa

    schema = _parquet_schema(source, field)
    for col, name in ((data.features, "data.features"), (data.labels, "data.labels"), (data.id_column, "data.id_column")):
        if col is not None and col not in schema.names:
            raise UserError(name, f"no column '{col}' in {source}; its columns are: {clip(', '.join(schema.names), SHOWN_CHARS)}")
    for col, name in ((data.labels, "data.labels"), (data.id_column, "data.id_column")):
        if col is not None and not pa.types.is_integer(schema.field(col).type):
            raise UserError(name, f"column '{col}' holds {schema.field(col).type}; it must hold integers")
    kind = schema.field(data.features).type
    if not _numeric_type(kind):
        raise UserError("data.features", f"column '{data.features}' of {source} holds {kind}; features must be numbers or lists of numbers")
    if data.shape and pa.types.is_fixed_size_list(kind) and not pa.types.is_list(kind.value_type) and math.prod(data.shape) != kind.list_size:
        raise UserError("data.shape", f"{data.shape} holds {math.prod(data.shape)} values but each sample of {source} has "
                        f"{kind.list_size}; use a shape whose product is {kind.list_size}")


@dataclass(frozen=True)
class SourceFacts:
    """What validation learns of a job's sources (None: decided at read time)."""

    sample_shape: tuple[int, ...] | None
    max_label: int | None
    train_rows: int | None
    source_rows: int | None  # all of data.source's, before the eval split


def _train_rows(ids: np.ndarray, data: "DataSpec", seed: int) -> int:
    """How many of data.source's samples train: all of them beside an eval_source, else those
    the split (kd_ray.data.ids.is_eval) keeps."""
    return len(ids) if data.eval_source else int((~is_eval(ids, data.eval_split, seed)).sum())


def check_source(data: "DataSpec", seed: int = 0) -> SourceFacts:
    """Spec-time checks: the files exist and hold the named columns with a usable shape and
    labels (for a source held in memory, every row: finite features, labels in range). Returns
    the per-sample feature shape, the largest label and the number of training rows, where they
    are known without reading a parquet source's data."""
    sample_shape, max_label, counted = None, None, None
    for source, field in ((data.source, "data.source"), (data.eval_source, "data.eval_source")):
        if source is None:
            continue
        k = kind(source)
        if k == "parquet":
            _check_path(source, field)
            if not is_remote(source):
                _check_parquet_columns(data, source, field)
                ids = ParquetReader(source, data, field).unit_ids()  # reads the id column alone, if any
                counted = (_train_rows(np.concatenate(ids), data, seed), sum(map(len, ids))) if field == "data.source" else counted
            continue
        if k == "builtin":
            name = source.removeprefix("builtin:")
            if name not in BUILTIN_SOURCES:
                raise UserError(field, f"unknown built-in data set '{name}'; available: {', '.join('builtin:' + b for b in BUILTIN_SOURCES)}")
        else:
            _check_path(source, field)
            need_file(source, field, "a numpy source is a .npy or .npz file")
        arrays = load_arrays(source, data, field)
        if not len(arrays.x):
            _no_samples(source, field)
        shape = tuple(arrays.x.shape[1:])
        if data.shape and math.prod(data.shape) != math.prod(shape):
            raise UserError("data.shape", f"{data.shape} holds {math.prod(data.shape)} values but each sample has {math.prod(shape)}; use a shape whose product is {math.prod(shape)}")
        check_samples(arrays.x, arrays.y, os.path.basename(source), 0, data.num_classes)
        if field == "data.source":
            counted = (_train_rows(np.arange(len(arrays.y), dtype=np.int64), data, seed), len(arrays.y))
        sample_shape = tuple(data.shape) if data.shape else shape
        max_label = max(int(arrays.y.max()), max_label if max_label is not None else -1)
    if data.shape:
        sample_shape = tuple(data.shape)
    return SourceFacts(sample_shape, max_label, *(counted or (None, None)))


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
            # Opened through kd_ray.core.storage: a URI's query (its endpoint) is not part of the files'
            # paths, which name the samples (relative to the root) on every process alike.
            fs, self.root = storage.filesystem(source)
            ds = pads.dataset(self.root, filesystem=fs, format="parquet")
            fragments = sorted(ds.get_fragments(), key=lambda f: f.path)
            self.filesystem = ds.filesystem
            self.units: list[tuple[str, int, int, int]] = []  # (file, row group, rows, first row in file)
            for frag in fragments:
                first = 0
                for rg in frag.ensure_complete_metadata() or frag.row_groups:
                    self.units.append((frag.path, rg.id, rg.num_rows, first))
                    first += rg.num_rows
        except Exception as e:
            raise UserError(field, f"cannot read {storage.shown(source)} as parquet: {e}") from None
        self.features, self.labels, self.id_column, self.shape = data.features, data.labels, data.id_column, data.shape
        self.classes = data.num_classes

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
        if not self.id_column:
            return [self._ids(u, None) for u in range(len(self.units))]
        ids = [self._ids(u, self._table(u, [self.id_column])) for u in range(len(self.units))]
        self._refuse_repeated(ids)
        return ids

    def _refuse_repeated(self, ids: list[np.ndarray]) -> None:
        """A user's ids must be unique: the split, the order and a cache's rows are keyed by them."""
        every = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        values, first, counts = np.unique(every, return_index=True, return_counts=True)
        if (counts == 1).all():
            return
        value = values[np.argmax(counts > 1)]
        at = [int(i) for i in np.flatnonzero(every == value)[:2]]
        ends = np.cumsum([len(i) for i in ids])
        where = []
        for i in at:
            u = int(np.searchsorted(ends, i, side="right"))
            path, _, _, row0 = self.units[u]
            where.append(f"row {row0 + i - (ends[u] - len(ids[u]))} of {path}")
        raise UserError("data.id_column", f"id {int(value)} appears more than once in column '{self.id_column}' ({' and '.join(where)}); "
                        "ids must be unique: fix the data, or remove data.id_column to number the rows")

    def read(self, units: np.ndarray, rows: np.ndarray) -> dict:
        cols = [c for c in (self.features, self.labels, self.id_column) if c]

        def unit(u: int, picked: np.ndarray) -> dict:
            table = self._table(u, cols)
            path, _, _, first = self.units[u]
            x, y = stacked(to_numpy(table.column(self.features)), path, first), to_numpy(table.column(self.labels))
            check_samples(x, y, path, first, self.classes)
            batch = {self.features: x, self.labels: y, "row_hash": self._ids(u, table)}
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


def stacked(x: np.ndarray, where: str, first_row: int) -> np.ndarray:
    """A column of per-row lists as one array; refuses rows of different shapes (or missing) by
    naming the first such row."""
    if x.dtype != object:
        return x
    shapes = [None if v is None else np.shape(v) for v in x]
    odd = next((i for i, shape in enumerate(shapes) if shape is None or shape != shapes[0]), None)
    if odd is not None:
        raise UserError("data.features", f"row {first_row + odd} of {where} holds features of shape {shapes[odd]} but row "
                        f"{first_row} holds {shapes[0]}; every sample needs the same shape (no missing values)")
    return np.stack([np.asarray(v) for v in x])


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
