"""The torchao arm of ``qat_vs_torchao.py``: torchao's QAT fake quantization as a lowbit transform.

Imported as a trainer plugin (``imports=[benchmarks/torchao_arm.py]``), it registers a model
transform that runs torchao's own ``quantize_(model, QATConfig(..., step="prepare"))`` on the
loaded model. Everything else — data, batches, optimizer, schedule, evaluation — is lowbit's
trainer, so the two arms differ only in the fake-quant modules (same seed, same batch order by
construction). The scheme comes from ``$LOWBIT_BENCH_TORCHAO`` because a plugin cannot add config
keys; with it unset the transform is off.

Schemes (torchao 0.18's spelling of each; the output head stays float as in lowbit's rules):

* ``w4a8``: int4 weights, groups of 32, symmetric (full range [-8, 7], scale absmax / 7.5) and
  int8 per-token asymmetric activations — torchao's 8da4w;
* ``int4_channel``: int4 symmetric per output channel, weight-only;
* ``int3_g64``: int3 symmetric groups of 64 ([-4, 3], absmax / 3.5), weight-only.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lowbit.trainer.transforms import TransformResult, register_transform

SCHEME_ENV = "LOWBIT_BENCH_TORCHAO"


def fake_quant_configs(scheme: str):
    """(activation_config, weight_config) in torchao's QAT API for a benchmark scheme."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    if scheme == "w4a8":
        return (
            IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True),
        )
    if scheme == "int4_channel":
        return None, IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True)
    if scheme == "int3_g64":
        return None, IntxFakeQuantizeConfig(torch.int3, group_size=64, is_symmetric=True)
    raise SystemExit(f"{SCHEME_ENV}={scheme!r}: choose w4a8, int4_channel or int3_g64")


def prepare(model: nn.Module, scheme: str) -> int:
    """Swap every linear layer but the output head for torchao's FakeQuantizedLinear; return how many."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    activation, weight = fake_quant_configs(scheme)
    head = model.get_output_embeddings()
    chosen = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    quantize_(
        model,
        QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
        filter_fn=lambda module, _name: isinstance(module, nn.Linear) and module is not head,
    )
    return len(chosen)


@register_transform("torchao_qat", order=21, enabled=lambda cfg: bool(os.environ.get(SCHEME_ENV)))
def torchao_qat_transform(model: nn.Module, cfg) -> TransformResult:
    scheme = os.environ[SCHEME_ENV]
    count = prepare(model, scheme)
    return TransformResult(report=f"torchao QAT prepare ({scheme}): {count} linear layers fake-quantized")
