"""Model transforms: what turns the loaded model into the one that trains, in a fixed order.

    loaded model ─> subln? ─> quant (QAT / BitNet rules) ─> nf4_base? ─> lora? ─> compile? ─> engine.wrap

Each transform is registered with its place in that order and a test of the config that turns it
on, and is applied to the *unwrapped* model before the engine wraps it, so sharding sees the
final modules and a transform's rules match names relative to the base model. A transform may
add step hooks (the QAT schedule). Register your own with ``@register_transform`` in a module
listed under ``imports:``; ``subln``, ``nf4_base`` and ``lora`` take their places as they land.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from lowbit.trainer.config import RunConfig
from lowbit.trainer.hooks import StepHook

logger = logging.getLogger("lowbit")


@dataclass
class TransformResult:
    """What a transform did (printed on rank 0) and the hooks it needs in the loop."""

    report: str = ""
    hooks: list[StepHook] = field(default_factory=list)


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


@register_transform("quant", order=20, enabled=lambda cfg: cfg.quant is not None)
def quant_transform(model: nn.Module, cfg: RunConfig) -> TransformResult:
    """Fake-quant layers by ``quant.rules`` (first match wins), and the schedule that turns them on."""
    from lowbit.trainer.quantization import QuantSchedule, apply_quantization

    assert cfg.quant is not None
    return TransformResult(apply_quantization(model, cfg.quant), [QuantSchedule(cfg.quant)])


@register_transform("compile", order=90, enabled=lambda cfg: cfg.train.compile)
def compile_transform(model: nn.Module, cfg: RunConfig) -> TransformResult:
    """``torch.compile`` each decoder layer in place (names and parameters unchanged, so sharding,
    checkpoints and rules see the same model), as torchtitan compiles per block before FSDP."""
    from lowbit.trainer.model import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=False)
    return TransformResult(f"{len(layers)} decoder layers compiled with torch.compile")


def apply_transforms(model: nn.Module, cfg: RunConfig, announce: bool) -> list[StepHook]:
    """Apply every enabled transform in order; return the hooks they add."""
    hooks: list[StepHook] = []
    for transform in sorted(TRANSFORMS.values(), key=lambda t: t.order):
        if not transform.enabled(cfg):
            continue
        result = transform.apply(model, cfg)
        hooks.extend(result.hooks)
        if announce and result.report:
            logger.info("%s:\n%s", transform.name, result.report)
    return hooks
