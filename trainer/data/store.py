"""Tokenized rows on disk, memory-mapped: written once by ``cache.py``, read by every rank.

A store is a directory:

- ``tokens.bin``: every row's tokens back to back (uint16 when the vocabulary fits, else uint32;
  no padding stored);
- ``targets.bin`` (padded/packed layouts): one byte per token, 1 where it is a label;
- ``example_offsets.bin`` / ``row_examples.bin`` (int64, padded/packed): token offset of each
  example, and the first example of each row;
- ``meta.json``: layout, seq_len, dtype, counts, and what the store was built from.

Reading a row touches only its bytes; the OS page cache shares them between ranks, so memory
does not grow with the corpus. ``RowSet`` is a selection of rows (a split, a mixture) over stores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lowbit.trainer.data.rows import Row, row_tensors

META = "meta.json"
VERSION = 2


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class StoreWriter:
    """Appends rows to a store directory (``close`` writes ``meta.json``, the mark of a whole store)."""

    def __init__(self, directory: Path, layout: str, seq_len: int, vocab_size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.layout, self.seq_len = directory, layout, seq_len
        self.dtype = token_dtype(vocab_size)
        self.files = {name: (directory / f"{name}.bin").open("wb") for name in self._names()}
        self.rows = self.tokens = self.examples = self.target_tokens = 0
        if layout != "blocks":
            self._write("example_offsets", np.zeros(1, np.int64))
            self._write("row_examples", np.zeros(1, np.int64))

    def _names(self) -> tuple[str, ...]:
        return (
            ("tokens",)
            if self.layout == "blocks"
            else ("tokens", "targets", "example_offsets", "row_examples")
        )

    def _write(self, name: str, array: np.ndarray) -> None:
        self.files[name].write(array.tobytes())

    def add(self, row: Row) -> None:
        self._write("tokens", row.tokens.astype(self.dtype))
        self.rows += 1
        self.tokens += len(row.tokens)
        if self.layout == "blocks":
            self.target_tokens += len(row.tokens) - 1
            return
        assert row.targets is not None
        self._write("targets", row.targets.astype(np.uint8))
        ends = self.tokens - len(row.tokens) + np.cumsum(row.lengths)
        self._write("example_offsets", ends.astype(np.int64))
        self.examples += len(row.lengths)
        self._write("row_examples", np.asarray([self.examples], np.int64))
        self.target_tokens += int(row.targets.sum() - row.targets[row.starts].sum())

    def close(self, facts: dict[str, Any]) -> None:
        for handle in self.files.values():
            handle.close()
        meta = {
            "version": VERSION, "layout": self.layout, "seq_len": self.seq_len, "dtype": self.dtype.name,
            "rows": self.rows, "tokens": self.tokens, "examples": self.examples,
            "target_tokens": self.target_tokens, **facts,
        }  # fmt: skip
        (self.directory / META).write_text(json.dumps(meta, indent=1))


class TokenStore:
    """A store opened for reading (memory-mapped)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.meta = json.loads((directory / META).read_text())
        self.layout: str = self.meta["layout"]
        self.seq_len: int = self.meta["seq_len"]
        self.tokens = self._map("tokens", np.dtype(self.meta["dtype"]))
        if self.layout != "blocks":
            self.targets = self._map("targets", np.dtype(np.uint8))
            self.example_offsets = self._map("example_offsets", np.dtype(np.int64))
            self.row_examples = self._map("row_examples", np.dtype(np.int64))

    def _map(self, name: str, dtype: np.dtype) -> np.ndarray:
        path = self.directory / f"{name}.bin"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def row(self, index: int) -> Row:
        if self.layout == "blocks":
            begin = index * self.seq_len
            return Row(self.tokens[begin : begin + self.seq_len].astype(np.int64), None, [self.seq_len])
        first, last = int(self.row_examples[index]), int(self.row_examples[index + 1])
        offsets = self.example_offsets[first : last + 1].astype(np.int64)
        begin, end = int(offsets[0]), int(offsets[-1])
        return Row(
            self.tokens[begin:end].astype(np.int64),
            self.targets[begin:end].astype(bool),
            np.diff(offsets).tolist(),
        )


@dataclass
class RowSet:
    """Rows of one or more stores, by ``index[i] = (store, row)``: what training and eval read."""

    stores: list[TokenStore]
    index: np.ndarray
    """int64 [rows, 2]."""
    pad_id: int

    @classmethod
    def whole(cls, store: TokenStore, pad_id: int) -> RowSet:
        rows = np.arange(len(store), dtype=np.int64)
        return cls([store], np.stack([np.zeros_like(rows), rows], axis=1), pad_id)

    @classmethod
    def concat(cls, parts: list[RowSet]) -> RowSet:
        stores, index = [], []
        for part in parts:
            index.append(np.stack([part.index[:, 0] + len(stores), part.index[:, 1]], axis=1))
            stores += part.stores
        return cls(stores, np.concatenate(index), parts[0].pad_id)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def seq_len(self) -> int:
        return self.stores[0].seq_len

    @property
    def positions(self) -> bool:
        """Whether rows hold several examples (then batches carry ``position_ids``)."""
        return any(store.layout == "packed" for store in self.stores)

    def select(self, indices) -> RowSet:
        return RowSet(self.stores, self.index[np.asarray(indices, dtype=np.int64)], self.pad_id)

    def rows(self, indices) -> list[Row]:
        return [self.stores[int(s)].row(int(r)) for s, r in self.index[np.asarray(indices, dtype=np.int64)]]

    def batch(self, indices) -> dict[str, Tensor]:
        """Model inputs for ``indices``, plus ``index`` (which rows: for an offline teacher cache)."""
        batch = row_tensors(self.rows(indices), self.seq_len, self.pad_id, self.positions)
        batch["index"] = torch.as_tensor(list(indices), dtype=torch.long)
        return batch

    def digest(self) -> str:
        """sha256 of every row's int64 input ids, in order (what an offline teacher cache is valid for)."""
        digest = hashlib.sha256()
        for begin in range(0, len(self), 256):
            digest.update(
                self.batch(range(begin, min(begin + 256, len(self))))["input_ids"].numpy().tobytes()
            )
        return digest.hexdigest()
