"""Hidden-state distillation term: formula, masking, projection, layer-map errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.losses import LossInputs, ModelShapes, build_objective


def states(seed, layers, width, shape=(2, 5)):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, width, generator=generator) for _ in range(layers + 1))


def test_mse_and_cosine_match_direct_formulas_with_masking():
    student, teacher = states(0, 2, 8), states(1, 4, 8)
    labels = torch.randint(0, 10, (2, 5))
    labels[0, 2] = -100
    mask = labels[:, 1:] != -100
    for distance in ("mse", "cosine"):
        objective = build_objective([{"kind": "hidden", "layer_map": [[1, 2], [2, 4]], "distance": distance}])
        objective.configure(ModelShapes(8, 2, 8, 4))
        inputs = LossInputs(labels=labels, student_hidden=student, teacher_hidden=teacher)
        _, parts = objective(inputs, num_tokens=1)
        expected = 0.0
        for s, t in ((1, 2), (2, 4)):
            a, b = student[s][:, :-1].double(), teacher[t][:, :-1].double()
            per = (a - b).pow(2).mean(-1) if distance == "mse" else 1 - F.cosine_similarity(a, b, dim=-1)
            expected += per[mask].sum().item() / 2
        assert parts["hidden"].item() == pytest.approx(expected, rel=1e-5)


def test_projection_when_widths_differ_is_learned():
    objective = build_objective([{"kind": "hidden", "layer_map": [[2, 3]]}])
    objective.configure(
        ModelShapes(student_hidden_size=6, student_layers=2, teacher_hidden_size=10, teacher_layers=3)
    )
    params = list(objective.parameters())
    assert [p.shape for p in params] == [torch.Size([10, 6])]
    student = tuple(s.requires_grad_(True) for s in states(2, 2, 6))
    inputs = LossInputs(
        labels=torch.zeros(2, 5, dtype=torch.long), student_hidden=student, teacher_hidden=states(3, 3, 10)
    )
    loss, _ = objective(inputs, num_tokens=8)
    loss.backward()
    assert params[0].grad is not None and student[2].grad is not None and student[1].grad is None


@pytest.mark.parametrize(
    "layer_map,message",
    [
        ([[3, 1]], r"\[3, 1\]: the student has hidden states 0..2"),
        ([[1, 9]], r"\[1, 9\]: the teacher has hidden states 0..4"),
    ],
)
def test_layer_map_outside_either_model_is_an_error(layer_map, message):
    objective = build_objective([{"kind": "hidden", "layer_map": layer_map}])
    with pytest.raises(ValueError, match=message):
        objective.configure(ModelShapes(8, 2, 8, 4))
    with pytest.raises(ValueError, match="needs a teacher"):
        objective.configure(ModelShapes(8, 2))
    with pytest.raises(ValueError, match="non-empty list"):
        build_objective([{"kind": "hidden", "layer_map": []}])
