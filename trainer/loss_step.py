"""One micro-batch's loss: everything the objective reads, prepared, and the objective applied.

The loop calls ``loss_step(model, batch, target_tokens)`` and gets back the loss to backward and
each term's value; it never knows which terms exist. Here the student runs (capturing the q/k/v
projections a relation term reads, or handing back final hidden states instead of logits for
the fused head), and the teacher runs — or its offline top-k cache is read — only when a term
reads it, with vocabularies that differ only in padding rows compared on the shared range.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.losses import LossInputs, Objective, count_target_tokens
from lowbit.losses.fused_head import HeadInputs
from lowbit.trainer.capture import capture_qkv, head_as_identity
from lowbit.trainer.data import model_inputs
from lowbit.trainer.evaluate import autocast
from lowbit.trainer.teacher import Teacher
from lowbit.trainer.teacher_cache import TeacherCache


class LossStep:
    """Student forward, teacher (or cache) and objective for one micro-batch.

    Args:
        unwrap: the engine's ``unwrap`` (the plain model, for capture hooks and the head swap).
        fused_head_chunk: >0 computes the logit terms from hidden states this many tokens at a time.
        head_by_call: call the student's head module instead of reading its weight (an engine that
            gathers parameters only inside a module's forward, ZeRO-3).
        max_over_ranks: where a head call is a collective (ZeRO-3 gathers in it), the largest value
            over all ranks; every rank then runs as many fused-head chunks as the busiest one.
    """

    def __init__(
        self,
        objective: Objective,
        teacher: Teacher | None,
        teacher_cache: TeacherCache | None,
        unwrap: Callable[[nn.Module], nn.Module],
        device: torch.device,
        precision: str,
        fused_head_chunk: int = 0,
        head_by_call: bool = False,
        max_over_ranks: Callable[[int], int] | None = None,
    ) -> None:
        self.objective = objective
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.unwrap = unwrap
        self.device = device
        self.precision = precision
        self.fused_head_chunk = fused_head_chunk
        self.head_by_call = head_by_call
        self.max_over_ranks = max_over_ranks
        self.needs = objective.needs
        self.term_probe: Callable[[dict[str, Tensor], dict[str, Tensor], float], None] | None = None
        """Set by a hook for one call: gets each term's graph before the backward (term_gradients)."""

    def __call__(
        self, model: nn.Module, batch: dict[str, Tensor], target_tokens: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss normalised by the step's global ``target_tokens``, {term: unweighted sum})."""
        fused = self.fused_head_chunk > 0
        plain = self.unwrap(model)
        with (
            autocast(self.device, self.precision),
            capture_qkv(plain, self.objective.qkv_layers("student")) as qkv,
            head_as_identity(plain) if fused else contextlib.nullcontext() as student_head,
        ):
            outputs = model(**model_inputs(batch), output_hidden_states="student_hidden" in self.needs)
        inputs, head = self._inputs(batch, outputs, student_head)
        inputs.student_qkv = qkv if "student_qkv" in self.needs else None
        if self.term_probe is not None:
            probe, self.term_probe = self.term_probe, None
            graphs: dict[str, Tensor] = {}
            result = self.objective(inputs, target_tokens, head, graphs)
            probe(graphs, batch, float(target_tokens))
            return result
        # The fused head applies the lm_head inside the loss: under the forward's autocast.
        with autocast(self.device, self.precision) if fused else contextlib.nullcontext():
            return self.objective(inputs, target_tokens, head)

    def _head(self, head: nn.Module) -> Callable[[Tensor], Tensor]:
        # A lambda is not an nn.Linear, so the fused head calls it rather than reading its weight.
        return (lambda rows: head(rows)) if self.head_by_call else head

    def _inputs(self, batch, outputs, student_head: nn.Module | None) -> tuple[LossInputs, HeadInputs | None]:
        """What the loss terms read; with the fused head (``student_head`` given) ``outputs.logits``
        are final hidden states, handed over with the heads as ``HeadInputs``."""
        inputs = LossInputs(labels=batch["labels"], student_logits=None if student_head else outputs.logits)
        head = None
        if student_head is not None:
            head = HeadInputs(outputs.logits, self._head(student_head), chunk_size=self.fused_head_chunk)
            if self.max_over_ranks is not None:
                counted = int(count_target_tokens(batch["labels"]))
                head.min_chunks = self.max_over_ranks(-(-counted // self.fused_head_chunk))
        if "student_hidden" in self.needs:
            inputs.student_hidden = outputs.hidden_states
        if not any(need.startswith("teacher") for need in self.needs):
            return inputs, head
        if self.teacher_cache is not None:  # offline teacher: its stored top-k for these examples
            inputs.teacher_topk = self.teacher_cache.lookup(batch["index"].cpu(), self.device)
            return inputs, head
        teacher = self.teacher
        assert teacher is not None  # checked when the objective was built
        with (
            autocast(self.device, self.precision),
            capture_qkv(teacher.model, self.objective.qkv_layers("teacher")) as teacher_qkv,
            head_as_identity(teacher.model) if head else contextlib.nullcontext() as teacher_head,
        ):
            teacher_outputs = teacher.forward(
                **model_inputs(batch), hidden_states="teacher_hidden" in self.needs
            )
        inputs.teacher_hidden = teacher_outputs.hidden_states
        inputs.teacher_qkv = teacher_qkv if "teacher_qkv" in self.needs else None
        if head is not None:
            head.teacher_hidden, head.teacher_head = teacher_outputs.logits, self._head(teacher_head)
            return inputs, head
        inputs.teacher_logits = teacher_outputs.logits
        if teacher.shared_vocab is not None:  # heads that differ only in padding rows
            inputs.student_logits = inputs.student_logits[..., : teacher.shared_vocab]
            inputs.teacher_logits = inputs.teacher_logits[..., : teacher.shared_vocab]
        return inputs, head
