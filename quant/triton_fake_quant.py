"""A hand-written Triton kernel for the commonest QAT weight grid: symmetric int, per group.

``torch.compile`` fuses the grid arithmetic into one kernel but leaves it at about half of copy
bandwidth on an H100 (its reduction schedule for 32-element groups). This kernel reads a tile of
whole groups once, takes each group's absmax in registers, and writes the fake-quant values once.
It computes exactly what ``grids.fake_quantize_blocks`` does — IEEE division (``div_rn``), the
stored-dtype rounding of the scale, round-half-to-even, clamp — so results are bit
identical (tested on CUDA against the CPU eager path).

Only CUDA, and only when ``triton`` imports; ``supports`` says which specs it covers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quant.grids import TINY, int_range
from lowbit.quant.spec import INT_BITS, QuantSpec

GROUPS_PER_PROGRAM = 64


try:  # CUDA images ship Triton with torch; CPU-only installs do not
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def available() -> bool:
    return triton is not None


def supports(x: Tensor, spec: QuantSpec) -> bool:
    """Symmetric integer grids (restricted or full range) with groups of 8–256 (a power of two), the
    default convention, on CUDA. (Triton's interpreter, ``TRITON_INTERPRET=1``, runs the same kernel
    on CPU tensors: how the tests check it without a GPU.)"""
    return (
        x.is_cuda
        and x.is_contiguous()
        and spec.dtype in INT_BITS
        and spec.symmetric
        and spec.convention == "default"
        and spec.granularity == "group"
        and spec.group_size is not None
        and 8 <= spec.group_size <= 256
        and spec.group_size & (spec.group_size - 1) == 0
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and available()
    )


if triton is not None:
    ROUNDING_MAGIC = tl.constexpr(12582912.0)  # 1.5 · 2^23

    @triton.jit
    def _fake_quant_group_sym(x_ptr, out_ptr, n_groups, qmin, qmax, tiny,
                              GROUP: tl.constexpr, BLOCK: tl.constexpr, SCALE_DTYPE: tl.constexpr,
                              OUT_FP32: tl.constexpr, FULL: tl.constexpr):  # fmt: skip
        groups = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offsets = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        inside = (groups < n_groups)[:, None]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        # absmax over half the code range: qmax (restricted), qmax + 0.5 (full) — grids.qparams
        scale = tl.math.div_rn(absmax, (qmax - qmin) * 0.5)
        if SCALE_DTYPE == 1:
            scale = scale.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
        elif SCALE_DTYPE == 2:
            scale = scale.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
        scale = tl.maximum(scale, tiny)
        # Clamping to [qmin - 1, qmax + 1] first changes no result (rounding is monotonic, the ends
        # are integers) and keeps |v| < 2^22, where adding and removing 1.5·2^23 rounds to the
        # nearest integer, ties to even, like torch.round.
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), qmin - 1.0), qmax + 1.0)
        codes = (v + ROUNDING_MAGIC) - ROUNDING_MAGIC
        codes = tl.minimum(tl.maximum(codes, qmin), qmax)
        if FULL:  # the negative absmax takes the bottom code whatever the scale's last bit (grids.quantize)
            codes = tl.where((x < 0) & (x == -absmax[:, None]), qmin, codes)
        out = codes * scale[:, None]
        if OUT_FP32:
            tl.store(out_ptr + offsets, out, mask=inside)
        else:  # round to nearest even, as torch's .to(dtype)
            tl.store(
                out_ptr + offsets, out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside
            )


def fake_quantize_triton(x: Tensor, spec: QuantSpec) -> Tensor:
    """``x`` fake-quantized (same shape and dtype); ``supports(x, spec)`` must hold."""
    group = spec.group_size
    assert group is not None and x.shape[-1] % group == 0
    out = torch.empty_like(x)
    n_groups = x.numel() // group
    qmin, qmax = int_range(spec)
    scale_dtype = {"fp32": 0, "fp16": 1, "bf16": 2}[spec.scale_dtype]
    grid = (-(-n_groups // GROUPS_PER_PROGRAM),)
    _fake_quant_group_sym[grid](x, out, n_groups, float(qmin), float(qmax), TINY, GROUP=group, BLOCK=GROUPS_PER_PROGRAM,
                                SCALE_DTYPE=scale_dtype, OUT_FP32=x.dtype == torch.float32, FULL=spec.full_range)  # fmt: skip
    return out
