"""Model transforms: what turns the loaded model into the one that trains, in a fixed order.

    loaded model ─> subln? ─> quant (QAT / BitNet rules) ─> init_from? ─> lora (4-bit base + adapters)?
                 ─> compile? ─> engine.wrap

Each transform is registered with its place in that order and a test of the config that turns it
on, and is applied to the *unwrapped* model before the engine wraps it, so sharding sees the
final modules and a transform's rules match names relative to the base model. A transform may
add step hooks (the QAT schedule). Register your own with ``@register_transform`` in a module
listed under ``imports:``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lowbit.trainer.config import RunConfig
from lowbit.trainer.errors import UserError
from lowbit.trainer.hooks import StepHook

logger = logging.getLogger("lowbit")


@dataclass
class TransformResult:
    """What a transform did (printed on rank 0), the hooks it needs in the loop, and whether some
    trained parameters may get no gradient in some steps (DDP must then look for them)."""

    report: str = ""
    hooks: list[StepHook] = field(default_factory=list)
    unused_parameters: bool = False


@dataclass(frozen=True)
class Transform:
    name: str
    order: int
    enabled: Callable[[RunConfig], bool]
    apply: Callable[[nn.Module, RunConfig], TransformResult]


TRANSFORMS: dict[str, Transform] = {}


def register_transform(name: str, order: int, enabled: Callable[[RunConfig], bool]):
    """Decorator: ``apply(model, cfg) -> TransformResult`` runs at ``order`` when ``enabled(cfg)``."""

    def decorate(apply: Callable[[nn.Module, RunConfig], TransformResult]):
        if name in TRANSFORMS and TRANSFORMS[name].apply is not apply:
            raise ValueError(f"model transform {name!r} is registered twice")
        TRANSFORMS[name] = Transform(name, order, enabled, apply)
        return apply

    return decorate


@register_transform("subln", order=10, enabled=lambda cfg: cfg.model.subln)
def subln_transform(model: nn.Module, cfg: RunConfig) -> TransformResult:
    """BitNet's sub-layer norms before each attention output and MLP down projection (``lowbit.trainer.subln``)."""
    from lowbit.trainer.subln import apply_subln

    return TransformResult(apply_subln(model))


@register_transform("quant", order=20, enabled=lambda cfg: cfg.quant is not None)
def quant_transform(model: nn.Module, cfg: RunConfig) -> TransformResult:
    """Fake-quant layers by ``quant.rules`` (first match wins), and the schedule that turns them on."""
    from lowbit.quant import quantizers
    from lowbit.trainer.quantization import QuantSchedule, apply_quantization

    assert cfg.quant is not None
    report = apply_quantization(model, cfg.quant)
    # Learned scales take no part in the forward while the schedule keeps fake quant off, or while
    # a warm-up's λ = 0 returns the float input.
    learned = any(q.scale is not None for q in quantizers(model))
    idle = cfg.quant.enable_after_steps > 0 or cfg.quant.warmup.steps > 0
    return TransformResult(report, [QuantSchedule(cfg.quant)], learned and idle)


@register_transform("init_from", order=30, enabled=lambda cfg: cfg.model.init_from is not None)
def init_from_transform(model: nn.Module, cfg: RunConfig) -> TransformResult:
    """Load a previous run's trained weights (a recipe's earlier stage) into the transformed model:
    after ``subln`` and ``quant`` (which build the modules that run trained), before ``lora`` (which
    freezes and packs the base the adapters train on)."""
    from lowbit.trainer import checkpoint as ckpt
    from lowbit.trainer.evaluate_cli import resolve_target

    assert cfg.model.init_from is not None
    source = Path(cfg.model.init_from).expanduser()
    _, checkpoint = resolve_target(source)
    if checkpoint is None:
        raise UserError(
            f"model.init_from {source}: give a run directory or a checkpoint directory, not a file"
        )
    on_meta = any(param.is_meta for param in model.parameters())
    if on_meta:  # fsdp2's rank-0 load: the other ranks receive rank 0's weights when the engine wraps
        return TransformResult(f"weights from {checkpoint}, loaded on rank 0")
    try:
        ckpt.load_weights(checkpoint, model)
    except UserError as error:
        raise UserError(
            f"model.init_from {source}: {error}. The previous stage must build the same modules as this one "
            "(same model, model.subln and quant layers); a LoRA run's checkpoint holds only adapters: export "
            "it with --format merged and start from that directory as model.path"
        ) from None
    step = ckpt.checkpoint_step(checkpoint)
    return TransformResult(f"weights from {checkpoint} (step {step})")


@register_transform("lora", order=40, enabled=lambda cfg: cfg.lora is not None)
def lora_transform(model: nn.Module, cfg: RunConfig) -> TransformResult:
    """Freeze the base (4-bit codes, or float / fake-quant), add peft LoRA adapters (``lowbit.trainer.lora``)."""
    from lowbit.trainer.lora import apply_lora

    assert cfg.lora is not None
    return TransformResult(apply_lora(model, cfg.lora, cfg.train.optimizer))


@register_transform("compile", order=90, enabled=lambda cfg: cfg.train.compile)
def compile_transform(model: nn.Module, cfg: RunConfig) -> TransformResult:
    """``torch.compile`` each decoder layer in place (names and parameters unchanged, so sharding,
    checkpoints and rules see the same model), as torchtitan compiles per block before FSDP."""
    from lowbit.trainer.model import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=False)
    return TransformResult(f"{len(layers)} decoder layers compiled with torch.compile")


def apply_transforms(
    model: nn.Module, cfg: RunConfig, announce: bool, skip: tuple[str, ...] = ()
) -> TransformResult:
    """Apply every enabled transform in order, but those named in ``skip``; return their hooks and
    flags together."""
    combined = TransformResult()
    for transform in sorted(TRANSFORMS.values(), key=lambda t: t.order):
        if not transform.enabled(cfg) or transform.name in skip:
            continue
        result = transform.apply(model, cfg)
        combined.hooks.extend(result.hooks)
        combined.unused_parameters |= result.unused_parameters
        if announce and result.report:
            logger.info("%s:\n%s", transform.name, result.report)
    return combined
