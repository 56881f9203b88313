"""File formats that real inference engines load, written from integer codes + scales.

Each format is one module with the same three functions, so the exporter (``lowbit export``,
``lowbit.trainer.export``) and later methods (QLoRA, BitNet) drive them alike:

``check(inputs: ExportInputs) -> None``
    Raise ``ExportError`` (naming the problem and the fix) for anything the format cannot hold
    — before a byte is written.
``write(inputs: ExportInputs, out: Path) -> None``
    Write the model to ``out`` (a directory for Hugging Face formats, a file for GGUF).
``read(out: Path) -> dict[str, Tensor]``
    The weights as the format's *own* library dequantizes them, keyed by Hugging Face parameter
    name, float32 — the independent reader for the self-check.

Packing itself (bits into bytes) lives in ``lowbit.quant.packing`` as plain tensor functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.quant.convert import QuantizedWeight, convert
from lowbit.quant.modules import FakeQuantLinear
from lowbit.quant.spec import QuantSpec


class ExportError(ValueError):
    """A model, scheme or shape the chosen format cannot hold; the message says what to change."""


@dataclass
class ExportInputs:
    """What every writer receives.

    Attributes:
        config: the model's ``transformers`` config (``PretrainedConfig``).
        state: every float tensor to store as is, by HF parameter name (tied duplicates removed).
        quantized: every quantized weight by HF parameter name (``...q_proj.weight``).
        tokenizer: a ``transformers`` tokenizer, or None (then no tokenizer files are written).
        activations: the input-activation spec of each Linear that quantizes its input, by module
            name (``...q_proj``); formats that record runtime activation quantization use it.
        dtype_name: name of the float dtype high-precision tensors are stored in
            (``"bfloat16"``, ``"float16"``, ``"float32"``).
        extra: format-specific options.
    """

    config: Any
    state: dict[str, Tensor]
    quantized: dict[str, QuantizedWeight]
    tokenizer: Any = None
    activations: dict[str, QuantSpec] = field(default_factory=dict)
    dtype_name: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)


QUANTIZER_KEYS = ("weight_quantizer.", "activation_quantizer.")
# BitNet's sub-layer norms (``lowbit.trainer.subln``), by their module names.
SUBLN_NORMS = ("attn_sub_norm", "ffn_sub_norm")


def has_subln(inputs: ExportInputs) -> bool:
    """Whether the model carries BitNet's SubLN norms (which only BitNet architectures can hold)."""
    return any(f".{norm}." in name for name in inputs.state for norm in SUBLN_NORMS)


WEIGHTS_FILE = "model.safetensors"  # the Hugging Face formats' single weights file


def module_name(param_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj``."""
    return param_name.removesuffix(".weight")


def skeleton(config: Any) -> nn.Module | None:
    """The model ``config`` describes, built on the meta device (no memory); None if unknown.

    Writers use it to list the model's Linear layers: the ones left in float must be named in the
    file (``ignore``, ``modules_to_not_convert``...), and a tied output head, for one, has no tensor
    of its own in ``ExportInputs.state``.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except Exception:  # an architecture this Auto class does not know
            continue
    return None


def linear_modules(config: Any) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` (and transformers ``Conv1D``) of the model ``config`` describes, by name."""
    model = skeleton(config)
    if model is None:
        raise ExportError(
            f"transformers cannot build a {getattr(config, 'model_type', '?')!r} model from its config"
        )
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    }


@torch.no_grad()
def collect(model: nn.Module, tokenizer: Any = None, dtype: torch.dtype | None = None) -> ExportInputs:
    """``ExportInputs`` of a (fake-quant) Hugging Face model: codes for quantized weights, the rest float.

    A head tied to the input embeddings is stored once (as the embeddings), as ``save_pretrained``
    does; if only one of them is quantized, or both with different specs, the two no longer share
    values, so both are stored and the config written says ``tie_word_embeddings: false``.
    """
    config = model.config
    quantized = {f"{name}.weight": weight for name, weight in convert(model).items()}
    state: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in quantized or any(key in name for key in QUANTIZER_KEYS):
            continue
        state[name] = tensor.detach()
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    head_name = next((name for name, module in model.named_modules() if module is head), None)
    embed_name = next((name for name, module in model.named_modules() if module is embeddings), None)
    if tied and head_name is not None and embed_name is not None:
        head_key, embed_key = f"{head_name}.weight", f"{embed_name}.weight"
        same = (head_key in quantized) == (embed_key in quantized) and (
            head_key not in quantized or quantized[head_key].spec == quantized[embed_key].spec
        )
        if not same:  # one side quantized, or both with different specs: the values differ
            config = config.__class__.from_dict({**config.to_dict(), "tie_word_embeddings": False})
            if head_key not in quantized:
                state[head_key] = head.weight.detach()
            if embed_key not in quantized:
                state[embed_key] = embeddings.weight.detach()
        else:
            state.pop(head_key, None)
            quantized.pop(head_key, None)
    activations = {
        name: module.activation_quantizer.spec
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantLinear) and module.activation_quantizer is not None
    }
    dtype = dtype or next(model.parameters()).dtype
    return ExportInputs(
        config=config,
        state=state,
        quantized=quantized,
        tokenizer=tokenizer,
        activations=activations,
        dtype_name=str(dtype).removeprefix("torch."),
    )


__all__ = [
    "WEIGHTS_FILE",
    "ExportError",
    "ExportInputs",
    "collect",
    "has_subln",
    "linear_modules",
    "module_name",
    "skeleton",
]
