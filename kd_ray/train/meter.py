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
    """Training sums and timings between two log lines, kept on the device until collected.

    A micro-step adds no tensor arithmetic: its detached loss terms are kept as they are and summed
    when a log line asks (or every FOLD micro-steps, so a long log interval holds no more). On a
    small student each tensor op is a measurable share of a millisecond's step."""

    FOLD = 512

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # kd, ce, correct, count
        self.terms: list = []  # (kd_sum, ce_sum, correct, count tensor or None) per micro-step
        self.count = 0  # loss units given as numbers (samples: known without looking at the batch)
        self.wait = 0.0
        self.teacher = 0.0  # seconds in a colocated teacher's forward (kd_ray.train.colocated)
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
        if isinstance(count, torch.Tensor):
            self.terms.append((terms.kd_sum, terms.ce_sum, terms.correct, count))
        else:
            self.terms.append((terms.kd_sum, terms.ce_sum, terms.correct, None))
            self.count += count
        if len(self.terms) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        if not self.terms:
            return
        kd, ce, correct, counts = zip(*self.terms)
        counted = [c for c in counts if c is not None]
        parts = [torch.stack(kd).double().sum(), torch.stack(ce).double().sum(), torch.stack(correct).double().sum(),
                 torch.stack(counted).to(self.device, torch.float64).sum() if counted else self.sums.new_zeros(())]
        self.sums += torch.stack(parts)
        self.terms = []

    def collect(self, world: int) -> tuple:
        """All-reduce the window over ranks and reset it: (kd, ce, correct, count, mean data wait,
        mean seconds in a colocated teacher, mean seconds). Every rank gets the same figures (the
        poll interval is drawn from them)."""
        self._fold()
        self.sums[3] += self.count
        clocks = [self.wait, self.teacher, time.perf_counter() - self.start]
        packed = torch.cat([self.sums, torch.tensor(clocks, dtype=torch.float64, device=self.device)])
        kd, ce, correct, count, wait, teacher, elapsed = all_reduce_sum(packed).tolist()
        out = (kd, ce, correct, count, wait / world, teacher / world, elapsed / world)
        self.sums.zero_()
        self.count, self.wait, self.teacher, self.start = 0, 0.0, 0.0, time.perf_counter()
        return out
