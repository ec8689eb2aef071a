"""A job's task, built from its `task:` field: the one place that maps the field to a class."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec
    from kd_ray.tasks.base import Task


def task_for(spec: "JobSpec") -> "Task":
    """The task object of a job (`task:` in the job file). The tasks' modules import torch and
    transformers: imported here, when a task is built, so that this module stays torch-free."""
    if spec.task == "causal_lm":
        from kd_ray.tasks.causal_lm import CausalLM

        return CausalLM(spec)
    from kd_ray.tasks.classify import Classify

    return Classify(spec)
