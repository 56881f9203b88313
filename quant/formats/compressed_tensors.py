"""compressed-tensors checkpoints (vLLM, transformers): int4/int8 weights as integer codes + scales.

The directory written is what llm-compressor saves and what vLLM and ``transformers`` load:
``config.json`` with a ``quantization_config`` (``quant_method: compressed-tensors``) and one
``model.safetensors``. Each quantized Linear ``<layer>`` is stored by the format the library itself
picks for its scheme (``compressed_tensors.compressors.format.infer_module_format``):

``pack-quantized`` (weight-only int4/int8, vLLM's WNA16 kernels)
    ``<layer>.weight_packed`` int32 ``[out, in·bits/32]``: unsigned codes, ``32/bits`` per int32,
    least-significant bits first along the input dim; ``<layer>.weight_scale`` float32
    ``[out, in/group]`` (``[out, 1]`` per channel); ``<layer>.weight_shape`` int64 ``[2]``; and for
    asymmetric schemes ``<layer>.weight_zero_point`` int32, the zero points packed the same way
    along the *output* dim (``[out·bits/32, in/group]``).
``int-quantized`` (int weights with dynamic int8 activations, vLLM's W8A8/W4A8 int kernels)
    ``<layer>.weight`` int8 ``[out, in]`` (the signed codes, unpacked), ``<layer>.weight_scale``
    float32, and for asymmetric schemes ``<layer>.weight_zero_point`` int8 ``[out, in/group]``.
    The library infers this format for every int scheme with input activations, and vLLM only
    runs activation quantization for it: a ``pack-quantized`` W4A8 checkpoint loads in vLLM as
    no known scheme. So ``w4a8`` and ``w8a8`` models are written ``int-quantized``.

Codes. compressed-tensors' integer grid is always the *signed* one, ``[-2^(b-1), 2^(b-1) - 1]``,
with the zero point on the same grid, and its packer stores ``code + 2^(b-1)`` (unsigned). Our
symmetric codes are signed already; our asymmetric codes and zero points are unsigned
``[0, 2^b - 1]``, so their library codes are ``q - 2^(b-1)`` and ``zp - 2^(b-1)``: the
difference ``q - zp`` (all that dequantization uses) is unchanged, and the packed unsigned values
are our codes as they are.

Scales are stored in float32, whatever the model dtype: the library dequantizes as
``(q - zp).to(scale.dtype) * scale`` in the scale's dtype, exactly our float32
``(q - zp) · s``, so the weights it reconstructs are bit for bit the fake-quant weights. A bf16
scale would both round the scale (ours are float32 values) and round the product to bf16.
Engines that run in bf16 (vLLM) cast the scale to their compute dtype when they load it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.quant.convert import QuantizedWeight
from lowbit.quant.formats import WEIGHTS_FILE, ExportError, ExportInputs, skeleton
from lowbit.quant.spec import INT_BITS, QuantSpec

PACKED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
MIXED = "mixed-precision"
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Linear layers that vLLM fuses into one (qkv_proj, gate_up_proj): their parts must share a scheme.
FUSED_PARTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# --------------------------------------------------------------------------------------------
# Packing (plain tensor functions)
# --------------------------------------------------------------------------------------------


def _values_per_word(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise ValueError(
            f"pack_int32 packs widths that divide 32 (1, 2, 4, 8 bits), not {bits}: "
            "wider or odd widths straddle int32 words in compressed-tensors' dense layout"
        )
    return 32 // bits


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Unsigned ``bits``-wide integers → int32 words, ``32/bits`` per word along the last dim.

    Element ``i`` of a row goes to word ``i // (32/bits)`` at bit ``(i % (32/bits)) · bits``
    (least-significant bits first), the last word zero-padded: compressed-tensors'
    ``pack_to_int32`` layout for widths dividing 32. ``values`` must already be unsigned
    (``[0, 2^bits)``); the library's own packer takes signed codes and adds ``2^(bits-1)`` first.
    The int32 words are the two's-complement view of the 32 bits, as the library stores them.
    """
    per_word = _values_per_word(bits)
    values = values.to(torch.int64)
    if values.numel() and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"pack_int32 takes unsigned {bits}-bit values in [0, {2**bits - 1}]")
    length = values.shape[-1]
    words = -(-length // per_word)
    values = nn.functional.pad(values, (0, words * per_word - length))
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    packed = (values.reshape(*values.shape[:-1], words, per_word) << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # the same 32 bits, as int32
    return packed.to(torch.int32)


def unpack_int32(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of ``pack_int32``: int32 words → the first ``length`` unsigned values (int64)."""
    per_word = _values_per_word(bits)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    values = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :length]


# --------------------------------------------------------------------------------------------
# From our codes to the library's tensors
# --------------------------------------------------------------------------------------------


def _scale(weight: QuantizedWeight) -> Tensor:
    """The scale exactly as our dequantization uses it, ``[out, blocks per row]`` float32.

    Specs with ``scale_dtype`` fp16/bf16 round the scale before use; the rounded value is what
    multiplies the codes, so that is the value stored (in float32, see the module docstring).
    """
    return weight.stored_scale().reshape(weight.shape[0], -1).contiguous()


def _unsigned(codes: Tensor, spec: QuantSpec) -> Tensor:
    """Our codes (or zero points) → the unsigned values the library packs (``library code + 2^(b-1)``)."""
    bits = INT_BITS[spec.dtype]
    codes = codes.to(torch.int64)
    return codes + 2 ** (bits - 1) if spec.symmetric else codes


def compress(weight: QuantizedWeight, fmt: str) -> dict[str, Tensor]:
    """One layer's tensors in compressed-tensors' ``fmt``, by local name (``weight_packed``...)."""
    spec, bits = weight.spec, INT_BITS[weight.spec.dtype]
    unsigned = _unsigned(weight.codes, spec)
    zero_point = None
    if not spec.symmetric:
        assert weight.zero_point is not None
        zero_point = weight.zero_point.round().to(torch.int64).reshape(weight.shape[0], -1)
    out: dict[str, Tensor] = {}
    if fmt == PACKED:
        out["weight_packed"] = pack_int32(unsigned, bits)
        out["weight_scale"] = _scale(weight)
        out["weight_shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)
        if zero_point is not None:  # packed along the output dim, as the library does
            out["weight_zero_point"] = pack_int32(zero_point.T, bits).T.contiguous()
    else:  # int-quantized: the signed library codes themselves, one per int8
        out["weight"] = (unsigned - 2 ** (bits - 1)).to(torch.int8).contiguous()
        out["weight_scale"] = _scale(weight)
        if zero_point is not None:
            out["weight_zero_point"] = (zero_point - 2 ** (bits - 1)).to(torch.int8).contiguous()
    return out


def weight_args(spec: QuantSpec) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` of a weight spec (``check`` has vetted it)."""
    group = spec.granularity == "group"
    return {
        "num_bits": INT_BITS[spec.dtype],
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "group" if group else "channel",
        "group_size": spec.group_size if group else None,
        "dynamic": False,
        "actorder": None,
    }


def activation_args(spec: QuantSpec) -> dict[str, Any]:
    """``QuantizationArgs`` of a dynamic per-token int8 input quantizer.

    The runtime recomputes these scales per token; its arithmetic is the engine's own (the
    library's reference divides the absmax by 127.5 — ``range: full`` — vLLM's CUDA kernel by 127,
    ``restricted``), so the record says *what* is quantized, not bit-exact activations.
    """
    return {
        "num_bits": 8,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "token",
        "group_size": None,
        "dynamic": True,
        "actorder": None,
    }


# --------------------------------------------------------------------------------------------
# The model's Linear layers
# --------------------------------------------------------------------------------------------


def _module_kinds(inputs: ExportInputs) -> tuple[dict[str, str], str | None]:
    """(module name → class kind for every Linear/Embedding-like layer, architecture name).

    Without a buildable model, every 2-D ``.weight`` is assumed to be a Linear unless its name
    says embedding.
    """
    model = skeleton(inputs.config)
    if model is None:
        names = {
            n.removesuffix(".weight")
            for n, t in inputs.state.items()
            if n.endswith(".weight") and t.ndim == 2
        }
        names |= {n.removesuffix(".weight") for n in inputs.quantized}
        return {n: ("Embedding" if "embed" in n else "Linear") for n in sorted(names)}, None
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kinds[name] = "Linear"
        elif isinstance(module, nn.Embedding):
            kinds[name] = "Embedding"
        elif type(module).__name__ == "Conv1D":
            kinds[name] = "Conv1D"
    return kinds, type(model).__name__


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def weight_problem(name: str, weight: QuantizedWeight) -> str | None:
    """Why this format cannot hold ``weight`` (None when it can); other formats' fixes ask it too."""
    spec = weight.spec
    where = f"{name} is quantized {spec.describe()}"
    if spec.convention != "default":
        return (f"{where}, llama.cpp's {spec.convention} grid (its rounding and fp16 scales): export it as GGUF, "
                "or train with a plain int4 spec (e.g. {dtype: int4, granularity: group, group_size: 32}) "
                "for compressed-tensors")  # fmt: skip
    if spec.dtype == "nf4":
        return (f"{where}: NF4 is bitsandbytes' grid, which compressed-tensors does not hold; export it in the "
                "bitsandbytes format, or train with int4 (e.g. preset w4a16) for vLLM")  # fmt: skip
    if spec.dtype in ("fp8_e4m3", "fp8_e5m2"):
        return (f"{where}: fp8 weights are compressed-tensors' float-quantized format, not this int writer's; "
                "export them with the fp8 format, or train with int8/int4 weights")  # fmt: skip
    if spec.dtype == "ternary":
        return (f"{where}: ternary (BitNet) weights have no compressed-tensors kernel; export them with "
                "--format bitnet (one scale per tensor) or gguf-tq2_0 / gguf-tq1_0 (rows a multiple of 256)")  # fmt: skip
    if spec.dtype not in ("int4", "int8"):
        return (f"{where}: vLLM's compressed-tensors kernels take int4 or int8 weights only; train with "
                "int4 or int8 (e.g. preset w4a16, w4a8 or w8a8)")  # fmt: skip
    if spec.granularity not in ("group", "channel"):
        return (f"{where}: compressed-tensors' int kernels take per-group or per-channel scales; use "
                "granularity 'channel' or 'group'")  # fmt: skip
    if weight.offset is not None:
        return (f"{where} with a learned float offset (LSQ+): compressed-tensors stores integer zero points "
                "only; train with symmetric LSQ or without learn_scale")  # fmt: skip
    if len(weight.shape) != 2:
        return f"{where} but has shape {tuple(weight.shape)}: only 2-D Linear weights can be stored"
    return None


def _activation_problem(name: str, spec: QuantSpec) -> str | None:
    if spec.dtype == "int8" and spec.granularity == "token":
        return None
    return (f"{name} quantizes its input activations {spec.describe()}: compressed-tensors' int kernels run "
            "dynamic per-token int8 activations only (presets w4a8, w8a8); use that, or drop the activation "
            "spec for a weight-only export")  # fmt: skip


def _scheme_key(weight: QuantizedWeight, activation: QuantSpec | None) -> str:
    """A hashable description of one layer's scheme, which groups layers into ``config_groups``."""
    return json.dumps([weight_args(weight.spec), activation_args(activation) if activation else None])


def _plan(inputs: ExportInputs) -> tuple[dict[str, dict[str, Any]], list[str], str | None]:
    """Validate everything and decide the layout: (config_groups, ignore, architecture).

    ``config_groups`` maps a group name to ``{"scheme": key, "format": ..., "layers": [...]}``.
    Raises ``ExportError`` on the first thing the format cannot hold.
    """
    if not inputs.quantized:
        raise ExportError(
            "the model has no quantized weights, so there is nothing for compressed-tensors to pack: "
            "train with a `quant` rule (e.g. {match: '*', weight: w4a16}) or export with --ptq"
        )
    kinds, architecture = _module_kinds(inputs)
    layers: dict[str, str] = {}  # module name → scheme key
    for key, weight in inputs.quantized.items():
        module = key.removesuffix(".weight")
        kind = kinds.get(module, "Linear")
        if kind != "Linear":
            raise ExportError(
                f"{key} is a quantized {kind}: compressed-tensors (and vLLM) quantize Linear layers only; "
                "keep it in float (quant.quantize_embeddings=false, or a `skip` rule for it)"
            )
        problem = weight_problem(key, weight)
        if problem:
            raise ExportError(problem)
        activation = inputs.activations.get(module)
        if activation is not None and (problem := _activation_problem(module, activation)):
            raise ExportError(problem)
        layers[module] = _scheme_key(weight, activation)
    orphans = sorted(set(inputs.activations) - set(layers))
    if orphans:
        raise ExportError(
            f"{orphans[0]} quantizes its input activations but keeps a float weight: compressed-tensors "
            "schemes quantize the weight too; give that rule a weight spec or drop its activation spec"
        )
    _check_fused(layers)
    by_scheme: dict[str, list[str]] = defaultdict(list)
    for module, key in layers.items():
        by_scheme[key].append(module)
    groups = {}
    for index, (key, modules) in enumerate(by_scheme.items()):
        has_activation = json.loads(key)[1] is not None
        groups[f"group_{index}"] = {
            "scheme": key,
            "format": INT_QUANTIZED if has_activation else PACKED,
            "layers": modules,
        }
    ignore = [name for name, kind in kinds.items() if kind == "Linear" and name not in layers]
    return groups, ignore, architecture


def _check_fused(layers: dict[str, str]) -> None:
    """vLLM fuses q/k/v and gate/up projections into one matmul: each set must share one scheme."""
    parents = {name.rpartition(".")[0] for name in layers}
    for parent in sorted(parents):
        for parts in FUSED_PARTS:
            names = [f"{parent}.{part}" if parent else part for part in parts]
            present = [layers.get(name, "float") for name in names]
            if all(value == "float" for value in present):
                continue
            if len(set(present)) > 1:
                detail = ", ".join(
                    f"{name}: {'float' if key == 'float' else _describe(key)}"
                    for name, key in zip(names, present)
                )
                raise ExportError(
                    f"vLLM runs {', '.join(parts)} as one fused matmul, so they need one scheme, but {detail}; "
                    "give them the same quant rule"
                )


def _describe(key: str) -> str:
    weights, activations = json.loads(key)
    shape = f"g{weights['group_size']}" if weights["strategy"] == "group" else "channel"
    kind = "sym" if weights["symmetric"] else "asym"
    return f"int{weights['num_bits']} {shape} {kind}" + (" + int8 tokens" if activations else "")


def check(inputs: ExportInputs) -> None:
    """Raise ``ExportError`` (what is wrong and what to do) for anything this writer cannot store."""
    _plan(inputs)


# --------------------------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------------------------


def quantization_config(groups: dict[str, dict[str, Any]], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``.

    One group targets every Linear (``targets: ["Linear"]``, the usual llm-compressor form);
    several groups (mixed schemes) name their layers exactly, so no layer matches two groups.
    ``format`` is the one format of all groups, or ``mixed-precision``, with each group's own
    ``format`` beside its scheme (what vLLM and the library read first).
    """
    config_groups = {}
    for name, group in groups.items():
        weights, activations = json.loads(group["scheme"])
        config_groups[name] = {
            "targets": ["Linear"] if len(groups) == 1 else sorted(group["layers"]),
            "weights": weights,
            "input_activations": activations,
            "output_activations": None,
            "format": group["format"],
        }
    formats = {group["format"] for group in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def write(inputs: ExportInputs, out_dir: Path) -> None:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer."""
    from safetensors.torch import save_file

    groups, ignore, architecture = _plan(inputs)
    if inputs.dtype_name not in FLOAT_DTYPES:
        raise ExportError(f"dtype {inputs.dtype_name!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    dtype = FLOAT_DTYPES[inputs.dtype_name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    formats = {module: group["format"] for group in groups.values() for module in group["layers"]}
    tensors: dict[str, Tensor] = {}
    for name, tensor in inputs.state.items():
        tensor = tensor.detach().cpu()
        tensors[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    for key, weight in inputs.quantized.items():
        module = key.removesuffix(".weight")
        for local, tensor in compress(weight, formats[module]).items():
            tensors[f"{module}.{local}"] = tensor.cpu()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})

    config = inputs.config.to_dict()
    config["dtype"] = inputs.dtype_name
    config.pop("torch_dtype", None)
    if not config.get("architectures") and architecture:
        config["architectures"] = [architecture]
    config["quantization_config"] = quantization_config(groups, ignore)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    _write_generation_config(inputs.config, out_dir)
    if inputs.tokenizer is not None:
        inputs.tokenizer.save_pretrained(out_dir)


def _write_generation_config(config: Any, out_dir: Path) -> None:
    """``generation_config.json`` from the model config's token ids, as ``save_pretrained`` writes it."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_model_config(config)
    except Exception:  # a config without generation fields: engines fall back to their defaults
        return
    generation.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------------------------


def read(out_dir: Path) -> dict[str, Tensor]:
    """Every tensor by HF parameter name, float32, quantized ones decompressed by compressed-tensors.

    The library parses ``quantization_config`` (its pydantic ``QuantizationConfig``), and for
    each layer with a ``weight_scale`` its registered compressor for the layer's group format
    (``PackedQuantizationCompressor`` / ``IntQuantizationCompressor``) unpacks and dequantizes
    the layer's tensors — the same calls ``transformers`` makes when it loads with
    ``dequantize=True``. (compressed-tensors 0.20 has no ``ModelCompressor.from_pretrained``;
    its model-free ``CompressedTensorsDequantizer`` re-infers the format and, for
    ``int-quantized``, mistakes every float ``.weight``, embeddings included, for a quantized one.)
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    quant = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = load_file(str(out_dir / WEIGHTS_FILE))
    modules = sorted(name.removesuffix(".weight_scale") for name in tensors if name.endswith(".weight_scale"))
    result: dict[str, Tensor] = {}
    for module in modules:
        scheme = _scheme_of(module, quant)
        compressor = BaseCompressor.get_value_from_registry(scheme.format or quant.format)
        local = {name: tensors.pop(f"{module}.{name}") for name in compressor.compression_param_names(scheme)}
        result[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"].float()
    for name, tensor in tensors.items():
        result[name] = tensor.float() if tensor.is_floating_point() else tensor
    return result


def _scheme_of(module: str, quant: Any) -> Any:
    """The config group scheme the library applies to ``module``: exact or ``re:`` name targets first,
    then the ``Linear`` class target (a layer with a ``weight_scale`` is a Linear here)."""
    from compressed_tensors.utils.match import match_name

    if any(match_name(module, ignored) for ignored in quant.ignore or []):
        raise ExportError(f"{module} has quantized tensors but is in quantization_config.ignore")
    by_class = None
    for scheme in quant.config_groups.values():
        if any(match_name(module, target) for target in scheme.targets):
            return scheme
        if by_class is None and "Linear" in scheme.targets:
            by_class = scheme
    if by_class is None:
        raise ExportError(f"{module} has quantized tensors but no config group targets it")
    return by_class


__all__ = ["check", "compress", "pack_int32", "quantization_config", "read", "unpack_int32", "write"]
