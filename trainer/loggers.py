"""Where metrics go, on rank 0 only: the console, ``metrics.jsonl``, and Weights & Biases.

W&B is imported lazily (``lowbit --help`` must not pay for it) and is best-effort: if it cannot
start or a log call fails, training continues and says so once.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from lowbit.trainer.config import LogConfig

logger = logging.getLogger("lowbit")


def setup_console_logging(is_main: bool) -> None:
    """INFO messages on rank 0, warnings and errors on the others."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[lowbit] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)


class JsonlWriter:
    """Appends one JSON object per line; ``truncate_after`` drops lines of steps a resume redoes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def last_step(self) -> int:
        """The highest step written so far (0 for a new file)."""
        if not self.path.exists():
            return 0
        steps = [json.loads(line).get("step", 0) for line in self.path.read_text().splitlines() if line]
        return max(steps, default=0)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        if step == 0:  # a fresh start: lines of an earlier attempt would mix with this run's
            self.path.unlink()
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class WandbSink:
    """A W&B run that never stops training: failures are reported once and then ignored."""

    ID_FILE = "wandb_run_id"  # in the run directory: every launch of the run continues one W&B run

    def __init__(self, cfg: LogConfig, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.run = None
        self.held_through = 0  # steps W&B already holds from an earlier launch (it takes no step twice)
        wandb_cfg = cfg.wandb
        if wandb_cfg.mode == "disabled":
            return
        try:
            import wandb

            id_file = run_dir / self.ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            self.run = wandb.init(
                mode=wandb_cfg.mode,
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name or run_name,
                tags=list(wandb_cfg.tags),
                config=config,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
                settings=wandb.Settings(init_timeout=wandb_cfg.init_timeout_s, silent=True),
            )
            id_file.write_text(run_id + "\n")
        except Exception as error:  # network, auth, anything: W&B is never worth a lost run
            logger.warning(
                "W&B could not start (%s: %s); training continues without it", type(error).__name__, error
            )

    def resume(self, start_step: int, logged_through: int) -> None:
        """A relaunch from the checkpoint of ``start_step`` when the earlier launch had logged up
        to ``logged_through``: W&B keeps what it holds (its steps only increase) and receives
        this launch's metrics from the first step past it."""
        if self.run is None or logged_through <= start_step:
            return
        self.held_through = logged_through
        logger.warning(
            "W&B run %s continues: it keeps steps %d-%d from before the interruption and receives new "
            "steps from %d on (metrics.jsonl has this launch's values for every step)",
            self.run.id, start_step + 1, logged_through, logged_through + 1,
        )  # fmt: skip

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None or step <= self.held_through:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as error:
            logger.warning("W&B logging failed (%s); training continues without it", error)
            self.run = None

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as error:
                logger.warning("W&B finish failed: %s", error)


def format_metrics(metrics: dict[str, Any]) -> str:
    """``val_loss 2.9919  val_ppl 19.92  val_tokens 13,335  recovered 87.3%``: floats to 4 places,
    ints grouped, shares as percentages."""
    return "  ".join(_format_metric(key, value) for key, value in metrics.items())


def _format_metric(key: str, value: Any) -> str:
    if key == "recovered":
        return f"{key} {100 * value:.1f}%"
    return f"{key} {value:,}" if isinstance(value, int) else f"{key} {value:.4f}"


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A tqdm bar on a terminal, or plain lines (CI logs), showing step, loss, lr, tokens/s, ETA."""

    def __init__(self, mode: str, max_steps: int, start_step: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.max_steps = max_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        summary = {
            "loss": f"{metrics['loss']:.4f}",
            "lr": f"{metrics['lr']:.2e}",
            "tok/s": f"{metrics['tokens_per_s']:,.0f}",
        }
        if self.bar is not None:
            self.bar.set_postfix(summary, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.mode == "lines":
            done = step - self.start_step
            eta = (time.perf_counter() - self.started) / max(done, 1) * (self.max_steps - step)
            fields = " | ".join(f"{k} {v}" for k, v in summary.items())
            logger.info("step %d/%d | %s | eta %s", step, self.max_steps, fields, _format_duration(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    """Fans metrics out to JSONL, W&B and the console. Non-main ranks construct a silent one."""

    def __init__(
        self, cfg: LogConfig, run_dir: Path, run_name: str, config: dict[str, Any], enabled: bool
    ) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.jsonl = JsonlWriter(run_dir / "metrics.jsonl") if enabled else None
        self.wandb = WandbSink(cfg, run_dir, run_name, config) if enabled else None
        self.progress: Progress | None = None

    def start(self, max_steps: int, start_step: int, facts: dict[str, Any] | None = None) -> None:
        """Before the first step: W&B and metrics.jsonl continue from ``start_step``; the file
        gets a ``{"step": start_step, "start": facts}`` record of what this launch runs."""
        if self.enabled:
            assert self.jsonl is not None and self.wandb is not None
            self.wandb.resume(start_step, self.jsonl.last_step())  # what the earlier launch logged
            self.jsonl.truncate_after(start_step)
            if facts is not None:
                self.jsonl.write({"step": start_step, "start": facts})
            self.progress = Progress(self.cfg.progress, max_steps, start_step)

    def log_train(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.jsonl is not None and self.wandb is not None
        assert self.progress is not None  # start() runs before the first step
        self.progress.update(step, metrics)
        if step % self.cfg.every_steps == 0 or step == self.progress.max_steps:
            self.jsonl.write({"step": step, **metrics})
            self.wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.jsonl is not None and self.wandb is not None
        self.jsonl.write({"step": step, **metrics})
        self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        logger.info("eval @ step %d: %s", step, format_metrics(metrics))

    def close(self) -> None:
        if self.enabled:
            assert self.wandb is not None
            if self.progress is not None:
                self.progress.close()
            self.wandb.close()
