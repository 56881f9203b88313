"""bitsandbytes NF4 checkpoints: what ``save_pretrained`` writes for a ``load_in_4bit`` model.

transformers loads such a directory with ``from_pretrained`` alone (the ``quantization_config``
in ``config.json`` says ``quant_method: bitsandbytes``, ``load_in_4bit: true``): each quantized
``nn.Linear`` (or GPT-2 ``Conv1D``, weight kept ``[out, in]``) becomes a ``bnb.nn.Linear4bit``
whose ``Params4bit`` are rebuilt from

* ``<name>.weight``: uint8 ``[numel / 2, 1]``, two 4-bit codes per byte, high nibble first;
* ``<name>.weight.absmax``: float32 ``[numel / blocksize]``, one absmax per block of the
  row-major flattened weight (our ``scale``, unchanged);
* ``<name>.weight.quant_map``: the 16 NF4 values the codes index;
* ``<name>.weight.quant_state.bitsandbytes__nf4``: uint8 bytes of a JSON dict (quant type,
  blocksize, dtype, shape), bitsandbytes' ``pack_dict_to_tensor``.

These are produced by bitsandbytes' own ``QuantState.as_dict(packed=True)``, so the keys and the
JSON are exactly the library's. With the ``double_quant`` option (``ExportInputs.extra``) the absmax
is itself quantized to 8 bits in blocks of 256 around its mean, as ``quantize_4bit(...,
compress_statistics=True)`` does, adding ``weight.nested_absmax`` and ``weight.nested_quant_map``.
That re-quantization changes each block's scale by up to ~1% of the largest absmax, so the weights
no longer equal the trained fake-quant weights: it is off by default.

The state records the model's dtype (``ExportInputs.dtype_name``), which bitsandbytes dequantizes
to; ``bnb_4bit_compute_dtype`` defaults to it too (``extra["compute_dtype"]`` overrides it). For a
float32 model the loaded ``Linear4bit`` multiplies by exactly the trained fake-quant weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.quant.formats import WEIGHTS_FILE, ExportError, ExportInputs, linear_modules, module_name

# bitsandbytes' 4-bit block sizes (quantize_4bit's list); the state records it, so transformers loads any.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for double-quantizing the absmax
# What QuantState.as_dict(packed=True) stores next to a 4-bit weight, by key suffix.
STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


# -- packing ------------------------------------------------------------------------------------------


def pack_nf4(codes: Tensor) -> Tensor:
    """Pack 4-bit codes (0..15, any shape, read row-major) into uint8 ``[ceil(numel / 2)]``.

    bitsandbytes' layout: element ``2i`` in the *high* nibble of byte ``i``, element ``2i + 1`` in the
    low nibble (an odd last element gets a zero low nibble).
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nf4(packed: Tensor, n: int) -> Tensor:
    """Inverse of ``pack_nf4``: the first ``n`` codes as int16, flat."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].to(torch.int16)


# -- the writer contract ------------------------------------------------------------------------------


def tolerance(inputs: ExportInputs) -> float:
    """0: the absmax is stored in float32, exactly. Double quant re-quantizes it to 8 bits (≤ 1%)."""
    if not inputs.extra.get("double_quant", False):
        return 0.0
    return 0.01 * max((weight.scale.abs().max().item() for weight in inputs.quantized.values()), default=0.0)


def check(inputs: ExportInputs) -> None:
    """Refuse what a bitsandbytes ``Linear4bit`` cannot hold, naming the layer and the fix."""
    if not inputs.quantized:
        raise ExportError(
            "no quantized weights to export: quantize the model's Linear layers with the `nf4` preset "
            "(rule {match: '*', weight: nf4}) before exporting to bitsandbytes NF4"
        )
    linears = linear_modules(inputs.config)
    for name, weight in inputs.quantized.items():
        module = module_name(name)
        spec = weight.spec
        if spec.dtype != "nf4" or spec.group_size not in BLOCKSIZES:
            raise ExportError(
                f"{name} is quantized as {spec.describe()}; a bitsandbytes NF4 checkpoint holds nf4 weights with "
                f"group size {' / '.join(map(str, BLOCKSIZES))}: use the `nf4` preset (group 64) for it, or "
                "skip it in the quant rules"
            )
        if spec.scale_dtype != "fp32" or spec.learn_scale:
            raise ExportError(
                f"{name}: bitsandbytes stores each block's absmax itself in float32; this spec "
                f"({spec.describe()}, scale_dtype {spec.scale_dtype}{', learned' if spec.learn_scale else ''}) "
                "uses another scale: use the `nf4` preset"
            )
        if module not in linears:
            raise ExportError(
                f"{name} belongs to {module}, which is not a Linear layer; a bitsandbytes 4-bit checkpoint holds "
                "only the weights of nn.Linear (and GPT-2 Conv1D) layers, which transformers swaps for "
                "bnb.nn.Linear4bit: skip it in the quant rules"
            )
        if module in inputs.activations:
            raise ExportError(
                f"{module} quantizes its input activations ({inputs.activations[module].describe()}); "
                "bitsandbytes' Linear4bit runs them in float, so the exported model would not compute what was "
                "trained: export a weight-only nf4 model (drop `activation` from its quant rule)"
            )
    compute = inputs.extra.get("compute_dtype", inputs.dtype_name)
    if compute not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"compute_dtype {compute!r}: bitsandbytes computes in float32, bfloat16 or float16")


def quant_state(scale: Tensor, shape: torch.Size, blocksize: int, dtype: torch.dtype, double_quant: bool):
    """bitsandbytes' ``QuantState`` for an NF4 weight whose per-block absmax is ``scale``.

    ``dtype`` is the weight's float dtype, which bitsandbytes records and dequantizes to. With
    ``double_quant`` the absmax is quantized exactly as ``quantize_4bit(compress_statistics=True)``
    does: minus its mean, 8-bit blockwise in blocks of 256.
    """
    import bitsandbytes.functional as bnbf

    absmax = scale.reshape(-1).float().cpu()
    code = bnbf.get_4bit_type("nf4", device="cpu")
    common = {"shape": shape, "dtype": dtype, "blocksize": blocksize, "code": code, "quant_type": "nf4"}
    if not double_quant:
        return bnbf.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    nested_absmax, nested_state = bnbf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return bnbf.QuantState(absmax=nested_absmax, offset=offset, state2=nested_state, **common)


def write(inputs: ExportInputs, out: Path) -> None:
    """Write ``model.safetensors``, ``config.json`` (with ``quantization_config``) and the tokenizer."""
    from transformers import BitsAndBytesConfig

    check(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, inputs.dtype_name)
    double_quant = bool(inputs.extra.get("double_quant", False))
    tensors: dict[str, Tensor] = {}
    for name, tensor in inputs.state.items():
        tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for name, weight in inputs.quantized.items():
        state = quant_state(weight.scale, weight.shape, weight.spec.group_size, dtype, double_quant)
        tensors[name] = pack_nf4(weight.codes).reshape(-1, 1)  # Params4bit's [numel / 2, 1]
        for key, value in state.as_dict(packed=True).items():
            tensors[f"{name}.{key}"] = value.clone()  # the shared NF4 table, stored once per weight
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out / WEIGHTS_FILE,
              metadata={"format": "pt"})  # fmt: skip

    quantized_modules = {module_name(name) for name in inputs.quantized}
    quant_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=inputs.extra.get("compute_dtype", inputs.dtype_name),
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage="uint8",
        # Every Linear that stays float; without the list transformers would skip only lm_head.
        llm_int8_skip_modules=sorted(set(linear_modules(inputs.config)) - quantized_modules),
    )
    config = inputs.config.to_dict()
    config["dtype"] = inputs.dtype_name
    config["quantization_config"] = json.loads(quant_config.to_json_string(use_diff=False))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if inputs.tokenizer is not None:
        inputs.tokenizer.save_pretrained(out)


def read(out: Path) -> dict[str, Tensor]:
    """Every weight as bitsandbytes dequantizes it from the file, as float32, by HF parameter name.

    Each 4-bit weight's ``QuantState`` is rebuilt with ``QuantState.from_dict`` and dequantized by
    ``bitsandbytes.functional.dequantize_4bit`` into float32: codes and absmax are stored exactly,
    so this is the trained fake-quant weight bit for bit whatever the model's dtype. (At run time
    ``Linear4bit`` dequantizes into the dtype the state records, the model's, i.e. this weight
    rounded to bfloat16 for a bf16 model, as the bf16 fake-quant forward rounds it too.)
    """
    import bitsandbytes.functional as bnbf

    tensors = load_file(Path(out) / WEIGHTS_FILE)
    quantized = {name for name in tensors if f"{name}.absmax" in tensors}
    companions = {f"{name}.{part}" for name in quantized for part in STATE_KEYS}
    result: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name in companions:
            continue
        if name in quantized:
            stats = {part: tensors[f"{name}.{part}"] for part in STATE_KEYS if f"{name}.{part}" in tensors}
            state = bnbf.QuantState.from_dict(stats, device=torch.device("cpu"))
            state.dtype = torch.float32
            result[name] = bnbf.dequantize_4bit(tensor, state).float()
        else:
            result[name] = tensor.float()
    return result


__all__ = ["check", "pack_nf4", "quant_state", "read", "unpack_nf4", "write"]
