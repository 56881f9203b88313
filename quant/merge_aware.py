"""Merge-aware LoRA on a fake-quant base: the forward quantizes the *merged* weight.

Plain LoRA over a QAT layer computes ``fq(W)·x + s·B·A·x``; merging it for deployment and
quantizing ``W + s·B·A`` gives another model (the adapters were never trained through that
rounding), which is how 4-bit merges silently degrade (peft#2321, transformers#31293). Here the
forward is ``fq(W + s·B·A)·x`` on the layer's own grid — the export grid when its rule uses a
format preset — so the straight-through estimator trains the adapters through exactly the weights
that the merged, quantized export stores: the export is the trained model, bit for bit. QA-LoRA
reaches the same goal by restricting the adapters to group-wise shifts; this keeps them full rank.

The layer is peft's own ``lora.Linear`` (same parameters, names, ``merge`` and saving) with only
``forward`` replaced; ``make_merge_aware`` switches the class of adapted fake-quant layers in place.
"""

from __future__ import annotations

import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from lowbit.quant.modules import FakeQuantLinear


class MergeAwareLoraLinear(LoraLinear):
    """``act_q(x) @ fq(W + Σ scaling·B·A)ᵀ + b`` for a fake-quant base layer."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base = self.get_base_layer()
        if self.disable_adapters or self.merged or not self.active_adapters:
            return base(x)
        weight = base.weight
        if weight.numel() == 0:  # a ZeRO-3 placeholder: the weight is gathered only in base's own forward
            raise RuntimeError(
                "merge-aware LoRA reads the base weight outside its module's forward, which ZeRO-3 does not "
                "gather: run it with strategy.name single, ddp or fsdp2"
            )
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                weight = weight + self.get_delta_weight(adapter)
        quantizer = base.weight_quantizer
        if quantizer is not None and quantizer.enabled:
            weight = quantizer(weight)
        if base.activation_quantizer is not None:
            x = base.activation_quantizer(x)
        return F.linear(x, weight.to(x.dtype), base.bias)


def make_merge_aware(model: nn.Module) -> int:
    """Turn every peft LoRA layer over a ``FakeQuantLinear`` into a ``MergeAwareLoraLinear``;
    return how many. (Layers whose base is float keep plain LoRA: their merge is exact anyway.)"""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear and isinstance(module.get_base_layer(), FakeQuantLinear):
            module.__class__ = MergeAwareLoraLinear
            count += 1
    return count


__all__ = ["MergeAwareLoraLinear", "make_merge_aware"]
