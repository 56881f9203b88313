"""Fake-quant grids against textbook float64 references and the formats' own libraries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.quant import QuantSpec, fake_quantize
from lowbit.quant.grids import NF4_CODE

INT_SPECS = [
    QuantSpec("int8", "tensor"),
    QuantSpec("int8", "channel"),
    QuantSpec("int4", "group", 32),
    QuantSpec("int4", "group", 32, symmetric=False),
    QuantSpec("int3", "group", 64, range="restricted"),
    QuantSpec("int4", "group", 32, range="restricted"),
    QuantSpec("int2", "channel", symmetric=False),
    QuantSpec("int8", "token"),
    QuantSpec("int5", "group", 16, symmetric=False),
    QuantSpec("int3", "group", 64, range="full"),
    QuantSpec("int4", "channel", range="full"),
    QuantSpec("int8", "tensor", range="full"),
    QuantSpec("int2", "group", 16, range="full"),
]


def reference_int(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The textbook formula in float64, one scale per row of a block view."""
    return reference_int_with_steps(x, spec)[0]


def reference_int_with_steps(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float64 reference, each element's quantization step: its block's scale)."""
    bits = int(spec.dtype[3:])
    length = {"tensor": x.numel(), "channel": x.shape[-1], "token": x.shape[-1]}.get(
        spec.granularity, spec.group_size
    )
    out, steps = [], []
    for block in x.double().reshape(-1, length):
        if spec.symmetric:  # restricted [-(2^(b-1)-1), 2^(b-1)-1]; full [-2^(b-1), 2^(b-1)-1] (torchao's)
            qmax = 2 ** (bits - 1) - 1
            qmin = -qmax - spec.full_range
            scale = max(float(block.abs().max()) / ((qmax - qmin) / 2), 1e-12)
            codes = torch.clamp(torch.round(block / scale), qmin, qmax)
            out.append(codes * scale)
            steps.append(torch.full_like(block, scale))
        else:
            qmax = 2**bits - 1
            low, high = min(float(block.min()), 0.0), max(float(block.max()), 0.0)
            scale = max((high - low) / qmax, 1e-12)
            zero = min(max(-round(low / scale), 0), qmax)
            codes = torch.clamp(torch.round(block / scale) + zero, 0, qmax)
            out.append((codes - zero) * scale)
            steps.append(torch.full_like(block, scale))
    return torch.stack(out).reshape(x.shape), torch.stack(steps).reshape(x.shape)


def edge_case_weight(seed: int, rows: int = 8, cols: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator) * 2
    w[0] = 0.0  # an all-zero row
    w[1] = 0.37  # an all-equal row
    w[2, 3] = 1e4  # a huge outlier
    w[3] = -w[3].abs()  # all negative
    return w


@pytest.mark.parametrize("spec", INT_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integer_grids_match_float64_reference(spec, seed):
    x = edge_case_weight(seed)
    ours = fake_quantize(x, spec)
    reference, step = reference_int_with_steps(x, spec)
    error = (ours.double() - reference).abs()
    assert torch.isfinite(ours).all()
    # Every element: fp32 vs fp64 arithmetic may flip a value lying on a rounding midpoint to the
    # neighbouring code (one step) and rounds the dequantized value (~1e-7 relative), never more.
    assert (error <= step * (1 + 1e-6) + 1e-6 * reference.abs()).all()
    # and the flips are rare: almost every element is the reference's value
    assert (error > 1e-4 * reference.abs().clamp_min(1)).float().mean() < 0.002
    assert torch.equal(ours[0], torch.zeros_like(ours[0]))  # zeros stay exactly zero


def test_fake_quant_is_idempotent_and_has_at_most_2_to_the_bits_levels():
    x = edge_case_weight(5)
    for spec in INT_SPECS:
        if spec.full_range:  # absmax maps past the top code: re-quantizing rescales (not idempotent)
            continue
        once = fake_quantize(x, spec)
        if spec.granularity == "group":
            blocks = once.reshape(-1, spec.group_size)
            assert max(len(torch.unique(b)) for b in blocks) <= 2 ** int(spec.dtype[3:])
        assert torch.allclose(fake_quantize(once, spec), once, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "name,type_name", [("gguf_q8_0", "Q8_0"), ("gguf_q4_0", "Q4_0"), ("gguf_q4_1", "Q4_1")]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_gguf_presets_equal_the_gguf_library_bit_for_bit(name, type_name, seed):
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    w = edge_case_weight(seed, rows=16, cols=256)
    reference = quants.dequantize(quants.quantize(w.numpy(), qtype), qtype)
    assert np.array_equal(fake_quantize(w, QuantSpec.preset(name)).numpy(), reference)


@pytest.mark.parametrize("seed", [0, 1])
def test_nf4_equals_bitsandbytes_bit_for_bit(seed):
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = edge_case_weight(seed, rows=6, cols=192)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(fake_quantize(w, QuantSpec.preset("nf4")), bnb.dequantize_4bit(packed, state))
    assert torch.equal(NF4_CODE, state.code.float())


@pytest.mark.parametrize("dtype,top", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_grid_matches_torch_float8_reference(dtype, top):
    x = edge_case_weight(3)
    spec = QuantSpec(dtype, "channel")
    torch_dtype = torch.float8_e4m3fn if dtype == "fp8_e4m3" else torch.float8_e5m2
    scale = (x.abs().amax(1, keepdim=True) / top).clamp_min(1e-12)
    reference = (x / scale).clamp(-top, top).to(torch_dtype).float() * scale
    assert torch.equal(fake_quantize(x, spec), reference)
    assert torch.isfinite(fake_quantize(x * 1e30, spec)).all()
    # block-wise fp8 (one scale per group of 32 along a row, as DeepSeek-V3's 128-blocks)
    groups = x.reshape(-1, 32)
    scale = (groups.abs().amax(1, keepdim=True) / top).clamp_min(1e-12)
    reference = ((groups / scale).clamp(-top, top).to(torch_dtype).float() * scale).reshape(x.shape)
    assert torch.equal(fake_quantize(x, QuantSpec(dtype, "group", 32)), reference)


def test_ternary_absmean_by_hand():
    w = torch.tensor([[0.9, -0.05, 0.3, -2.0]])
    scale = w.abs().mean()  # 0.8125
    expected = torch.tensor([[1.0, 0.0, 0.0, -1.0]]) * scale
    assert torch.equal(fake_quantize(w, QuantSpec("ternary", "tensor")), expected)


def test_bf16_input_is_quantized_in_fp32_and_returned_in_bf16():
    x = edge_case_weight(4).to(torch.bfloat16)
    out = fake_quantize(x, QuantSpec("int4", "group", 32))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fake_quantize(x.float(), QuantSpec("int4", "group", 32)).to(torch.bfloat16))


def test_plain_and_clipped_ste_gradients():
    x = torch.randn(4, 64, requires_grad=True)
    upstream = torch.randn(4, 64)
    fake_quantize(x, QuantSpec("int4", "group", 32)).backward(upstream)
    assert torch.equal(x.grad, upstream)  # plain STE: identity
    # With min-max scales nothing is outside the range, so the clipped STE is the identity too...
    y = x.detach().clone().requires_grad_(True)
    fake_quantize(y, QuantSpec("int4", "group", 32, ste="clipped")).backward(upstream)
    assert torch.equal(y.grad, upstream)
    # ...but Q4_0's grid is asymmetric around 0 ([-8d, 7d] with d = max / -8): a block whose
    # largest magnitude is positive cannot reach an equally large negative value.
    z = torch.zeros(1, 32)
    z[0, 0], z[0, 1], z[0, 2] = 3.0, -2.9, -1.0  # d = -0.375: the range is [-2.625, 3.0]
    z.requires_grad_(True)
    spec = QuantSpec.from_config({"preset": "gguf_q4_0", "ste": "clipped"})
    fake_quantize(z, spec).sum().backward()
    expected = torch.ones(1, 32)
    expected[0, 1] = 0.0
    assert torch.equal(z.grad, expected)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"dtype": "int9"}, r"unknown quant dtype 'int9'.*Valid: int2"),
        ({"dtype": "fp8_e4m3", "symmetric": False}, "asymmetric .* does not exist"),
        ({"granularity": "group"}, "needs a positive group_size"),
        ({"granularity": "row"}, r"unknown granularity 'row'"),
        ({"dtype": "nf4", "granularity": "channel"}, "nf4 uses block-wise"),
        (
            {"dtype": "int4", "granularity": "group", "group_size": 64, "convention": "gguf_q4_0"},
            "convention gguf_q4_0 is int4",
        ),
        (
            {"dtype": "int4", "symmetric": False, "range": "full"},
            "range 'full' is for symmetric integer grids",
        ),
        ({"dtype": "fp8_e4m3", "range": "full"}, "range 'full' is for symmetric integer grids"),
        ({"dtype": "int4", "range": "wide"}, r"unknown range 'wide'"),
    ],
)
def test_spec_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**fields)


def test_presets_and_config_forms():
    assert QuantSpec.preset("w4a8") == QuantSpec("int4", "group", 32)
    assert QuantSpec.preset("w4a8", "activation") == QuantSpec("int8", "token")
    assert QuantSpec.from_config({"preset": "gguf_q4_0", "ste": "clipped"}).ste == "clipped"
    assert QuantSpec.from_config({"dtype": "int3", "granularity": "group", "group_size": 64}).bits == 3
    with pytest.raises(ValueError, match=r"unknown preset 'w4a9'. Did you mean: 'w4a8'"):
        QuantSpec.preset("w4a9")
    with pytest.raises(ValueError, match="has no activation quantization"):
        QuantSpec.preset("gguf_q4_0", "activation")
    # llama.cpp's run-time rounding of a matmul's input, as an activation spec
    assert QuantSpec.preset("gguf_q8_0", "activation") == QuantSpec.preset("gguf_q8_0")
    with pytest.raises(ValueError, match=r"no field 'grup_size'. Did you mean: 'group_size'"):
        QuantSpec.from_config({"dtype": "int4", "grup_size": 32})


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_full_range_uses_every_code_and_errs_less_at_low_bits(bits):
    """On Gaussian weights in groups of 64: the full grid's codes reach -2^(b-1) (the restricted
    one's never do). Its squared error is smaller at 2-4 bits, where one more level matters
    (measured 1.98×, 1.30×, 1.10× less), and larger at 8 bits, where mapping absmax past the top
    code clips more than the extra level saves (0.96×) — why ``range`` is a choice."""
    from lowbit.quant.grids import fake_quantize_blocks, to_blocks

    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(bits))
    full = QuantSpec(f"int{bits}", "group", 64, range="full")
    restricted = QuantSpec(f"int{bits}", "group", 64, range="restricted")
    codes_full = fake_quantize_blocks(to_blocks(w, full), full)[2]
    codes_restricted = fake_quantize_blocks(to_blocks(w, restricted), restricted)[2]
    assert codes_full.min() == -(2 ** (bits - 1)) and codes_full.max() == 2 ** (bits - 1) - 1
    assert codes_restricted.min() == -(2 ** (bits - 1) - 1)
    assert len(torch.unique(codes_full)) == 2**bits and len(torch.unique(codes_restricted)) == 2**bits - 1
    ratio = (fake_quantize(w, restricted) - w).pow(2).mean() / (fake_quantize(w, full) - w).pow(2).mean()
    assert ratio > 1.05 if bits <= 4 else ratio < 1.0, ratio


@pytest.mark.parametrize(
    "spec, full",
    [
        (QuantSpec("int2", "tensor"), True),
        (QuantSpec("int3", "channel"), True),
        (QuantSpec("int3", "group", 64), True),
        (QuantSpec("int4", "group", 32), True),
        (QuantSpec("int4", "group", 128), True),
        (QuantSpec("int4", "group", 16), False),
        (QuantSpec("int4", "channel"), True),
        (QuantSpec("int4", "channel", range="restricted"), False),
        (QuantSpec("int4", "tensor"), False),
        (QuantSpec("int5", "group", 64), False),
        (QuantSpec("int8", "channel"), False),
        (QuantSpec("int8", "token"), False),
        (QuantSpec("int3", "group", 64, symmetric=False), False),
        (QuantSpec("int4", "group", 32, range="restricted"), False),
        (QuantSpec.preset("w4a8"), True),
        (QuantSpec.preset("w4a8", "activation"), False),
        (QuantSpec.preset("w4a16"), True),
        (QuantSpec.preset("w8a8"), False),
        (QuantSpec.preset("gguf_q4_0"), False),
    ],
    ids=lambda v: v.describe() + f" [{v.range}]" if isinstance(v, QuantSpec) else str(v),
)
def test_range_auto_picks_the_grid_that_measured_better(spec, full):
    """``range: auto`` (the default): full for int2/int3, int4 per channel and in groups of 32+,
    restricted for int4 g16 / per tensor, 5-8 bits, per-token activations and what has no such
    choice; an explicit range wins. The codes follow: the bottom code is -2^(b-1) exactly when the range is full."""
    assert spec.full_range is full
    if spec.dtype.startswith("int") and spec.convention == "default" and spec.granularity != "token":
        from lowbit.quant.grids import int_range

        bits = int(spec.dtype[3:])
        if spec.symmetric:
            assert int_range(spec)[0] == -(2 ** (bits - 1)) + (not full)


def test_non_divisible_group_is_a_clear_error():
    with pytest.raises(ValueError, match=r"group_size 32 does not divide the last dimension 100"):
        fake_quantize(torch.randn(3, 100), QuantSpec("int4", "group", 32))


def test_the_full_grid_gives_a_negative_absmax_the_bottom_code_whatever_the_scales_last_bit():
    """The negative absmax of a full-range block sits on the tie -(qmax + 0.5). Its code must not
    hang on the scale's last bit (CUDA computes ``a / 7.5`` as ``a · (1/7.5)``, the CPU exactly):
    it is -2^(b-1) either way, zeros stay zero, and the clipped STE keeps the absmax's gradient."""
    from lowbit.quant.grids import QParams, quantize, to_blocks

    spec = QuantSpec("int4", "group", 32, range="full")
    w = torch.randn(512, 32, generator=torch.Generator().manual_seed(7))
    w[0] = 0.0
    blocks = to_blocks(w, spec)
    absmax = blocks.abs().amax(1, keepdim=True)
    exact = absmax / 7.5
    reciprocal = absmax * torch.tensor(1 / 7.5, dtype=torch.float32)  # CUDA's scalar division
    assert not torch.equal(exact, reciprocal)  # the two differ in the last bit for some blocks
    negative = (blocks == -absmax) & (blocks < 0)
    for scale in (exact, reciprocal):
        codes = quantize(blocks, QParams(scale.clamp_min(1e-12)), spec)
        assert (codes[negative] == -8).all() and (codes[0] == 0).all()
    assert torch.equal(fake_quantize(w, spec)[0], torch.zeros(32))
    clipped = QuantSpec("int4", "group", 32, range="full", ste="clipped")
    x = w.clone().requires_grad_(True)
    fake_quantize(x, clipped).sum().backward()
    assert (x.grad[1:] == 1).all()  # nothing in a min-max block is past its grid
