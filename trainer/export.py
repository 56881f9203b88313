"""``lowbit export``: a trained (or PTQ'd) model → a packed low-bit file an inference engine loads.

    lowbit export runs/qat --format gguf-q4_0 --out model.gguf
    lowbit export ~/models/smollm2 --format compressed-tensors --ptq --out smollm2-w4a16

The source is a run directory (its newest complete checkpoint), a checkpoint directory, a YAML
recipe, or a model path (HF directory or ``.gguf``). The model is rebuilt with its recipe's
quantization rules, its trained codes and scales are collected (``lowbit.quant.formats.collect``)
and handed to the format's writer. Every export ends with a self-check by the format's own
reader, and the output appears at ``--out`` only once that passed: it is written next to it
under a temporary name and renamed, so a failure never leaves a partial file there.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.trainer.errors import UserError


@dataclass(frozen=True)
class Format:
    """One ``--format`` choice: the writer module, its PTQ preset, its options, file or directory."""

    module: str
    preset: str | None
    options: dict[str, Any] = field(default_factory=dict)
    single_file: bool = False
    engines: str = ""


FORMATS: dict[str, Format] = {
    **{
        f"gguf-{kind}": Format("gguf", f"gguf_{kind}", {"gguf_type": kind}, True, "llama.cpp, ollama, LM Studio")
        for kind in ("q8_0", "q4_0", "q4_1")
    },
    **{
        f"gguf-{kind}": Format("gguf", "gguf_ternary", {"gguf_type": kind}, True, "llama.cpp")
        for kind in ("tq2_0", "tq1_0")
    },
    "gguf-f16": Format("gguf", None, {"gguf_type": "f16"}, True, "llama.cpp, ollama, LM Studio"),
    "compressed-tensors": Format("compressed_tensors", "w4a16", {}, False, "vLLM, transformers"),
    "bitnet": Format("bitnet", "bitnet", {}, False, "transformers (BitNet)"),
    "bnb-nf4": Format("bnb_nf4", "nf4", {}, False, "transformers + bitsandbytes"),
}
LORA_FORMATS = ("merged", "peft")
FLOAT_TYPES = ("f16", "bf16", "f32")


@dataclass
class ExportSummary:
    """What ``lowbit export`` prints: tensors by type, size, bits per weight, exactness."""

    path: Path
    format: str
    tensors: dict[str, int]
    parameters: int
    file_bytes: int
    max_delta_quantized: float
    max_delta_float: float
    ptq: bool

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / max(self.parameters, 1)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.parameters

    def table(self) -> str:
        kinds = ", ".join(f"{count} × {kind}" for kind, count in sorted(self.tensors.items()))
        exact = "exact" if self.max_delta_quantized == 0 else f"max |Δ| {self.max_delta_quantized:.3g}"
        return "\n".join(
            [
                f"exported {self.format} → {self.path}{' (PTQ)' if self.ptq else ''}",
                f"  tensors          {kinds}",
                f"  size             {self.file_bytes / 2**20:.2f} MiB ({self.bits_per_weight:.2f} bits/weight), "
                f"{100 * self.file_bytes / self.bf16_bytes:.1f}% of bf16 ({self.bf16_bytes / 2**20:.2f} MiB)",
                f"  self-check       quantized weights vs trained: {exact}; "
                f"float tensors max |Δ| {self.max_delta_float:.3g} (storage rounding)",
            ]
        )


def writer(fmt: str):
    """The writer module of ``fmt`` (``check``/``write``/``read``)."""
    if fmt in LORA_FORMATS:
        raise UserError(
            f"--format {fmt} exports LoRA adapters; it needs a run trained with LoRA adapters, which this "
            "version cannot train yet. Choose one of: " + ", ".join(FORMATS)
        )
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join([*FORMATS, *LORA_FORMATS])}")
    return importlib.import_module(f"lowbit.quant.formats.{FORMATS[fmt].module}")


def load_source(source: Path, overrides: list[str]):
    """(model, tokenizer, the model's .gguf origin or None) from a run, checkpoint, recipe or model path."""
    from lowbit.trainer import checkpoint as ckpt
    from lowbit.trainer.config import ModelConfig, load_config
    from lowbit.trainer.evaluate_cli import resolve_target
    from lowbit.trainer.model import build_tokenizer, load_model, resolve_model_dir
    from lowbit.trainer.quantization import apply_quantization

    is_model = source.suffix == ".gguf" or (source / "config.json").is_file()
    if is_model:
        model_cfg = ModelConfig(path=str(source))
        checkpoint, quant = None, None
    else:
        if source.is_file() and source.suffix not in (".yaml", ".yml"):
            raise UserError(f"{source}: give a run directory, a checkpoint directory, a YAML recipe or a model")
        config_file, checkpoint = resolve_target(source)
        cfg = load_config(config_file, overrides)
        model_cfg, quant = cfg.model, cfg.quant
        if model_cfg.init_from_teacher is not None and checkpoint is None:
            raise UserError(f"{source}: a student initialised from its teacher needs a trained checkpoint")
    model_dir = resolve_model_dir(model_cfg) if model_cfg.init_from_teacher is None else None
    tokenizer = build_tokenizer(model_cfg, model_dir)
    if model_cfg.init_from_teacher is not None:
        raise UserError(
            f"{source}: exporting a student built with init_from_teacher from its checkpoint is not supported "
            "yet; save it with save_pretrained and export that directory"
        )
    model = load_model(model_cfg, model_dir, seed=0, vocab_needed=len(tokenizer))
    if quant is not None:
        apply_quantization(model, quant, announce=False)
    if checkpoint is not None:
        ckpt.load_weights(checkpoint, model)
    origin = Path(model_cfg.path).expanduser() if model_cfg.path and str(model_cfg.path).endswith(".gguf") else None
    return model.eval(), tokenizer, origin


def gguf_tokenizer_pre(origin: Path | None) -> str | None:
    """llama.cpp's pre-tokenizer name recorded in the GGUF the model was loaded from, if any.

    llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by this name; its
    converter finds it by hashing sample tokenizations against a table we do not carry, so a model
    that came from a GGUF keeps the name its file had, and others get ``default``
    (``--tokenizer-pre`` sets it).
    """
    if origin is None or not origin.is_file():
        return None
    from gguf import GGUFReader

    field = GGUFReader(str(origin)).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def apply_ptq(model, fmt: str, scheme: str | None) -> None:
    """Round-to-nearest quantization of every Linear (head and embeddings kept) with ``scheme``."""
    from lowbit.quant import PRESETS, quantize_model, quantizers

    if quantizers(model):
        raise UserError("--ptq: this model already has quantized layers from its recipe; drop --ptq")
    preset = scheme or FORMATS[fmt].preset
    if preset is None:
        raise UserError(f"--ptq: {fmt} stores float weights; there is nothing to quantize")
    if preset == "gguf_ternary":  # llama.cpp's TQ types store fp16 scales
        rule = {"match": "*", "weight": {"dtype": "ternary", "granularity": "tensor", "scale_dtype": "fp16"}}
    elif preset in PRESETS:
        rule = {"match": "*", **{part: preset for part in PRESETS[preset]}}  # its weight (and activation) specs
    else:
        rule = {"match": "*", "weight": parse_scheme(preset)}
    try:
        quantize_model(model, [rule])
    except ValueError as error:
        raise UserError(f"--ptq {preset}: {error}") from None


def parse_scheme(text: str) -> dict[str, Any]:
    """``int4-g64``, ``int8-channel``, ``int4-g32-asym`` → a weight spec (for ``--ptq``)."""
    from lowbit.quant import PRESETS

    parts = text.split("-")
    usage = f"--ptq {text!r}: give a preset ({', '.join(PRESETS)}) or DTYPE-gN|channel|tensor[-asym], e.g. int4-g64"
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "asym"):
        raise UserError(usage)
    spec: dict[str, Any] = {"dtype": parts[0], "symmetric": len(parts) == 2}
    if parts[1] in ("channel", "tensor"):
        spec["granularity"] = parts[1]
    elif parts[1].startswith("g") and parts[1][1:].isdigit():
        spec.update(granularity="group", group_size=int(parts[1][1:]))
    else:
        raise UserError(usage)
    return spec


def _check_delta(inputs, read_back: dict) -> tuple[float, float]:
    """Max |Δ| of the reader's tensors vs the trained ones: (quantized weights, float tensors)."""
    missing = sorted({*inputs.state, *inputs.quantized} - set(read_back))
    if missing:
        raise UserError(f"self-check failed: the written file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    quantized = max(
        ((read_back[name].float() - weight.dequantize()).abs().max().item() for name, weight in inputs.quantized.items()),
        default=0.0,
    )
    floats = max(
        ((read_back[name].float() - tensor.float()).abs().max().item() for name, tensor in inputs.state.items()),
        default=0.0,
    )
    return quantized, floats


def _tensor_kinds(inputs, fmt: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for weight in inputs.quantized.values():
        counts[fmt.removeprefix("gguf-").upper() if fmt.startswith("gguf-") else weight.spec.describe()] += 1
    for tensor in inputs.state.values():
        counts["f32 (norms)" if tensor.dim() == 1 else inputs.extra.get("float_type", inputs.dtype_name)] += 1
    return dict(counts)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def export(
    source: Path,
    fmt: str,
    out: Path,
    ptq: bool | str = False,
    overrides: list[str] | None = None,
    float_type: str = "f16",
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Export ``source`` to ``out`` in ``fmt``, self-check it, and return the summary."""
    from lowbit.quant.formats import ExportError, collect

    module = writer(fmt)
    if float_type not in FLOAT_TYPES:
        raise UserError(f"--float-type {float_type!r}; choose one of {', '.join(FLOAT_TYPES)}")
    out = out.expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise UserError(f"the parent directory of --out, {out.parent}, does not exist")
    model, tokenizer, origin = load_source(source, overrides or [])
    if ptq:
        apply_ptq(model, fmt, ptq if isinstance(ptq, str) else None)
    inputs = collect(model, tokenizer)
    inputs.extra.update(FORMATS[fmt].options)
    if FORMATS[fmt].module == "gguf":
        tokenizer_pre = tokenizer_pre or gguf_tokenizer_pre(origin)
    inputs.extra.update({"float_type": float_type, "tokenizer_pre": tokenizer_pre, "name": source.name})
    if FORMATS[fmt].preset is not None and not inputs.quantized:
        raise UserError(
            f"{source} is a float model: {fmt} stores quantized weights. Train it with a `quant` rule "
            f"(preset {FORMATS[fmt].preset}), or add --ptq to round to nearest now"
        )
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        module.check(inputs)
        if not FORMATS[fmt].single_file:
            staging.mkdir()
        module.write(inputs, staging)
        quantized_delta, float_delta = _check_delta(inputs, module.read(staging))
        if overwrite and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except ExportError as error:
        raise UserError(str(error)) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
    parameters = sum(w.codes.numel() for w in inputs.quantized.values()) + sum(
        t.numel() for t in inputs.state.values()
    )
    return ExportSummary(
        path=out,
        format=fmt,
        tensors=_tensor_kinds(inputs, fmt),
        parameters=parameters,
        file_bytes=_size(out),
        max_delta_quantized=quantized_delta,
        max_delta_float=float_delta,
        ptq=bool(ptq),
    )
