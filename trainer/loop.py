"""The one training loop every method runs through.

QAT, distillation, QLoRA and BitNet change what is *built* (modules, loss terms, hooks), never
this loop. A step: fetch this rank's micro-batches, count the step's valid tokens across ranks,
forward/backward each micro-batch (gradient sync only on the last), clip, step, log, evaluate,
checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.losses import LossInputs, count_target_tokens
from lowbit.losses.fused_head import HeadInputs
from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.build import Components, build_components
from lowbit.trainer.capture import capture_qkv, head_as_identity
from lowbit.trainer.config import RunConfig, config_dict, to_yaml
from lowbit.trainer.errors import UserError
from lowbit.trainer.evaluate import autocast, evaluate
from lowbit.trainer.loggers import MetricsLogger, setup_console_logging
from lowbit.trainer.quantization import load_or_measure_baselines, quantizers_enabled, recovered
from lowbit.trainer.strategies import Strategy, build_strategy

logger = logging.getLogger("lowbit")


def resolve_resume(cfg: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, per ``checkpoint.resume`` (auto | never | a path)."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        if ckpt.checkpoint_dirs(run_dir):
            raise UserError(
                f"run.output_dir {run_dir} already holds checkpoints of an earlier run; set "
                "checkpoint.resume=auto to continue it, or choose another run.output_dir"
            )
        return None
    if mode == "auto":
        return ckpt.latest_valid_checkpoint(run_dir)
    path = Path(mode)
    problem = ckpt.verify(path) if path.is_dir() else "no such directory"
    if problem is not None:
        raise UserError(f"checkpoint.resume {path}: cannot resume from it: {problem}")
    return path


class Trainer:
    """Runs ``cfg`` to ``train.max_steps``, resuming from the run dir's newest checkpoint."""

    def __init__(self, cfg: RunConfig, strategy: Strategy | None = None) -> None:
        self.cfg = cfg
        self.strategy = strategy or build_strategy(cfg.strategy)
        setup_console_logging(self.strategy.is_main)
        self.run_dir = Path(cfg.run.output_dir)
        self.config_yaml = to_yaml(cfg)
        resume_from = resolve_resume(cfg, self.run_dir)
        self.strategy.barrier()  # nobody writes to the run dir before every rank has looked at it
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
        self.parts: Components = build_components(cfg, self.strategy)
        self.step = 0
        if resume_from is not None:
            state = ckpt.load_checkpoint(
                resume_from,
                self.strategy.unwrap(self.parts.model),
                self.parts.optimizer,
                self.strategy.rank,
                self.parts.objective,
            )
            self.parts.scheduler.load_state_dict(state.scheduler)
            self.step = state.step
            if state.global_batch_size != self.parts.train_batches.global_batch_size:
                logger.warning(
                    "the global batch changed since the checkpoint (%d -> %d): data order differs from an uninterrupted run",
                    state.global_batch_size,
                    self.parts.train_batches.global_batch_size,
                )
            logger.info("resumed from %s at step %d", resume_from, self.step)
        run_name = cfg.run.name or self.run_dir.name
        self.metrics = MetricsLogger(cfg.log, self.run_dir, run_name, config_dict(cfg), self.strategy.is_main)
        self.last_eval: dict[str, float] = {}
        self.baselines: dict[str, float] = {}

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
        needs = parts.objective.needs
        fused = self.cfg.train.fused_head_chunk > 0
        for index, batch in enumerate(micro_batches):
            batch = {k: v.to(strategy.device) for k, v in batch.items()}
            with strategy.no_sync(parts.model, sync=index == len(micro_batches) - 1):
                unwrapped = strategy.unwrap(parts.model)
                with (
                    autocast(strategy.device, self.cfg.train.precision),
                    capture_qkv(unwrapped, parts.objective.qkv_layers("student")) as qkv,
                    head_as_identity(unwrapped) if fused else contextlib.nullcontext() as student_head,
                ):
                    outputs = parts.model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        output_hidden_states="student_hidden" in needs,
                    )
                inputs, head = self._loss_inputs(batch, outputs, needs, student_head)
                inputs.student_qkv = qkv if "student_qkv" in needs else None
                # The fused head applies the lm_head inside the loss: under the forward's autocast.
                with (
                    autocast(strategy.device, self.cfg.train.precision) if fused else contextlib.nullcontext()
                ):
                    loss, terms = parts.objective(inputs, target_tokens, head)
                # DDP averages gradients over ranks; the loss is already a global mean, so undo that.
                (loss * strategy.world_size).backward()
            loss_total += loss.detach().double().cpu()
            for name, value in terms.items():
                part_totals[name] = part_totals.get(name, 0) + value.double().cpu()
        strategy.all_reduce_gradients(parts.objective)  # a loss term's own parameters are not in DDP
        grad_norm = None
        if self.cfg.train.max_grad_norm > 0:
            trainable = [*parts.model.parameters(), *parts.objective.parameters()]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.train.max_grad_norm)
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.optimizer.step()
        parts.scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
        names = list(part_totals)
        reduced = strategy.all_reduce_sum(torch.stack([loss_total, *[part_totals[n] for n in names]]))
        elapsed = time.perf_counter() - started
        metrics: dict[str, Any] = {"loss": reduced[0].item(), "lr": lr}
        if len(names) > 1:
            metrics.update(
                {f"loss/{n}": (reduced[i + 1] / target_tokens).item() for i, n in enumerate(names)}
            )
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update(tokens=int(input_tokens), tokens_per_s=input_tokens / elapsed, step_time_s=elapsed)
        return metrics

    def _loss_inputs(
        self, batch: dict[str, torch.Tensor], outputs, needs, student_head: nn.Module | None
    ) -> tuple[LossInputs, HeadInputs | None]:
        """What the loss terms read; the teacher runs only when a term asks for its outputs.

        With the fused head (``student_head`` given) ``outputs.logits`` hold final hidden states
        and the logit terms get them, with the heads, as ``HeadInputs`` instead of logits.
        """
        inputs = LossInputs(labels=batch["labels"], student_logits=None if student_head else outputs.logits)
        head = None
        if student_head is not None:
            head = HeadInputs(outputs.logits, student_head, chunk_size=self.cfg.train.fused_head_chunk)
        if "student_hidden" in needs:
            inputs.student_hidden = outputs.hidden_states
        if not any(need.startswith("teacher") for need in needs):
            return inputs, head
        if self.parts.teacher_cache is not None:  # offline teacher: its stored top-k for these examples
            inputs.teacher_topk = self.parts.teacher_cache.lookup(batch["index"].cpu(), self.strategy.device)
            return inputs, head
        teacher = self.parts.teacher
        assert teacher is not None  # checked when the objective was built
        with (
            autocast(self.strategy.device, self.cfg.train.precision),
            capture_qkv(teacher.model, self.parts.objective.qkv_layers("teacher")) as teacher_qkv,
            head_as_identity(teacher.model) if head else contextlib.nullcontext() as teacher_head,
        ):
            teacher_outputs = teacher.forward(
                batch["input_ids"], batch["attention_mask"], "teacher_hidden" in needs
            )
        inputs.teacher_hidden = teacher_outputs.hidden_states
        inputs.teacher_qkv = teacher_qkv if "teacher_qkv" in needs else None
        if head is not None:
            head.teacher_hidden, head.teacher_head = teacher_outputs.logits, teacher_head
            return inputs, head
        inputs.teacher_logits = teacher_outputs.logits
        if teacher.shared_vocab is not None:  # heads that differ only in padding rows
            inputs.student_logits = inputs.student_logits[..., : teacher.shared_vocab]
            inputs.teacher_logits = inputs.teacher_logits[..., : teacher.shared_vocab]
        return inputs, head

    def _evaluate(self, quantized: bool | None = None) -> dict[str, float]:
        """Validation metrics; ``quantized`` forces fake quant on/off (None: as configured)."""
        assert self.parts.val is not None
        batch_size = self.cfg.eval.batch_size or self.cfg.train.micro_batch_size
        if quantized is None:
            quantized = self.cfg.quant is not None  # a QAT model is judged as it will be deployed
        with quantizers_enabled(self.parts.model, quantized):  # a no-op for a model without quantizers
            return evaluate(
                self.parts.model, self.parts.val, batch_size, self.strategy, self.cfg.train.precision
            )

    def run_eval(self) -> dict[str, float]:
        """Evaluate on the validation split (if any) and log it at the current step."""
        if self.parts.val is None:
            return {}
        self.last_eval = self._evaluate()
        if self.baselines:
            share = recovered(self.last_eval["val_ppl"], self.baselines)
            if share is not None:
                self.last_eval["recovered"] = share
        self.metrics.log_eval(self.step, self.last_eval)
        return self.last_eval

    def save_checkpoint(self) -> None:
        strategy, parts = self.strategy, self.parts
        staging = ckpt.staging_dir(self.run_dir, self.step)
        if strategy.is_main:
            staging.mkdir(parents=True, exist_ok=True)
            for stale in staging.iterdir():
                stale.unlink()
        strategy.barrier()
        state = ckpt.TrainerState(
            step=self.step,
            data_position=parts.train_batches.position(self.step),
            global_batch_size=parts.train_batches.global_batch_size,
            world_size=strategy.world_size,
            scheduler=parts.scheduler.state_dict(),
        )
        if strategy.is_main:
            model = strategy.unwrap(parts.model)
            ckpt.write_shared_files(staging, model, parts.optimizer, state, self.config_yaml, parts.objective)
        ckpt.write_rank_files(staging, strategy.rank)
        strategy.barrier()
        if strategy.is_main:
            final = ckpt.finalize(staging, self.cfg.checkpoint.keep_last)
            logger.info("saved %s", final)
        strategy.barrier()

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``; return the last train metrics and eval results."""
        cfg, parts = self.cfg, self.parts
        max_steps = cfg.train.max_steps
        self.metrics.start(max_steps, self.step)
        for hook in parts.hooks:
            hook.on_train_start(self)
        if cfg.quant is not None and cfg.quant.baselines and parts.val is not None:
            self.baselines = load_or_measure_baselines(self, self._evaluate)
        first_eval: dict[str, float] = {}
        if cfg.eval.at_start and self.step == 0:
            first_eval = self.run_eval()
        metrics: dict[str, Any] = {}
        first_step = self.step
        parts.model.train()
        try:
            while self.step < max_steps:
                for hook in parts.hooks:
                    hook.on_step_start(self, self.step)
                metrics = self._train_step()
                self.step += 1
                self.metrics.log_train(self.step, metrics)
                last = self.step == max_steps
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0 and not last:
                    self.run_eval()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and not last:
                    self.save_checkpoint()
                for hook in parts.hooks:
                    hook.on_step_end(self, self.step, metrics)
            self.run_eval()
            if cfg.checkpoint.save_final and self.step > first_step:
                self.save_checkpoint()
            for hook in parts.hooks:
                hook.on_train_end(self)
        finally:
            self.metrics.close()
        return {"train": metrics, "eval": self.last_eval, "first_eval": first_eval, "step": self.step}

    def close(self) -> None:
        self.strategy.teardown()


def train(cfg: RunConfig) -> dict[str, Any]:
    """Build, train and tear down: what ``lowbit train`` runs in each process."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
