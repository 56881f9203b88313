"""Fake-quant speed: kernel bandwidth, and the training-step overhead of w4a8 QAT.

Part 1 — weight fake quant (int4, group 32, symmetric) of one large weight: effective GB/s
(bytes read + written) of our eager path, our fused (compiled) path and, when installed,
torchao's ``IntxFakeQuantizer`` (eager and compiled), against a plain device copy of the same
tensor measured in the same run.

Part 2 — one training step (forward, backward, AdamW) of a Llama-shaped model: plain vs w4a8
QAT (int4 g32 weights + int8 per-token activations, our ``quantize_model``), eager and under
``torch.compile``; the ratio is the QAT overhead.

    python benchmarks/fake_quant_speed.py                      # CUDA: 1B-class shape, bf16
    python benchmarks/fake_quant_speed.py --small              # a CPU-sized shape, fp32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lowbit.quant import QuantSpec, quantize_model, triton_fake_quant
from lowbit.quant.fused import compile_fake_quantize, fused_fake_quantize
from lowbit.quant.grids import fake_quantize_blocks, to_blocks


def timed(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def kernel_table(device: torch.device, dtype: torch.dtype, rows: int, cols: int, repeat: int) -> None:
    spec = QuantSpec("int4", "group", 32)
    weight = torch.randn(rows, cols, device=device, dtype=dtype)
    out = torch.empty_like(weight)
    compiled = compile_fake_quantize(spec)
    moved = 2 * weight.numel() * weight.element_size()  # read the weight, write its fake quant
    candidates: dict[str, Callable[[], object]] = {
        "device copy (baseline)": lambda: out.copy_(weight),
        "lowbit eager": lambda: fake_quantize_blocks(to_blocks(weight, spec), spec)[0].to(dtype),
        "lowbit fused (compiled)": lambda: compiled(weight),
    }
    if triton_fake_quant.supports(weight, spec):
        candidates["lowbit Triton kernel (auto on CUDA)"] = lambda: fused_fake_quantize(weight, spec)
        same = torch.equal(fused_fake_quantize(weight, spec), compiled(weight))
        print(f"Triton kernel bit-identical to the compiled grid on this weight: {same}")
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

        torchao_fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True))
        candidates["torchao IntxFakeQuantizer"] = lambda: torchao_fq(weight)
        compiled_torchao = torch.compile(torchao_fq)
        candidates["torchao, torch.compile"] = lambda: compiled_torchao(weight)
    except ImportError:
        print("(torchao not installed: its rows are skipped)")
    results = {name: timed(fn, device, repeat) for name, fn in candidates.items()}
    copy_bandwidth = moved / results["device copy (baseline)"] / 1e9
    print(
        f"\nweight fake quant, int4 g32 sym, [{rows} x {cols}] {str(dtype).removeprefix('torch.')} on {device.type}"
    )
    print(f"{'path':<28} | {'time':>9} | {'GB/s':>8} | {'of copy':>7}")
    print("-" * 62)
    for name, seconds in results.items():
        bandwidth = moved / seconds / 1e9
        print(
            f"{name:<28} | {seconds * 1e3:>7.3f}ms | {bandwidth:>8.1f} | {100 * bandwidth / copy_bandwidth:>6.1f}%"
        )


def llama(hidden: int, layers: int, vocab: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=8192,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)


def step_table(device, dtype, hidden, layers, seq, vocab, repeat, compile_modes) -> None:
    print(f"\ntraining step, Llama hidden {hidden} x {layers} layers, seq {seq}, batch 1, "
          f"{str(dtype).removeprefix('torch.')} on {device.type}")  # fmt: skip
    print(f"{'model':<14} | {'compile':<7} | {'step':>9} | {'vs plain':>8}")
    print("-" * 48)
    ids = torch.randint(0, vocab, (1, seq), device=device)
    for compiled in compile_modes:
        plain_time = None
        for variant in ("plain", "w4a8 QAT"):
            model = llama(hidden, layers, vocab, device, dtype)
            if variant != "plain":
                quantize_model(model, [{"match": "*", "weight": "w4a8", "activation": "w4a8"}])
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            forward = torch.compile(model) if compiled else model

            def step(forward=forward, optimizer=optimizer) -> None:
                loss = forward(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds = timed(step, device, repeat, warmup=3 if compiled else 2)
            plain_time = plain_time or seconds
            print(
                f"{variant:<14} | {'yes' if compiled else 'no':<7} | {seconds * 1e3:>7.1f}ms | {seconds / plain_time:>7.2f}x"
            )
            del model, optimizer, forward
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--small", action="store_true", help="CPU-sized shapes (the default on a machine without CUDA)"
    )
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile step timings")
    parser.add_argument("--kernel-only", action="store_true", help="skip the training-step table")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    dtype = torch.float32 if small else torch.bfloat16
    rows, cols = (2048, 2048) if small else (8192, 8192)
    kernel_table(device, dtype, rows, cols, args.repeat)
    hidden, layers, seq, vocab = (256, 4, 256, 8192) if small else (2048, 16, 2048, 32000)
    if args.kernel_only:
        return
    modes = [False] if args.no_compile else [False, True]
    step_table(device, dtype, hidden, layers, seq, vocab, max(5, args.repeat // 4), modes)


if __name__ == "__main__":
    main()
