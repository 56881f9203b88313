"""AdamW with weight-decay groups, and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from lowbit.trainer.config import TrainConfig

QUANTIZER_GROUP = "quantizer"
logger = logging.getLogger("lowbit")
# train.optimizer → (bitsandbytes class name, bytes of state per parameter); adamw is torch's.
BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}
STATE_BYTES = {"adamw": 8, "paged_adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


def optimizer_class(name: str, device: torch.device) -> type[torch.optim.Optimizer]:
    """The AdamW implementation ``train.optimizer`` names (bitsandbytes' for the 8-bit/paged ones)."""
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    if name.startswith("paged") and device.type != "cuda":
        logger.warning(
            "train.optimizer=%s: paging (optimizer state in CUDA unified memory) exists only on CUDA; on %s the "
            "same update runs with unpaged state", name, device.type,
        )  # fmt: skip
    return getattr(bnb.optim, BNB_OPTIMIZERS[name])


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, *extra: nn.Module, adamw: type[torch.optim.Optimizer] | None = None
) -> torch.optim.Optimizer:
    """AdamW where matrices decay and 1-D parameters (biases, norm gains) do not.

    Learned quantizer step sizes (LSQ scales and offsets) form a group of their own
    (``QUANTIZER_GROUP``), without weight decay — pulling a step size towards zero is not
    regularisation — and with a learning rate the QAT schedule can zero to freeze them.
    ``extra`` modules (a loss term's learned projection) are optimised alongside the model.
    Frozen parameters (``requires_grad=False``: a teacher, a quantized base) get no state.
    ``adamw``: another implementation of the same update (DeepSpeed's CPU Adam for ZeRO-Offload).
    """
    from lowbit.quant import FakeQuantizer

    modules = (model, *extra)
    quantizer_ids = {
        id(p) for m in modules for q in m.modules() if isinstance(q, FakeQuantizer) for p in q.parameters()
    }
    trainable = [p for module in modules for p in module.parameters() if p.requires_grad]
    quantizer = [p for p in trainable if id(p) in quantizer_ids]
    rest = [p for p in trainable if id(p) not in quantizer_ids]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
        {"params": quantizer, "weight_decay": 0.0, "name": QUANTIZER_GROUP},
    ]
    device = trainable[0].device if trainable else torch.device("cpu")
    optimizer = adamw or optimizer_class(cfg.optimizer, device)
    return optimizer([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at 0-based ``step``: linear warmup, then the chosen decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
