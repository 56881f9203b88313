"""Distribution strategies behind one interface: how a model is placed and kept in sync.

``single`` and ``ddp`` live here; ``fsdp2`` and ``deepspeed`` register the same way. The loop only
calls the methods of ``Strategy``, so it never branches on which one runs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from lowbit.losses.registry import Registry
from lowbit.trainer.config import StrategyConfig
from lowbit.trainer.errors import UserError

STRATEGIES: Registry[Strategy] = Registry("strategy")


def launched_world_size() -> int:
    """Processes started by torchrun / the elastic launcher (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Strategy:
    """A single process on one device. Subclasses override what distribution changes."""

    name = "single"

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self.rank = 0
        self.local_rank = 0
        self.world_size = 1
        self.device = self._pick_device()

    def _pick_device(self) -> torch.device:
        wanted = self.cfg.device
        if wanted == "cuda" and not torch.cuda.is_available():
            raise UserError("strategy.device is cuda but no CUDA device is visible; use cpu or auto")
        if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move the model to this rank's device and wrap it for distribution."""
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's backward; ``sync=False`` skips gradient all-reduce."""
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_gradients(self, module: nn.Module) -> None:
        """Average the gradients of parameters that live outside the wrapped model."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def teardown(self) -> None:
        """Release process groups."""


STRATEGIES.register("single")(Strategy)


@STRATEGIES.register("ddp")
class DDPStrategy(Strategy):
    """DistributedDataParallel: one full replica per process, gradients all-reduced.

    Under torchrun the rank comes from the environment; the backend is nccl on CUDA and gloo on
    CPU unless ``strategy.backend`` says otherwise.
    """

    name = "ddp"

    def __init__(self, cfg: StrategyConfig) -> None:
        if "RANK" not in os.environ:
            raise UserError(
                "strategy ddp needs processes started by a launcher: run "
                "`lowbit train --nproc-per-node N CONFIG` or `torchrun --nproc_per_node N -m lowbit.trainer train CONFIG`"
            )
        super().__init__(cfg)
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = launched_world_size()
        self.device = self._pick_device()
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
            yield
        else:
            with model.no_sync():
                yield

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.detach().clone().to(self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(tensor.device)

    def all_reduce_gradients(self, module: nn.Module) -> None:
        for param in module.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                param.grad /= self.world_size

    def barrier(self) -> None:
        dist.barrier()

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """The configured strategy; ``auto`` picks ddp when launched with several processes."""
    name = cfg.name
    if name == "auto":
        name = "ddp" if launched_world_size() > 1 else "single"
    try:
        factory = STRATEGIES.get(name)
    except ValueError as error:
        raise UserError(f"strategy.name: {error}") from None
    if name == "single" and launched_world_size() > 1:
        raise UserError("strategy single was launched with several processes; use ddp (or auto)")
    return factory(cfg)
