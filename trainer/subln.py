"""SubLN: BitNet's extra RMSNorms inside each block, added to a pretrained Llama-architecture model.

BitNet b1.58 (and BitDistill, Wu et al. 2025, which fine-tunes pretrained models into it) normalises
the input of the two projections whose inputs have the widest range — the attention output
projection and the MLP down projection — so that their per-token int8 activation quantization and
ternary weights see well-scaled inputs:

    attention: o_proj(attn_sub_norm(attention(x)))
    MLP:       down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x)))

This is exactly transformers' ``BitNetAttention`` / ``BitNetMLP``, so the transform gives each block
those forwards (the modules keep their children and names; only the norms are added, as
``self_attn.attn_sub_norm`` and ``mlp.ffn_sub_norm``, the names transformers' BitNet checkpoints
and llama.cpp's ``bitnet`` graph use). The trained model therefore *is* a transformers
``BitNetForCausalLM`` and a llama.cpp ``bitnet`` model, which is what the exports write.

The norms start at weight 1: an RMSNorm then rescales its input to unit RMS, which changes the
model's function — the reason the recipe continues pre-training before distilling.

Only Llama-architecture blocks (transformers ``LlamaAttention`` and ``LlamaMLP``: SmolLM, Llama
2/3, TinyLlama, ...) are converted: their forward is BitNet's but for the norms. Other attention
classes differ (sliding windows, q/k norms) in ways BitNet's forward would silently drop.
"""

from __future__ import annotations

from torch import nn

from lowbit.quant.formats import SUBLN_NORMS
from lowbit.trainer.errors import UserError

ATTENTION_NORM, MLP_NORM = SUBLN_NORMS  # the names BitNet checkpoints and llama.cpp's graph use


def _bitnet_classes():
    """(SubLN attention class, SubLN MLP class, RMSNorm class) built on transformers' own code."""
    from transformers.models.bitnet.modeling_bitnet import BitNetAttention, BitNetMLP
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

    return LlamaAttention, LlamaMLP, LlamaRMSNorm, BitNetAttention.forward, BitNetMLP.forward


def _subln_class(base: type, forward, name: str) -> type:
    """``base`` with BitNet's forward (cached, so every block shares one class)."""
    cached = _CLASSES.get(base)
    if cached is None:
        cached = type(name, (base,), {"forward": forward, "__module__": __name__})
        _CLASSES[base] = cached
    return cached


_CLASSES: dict[type, type] = {}


def apply_subln(model: nn.Module) -> str:
    """Add the sub-layer norms to every decoder block of ``model`` in place; return a report."""
    from lowbit.trainer.model import decoder_layers

    attention_base, mlp_base, norm_class, attention_forward, mlp_forward = _bitnet_classes()
    config = model.config
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    layers = decoder_layers(model)
    converted = 0
    for index, layer in enumerate(layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        problem = _unsupported(attention, attention_base, "self_attn") or _unsupported(mlp, mlp_base, "mlp")
        if problem:
            raise UserError(
                f"model.subln: decoder layer {index} ({type(layer).__name__}) {problem}. SubLN converts "
                "Llama-architecture blocks (transformers LlamaAttention + LlamaMLP: SmolLM, Llama 2/3, TinyLlama) "
                f"into BitNet's; this model is {getattr(config, 'model_type', '?')!r}. Use a Llama-architecture "
                "model or set model.subln: false"
            )
        weight = attention.o_proj.weight
        attention.add_module(ATTENTION_NORM, norm_class(attention.o_proj.in_features, eps=eps))
        mlp.add_module(MLP_NORM, norm_class(mlp.down_proj.in_features, eps=eps))
        for norm in (getattr(attention, ATTENTION_NORM), getattr(mlp, MLP_NORM)):
            norm.to(device=weight.device, dtype=weight.dtype)
        attention.__class__ = _subln_class(attention_base, attention_forward, "SubLNLlamaAttention")
        mlp.__class__ = _subln_class(mlp_base, mlp_forward, "SubLNLlamaMLP")
        converted += 1
    hidden, ffn = layers[0].self_attn.o_proj.in_features, layers[0].mlp.down_proj.in_features
    return (
        f"{converted} blocks: RMSNorm before self_attn.o_proj ({ATTENTION_NORM}, {hidden}) and mlp.down_proj "
        f"({MLP_NORM}, {ffn}), eps {eps:g}, trained; +{converted * (hidden + ffn):,} parameters"
    )


def _unsupported(module: nn.Module | None, expected: type, name: str) -> str | None:
    if module is None:
        return f"has no `{name}` module"
    if type(module) is not expected:
        return f"has a {type(module).__name__} as `{name}`, not a {expected.__name__}"
    return None
