"""The task seam: what differs between distilling a classifier and a causal language model.

The pipeline, the teacher pool, the Trainer and the driver call a task and never branch on the
kind of model. A task says what a row holds and how rows are made (`readers`, `transform`), what
the teacher sends (`teacher_columns`), the loss and what it is averaged over (`micro_step`,
`count`: samples, or loss tokens), the metrics and evaluation, and how the student is exported.

    classify    kd_ray.tasks.classify: features -> class logits, per sample
    causal_lm   kd_ray.tasks.causal_lm: token rows -> next-token logits, per token
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec


def task_for(spec: "JobSpec"):
    """The task object of a job (`task:` in the job file)."""
    if spec.task == "causal_lm":
        from kd_ray.tasks.causal_lm import CausalLM

        return CausalLM(spec)
    from kd_ray.tasks.classify import Classify

    return Classify(spec)
