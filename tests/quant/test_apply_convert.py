"""Rules → module swap, fake-quant layers, and convert's exactness over many shapes and seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

from lowbit.quant import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    QuantSpec,
    convert,
    fake_quantize,
    initialize_scales,
    quantize_model,
    set_quantizers_enabled,
    summary_table,
)


def tiny_llama(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def test_rules_first_match_wins_skip_and_defaults_keep_head_and_embeddings():
    model = tiny_llama()
    reports = quantize_model(model, [
        {"match": "model.layers.0.*", "skip": True},
        {"match": "re:model\\.layers\\.\\d+\\.mlp\\..*", "weight": {"dtype": "int4", "granularity": "group", "group_size": 32}},
        {"match": "*", "weight": "w4a8", "activation": "w4a8"},
    ])  # fmt: skip
    assert [len(r.modules) for r in reports] == [7, 3, 4]
    assert not isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    mlp = model.model.layers[1].mlp.up_proj
    assert isinstance(mlp, FakeQuantLinear) and mlp.activation_quantizer is None
    attention = model.model.layers[1].self_attn.q_proj
    assert attention.weight_quantizer.spec == QuantSpec("int4", "group", 32)
    assert attention.activation_quantizer.spec == QuantSpec("int8", "token")
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    table = summary_table(reports)
    assert (
        "model.layers.0.*" in table and "skip" in table and "5.00" in table
    )  # int4 g32 + an fp32 scale per 32


def test_rule_errors_name_the_problem():
    with pytest.raises(
        ValueError,
        match=r"'model.layer.\*' matches no module \(a typo\?\). Some quantizable modules: model.layers.0",
    ):
        quantize_model(tiny_llama(), [{"match": "model.layer.*", "weight": "w4a8"}])
    with pytest.raises(
        ValueError, match=r"matches model.layers.0.mlp \(LlamaMLP\), a module type that cannot be quantized"
    ):
        quantize_model(tiny_llama(), [{"match": "model.layers.*.mlp", "weight": "w4a8"}])
    # a specific rule after a catch-all: the catch-all takes its modules (rules are first-match)
    with pytest.raises(
        ValueError,
        match=r"quant rule '\*q_proj' \(rule 1\) gets no module: the earlier rule '\*' already takes "
        r"model.layers.0.self_attn.q_proj and 1 more it matches. Rules are first-match: put '\*q_proj' before '\*'",
    ):
        quantize_model(
            tiny_llama(), [{"match": "*", "weight": "w4a8"}, {"match": "*q_proj", "weight": "w8a8"}]
        )
    with pytest.raises(ValueError, match=r"output head or input embeddings.*quantize_head"):
        quantize_model(tiny_llama(), [{"match": "lm_head", "weight": "w4a8"}])
    with pytest.raises(ValueError, match=r"quant rule 0 \('\*'\): unknown quant dtype 'int12'"):
        quantize_model(tiny_llama(), [{"match": "*", "weight": {"dtype": "int12"}}])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['wieght'\]"):
        quantize_model(tiny_llama(), [{"match": "*", "wieght": "w4a8"}])
    with pytest.raises(ValueError, match=r"group_size 128 does not divide the last dimension 64"):
        quantize_model(
            tiny_llama(),
            [{"match": "*", "weight": {"dtype": "int4", "granularity": "group", "group_size": 128}}],
        )


def test_head_and_embeddings_quantized_on_request_and_gpt2_conv1d():
    model = tiny_llama()
    quantize_model(
        model, [{"match": "*", "weight": "gguf_q8_0"}], quantize_head=True, quantize_embeddings=True
    )
    assert isinstance(model.lm_head, FakeQuantLinear) and isinstance(
        model.model.embed_tokens, FakeQuantEmbedding
    )
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 8))
    float_logits = gpt2(ids).logits
    quantize_model(
        gpt2, [{"match": "transformer.h.*", "weight": {"dtype": "int8", "granularity": "channel"}}]
    )
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, FakeQuantLinear) and c_attn.weight.shape == (
        96,
        32,
    )  # Conv1D's [in, out] transposed
    set_quantizers_enabled(gpt2, False)
    assert torch.allclose(gpt2(ids).logits, float_logits, atol=1e-5)  # same function when quant is off
    set_quantizers_enabled(gpt2, True)
    assert not torch.allclose(gpt2(ids).logits, float_logits, atol=1e-5)


def test_fake_quant_linear_from_to_linear_and_forward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    spec, act = QuantSpec("int4", "group", 32), QuantSpec("int8", "token")
    module = FakeQuantLinear.from_linear(linear, spec, act)
    x = torch.randn(3, 5, 64)
    expected = torch.nn.functional.linear(
        fake_quantize(x, act), fake_quantize(linear.weight, spec), linear.bias
    )
    assert torch.equal(module(x), expected)
    back = module.to_linear()
    assert type(back) is torch.nn.Linear and torch.equal(back.weight, linear.weight)
    assert module.weight is linear.weight  # shared: tied weights stay tied


def test_the_forward_quantizes_the_weight_it_holds_now_even_when_its_version_does_not_change():
    """The stale-cache case: FSDP2 hands a layer a freshly gathered weight each step whose
    ``_version`` stays 0 and whose memory the allocator reuses; writing through ``.data`` is the
    same in one process. The forward must fake-quantize the new values, in train and eval."""
    torch.manual_seed(0)
    spec = QuantSpec("int4", "group", 32, ste="clipped")
    module = FakeQuantLinear.from_linear(torch.nn.Linear(64, 8), spec)
    x = torch.randn(4, 64)
    for step in range(3):
        pointer, version = module.weight.data_ptr(), module.weight._version
        module.weight.data.copy_(torch.randn(8, 64))  # an update invisible to _version
        assert (module.weight.data_ptr(), module.weight._version) == (pointer, version)
        expected = torch.nn.functional.linear(x, fake_quantize(module.weight.detach(), spec), module.bias)
        assert torch.equal(module(x), expected), step
        with torch.no_grad():
            assert torch.equal(module(x), expected), step


def test_learned_scales_built_on_the_meta_device_are_filled_by_initialize_scales():
    torch.manual_seed(0)
    spec = QuantSpec("int4", "group", 32, learn_scale=True, scale_init="mse")
    real = FakeQuantLinear.from_linear(torch.nn.Linear(64, 8), spec)
    with torch.device("meta"):
        shell = FakeQuantLinear.from_linear(torch.nn.Linear(64, 8), spec)
    assert shell.weight_quantizer.scale.is_meta and shell.weight_quantizer.scale.shape == (16, 1)
    shell.to_empty(device="cpu")
    with torch.no_grad():
        shell.weight.copy_(real.weight)
        shell.bias.copy_(real.bias)
    initialize_scales(shell)
    assert torch.equal(shell.weight_quantizer.scale, real.weight_quantizer.scale)
    x = torch.randn(2, 64)
    assert torch.equal(shell(x), real(x))


SPECS = [
    QuantSpec("int8", "channel"),
    QuantSpec("int4", "group", 32),
    QuantSpec("int4", "group", 32, symmetric=False),
    QuantSpec("int3", "group", 64),
    QuantSpec("int2", "tensor", symmetric=False),
    QuantSpec("fp8_e4m3", "channel"),
    QuantSpec("fp8_e5m2", "tensor"),
    QuantSpec("nf4", "group", 64),
    QuantSpec("ternary", "tensor"),
    QuantSpec("ternary", "channel"),
    QuantSpec.preset("gguf_q8_0"),
    QuantSpec.preset("gguf_q4_0"),
    QuantSpec.preset("gguf_q4_1"),
    QuantSpec("int4", "group", 32, learn_scale=True, scale_init="mse"),
    QuantSpec("int4", "channel", symmetric=False, learn_scale=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_convert_dequantizes_to_the_fake_quant_weight_bit_for_bit(spec):
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        rows = int(torch.randint(1, 9, (1,), generator=generator)) * 4
        cols = 64 * int(torch.randint(1, 5, (1,), generator=generator))
        w = torch.randn(rows, cols, generator=generator) * 10 ** float(
            torch.empty(1).uniform_(-3, 2, generator=generator)
        )
        w[0] = 0.0
        w[1 % rows] = w[1 % rows, 0]  # a constant row
        w[-1, -1] = 1e3 * w.abs().max().clamp_min(1)  # an outlier
        module = FakeQuantLinear.from_linear(torch.nn.Linear(cols, rows, bias=False), spec)
        with torch.no_grad():
            module.weight.copy_(w)
        quantized = convert(torch.nn.Sequential(module))["0"]
        assert torch.equal(quantized.dequantize(), module.quantized_weight().detach()), seed
        assert quantized.codes.shape == w.shape
