"""Engines behind one boundary: a ``Strategy`` owns placement, the step and the state.

``single`` (one process), ``ddp`` (replicas), ``fsdp2`` (``fully_shard``: parameters, gradients
and optimizer state sharded) and ``deepspeed`` (ZeRO 1–3). The loop calls only ``Strategy``'s
methods, so it never branches on which engine runs; the engine modules import their libraries
lazily, so ``import lowbit.trainer`` never pulls in DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import importlib

from lowbit.trainer.config import StrategyConfig, TrainConfig, resolve_global_batch
from lowbit.trainer.errors import UserError
from lowbit.trainer.strategies.base import Strategy, TrainedModules, launched_world_size
from lowbit.trainer.strategies.launchers import launcher_engine, with_launcher_options

# name -> module under lowbit.trainer.strategies that defines the class ``STRATEGY``
ENGINES = {"single": "base", "ddp": "ddp", "fsdp2": "fsdp2", "deepspeed": "deepspeed"}
# checkpoint layout -> module whose ``read_weights(checkpoint, model)`` loads the student's weights
# into a plain model in one process, reassembling shards (what eval and export read)
LAYOUT_READERS = {"safetensors": "base", "dcp": "fsdp2", "deepspeed": "deepspeed"}


def read_weights(layout: str, checkpoint, model) -> None:
    """Load the student's weights of a checkpoint of ``layout`` into ``model`` (one process)."""
    if layout not in LAYOUT_READERS:
        raise UserError(f"checkpoint {checkpoint}: unknown layout {layout!r} (written by a newer lowbit?)")
    importlib.import_module(f"lowbit.trainer.strategies.{LAYOUT_READERS[layout]}").read_weights(
        checkpoint, model
    )


def resolve_name(cfg: StrategyConfig) -> str:
    """The engine to run: the configured one, or for ``auto`` the launcher's, ddp or single."""
    launched = launcher_engine()
    if cfg.name == "auto":
        if launched is not None:
            return launched
        return "ddp" if launched_world_size() > 1 else "single"
    if launched is not None and launched != cfg.name:
        raise UserError(
            f"strategy.name is {cfg.name}, but the accelerate config this job was launched with asks for "
            f"{launched}: set strategy.name={launched} (or auto), or launch with an accelerate config for {cfg.name}"
        )
    return cfg.name


def build_strategy(cfg: StrategyConfig, train: TrainConfig | None = None) -> Strategy:
    """The configured engine, checked against how the job was launched."""
    name = resolve_name(cfg)
    if name not in ENGINES:
        raise UserError(f"strategy.name: unknown engine {name!r}; choose one of auto, {', '.join(ENGINES)}")
    for engine in ("fsdp2", "deepspeed"):
        if getattr(cfg, engine) is not None and name != engine:
            raise UserError(
                f"strategy.{engine} is set but the engine is {name}: its options apply only to {engine}; "
                f"set strategy.name={engine} or drop strategy.{engine}"
            )
    if cfg.teacher == "sharded" and name in ("single", "ddp"):
        raise UserError(
            f"strategy.teacher=sharded needs an engine that shards (fsdp2 or deepspeed), and this job runs {name}: "
            "set strategy.name=fsdp2 (or deepspeed), or strategy.teacher=replicated"
        )
    if name == "single" and launched_world_size() > 1:
        raise UserError(
            "strategy single was launched with several processes; use ddp, fsdp2, deepspeed (or auto)"
        )
    train = train or TrainConfig()
    resolve_global_batch(train, launched_world_size() if name != "single" else 1)
    cfg = with_launcher_options(cfg, train, name)
    module = importlib.import_module(f"lowbit.trainer.strategies.{ENGINES[name]}")
    return module.STRATEGY(cfg, train)


def inference_strategy(cfg: StrategyConfig, train: TrainConfig | None = None) -> Strategy:
    """For evaluation and teacher caching: whole models, data-parallel over the launched
    processes (ddp) or one process — whatever engine trained the model (its checkpoint is read
    into a plain model, reassembled if sharded)."""
    name = "ddp" if launched_world_size() > 1 else "single"
    plain = dataclasses.replace(cfg, name=name, fsdp2=None, deepspeed=None, teacher="replicated")
    module = importlib.import_module(f"lowbit.trainer.strategies.{ENGINES[name]}")
    return module.STRATEGY(plain, train or TrainConfig())


__all__ = [
    "ENGINES",
    "Strategy",
    "TrainedModules",
    "build_strategy",
    "inference_strategy",
    "launched_world_size",
    "resolve_name",
]
