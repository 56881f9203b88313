"""The one training loop every method runs through.

QAT, distillation, QLoRA and BitNet change what is *built* (transforms, loss terms, hooks), and
the engine changes how a step is carried out (the ``Strategy``), never this loop: it names no
engine and no method. A step: fetch this rank's micro-batches, count the step's valid tokens
across ranks, run each micro-batch's loss and backward (the engine syncs on the last), let the
engine finish the step (clip, optimizer, schedule), log, evaluate, checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.losses import count_target_tokens
from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.build import Components, build_components
from lowbit.trainer.config import RunConfig, config_dict, to_yaml
from lowbit.trainer.errors import UserError
from lowbit.trainer.evaluate import evaluate
from lowbit.trainer.loggers import MetricsLogger, setup_console_logging
from lowbit.trainer.preemption import Preempted, StopSignals
from lowbit.trainer.strategies import Strategy, build_strategy

logger = logging.getLogger("lowbit")


class Trainer:
    """Runs ``cfg`` to ``train.max_steps``, resuming from the run dir's newest checkpoint."""

    def __init__(self, cfg: RunConfig, strategy: Strategy | None = None) -> None:
        self.cfg = cfg
        self.strategy = strategy or build_strategy(cfg.strategy, cfg.train)
        setup_console_logging(self.strategy.is_main)
        self.run_dir = Path(cfg.run.output_dir)
        self.config_yaml = to_yaml(cfg)
        resume_from = self._choose_resume()
        self.parts: Components = build_components(cfg, self.strategy)
        self.step = 0
        if resume_from is not None:
            state = ckpt.restore(self.strategy, resume_from)
            self.step = state.step
            if state.global_batch_size != self.parts.train_batches.global_batch_size:
                logger.warning(
                    "the global batch changed since the checkpoint (%d -> %d): data order differs from an uninterrupted run",
                    state.global_batch_size,
                    self.parts.train_batches.global_batch_size,
                )
            logger.info("resumed from %s at step %d", resume_from, self.step)
        # Written once everything is built and resumed: a run that cannot start changes nothing.
        self.strategy.barrier()
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            logger.info("%s", self.describe())
        run_name = cfg.run.name or self.run_dir.name
        self.metrics = MetricsLogger(cfg.log, self.run_dir, run_name, config_dict(cfg), self.strategy.is_main)
        self.last_eval: dict[str, float] = {}

    def _choose_resume(self) -> Path | None:
        """Rank 0 verifies (hashes) the checkpoint to resume from, once, and tells the others which
        one it chose — or the problem, which every rank then raises (none is left waiting)."""
        choice: str | None = None
        problem: str | None = None
        if self.strategy.is_main:
            try:
                found = ckpt.choose_resume(self.cfg.checkpoint.resume, self.run_dir)
                choice = None if found is None else str(found)
            except UserError as error:
                problem = str(error)
        choice, problem = self.strategy.broadcast_object((choice, problem))
        if problem is not None:
            raise UserError(problem)
        return None if choice is None else Path(choice)

    def describe(self) -> str:
        """One line on what runs: engine, ranks, global batch, parameters, run directory."""
        strategy, batches = self.strategy, self.parts.train_batches
        total, trained = strategy.count_parameters(self.parts.model)
        return (
            f"engine {strategy.engine} on {strategy.world_size} rank(s) ({strategy.device.type}) | global batch "
            f"{batches.global_batch_size} = {batches.micro_batch_size} micro × {batches.grad_accum_steps} accum × "
            f"{strategy.world_size} ranks | {total / 1e6:.2f}M parameters, {trained / 1e6:.2f}M trained | "
            f"{len(batches.examples):,} training sequences | run dir {self.run_dir}"
        )

    # -- pieces of a step -------------------------------------------------------------------------

    def _train_step(self) -> dict[str, Any]:
        parts, strategy = self.parts, self.strategy
        started = time.perf_counter()
        micro_batches = parts.train_batches.micro_batches(self.step)
        local_counts = torch.tensor(
            [
                float(sum(count_target_tokens(b["labels"]) for b in micro_batches)),
                float(sum(b["attention_mask"].sum() for b in micro_batches)),
            ],
            dtype=torch.float64,
        )
        target_tokens, input_tokens = strategy.all_reduce_sum(local_counts).tolist()
        if target_tokens == 0:
            raise UserError(f"step {self.step}: no token in the global batch has a label (all -100)")
        loss_total = torch.zeros((), dtype=torch.float64)
        part_totals: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            batch = {k: v.to(strategy.device) for k, v in batch.items()}
            with strategy.micro_step(sync=index == len(micro_batches) - 1):
                loss, terms = parts.loss_step(parts.model, batch, target_tokens)
                strategy.backward(loss)
            loss_total += loss.detach().double().cpu()
            for name, value in terms.items():
                part_totals[name] = part_totals.get(name, 0) + value.double().cpu()
        lr = strategy.current_lr()
        grad_norm = strategy.optimizer_step()
        names = list(part_totals)
        reduced = strategy.all_reduce_sum(torch.stack([loss_total, *[part_totals[n] for n in names]]))
        elapsed = time.perf_counter() - started
        metrics: dict[str, Any] = {"loss": reduced[0].item(), "lr": lr}
        if len(names) > 1:
            metrics.update(
                {f"loss/{n}": (reduced[i + 1] / target_tokens).item() for i, n in enumerate(names)}
            )
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics.update(tokens=int(input_tokens), tokens_per_s=input_tokens / elapsed, step_time_s=elapsed)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity of the model as it is now."""
        assert self.parts.val is not None
        batch_size = self.cfg.eval.batch_size or self.cfg.train.micro_batch_size
        return evaluate(self.parts.model, self.parts.val, batch_size, self.strategy, self.cfg.train.precision)

    def run_eval(self) -> dict[str, float]:
        """Evaluate on the validation split (if any), inside the hooks' eval contexts, and log it."""
        if self.parts.val is None:
            return {}
        with contextlib.ExitStack() as contexts:
            for hook in self.parts.hooks:
                contexts.enter_context(hook.eval_context(self))
            self.last_eval = self.evaluate()
        for hook in self.parts.hooks:
            hook.on_eval(self, self.last_eval)
        self.metrics.log_eval(self.step, self.last_eval)
        return self.last_eval

    def save_checkpoint(self) -> None:
        """Collective: a checkpoint of the current step, written by the engine's own writer."""
        strategy, parts = self.strategy, self.parts
        state = ckpt.TrainerState(
            step=self.step,
            data_position=parts.train_batches.position(self.step),
            global_batch_size=parts.train_batches.global_batch_size,
            world_size=strategy.world_size,
            scheduler=strategy.scheduler.state_dict() if strategy.scheduler is not None else {},
            engine=strategy.engine,
            layout=strategy.checkpoint_layout,
        )
        ckpt.save(strategy, self.run_dir, state, self.config_yaml, self.cfg.checkpoint.keep_last)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``; return the last train metrics and eval results.

        Raises:
            Preempted: a stop signal arrived; the step it arrived in was finished and checkpointed.
        """
        cfg, parts = self.cfg, self.parts
        max_steps = cfg.train.max_steps
        self.metrics.start(max_steps, self.step)
        for hook in parts.hooks:
            hook.on_train_start(self)
        first_eval: dict[str, float] = {}
        if cfg.eval.at_start and self.step == 0:
            first_eval = self.run_eval()
        metrics: dict[str, Any] = {}
        first_step = self.step
        parts.model.train()
        try:
            with StopSignals() as signals:
                while self.step < max_steps:
                    for hook in parts.hooks:
                        hook.on_step_start(self, self.step)
                    metrics = self._train_step()
                    self.step += 1
                    self.metrics.log_train(self.step, metrics)
                    last = self.step == max_steps
                    if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and not last:
                        self.run_eval()
                    saved = bool(cfg.checkpoint.every_steps) and self.step % cfg.checkpoint.every_steps == 0
                    if saved and not last:
                        self.save_checkpoint()
                    for hook in parts.hooks:
                        hook.on_step_end(self, self.step, metrics)
                    if not last:  # a signal during the last step just lets the run finish
                        self._stop_if_signalled(signals, saved)
                self.run_eval()
                if cfg.checkpoint.save_final and self.step > first_step:
                    self.save_checkpoint()
                for hook in parts.hooks:
                    hook.on_train_end(self)
        finally:
            self.metrics.close()
        return {"train": metrics, "eval": self.last_eval, "first_eval": first_eval, "step": self.step}

    def _stop_if_signalled(self, signals: StopSignals, saved: bool) -> None:
        """All ranks agree whether any got a stop signal; if so, checkpoint this step and stop."""
        received = int(self.strategy.all_reduce_max(torch.tensor([signals.received])).item())
        if not received:
            return
        if not saved:
            self.save_checkpoint()
        raise Preempted(received, self.step)

    def close(self) -> None:
        self.strategy.teardown()


def train(cfg: RunConfig) -> dict[str, Any]:
    """Build, train and tear down: what ``lowbit train`` runs in each process."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
