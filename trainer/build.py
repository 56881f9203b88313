"""Build everything a run needs from a ``RunConfig``: strategy, model, data, objective, optimizer.

Kept apart from the loop so that ``lowbit eval`` and tests can build the same pieces.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.losses import ModelShapes, Objective, build_objective
from lowbit.losses.kd_terms import TopKTerm
from lowbit.trainer.config import RunConfig, resolve_epochs
from lowbit.trainer.data import Examples, Mixture, RowSet, StepBatches, StreamBatches, TrainData, load_data
from lowbit.trainer.errors import UserError
from lowbit.trainer.hooks import StepHook, build_hooks
from lowbit.trainer.lora import frozen_fingerprint
from lowbit.trainer.loss_step import LossStep
from lowbit.trainer.model import build_model, build_tokenizer, resolve_model_dir
from lowbit.trainer.strategies import Strategy
from lowbit.trainer.strategies.base import frozen_names
from lowbit.trainer.teacher import Teacher, align_vocab, build_teacher, student_from_teacher
from lowbit.trainer.teacher_cache import TeacherCache, fingerprint, load_cache, topk_settings
from lowbit.trainer.transforms import apply_transforms


def import_plugins(imports: list[str]) -> None:
    """Import user modules (dotted names or .py paths) so their registry entries exist."""
    for name in imports:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise UserError(f"imports: {name} does not exist")
                module_name = f"lowbit_plugin_{path.stem}"
                if module_name in sys.modules:  # already imported (an earlier run in this process)
                    continue
                spec = importlib.util.spec_from_file_location(module_name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as error:
            raise UserError(f"imports: cannot import {name!r} ({error})") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class ModelAndData:
    tokenizer: object
    model: nn.Module
    data: TrainData
    teacher: Teacher | None = None
    teacher_cache: TeacherCache | None = None


def _resolve_on_rank0_first(source, strategy: Strategy):
    """Resolve a model source; a GGUF is converted once, by rank 0, before the others read the cache."""
    if source is None:
        return None
    model_dir = resolve_model_dir(source) if strategy.is_main else None
    strategy.barrier()
    return model_dir if strategy.is_main else resolve_model_dir(source)


def build_model_and_data(
    cfg: RunConfig, strategy: Strategy, with_teacher: bool = True, use_cache: bool = True
) -> ModelAndData:
    """Tokenizer, the unwrapped student (on CPU; on the meta device where the engine has rank 0
    read the weights for everyone), the frozen teacher (placed by the engine) or its offline top-k
    cache, and the tokenized splits."""
    from_teacher = cfg.model.init_from_teacher is not None
    cached = use_cache and cfg.teacher is not None and cfg.teacher.cache is not None
    run_teacher = with_teacher and cfg.teacher is not None and not cached
    teacher_dir = _resolve_on_rank0_first(cfg.teacher if (run_teacher or from_teacher) else None, strategy)
    model_dir = _resolve_on_rank0_first(cfg.model, strategy)
    if from_teacher and not cfg.model.tokenizer:  # a student made of teacher layers speaks its tokens
        tokenizer = build_tokenizer(cfg.teacher, teacher_dir)
    else:
        tokenizer = build_tokenizer(cfg.model, model_dir)
    teacher = None
    if cfg.teacher is not None and (run_teacher or from_teacher):
        teacher = build_teacher(cfg.teacher, teacher_dir, tokenizer, cfg.train.seed, strategy.device)
    if from_teacher:
        assert teacher is not None and cfg.model.init_from_teacher is not None
        model = student_from_teacher(teacher.model, list(cfg.model.init_from_teacher), cfg.model)
    else:
        meta = not strategy.loads_weights
        model = build_model(cfg.model, model_dir, cfg.train.seed, len(tokenizer), meta=meta)
    if teacher is not None:
        align_vocab(teacher, model, trim=cfg.teacher.trim_vocab)
        if run_teacher:
            strategy.place_frozen(teacher.model)
        else:
            teacher = None
    check_positions(cfg, model)
    data = load_data(cfg.data, tokenizer, cfg.train.seed, show=strategy.is_main)
    cache = None
    if cached and with_teacher:
        assert cfg.teacher is not None and cfg.teacher.cache is not None and data.rows is not None
        k, temperature = topk_settings(cfg)
        cache = load_cache(Path(cfg.teacher.cache), fingerprint(data.rows, tokenizer, k, temperature))
    return ModelAndData(tokenizer, model, data, teacher, cache)


def data_counts(data: TrainData) -> dict[str, int] | None:
    """Totals over the training stores (cached data; None for a stream, which counts as it reads)."""
    if data.rows is None:
        return None
    parts = data.rows.parts if isinstance(data.rows, Mixture) else [data.rows]
    stores = {store.directory: store for part in parts for store in part.stores}.values()
    totals: dict[str, int] = {}
    for store in stores:
        meta = store.meta
        counts = {**meta["counts"], "tokens": meta["tokens"], "padding_tokens": meta["padding_tokens"]}
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + int(value)
    return totals


def check_positions(cfg: RunConfig, model: nn.Module) -> None:
    """``data.seq_len`` must fit the model's positions (beyond them RoPE extrapolates untrained)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.data.seq_len > limit:
        raise UserError(
            f"data.seq_len={cfg.data.seq_len} is longer than the model's max_position_embeddings ({limit}): "
            f"set data.seq_len to at most {limit}"
        )


def check_teacher_inputs(objective: Objective, built: ModelAndData) -> None:
    """Every term that reads the teacher must get what it reads: the live teacher, or a top-k cache."""
    readers = [
        name
        for name, term in zip(objective.names, objective.terms)
        if any(n.startswith("teacher") for n in term.needs)
    ]
    if not readers:
        return
    if built.teacher_cache is not None:
        full = [
            name
            for name, term in zip(objective.names, objective.terms)
            if name in readers and not isinstance(term, TopKTerm)
        ]
        if full:
            raise UserError(
                f"loss term(s) {', '.join(full)} need the teacher's full outputs, but teacher.cache holds only its "
                "top-k logits: use kd_topk, or drop teacher.cache to run the teacher"
            )
    elif built.teacher is None:
        raise UserError(
            f"loss term(s) {', '.join(readers)} read a teacher's outputs, but no teacher is configured: set teacher.path"
        )


@dataclass
class Components:
    """The built pieces of a training run (optimizer and schedule belong to the strategy)."""

    strategy: Strategy
    tokenizer: object
    model: nn.Module  # wrapped by the strategy
    objective: Objective
    loss_step: LossStep
    train_batches: StepBatches | StreamBatches
    val: RowSet | Examples | None
    hooks: list[StepHook]
    teacher: Teacher | None = None
    teacher_cache: TeacherCache | None = None
    frozen_base: str | None = None
    """Fingerprint of the student's frozen parameters (a LoRA base), None when all of it trains."""
    data_shares: dict[str, float] | None = None
    """Each training source's share of the rows (one source: 1.0)."""
    data_counts: dict[str, int] | None = None
    """What the cached training data holds: documents, examples, truncated, dropped, tokens, padding."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self.strategy.optimizer is not None
        return self.strategy.optimizer


def model_shapes(student: nn.Module, teacher: Teacher | None) -> ModelShapes:
    """Widths and depths that loss terms with parameters (projections) or layer maps check against."""
    shapes = ModelShapes(student.config.hidden_size, student.config.num_hidden_layers)
    if teacher is not None:
        shapes.teacher_hidden_size = teacher.model.config.hidden_size
        shapes.teacher_layers = teacher.model.config.num_hidden_layers
    return shapes


def build_components(cfg: RunConfig, strategy: Strategy) -> Components:
    """Everything a run needs, in order: the model and its transforms, the objective, the engine."""
    import_plugins(cfg.imports)
    seed_everything(cfg.train.seed)
    try:
        objective = build_objective(cfg.loss)
        hooks = build_hooks(cfg.hooks)
    except (ValueError, TypeError) as error:  # bad term/hook names or fields from the config
        raise UserError(f"loss/hooks: {error}") from None
    built = build_model_and_data(cfg, strategy)
    # Transforms act on the unwrapped model, before the engine shards it or builds the optimizer.
    transformed = apply_transforms(built.model, cfg, announce=strategy.is_main)
    hooks = transformed.hooks + hooks
    if cfg.log.term_grad_norms_every or cfg.loss_balance is not None:
        from lowbit.trainer.term_gradients import TermGradients

        hooks.append(TermGradients(cfg))
    frozen_base = None
    if frozen_names(built.model):  # rank 0 holds the weights under every engine; it speaks for all
        frozen_base = strategy.broadcast_object(frozen_fingerprint(built.model) if strategy.is_main else None)
    check_teacher_inputs(objective, built)
    try:
        objective.configure(model_shapes(built.model, built.teacher))
    except ValueError as error:
        raise UserError(f"loss: {error}") from None
    batches = built.data.batches(
        cfg.train.micro_batch_size, cfg.train.grad_accum_steps, strategy.world_size, strategy.rank,
        cfg.train.seed,
    )  # fmt: skip
    if built.data.rows is not None:  # the schedule is built with the optimizer: steps first
        resolve_epochs(cfg, len(built.data.rows), batches.global_batch_size)
    model = strategy.prepare(built.model, objective, unused_parameters=transformed.unused_parameters)
    loss_step = LossStep(
        objective, built.teacher, built.teacher_cache, strategy.unwrap, strategy.device,
        cfg.train.precision, cfg.train.fused_head_chunk, strategy.gathers_in_module_forward,
        strategy.max_over_ranks if strategy.collective_head_calls else None,
    )  # fmt: skip
    # Different ranks draw different dropout masks; model init above used the shared seed.
    seed_everything(cfg.train.seed + strategy.rank)
    return Components(
        strategy, built.tokenizer, model, objective, loss_step, batches, built.data.val, hooks,
        built.teacher, built.teacher_cache, frozen_base, built.data.shares, data_counts(built.data),
    )  # fmt: skip
