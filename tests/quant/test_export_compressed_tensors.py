"""compressed-tensors export: packing vs the library's packer, exact reads, transformers loading."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig

from lowbit.quant import FakeQuantLinear, quantize_model
from lowbit.quant.formats import ExportError, collect
from lowbit.quant.formats import compressed_tensors as ct

INT4_G32 = {"dtype": "int4", "granularity": "group", "group_size": 32}
SCHEMES = {
    "int4_g32_sym": {"match": "*", "weight": INT4_G32},
    "int4_g32_asym": {"match": "*", "weight": {**INT4_G32, "symmetric": False}},
    "int8_channel_sym": {"match": "*", "weight": {"dtype": "int8", "granularity": "channel"}},
    "int4_g32_full": {"match": "*", "weight": {**INT4_G32, "range": "full"}},
    "int8_channel_full": {
        "match": "*",
        "weight": {"dtype": "int8", "granularity": "channel", "range": "full"},
    },
    "w4a8": {"match": "*", "weight": "w4a8", "activation": "w4a8"},
}


def tiny_llama(rules: list[dict], **config) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **config)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    if rules:
        quantize_model(model, rules)
    return model.eval()


def activation_quant_off(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FakeQuantLinear) and module.activation_quantizer is not None:
            module.activation_quantizer.enabled = False


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("length", [1, 7, 8, 13, 32, 33, 100])
def test_pack_round_trip_and_library_layout(bits, length):
    generator = torch.Generator().manual_seed(bits * 1000 + length)
    values = torch.randint(0, 2**bits, (5, length), generator=generator)
    values[0, 0], values[-1, -1] = 0, 2**bits - 1  # the extreme codes
    values[1] = 2**bits - 1  # a row of all ones: words with the sign bit set
    packed = ct.pack_int32(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-length * bits // 32))
    assert torch.equal(ct.unpack_int32(packed, bits, length), values)

    signed = (values - 2 ** (bits - 1)).to(torch.int8)  # the library's codes: it adds 2^(b-1) itself
    assert torch.equal(packed, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([5, length])), signed)
    # zero points ([out, groups]) are packed along the output dim, dim 0
    assert torch.equal(ct.pack_int32(values.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))


def test_pack_rejects_out_of_range_values_and_odd_widths():
    with pytest.raises(ValueError, match=r"unsigned 4-bit values in \[0, 15\]"):
        ct.pack_int32(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="widths that divide 32"):
        ct.pack_int32(torch.tensor([[1]]), 3)


# ---------------------------------------------------------------------------------------------- write/read


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_read_equals_fake_quant_weights_bit_for_bit(scheme, tmp_path):
    model = tiny_llama([SCHEMES[scheme]])
    inputs = collect(model, dtype=torch.float32)
    ct.write(inputs, tmp_path)

    back = ct.read(tmp_path)
    for name, weight in inputs.quantized.items():
        assert torch.equal(back[name], weight.dequantize()), name
        module = model.get_submodule(name.removesuffix(".weight"))
        with torch.no_grad():
            assert torch.equal(back[name], module.quantized_weight()), name  # == the fake-quant forward's
    for name, tensor in inputs.state.items():
        assert torch.equal(back[name], tensor.float()), name

    config = json.loads((tmp_path / "config.json").read_text())
    quant = config["quantization_config"]
    (group,) = quant["config_groups"].values()
    spec = next(iter(inputs.quantized.values())).spec
    assert quant["quant_method"] == "compressed-tensors" and quant["quantization_status"] == "compressed"
    assert quant["ignore"] == ["lm_head"] and group["targets"] == ["Linear"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    weights = group["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (
        int(spec.dtype[3:]),
        "int",
        spec.symmetric,
    )
    assert (weights["strategy"], weights["group_size"]) == (
        ("group", 32) if spec.granularity == "group" else ("channel", None)
    )
    tensors = load_file(tmp_path / "model.safetensors")
    layer = "model.layers.0.self_attn.k_proj"  # [32, 64]
    if scheme == "w4a8":  # int weights + int8 activations: the library's (and vLLM's) int-quantized layout
        assert quant["format"] == group["format"] == "int-quantized"
        assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                              "group_size": None, "dynamic": True, "actorder": None}  # fmt: skip
        assert tensors[f"{layer}.weight"].dtype == torch.int8 and tensors[f"{layer}.weight"].shape == (32, 64)
        assert f"{layer}.weight_packed" not in tensors
    else:
        assert quant["format"] == group["format"] == "pack-quantized" and group["input_activations"] is None
        bits = weights["num_bits"]
        assert tensors[f"{layer}.weight_packed"].dtype == torch.int32
        assert tensors[f"{layer}.weight_packed"].shape == (32, 64 * bits // 32)
        assert tensors[f"{layer}.weight_shape"].tolist() == [32, 64]
        assert f"{layer}.weight" not in tensors
    assert tensors[f"{layer}.weight_scale"].dtype == torch.float32
    assert tensors[f"{layer}.weight_scale"].shape == ((32, 2) if spec.granularity == "group" else (32, 1))
    if spec.symmetric:
        assert f"{layer}.weight_zero_point" not in tensors
    else:
        assert tensors[f"{layer}.weight_zero_point"].dtype == torch.int32
        assert tensors[f"{layer}.weight_zero_point"].shape == (32 * 4 // 32, 2)  # packed along the output dim
    assert tensors["lm_head.weight"].dtype == torch.float32 and (tmp_path / "generation_config.json").exists()


# ---------------------------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("scheme", ["int4_g32_sym", "int8_channel_sym", "int4_g32_full"])
def test_transformers_loads_compressed_weight_only(scheme, tmp_path):
    """The default load keeps the packed tensors and decompresses them on the first forward."""
    model = tiny_llama([SCHEMES[scheme]])
    ct.write(collect(model), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(logits(loaded), logits(model), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # dequantize overrides the file's
@pytest.mark.parametrize("scheme", ["int4_g32_asym", "w4a8"])
def test_transformers_loads_dequantized(scheme, tmp_path):
    """``dequantize=True`` dequantizes on load through the library's compressor, weights only.

    Needed for asymmetric pack-quantized on CPU with transformers 5.23 / compressed-tensors 0.20:
    the default route builds the compressed skeleton on the meta device, where the library does
    not pack the zero point, so the checkpoint's packed ``weight_zero_point`` mismatches in shape.
    """
    model = tiny_llama([SCHEMES[scheme]])
    ct.write(collect(model), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    activation_quant_off(model)  # the dequantized model runs float activations
    assert torch.allclose(logits(loaded), logits(model), rtol=1e-4, atol=1e-5)


def test_transformers_runs_the_recorded_activation_quantization(tmp_path):
    """Loaded compressed, a w4a8 model quantizes its Linear inputs per token at run time.

    The library's dynamic int8 arithmetic is not ours: scale ``absmax / 127.5`` and codes in
    [-128, 127], where ours are ``absmax / 127`` and [-127, 127]. With that arithmetic patched into
    the fake-quant model, the logits agree.
    """
    model = tiny_llama([SCHEMES["w4a8"]])
    ct.write(collect(model), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    scheme = loaded.model.layers[0].self_attn.q_proj.quantization_scheme
    assert scheme.input_activations.strategy == "token" and scheme.input_activations.dynamic is True

    def library_int8_tokens(x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(-1, keepdim=True) / 127.5
        return torch.clamp(torch.round(x / scale), -128, 127) * scale

    for module in model.modules():
        if isinstance(module, FakeQuantLinear) and module.activation_quantizer is not None:
            module.activation_quantizer.forward = library_int8_tokens
    assert torch.allclose(logits(loaded), logits(model), rtol=1e-4, atol=1e-5)


def test_mixed_schemes_become_config_groups_and_tied_head_is_ignored(tmp_path):
    model = tiny_llama(
        [{"match": "*.self_attn.*", "weight": INT4_G32}, {"match": "*.mlp.*", "weight": {"dtype": "int8"}}],
        tie_word_embeddings=True,
    )
    inputs = collect(model)
    ct.write(inputs, tmp_path)
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    groups = sorted(quant["config_groups"].values(), key=lambda group: group["weights"]["num_bits"])
    assert [group["weights"]["num_bits"] for group in groups] == [4, 8]
    assert groups[0]["targets"][0] == "model.layers.0.self_attn.k_proj" and len(groups[0]["targets"]) == 8
    assert quant["ignore"] == ["lm_head"]  # tied to the embeddings, not in the file, still a float Linear
    back = ct.read(tmp_path)
    assert all(torch.equal(back[name], weight.dequantize()) for name, weight in inputs.quantized.items())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(logits(loaded), logits(model), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- check


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"match": "*", "weight": {"dtype": "int3", "granularity": "group", "group_size": 32}}],
         r"model.layers.0.self_attn.q_proj.weight is quantized int3 g32 sym full: vLLM's compressed-tensors kernels "
         r"take int4 or int8 weights only"),
        ([{"match": "*", "weight": "gguf_q4_0"}], r"llama.cpp's gguf_q4_0 grid .*export it as GGUF"),
        ([{"match": "*", "weight": "nf4"}], r"NF4 is bitsandbytes' grid.*bitsandbytes format"),
        ([], r"no quantized weights.*`quant` rule.*--ptq"),
        ([{"match": "*.q_proj", "weight": INT4_G32}, {"match": "*", "weight": {"dtype": "int8"}}],
         r"vLLM runs q_proj, k_proj, v_proj as one fused matmul.*q_proj: int4 g32 sym, .*k_proj: int8 channel sym"),
    ],
)  # fmt: skip
def test_check_names_the_layer_and_the_fix(rules, message, tmp_path):
    inputs = collect(tiny_llama(rules))
    with pytest.raises(ExportError, match=message):
        ct.check(inputs)
    with pytest.raises(ExportError):
        ct.write(inputs, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_check_rejects_quantized_embeddings():
    model = tiny_llama([])
    quantize_model(model, [{"match": "*", "weight": INT4_G32}], quantize_embeddings=True)
    with pytest.raises(
        ExportError, match=r"model.embed_tokens.weight is a quantized Embedding.*quantize_embeddings"
    ):
        ct.check(collect(model))


def test_full_range_token_activations_are_the_libraries_own_arithmetic(tmp_path):
    """compressed-tensors' reference (what transformers runs) quantizes activations per token with
    ``absmax / 127.5`` into [-128, 127]: ``range: full``. With it the fake-quant model and the loaded
    checkpoint agree without patching anything (vLLM's CUDA kernel divides by 127: ``restricted``)."""
    rule = {"match": "*", "weight": "w4a8", "activation": {"preset": "w4a8", "range": "full"}}
    model = tiny_llama([rule])
    ct.write(collect(model), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(logits(loaded), logits(model), rtol=1e-4, atol=1e-5)
    restricted = tiny_llama([SCHEMES["w4a8"]])
    assert not torch.allclose(logits(loaded), logits(restricted), rtol=1e-4, atol=1e-5)  # the check can fail
