"""Data: local files → tokenized, memory-mapped rows (or a resumable stream) → deterministic batches.

One source (``data.train_files``) or a mixture (``data.sources``). The cached path tokenizes each
source once into a store (``cache.py``) and mixes rows by exact per-epoch counts; the streaming
path (``stream.py``) tokenizes as it trains. Both cut rows the same way (``rows.py``): for the
same files the stream's rows are the cache's rows in file order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lowbit.trainer.config import DataConfig
from lowbit.trainer.data.cache import cached_store, first_format, layout_of
from lowbit.trainer.data.examples import Examples, split_validation
from lowbit.trainer.data.loader import StepBatches, eval_batches
from lowbit.trainer.data.mixture import Mixture, mixture_counts
from lowbit.trainer.data.sources import expand_files
from lowbit.trainer.data.store import RowSet
from lowbit.trainer.data.stream import RowStream, StreamBatches
from lowbit.trainer.errors import UserError

logger = logging.getLogger("lowbit")

SOURCE_KEYS = ("name", "files", "weight", "format")


@dataclass
class Source:
    name: str
    files: list[Path]
    weight: float
    format: str


def training_sources(cfg: DataConfig) -> list[Source]:
    """``data.sources`` (a mixture), or ``data.train_files`` as one source of weight 1."""
    if not cfg.sources:
        return [Source("train", expand_files(cfg.train_files, "data.train_files"), 1.0, cfg.format)]
    sources = []
    for number, entry in enumerate(cfg.sources, start=1):
        key = f"data.sources[{number - 1}]"
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown or "files" not in entry:
            problem = f"unknown key(s) {', '.join(unknown)}" if unknown else "no files"
            raise UserError(
                f"{key}: {problem}; a source is {{files: [...], weight: 1.0, format: auto, name: ...}}"
            )
        files = entry["files"] if isinstance(entry["files"], list) else [entry["files"]]
        weight = float(entry.get("weight", 1.0))
        if not weight > 0:
            raise UserError(f"{key}.weight must be positive, got {weight}")
        name = str(entry.get("name") or Path(str(files[0])).stem or f"source{number}")
        sources.append(
            Source(
                name,
                expand_files([str(f) for f in files], f"{key}.files"),
                weight,
                str(entry.get("format", cfg.format)),
            )
        )
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise UserError(f"data.sources: names must differ, got {names}; set `name` on each source")
    return sources


@dataclass
class TrainData:
    """What training reads: rows (cached) or streams, the validation rows, each source's share."""

    rows: RowSet | Mixture | None
    streams: list[RowStream] | None
    weights: list[float]
    val: RowSet | None
    shares: dict[str, float]
    pad_id: int

    def batches(self, micro_batch_size: int, grad_accum_steps: int, world_size: int, rank: int, seed: int):
        if self.rows is not None:
            return StepBatches(self.rows, micro_batch_size, grad_accum_steps, world_size, rank, seed)
        assert self.streams is not None
        return StreamBatches(
            self.streams,
            self.weights,
            micro_batch_size,
            grad_accum_steps,
            world_size,
            rank,
            seed,
            self.pad_id,
        )


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def load_data(cfg: DataConfig, tokenizer, seed: int, show: bool = True) -> TrainData:
    """Training rows or streams and validation rows, as ``data`` configures them."""
    sources = training_sources(cfg)
    weights = [source.weight for source in sources]
    pad = _pad_id(tokenizer)
    val = None
    if cfg.val_files:
        files = expand_files(cfg.val_files, "data.val_files")
        val = RowSet.whole(cached_store(files, cfg.format, cfg, tokenizer, "validation data", show), pad)
    if cfg.streaming:
        streams = []
        for source in sources:
            fmt = first_format(source.files, cfg, source.format)
            streams.append(RowStream(source.name, source.files, fmt, layout_of(fmt, cfg), cfg, tokenizer))
        shares = {s.name: w / sum(weights) for s, w in zip(sources, weights)}
        return TrainData(None, streams, weights, _capped(val, cfg), shares, pad)
    parts, held_out = [], []
    for source in sources:
        name = "training data" if len(sources) == 1 else f"training data {source.name!r}"
        part = RowSet.whole(
            cached_store(source.files, source.format, cfg, tokenizer, name, show, cfg.max_documents), pad
        )
        if val is None and cfg.val_fraction > 0:
            part, part_val = split_validation(part, cfg.val_fraction, seed)
            held_out.append(part_val)
        parts.append(part)
    train = parts[0] if len(parts) == 1 else Mixture(parts, weights, seed)
    if held_out:
        if cfg.max_val_examples:  # an even share of the cap from each source: every source is measured
            share = -(-cfg.max_val_examples // len(held_out))
            held_out = [part.select(range(min(len(part), share))) for part in held_out]
        val = held_out[0] if len(held_out) == 1 else RowSet.concat(held_out)
    counts = train.counts if isinstance(train, Mixture) else [len(train)]
    shares = {s.name: int(c) / len(train) for s, c in zip(sources, counts)}
    if show and len(parts) > 1:
        logger.info(
            "mixture, rows per epoch: %s",
            ", ".join(f"{s.name} {int(c):,} of {len(p):,} ({int(c) / len(train):.1%}, weight {w:g})"
                      for s, c, p, w in zip(sources, counts, parts, weights)),
        )  # fmt: skip
    return TrainData(train, None, weights, _capped(val, cfg), shares, pad)


def _capped(val: RowSet | None, cfg: DataConfig) -> RowSet | None:
    if val is not None and cfg.max_val_examples is not None:
        return val.select(list(range(min(len(val), cfg.max_val_examples))))
    return val


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Any]:
    """The model's keyword inputs for a batch: with ``position_ids`` (packed rows) no attention
    mask and no KV cache, so transformers builds the block-diagonal mask from the positions (it
    looks for packing only then; right padding needs no mask under causal attention: no real token
    attends to a later one)."""
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": None,
            "use_cache": False,
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


__all__ = [
    "Examples", "Mixture", "RowSet", "StepBatches", "StreamBatches", "TrainData", "eval_batches", "load_data",
    "mixture_counts", "model_inputs", "split_validation", "training_sources",
]  # fmt: skip
