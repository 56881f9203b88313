"""Learning-rate schedule values and weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.trainer.config import TrainConfig
from lowbit.trainer.optim import build_optimizer, lr_factor


def test_warmup_then_cosine_to_min_ratio():
    cfg = TrainConfig(max_steps=14, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_factor(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cfg) == pytest.approx(1.0)
    assert lr_factor(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(14, cfg) == pytest.approx(0.1)


def test_linear_and_constant():
    linear = TrainConfig(max_steps=10, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert [round(lr_factor(s, linear), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    constant = TrainConfig(max_steps=10, schedule="constant")
    assert lr_factor(7, constant) == 1.0


def test_decay_only_on_matrices_and_frozen_params_excluded():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # 2 biases + norm weight/bias
