"""The Hugging Face BitNet exporter against transformers' own packing, reader and BitLinear layers.

transformers wraps its unpacking and activation quantization in ``torch.compile``; on CPU the
inductor build of the model's layers takes ~20 s and gives the same logits here, so the model runs
with ``torch.compiler.set_stance("force_eager")``.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations import bitnet as hf_bitnet

from lowbit.quant import quantize_model
from lowbit.quant.formats import ExportError, collect
from lowbit.quant.formats.bitnet import check, pack_ternary, read, unpack_ternary, write
from lowbit.quant.modules import FakeQuantLinear
from lowbit.trainer.byte_tokenizer import byte_tokenizer

BITNET = {"match": "*", "weight": "bitnet", "activation": "bitnet"}


def tiny_llama(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    config = LlamaConfig(**{**sizes, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def bitnet_model() -> torch.nn.Module:
    model = tiny_llama()
    quantize_model(model, [BITNET])
    return model


def hf_load(path) -> torch.nn.Module:
    with torch.compiler.set_stance("force_eager"):
        return AutoModelForCausalLM.from_pretrained(path).eval()


# -- packing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 8), (4, 3), (12, 5, 2), (9, 7), (1, 3), (8,)])
def test_pack_equals_transformers_pack_weights_and_round_trips(shape):
    codes = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(len(shape) + shape[0]))
    ours = pack_ternary(codes)
    theirs = hf_bitnet.pack_weights(codes.clone())  # pack_weights adds 1 to its argument in place
    assert ours.dtype == torch.uint8 and torch.equal(ours, theirs)
    assert torch.equal(unpack_ternary(ours, shape[0]), codes.to(torch.int16))
    if shape[0] % 4 == 0:  # transformers unpacks 4 rows per byte row: no way to say "9 rows"
        unpack = inspect.unwrap(hf_bitnet.unpack_weights)
        assert torch.equal(unpack(ours, dtype=torch.float32), codes.float())


def test_pack_layout_is_four_row_chunks_with_plus_one_offset():
    # rows 0..3 of a [4, 1] weight go to bits 0-1, 2-3, 4-5, 6-7 of one byte, stored as code + 1
    codes = torch.tensor([[-1], [0], [1], [1]])
    assert pack_ternary(codes).tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6]]


# -- the exported directory ---------------------------------------------------------------------------


def test_file_holds_packed_weights_reciprocal_scales_and_the_bitnet_config(bitnet_model, tmp_path):
    inputs = collect(bitnet_model, tokenizer=byte_tokenizer())
    inputs.extra["linear_class"] = "bitlinear"
    write(inputs, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj"
    weight = inputs.quantized[f"{name}.weight"]
    assert tensors[f"{name}.weight"].dtype == torch.uint8 and tensors[f"{name}.weight"].shape == (32, 64)
    scale = tensors[f"{name}.weight_scale"]
    assert scale.dtype == torch.float32 and scale.shape == (1,)
    assert torch.equal(scale, 1 / weight.scale.reshape(1))  # BitLinear divides by it
    assert tensors["lm_head.weight"].dtype == torch.float32 and "lm_head.weight_scale" not in tensors
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
        "use_rms_norm": False, "rms_norm_eps": 1e-6, "modules_to_not_convert": ["lm_head"],
    }  # fmt: skip
    assert (tmp_path / "tokenizer.json").exists()


def test_read_equals_dequantize_within_one_ulp_for_bitlinear_and_exactly_for_autobitlinear(
    bitnet_model, tmp_path
):
    inputs = collect(bitnet_model)
    write(inputs, tmp_path / "auto")  # the default class
    inputs.extra["linear_class"] = "bitlinear"
    write(inputs, tmp_path / "bitlinear")
    divided, multiplied = read(tmp_path / "bitlinear"), read(tmp_path / "auto")
    for name, weight in inputs.quantized.items():
        expected = weight.dequantize()
        assert torch.equal(multiplied[name], expected)
        # codes / fl(1 / scale) vs codes * scale: two roundings apart, never more than 2^-22 relative
        torch.testing.assert_close(divided[name], expected, rtol=2**-22, atol=0)
    assert torch.equal(divided["model.norm.weight"], bitnet_model.model.norm.weight)


def test_bfloat16_autobitlinear_holds_exactly_the_weights_the_bf16_fake_quant_forward_uses(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    quantize_model(model, [BITNET])
    inputs = collect(model)
    inputs.extra["linear_class"] = "autobitlinear"
    write(inputs, tmp_path)
    weights = read(tmp_path)
    for name, weight in inputs.quantized.items():
        module = model.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(weights[name], module.quantized_weight().float())
        assert torch.equal(weights[name], weight.dequantize().to(torch.bfloat16).float())


# -- transformers loads it and computes what we trained ------------------------------------------------


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_transformers_loads_it_and_matches_the_fake_quant_model(bitnet_model, tmp_path, linear_class):
    inputs = collect(bitnet_model)
    inputs.extra["linear_class"] = linear_class
    write(inputs, tmp_path)
    loaded = hf_load(tmp_path)
    layer_class = hf_bitnet.BitLinear if linear_class == "bitlinear" else hf_bitnet.AutoBitLinear
    assert isinstance(loaded.model.layers[1].mlp.down_proj, layer_class)
    assert type(loaded.lm_head) is torch.nn.Linear

    # Layer by layer, on the same input: the same int8 × ternary product, scaled in another order.
    inputs_seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: inputs_seen.__setitem__(name, args[0]))
        for name, module in bitnet_model.named_modules()
        if isinstance(module, FakeQuantLinear)
    ]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        try:
            ours, theirs = bitnet_model(ids).logits, loaded(ids).logits
        finally:
            for hook in hooks:
                hook.remove()
        for name, x in inputs_seen.items():
            expected = bitnet_model.get_submodule(name)(x)
            torch.testing.assert_close(loaded.get_submodule(name)(x), expected, rtol=1e-5, atol=1e-6)
    # End to end the ulp-level differences (x * (127 / absmax) vs x / (absmax / 127) before rounding,
    # the scale applied after the matmul) now and then move an activation across a rounding
    # boundary: one int8 step of that token, which the following layers carry on. Observed: 3e-7 of
    # the logits' range on these ids, up to 1.5e-3 on ids where a code flips; anything wrong in the
    # format (a swapped row, a wrong scale) is O(1).
    assert (ours - theirs).abs().max() < 3e-3 * ours.abs().max()
    assert (ours - theirs).abs().mean() < 1e-4 * ours.abs().max()


def test_a_tied_head_stays_float_after_loading(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    quantize_model(model, [BITNET])
    inputs = collect(model)
    assert "lm_head.weight" not in inputs.state
    write(inputs, tmp_path)
    loaded = hf_load(tmp_path)
    assert type(loaded.lm_head) is torch.nn.Linear
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


# -- what the format cannot hold ----------------------------------------------------------------------


def test_check_names_the_layer_and_the_fix():
    model = tiny_llama()
    quantize_model(model, [{"match": "*", "weight": "nf4"}])
    with pytest.raises(ExportError, match=r"q_proj\.weight is quantized as nf4 g64.*ternary.*bitnet` preset"):
        check(collect(model))

    model = tiny_llama()
    quantize_model(model, [{"match": "*", "weight": "bitnet"}])
    with pytest.raises(
        ExportError, match=r"q_proj was trained with no activation quantization.*int8 per token"
    ):
        check(collect(model))

    model = tiny_llama(intermediate_size=130)
    quantize_model(model, [BITNET])
    with pytest.raises(ExportError, match=r"gate_proj\.weight has 130 output rows.*divisible by 4"):
        check(collect(model))

    model = tiny_llama()
    quantize_model(model, [BITNET])
    inputs = collect(model)
    inputs.extra["linear_class"] = "bitlinear2"
    with pytest.raises(ExportError, match="linear_class 'bitlinear2'"):
        check(inputs)


def test_check_refuses_full_range_activations_that_transformers_bitlinear_does_not_compute():
    model = tiny_llama()
    quantize_model(
        model, [{"match": "*", "weight": "bitnet", "activation": {"preset": "bitnet", "range": "full"}}]
    )
    with pytest.raises(ExportError, match=r"q_proj was trained with int8 token sym full, .*absmax / 127"):
        check(collect(model))
