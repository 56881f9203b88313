"""Atomic, verifiable checkpoints: write to a temp dir, hash every file, rename into place.

Layout of ``RUN_DIR/checkpoints/checkpoint-000120/``:
``model.safetensors`` (weights), ``optimizer.pt``, ``trainer_state.json`` (step, data position,
scheduler), ``rng-rank{R}.pt`` (one per rank), ``config.yaml`` (resolved), and ``manifest.json``
written last with every file's size and sha256. A directory without a manifest, or whose files
don't match it, is incomplete or corrupt: it is reported and skipped, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from lowbit.trainer.errors import UserError

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
logger = logging.getLogger("lowbit")


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    step: int
    data_position: int
    global_batch_size: int
    world_size: int
    scheduler: dict[str, Any]


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def write_shared_files(
    staging: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    config_yaml: str,
    objective: nn.Module | None = None,
) -> None:
    """Rank 0's part: weights (and any learned loss parameters), optimizer, trainer state, config."""
    save_model(model, str(staging / "model.safetensors"))
    if objective is not None and any(True for _ in objective.parameters()):
        save_model(objective, str(staging / "objective.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2))
    (staging / "config.yaml").write_text(config_yaml)


def write_rank_files(staging: Path, rank: int) -> None:
    """Every rank's part: its RNG state."""
    torch.save(rng_state(), staging / f"rng-rank{rank}.pt")


def finalize(staging: Path, keep_last: int) -> Path:
    """Write the manifest (making the checkpoint complete), rename into place, prune old ones."""
    files = {}
    for path in sorted(staging.iterdir()):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = staging / MANIFEST
    with manifest.open("w") as handle:
        json.dump({"files": files}, handle, indent=2)
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
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at (from its ``trainer_state.json``)."""
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])


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


def load_weights(checkpoint: Path, model: nn.Module) -> None:
    """Load weights into ``model`` after verifying the checkpoint."""
    problem = verify(checkpoint)
    if problem is not None:
        raise UserError(f"checkpoint {checkpoint} cannot be loaded: {problem}")
    missing, unexpected = load_model(model, str(checkpoint / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {checkpoint} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; was it saved from a different model config?"
        )


def load_checkpoint(
    checkpoint: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    objective: nn.Module | None = None,
) -> TrainerState:
    """Restore weights (and learned loss parameters), optimizer and this rank's RNG."""
    load_weights(checkpoint, model)
    if objective is not None and (checkpoint / "objective.safetensors").is_file():
        load_model(objective, str(checkpoint / "objective.safetensors"))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    state = TrainerState(**json.loads((checkpoint / "trainer_state.json").read_text()))
    rng_file = checkpoint / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("%s has no RNG state for rank %d (world size changed?)", checkpoint, rank)
    return state
