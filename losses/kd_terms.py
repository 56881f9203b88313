"""Distillation loss terms for the objective: ``kd_kl``, ``kd_rkl``, ``kd_jsd``, ``kd_topk``.

    loss: [{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]

Each returns a sum over the step's target positions (position t counts when label t+1 is not
ignored, as for ``ce``), so the objective's single division gives a per-token mean.
"""

from __future__ import annotations

from torch import Tensor

from lowbit.losses.kd import KINDS, kd_divergence_sum, topk_kl_sum
from lowbit.losses.terms import IGNORE_INDEX, LOSS_TERMS, LogitTerm, LossInputs


class DivergenceTerm(LogitTerm):
    """T² · divergence between teacher and student next-token distributions, in token chunks."""

    needs = frozenset({"student_logits", "teacher_logits"})
    kind = "kl"

    def __init__(
        self,
        temperature: float = 1.0,
        beta: float = 0.5,
        chunk_size: int = 1024,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(ignore_index)
        if self.kind not in KINDS:
            raise ValueError(f"unknown KD kind {self.kind!r}")
        if not temperature > 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        if self.kind == "jsd" and not 0 < beta < 1:
            raise ValueError(f"kd_jsd needs 0 < beta < 1, got {beta}")
        self.temperature, self.beta, self.chunk_size = float(temperature), float(beta), chunk_size

    def rows(self, student: Tensor, teacher: Tensor | None, targets: Tensor) -> Tensor:
        assert teacher is not None
        mask = targets != self.ignore_index
        return kd_divergence_sum(
            student, teacher, mask, self.kind, self.temperature, self.beta, self.chunk_size
        )


@LOSS_TERMS.register("kd_kl")
class ForwardKLTerm(DivergenceTerm):
    kind = "kl"


@LOSS_TERMS.register("kd_rkl")
class ReverseKLTerm(DivergenceTerm):
    kind = "rkl"


@LOSS_TERMS.register("kd_jsd")
class JensenShannonTerm(DivergenceTerm):
    kind = "jsd"


@LOSS_TERMS.register("kd_topk")
class TopKTerm(LogitTerm):
    """KL over the teacher's top-k tokens (renormalised), optionally with the tail-mass bucket."""

    needs = frozenset({"student_logits", "teacher_logits"})

    def __init__(
        self, k: int = 64, temperature: float = 1.0, tail: bool = True, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__(ignore_index)
        if k < 1:
            raise ValueError(f"kd_topk needs k >= 1, got {k}")
        if not temperature > 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.k, self.temperature, self.tail = k, float(temperature), tail

    def forward(self, inputs: LossInputs) -> Tensor:
        if inputs.teacher_topk is not None:  # an offline cache: (values, indices, logsumexp) per position
            if inputs.student_logits is None:
                raise ValueError("kd_topk needs the student's logits")
            values, indices, lse = (
                t[..., :-1, :] if t.dim() == 3 else t[..., :-1] for t in inputs.teacher_topk
            )
            mask = inputs.labels[..., 1:] != self.ignore_index
            student = inputs.student_logits[..., :-1, :]
            return topk_kl_sum(student, values, indices, mask, self.temperature, lse if self.tail else None)
        return super().forward(inputs)

    def rows(self, student: Tensor, teacher: Tensor | None, targets: Tensor) -> Tensor:
        assert teacher is not None
        values, indices, lse = teacher_topk(teacher, self.k, self.temperature)
        mask = targets != self.ignore_index
        return topk_kl_sum(student, values, indices, mask, self.temperature, lse if self.tail else None)


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's k largest logits, their token ids, and logsumexp(z / T) over the vocabulary."""
    logits = teacher_logits.float()
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return values, indices, (logits / temperature).logsumexp(-1)
