"""FSDP2 (PyTorch ``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

Layout as in torchtitan's ``apply_fsdp``: one FSDP unit per decoder layer, then the root (the
embeddings, final norm and head). Each layer's weights are all-gathered just before its forward
(and again before its backward when ``reshard_after_forward``), its gradients reduce-scattered
after its backward — after every micro-batch's backward, so they stay sharded (deferring it to
the last micro-batch would keep full-size gradients on every rank through the accumulation);
the optimizer steps on the local shards (DTensors). The root is not
resharded after forward: the loss needs the head right after it (the fused head reads the
gathered weight directly), and backward starts there.

Checkpoints are ``torch.distributed.checkpoint`` (DCP) directories: every rank writes its own
shards in parallel, and loading reshards, so a run saved on N ranks resumes on M.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowbit.trainer.config import FSDP2Config, StrategyConfig, TrainConfig
from lowbit.trainer.errors import UserError
from lowbit.trainer.model import DTYPES, decoder_layers
from lowbit.trainer.strategies.base import TrainedModules, frozen_names
from lowbit.trainer.strategies.distributed import DistributedStrategy

DCP_DIR = "dcp"


class FSDP2Strategy(DistributedStrategy):
    """``fully_shard`` per decoder layer + root, over a 1-D mesh or a 2-D (replicate, shard) HSDP mesh."""

    name = "fsdp2"
    checkpoint_layout = "dcp"

    def __init__(self, cfg: StrategyConfig, train: TrainConfig) -> None:
        super().__init__(cfg, train)
        self.options = cfg.fsdp2 or FSDP2Config()
        replicate = self.options.replicate
        if self.world_size % replicate:
            raise UserError(
                f"strategy.fsdp2.replicate={replicate} does not divide the {self.world_size} ranks; "
                f"choose a divisor of {self.world_size} (e.g. the number of nodes)"
            )
        if self.options.cpu_offload and self.device.type == "cpu":
            raise UserError(
                "strategy.fsdp2.cpu_offload moves sharded state from the GPU to CPU memory, but this run computes "
                "on the CPU, where it already is: drop strategy.fsdp2.cpu_offload (or run on GPUs)"
            )
        reshard = self.options.reshard_after_forward
        shard_size = self.world_size // replicate
        if not isinstance(reshard, bool) and shard_size % reshard:
            raise UserError(
                f"strategy.fsdp2.reshard_after_forward={reshard} must divide the shard group of {shard_size} "
                "ranks (e.g. the GPUs of a node), or be true/false"
            )
        from torch.distributed.device_mesh import init_device_mesh

        if replicate > 1:
            self.mesh = init_device_mesh(
                self.device.type, (replicate, shard_size), mesh_dim_names=("replicate", "shard")
            )
        else:
            self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))

    @property
    def backend(self) -> str:
        """With CPU offload the sharded state, and so its collectives (gradient-norm reduction),
        live on the CPU: gloo serves those beside nccl (as torchtitan does)."""
        offload = self.cfg.fsdp2 is not None and self.cfg.fsdp2.cpu_offload
        if offload and self.cfg.backend == "auto" and self.device.type == "cuda":
            return "cuda:nccl,cpu:gloo"
        return super().backend

    @property
    def loads_weights(self) -> bool:
        return self.is_main or self.options.load == "full" or self.world_size == 1

    def _shard(self, model: nn.Module, reshard: bool | int, mixed_precision: bool) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options = self.options
        kwargs: dict = {"mesh": self.mesh}
        if mixed_precision and (options.param_dtype or options.reduce_dtype):
            reduce = options.reduce_dtype or "fp32"  # bf16 compute, fp32 gradient reduction
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=DTYPES.get(options.param_dtype or ""), reduce_dtype=DTYPES[reduce]
            )
        if options.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=reshard, **kwargs)
        fully_shard(model, reshard_after_forward=False, **kwargs)

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.options.cpu_offload and not _on_meta(model):
            model = model.to(self.device)
        self._shard(model, self.options.reshard_after_forward, mixed_precision=True)
        if self.options.cpu_offload and not _on_meta(model):
            _buffers_to(model, self.device)  # parameters live on CPU; buffers are used where compute runs
        return model

    def prepare(self, model: nn.Module, objective: nn.Module, unused_parameters: bool = False) -> nn.Module:
        """Shard the student; where only rank 0 read the weights, the others' shards come from it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        broadcast = self.options.load == "rank0" and self.world_size > 1
        full_state = model.state_dict() if broadcast and self.is_main else {}
        on_meta = _on_meta(model)
        self.objective = objective.to(self.device)
        self.model = self.wrap(model)
        if on_meta:
            model.to_empty(device="cpu" if self.options.cpu_offload else self.device)
            if self.options.cpu_offload:
                _buffers_to(model, self.device)
        if broadcast:
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(model, full_state, options=options)
            for buffer in model.buffers():  # not in the state dict (rotary inv_freq): rank 0's values
                dist.broadcast(buffer.data, src=0)
        del full_state
        self.broadcast_parameters(self.objective)
        self.build_optimizer()
        return self.model

    def place_frozen(self, module: nn.Module) -> nn.Module:
        """The teacher: replicated, or (``strategy.teacher: sharded``) its layers sharded and
        gathered one at a time as it runs; its root (embeddings, head) stays gathered, for the
        fused head reads the head's weight after the forward."""
        if self.cfg.teacher != "sharded":
            return super().place_frozen(module)
        if getattr(module, "hf_quantizer", None) is not None:
            raise UserError(
                "strategy.teacher=sharded cannot shard a bitsandbytes (load_in_4bit) teacher; use "
                "strategy.teacher=replicated with it, or a bf16 sharded teacher"
            )
        module.to(self.device)
        self._shard(module, True, mixed_precision=False)
        return module

    def backward(self, loss: Tensor) -> None:
        # reduce-scatter averages over the ranks; the loss is already the global mean.
        (loss * self.world_size).backward()

    def reduce_extra_gradients(self) -> None:
        self.average_gradients(self.objective)

    # -- state: DCP --------------------------------------------------------------------------------

    def _state(self) -> tuple[TrainedModules, dict, Any]:
        """What a checkpoint holds; a LoRA run's frozen base is left out (it comes from the model source)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        assert self.model is not None and self.objective is not None and self.optimizer is not None
        trained = TrainedModules(self.model, self.objective)
        frozen = bool(frozen_names(self.model))
        options = StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)
        model_state, optimizer_state = get_state_dict(trained, self.optimizer, options=options)
        return trained, {"model": model_state, "optimizer": optimizer_state}, options

    def save_checkpoint(self, staging: Path) -> None:
        import torch.distributed.checkpoint as dcp

        _, state, _ = self._state()
        dcp.save(state, checkpoint_id=str(staging / DCP_DIR))

    def load_checkpoint(self, checkpoint: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        trained, state, options = self._state()
        dcp.load(state, checkpoint_id=str(checkpoint / DCP_DIR))
        set_state_dict(
            trained,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=options,
        )

    def consolidated_state_dict(self) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)


def _on_meta(model: nn.Module) -> bool:
    return any(param.is_meta for param in model.parameters())


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def read_weights(checkpoint: Path, model: nn.Module) -> None:
    """Load the student's weights from a DCP checkpoint into a plain (unsharded) model, in one
    process: DCP reassembles every rank's shards (what ``lowbit eval`` and ``export`` read)."""
    import torch.distributed.checkpoint as dcp

    frozen = frozen_names(model)  # not in a LoRA run's checkpoint: the base comes from the model source
    state = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items() if name not in frozen}
    target = {"model": {f"student.{name}": tensor.data for name, tensor in state.items()}}
    with torch.no_grad():
        dcp.load(target, checkpoint_id=str(checkpoint / DCP_DIR), no_dist=True)
    # ``target`` shares the model's tensors, so the load filled the model in place.


STRATEGY = FSDP2Strategy
