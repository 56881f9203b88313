"""The compiled (fused) fake-quant path gives exactly the eager path's results."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from lowbit.quant import QuantSpec, fake_quantize
from lowbit.quant.fused import use_compiled
from lowbit.quant.grids import fake_quantize_blocks, to_blocks

pytestmark = pytest.mark.slow  # each spec compiles a kernel (seconds on a CPU)

SPECS = [
    QuantSpec("int4", "group", 32),
    QuantSpec("int4", "group", 32, symmetric=False),
    QuantSpec("int3", "group", 64),
    QuantSpec("int8", "channel"),
    QuantSpec.preset("gguf_q8_0"),
    QuantSpec.preset("gguf_q4_0"),
    QuantSpec.preset("gguf_q4_1"),
    QuantSpec.preset("nf4"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_compiled_path_is_bit_identical_to_eager(spec, monkeypatch):
    monkeypatch.setenv("LOWBIT_FAKE_QUANT_BACKEND", "compile")
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=generator) * 3
    w[0], w[1], w[2, 3] = 0.0, 0.3, 1e4  # zeros, a constant row, an outlier
    w.requires_grad_(True)
    assert use_compiled(w, spec)
    fused = fake_quantize(w, spec)
    eager = fake_quantize_blocks(to_blocks(w.detach(), spec), spec)[0].reshape(w.shape)
    assert torch.equal(fused, eager)
    upstream = torch.randn(w.shape, generator=generator)
    fused.backward(upstream)
    assert torch.equal(w.grad, upstream)  # the STE passes the gradient straight through


@pytest.mark.parametrize("spec", SPECS[:2] + SPECS[4:6], ids=lambda s: s.describe())
def test_compiled_path_keeps_bf16_weights_bit_identical(spec, monkeypatch):
    """The kernel reads and writes the stored dtype; its result is the eager fp32 grid cast back."""
    monkeypatch.setenv("LOWBIT_FAKE_QUANT_BACKEND", "compile")
    generator = torch.Generator().manual_seed(1)
    for shape in [(64, 128), (32, 256), (48, 96)]:  # layer shapes differ: one shape-generic kernel
        w = (torch.randn(shape, generator=generator) * 2).to(torch.bfloat16)
        fused = fake_quantize(w, spec)
        eager = fake_quantize_blocks(to_blocks(w, spec), spec)[0].reshape(w.shape).to(torch.bfloat16)
        assert fused.dtype == torch.bfloat16
        assert torch.equal(fused, eager)


def test_backend_setting(monkeypatch):
    spec, x = QuantSpec("int4", "group", 32), torch.zeros(2, 32)
    monkeypatch.setenv("LOWBIT_FAKE_QUANT_BACKEND", "auto")
    assert not use_compiled(x, spec)  # auto compiles on CUDA only
    assert not use_compiled(x, QuantSpec("fp8_e4m3", "tensor"))
    monkeypatch.setenv("LOWBIT_FAKE_QUANT_BACKEND", "fast")
    with pytest.raises(
        ValueError, match="LOWBIT_FAKE_QUANT_BACKEND='fast'; choose one of auto, compile, eager"
    ):
        use_compiled(x, spec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.describe())
def test_cuda_auto_path_matches_cpu_eager(spec):
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    on_gpu = fake_quantize(w.cuda(), spec).cpu()
    on_cpu = fake_quantize_blocks(to_blocks(w, spec), spec)[0].reshape(w.shape)
    assert torch.allclose(on_gpu, on_cpu, rtol=0, atol=1e-6 * float(w.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "spec",
    [QuantSpec("int4", "group", 32), QuantSpec("int8", "group", 64), QuantSpec("int3", "group", 128),
     QuantSpec("int4", "group", 32, scale_dtype="fp16"), QuantSpec("int2", "group", 16, scale_dtype="bf16"),
     QuantSpec("int4", "group", 32, range="restricted"), QuantSpec("int3", "group", 64, range="restricted")],
    ids=lambda s: f"{s.describe()}-{s.scale_dtype}",
)  # fmt: skip
def test_triton_kernel_is_bit_identical_to_cpu_eager(spec, dtype):
    from lowbit.quant import triton_fake_quant

    generator = torch.Generator().manual_seed(3)
    w = (torch.randn(301, 256, generator=generator) * 3).to(dtype)  # 301 rows: a partial last tile
    w[0], w[1], w[2, 3] = 0.0, 0.3, 6e4  # zeros, a constant row, an outlier
    w[4] = 1e-30 if dtype != torch.float16 else 0.0  # a block whose scale underflows to the floor
    w[5, :16] = torch.tensor([0.5, -0.5, 1.5, 2.5] * 4)  # exact halves: ties round to even
    w[6, :16] = -torch.linspace(0.0, 1.0, 16)  # a negative absmax: the full range's tie
    assert triton_fake_quant.supports(w.cuda(), spec)
    on_gpu = triton_fake_quant.fake_quantize_triton(w.cuda(), spec).cpu()
    eager = fake_quantize_blocks(to_blocks(w, spec), spec)[0].reshape(w.shape).to(dtype)
    assert torch.equal(on_gpu, eager)


INTERPRETED = """
import torch
from lowbit.quant import QuantSpec, triton_fake_quant
from lowbit.quant.grids import fake_quantize_blocks, to_blocks

checked = 0
for range_ in ("restricted", "full"):
    for bits, group, scale_dtype in ((4, 32, "fp32"), (3, 64, "fp32"), (8, 64, "fp32"), (4, 32, "fp16"), (2, 16, "fp32")):
        spec = QuantSpec(f"int{bits}", "group", group, scale_dtype=scale_dtype, range=range_)
        for dtype in (torch.float32, torch.float16):
            generator = torch.Generator().manual_seed(bits)
            w = (torch.randn(77, 128, generator=generator) * 3).to(dtype)  # 77 rows: a partial last tile
            w[0], w[1], w[2, 3] = 0.0, 0.3, 6e4 if dtype == torch.float32 else 6e3  # zeros, constant row, outlier
            w[3, :16] = torch.tensor([0.5, -0.5, 1.5, 2.5] * 4)  # exact halves: ties round to even
            w[4, :group] = -torch.linspace(0.0, 1.0, group)  # a negative absmax on the full range's tie
            ours = triton_fake_quant.fake_quantize_triton(w.contiguous(), spec)
            eager = fake_quantize_blocks(to_blocks(w, spec), spec)[0].reshape(w.shape).to(dtype)
            assert torch.equal(ours, eager), (spec.describe(), dtype, (ours != eager).sum())
# (bf16 scales are left to the CUDA test: the interpreter's bfloat16 cast does not round to nearest
# even — 1,709 of 9,856 int2 values differed — a property of the interpreter, not of the kernel.)
            checked += 1
print("identical", checked)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (CUDA images ship it)")
def test_triton_kernel_under_the_interpreter_is_bit_identical_to_eager():
    """The same kernel on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, read when
    the kernel is defined, hence a fresh process), restricted and full range: where the kernel's
    arithmetic is checked without a GPU. Speed is a GPU question (benchmarks/fake_quant_speed.py)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical 20" in done.stdout
