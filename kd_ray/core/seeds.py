"""Every seed kd_ray derives from `run.seed`: the one home of the recipes, all built on the
splitmix64 hash of kd_ray.core.hashing, so that the data order, the augmented views and the
training RNG are pure functions of (seed, epoch, chunk, step, rank) and a restarted run draws
the same numbers.
"""

from __future__ import annotations

import numpy as np

from kd_ray.core.hashing import mix64_one as _hash


def epoch_seed(seed: int, epoch: int) -> int:
    """The permutation of epoch `epoch` (kd_ray.data.order)."""
    return _hash(epoch, seed) >> 33


def chunk_rng(seed: int, index: int) -> np.random.Generator:
    """The random views of chunk `index` of the run's stream (kd_ray.data.chunks): every
    epoch's chunks differ, and a replay of the run draws the same views."""
    return np.random.default_rng([epoch_seed(seed, index), _hash(index, seed) >> 1])


def step_seed(seed: int, step: int, rank: int) -> int:
    """torch's RNG (dropout...) at each optimizer step of each rank (kd_ray.train)."""
    return _hash(step * 65_537 + rank, seed) >> 1


# The "step" of a held-out prompt's rollout: every evaluation samples it with the same seed.
EVAL_ROLLOUT = -1


def rollout_seed(seed: int, step: int, prompt_id: int) -> int:
    """The sampling seed of a prompt's rollout for an optimizer step (kd_ray.rollouts): with the
    weights version the step generates from, it makes the rollout a pure function of the run."""
    return _hash(prompt_id, _hash(step, seed)) >> 1


def seed_torch(seed: int, device) -> None:
    """Seed the generators a worker draws from: the CPU's and its own GPU's. Not
    torch.manual_seed, which also queues the seed for every accelerator type not yet started
    (CUDA on a CPU worker, XPU, MTIA), formatting a stack trace for each: 0.5-3 ms of CPU per
    call on 2 cores, paid at every optimizer step, where a small student's whole step is 1 ms."""
    import torch

    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.init()
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
