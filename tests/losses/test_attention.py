"""Attention-relation term against a direct float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.losses import LossInputs, ModelShapes, build_objective
from lowbit.losses.attention import relation_kl_rows


def direct_rows(student, teacher, heads):
    """KL(R_t ‖ R_s) per query row, by loops over heads and rows, in float64."""
    batch, length, _ = student.shape
    out = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            xs = student[b].double().reshape(length, heads, -1)[:, h]
            xt = teacher[b].double().reshape(length, heads, -1)[:, h]
            for i in range(length):
                rs = torch.softmax(xs[: i + 1] @ xs[i] / math.sqrt(xs.shape[1]), 0)  # causal: rows see 0..i
                rt = torch.softmax(xt[: i + 1] @ xt[i] / math.sqrt(xt.shape[1]), 0)
                out[b, i] += (rt * (rt.log() - rs.log())).sum() / heads
    return out


def test_relation_kl_matches_direct_formula_across_widths():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 8, generator=generator), torch.randn(2, 6, 12, generator=generator)
    got = relation_kl_rows(student, teacher, heads=2)
    assert torch.allclose(got.double(), direct_rows(student, teacher, 2), rtol=1e-4, atol=1e-6)
    assert torch.allclose(relation_kl_rows(teacher, teacher, 4), torch.zeros(2, 6), atol=1e-6)


def test_term_masks_positions_and_averages_over_qkv_and_layers():
    generator = torch.Generator().manual_seed(1)

    def qkv(width):
        return {p: torch.randn(2, 5, width, generator=generator) for p in "qkv"}

    student, teacher = {0: qkv(8), 1: qkv(8)}, {3: qkv(16)}
    labels = torch.randint(0, 9, (2, 5))
    labels[1, 2] = -100
    objective = build_objective(
        [{"kind": "attn_relation", "layer_map": [[0, 3], [1, 3]], "relation_heads": 4}]
    )
    objective.configure(ModelShapes(8, 2, 16, 4))
    assert objective.qkv_layers("student") == [0, 1] and objective.qkv_layers("teacher") == [3]
    _, parts = objective(LossInputs(labels=labels, student_qkv=student, teacher_qkv=teacher), num_tokens=1)
    mask = labels[:, 1:] != -100
    expected = (
        sum(
            direct_rows(student[s][p], teacher[t][p], 4)[:, :-1][mask].sum()
            for s, t in ((0, 3), (1, 3))
            for p in "qkv"
        )
        / 6
    )
    assert parts["attn_relation"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_attention_relation_errors():
    objective = build_objective([{"kind": "attn_relation", "layer_map": [[0, 9]]}])
    with pytest.raises(ValueError, match=r"the teacher has layers 0..3"):
        objective.configure(ModelShapes(8, 2, 16, 4))
    objective = build_objective([{"kind": "attn_relation", "layer_map": [[0, 0]], "relation_heads": 3}])
    objective.configure(ModelShapes(8, 1, 8, 1))
    qkv = {0: {p: torch.randn(1, 4, 8) for p in "qkv"}}
    with pytest.raises(ValueError, match="relation_heads 3 does not divide a width of 8"):
        objective(LossInputs(labels=torch.zeros(1, 4, dtype=torch.long), student_qkv=qkv, teacher_qkv=qkv), 1)
