"""``convert``: a fake-quant model's weights → integer codes + scales (+ zero points / offsets).

The codes and parameters come from the very function the forward uses, and
``QuantizedWeight.dequantize()`` applies the format's dequantization, so
``convert(model)[name].dequantize()`` equals the weight the fake-quant layer multiplies by,
bit for bit. Exporters pack these codes into their files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.quant.grids import QParams, dequantize, store_scale
from lowbit.quant.modules import FakeQuantEmbedding, FakeQuantLinear
from lowbit.quant.spec import QuantSpec


@dataclass
class QuantizedWeight:
    """One weight in integer form.

    ``codes`` has the weight's shape (int16 for integer grids; float32 fp8 values for fp8);
    ``scale``, ``zero_point`` and ``offset`` are ``[num_blocks, 1]`` in block order (row-major:
    a ``[out, in]`` weight with group size g has ``out · in / g`` blocks).
    """

    spec: QuantSpec
    shape: torch.Size
    codes: Tensor
    scale: Tensor
    zero_point: Tensor | None = None
    offset: Tensor | None = None

    def stored_scale(self) -> Tensor:
        """The scale as dequantization uses it (rounded to ``spec.scale_dtype``), float32 ``[num_blocks, 1]``."""
        return store_scale(self.scale.float(), self.spec)

    def params(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.offset)

    def dequantize(self) -> Tensor:
        """The float weight these codes stand for, as float32."""
        blocks = self.codes.float().reshape(self.scale.shape[0], -1)
        return dequantize(blocks, self.params(), self.spec).reshape(self.shape)


def convert_weight(module: FakeQuantLinear | FakeQuantEmbedding) -> QuantizedWeight:
    """Codes and parameters of one fake-quant layer's weight."""
    quantizer = module.weight_quantizer
    if quantizer is None:
        raise ValueError(f"{type(module).__name__} has no weight quantizer: nothing to convert")
    codes, params = quantizer.codes(module.weight.detach())
    integer = quantizer.spec.dtype not in ("fp8_e4m3", "fp8_e5m2")
    return QuantizedWeight(
        spec=quantizer.spec,
        shape=module.weight.shape,
        codes=(codes.to(torch.int16) if integer else codes).reshape(module.weight.shape),
        scale=params.scale,
        zero_point=params.zero_point,
        offset=params.offset,
    )


@torch.no_grad()
def convert(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every fake-quantized weight of ``model`` by module name (in ``named_modules`` order)."""
    return {
        name: convert_weight(module)
        for name, module in model.named_modules()
        if isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)) and module.weight_quantizer is not None
    }
