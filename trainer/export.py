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

import copy
import importlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.trainer.errors import UserError
from lowbit.trainer.preflight import check_writable_dir


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
        f"gguf-{kind}": Format(
            "gguf", f"gguf_{kind}", {"gguf_type": kind}, True, "llama.cpp, ollama, LM Studio"
        )
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
    "merged": Format("hf_float", None, {}, False, "transformers, vLLM (float; LoRA adapters merged)"),
}
LORA_FORMATS = ("peft",)  # the adapters alone, not a whole model: written by ``export_lora``
FLOAT_TYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}  # --float-type → torch dtype name


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
    quantized_tensors: int = 0
    note: str = ""
    """A last line for the user (how to load what was written)."""
    comparison: list[dict[str, Any]] = field(default_factory=list)
    """For a LoRA run merged into a quantized format: perplexity rows (adapters, merged float, file)."""

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / max(self.parameters, 1)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.parameters

    def table(self) -> str:
        kinds = ", ".join(f"{count} × {kind}" for kind, count in sorted(self.tensors.items()))
        if not self.quantized_tensors:
            exact = "none stored quantized"
        elif self.max_delta_quantized == 0:
            exact = "exact"
        else:
            exact = f"max |Δ| {self.max_delta_quantized:.3g}"
        return "\n".join(
            [
                f"exported {self.format} → {self.path}{' (PTQ)' if self.ptq else ''}",
                f"  tensors          {kinds}",
                f"  size             {self.file_bytes / 2**20:.2f} MiB ({self.bits_per_weight:.2f} bits/weight), "
                f"{100 * self.file_bytes / self.bf16_bytes:.1f}% of bf16 ({self.bf16_bytes / 2**20:.2f} MiB)",
                f"  self-check       quantized weights vs trained: {exact}; "
                f"float tensors max |Δ| {self.max_delta_float:.3g} (storage rounding)",
                *([f"  load             {self.note}"] if self.note else []),
                *(["  merge check (validation perplexity):", *("    " + line for line in _rows(self.comparison))]
                  if self.comparison else []),
            ]
        )  # fmt: skip


def _rows(rows: list[dict[str, Any]]) -> list[str]:
    from lowbit.trainer.evaluate_cli import format_rows

    return format_rows(rows).splitlines()


def writer(fmt: str):
    """The writer module of ``fmt`` (``check``/``write``/``read``)."""
    if fmt not in FORMATS:
        raise UserError(
            f"unknown export format {fmt!r}; choose one of {', '.join([*FORMATS, *LORA_FORMATS])}"
        )
    return importlib.import_module(f"lowbit.quant.formats.{FORMATS[fmt].module}")


@dataclass
class Source:
    """A model to export, as ``load_source`` rebuilt it."""

    model: Any
    tokenizer: Any
    origin: Path | None
    """The ``.gguf`` file the model came from, if any."""
    trained_quantized: bool
    """False when the recipe has ``quant`` rules but the checkpoint was saved before its
    ``enable_after_steps``: its quantizers never ran in training, so exporting it is PTQ."""
    cfg: Any = None
    """The run config (None for a plain model path)."""
    initial_adapters: dict[str, Any] | None = None
    """A PiSSA or LoftQ run's adapters as initialised (what a peft export must account for), else None."""


# Writers whose architectures hold SubLN norms: transformers' bitnet model type, llama.cpp's bitnet graph.
SUBLN_FORMATS = ("bitnet", "gguf")


def load_source(source: Path, overrides: list[str], merge: bool = True) -> Source:
    """The model of ``source`` with its checkpoint's weights; a LoRA run's adapters merged into
    its base unless ``merge`` is False."""
    from lowbit.trainer import checkpoint as ckpt
    from lowbit.trainer.config import ModelConfig, load_config
    from lowbit.trainer.evaluate_cli import resolve_target
    from lowbit.trainer.model import build_tokenizer, load_model, resolve_model_dir
    from lowbit.trainer.transforms import apply_transforms

    if source.suffix == ".gguf" or (source / "config.json").is_file():
        model_cfg, checkpoint, cfg = ModelConfig(path=str(source)), None, None
    else:
        if source.is_file() and source.suffix not in (".yaml", ".yml"):
            raise UserError(
                f"{source}: give a run directory, a checkpoint directory, a YAML recipe or a model"
            )
        config_file, checkpoint = resolve_target(source)
        cfg = load_config(config_file, overrides)
        model_cfg = cfg.model
        if model_cfg.init_from_teacher is not None:
            raise UserError(
                f"{source}: exporting a student built with init_from_teacher is not supported yet; save the "
                "trained student with save_pretrained and export that directory"
            )
    model_dir = resolve_model_dir(model_cfg)
    tokenizer = build_tokenizer(model_cfg, model_dir)
    model = load_model(model_cfg, model_dir, seed=0, vocab_needed=len(tokenizer))
    trained_quantized = False
    if cfg is not None:
        # A checkpoint holds every weight unless the run froze a base (LoRA, whose base may come from
        # an earlier stage): then the earlier stage's run need not exist any more to export this one.
        whole = checkpoint is not None and cfg.lora is None
        apply_transforms(model, cfg, announce=False, skip=("init_from",) if whole else ())
    if cfg is not None and cfg.quant is not None and (cfg.lora is None or cfg.lora.merge_aware):
        # (plain LoRA trains fake_quant(W) + B A: its merge, quantized, is a PTQ; merge-aware is exact)
        trained_quantized = (
            checkpoint is not None and ckpt.checkpoint_step(checkpoint) > cfg.quant.enable_after_steps
        )
    initial = None
    if cfg is not None and cfg.lora is not None and cfg.lora.init.startswith(("pissa", "loftq")):
        from lowbit.trainer.export_lora import adapter_tensors

        initial = {name: tensor.clone() for name, tensor in adapter_tensors(model).items()}
    if checkpoint is not None:
        from lowbit.trainer.resume_guard import rules_changed_on_purpose

        assert cfg is not None
        ckpt.load_weights(
            checkpoint, model, same_grids=True, deliberate=rules_changed_on_purpose(checkpoint, cfg)
        )
    if merge and cfg is not None and cfg.lora is not None:
        from lowbit.trainer.export_lora import merge_adapters

        merge_adapters(model)
    origin = (
        Path(model_cfg.path).expanduser()
        if model_cfg.path and str(model_cfg.path).endswith(".gguf")
        else None
    )
    return Source(model.eval(), tokenizer, origin, trained_quantized, cfg, initial)


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
    if preset in PRESETS:
        # its weight (and activation) specs; a GGUF file holds weights only (llama.cpp rounds the
        # activations itself at run time), so a gguf preset's activation half is not applied here
        parts = ["weight"] if preset.startswith("gguf_") else list(PRESETS[preset])
        rule = {"match": "*", **{part: preset for part in parts}}
    else:
        rule = {"match": "*", "weight": parse_scheme(preset)}
    try:
        quantize_model(model, [rule])
    except ValueError as error:
        raise UserError(f"--ptq {preset}: {error}") from None


def parse_scheme(text: str) -> dict[str, Any]:
    """``int4-g64``, ``int8-channel``, ``int4-g32-asym``, ``int3-g64-full``, ``int4-g32-restricted`` → a
    weight spec (for ``--ptq``); without a suffix a symmetric grid takes ``range: auto``."""
    from lowbit.quant import PRESETS

    parts = text.split("-")
    usage = (
        f"--ptq {text!r}: give a preset ({', '.join(PRESETS)}) or DTYPE-gN|channel|tensor[-asym|-full|-restricted], "
        "e.g. int4-g64 or int3-g64-full"
    )
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("asym", "full", "restricted")):
        raise UserError(usage)
    spec: dict[str, Any] = {"dtype": parts[0], "symmetric": parts[2:] != ["asym"]}
    if parts[2:] in (["full"], ["restricted"]):
        spec["range"] = parts[2]
    if parts[1] in ("channel", "tensor"):
        spec["granularity"] = parts[1]
    elif parts[1].startswith("g") and parts[1][1:].isdigit():
        spec.update(granularity="group", group_size=int(parts[1][1:]))
    else:
        raise UserError(usage)
    return spec


def _check_delta(inputs, read_back: dict, tolerance: float) -> tuple[float, float]:
    """Max |Δ| of the reader's tensors vs the trained ones: (quantized weights, float tensors).

    Raises when a tensor is missing or misshapen, or when a quantized weight differs from the
    trained one by more than ``tolerance`` (0 for formats that store the trained grid exactly).
    """
    missing = sorted({*inputs.state, *inputs.quantized} - set(read_back))
    if missing:
        raise UserError(
            f"self-check failed: the written file lacks {len(missing)} tensors, e.g. {missing[:3]}"
        )
    trained = {**inputs.state, **{name: weight.dequantize() for name, weight in inputs.quantized.items()}}
    worst = {"quantized": 0.0, "float": 0.0}
    for name, tensor in trained.items():
        back = read_back[name]
        if tuple(back.shape) != tuple(tensor.shape):
            raise UserError(
                f"self-check failed: {name} reads back as {tuple(back.shape)}, not {tuple(tensor.shape)}"
            )
        kind = "quantized" if name in inputs.quantized else "float"
        worst[kind] = max(worst[kind], (back.float() - tensor.float()).abs().max().item())
    if worst["quantized"] > tolerance:
        raise UserError(
            f"self-check failed: the format's reader gives quantized weights up to {worst['quantized']:.3g} away "
            "from the trained ones; nothing was written at --out (please report this as a bug)"
        )
    return worst["quantized"], worst["float"]


def _tensor_kinds(inputs, fmt: str) -> dict[str, int]:
    from lowbit.quant.formats.gguf import EMBEDDING_TENSORS, gguf_name, stored_type

    counts: Counter[str] = Counter()
    for weight in inputs.quantized.values():
        counts[fmt.removeprefix("gguf-").upper() if fmt.startswith("gguf-") else weight.spec.describe()] += 1
    for name, tensor in inputs.state.items():
        if fmt.startswith("gguf-"):  # GGUF keeps 1-D norms in f32, the embeddings as --embedding-type
            kind = stored_type(name, tensor, inputs)
            kind = kind.upper() if kind.startswith("q") else kind
            note = (
                " (norms)"
                if tensor.dim() == 1
                else " (embeddings)"
                if gguf_name(name) in EMBEDDING_TENSORS
                else ""
            )
            counts[kind + note] += 1
        else:
            counts[inputs.dtype_name] += 1
    return dict(counts)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def _check_output(out: Path, source: Path, single_file: bool, overwrite: bool) -> Path:
    """The resolved ``--out``; refuses anything that could lose work before a byte is written."""
    out = out.expanduser().resolve()
    if not out.parent.exists():
        raise UserError(f"the parent directory of --out, {out.parent}, does not exist")
    check_writable_dir(out.parent, "--out", out)
    source = source.expanduser().resolve()
    if out == source or out in source.parents:
        raise UserError(f"--out {out} is the source or contains it; choose another path")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
        if out.is_dir() == single_file:
            kind = "directory" if out.is_dir() else "file"
            raise UserError(
                f"--overwrite: {out} is a {kind}, and this format writes a {'file' if single_file else 'directory'}"
            )
    return out


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _place(staging: Path, out: Path) -> None:
    """Move the checked output into place; an existing one is kept aside until the move succeeded."""
    backup = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        os.replace(out, backup)
    try:
        os.replace(staging, out)
    except OSError:
        if backup.exists():
            os.replace(backup, out)
        raise
    _remove(backup)


def export(
    source: Path,
    fmt: str,
    out: Path,
    ptq: bool | str = False,
    overrides: list[str] | None = None,
    float_type: str | None = None,
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
    embedding_type: str | None = None,
) -> ExportSummary:
    """Export ``source`` to ``out`` in ``fmt``, self-check it, and return the summary.

    ``float_type`` (f16, bf16, f32) is how tensors left in float are stored: GGUF defaults to f16,
    the Hugging Face formats to the model's own dtype. ``embedding_type`` (GGUF: f16, bf16, f32, q6_k,
    q8_0) stores the float embeddings (and an untied head); by default what llama-quantize picks.
    """
    from lowbit.quant.formats import ExportError, collect, has_subln

    if fmt in LORA_FORMATS:
        from lowbit.trainer.export_lora import export_peft

        return export_peft(source, _check_output(out, source, False, overwrite), overrides or [], ptq)
    module, choice = writer(fmt), FORMATS[fmt]
    if float_type is not None and float_type not in FLOAT_TYPES:
        raise UserError(f"--float-type {float_type!r}; choose one of {', '.join(FLOAT_TYPES)}")
    from lowbit.quant.formats.gguf import EMBEDDING_TYPES

    if embedding_type is not None and embedding_type not in EMBEDDING_TYPES:  # before the model loads
        raise UserError(f"--embedding-type {embedding_type!r}; choose one of {', '.join(EMBEDDING_TYPES)}")
    out = _check_output(out, source, choice.single_file, overwrite)
    loaded = load_source(source, overrides or [], merge=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapters = None  # a LoRA run's model as trained, kept for the merge check of a quantized file
    if loaded.cfg is not None and loaded.cfg.lora is not None:
        from lowbit.trainer.export_lora import merge_adapters

        adapters = copy.deepcopy(model) if choice.preset is not None else None
        merge_adapters(model)
    if ptq:
        apply_ptq(model, fmt, ptq if isinstance(ptq, str) else None)
    inputs = collect(model, tokenizer)
    inputs.extra.update(choice.options)
    if choice.module == "gguf":
        from lowbit.quant.formats.gguf import source_metadata

        inputs.extra.update(
            float_type=float_type or "f16",
            tokenizer_pre=tokenizer_pre or gguf_tokenizer_pre(loaded.origin),
            source_general=source_metadata(loaded.origin) if loaded.origin is not None else {},
            run_name=(loaded.cfg.run.name or Path(loaded.cfg.run.output_dir).name) if loaded.cfg else None,
            embedding_type=embedding_type,
            parameters=sum(p.numel() for p in model.parameters()),
        )
    elif float_type is not None:
        inputs.dtype_name = FLOAT_TYPES[float_type]
    if embedding_type is not None and choice.module != "gguf":
        raise UserError(
            f"--embedding-type is a GGUF option; {fmt} stores the embeddings as --float-type says"
        )
    if choice.preset is not None and not inputs.quantized:
        raise UserError(
            f"{source} is a float model: {fmt} stores quantized weights. Train it with a `quant` rule "
            f"(preset {choice.preset}), or add --ptq to round to nearest now"
        )
    if has_subln(inputs) and choice.module not in SUBLN_FORMATS:
        raise UserError(
            f"{source} was trained with SubLN (model.subln: BitNet's norms before o_proj and down_proj), which "
            f"{fmt}'s architecture has no place for: the file would compute another model. Export it with "
            "--format bitnet (transformers' BitNetForCausalLM) or a gguf-* format (llama.cpp's bitnet graph)"
        )
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        module.check(inputs)
        if not choice.single_file:
            staging.mkdir()
        module.write(inputs, staging)
        # A float format stores quantized weights as floats: their rounding is storage, not a failure.
        tolerance = getattr(module, "tolerance", lambda _: 0.0)(inputs) if choice.preset else float("inf")
        quantized_delta, float_delta = _check_delta(inputs, module.read(staging), tolerance)
        _place(staging, out)
    except ExportError as error:
        raise UserError(str(error)) from None
    finally:
        _remove(staging)
    comparison = []
    if adapters is not None and inputs.quantized:
        from lowbit.trainer.export_lora import merge_perplexities

        comparison = merge_perplexities(loaded.cfg, tokenizer, adapters, model, fmt)
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
        ptq=bool(ptq) or (bool(inputs.quantized) and not loaded.trained_quantized),
        quantized_tensors=len(inputs.quantized),
        comparison=comparison,
    )
