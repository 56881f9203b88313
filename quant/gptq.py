"""GPTQ rounding onto lowbit's own grids, and a float weight that fake-quantizes to exactly it.

GPTQ (Frantar et al., 2023) rounds a Linear's weight one input column at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by the inverse Hessian
``H = Σ x xᵀ`` of the layer's inputs, so the *output* error ``‖(W − Q) X‖²`` is what is minimised,
not the weight error that round-to-nearest minimises. At 3–4 bits this is the difference between
a usable and a broken PTQ, and a QAT run that starts from it has less to recover.

Why our own, not gptqmodel / llm-compressor / auto-gptq: those round onto *their* grids (their
scale and zero-point formulas, their packing, their CUDA extensions). lowbit's fake quant,
``convert`` and every exporter compute one grid per spec (``lowbit.quant.grids``), and a QAT run
re-derives each block's scale from the weight it holds in every forward. So the codes GPTQ picks
here are lowbit's, with each block's scale fixed up front from the original weight (GPTQ's
"static groups", which also makes activation order safe), and ``on_grid_weight`` builds the float
weight whose fake quant *is* those codes: every element sits on its code's value, except each
block's *anchor* — the element that sets the block's scale — which keeps its original value (its
code is forced to the one that value rounds to), so the scale the forward recomputes is the one
GPTQ used. ``gptq_weight`` checks that round trip bit for bit before it returns.

Grids: symmetric integer grids of the default convention (both ranges, per tensor / channel /
group) and GGUF Q8_0 / Q4_0 — every grid whose scale is set by one element of its block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.quant.grids import (
    QParams,
    block_len,
    dequantize,
    fake_quantize_blocks,
    int_range,
    qparams,
    quantize,
    round_half_away,
    to_blocks,
)
from lowbit.quant.spec import INT_BITS, QuantSpec

GPTQ_CONVENTIONS = ("gguf_q8_0", "gguf_q4_0")


def gptq_problem(spec: QuantSpec) -> str | None:
    """Why GPTQ cannot round onto ``spec`` (None when it can)."""
    if spec.learn_scale:
        return (f"{spec.describe()} learns its scales (LSQ), which would re-derive them from the GPTQ weight "
                "and round it again; drop learn_scale from the rule")  # fmt: skip
    if spec.convention in GPTQ_CONVENTIONS:
        return None
    if (
        spec.convention == "default"
        and spec.dtype in INT_BITS
        and spec.symmetric
        and spec.granularity != "token"
    ):
        return None
    return (f"GPTQ rounds onto grids whose scale one element of each block sets: symmetric int2-int8 "
            f"(per tensor, channel or group) and gguf_q8_0 / gguf_q4_0; {spec.describe()} is not one of them")  # fmt: skip


@dataclass
class GPTQResult:
    """One layer's GPTQ: the float weight to hold, its codes, and the output error of each rounding.

    ``error`` and ``rtn_error`` are ``tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ)`` for GPTQ's and
    round-to-nearest's ``Ŵ`` under the undamped Hessian: the share of the layer's output energy
    (on the calibration inputs) that the rounding loses.
    """

    weight: Tensor
    codes: Tensor
    error: float
    rtn_error: float


def _expand(per_block: Tensor, shape: torch.Size, length: int) -> Tensor:
    """A ``[num_blocks, 1]`` parameter as one value per weight element (blocks are row-major)."""
    return per_block.reshape(-1).repeat_interleave(length).reshape(shape)


def _round(values: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """Codes of ``values`` on fixed per-element ``scale``s, within the codes the fake quant can give."""
    if spec.convention == "gguf_q4_0":
        return quantize(values, QParams(scale), spec)  # trunc(x / d + 8.5) in [0, 15]
    if spec.convention == "gguf_q8_0":  # |x| ≤ absmax keeps llama.cpp's codes in ±127
        return round_half_away(values * torch.where(scale == 0, 0.0, 1 / scale)).clamp(-127, 127)
    qmin, qmax = int_range(spec)
    return torch.clamp(torch.round(values / scale), qmin, qmax)


def _fixed(blocks: Tensor) -> Tensor:
    """``[num_blocks, block_len]``: the elements whose codes GPTQ keeps — each block's anchor (its
    first element of largest magnitude, the one ``qparams`` reads) and every element of an all-zero
    block (whose scale is a floor that no other value could keep)."""
    index = blocks.abs().argmax(1, keepdim=True)
    anchors = torch.zeros_like(blocks, dtype=torch.bool).scatter_(1, index, True)
    return anchors | (blocks.abs().amax(1, keepdim=True) == 0)


def output_error(weight: Tensor, rounded: Tensor, hessian: Tensor) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` in float64."""
    weight, hessian = weight.double(), hessian.double()
    delta = weight - rounded.double()
    energy = ((weight @ hessian) * weight).sum().item()
    return ((delta @ hessian) * delta).sum().item() / max(energy, 1e-300)


def gptq_codes(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = True,
    block: int = 128,
) -> tuple[Tensor, Tensor]:
    """GPTQ's codes for ``weight`` ``[out, in]`` and the values they stand for (float32).

    ``hessian`` ``[in, in]`` is ``Σ x xᵀ`` over calibration inputs (any positive multiple);
    ``damp`` × its mean diagonal is added before inversion (GPTQ's percdamp); ``act_order``
    rounds the columns of largest input energy first. Each block's scale is ``qparams`` of the
    original weight, and each block's anchor element keeps the code it has there.
    """
    problem = gptq_problem(spec)
    if problem is not None:
        raise ValueError(problem)
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"a [{out_features}, {in_features}] weight needs a [{in_features}, {in_features}] Hessian"
        )
    length = block_len(weight.shape, spec)
    blocks = to_blocks(weight, spec)
    params = qparams(blocks, spec)
    scale = _expand(params.scale, weight.shape, length)
    fixed = _fixed(blocks).reshape(weight.shape)
    fixed_codes = quantize(blocks, params, spec).reshape(weight.shape)

    hessian = hessian.double().clone()
    dead = hessian.diagonal() == 0  # inputs that were always zero: their column rounds on its own
    hessian[dead, dead] = 1.0
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(in_features)
    hessian = hessian[order][:, order]
    hessian.diagonal().add_(damp * hessian.diagonal().mean())
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)

    work = weight.double()[:, order].clone()
    scale, fixed, fixed_codes = scale[:, order], fixed[:, order], fixed_codes[:, order]
    codes = torch.empty_like(scale)
    values = torch.empty_like(scale)
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        errors = torch.zeros(out_features, end - start, dtype=torch.float64)
        for column in range(start, end):
            w = work[:, column]
            code = torch.where(
                fixed[:, column], fixed_codes[:, column], _round(w.float(), scale[:, column], spec)
            )
            value = dequantize(code[:, None], QParams(scale[:, column, None]), spec)[:, 0]
            codes[:, column], values[:, column] = code, value
            error = (w - value.double()) / upper[column, column]
            work[:, column:end] -= error[:, None] * upper[column, column:end][None, :]
            errors[:, column - start] = error
        work[:, end:] -= errors @ upper[start:end, end:]
    inverse = torch.argsort(order)
    return codes[:, inverse], values[:, inverse]


def on_grid_weight(weight: Tensor, values: Tensor, spec: QuantSpec) -> Tensor:
    """The float weight (``weight``'s dtype) whose fake quant is ``values``: each element on its
    value, clamped to its block's anchor magnitude, the kept elements at their original values."""
    blocks = to_blocks(weight, spec)
    bound = blocks.abs().amax(1, keepdim=True)
    held = torch.maximum(torch.minimum(values.float().reshape(blocks.shape), bound), -bound)
    # (kept elements of an all-zero block are 0 either way; rounding to a narrower dtype is
    # monotonic and the bound is one of the weight's own values, so no element passes it)
    return torch.where(_fixed(blocks), blocks, held).reshape(weight.shape).to(weight.dtype)


def gptq_weight(
    weight: Tensor, hessian: Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = True
) -> GPTQResult:
    """GPTQ of one weight: the weight to hold, its codes and the output errors (GPTQ and RTN).

    The codes are those of the held weight's fake quant (what ``convert`` and the exporters
    write); they are GPTQ's own but where a block's stored scale is 0 (every code reads as 0).
    Raises ``RuntimeError`` if the held weight does not fake-quantize to GPTQ's values bit for bit
    (it would train from, and export, something else than what was measured).
    """
    _, values = gptq_codes(weight, hessian, spec, damp, act_order)
    held = on_grid_weight(weight, values, spec)
    again, _, codes = fake_quantize_blocks(to_blocks(held, spec), spec)
    again = again.reshape(weight.shape)
    if not torch.equal(again, values):
        wrong = int((again != values).sum())
        raise RuntimeError(
            f"GPTQ: {wrong} of {values.numel()} elements of the held weight fake-quantize to another value "
            f"({spec.describe()}, dtype {weight.dtype}); keep this layer's weights in float32"
        )
    rtn = fake_quantize_blocks(to_blocks(weight, spec), spec)[0].reshape(weight.shape)
    errors = output_error(weight, values, hessian), output_error(weight, rtn, hessian)
    return GPTQResult(held, codes.reshape(weight.shape), *errors)


def input_gram(inputs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, int]:
    """``(Σ x xᵀ, token count)`` of a Linear's inputs over the tokens ``mask`` keeps: float32 products
    (one batch's sum) returned in float64, where the batches are summed."""
    rows = inputs.detach().reshape(-1, inputs.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1).to(rows.device)]
    rows = rows.float()
    return (rows.T @ rows).double().cpu(), rows.shape[0]


class HessianAccumulator:
    """``Σ x xᵀ`` of one Linear's inputs over the calibration batches, in float64."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.tokens = 0

    def add(self, gram: Tensor, tokens: int) -> None:
        self.sum += gram
        self.tokens += tokens


__all__ = [
    "GPTQResult",
    "HessianAccumulator",
    "gptq_codes",
    "gptq_problem",
    "gptq_weight",
    "input_gram",
    "on_grid_weight",
    "output_error",
]
