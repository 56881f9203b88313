"""Attention-relation distillation (MiniLMv2; the BitDistill recipe for 1.58-bit students).

For a chosen student layer and teacher layer, and for each of the query, key and value
projections X, split X into ``relation_heads`` heads and form the relation
``R = softmax(X Xᵀ / sqrt(d_head))`` over the (causally masked) positions. The loss is
KL(R_teacher ‖ R_student) per query position, averaged over heads, over Q/K/V and over the layer
pairs, summed over counted positions. Relations compare positions with positions, so the two
models' widths and head counts need not match: only ``relation_heads`` must divide both widths.

    {kind: attn_relation, weight: 1.0, layer_map: [[11, 23]], relation_heads: 8}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.losses.terms import IGNORE_INDEX, LOSS_TERMS, LossInputs, LossTerm, ModelShapes, parse_layer_map

PROJECTIONS = ("q", "k", "v")


def relation_log_probs(x: Tensor, heads: int) -> Tensor:
    """log softmax(X Xᵀ / sqrt(d)) per relation head, causally masked: ``[B, heads, L, L]`` in fp32."""
    batch, length, width = x.shape
    per_head = x.float().reshape(batch, length, heads, width // heads).transpose(1, 2)
    scores = per_head @ per_head.transpose(-1, -2) / math.sqrt(width // heads)
    future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
    return F.log_softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def relation_kl_rows(student: Tensor, teacher: Tensor, heads: int) -> Tensor:
    """KL(R_t ‖ R_s) per query position, averaged over relation heads: ``[B, L]``."""
    log_s, log_t = relation_log_probs(student, heads), relation_log_probs(teacher.detach(), heads)
    p_t = log_t.exp()
    terms = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t))  # masked entries are 0·(-inf)
    return terms.sum(-1).mean(1)


@LOSS_TERMS.register("attn_relation")
class AttentionRelationTerm(LossTerm):
    needs = frozenset({"student_qkv", "teacher_qkv"})

    def __init__(
        self,
        layer_map: list[list[int]] | None = None,
        relation_heads: int = 8,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(ignore_index)
        if relation_heads < 1:
            raise ValueError(f"attn_relation: relation_heads must be >= 1, got {relation_heads}")
        self.layer_map = parse_layer_map("attn_relation", layer_map)
        self.relation_heads = relation_heads

    @property
    def qkv_layers(self) -> dict[str, list[int]]:
        """Decoder layers whose q/k/v projections the trainer must capture, per model."""
        return {"student": [s for s, _ in self.layer_map], "teacher": [t for _, t in self.layer_map]}

    def configure(self, shapes: ModelShapes) -> None:
        if shapes.teacher_layers is None or shapes.teacher_hidden_size is None:
            raise ValueError("the 'attn_relation' loss term needs a teacher: set teacher.path")
        for student_layer, teacher_layer in self.layer_map:
            if not 0 <= student_layer < shapes.student_layers:
                raise ValueError(
                    f"attn_relation: layer_map pair [{student_layer}, {teacher_layer}]: the student has layers 0..{shapes.student_layers - 1}"
                )
            if not 0 <= teacher_layer < shapes.teacher_layers:
                raise ValueError(
                    f"attn_relation: layer_map pair [{student_layer}, {teacher_layer}]: the teacher has layers 0..{shapes.teacher_layers - 1}"
                )

    def forward(self, inputs: LossInputs) -> Tensor:
        if inputs.student_qkv is None or inputs.teacher_qkv is None:
            raise ValueError("the 'attn_relation' loss term needs both models' q/k/v projections")
        mask = inputs.labels[..., 1:] != self.ignore_index
        total = None
        for student_layer, teacher_layer in self.layer_map:
            for name in PROJECTIONS:
                student = inputs.student_qkv[student_layer][name]
                teacher = inputs.teacher_qkv[teacher_layer][name]
                for x in (student, teacher):
                    if x.shape[-1] % self.relation_heads:
                        raise ValueError(
                            f"attn_relation: relation_heads {self.relation_heads} does not divide a width of {x.shape[-1]}"
                        )
                rows = relation_kl_rows(student, teacher, self.relation_heads)[..., :-1]
                value = rows[mask].sum()
                total = value if total is None else total + value
        assert total is not None
        return total / (len(self.layer_map) * len(PROJECTIONS))
