"""KD losses against direct float64 formulas, chunked == unchunked, gradients, limits, errors."""

from __future__ import annotations

import pytest
import torch

from lowbit.losses import LossInputs, build_objective, kd_divergence_sum, kd_loss, topk_kl_sum


def reference(student, teacher, labels, kind, temperature, beta=0.5):
    """T² · mean over valid positions of the divergence, by the textbook formula in float64."""
    s, t = student.double() / temperature, teacher.double() / temperature
    log_s, log_t = (
        s - s.logsumexp(-1, keepdim=True),
        t - t.logsumexp(-1, keepdim=True),
    )  # log p, by definition
    p_s, p_t = log_s.exp(), log_t.exp()
    if kind == "kl":
        per = (p_t * (log_t - log_s)).sum(-1)
    elif kind == "rkl":
        per = (p_s * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.stack(
            [log_t + torch.tensor(beta).log(), log_s + torch.tensor(1 - beta).log()]
        ).logsumexp(0)
        per = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    mask = torch.ones_like(per, dtype=torch.bool) if labels is None else labels != -100
    return temperature**2 * per[mask].mean()


def logits(seed, scale=3.0, shape=(3, 7, 50)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * scale, torch.randn(shape, generator=generator) * scale


@pytest.mark.parametrize("kind", ["kl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kd_loss_matches_float64_formula_with_masking(kind, temperature):
    student, teacher = logits(1)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :4] = -100
    labels[2, 6] = -100
    got = kd_loss(student, teacher, labels, kind=kind, temperature=temperature, beta=0.3)
    assert got.item() == pytest.approx(
        reference(student, teacher, labels, kind, temperature, 0.3).item(), rel=1e-5
    )
    unmasked = kd_loss(student, teacher, None, kind=kind, temperature=temperature, beta=0.3)
    assert unmasked.item() == pytest.approx(
        reference(student, teacher, None, kind, temperature, 0.3).item(), rel=1e-5
    )


@pytest.mark.parametrize("kind", ["kl", "rkl", "jsd"])
def test_extreme_logits_stay_finite_and_exact(kind):
    student, teacher = logits(2, scale=300.0)  # softmax saturates: probabilities of exactly 0 in fp32
    got = kd_loss(student, teacher, kind=kind)
    assert torch.isfinite(got)
    expected = reference(student.double(), teacher.double(), None, kind, 1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("kind", ["kl", "rkl", "jsd"])
def test_chunked_equals_unchunked_values_and_gradients(kind):
    student, teacher = logits(3, shape=(4, 33, 64))
    mask = torch.rand(4, 33, generator=torch.Generator().manual_seed(0)) > 0.3
    results = []
    for chunk in (None, 7, 1000):
        s = student.clone().requires_grad_(True)
        value = kd_divergence_sum(s, teacher, mask, kind, 2.0, 0.4, chunk_size=chunk)
        value.backward()
        results.append((value.detach(), s.grad))
    for value, grad in results[1:]:
        assert torch.allclose(value, results[0][0], rtol=1e-6)
        assert torch.allclose(grad, results[0][1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["kl", "rkl", "jsd"])
def test_gradcheck_float64(kind):
    student, teacher = logits(4, shape=(2, 3, 5))
    s = student.double().requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(
        lambda x: kd_divergence_sum(x, teacher.double(), mask, kind, 1.5, 0.3, chunk_size=2), (s,)
    )


def test_forward_kl_gradient_is_temperature_times_prob_difference():
    student, teacher = logits(5, shape=(1, 1, 10))
    s = student.double().requires_grad_(True)
    temperature = 2.0
    kd_divergence_sum(s, teacher.double(), None, "kl", temperature).backward()
    expected = temperature * (
        torch.softmax(student.double() / temperature, -1) - torch.softmax(teacher.double() / temperature, -1)
    )
    assert torch.allclose(s.grad, expected)


def test_jsd_tends_to_forward_and_reverse_kl_at_the_ends():
    student, teacher = (x.double() for x in logits(6, scale=1.0))  # float64: beta is tiny
    forward, reverse = kd_loss(student, teacher, kind="kl"), kd_loss(student, teacher, kind="rkl")
    small = 1e-7
    assert (kd_loss(student, teacher, kind="jsd", beta=small) / small).item() == pytest.approx(
        forward.item(), rel=1e-4
    )
    assert (kd_loss(student, teacher, kind="jsd", beta=1 - small) / small).item() == pytest.approx(
        reverse.item(), rel=1e-4
    )


def test_topk_with_full_vocabulary_equals_forward_kl_and_tail_matters():
    student, teacher = logits(7, shape=(2, 5, 20))
    full = kd_divergence_sum(student, teacher, None, "kl", 2.0)
    values, indices = teacher.topk(20, dim=-1)
    assert topk_kl_sum(student, values, indices, None, 2.0).item() == pytest.approx(full.item(), rel=1e-5)
    lse = (teacher / 2.0).logsumexp(-1)
    assert topk_kl_sum(student, values, indices, None, 2.0, lse).item() == pytest.approx(
        full.item(), rel=1e-4
    )
    top3 = teacher.topk(3, dim=-1)
    renormalised = topk_kl_sum(student, top3.values, top3.indices, None, 2.0)
    with_tail = topk_kl_sum(student, top3.values, top3.indices, None, 2.0, lse)
    assert renormalised.item() != pytest.approx(with_tail.item(), rel=1e-3)


def test_teacher_gets_no_gradient_and_objective_composes_ce_and_kd():
    student, teacher = logits(8, shape=(2, 6, 12))
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    labels = torch.randint(0, 12, (2, 6))
    labels[0, 3] = -100
    objective = build_objective(
        [{"kind": "ce", "weight": 0.5}, {"kind": "kd_kl", "weight": 0.5, "temperature": 2.0}]
    )
    assert objective.needs == {"student_logits", "teacher_logits"}
    num_tokens = int((labels[:, 1:] != -100).sum())
    loss, parts = objective(
        LossInputs(labels=labels, student_logits=student, teacher_logits=teacher), num_tokens
    )
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    expected_kd = reference(student[:, :-1].detach(), teacher[:, :-1].detach(), labels[:, 1:], "kl", 2.0)
    assert (parts["kd_kl"] / num_tokens).item() == pytest.approx(expected_kd.item(), rel=1e-5)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda s, t: kd_loss(s, t, temperature=0.0), "temperature must be > 0"),
        (lambda s, t: kd_loss(s, t, kind="jsd", beta=1.0), "0 < beta < 1"),
        (lambda s, t: kd_loss(s, t, kind="js"), "unknown KD kind 'js'"),
        (
            lambda s, t: kd_loss(s, t[..., :40]),
            r"student logits \(3, 7, 50\) and teacher logits \(3, 7, 40\) differ",
        ),
        (lambda s, t: build_objective([{"kind": "kd_kl", "temperature": -1}]), "temperature must be > 0"),
        (lambda s, t: build_objective([{"kind": "kd_kl", "weight": 0.0}]), "sum to 0"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    student, teacher = logits(9)
    with pytest.raises(ValueError, match=message):
        call(student, teacher)
