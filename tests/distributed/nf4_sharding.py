"""FSDP2 shards a 4-bit base for real and gathers it bit for bit (run under torchrun, 2 ranks).

    torchrun --nproc_per_node 2 -m tests.distributed.nf4_sharding OUT.json

Builds one ``FrozenNF4Linear`` with double quantization whose packed codes are planted with every
byte pair that reads as a non-canonical bf16 NaN (what corrupted bitsandbytes' bf16-stored weights
under FSDP2, bitsandbytes#1945), shards it with a bf16 mixed-precision policy, and records: each
rank's local share of every state tensor, the gathered tensors vs the planted ones, and the
sharded forward vs the unsharded module's. Rank 0 writes the JSON the test reads.
"""

from __future__ import annotations

import copy
import gc
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from lowbit.quant.nf4 import FrozenNF4Linear


def nan_patterns(count: int) -> torch.Tensor:
    """``count`` bytes whose little-endian pairs are bf16 NaNs other than the canonical 0x7FC0."""
    nans = [v for v in range(0x7F81, 0x8000) if v != 0x7FC0] + [v for v in range(0xFF81, 0x10000)]
    pairs = torch.tensor(nans, dtype=torch.int32)
    lo, hi = (pairs & 0xFF).to(torch.uint8), (pairs >> 8).to(torch.uint8)
    data = torch.stack([lo, hi], dim=1).reshape(-1)
    return data.repeat(-(-count // data.numel()))[:count]


def sharded_run() -> dict:
    """Shard the planted layer, run it, gather it; what rank 0 writes (every rank computes it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    layer = FrozenNF4Linear.from_linear(nn.Linear(512, 200, bias=True), double_quant=True)
    with torch.no_grad():
        layer.packed.copy_(nan_patterns(layer.packed.numel()))
    planted = {name: tensor.detach().clone() for name, tensor in layer.named_parameters()}
    reference = copy.deepcopy(layer)
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference(x)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(layer, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    local = {name: param.to_local().numel() for name, param in layer.named_parameters()}
    with torch.no_grad():
        got = layer(x)
    layer.unshard()
    gathered = {name: torch.equal(param.data, planted[name]) for name, param in layer.named_parameters()
                if name != "bias"}  # fmt: skip
    dtypes = {name: str(param.dtype) for name, param in layer.named_parameters()}
    layer.reshard()
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    return {
        "whole": {name: tensor.numel() for name, tensor in planted.items()},
        "shares": shares,
        "gathered_equal": gathered,
        "gathered_dtypes": dtypes,
        "forward_max_diff": (got.float() - expected.float()).abs().max().item(),
        "nan_bytes_planted": int(planted["packed"].numel()),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    try:
        result = sharded_run()
        if dist.get_rank() == 0:
            with open(out, "w") as handle:
                json.dump(result, handle)
        # As engine_runner does: the sharded layer (and its collectives' work objects) is freed and
        # every rank is here before the group goes. This script used to destroy the group under a
        # live FSDP module, and twice in ~20 CI runs a rank died in teardown (SIGABRT, "terminate
        # called without an active exception"); engine_runner's teardown never has.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
