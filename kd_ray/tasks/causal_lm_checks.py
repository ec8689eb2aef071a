"""Checks of a causal-LM job that need its files: the documents' columns, the tokenizer, the
teacher's and the student's configurations. Each mistake is one UserError naming the field."""

from __future__ import annotations

import os

from kd_ray.core import storage
from kd_ray.core.errors import UserError
from kd_ray.core.imports import import_callable
from kd_ray.data.text import first_documents
from kd_ray.models import lm as lms
from kd_ray.spec import JobSpec
from kd_ray.tasks.cache_checks import (
    check_cache_path,
    check_cache_temperatures,
    need_cache_block,
)


def check_lm(spec: JobSpec) -> None:
    d = spec.data
    _check_columns(spec)
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
            _check_model(spec, name, section, tokenizer, vocab)
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


def _check_source(source: str, spec: JobSpec, field: str) -> None:
    """The source's files are there and its first piece's documents hold the job's columns, of
    the right types (kd_ray.data.text checks every other document as it prepares it)."""
    docs = first_documents(source, spec.data, field)
    if not docs:
        raise UserError(field, f"{storage.shown(source)} holds no documents; point {field} at data with at least one")


def _tokenizer(spec: JobSpec):
    name = spec.data.tokenizer or "teacher"
    try:
        return lms.load_tokenizer(name, spec.job_dir, spec.teacher.model if spec.teacher else None)
    except lms.LMError as e:
        field, _, message = str(e).partition(": ")
        raise UserError("data.tokenizer" if field == "data.tokenizer" else "teacher.model", message or str(e)) from None
    except Exception as e:
        raise UserError("data.tokenizer", f"cannot load {name}: {type(e).__name__}: {e}") from None


def _config(spec: JobSpec, name: str, section, vocab: int):
    """The model's configuration, without building its weights."""
    try:
        kind, _ = lms.locate(section.model, spec.job_dir)
        if kind == "llama":
            from transformers import LlamaConfig

            return LlamaConfig(**{"vocab_size": vocab, **section.kwargs})
        if kind == "import":
            import_callable(section.model, spec.job_dir)
            return None
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(lms.model_dir(section.model, spec.job_dir))
    except lms.LMError as e:
        raise UserError(f"{name}.model", str(e)) from None
    except Exception as e:  # a user's module, or a model directory that does not load
        raise UserError(f"{name}.model", f"cannot load {section.model}: {type(e).__name__}: {e}") from None


def _check_model(spec: JobSpec, name: str, section, tokenizer, vocab: int) -> None:
    config = _config(spec, name, section, vocab)
    if config is not None and config.vocab_size < vocab:
        raise UserError(f"{name}.model" if name == "teacher" else "student.kwargs",
                        f"{section.model} has {config.vocab_size} vocabulary rows but the tokenizer has {vocab} tokens; "
                        "give it a vocab_size of at least that (rows past the tokenizer are sliced off)")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and spec.data.max_seq_len > positions:
        raise UserError("data.max_seq_len", f"{spec.data.max_seq_len} is more than {name} {section.model} has positions "
                        f"for ({positions}); use at most {positions}")
    own = lms.model_tokenizer(section.model, spec.job_dir) if name == "teacher" else None
    if own is not None and lms.tokenizer_digest(own) != lms.tokenizer_digest(tokenizer):
        raise UserError("data.tokenizer", f"{spec.data.tokenizer} is not the tokenizer {section.model} was trained with "
                        "(their vocabularies or merges differ); use data.tokenizer: teacher")
    if section.weights and storage.is_remote(section.weights):
        storage.need_object(section.weights, f"{name}.weights", "fix the URI")
    elif section.weights and not os.path.isfile(section.weights):
        raise UserError(f"{name}.weights", f"{section.weights} does not exist; fix the path")


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
