"""The order in which samples reach the student: a pure function of (seed, epoch).

The training data is a sequence of *units* (a parquet row group, or a block of rows of an
in-memory array), each holding the source rows of one split. Epoch e visits every row once, in
an order that depends only on (seed, e, shuffle mode), cut into *chunks*: the pieces the stream
reads, one Ray task each (or one read of each train worker: kd_ray.data.local).

    global, random access (in memory): one permutation of every row, cut into equal chunks
    global, row groups (parquet):       units in a permuted order, `window` units per chunk,
                                        rows shuffled within the chunk
    local:                              units in order, rows shuffled within each chunk
    none:                               the source order

Positions number the run's samples: position P is row P % N of epoch P // N (N rows per epoch).
Optimizer step s trains positions [s x G, (s + 1) x G) for global batch G, whatever the world
size, so a data cursor is a single number, and after any failure, resize or resubmission the
stream restarts at the cursor: nothing consumed is seen again and nothing is skipped.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from kd_ray.core.seeds import epoch_seed


@dataclass(frozen=True, eq=False)
class Layout:
    """Where a split's rows are: `units[u]` holds the row numbers (within unit u) of this split."""

    units: tuple[np.ndarray, ...]
    random_access: bool  # any row is cheap to read (in memory): a global shuffle permutes rows
    chunk_rows: int = 1024  # rows per chunk, for a random-access global shuffle
    window: int = 1  # units per chunk otherwise

    @functools.cached_property
    def rows(self) -> int:
        return int(sum(len(u) for u in self.units))

    def chunks_per_epoch(self, shuffle: str) -> int:
        if shuffle == "global" and self.random_access:
            return max(1, -(-self.rows // self.chunk_rows))
        return max(1, -(-len(self.units) // self.window))

    @functools.cached_property
    def key(self) -> str:
        """A content digest: equal layouts share the per-process cache of epoch orders."""
        h = hashlib.blake2b(repr((self.random_access, self.chunk_rows, self.window)).encode(), digest_size=16)
        for u in self.units:
            h.update(np.int64(len(u)).tobytes())
            h.update(np.ascontiguousarray(u, dtype=np.int64).tobytes())
        return h.hexdigest()

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.key == other.key


Chunk = tuple[np.ndarray, np.ndarray]  # (unit, row within unit) of each sample, in order


@functools.lru_cache(maxsize=4)
def epoch_chunks(layout: Layout, seed: int, epoch: int, shuffle: str) -> tuple[tuple[Chunk, ...], np.ndarray]:
    """Epoch `epoch`'s chunks, and each chunk's first position within the epoch (plus the end)."""
    rng = np.random.default_rng(epoch_seed(seed, epoch))
    unit_of = [np.full(len(r), u, dtype=np.int64) for u, r in enumerate(layout.units)]
    if shuffle == "global" and layout.random_access:
        units = np.concatenate(unit_of) if unit_of else np.zeros(0, np.int64)
        rows = np.concatenate(layout.units) if layout.units else np.zeros(0, np.int64)
        perm = rng.permutation(len(units))
        cuts = range(0, max(len(perm), 1), layout.chunk_rows)
        chunks = tuple((units[perm[a:a + layout.chunk_rows]], rows[perm[a:a + layout.chunk_rows]]) for a in cuts)
    else:
        order = rng.permutation(len(layout.units)) if shuffle == "global" else np.arange(len(layout.units))
        chunks = []
        for a in range(0, max(len(order), 1), layout.window):
            picked = order[a:a + layout.window]
            units = np.concatenate([unit_of[u] for u in picked]) if len(picked) else np.zeros(0, np.int64)
            rows = np.concatenate([layout.units[u] for u in picked]) if len(picked) else np.zeros(0, np.int64)
            if shuffle != "none":
                perm = rng.permutation(len(units))
                units, rows = units[perm], rows[perm]
            chunks.append((units, rows))
        chunks = tuple(chunks)
    starts = np.concatenate([[0], np.cumsum([len(c[0]) for c in chunks])]).astype(np.int64)
    return chunks, starts


def positions_of_chunk(layout: Layout, seed: int, shuffle: str, index: int) -> tuple[Chunk, np.ndarray, int]:
    """Chunk `index` of the run's stream (chunks of every epoch back to back): its rows, their
    positions, and its epoch."""
    epoch, j = divmod(index, layout.chunks_per_epoch(shuffle))
    chunks, starts = epoch_chunks(layout, seed, epoch, shuffle)
    chunk = chunks[j]
    return chunk, epoch * layout.rows + starts[j] + np.arange(len(chunk[0]), dtype=np.int64), epoch


def stream_chunks(layout: Layout, shuffle: str, end_position: int) -> int:
    """Chunks the stream must hold to reach `end_position` (exclusive)."""
    epochs = -(-end_position // max(layout.rows, 1))
    return epochs * layout.chunks_per_epoch(shuffle)


def split_units(ids_per_unit: list[np.ndarray], keep) -> tuple[np.ndarray, ...]:
    """Rows of each unit that belong to a split; `keep(ids) -> bool mask`."""
    return tuple(np.flatnonzero(keep(ids)).astype(np.int64) for ids in ids_per_unit)
