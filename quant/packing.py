"""Bit packing for llama.cpp's GGUF block formats, as plain tensor/array functions.

A GGUF block holds the codes of ``block_size`` consecutive elements of a row and their scale
(and minimum), bytes laid out exactly as ggml's C structs:

============  ===========  ==================================================================
type          block bytes  layout (``c`` = unsigned code, value = ``d·(c − 8)`` etc.)
============  ===========  ==================================================================
``Q8_0``      2 + 32       ``d`` fp16, 32 × int8 ``q`` (value ``d·q``)
``Q4_0``      2 + 16       ``d`` fp16, ``qs[j] = c[j] | c[j+16] << 4`` (value ``d·(c − 8)``)
``Q4_1``      2 + 2 + 16   ``d`` fp16, ``m`` fp16, nibbles as Q4_0 (value ``d·c + m``)
``TQ2_0``     64 + 2       2-bit ``c = t + 1`` four per byte, then ``d`` fp16 (value ``d·t``)
``TQ1_0``     48 + 4 + 2   ``c = t + 1`` five per byte in base 3, then ``d`` fp16
============  ===========  ==================================================================

The ternary types' base-3 packing is done by the ``gguf`` package's own reference code (the
format's implementation, byte-identical to llama.cpp's), fed the codes themselves with a unit
scale; the scale bytes are then set to ours. Reading back always goes through
``gguf.quants.dequantize``, the format's own reader.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

QK_TERNARY = 256


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """``[rows, blocks]`` float → ``[rows, blocks, 2]`` little-endian fp16 bytes."""
    return values.astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """``[..., 32]`` codes 0..15 → ``[..., 16]`` bytes, ``c[j] | c[j+16] << 4`` (ggml's order)."""
    codes = codes.astype(np.uint8)
    return codes[..., :16] | (codes[..., 16:] << np.uint8(4))


def _unnibble(packed: np.ndarray) -> np.ndarray:
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)


def pack_blocks(
    codes: np.ndarray,
    scales: np.ndarray,
    qtype: GGMLQuantizationType,
    minimums: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of GGUF blocks: ``[rows, cols]`` codes and ``[rows, cols / block]`` scales → uint8 bytes.

    ``codes`` are the format's stored integers: int8 ``q`` for Q8_0, ``c`` in 0..15 for Q4_0/Q4_1,
    ternary ``t`` in {-1, 0, 1} for TQ1_0/TQ2_0. ``minimums`` only for Q4_1.
    """
    rows, cols = codes.shape
    size = block_size(qtype)
    if cols % size:
        raise ValueError(f"{qtype.name} packs rows in blocks of {size}; a row of {cols} does not divide")
    blocks = codes.reshape(rows, cols // size, size)
    d = _fp16_bytes(scales.reshape(rows, cols // size))
    if qtype == GGMLQuantizationType.Q8_0:
        body = np.concatenate([d, blocks.astype(np.int8).view(np.uint8)], axis=-1)
    elif qtype == GGMLQuantizationType.Q4_0:
        body = np.concatenate([d, _nibbles(blocks)], axis=-1)
    elif qtype == GGMLQuantizationType.Q4_1:
        assert minimums is not None, "Q4_1 needs the per-block minimums"
        body = np.concatenate(
            [d, _fp16_bytes(minimums.reshape(rows, cols // size)), _nibbles(blocks)], axis=-1
        )
    elif qtype in (GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0):
        # The reference quantizer maps x to roundf(x / absmax(block)): for codes that already are
        # ternary it returns them unchanged (a block of zeros included), whatever its own scale.
        packed = gguf_quants.quantize(blocks.reshape(rows, cols).astype(np.float32), qtype)
        body = packed.reshape(rows, cols // size, -1).copy()
        body[..., -2:] = d
    else:
        raise ValueError(f"no packer for {qtype.name}")
    return body.reshape(rows, -1)


def unpack_blocks(
    data: np.ndarray, qtype: GGMLQuantizationType, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inverse of ``pack_blocks``: (codes ``[rows, cols]``, scales, minimums or None), float32 scales."""
    size = block_size(qtype)
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // size, -1)
    minimums = None
    if qtype == GGMLQuantizationType.Q8_0:
        scales, codes = blocks[..., :2], blocks[..., 2:].view(np.int8).astype(np.int16)
    elif qtype == GGMLQuantizationType.Q4_0:
        scales, codes = blocks[..., :2], _unnibble(blocks[..., 2:]).astype(np.int16)
    elif qtype == GGMLQuantizationType.Q4_1:
        scales, minimums = blocks[..., :2], blocks[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32)
        codes = _unnibble(blocks[..., 4:]).astype(np.int16)
    else:  # ternary: decode with a unit scale through the reference reader
        scales = blocks[..., -2:].copy()
        unit = blocks.copy()
        unit[..., -2:] = _fp16_bytes(np.ones((rows, cols // size), np.float32))
        codes = gguf_quants.dequantize(unit.reshape(rows, -1), qtype).astype(np.int16)
    scales = scales.copy().view("<f2")[..., 0].astype(np.float32)
    return codes.reshape(rows, cols), scales, minimums
