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


@pytest.mark.parametrize(
    "chunk,head_kind",
    [(1, "linear"), (7, "linear"), (4096, "linear"), (7, "callable"), (4096, "callable"), (7, "compiled")],
)
def test_fused_head_equals_full_logits_values_and_gradients(chunk, head_kind, monkeypatch):
    """Linear heads take gradients in the forward (eager or compiled); other callables checkpoint."""
    if head_kind == "compiled":
        monkeypatch.setenv("LOWBIT_FUSED_HEAD_BACKEND", "compile")
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
            head_fn = student_head if head_kind != "callable" else (lambda h: student_head(h))
            head = HeadInputs(hidden, head_fn, teacher_hidden, teacher_head, chunk_size=chunk)
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


def test_fused_head_with_fake_quant_head_and_padded_teacher_vocab():
    """A fake-quant head is a linear map on its quantized weight; the gradient reaches the float
    weight through the STE; a teacher with 8 padding rows is compared on the shared 40."""
    from lowbit.quant import QuantSpec
    from lowbit.quant.modules import FakeQuantLinear

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 11, 32, generator=generator)
    teacher_hidden = torch.randn(2, 11, 32, generator=generator)
    head = FakeQuantLinear.from_linear(torch.nn.Linear(32, 40, bias=False), QuantSpec("int4", "group", 16))
    teacher_head = torch.nn.Linear(32, 48, bias=False)
    labels = torch.randint(0, 40, (2, 11), generator=generator)
    objective = build_objective(TERMS)
    num_tokens = int(labels[:, 1:].numel())
    grads = []
    for fused in (False, True):
        states = hidden.clone().requires_grad_(True)
        head.zero_grad()
        if fused:
            inputs, head_inputs = (
                LossInputs(labels=labels),
                HeadInputs(states, head, teacher_hidden, teacher_head, 5),
            )
        else:
            inputs = LossInputs(
                labels, student_logits=head(states), teacher_logits=teacher_head(teacher_hidden)[..., :40]
            )
            head_inputs = None
        loss, _ = objective(inputs, num_tokens, head=head_inputs)
        loss.backward()
        grads.append((loss.detach(), states.grad, head.weight.grad.clone()))
    (loss_a, states_a, weight_a), (loss_b, states_b, weight_b) = grads
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert torch.allclose(states_a, states_b, rtol=1e-4, atol=1e-7)
    assert torch.allclose(weight_a, weight_b, rtol=1e-4, atol=1e-7)
    assert weight_b.abs().sum() > 0


@pytest.mark.parametrize("head_kind", ["linear", "callable"])
@pytest.mark.parametrize("counted", [0, 5])
def test_min_chunks_pads_with_empty_chunks_that_call_the_heads_and_change_nothing(head_kind, counted):
    """Where a head call is a collective (ZeRO-3), a rank with fewer (or no) counted tokens runs
    empty chunks until it has called the heads as often as the busiest rank."""
    generator = torch.Generator().manual_seed(counted)
    student_head, teacher_head = torch.nn.Linear(16, 40), torch.nn.Linear(24, 40, bias=False)
    calls = {"student": 0, "teacher": 0}

    def counting(name, module):
        def call(rows):
            calls[name] += 1
            return module(rows)

        return call

    labels = torch.full((1, 9), -100)
    labels[0, 1 : 1 + counted] = torch.randint(0, 40, (counted,), generator=generator)
    student_hidden = torch.randn(1, 9, 16, generator=generator)
    teacher_hidden = torch.randn(1, 9, 24, generator=generator)
    objective = build_objective(TERMS[:2])
    results = []
    for min_chunks in (0, 6):
        calls.update(student=0, teacher=0)
        hidden = student_hidden.clone().requires_grad_(True)
        student_head.zero_grad()
        head_fn = student_head if head_kind == "linear" else counting("student", student_head)
        head = HeadInputs(hidden, head_fn, teacher_hidden, counting("teacher", teacher_head), chunk_size=2,
                          min_chunks=min_chunks)  # fmt: skip
        loss, _ = objective(LossInputs(labels=labels), max(counted, 1), head=head)
        loss.backward()
        weight_grad = student_head.weight.grad
        results.append(
            (loss.detach(), hidden.grad.clone(), torch.zeros(40, 16) if weight_grad is None else weight_grad)
        )
        chunks = max(-(-counted // 2), min_chunks)
        # a callable head is checkpointed: each chunk (teacher head included) runs again in backward
        per_chunk = 2 if head_kind == "callable" else 1
        assert calls["teacher"] == per_chunk * chunks
        assert calls["student"] == (per_chunk * chunks if head_kind == "callable" else 0)
    for plain, padded in zip(results[0], results[1]):
        assert torch.equal(plain, padded)
