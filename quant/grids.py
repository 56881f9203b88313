"""The arithmetic of each number format: scales, codes and dequantization on blocks of a tensor.

Every grid works on a 2-D *block view* ``[num_blocks, block_len]`` in float32 where each row
shares one scale (``to_blocks``). The same three functions serve fake quant (dequantize ∘
quantize) and ``convert`` (keep the codes and scales), so the two agree bit for bit.

Rounding follows the format: ``torch.round`` (half to even) for generic integers; llama.cpp's
``roundf`` (half away from zero) and ``trunc(x + 8.5)`` for its presets; bitsandbytes' midpoint
bucketing for NF4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.quant.spec import INT_BITS, QuantSpec

# bitsandbytes' NF4 code table (float32 values, ascending): codes index into it.
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=torch.float32,
)  # fmt: skip
NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
TINY = 1e-12  # scale floor for all-zero blocks: their codes are 0, so they dequantize to 0


@dataclass
class QParams:
    """Per-block quantization parameters, each ``[num_blocks, 1]`` float32.

    ``zero_point`` is an integer code offset (``(q - zp) · s``); ``offset`` a float added after
    scaling (``q · s + m``: GGUF Q4_1's minimum, LSQ+'s learned offset).
    """

    scale: Tensor
    zero_point: Tensor | None = None
    offset: Tensor | None = None


def block_len(shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> int:
    """Elements per scale for a tensor of ``shape``; raises when a group size does not divide."""
    last = shape[-1] if len(shape) else 1
    if spec.granularity == "tensor":
        return max(1, int(torch.Size(shape).numel()))
    if spec.granularity in ("channel", "token"):
        return last
    assert spec.group_size is not None
    if last % spec.group_size:
        raise ValueError(
            f"group_size {spec.group_size} does not divide the last dimension {last} of a {tuple(shape)} "
            f"tensor; pick a group size that divides it (e.g. {_divisor_hint(last)}) or skip this module"
        )
    return spec.group_size


def _divisor_hint(n: int) -> int:
    return next((g for g in (128, 64, 32, 16, 8) if n % g == 0), n)


def to_blocks(x: Tensor, spec: QuantSpec) -> Tensor:
    return x.float().reshape(-1, block_len(x.shape, spec))


def round_half_away(x: Tensor) -> Tensor:
    """C's ``roundf``: halves round away from zero (llama.cpp), unlike ``torch.round``."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def store_scale(scale: Tensor, spec: QuantSpec) -> Tensor:
    """Round a scale to the dtype the format stores it in (differentiable: the rounding passes gradients)."""
    if spec.scale_dtype == "fp16":
        return scale.to(torch.float16).float()
    if spec.scale_dtype == "bf16":
        return scale.to(torch.bfloat16).float()
    return scale


def int_range(spec: QuantSpec) -> tuple[int, int]:
    """(qmin, qmax) of the codes: [-(2^(b-1)-1), 2^(b-1)-1] symmetric (``range: full``:
    [-2^(b-1), 2^(b-1)-1]), [0, 2^b-1] asymmetric."""
    bits = INT_BITS[spec.dtype]
    if spec.symmetric:
        return -(2 ** (bits - 1)) + (not spec.full_range), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams(blocks: Tensor, spec: QuantSpec) -> QParams:
    """Min-max (absmax for symmetric) parameters of each block, as the format computes them."""
    convention = spec.convention
    if convention == "gguf_q8_0":
        return QParams(blocks.abs().amax(1, keepdim=True) / 127)
    if convention == "gguf_q4_0":
        index = blocks.abs().argmax(1, keepdim=True)  # the signed value of largest magnitude
        return QParams(torch.gather(blocks, 1, index) / -8)
    if convention == "gguf_q4_1":
        low, high = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
        return QParams((high - low) / 15, offset=low)
    if spec.dtype in INT_BITS:
        qmin, qmax = int_range(spec)
        if (
            spec.symmetric
        ):  # absmax maps to the middle of the code range's half-width: qmax, or qmax + 0.5 (full)
            half_width = (qmax - qmin) / 2
            return QParams(store_scale(blocks.abs().amax(1, keepdim=True) / half_width, spec).clamp_min(TINY))
        low = blocks.amin(1, keepdim=True).clamp_max(0)  # the range always holds 0 exactly
        high = blocks.amax(1, keepdim=True).clamp_min(0)
        scale = store_scale((high - low) / (qmax - qmin), spec).clamp_min(TINY)
        return QParams(scale, torch.clamp(qmin - torch.round(low / scale), qmin, qmax))
    if spec.dtype in FP8_DTYPES:
        top = torch.finfo(FP8_DTYPES[spec.dtype]).max
        return QParams(store_scale(blocks.abs().amax(1, keepdim=True) / top, spec).clamp_min(TINY))
    if spec.dtype == "nf4":
        return QParams(blocks.abs().amax(1, keepdim=True))  # bitsandbytes keeps fp32 absmax
    # ternary: BitNet b1.58's absmean scale
    return QParams(store_scale(blocks.abs().mean(1, keepdim=True), spec).clamp_min(1e-5))


def _reciprocal_or_zero(scale: Tensor) -> Tensor:
    return torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)


def quantize(blocks: Tensor, params: QParams, spec: QuantSpec) -> Tensor:
    """Codes of each element (float32 holding integers; fp8 values for fp8 formats)."""
    convention, scale = spec.convention, params.scale
    if convention == "gguf_q8_0":
        return round_half_away(blocks * _reciprocal_or_zero(scale))
    if convention == "gguf_q4_0":
        return torch.trunc(blocks * _reciprocal_or_zero(scale) + 8.5).clamp(0, 15)
    if convention == "gguf_q4_1":
        assert params.offset is not None
        return torch.trunc((blocks - params.offset) * _reciprocal_or_zero(scale) + 0.5).clamp(0, 15)
    if spec.dtype in INT_BITS:
        qmin, qmax = int_range(spec)
        if spec.full_range and spec.granularity != "token":  # (full implies symmetric)
            # A negative absmax lands on the tie -(qmax + 0.5): its code would hang on the scale's last
            # bit, which devices compute differently (CUDA divides by a scalar as a reciprocal
            # multiply), and a weight trained on CUDA is exported on the CPU. It takes the grid's end
            # on every device; the positive side clamps to qmax. (Per-token activation codes are
            # recomputed by the serving engine, whose arithmetic — ties included — the plain form is.)
            codes = torch.clamp(torch.round(blocks / scale), qmin, qmax)
            at_tie = (blocks < 0) & (blocks == -blocks.abs().amax(1, keepdim=True))
            return torch.where(at_tie, float(qmin), codes)
        if spec.symmetric:
            return torch.clamp(torch.round(blocks / scale), qmin, qmax)
        assert params.zero_point is not None
        return torch.clamp(torch.round(blocks / scale) + params.zero_point, qmin, qmax)
    if spec.dtype in FP8_DTYPES:
        top = torch.finfo(FP8_DTYPES[spec.dtype]).max  # casting past the top gives NaN, not saturation
        return (blocks / scale).clamp(-top, top).to(FP8_DTYPES[spec.dtype]).float()
    if spec.dtype == "nf4":
        normalized = torch.clamp(blocks * (1.0 / scale.clamp_min(1e-38)), -1, 1)
        return torch.bucketize(normalized, NF4_BOUNDS.to(blocks.device)).float()
    return torch.clamp(torch.round(blocks / scale), -1, 1)  # ternary


def dequantize(codes: Tensor, params: QParams, spec: QuantSpec) -> Tensor:
    """Values the codes stand for, computed as the format's reader computes them."""
    convention, scale = spec.convention, store_scale(params.scale, spec)
    if convention == "gguf_q4_0":
        return (codes - 8) * scale
    if params.offset is not None:  # GGUF Q4_1, LSQ+
        return scale * codes + store_scale(params.offset, spec)
    if spec.dtype == "nf4":
        return NF4_CODE.to(codes.device)[codes.long()] * scale
    if spec.dtype in INT_BITS and not spec.symmetric:
        assert params.zero_point is not None
        return (codes - params.zero_point) * scale
    return codes * scale  # symmetric ints (q8_0 too), fp8 and ternary


def code_range(params: QParams, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per block, the values that do not saturate: the grid's ends widened by the rounding slack.

    An element is *clipped* (for the clipped STE) only past the point where it would round to
    an end code anyway, so float rounding in the scale never masks an in-range element.
    """
    if spec.convention in ("gguf_q4_0", "gguf_q4_1"):
        lo_code, hi_code = 0.0, 15.0
    elif spec.convention == "gguf_q8_0":
        lo_code, hi_code = -127.0, 127.0
    elif spec.dtype in INT_BITS:
        lo_code, hi_code = (float(v) for v in int_range(spec))
    elif spec.dtype in FP8_DTYPES:
        top = torch.finfo(FP8_DTYPES[spec.dtype]).max
        lo_code, hi_code = -top, top
    elif spec.dtype == "nf4":
        lo_code, hi_code = 0.0, 15.0
    else:
        lo_code, hi_code = -1.0, 1.0
    ends = torch.cat([dequantize(torch.full_like(params.scale, lo_code), params, spec),
                      dequantize(torch.full_like(params.scale, hi_code), params, spec)], 1)  # fmt: skip
    low, high = ends.amin(1, keepdim=True), ends.amax(1, keepdim=True)
    if spec.dtype in FP8_DTYPES or spec.dtype == "nf4":
        slack = 1e-6 * torch.maximum(low.abs(), high.abs())
    else:
        slack = 0.5 * store_scale(params.scale, spec).abs()
        if spec.full_range:  # the absmax sits exactly on qmax + 0.5 steps: keep it inside
            slack = slack + 1e-6 * torch.maximum(low.abs(), high.abs())
    return low - slack, high + slack


def fake_quantize_blocks(blocks: Tensor, spec: QuantSpec) -> tuple[Tensor, QParams, Tensor]:
    """(dequantized blocks, their parameters, their codes) — one pass of the format's arithmetic."""
    params = qparams(blocks, spec)
    codes = quantize(blocks, params, spec)
    return dequantize(codes, params, spec), params, codes
