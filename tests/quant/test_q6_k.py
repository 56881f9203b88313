"""Q6_K (how llama-quantize stores output/embedding tables): lowbit's writer against ggml's own
``quantize_row_q6_K_ref`` (called from llama.cpp's libggml-base through ctypes), byte for byte,
and the exporter's choice of it."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from lowbit.quant import quantize_model
from lowbit.quant.formats import ExportError, collect
from lowbit.quant.formats import gguf as gguf_format
from lowbit.quant.q6_k import quantize_q6_k
from lowbit.trainer.byte_tokenizer import byte_tokenizer
from tests.quant.test_export_gguf import tiny_llama


def ggml_q6_k(values: np.ndarray) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    quantize = library.quantize_row_q6_K_ref
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    values = np.ascontiguousarray(values, dtype=np.float32)
    out = np.zeros(values.size // 256 * 210, np.uint8)
    quantize(values.ctypes.data, out.ctypes.data, values.size)
    return out.reshape(values.shape[0], -1)


def edge_cases(seed: int) -> np.ndarray:
    """Fresh Gaussian rows plus what a block can hold: all zeros, a zero sub-block, values below
    ggml's 1e-15 floor, one outlier, a constant block, heavy tails, a sub-block whose scale rounds
    to zero next to a large one, exact halves."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((48, 512)) * 0.05).astype(np.float32)
    x[0] = 0.0
    x[1, :16] = 0.0
    x[2, :256] = 1e-20
    x[3, 5] = 3.0
    x[4] = 0.01
    x[5, :256] = rng.standard_normal(256).astype(np.float32) * 1e-4
    x[5, 7] = 50.0
    x[6] = rng.standard_t(2, 512).astype(np.float32)
    x[7, :64] = np.tile([0.5, -0.5, 1.5, -1.5], 16)
    x[8, :256] = -np.abs(x[8, :256])
    return x


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_q6_k_bytes_equal_ggmls_reference_quantizer(seed):
    values = edge_cases(seed)
    ours = quantize_q6_k(values)
    theirs = ggml_q6_k(values)
    assert ours.shape == theirs.shape == (48, 2 * 210)
    mismatched = np.argwhere(ours != theirs)
    assert len(mismatched) == 0, (
        f"{len(mismatched)} bytes differ, first at (row, byte) {mismatched[:5].tolist()}"
    )
    assert np.array_equal(quantize_q6_k(values, chunk_values=1024), ours)  # 2 rows at a time: the same bytes


def test_q6_k_reads_back_within_its_step():
    """gguf's reader dequantizes our bytes close to the input: each value within half a 6-bit step
    of its sub-block (~absmax/31 with the search's clipping) plus the error of that step itself,
    which is stored as int8 against the 256-block's largest (≤ 1/256 of its step range · 32 codes);
    blocks below ggml's 1e-15 floor read back as zeros."""
    values = edge_cases(7)
    back = gguf_quants.dequantize(quantize_q6_k(values), GGMLQuantizationType.Q6_K)
    sub = np.abs(values).reshape(-1, 16).max(axis=1, keepdims=True)
    block = np.abs(values).reshape(-1, 256).max(axis=1, keepdims=True)
    bound = sub / 31 + np.repeat(block / 128, 16, axis=0) + 1e-15  # ggml writes blocks under 1e-15 as zeros
    assert np.all(np.abs(back - values).reshape(-1, 16) <= bound)


def test_quantized_files_store_256_wide_embeddings_as_q6_k_like_llama_quantize(tmp_path):
    """Rows of whole 256-value blocks: the tied embeddings Q6_K (llama-quantize's choice for the
    output table) but in Q8_0 files; other widths Q8_0; asking for Q6_K where rows do not fit is
    refused with a fix; NaN embeddings are refused."""
    model = tiny_llama(hidden=256, intermediate=512)
    quantize_model(model, [{"match": "model.layers.*", "weight": "gguf_q4_0"}])
    inputs = collect(model, byte_tokenizer())
    inputs.extra.update(gguf_type="q4_0", float_type="f32")
    gguf_format.write(inputs, tmp_path / "q4_0.gguf")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "q4_0.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.Q6_K
    expected = quantize_q6_k(inputs.state["model.embed_tokens.weight"].float().numpy())
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data), expected)
    inputs.extra.update(gguf_type="q8_0")  # llama-quantize keeps a Q8_0 file's output table Q8_0
    embeddings = inputs.state["model.embed_tokens.weight"]
    assert gguf_format.stored_type("model.embed_tokens.weight", embeddings, inputs) == "q8_0"
    narrow = collect(tiny_llama(hidden=64))
    narrow.extra.update(gguf_type="q4_0", embedding_type="q6_k")
    with pytest.raises(
        ExportError, match=r"hold 64 values, not whole 256-value Q6_K blocks; store it as q8_0"
    ):
        gguf_format.check(narrow)
    narrow.extra.update(embedding_type=None)
    assert gguf_format.stored_type("model.embed_tokens.weight", torch.zeros(262, 64), narrow) == "q8_0"
    bad = collect(tiny_llama(hidden=256))
    bad.state["model.embed_tokens.weight"][3, 7] = float("nan")
    bad.extra.update(gguf_type="q4_0")
    with pytest.raises(ExportError, match="model.embed_tokens.weight holds NaN or infinite values"):
        gguf_format.check(bad)
