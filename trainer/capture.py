"""Capture intermediate outputs during a forward pass: q/k/v projections, or the final hidden
states in place of the logits (the fused-head path)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from torch import Tensor, nn

from lowbit.trainer.errors import UserError

_PROJECTION = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([qkv])_proj$")


def qkv_modules(model: nn.Module, layers: list[int]) -> dict[tuple[int, str], nn.Module]:
    """The q/k/v projection modules of ``layers`` (Llama-style ``layers.N.self_attn.{q,k,v}_proj``)."""
    found = {}
    for name, module in model.named_modules():
        match = _PROJECTION.search(name)
        if match and int(match[1]) in layers:
            found[(int(match[1]), match[2])] = module
    missing = [(layer, p) for layer in layers for p in "qkv" if (layer, p) not in found]
    if missing:
        raise UserError(
            f"attn_relation reads the q/k/v projections of layers {layers}, but {type(model).__name__} has no "
            f"`layers.N.self_attn.{{q,k,v}}_proj` for {missing[:3]}; it supports Llama-style attention"
        )
    return found


@contextlib.contextmanager
def capture_qkv(model: nn.Module, layers: list[int]) -> Iterator[dict[int, dict[str, Tensor]]]:
    """Yield a dict filled, during the forward run inside the block, with {layer: {"q","k","v": output}}."""
    captured: dict[int, dict[str, Tensor]] = {}
    if not layers:
        yield captured
        return
    handles = []
    for (layer, projection), module in qkv_modules(model, layers).items():

        def keep(_module, _inputs, output, layer=layer, projection=projection):
            captured.setdefault(layer, {})[projection] = output

        handles.append(module.register_forward_hook(keep))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def head_as_identity(model: nn.Module) -> Iterator[nn.Module]:
    """During the block the model's output head is the identity, so ``outputs.logits`` are the final
    (post-norm) hidden states; yields the real head, to be applied chunk by chunk by the loss."""
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(
            f"train.fused_head_chunk needs a causal LM with an output head; {type(model).__name__} has none"
        )
    if getattr(model.config, "final_logit_softcapping", None):
        raise UserError(
            "train.fused_head_chunk: this model soft-caps its logits after the head; turn the option off"
        )
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)
