"""Capture intermediate outputs (q/k/v projections) of chosen layers during a forward pass."""

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
