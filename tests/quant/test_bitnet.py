"""BitLinear (ternary weights, int8 per-token activations) and the quantization warm-up blend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.quant import BitLinear, FakeQuantizer, QuantSpec, quantize_model, set_quantizer_blend
from lowbit.quant.fake_quant import fake_quantize

BITNET_W = QuantSpec.preset("bitnet", "weight")
BITNET_A = QuantSpec.preset("bitnet", "activation")


def absmean_ternary_float64(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook BitNet b1.58 weight quantizer in float64: (codes, per-block scales)."""
    blocks = weight.double().reshape(-1, block)
    scale = blocks.abs().mean(1, keepdim=True).clamp_min(1e-5)
    return torch.clamp(torch.round(blocks / scale), -1, 1), scale


@pytest.mark.parametrize(
    "granularity,group_size,block",
    [("tensor", None, 48 * 96), ("channel", None, 96), ("group", 32, 32)],
)
def test_bitlinear_weights_are_ternary_codes_times_the_absmean_scale(granularity, group_size, block):
    torch.manual_seed(0)
    linear = nn.Linear(96, 48)
    spec = QuantSpec("ternary", granularity, group_size)
    layer = BitLinear.from_linear(linear, spec)
    weight = layer.quantized_weight().detach()
    codes, scale = absmean_ternary_float64(linear.weight.detach(), block)
    # fp32 vs float64: the scale differs by float32 rounding of a mean (≤ 1e-6 relative), and a
    # code can differ only where W/s sits within that rounding of ±0.5 (none at this seed).
    assert torch.equal((weight.double().reshape(-1, block) / scale).round(), codes)
    assert torch.allclose(weight.double().reshape(-1, block), codes * scale, rtol=2e-6, atol=0)
    assert set(torch.unique(codes).tolist()) <= {-1.0, 0.0, 1.0}
    assert set(torch.unique(codes).tolist()) == {-1.0, 0.0, 1.0}  # random weights use all three


def test_bitlinear_is_what_a_ternary_rule_swaps_in_and_embeddings_are_refused():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    quantize_model(model, [{"match": "1", "weight": "bitnet", "activation": "bitnet"}])
    assert isinstance(model[1], BitLinear) and model[1].activation_quantizer.spec == BITNET_A
    with pytest.raises(ValueError, match="ternary weights are for linear layers"):
        quantize_model(
            nn.Sequential(nn.Embedding(10, 8)), [{"match": "0", "weight": "bitnet"}], quantize_embeddings=True
        )


def test_activation_quant_matches_a_float64_per_token_absmax_int8_reference():
    torch.manual_seed(1)
    x = torch.randn(6, 33, 64) * torch.logspace(-3, 3, 33).reshape(1, 33, 1)  # tokens of very different size
    x[0, 0] = 0.0  # an all-zero token stays zero
    x[1, 1, 5] = 1e4  # one outlier channel takes the whole scale of its token
    out = fake_quantize(x, BITNET_A)
    absmax = x.double().abs().amax(-1, keepdim=True)
    scale = absmax / 127
    reference = torch.clamp(torch.round(x.double() / scale.clamp_min(1e-300)), -127, 127) * scale
    # Our scale is absmax/127 in float32: each value differs from the float64 one by float32
    # rounding (≤ 2^-23 relative of the token's absmax per operation, three operations), except
    # where x/s lies within that rounding of a half-way point, where the code may differ by one
    # step: bound every element by 3 ulps of its token's absmax, or one step at such ties.
    error = (out.double() - reference).abs()
    ties = ((x.double() / scale).abs() % 1 - 0.5).abs() < 1e-5
    allowed = torch.where(ties, scale * 1.0001, 3 * 2.0**-23 * absmax)
    assert bool((error <= allowed).all())
    assert torch.equal(out[0, 0], torch.zeros(64))
    codes = out.double()[1:] / scale[1:]  # (token 0 is all zero: no scale)
    assert bool((codes.round() - codes).abs().max() < 1e-3)  # values are integer multiples of the step
    assert abs(codes.abs().max().item() - 127) < 1e-3  # the largest value of each token takes the end code


def test_ste_passes_gradients_through_both_quantizers_and_clipped_ste_zeroes_them_past_the_grid():
    torch.manual_seed(2)
    linear = nn.Linear(16, 8)
    layer = BitLinear.from_linear(linear, BITNET_W, BITNET_A)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    # y = q(x) q(W)^T: the STE makes dy/dx = q(W) and dy/dW = q(x) summed over the batch.
    q_weight = layer.quantized_weight().detach()
    q_input = fake_quantize(x.detach(), BITNET_A)
    assert torch.allclose(x.grad, torch.ones(4, 8) @ q_weight, rtol=1e-6, atol=1e-6)
    assert torch.allclose(linear.weight.grad, torch.ones(8, 4) @ q_input, rtol=1e-6, atol=1e-6)
    clipped = QuantSpec("ternary", "tensor", ste="clipped")
    weight = torch.tensor(
        [[-3.0, -0.2, 0.1, 0.5, 2.9]], requires_grad=True
    )  # absmean 1.34: ends at ±1.34±0.67
    fake_quantize(weight, clipped).sum().backward()
    assert weight.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


def test_blend_zero_is_the_float_tensor_and_one_the_quantized_tensor_exactly():
    torch.manual_seed(3)
    x = torch.randn(8, 64)
    quantizer = FakeQuantizer(BITNET_W)
    full = quantizer(x)
    quantizer.blend = 0.0
    assert quantizer(x) is x
    quantizer.blend = 1.0
    assert torch.equal(quantizer(x), full)
    quantizer.blend = 0.25
    mixed = quantizer(x)
    assert torch.allclose(mixed, x + 0.25 * (full - x), rtol=0, atol=1e-7)
    xg = x.clone().requires_grad_(True)
    quantizer(xg).sum().backward()  # d/dx [x + λ(q(x) − x)] = 1 + λ(1 − 1) with the plain STE
    assert torch.equal(xg.grad, torch.ones_like(x))


def test_set_quantizer_blend_reaches_weights_and_activations_separately():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    quantize_model(model, [{"match": "*", "weight": "bitnet", "activation": "bitnet"}])
    set_quantizer_blend(model, 0.3, None)
    assert [m.weight_quantizer.blend for m in model] == [0.3, 0.3]
    assert [m.activation_quantizer.blend for m in model] == [1.0, 1.0]
    set_quantizer_blend(model, None, 0.7)
    assert [m.activation_quantizer.blend for m in model] == [0.7, 0.7]
