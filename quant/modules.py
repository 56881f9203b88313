"""Fake-quant modules: a ``FakeQuantizer`` per tensor, and the layers that use them.

``FakeQuantLinear`` subclasses ``nn.Linear`` (so anything that checks ``isinstance(m,
nn.Linear)`` — LoRA, FSDP wrapping policies — still sees a linear) and quantizes its weight and,
optionally, its input activations. ``from_linear``/``to_linear`` swap in and out; transformers'
GPT-2-style ``Conv1D`` (weight stored ``[in, out]``) is accepted by ``from_linear`` too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.quant.fake_quant import (
    fake_quantize,
    initial_scale,
    learned_codes,
    learned_fake_quantize,
)
from lowbit.quant.grids import QParams, block_len, fake_quantize_blocks, to_blocks
from lowbit.quant.spec import QuantSpec


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor by ``spec``; ``enabled=False`` makes it the identity.

    With ``spec.learn_scale`` it owns the learned ``scale`` (and LSQ+ ``offset``) parameters,
    initialised from the tensor given at construction (a weight). Given a weight on the meta
    device (a model built without memory, to be sharded or loaded later) they are created on the
    meta device too, with their shapes; ``initialize_scales`` fills them once the weights exist.

    ``blend`` (λ, default 1) mixes the float and the quantized tensor, ``x + λ·(q(x) − x)``: the
    quantization warm-up of the BitNet fine-tuning recipes ramps it from 0 to 1 so a pretrained
    model meets the grid gradually. λ = 1 returns ``q(x)`` itself and λ = 0 ``x`` itself (no
    arithmetic), so both ends are exact; in between the gradient is the STE's blended with 1.
    Not model state (the schedule sets it from the step, so a resumed run recomputes it): the
    forward branches on which of the three cases λ is in, and reads a value strictly between 0 and 1
    from a non-persistent 0-dim buffer, so ``torch.compile`` sees an input, not a constant — a
    warm-up of N steps compiles three variants, not N.
    """

    def __init__(self, spec: QuantSpec, init_from: Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.register_buffer("blend_weight", torch.ones(()), persistent=False)
        self.blend = 1.0
        self.scale: nn.Parameter | None = None
        self.offset: nn.Parameter | None = None
        if spec.learn_scale:
            if init_from is None:
                raise ValueError(
                    "a learned-scale quantizer needs the tensor it quantizes to initialise its scale"
                )
            scale, offset = initial_scale(init_from, spec)
            self.scale = nn.Parameter(scale)
            self.offset = nn.Parameter(offset) if offset is not None else None

    @property
    def blend(self) -> float:
        """The warm-up's λ (1: fully quantized)."""
        return self._blend

    @blend.setter
    def blend(self, value: float) -> None:
        self._blend = float(value)
        self._blend_case = "float" if value <= 0.0 else "quantized" if value >= 1.0 else "mixed"
        with torch.no_grad():
            if not self.blend_weight.is_meta:  # a meta-built model's buffer is filled when first set for real
                self.blend_weight.fill_(self._blend)

    @torch.no_grad()
    def initialize_from(self, x: Tensor) -> None:
        """(Re)set a learned scale and offset from ``x`` as construction would (min-max or MSE)."""
        if self.scale is None:
            return
        scale, offset = initial_scale(x, self.spec)
        self.scale.copy_(scale)
        if self.offset is not None and offset is not None:
            self.offset.copy_(offset)

    def freeze_scales(self) -> None:
        """Stop learning the scale/offset (they keep their current values)."""
        for param in (self.scale, self.offset):
            if param is not None:
                param.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled or self._blend_case == "float":
            return x
        if self.scale is not None:
            quantized = learned_fake_quantize(x, self.scale, self.offset, self.spec)
        else:
            quantized = fake_quantize(x, self.spec)
        if self._blend_case == "quantized":
            return quantized
        return x + self.blend_weight.to(x.dtype) * (quantized - x)

    def codes(self, x: Tensor) -> tuple[Tensor, QParams]:
        """(codes in the block view, parameters): exactly what ``forward`` dequantizes."""
        if self.scale is not None:
            return learned_codes(x, self.scale, self.offset, self.spec)
        _, params, codes = fake_quantize_blocks(to_blocks(x.detach(), self.spec), self.spec)
        return codes, params

    def extra_repr(self) -> str:
        blend = f", blend={self.blend:.3g}" if self.blend != 1.0 else ""
        return f"{self.spec.describe()}, enabled={self.enabled}{blend}"


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose weight (and optionally input) pass through fake quantizers.

    The weight is fake-quantized in every forward, from the weight the module holds at that
    moment, and nothing derived from it is kept between calls. A cache keyed on the weight tensor
    (its ``_version`` and ``data_ptr``) was tried and dropped: under FSDP2 the gathered weight is a
    fresh tensor whose version stays 0 in a reused allocation, so the cache returned the previous
    step's weights, and under sharding a cached full-size copy per layer would undo the memory
    that sharding saves. Recomputing costs one elementwise pass over the weight per micro-batch,
    small beside the matmul that reads the same weight for every token.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_quantizer = FakeQuantizer(weight_spec, self.weight) if weight_spec else None
        self.activation_quantizer = FakeQuantizer(activation_spec) if activation_spec else None

    @classmethod
    def from_linear(
        cls, linear: nn.Module, weight_spec: QuantSpec | None, activation_spec: QuantSpec | None = None
    ) -> FakeQuantLinear:
        """Wrap an ``nn.Linear`` (or transformers ``Conv1D``).

        A Linear's parameters are *shared*, not copied: tied weights (a head tied to the input
        embeddings) stay tied, and no memory is duplicated. A Conv1D's ``[in, out]`` weight is
        copied transposed.
        """
        weight, bias = _linear_weight(linear)
        # A group size that does not divide fails here, at the swap, not mid-training.
        if weight_spec is not None:
            block_len(weight.shape, weight_spec)
        if activation_spec is not None:
            block_len((weight.shape[1],), activation_spec)
        module = cls(weight.shape[1], weight.shape[0], bias is not None, device="meta")
        if isinstance(linear, nn.Linear):
            module.weight, module.bias = linear.weight, linear.bias
        else:
            module.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            module.bias = (
                None
                if bias is None
                else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
            )
        module.weight_quantizer = FakeQuantizer(weight_spec, module.weight) if weight_spec else None
        module.activation_quantizer = FakeQuantizer(activation_spec) if activation_spec else None
        return module

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the float (not quantized) weights."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def quantized_weight(self) -> Tensor:
        """The weight as the forward uses it (fake-quantized when the quantizer is enabled)."""
        quantizer = self.weight_quantizer
        if quantizer is None or not quantizer.enabled:
            return self.weight
        return quantizer(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_quantizer is not None:
            x = self.activation_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias)


class BitLinear(FakeQuantLinear):
    """BitNet b1.58's linear layer: ternary weights, int8 per-token activations, float latent weights.

    What a rule with ternary weights (the ``bitnet`` preset) swaps in. The weight is quantized with
    an absmean scale, ``s = mean|W|`` over the tensor (per output channel or per group when the
    spec says so), to ``clamp(round(W / s), -1, 1) · s``; the input of every token to int8 with
    its absmax, ``clamp(round(x · 127 / max|x|)) · max|x| / 127``. Both pass gradients straight
    through (``ste: clipped`` zeroes them outside the grid), and the optimizer updates the float
    latent weight the layer keeps, as in "The Era of 1-bit LLMs" (Ma et al. 2024) and transformers'
    ``integrations/bitnet.py``. It is a ``FakeQuantLinear`` — the arithmetic is the grid code every
    export reads back bit for bit — named for what it is in the model's printout and in checks.

    Scales come from the whole weight: under FSDP2 and ZeRO-3 a layer's forward sees the gathered
    tensor, never a shard of it.
    """

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary"


class FakeQuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (rows are tokens: per-channel = per token row)."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, weight_spec: QuantSpec) -> FakeQuantEmbedding:
        block_len(embedding.weight.shape, weight_spec)
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            device="meta",
        )
        module.weight = embedding.weight  # shared, so a tied output head stays tied
        module.weight_quantizer = FakeQuantizer(weight_spec, module.weight)
        return module

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.quantized_weight(), self.padding_idx)


def _linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight as [out, in], bias) of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2 family: weight is [in, out]
        return module.weight.t(), module.bias
    raise TypeError(
        f"cannot fake-quantize a {type(module).__name__}: supported are nn.Linear, transformers Conv1D "
        "and nn.Embedding; add a skip rule for it"
    )
