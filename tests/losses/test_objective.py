"""CE term and the weighted objective against a float64 textbook formula."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.losses import (
    LOSS_TERMS,
    CrossEntropyTerm,
    LossInputs,
    LossTerm,
    Objective,
    UnknownChoiceError,
    build_objective,
    count_target_tokens,
    cross_entropy_mean,
)


def reference_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Σ over valid next-token targets of -log softmax(logits_t)[label_{t+1}], in float64 by hand."""
    total = 0.0
    batch, length, _ = logits.shape
    for b in range(batch):
        for t in range(length - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[target])
    return total


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])  # 1e4: extreme logits, fp32 log-softmax must not overflow
def test_ce_term_matches_float64_reference(scale):
    generator = torch.Generator().manual_seed(int(scale))
    logits = torch.randn(3, 7, 11, generator=generator) * scale
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, 2:5] = -100
    labels[2, :] = -100
    got = CrossEntropyTerm()(LossInputs(labels=labels, student_logits=logits))
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(reference_ce_sum(logits, labels), rel=1e-5)
    assert count_target_tokens(labels) == (labels[:, 1:] != -100).sum() == 9


def test_ce_in_bf16_logits_is_computed_in_fp32():
    logits = torch.randn(2, 5, 9, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5))
    low = cross_entropy_mean(logits.to(torch.bfloat16), labels)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(
        cross_entropy_mean(logits.to(torch.bfloat16).double(), labels).item(), rel=1e-6
    )


def test_objective_weights_and_normalises_by_the_given_token_count():
    @LOSS_TERMS.register("test_constant")
    class Constant(LossTerm):
        needs = frozenset()

        def __init__(self, value: float = 1.0, ignore_index: int = -100):
            super().__init__(ignore_index)
            self.value = value

        def forward(self, inputs):
            return torch.tensor(self.value)

    logits, labels = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    objective = build_objective(
        [{"kind": "ce", "weight": 0.5}, {"kind": "test_constant", "value": 6.0, "weight": 2.0}]
    )
    assert objective.needs == {"student_logits"}
    loss, parts = objective(LossInputs(labels=labels, student_logits=logits), num_tokens=4)
    ce_sum = reference_ce_sum(logits, labels)
    assert parts["ce"].item() == pytest.approx(ce_sum, rel=1e-6)
    assert loss.item() == pytest.approx((0.5 * ce_sum + 2.0 * 6.0) / 4, rel=1e-6)


def test_objective_errors():
    with pytest.raises(UnknownChoiceError, match=r"unknown loss term 'kl'.*Known: .*ce"):
        build_objective([{"kind": "kl"}])
    with pytest.raises(UnknownChoiceError, match=r"loss term 'ce' has no field 'temprature'"):
        build_objective([{"kind": "ce", "temprature": 2.0}])
    with pytest.raises(ValueError, match="sum to 0"):
        build_objective([{"kind": "ce", "weight": 0.0}])
    with pytest.raises(ValueError, match="unique"):
        build_objective([{"kind": "ce"}, {"kind": "ce"}])
    with pytest.raises(ValueError, match="no loss terms"):
        Objective([])
