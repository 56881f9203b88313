"""GGUF writer: block packing, llama.cpp's q/k row order, metadata, and exact read-back by ``gguf``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from transformers import AutoModelForCausalLM, LlamaConfig

from lowbit.quant import quantize_model
from lowbit.quant.formats import ExportError, collect
from lowbit.quant.formats import gguf as gguf_format
from lowbit.quant.packing import pack_blocks, unpack_blocks
from lowbit.trainer.byte_tokenizer import byte_tokenizer


def tiny_llama(hidden=64, intermediate=128, tie=True, seed=0, **fields):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=262, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, **fields)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "qtype,low,high,block",
    [
        (T.Q8_0, -127, 127, 32),
        (T.Q4_0, 0, 15, 32),
        (T.Q4_1, 0, 15, 32),
        (T.TQ2_0, -1, 1, 256),
        (T.TQ1_0, -1, 1, 256),
    ],
)
def test_pack_unpack_round_trip_and_gguf_reader(qtype, low, high, block):
    rng = np.random.default_rng(int(qtype))
    codes = rng.integers(low, high + 1, (6, 2 * block))
    codes[0] = low  # a row of the lowest code, one of the highest, one of zeros where 0 is a code
    codes[1] = high
    scales = (rng.standard_normal((6, 2)) * 10.0 ** rng.integers(-4, 3, (6, 2))).astype(np.float32)
    scales[2] = 0.0
    minimums = rng.standard_normal((6, 2)).astype(np.float32) if qtype == T.Q4_1 else None
    packed = pack_blocks(codes, scales, qtype, minimums)
    back_codes, back_scales, back_minimums = unpack_blocks(packed, qtype, 2 * block)
    half = scales.astype(np.float16).astype(np.float32)
    assert np.array_equal(back_codes, codes) and np.array_equal(back_scales, half)
    # the format's own reader gives the textbook dequantization
    step = half.repeat(block, axis=1)
    if qtype == T.Q4_0:
        expected = step * (codes - 8)
    elif qtype == T.Q4_1:
        expected = step * codes + minimums.astype(np.float16).astype(np.float32).repeat(block, axis=1)
    else:
        expected = step * codes
    assert np.array_equal(gguf_quants.dequantize(packed, qtype), expected.astype(np.float32))


def test_the_gguf_q8_0_activation_rounds_each_input_block_as_llama_cpps_q8_0():
    """``activation: gguf_q8_0`` feeds a layer the input llama.cpp's matmuls compute with: each
    32-value block of a row as the gguf library's reference Q8_0 quantizes and dequantizes it (scale
    amax/127 stored fp16, codes rounded half away from zero) — bit for bit, a zero block and
    outliers spanning six decades included; the layer's output is its weight applied to that."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 5, 96)) * 10.0 ** rng.integers(-3, 3, (3, 5, 1))).astype(np.float32)
    x[0, 0, :32] = 0.0
    x[1, 2, 40] = 3e4
    linear = torch.nn.Sequential(torch.nn.Linear(96, 8, bias=False))
    quantize_model(linear, [{"match": "*", "weight": "gguf_q4_0", "activation": "gguf_q8_0"}])
    layer = linear[0]
    rows = x.reshape(-1, 96)
    expected = gguf_quants.dequantize(gguf_quants.quantize(rows, T.Q8_0), T.Q8_0).reshape(x.shape)
    with torch.no_grad():
        rounded = layer.activation_quantizer(torch.from_numpy(x))
        assert torch.equal(rounded, torch.from_numpy(expected))
        weight = layer.weight_quantizer(layer.weight)
        assert torch.equal(layer(torch.from_numpy(x)), torch.nn.functional.linear(rounded, weight))


def test_pack_refuses_a_row_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="blocks of 32"):
        pack_blocks(np.zeros((2, 48), np.int64), np.ones((2, 1), np.float32), T.Q4_0)


def test_rope_permutation_is_llama_cpp_permute():
    """convert_hf_to_gguf.py: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)."""
    weight = np.arange(48 * 5).reshape(48, 5)
    for heads in (1, 2, 4, 6):
        reference = weight.reshape(heads, 2, 48 // heads // 2, 5).swapaxes(1, 2).reshape(weight.shape)
        assert np.array_equal(weight[gguf_format.rope_permutation(48, heads)], reference)


@pytest.mark.parametrize("preset,kind", [("gguf_q4_0", "q4_0"), ("gguf_q8_0", "q8_0"), ("gguf_q4_1", "q4_1")])
def test_trained_grid_reads_back_bit_for_bit(tmp_path, preset, kind):
    model = tiny_llama(tie=False)
    quantize_model(model, [{"match": "*", "weight": preset}])
    inputs = collect(model, byte_tokenizer())
    inputs.extra.update(gguf_type=kind, float_type="f32", embedding_type="f32")
    gguf_format.check(inputs)
    path = tmp_path / "model.gguf"
    gguf_format.write(inputs, path)
    back = gguf_format.read(path)
    assert sorted(back) == sorted([*inputs.state, *inputs.quantized])
    for name, weight in inputs.quantized.items():
        assert torch.equal(back[name], weight.dequantize()), name
    for name, tensor in inputs.state.items():
        assert torch.equal(back[name], tensor.float()), name  # f32 storage: unchanged


def test_embeddings_are_stored_as_llama_quantize_stores_them_unless_asked_otherwise(tmp_path):
    """Quantized files: the float token embeddings and an untied head as Q8_0, byte for byte what
    gguf's (= llama.cpp's) Q8_0 quantizer writes; f16 files keep them f16; --embedding-type chooses."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf import quants as gguf_quants

    model = tiny_llama(tie=False)
    quantize_model(model, [{"match": "model.layers.*", "weight": "gguf_q4_0"}])
    inputs = collect(model, byte_tokenizer())
    inputs.extra.update(gguf_type="q4_0")
    gguf_format.write(inputs, tmp_path / "default.gguf")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "default.gguf")).tensors}
    for name, source in (
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
    ):
        assert tensors[name].tensor_type == GGMLQuantizationType.Q8_0
        expected = gguf_quants.quantize(inputs.state[source].float().numpy(), GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(tensors[name].data), expected)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    inputs.extra.update(embedding_type="bf16")
    gguf_format.write(inputs, tmp_path / "bf16.gguf")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "bf16.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.BF16
    inputs.extra.update(gguf_type="f16", embedding_type=None)
    gguf_format.write(inputs, tmp_path / "f16.gguf")
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "f16.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.F16
    narrow = collect(tiny_llama(hidden=48, intermediate=96))
    narrow.extra.update(gguf_type="f16", embedding_type="q8_0")
    with pytest.raises(ExportError, match="rows of model.embed_tokens.weight hold 48 values"):
        gguf_format.check(narrow)


def test_ternary_types_hold_fp16_scaled_ternary_weights(tmp_path):
    model = tiny_llama(hidden=256, intermediate=512)
    quantize_model(
        model,
        [{"match": "*", "weight": {"dtype": "ternary", "granularity": "tensor", "scale_dtype": "fp16"}}],
    )
    inputs = collect(model, byte_tokenizer())
    for kind in ("tq2_0", "tq1_0"):
        inputs.extra["gguf_type"] = kind
        gguf_format.check(inputs)
        path = tmp_path / f"{kind}.gguf"
        gguf_format.write(inputs, path)
        back = gguf_format.read(path)
        for name, weight in inputs.quantized.items():
            assert torch.equal(back[name], weight.dequantize()), (kind, name)


def test_metadata_llama_cpp_needs(tmp_path):
    model = tiny_llama(rms_norm_eps=1e-5, max_position_embeddings=512)
    quantize_model(model, [{"match": "*", "weight": "gguf_q4_0"}])
    tokenizer = byte_tokenizer()
    inputs = collect(model, tokenizer)
    inputs.extra["gguf_type"] = "q4_0"
    path = tmp_path / "m.gguf"
    gguf_format.write(inputs, path)
    meta = gguf_format.metadata(path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.feed_forward_length"] == 128 and meta["llama.context_length"] == 512
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.rope.freq_base"] == 10000.0
    assert abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert meta["general.file_type"] == 2  # MOSTLY_Q4_0
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.tokens"] == 262
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "output.weight" not in {t for t in gguf_format.read(path)}  # tied head: token_embd serves


SOURCE = {"general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "general.basename": "smollm2",
          "general.size_label": "135M", "general.finetune": "8k-lc100k-mix1-ep2", "general.license": "apache-2.0",
          "general.organization": "HuggingFaceTB", "general.languages": ["en"]}  # fmt: skip


def test_provenance_is_carried_over_and_names_say_what_the_file_is(tmp_path):
    model = tiny_llama()
    inputs = collect(model, byte_tokenizer())
    inputs.extra.update(
        gguf_type="f16", float_type="f32", source_general=SOURCE, run_name="my_run", parameters=135e6
    )
    gguf_format.write(inputs, tmp_path / "run.gguf")
    meta = gguf_format.metadata(tmp_path / "run.gguf")
    assert meta["general.license"] == "apache-2.0" and meta["general.languages"] == ["en"]
    assert meta["general.name"] == "smollm2 135M my_run" and meta["general.finetune"] == "my_run"
    assert (
        meta["general.base_model.count"] == 1 and meta["general.base_model.0.name"] == SOURCE["general.name"]
    )
    assert meta["general.base_model.0.organization"] == "HuggingFaceTB"
    assert meta["general.file_type"] == 0  # ALL_F32: the tensors are f32, not f16
    inputs.extra.update(run_name=None, float_type="bf16")
    gguf_format.write(inputs, tmp_path / "model.gguf")  # the model as it is: its own names
    meta = gguf_format.metadata(tmp_path / "model.gguf")
    assert (
        meta["general.name"] == SOURCE["general.name"]
        and meta["general.finetune"] == SOURCE["general.finetune"]
    )
    assert "general.base_model.count" not in meta and meta["general.file_type"] == 32  # MOSTLY_BF16
    inputs.extra.update(source_general={}, parameters=1.7e9)  # no source GGUF: named from the model
    gguf_format.write(inputs, tmp_path / "plain.gguf")
    meta = gguf_format.metadata(tmp_path / "plain.gguf")
    assert meta["general.size_label"] == "1.7B" and "general.license" not in meta


@pytest.mark.parametrize(
    "weight,message",
    [
        ({"dtype": "int4", "granularity": "group", "group_size": 32, "symmetric": False}, "symmetric int4"),
        ({"dtype": "int4", "granularity": "group", "group_size": 64}, "blocks of 32"),
        ({"dtype": "int3", "granularity": "group", "group_size": 32}, "gguf_q4_0 preset"),
    ],
)
def test_schemes_q4_0_cannot_hold_are_refused(weight, message):
    model = tiny_llama()
    quantize_model(model, [{"match": "*", "weight": weight}])
    inputs = collect(model)
    inputs.extra["gguf_type"] = "q4_0"
    with pytest.raises(ExportError, match=message):
        gguf_format.check(inputs)


def test_ternary_rows_must_be_whole_256_blocks():
    model = tiny_llama()
    quantize_model(model, [{"match": "*", "weight": "bitnet"}])
    inputs = collect(model)
    inputs.extra["gguf_type"] = "tq2_0"
    with pytest.raises(ExportError, match="not a multiple of the 256-value block"):
        gguf_format.check(inputs)


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    inputs = collect(model)
    inputs.extra["gguf_type"] = "f16"
    with pytest.raises(ExportError, match="supports the architectures llama, mistral; this model is 'gpt2'"):
        gguf_format.check(inputs)


def test_tied_head_and_embeddings_quantized_differently_are_both_written(tmp_path):
    """Tied in float, but head and embeddings quantized with different specs hold different values:
    the export unties them and writes both (llama.cpp then reads ``output.weight``)."""
    model = tiny_llama(tie=True)
    int8_g32 = {"dtype": "int8", "granularity": "group", "group_size": 32, "scale_dtype": "fp16"}
    quantize_model(model, [{"match": "lm_head", "weight": "gguf_q8_0"}, {"match": "*", "weight": int8_g32}],
                   quantize_head=True, quantize_embeddings=True)  # fmt: skip
    inputs = collect(model, byte_tokenizer())
    assert inputs.config.tie_word_embeddings is False
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(inputs.quantized)
    inputs.extra["gguf_type"] = "q8_0"
    gguf_format.check(inputs)
    gguf_format.write(inputs, tmp_path / "untied.gguf")
    back = gguf_format.read(tmp_path / "untied.gguf")
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(back[name], inputs.quantized[name].dequantize())
    assert not torch.equal(back["lm_head.weight"], back["model.embed_tokens.weight"])


def test_learned_fp16_scales_export_exactly(tmp_path):
    """LSQ scales are rounded to fp16 in the forward, so Q4_0 stores exactly what trained."""
    model = tiny_llama(tie=False)
    spec = {
        "dtype": "int4",
        "granularity": "group",
        "group_size": 32,
        "learn_scale": True,
        "scale_dtype": "fp16",
    }
    quantize_model(model, [{"match": "*", "weight": spec}])
    with torch.no_grad():
        for quantizer in [m for m in model.modules() if getattr(m, "scale", None) is not None]:
            quantizer.scale.mul_(1.0 + 1e-3 * torch.rand_like(quantizer.scale))  # "learned": not fp16 values
    inputs = collect(model, byte_tokenizer())
    inputs.extra["gguf_type"] = "q4_0"
    gguf_format.check(inputs)
    gguf_format.write(inputs, tmp_path / "lsq.gguf")
    back = gguf_format.read(tmp_path / "lsq.gguf")
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(back["model.layers.0.self_attn.q_proj.weight"], layer.quantized_weight().detach())


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"dtype": "int4", "granularity": "group", "group_size": 32}, "fp16 scales"),
        ({"dtype": "int4", "granularity": "group", "group_size": 32, "symmetric": False, "scale_dtype": "fp16"},
         "symmetric int4"),
    ],
)  # fmt: skip
def test_q4_0_refuses_scales_or_zero_points_it_cannot_store(spec, message):
    model = tiny_llama()
    quantize_model(model, [{"match": "*", "weight": spec}])
    inputs = collect(model)
    inputs.extra["gguf_type"] = "q4_0"
    with pytest.raises(ExportError, match=message):
        gguf_format.check(inputs)


def test_q4_1_refuses_integer_zero_points():
    model = tiny_llama()
    spec = {
        "dtype": "int4",
        "granularity": "group",
        "group_size": 32,
        "symmetric": False,
        "scale_dtype": "fp16",
    }
    quantize_model(model, [{"match": "*", "weight": spec}])
    inputs = collect(model)
    inputs.extra["gguf_type"] = "q4_1"
    with pytest.raises(ExportError, match="float minimum per block, not an integer zero point"):
        gguf_format.check(inputs)
