"""Loss terms: each an ``nn.Module`` that returns a *sum over valid target tokens*.

Why sums: a step may span several micro-batches and ranks whose valid-token counts differ
(masked prompts, padding). Summing per term and dividing once by the global count makes the
loss — and so the gradient — independent of how the global batch was split, which is what lets a
2-process run reproduce a 1-process run step for step.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.losses.registry import Registry

IGNORE_INDEX = -100

LOSS_TERMS: Registry[LossTerm] = Registry("loss term")


@dataclass
class LossInputs:
    """What a model forward produced for one micro-batch, handed to every loss term.

    ``labels`` are aligned with ``input_ids`` (not shifted): position t's logits predict label t+1.
    Later terms (distillation) read the optional teacher fields.
    """

    labels: Tensor
    student_logits: Tensor | None = None
    teacher_logits: Tensor | None = None
    #: Per-layer hidden states as transformers returns them: [0] embeddings, [i] after layer i.
    student_hidden: tuple[Tensor, ...] | None = None
    teacher_hidden: tuple[Tensor, ...] | None = None
    #: An offline teacher's top-k (values, indices, logsumexp(z/T)) per position, instead of its logits.
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None = None
    #: Outputs of the q/k/v projections of chosen decoder layers: {layer: {"q": ..., "k": ..., "v": ...}}.
    student_qkv: dict[int, dict[str, Tensor]] | None = None
    teacher_qkv: dict[int, dict[str, Tensor]] | None = None


@dataclass
class ModelShapes:
    """Widths and depths of the student and teacher, for terms that build parameters to fit them."""

    student_hidden_size: int
    student_layers: int
    teacher_hidden_size: int | None = None
    teacher_layers: int | None = None


def count_target_tokens(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of next-token targets that count towards the loss in a batch of labels."""
    return (labels[..., 1:] != ignore_index).sum()


def next_token_pairs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten logits at positions 0..L-2 and the labels they predict (1..L-1)."""
    vocab = logits.shape[-1]
    return logits[..., :-1, :].reshape(-1, vocab), labels[..., 1:].reshape(-1)


def parse_layer_map(term: str, layer_map: list[list[int]] | None) -> list[tuple[int, int]]:
    """``[[student_layer, teacher_layer], ...]`` from config as int pairs, or a clear error."""
    if not layer_map or any(len(pair) != 2 for pair in layer_map):
        raise ValueError(
            f"{term}: layer_map must be a non-empty list of [student_layer, teacher_layer] pairs"
        )
    return [(int(student), int(teacher)) for student, teacher in layer_map]


class LossTerm(nn.Module):
    """Base class: ``forward(inputs) -> Tensor`` (a scalar sum over valid target tokens)."""

    #: Which ``LossInputs`` fields the term reads; the trainer computes only what is needed.
    needs: frozenset[str] = frozenset({"student_logits"})

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def configure(self, shapes: ModelShapes) -> None:
        """Called once the models exist: check layer maps, create projections. Default: nothing."""

    @property
    def qkv_layers(self) -> dict[str, list[int]]:
        """Decoder layers whose q/k/v projections this term reads, per model ("student", "teacher")."""
        return {}


class LogitTerm(LossTerm, abc.ABC):
    """A term computed from next-token logits alone, row by row.

    ``rows(student, teacher, targets)`` takes flattened ``[tokens, vocab]`` logits and the targets
    they predict; ``forward`` only flattens. The split lets the fused-head path hand the same
    terms chunks of logits that it builds from hidden states, never the whole ``[tokens, vocab]``.
    """

    @abc.abstractmethod
    def rows(self, student: Tensor, teacher: Tensor | None, targets: Tensor) -> Tensor:
        """Sum of the term over rows whose target is not ignored."""

    def forward(self, inputs: LossInputs) -> Tensor:
        if inputs.student_logits is None:
            raise ValueError(f"the {type(self).__name__} loss term needs the student's logits")
        student, targets = next_token_pairs(inputs.student_logits, inputs.labels)
        teacher = None
        if "teacher_logits" in self.needs:
            if inputs.teacher_logits is None:
                raise ValueError("a KD term needs the teacher's logits (is a teacher configured?)")
            teacher, _ = next_token_pairs(inputs.teacher_logits, inputs.labels)
        return self.rows(student, teacher, targets)


@LOSS_TERMS.register("ce")
class CrossEntropyTerm(LogitTerm):
    """Next-token cross-entropy on the hard labels, log-softmax in fp32."""

    def rows(self, student: Tensor, teacher: Tensor | None, targets: Tensor) -> Tensor:
        return F.cross_entropy(student.float(), targets, ignore_index=self.ignore_index, reduction="sum")


def cross_entropy_mean(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy over valid tokens (a convenience for notebooks and eval)."""
    total = CrossEntropyTerm(ignore_index)(LossInputs(labels=labels, student_logits=logits))
    return total / count_target_tokens(labels, ignore_index).clamp_min(1)
