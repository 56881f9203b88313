"""Shared by the quality benchmarks: run a recipe through the real CLI and read its metrics."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]


def _lowbit(args: list[str], what: str, log: IO[str]) -> tuple[str, float]:
    """Run ``lowbit ARGS`` from the repo root, logged; its stdout and minutes (a failure stops the benchmark)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lowbit.trainer", *args], cwd=ROOT, capture_output=True, text=True
    )
    log.write(f"== {what}\n{done.stdout}\n{done.stderr}\n")
    log.flush()
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return done.stdout, (time.perf_counter() - started) / 60


def run_recipe(recipe: str, run_dir: Path, overrides: list[str], log: IO[str]) -> dict:
    """Train ``configs/RECIPE`` into a fresh ``run_dir``; return its first/final eval, baselines, minutes."""
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own scratch: always a fresh run
    args = ["train", str(ROOT / "configs" / recipe), f"run.output_dir={run_dir}", "checkpoint.every_steps=0",
            "log.progress=lines", *overrides]  # fmt: skip
    _, minutes = _lowbit(args, f"{recipe} {overrides}", log)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "val_ppl" in x]
    return {
        "first": evals[0],
        "final": evals[-1],
        "baselines": next((x for x in lines if "val_ppl_ptq" in x), {}),
        "minutes": minutes,
    }


def run_gptq(recipe: str, overrides: list[str], out: Path, samples: int, log: IO[str]) -> float:
    """``lowbit gptq configs/RECIPE`` (its quant rules, calibrated on its first ``samples`` training
    sequences) into ``out``, replaced if there; returns its minutes."""
    args = ["gptq", str(ROOT / "configs" / recipe), *overrides, "--out", str(out), "--samples", str(samples),
            "--overwrite"]  # fmt: skip
    stdout, minutes = _lowbit(args, f"gptq {recipe} {overrides}", log)
    print(stdout.strip(), flush=True)
    return minutes


def quality_setup(
    doc: str, name: str, default_steps: int = 15, add_options=None
) -> tuple[argparse.Namespace, Path, dict]:
    """The quality benchmarks' shared command line (--steps, --runs-dir, --out, --reuse, and what
    ``add_options(parser)`` adds): the parsed arguments, the runs directory (created) and the
    results so far (kept with --reuse)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_options is not None:
        add_options(parser)
    parser.add_argument("--steps", type=int, default=default_steps)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / name))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"{name}.json"))
    parser.add_argument("--reuse", action="store_true", help="keep the training rows already in --out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"steps": args.steps, "rows": {}}
    if args.reuse and Path(args.out).is_file():
        results = json.loads(Path(args.out).read_text())
    return args, runs_dir, results
