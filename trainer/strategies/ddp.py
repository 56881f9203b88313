"""DistributedDataParallel: a full replica per process, gradients all-reduced in backward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from lowbit.trainer.strategies.distributed import DistributedStrategy


class DDPStrategy(DistributedStrategy):
    """Replicas kept equal by averaging gradients; checkpoints are rank 0's safetensors."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Gradients live in DDP's all-reduce buckets instead of beside them: 4 bytes/param less.
        # Parameters that may go without a gradient in a step must be looked for (a graph walk).
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=device_ids,
            gradient_as_bucket_view=True,
            find_unused_parameters=self.unused_parameters,
        )

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    @contextlib.contextmanager
    def micro_step(self, sync: bool) -> Iterator[None]:
        # DDP decides at forward time whether the backward all-reduces: the context spans both.
        if sync or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            yield
        else:
            with self.model.no_sync():
                yield

    def backward(self, loss: Tensor) -> None:
        # DDP averages gradients over ranks; the loss is already the global mean, so undo that.
        (loss * self.world_size).backward()

    def reduce_extra_gradients(self) -> None:
        self.average_gradients(self.objective)

    def teardown(self, finished: bool = False) -> None:
        """Release DDP's reducer (and the logger that holds it) while the process group is still
        registered. Otherwise the reducer, freed later with the model, is the group's last owner
        and runs the gloo group's destructor holding the GIL; that destructor joins gloo's worker
        threads, one of which may be freeing a finished collective's tensors and need the GIL:
        a hang at exit (seen once in CI's fault tests; pytorch/pytorch#56297). Freed from Python's
        group object instead, the destructor runs with the GIL released."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model.reducer = None
            self.model.logger = None
        super().teardown(finished)


STRATEGY = DDPStrategy
