"""The fused-head path: logit terms computed from hidden states chunk by chunk.

Instead of the model producing ``[tokens, vocab]`` logits (and the loss an fp32 copy, and for
distillation the same again for the teacher), the objective receives both models' final hidden
states and output heads, and for each chunk of counted tokens builds that chunk's logits, applies
every logit term, and drops them. The chunk function is checkpointed, so backward recomputes the
chunk's logits instead of keeping them: peak memory is one chunk's logits, whatever the vocab.
The terms are the same ``LogitTerm.rows`` as the unfused path, so the results agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lowbit.losses.terms import IGNORE_INDEX, LogitTerm


@dataclass
class HeadInputs:
    """Final hidden states ``[B, L, D]`` and the head that maps them to logits, per model."""

    student_hidden: Tensor
    student_head: Callable[[Tensor], Tensor]
    teacher_hidden: Tensor | None = None
    teacher_head: Callable[[Tensor], Tensor] | None = None
    chunk_size: int = 1024


def head_chunked_sums(
    terms: Sequence[LogitTerm], head: HeadInputs, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> list[Tensor]:
    """Each term's sum over counted next-token positions, computed chunk by chunk."""
    width = head.student_hidden.shape[-1]
    targets = labels[..., 1:].reshape(-1)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    student = head.student_hidden[..., :-1, :].reshape(-1, width).index_select(0, keep)
    teacher = None
    if head.teacher_hidden is not None:
        teacher_width = head.teacher_hidden.shape[-1]
        teacher = head.teacher_hidden[..., :-1, :].reshape(-1, teacher_width).index_select(0, keep).detach()
    targets = targets.index_select(0, keep)

    def chunk_sums(student_rows: Tensor, teacher_rows: Tensor | None, chunk_targets: Tensor) -> Tensor:
        logits = head.student_head(student_rows)
        teacher_logits = None
        if teacher_rows is not None and head.teacher_head is not None:
            with torch.no_grad():
                teacher_logits = head.teacher_head(teacher_rows)
            if teacher_logits.shape[-1] != logits.shape[-1]:  # heads that differ in padding rows only
                shared = min(teacher_logits.shape[-1], logits.shape[-1])
                logits, teacher_logits = logits[..., :shared], teacher_logits[..., :shared]
        return torch.stack([term.rows(logits, teacher_logits, chunk_targets).float() for term in terms])

    totals = torch.zeros(len(terms), device=student.device)
    step = max(1, head.chunk_size)
    for start in range(0, student.shape[0], step):
        piece = slice(start, start + step)
        teacher_piece = None if teacher is None else teacher[piece]
        totals = totals + checkpoint(
            chunk_sums, student[piece], teacher_piece, targets[piece], use_reentrant=False
        )
    return list(totals.unbind())
