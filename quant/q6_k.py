"""llama.cpp's Q6_K quantizer, bytes for bytes: how ``llama-quantize`` stores output/embedding tables.

``llama-quantize`` writes a model's output head (or its tied token embeddings) as Q6_K when the
rows are whole 256-value super-blocks. The ``gguf`` package only *reads* Q6_K, so this module
writes it, following ``quantize_row_q6_K_ref`` in ggml-quants.c step by step in float32 — each
sub-block of 16 values searched by ``make_qx_quants(16, 32, x, L, rmse_type=1)`` (19 candidate
scales, error weighted by x², sums accumulated in element order as C does), the 16 sub-block
scales quantized to int8 against a fp16 super-block scale, then every value re-rounded to its
final 6-bit code. Vectorised over blocks, sequential where C is (the sums), so the float32
rounding is C's own: tests compare the bytes with ggml's ``quantize_row_q6_K_ref`` itself, as built
for x86-64 without FMA (a build that contracts ``w*x*l`` into fused multiply-adds, as compilers do
by default on aarch64, may differ in the last bit of a sum and so, rarely, in a chosen scale).
Finite inputs only (the exporter refuses others): C's scans skip NaN where ``argmax`` does not.

Block layout (210 bytes per 256 values): ``ql[128]`` low 4 bits, ``qh[64]`` high 2 bits,
``scales[16]`` int8, ``d`` fp16.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = 210
GROUP_MAX_EPS = np.float32(1e-15)
_MAGIC = np.float32(12582912.0)  # 1.5 · 2^23: ggml's nearest_int (round half to even)


def _nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5·2^23 in float32 and read the integer back (ties to even)."""
    return ((values.astype(np.float32) + _MAGIC).view(np.int32) & 0x007FFFFF) - 0x00400000


def _weighted_sums(x: np.ndarray, weight: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σ w·x·l and Σ w·l·l per row, accumulated element by element in float32 (C's order)."""
    sumlx = np.zeros(x.shape[0], np.float32)
    suml2 = np.zeros(x.shape[0], np.float32)
    levels = codes.astype(np.float32)
    for i in range(x.shape[1]):
        sumlx = sumlx + weight[:, i] * x[:, i] * levels[:, i]
        suml2 = suml2 + weight[:, i] * levels[:, i] * levels[:, i]
    return sumlx, suml2


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale per row, codes L in [0, 2·nmax)) of ggml's ``make_qx_quants(n, nmax, x, L, 1, NULL)``
    for each row of ``x`` (float32, one sub-block per row)."""
    x = x.astype(np.float32)
    rows = np.arange(x.shape[0])
    index = np.abs(x).argmax(axis=1)  # the first largest |x|, as C's strict '>' scan keeps
    signed_max = x[rows, index]
    zero = np.abs(signed_max) < GROUP_MAX_EPS
    safe_max = np.where(zero, np.float32(1), signed_max).astype(np.float32)
    weight = x * x  # rmse_type 1

    def codes_for(iscale: np.ndarray) -> np.ndarray:
        return np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    iscale = (np.float32(-nmax) / safe_max).astype(np.float32)
    levels = codes_for(iscale)
    sumlx, suml2 = _weighted_sums(x, weight, levels)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, np.float32(1)), np.float32(0)).astype(
        np.float32
    )
    best = (scale * sumlx).astype(np.float32)
    for step in range(-9, 10):
        if step == 0:
            continue
        trial = (-(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / safe_max).astype(np.float32)
        trial_levels = codes_for(trial)
        lx, l2 = _weighted_sums(x, weight, trial_levels)
        better = (l2 > 0) & (lx * lx > best * l2)
        levels = np.where(better[:, None], trial_levels, levels)
        scale = np.where(better, lx / np.where(l2 > 0, l2, np.float32(1)), scale).astype(np.float32)
        best = np.where(better, scale * lx, best).astype(np.float32)
    codes = (levels + nmax).astype(np.int32)
    codes[zero] = 0
    scale[zero] = 0
    return scale, codes


def quantize_q6_k(values: np.ndarray, chunk_values: int = 1 << 22) -> np.ndarray:
    """A float matrix (rows of whole 256-value blocks) as Q6_K bytes: uint8 [rows, cols/256·210].
    Rows go ``chunk_values`` values at a time: the search's temporaries are ~7× their size."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, cols = values.shape
    if cols % QK_K:
        raise ValueError(f"Q6_K stores rows of whole {QK_K}-value blocks; a row here holds {cols}")
    if not np.isfinite(values).all():
        raise ValueError("Q6_K: the values hold NaN or infinities")
    step = max(1, chunk_values // cols)
    return np.concatenate([_quantize_blocks(values[i : i + step]) for i in range(0, rows, step)])


def _quantize_blocks(values: np.ndarray) -> np.ndarray:
    rows = values.shape[0]
    blocks = values.reshape(-1, QK_K)
    n = blocks.shape[0]
    sub_scales, codes = make_qx_quants(blocks.reshape(-1, 16), 32)
    sub_scales, codes = sub_scales.reshape(n, 16), codes.reshape(n, QK_K)
    index = np.abs(sub_scales).argmax(axis=1)
    max_scale = sub_scales[np.arange(n), index]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = (np.float32(-128) / np.where(empty, np.float32(1), max_scale)).astype(np.float32)
    d = (np.float32(1) / iscale).astype(np.float16)
    scales = np.minimum(127, _nearest_int(iscale[:, None] * sub_scales)).astype(np.int8)
    step = d.astype(np.float32)[:, None] * scales.astype(np.float32)  # per sub-block: fp16(d) · scale
    per_value = np.repeat(step, 16, axis=1)
    nonzero = per_value != 0
    final = np.clip(_nearest_int(blocks / np.where(nonzero, per_value, np.float32(1))), -32, 31) + 32
    codes = np.where(nonzero, final, codes)  # a sub-block whose scale rounds to 0 keeps its first codes
    codes[empty] = 0
    d[empty] = 0
    scales[empty] = 0
    return _pack(codes.astype(np.uint8), scales, d).reshape(rows, -1)


def _pack(codes: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ggml's block_q6_K byte layout for each row of 256 codes in [0, 64)."""
    n = codes.shape[0]
    halves = codes.reshape(n, 2, 4, 32)  # [half of 128][quarter l+0/32/64/96][l]
    low, high = halves & 0xF, halves >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.empty((n, BLOCK_BYTES), np.uint8)
    out[:, :128] = ql.reshape(n, 128)
    out[:, 128:192] = qh.reshape(n, 64)
    out[:, 192:208] = scales.view(np.uint8)
    out[:, 208:210] = d.reshape(n, 1).view(np.uint8)
    return out
