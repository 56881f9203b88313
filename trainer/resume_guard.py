"""What a relaunch may change about a run, decided before anything is built.

A checkpoint stores the resolved config that wrote it. Resuming it under a config that trains
something else — another model, other quant rules, other loss terms, other data — would silently
mix two runs (or crash mid-load with size mismatches), so that is refused with the differences
listed. Optimizer and schedule values may change on purpose (a lower learning rate, a longer run):
they are reported and take effect (``checkpoint.restore`` re-applies them over the checkpoint's).
Everything else (engine, batch layout, logging, evaluation, checkpointing, export) is free.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lowbit.trainer.config import RunConfig, config_dict
from lowbit.trainer.errors import UserError

logger = logging.getLogger("lowbit")

# What the run trains: a change refuses to resume. Keys under these, except the free ones below.
# (train.optimizer: another implementation's state does not load into this one.)
TRAINS = ("model", "teacher", "quant", "lora", "loss", "loss_balance", "data", "train.optimizer")
# Under TRAINS, but only about memory, loading or evaluation: free.
FREE = (
    "model.gradient_checkpointing",
    "model.trust_remote_code",
    "teacher.trust_remote_code",
    "teacher.cache",  # the teacher's own logits, read back (the cache checks it matches)
    "data.max_val_examples",
    "data.cache_dir",  # where tokenized rows are kept, not what they are
    "quant.baselines",
)
# How it is optimised: a change is reported and applied.
TUNES = tuple(
    f"train.{key}"
    for key in ("lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "betas", "eps",
                "max_grad_norm", "precision", "seed", "max_steps")
)  # fmt: skip
ABSENT = "(not set)"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for a nested dict; lists and scalars are leaves, a None section one key."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs between two resolved configs (a section present on one
    side only shows as its own key or its sub-keys, against ``(not set)``)."""
    old, new = flatten(before), flatten(after)
    keys = sorted(set(old) | set(new))
    return {
        key: (old.get(key, ABSENT), new.get(key, ABSENT))
        for key in keys
        if old.get(key, ABSENT) != new.get(key, ABSENT)
    }


def _under(key: str, sections: tuple[str, ...]) -> bool:
    return any(key == section or key.startswith(section + ".") for section in sections)


def quant_rules_changed(checkpoint: Path, cfg: RunConfig) -> bool:
    """Whether ``cfg``'s ``quant`` section differs from the one ``checkpoint`` was trained with."""
    stored = checkpoint / "config.yaml"
    if not stored.is_file():
        return False
    before = OmegaConf.to_container(OmegaConf.load(stored))
    return any(_under(key, ("quant",)) for key in differences(before, config_dict(cfg)))  # type: ignore[arg-type]


def rules_changed_on_purpose(checkpoint: Path, cfg: RunConfig) -> bool:
    """``checkpoint.allow_config_change`` with quant rules that differ from ``checkpoint``'s: grids
    that differ from the trained ones then warn instead of stopping (``check_quant_grids``)."""
    return cfg.checkpoint.allow_config_change and quant_rules_changed(checkpoint, cfg)


def check_config_drift(checkpoint: Path, cfg: RunConfig) -> None:
    """Refuse (``UserError``) to resume ``checkpoint`` under a ``cfg`` that trains something else;
    log what changes in how it is optimised. ``checkpoint.allow_config_change`` turns the refusal
    into a warning."""
    stored = checkpoint / "config.yaml"
    if not stored.is_file():
        raise UserError(f"checkpoint {checkpoint} has no config.yaml: it cannot be checked against this run")
    before = OmegaConf.to_container(OmegaConf.load(stored))
    changed = differences(before, config_dict(cfg))  # type: ignore[arg-type]
    trains = {k: v for k, v in changed.items() if _under(k, TRAINS) and not _under(k, FREE)}
    tunes = {k: v for k, v in changed.items() if _under(k, TUNES)}
    if trains and not cfg.checkpoint.allow_config_change:
        raise UserError(
            f"run.output_dir {cfg.run.output_dir} holds {checkpoint.name} of a run that trains something else "
            f"than this config:\n{_listing(trains)}\nResuming would mix two runs. Start this config in another "
            "run.output_dir (or give the old values back to continue the old run); to resume anyway, set "
            "checkpoint.allow_config_change=true"
        )
    if trains:
        logger.warning(
            "resuming %s with a changed config (checkpoint.allow_config_change):\n%s",
            checkpoint.name,
            _listing(trains),
        )
    if tunes:
        logger.warning(
            "resuming %s with new optimisation values, which apply from the next step (the schedule is "
            "re-evaluated at the current step):\n%s", checkpoint.name, _listing(tunes),
        )  # fmt: skip


def _listing(changed: dict[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changed.items())


def _show(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."
