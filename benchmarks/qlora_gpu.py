"""QLoRA speed and memory on one GPU: lowbit vs plain transformers + peft + bitsandbytes.

    python benchmarks/qlora_gpu.py                 # the GPU run (one call of the device tool)
    python benchmarks/qlora_gpu.py --smoke         # a tiny model on CPU: checks the script runs
    python benchmarks/qlora_gpu.py --cpu           # a ~60M Llama at sequence 256 on CPU: CPU figures

Cases, each in its own process (peak memory is per process), on a randomly initialised Llama
saved once as bf16 safetensors, sequence 2048, LoRA r = 16 (alpha 16) on every linear layer,
AdamW lr 1e-5, bf16 weights:

- the ~1B shape (hidden 2048, 16 layers, vocab 32000), micro-batch 4: full bf16 fine-tuning,
  bf16 LoRA and QLoRA (NF4, double quant), each through lowbit (``lowbit train``'s Trainer, with
  its fused head: the logit loss in 1024-token chunks) and through the plain stack
  (``from_pretrained`` with ``BitsAndBytesConfig`` for QLoRA, ``get_peft_model``, torch AdamW,
  ``model(input_ids, labels=...).loss``);
- the Llama-3-8B shape (hidden 4096, 32 layers, 8 KV heads, vocab 128256), micro-batch 1 with
  activation checkpointing: QLoRA through lowbit and through the plain stack.

Reported: median step time over the timed steps, tokens/s, peak GPU memory
(``torch.cuda.max_memory_allocated``), and lowbit / plain for each (memory target ≤ 0.70×, time
≤ 1.0×; the 8B QLoRA step ≤ 8 GiB). The table is printed last; the JSON goes to ``--out``.
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

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "configs" / "data" / "tiny_corpus.txt"
SHAPES = {
    "1b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
           "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
           "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "max_position_embeddings": 8192, "tie_word_embeddings": False, "rope_theta": 500000.0},
    # --cpu: both slots run this ~60M-parameter Llama at sequence 256 (a CPU's figures, not a GPU's)
    "cpu": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408,
            "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8,
            "max_position_embeddings": 512, "tie_word_embeddings": False},
    "tiny": {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256, "tie_word_embeddings": False},
}  # fmt: skip
METHODS = ("full_bf16", "lora_bf16", "qlora")
RANK, ALPHA, LR = 16, 16, 1e-5


def write_model(directory: Path, sizes: dict) -> None:
    """A randomly initialised Llama saved as bf16 safetensors, with the byte tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.trainer.byte_tokenizer import byte_tokenizer

    fields = dict(sizes)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)


def lowbit_case(method: str, args: argparse.Namespace) -> list[float]:
    """Step times of a lowbit run of ``method``."""
    from lowbit.trainer.config import load_config
    from lowbit.trainer.loop import Trainer

    overrides = [
        f"model.path={args.model}", "model.config=null", "model.dtype=bf16", "model.tokenizer=byte",
        f"model.gradient_checkpointing={str(args.checkpointing).lower()}",
        f"data.train_files=[{CORPUS}]", f"data.seq_len={args.seq_len}", "data.val_fraction=0",
        f"train.max_steps={args.steps}", "train.warmup_steps=0", f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum_steps=1", "train.precision=bf16", f"train.lr={LR}", "train.weight_decay=0.0",
        "train.fused_head_chunk=1024", "eval.at_start=false", "eval.every_steps=0",
        "checkpoint.save_final=false", "log.progress=none", f"run.output_dir={args.work}/lowbit-{method}",
    ]  # fmt: skip
    if method != "full_bf16":
        base = "nf4" if method == "qlora" else "float"
        overrides.append(f"lora={{rank: {RANK}, alpha: {ALPHA}, base: {base}, compute_dtype: bf16}}")
    trainer = Trainer(load_config(ROOT / "configs" / "tiny.yaml", overrides))
    trainer.fit()
    trainer.close()
    lines = [
        json.loads(x)
        for x in (Path(args.work) / f"lowbit-{method}" / "metrics.jsonl").read_text().splitlines()
    ]
    return [line["step_time_s"] for line in lines if "step_time_s" in line]


def plain_case(method: str, args: argparse.Namespace) -> list[float]:
    """Step times of the same training with transformers + peft + bitsandbytes and torch AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, **kwargs)
    if method != "qlora":
        model.to(device)
    model.config.use_cache = False
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full_bf16":
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, 256, (args.micro_batch, args.seq_len), generator=generator).to(device)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def worker(args: argparse.Namespace) -> None:
    """One case in this process; one JSON line appended to ``args.json``."""
    import torch
    import torch.distributed as dist

    stack, method = args.case.split(":")
    if stack == "lowbit":
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    times = (lowbit_case if stack == "lowbit" else plain_case)(method, args)[args.skip :]
    step = statistics.median(times)
    import resource

    result = {
        # CPU runs: the process's peak resident memory (weights, optimizer, activations, and the
        # same libraries on both stacks); GPU runs: torch's peak allocated CUDA memory
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "shape": args.shape, "stack": stack, "method": method, "step_s": step,
        "tokens_per_s": args.micro_batch * args.seq_len / step, "steps_timed": len(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    with open(args.json, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    if stack == "lowbit":
        dist.destroy_process_group()


def table(results: list[dict]) -> str:
    rows = ["| shape | method | stack | step | tokens/s | peak memory | lowbit / plain: time | memory |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by = {(r["shape"], r["method"], r["stack"]): r for r in results}
    for r in results:
        other = by.get((r["shape"], r["method"], "plain"))
        ratio_t = ratio_m = ""
        if r["stack"] == "lowbit" and other:
            ratio_t = f"{r['step_s'] / other['step_s']:.2f}×"
            key = "peak_gib" if r["peak_gib"] else "peak_rss_gib"
            ratio_m = f"{r[key] / other[key]:.2f}×"
        memory = (
            f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else f"{r['peak_rss_gib']:.2f} GiB RSS"
        )
        rows.append(f"| {r['shape']} | {r['method']} | {r['stack']} | {1000 * r['step_s']:.0f} ms | "
                    f"{r['tokens_per_s']:,.0f} | {memory} | {ratio_t} | {ratio_m} |")  # fmt: skip
    return "\n".join(rows)


def plan(mode: str, only: str | None) -> list[tuple[str, str, dict]]:
    """(shape slot, case, settings) in run order; ``mode``: gpu | cpu | smoke."""
    seq = {"gpu": 2048, "cpu": 256, "smoke": 64}[mode]
    small = {"seq_len": seq, "micro_batch": 2 if mode == "smoke" else 4, "checkpointing": False}
    big = {"seq_len": seq, "micro_batch": 1, "checkpointing": True}
    chosen = []
    if only in (None, "1b"):
        chosen += [("1b", f"{stack}:{m}", small) for m in METHODS for stack in ("lowbit", "plain")]
    if only in (None, "8b"):
        chosen += [("8b", f"{stack}:qlora", big) for stack in ("lowbit", "plain")]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script")
    parser.add_argument(
        "--cpu", action="store_true", help="a ~60M Llama at sequence 256 on CPU (CPU figures)"
    )
    parser.add_argument("--only", choices=("1b", "8b"), help="run one shape")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora_gpu.json"))
    parser.add_argument("--work", default="/tmp/lowbit-qlora-gpu")
    for hidden in ("--worker-case", "--model", "--json", "--shape"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--seq-len", "--micro-batch", "--skip"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_case:
        args.case = args.worker_case
        return worker(args)
    mode = "smoke" if args.smoke else "cpu" if args.cpu else "gpu"
    steps = args.steps or (3 if args.smoke else 10)
    skip = 1 if args.smoke else 3
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.jsonl"
    results_file.unlink(missing_ok=True)
    for label, case, settings in plan(mode, args.only):
        shape = {"smoke": "tiny", "cpu": "cpu"}.get(mode, label)
        model_dir = work / f"model-{shape}"
        if not (model_dir / "config.json").is_file():
            write_model(model_dir, SHAPES[shape])
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
                   f"--worker-case={case}", f"--model={model_dir}", f"--json={results_file}", f"--work={work}",
                   f"--shape={label}", f"--seq-len={settings['seq_len']}", f"--micro-batch={settings['micro_batch']}",
                   f"--steps={steps}", f"--skip={skip}", *(["--checkpointing"] if settings["checkpointing"] else [])]  # fmt: skip
        done = subprocess.run(
            command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "8")}
        )
        if done.returncode != 0:
            print(f"case {label} {case} failed (exit {done.returncode})", file=sys.stderr)
    results = (
        [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    )
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"gpu": gpu, "steps": steps, "results": results}, indent=2))
    print(f"\n{gpu}, {steps} steps ({skip} untimed), r = {RANK} on every linear")
    print(table(results))


if __name__ == "__main__":
    main()
