"""Distillation losses: pure functions of tensors, always computed in fp32.

Losses return *sums over the micro-batch divided by a caller-given denominator* rather than
means, so that a global batch split into K micro-batches on W workers yields exactly the same
gradient as one big batch (see `kd_ray.batch_plan.BatchPlan.loss_denominator`).

The teacher's output reaches the loss either as dense logits or as a `TopK` (its k most probable
classes plus the exact probability mass of the rest), which is what an offline cache stores:
1000 classes in fp32 are 4000 bytes a sample, the top 10 in fp16 with int16 ids are 44.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F


class LossTerms(NamedTuple):
    loss: torch.Tensor  # what backward() runs on: (alpha * kd + (1 - alpha) * ce) summed / denominator
    kd_sum: torch.Tensor  # detached sums over the micro-batch, for logging
    ce_sum: torch.Tensor
    correct: torch.Tensor


class TopK(NamedTuple):
    """A teacher's output cut to its k most probable classes plus one 'tail' bucket; see `topk_compress`."""

    values: torch.Tensor  # (N, k) teacher log-probabilities at T=1, descending, fp16 or bf16
    indices: torch.Tensor  # (N, k) their class ids, int16 when every id fits, else int32
    tail_lse: torch.Tensor  # (N, len(temperatures)) fp32: log sum over the other classes of exp(log p / T)
    temperatures: tuple[float, ...]  # the T that each tail_lse column is exact for


def mix(kd, ce, alpha: float):
    """The training loss from its two terms (tensors or sums): alpha x KD + (1 - alpha) x CE."""
    return alpha * kd + (1.0 - alpha) * ce


def hinton_kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) x T^2, one value per sample, in fp32.

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T
    changes (Hinton et al., 2015).
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # One kernel for p_t x (log p_t - log p_s) (and one in the backward), not three: on a small
    # student each op of the loss is a measurable share of the step.
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=-1)
    return kl * (temperature**2)


def topk_index_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer type that holds every class id: the one place this is decided."""
    return torch.int16 if num_classes - 1 <= torch.iinfo(torch.int16).max else torch.int32


def topk_compress(
    teacher_logits: torch.Tensor, k: int, *, temperatures: Union[float, Sequence[float]], dtype: torch.dtype = torch.float16
) -> TopK:
    """Keep the teacher's k most probable classes and the exact log-mass of the rest at each T.

    Why log-probabilities at T=1 and not logits: softmax(z / T) is unchanged when a constant is
    subtracted from z, so log_softmax(z) serves every temperature as well as z does, and it is
    bounded above by 0, where fp16/bf16 are most precise for the classes that carry the mass.

    Why a tail per temperature: the mass outside the top k at temperature T depends on every
    discarded logit (log sum_j exp(z_j / T)), so no fixed summary of k values recovers it for a T
    chosen later. Rather than approximate it (and silently bias the loss), the cache records it
    exactly for the temperatures the caller names (4 bytes each, fp32 because a tail of 1e-6 and
    a tail of 0.999 both matter), and the loss refuses any other T.
    """
    temperatures = (float(temperatures),) if isinstance(temperatures, (int, float)) else tuple(map(float, temperatures))
    num_classes = teacher_logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k={k}: must be between 1 and the number of classes ({num_classes})")
    if not temperatures or min(temperatures) <= 0:
        raise ValueError(f"temperatures={temperatures}: give at least one, all > 0")
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        values, indices, tail_lse, _ = topk_parts(teacher_logits.float(), k, temperatures)
    # A log-prob below the storage type's range would become -inf; its class carries no mass either way.
    values = values.clamp(min=torch.finfo(dtype).min).to(dtype)
    return TopK(values, indices.to(topk_index_dtype(num_classes)), tail_lse, temperatures)


def topk_parts(z: torch.Tensor, k: int, temperatures: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """(top-k log-probs at T=1, their ids, tail log-mass per T, logsumexp(z)) of fp32 logits z.

    A language model's teacher makes this for every token over its whole vocabulary, so it
    exponentiates z once per temperature and never materialises log_softmax: with
    e = exp((z - max) / T), the tail's mass is the sum of e with the top k zeroed, which is exact
    (no 1 - sum(top) cancellation). A row whose whole tail underflows in e (beyond e^-87 of its
    top class) is recomputed in log space, so a confident teacher's tiny tail stays finite.
    """
    mx = z.amax(dim=-1, keepdim=True)
    values, indices = z.topk(k, dim=-1)
    e = (z - mx).exp_()
    lse = mx + e.sum(dim=-1, keepdim=True).log()
    tails, spent = [], False
    for t in temperatures:
        if t == 1.0 and not spent:
            e_t, spent = e, True  # zeroed in place below: used once
        else:
            e_t = ((z - mx) / t).exp_()
        rest = e_t.scatter_(-1, indices, 0.0).sum(dim=-1, keepdim=True)
        tail = rest.log() + (mx - lse) / t  # log of an empty tail (k = classes) is -inf
        lost = ((rest == 0) & (k < z.shape[-1]))[:, 0]  # an underflowed tail, not an empty one
        if bool(lost.any()):
            masked = (z[lost] - lse[lost]).scatter(-1, indices[lost], float("-inf")) / t
            tail[lost] = torch.logsumexp(masked, dim=-1, keepdim=True)
        tails.append(tail)
    return values - lse, indices, torch.cat(tails, dim=-1), lse[:, 0]


def tail_column(temperatures: tuple[float, ...], temperature: float) -> int:
    for i, t in enumerate(temperatures):
        if math.isclose(t, temperature, rel_tol=1e-6):
            return i
    raise ValueError(
        f"temperature={temperature}: the cached teacher top-k holds the tail mass only for temperatures "
        f"{list(temperatures)}; use one of them or rebuild the cache with this temperature"
    )


def sparse_kd_per_sample(student_logits: torch.Tensor, teacher: TopK, temperature: float) -> torch.Tensor:
    """KL over k+1 buckets (the teacher's top-k classes and everything else) x T^2, per sample, fp32.

    Both distributions are coarse-grained the same way: the teacher's tail bucket holds its exact
    cached mass, the student's holds log sum_{j not in top-k} exp(s_j / T) - logsumexp(s / T),
    taken by masking rather than log(1 - sum q_topk), which cancels to noise when the tail is tiny.
    Nothing is renormalised, so the result is exact bookkeeping, and by the chain rule of KL

        dense KL = this + p_tail x KL(teacher's tail shape || student's tail shape)

    so it never exceeds the dense loss and equals it when k = classes. Its gradient,
    T (q - p~), pushes the student's total tail mass to the teacher's and spreads it over the tail
    classes in the student's own proportions (p~_j = p_tail q_j / q_tail).
    """
    log_p, log_q = bucket_log_probs(student_logits, teacher, temperature)
    return _kl(log_p, log_q) * (temperature**2)


def bucket_log_probs(student_logits: torch.Tensor, teacher: TopK, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities at temperature T over the same k+1 buckets: the
    teacher's top-k classes, then everything else. fp32, shape (N, k+1) each."""
    log_p, log_q, _, _ = _buckets(student_logits, teacher, temperature)
    return log_p, log_q


class _StudentBuckets(torch.autograd.Function):
    """The student's side of the bucket loss in one pass over the vocabulary, with its gradient
    written by hand: from logits z (N, V) and the teacher's top-k ids, at temperature T,

        log_q (N, k+1)  log-probs of the top-k classes, then of everything else (the tail)
        lse (N, 1)      logsumexp(z / T), the softmax's normaliser
        s_y (N,)        z_y / T at the target (cross-entropy at T = 1 is lse - s_y)

    Written as autograd ops this is about fifteen passes over N x V (the max, the shifted copy, the
    exp, the masked copy for the tail, gathers and scatters, each with its own backward), which is
    most of a small LM student's step. Here: the max, one exp into a buffer the backward reuses,
    one sum; the tail's mass is that buffer summed with the top k zeroed in place (exact: no
    1 - sum q_top, which cancels to noise when the tail is tiny). The backward is

        d/dz_i = (e_i c + [i not in top-k] e_i g_tail / rest + [i = top_j] g_top_j + [i = y] g_y) / T

    with e = exp(z/T - max), c = (g_lse - sum g_top - g_tail) / sum e, rest = the tail's sum of e,
    written into the exp buffer in place. An empty tail (k = V) is clamped rather than log(0) =
    -inf, and its gradient is zero instead of NaN."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, temperature: float):
        s = logits / temperature if temperature != 1.0 else logits
        m = s.amax(dim=-1, keepdim=True)
        e = torch.sub(s, m).exp_()
        top_e = e.gather(-1, idx)
        e.scatter_(-1, idx, 0.0)
        rest = e.sum(dim=-1, keepdim=True)
        total = rest + top_e.sum(dim=-1, keepdim=True)
        lse = m + total.log()
        tiny = torch.finfo(s.dtype).tiny
        log_q = torch.cat([s.gather(-1, idx), m + rest.clamp_min(tiny).log()], dim=-1) - lse
        s_y = s.gather(-1, targets[:, None])[:, 0]
        ctx.save_for_backward(e, top_e, rest, total, idx, targets)
        ctx.temperature = temperature
        return log_q, lse, s_y

    @staticmethod
    def backward(ctx, g_log_q, g_lse, g_y):
        e, top_e, rest, total, idx, targets = ctx.saved_tensors
        g_top, g_tail = g_log_q[:, :-1], g_log_q[:, -1:]
        c = (g_lse - g_top.sum(dim=-1, keepdim=True) - g_tail) / total
        tail = torch.where(rest > torch.finfo(rest.dtype).tiny, g_tail / rest, torch.zeros_like(rest))
        # In place: the buffer serves one backward (the checkpointed chunk recomputes it; a second
        # backward through the same graph fails on autograd's version check rather than misreading it).
        grad = e.mul_(c + tail)
        grad.scatter_(-1, idx, top_e * c + g_top)
        grad.scatter_add_(-1, targets[:, None], g_y[:, None])
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad, None, None, None


def _buckets(student_logits: torch.Tensor, teacher: TopK, temperature: float,
             targets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """bucket_log_probs, the student's logsumexp at T (its softmax's normaliser), and its logit
    at T of each target (of class 0 without targets)."""
    column = tail_column(teacher.temperatures, temperature)
    idx = teacher.indices.long()
    # Teacher: k+1 log-probabilities that sum to one by construction, whatever the storage rounding.
    t_top = teacher.values.float() / temperature
    t_tail = teacher.tail_lse[:, column : column + 1].float()
    t_buckets = torch.cat([t_top, t_tail], dim=-1)
    log_p = t_buckets - torch.logsumexp(t_buckets, dim=-1, keepdim=True)
    s = student_logits.float()
    targets = torch.zeros(len(s), dtype=torch.long, device=s.device) if targets is None else targets.long()
    log_q, lse, s_y = _StudentBuckets.apply(s, idx, targets, float(temperature))
    return log_p, log_q, lse, s_y


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row. Buckets where a has no mass (an empty tail, an underflowed class) add
    0, not 0 x -inf = NaN."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(dim=-1)


def bucket_divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between the teacher's (p) and the student's (q) bucket distributions:

        forward   KL(p || q), mass-covering: the default, and over k = V buckets the dense KL
        reverse   KL(q || p), mode-seeking
        jsd       beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q  (0 < beta < 1)

    Over k+1 buckets these are bucket-level objectives: reverse KL and JSD see the student's mass
    outside the teacher's top k only as one bucket."""
    if kind == "forward":
        return _kl(log_p, log_q)
    if kind == "reverse":
        return _kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def bytes_per_sample(num_classes: int, k: Optional[int] = None, dtype: torch.dtype = torch.float32, num_temperatures: int = 1) -> int:
    """Storage for one sample's teacher output: dense logits (k=None), or a `TopK` with k classes."""
    if k is None:
        return num_classes * dtype.itemsize
    return k * (dtype.itemsize + topk_index_dtype(num_classes).itemsize) + num_temperatures * torch.float32.itemsize


def bytes_per_token(k: int, dtype: torch.dtype = torch.float16, num_temperatures: int = 1) -> int:
    """What a language model's teacher sends per loss token: k log-probabilities in `dtype`, their
    int32 ids, the tail at each temperature and the target's log-probability (float32 each)."""
    return k * (dtype.itemsize + torch.int32.itemsize) + (num_temperatures + 1) * torch.float32.itemsize


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[Union[torch.Tensor, TopK]],
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    denominator: float,
) -> LossTerms:
    """alpha x KD + (1 - alpha) x cross-entropy, summed over samples and divided by `denominator`.

    With no teacher (supervised training) the KD term is absent and alpha is ignored. The teacher
    is dense logits (live pool, or a dense cache) or a `TopK` from a compressed cache.
    Autocast is switched off so softmax, log and the reductions run in fp32 even when the
    forward pass ran in bf16/fp16 (and left alone when it is off: entering the context costs more
    than a small student's loss).
    """
    device_type = student_logits.device.type
    if not torch.is_autocast_enabled(device_type):
        return _distill_loss(student_logits.float(), teacher_logits, labels, temperature, alpha, denominator)
    with torch.autocast(device_type=device_type, enabled=False):
        return _distill_loss(student_logits.float(), teacher_logits, labels, temperature, alpha, denominator)


def _distill_loss(s: torch.Tensor, teacher_logits, labels: torch.Tensor, temperature: float, alpha: float,
                  denominator: float) -> LossTerms:
    ce = F.cross_entropy(s, labels, reduction="none")
    correct = (s.argmax(dim=-1) == labels).sum().detach()
    if teacher_logits is None:  # the loss is the cross-entropy: one sum serves both
        ce_sum = ce.sum()
        return LossTerms(ce_sum / denominator, ce_sum.new_zeros(()), ce_sum.detach(), correct)
    kd_per_sample = sparse_kd_per_sample if isinstance(teacher_logits, TopK) else hinton_kd_per_sample
    kd_sum, ce_sum = kd_per_sample(s, teacher_logits, temperature).sum(), ce.sum()
    # Mixed as sums (the same value as mixing per sample, then summing): fewer ops, each a share of a small student's step
    loss = mix(kd_sum, ce_sum, alpha) / denominator
    return LossTerms(loss, kd_sum.detach(), ce_sum.detach(), correct)


# ---------------------------------------------------------------------------------------------
# Per token: causal-LM distillation


class TokenTerms(NamedTuple):
    loss: torch.Tensor  # what backward() runs on: the summed mix over the tokens, / denominator
    kd_sum: torch.Tensor  # detached sums over the tokens, for logging
    ce_sum: torch.Tensor
    correct: torch.Tensor  # tokens whose top-1 is the target


class Sampled(NamedTuple):
    """On-policy, per token the student sampled: the teacher's and the sampler's log-probability of
    that token at T = 1 (the sampler: the student's weights the rollout was generated from)."""

    teacher_logprob: torch.Tensor  # (N,) fp32
    sample_logprob: torch.Tensor  # (N,) fp32


def take(signal, index):
    """A per-token teacher signal (TopK or Sampled) at some of its tokens (a mask or indices)."""
    return None if signal is None else type(signal)(*(v[index] if isinstance(v, torch.Tensor) else v for v in signal))


def sampled_token_kd(log_p_student: torch.Tensor, teacher: Sampled) -> torch.Tensor:
    """Per sampled token, the reverse-KL estimator of on-policy distillation (Tinker, Fireworks):
    the advantage A = log p_teacher(x) - log q(x) of the sampler q, weighted by the importance
    ratio r = p_student(x) / q(x) (1 for a fresh rollout, and a correction for a stale one):

        loss = -r A,    value (r = 1): log q(x) - log p_teacher(x),    gradient: -r A d log p_student(x)

    so its mean over a student's own samples estimates KL(student || teacher), and its gradient is
    that KL's score-function gradient. A is a constant (no gradient through the teacher or q)."""
    advantage = (teacher.teacher_logprob.float() - teacher.sample_logprob.float()).detach()
    return -(log_p_student - teacher.sample_logprob.float()).exp() * advantage


def _token_chunk_sums(hidden: torch.Tensor, head, targets: torch.Tensor, teacher, temperature: float,
                      alpha: float, divergence: str, beta: float, own: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[loss, kd, ce, correct] summed over one chunk of tokens; its logits live only in here. The
    top-1 count (an argmax over the vocabulary, a tenth of a training chunk's time) is taken only
    outside training, where it is reported; training counts 0. `own` marks the tokens the student
    generated itself (on-policy): their loss is the divergence alone, never a cross-entropy that
    would teach the student its own samples."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = head(hidden).float()
        training = torch.is_grad_enabled() and hidden.requires_grad
        correct = torch.zeros((), device=logits.device) if training else (logits.argmax(dim=-1) == targets).sum().float()
        if teacher is None:
            ce = F.cross_entropy(logits, targets.long(), reduction="sum")
            return torch.stack([ce, torch.zeros_like(ce), ce, correct])
        if isinstance(teacher, Sampled):
            ce = logits.logsumexp(dim=-1) - logits.gather(-1, targets.long()[:, None])[:, 0]
            kd = sampled_token_kd(-ce, teacher)
        else:
            log_p, log_q, lse, s_y = _buckets(logits, teacher, temperature, targets)
            # At T = 1 the buckets' normaliser is the softmax's: no second pass over the vocabulary.
            ce = lse[:, 0] - s_y if temperature == 1.0 else F.cross_entropy(logits, targets.long(), reduction="none")
            kd = bucket_divergence(log_p, log_q, divergence, beta) * temperature**2
        loss = mix(kd, ce, alpha) if own is None else torch.where(own, kd, mix(kd, ce, alpha))
        return torch.stack([loss.sum(), kd.sum(), ce.sum(), correct])


def token_loss(hidden: torch.Tensor, head, targets: torch.Tensor, teacher: Optional[Union[TopK, Sampled]], *, temperature: float,
               alpha: float, denominator: float, divergence: str = "forward", beta: float = 0.5,
               chunk_tokens: int = 1024, own: Optional[torch.Tensor] = None) -> TokenTerms:
    """alpha x KD + (1 - alpha) x CE over the tokens that carry loss, summed and divided by
    `denominator` (the global batch's loss tokens over the world size: kd_ray.batch_plan).

    `hidden` holds the student's last hidden states at those tokens only (N, d), `head` maps
    them to logits over the real vocabulary, `targets` (N,) are the next tokens, `teacher` (N, k)
    the teacher's top-k and tails at `temperature` (or, on-policy, a Sampled: divergence "sampled";
    `own` marks the tokens the student generated). The logits are made chunk by chunk and, while
    training with several chunks, recomputed in the backward pass (activation checkpointing), so the fp32 logits of
    at most `chunk_tokens` tokens exist at any time: with a 50k vocabulary the LM head's output is
    otherwise the largest tensor of a small student's step.
    """
    from torch.utils.checkpoint import checkpoint

    sums = torch.zeros(4, dtype=torch.float32, device=hidden.device)
    # One chunk's logits exist at the loss's peak either way; recomputing them pays only when
    # several chunks would otherwise each keep theirs until the backward pass.
    recompute = torch.is_grad_enabled() and hidden.requires_grad and len(targets) > chunk_tokens
    for a in range(0, len(targets), chunk_tokens):
        part = slice(a, a + chunk_tokens)
        args = (hidden[part], head, targets[part], take(teacher, part), temperature, alpha, divergence, beta,
                None if own is None else own[part])
        if recompute:
            sums = sums + checkpoint(_token_chunk_sums, *args, use_reentrant=False)
        else:
            sums = sums + _token_chunk_sums(*args)
    return TokenTerms(sums[0] / denominator, sums[1].detach(), sums[2].detach(), sums[3].detach())
