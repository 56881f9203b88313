"""Knowledge-distillation losses: temperature-scaled divergences between teacher and student.

Per token, with ``p = softmax(z / T)`` in fp32:

* ``kl``  — forward KL(P_t ‖ P_s) = Σ p_t (log p_t − log p_s)  (Hinton et al. 2015)
* ``rkl`` — reverse KL(P_s ‖ P_t)
* ``jsd`` — generalised Jensen–Shannon β·KL(P_t ‖ M) + (1−β)·KL(P_s ‖ M), M = β P_t + (1−β) P_s

each multiplied by T² so gradient magnitudes do not shrink as T grows. Tokens are processed in
chunks whose fp32 softmaxes are recomputed in backward (activation checkpointing), so memory is
bounded by the chunk, not by ``tokens × vocab``; the result equals the unchunked formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
KINDS = ("kl", "rkl", "jsd")


def _check(kind: str, temperature: float, beta: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown KD kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")


def _at_least_fp32(x: Tensor) -> Tensor:
    """fp32 for half-precision logits; float64 stays float64 (for gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _divergence_rows(student: Tensor, teacher: Tensor, kind: str, temperature: float, beta: float) -> Tensor:
    """Per-row divergence of ``[rows, vocab]`` logits, in fp32 (without the T² factor)."""
    log_s = F.log_softmax(_at_least_fp32(student) / temperature, dim=-1)
    log_t = F.log_softmax(_at_least_fp32(teacher) / temperature, dim=-1)
    if kind == "kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind == "rkl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    # log M = logsumexp(log β + log p_t, log(1−β) + log p_s), stable for extreme logits
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    to_teacher = (log_t.exp() * (log_t - log_m)).sum(-1)
    to_student = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * to_teacher + (1 - beta) * to_student


def kd_divergence_sum(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    kind: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int | None = 1024,
) -> Tensor:
    """T² · Σ over masked-in tokens of the divergence; logits ``[..., vocab]``, mask ``[...]``.

    ``chunk_size`` tokens at a time (None: all at once). Only the valid rows are computed.
    """
    _check(kind, temperature, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; align the vocabularies first"
        )
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).nonzero().squeeze(1)
        student, teacher = student.index_select(0, keep), teacher.index_select(0, keep)
    teacher = teacher.detach()
    rows = student.shape[0]
    step = rows if not chunk_size or chunk_size >= rows else chunk_size
    total = student.new_zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
    for start in range(0, rows, max(step, 1)):
        chunk_s, chunk_t = student[start : start + step], teacher[start : start + step]
        if step < rows and chunk_s.requires_grad:
            values = checkpoint(
                _divergence_rows, chunk_s, chunk_t, kind, temperature, beta, use_reentrant=False
            )
        else:
            values = _divergence_rows(chunk_s, chunk_t, kind, temperature, beta)
        total = total + values.sum()
    return total * temperature**2


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    kind: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Mean KD loss over tokens whose label is not ``ignore_index`` (all tokens if ``labels`` is None).

    ``labels`` are aligned with the logits (position t's label belongs to logits[t]). Returns
    T² · mean divergence, with ``kind`` in ``kl`` (forward), ``rkl`` (reverse), ``jsd``.
    """
    mask = None if labels is None else labels != ignore_index
    count = student_logits[..., 0].numel() if mask is None else int(mask.sum())
    total = kd_divergence_sum(student_logits, teacher_logits, mask, kind, temperature, beta)
    return total / max(count, 1)


def topk_kl_sum(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    teacher_logsumexp: Tensor | None = None,
) -> Tensor:
    """T² · Σ KL over the teacher's top-k tokens (what an offline teacher cache stores).

    Without ``teacher_logsumexp`` both distributions are renormalised over the k tokens. With the
    teacher's full-vocabulary ``logsumexp(z_t / T)`` the KL runs over k + 1 buckets — the k tokens
    and the remaining *tail* mass — with unrenormalised probabilities.
    """
    _check("kl", temperature, 0.5)
    k = teacher_values.shape[-1]
    student = student_logits.reshape(-1, student_logits.shape[-1]).float() / temperature
    values = teacher_values.reshape(-1, k).float().detach() / temperature
    indices = teacher_indices.reshape(-1, k).long()
    if mask is not None:
        keep = mask.reshape(-1).nonzero().squeeze(1)
        student, values, indices = student[keep], values[keep], indices[keep]
    student_top = student.gather(1, indices)
    if teacher_logsumexp is None:
        log_t = F.log_softmax(values, dim=-1)
        log_s = F.log_softmax(student_top, dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum() * temperature**2
    teacher_lse = teacher_logsumexp.reshape(-1).float().detach()
    if mask is not None:
        teacher_lse = teacher_lse[keep]
    log_t = values - teacher_lse[:, None]
    log_s = student_top - torch.logsumexp(student, dim=-1, keepdim=True)
    tail_t = torch.log1p(-log_t.exp().sum(-1).clamp(max=1 - 1e-7))
    tail_s = torch.log1p(-log_s.exp().sum(-1).clamp(max=1 - 1e-7))
    kl_top = (log_t.exp() * (log_t - log_s)).sum(-1)
    kl_tail = tail_t.exp() * (tail_t - tail_s)
    return (kl_top + kl_tail).sum() * temperature**2
