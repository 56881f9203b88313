"""Pieces → fixed-length rows: packed text blocks, padded examples, or packed examples.

- **blocks** (text): the token stream, cut into ``seq_len`` blocks; the tail that does not fill a
  block is dropped. Every token is a target; documents meet at their EOS.
- **padded** (instruction/chat): one example per row, right-padded.
- **packed** (instruction/chat with ``data.packing``): consecutive examples share a row while they
  fit (greedy, in order); ``position_ids`` restart at each example, which transformers' masks turn
  into a block-diagonal causal mask (no token attends across an example boundary — the flattening
  collator's convention), and the first token of each example takes no loss.

Each packer yields, with each row, the ``Resume`` point where the next row starts: the unit whose
tokens come next and how many of them were already used. A stream restarted there (``skip``
tokens dropped from its first piece) yields exactly the rows that followed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lowbit.losses import IGNORE_INDEX
from lowbit.trainer.data.encode import Piece
from lowbit.trainer.data.sources import Position

LAYOUTS = ("blocks", "padded", "packed")


@dataclass
class Row:
    tokens: np.ndarray
    """int64, at most seq_len tokens (exactly seq_len for blocks)."""
    targets: np.ndarray | None
    """bool per token; None: every token is a label (blocks)."""
    lengths: list[int]
    """Lengths of the examples in the row, in order (one for blocks and padded rows)."""

    @property
    def starts(self) -> np.ndarray:
        """Where each example begins in the row."""
        return np.cumsum([0, *self.lengths[:-1]])


@dataclass(frozen=True)
class Resume:
    """Where the row after this one starts: ``position``'s piece, less its first ``skip`` tokens."""

    position: Position
    skip: int

    def as_dict(self) -> dict[str, int]:
        return {**self.position.as_dict(), "skip": self.skip}

    @classmethod
    def from_dict(cls, state: dict[str, int]) -> Resume:
        return cls(Position(state["file"], state["offset"], state["line"]), state["skip"])


def _skipped(pieces: Iterator[Piece], skip: int) -> Iterator[Piece]:
    """``pieces`` with the first ``skip`` tokens of the first one removed (all: the piece is gone)."""
    for index, piece in enumerate(pieces):
        if index == 0 and skip:
            if skip >= len(piece.tokens):
                continue
            targets = None if piece.targets is None else piece.targets[skip:]
            piece = Piece(piece.tokens[skip:], targets, piece.position, piece.ends_document, skip)
        yield piece


def blocks(pieces: Iterator[Piece], seq_len: int, skip: int = 0) -> Iterator[tuple[Row, Resume]]:
    """The token stream in ``seq_len`` blocks."""
    buffer: deque[list] = deque()  # [piece, tokens used, skip it started with]
    have = 0
    last: list | None = None
    for piece in _skipped(pieces, skip):
        entry = [piece, 0, piece.skip]
        buffer.append(entry)
        last = entry
        have += len(piece.tokens)
        while have >= seq_len:
            parts, need = [], seq_len
            while need:
                head = buffer[0]
                take = min(len(head[0].tokens) - head[1], need)
                parts.append(head[0].tokens[head[1] : head[1] + take])
                head[1] += take
                need -= take
                if head[1] == len(head[0].tokens):
                    buffer.popleft()
            have -= seq_len
            nxt = buffer[0] if buffer else last
            yield Row(np.concatenate(parts), None, [seq_len]), Resume(nxt[0].position, nxt[2] + nxt[1])


def padded(pieces: Iterator[Piece], skip: int = 0) -> Iterator[tuple[Row, Resume]]:
    """One example per row."""
    for piece in _skipped(pieces, skip):
        yield Row(piece.tokens, piece.targets, [len(piece.tokens)]), Resume(piece.position, len(piece.tokens))


def packed(pieces: Iterator[Piece], seq_len: int, skip: int = 0) -> Iterator[tuple[Row, Resume]]:
    """Consecutive examples per row while they fit (each fits alone: the encoder saw to that)."""
    group: list[Piece] = []
    used = 0
    for piece in _skipped(pieces, skip):
        if group and used + len(piece.tokens) > seq_len:
            yield _joined(group), Resume(piece.position, 0)
            group, used = [], 0
        group.append(piece)
        used += len(piece.tokens)
    if group:
        yield _joined(group), Resume(group[-1].position, len(group[-1].tokens))


def _joined(group: list[Piece]) -> Row:
    return Row(
        np.concatenate([p.tokens for p in group]),
        np.concatenate([p.targets for p in group]),  # type: ignore[misc]
        [len(p.tokens) for p in group],
    )


def pack(layout: str, pieces: Iterator[Piece], seq_len: int, skip: int = 0) -> Iterator[tuple[Row, Resume]]:
    if layout == "blocks":
        return blocks(pieces, seq_len, skip)
    if layout == "packed":
        return packed(pieces, seq_len, skip)
    return padded(pieces, skip)


def row_tensors(rows: list[Row], seq_len: int, pad_id: int, positions: bool) -> dict[str, Tensor]:
    """Model inputs of ``rows``: ``input_ids``, ``labels`` (-100 where no loss: untargeted tokens,
    padding, each example's first token), ``attention_mask``, and ``position_ids`` (restarting per
    example; the padding tail counts as one more) when ``positions``."""
    count = len(rows)
    ids = np.full((count, seq_len), pad_id, dtype=np.int64)
    labels = np.full((count, seq_len), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((count, seq_len), dtype=np.int64)
    pos = np.zeros((count, seq_len), dtype=np.int64) if positions else None
    for index, row in enumerate(rows):
        length = len(row.tokens)
        ids[index, :length] = row.tokens
        mask[index, :length] = 1
        if row.targets is None:
            labels[index, :length] = row.tokens
        else:
            labels[index, :length] = np.where(row.targets, row.tokens, IGNORE_INDEX)
            labels[index, row.starts] = IGNORE_INDEX
        if pos is not None:
            for start, size in zip([*row.starts, length], [*row.lengths, seq_len - length]):
                pos[index, start : start + size] = np.arange(size)
    out = {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
    }
    if pos is not None:
        out["position_ids"] = torch.from_numpy(pos)
    return out
