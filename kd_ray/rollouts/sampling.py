"""A rollout: a prompt cut from a data row, the student's continuation of it, and the row it
becomes. Pure functions of tensors and arrays (tested without Ray).

Generation is an explicit loop with a KV cache over the model's decoder and its head sliced to
the real vocabulary (as training sees the model), because a rollout must be a pure function of
(prompt, weights, seed) whatever else is generated beside it:

- each prompt samples from its own torch.Generator, seeded by kd_ray.core.seeds.rollout_seed,
  so its draws never depend on its neighbours' (HF `generate` draws a batch's samples from one
  generator);
- every batch has the same shape: `batch` rows (short batches padded with a dummy prompt), each
  prompt left-padded to `width` tokens. Matrix products then compute a row the same way in any
  company, which is what makes a resumed run's rollouts (read from the cursor, in other
  blocks) bit for bit those of the run it replaces on the CPU in fp32;
- on the CPU, attention runs on SDPA's plain (math) kernels: the fused CPU kernel, with two
  threads, gives a row's attention a last-bit difference that depends on where in the batch
  the row sits (its rows are shared out between the threads by position).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kd_ray.core.columns import (
    DOCS,
    ROLLOUT,
    SAMPLE_LOGPROB,
    TARGETS,
    TOKEN_POS,
    TOKENS,
)
from kd_ray.data.tokens import IGNORE, PAD_DOC


class Rollout(NamedTuple):
    tokens: np.ndarray  # int64: the generated tokens (the end-of-text token last, where it stopped there)
    logprobs: np.ndarray  # float32: each one's log-probability at T = 1 under the weights that sampled it


def prompt_length(row_tokens: np.ndarray, row_targets: np.ndarray, row_docs: np.ndarray, prompt_tokens: int | None) -> int:
    """How many of a padded row's first tokens are its prompt: `prompt_tokens` (text), or those
    up to the first token whose successor carries loss (prompt + response, conversations), or
    the whole document where none does; at least 1 and at most its length."""
    length = int((row_docs >= 0).sum())
    if prompt_tokens is not None:
        n = prompt_tokens
    else:
        loss = np.flatnonzero(row_targets >= 0)
        n = int(loss[0]) + 1 if len(loss) else length
    return max(1, min(n, length))


def _filtered(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling probabilities of one row: softmax(logits / T), cut to its nucleus (the smallest
    set of tokens holding top_p of the probability) and renormalised."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # the mass of the tokens ranked above each
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


@torch.inference_mode()
def generate(decoder, head, prompts: list[np.ndarray], seeds: list[int], limits: list[int], *, width: int, batch: int,
             temperature: float, top_p: float, eos: int | None, device: torch.device, pad: int = 0) -> list[Rollout]:
    """Each prompt's continuation of at most its limit of new tokens (stopping after `eos` where
    given), sampled with its own seed; see the module's docstring for why the shapes are fixed.
    `decoder(input_ids, attention_mask, position_ids, cache)` returns the last hidden states and
    the KV cache (hf_decoder); `head(hidden)` the logits (N, vocab)."""
    out: list[Rollout] = []
    with sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext():
        for a in range(0, len(prompts), batch):
            out += _generate_batch(decoder, head, prompts[a:a + batch], seeds[a:a + batch], limits[a:a + batch], width, batch,
                                   temperature, top_p, eos, device, pad)
    return out


def _generate_batch(decoder, head, prompts, seeds, limits, width, batch, temperature, top_p, eos, device, pad) -> list[Rollout]:
    n = len(prompts)
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i in range(batch):
        p = prompts[i] if i < n else np.array([pad])  # a dummy row keeps the batch's shape
        p = p[-width:]
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    limit = torch.tensor(list(limits) + [0] * (batch - n))
    steps = int(limit.max()) if n else 0
    tokens = torch.full((batch, max(steps, 1)), pad, dtype=torch.long)
    logprobs = torch.zeros((batch, max(steps, 1)), dtype=torch.float32)
    done = limit <= 0
    lengths = torch.zeros(batch, dtype=torch.long)
    hidden, cache = decoder(ids, mask, positions, None)
    for t in range(steps):
        logits = head(hidden[:, -1]).float().cpu()
        log_p = torch.log_softmax(logits, dim=-1)
        picked = torch.full((batch,), pad, dtype=torch.long)
        for i in range(n):
            if not done[i]:
                picked[i] = torch.multinomial(_filtered(logits[i], temperature, top_p), 1, generator=generators[i])[0]
                tokens[i, t], logprobs[i, t] = picked[i], log_p[i, picked[i]]
                lengths[i] = t + 1
                done[i] = bool(t + 1 >= limit[i] or (eos is not None and int(picked[i]) == eos))
        if bool(done.all()) or t + 1 == steps:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        hidden, cache = decoder(picked[:, None].to(device), mask, positions, cache)
    return [Rollout(tokens[i, :lengths[i]].numpy().copy(), logprobs[i, :lengths[i]].numpy().copy()) for i in range(n)]


def hf_decoder(lm: torch.nn.Module):
    """`decoder` for `generate` from a Hugging Face causal LM's decoder (kd_ray.models.decoder.decoder_and_head)."""

    def step(ids, mask, positions, cache):
        out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.last_hidden_state, out.cache

    return step


def rollout_row(row: dict, prompt: int, rollout: Rollout, version: int) -> dict:
    """A padded row whose first `prompt` tokens are kept and followed by the rollout: targets on
    the generated tokens only, each with the log-probability it was sampled at."""
    length = len(row[TOKENS])
    n = len(rollout.tokens)
    end = prompt + n
    tokens = np.zeros(length, dtype=row[TOKENS].dtype)
    tokens[:prompt], tokens[prompt:end] = row[TOKENS][:prompt], rollout.tokens
    targets = np.full(length, IGNORE, dtype=row[TARGETS].dtype)
    targets[prompt - 1:end - 1] = rollout.tokens
    logprobs = np.zeros(length, dtype=np.float32)
    logprobs[prompt - 1:end - 1] = rollout.logprobs
    docs = np.full(length, PAD_DOC, dtype=row[DOCS].dtype)
    docs[:end] = 0
    positions = np.zeros(length, dtype=row[TOKEN_POS].dtype)
    positions[:end] = np.arange(end)
    return {TOKENS: tokens, TARGETS: targets, DOCS: docs, TOKEN_POS: positions, SAMPLE_LOGPROB: logprobs,
            ROLLOUT: np.int32(version)}
