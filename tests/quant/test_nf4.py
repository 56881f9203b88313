"""The frozen 4-bit base: bitsandbytes' codes bit for bit, a forward and input gradient that equal
the float64 textbook product, no gradient and no change to the base, no float weight kept for
backward, and a state made only of integer tensors (what keeps it exact under sharding)."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

from lowbit.quant import PRESETS, fake_quantize
from lowbit.quant.nf4 import FrozenNF4Linear

SHAPES = [(128, 48), (100, 7), (64, 1)]  # (in, out): whole blocks per row; blocks across rows; one row


def bnb_weight(weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> torch.Tensor:
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    return bnbf.dequantize_4bit(packed, state)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("quant_type", "blocksize", "double_quant"),
    [("nf4", 64, False), ("nf4", 64, True), ("fp4", 128, True), ("nf4", 32, False)],
)
def test_weight_is_bitsandbytes_dequantized_codes_bit_for_bit(shape, quant_type, blocksize, double_quant):
    torch.manual_seed(sum(shape) + blocksize)
    linear = nn.Linear(*shape)
    layer = FrozenNF4Linear.from_linear(linear, quant_type, blocksize, double_quant)
    expected = bnb_weight(linear.weight.detach(), quant_type, blocksize, double_quant)
    assert torch.equal(layer.weight, expected)
    assert torch.equal(layer.to_linear().weight, expected)
    assert torch.equal(layer.bias, linear.bias)


def test_nf4_without_double_quant_is_lowbits_nf4_grid():
    """An independent reference: lowbit's own NF4 fake quant (group 64, absmax scale) gives the
    same weights as bitsandbytes' codes, so a model trained on one is exact on the other."""
    torch.manual_seed(1)
    linear = nn.Linear(256, 32)
    layer = FrozenNF4Linear.from_linear(linear, "nf4", 64, double_quant=False)
    assert torch.equal(layer.weight, fake_quantize(linear.weight.detach(), PRESETS["nf4"]["weight"]))


def test_forward_and_input_gradient_match_the_float64_product():
    """y = x Wᵀ + b and dL/dx = g W for the dequantized W, against float64. Each fp32 element is a
    dot product of K = 128 terms: |error| ≤ K·eps32·(|x|·|W|ᵀ) bounds it (the textbook γ_K bound)."""
    torch.manual_seed(2)
    layer = FrozenNF4Linear.from_linear(nn.Linear(128, 40), double_quant=True)
    weight = layer.weight.double()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    reference = x.detach().double() @ weight.T + layer.bias.double()
    bound = (
        128
        * torch.finfo(torch.float32).eps
        * (x.detach().double().abs() @ weight.abs().T + layer.bias.double().abs())
    )
    assert ((y.double() - reference).abs() <= bound).all()
    grad = torch.randn_like(y)
    y.backward(grad)
    grad_reference = grad.double() @ weight
    grad_bound = 40 * torch.finfo(torch.float32).eps * (grad.double().abs() @ weight.abs())
    assert ((x.grad.double() - grad_reference).abs() <= grad_bound).all()


def test_the_base_gets_no_gradient_and_an_optimizer_step_leaves_it_unchanged():
    torch.manual_seed(3)
    layer = FrozenNF4Linear.from_linear(nn.Linear(64, 16, bias=True), double_quant=True)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(p, before[name]) for name, p in layer.named_parameters())


def test_backward_keeps_the_packed_codes_not_a_float_weight():
    """QLoRA's memory: what autograd saves for the 4-bit layer is its 4-bit state and the input —
    no [out, in] float tensor per layer."""
    torch.manual_seed(4)
    layer = FrozenNF4Linear.from_linear(nn.Linear(256, 96))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 256, requires_grad=True)).sum()
    assert saved, "nothing saved: the hook did not run"
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 256 * 96]


def test_activation_checkpointing_recomputes_the_layer_with_the_same_gradient():
    torch.manual_seed(7)
    layer = FrozenNF4Linear.from_linear(nn.Linear(64, 32), double_quant=True)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    plain = x.grad.clone()
    x.grad = None
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    assert torch.equal(x.grad, plain)


def test_state_is_integers_so_casts_leave_it_exact():
    """``model.to(bf16)`` (and FSDP2/DeepSpeed bf16) cast floating tensors only: the codes and the
    float32 statistics (stored as int32 bits) stay exact; bf16 inputs run the matmul in bf16."""
    torch.manual_seed(5)
    layer = FrozenNF4Linear.from_linear(nn.Linear(128, 32), double_quant=True)
    weight = layer.weight
    layer.to(torch.bfloat16)
    assert all(not p.is_floating_point() for name, p in layer.named_parameters() if name != "bias")
    assert torch.equal(layer.weight, weight)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    # the product, then the bias (the order the layer adds them in)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, weight.bfloat16()) + layer.bias)


def test_autocast_bf16_runs_in_bf16_and_returns_fp32_gradients():
    torch.manual_seed(6)
    layer = FrozenNF4Linear.from_linear(nn.Linear(64, 16))
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_meta_construction_has_the_shapes_and_the_weight_is_read_only():
    with torch.device("meta"):
        linear = nn.Linear(128, 64)
    layer = FrozenNF4Linear.from_linear(linear, double_quant=True)
    assert layer.packed.is_meta and layer.packed.shape == (128 * 64 // 2,)
    assert layer.absmax.shape == (128 * 64 // 64,) and layer.nested_absmax.shape == (1,)
    with pytest.raises(AttributeError, match="frozen"):
        layer.weight = torch.zeros(64, 128)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"quant_type": "int4"}, "quant type"), ({"blocksize": 48}, "block size")]
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrozenNF4Linear(64, 16, **kwargs)


@pytest.mark.gpu
def test_on_cuda_the_layer_dequantizes_to_the_cpu_weights_and_trains_in_bf16():
    """bitsandbytes' CUDA kernel reads the codes quantized on the CPU into the same weights, bit
    for bit; a bf16 autocast forward and backward run on the GPU."""
    torch.manual_seed(8)
    layer = FrozenNF4Linear.from_linear(nn.Linear(256, 128, bias=True), double_quant=True)
    weight = layer.weight
    layer.cuda()
    assert torch.equal(layer.weight.cpu(), weight)
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_loftq_fits_base_and_adapters_closer_to_the_float_weight_than_nf4_alone(double_quant):
    """LoftQ's point: dequantize(Q) + s·B·A is nearer W than NF4(W) is, and the base is
    bitsandbytes' codes of W − s·B·A (what the layer will hold)."""
    from lowbit.quant.loftq import loftq_layer

    torch.manual_seed(9)
    linear = nn.Linear(256, 96)
    weight = linear.weight.detach()
    plain = FrozenNF4Linear.from_linear(linear, double_quant=double_quant).weight
    errors = []
    for iterations in (1, 3):
        base, a, b = loftq_layer(
            linear, rank=8, scaling=2.0, iterations=iterations, double_quant=double_quant
        )
        fitted = base.weight + 2.0 * b @ a
        errors.append((fitted - weight).norm().item())
        assert torch.equal(base.bias, linear.bias) and a.shape == (8, 256) and b.shape == (96, 8)
    assert errors[0] < (plain - weight).norm().item()
    assert errors[1] <= errors[0] * 1.01  # more rounds do not undo the fit (LoftQ is not strictly monotone)
