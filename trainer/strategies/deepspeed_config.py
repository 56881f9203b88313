"""The DeepSpeed JSON, generated from lowbit's config, and a user's JSON merged over it.

lowbit owns the values that define the run — batch sizes, precision, clipping, ZeRO stage and
offload, the optimizer and schedule — so they are consistent by construction. A user JSON may add
or tune anything else (bucket sizes, overlap, communication dtypes...). Where it sets a value
lowbit owns to something else, that is an error naming both, never a silent choice of one;
``"auto"`` (the Hugging Face convention) means "take lowbit's".
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lowbit.trainer.config import DeepSpeedConfig, TrainConfig
from lowbit.trainer.errors import UserError

# DeepSpeed key (dotted) -> the lowbit setting it comes from
OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps (or train.global_batch_size)",
    "train_batch_size": "train.micro_batch_size × grad_accum_steps × ranks",
    "gradient_clipping": "train.max_grad_norm",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "strategy.deepspeed.stage",
    "zero_optimization.offload_optimizer.device": "strategy.deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "strategy.deepspeed.offload_param",
    "managed_gradient_accumulation": "lowbit's loop (it marks the accumulation boundary itself)",
}
# DeepSpeed sections lowbit refuses, with the reason
REFUSED = {
    "optimizer": "lowbit builds AdamW from train.lr, train.betas, train.eps and train.weight_decay",
    "scheduler": "lowbit's schedule comes from train.schedule, train.warmup_steps and train.min_lr_ratio",
}


def generated_config(
    train: TrainConfig, options: DeepSpeedConfig, world_size: int, hidden_size: int
) -> dict[str, Any]:
    """DeepSpeed's JSON for this run (``train.grad_accum_steps`` already resolved).

    Communication buckets are sized from the model's width as the Hugging Face integration does
    (``hidden²`` elements; ZeRO-3 prefetch ``0.9·hidden²``, parameters under ``10·hidden``
    elements kept whole): DeepSpeed's fixed defaults (5e8 elements, 2 GB in fp32) dwarf every
    other buffer of a model under a few billion parameters.
    """
    bucket = hidden_size * hidden_size
    zero: dict[str, Any] = {
        "stage": options.stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if options.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * bucket), stage3_param_persistence_threshold=10 * hidden_size
        )
    if options.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": options.offload_optimizer}
    if options.offload_param != "none":
        zero["offload_param"] = {"device": options.offload_param}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        # train.precision bf16 is lowbit's own autocast around the forward, over fp32 weights, as
        # under every other engine: DeepSpeed's bf16 mode would cast the weights themselves (fake
        # quant would then run on bf16 weights under this engine only).
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # lowbit's loop calls backward per micro-batch and step once per optimizer step.
        "managed_gradient_accumulation": False,
        # The optimizer is torch's AdamW, which ZeRO shards like its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value != "auto":
            merged[key] = value
    return merged


def merge_user_config(generated: dict[str, Any], user: dict[str, Any], source: str) -> dict[str, Any]:
    """``user`` merged over ``generated``; a contradiction of an owned value is an error."""
    for section, reason in REFUSED.items():
        if section in user:
            raise UserError(f"{source}: remove the {section!r} section: {reason}")
    for key, setting in OWNED.items():
        theirs, ours = _get(user, key), _get(generated, key)
        if theirs is None or theirs == "auto":
            continue
        if ours is None and key.endswith(".device") and theirs == "none":
            continue
        if theirs != ours:
            fix = f"remove {key} from the JSON (lowbit sets it) or change {setting} to match"
            if key in ("bf16.enabled", "fp16.enabled"):  # no setting of lowbit's turns these on
                fix = (f"remove {key.split('.')[0]} from the JSON: train.precision=bf16 is lowbit's autocast over "
                       "fp32 weights on every engine, DeepSpeed included")  # fmt: skip
            raise UserError(
                f"{source} sets {key} = {json.dumps(theirs)}, but lowbit's {setting} gives {json.dumps(ours)}: {fix}"
            )
    return _merge(generated, user)


def deepspeed_config(
    train: TrainConfig, options: DeepSpeedConfig, world_size: int, hidden_size: int
) -> dict[str, Any]:
    """The JSON handed to ``deepspeed.initialize``: generated, with ``options.config`` merged over it."""
    generated = generated_config(train, options, world_size, hidden_size)
    if options.config is None:
        return generated
    path = Path(options.config)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"strategy.deepspeed.config {path}: cannot read it as JSON ({error})") from None
    if not isinstance(user, dict):
        raise UserError(f"strategy.deepspeed.config {path}: a DeepSpeed config is a JSON object")
    return merge_user_config(generated, user, f"strategy.deepspeed.config {path}")
