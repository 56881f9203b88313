"""In-memory rows (``Examples``) and the seeded validation hold-out shared by every row set.

Training data lives in memory-mapped stores (``store.RowSet``); ``Examples`` is the same interface
over three tensors, for rows built in code (tests, tools).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.trainer.errors import UserError


@dataclass
class Examples:
    """Rows as three ``[num_examples, seq_len]`` int64 tensors."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    positions = False

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def select(self, indices: Tensor | list[int]) -> Examples:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Examples(self.input_ids[index], self.labels[index], self.attention_mask[index])

    def batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        """Model inputs for ``indices``, plus ``index`` (which examples: for an offline teacher cache)."""
        chosen = self.select(indices)
        return {
            "input_ids": chosen.input_ids,
            "labels": chosen.labels,
            "attention_mask": chosen.attention_mask,
            "index": torch.as_tensor(indices, dtype=torch.long),
        }

    def digest(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()


def split_validation(examples, fraction: float, seed: int):
    """Hold out ``fraction`` of the rows (at least one) by a seeded permutation: (train, validation),
    each selected from ``examples`` (``Examples`` or ``RowSet``)."""
    count = len(examples)
    num_val = max(1, round(count * fraction)) if fraction > 0 else 0
    if num_val >= count:
        raise UserError(
            f"only {count} example(s): too few to hold out a validation split; "
            "add data, lower data.seq_len, or give data.val_files"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return examples.select(order[num_val:].sort().values), examples.select(order[:num_val].sort().values)
