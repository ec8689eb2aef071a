"""Stable sample ids and the deterministic train/eval split built on them."""

from __future__ import annotations

import numpy as np

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
    the training RNG's seed (kd_ray.seeds.step_seed) is drawn at every optimizer step."""
    z = ((value & _M64) + (seed & _M64) * _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


def unit_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per id, a pure function of (id, seed)."""
    return (mix64(ids, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_eval(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each sample belongs to the held-out split. Same answer on every read, node and run."""
    return unit_hash(ids, seed) < fraction
