"""Loss terms and the weighted objective (usable alone, without the trainer)."""

from lowbit.losses import attention, hidden, kd_terms  # noqa: F401 - register the KD terms
from lowbit.losses.kd import kd_divergence_sum, kd_loss, topk_kl_sum
from lowbit.losses.objective import Objective, build_objective
from lowbit.losses.registry import Registry, UnknownChoiceError
from lowbit.losses.terms import (
    IGNORE_INDEX,
    LOSS_TERMS,
    CrossEntropyTerm,
    LossInputs,
    LossTerm,
    ModelShapes,
    count_target_tokens,
    cross_entropy_mean,
    next_token_pairs,
)

__all__ = [
    "IGNORE_INDEX",
    "LOSS_TERMS",
    "CrossEntropyTerm",
    "LossInputs",
    "LossTerm",
    "ModelShapes",
    "Objective",
    "Registry",
    "UnknownChoiceError",
    "build_objective",
    "count_target_tokens",
    "cross_entropy_mean",
    "kd_divergence_sum",
    "kd_loss",
    "topk_kl_sum",
    "next_token_pairs",
]
