"""GGUF for llama.cpp: block-quantized weights, llama metadata and the tokenizer, in one file.

Quantized weights are written from their integer codes and scales (``lowbit.quant.packing``),
never re-quantized from floats, so a model trained with the matching preset (``gguf_q8_0``,
``gguf_q4_0``, ``gguf_q4_1``; ternary with fp16 scales for TQ1_0/TQ2_0) reads back bit for bit.
Tensors the scheme leaves in float are stored as f16 (bf16/f32 on request; norms always f32).

llama.cpp's llama graph expects the rows of ``attn_q``/``attn_k`` permuted from Hugging Face's
rotate-half RoPE layout to its interleaved one (``convert_hf_to_gguf.py``'s ``permute``); whole
rows move, so the blocks (which run along a row) move with them intact.

A model trained with SubLN (BitNet's norms before ``o_proj`` and ``down_proj``) is written as
llama.cpp's ``bitnet`` architecture (``src/models/bitnet.cpp``): Llama blocks plus
``attn_sub_norm``/``ffn_sub_norm``, a SiLU-gated MLP, NeoX-style RoPE (Hugging Face's own row
order: no permutation), and the output head always tied to ``token_embd``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    Keys,
    LlamaFileType,
    RopeScalingType,
    TokenType,
)
from gguf import quants as gguf_quants
from gguf.utility import size_label
from torch import Tensor

from lowbit.quant.convert import QuantizedWeight
from lowbit.quant.formats import ExportError, ExportInputs, has_subln
from lowbit.quant.packing import QK_TERNARY, pack_blocks
from lowbit.quant.q6_k import quantize_q6_k
from lowbit.quant.spec import PRESETS

# HF model_type -> GGUF architecture. Mistral's dense models use llama.cpp's llama graph.
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
BITNET = "bitnet"  # llama.cpp's graph for Llama blocks with SubLN

TYPES = {
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "tq2_0": GGMLQuantizationType.TQ2_0,
    "tq1_0": GGMLQuantizationType.TQ1_0,
    "f16": GGMLQuantizationType.F16,
}
FILE_TYPES = {
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "tq2_0": LlamaFileType.MOSTLY_TQ2_0,
    "tq1_0": LlamaFileType.MOSTLY_TQ1_0,
    "f16": LlamaFileType.MOSTLY_F16,
}
FLOAT_TYPES = {
    "f16": (GGMLQuantizationType.F16, np.float16),
    "f32": (GGMLQuantizationType.F32, np.float32),
    "bf16": (GGMLQuantizationType.BF16, None),
}
# How the token embeddings (and an untied output head) may be stored when the scheme leaves them in float.
EMBEDDING_TYPES = ("f16", "bf16", "f32", "q8_0", "q6_k")
BLOCK_VALUES = {"q8_0": 32, "q6_k": 256}  # values per block of the quantized embedding types
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")

# What each quantized type holds exactly: (dtype, symmetric, how to name the training preset).
HOLDS = {
    "q8_0": ("int8", True, "gguf_q8_0"),
    "q4_0": ("int4", True, "gguf_q4_0"),
    "q4_1": ("int4", False, "gguf_q4_1"),
    "tq2_0": ("ternary", None, "gguf_ternary"),
    "tq1_0": ("ternary", None, "gguf_ternary"),
}

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


class _Writer(GGUFWriter):
    """``GGUFWriter`` that can write an empty array, which the GGUF format allows and gguf-py
    refuses: a byte-level vocabulary has no BPE merges, and llama.cpp's ``gpt2`` tokenizer will not
    load without the ``tokenizer.ggml.merges`` key ("cannot find tokenizer merges in model file")."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:  # type: ignore[override]
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            header = self._pack("I", vtype) if add_vtype else b""
            return header + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``."""
    module, _, kind = hf_name.rpartition(".")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{kind}"
    parts = module.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}.{kind}"
    raise ExportError(f"GGUF export: no llama.cpp name for tensor {hf_name!r} (an unsupported module)")


def hf_name(name: str) -> str:
    """Inverse of ``gguf_name``."""
    base, _, kind = name.rpartition(".")
    for hf, short in _TOP_NAMES.items():
        if base == short:
            return f"{hf}.{kind}"
    _, layer, short = base.split(".", 2)
    hf = next(key for key, value in _LAYER_NAMES.items() if value == short)
    return f"model.layers.{layer}.{hf}.{kind}"


def rope_permutation(rows: int, heads: int) -> np.ndarray:
    """Row order llama.cpp expects for a q/k projection with ``heads`` heads (HF → interleaved)."""
    index = np.arange(rows)
    return index.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def architecture(inputs: ExportInputs) -> str:
    """The llama.cpp architecture that computes this model: ``bitnet`` with SubLN norms, else by model type."""
    return BITNET if has_subln(inputs) else ARCHITECTURES[inputs.config.model_type]


def _heads_for(name: str, config, arch: str) -> int | None:
    if arch == BITNET:  # NeoX RoPE: Hugging Face's row order as it is
        return None
    if name.endswith("attn_q.weight"):
        return config.num_attention_heads
    if name.endswith("attn_k.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _rope_type(config) -> str:
    for source in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if isinstance(source, dict):
            kind = source.get("rope_type") or source.get("type")
            if kind:
                return str(kind)
    return "default"


def embedding_type(inputs: ExportInputs, row_length: int | None = None) -> str:
    """Storage of float embeddings: ``--embedding-type``, else what ``llama-quantize`` picks for the
    output table (the head, or the tied embeddings) of the file's type — the float type for f16
    files, Q8_0 for Q8_0 files, else Q6_K when the rows are whole 256-value blocks (``row_length``)
    and Q8_0 when not. (For an *untied* model's token embeddings llama-quantize keeps the file's own
    type, e.g. Q4_0; lowbit stores them like the head, the larger and safer table.)"""
    chosen = inputs.extra.get("embedding_type")
    float_type = inputs.extra.get("float_type", "f16")
    kind = _gguf_type(inputs)
    if chosen is None:
        if kind == "f16":
            chosen = float_type
        elif kind != "q8_0" and row_length is not None and row_length % BLOCK_VALUES["q6_k"] == 0:
            chosen = "q6_k"
        else:
            chosen = "q8_0"
    if chosen not in EMBEDDING_TYPES:
        raise ExportError(f"unknown embedding type {chosen!r}; choose one of {', '.join(EMBEDDING_TYPES)}")
    return chosen


def stored_type(name: str, tensor: Tensor, inputs: ExportInputs) -> str:
    """The GGUF type a float tensor is written as: f32 for norms, the embedding type for the
    embeddings and untied head, else the float type."""
    if tensor.dim() == 1:
        return "f32"
    if gguf_name(name) in EMBEDDING_TENSORS:
        kind = embedding_type(inputs, tensor.shape[-1])
        if tensor.shape[-1] % BLOCK_VALUES.get(kind, 1) == 0:  # rows that are not whole blocks stay float
            return kind
    return inputs.extra.get("float_type", "f16")


def _gguf_type(inputs: ExportInputs) -> str:
    kind = inputs.extra.get("gguf_type", "q4_0")
    if kind not in TYPES:
        raise ExportError(f"unknown GGUF type {kind!r}; choose one of {', '.join(TYPES)}")
    return kind


# -- check ---------------------------------------------------------------------------------------


def check(inputs: ExportInputs) -> None:
    """Refuse what llama.cpp's llama graph or the chosen block type cannot hold, before writing."""
    kind = _gguf_type(inputs)
    model_type = getattr(inputs.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"GGUF export supports the architectures {', '.join(sorted(ARCHITECTURES))}; this model is "
            f"{model_type!r}. Export it with --format compressed-tensors instead"
        )
    if _rope_type(inputs.config) != "default":
        raise ExportError(
            f"GGUF export: RoPE scaling {_rope_type(inputs.config)!r} is not written yet (needs llama.cpp's "
            "rope_freqs tensor); export with --format compressed-tensors"
        )
    if getattr(inputs.config, "attention_bias", False) or getattr(inputs.config, "mlp_bias", False):
        raise ExportError(
            "GGUF export: llama.cpp's llama graph has no q/k/v/o or MLP biases; this model has them"
        )
    if has_subln(inputs):
        _check_bitnet(inputs)
    for name in [*inputs.state, *inputs.quantized]:
        gguf_name(name)
    asked = embedding_type(inputs)  # a known name
    for name, tensor in inputs.state.items():
        if gguf_name(name) in EMBEDDING_TENSORS and not torch.isfinite(tensor).all():
            raise ExportError(
                f"{name} holds NaN or infinite values: the file would not compute anything; export a checkpoint "
                "from before the values diverged (lowbit export RUN/checkpoints/checkpoint-N)"
            )
    if (
        inputs.extra.get("embedding_type") in BLOCK_VALUES
    ):  # asked for (the default falls back to the float type)
        block = BLOCK_VALUES[asked]
        for name, tensor in inputs.state.items():
            if gguf_name(name) in EMBEDDING_TENSORS and tensor.shape[-1] % block:
                fix = (
                    "q8_0 or f16"
                    if asked == "q6_k" and tensor.shape[-1] % BLOCK_VALUES["q8_0"] == 0
                    else "f16"
                )
                raise ExportError(
                    f"--embedding-type {asked}: rows of {name} hold {tensor.shape[-1]} values, not whole {block}-value "
                    f"{asked.upper()} blocks; store it as {fix} (--embedding-type {fix.split()[0]})"
                )
    if kind == "f16":
        _check_activations(inputs, kind)
        return
    if not inputs.quantized:
        raise ExportError(
            f"gguf-{kind} needs quantized weights, and this model has none: train with the "
            f"{HOLDS[kind][2]} preset in `quant.rules`, or add --ptq for round-to-nearest"
        )
    for name, weight in inputs.quantized.items():
        problem = _cannot_hold(weight, kind)
        if problem:
            raise ExportError(
                f"gguf-{kind} cannot hold {name}, quantized as {weight.spec.describe()}: {problem}. {_fix(name, weight, kind)}"
            )
    _check_activations(inputs, kind)  # (after the weights: a file that cannot hold them says that first)


# The input rounding llama.cpp's CPU matmul applies to each weight type (ggml's vec_dot_type): Q8_0
# blocks for Q8_0 / Q4_0 (Q8_1 for Q4_1: the same codes and scales), Q8_K for the ternary types —
# which BitNet's per-token int8 stands for, as llama.cpp's BitNet support has it. F16/F32 weights
# take f16/f32 inputs: no rounding a rule could train with.
RUNTIME_ACTIVATIONS = {
    "q8_0": "gguf_q8_0",
    "q4_0": "gguf_q8_0",
    "q4_1": "gguf_q8_0",
    "tq2_0": "bitnet",
    "tq1_0": "bitnet",
}


def _check_activations(inputs: ExportInputs, kind: str) -> None:
    """Refuse a layer trained on activations llama.cpp does not compute: a GGUF file holds no
    activation quantization, so the file would run another model than was trained."""
    preset = RUNTIME_ACTIVATIONS.get(kind)
    runtime = PRESETS[preset]["activation"] if preset else None
    for module, spec in inputs.activations.items():
        if runtime is not None and spec.forward_fields() == runtime.forward_fields():
            continue
        computes = (
            f"rounds its inputs as `activation: {preset}` does" if preset else "does not round its inputs"
        )
        raise ExportError(
            f"{module} was trained on inputs quantized as {spec.describe()}, and a GGUF file holds no activation "
            f"quantization: llama.cpp {computes} for gguf-{kind}, so the file would compute another model. Train "
            f"with {f'activation: {preset}' if preset else 'no activation rule'} (what llama.cpp computes), or export the "
            "weights alone, knowing the activations change: repeat the run's quant rules without `activation` on the "
            "export command, with checkpoint.allow_config_change=true"
        )


def _check_bitnet(inputs: ExportInputs) -> None:
    """What llama.cpp's ``bitnet`` graph fixes: a Llama model, a tied head, square attention."""
    config = inputs.config
    if config.model_type != "llama":
        raise ExportError(
            f"GGUF export: a SubLN model is written as llama.cpp's bitnet architecture, whose blocks are Llama's; "
            f"this model is {config.model_type!r}"
        )
    if "lm_head.weight" in inputs.state or "lm_head.weight" in inputs.quantized:
        raise ExportError(
            "GGUF export: llama.cpp's bitnet graph always uses the token embeddings as the output head, and this "
            "model's head is its own (untied, or quantized apart from the embeddings); export with --format "
            "bitnet for transformers, or train with a tied head kept in high precision"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads * head_dim != config.hidden_size:
        raise ExportError(
            f"GGUF export: llama.cpp's bitnet graph needs attention width = hidden_size; this model has "
            f"{heads} × {head_dim} = {heads * head_dim} ≠ {config.hidden_size}"
        )


def _fix(name: str, weight: QuantizedWeight, kind: str) -> str:
    """What can work: another training scheme only if this row length fits the block; other
    formats only where their own checks accept this weight as it is."""
    from lowbit.quant.formats import compressed_tensors

    block = QK_TERNARY if kind.startswith("tq") else 32
    spec = weight.spec
    others = [f"gguf-{other}" for other in HOLDS if other != kind and _cannot_hold(weight, other) is None]
    if compressed_tensors.weight_problem(name, weight) is None:
        others.append("compressed-tensors")
    if spec.dtype == "ternary" and spec.granularity == "tensor" and weight.shape[0] % 4 == 0:
        others.append("bitnet")  # transformers' BitNet: ternary, one scale per tensor, rows by 4
    if weight.shape[-1] % block:
        first = (f"Rows of {weight.shape[-1]} values never fit {kind.upper()}'s {block}-value blocks, whatever the "
                 f"training: leave {name.rsplit('.', 1)[0]} and layers like it out of the quant rules")  # fmt: skip
    else:
        first = f"Train with the {HOLDS[kind][2]} preset"
    return f"{first}{', or export it as it is with --format ' + ' or '.join(others) if others else ''}"


def _cannot_hold(weight: QuantizedWeight, kind: str) -> str | None:
    """Why ``kind``'s blocks cannot store ``weight`` bit for bit (None when they can)."""
    spec, (dtype, symmetric, _) = weight.spec, HOLDS[kind]
    block = QK_TERNARY if dtype == "ternary" else 32
    layout = (
        "ternary values"
        if dtype == "ternary"
        else f"{'symmetric' if symmetric else 'asymmetric'} {dtype} values"
    )
    if spec.dtype != dtype or (symmetric is not None and spec.symmetric != symmetric):
        return f"{kind.upper()} stores {layout} in blocks of {block} along a row"
    if dtype == "ternary":
        if spec.granularity == "group" and spec.group_size % block:
            return (
                f"one block of {block} values would span several of its {spec.group_size}-value scale groups"
            )
    elif spec.granularity != "group" or spec.group_size != 32:
        return f"{kind.upper()} stores {layout} in blocks of 32 along a row, one scale each"
    if weight.shape[-1] % block:
        return f"its rows of {weight.shape[-1]} values are not a multiple of the {block}-value block"
    if spec.scale_dtype != "fp16":
        return f"{kind.upper()} stores fp16 scales and these are {spec.scale_dtype} (set scale_dtype: fp16)"
    if kind == "q4_1" and weight.offset is None:
        return "Q4_1 stores a float minimum per block, not an integer zero point"
    return None


# -- write ---------------------------------------------------------------------------------------


def _format_codes(weight: QuantizedWeight, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes as the block type stores them, one scale per block, minimums or None), row-major."""
    rows, cols = weight.shape
    codes = weight.codes.to(torch.int32).numpy()
    spec = weight.spec
    block = QK_TERNARY if kind.startswith("tq") else 32

    def per_block(values: Tensor) -> np.ndarray:
        """Per-scale-group values ``[groups, 1]`` → one per format block ``[rows, cols / block]``."""
        per_element = values.reshape(-1).repeat_interleave(weight.codes.numel() // values.shape[0])
        return per_element.reshape(rows, cols)[:, ::block].numpy()

    scales = per_block(weight.scale)
    minimums = None
    if kind == "q4_0" and spec.convention != "gguf_q4_0":
        codes = codes + 8  # symmetric int4 q in [-7, 7] ([-8, 7] with range: full) is c − 8, c in 0..15
    if kind == "q4_1":  # value = d·c + m: GGUF's own preset, or LSQ+'s learned offset
        assert weight.offset is not None
        minimums = per_block(weight.offset)
    return codes, scales, minimums


def _float_array(tensor: Tensor, float_type: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    qtype, np_dtype = FLOAT_TYPES[float_type]
    if np_dtype is None:  # bf16: numpy has no such dtype; store its bits as raw bytes
        bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return bits.reshape(tensor.shape[0], -1), qtype
    return tensor.float().numpy().astype(np_dtype), qtype


def write(inputs: ExportInputs, out: Path) -> None:
    """Write ``out`` (a ``.gguf`` file)."""
    kind = _gguf_type(inputs)
    float_type = inputs.extra.get("float_type", "f16")
    config = inputs.config
    arch = architecture(inputs)
    writer = _Writer(str(out), arch)
    _write_metadata(writer, config, kind, inputs.extra)
    if arch == BITNET:  # as llama.cpp's converter writes BitNet models
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(1.0)
    if inputs.tokenizer is not None:
        _write_tokenizer(writer, inputs.tokenizer, config.vocab_size, inputs.extra.get("tokenizer_pre"))
    names = sorted([*inputs.state, *inputs.quantized], key=_tensor_order)
    for name in names:
        target = gguf_name(name)
        heads = _heads_for(target, config, arch)
        if name in inputs.quantized and kind != "f16":
            weight = inputs.quantized[name]
            codes, scales, minimums = _format_codes(weight, kind)
            if heads:
                order = rope_permutation(codes.shape[0], heads)
                codes, scales = codes[order], scales[order]
                minimums = None if minimums is None else minimums[order]
            data = pack_blocks(codes, scales, TYPES[kind], minimums)
            writer.add_tensor(target, data, raw_shape=data.shape, raw_dtype=TYPES[kind])
            continue
        tensor = inputs.quantized[name].dequantize() if name in inputs.quantized else inputs.state[name]
        tensor = tensor.detach().cpu()
        if heads:
            tensor = tensor[torch.from_numpy(rope_permutation(tensor.shape[0], heads))]
        storage = float_type if name in inputs.quantized else stored_type(name, tensor, inputs)
        if storage == "q8_0":  # gguf's own Q8_0 quantizer: llama-quantize's bytes
            data = gguf_quants.quantize(tensor.float().numpy(), GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType.Q8_0)
            continue
        if storage == "q6_k":  # ggml's quantize_row_q6_K_ref, ported (gguf only reads Q6_K): the same bytes
            data = quantize_q6_k(tensor.float().numpy())
            writer.add_tensor(target, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType.Q6_K)
            continue
        array, qtype = _float_array(tensor, storage)
        writer.add_tensor(target, array, raw_shape=array.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensor_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    layer = int(parts[2]) if parts[:2] == ["model", "layers"] else (-1 if "embed" in name else 10**9)
    return layer, name


# The source GGUF's ``general.*`` keys that say where the model comes from and on what terms: an
# export keeps them (its license still applies). Setter per key.
PROVENANCE = {
    "general.basename": "add_basename", "general.size_label": "add_size_label", "general.license": "add_license",
    "general.license.name": "add_license_name", "general.license.link": "add_license_link",
    "general.author": "add_author", "general.organization": "add_organization", "general.url": "add_url",
    "general.repo_url": "add_repo_url", "general.languages": "add_languages", "general.tags": "add_tags",
}  # fmt: skip


def source_metadata(path: Path) -> dict[str, object]:
    """The ``general.*`` fields of a GGUF file (where an exported model came from)."""
    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("general.")}


def _write_general(writer: GGUFWriter, config, extra: dict, parameters: int) -> None:
    """``general.*``: provenance from the source GGUF, and names that say what this file is.

    ``general.name`` is ``basename size finetune`` as llama.cpp's converter writes it: for a trained
    run ``finetune`` is the run's name and the source becomes ``general.base_model.0``; a model
    exported as it is keeps its own name and finetune.
    """
    source = dict(extra.get("source_general") or {})
    for key, setter in PROVENANCE.items():
        if key in source:
            getattr(writer, setter)(source[key])
    basename = (
        source.get("general.basename") or Path(str(getattr(config, "_name_or_path", "") or "model")).name
    )
    if "general.basename" not in source:
        writer.add_basename(basename)
    size = source.get("general.size_label") or size_label(parameters, 0, 0, 0)
    if "general.size_label" not in source:
        writer.add_size_label(size)
    run = extra.get("run_name")
    if run:
        writer.add_finetune(run)
        writer.add_name(f"{basename} {size} {run}")
        if source.get("general.name"):
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, str(source["general.name"]))
            for key, setter in (("general.organization", "add_base_model_organization"),
                                ("general.repo_url", "add_base_model_repo_url")):  # fmt: skip
                if key in source:
                    getattr(writer, setter)(0, str(source[key]))
    else:
        if source.get("general.finetune"):
            writer.add_finetune(str(source["general.finetune"]))
        writer.add_name(str(source.get("general.name") or f"{basename} {size}"))


def _file_type(kind: str, float_type: str) -> LlamaFileType:
    """What the file mostly holds: the quantized type, or the float type when nothing is quantized."""
    if kind != "f16":
        return FILE_TYPES[kind]
    return {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16, "f32": LlamaFileType.ALL_F32}[
        float_type
    ]


def _write_metadata(writer: GGUFWriter, config, kind: str, extra: dict) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    _write_general(writer, config, extra, int(extra.get("parameters", 0)))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(kind, extra.get("float_type", "f16")))
    writer.add_quantization_version(2)


def _write_tokenizer(writer: GGUFWriter, tokenizer, vocab_size: int, pre: str | None) -> None:
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 / SmolLM / Qwen style) as llama.cpp's ``gpt2`` model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"GGUF export needs a Hugging Face fast tokenizer; {type(tokenizer).__name__} has none "
            "(a model trained with the built-in byte tokenizer cannot run in llama.cpp)"
        )
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            "GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' model); this tokenizer is "
            f"{model.get('type')}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    vocab.update(added)
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{index}]" for index in range(size)]
    types = [TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index] = token
        if token in specials:
            types[index] = TokenType.CONTROL
        elif token in added:
            types[index] = TokenType.USER_DEFINED
        else:
            types[index] = TokenType.NORMAL
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # a pure byte vocabulary: the key must exist for llama.cpp, empty
        writer.add_key_value(Keys.Tokenizer.MERGES, [], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        writer.add_token_scores([0.0] * size)  # transformers' GGUF reader rebuilds (no) merges from scores
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# -- read ----------------------------------------------------------------------------------------


def read(out: Path) -> dict[str, Tensor]:
    """Every tensor as ``gguf``'s own reader dequantizes it, back in HF names and row order."""
    reader = GGUFReader(str(out))
    arch = str(reader.fields["general.architecture"].contents())
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_heads = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    weights: dict[str, Tensor] = {}
    for tensor in reader.tensors:
        values = gguf_quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        count = heads if tensor.name.endswith("attn_q.weight") else kv_heads
        if arch != BITNET and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            inverse = np.argsort(rope_permutation(values.shape[0], count))
            values = values[inverse]
        weights[hf_name(tensor.name)] = torch.from_numpy(values.copy())
    return weights


def metadata(out: Path) -> dict[str, object]:
    """The file's key/value metadata (arrays summarised by length), for reports and tests."""
    reader = GGUFReader(str(out))
    result: dict[str, object] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        result[key] = len(value) if isinstance(value, list) and len(value) > 8 else value
    return result
