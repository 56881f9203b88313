"""What every multi-process engine shares: joining the process group, collectives, teardown."""

from __future__ import annotations

import datetime
import gc
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowbit.trainer.config import StrategyConfig, TrainConfig
from lowbit.trainer.strategies.base import Strategy, launched_world_size, pick_device

logger = logging.getLogger("lowbit")


# Set for the launcher (lowbit's own and launch/ scripts do): each rendezvous round then gets a
# fresh store on a new port, hosted by rank 0, instead of the agent's store shared by all rounds.
FRESH_STORE_PER_ROUND = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _launch_store(timeout: datetime.timedelta) -> dist.Store:
    """The launcher's key-value store (``env://``), without keys of an earlier launch attempt.

    By default torchrun's workers share the agent's store across ``--max-restarts`` restarts,
    and the keys the previous attempt's ranks published (their gloo addresses) are still in it: a
    restarted rank can read a dead peer's address before the new peer wrote its own, and fail to
    connect ("Connection refused": 2 of 5 restarts of a 2-process probe here). With
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in the launcher's environment every round gets a
    fresh store, and nothing needs doing. Otherwise, under one agent (one node), its restart count
    names the attempt for every rank, and prefixes the keys. Under several agents it cannot (an
    agent whose own workers were healthy restarts them without counting: counts 0 and 1 were seen
    on the two nodes of one attempt), so the store is used as is, with a warning.
    """
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if os.environ.get("RANK") == "0":
            logger.warning(
                "torchrun shares its store across restarts: a restarted multi-node job can fail to reconnect. "
                "Set %s=1 in the launcher's environment (launch/ scripts do)",
                FRESH_STORE_PER_ROUND,
            )
        return store
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"lowbit/attempt-{attempt}", store)


class DistributedStrategy(Strategy):
    """Base of ddp, fsdp2 and deepspeed: one process per device, joined in a process group.

    Under torchrun (or accelerate / deepspeed launchers, which set the same variables) the rank
    comes from the environment. Started plainly, the process is a group of one (an in-memory
    store), so any engine also runs — and resumes a checkpoint — in a single process. The
    backend is nccl on CUDA and gloo on CPU unless ``strategy.backend`` says otherwise;
    ``strategy.timeout_s`` bounds how long a collective waits for a dead or stuck rank.
    """

    def __init__(self, cfg: StrategyConfig, train: TrainConfig) -> None:
        super().__init__(cfg, train)
        launched = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = launched_world_size() if launched else 1
        self.device = pick_device(cfg.device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            timeout = datetime.timedelta(seconds=cfg.timeout_s)
            store = _launch_store(timeout) if launched else dist.HashStore()
            dist.init_process_group(
                self.backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout
            )

    @property
    def backend(self) -> str:
        if self.cfg.backend != "auto":
            return self.cfg.backend
        return "nccl" if self.device.type == "cuda" else "gloo"

    def _collective_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _all_reduce(self, tensor: Tensor, op) -> Tensor:
        reduced = tensor.detach().clone().to(self._collective_device())
        dist.all_reduce(reduced, op=op)
        return reduced.to(tensor.device)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def broadcast_object(self, value: Any) -> Any:
        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0, device=self._collective_device())
        return holder[0]

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Give every rank rank 0's values of a replicated module outside the engine (a loss
        projection): ranks that built the student on the meta device drew no random numbers for
        it, so their own initialisation of what follows differs."""
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def prepare(self, model: nn.Module, objective: nn.Module, unused_parameters: bool = False) -> nn.Module:
        wrapped = super().prepare(model, objective, unused_parameters)
        assert self.objective is not None
        self.broadcast_parameters(self.objective)
        return wrapped

    def all_gather_object(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def average_gradients(self, module: nn.Module | None) -> None:
        """All-reduce-average the gradients of a module no engine wraps (a loss projection)."""
        if module is None:
            return
        for param in module.parameters():
            if param.grad is not None:
                param.grad.copy_(self.all_reduce_sum(param.grad) / self.world_size)

    def barrier(self) -> None:
        dist.barrier()

    def teardown(self, finished: bool = False) -> None:
        """Release the process group. After a normal end every rank first frees what it no longer
        holds and waits for the others, so no rank closes its gloo connections while another still
        uses them: 2-process jobs that destroyed the group unsynchronised now and then lost a rank in
        teardown after their work was saved (SIGABRT, "terminate called without an active
        exception": three times in ~25 suite runs). After an error there is no barrier: a rank that
        failed alone must not wait for ranks blocked elsewhere (torchtitan#1342). ``finished`` is each
        rank's own: if a rank fails after the last collective, the others wait at the barrier until
        the group's timeout (``strategy.timeout_s``), then exit."""
        if self.owns_group and dist.is_initialized():
            if finished:
                gc.collect()
                dist.barrier()
            dist.destroy_process_group()


__all__ = ["DistributedStrategy"]
