"""Step hooks: code that runs at fixed points of the loop, configured by name.

    hooks: [{kind: my_hook, step: 100}]

Register your own with ``@HOOKS.register("my_hook")`` in a module listed under ``imports:``.
Quantization uses the same points ("enable fake quant after step N").
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from lowbit.losses.registry import Registry

if TYPE_CHECKING:
    from lowbit.trainer.loop import Trainer

HOOKS: Registry[StepHook] = Registry("hook")


class StepHook:
    """Base class; override the points you need. ``step`` counts completed optimizer steps."""

    def on_train_start(self, trainer: Trainer) -> None:
        """After building and resuming, before the first step."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        """Before the micro-batches of step ``step`` (0-based) run."""

    def train_metrics(self, trainer: Trainer) -> dict[str, float]:
        """Values to log with the step that just ran (QAT warm-up: ``quant_lambda``)."""
        return {}

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        """After optimizer step ``step`` (1-based count), its logging, eval and checkpoint."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the final eval and checkpoint."""

    def eval_context(self, trainer: Trainer) -> contextlib.AbstractContextManager:
        """A context around each validation pass (QAT: fake quant on, as the model will be deployed)."""
        return contextlib.nullcontext()

    def on_eval(self, trainer: Trainer, results: dict[str, float]) -> None:
        """After each validation pass, before it is logged: add to ``results`` (QAT: ``recovered``)."""


def build_hooks(specs: list[dict[str, Any]]) -> list[StepHook]:
    return [HOOKS.build(spec) for spec in specs]
