"""What a launcher asked for: ``accelerate launch`` configs name an engine and some of its options.

torchrun, ``deepspeed`` and ``accelerate launch`` only start processes and set the environment
(RANK, WORLD_SIZE, ...); lowbit's config decides the engine. An accelerate config also exports
its engine choice and options (``ACCELERATE_USE_FSDP``, ``FSDP_RESHARD_AFTER_FORWARD``,
``ACCELERATE_DEEPSPEED_ZERO_STAGE``...). ``strategy.name: auto`` takes that engine; options the
run config leaves unset are taken from the launcher, and a launcher option that contradicts the
run config is an error naming both — never a silent choice of one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lowbit.trainer.config import DeepSpeedConfig, FSDP2Config, StrategyConfig, TrainConfig
from lowbit.trainer.errors import UserError


def _env_bool(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.lower() == "true"


def launcher_engine() -> str | None:
    """The engine an ``accelerate launch`` config asked for, if any."""
    if _env_bool("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_bool("ACCELERATE_USE_FSDP"):
        return "fsdp2"
    return None


def _fsdp2_from_env() -> dict[str, Any]:
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(
            f"the accelerate config launches FSDP version {version}; lowbit's fsdp2 engine is FSDP2 "
            "(fully_shard): set `fsdp_version: 2` in its fsdp_config"
        )
    found: dict[str, Any] = {}
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD")
    if reshard is not None:
        found["reshard_after_forward"] = reshard.lower() == "true" if not reshard.isdigit() else int(reshard)
    offload = _env_bool("FSDP_OFFLOAD_PARAMS")
    if offload is not None:
        found["cpu_offload"] = offload
    return found


def _deepspeed_from_env() -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "ACCELERATE_DEEPSPEED_ZERO_STAGE" in os.environ:
        found["stage"] = int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    for key, env in (
        ("offload_optimizer", "OFFLOAD_OPTIMIZER_DEVICE"),
        ("offload_param", "OFFLOAD_PARAM_DEVICE"),
    ):
        if f"ACCELERATE_DEEPSPEED_{env}" in os.environ:
            found[key] = os.environ[f"ACCELERATE_DEEPSPEED_{env}"]
    if "ACCELERATE_DEEPSPEED_CONFIG_FILE" in os.environ:
        found["config"] = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    return found


def _check_train(train: TrainConfig) -> None:
    """Batch, clipping and precision an accelerate config states must be the run's."""
    checks = [
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", train.grad_accum_steps, "train.grad_accum_steps", int),
        ("ACCELERATE_GRADIENT_CLIPPING", train.max_grad_norm, "train.max_grad_norm", float),
    ]
    for env, ours, key, kind in checks:
        if env in os.environ and kind(os.environ[env]) != ours:
            raise UserError(
                f"the accelerate config sets {env.removeprefix('ACCELERATE_').lower()}={os.environ[env]} but "
                f"{key} is {ours}: make them equal (lowbit's value is what runs)"
            )
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("bf16", "fp16") and precision != train.precision:
        raise UserError(
            f"the accelerate config sets mixed_precision={precision} but train.precision is {train.precision}: "
            "set train.precision=bf16 (lowbit trains fp32 or bf16), or mixed_precision: 'no'"
        )


def with_launcher_options(cfg: StrategyConfig, train: TrainConfig, engine: str) -> StrategyConfig:
    """``cfg`` with the options an accelerate config set for ``engine`` where ``cfg`` leaves them at
    their defaults (an unset section is all defaults); a value set in both that differs is an
    error naming both. The adopted options are checked as the run config's own are."""
    if launcher_engine() != engine:
        return cfg
    _check_train(train)
    found = _fsdp2_from_env() if engine == "fsdp2" else _deepspeed_from_env()
    default = FSDP2Config() if engine == "fsdp2" else DeepSpeedConfig()
    section = getattr(cfg, engine) or default
    merged = {}
    for key, value in found.items():
        ours = getattr(section, key)
        if ours != getattr(default, key) and ours != value:
            raise UserError(
                f"the accelerate config sets {key}={value} for {engine} but strategy.{engine}.{key} is {ours}: "
                f"make them equal, or drop one of them"
            )
        merged[key] = value
    adopted = dataclasses.replace(section, **merged)
    if isinstance(adopted, DeepSpeedConfig):
        _check_deepspeed(adopted)
    return dataclasses.replace(cfg, **{engine: adopted})


def _check_deepspeed(options: DeepSpeedConfig) -> None:
    for key in ("offload_optimizer", "offload_param"):
        if getattr(options, key) not in ("none", "cpu"):
            raise UserError(
                f"the accelerate config sets {key}_device={getattr(options, key)}: lowbit offloads to none or cpu "
                "(NVMe offload: put it in a DeepSpeed JSON, strategy.deepspeed.config)"
            )
    if options.stage not in (1, 2, 3):
        raise UserError(
            f"the accelerate config sets zero_stage={options.stage}: lowbit runs ZeRO stage 1, 2 or 3"
        )
    if options.offload_param != "none" and options.stage != 3:
        raise UserError(
            f"the accelerate config offloads parameters (offload_param_device={options.offload_param}) with ZeRO stage "
            f"{options.stage}: parameters are only partitioned at stage 3; set zero_stage: 3 or offload_param_device: none"
        )
