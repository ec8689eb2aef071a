"""Causal-LM distillation, token by token.

A row is a fixed-length window of token ids with its shifted targets (IGNORE where no loss), the
index of each token's document and its position in it (kd_ray.data.tokens). The teacher pool
sends, per token that carries loss, its top-k log-probabilities at T=1, their ids, the exact tail
log-mass at the job's temperature and the log-probability of the real next token: never dense
vocabulary-sized rows. The student's loss is computed in chunks of tokens from its last hidden
states (kd_ray.losses.token_loss), averaged over every loss token of the global batch.

Both models see the same rows: positions restart per document, so transformers' attention builds
a block-diagonal causal mask from them (no KV cache), and no token attends across a document.
Both are sliced to the tokenizer's real vocabulary before any softmax (models may pad their
embedding tables past it).
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import nn

from kd_ray.core import storage
from kd_ray.core.columns import (
    DOCS,
    ROLLOUT,
    SAMPLE_LOGPROB,
    TAIL_LSE,
    TARGET_LOGPROB,
    TARGETS,
    TOKEN_POS,
    TOKENS,
    TOPK_INDICES,
    TOPK_VALUES,
)
from kd_ray.core.errors import UserError
from kd_ray.data.token_shards import prepare, token_readers
from kd_ray.data.tokens import PAD_MULTIPLE
from kd_ray.losses import (
    Sampled,
    TokenTerms,
    TopK,
    bytes_per_token,
    take,
    token_loss,
    topk_parts,
)
from kd_ray.models import lm as lms
from kd_ray.models.decoder import decoder_and_head, sliced_head
from kd_ray.models.precision import autocast
from kd_ray.models.weights import STUDENT_DIR, load_into
from kd_ray.spec import JobSpec
from kd_ray.tasks.base import TaskHandle, fmt_score
from kd_ray.tasks.causal_lm_checks import check_lm
from kd_ray.teacher_signal import as_tensor, teacher_output


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, job_dir: str, teacher: str | None):
    return lms.load_tokenizer(name, job_dir, teacher)


class StudentLM(nn.Module):
    """The student with its loss: forward returns a micro-batch's loss terms, so that FSDP2 keeps
    the embeddings and the head gathered through the loss (and its recomputation in backward)."""

    def __init__(self, lm: nn.Module, vocab: int):
        super().__init__()
        self.lm, self.vocab = lm, vocab

    def forward(self, tokens, positions, targets, teacher: TopK | Sampled | None, *, precision: str, temperature: float,
                alpha: float, divergence: str, beta: float, denominator, chunk_tokens: int, own=None) -> TokenTerms:
        """`own` (rows, tokens): the tokens the student generated itself (on-policy), or None."""
        decoder, head = decoder_and_head(self.lm)
        with autocast(precision, tokens.device):  # the decoder in the job's precision; the loss turns it off (fp32)
            hidden = decoder(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state
        keep = targets >= 0
        return token_loss(hidden[keep], sliced_head(head, self.vocab, precision, tokens.device), targets[keep], take(teacher, keep),
                          temperature=temperature, alpha=alpha, denominator=denominator, divergence=divergence, beta=beta,
                          chunk_tokens=chunk_tokens, own=None if own is None else own[keep])


def trim(batch: dict) -> dict:
    """Padded rows cut to their micro-batch's longest row, rounded up to a multiple of 64."""
    used = (batch[DOCS] >= 0).any(dim=0)
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    length = min(batch[DOCS].shape[-1], -(-length // PAD_MULTIPLE) * PAD_MULTIPLE)
    return {k: (v[:, :length] if v.ndim >= 2 and v.shape[1] == batch[DOCS].shape[1] else v) for k, v in batch.items()}


def block_class(model: nn.Module, name: str | None) -> type | None:
    """The class of the model's repeated blocks: `name`, or the class of the largest ModuleList
    whose children all share one class (a transformer's decoder layers)."""
    best: tuple[int, type] | None = None
    for m in model.modules():
        if name is not None and type(m).__name__ == name:
            return type(m)
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > best[0]:
                best = (len(m), type(m[0]))
    return None if name is not None else (best[1] if best else None)


class CausalLM:
    """The Task (kd_ray.tasks.base) of a causal language model."""

    name = "causal_lm"
    unit = "tokens"
    fixed_count = False  # loss tokens per micro-batch are known only once it is read
    prepares = True  # token shards (kd_ray.data.token_shards)
    SCORES = (("perplexity", ".3f", True), ("accuracy", None, True), ("loss", None, False))

    def __init__(self, spec: JobSpec):
        self.spec = spec

    @property
    def handle(self) -> TaskHandle:
        return TaskHandle(self)

    def check(self) -> None:
        """The job's documents, tokenizer, models and cache block, before Ray starts (UserError)."""
        check_lm(self.spec)

    # ---------------------------------------------------------------- rows

    @property
    def tokenizer(self):
        d = self.spec.data
        return _tokenizer(d.tokenizer or "teacher", self.spec.job_dir, self.spec.teacher.model if self.spec.teacher else None)

    @functools.cached_property
    def vocab(self) -> int:
        """The tokenizer's real vocabulary (asked for at every teacher batch: counted once)."""
        return lms.vocab_size(self.tokenizer)

    def readers(self):
        """(train rows, eval rows) from the job's token shards, prepared first where they are not
        yet (kd_ray.data.token_shards): documents are split before they are packed."""
        return token_readers(self.spec, self.tokenizer, self.vocab, lms.tokenizer_digest(self.tokenizer))

    def prepare(self, echo) -> str:
        prepared = prepare(self.spec, self.tokenizer, self.vocab, lms.tokenizer_digest(self.tokenizer), verify=True, echo=echo)
        totals = prepared.manifest["totals"]
        return f"token shards at {storage.shown(prepared.root)}: " + "; ".join(
            f"{split} {t['rows']:,} rows, {t['tokens']:,} tokens ({t['loss_tokens']:,} with loss), {t['bytes'] / 2**20:,.1f} MiB"
            for split, t in totals.items())

    def transform(self, train: bool) -> dict:
        return {"preprocess": None, "augment": None}  # rows are made whole by kd_ray.data.token_shards

    # ---------------------------------------------------------------- models

    def _lm(self, section, gpus: int = 0) -> nn.Module:
        lm = lms.build_lm(section.model, section.kwargs, self.spec.job_dir, self.vocab, gpus)
        if section.weights:
            load_into(lm, section.weights)
        return lm

    def build_student(self, device: torch.device) -> nn.Module:
        torch.manual_seed(self.spec.run.seed)  # the same initial weights on every rank
        return StudentLM(self._lm(self.spec.student), self.vocab).to(device)

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        cls = block_class(model, self.spec.train.fsdp_block)
        return [m for m in model.modules() if cls is not None and type(m) is cls]

    def load_teacher(self, device: torch.device) -> nn.Module:
        """The teacher; an actor holding several GPUs places its layers across them."""
        gpus = int(self.spec.teacher.pool.gpus_per_actor) if device.type == "cuda" else 0
        return self._lm(self.spec.teacher, gpus)

    def teacher_signal(self, model: nn.Module, batch: dict, device: torch.device, precision: str,
                       temperatures: tuple[float, ...], dtype: torch.dtype = torch.float16,
                       target_only: bool = False) -> tuple[torch.Tensor, dict]:
        """(which positions carry loss, and for each of them in row order: its top-k log-probs at
        T=1 in `dtype`, their ids (int32), the exact tail at each temperature, log p(next token));
        `target_only`: log p(next token) alone."""
        tokens, positions = (as_tensor(batch[c]).to(device).long() for c in (TOKENS, TOKEN_POS))
        targets = as_tensor(batch[TARGETS]).to(device).long()
        decoder, head = decoder_and_head(model)
        with torch.inference_mode():
            with autocast(precision, device):
                hidden = decoder(input_ids=tokens, position_ids=positions, use_cache=False).last_hidden_state
            # A teacher placed across GPUs (kd_ray.models.lm.placement_plan) ends on its last one.
            targets = targets.to(hidden.device)
            keep = targets >= 0
            cols = self._signal(hidden[keep], targets[keep], sliced_head(head, self.vocab, precision, hidden.device), temperatures, dtype,
                                target_only)
        return keep, cols

    def teacher_tensors(self, model: nn.Module, batch: dict, device: torch.device, precision: str, for_loss: bool = False) -> dict:
        """Per token that carries loss: top-k log-probs at T=1 (float16), their ids (int32), the
        exact tail at the job's temperature, and log p(next token); zeros elsewhere (row-shaped,
        as the pool sends them). `for_loss`: training rows, for the loss alone: the sampled-token
        loss takes log p(sampled token) only (4 bytes a token, not the top-k's 392 at k = 64)."""
        target_only = for_loss and self.spec.distill.loss == "sampled_token"
        keep, cols = self.teacher_signal(model, batch, device, precision, (float(self.spec.distill.temperature),),
                                         target_only=target_only)
        out = {}
        for name, values in cols.items():
            full = torch.zeros((*keep.shape, *values.shape[1:]), dtype=values.dtype, device=keep.device)
            full[keep] = values
            out[name] = full
        return out

    def _signal(self, hidden: torch.Tensor, targets: torch.Tensor, head, temperatures: tuple[float, ...],
                dtype: torch.dtype, target_only: bool = False) -> dict[str, torch.Tensor]:
        """The columns of teacher_signal, a chunk of distill.chunk_tokens positions of logits at a time."""
        d = self.spec.distill
        k = d.top_k
        parts = []
        for a in range(0, len(targets), d.chunk_tokens):
            logits = head(hidden[a:a + d.chunk_tokens]).float()
            if target_only:
                topk, lse = (), logits.logsumexp(-1)
            else:
                values, indices, tails, lse = topk_parts(logits, k, temperatures)
                topk = (values.clamp(min=torch.finfo(dtype).min).to(dtype), indices.int(), tails)
            parts.append((*topk, logits.gather(-1, targets[a:a + d.chunk_tokens, None])[:, 0] - lse))
        if not parts:  # no position to score: empty columns of the same shapes
            topk = () if target_only else (torch.zeros((0, k), dtype=dtype), torch.zeros((0, k), dtype=torch.int32),
                                           torch.zeros((0, len(temperatures))))
            parts = [(*topk, torch.zeros(0))]
        names = (TARGET_LOGPROB,) if target_only else (TOPK_VALUES, TOPK_INDICES, TAIL_LSE, TARGET_LOGPROB)
        return {n: torch.cat([p[i].to(hidden.device) for p in parts]) for i, n in enumerate(names)}

    # ---------------------------------------------------------------- training

    def count(self, batch: dict) -> torch.Tensor:
        return (batch[TARGETS] >= 0).sum().double()

    def _terms(self, model, batch: dict, teacher, denominator, alpha: float, divergence: str | None = None) -> TokenTerms:
        d, t = self.spec.distill, self.spec.train
        # On-policy, a row the student generated (ROLLOUT: the weights version it came from) is
        # trained on the divergence alone: a cross-entropy would teach the student its own samples.
        own = (batch[ROLLOUT] >= 0)[:, None].expand_as(batch[TARGETS]) if ROLLOUT in batch else None
        return model(batch[TOKENS].long(), batch[TOKEN_POS].long(), batch[TARGETS].long(), teacher, precision=t.precision,
                     temperature=d.temperature, alpha=alpha, divergence=divergence or d.divergence, beta=d.beta,
                     denominator=denominator, chunk_tokens=d.chunk_tokens, own=own)

    def signal(self, batch: dict) -> TopK | Sampled | None:
        """What the student distills from: the teacher's top-k (kd_ray.teacher_signal), or, for the
        sampled-token loss, the teacher's and the sampler's log-probabilities of each sampled token."""
        if self.spec.distill.loss == "sampled_token":
            return Sampled(batch[TARGET_LOGPROB], batch[SAMPLE_LOGPROB])
        return teacher_output(batch, self.spec.distill.temperature)

    def trimmed(self, batch: dict) -> dict:
        """Padded rows cut to the micro-batch's longest (with the teacher's signal, which is per token too)."""
        return trim(batch) if self.spec.data.packing == "pad" else batch

    def micro_step(self, model, batch: dict, denominator, device: torch.device, scaler) -> TokenTerms:
        batch = self.trimmed(batch)
        teacher = self.signal(batch)
        alpha = self.spec.distill.alpha if teacher is not None else 0.0
        terms = self._terms(model, batch, teacher, denominator, alpha)
        (scaler.scale(terms.loss) if scaler else terms.loss).backward()
        return terms

    @torch.no_grad()
    def eval_sums(self, model, batches, device: torch.device) -> torch.Tensor:
        """[cross-entropy sum, top-1 correct, tokens] of the student over the data's rows, then, over
        the rows it generated itself (on-policy evaluation: kd_ray.rollouts), [reverse KL over the
        teacher's k+1 buckets, the teacher's NLL of the sampled tokens, the sampled-token estimate
        of the reverse KL (log p_student - log p_teacher), generated tokens]."""
        sums = torch.zeros(7, dtype=torch.float64, device=device)
        model.eval()
        try:
            for batch in batches:
                own = batch[ROLLOUT] >= 0 if ROLLOUT in batch else None
                data = batch if own is None else {k: v[~own] for k, v in batch.items()}  # off-policy: no copy
                if len(data[TARGETS]):
                    terms = self._terms(model, self.trimmed(data), None, 1.0, 0.0)
                    sums[:3] += torch.stack([terms.ce_sum.double(), terms.correct.double(), self.count(data).to(device)])
                if own is not None and bool(own.any()):
                    sums[3:] += self._rollout_sums(model, self.trimmed({k: v[own] for k, v in batch.items()}), device)
        finally:
            model.train()
        return sums

    def _rollout_sums(self, model, batch: dict, device: torch.device) -> torch.Tensor:
        """The student's own samples, as the teacher scored them (at distill.temperature): see eval_sums."""
        terms = self._terms(model, batch, teacher_output(batch, self.spec.distill.temperature), 1.0, 1.0, divergence="reverse")
        teacher_logprob = batch[TARGET_LOGPROB][batch[TARGETS] >= 0].double().sum()
        return torch.stack([terms.kd_sum.double(), -teacher_logprob, -terms.ce_sum.double() - teacher_logprob,
                            self.count(batch).to(device)])

    def teacher_eval_sums(self, batches, device: torch.device) -> torch.Tensor:
        """[cross-entropy sum, top-1 correct, tokens, top-k mass sum] of the teacher, from what it sent."""
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for b in batches:
            keep = b[TARGETS] >= 0
            if ROLLOUT in b:  # the data's own rows: the student's rollouts say nothing of the teacher
                keep &= (b[ROLLOUT] < 0)[:, None]
            values = b[TOPK_VALUES][keep].float()
            sums += torch.stack([-b[TARGET_LOGPROB][keep].double().sum(),
                                 (b[TOPK_INDICES][keep][:, 0].long() == b[TARGETS][keep].long()).sum().double(),
                                 keep.sum().double(), values.exp().sum().double()])
        return sums

    def teacher_figures(self, sums: list[float]) -> dict:
        loss, correct, count, mass = sums
        mean = loss / max(count, 1)
        return {"perplexity": math.exp(min(mean, 50.0)), "loss": mean, "accuracy": correct / max(count, 1),
                "topk_mass": mass / max(count, 1)}

    def teacher_line(self, scores: dict) -> str:
        return (f"ppl {scores['perplexity']:.3f} acc {scores['accuracy']:.4f} loss {fmt_score(scores['loss'])} "
                f"top-{self.spec.distill.top_k} mass {scores['topk_mass']:.4f}")

    def figures(self, sums: list[float]) -> dict:
        loss, correct, count, reverse_kl, teacher_nll, sampled_kl, generated = sums
        mean = loss / max(count, 1)
        out = {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_accuracy": correct / max(count, 1),
               "eval_tokens": int(count)}
        if generated:  # on-policy: the student's own samples of held-out prompts, as the teacher scores them
            out.update(eval_reverse_kl=reverse_kl / generated, eval_teacher_nll=teacher_nll / generated,
                       eval_sampled_kl=sampled_kl / generated, eval_generated_tokens=int(generated))
        return out

    def run_figures(self, trains: list[dict]) -> dict:
        """The run's loss tokens per second (steady windows) and what the teacher sends per token."""
        steady = [e for e in trains if not e.get("startup")] or trains
        seconds = sum(e["window_seconds"] for e in steady)
        rate = sum(e["samples_per_second"] * e["window_seconds"] for e in steady) / seconds if seconds else None
        k = self.spec.distill.top_k
        per_token = None
        if self.spec.runs_teacher_pool:  # float16 values, as the pool sends them; the sampled-token loss's one float32
            per_token = torch.float32.itemsize if self.spec.distill.loss == "sampled_token" else bytes_per_token(k)
        return {"tokens_per_second": round(rate, 1) if rate else None, "teacher_bytes_per_token": per_token}

    # ---------------------------------------------------------------- export

    def exported(self, run_dir: str) -> str:
        return storage.join(run_dir, STUDENT_DIR)

    def check_exported(self, path: str, field: str) -> None:
        if not storage.exists(storage.join(path, "config.json")):
            raise UserError(field, f"{path} is not a Hugging Face model directory (no config.json); pass the student directory a run exported")

    def load_exported(self, path: str) -> nn.Module:
        """A Hugging Face directory, as `export` writes it."""
        from transformers import AutoModelForCausalLM

        with storage.local_copy(path) as local:  # a directory, or a run's student/ in a bucket
            return StudentLM(AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32), self.vocab)

    def export(self, directory: str, state_dict: dict) -> None:
        """A Hugging Face model directory (config, safetensors, tokenizer) at directory/student."""
        lm = lms.build_lm(self.spec.student.model, self.spec.student.kwargs, self.spec.job_dir, self.vocab)
        lm.load_state_dict({k.removeprefix("lm."): v for k, v in state_dict.items()})
        out = os.path.join(directory, STUDENT_DIR)
        lm.config.use_cache = True  # for generation by whoever loads it
        lm.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
