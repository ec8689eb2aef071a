"""Stable sample ids and the deterministic train/eval split built on them."""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (id + seed): a well-spread 64-bit hash, vectorised, no Python loop."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def unit_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per id, a pure function of (id, seed)."""
    return (mix64(ids, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_eval(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each sample belongs to the held-out split. Same answer on every read, node and run."""
    return unit_hash(ids, seed) < fraction
