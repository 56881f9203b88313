"""Data: read local files, tokenize into packed or masked examples, batch deterministically."""

from __future__ import annotations

from lowbit.trainer.config import DataConfig
from lowbit.trainer.data.examples import Examples, build_examples, split_validation
from lowbit.trainer.data.loader import StepBatches, eval_batches
from lowbit.trainer.data.sources import read_all


def load_splits(cfg: DataConfig, tokenizer, seed: int) -> tuple[Examples, Examples | None]:
    """Tokenized (train, validation) examples; validation is None when none is configured."""
    train = build_examples(read_all(cfg.train_files, "data.train_files", cfg.max_documents), tokenizer, cfg)
    val: Examples | None = None
    if cfg.val_files:
        val = build_examples(read_all(cfg.val_files, "data.val_files"), tokenizer, cfg)
    elif cfg.val_fraction > 0:
        train, val = split_validation(train, cfg.val_fraction, seed)
    if val is not None and cfg.max_val_examples is not None:
        val = val.select(list(range(min(len(val), cfg.max_val_examples))))
    return train, val


__all__ = ["Examples", "StepBatches", "build_examples", "eval_batches", "load_splits", "split_validation"]
