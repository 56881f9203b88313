"""Validation loss and perplexity, summed over ranks (not a mean of per-rank means)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from lowbit.losses import CrossEntropyTerm, LossInputs, count_target_tokens
from lowbit.trainer.data import Examples, RowSet, eval_batches, model_inputs
from lowbit.trainer.strategies import Strategy


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, else nothing (fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: Examples | RowSet,
    batch_size: int,
    strategy: Strategy,
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean next-token cross-entropy over all valid validation tokens, and its perplexity."""
    was_training = model.training
    model.eval()
    cross_entropy = CrossEntropyTerm()
    totals = torch.zeros(2, dtype=torch.float64)  # [loss sum, token count]
    for batch in eval_batches(examples, batch_size, strategy.world_size, strategy.rank):
        batch = {k: v.to(strategy.device) for k, v in batch.items()}
        with autocast(strategy.device, precision):
            logits = model(**model_inputs(batch)).logits
        totals[0] += cross_entropy(LossInputs(labels=batch["labels"], student_logits=logits)).double().cpu()
        totals[1] += count_target_tokens(batch["labels"]).double().cpu()
    totals = strategy.all_reduce_sum(totals)
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp_min(1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(totals[1].item())}
