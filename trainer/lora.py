"""The ``lora`` model transform: freeze the base (4-bit NF4/FP4 codes, or the float model), then
wrap the chosen Linear layers with peft's LoRA layers and mark what trains.

Adapters are injected in place with ``peft.inject_adapter_in_model``, not ``get_peft_model``: the
model stays the transformers model it was, so every other piece of lowbit — quant rules, FSDP2's
per-layer sharding, checkpoints, the fused head — sees the base model's own module names, with
``.base_layer`` / ``.lora_A.default`` inside the adapted layers as peft names them. The 4-bit base
is ``lowbit.quant.nf4.FrozenNF4Linear`` (an ``nn.Linear``), so peft wraps it with its plain
``lora.Linear``, as it wraps a fake-quant layer of a QAT run (``lora.base: float`` + ``quant``).
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import re

import torch
from torch import nn

from lowbit.trainer.config import LoraSection
from lowbit.trainer.errors import UserError
from lowbit.trainer.model import DTYPES

ADAPTER_NAME = "default"  # peft's default adapter name: what PeftModel.from_pretrained loads
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_dropout")


def _matches(pattern: str, name: str) -> bool:
    """A module name against one entry of ``lora.targets``/``trainable``/``base_skip``: ``re:`` a
    regex on the full name, a glob, or a name or its last dotted parts (peft's list semantics)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def is_adapter(name: str) -> bool:
    """Whether a module or parameter name lies inside a LoRA adapter."""
    return any(f".{part}." in f".{name}." for part in ADAPTER_PARTS)


def select(candidates: list[str], patterns: list[str], key: str) -> list[str]:
    """The candidates matched by any pattern; a pattern that matches none is an error that lists
    the names closest to it (a typo is the usual cause, and training without it is silent waste)."""
    chosen = [name for name in candidates if any(_matches(p, name) for p in patterns)]
    for pattern in patterns:
        if not any(_matches(pattern, name) for name in candidates):
            short = sorted({name.rsplit(".", 1)[-1] for name in candidates})
            close = difflib.get_close_matches(
                pattern.removeprefix("re:"), short + candidates, n=4, cutoff=0.5
            )
            hint = (
                f"close names: {', '.join(close)}"
                if close
                else f"layer names end in: {', '.join(short[:12])}"
            )
            raise UserError(f"{key}: {pattern!r} matches no layer of this model ({hint})")
    return chosen


def linear_names(model: nn.Module) -> list[str]:
    """Every Linear layer but the output head (what ``all-linear`` means, as in peft)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head
    ]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_base(model: nn.Module, lora: LoraSection) -> list[str]:
    """Replace every Linear but the head, the adapters and ``base_skip`` with a frozen 4-bit one
    (inside an adapted layer: its ``base_layer``); return the layers' names."""
    from lowbit.quant.nf4 import FrozenNF4Linear

    real = {
        name.removesuffix(".base_layer"): name
        for name in linear_names(model)
        if not is_adapter(name) and not isinstance(model.get_submodule(name), FrozenNF4Linear)
    }  # (a LoftQ-initialised layer is 4-bit already)
    skipped = set(select(list(real), lora.base_skip, "lora.base_skip")) if lora.base_skip else set()
    unsupported = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if unsupported:
        raise UserError(
            f"lora.base={lora.base}: {unsupported[0]} is a transformers Conv1D (GPT-2 style), which lowbit's 4-bit "
            "base does not hold: use lora.base=float for this model"
        )
    compute = DTYPES[lora.compute_dtype] if lora.compute_dtype else None
    names = [name for name in real if name not in skipped]
    for name in names:
        linear = model.get_submodule(real[name])
        quantized = FrozenNF4Linear.from_linear(linear, lora.base, lora.blocksize, lora.double_quant, compute)
        replace_module(model, real[name], quantized)
    return names


def inject_adapters(model: nn.Module, lora: LoraSection) -> list[str]:
    """Wrap the target layers with peft LoRA layers (only adapters left trainable); return their names."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = (
        select(linear_names(model), lora.targets, "lora.targets") if lora.targets != ["all-linear"] else None
    )
    if targets is None:
        targets = linear_names(model)
    if not targets:
        raise UserError(
            f"lora.targets: {type(model).__name__} has no nn.Linear layers to adapt (GPT-2-style Conv1D layers are "
            "not supported by lowbit's LoRA yet): choose another model"
        )
    init = True if lora.init in ("default", "loftq") or lora.init.startswith("loftq_") else lora.init
    if lora.init.startswith("pissa") and any(param.is_meta for param in model.parameters()):
        # A model built on the meta device (ranks that receive their weights from rank 0) has no
        # weights to decompose: rank 0's PiSSA adapters and residual arrive with the others.
        init = True
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        use_rslora=lora.rslora, use_dora=lora.dora, init_lora_weights=init, bias="none",
    )  # fmt: skip
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    return targets


def linear_4bit(model: nn.Module) -> list[str]:
    """Names of the 4-bit base layers already in ``model`` (shown without peft's ``.base_layer``)."""
    from lowbit.quant.nf4 import FrozenNF4Linear

    return [n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, FrozenNF4Linear)]


def loftq_initialize(model: nn.Module, lora: LoraSection) -> None:
    """Give every adapted layer LoftQ's 4-bit base and adapters (``lowbit.quant.loftq``); a model on
    the meta device gets the 4-bit shapes only (rank 0's values arrive with the others)."""
    from peft.tuners.lora import LoraLayer

    from lowbit.quant.loftq import loftq_layer
    from lowbit.quant.nf4 import FrozenNF4Linear

    iterations = int(lora.init.rsplit("_", 1)[1]) if lora.init.startswith("loftq_iter_") else 1
    compute = DTYPES[lora.compute_dtype] if lora.compute_dtype else None
    settings = {"quant_type": lora.base, "blocksize": lora.blocksize, "double_quant": lora.double_quant}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        linear = module.get_base_layer()
        if linear.weight.is_meta:
            module.base_layer = FrozenNF4Linear.from_linear(linear, **settings, compute_dtype=compute)
            continue
        base, a, b = loftq_layer(linear, lora.rank, module.scaling[ADAPTER_NAME], iterations, **settings,
                                 compute_dtype=compute or linear.weight.dtype)  # fmt: skip
        module.base_layer = base
        with torch.no_grad():
            module.lora_A[ADAPTER_NAME].weight.copy_(a)
            module.lora_B[ADAPTER_NAME].weight.copy_(b)


def train_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Make ``lora.trainable`` modules train in full (e.g. the head for a new vocabulary)."""
    from lowbit.quant.nf4 import FrozenNF4Linear

    names = [name for name, _ in model.named_modules() if name and not is_adapter(name)]
    chosen = select(names, patterns, "lora.trainable")
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, FrozenNF4Linear) or any(
            isinstance(m, FrozenNF4Linear) for m in module.modules()
        ):
            raise UserError(
                f"lora.trainable: {name} holds 4-bit base weights, which cannot train; keep it in float with "
                f"lora.base_skip: [{name}] (or train it through adapters only)"
            )
        for param in module.parameters():
            param.requires_grad_(True)
    return chosen


def apply_lora(model: nn.Module, lora: LoraSection, optimizer: str = "adamw") -> str:
    """Freeze the base, quantize it (nf4/fp4), inject adapters, mark trainable modules; the report."""
    from lowbit.quant.nf4 import base_bytes

    linears = [model.get_submodule(name) for name in linear_names(model)]
    float_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    for param in model.parameters():
        param.requires_grad_(False)
    # PiSSA splits each float weight into adapters and a residual that the 4-bit base quantizes
    # (QPiSSA); LoftQ fits base codes and adapters together: for both the adapters go in first,
    # on the float weights. Otherwise the base is quantized first.
    adapters_first = lora.init.startswith(("pissa", "loftq"))
    quantized = quantize_base(model, lora) if lora.base != "float" and not adapters_first else []
    targets = inject_adapters(model, lora)
    if lora.init.startswith("loftq"):
        loftq_initialize(model, lora)
    if lora.base != "float" and adapters_first:
        quantized = [*linear_4bit(model), *quantize_base(model, lora)]
    trainable = train_modules(model, lora.trainable) if lora.trainable else []
    merge_aware = 0
    if lora.merge_aware:
        from lowbit.quant.merge_aware import make_merge_aware

        merge_aware = make_merge_aware(model)
        if not merge_aware:
            raise UserError(
                "lora.merge_aware: no adapted layer has a fake-quant base; let the `quant` rules cover lora.targets"
            )
    adapter = sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    scaling = (
        f"alpha/sqrt(r) = {lora.alpha / lora.rank**0.5:.3g}"
        if lora.rslora
        else f"alpha/r = {lora.alpha / lora.rank:.3g}"
    )
    lines = [
        f"  adapters   r={lora.rank} on {len(targets)} layers ({scaling}{', DoRA' if lora.dora else ''}): "
        f"{adapter / 1e6:.3f}M parameters",
    ]
    if quantized:
        kind = f"{lora.base}, block {lora.blocksize}{', double quant' if lora.double_quant else ''}"
        lines.append(
            f"  base       {len(quantized)} layers in 4 bit ({kind}): {base_bytes(model) / 2**20:.2f} MiB "
            f"(their {_dtype_name(model)} weights: {float_bytes / 2**20:.2f} MiB), frozen"
        )
    else:
        lines.append(f"  base       float, frozen ({_dtype_name(model)})")
    if merge_aware:
        lines.append(
            f"  merge-aware {merge_aware} layers: forward = fake_quant(W + scaling·B·A), the merged export exact"
        )
    if trainable:
        lines.append(f"  trained    in full: {', '.join(trainable)}")
    from lowbit.trainer.optim import STATE_BYTES

    state = STATE_BYTES[optimizer] * trained / 2**20
    lines.append(
        f"  trainable  {trained / 1e6:.3f}M parameters; optimizer state ({optimizer}) {state:.2f} MiB"
    )
    return "\n".join(lines)


def _dtype_name(model: nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def frozen_fingerprint(model: nn.Module) -> str:
    """sha256 over the names and bytes of every frozen parameter: the base an adapter checkpoint
    belongs to (checkpoints hold only what trains; a resume onto another base is refused)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            continue
        data = param.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
