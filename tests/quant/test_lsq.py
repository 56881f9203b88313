"""Learned step size (LSQ, LSQ+): gradients against the paper's formula and a float64 finite difference."""

from __future__ import annotations

import math

import torch

from lowbit.quant import QuantSpec, learned_fake_quantize
from lowbit.quant.fake_quant import initial_scale, learned_codes
from lowbit.quant.grids import dequantize, int_range, qparams, to_blocks


def surrogate(x, scale, offset, codes, v0):
    """x̂ with the rounding frozen at the base point ``v0``: what the STE differentiates.

    Inside the range round(v) is replaced by v + (codes - v0), so d/ds sees the -x/s² term;
    outside, the clamped codes are constants. A finite difference of this in float64 is the LSQ
    gradient before the paper's gradient scaling.
    """
    qmin, qmax = -7, 7
    v = (x - offset) / scale
    inside = (v0 >= qmin) & (v0 <= qmax)
    q = torch.where(inside, v + (codes - v0), codes)
    return q * scale + offset


def test_lsq_scale_gradient_matches_float64_finite_difference():
    torch.manual_seed(0)
    spec = QuantSpec("int4", "group", 16, learn_scale=True)
    x = torch.randn(4, 32) * 2
    scale, _ = initial_scale(x, spec)
    scale = (scale * 0.6).requires_grad_(True)  # clip some values so both branches occur
    upstream = torch.randn(4, 32)
    learned_fake_quantize(x, scale, None, spec).backward(upstream)
    blocks, grads = x.double().reshape(-1, 16), upstream.double().reshape(-1, 16)
    codes = torch.clamp(torch.round(blocks / scale.detach().double()), -7, 7)
    eps = 1e-6
    grad_scale = 1 / math.sqrt(16 * 7)
    for block in range(blocks.shape[0]):
        s = scale.detach().double()[block]
        v0 = blocks[block] / s

        def loss(value, v0=v0, block=block):
            return (surrogate(blocks[block], value, 0.0, codes[block], v0) * grads[block]).sum()

        finite = (loss(s + eps) - loss(s - eps)) / (2 * eps)
        assert torch.isclose(scale.grad[block].double(), finite * grad_scale, rtol=1e-4, atol=1e-6), block
    assert ((blocks / scale.detach().double()).abs() > 7).any()  # the clipped branch was exercised


def test_lsq_plus_offset_and_input_gradients():
    torch.manual_seed(1)
    spec = QuantSpec("int4", "channel", symmetric=False, learn_scale=True)
    x = (torch.randn(3, 24) + 1.5).requires_grad_(True)
    scale, offset = initial_scale(x, spec)
    scale, offset = (scale * 0.7).requires_grad_(True), (offset + 0.2).requires_grad_(True)
    upstream = torch.randn(3, 24)
    learned_fake_quantize(x, scale, offset, spec).backward(upstream)
    v = (x.detach() - offset.detach()) / scale.detach()
    inside = (v >= 0) & (v <= 15)
    grad_scale = 1 / math.sqrt(24 * 15)
    assert torch.equal(x.grad, upstream * inside)
    assert torch.allclose(offset.grad, (upstream * ~inside).sum(1, keepdim=True) * grad_scale)
    codes = torch.clamp(torch.round(v), 0, 15)
    expected_scale = (upstream * torch.where(inside, codes - v, codes)).sum(1, keepdim=True) * grad_scale
    assert torch.allclose(scale.grad, expected_scale, rtol=1e-5, atol=1e-7)


def test_learned_codes_dequantize_to_the_forward_exactly():
    torch.manual_seed(2)
    for spec in (QuantSpec("int4", "group", 8, learn_scale=True),
                 QuantSpec("int3", "group", 8, learn_scale=True, range="full"),
                 QuantSpec("int3", "channel", symmetric=False, learn_scale=True, scale_init="mse")):  # fmt: skip
        x = torch.randn(5, 32)
        scale, offset = initial_scale(x, spec)
        forward = learned_fake_quantize(x, scale, offset, spec)
        codes, params = learned_codes(x, scale, offset, spec)
        assert torch.equal(dequantize(codes, params, spec).reshape(x.shape), forward)
        qmin, qmax = int_range(spec)
        assert codes.min() >= qmin and codes.max() <= qmax
        if spec.range == "full":  # the min-max init is the fixed full grid's scale: absmax / 3.5
            fixed = QuantSpec("int3", "group", 8, range="full")
            assert torch.equal(scale, qparams(to_blocks(x, fixed), fixed).scale)


def test_mse_init_never_worse_than_minmax():
    torch.manual_seed(3)
    x = torch.randn(16, 64)
    x[:, 0] *= 20  # outliers make clipping pay off
    errors = {}
    for init in ("minmax", "mse"):
        spec = QuantSpec("int4", "channel", learn_scale=True, scale_init=init)
        scale, offset = initial_scale(x, spec)
        errors[init] = (learned_fake_quantize(x, scale, offset, spec) - x).pow(2).sum(1)
    assert (errors["mse"] <= errors["minmax"] + 1e-6).all()
    assert errors["mse"].sum() < errors["minmax"].sum()
