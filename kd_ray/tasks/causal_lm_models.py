"""A causal-LM job's models, checked before Ray starts: each built on the meta device (no memory,
no weights read) as the workers will build it, its kwargs all used, its attention heads in
groups its key-value heads divide, its vocabulary and positions enough for the data, and its
weights file fitting it tensor by tensor. Each mistake is one UserError naming the field."""

from __future__ import annotations

import difflib

import torch

from kd_ray.core.errors import UserError, clip, shown
from kd_ray.core.imports import ModelNameError, check_kwargs, import_callable
from kd_ray.models import lm as lms
from kd_ray.models.weights import check_weights_file
from kd_ray.spec import JobSpec, ModelSpec


def check_lm_model(spec: JobSpec, name: str, section: ModelSpec, tokenizer, vocab: int) -> None:
    model = _skeleton(spec, name, section, vocab)
    config = getattr(model, "config", None)
    rows = getattr(config, "vocab_size", None)
    if rows is not None and rows < vocab:
        raise UserError(f"{name}.model" if name == "teacher" else "student.kwargs",
                        f"{section.model} has {rows} vocabulary rows but the tokenizer has {vocab} tokens; "
                        "give it a vocab_size of at least that (rows past the tokenizer are sliced off)")
    _check_heads(name, section, config)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and spec.data.max_seq_len > positions:
        raise UserError("data.max_seq_len", f"{spec.data.max_seq_len} is more than {name} {section.model} has positions "
                        f"for ({positions}); use at most {positions}")
    own = lms.model_tokenizer(section.model, spec.job_dir) if name == "teacher" else None
    if own is not None and lms.tokenizer_digest(own) != lms.tokenizer_digest(tokenizer):
        raise UserError("data.tokenizer", f"{spec.data.tokenizer} is not the tokenizer {section.model} was trained with "
                        "(their vocabularies or merges differ); use data.tokenizer: teacher")
    if section.weights:
        check_weights_file(section.weights, f"{name}.weights", model, section.model,
                           "fix the path, or give weights saved from this model with these kwargs")


def _skeleton(spec: JobSpec, name: str, section: ModelSpec, vocab: int):
    """The model on the meta device, after its kwargs are known to be used."""
    try:
        kind, _ = lms.locate(section.model, spec.job_dir)
    except lms.LMError as e:
        raise UserError(e.field or f"{name}.model", str(e)) from None
    if kind in ("hf", "gguf") and section.kwargs:
        raise UserError(f"{name}.kwargs", f"{section.model} is a pretrained model, built from its own config.json: kwargs "
                        f"{shown(sorted(section.kwargs))} would be ignored; remove {name}.kwargs")
    if kind == "llama":
        _refuse_unused_llama_keys(name, section.kwargs, vocab)
    if kind == "import":
        try:
            check_kwargs(section.model, import_callable(section.model, spec.job_dir), section.kwargs)
        except ModelNameError as e:
            raise UserError(f"{name}.model", str(e)) from None
    try:
        model = lms.skeleton(section.model, section.kwargs, spec.job_dir, vocab)
    except lms.LMError as e:
        raise UserError(e.field or f"{name}.model", str(e)) from None
    except (Exception, SystemExit) as e:  # a user's factory, kwargs of impossible sizes, a model directory that does not load
        where = f"{name}.kwargs" if section.kwargs and kind in ("llama", "import") else f"{name}.model"
        raise UserError(where, f"cannot build {section.model}({shown(section.kwargs)}): {type(e).__name__}: "
                        f"{clip(str(e), 300)}; fix {where}") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{name}.model", f"{section.model} returned {clip(type(model).__name__, 60)}, not a torch.nn.Module; "
                        "the factory must build and return a causal language model")
    return model


def _refuse_unused_llama_keys(name: str, kwargs: dict, vocab: int) -> None:
    """LlamaConfig keeps any key it is given as an attribute no layer reads: a typo would train
    the default size without a word."""
    from transformers import LlamaConfig

    known = set(LlamaConfig().to_dict())
    try:
        made = set(lms.llama_config(vocab, **kwargs).to_dict())
    except Exception as e:
        raise UserError(f"{name}.kwargs", f"not a llama configuration: {type(e).__name__}: {clip(str(e), 300)}") from None
    for key in kwargs:
        if key not in known and key in made:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else "see transformers.LlamaConfig for the fields"
            raise UserError(f"{name}.kwargs", f"'{clip(key, 60)}' is not a field of llama's configuration, so it would be "
                            f"ignored; {fix}")


def _check_heads(name: str, section: ModelSpec, config) -> None:
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        field = f"{name}.kwargs" if section.kwargs else f"{name}.model"
        raise UserError(field, f"num_key_value_heads {kv} does not divide num_attention_heads {heads} (each key-value head "
                        f"serves an equal group of attention heads); use a divisor of {heads}")
