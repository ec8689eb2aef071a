"""Stable sample ids and the deterministic train/eval split built on them."""

from __future__ import annotations

import numpy as np

from kd_ray.core.hashing import mix64


def unit_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per id, a pure function of (id, seed)."""
    return (mix64(ids, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_eval(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each sample belongs to the held-out split. Same answer on every read, node and run."""
    return unit_hash(ids, seed) < fraction
