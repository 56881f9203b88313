"""Streaming (``data.streaming``): rows tokenized as training reads them, resumable at the exact token.

For corpora larger than the disk cache or RAM. Each source is read in file order (no shuffle:
shuffle the corpus before, or use the cached path, which shuffles rows every epoch) and starts
over at its end (the next epoch). A mixture picks the source of global row ``k`` from a generator
seeded by ``(seed, k)``: deterministic, and nothing to store. The state after each step — every
source's epoch and ``Resume`` point, and the rows read — goes into the checkpoint, so a resumed
run reads exactly the rows an uninterrupted one would.

Every rank reads the whole stream and keeps its slices of each global batch (the same slices as
the cached path), so the global batch does not depend on the number of ranks; the price is that
each rank tokenizes every row, which the tokenizer's throughput covers for training at any speed
a CPU-side tokenizer can feed anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lowbit.trainer.config import DataConfig
from lowbit.trainer.data.encode import Counts, Encoder
from lowbit.trainer.data.rows import Resume, Row, pack, row_tensors
from lowbit.trainer.data.sources import read_all
from lowbit.trainer.errors import UserError


@dataclass
class RowStream:
    """The rows of one source, over and over."""

    name: str
    files: list[Path]
    fmt: str
    layout: str
    cfg: DataConfig
    tokenizer: object
    epoch: int = 0
    resume: Resume | None = None
    counts: Counts = field(default_factory=Counts)
    _rows: Any = field(default=None, repr=False)
    _encoder: Encoder | None = field(default=None, repr=False)

    def _open(self) -> None:
        if self._encoder is not None:
            self.counts.add(self._encoder.counts)
        self._encoder = Encoder(self.tokenizer, self.cfg, self.fmt)
        start, skip = (self.resume.position, self.resume.skip) if self.resume else (None, 0)
        pieces = self._encoder.pieces(read_all(self.files, start, self.cfg.encoding, self.cfg.text_field))
        self._rows = pack(self.layout, pieces, self.cfg.seq_len, skip)

    def next_row(self) -> Row:
        if self._rows is None:
            self._open()
        fresh = self.resume is None
        for row, resume in self._rows:
            self.resume = resume
            return row
        if fresh:
            raise UserError(
                f"{self.name}: the stream holds no row (fewer tokens than one data.seq_len block of "
                f"{self.cfg.seq_len}, or every example dropped); add data or lower data.seq_len"
            )
        self.epoch, self.resume, self._rows = self.epoch + 1, None, None
        return self.next_row()

    def identity(self) -> list[list]:
        """Each file's path, size and mtime: a position is valid only in the files it was taken in."""
        return [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in self.files]

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "resume": self.resume.as_dict() if self.resume else None,
            "files": self.identity(), "counts": self.seen_counts().as_dict(),
        }  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        if state["files"] != self.identity():
            raise UserError(
                f"{self.name}: the data files changed since the checkpoint (names, sizes or modification times "
                f"differ: {state['files']} then, {self.identity()} now), so the stream cannot continue where it "
                "stopped: restore them, or start a new run (another run.output_dir)"
            )
        self.epoch = state["epoch"]
        self.resume = Resume.from_dict(state["resume"]) if state["resume"] else None
        self.counts, self._encoder, self._rows = Counts(**state["counts"]), None, None

    def seen_counts(self) -> Counts:
        total = Counts()
        total.add(self.counts)
        if self._encoder is not None:
            total.add(self._encoder.counts)
        return total


@dataclass
class StreamBatches:
    """The micro-batches one rank computes for each step, read from the stream in step order."""

    streams: list[RowStream]
    weights: list[float]
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    rank: int
    seed: int
    pad_id: int
    next_step: int = 0
    taken: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.taken = self.taken or [0] * len(self.streams)
        self.positions = any(stream.layout == "packed" for stream in self.streams)
        self.seq_len = self.streams[0].cfg.seq_len

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def _source(self, row: int) -> int:
        if len(self.streams) == 1:
            return 0
        weights = np.asarray(self.weights) / sum(self.weights)
        return int(np.random.default_rng([self.seed, row]).choice(len(weights), p=weights))

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """This rank's micro-batches of ``step``: steps are read in order, from where the stream is."""
        if step != self.next_step:
            raise RuntimeError(f"the stream is at step {self.next_step}; step {step} was asked for")
        rows = []
        for _ in range(self.global_batch_size):
            source = self._source(sum(self.taken))  # the rows read so far
            rows.append(self.streams[source].next_row())
            self.taken[source] += 1
        self.next_step += 1
        batches = []
        for micro in range(self.grad_accum_steps):
            offset = (micro * self.world_size + self.rank) * self.micro_batch_size
            batches.append(
                row_tensors(
                    rows[offset : offset + self.micro_batch_size], self.seq_len, self.pad_id, self.positions
                )
            )
        return batches

    def position(self, step: int) -> int:
        return step * self.global_batch_size

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint of ``step`` stores to continue the stream exactly (read through step - 1)."""
        if step != self.next_step:
            raise RuntimeError(f"the stream is at step {self.next_step}, not {step}")
        return {"step": step, "taken": list(self.taken),
                "sources": [stream.state() for stream in self.streams]}  # fmt: skip

    def restore(self, state: dict[str, Any] | None, step: int) -> None:
        if state is None:
            raise UserError(
                "the checkpoint holds no stream position (written without data.streaming); resume it without data.streaming"
            )
        if len(state["sources"]) != len(self.streams):
            raise UserError(
                f"the checkpoint's stream has {len(state['sources'])} source(s), this config {len(self.streams)}"
            )
        if state["step"] != step:
            raise UserError(f"the checkpoint's stream position is for step {state['step']}, not {step}")
        for stream, saved in zip(self.streams, state["sources"]):
            stream.restore(saved)
        self.taken, self.next_step = list(state["taken"]), step

    def step_metrics(self) -> dict[str, float]:
        """Each source's share of the rows read so far (a mixture), and examples dropped or truncated."""
        out: dict[str, float] = {}
        if len(self.streams) > 1:
            total = max(1, sum(self.taken))
            out.update({f"data/share/{s.name}": taken / total for s, taken in zip(self.streams, self.taken)})
        counts = Counts()
        for stream in self.streams:
            counts.add(stream.seen_counts())
        if counts.truncated or counts.dropped:
            out.update({"data/truncated": counts.truncated, "data/dropped": counts.dropped})
        return out
