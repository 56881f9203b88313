"""Hidden-state distillation: match chosen student layers to chosen teacher layers.

    {kind: hidden, weight: 1.0, layer_map: [[1, 2], [2, 4]], distance: mse}

``layer_map`` pairs (student layer, teacher layer) in transformers' ``hidden_states`` numbering:
0 is the embedding output, i the output of layer i. When the widths differ a learned linear
projection maps the student's states to the teacher's width (trained with the student). Per
token the distance is the mean squared error over the width, or 1 − cosine similarity; the
term sums it over counted positions and averages over the pairs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.losses.terms import IGNORE_INDEX, LOSS_TERMS, LossInputs, LossTerm, ModelShapes, parse_layer_map

DISTANCES = ("mse", "cosine")


@LOSS_TERMS.register("hidden")
class HiddenStateTerm(LossTerm):
    needs = frozenset({"student_hidden", "teacher_hidden"})

    def __init__(
        self,
        layer_map: list[list[int]] | None = None,
        distance: str = "mse",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(ignore_index)
        if distance not in DISTANCES:
            raise ValueError(f"hidden: unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
        self.layer_map = parse_layer_map("hidden", layer_map)
        self.distance = distance
        self.projection: nn.Module = nn.Identity()

    def configure(self, shapes: ModelShapes) -> None:
        if shapes.teacher_layers is None or shapes.teacher_hidden_size is None:
            raise ValueError("the 'hidden' loss term needs a teacher: set teacher.path")
        for student_layer, teacher_layer in self.layer_map:
            if not 0 <= student_layer <= shapes.student_layers:
                raise ValueError(
                    f"hidden: layer_map pair [{student_layer}, {teacher_layer}]: the student has hidden states "
                    f"0..{shapes.student_layers}"
                )
            if not 0 <= teacher_layer <= shapes.teacher_layers:
                raise ValueError(
                    f"hidden: layer_map pair [{student_layer}, {teacher_layer}]: the teacher has hidden states "
                    f"0..{shapes.teacher_layers}"
                )
        if shapes.student_hidden_size != shapes.teacher_hidden_size:
            self.projection = nn.Linear(shapes.student_hidden_size, shapes.teacher_hidden_size, bias=False)

    def forward(self, inputs: LossInputs) -> Tensor:
        if inputs.student_hidden is None or inputs.teacher_hidden is None:
            raise ValueError("the 'hidden' loss term needs both models' hidden states")
        mask = inputs.labels[..., 1:] != self.ignore_index
        total = None
        for student_layer, teacher_layer in self.layer_map:
            student = self.projection(inputs.student_hidden[student_layer][..., :-1, :]).float()
            teacher = inputs.teacher_hidden[teacher_layer][..., :-1, :].detach().float()
            if self.distance == "mse":
                per_token = (student - teacher).pow(2).mean(-1)
            else:
                per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)
            value = per_token[mask].sum()
            total = value if total is None else total + value
        assert total is not None
        return total / len(self.layer_map)
