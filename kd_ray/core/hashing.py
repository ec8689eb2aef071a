"""Hashes kd_ray computes without torch: splitmix64 mixing (the data order, the split, every
seed: kd_ray.core.seeds), SHA-256 of bytes and of files (cache shards, checkpoints, teacher
weights), and the per-row digests that tie a cached teacher output to its exact input."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from kd_ray.core import storage

_GOLDEN, _MUL1, _MUL2, _M64 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, (1 << 64) - 1


def mix64(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (id + seed): a well-spread 64-bit hash, vectorised, no Python loop."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(seed & _M64) * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL2)
        return z ^ (z >> np.uint64(31))


def mix64_one(value: int, seed: int) -> int:
    """mix64 of one int64 value, in Python integers: a one-element array costs about 20 us, and
    the training RNG's seed (kd_ray.core.seeds.step_seed) is drawn at every optimizer step."""
    z = ((value & _M64) + (seed & _M64) * _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Bytes of words mixed per numpy call: the mixing's temporaries (a few arrays of that size) stay
# near this, whatever the rows (a chunk of 224 x 224 x 3 float32 images is 600 MB).
_DIGEST_BYTES = 32 << 20


def input_digests(x: np.ndarray) -> np.ndarray:
    """A 64-bit digest of each row of `x` (with its dtype and shape): what ties a cached output to
    the exact input the teacher saw. Vectorised over rows: each 8-byte word of a row is mixed with
    its place (splitmix64, a bijection: a change to any one word always changes the row's sum),
    the mixed words are summed mod 2^64, and the sum is mixed again with the dtype and shape. A
    BLAKE2b per row, in a Python loop, cost 5% of a small student's train worker in a cached run
    (docs/performance.md, "Small students"); this is an integrity check against changed data,
    not against an adversary."""
    x = np.ascontiguousarray(x)
    n = len(x)
    head = int.from_bytes(hashlib.blake2b(repr((x.dtype.str, x.shape[1:])).encode(), digest_size=8).digest(), "little")
    raw = x.reshape(n, math.prod(x.shape[1:])).view(np.uint8)
    if raw.shape[1] % 8:
        raw = np.concatenate([raw, np.zeros((n, 8 - raw.shape[1] % 8), dtype=np.uint8)], axis=1)
    words = raw.view("<u8")
    sums = np.zeros(n, dtype=np.uint64)
    step = max(1, _DIGEST_BYTES // (8 * max(n, 1)))  # words of each row per call
    with np.errstate(over="ignore"):
        for a in range(0, words.shape[1], step):
            block = words[:, a:a + step]
            places = mix64(np.arange(a, a + block.shape[1], dtype=np.uint64), head)
            sums += mix64(block ^ places, 0).sum(axis=1, dtype=np.uint64)
    return mix64(sums, head)


def file_sha256(path: str) -> str:
    """A file's SHA-256, read in blocks: checkpoint files and a cached teacher's weights (a local
    file or an object)."""
    h = hashlib.sha256()
    fs, root = storage.filesystem(path)
    with fs.open_input_stream(root) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
