"""Distillation losses: pure functions of tensors, always computed in fp32.

Losses return *sums over the micro-batch divided by a caller-given denominator* rather than
means, so that a global batch split into K micro-batches on W workers yields exactly the same
gradient as one big batch (see `kd_ray.batching.BatchPlan.loss_denominator`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class LossTerms(NamedTuple):
    loss: torch.Tensor  # what backward() runs on: (alpha * kd + (1 - alpha) * ce) summed / denominator
    kd_sum: torch.Tensor  # detached sums over the micro-batch, for logging
    ce_sum: torch.Tensor
    correct: torch.Tensor


def hinton_kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) x T^2, one value per sample, in fp32.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
    changes (Hinton et al., 2015).
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl * (temperature**2)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    denominator: float,
) -> LossTerms:
    """alpha x KD + (1 - alpha) x cross-entropy, summed over samples and divided by `denominator`.

    With no teacher (supervised training) the KD term is absent and alpha is ignored.
    Autocast is switched off so softmax, log and the reductions run in fp32 even when the
    forward pass ran in bf16/fp16.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.float()
        ce = F.cross_entropy(s, labels, reduction="none")
        if teacher_logits is None:
            kd = torch.zeros_like(ce)
            per_sample = ce
        else:
            kd = hinton_kd_per_sample(s, teacher_logits, temperature)
            per_sample = alpha * kd + (1.0 - alpha) * ce
        loss = per_sample.sum() / denominator
        correct = (s.argmax(dim=-1) == labels).sum()
    return LossTerms(loss, kd.detach().sum(), ce.detach().sum(), correct.detach())
