"""Token rows for causal-LM distillation: documents -> fixed-length rows, as pure functions.

A document is its token ids and a loss mask (which of its tokens the loss predicts: every token
of plain text, the response's tokens of a prompt/response pair). Targets are shifted here, per
document, before anything is packed: the logits at position t predict token t + 1, so

    target[t] = token[t + 1] if loss_mask[t + 1] else IGNORE,     target[last] = IGNORE

and one mask (target >= 0) serves the cross-entropy, the distillation term and the token count.
A packed row never lets a target cross a document boundary, since the shift happened first.

    cut    a document longer than max_seq_len is cut into consecutive pieces of max_seq_len
           tokens; each piece trains as a document of its own (its first token has no context
           from the piece before). Pieces with nothing to predict are dropped.
    pack   pieces fill rows of max_seq_len tokens in source order, a piece that does not fit
           starting a new row (next-fit: deterministic, no piece is split); every token carries
           its document's index in the row and its position within the document, so attention
           never crosses a document and positions restart per document.
    pad    one piece per row; rows are trimmed per micro-batch to a multiple of 64 tokens at the
           step (kd_ray.tasks.causal_lm), so a batch of short rows computes short.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

IGNORE = -100  # the target of a position that carries no loss
PAD_DOC = -1  # the document index of padding
PAD_MULTIPLE = 64


class Rows(NamedTuple):
    """Fixed-length token rows: (rows, max_seq_len) each."""

    tokens: np.ndarray  # int32 token ids (0 where padding)
    targets: np.ndarray  # int32: the next token where it carries loss, else IGNORE
    docs: np.ndarray  # int32 document index within the row, PAD_DOC for padding
    positions: np.ndarray  # int32 position within the document (0 for padding)


def shift_targets(tokens: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """The per-document shifted targets (see the module's docstring)."""
    targets = np.full(len(tokens), IGNORE, dtype=np.int32)
    if len(tokens) > 1:
        targets[:-1] = np.where(loss_mask[1:], tokens[1:], IGNORE)
    return targets


def cut(tokens: np.ndarray, loss_mask: np.ndarray, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, targets) of each piece of at most `max_len` tokens that has something to predict."""
    pieces = []
    for a in range(0, len(tokens), max_len):
        piece, mask = tokens[a:a + max_len], loss_mask[a:a + max_len]
        targets = shift_targets(piece, mask)
        if (targets != IGNORE).any():
            pieces.append((np.asarray(piece, dtype=np.int32), targets))
    return pieces


def _empty(n: int, max_len: int) -> Rows:
    return Rows(np.zeros((n, max_len), np.int32), np.full((n, max_len), IGNORE, np.int32),
                np.full((n, max_len), PAD_DOC, np.int32), np.zeros((n, max_len), np.int32))


def _place(rows: Rows, r: int, at: int, doc: int, piece: tuple[np.ndarray, np.ndarray]) -> None:
    tokens, targets = piece
    end = at + len(tokens)
    rows.tokens[r, at:end], rows.targets[r, at:end] = tokens, targets
    rows.docs[r, at:end], rows.positions[r, at:end] = doc, np.arange(len(tokens))


def pack(pieces: list[tuple[np.ndarray, np.ndarray]], max_len: int) -> Rows:
    """Next-fit packing of pieces (each at most max_len tokens) into rows, in order."""
    starts: list[tuple[int, int, int]] = []  # (row, offset, document index in the row) per piece
    row, used, docs = -1, max_len, 0
    for tokens, _ in pieces:
        if used + len(tokens) > max_len:
            row, used, docs = row + 1, 0, 0
        starts.append((row, used, docs))
        used, docs = used + len(tokens), docs + 1
    rows = _empty(row + 1, max_len)
    for piece, (r, at, doc) in zip(pieces, starts):
        _place(rows, r, at, doc, piece)
    return rows


def pad(pieces: list[tuple[np.ndarray, np.ndarray]], max_len: int) -> Rows:
    """One piece per row, padded to max_len."""
    rows = _empty(len(pieces), max_len)
    for r, piece in enumerate(pieces):
        _place(rows, r, 0, 0, piece)
    return rows


def make_rows(documents: Iterable[tuple[np.ndarray, np.ndarray]], max_len: int, packing: str) -> Rows:
    """(tokens, loss mask) per document -> rows, by `packing` ("pack" or "pad")."""
    pieces = [p for tokens, mask in documents for p in cut(np.asarray(tokens), np.asarray(mask, dtype=bool), max_len)]
    return (pack if packing == "pack" else pad)(pieces, max_len)
