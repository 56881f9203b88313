"""Engine overhead on one GPU: a ~1B Llama under ddp, fsdp2, ZeRO-2 and ZeRO-3 at world size 1.

    python benchmarks/engines_gpu.py                  # the GPU run (one call of the device tool)
    python benchmarks/engines_gpu.py --smoke          # a tiny model on CPU: checks the script runs

For each engine: plain bf16, QAT w4a8, and KD from a same-size teacher (CE + forward KL, fused
head); plus plain bf16 with ``train.compile`` under ddp and fsdp2 for MFU. Reported per case: step
time (median of the timed steps), tokens/s, peak GPU memory, the ratio to ddp for the same
method (target ≤ 1.05), QAT/plain per engine (target ≤ 1.15), and MFU for plain bf16
(6N + 12·L·d·T FLOPs per token against the GPU's dense bf16 peak).

Every case runs in one worker process, started once by torchrun with one rank (importing torch,
transformers and DeepSpeed per case would cost more than the cases): a fresh ``Trainer`` per case,
the model loaded from one bf16 safetensors checkpoint that the parent writes first. DeepSpeed
cases run last, since its engines are not fully released within a process. The table is printed
last; the JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "configs" / "data" / "tiny_corpus.txt"
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
LLAMA_1B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
            "max_position_embeddings": 2048, "tie_word_embeddings": False}  # fmt: skip
TINY = {**LLAMA_1B, "vocab_size": 262, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}  # fmt: skip
ENGINES = {
    "ddp": ["strategy.name=ddp"],
    "fsdp2": ["strategy.name=fsdp2"],
    "zero2": ["strategy.name=deepspeed", "strategy.deepspeed.stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"],
}
METHODS = {
    "plain": [],
    "qat_w4a8": ['quant={rules: [{match: "*", weight: w4a8, activation: w4a8}], baselines: false}'],
    "kd": [
        "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]",
        "teacher.path={model}",
        "teacher.dtype=bf16",
        "train.fused_head_chunk=1024",
    ],  # fmt: skip
    "plain_compiled": ["train.compile=true"],
}


def cases() -> list[tuple[str, str]]:
    """(engine, method), DeepSpeed last."""
    chosen = [(e, m) for e in ("ddp", "fsdp2") for m in METHODS]
    return chosen + [(e, m) for e in ("zero2", "zero3") for m in ("plain", "qat_w4a8", "kd")]


def write_model(directory: Path, sizes: dict, device: str) -> None:
    """A randomly initialised Llama saved as bf16 safetensors, with the byte tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.trainer.byte_tokenizer import byte_tokenizer

    fields = dict(sizes)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)


def flops_per_token(config: dict, seq_len: int) -> float:
    """6N + 12·L·d·T (PaLM): N counts every matmul weight (not the input embedding)."""
    d, f, layers, vocab = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
    )
    per_layer = 4 * d * d + 3 * d * f
    matmul_params = layers * per_layer + d * vocab
    return 6 * matmul_params + 12 * layers * d * seq_len


def worker(args: argparse.Namespace) -> None:
    """Run every case in this process; append one JSON line per case to ``args.json``."""
    import torch
    import torch.distributed as dist

    from lowbit.trainer.config import load_config
    from lowbit.trainer.loop import Trainer

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    base = [f"model.path={args.model}", "model.config=null", "model.dtype=fp32", "model.tokenizer=byte",
            f"data.train_files=[{CORPUS}]", f"data.seq_len={args.seq_len}", "data.val_fraction=0",
            f"train.max_steps={args.steps}", "train.warmup_steps=0", f"train.micro_batch_size={args.micro_batch}",
            "train.grad_accum_steps=1", "train.precision=bf16", "train.lr=1e-5", "eval.at_start=false",
            "eval.every_steps=0", "checkpoint.save_final=false", "log.progress=none"]  # fmt: skip
    for engine, method in cases():
        overrides = [
            *base,
            *ENGINES[engine],
            *(o.replace("{model}", str(args.model)) for o in METHODS[method]),
        ]
        run_dir = Path(args.work) / f"{engine}-{method}"
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, f"run.output_dir={run_dir}"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer = Trainer(cfg)
        trainer.fit()
        trainer.close()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        times = [line["step_time_s"] for line in lines if "step_time_s" in line][args.skip :]
        tokens = [line["tokens"] for line in lines if "tokens" in line][args.skip :]
        step = statistics.median(times)
        result = {
            "engine": engine, "method": method, "step_s": step, "tokens_per_s": statistics.median(tokens) / step,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "wall_s": time.perf_counter() - started, "steps_timed": len(times),
        }  # fmt: skip
        if dist.get_rank() == 0:
            with open(args.json, "a") as handle:
                handle.write(json.dumps(result) + "\n")
        del trainer
        gc.collect()
    dist.destroy_process_group()


def table(results: list[dict], sizes: dict, seq_len: int, gpu: str) -> str:
    by_case = {(r["engine"], r["method"]): r for r in results}
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    per_token = flops_per_token(sizes, seq_len)
    rows = [
        "| engine | method | step | tokens/s | peak memory | vs ddp | QAT / plain | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ddp = by_case.get(("ddp", r["method"]))
        plain = by_case.get((r["engine"], "plain"))
        ratio = f"{r['step_s'] / ddp['step_s']:.3f}×" if ddp else ""
        qat = f"{r['step_s'] / plain['step_s']:.3f}×" if r["method"] == "qat_w4a8" and plain else ""
        mfu = ""
        if peak and r["method"].startswith("plain"):
            mfu = f"{100 * r['tokens_per_s'] * per_token / (peak * 1e12):.1f}%"
        memory = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        rows.append(f"| {r['engine']} | {r['method']} | {1000 * r['step_s']:.0f} ms | {r['tokens_per_s']:,.0f} | "
                    f"{memory} | {ratio} | {qat} | {mfu} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engines_gpu.json"))
    parser.add_argument("--work", default="/tmp/lowbit-engines-gpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    sizes = TINY if args.smoke else LLAMA_1B
    seq_len, micro_batch = (64, 2) if args.smoke else (2048, 4)
    steps = args.steps or (4 if args.smoke else 12)
    skip = 2 if args.smoke else 4  # compile and allocator warm-up happen in the first steps
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        write_model(model_dir, sizes, "cuda" if torch.cuda.is_available() else "cpu")
    results_file = work / "results.jsonl"
    results_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
               "--worker", f"--model={model_dir}", f"--json={results_file}", f"--work={work}",
               f"--seq-len={seq_len}", f"--micro-batch={micro_batch}", f"--steps={steps}", f"--skip={skip}"]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "8")}
    )
    results = (
        [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gpu": gpu, "model": sizes, "seq_len": seq_len, "micro_batch": micro_batch,
                                          "results": results}, indent=2))  # fmt: skip
    print(f"\n{gpu}, Llama {sizes['hidden_size']}×{sizes['num_hidden_layers']}, seq {seq_len}, micro-batch {micro_batch}, "
          f"bf16, world size 1, median of steps {skip + 1}..{steps}")  # fmt: skip
    print(table(results, sizes, seq_len, gpu))
    if done.returncode:
        sys.exit(done.returncode)


if __name__ == "__main__":
    main()
