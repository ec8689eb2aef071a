"""A language model's teacher outputs in cache shards, per token (kd_ray.cache says how a cache
is captured, checked and read; this module, what a causal-LM shard holds).

A shard holds one unit of token rows (a row group of kd_ray.data.token_shards: 16k tokens), one parquet
row per token row:

    id, row, input_digest   the row's stable id, its place in the unit, and a 64-bit digest of
                            everything the row is (tokens, targets, documents, positions)
    tokens                  the row's token ids (uint16 when the vocabulary fits, else int32)
    loss_mask               which positions carry loss (target >= 0); only those have outputs:
    topk_logprobs           per loss position, the teacher's k largest log-probabilities at T=1,
                            descending, in the cache's dtype, delta-coded (below)
    topk_ids                their token ids (uint16 when the vocabulary fits, else int32)
    tail_lse                the exact log-mass outside the top k, per cached temperature (fp32)
    target_logprob          the teacher's log-probability of the real next token (fp32)

The log-probabilities are what the online pool sends, bit for bit; they are stored as their
bits' differences along each position's k values. Log-probabilities are <= 0 and descending, so
as sign-magnitude bit patterns they only grow: the differences are small numbers whose high
bytes are zero, and parquet's byte-stream split + zstd all but removes them. The coding is
lossless (uint arithmetic, wrapping), so a cached run gets exactly the values an online run
gets. Measured on SmolLM2-135M's outputs over the King James Bible (49,152 tokens): 161 bytes
per loss token at k=64, of which ids 115, values 39, tail and target 7 (tests/test_lm_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kd_ray.cache.files import read_table
from kd_ray.core.columns import (
    DOCS,
    ID,
    INPUT,
    ROW,
    TAIL_LSE,
    TARGET_LOGPROB,
    TARGETS,
    TOKEN_POS,
    TOKENS,
    TOPK_INDICES,
    TOPK_VALUES,
)
from kd_ray.core.hashing import file_sha256, input_digests
from kd_ray.data.sources import to_numpy
from kd_ray.losses import bytes_per_token, tail_column
from kd_ray.models import lm as lms
from kd_ray.spec import LM_ROW_FIELDS, cache_temperatures
from kd_ray.teacher import placed_teacher

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from kd_ray.spec import JobSpec

MASK, VALUES, IDS, TAILS, TARGET = "loss_mask", "topk_logprobs", "topk_ids", "tail_lse", "target_logprob"
# The data fields a cache's rows are a function of; the tokenizer is named by its digest.
_ROWS = tuple(f for f in LM_ROW_FIELDS if f != "tokenizer")
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def id_dtype(vocab: int) -> np.dtype:
    """Token ids on disk: uint16 when every id fits (SmolLM2's 49,152, GPT-2's 50,257), else
    int32 (Qwen's 151k, Gemma's 256k)."""
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.int32)


def delta_code(bits: np.ndarray) -> np.ndarray:
    """Each row's unsigned bit patterns as differences from the value before (the first as is)."""
    out = bits.copy()
    out[:, 1:] -= bits[:, :-1]  # unsigned: wraps, and the cumulative sum wraps back
    return out


def delta_decode(codes: np.ndarray) -> np.ndarray:
    return np.cumsum(codes, axis=1, dtype=codes.dtype)


def value_bits(values: torch.Tensor) -> np.ndarray:
    """Log-probabilities as unsigned bit patterns of their width."""
    unsigned = {2: np.uint16, 4: np.uint32}[values.element_size()]
    return values.contiguous().view({2: torch.int16, 4: torch.int32}[values.element_size()]).numpy().view(unsigned)


def row_digests(raw: dict) -> np.ndarray:
    """A digest of each token row as the reader gives it: what ties a cached row to its data."""
    return input_digests(np.concatenate([np.asarray(raw[c], dtype=np.int32) for c in (TOKENS, TARGETS, DOCS, TOKEN_POS)], axis=1))


def token_table(raw: dict, signal: dict[str, torch.Tensor], vocab: int) -> "pa.Table":
    """One unit's token rows and the teacher's outputs at their loss positions (row-major)."""
    import pyarrow as pa

    mask = np.asarray(raw[TARGETS]) >= 0
    rows, seq = mask.shape
    starts = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)

    def listed(values: np.ndarray) -> pa.Array:  # per row, the values of its loss positions
        width = int(np.prod(values.shape[1:], dtype=np.int64))
        return pa.ListArray.from_arrays(pa.array(starts * width, pa.int32()), pa.array(np.ascontiguousarray(values).reshape(-1)))

    ids = id_dtype(vocab)
    return pa.table({
        ID: pa.array(np.asarray(raw[ID], dtype=np.int64)), ROW: pa.array(np.arange(rows, dtype=np.int32)),
        INPUT: pa.array(row_digests(raw)),
        TOKENS: pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(raw[TOKENS]).astype(ids).reshape(-1)), seq),
        MASK: pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), seq),
        VALUES: listed(delta_code(value_bits(signal[TOPK_VALUES].cpu()))),
        IDS: listed(signal[TOPK_INDICES].cpu().numpy().astype(ids)),
        TAILS: listed(signal[TAIL_LSE].float().cpu().numpy()),
        TARGET: listed(signal[TARGET_LOGPROB].float().cpu().numpy()),
    })


@dataclass
class TokenUnit:
    """One shard's rows in memory, compact: outputs only at loss positions, ids as stored."""

    ids: np.ndarray  # (rows,)
    digests: np.ndarray  # (rows,)
    mask: np.ndarray  # (rows, seq) bool
    starts: np.ndarray  # (rows + 1,): row r's loss positions are [starts[r], starts[r + 1])
    values: np.ndarray  # (N, k): float16 / float32, or bfloat16 as its uint16 bits
    indices: np.ndarray  # (N, k) as stored
    tails: np.ndarray  # (N, 1) fp32: the job's temperature's column
    target: np.ndarray  # (N,) fp32


class TokenCodec:
    """What a causal-LM cache holds and how it is compared, written and read (the methods'
    contract: kd_ray.cache)."""

    unit = "token"
    # (job-file field, manifest section, key), in the order a difference is reported. The rows'
    # digest (the data section, kd_ray.cache) would catch all of the inputs too; these name the field.
    CHECKED = (
        ("teacher.model", "teacher", "model"), ("teacher.kwargs", "teacher", "kwargs"),
        ("teacher.model", "teacher", "files_sha256"), ("teacher.weights", "teacher", "weights_sha256"),
        ("data.tokenizer", "inputs", "tokenizer"), ("data.tokenizer", "inputs", "vocab"),
        *((f"data.{key}", "inputs", key) for key in (*_ROWS, "eval_split")),
        ("run.seed", "inputs", "seed"),
        ("teacher.cache.format", "outputs", "format"), ("distill.top_k", "outputs", "k"), ("teacher.cache.dtype", "outputs", "dtype"),
    )

    def __init__(self, outputs: dict, temperature: float | None = None):
        self.outputs = outputs
        self.tail = tail_column(tuple(outputs["temperatures"]), temperature) if temperature is not None else None

    @staticmethod
    def describe(spec: "JobSpec", data, task) -> dict:
        """What a language model's outputs are a function of, besides the rows (JSON values)."""
        teacher, d = spec.teacher, spec.data
        tokenizer = task.tokenizer
        vocab = task.vocab
        drawn = d.eval_source is None  # the held-out documents are drawn by a hash of the seed
        return {
            "teacher": {"model": teacher.model, "kwargs": teacher.kwargs, "files_sha256": lms.files_digest(teacher.model, spec.job_dir),
                        "weights_sha256": file_sha256(teacher.weights) if teacher.weights else None},
            "inputs": {"tokenizer": lms.tokenizer_digest(tokenizer), "vocab": vocab, **{key: getattr(d, key) for key in _ROWS},
                       "eval_split": d.eval_split if drawn else None,
                       "seed": spec.run.seed if drawn else None},
            "outputs": {"format": "topk", "k": spec.distill.top_k, "dtype": spec.teacher.cache.value_dtype,
                        "temperatures": cache_temperatures(spec), "vocab": vocab, "ids": id_dtype(vocab).name},
        }

    def describe_outputs(self) -> str:
        return f"top-{self.outputs['k']} {self.outputs['dtype']} per token"

    def schema(self) -> dict[str, str]:
        table = token_table(*self._nothing(), self.outputs["vocab"])
        return {field.name: str(field.type) for field in table.schema}

    def _nothing(self) -> tuple[dict, dict]:
        k, nt = self.outputs["k"], len(self.outputs["temperatures"])
        raw = {ID: np.zeros(0, np.int64), **{c: np.zeros((0, 1), np.int32) for c in (TOKENS, TARGETS, DOCS, TOKEN_POS)}}
        signal = {TOPK_VALUES: torch.zeros((0, k), dtype=VALUE_DTYPES[self.outputs["dtype"]]), TOPK_INDICES: torch.zeros((0, k), dtype=torch.int32),
                  TAIL_LSE: torch.zeros((0, nt)), TARGET_LOGPROB: torch.zeros(0)}
        return raw, signal

    def payload(self) -> int:
        """Bytes per loss token as the pool sends them: k values, k int32 ids, a tail, a target."""
        return bytes_per_token(self.outputs["k"], VALUE_DTYPES[self.outputs["dtype"]])

    def items(self, reader, unit: int, rows: int) -> int:
        """Loss tokens in a unit of token rows."""
        index = reader.unit_ids()[unit]
        return int((reader.read(np.full(len(index), unit), np.arange(len(index)))[TARGETS] >= 0).sum())

    def capturer(self, spec: "JobSpec", task) -> "TokenCapture":
        return TokenCapture(spec, task, self.outputs)

    # ------------------------------------------------------------- reading (in the training stream)

    def decode(self, data: bytes) -> TokenUnit:
        table = read_table(data)
        k = self.outputs["k"]

        def flat(name: str, width: int) -> np.ndarray:
            return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)

        mask = to_numpy(table.column(MASK)).astype(bool)
        bits = delta_decode(flat(VALUES, k))
        dtype = self.outputs["dtype"]
        values = bits if dtype == "bfloat16" else bits.view(np.float16 if dtype == "float16" else np.float32)
        tails = flat(TAILS, len(self.outputs["temperatures"]))
        column = self.tail or 0
        return TokenUnit(ids=to_numpy(table.column(ID)), digests=to_numpy(table.column(INPUT)), mask=mask,
                         starts=np.concatenate([[0], np.cumsum(mask.sum(axis=1))]), values=values, indices=flat(IDS, k),
                         tails=np.ascontiguousarray(tails[:, column:column + 1]), target=flat(TARGET, 1)[:, 0])

    def rows(self, unit: TokenUnit, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of a unit as the pool would have sent them: outputs at loss positions, zeros elsewhere."""
        mask = unit.mask[rows]
        picked = np.concatenate([np.arange(unit.starts[r], unit.starts[r + 1]) for r in rows]) if len(rows) else np.zeros(0, np.int64)
        out = {ID: unit.ids[rows], INPUT: unit.digests[rows]}
        for name, values, dtype in ((TOPK_VALUES, unit.values, unit.values.dtype), (TOPK_INDICES, unit.indices, np.int32),
                                    (TAIL_LSE, unit.tails, np.float32), (TARGET_LOGPROB, unit.target, np.float32)):
            full = np.zeros((*mask.shape, *values.shape[1:]), dtype=dtype)
            full[mask] = values[picked]
            out[name] = full
        return out

    def digests(self, raw: dict) -> np.ndarray:
        return row_digests(raw)

    def empty(self) -> dict[str, np.ndarray]:
        k = self.outputs["k"]
        return {TOPK_VALUES: np.zeros((0, 0, k), np.float16), TOPK_INDICES: np.zeros((0, 0, k), np.int32),
                TAIL_LSE: np.zeros((0, 0, 1), np.float32), TARGET_LOGPROB: np.zeros((0, 0), np.float32)}


class TokenCapture:
    """In a capture's pool actor: a unit of token rows -> its shard's table. The teacher runs on
    consecutive slices of the pool's batch size (the same batches whenever the unit is
    captured, so the same bits), as the online pool runs it (kd_ray.tasks.causal_lm)."""

    def __init__(self, spec: "JobSpec", task, outputs: dict):
        self.device, self.model, self.precision = placed_teacher(spec, task)
        self.task, self.batch_size, self.outputs = task, spec.teacher.pool.batch_size, outputs

    def __call__(self, raw: dict) -> "pa.Table":
        rows = len(raw[ID])
        temperatures, dtype = tuple(self.outputs["temperatures"]), VALUE_DTYPES[self.outputs["dtype"]]
        parts = [self.task.teacher_signal(self.model, {c: raw[c][a:a + self.batch_size] for c in (TOKENS, TOKEN_POS, TARGETS)},
                                          self.device, self.precision, temperatures, dtype)[1]
                 for a in range(0, rows, self.batch_size)]
        signal = {name: torch.cat([p[name].cpu() for p in parts]) for name in parts[0]} if parts else self._empty_signal()
        return token_table(raw, signal, self.outputs["vocab"])

    def _empty_signal(self) -> dict:
        return TokenCodec(self.outputs)._nothing()[1]
