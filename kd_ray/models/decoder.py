"""A Hugging Face-style causal LM as kd_ray runs it: its decoder (-> last hidden states) and its
output head sliced to the tokenizer's real vocabulary (models may pad their embedding tables
past it), for the task's loss and the teacher's signal (kd_ray.tasks.causal_lm) and for rollouts
(kd_ray.rollouts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_ray.models.precision import autocast


def decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A Hugging Face-style causal LM's decoder (-> last hidden states) and its output head."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    return decoder, lm.get_output_embeddings()


def sliced_head(head: nn.Module, vocab: int, precision: str, device: torch.device):
    """hidden -> logits over the real vocabulary, in the job's autocast (the loss turns it off)."""
    bias = None if getattr(head, "bias", None) is None else head.bias[:vocab]

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        with autocast(precision, device):
            return F.linear(hidden, head.weight[:vocab], bias)

    return logits
