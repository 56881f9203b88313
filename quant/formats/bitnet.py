"""Hugging Face BitNet checkpoints (``quant_method: bitnet``), as ``transformers.integrations.bitnet`` loads them.

A ternary weight ``[out, in]`` is stored as ``weight`` uint8 ``[out / 4, in]``, four ternary values
per byte, and ``weight_scale`` ``[1]`` in the model's dtype; every other tensor is stored as is.
``config.json`` carries a ``quantization_config`` that makes ``from_pretrained`` swap each
quantized ``nn.Linear`` for transformers' ``BitLinear`` (or ``AutoBitLinear``).

Which scale is stored depends on the layer class, because the two apply it differently:

* ``bitlinear`` (transformers' default class; ``extra["linear_class"]``): the output is *divided* by ``weight_scale``, so it holds
  ``1 / scale``. The weight it stands for, ``codes / (1 / scale)``, can differ from our
  ``codes * scale`` in the last bit or two (two roundings; < 2^-22 relative in float32).
* ``autobitlinear`` in ``offline`` mode (what we write by default, as Microsoft's
  bitnet-b1.58-2B-4T does): the output is *multiplied* by ``weight_scale = scale``, bit for bit
  our dequantization.

transformers keeps ``weight_scale`` in the model's dtype. For a bfloat16 model that rounds the
scale to bfloat16, which is exactly what the bf16 fake-quant forward does to ``±scale``, so
``autobitlinear`` stays bit-exact; ``bitlinear``'s rounded reciprocal is off by up to 2^-9 relative.

Both layers always quantize their input per token to int8 with an absmax scale, which is our
``bitnet`` preset's activation quantizer; ``check`` insists every quantized layer was trained with
it, since the exported model would otherwise compute something other than the trained one.

A model trained with SubLN (``model.subln``: RMSNorms before ``o_proj`` and ``down_proj``) is
written as transformers' own ``bitnet`` model type (``BitNetForCausalLM``), whose blocks are
exactly those: its config is the Llama config with ``model_type: bitnet`` and the source's
activation (``hidden_act: silu``; ``BitNetConfig`` takes any), and the norms keep their names
(``self_attn.attn_sub_norm``, ``mlp.ffn_sub_norm``). A model without SubLN keeps its own
architecture, with the ``quantization_config`` alone.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lowbit.quant.formats import (
    WEIGHTS_FILE,
    ExportError,
    ExportInputs,
    has_subln,
    linear_modules,
    module_name,
)
from lowbit.quant.spec import QuantSpec

VALUES_PER_BYTE = 4  # 2 bits per ternary value
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
# What BitLinear does to its input: int8, one absmax scale per token, kept in float32.
BITLINEAR_INPUT = QuantSpec(dtype="int8", granularity="token", range="restricted")


# -- packing ------------------------------------------------------------------------------------------


def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ternary codes ``{-1, 0, 1}`` of shape ``[rows, ...]`` into uint8 ``[ceil(rows / 4), ...]``.

    transformers' layout (``integrations.bitnet.pack_weights``): the *first* dimension is split into
    four consecutive chunks of ``ceil(rows / 4)`` rows; chunk ``i`` goes into bits ``2i..2i+1`` of
    every byte, as ``code + 1`` (so -1, 0, 1 are stored as 0, 1, 2). Row ``r`` of the packed tensor
    therefore holds rows ``r``, ``r + R``, ``r + 2R``, ``r + 3R`` of the weight (``R = rows / 4``),
    not four neighbours. Missing rows (``rows`` not a multiple of 4) are stored as zero bits.
    """
    rows = codes.shape[0]
    chunk = -(-rows // VALUES_PER_BYTE)
    stored = (codes.to(torch.int16) + 1).to(torch.uint8)
    padding = torch.zeros((VALUES_PER_BYTE * chunk - rows, *codes.shape[1:]), dtype=torch.uint8)
    stored = torch.cat([stored, padding.to(stored.device)])
    packed = torch.zeros((chunk, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    for i in range(VALUES_PER_BYTE):
        packed |= stored[i * chunk : (i + 1) * chunk] << (2 * i)
    return packed


def unpack_ternary(packed: Tensor, rows: int) -> Tensor:
    """Inverse of ``pack_ternary``: int16 codes ``[rows, ...]`` in ``{-1, 0, 1}``."""
    chunks = [(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)]
    return (torch.cat(chunks).to(torch.int16) - 1)[:rows]


# -- the model skeleton -------------------------------------------------------------------------------


def tolerance(inputs: ExportInputs) -> float:
    """How far ``read`` may be from the trained weights: 0, except ``bitlinear``'s reciprocal scale.

    ``bitlinear`` stores ``1/scale`` and divides by it: two roundings, within a few float32 ulps
    of the largest weight.
    """
    if _linear_class(inputs) == "autobitlinear":
        return 0.0
    largest = max(
        (weight.stored_scale().abs().max().item() for weight in inputs.quantized.values()), default=0.0
    )
    return largest * 2.0**-20


def _linear_class(inputs: ExportInputs) -> str:
    linear_class = inputs.extra.get("linear_class", "autobitlinear")  # the bit-exact one
    if linear_class not in LINEAR_CLASSES:
        raise ExportError(
            f"BitNet linear_class {linear_class!r} is not one transformers knows; use one of {LINEAR_CLASSES}"
        )
    return linear_class


# -- the writer contract ------------------------------------------------------------------------------


def check(inputs: ExportInputs) -> None:
    """Refuse weights the BitNet layers cannot hold, naming the layer and the fix."""
    _linear_class(inputs)
    if has_subln(inputs):
        _check_bitnet_architecture(inputs.config)
    if not inputs.quantized:
        raise ExportError(
            "no quantized weights to export: quantize the model's Linear layers with the `bitnet` preset "
            "(rule {match: '*', weight: bitnet, activation: bitnet}) before exporting to BitNet"
        )
    linears = linear_modules(inputs.config)
    for name, weight in inputs.quantized.items():
        module = module_name(name)
        spec = weight.spec
        if spec.dtype != "ternary" or spec.granularity != "tensor":
            raise ExportError(
                f"{name} is quantized as {spec.describe()}; the BitNet format holds only ternary weights with "
                "one scale per tensor: use the `bitnet` preset for it, or skip it in the quant rules"
            )
        if not isinstance(linears.get(module), nn.Linear):
            kind = type(linears[module]).__name__ if module in linears else "not a Linear layer"
            raise ExportError(
                f"{name} belongs to {module} ({kind}); transformers' BitNet loader only swaps nn.Linear "
                "layers, so this weight cannot be stored: skip it in the quant rules"
            )
        rows = weight.shape[0]
        if rows % VALUES_PER_BYTE:
            raise ExportError(
                f"{name} has {rows} output rows; BitNet packs 4 rows per byte and transformers' BitLinear "
                f"expects out_features divisible by 4: skip {module} in the quant rules"
            )
        activation = inputs.activations.get(module)
        if activation is None or activation.forward_fields() != BITLINEAR_INPUT.forward_fields():
            got = "no activation quantization" if activation is None else activation.describe()
            raise ExportError(
                f"{module} was trained with {got}, but transformers' BitLinear always quantizes its input to "
                "int8 per token (absmax / 127, the restricted range); the exported model would not compute what "
                "was trained. Train with "
                "the bitnet preset's activations (rule {match: ..., weight: bitnet, activation: bitnet})"
            )


def _check_bitnet_architecture(config) -> None:
    """What transformers' ``BitNetForCausalLM`` (Llama blocks + SubLN) can express of this model."""
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"it is {getattr(config, 'model_type', None)!r}, not a Llama-architecture model")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim * heads != config.hidden_size:
        problems.append(f"its attention width {heads} × {head_dim} differs from hidden_size {config.hidden_size}, "
                        "and BitNet's attn_sub_norm is hidden_size wide")  # fmt: skip
    if getattr(config, "mlp_bias", False):
        problems.append("its MLP has biases, which BitNet's MLP has not")
    if problems:
        raise ExportError(
            "this model has SubLN norms, so it exports as transformers' bitnet model type, but "
            f"{'; '.join(problems)}"
        )


def bitnet_model_config(config: dict) -> dict:
    """The ``config.json`` of a SubLN model as transformers' ``bitnet`` model type (BitNetForCausalLM)."""
    config = {key: value for key, value in config.items() if key not in ("mlp_bias", "pretraining_tp")}
    config.update(model_type="bitnet", architectures=["BitNetForCausalLM"])
    return config


def write(inputs: ExportInputs, out: Path) -> None:
    """Write ``model.safetensors``, ``config.json`` (with ``quantization_config``) and the tokenizer."""
    check(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, inputs.dtype_name)
    linear_class = _linear_class(inputs)
    tensors: dict[str, Tensor] = {}
    for name, tensor in inputs.state.items():
        tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for name, weight in inputs.quantized.items():
        scale = weight.scale.reshape(1).float()
        # BitLinear divides its output by weight_scale, AutoBitLinear multiplies: see the module doc.
        stored_scale = 1 / scale if linear_class == "bitlinear" else scale
        tensors[name] = pack_ternary(weight.codes)
        tensors[f"{module_name(name)}.weight_scale"] = stored_scale.to(dtype)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out / WEIGHTS_FILE,
              metadata={"format": "pt"})  # fmt: skip

    quantized_modules = {module_name(name) for name in inputs.quantized}
    float_linears = sorted(set(linear_modules(inputs.config)) - quantized_modules)
    config = inputs.config.to_dict()
    if has_subln(inputs):
        config = bitnet_model_config(config)
    config["dtype"] = inputs.dtype_name
    config["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": "offline",  # the weights are stored quantized, not re-quantized per forward
        "use_rms_norm": False,  # our layers have no norm of their own before the activation quant
        "rms_norm_eps": 1e-6,
        "modules_to_not_convert": float_linears,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if inputs.tokenizer is not None:
        inputs.tokenizer.save_pretrained(out)


def read(out: Path) -> dict[str, Tensor]:
    """Every weight as transformers computes it from the file, float32, by HF parameter name.

    Quantized weights are unpacked with transformers' own ``unpack_weights`` (run eagerly: it is
    wrapped in ``torch.compile``, whose CPU build costs seconds and changes nothing here) and scaled
    as the layer class does: ``codes / weight_scale`` (BitLinear) or ``codes * weight_scale``.
    """
    from transformers.integrations.bitnet import unpack_weights

    unpack = inspect.unwrap(unpack_weights)
    out = Path(out)
    tensors = load_file(out / WEIGHTS_FILE)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    result: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        scale = tensors.get(f"{module_name(name)}.weight_scale")
        if name.endswith(".weight") and tensor.dtype == torch.uint8 and scale is not None:
            codes = unpack(tensor, dtype=torch.float32)
            scale = scale.float()
            result[name] = codes / scale if quant["linear_class"] == "bitlinear" else codes * scale
        else:
            result[name] = tensor.float()
    return result


__all__ = ["check", "pack_ternary", "read", "unpack_ternary", "write"]
