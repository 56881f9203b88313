"""Load the tokenizer and model a config names: an HF directory, a GGUF file, or a random model.

GGUF files are dequantized by transformers, which takes tens of seconds (mostly converting the
tokenizer); we convert once into a plain HF directory under the cache and load that afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lowbit.trainer.byte_tokenizer import byte_tokenizer
from lowbit.trainer.config import ModelConfig, ModelSource
from lowbit.trainer.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def _gguf_cache_path(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"


def convert_gguf(gguf_file: Path) -> Path:
    """Return an HF directory holding the dequantized GGUF model and its tokenizer (cached).

    The conversion writes to a temporary directory renamed into place, so a crash never leaves
    a half-written cache entry, and concurrent ranks at worst convert twice.
    """
    target = _gguf_cache_path(gguf_file)
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        )
    except Exception as error:
        raise UserError(
            f"model.path {gguf_file}: transformers could not load this GGUF file: {error}"
        ) from None
    # The loaded model is plain fp32; drop the GGUF quantizer marker so it saves as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another rank won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_dir(model_cfg: ModelSource) -> Path | None:
    """The HF directory to load from (converting a GGUF file first), or None for a random model."""
    if model_cfg.path is None:
        return None
    path = Path(model_cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"model.path {path} does not exist; give a local HF directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model.path {path} is a file but not .gguf; give a directory or a .gguf file")
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise UserError(f"model.path {path} has no config.json; is it a Hugging Face model directory?")
    return path


def build_tokenizer(model_cfg: ModelSource, model_dir: Path | None):
    """The tokenizer: ``model.tokenizer`` (a directory or ``byte``), else the model's own."""
    source = model_cfg.tokenizer or (str(model_dir) if model_dir is not None else None)
    if source is None:
        raise UserError("model.config builds a random model: set model.tokenizer to a directory or 'byte'")
    if source == "byte":
        return byte_tokenizer()
    if not Path(source).exists():
        raise UserError(f"model.tokenizer {source} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward (non-reentrant, works with frozen inputs).

    transformers 5.2x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``;
    older releases (the GPU image runs 5.17) have only the first.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_model(
    source: ModelSource,
    model_dir: Path | None,
    seed: int,
    vocab_needed: int,
    role: str = "model",
    meta: bool = False,
    **load_kwargs,
) -> PreTrainedModel:
    """Load (or, from ``config``, randomly initialise with ``seed``) a causal LM, with use_cache off.

    ``meta=True`` builds the architecture on the meta device (shapes, no memory, no weights read):
    for ranks that receive their weights from rank 0 after sharding.
    """
    dtype = DTYPES[source.dtype]
    if meta:
        config = _config(source, model_dir, role)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif model_dir is None:
        config = _config(source, model_dir, role)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=source.trust_remote_code, **load_kwargs
        )
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < vocab_needed:
        raise UserError(
            f"the tokenizer has {vocab_needed} tokens but the {role}'s embedding has only {vocab}; "
            f"use the {role}'s own tokenizer or raise vocab_size in {role}.config"
        )
    model.config.use_cache = False
    return model


def _config(source: ModelSource, model_dir: Path | None, role: str):
    """The transformers config of a model directory, or built from ``source.config``."""
    if model_dir is not None:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=source.trust_remote_code)
    fields = dict(source.config or {})
    model_type = fields.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as error:
        raise UserError(f"{role}.config: {error}") from None


def build_model(
    model_cfg: ModelConfig, model_dir: Path | None, seed: int, vocab_needed: int, meta: bool = False
) -> PreTrainedModel:
    """The student: loaded (or its shape on the meta device), with gradient checkpointing if asked for."""
    model = load_model(model_cfg, model_dir, seed, vocab_needed, meta=meta)
    if model_cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (what FSDP2 shards and ``train.compile`` compiles one by one):
    transformers' ``_no_split_modules`` classes (the decoder layers), else the children of the
    model's longest ``nn.ModuleList``."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in classes]
    if layers:
        return layers
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise UserError(
            f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules and no "
            "nn.ModuleList): strategy fsdp2 and train.compile need them; use ddp or deepspeed, without compile"
        )
    return list(max(lists, key=len))
