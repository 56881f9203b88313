"""Atomic, verifiable checkpoints for every engine: a staging dir, a manifest, a rename.

Layout of ``RUN_DIR/checkpoints/checkpoint-000120/``:

- the engine's own files (one writer per engine, written collectively by ``Strategy.save_checkpoint``):
  ``model.safetensors`` + ``optimizer.pt`` (+ ``objective.safetensors``) from rank 0 for single/ddp;
  ``dcp/`` (``torch.distributed.checkpoint``, every rank its shards) for fsdp2; ``deepspeed/``
  (the engine's ``save_checkpoint``) for DeepSpeed;
- ``trainer_state.json`` (step, data position, scheduler, engine and layout, world size),
  ``rng-rank{R}.pt`` (one per rank), ``config.yaml`` (resolved);
- ``manifest.json``, written last by rank 0 with every file's size and sha256.

Everything is written under ``.checkpoint-000120.tmp`` and renamed into place once complete, so
a crash leaves no half checkpoint. A directory without a manifest, or whose files don't match it,
is incomplete or corrupt: reported and skipped, never loaded. Verification (hashing every file)
happens once per start, on rank 0, which tells the other ranks what it chose.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lowbit.trainer.errors import UserError
from lowbit.trainer.hashing import file_sha256

if TYPE_CHECKING:
    from lowbit.trainer.strategies import Strategy

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
logger = logging.getLogger("lowbit")


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    step: int
    data_position: int
    global_batch_size: int
    world_size: int
    scheduler: dict[str, Any] = field(default_factory=dict)
    engine: str = "single"
    """The engine that wrote the checkpoint (``deepspeed-zero3``...)."""
    layout: str = "safetensors"
    """How its weights are stored: safetensors | dcp | deepspeed."""
    frozen_base: str | None = None
    """sha256 of the frozen parameters the checkpoint leaves out (a LoRA run's base), else None."""
    data_state: dict[str, Any] | None = None
    """A stream's position (``data.streaming``): where each source continues; None for cached data."""
    quant_grids: list[str] | None = None
    """The grids the fake quantizers computed (``quant_grids``); None: written before they were recorded."""


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    """Every file under ``root`` (engines write sub-directories), sorted."""
    return sorted(path for path in root.rglob("*") if path.is_file())


def rng_state() -> dict[str, Any]:
    """Every RNG the loop may draw from, in a ``weights_only``-loadable form."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f".{PREFIX}{step:06d}.tmp"


def write_rank_files(staging: Path, rank: int) -> None:
    """Every rank's part: its RNG state."""
    torch.save(rng_state(), staging / f"rng-rank{rank}.pt")


def write_run_files(staging: Path, state: TrainerState, config_yaml: str) -> None:
    """Rank 0's part besides the engine's: trainer state and the resolved config."""
    (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    (staging / "config.yaml").write_text(config_yaml)


def file_digests(staging: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file (relative to ``staging``), each fsynced first."""
    digests = {}
    for path in files:
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        digests[str(path.relative_to(staging))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return digests


def finalize(staging: Path, keep_last: int, digests: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the manifest (making the checkpoint complete), rename into place, prune old ones.

    ``digests`` already computed (by the ranks, in parallel) are used; the rest are computed here.
    """
    known = digests or {}
    rest = [path for path in _files(staging) if str(path.relative_to(staging)) not in known]
    files = {**known, **file_digests(staging, rest)}
    manifest = staging / MANIFEST
    with manifest.open("w") as handle:
        json.dump({"files": dict(sorted(files.items()))}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(staging)
    final = staging.with_name(staging.name[1:].removesuffix(".tmp"))
    if final.exists():  # a previous run's checkpoint of the same step, superseded
        shutil.rmtree(final)
    staging.rename(final)
    _fsync_dir(final.parent)
    for old in complete_checkpoints(final.parent.parent)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save(
    strategy: Strategy, run_dir: Path, state: TrainerState, config_yaml: str, keep_last: int
) -> Path | None:
    """Collective: write a checkpoint of the current step; returns its path on rank 0.

    Every rank hashes (and fsyncs) a share of the written files in parallel — a sharded checkpoint
    of many GB would otherwise keep rank 0 hashing, and every rank waiting, long past a
    preemption's grace period. The staging directory must be visible to every rank (one shared
    filesystem, as DCP and DeepSpeed assume on several nodes).
    """
    staging = staging_dir(run_dir, state.step)
    try:
        if strategy.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier attempt at this step
            staging.mkdir(parents=True)
        strategy.barrier()
        strategy.save_checkpoint(staging)
        write_rank_files(staging, strategy.rank)
        strategy.barrier()
        share = _files(staging)[strategy.rank :: strategy.world_size]
        digests: dict[str, dict[str, Any]] = {}
        for part in strategy.all_gather_object(file_digests(staging, share)):
            digests.update(part)
        final = None
        if strategy.is_main:
            write_run_files(staging, state, config_yaml)
            final = finalize(staging, keep_last, digests)
            logger.info("saved %s", final)
    except OSError as error:  # a full disk, a lost mount: the earlier checkpoints stay as they were
        raise UserError(
            f"could not write the checkpoint of step {state.step} under {checkpoints_root(run_dir)} ({error}); the "
            "earlier checkpoints are intact: free space (or fix the filesystem) and relaunch to resume from the newest"
        ) from error
    strategy.barrier()
    return final


def verify(checkpoint: Path) -> str | None:
    """Return why ``checkpoint`` cannot be loaded, or None when it is complete and intact."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "manifest.json is unreadable"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return (
                f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
            )
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def read_state(checkpoint: Path) -> TrainerState:
    """The trainer state of a checkpoint (older checkpoints lack engine/layout: single, safetensors)."""
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at."""
    return read_state(checkpoint).step


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix(PREFIX))
    except ValueError:
        return -1


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every ``checkpoint-N`` directory of a run, newest first (complete or not)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and _step_of(p) >= 0]
    return sorted(found, key=_step_of, reverse=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint dirs that have a manifest, newest first (not yet hash-verified)."""
    return [p for p in checkpoint_dirs(run_dir) if (p / MANIFEST).exists()]


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for candidate in checkpoint_dirs(run_dir):
        problem = verify(candidate)
        if problem is None:
            return candidate
        logger.warning("skipping checkpoint %s: %s", candidate, problem)
    return None


def choose_resume(mode: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, per ``checkpoint.resume`` (auto | never | a path), verified."""
    if mode == "never":
        if checkpoint_dirs(run_dir):
            raise UserError(
                f"run.output_dir {run_dir} already holds checkpoints of an earlier run; set "
                "checkpoint.resume=auto to continue it, or choose another run.output_dir"
            )
        return None
    if mode == "auto":
        found = latest_valid_checkpoint(run_dir)
        candidates = checkpoint_dirs(run_dir)
        if found is None and candidates:
            damaged = ", ".join(path.name for path in candidates)
            raise UserError(
                f"every checkpoint in {checkpoints_root(run_dir)} is damaged ({damaged}; the reasons are logged "
                "above) and none was changed: restore them from a copy, or start over by moving them out of "
                "checkpoints/ or with another run.output_dir"
            )
        return found
    path = Path(mode)
    problem = verify(path) if path.is_dir() else "no such directory"
    if problem is not None:
        raise UserError(f"checkpoint.resume {path}: cannot resume from it: {problem}")
    return path


def check_quant_grids(
    state: TrainerState, checkpoint: Path, model: nn.Module, deliberate: bool = False
) -> None:
    """Refuse to continue (or export, evaluate) a run on other grids than it trained on.

    The config alone cannot tell: a rule without ``range`` meant the restricted grid before
    ``range: auto`` existed, and auto picks the full one for some shapes. A checkpoint without the
    record was written before auto, so its grids are the restricted reading of the same rules.
    ``deliberate``: the quant rules were changed on purpose (``checkpoint.allow_config_change``
    with rules that differ from the checkpoint's, e.g. a GGUF export of the weights without the
    activation rounding llama.cpp does not do): warn instead.
    """
    from lowbit.quant import quant_grids

    grids = quant_grids(model)
    trained = state.quant_grids if state.quant_grids is not None else quant_grids(model, before_auto=True)
    if trained == grids:
        return
    what = (f"checkpoint {checkpoint} trained on the grids {', '.join(trained) or 'none'} but this model computes "
            f"{', '.join(grids) or 'none'}")  # fmt: skip
    if deliberate:
        logger.warning("%s (the quant rules changed: checkpoint.allow_config_change)", what)
        return
    raise UserError(
        f"{what}: the quant rules or lowbit's defaults changed (an unset range was restricted before range: "
        "auto, and int4 per channel until auto chose full there). Give each rule the range it trained with "
        "(e.g. range: restricted) — to resume, in the config with checkpoint.allow_config_change=true; "
        "for lowbit export / eval / generate, as a quant.rules override (rules changed on purpose: add "
        "checkpoint.allow_config_change=true) — or start a new run (another run.output_dir)"
    )


TUNED = ("weight_decay", "betas", "eps")  # per optimizer group; the learning rate comes from the schedule


def restore(strategy: Strategy, checkpoint: Path, frozen_base: str | None = None) -> TrainerState:
    """Collective: load an already verified checkpoint into the prepared strategy and this rank's RNG.

    ``frozen_base``: the fingerprint of this run's frozen parameters, which must be the ones the
    checkpoint's trained parameters (LoRA adapters) were trained on.
    """
    state = read_state(checkpoint)
    strategy.check_resumable(checkpoint, asdict(state))
    if state.frozen_base != frozen_base:
        raise UserError(
            f"checkpoint {checkpoint} holds adapters trained on another frozen base than this run builds (its base "
            f"fingerprint {str(state.frozen_base)[:12]}, this run's {str(frozen_base)[:12]}): resume with the model and "
            "lora settings that wrote it, or start a new run (another run.output_dir)"
        )
    assert strategy.optimizer is not None and strategy.scheduler is not None
    # The optimizer and schedule were built from this run's config; loading overwrites their
    # hyperparameters with the checkpoint's. This run's values win (a relaunch may lower the
    # learning rate or lengthen the run on purpose; unchanged values are simply the same).
    configured = [{k: group[k] for k in TUNED if k in group} for group in strategy.optimizer.param_groups]
    base_lrs = list(strategy.scheduler.base_lrs)
    strategy.load_checkpoint(checkpoint)
    strategy.scheduler.load_state_dict(state.scheduler)
    strategy.scheduler.base_lrs = base_lrs
    for index, (group, values) in enumerate(zip(strategy.optimizer.param_groups, configured)):
        group.update(values)
        group["lr"] = base_lrs[index] * strategy.scheduler.lr_lambdas[index](strategy.scheduler.last_epoch)
    rng_file = checkpoint / f"rng-rank{strategy.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("%s has no RNG state for rank %d (world size changed?)", checkpoint, strategy.rank)
    return state


def load_weights(
    checkpoint: Path, model: nn.Module, same_grids: bool = False, deliberate: bool = False
) -> None:
    """Verify ``checkpoint`` and load the student's weights into a plain ``model``, in one process,
    whichever engine wrote it (a sharded checkpoint is reassembled: what eval and export read).
    ``same_grids``: the model must compute the grids the checkpoint trained on (``check_quant_grids``)
    — for export and eval of a run; a later stage (``model.init_from``) may choose others;
    ``deliberate``: rules changed on purpose (``resume_guard.rules_changed_on_purpose``) only warn."""
    from lowbit.trainer.strategies import read_weights

    problem = verify(checkpoint)
    if problem is not None:
        raise UserError(f"checkpoint {checkpoint} cannot be loaded: {problem}")
    state = read_state(checkpoint)
    if same_grids:
        check_quant_grids(state, checkpoint, model, deliberate)
    read_weights(state.layout, checkpoint, model)
