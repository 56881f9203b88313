"""Fused-head path: logit terms from hidden states in chunks == the same terms on full logits."""

from __future__ import annotations

import pytest
import torch

from lowbit.losses import LossInputs, build_objective
from lowbit.losses.fused_head import HeadInputs

TERMS = [
    {"kind": "ce", "weight": 0.5},
    {"kind": "kd_kl", "weight": 0.3, "temperature": 2.0},
    {"kind": "kd_jsd", "weight": 0.1, "beta": 0.3},
    {"kind": "kd_topk", "weight": 0.1, "k": 5},
]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_fused_head_equals_full_logits_values_and_gradients(chunk):
    generator = torch.Generator().manual_seed(chunk)
    student_hidden = torch.randn(2, 9, 16, generator=generator)
    teacher_hidden = torch.randn(2, 9, 24, generator=generator)
    student_head, teacher_head = torch.nn.Linear(16, 40), torch.nn.Linear(24, 40, bias=False)
    labels = torch.randint(0, 40, (2, 9), generator=generator)
    labels[0, 3:6] = -100
    num_tokens = int((labels[:, 1:] != -100).sum())
    objective = build_objective(TERMS)
    results = []
    for fused in (False, True):
        hidden = student_hidden.clone().requires_grad_(True)
        student_head.zero_grad()
        if fused:
            head = HeadInputs(hidden, student_head, teacher_hidden, teacher_head, chunk_size=chunk)
            loss, parts = objective(LossInputs(labels=labels), num_tokens, head=head)
        else:
            inputs = LossInputs(
                labels=labels,
                student_logits=student_head(hidden),
                teacher_logits=teacher_head(teacher_hidden),
            )
            loss, parts = objective(inputs, num_tokens)
        loss.backward()
        results.append((loss.detach(), parts, hidden.grad.clone(), student_head.weight.grad.clone()))
    (loss_a, parts_a, grad_a, weight_a), (loss_b, parts_b, grad_b, weight_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert all(torch.allclose(parts_a[name], parts_b[name], rtol=1e-5) for name in parts_a)
    assert torch.allclose(grad_a, grad_b, rtol=1e-4, atol=1e-7)
    assert torch.allclose(weight_a, weight_b, rtol=1e-4, atol=1e-7)
    assert teacher_head.weight.grad is None
