"""BitLinear training-step time on one GPU: BitNet b1.58 layers vs plain bf16 linears.

    python benchmarks/bitnet_gpu.py              # the GPU run (one call of the device tool)
    python benchmarks/bitnet_gpu.py --smoke      # a tiny model on CPU: checks the script runs

The ~1B Llama shape (hidden 2048, 16 layers, vocab 32000), sequence 2048 × micro-batch 4, bf16
weights and autocast, AdamW, lowbit's Trainer with the fused head, each case in its own process:
plain bf16, and BitNet (SubLN + every linear layer ternary with int8 per-token activations), both
eager and both with ``train.compile`` (each decoder layer compiled). Reported: median step time
over the timed steps, tokens/s, peak memory, and BitNet / plain at the same compile setting
(the issue's target: ≤ 1.15×; a naive BitLinear measured 1.41× bf16 eager on an H100, onebitllms
reports ~1.2×). The table is printed last; the JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qlora_gpu import CORPUS, ROOT, SHAPES, write_model

BITNET = [
    "model.subln=true",
    'quant={rules: [{match: "*", weight: bitnet, activation: bitnet}], baselines: false}',
]
CASES = {"bf16": [], "bitnet": BITNET}


def worker(args: argparse.Namespace) -> None:
    """One case in this process: train, then append one JSON line to ``args.json``."""
    import torch
    import torch.distributed as dist

    from lowbit.trainer.config import load_config
    from lowbit.trainer.loop import Trainer

    method, compiled = args.worker_case.split(":")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_dir = Path(args.work) / f"{method}-{compiled}"
    overrides = [
        f"model.path={args.model}", "model.config=null", "model.dtype=bf16", "model.tokenizer=byte",
        f"data.train_files=[{CORPUS}]", f"data.seq_len={args.seq_len}", "data.val_fraction=0",
        f"train.max_steps={args.steps}", "train.warmup_steps=0", f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum_steps=1", "train.precision=bf16", "train.lr=1e-4", "train.fused_head_chunk=1024",
        f"train.compile={compiled == 'compiled'}", "eval.at_start=false", "eval.every_steps=0",
        "checkpoint.save_final=false", "log.progress=none", f"run.output_dir={run_dir}", *CASES[method],
    ]  # fmt: skip
    trainer = Trainer(load_config(ROOT / "configs" / "tiny.yaml", overrides))
    trainer.fit()
    trainer.close()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [line["step_time_s"] for line in lines if "step_time_s" in line][args.skip :]
    step = statistics.median(times)
    result = {"method": method, "compile": compiled, "step_s": step, "steps_timed": len(times),
              "tokens_per_s": args.micro_batch * args.seq_len / step,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}  # fmt: skip
    with open(args.json, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


def table(results: list[dict]) -> str:
    rows = [
        "| layers | compile | step | tokens/s | peak memory | BitNet / bf16 |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["method"], r["compile"]): r for r in results}
    for r in results:
        plain = by.get(("bf16", r["compile"]))
        ratio = f"{r['step_s'] / plain['step_s']:.2f}×" if r["method"] == "bitnet" and plain else ""
        memory = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        rows.append(f"| {r['method']} | {r['compile']} | {1000 * r['step_s']:.0f} ms | {r['tokens_per_s']:,.0f} | "
                    f"{memory} | {ratio} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled cases")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bitnet_gpu.json"))
    parser.add_argument("--work", default="/tmp/lowbit-bitnet-gpu")
    for hidden in ("--worker-case", "--model", "--json"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--seq-len", "--micro-batch", "--skip"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_case:
        return worker(args)
    shape, seq, micro = ("tiny", 64, 2) if args.smoke else ("1b", 2048, 4)
    steps, skip = args.steps or (3 if args.smoke else 12), 1 if args.smoke else 4
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.jsonl"
    results_file.unlink(missing_ok=True)
    model_dir = work / f"model-{shape}"
    if not (model_dir / "config.json").is_file():
        write_model(model_dir, SHAPES[shape])
    for compiled in ("eager",) if args.eager_only or args.smoke else ("eager", "compiled"):
        for method in CASES:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                       __file__, f"--worker-case={method}:{compiled}", f"--model={model_dir}",
                       f"--json={results_file}", f"--work={work}", f"--seq-len={seq}", f"--micro-batch={micro}",
                       f"--steps={steps}", f"--skip={skip}"]  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "8"})
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
            print(f"{method} {compiled}: {status} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    results = [json.loads(x) for x in results_file.read_text().splitlines()] if results_file.exists() else []
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    Path(args.out).write_text(json.dumps({"device": device, "steps": steps, "results": results}, indent=2))
    print(f"\n{device}: {shape} Llama, sequence {seq} × {micro}, {steps} steps ({skip} untimed)")
    print(table(results))


if __name__ == "__main__":
    main()
