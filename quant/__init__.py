"""Quantization: specs, fake-quant functions and modules, rules, conversion to integer codes.

Usable alone::

    from lowbit.quant import QuantSpec, fake_quantize, quantize_model, convert
    w_hat = fake_quantize(w, QuantSpec.preset("gguf_q4_0"))
    quantize_model(model, [{"match": "*", "weight": "w4a8", "activation": "w4a8"}])
"""

from lowbit.quant.apply import (
    QuantRule,
    freeze_scales,
    initialize_scales,
    quant_grids,
    quantize_model,
    quantizers,
    set_quantizer_blend,
    set_quantizers_enabled,
    summary_table,
)
from lowbit.quant.convert import QuantizedWeight, convert, convert_weight
from lowbit.quant.fake_quant import fake_quantize, learned_fake_quantize
from lowbit.quant.grids import NF4_CODE, QParams
from lowbit.quant.modules import BitLinear, FakeQuantEmbedding, FakeQuantizer, FakeQuantLinear
from lowbit.quant.spec import DTYPES, GRANULARITIES, PRESETS, QuantSpec

__all__ = [
    "DTYPES",
    "BitLinear",
    "GRANULARITIES",
    "NF4_CODE",
    "PRESETS",
    "FakeQuantEmbedding",
    "FakeQuantLinear",
    "FakeQuantizer",
    "QParams",
    "QuantRule",
    "QuantSpec",
    "QuantizedWeight",
    "convert",
    "convert_weight",
    "fake_quantize",
    "freeze_scales",
    "initialize_scales",
    "learned_fake_quantize",
    "quantize_model",
    "quant_grids",
    "quantizers",
    "set_quantizer_blend",
    "set_quantizers_enabled",
    "summary_table",
]
