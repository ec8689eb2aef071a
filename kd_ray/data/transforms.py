"""Preprocessing (deterministic) and augmentation (random), as pure functions of numpy batches.

Both run *before* the teacher (in Ray Data's read tasks, or in the train workers when they read
the stream themselves: kd_ray.data.local), so the teacher and the student see the same view
of every sample. Neither modifies its input arrays: Ray hands out read-only zero-copy views.
"""

from __future__ import annotations

import numpy as np

from kd_ray.core.columns import X


def _per_channel(value, ndim: int) -> np.ndarray | float:
    """A scalar, or a list broadcast over axis 1 (channels) of an (N, C, ...) batch."""
    if isinstance(value, (int, float)):
        return float(value)
    arr = np.asarray(value, dtype=np.float32)
    return arr.reshape((1, -1) + (1,) * max(ndim - 2, 0))


def preprocess(batch: dict, scale: float, mean, std) -> dict:
    x = batch[X].astype(np.float32) * np.float32(scale)
    x = (x - _per_channel(mean, x.ndim)) / _per_channel(std, x.ndim)
    return {**batch, X: x.astype(np.float32, copy=False)}


def augment(batch: dict, noise_std: float, shift: int, hflip: bool, rng: np.random.Generator | None = None) -> dict:
    """Random shift (zero padded) and horizontal flip of the last two axes, then Gaussian noise.

    A fresh generator is drawn per call, so each epoch (Ray re-executes the pipeline) sees new views.
    """
    rng = rng or np.random.default_rng()
    x = np.array(batch[X], dtype=np.float32, copy=True)
    n = len(x)
    if (shift or hflip) and x.ndim < 3:
        raise ValueError("shift and hflip need image-shaped samples: set data.shape, e.g. [1, 8, 8]")
    if hflip:
        flip = rng.random(n) < 0.5
        x[flip] = x[flip][..., ::-1]
    if shift:
        h, w = x.shape[-2:]
        padded = np.zeros(x.shape[:-2] + (h + 2 * shift, w + 2 * shift), dtype=np.float32)
        padded[..., shift : shift + h, shift : shift + w] = x
        dy = rng.integers(0, 2 * shift + 1, n)
        dx = rng.integers(0, 2 * shift + 1, n)
        for i in range(n):
            x[i] = padded[i, ..., dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    if noise_std:
        x += rng.normal(0.0, noise_std, size=x.shape).astype(np.float32)
    return {**batch, X: x}
