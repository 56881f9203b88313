"""Exports of a LoRA run: the adapters as peft writes them, and the merge every other format starts from.

``--format peft`` writes what ``PeftModel.from_pretrained(base, DIR)`` loads: peft's own
``save_pretrained`` of a ``PeftModel`` whose adapters (and ``lora.trainable`` modules, as peft's
``modules_to_save``) are the trained ones. Every other format exports the *merged* model:
``merge_adapters`` dequantizes a 4-bit base to float32, adds each adapter's update there with
peft's own ``merge`` (DoRA included), and casts back to the model's dtype once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.trainer.config import RunConfig
from lowbit.trainer.errors import UserError
from lowbit.trainer.lora import ADAPTER_NAME, is_adapter, replace_module

if TYPE_CHECKING:
    from lowbit.trainer.export import ExportSummary


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter into its base layer in float32 and remove the adapters, in place.

    A 4-bit base layer becomes a float ``nn.Linear`` holding its dequantized weight first, so the
    merged weight is ``dequantize(codes) + scaling · B A`` computed in float32, rounded once to the
    model's dtype at the end.
    """
    from peft.tuners.lora import LoraLayer

    from lowbit.quant.nf4 import FrozenNF4Linear

    dtype = next(
        (p.dtype for p in model.parameters() if p.is_floating_point() and p.requires_grad), torch.float32
    )
    for name, module in list(model.named_modules()):
        if isinstance(module, FrozenNF4Linear) and not is_adapter(name):
            replace_module(model, name, module.to_linear(torch.float32))
    model.float()
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            replace_module(model, name, module.get_base_layer())
    return model.to(dtype)


def peft_config(cfg: RunConfig, targets: list[str], trainable: list[str], rank_factor: int = 1):
    """The ``peft.LoraConfig`` this run's adapters correspond to (``rank_factor`` 2: a PiSSA run's
    adapters converted to plain LoRA, with alpha scaled so that the scaling stays the same)."""
    from peft import LoraConfig

    lora = cfg.lora
    assert lora is not None
    alpha = lora.alpha * (rank_factor**0.5 if lora.rslora else rank_factor)
    return LoraConfig(
        r=lora.rank * rank_factor, lora_alpha=alpha, lora_dropout=lora.dropout, target_modules=targets,
        use_rslora=lora.rslora, use_dora=lora.dora, bias="none", modules_to_save=trainable or None,
        base_model_name_or_path=cfg.model.path, task_type="CAUSAL_LM",
    )  # fmt: skip


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What trained, by name in the model (adapters and fully trained modules)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def pissa_as_lora(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A PiSSA run's adapters as plain LoRA on the *original* weights: the run computes
    (W − s·B₀A₀) + s·B·A, which is W + s·[B | −B₀]·[A ; A₀] — rank 2r (peft's own conversion)."""
    converted = dict(trained)
    for name in trained:
        if ".lora_A." in name:
            b_name = name.replace(".lora_A.", ".lora_B.")
            converted[name] = torch.cat([trained[name], initial[name]], dim=0)
            converted[b_name] = torch.cat([trained[b_name], -initial[b_name]], dim=1)
    return converted


def write_peft(
    model: nn.Module, cfg: RunConfig, out: Path, initial: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Write ``model``'s adapters with peft's ``save_pretrained`` into ``out``; return them by peft name.

    The ``PeftModel`` is built around a meta-device copy of the base (no memory) whose adapter and
    ``modules_to_save`` parameters are then assigned the trained tensors: exactly what peft saves.
    ``initial``: a PiSSA run's initial adapters, to write them as plain LoRA on the original base.
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    targets = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    trained = adapter_tensors(model)
    full = sorted({name.rsplit(".", 1)[0] for name in trained if not is_adapter(name)})
    if initial is not None:
        trained = pissa_as_lora(trained, initial)
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    config = peft_config(cfg, targets, full, rank_factor=2 if initial is not None else 1)
    peft_model = get_peft_model(skeleton, config, adapter_name=ADAPTER_NAME)
    renamed = {}
    for name, tensor in trained.items():
        module, _, leaf = name.rpartition(".")
        if module in full:
            renamed[f"base_model.model.{module}.modules_to_save.{ADAPTER_NAME}.{leaf}"] = tensor
        else:
            renamed[f"base_model.model.{name}"] = tensor
    missing_here = sorted(set(renamed) - {n for n, _ in peft_model.named_parameters()})
    if missing_here:
        raise UserError(
            f"peft builds no parameter for {missing_here[:3]}: this peft version lays adapters out otherwise"
        )
    peft_model.load_state_dict(renamed, strict=False, assign=True)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return renamed


def bnb_loading_hint(cfg: RunConfig) -> str:
    """How to load the base that fits the adapters (the 4-bit codes lowbit trained on)."""
    lora = cfg.lora
    assert lora is not None
    if lora.base == "float":
        return "load them on the float base model (PeftModel.from_pretrained(base, DIR))"
    hint = (
        f"load them on the base quantized as in training: BitsAndBytesConfig(load_in_4bit=True, "
        f"bnb_4bit_quant_type='{lora.base}', bnb_4bit_use_double_quant={lora.double_quant})"
    )
    if lora.blocksize != 64:
        hint += f" — note: transformers quantizes in blocks of 64, this run used {lora.blocksize}"
    return hint


def check_lora_run(cfg: RunConfig | None, source: Path) -> RunConfig:
    if cfg is None or cfg.lora is None:
        raise UserError(
            f"--format peft writes LoRA adapters, and {source} is not a LoRA run (no `lora` section): export a "
            "whole model (merged, gguf-*, compressed-tensors, ...) instead"
        )
    return cfg


def export_peft(source: Path, out: Path, overrides: list[str], ptq) -> ExportSummary:
    """``lowbit export RUN --format peft --out DIR``: the adapters, self-checked by peft's own reader,
    placed at ``out`` only once that passed."""
    from peft.utils import load_peft_weights

    from lowbit.trainer.export import ExportSummary, _place, _remove, _size, load_source

    if ptq:
        raise UserError("--ptq quantizes a whole model; --format peft writes float adapters: drop --ptq")
    loaded = load_source(source, overrides, merge=False)
    cfg = check_lora_run(loaded.cfg, source)
    if cfg.model.subln or cfg.model.init_from is not None:
        what = "SubLN norms" if cfg.model.subln else f"the weights of {cfg.model.init_from}"
        instead = "--format bitnet or a gguf-* format" if cfg.model.subln else "--format merged"
        raise UserError(
            f"{source} trained its adapters on a base with {what}, which {cfg.model.path} (the base a peft "
            f"adapter names) does not have: export the merged model instead, {instead}"
        )
    if loaded.initial_adapters is not None and cfg.lora.base != "float":
        kind = "LoftQ" if cfg.lora.init.startswith("loftq") else "QPiSSA"
        raise UserError(
            f"{source} trained {kind} adapters on a {cfg.lora.base} base quantized from W − s·B₀A₀, not from the "
            "model's weights, which no adapter loader rebuilds from the original model: export --format merged, "
            "or a quantized format (the merge check shows what it holds)"
        )
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        written = write_peft(loaded.model, cfg, staging, loaded.initial_adapters)
        read_back = load_peft_weights(str(staging), device="cpu")
        worst = 0.0
        for name, tensor in written.items():
            key = name.replace(f".{ADAPTER_NAME}.", ".")  # peft drops the adapter name when saving
            if key not in read_back or read_back[key].shape != tensor.shape:
                raise UserError(f"self-check failed: peft reads back no {key} of shape {tuple(tensor.shape)}")
            worst = max(worst, (read_back[key].float() - tensor.float()).abs().max().item())
        _place(staging, out)
    finally:
        _remove(staging)
    parameters = sum(tensor.numel() for tensor in written.values())
    kinds = {"lora": sum(1 for name in written if ".lora_" in name)}
    if kinds["lora"] < len(written):
        kinds["modules_to_save"] = len(written) - kinds["lora"]
    dtype = str(next(iter(written.values())).dtype).removeprefix("torch.")
    return ExportSummary(
        path=out, format="peft", tensors={f"{kind} ({dtype})": n for kind, n in kinds.items()},
        parameters=parameters, file_bytes=_size(out), max_delta_quantized=0.0, max_delta_float=worst,
        ptq=False, note=bnb_loading_hint(cfg),
    )  # fmt: skip


def merge_perplexities(
    cfg: RunConfig, tokenizer, adapters: nn.Module, merged: nn.Module, grid: str
) -> list[dict]:
    """Perplexity on the run's validation data of the adapter model as trained, the merged float
    model, and the merged model on ``grid`` (what the quantized file holds; ``merged`` is that
    fake-quant model): a merge that degrades the model shows here, not later in production."""
    from lowbit.trainer.data import load_data
    from lowbit.trainer.evaluate import evaluate
    from lowbit.trainer.quantization import quantizers_enabled
    from lowbit.trainer.strategies import inference_strategy

    val = load_data(cfg.data, tokenizer, cfg.train.seed, show=False).val
    if val is None:
        return []
    strategy = inference_strategy(cfg.strategy, cfg.train)
    batch = cfg.eval.batch_size or cfg.train.micro_batch_size
    rows = [{"name": "adapters (as trained)", **evaluate(adapters, val, batch, strategy)}]
    with quantizers_enabled(merged, False):
        rows.append({"name": "merged, float", **evaluate(merged, val, batch, strategy)})
    rows.append({"name": f"merged, {grid} (this file)", **evaluate(merged, val, batch, strategy)})
    return rows
