"""The engine boundary, and the engine for one process on one device.

A ``Strategy`` owns *placement* (``prepare`` wraps the student and builds its optimizer;
``place_frozen`` places the teacher), *the step* (``micro_step``, ``backward``, ``optimizer_step``
with clipping, the schedule and zero-grad) and *the state* (collective ``save_checkpoint`` /
``load_checkpoint``, ``consolidated_state_dict``). The loop says what happens in a step; a
strategy says how on its engine, so the loop never names one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

from lowbit.trainer.config import StrategyConfig, TrainConfig
from lowbit.trainer.errors import UserError
from lowbit.trainer.optim import build_optimizer, build_scheduler

MODEL_FILE = "model.safetensors"
OBJECTIVE_FILE = "objective.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def launched_world_size() -> int:
    """Processes started by torchrun / the elastic launcher (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(wanted: str, local_rank: int) -> torch.device:
    """This rank's device: ``strategy.device`` (auto: its local GPU when CUDA is visible, else CPU)."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("strategy.device is cuda but no CUDA device is visible; use cpu or auto")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def has_parameters(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


class TrainedModules(nn.Module):
    """Everything trained as one module tree: the student, and the objective's own parameters
    (a hidden-state projection). DeepSpeed's engine and DCP's state dicts want one module for
    all trained parameters; the forward is the student's."""

    def __init__(self, student: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, *args, **kwargs):
        return self.student(*args, **kwargs)


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (the memory it owns), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of ``parameters`` to ``max_norm``; return the norm before.

    Unlike ``torch.nn.utils.clip_grad_norm_`` it accepts sharded (DTensor) and plain gradients
    together — the sharded student's and a replicated loss projection's — which torch refuses
    with "mixed torch.Tensor and DTensor". Each kind's norm is taken by torch (a DTensor's over
    all its shards), the two are combined, and every gradient is scaled in place by the same
    factor ``min(1, max_norm / (norm + 1e-6))``, torch's formula.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    norms = []
    if sharded:
        norms.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain))
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        local = _local(grad)
        local.mul_(factor.to(local.device, local.dtype))
    return float(total)


class Strategy:
    """One process on one device (``single``). Distributed engines override what changes."""

    name = "single"
    #: How ``save_checkpoint`` lays out its files (recorded in every checkpoint).
    checkpoint_layout = "safetensors"
    #: Whether a parameter may be read only inside its module's own forward (ZeRO-3 gathers it
    #: there): code that reads a weight directly (the fused head's linear path) must call the module.
    gathers_in_module_forward = False
    #: Whether calling a head module (the student's, or a sharded teacher's) is a collective:
    #: every rank must then make as many head calls per micro-batch as the others.
    collective_head_calls = False

    def __init__(self, cfg: StrategyConfig, train: TrainConfig) -> None:
        self.cfg = cfg
        self.train = train
        self.rank = 0
        self.local_rank = 0
        self.world_size = 1
        self.device = pick_device(cfg.device, 0)
        self.model: nn.Module | None = None
        self.objective: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.unused_parameters = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def engine(self) -> str:
        """The engine as recorded in checkpoints (``deepspeed`` adds its ZeRO stage)."""
        return self.name

    @property
    def loads_weights(self) -> bool:
        """Whether this rank reads the model's weights itself; if not, it builds the model on the
        meta device and receives its part from rank 0 in ``prepare``."""
        return True

    # -- placement ---------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, objective: nn.Module, unused_parameters: bool = False) -> nn.Module:
        """Place and wrap the (transformed) student, place the objective, build the optimizer and
        the schedule; return the module the loop calls forward on. ``unused_parameters``: some
        trained parameters get no gradient in some steps (learned scales before fake quant is on)."""
        self.unused_parameters = unused_parameters
        self.objective = objective.to(self.device)
        self.model = self.wrap(model)
        self.build_optimizer()
        return self.model

    def build_optimizer(self) -> None:
        """AdamW over the wrapped student and the objective's parameters, and the schedule."""
        assert self.model is not None and self.objective is not None
        self.optimizer = build_optimizer(self.model, self.train, self.objective)
        self.scheduler = build_scheduler(self.optimizer, self.train)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move the model to this rank's device and wrap it for distribution."""
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model inside what ``wrap`` returned (names as in the base model)."""
        return model

    def place_frozen(self, module: nn.Module) -> nn.Module:
        """Place a frozen model (the teacher) for inference: replicated on this rank's device.

        A bitsandbytes-quantized model was placed when it was loaded and is left where it is.
        """
        if getattr(module, "hf_quantizer", None) is None:
            module.to(self.device)
        return module

    # -- the step ----------------------------------------------------------------------------------

    def micro_step(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; ``sync=False`` (all but the last
        micro-batch of a step) lets an engine skip its gradient reduction."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        """Backward of a loss already normalised by the step's global token count."""
        loss.backward()

    def trained_parameters(self) -> list[nn.Parameter]:
        assert self.model is not None and self.objective is not None
        return [*self.model.parameters(), *self.objective.parameters()]

    def reduce_extra_gradients(self) -> None:
        """Make the gradients of parameters outside the wrapped model (a loss projection) global."""

    def fill_missing_gradients(self) -> None:
        """A trained parameter that got no gradient this step (a learned scale while fake quant is
        still off) takes the step with a zero gradient, as DeepSpeed's partitioned optimizer does:
        Adam's step count and momentum then evolve alike on every engine (torch would skip it)."""
        for param in self.trained_parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip every trained gradient together to ``max_norm``; return the norm before clipping."""
        return clip_grad_norm([p for p in self.trained_parameters() if p.requires_grad], max_norm)

    def optimizer_step(self) -> float | None:
        """Finish the step: reduce, clip (``train.max_grad_norm``), step, schedule, zero the
        gradients. Returns the gradient norm before clipping (None when clipping is off)."""
        assert self.optimizer is not None and self.scheduler is not None
        self.reduce_extra_gradients()
        self.fill_missing_gradients()
        norm = self.clip_grad_norm(self.train.max_grad_norm) if self.train.max_grad_norm > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def count_parameters(self, model: nn.Module) -> tuple[int, int]:
        """(all, trained) parameters of the student, counted whole however they are sharded (a
        DTensor's numel is global; a ZeRO-3 placeholder carries its full size as ``ds_numel``)."""
        total = trained = 0
        seen: set[int] = set()  # a tied head shares the embeddings' weight: count it once
        for module in self.unwrap(model).modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in params)
            # A 4-bit base layer counts the weights it stands for, not its packed bytes.
            total += getattr(module, "logical_parameters", None) or sum(full_numel(p) for p in params)
            trained += sum(full_numel(p) for p in params if p.requires_grad)
        return total, trained

    def current_lr(self) -> float:
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    # -- collectives -------------------------------------------------------------------------------

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        return tensor

    def max_over_ranks(self, value: int) -> int:
        return int(self.all_reduce_max(torch.tensor([value], dtype=torch.int64)).item())

    def broadcast_object(self, value: Any) -> Any:
        """``value`` as rank 0 has it, on every rank."""
        return value

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        return [value]

    def barrier(self) -> None:
        """Wait for every rank."""

    def teardown(self, finished: bool = False) -> None:
        """Release process groups; ``finished``: every rank ended normally, after the same work."""

    # -- state -------------------------------------------------------------------------------------

    def check_resumable(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Refuse, naming what works, a checkpoint this engine cannot continue from."""
        layout = state.get("layout", "safetensors")
        if layout != self.checkpoint_layout:
            engine = state.get("engine", "single or ddp")
            raise UserError(
                f"checkpoint {checkpoint} was written by the {engine} engine ({layout} files) and cannot be resumed "
                f"by {self.engine}: resume it with strategy.name={str(engine).split('-')[0]}, or start a new run "
                "from its weights"
            )

    def save_checkpoint(self, staging: Path) -> None:
        """Collective: write the trained weights and optimizer state into ``staging``."""
        if not self.is_main:
            return
        assert self.model is not None and self.objective is not None and self.optimizer is not None
        save_student(self.unwrap(self.model), staging / MODEL_FILE)
        if has_parameters(self.objective):
            save_model(self.objective, str(staging / OBJECTIVE_FILE))
        torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Collective: restore what ``save_checkpoint`` wrote (the checkpoint is already verified)."""
        assert self.model is not None and self.objective is not None and self.optimizer is not None
        student = self.unwrap(self.model)
        read_weights(checkpoint, student)
        if has_parameters(self.objective):
            load_model(self.objective, str(checkpoint / OBJECTIVE_FILE), device=str(self.device))
        self.optimizer.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True))

    def consolidated_state_dict(self) -> dict[str, Tensor]:
        """Collective: the student's full state dict on CPU, on rank 0 (empty on other ranks)."""
        assert self.model is not None
        state = self.unwrap(self.model).state_dict()
        return {name: tensor.detach().cpu() for name, tensor in state.items()} if self.is_main else {}


def full_numel(param: Tensor) -> int:
    """Elements of ``param`` as a whole (a ZeRO-3 placeholder holds none; ``ds_numel`` says how many)."""
    return int(getattr(param, "ds_numel", param.numel()))


def frozen_names(model: nn.Module) -> set[str]:
    """Names of the frozen parameters (a LoRA run's base): checkpoints leave them out, for they
    come unchanged from the model source (the checkpoint records the base's fingerprint)."""
    return {name for name, param in model.named_parameters(remove_duplicate=False) if not param.requires_grad}


def save_student(model: nn.Module, path: Path) -> None:
    """The student's weights as safetensors: all of them, or only the trained ones if part is frozen."""
    frozen = frozen_names(model)
    if not frozen:
        save_model(model, str(path))
        return
    trained = {
        name: param.detach().contiguous() for name, param in model.named_parameters() if name not in frozen
    }
    save_file(trained, str(path), metadata={"format": "pt", "lowbit": "trained parameters only"})


def read_weights(checkpoint: Path, model: nn.Module) -> None:
    """Load ``model.safetensors`` into ``model``, or explain why it does not fit."""
    if frozen_names(model):  # trained parameters only, a tied one under one of its names
        missing, unexpected = model.load_state_dict(load_file(checkpoint / MODEL_FILE), strict=False)
        missing = [name for name in missing if not is_tied(model, name)]
    else:
        missing, unexpected = load_model(model, str(checkpoint / MODEL_FILE), strict=False)
    check_fit(checkpoint, missing, unexpected, model)


def is_tied(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` shares its tensor with another parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and sum(param is target for param in params.values()) > 1


def check_fit(checkpoint: Path, missing, unexpected, model: nn.Module | None = None) -> None:
    """Refuse a checkpoint whose names differ from the model's (frozen parameters may be absent)."""
    frozen = frozen_names(model) if model is not None else set()
    missing = [name for name in missing if name not in frozen]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {checkpoint} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; was it saved from a different model config?"
        )


STRATEGY = Strategy
