"""A fused fake-quant path: the same grid arithmetic compiled by ``torch.compile`` (Inductor).

Eager fake quant of a group-wise weight launches ~10 elementwise/reduction kernels that each
read and write the whole tensor; compiled, it is one or two fused kernels (a Triton kernel on
CUDA, C++/OpenMP on CPU) that read the weight once. The compiled function is the very
``fake_quantize_blocks`` of ``grids``, so the results are those of the eager path (tests check
bit equality).

On CUDA the commonest weight grid (symmetric int, groups of 8–256) goes instead to a hand-written
Triton kernel (``lowbit.quant.triton_fake_quant``), which reaches more of the copy bandwidth than
Inductor's schedule; it too is bit-identical to the eager path (CUDA tests).

Backend choice, read at call time from ``LOWBIT_FAKE_QUANT_BACKEND``: ``auto`` (on CUDA the Triton
kernel where it applies, else compiled; eager elsewhere; the default), ``compile`` (compiled
everywhere, never the Triton kernel), ``eager``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from lowbit.quant import triton_fake_quant
from lowbit.quant.grids import fake_quantize_blocks, to_blocks
from lowbit.quant.spec import INT_BITS, QuantSpec

BACKENDS = ("auto", "compile", "eager")


def backend() -> str:
    value = os.environ.get("LOWBIT_FAKE_QUANT_BACKEND", "auto")
    if value not in BACKENDS:
        raise ValueError(f"LOWBIT_FAKE_QUANT_BACKEND={value!r}; choose one of {', '.join(BACKENDS)}")
    return value


def use_compiled(x: Tensor, spec: QuantSpec) -> bool:
    """Whether ``x`` goes through the compiled path: integer grids, per the backend setting."""
    if spec.dtype not in INT_BITS and spec.dtype != "nf4":
        return False
    choice = backend()
    return choice == "compile" or (choice == "auto" and x.is_cuda)


@functools.cache
def _compiled(spec: QuantSpec):
    return compile_fake_quantize(spec)


def compile_fake_quantize(spec: QuantSpec, **inductor_options):
    """A compiled fake quant for ``spec`` (the spec's fields are constants inside the kernel).

    One compiled function per spec (the spec's fields are constants inside the kernel).

    It takes the tensor as stored and returns its fake quant in the same dtype and shape, and
    nothing else: the fp32 block view, the scales and the codes stay in registers, so the
    kernel reads the weight once and writes the result once (returning the fp32 output or the
    codes as well would more than double the memory traffic).
    """

    def run(x: Tensor) -> Tensor:
        out, _, _ = fake_quantize_blocks(to_blocks(x, spec), spec)
        return out.reshape(x.shape).to(x.dtype)

    # Every spec's ``run`` shares one code object, and Dynamo counts recompilations per code
    # object (specs x dtypes x shape families): raise its limit, which fullgraph would otherwise
    # turn into a hard error on a model with many layer shapes. ``dynamic=None`` compiles a
    # shape-generic kernel once a second shape is seen, instead of one kernel per layer shape.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # emulate_precision_casts: keep the fp16 rounding of stored scales (GGUF) that Inductor would
    # otherwise fold away as a redundant cast, changing results.
    options = {"emulate_precision_casts": True, **inductor_options}
    return torch.compile(run, dynamic=None, fullgraph=True, options=options)


def fused_fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """``x`` fake-quantized by one fused kernel for ``spec`` (same shape and dtype)."""
    if backend() == "auto" and triton_fake_quant.supports(x, spec):
        return triton_fake_quant.fake_quantize_triton(x, spec)
    return _compiled(spec)(x)
