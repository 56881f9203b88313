"""LoftQ initialisation for QLoRA: choose the 4-bit base and the adapters together so that
``dequantize(Q) + s·B·A`` is close to the float weight ``W`` before training starts.

Alternating (Li et al., 2023, "LoftQ"), for ``iterations`` rounds from ``B·A = 0``:

    Q   ← NF4(W − s·B·A)                       (bitsandbytes' codes, as the base will hold them)
    B·A ← best rank-r approximation of (W − Q)/s   (truncated SVD: B = U√S, A = √S Vᵀ / s)

Why not peft's ``init_lora_weights="loftq"``: it runs only on CUDA (it moves every weight to
``cuda``) and quantizes with its own path, while lowbit's base is built by
``FrozenNF4Linear.from_linear`` — the fit must be to *those* codes, on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.quant.nf4 import FrozenNF4Linear


@torch.no_grad()
def loftq_layer(
    linear: nn.Linear, rank: int, scaling: float, iterations: int, **quant: object
) -> tuple[FrozenNF4Linear, Tensor, Tensor]:
    """The 4-bit base and the adapter weights (A: r × in, B: out × r) LoftQ gives ``linear``."""
    if iterations < 1:
        raise ValueError(f"LoftQ needs at least one round, got {iterations}")
    weight = linear.weight.detach().float()
    low_rank = torch.zeros_like(weight)
    base = None
    for _ in range(iterations):
        shifted = nn.Linear(
            linear.in_features, linear.out_features, linear.bias is not None, device=weight.device
        )
        shifted.weight.copy_(weight - low_rank)
        if linear.bias is not None:
            shifted.bias.copy_(linear.bias.detach().float())
        base = FrozenNF4Linear.from_linear(shifted, **quant)  # type: ignore[arg-type]
        u, s, vh = torch.linalg.svd(
            (weight - base.dequantize(dtype=torch.float32)) / scaling, full_matrices=False
        )
        root = s[:rank].sqrt()
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        low_rank = scaling * (b @ a)
    assert base is not None
    return base, a, b


__all__ = ["loftq_layer"]
