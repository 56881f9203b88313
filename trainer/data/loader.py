"""Deterministic, rank-aware batching that resumes exactly from a step number.

The order of examples is a function of (seed, position) only: epoch ``e`` is
``randperm(N, seed + e)`` and the global batch of step ``s`` takes positions
``[s·G, (s+1)·G)`` with ``G = micro_batch_size × grad_accum_steps × world_size``. Rank ``r``'s
micro-batch ``m`` is a fixed slice of that batch. So the global batch does not depend on how many
ranks share it — a 2-process run sees the same examples per step as a 1-process run — and a
resumed run needs only the step to continue where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lowbit.trainer.data.examples import Examples
from lowbit.trainer.data.mixture import Mixture
from lowbit.trainer.data.store import RowSet


@dataclass
class StepBatches:
    """Yields the micro-batches one rank computes for one optimizer step."""

    examples: Examples | RowSet | Mixture
    """The rows; a ``Mixture`` gives each epoch its own rows."""
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    rank: int
    seed: int
    _orders: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=generator)}
        return self._orders[epoch]

    def indices(self, position: int, count: int) -> list[tuple[int, int]]:
        """(epoch, row) at global positions ``[position, position + count)`` (wrapping epochs)."""
        size = len(self.examples)
        return [(p // size, int(self._order(p // size)[p % size])) for p in range(position, position + count)]

    def _batch(self, chosen: list[tuple[int, int]]) -> dict[str, Tensor]:
        """The rows of ``chosen``; a micro-batch that crosses an epoch boundary takes rows of both."""
        parts = []
        for epoch in dict.fromkeys(e for e, _ in chosen):
            rows = self.examples.epoch(epoch) if isinstance(self.examples, Mixture) else self.examples
            parts.append(rows.batch([i for e, i in chosen if e == epoch]))
        return parts[0] if len(parts) == 1 else {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """This rank's ``grad_accum_steps`` micro-batches of step ``step`` (0-based)."""
        start = step * self.global_batch_size
        batches = []
        for micro in range(self.grad_accum_steps):
            offset = start + (micro * self.world_size + self.rank) * self.micro_batch_size
            batches.append(self._batch(self.indices(offset, self.micro_batch_size)))
        return batches

    def position(self, step: int) -> int:
        """Examples consumed globally before ``step`` (stored in checkpoints)."""
        return step * self.global_batch_size

    def state(self, step: int) -> dict[str, Any] | None:
        """Nothing beyond the step: the order is a function of (seed, position)."""
        return None

    def restore(self, state: dict[str, Any] | None, step: int) -> None:
        """Nothing to restore (see ``state``)."""

    def step_metrics(self) -> dict[str, float]:
        return {}


def eval_batches(
    examples: Examples | RowSet, batch_size: int, world_size: int, rank: int
) -> list[dict[str, Tensor]]:
    """This rank's share (every ``world_size``-th example) of the validation set, in batches.

    Every rank gets the same number of batches, each of the same size as on the others: where
    its share is one example short, the last batch is completed by a copy of example 0 whose
    labels are all ignored (it counts no token). Sharded engines (fsdp2, ZeRO-3) gather weights
    collectively inside each forward, so a rank that ran one forward more would wait forever.
    """
    per_rank = -(-len(examples) // world_size)
    mine = list(range(rank, len(examples), world_size))
    padding = per_rank - len(mine)
    indices = mine + [0] * padding
    batches = [examples.batch(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    if padding:
        batches[-1]["labels"][-padding:] = -100
    return batches
