"""Memory and time of the KD / CE loss, forward + backward, from final hidden states.

Variants, each in its own subprocess so peak memory is its own:

* ``naive``: both heads produce full logits, fp32 log-softmax, forward KL (or CE);
* ``lowbit``: the fused-head path (``lowbit.losses.fused_head``), logits built per token chunk
  and their gradient taken in the forward; per chunk size, with the per-chunk loss eager and
  compiled (``LOWBIT_FUSED_HEAD_BACKEND``);
* ``liger``: Liger Kernel's ``LigerFusedLinearJSD`` (β→0 is forward KL) /
  ``LigerFusedLinearCrossEntropyLoss``, when installed (Triton: CUDA only).

Peak memory is ``torch.cuda.max_memory_allocated`` above the inputs on a GPU, and the growth of
the process's peak RSS on a CPU — there the children run with ``MALLOC_MMAP_THRESHOLD_=131072``
so that glibc returns freed blocks to the OS and the RSS peak is the real peak (its default
threshold grows after frees and keeps freed memory in the heap, hiding any saving).

    python benchmarks/kd_memory.py                                  # CUDA: T=4096, H=2048, V=128256, bf16
    python benchmarks/kd_memory.py --tokens 1024 --hidden 256 --vocab 32000     # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def inputs(args, device, dtype):
    generator = torch.Generator(device="cpu").manual_seed(0)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    def head(requires_grad: bool) -> torch.nn.Linear:
        layer = torch.nn.Linear(args.hidden, args.vocab, bias=False, device="meta")
        layer.weight = torch.nn.Parameter(
            make(args.vocab, args.hidden, scale=args.hidden**-0.5), requires_grad
        )
        return layer

    hidden = make(args.tokens, args.hidden).requires_grad_(True)
    teacher_hidden = make(args.tokens, args.hidden)
    student_head, teacher_head = head(True), head(False)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    return hidden, teacher_hidden, student_head, teacher_head, labels


def step(variant: str, loss: str, tensors, chunk: int):
    hidden, teacher_hidden, student_head, teacher_head, labels = tensors
    weight, teacher_weight = student_head.weight, teacher_head.weight
    if variant == "naive":
        logits = (hidden @ weight.T).float()
        if loss == "ce":
            value = F.cross_entropy(logits, labels)
        else:
            with torch.no_grad():
                teacher_log = F.log_softmax((teacher_hidden @ teacher_weight.T).float(), -1)
            value = F.kl_div(F.log_softmax(logits, -1), teacher_log, log_target=True, reduction="batchmean")
    elif variant.startswith("lowbit"):
        from lowbit.losses import LossInputs, build_objective
        from lowbit.losses.fused_head import HeadInputs

        terms = [{"kind": "ce"}] if loss == "ce" else [{"kind": "kd_kl"}]
        objective = build_objective(terms)
        # Our terms count positions 0..T-2 predicting labels 1..T-1: shift the labels in by one.
        shifted = torch.cat([labels[:1], labels]).unsqueeze(0)
        head = HeadInputs(
            torch.cat([hidden, hidden[:1]]).unsqueeze(0), student_head,
            torch.cat([teacher_hidden, teacher_hidden[:1]]).unsqueeze(0), teacher_head, chunk,
        )  # fmt: skip
        value, _ = objective(LossInputs(labels=shifted), labels.numel(), head)
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

        if loss == "ce":
            value = LigerFusedLinearCrossEntropyLoss()(weight, hidden, labels)
        else:
            value = LigerFusedLinearJSD(jsd_beta=0.0)(hidden, weight, teacher_hidden, teacher_weight, None)
    value.backward()
    return value


def child(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tensors = inputs(args, device, dtype)
    if args.variant.startswith("lowbit"):  # import before measuring: module memory is not the loss's
        import lowbit.losses.fused_head  # noqa: F401
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(args.variant, args.loss, tensors, args.chunk)  # warm-up (kernel compilation, allocator)
    times = []
    for _ in range(args.repeat):
        tensors[0].grad = tensors[2].weight.grad = None
        started = time.perf_counter()
        step(args.variant, args.loss, tensors, args.chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    print(
        json.dumps({"seconds": sorted(times)[len(times) // 2], "extra_bytes": extra, "device": device.type})
    )


def variants(args) -> list[tuple[str, int, str]]:
    """(variant, chunk, fused-head backend) rows: naive, ours per chunk and backend, Liger."""
    ours = [("lowbit", int(chunk), "eager") for chunk in args.eager_chunks.split(",") if chunk]
    if torch.cuda.is_available():
        ours += [("lowbit", int(chunk), "compile") for chunk in args.chunks.split(",")]
    return [("naive", 0, "eager"), *ours, ("liger", 0, "eager")]


def label(variant: str, chunk: int, backend: str) -> str:
    return f"lowbit c{chunk} {backend}" if variant == "lowbit" else variant


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunks", default="512,1024", help="fused-head chunk sizes, compiled (CUDA)")
    parser.add_argument("--eager-chunks", default="256", help="fused-head chunk sizes, eager")
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    print(f"loss forward+backward from hidden states: T={args.tokens}, H={args.hidden}, V={args.vocab}")
    print(f"{'loss':<4} | {'variant':<22} | {'extra memory':>12} | {'time':>9} | vs naive")
    print("-" * 71, flush=True)
    for loss in ("kd", "ce"):
        base_time = None
        for variant, chunk, backend in variants(args):
            command = [sys.executable, __file__, "--variant", variant, "--loss", loss, "--chunk", str(chunk),
                       *sys.argv[1:]]  # fmt: skip
            env = {**os.environ, "LOWBIT_FUSED_HEAD_BACKEND": backend}
            if not torch.cuda.is_available():
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            name = label(variant, chunk, backend)
            if done.returncode != 0:  # printed as it comes, so a run cut short keeps its rows
                reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
                print(f"{loss:<4} | {name:<22} | {'-':>12} | {'-':>9} | {reason[:60]}", flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            seconds = result["seconds"]
            base_time = base_time or seconds
            memory = f"{result['extra_bytes'] / 2**30:.2f} GiB"
            print(f"{loss:<4} | {name:<22} | {memory:>12} | {seconds * 1e3:>7.1f}ms | {seconds / base_time:.2f}x",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
