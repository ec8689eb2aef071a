"""Checks of a causal-LM job that need its files: the documents' columns, the tokenizer, the
teacher's and the student's configurations. Each mistake is one UserError naming the field."""

from __future__ import annotations

import os

from kd_ray.core.errors import UserError, clip, shown
from kd_ray.data.text import BUILTIN_TEXTS, columns_of, field_of
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
    _check_source(d.source, spec, "data.source")
    if d.eval_source:
        _check_source(d.eval_source, spec, "data.eval_source")
    if d.tokenizer is None and spec.teacher is None:
        raise UserError("data.tokenizer", "a job with no teacher needs a tokenizer: a tokenizer.json or a directory holding one")
    tokenizer = _tokenizer(spec)
    vocab = lms.vocab_size(tokenizer)
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
    given = [n for n, v in (("text", d.text), ("prompt", d.prompt), ("tokens", d.tokens)) if v is not None]
    if len(given) > 1:
        raise UserError(f"data.{given[1]}", f"give one of data.text, data.prompt + data.response or data.tokens, not {' and '.join(given)}")
    if spec.data.augment.active:
        raise UserError("data.augment", "augmentation is for images; remove it for task: causal_lm")
    for name in CLASSIFIER_DATA_FIELDS:
        if name in d.model_fields_set:
            raise UserError(f"data.{name}", "only applies to task: classify (a language model reads data.text, data.prompt + "
                            "data.response or data.tokens); remove it")


def _check_source(source: str, spec: JobSpec, field: str) -> None:
    if source.startswith("builtin:"):
        if source.removeprefix("builtin:") not in BUILTIN_TEXTS:
            raise UserError(field, f"unknown built-in text '{source}'; available: {', '.join('builtin:' + b for b in BUILTIN_TEXTS)}")
        return
    if not os.path.exists(source):
        raise UserError(field, f"{source} does not exist; fix the path (relative paths start at the job file's directory)")
    columns = _columns(source, field)
    for column in columns_of(spec.data):
        if column not in columns:
            raise UserError(f"data.{field_of(spec.data, column)}", f"no column '{column}' in {os.path.basename(source)}; it has: {', '.join(columns)}")
        _check_type(spec, column, columns[column], source)


def _columns(source: str, field: str) -> dict:
    """The source's columns, each with what a first read tells of its type: a JSON-lines file's
    first document's value, a parquet source's arrow type (from the schema, no rows read)."""
    import json

    try:
        if source.endswith((".jsonl", ".json")):
            with open(source) as f:
                first = next((line for line in f if line.strip()), None)
            if first is None:
                raise UserError(field, f"{source} holds no documents; point {field} at data with at least one")
            document = json.loads(first)
            if not isinstance(document, dict):
                raise UserError(field, f"the first line of {source} is a JSON {type(document).__name__}, not an object; write "
                                'one object per line, e.g. {"text": "..."}')
            return document
        import pyarrow.dataset as pads

        dataset = pads.dataset(source, format="parquet")
        if not dataset.files or not dataset.count_rows():
            raise UserError(field, f"{source} holds no documents (no parquet rows); point {field} at data with at least one")
        return {f.name: f.type for f in dataset.schema}
    except UserError:
        raise
    except Exception as e:  # a file that is not what its name says
        raise UserError(field, f"cannot read {source}: {type(e).__name__}: {e}") from None


def _check_type(spec: JobSpec, column: str, found, source: str) -> None:
    """A column of text holds strings and one of tokens lists of integers: known from the schema
    or the first document, before a run tokenizes anything."""
    import pyarrow as pa

    tokens = column == spec.data.tokens
    if isinstance(found, pa.DataType):
        ok = (pa.types.is_list(found) or pa.types.is_large_list(found)) and pa.types.is_integer(found.value_type) if tokens \
            else pa.types.is_string(found) or pa.types.is_large_string(found)
        what = f"column '{column}' of {os.path.basename(source)} is of type {found}"
    else:
        ok = isinstance(found, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in found) if tokens \
            else isinstance(found, str)
        what = f"the first document of {os.path.basename(source)} holds {shown(found, 60)} in column '{column}'"
    if not ok:
        need = "a list of token ids (integers)" if tokens else "text (a string)"
        raise UserError(f"data.{field_of(spec.data, column)}", f"{what}: it must hold {need}; fix the data or name another column")


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
