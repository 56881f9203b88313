"""A fused fake-quant path: the same grid arithmetic compiled by ``torch.compile`` (Inductor).

Eager fake quant of a group-wise weight launches ~10 elementwise/reduction kernels that each
read and write the whole tensor; compiled, it is one or two fused kernels (a Triton kernel on
CUDA, C++/OpenMP on CPU) that read the weight once. The compiled function is the very
``fake_quantize_blocks`` of ``grids``, so the results are those of the eager path (tests check
bit equality).

Backend choice, read at call time from ``LOWBIT_FAKE_QUANT_BACKEND``: ``auto`` (compiled on
CUDA, eager elsewhere; the default), ``compile`` (compiled everywhere), ``eager``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from lowbit.quant.grids import fake_quantize_blocks
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
    """One compiled function per spec (the spec's fields are constants inside the kernel)."""

    def run(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, params, codes = fake_quantize_blocks(blocks, spec)
        return out, params.scale, codes

    # emulate_precision_casts: keep the fp16 rounding of stored scales (GGUF) that Inductor would
    # otherwise fold away as a redundant cast, changing results.
    return torch.compile(run, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})


def fused_fake_quantize_blocks(blocks: Tensor, spec: QuantSpec) -> Tensor:
    """Dequantized blocks, computed by the compiled kernel for ``spec``."""
    out, _, _ = _compiled(spec)(blocks)
    return out
