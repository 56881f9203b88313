"""llama.cpp itself loads and runs every GGUF type lowbit writes, and computes the model's logits.

A tiny Llama (rows of 256: one TQ block; the byte tokenizer, whose vocabulary llama.cpp loads) is
quantized on each type's grid, exported, and run by llama.cpp (``llama-cpp-python``, built from
source), K/V cached in f32. llama.cpp rounds activations its own way before each quantized matmul,
so its logits are not ours bit for bit; the tolerance is derived from that rounding (see
``check_logits``). A wrong row order moves the logits by far more: writing the llama files without
llama.cpp's Q/K permutation fails all 7 llama cases, and the bitnet files with it both bitnet cases.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

from lowbit.quant import FakeQuantizer, QuantSpec, quantize_model
from lowbit.quant.formats import collect, gguf
from lowbit.trainer.byte_tokenizer import byte_tokenizer
from lowbit.trainer.subln import apply_subln

llama_cpp = pytest.importorskip("llama_cpp")

# the weight preset of each type, and llama.cpp's activation block for its matmuls
TYPES = {
    "f16": (None, None),
    "f32": (None, None),
    "q8_0": ("gguf_q8_0", 32),
    "q4_0": ("gguf_q4_0", 32),
    "q4_1": ("gguf_q4_1", 32),
    "tq2_0": ({"preset": "gguf_ternary"}, 256),
    "tq1_0": ({"preset": "gguf_ternary"}, 256),
}
BITNET_WEIGHT = {"preset": "bitnet", "scale_dtype": "fp16"}
FLOOR = 2e-4


@pytest.fixture(scope="module")
def base():
    config = transformers.LlamaConfig(
        vocab_size=262, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
        initializer_range=0.1,  # layers that change the logits as much as the embeddings do
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def run_llama_cpp(path, ids: list[int]) -> torch.Tensor:
    # K/V cached in f32 (llama.cpp's default is f16): the comparison is about the weights
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # fmt: skip
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    finally:
        llm.close()


def as_stored(model, kind: str):
    """``model`` as the file holds it: quantized weights are exact (the export's self-check); an
    f16 file also rounds every other matrix to f16 (norms stay f32 in GGUF)."""
    stored = copy.deepcopy(model)
    if kind == "f16":
        with torch.no_grad():
            for param in stored.parameters():
                if param.dim() == 2:
                    param.copy_(param.half().float())
    return stored


def llama_cpp_activations(model, kind: str):
    """``model`` with activations rounded before each matmul as llama.cpp's dot products take them:
    Q8_0 blocks (32 values, fp16 scale) for Q8_0/Q4_0/Q4_1 weights (Q8_1 quantizes alike), Q8_K
    blocks of 256 (float scale) for TQ1_0/TQ2_0, f16 for f16 weights (the tied head too, stored f16)."""
    emulated = copy.deepcopy(model)
    spec = {"q8_0": "gguf_q8_0", "q4_0": "gguf_q8_0", "q4_1": "gguf_q8_0"}.get(kind)
    if kind.startswith("tq"):
        spec = QuantSpec("int8", "group", 256)
    for module in emulated.modules():
        if not isinstance(module, torch.nn.Linear) or (module is emulated.lm_head and kind != "f16"):
            continue
        if spec is not None:
            module.activation_quantizer = FakeQuantizer(QuantSpec.from_config(spec, "activation"))
        elif kind == "f16":
            module.register_forward_pre_hook(lambda _, args: (args[0].half().float(),))
    return emulated


def check_logits(model, path, kind: str) -> None:
    """|llama.cpp − ours| ≤ 2·E_a + 1e-5 of the logit range, E_a = how far llama.cpp's activation
    rounding, applied in our model, moves our logits (llama.cpp and we each round; at a near-tie a
    code can land one step apart, so up to about twice E_a). Measured: f32 1.2e-5 (E_a = 0);
    TQ1_0/TQ2_0 4e-6 apart from the rounding emulated exactly; Q8_0/Q4_0/Q4_1 0.21-0.23 against
    E_a 0.21-0.24 (llama.cpp's Q8_1 keeps an fp16 block sum); logits up to ~6."""
    tokenizer = byte_tokenizer()
    ids = tokenizer("The people of the United States", add_special_tokens=False)["input_ids"]
    got = run_llama_cpp(path, ids)
    reference = as_stored(model, kind)
    with torch.no_grad():
        ours = reference(torch.tensor([ids])).logits[0]
        emulated = llama_cpp_activations(reference, kind)(torch.tensor([ids])).logits[0]
    activation_rounding = (emulated - ours).abs().max().item()
    assert (got - ours).abs().max().item() <= 2 * activation_rounding + 1e-5 * ours.abs().max().item()


@pytest.mark.parametrize("kind", list(TYPES))
def test_llama_cpp_runs_each_type_with_the_models_logits(base, tmp_path, kind):
    preset, block = TYPES[kind]
    model = copy.deepcopy(base)
    if preset is not None:
        quantize_model(model, [{"match": "*", "weight": preset}])
    inputs = collect(model, byte_tokenizer())
    # quantized types store the other tensors in f32 here, so only the weights' grid is compared
    inputs.extra.update(
        gguf_type="f16" if kind == "f32" else kind,
        float_type="f16" if kind == "f16" else "f32",
        embedding_type="f16" if kind == "f16" else "f32",
    )
    path = tmp_path / f"{kind}.gguf"
    gguf.write(inputs, path)
    check_logits(model, path, kind)


@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0"])
def test_llama_cpp_runs_a_subln_bitnet_model(base, tmp_path, kind):
    """SubLN + ternary weights + int8 per-token activations, as llama.cpp's bitnet architecture."""
    model = copy.deepcopy(base)
    apply_subln(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.attn_sub_norm.weight.uniform_(0.5, 1.5)
            layer.mlp.ffn_sub_norm.weight.uniform_(0.5, 1.5)
    quantize_model(model, [{"match": "*", "weight": BITNET_WEIGHT, "activation": "bitnet"}])
    inputs = collect(model, byte_tokenizer())
    inputs.extra.update(gguf_type=kind, float_type="f32", embedding_type="f32")
    path = tmp_path / f"bitnet-{kind}.gguf"
    gguf.write(inputs, path)
    assert gguf.metadata(path)["general.architecture"] == "bitnet"
    check_logits(model, path, kind)


@pytest.mark.parametrize("embedding, stored", [(None, "Q6_K"), ("q8_0", "Q8_0")])
def test_llama_cpp_runs_a_file_with_quantized_embeddings(base, tmp_path, embedding, stored):
    """The default for quantized files: the tied embeddings as llama-quantize stores them — Q6_K for
    rows of whole 256-value blocks (this model's), Q8_0 when asked (or when rows are not)."""
    model = copy.deepcopy(base)
    quantize_model(model, [{"match": "*", "weight": "gguf_q4_0"}])
    inputs = collect(model, byte_tokenizer())
    inputs.extra.update(gguf_type="q4_0", float_type="f32", embedding_type=embedding)
    path = tmp_path / "q4_0.gguf"
    gguf.write(inputs, path)
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}[
        "token_embd.weight"
    ] == stored
    with torch.no_grad():  # our model with the embeddings the file holds
        model.model.embed_tokens.weight.copy_(gguf.read(path)["model.embed_tokens.weight"])
    check_logits(model, path, "q4_0")


def test_training_with_llama_cpps_activation_rounding_gives_llama_cpps_logits(base, tmp_path):
    """``activation: gguf_q8_0`` beside Q4_0 weights is the model llama.cpp computes: its logits sit
    within what llama.cpp's other roundings leave (fp16 scales' products, its SIMD rounding mode),
    measured 0.011 here, against 0.23 from the weight-only model of the same file. The bound (a fifth
    of the weight-only distance) leaves 4× room and fails when the activations are not rounded."""
    tokenizer = byte_tokenizer()
    ids = torch.tensor([tokenizer("The people of the United States", add_special_tokens=False)["input_ids"]])
    weight_only, with_activations = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(weight_only, [{"match": "*", "weight": "gguf_q4_0"}])
    quantize_model(with_activations, [{"match": "*", "weight": "gguf_q4_0", "activation": "gguf_q8_0"}])
    inputs = collect(with_activations, tokenizer)
    inputs.extra.update(gguf_type="q4_0", float_type="f32", embedding_type="f32")
    path = tmp_path / "q4_0-a8.gguf"
    gguf.write(inputs, path)
    got = run_llama_cpp(path, ids[0].tolist())
    with torch.no_grad():
        distance = {name: (got - model(ids).logits[0]).abs().max().item()
                    for name, model in (("weights", weight_only), ("activations", with_activations))}  # fmt: skip
    assert distance["activations"] <= 0.2 * distance["weights"], distance
