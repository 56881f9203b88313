"""Plain Hugging Face safetensors in float (``--format merged``): what ``from_pretrained`` loads
with no quantization library at all — a LoRA run with its adapters merged, or any float student.

Files: ``model.safetensors`` (every tensor in ``ExportInputs.dtype_name``; a head tied to the
embeddings stored once, as ``save_pretrained`` does), ``config.json`` and the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lowbit.quant.formats import WEIGHTS_FILE, ExportError, ExportInputs


def check(inputs: ExportInputs) -> None:
    if inputs.quantized:
        names = sorted(inputs.quantized)[:3]
        raise ExportError(
            f"{len(inputs.quantized)} weights are quantized (e.g. {', '.join(names)}); a float export stores float "
            "weights only: choose a quantized format (compressed-tensors, gguf-q4_0, ...) for a QAT model"
        )


def write(inputs: ExportInputs, out: Path) -> None:
    check(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, inputs.dtype_name)
    tensors = {
        name: (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu().contiguous()
        for name, tensor in inputs.state.items()
    }
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    config = inputs.config.to_dict()
    config["dtype"] = inputs.dtype_name
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if inputs.tokenizer is not None:
        inputs.tokenizer.save_pretrained(out)


def read(out: Path) -> dict[str, Tensor]:
    """Every tensor of the file, as float32, by HF parameter name."""
    return {name: tensor.float() for name, tensor in load_file(Path(out) / WEIGHTS_FILE).items()}


__all__ = ["check", "read", "write"]
