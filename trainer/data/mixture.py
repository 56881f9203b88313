"""Mixtures of cached sources: each epoch holds every source's weighted share of all rows.

An epoch of a mixture has as many rows as all sources together; source ``s`` contributes
``mixture_counts`` of them — its weight's share. A source with fewer rows than that repeats them
(cycling through a permutation), one with more contributes a subset; both drawn again each epoch
from a generator seeded by (seed, source, epoch), so over epochs a down-weighted source's rows
all take their turn. Deterministic: the rows of epoch ``e`` are a function of (seed, e).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lowbit.trainer.data.store import RowSet


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows per source in one epoch of a mixture: the weights' shares of all rows (largest remainder)."""
    total = sum(sizes)
    shares = np.asarray(weights, dtype=np.float64) / sum(weights) * total
    counts = np.floor(shares).astype(np.int64)
    for index in np.argsort(-(shares - counts), kind="stable")[: total - int(counts.sum())]:
        counts[index] += 1
    return [max(1, int(c)) for c in counts]


@dataclass
class Mixture:
    """The training rows of a mixture, epoch by epoch (``StepBatches`` asks for each epoch's rows)."""

    parts: list[RowSet]
    weights: list[float]
    seed: int
    counts: list[int] = field(init=False)
    _epoch: tuple[int, RowSet] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.counts = mixture_counts([len(p) for p in self.parts], self.weights)

    def __len__(self) -> int:
        return sum(self.counts)

    def epoch(self, epoch: int) -> RowSet:
        """The rows of ``epoch``, sources in order (``StepBatches`` shuffles them)."""
        if self._epoch is None or self._epoch[0] != epoch:
            chosen = []
            for number, (part, count) in enumerate(zip(self.parts, self.counts)):
                order = np.random.default_rng([self.seed, number, epoch]).permutation(len(part))
                chosen.append(part.select(np.sort(np.resize(order, count))))  # cycles when count > len(part)
            self._epoch = (epoch, RowSet.concat(chosen))
        return self._epoch[1]
