"""Preemption: a signal asks the run to stop, and it stops at a step boundary with a checkpoint.

SIGTERM (a scheduler's preemption, or torchrun passing on its own), SIGUSR1 (SLURM's
``--signal=USR1@N`` warning) and SIGINT (Ctrl-C) only set a flag. After every optimizer step the
ranks compare flags (a signal that reached one rank stops them all, at the same step), save a
checkpoint of the step just finished — with the engine's own collective writer — and stop with
``Preempted``; ``lowbit train`` then exits with 128 + the signal's number, and a relaunch
resumes from that checkpoint. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped early on a signal, after checkpointing ``step``."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}, with a checkpoint of that step; "
            "relaunch the same command to resume"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Records the first stop signal instead of dying of it (only the main thread can install)."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.received = self.received or signum
