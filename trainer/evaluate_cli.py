"""``lowbit eval``: perplexity of a configured model, a run's newest checkpoint, or a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.build import build_model_and_data, seed_everything
from lowbit.trainer.config import load_config
from lowbit.trainer.errors import UserError
from lowbit.trainer.evaluate import evaluate
from lowbit.trainer.loggers import setup_console_logging
from lowbit.trainer.strategies import build_strategy


def resolve_target(target: Path) -> tuple[Path, Path | None]:
    """(config file, checkpoint or None) for a recipe, a run directory or a checkpoint directory."""
    if target.is_file():
        return target, None
    if not target.is_dir():
        raise UserError(
            f"{target} does not exist; give a YAML recipe, a run directory or a checkpoint directory"
        )
    if (target / ckpt.MANIFEST).is_file() or target.name.startswith(ckpt.PREFIX):
        return target / "config.yaml", target
    if not (target / "config.yaml").is_file():
        raise UserError(f"{target} is a directory without config.yaml: not a run or checkpoint directory")
    checkpoint = ckpt.latest_valid_checkpoint(target)
    if checkpoint is None:
        raise UserError(f"run directory {target} has no complete checkpoint to evaluate")
    return target / "config.yaml", checkpoint


def evaluate_target(target: Path, overrides: list[str]) -> dict[str, Any]:
    """Load the model (and weights), build its validation split, and return loss/perplexity."""
    config_file, checkpoint = resolve_target(target)
    cfg = load_config(config_file, overrides)
    strategy = build_strategy(cfg.strategy)
    setup_console_logging(strategy.is_main)
    try:
        seed_everything(cfg.train.seed)
        built = build_model_and_data(cfg, strategy)
        if built.val is None:
            raise UserError("no validation data: set data.val_files or a data.val_fraction above 0")
        if checkpoint is not None:
            ckpt.load_weights(checkpoint, built.model)
        model = strategy.wrap(built.model)
        batch_size = cfg.eval.batch_size or cfg.train.micro_batch_size
        result = evaluate(model, built.val, batch_size, strategy, cfg.train.precision)
    finally:
        strategy.teardown()
    source = str(checkpoint) if checkpoint is not None else (cfg.model.path or "random model")
    return {"source": source, **result} if strategy.is_main else {}
