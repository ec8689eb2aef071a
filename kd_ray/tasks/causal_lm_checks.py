"""Checks of a causal-LM job that need its files: the documents' columns, the tokenizer, the
teacher's and the student's configurations. Each mistake is one UserError naming the field."""

from __future__ import annotations

from kd_ray.core import storage
from kd_ray.core.errors import UserError, clip
from kd_ray.data.text import first_documents
from kd_ray.models import lm as lms
from kd_ray.spec import JobSpec
from kd_ray.tasks.cache_checks import (
    check_cache_path,
    check_cache_temperatures,
    need_cache_block,
)
from kd_ray.tasks.causal_lm_models import check_lm_model

# A classifier's data fields, which a language model's reader never looks at.
CLASSIFIER_DATA_FIELDS = ("features", "labels", "shape", "num_classes", "preprocess")


def check_lm(spec: JobSpec) -> None:
    d = spec.data
    _check_columns(spec)
    check_onpolicy(spec)
    _check_source(d.source, spec, "data.source")
    if d.eval_source:
        _check_source(d.eval_source, spec, "data.eval_source")
    if d.tokenizer is None and spec.teacher is None:
        raise UserError("data.tokenizer", "a job with no teacher needs a tokenizer: a tokenizer.json or a directory holding one")
    tokenizer = _tokenizer(spec)
    vocab = lms.vocab_size(tokenizer)
    if (d.messages or d.chat_template) and not getattr(tokenizer, "chat_template", None):
        field = "data.messages" if d.messages else "data.chat_template"
        raise UserError(field, f"the tokenizer ({d.tokenizer or 'the teacher'}'s) has no chat template to render conversations with; "
                        "use an instruction-tuned model's tokenizer, or give the data as data.text or data.prompt + data.response")
    if spec.distill.top_k > vocab:
        raise UserError("distill.top_k", f"{spec.distill.top_k} is more than the tokenizer's {vocab} tokens; use at most {vocab}")
    for name in ("teacher", "student"):
        section = getattr(spec, name)
        if section is not None:
            check_lm_model(spec, name, section, tokenizer, vocab)
    if spec.teacher is not None and spec.teacher.cached:
        need_cache_block(spec)
    if spec.teacher is not None and spec.teacher.cache is not None:
        check_token_cache(spec)


def _check_columns(spec: JobSpec) -> None:
    d = spec.data
    if (d.prompt is None) != (d.response is None):
        have, missing = ("prompt", "response") if d.response is None else ("response", "prompt")
        raise UserError(f"data.{missing}", f"data.{have} needs data.{missing} too: the loss covers the response tokens that follow each prompt")
    given = [n for n, v in (("text", d.text), ("prompt", d.prompt), ("messages", d.messages), ("tokens", d.tokens)) if v is not None]
    if len(given) > 1:
        raise UserError(f"data.{given[1]}", "give one of data.text, data.prompt + data.response, data.messages or data.tokens, "
                        f"not {' and '.join(given)}")
    if d.chat_template and d.prompt is None:
        raise UserError("data.chat_template", "renders data.prompt + data.response as a conversation; give those columns (data.messages "
                        "is rendered with the template anyway), or remove data.chat_template")
    if spec.data.augment.active:
        raise UserError("data.augment", "augmentation is for images; remove it for task: causal_lm")
    for name in CLASSIFIER_DATA_FIELDS:
        if name in d.model_fields_set:
            raise UserError(f"data.{name}", "only applies to task: classify (a language model reads data.text, data.prompt + "
                            "data.response or data.tokens); remove it")


def _check_source(source: str | list[str], spec: JobSpec, field: str) -> None:
    """The source's files are there and its first piece's documents hold the job's columns, of
    the right types (kd_ray.data.text checks every other document as it prepares it)."""
    docs = first_documents(source, spec.data, field)
    if not docs:
        what = storage.shown(source) if isinstance(source, str) else "its files"
        raise UserError(field, f"{what} holds no documents; point {field} at data with at least one")


def _tokenizer(spec: JobSpec):
    name = spec.data.tokenizer or "teacher"
    # The teacher's own tokenizer is read from the teacher's files: one that does not load (not a
    # GGUF, a cut-off config.json) is the teacher's to fix, not data.tokenizer's.
    field = "teacher.model" if name == "teacher" else "data.tokenizer"
    try:
        return lms.load_tokenizer(name, spec.job_dir, spec.teacher.model if spec.teacher else None)
    except lms.LMError as e:
        raise UserError(e.field or "teacher.model", str(e)) from None
    except Exception as e:
        shown_name = spec.teacher.model if name == "teacher" and spec.teacher else name
        raise UserError(field, f"cannot load {shown_name}: {type(e).__name__}: {clip(str(e), 300)}; "
                        + ("fix or replace the model's files" if name == "teacher" else "give a tokenizer.json or a directory holding one")) from None


def check_token_cache(spec: JobSpec) -> None:
    """A language model's cache holds the teacher's top-k per token (kd_ray.cache.tokens)."""
    cache = spec.teacher.cache
    if cache.format != "topk":
        raise UserError("teacher.cache.format", "a language model's cache holds the teacher's top-k per token (a full row of "
                        "its vocabulary would cost ~100 KB a token); use format: topk, or leave it out")
    if cache.k is not None and cache.k != spec.distill.top_k:
        raise UserError("teacher.cache.k", f"{cache.k} is not distill.top_k ({spec.distill.top_k}): a language model's cache keeps "
                        "distill.top_k log-probabilities per token; remove teacher.cache.k and set distill.top_k")
    check_cache_path(cache.path)
    check_cache_temperatures(spec)


def check_onpolicy(spec: JobSpec) -> None:
    """An on-policy job's settings (kd_ray.rollouts), before anything is read."""
    o, d, loss = spec.onpolicy, spec.data, spec.distill.loss
    if o is None:
        if loss == "sampled_token":
            raise UserError("distill.loss", "sampled_token scores the student's own samples; add an onpolicy section, or use "
                            "forward_kl, reverse_kl or jsd")
        return
    if spec.teacher is None:
        raise UserError("onpolicy", "the teacher scores the student's generated tokens; add a teacher section, or remove onpolicy")
    if spec.teacher.cached:
        raise UserError("teacher.mode", "a cache holds the teacher's outputs for the data's tokens, not for the student's samples; "
                        "use teacher.mode: online for on-policy (a cached run can distill the student off-policy first)")
    if d.packing != "pad":
        raise UserError("data.packing", "on-policy, a row is one prompt and its rollout; use data.packing: pad")
    prompts = d.prompt is not None or d.messages is not None
    if prompts and o.prompt_tokens is not None:
        raise UserError("onpolicy.prompt_tokens", "the data's prompts are the tokens before each response; remove "
                        "onpolicy.prompt_tokens (it cuts prompts from data.text or data.tokens)")
    if not prompts and o.prompt_tokens is None:
        raise UserError("onpolicy.prompt_tokens", "data.text and data.tokens have no prompts; set onpolicy.prompt_tokens: N (a row's "
                        "first N tokens are its prompt), or give data.prompt + data.response or data.messages")
    if o.max_new_tokens >= d.max_seq_len:
        raise UserError("onpolicy.max_new_tokens", f"{o.max_new_tokens} leaves no room for a prompt in data.max_seq_len "
                        f"({d.max_seq_len}); use at most {d.max_seq_len - 1}, or raise data.max_seq_len")
    if o.prompt_tokens is not None and o.prompt_tokens >= d.max_seq_len:
        raise UserError("onpolicy.prompt_tokens", f"{o.prompt_tokens} leaves no room to generate in data.max_seq_len ({d.max_seq_len}); "
                        f"use at most {d.max_seq_len - 1}")
    if o.sync_every > o.max_staleness + 1:
        raise UserError("onpolicy.sync_every", f"weights published every {o.sync_every} steps would be up to {o.sync_every - 1} steps "
                        f"old, more than onpolicy.max_staleness ({o.max_staleness}); use sync_every <= max_staleness + 1")
    if loss == "sampled_token" and o.fraction < 1:
        raise UserError("distill.loss", "sampled_token scores the student's own samples only, and onpolicy.fraction "
                        f"({o.fraction}) leaves some rows to the data's responses; set onpolicy.fraction: 1, or use reverse_kl or jsd")
    if loss == "sampled_token" and (o.temperature != 1.0 or o.top_p < 1.0):
        field = "onpolicy.temperature" if o.temperature != 1.0 else "onpolicy.top_p"
        raise UserError(field, "sampled_token weighs each sampled token by its log-probability under the student at T = 1, which "
                        "is the sampler's only with onpolicy.temperature: 1.0 and top_p: 1.0; set them, or use reverse_kl or jsd")
    if loss == "sampled_token" and spec.distill.temperature != 1.0:
        raise UserError("distill.temperature", "sampled_token compares the student's and the teacher's log-probabilities at T = 1; "
                        "set distill.temperature: 1.0 (onpolicy.temperature sets the sampling temperature)")
