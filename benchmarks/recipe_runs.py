"""Shared by the quality benchmarks: run a recipe through the real CLI and read its metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(recipe: str, run_dir: Path, overrides: list[str], log: IO[str]) -> dict:
    """Train ``configs/RECIPE`` into a fresh ``run_dir``; return its first/final eval, baselines, minutes."""
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own scratch: always a fresh run
    args = [sys.executable, "-m", "lowbit.trainer", "train", str(ROOT / "configs" / recipe),
            f"run.output_dir={run_dir}", "checkpoint.every_steps=0", "log.progress=lines", *overrides]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    log.write(f"== {recipe} {overrides}\n{done.stdout}\n{done.stderr}\n")
    log.flush()
    if done.returncode != 0:
        raise SystemExit(f"{recipe} {overrides} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "val_ppl" in x]
    return {
        "first": evals[0],
        "final": evals[-1],
        "baselines": next((x for x in lines if "val_ppl_ptq" in x), {}),
        "minutes": (time.perf_counter() - started) / 60,
    }
