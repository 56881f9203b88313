"""Exports loaded on a GPU: bitsandbytes' CUDA NF4 kernels and compressed-tensors in transformers.

These run only where CUDA is (the device machine); CI skips them. The CPU tests prove the files
are exact; these show the engines' CUDA paths load them and compute the trained model's logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lowbit.quant import quantize_model
from lowbit.quant.formats import bnb_nf4, collect, compressed_tensors

pytestmark = pytest.mark.gpu


def fake_quant_model(rule) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    quantize_model(model, [rule])
    return model


@pytest.mark.parametrize(
    "module,rule",
    [
        (bnb_nf4, {"match": "*", "weight": "nf4"}),
        (
            compressed_tensors,
            {"match": "*", "weight": {"dtype": "int4", "granularity": "group", "group_size": 32}},
        ),
    ],
    ids=["bnb-nf4", "compressed-tensors"],
)
def test_exported_model_runs_on_cuda_with_the_fake_quant_logits(module, rule, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = fake_quant_model(rule)
    module.write(collect(model), tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda").eval()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.cuda()(tokens.cuda()).logits
        got = loaded(tokens.cuda()).logits
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale, (got - expected).abs().max()
