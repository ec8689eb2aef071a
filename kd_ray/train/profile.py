"""An optional window of profiled steps on each worker: a torch.profiler trace (CPU, and CUDA
kernels on a GPU) and, on CUDA, a memory snapshot of the same steps, written to
RUN_DIR/profile/. Open the traces in https://ui.perfetto.dev (or chrome://tracing) and the
snapshots in https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

import torch

from kd_ray.core.storage import copy_out, join

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import ProfileSpec

PROFILE_DIR = "profile"


class StepProfiler:
    """Starts after optimizer step `start_step`, stops `steps` steps later (or when the loop
    ends first), then copies its files to the run directory (local or any pyarrow filesystem)."""

    def __init__(self, spec: "ProfileSpec", run_dir: str, rank: int, device: torch.device, step: int):
        self.start = spec.start_step
        self.stop_at = self.start + spec.steps if self.start else None
        self.memory = spec.memory and device.type == "cuda"
        self.cuda = device.type == "cuda"
        self.run_dir, self.rank = run_dir, rank
        self.prof = None
        # A resumed attempt that is already past the window does not profile again.
        self.enabled = self.start is not None and step < self.stop_at

    def after_step(self, step: int) -> None:
        if not self.enabled:
            return
        if step == self.start and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=200_000)
            self.prof.__enter__()
        elif self.prof is not None and step >= self.stop_at:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        prof, self.prof, self.enabled = self.prof, None, False
        if self.cuda:
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as d:
            prof.export_chrome_trace(os.path.join(d, f"rank{self.rank}.trace.json"))
            sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
            with open(os.path.join(d, f"rank{self.rank}.top_ops.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
            if self.memory:
                torch.cuda.memory._dump_snapshot(os.path.join(d, f"rank{self.rank}.memory.pickle"))
                torch.cuda.memory._record_memory_history(enabled=None)
            copy_out(d, join(self.run_dir, PROFILE_DIR))
