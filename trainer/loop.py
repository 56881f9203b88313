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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowbit.losses import count_target_tokens
from lowbit.quant import quant_grids
from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.build import Components, build_components
from lowbit.trainer.config import RunConfig, config_dict, to_yaml
from lowbit.trainer.data import StreamBatches
from lowbit.trainer.errors import UserError
from lowbit.trainer.evaluate import evaluate
from lowbit.trainer.loggers import MetricsLogger, setup_console_logging
from lowbit.trainer.preemption import Preempted, StopSignals
from lowbit.trainer.preflight import check_room_for_checkpoint, check_run_dir
from lowbit.trainer.resume_guard import check_config_drift, rules_changed_on_purpose
from lowbit.trainer.strategies import Strategy, build_strategy
from lowbit.trainer.strategies.base import full_numel

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
        self.run_facts = self.facts()
        total, trained = self.run_facts["parameters"], self.run_facts["trained_parameters"]
        self._decided_on_main(lambda: check_room_for_checkpoint(self.run_dir, total, trained))
        self.step = 0
        if resume_from is not None:
            deliberate = rules_changed_on_purpose(resume_from, cfg)
            ckpt.check_quant_grids(ckpt.read_state(resume_from), resume_from, self.parts.model, deliberate)
            state = ckpt.restore(self.strategy, resume_from, self.parts.frozen_base)
            self.step = state.step
            self.parts.train_batches.restore(state.data_state, self.step)
            if state.global_batch_size != self.parts.train_batches.global_batch_size:
                logger.warning(
                    "the global batch changed since the checkpoint (%d -> %d): data order differs from an uninterrupted run",
                    state.global_batch_size,
                    self.parts.train_batches.global_batch_size,
                )
            logger.info("resumed from %s at step %d", resume_from, self.step)
            if self.step >= cfg.train.max_steps:
                logger.warning(
                    "the run is already at step %d of train.max_steps=%d: nothing left to train (raise "
                    "train.max_steps to continue it)", self.step, cfg.train.max_steps,
                )  # fmt: skip
        # Written once everything is built and resumed: a run that cannot start changes nothing.
        self.strategy.barrier()
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            logger.info("%s", self.describe())
        run_name = cfg.run.name or self.run_dir.name
        logged_config = {**config_dict(cfg), "lowbit": self.run_facts}
        self.metrics = MetricsLogger(cfg.log, self.run_dir, run_name, logged_config, self.strategy.is_main)
        self.last_eval: dict[str, float] = {}

    def _choose_resume(self) -> Path | None:
        """Rank 0 checks the run directory and verifies (hashes) the checkpoint to resume from,
        once; every rank learns its choice, or raises its refusal."""

        def choose() -> str | None:
            check_run_dir(self.run_dir)
            found = ckpt.choose_resume(self.cfg.checkpoint.resume, self.run_dir)
            if found is None:
                return None
            check_config_drift(found, self.cfg)
            return str(found)

        choice = self._decided_on_main(choose)
        return None if choice is None else Path(choice)

    def _decided_on_main(self, decide: Callable[[], Any]) -> Any:
        """``decide()`` on rank 0, its result on every rank — or its ``UserError`` raised on every
        rank, so none is left waiting in a collective for a rank that gave up."""
        result: Any = None
        problem: str | None = None
        if self.strategy.is_main:
            try:
                result = decide()
            except UserError as error:
                problem = str(error)
        result, problem = self.strategy.broadcast_object((result, problem))
        if problem is not None:
            raise UserError(problem)
        return result

    def facts(self) -> dict[str, Any]:
        """What runs, in numbers: the start line, W&B's config (``lowbit``) and the start record
        of metrics.jsonl say the same."""
        cfg, strategy, batches = self.cfg, self.strategy, self.parts.train_batches
        total, trained = strategy.count_parameters(self.parts.model)
        student = strategy.unwrap(self.parts.model)
        quantized = sum(  # weights with a weight quantizer, and those of a 4-bit base
            full_numel(module.weight) if getattr(module, "weight_quantizer", None) is not None
            else module.in_features * module.out_features if hasattr(module, "packed") else 0
            for module in student.modules()
        )  # fmt: skip
        streaming = isinstance(batches, StreamBatches)
        sequences = None if streaming else len(batches.examples)
        return {
            "model": cfg.model.path or ("teacher layers" if cfg.model.init_from_teacher else "random (model.config)"),
            "engine": strategy.engine, "world_size": strategy.world_size, "device": strategy.device.type,
            "global_batch_size": batches.global_batch_size, "micro_batch_size": batches.micro_batch_size,
            "grad_accum_steps": batches.grad_accum_steps, "tokens_per_step": batches.global_batch_size * cfg.data.seq_len,
            "parameters": total, "trained_parameters": trained, "quantized_parameters": quantized,
            "train_sequences": sequences, "val_sequences": len(self.parts.val) if self.parts.val is not None else 0,
            "epochs": None if sequences is None else cfg.train.max_steps * batches.global_batch_size / max(1, sequences),
            "data_sources": self.parts.data_shares, "data_counts": self.parts.data_counts,
            "run_dir": str(self.run_dir),
            "wandb_dir": str(self.run_dir / "wandb") if cfg.log.wandb.mode != "disabled" else None,
        }  # fmt: skip

    def describe(self) -> str:
        """One line on what runs: engine, ranks, global batch, parameters, data, directories."""
        f = self.run_facts
        return (
            f"engine {f['engine']} on {f['world_size']} rank(s) ({f['device']}) | global batch "
            f"{f['global_batch_size']} = {f['micro_batch_size']} micro × {f['grad_accum_steps']} accum × "
            f"{f['world_size']} ranks ({f['tokens_per_step']:,} tokens) | {f['parameters'] / 1e6:.2f}M parameters, "
            f"{f['trained_parameters'] / 1e6:.2f}M trained, {f['quantized_parameters'] / 1e6:.2f}M quantized | "
            + (
                f"{f['train_sequences']:,} training"
                if f["train_sequences"] is not None
                else "streamed training"
            )
            + f" / {f['val_sequences']:,} validation sequences, {self.cfg.train.max_steps} steps"
            + (f" = {f['epochs']:.2f} epochs" if f["epochs"] is not None else "")
            + f" | model {f['model']} | run dir {self.run_dir}"
            + (f" | W&B {f['wandb_dir']}" if f["wandb_dir"] else "")
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
        metrics.update(parts.train_batches.step_metrics())
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
            data_state=parts.train_batches.state(self.step),
            global_batch_size=parts.train_batches.global_batch_size,
            world_size=strategy.world_size,
            scheduler=strategy.scheduler.state_dict() if strategy.scheduler is not None else {},
            engine=strategy.engine,
            layout=strategy.checkpoint_layout,
            frozen_base=parts.frozen_base,
            quant_grids=quant_grids(parts.model),
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
        self.metrics.start(max_steps, self.step, self.run_facts)
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
                    for hook in parts.hooks:
                        metrics.update(hook.train_metrics(self))
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

    def close(self, finished: bool = False) -> None:
        """Release the engine; ``finished``: training ended normally on every rank (see ``teardown``)."""
        self.strategy.teardown(finished)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Build, train and tear down: what ``lowbit train`` runs in each process."""
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    except BaseException:
        trainer.close()
        raise
    trainer.close(finished=True)
    return result
