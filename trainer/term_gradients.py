"""How hard each loss term pulls: per-term gradient norms, and loss weights set from them.

A loss weight says little about a term's influence: what moves the parameters is the gradient
each term contributes. An independent reproduction of BitDistill found the paper's relation-loss
weight (1e5) gave that term ~221× the gradient of the cross-entropy and hurt accuracy, while
weights that balanced the gradients did better on a quarter of the tokens. So:

* ``log.term_grad_norms_every: N`` logs, every N steps, ``grad_norm/<term>`` = ‖∇θ (wᵢ · termᵢ)‖
  on the trained parameters θ, for the first micro-batch of the step (on every rank: the per-rank
  gradients are summed before the norm, as the engine sums them; the value is rescaled by that
  micro-batch's share of the step's tokens, so with one micro-batch per step it is the term's
  part of the step's gradient exactly).
* ``loss_balance`` measures the *unweighted* norms gᵢ over ``calibration_steps`` steps (averaged;
  the first ones, or with ``after_warmup`` the first after a quantization warm-up has reached λ = 1),
  then sets wᵢ = ratioᵢ · w_ref · g_ref / gᵢ once, keeping the reference term's
  weight. The measurements and the weights are kept in the run dir (``loss_weights.json``), so a
  resumed run uses the same weights and a run stopped mid-calibration resumes it exactly.

Each norm is ``torch.autograd.grad`` of one term's graph (kept with ``retain_graph``) with respect
to the parameters the forward used, so it runs where those are the model's own parameters: the
single and ddp engines (fsdp2 and ZeRO-3 compute with gathered copies; config validation says so).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lowbit.losses import count_target_tokens
from lowbit.trainer.config import RunConfig, calibration_start
from lowbit.trainer.errors import UserError
from lowbit.trainer.hooks import StepHook

if TYPE_CHECKING:
    from lowbit.trainer.loop import Trainer

logger = logging.getLogger("lowbit")
WEIGHTS_FILE = "loss_weights.json"


def term_gradient_norms(
    graphs: dict[str, Tensor], params: list[nn.Parameter], all_reduce_sum=None
) -> dict[str, float]:
    """‖∇ params‖ of each graph in ``graphs`` alone (squares summed in float64), each gradient
    summed over ranks by ``all_reduce_sum`` first when given. Every graph is kept for the backward
    that follows. Memory: one set of gradients at a time (what ``autograd.grad`` returns)."""
    norms: dict[str, float] = {}
    for name, loss in graphs.items():
        # No graph on this rank (a term that reads no trained parameter, or a micro-batch without
        # counted tokens): zero gradients, still summed with the other ranks' so collectives pair up.
        grads = (
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            if loss.requires_grad
            else [None] * len(params)
        )
        squares = torch.zeros((), dtype=torch.float64)
        for grad, param in zip(grads, params):
            if all_reduce_sum is not None:  # every rank takes part for every parameter, used or not
                grad = all_reduce_sum(grad if grad is not None else torch.zeros_like(param))
            if grad is not None:
                squares += grad.double().pow(2).sum().cpu()
        norms[name] = float(squares.sqrt())
    return norms


class TermGradients(StepHook):
    """Arms the loss step to measure on the first micro-batch of chosen steps; logs and balances."""

    def __init__(self, cfg: RunConfig) -> None:
        self.every = cfg.log.term_grad_norms_every
        self.balance = cfg.loss_balance
        self.norms: dict[str, float] = {}
        self.calibration: dict[int, dict[str, float]] = {}
        self.weights_set = False
        self.start = calibration_start(cfg)

    # -- when to measure -----------------------------------------------------------------------------

    def _calibrating(self, step: int) -> bool:
        if self.balance is None or self.weights_set:
            return False
        return self.start <= step < self.start + self.balance.calibration_steps

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.strategy.engine not in ("single", "ddp"):  # `auto` may resolve to a sharding engine
            raise UserError(
                f"log.term_grad_norms_every / loss_balance take gradients of the parameters the forward uses, and "
                f"the {trainer.strategy.engine} engine computes with gathered copies of sharded ones: launch with "
                "strategy.name=single or ddp, or drop them"
            )
        if self.balance is None:
            return
        objective = trainer.parts.objective
        if objective.weights[objective.names.index(self.balance.reference)] == 0:
            raise UserError(
                f"loss_balance.reference {self.balance.reference!r} has weight 0: the other terms would be scaled "
                "to nothing; give it a positive weight or choose another reference"
            )
        path = Path(trainer.run_dir) / WEIGHTS_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("key") == self._key(trainer):
                self.calibration = {int(s): n for s, n in stored["measured"].items() if int(s) < trainer.step}
                if stored.get("weights") and trainer.step >= self.start + self.balance.calibration_steps:
                    self._set_weights(trainer, stored["weights"])
        if trainer.step >= self.start + self.balance.calibration_steps and not self.weights_set:
            raise UserError(
                f"loss_balance: this run resumes at step {trainer.step}, after its calibration, but {path} with the "
                "weights it set is missing or belongs to other loss settings; restore that file, or resume with "
                "checkpoint.allow_config_change=true, loss_balance=null and those weights set in `loss` "
                "(they are in the run's log: 'loss_balance: weights ...')"
            )

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self.norms = {}
        if (self.every and step % self.every == 0) or self._calibrating(step):
            trainer.parts.loss_step.term_probe = lambda graphs, batch, tokens: self._measure(
                trainer, graphs, batch, tokens
            )

    def _measure(
        self, trainer: Trainer, graphs: dict[str, Tensor], batch: dict[str, Tensor], step_tokens: float
    ) -> None:
        strategy = trainer.strategy
        model = strategy.unwrap(trainer.parts.model)
        params = [param for param in model.parameters() if param.requires_grad]
        # Graphs are normalised by the step's token count: rescale to this micro-batch's own tokens.
        counts = torch.tensor([float(count_target_tokens(batch["labels"]))], dtype=torch.float64)
        micro_tokens = float(strategy.all_reduce_sum(counts)[0])
        unweighted = term_gradient_norms(graphs, params, strategy.all_reduce_sum)
        share = step_tokens / max(micro_tokens, 1.0)
        self.norms = {name: value * share for name, value in unweighted.items()}

    # -- after the step ------------------------------------------------------------------------------

    def train_metrics(self, trainer: Trainer) -> dict[str, float]:
        if not self.norms:
            return {}
        objective = trainer.parts.objective
        metrics = {
            f"grad_norm/{name}": abs(objective.weights[objective.names.index(name)]) * value
            for name, value in self.norms.items()
        }
        step = trainer.step  # the step just run (not yet counted)
        if self._calibrating(step):
            self.calibration[step] = dict(self.norms)
            weights = None
            if step + 1 >= self.start + self.balance.calibration_steps:
                weights = self._balanced_weights(trainer)
            self._save(trainer, weights)
            if weights is not None:
                self._set_weights(trainer, weights)
                logger.info("loss_balance: weights %s", ", ".join(f"{k} {v:.4g}" for k, v in weights.items()))
        return metrics

    def _balanced_weights(self, trainer: Trainer) -> dict[str, float]:
        assert self.balance is not None
        objective = trainer.parts.objective
        names = objective.names
        mean = {
            name: sum(n[name] for n in self.calibration.values()) / len(self.calibration) for name in names
        }
        reference = self.balance.reference
        pull = objective.weights[names.index(reference)] * mean[reference]
        if pull == 0:
            raise UserError(
                f"loss_balance: the reference term {reference!r} has no gradient to balance against"
            )
        weights = {}
        for name, weight in zip(names, objective.weights):
            if name == reference or mean[name] == 0:
                weights[name] = weight  # a term with no gradient on the trained parameters keeps its weight
            else:
                weights[name] = self.balance.ratios.get(name, 1.0) * pull / mean[name]
        return weights

    def _set_weights(self, trainer: Trainer, weights: dict[str, float]) -> None:
        objective = trainer.parts.objective
        objective.weights = [
            float(weights.get(name, weight)) for name, weight in zip(objective.names, objective.weights)
        ]
        self.weights_set = True

    def _save(self, trainer: Trainer, weights: dict[str, float] | None) -> None:
        if trainer.strategy.is_main:
            data: dict[str, Any] = {"key": self._key(trainer), "measured": self.calibration, "weights": weights,
                                    "configured": dict(zip(trainer.parts.objective.names, trainer.parts.objective.weights))}  # fmt: skip
            (Path(trainer.run_dir) / WEIGHTS_FILE).write_text(json.dumps(data, indent=2))

    def _key(self, trainer: Trainer) -> str:
        cfg = trainer.cfg
        return json.dumps(
            [cfg.loss, cfg.loss_balance.__dict__ if cfg.loss_balance else None], sort_keys=True, default=str
        )
