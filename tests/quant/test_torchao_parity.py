"""lowbit's full-range grids against torchao 0.18's QAT fake quantizer, element for element.

The QAT benchmark (benchmarks/qat_vs_torchao.py) trains lowbit "on torchao's grid": these tests
are what makes that claim true. torchao quantizes with ``x * (1 / scale)`` and lowbit with
``x / scale``; the two differ only where a value sits on a rounding tie, and lowbit pins the one
tie that every block with a negative absmax has (−absmax lands exactly on ``qmin − 0.5`` steps,
so torchao's code there hangs on the last bit of ``1 / scale``) to the bottom code. Everything
else must be bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.quant import QuantSpec, fake_quantize

torchao_qat = pytest.importorskip("torchao.quantization.qat")
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # noqa: E402

WEIGHT_CASES = {  # torchao config, lowbit spec, block length along a row (None: the whole row)
    "int4 g32": (dict(dtype=torch.int4, group_size=32), QuantSpec("int4", "group", 32, range="full"), 32),
    "int3 g64": (dict(dtype=torch.int3, group_size=64), QuantSpec("int3", "group", 64, range="full"), 64),
    "int2 g16": (dict(dtype=torch.int2, group_size=16), QuantSpec("int2", "group", 16, range="full"), 16),
    "int4 channel": (
        dict(dtype=torch.int4, granularity="per_channel"),
        QuantSpec("int4", "channel", range="full"),
        None,
    ),
    "int8 channel": (
        dict(dtype=torch.int8, granularity="per_channel"),
        QuantSpec("int8", "channel", range="full"),
        None,
    ),
}


def weight(seed: int) -> torch.Tensor:
    """Fresh Gaussian weights with the edge cases a block can hold: all zeros, one spike, a
    constant block, values exactly on half steps of their block."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=generator) * 0.05
    w[0] = 0.0
    w[1, 5] = 3.0
    w[2] = -0.02
    w[3, :8] = torch.tensor([-1.0, 0.5, -0.25, 0.125, 1 / 3, -2 / 3, 0.0, 0.75])
    return w


def torchao_fake_quant(w: torch.Tensor, config: dict) -> torch.Tensor:
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    dtype = config.pop("dtype")
    return IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, is_symmetric=True, **config))(w)


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_symmetric_weights_match_torchao_but_at_ties(case, seed):
    config, spec, length = WEIGHT_CASES[case]
    w = weight(seed)
    ours = fake_quantize(w, spec)
    theirs = torchao_fake_quant(w, dict(config))
    blocks = w.reshape(-1, length or w.shape[1])
    bits = int(spec.dtype[3:])
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = (blocks.abs().amax(1, keepdim=True) / ((qmax - qmin) / 2)).clamp_min(1e-30)
    # Where the two arithmetics can part: x / s (lowbit) and x * (1 / s) (torchao) round to different
    # codes, and the negative absmax, which sits on the tie qmin - 0.5 up to the scale's last bit.
    negative_absmax = (blocks < 0) & (blocks == -blocks.abs().amax(1, keepdim=True))
    divided, multiplied = blocks.float() / scale, blocks.float() * (1.0 / scale)
    tie = negative_absmax | (torch.round(divided) != torch.round(multiplied))
    differ = (ours != theirs).reshape(blocks.shape)
    assert not (differ & ~tie).any(), (
        f"{case}: {int((differ & ~tie).sum())} elements differ off a rounding tie"
    )
    codes, their_codes = ((v.reshape(blocks.shape) / scale).round() for v in (ours, theirs))
    assert torch.all((codes - their_codes)[differ].abs() == 1), "a tie moves a value by one code, not more"
    # lowbit's own code at the negative absmax: always the bottom one (on every device).
    assert torch.all(codes[negative_absmax] == qmin)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_token_asymmetric_int8_matches_torchao_bit_for_bit(seed):
    """w4a8's activations as torchao's 8da4w computes them: int8 per token with a zero point."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, 96, generator=generator) * 2 + 0.5
    x[0, 0] = 0.0  # an all-zero token
    x[0, 1] = 4.0  # a constant token
    x[1, 2, 7] = 80.0  # an outlier channel
    spec = QuantSpec.from_config({"preset": "w4a8", "symmetric": False}, "activation")
    theirs = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))(x)
    assert torch.equal(fake_quantize(x, spec), theirs)
