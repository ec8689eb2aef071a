"""The Task protocol: everything that differs between distilling a classifier and a causal LM.

Both tasks (kd_ray.tasks.classify.Classify, kd_ray.tasks.causal_lm.CausalLM) implement every
member; the code outside kd_ray/tasks/ calls these and never asks which task it has. A new task is
one class that fills the same slots.

    identity    name, unit (what the loss averages over: samples or tokens, and so which cache
                codec stores its teacher signal: kd_ray.cache), fixed_count, prepares, SCORES, handle
    checks      check: the job's data, models, weights and cache block, before Ray starts
    rows        readers, transform
    models      build_student, fsdp_units, load_teacher
    teacher     teacher_tensors: the signal the pool sends (as numpy columns) or a colocated teacher
                adds to a micro-batch (as tensors), per batch: one function for both
    training    count, micro_step (forward, loss, scaled backward: the Trainer handles gradient
                sync and the optimizer step)
    evaluation  eval_sums, teacher_eval_sums, figures, teacher_figures, teacher_line, run_figures
    export      export, exported, check_exported, load_exported
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kd_ray.spec import JobSpec


class Task(Protocol):
    name: ClassVar[str]
    unit: ClassVar[str]  # "samples" | "tokens": the loss's unit, and the cache codec of the teacher's signal
    fixed_count: ClassVar[bool]  # a micro-batch's loss units are known before it is read (samples)
    prepares: ClassVar[bool]  # its rows are made once and stored (`kd-ray prepare`), not read from the source as they are
    # (score, format or None for the default, also shown for the teacher); the first is the headline
    SCORES: ClassVar[tuple[tuple[str, str | None, bool], ...]]
    spec: "JobSpec"

    @property
    def handle(self) -> "TaskHandle":
        """A torch-free picklable builder of this task, for Ray Data plans (kd_ray.teacher)."""

    def check(self) -> None:
        """Raise UserError for a mistake in the job's data, models, weights or cache block."""

    # rows
    def readers(self) -> tuple[Any, Any]:
        """(train reader, eval reader or None: then the split is drawn from the train reader)."""

    def transform(self, train: bool) -> dict:
        """{'preprocess': ..., 'augment': ...} for kd_ray.data.chunks.read_chunk."""

    def prepare(self, echo: Callable[[str], None]) -> str:
        """`kd-ray prepare` (where `prepares`): the rows made once and stored, every stored file
        read through (a damaged one made again); a line saying what they are."""

    # models
    def build_student(self, device: "torch.device") -> "torch.nn.Module": ...

    def fsdp_units(self, model: "torch.nn.Module") -> list["torch.nn.Module"]: ...

    def load_teacher(self, device: "torch.device") -> "torch.nn.Module": ...

    # teacher
    def teacher_tensors(self, model: "torch.nn.Module", batch: dict, device: "torch.device", precision: str,
                        for_loss: bool = False) -> dict:
        """The teacher's signal for a batch (numpy columns or tensors) as tensors on the teacher's
        device, named and typed as the columns that travel (kd_ray.core.columns;
        kd_ray.teacher_signal.as_columns makes them numpy). `for_loss`: rows only trained on,
        never scored, whose loss may need less (the sampled-token loss: one log-prob a token)."""

    # training
    def count(self, batch: dict) -> "torch.Tensor":
        """The micro-batch's loss units (samples or loss tokens), float64."""

    def micro_step(self, model, batch: dict, denominator, device: "torch.device", scaler) -> Any:
        """Forward, the loss divided by `denominator`, (scaled) backward; returns the loss terms."""

    # evaluation
    def eval_sums(self, model, batches: Iterable[dict], device: "torch.device") -> "torch.Tensor": ...

    def teacher_eval_sums(self, batches: Iterable[dict], device: "torch.device") -> "torch.Tensor": ...

    def figures(self, sums: list[float]) -> dict:
        """An evaluation's figures from eval_sums, all-reduced over the group."""

    def teacher_figures(self, sums: list[float]) -> dict: ...

    def teacher_line(self, scores: dict) -> str:
        """The teacher's scores as the run's console shows them."""

    def run_figures(self, trains: list[dict]) -> dict:
        """The task's own figures of a finished run for its summary (e.g. tokens per second)."""

    # export
    def export(self, directory: str, state_dict: dict) -> None: ...

    def exported(self, run_dir: str) -> str: ...

    def check_exported(self, path: str, field: str) -> None: ...

    def load_exported(self, path: str) -> "torch.nn.Module": ...


class TaskHandle:
    """What builds a job's task where it is needed, torch-free to unpickle: Ray Data's coordinator
    actors unpickle the plan of a teacher pool, which carries this, and never build the task
    (kd_ray.teacher). It names the task's class; its module is imported when it is called."""

    def __init__(self, task: "Task"):
        self.module, self.cls, self.spec = type(task).__module__, type(task).__name__, task.spec

    def __call__(self) -> "Task":
        return getattr(importlib.import_module(self.module), self.cls)(self.spec)


def fmt_score(value: Any, spec: str = ".4f") -> str:
    """A score as the console shows it; '-' where there is none (a top-k teacher's loss)."""
    return "-" if value is None else format(value, spec)
