"""Fake quantization with straight-through gradients, and learned step sizes (LSQ / LSQ+).

``fake_quantize(x, spec)`` returns ``dequantize(quantize(x))`` computed by the same grid code the
exporter uses, and in backward passes the gradient straight through (``ste="plain"``) or only
where ``x`` lies inside the representable range (``ste="clipped"``). Both are
``torch.autograd.Function``s: the forward is exactly the grid, never ``x + (q - x).detach()``,
whose rounding error would break bit-exact export.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.quant.fused import fused_fake_quantize, use_compiled
from lowbit.quant.grids import (
    QParams,
    code_range,
    fake_quantize_blocks,
    int_range,
    store_scale,
    to_blocks,
)
from lowbit.quant.spec import QuantSpec


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, spec: QuantSpec) -> Tensor:  # type: ignore[override]
        ctx.clipped = spec.ste == "clipped"
        if not ctx.clipped and not torch.compiler.is_compiling() and use_compiled(x, spec):
            return fused_fake_quantize(x, spec)
        blocks = to_blocks(x, spec)
        out, params, _ = fake_quantize_blocks(blocks, spec)
        if ctx.clipped:
            low, high = code_range(params, spec)
            ctx.save_for_backward(((blocks >= low) & (blocks <= high)).reshape(x.shape))
        return out.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if ctx.clipped:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None


def fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """Round-trip ``x`` through ``spec``'s grid with min-max (absmax) scales; differentiable (STE)."""
    return _FakeQuantSTE.apply(x, spec)


# Smallest learned scale: 2^-24 is exact in fp32, bf16 and fp16 (its smallest subnormal), so
# rounding a clamped scale to any stored dtype never yields 0.
MIN_SCALE = 2.0**-24

# -- learned step size ------------------------------------------------------------------------------


class _LearnedStep(torch.autograd.Function):
    """LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020) on a block view.

    ``v = (x - offset) / s``, ``q = clamp(round(v), qmin, qmax)``, ``x̂ = q·s + offset``.
    Gradients: ∂x̂/∂x = 1 inside the range, 0 outside; ∂x̂/∂s = q − v inside, q outside;
    ∂x̂/∂offset = 0 inside, 1 outside; the scale and offset gradients are multiplied by
    ``grad_scale = 1/sqrt(elements per scale · qmax)`` as in the paper.
    """

    @staticmethod
    def forward(ctx, blocks, scale, offset, qmin: int, qmax: int, grad_scale: float):  # type: ignore[override]
        shifted = blocks - offset if offset is not None else blocks
        v = shifted / scale
        q = torch.clamp(torch.round(v), qmin, qmax)
        ctx.save_for_backward(v, q)
        ctx.has_offset, ctx.qmin, ctx.qmax, ctx.grad_scale = offset is not None, qmin, qmax, grad_scale
        return scale * q + offset if offset is not None else q * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, q = ctx.saved_tensors
        inside = (v >= ctx.qmin) & (v <= ctx.qmax)
        grad_x = grad * inside
        grad_scale = (grad * torch.where(inside, q - v, q)).sum(1, keepdim=True) * ctx.grad_scale
        grad_offset = (grad * ~inside).sum(1, keepdim=True) * ctx.grad_scale if ctx.has_offset else None
        return grad_x, grad_scale, grad_offset, None, None, None


def learned_fake_quantize(x: Tensor, scale: Tensor, offset: Tensor | None, spec: QuantSpec) -> Tensor:
    """Fake-quantize ``x`` with learned per-block ``scale`` (and LSQ+ ``offset``), ``[num_blocks, 1]``."""
    blocks = to_blocks(x, spec)
    qmin, qmax = int_range(spec)
    grad_scale = 1.0 / math.sqrt(blocks.shape[1] * qmax)
    # Round the learned scale (and offset) to the stored dtype here, as dequantization does, so the
    # forward multiplies by exactly what an export stores (the rounding passes gradients).
    scale = store_scale(scale.abs().clamp_min(MIN_SCALE), spec)
    offset = None if offset is None else store_scale(offset, spec)
    out = _LearnedStep.apply(blocks, scale, offset, qmin, qmax, grad_scale)
    return out.reshape(x.shape).to(x.dtype)


def learned_codes(x: Tensor, scale: Tensor, offset: Tensor | None, spec: QuantSpec) -> tuple[Tensor, QParams]:
    """Integer codes and parameters of a learned-scale quantizer (what ``convert`` stores)."""
    blocks = to_blocks(x, spec)
    qmin, qmax = int_range(spec)
    scale = store_scale(scale.detach().abs().clamp_min(MIN_SCALE), spec)
    offset = None if offset is None else store_scale(offset.detach(), spec)
    shifted = blocks - offset if offset is not None else blocks
    return torch.clamp(torch.round(shifted / scale), qmin, qmax), QParams(scale, offset=offset)


def initial_scale(x: Tensor, spec: QuantSpec, candidates: int = 40) -> tuple[Tensor, Tensor | None]:
    """Starting (scale, offset) per block: min-max, or the clipping ratio with least squared error."""
    blocks = to_blocks(x.detach(), spec)
    qmin, qmax = int_range(spec)
    if spec.symmetric:
        low, high = -blocks.abs().amax(1, keepdim=True), blocks.abs().amax(1, keepdim=True)
    else:
        low, high = blocks.amin(1, keepdim=True).clamp_max(0), blocks.amax(1, keepdim=True).clamp_min(0)
    ratios = (
        [1.0] if spec.scale_init == "minmax" else torch.linspace(1.0, 0.3, candidates, device="cpu").tolist()
    )
    best_scale = best_offset = best_error = None
    for ratio in ratios:
        scale = ((high - low) * ratio / (qmax - qmin)).clamp_min(1e-8)
        offset = None if spec.symmetric else low * ratio
        shifted = blocks - offset if offset is not None else blocks
        q = torch.clamp(torch.round(shifted / scale), qmin, qmax)
        error = ((q * scale + (offset if offset is not None else 0)) - blocks).pow(2).sum(1, keepdim=True)
        if best_error is None:
            best_scale, best_offset, best_error = scale, offset, error
            continue
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        if offset is not None:
            best_offset = torch.where(better, offset, best_offset)
        best_error = torch.minimum(error, best_error)
    assert best_scale is not None
    return best_scale, best_offset
