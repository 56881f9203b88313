"""The fused-head path: logit terms computed from hidden states chunk by chunk.

Instead of the model producing ``[tokens, vocab]`` logits (and the loss an fp32 copy, and for
distillation the same again for the teacher), the objective receives both models' final hidden
states and output heads, and for each chunk of counted tokens builds that chunk's logits, applies
every logit term, and drops them. Peak memory is one chunk's logits, whatever the vocab.

Two ways to get the gradients, both equal to the full-logit path:

* a linear student head (``nn.Linear``, or a fake-quant Linear without activation quant): the
  gradient of the weighted terms w.r.t. each chunk's logits is taken *in the forward*
  (``torch.func.grad_and_value``) and turned at once into the hidden-state and head-weight
  gradients, which backward only scales. Every logit matmul runs once, as in the naive path —
  recomputing them in backward (checkpointing) costs ~1.5× the matmuls and ~2× the softmaxes.
  On CUDA the per-chunk loss-and-gradient is compiled (one or two fused kernels instead of
  a dozen fp32 passes); ``LOWBIT_FUSED_HEAD_BACKEND=eager`` turns that off.
* any other head (a callable): each chunk is checkpointed, so backward recomputes its logits.

The terms are the same ``LogitTerm.rows`` as the unfused path, so the results agree.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lowbit.losses.terms import IGNORE_INDEX, LogitTerm

BACKENDS = ("auto", "compile", "eager")


@dataclass
class HeadInputs:
    """Final hidden states ``[B, L, D]`` and the head that maps them to logits, per model."""

    student_hidden: Tensor
    student_head: Callable[[Tensor], Tensor]
    teacher_hidden: Tensor | None = None
    teacher_head: Callable[[Tensor], Tensor] | None = None
    chunk_size: int = 1024
    #: Run at least this many chunks (the extra ones empty). Where calling a head is a collective
    #: (a ZeRO-3 engine gathers its weight in each call), every rank must call it equally often,
    #: though ranks count different numbers of tokens.
    min_chunks: int = 0


def linear_parts(head: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) when ``head(x) == F.linear(x, weight, bias)``, else None.

    A fake-quant Linear contributes its fake-quantized weight (gradients still reach the float
    weight through its STE); one that also quantizes its input is not a plain linear map.
    """
    if not isinstance(head, nn.Linear) or getattr(head, "activation_quantizer", None) is not None:
        return None
    weight = head.quantized_weight() if hasattr(head, "quantized_weight") else head.weight
    return weight, head.bias


def chunk_starts(rows: int, chunk: int, min_chunks: int) -> list[int]:
    """Start rows of the chunks over ``rows`` rows, padded with empty chunks (start = rows) to ``min_chunks``."""
    starts = list(range(0, rows, chunk))
    return starts + [rows] * max(0, min_chunks - len(starts))


def _backend() -> str:
    value = os.environ.get("LOWBIT_FUSED_HEAD_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"LOWBIT_FUSED_HEAD_BACKEND={value!r}; choose one of {', '.join(BACKENDS)}")
    return value


def _shared_vocab(logits: Tensor, teacher_logits: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Heads that differ in padding rows only are compared on the shared range."""
    if teacher_logits is None or teacher_logits.shape[-1] == logits.shape[-1]:
        return logits, teacher_logits
    shared = min(teacher_logits.shape[-1], logits.shape[-1])
    return logits[..., :shared], teacher_logits[..., :shared]


def _weighted_values(terms: Sequence[LogitTerm], weights: Sequence[float]):
    """``f(logits, teacher_logits, targets) -> (Σ wᵢ·termᵢ, [termᵢ sums])`` for one chunk."""

    def weighted(logits: Tensor, teacher_logits: Tensor | None, targets: Tensor) -> tuple[Tensor, Tensor]:
        values = torch.stack([term.rows(logits, teacher_logits, targets).float() for term in terms])
        return (values * values.new_tensor(weights)).sum(), values

    return weighted


@functools.cache
def _compiled_weighted_values(terms: tuple[LogitTerm, ...], weights: tuple[float, ...]):
    # dynamic=None: the last chunk's size changes with the batch's token count; after a second
    # size Inductor compiles one shape-generic kernel instead of one per size.
    return torch.compile(_weighted_values(terms, weights), dynamic=None)


def chunk_grad_function(terms: Sequence[LogitTerm], weights: Sequence[float], device: torch.device):
    """``f(logits, teacher_logits, targets) -> (∂(Σ wᵢ·termᵢ)/∂logits, Σ wᵢ·termᵢ, [termᵢ])``."""
    choice = _backend()
    compiled = choice == "compile" or (choice == "auto" and device.type == "cuda")
    weighted = (
        _compiled_weighted_values(tuple(terms), tuple(weights))
        if compiled
        else _weighted_values(terms, weights)
    )

    def loss_and_grad(logits: Tensor, teacher_logits: Tensor | None, targets: Tensor):
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            total, values = weighted(leaf, teacher_logits, targets)
            (grad,) = torch.autograd.grad(total, leaf)
        return grad, total.detach(), values.detach()

    return loss_and_grad


class _LinearHeadLoss(torch.autograd.Function):
    """Σ wᵢ·termᵢ over the rows of ``hidden``, logits ``F.linear(hidden, weight, bias)``.

    Returns (weighted total, per-term sums — not differentiable). The forward builds the
    gradients chunk by chunk; backward multiplies them by the incoming scalar gradient.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, teacher_rows, targets, loss_and_grad, teacher_head, chunk, min_chunks
    ):  # type: ignore[override]
        needs = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight) if needs[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs[2] else None
        total, sums = None, None
        for start in chunk_starts(hidden.shape[0], chunk, min_chunks):
            piece = slice(start, start + chunk)
            rows = hidden[piece]
            logits = F.linear(rows, weight, bias)
            teacher_logits = None if teacher_rows is None else teacher_head(teacher_rows[piece])
            logits, teacher_logits = _shared_vocab(logits, teacher_logits)
            grad_logits, chunk_total, values = loss_and_grad(logits, teacher_logits, targets[piece])
            total = chunk_total if total is None else total + chunk_total
            sums = values if sums is None else sums + values
            width = grad_logits.shape[-1]  # < vocab when only a shared range is compared
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[piece] = grad_logits @ weight[:width]
            if grad_weight is not None:
                grad_weight[:width].addmm_(grad_logits.T, rows.to(weight.dtype))
            if grad_bias is not None:
                grad_bias[:width] += grad_logits.sum(0)
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        assert total is not None and sums is not None, "called with no rows"
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):  # type: ignore[override]
        stored = iter(ctx.saved_tensors)
        grads = [next(stored) * grad_total if present else None for present in ctx.present]
        return (*grads, None, None, None, None, None, None)


def head_chunked_sums(
    terms: Sequence[LogitTerm],
    weights: Sequence[float],
    head: HeadInputs,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, list[Tensor]]:
    """(Σ wᵢ·termᵢ, [each term's sum]) over counted next-token positions, chunk by chunk."""
    width = head.student_hidden.shape[-1]
    targets = labels[..., 1:].reshape(-1)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    student = head.student_hidden[..., :-1, :].reshape(-1, width).index_select(0, keep)
    teacher = None
    if head.teacher_hidden is not None:
        teacher_width = head.teacher_hidden.shape[-1]
        teacher = head.teacher_hidden[..., :-1, :].reshape(-1, teacher_width).index_select(0, keep).detach()
    targets = targets.index_select(0, keep)
    step = max(1, head.chunk_size)
    if student.shape[0] == 0 and head.min_chunks == 0:
        zero = student.sum() * 0  # keeps the graph connected (DDP expects every step to reach the head)
        return zero, [zero.detach() for _ in terms]
    linear = linear_parts(head.student_head)
    if linear is not None:
        loss_and_grad = chunk_grad_function(terms, weights, student.device)
        total, sums = _LinearHeadLoss.apply(
            student, *linear, teacher, targets, loss_and_grad, head.teacher_head, step, head.min_chunks
        )
        return total, list(sums.unbind())
    return _checkpointed_sums(terms, weights, head, student, teacher, targets, step)


def _checkpointed_sums(terms, weights, head, student, teacher, targets, step) -> tuple[Tensor, list[Tensor]]:
    """Any head: each chunk's logits are built, used and dropped, and rebuilt in backward."""

    def chunk_sums(student_rows: Tensor, teacher_rows: Tensor | None, chunk_targets: Tensor) -> Tensor:
        logits = head.student_head(student_rows)
        teacher_logits = None
        if teacher_rows is not None and head.teacher_head is not None:
            with torch.no_grad():
                teacher_logits = head.teacher_head(teacher_rows)
        logits, teacher_logits = _shared_vocab(logits, teacher_logits)
        return torch.stack([term.rows(logits, teacher_logits, chunk_targets).float() for term in terms])

    sums = torch.zeros(len(terms), device=student.device)
    for start in chunk_starts(student.shape[0], step, head.min_chunks):
        piece = slice(start, start + step)
        teacher_piece = None if teacher is None else teacher[piece]
        sums = sums + checkpoint(
            chunk_sums, student[piece], teacher_piece, targets[piece], use_reentrant=False
        )
    total = (sums * sums.new_tensor(list(weights))).sum()
    return total, [value.detach() for value in sums.unbind()]
