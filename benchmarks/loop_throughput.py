"""Tokens/s of the training loop: 1 process vs N processes under each engine (gloo on CPU, nccl on GPU).

Runs the tiny recipe (or --config) through the real CLI for each process count and engine, with
the same global batch, and reads the per-step ``tokens_per_s`` from each run's metrics.jsonl
(median of the steps after warm-up). Prints a table and the ratio against the 1-process baseline
measured in the same run.

    python benchmarks/loop_throughput.py                       # tiny model, 1 vs 2 processes (ddp)
    python benchmarks/loop_throughput.py --engines ddp fsdp2 zero2 zero3 --set model.config.hidden_size=256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "single": ["strategy.name=single"],
    "ddp": ["strategy.name=ddp"],
    "fsdp2": ["strategy.name=fsdp2"],
    "zero1": ["strategy.name=deepspeed", "strategy.deepspeed.stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.deepspeed.stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"],
}


def run(config: str, procs: int, global_batch: int, steps: int, extra: list[str], run_dir: Path) -> dict:
    if global_batch % procs:
        raise SystemExit(f"--global-batch {global_batch} is not divisible by {procs} processes")
    args = [
        sys.executable,
        "-m",
        "lowbit.trainer",
        "train",
        "--nproc-per-node",
        str(procs),
        config,
        f"run.output_dir={run_dir}",
        f"train.max_steps={steps}",
        "train.warmup_steps=0",
        f"train.micro_batch_size={global_batch // procs}",
        "train.grad_accum_steps=1",
        "eval.every_steps=0",
        "eval.at_start=false",
        "checkpoint.save_final=false",
        "checkpoint.every_steps=0",
        "log.progress=none",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"run with {procs} process(es) failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "tokens_per_s" in x]
    steady = train[max(1, len(train) // 5) :]  # drop warm-up steps
    return {
        "tokens_per_s": statistics.median(x["tokens_per_s"] for x in steady),
        "step_time_s": statistics.median(x["step_time_s"] for x in steady),
        "final_loss": train[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["ddp"],
        choices=[e for e in ENGINES if e != "single"],
        help="engines for the multi-process runs (1 process runs single)",
    )
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra config overrides")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in args.procs:
            for engine in ["single"] if procs == 1 else args.engines:
                extra = [*args.set, *ENGINES[engine]]
                run_dir = Path(tmp) / f"{engine}-p{procs}"
                results[(engine, procs)] = run(
                    args.config, procs, args.global_batch, args.steps, extra, run_dir
                )
    base = next(iter(results.values()))["tokens_per_s"]
    print(
        f"\nconfig {args.config}, global batch {args.global_batch} sequences, {args.steps} steps, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}"
    )
    print("| engine | processes | tokens/s | step time | vs first row | final loss |")
    print("|---|---|---|---|---|---|")
    for (engine, procs), r in results.items():
        print(
            f"| {engine} | {procs} | {r['tokens_per_s']:,.0f} | {r['step_time_s'] * 1000:.1f} ms | "
            f"{r['tokens_per_s'] / base:.2f}× | {r['final_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
