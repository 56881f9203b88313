"""Checks made before compute is spent: can the run write where it was told to, and is there
room there for a checkpoint. Running as root, ``os.access`` grants everything: a read-only
filesystem still fails, at the first write, which ``checkpoint.save`` reports as a user error."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lowbit.trainer.errors import UserError


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable_dir(path: Path, option: str, value: Path | str) -> None:
    """``path`` is, or can be created as, a directory this process may write into; the error
    names the ``option`` and the ``value`` the user gave."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"{option} {value}: {existing} is a file, not a directory; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"{option} {value}: {existing} is not writable by this user; choose a writable {option}"
        )


def check_run_dir(run_dir: Path) -> None:
    """The run directory and its ``checkpoints/`` can be written (before the model is built)."""
    check_writable_dir(run_dir, "run.output_dir", run_dir)
    check_writable_dir(run_dir / "checkpoints", "run.output_dir", run_dir)


def check_room_for_checkpoint(run_dir: Path, total_parameters: int, trained_parameters: int) -> None:
    """The filesystem of the run directory has room for one more checkpoint: fp32 weights plus
    AdamW's two moments of the trained ones (what every engine writes, give or take its own
    copies). Refused before training rather than after the compute is spent."""
    needed = 4 * total_parameters + 8 * trained_parameters
    free = shutil.disk_usage(nearest_existing(run_dir)).free
    if free < needed:
        raise UserError(
            f"run.output_dir {run_dir}: a checkpoint needs about {_size(needed)} and its filesystem has "
            f"{_size(free)} free; free space or choose another run.output_dir"
        )


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"
