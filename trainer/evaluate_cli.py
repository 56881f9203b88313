"""``lowbit eval``: perplexity of a configured model, a run's newest checkpoint, or a checkpoint.

With a ``quant`` section it reports, on the same validation data, the float model, its PTQ
(round-to-nearest with the same rules) and — for a run or checkpoint — the trained QAT model,
with ``recovered = (ppl_ptq − ppl_qat) / (ppl_ptq − ppl_float)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.build import build_model_and_data, seed_everything
from lowbit.trainer.config import RunConfig, load_config
from lowbit.trainer.errors import UserError
from lowbit.trainer.evaluate import evaluate
from lowbit.trainer.loggers import setup_console_logging
from lowbit.trainer.quantization import quantizers_enabled, recovered
from lowbit.trainer.resume_guard import rules_changed_on_purpose
from lowbit.trainer.strategies import inference_strategy
from lowbit.trainer.transforms import apply_transforms


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
        raise UserError(
            f"run directory {target} has no complete checkpoint yet (train it first, or give the recipe)"
        )
    # the config that wrote these weights (the run's own config.yaml may be a later relaunch's)
    return checkpoint / "config.yaml", checkpoint


def is_model(target: Path) -> bool:
    """A model as it is: a ``.gguf`` file or a Hugging Face directory."""
    return target.suffix == ".gguf" or (target.is_dir() and (target / "config.json").is_file())


def model_config(model: Path, overrides: list[str]) -> RunConfig:
    """The config that evaluates ``model`` as it is, on the text the overrides name
    (``data.val_files``, or ``data.train_files`` with ``data.val_fraction`` carved from it)."""
    keys = {override.split("=", 1)[0] for override in overrides}
    if not keys & {"data.train_files", "data.val_files"}:
        raise UserError(
            f"{model} is a model: give the text to evaluate it on, e.g. `lowbit eval {model} "
            "data.val_files=[held_out.txt]`"
        )
    # only validation text given: it stands in for the (unused) training files too
    stand_in = [] if "data.train_files" in keys else [
        o.replace("data.val_files=", "data.train_files=", 1) for o in overrides if o.startswith("data.val_files=")
    ]  # fmt: skip
    return load_config(None, [f"model.path={model}", *stand_in, *overrides])


def evaluate_target(target: Path, overrides: list[str]) -> list[dict[str, Any]]:
    """Rows of ``{name, val_loss, val_ppl, val_tokens[, recovered]}`` (empty on non-main ranks)."""
    if is_model(target):
        cfg, checkpoint = model_config(target, overrides), None
    else:
        config_file, checkpoint = resolve_target(target)
        cfg = load_config(config_file, overrides)
    strategy = inference_strategy(cfg.strategy, cfg.train)
    setup_console_logging(strategy.is_main)
    rows: list[dict[str, Any]] = []
    try:
        seed_everything(cfg.train.seed)
        built = build_model_and_data(cfg, strategy, with_teacher=False)
        if built.data.val is None:
            raise UserError("no validation data: set data.val_files or a data.val_fraction above 0")
        # A later stage's checkpoint holds all its weights: the earlier stage (model.init_from) is only
        # needed for the start-of-run baselines, or for a LoRA run's frozen base.
        init_from = cfg.model.init_from
        earlier_gone = (
            checkpoint is not None and init_from is not None and not Path(init_from).expanduser().exists()
        )
        if earlier_gone and cfg.lora is not None:
            raise UserError(
                f"model.init_from {init_from} does not exist, and this LoRA run's frozen base comes from it: "
                "restore that run directory to evaluate this one"
            )
        apply_transforms(built.model, cfg, announce=False, skip=("init_from",) if earlier_gone else ())
        model = strategy.wrap(built.model)
        batch_size = cfg.eval.batch_size or cfg.train.micro_batch_size

        def measure(name: str) -> dict[str, Any]:
            return {
                "name": name,
                **evaluate(model, built.data.val, batch_size, strategy, cfg.train.precision),
            }

        start = init_from or cfg.model.path or "random init"
        if (
            checkpoint is not None
            and cfg.quant is not None
            and load_config(checkpoint / "config.yaml").quant is None
        ):
            # A float run evaluated with `quant` rules: its rounded weights are a PTQ of this
            # checkpoint, and the baselines that belong to them are the checkpoint's own.
            ckpt.load_weights(checkpoint, strategy.unwrap(model))
            with quantizers_enabled(model, False):
                rows.append(measure(f"float ({checkpoint.name})"))
            with quantizers_enabled(model, True):
                rows.append(measure(f"PTQ of {checkpoint.name} (round-to-nearest)"))
            return rows if strategy.is_main else []
        baselines = cfg.quant is not None and not earlier_gone  # (the start of the run is gone)
        if baselines:
            with quantizers_enabled(model, False):
                rows.append(measure(f"float ({start})"))
            with quantizers_enabled(model, True):
                rows.append(measure("PTQ (round-to-nearest)"))
        if checkpoint is not None:
            deliberate = rules_changed_on_purpose(checkpoint, cfg)
            ckpt.load_weights(checkpoint, strategy.unwrap(model), same_grids=True, deliberate=deliberate)
            with quantizers_enabled(model, True):
                rows.append(measure(f"{'QAT' if cfg.quant else 'trained'} ({checkpoint.name})"))
            if baselines:
                baselines = {"val_ppl_float": rows[0]["val_ppl"], "val_ppl_ptq": rows[1]["val_ppl"]}
                share = recovered(rows[-1]["val_ppl"], baselines)
                if share is not None:
                    rows[-1]["recovered"] = share
        elif cfg.quant is None:
            rows.append(measure(start))
    finally:
        strategy.teardown()
    return rows if strategy.is_main else []


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A small table: model | val_loss | val_ppl | tokens | recovered."""
    header = ("model", "val_loss", "val_ppl", "tokens", "recovered")
    lines = [(r["name"], f"{r['val_loss']:.4f}", f"{r['val_ppl']:.3f}", f"{r['val_tokens']:,}",
              f"{100 * r['recovered']:.1f}%" if "recovered" in r else "") for r in rows]  # fmt: skip
    widths = [max(len(str(x[i])) for x in (header, *lines)) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in (header, *lines)
    )
