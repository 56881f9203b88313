"""QAT inside the trainer: apply the config's rules, schedule fake quant, measure baselines.

``recovered = (ppl_ptq − ppl) / (ppl_ptq − ppl_float)``: the share of the perplexity that
round-to-nearest quantization (PTQ) loses which training has won back. The float and PTQ
perplexities are measured once, on the starting weights, and kept in the run dir so a resumed
run reports the same baselines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lowbit.trainer.config import QuantConfig, QuantWarmup
from lowbit.trainer.errors import UserError
from lowbit.trainer.hooks import StepHook

if TYPE_CHECKING:
    from lowbit.trainer.loop import Trainer

logger = logging.getLogger("lowbit")
BASELINES_FILE = "quant_baselines.json"


def apply_quantization(model: nn.Module, cfg: QuantConfig) -> str:
    """Swap in fake-quant layers per ``cfg.rules``; return the table of what was quantized."""
    from lowbit.quant import quantize_model, summary_table

    try:
        reports = quantize_model(model, cfg.rules, cfg.quantize_head, cfg.quantize_embeddings)
    except ValueError as error:
        raise UserError(f"quant.rules: {error}") from None
    return summary_table(reports)


@contextlib.contextmanager
def quantizers_enabled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily switch every fake quantizer on (fully: warm-up blend λ = 1, the model as it will
    be deployed) or off, restoring each one's state after."""
    from lowbit.quant import quantizers

    found = quantizers(model)
    before = [(q.enabled, q.blend) for q in found]
    for quantizer in found:
        quantizer.enabled, quantizer.blend = enabled, 1.0
    try:
        yield
    finally:
        for quantizer, (state, blend) in zip(found, before):
            quantizer.enabled, quantizer.blend = state, blend


def warmup_lambda(steps_quantized: int, warmup: QuantWarmup) -> float:
    """λ after ``steps_quantized`` steps with fake quant on: 0 at the start of the ramp, 1 from
    ``warmup.steps`` on. The exponential and sigmoid ramps are the ones the Hugging Face 1.58-bit
    fine-tuning study compared; both are rescaled to run exactly from 0 to 1."""
    if warmup.steps <= 0:
        return 1.0
    t = min(max(steps_quantized, 0) / warmup.steps, 1.0)
    if warmup.schedule == "linear" or t in (0.0, 1.0):
        return t
    k = warmup.k
    if warmup.schedule == "exponential":
        return math.expm1(k * t) / math.expm1(k)

    def sigmoid(value: float) -> float:
        return 1.0 / (1.0 + math.exp(-value))

    low, high = sigmoid(-k / 2), sigmoid(k / 2)
    return (sigmoid(k * (t - 0.5)) - low) / (high - low)


class QuantSchedule(StepHook):
    """QAT in the loop: fake quant off before ``enable_after_steps`` and on after; learned scales
    frozen from ``freeze_scales_after_steps``; evaluation always with fake quant (the model as it
    will be deployed); float and PTQ baselines measured when training starts, and ``recovered``
    added to every evaluation.

    Scales are frozen by zeroing the learning rate of their optimizer group (see
    ``optim.QUANTIZER_GROUP``), not by turning off ``requires_grad``: DeepSpeed keeps stepping a
    parameter it partitioned from its Adam momentum whatever its ``requires_grad`` says, and DDP
    expects the gradients of every parameter it was built with.

    With ``warmup.steps`` the quantizers blend float and quantized values, λ ramped from 0 at
    ``enable_after_steps`` to 1; λ is a function of the step, so a resumed run continues the ramp.
    """

    def __init__(self, cfg: QuantConfig) -> None:
        self.measure_baselines = cfg.baselines
        self.enable_after = cfg.enable_after_steps
        self.freeze_after = cfg.freeze_scales_after_steps
        self.warmup = cfg.warmup
        self.blend = 1.0
        self.frozen = False
        self.baselines: dict[str, float] = {}

    def _apply(self, trainer: Trainer, step: int) -> None:
        from lowbit.quant import set_quantizer_blend, set_quantizers_enabled
        from lowbit.trainer.optim import QUANTIZER_GROUP

        model = trainer.strategy.unwrap(trainer.parts.model)
        set_quantizers_enabled(model, step >= self.enable_after)
        if self.warmup.steps:
            self.blend = warmup_lambda(step - self.enable_after, self.warmup)
            set_quantizer_blend(model, self.blend if self.warmup.weights else 1.0,
                                self.blend if self.warmup.activations else 1.0)  # fmt: skip
        if self.freeze_after is not None and step >= self.freeze_after:
            # every step: the schedule sets each group's lr again after every optimizer step
            for group in trainer.parts.optimizer.param_groups:
                if group.get("name") == QUANTIZER_GROUP:
                    group["lr"] = 0.0
            if not self.frozen:
                logger.info("quantizer scales frozen at step %d", step)
                self.frozen = True

    def on_train_start(self, trainer: Trainer) -> None:
        self._apply(trainer, trainer.step)
        if self.measure_baselines and trainer.parts.val is not None:
            self.baselines = load_or_measure_baselines(trainer, self._measure)

    def _measure(self, trainer: Trainer, quantized: bool) -> dict[str, float]:
        with quantizers_enabled(trainer.parts.model, quantized):
            return trainer.evaluate()

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self._apply(trainer, step)

    def train_metrics(self, trainer: Trainer) -> dict[str, float]:
        return {"quant_lambda": self.blend} if self.warmup.steps else {}

    def eval_context(self, trainer: Trainer) -> contextlib.AbstractContextManager:
        return quantizers_enabled(trainer.parts.model, True)

    def on_eval(self, trainer: Trainer, results: dict[str, float]) -> None:
        share = recovered(results["val_ppl"], self.baselines) if self.baselines else None
        if share is not None:
            results["recovered"] = share


MIN_PTQ_GAP = 0.01  # of the float perplexity: below it `recovered` is not reported


def recovered(ppl: float, baselines: dict[str, float]) -> float | None:
    """Share of the PTQ perplexity loss won back; None when PTQ lost (almost) nothing to win
    back: with PTQ within 1% of float the ratio divides noise by noise (a gap of 0.01 ppl once
    printed 8627 for a change of 0.9 ppl)."""
    lost = baselines["val_ppl_ptq"] - baselines["val_ppl_float"]
    if lost <= MIN_PTQ_GAP * baselines["val_ppl_float"]:
        return None
    return (baselines["val_ppl_ptq"] - ppl) / lost


def _baseline_key(trainer: Trainer) -> str:
    """What the baselines depend on: starting model (with its SubLN, or a previous stage's weights),
    quant rules, validation data."""
    cfg = trainer.cfg
    return json.dumps([str(cfg.model.path), cfg.model.config, cfg.model.subln, cfg.model.init_from,
                       cfg.quant.rules if cfg.quant else None,  # fmt: skip
                       list(cfg.data.val_files), cfg.data.val_fraction, cfg.data.seq_len, cfg.train.seed],
                      sort_keys=True, default=str)  # fmt: skip


def load_or_measure_baselines(trainer: Trainer, measure) -> dict[str, Any]:
    """Baselines from the run dir, or measured now (``measure(trainer, quantized) -> eval dict``) and saved."""
    path = Path(trainer.run_dir) / BASELINES_FILE
    key = _baseline_key(trainer)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.pop("key", None) == key:
            return stored
    if trainer.step > 0:
        logger.warning(
            "no %s in the run dir: `recovered` is not reported for this resumed run", BASELINES_FILE
        )
        return {}
    float_eval, ptq_eval = measure(trainer, False), measure(trainer, True)
    baselines = {"val_ppl_float": float_eval["val_ppl"], "val_ppl_ptq": ptq_eval["val_ppl"],
                 "val_loss_float": float_eval["val_loss"], "val_loss_ptq": ptq_eval["val_loss"]}  # fmt: skip
    if trainer.strategy.is_main:
        path.write_text(json.dumps({**baselines, "key": key}, indent=2))
    trainer.metrics.log_eval(trainer.step, baselines)
    return baselines
