"""A worker's clocks: the training figures between two log lines, and the checkpoint timer."""

from __future__ import annotations

import time

import torch

from kd_ray.train.parallel import all_reduce_sum


class Timer:
    """The every-M-minutes checkpoint clock (rank 0's)."""

    def __init__(self, minutes: float | None):
        self.seconds = minutes * 60 if minutes else None
        self.reset()

    def reset(self) -> None:
        self.start = time.monotonic()

    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start >= self.seconds


class Meter:
    """Training sums and timings between two log lines, kept on the device until collected."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # kd, ce, correct, count
        self.wait = 0.0
        self.start = time.perf_counter()

    def timed(self, batches):
        """Yield batches, adding up the time spent waiting for each."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield batch

    def add(self, terms, count) -> None:
        """A micro-batch's loss terms and its loss units (samples or tokens; a number or a tensor)."""
        n = torch.as_tensor(count, dtype=torch.float64).to(self.device)
        self.sums += torch.stack([terms.kd_sum.double(), terms.ce_sum.double(), terms.correct.double(), n])

    def collect(self, world: int) -> tuple:
        """All-reduce the window over ranks and reset it: (kd, ce, correct, count, mean data wait,
        seconds)."""
        packed = torch.cat([self.sums, torch.tensor([self.wait], dtype=torch.float64, device=self.device)])
        kd, ce, correct, count, wait = all_reduce_sum(packed).tolist()
        out = (kd, ce, correct, count, wait / world, time.perf_counter() - self.start)
        self.sums.zero_()
        self.wait, self.start = 0.0, time.perf_counter()
        return out
