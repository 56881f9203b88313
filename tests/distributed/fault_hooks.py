"""Step hooks that fail a run on purpose (loaded through ``imports:`` by the fault tests)."""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from lowbit.quant import FakeQuantLinear, fake_quantize
from lowbit.trainer.hooks import HOOKS, StepHook


@HOOKS.register("signal_at_step")
class SignalAtStep(StepHook):
    """After optimizer step ``step``, send ``signal`` (TERM, KILL...) to the process of ``rank``,
    on launch attempt ``attempt`` only (torchrun's restart count), so a restarted job goes on."""

    def __init__(self, step: int, signal: str, rank: int = 0, attempt: int = 0) -> None:
        self.step, self.signal, self.rank, self.attempt = step, signal, rank, attempt

    def on_step_end(self, trainer, step, metrics) -> None:
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if step == self.step and trainer.strategy.rank == self.rank and attempt == self.attempt:
            os.kill(os.getpid(), getattr(signal, f"SIG{self.signal}"))


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight, gathered from its shards (FSDP2 DTensor, ZeRO-3 partition) outside a forward."""
    if hasattr(weight, "full_tensor"):
        return weight.full_tensor().detach()
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight.detach()


@HOOKS.register("check_forward_weights")
class CheckForwardWeights(StepHook):
    """Before each step, fake-quantize every quantized layer's *current full* weight (gathered
    from its shards; blended by the warm-up's λ where one runs); during the step, record the weight each forward of each layer really used
    (every micro-batch); after it, count the forwards where the two differ. A cache that outlives
    an optimizer step fails."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.expected: dict[str, torch.Tensor] = {}
        self.used: dict[str, list[torch.Tensor]] = {}
        self.mismatches: list[int] = []

    def _layers(self, trainer):
        model = trainer.strategy.unwrap(trainer.parts.model)
        return [
            (n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear) and m.weight_quantizer
        ]

    def on_train_start(self, trainer) -> None:
        for name, module in self._layers(trainer):
            original = module.quantized_weight

            def record(original=original, name=name, module=module):
                weight = original()
                if module.training:  # the step's forwards, not the evaluation after its update
                    self.used.setdefault(name, []).append(weight.detach().clone())
                return weight

            module.quantized_weight = record

    def on_step_start(self, trainer, step) -> None:
        self.used.clear()
        for name, module in self._layers(trainer):
            weight, quantizer = full_weight(module.weight), module.weight_quantizer
            quantized = fake_quantize(weight, quantizer.spec)
            blend = quantizer.blend  # a quantization warm-up's λ for this step (set by the schedule first)
            self.expected[name] = quantized if blend >= 1 else weight + blend * (quantized - weight)

    def on_step_end(self, trainer, step, metrics) -> None:
        bad = sum(
            not torch.equal(used, self.expected[name]) for name in self.expected for used in self.used[name]
        )
        self.mismatches.append(bad)
        if trainer.strategy.is_main:
            with open(self.out, "w") as handle:
                handle.write(" ".join(map(str, self.mismatches)))
        if dist.is_initialized():
            dist.barrier()


@HOOKS.register("sleep_each_step")
class SleepEachStep(StepHook):
    """Slow a tiny run down, so a signal can arrive mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, trainer, step, metrics) -> None:
        time.sleep(self.seconds)
