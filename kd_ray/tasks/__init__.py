"""The task seam: what differs between distilling a classifier and a causal language model.

The pipeline, the teacher pool, the Trainer and the driver call a task (the protocol:
kd_ray.tasks.base.Task) and never branch on the kind of model. The job builds it once
(kd_ray.tasks.build.task_for) and passes it down; a pool's actors get a TaskHandle, which builds
it where it runs.

    classify    kd_ray.tasks.classify: features -> class logits, per sample
    causal_lm   kd_ray.tasks.causal_lm: token rows -> next-token logits, per token

This module imports nothing, so that each part can be imported alone.
"""
