"""The training objective: a weighted sum of named loss terms, built from config.

    loss: [{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]

The loop never knows which terms exist: it hands each micro-batch's outputs to the objective and
gets back the weighted loss plus each term's value for logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lowbit.losses.fused_head import HeadInputs, head_chunked_sums
from lowbit.losses.terms import IGNORE_INDEX, LOSS_TERMS, LogitTerm, LossInputs, LossTerm, ModelShapes


class Objective(nn.Module):
    """Σ weight_i · term_i, each term a sum over valid tokens, divided by one token count.

    Args:
        terms: (name, weight, term) triples; names are used as log keys (``loss/ce``).
    """

    def __init__(self, terms: Sequence[tuple[str, float, LossTerm]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("the objective has no loss terms; add e.g. {kind: ce, weight: 1.0} to `loss`")
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}; set `name:` on repeated kinds")
        self.names = names
        self.weights = [float(weight) for _, weight, _ in terms]
        if sum(self.weights) == 0:
            raise ValueError(
                "the loss weights sum to 0: nothing would be trained; give at least one term a positive weight"
            )
        self.terms = nn.ModuleList(term for _, _, term in terms)

    def configure(self, shapes: ModelShapes) -> None:
        """Let each term fit itself to the models (layer maps, projection widths)."""
        for term in self.terms:
            term.configure(shapes)

    def qkv_layers(self, role: str) -> list[int]:
        """Layers whose q/k/v projections some term reads, for ``role`` "student" or "teacher"."""
        return sorted({layer for term in self.terms for layer in term.qkv_layers.get(role, [])})

    @property
    def needs(self) -> frozenset[str]:
        """Union of the inputs the terms read."""
        return frozenset().union(*(term.needs for term in self.terms))

    def forward(
        self,
        inputs: LossInputs,
        num_tokens: Tensor | int,
        head: HeadInputs | None = None,
        term_graphs: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (weighted loss normalised by ``num_tokens``, {name: unweighted term sum}).

        ``num_tokens`` is the valid-token count of the whole optimizer step (all micro-batches,
        all ranks), so per-micro-batch losses add up to the step's mean. With ``head`` (the
        fused-head path) the logit terms are computed chunk by chunk from hidden states.
        ``term_graphs``, when given, receives each term's *unweighted* sum over ``num_tokens``
        with its autograd graph (to take one term's gradient alone); not with ``head``, whose
        chunks compute the logit terms' gradients together.
        """
        values: dict[str, Tensor] = {}
        total: Tensor | None = None
        if head is not None and term_graphs is not None:
            raise ValueError("per-term graphs are not available with the fused head")
        if head is not None:
            fused = [
                (name, weight, term)
                for name, weight, term in zip(self.names, self.weights, self.terms)
                if isinstance(term, LogitTerm)
            ]
            if fused:
                total, sums = head_chunked_sums(
                    [term for _, _, term in fused], [weight for _, weight, _ in fused], head,
                    inputs.labels, fused[0][2].ignore_index,
                )  # fmt: skip
                values.update({name: value for (name, _, _), value in zip(fused, sums)})
        parts: dict[str, Tensor] = {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            if name in values:  # fused: already weighted into ``total``
                parts[name] = values[name]
                continue
            value = term(inputs)
            parts[name] = value.detach()
            if term_graphs is not None:
                term_graphs[name] = value / num_tokens
            if weight != 0:
                total = value * weight if total is None else total + value * weight
        assert total is not None
        return total / num_tokens, parts


def build_objective(specs: Sequence[Mapping[str, Any]], ignore_index: int = IGNORE_INDEX) -> Objective:
    """Build an ``Objective`` from config entries ``{kind, weight=1.0, name=kind, **fields}``."""
    terms = []
    for spec in specs:
        fields = dict(spec)
        weight = fields.pop("weight", 1.0)
        name = fields.pop("name", None) or fields.get("kind", "?")
        term = LOSS_TERMS.build(fields, ignore_index=ignore_index)
        terms.append((str(name), float(weight), term))
    return Objective(terms)


__all__ = ["Objective", "build_objective"]
