"""DeepSpeed ZeRO 1–3: the engine owns backward, the accumulation boundary, clipping, the
optimizer step and its checkpoints; this strategy drives it through that contract.

The student and the objective's own parameters form one ``TrainedModules`` tree, so ZeRO shards,
clips and checkpoints them together. lowbit's AdamW and schedule are handed to
``deepspeed.initialize`` with a JSON generated from the run config (``deepspeed_config``). The loop
owns the accumulation boundary (``managed_gradient_accumulation: false``): ``backward`` per
micro-batch only accumulates, ``optimizer_step`` is the boundary.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.trainer.config import DeepSpeedConfig, StrategyConfig, TrainConfig
from lowbit.trainer.errors import UserError
from lowbit.trainer.optim import build_optimizer, build_scheduler
from lowbit.trainer.strategies.base import TrainedModules, check_fit, frozen_names, is_tied
from lowbit.trainer.strategies.deepspeed_config import deepspeed_config
from lowbit.trainer.strategies.distributed import DistributedStrategy

TAG = "deepspeed"  # the engine's checkpoint folder inside ours
logger = logging.getLogger("lowbit")


class DeepSpeedStrategy(DistributedStrategy):
    """A ``deepspeed.initialize`` engine over the student (+ loss parameters)."""

    name = "deepspeed"
    checkpoint_layout = "deepspeed"

    def __init__(self, cfg: StrategyConfig, train: TrainConfig) -> None:
        super().__init__(cfg, train)
        import deepspeed

        # DeepSpeed reads LOCAL_RANK itself; a plain one-process run (a group of one) has none.
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.options = cfg.deepspeed or DeepSpeedConfig()
        deepspeed_config(train, self.options, self.world_size, hidden_size=1)  # a user JSON's conflicts, now
        # ZeRO-3 gathers a weight inside its module's forward only; a sharded (ZeRO-3) teacher too.
        self.gathers_in_module_forward = self.options.stage == 3
        self.collective_head_calls = self.options.stage == 3 or cfg.teacher == "sharded"
        # Joins the process group opened above instead of opening its own.
        deepspeed.init_distributed(
            dist_backend=self.backend, timeout=datetime.timedelta(seconds=cfg.timeout_s)
        )
        self.frozen_engines: list[Any] = []
        self.written_by_world_size = self.world_size  # of the checkpoint being resumed (check_resumable)

    @property
    def engine(self) -> str:
        return f"deepspeed-zero{self.options.stage}"

    def prepare(self, model: nn.Module, objective: nn.Module, unused_parameters: bool = False) -> nn.Module:
        import deepspeed

        self.objective = objective
        trained = TrainedModules(model, objective).to(self.device)
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU Adam (adamw_mode,
        # the same decoupled update), which DeepSpeed requires there instead of torch's.
        offload = self.options.offload_optimizer != "none"
        optimizer = build_optimizer(trained, self.train, adamw=_cpu_adam() if offload else None)
        self.scheduler = build_scheduler(optimizer, self.train)
        config = deepspeed_config(self.train, self.options, self.world_size, _hidden_size(model))
        engine, self.optimizer, _, _ = deepspeed.initialize(
            model=trained, optimizer=optimizer, lr_scheduler=self.scheduler, config=config,
            dist_init_required=False,
        )  # fmt: skip
        self.model = engine
        return engine

    def unwrap(self, model: nn.Module) -> nn.Module:
        inner = getattr(model, "module", model)
        return inner.student if isinstance(inner, TrainedModules) else inner

    def place_frozen(self, module: nn.Module) -> nn.Module:
        """The teacher: replicated, or (``strategy.teacher: sharded``) a ZeRO-3 inference engine
        that keeps 1/N of its weights per rank and gathers each layer as it runs."""
        if self.cfg.teacher != "sharded":
            return super().place_frozen(module)
        import deepspeed

        if getattr(module, "hf_quantizer", None) is not None:
            raise UserError(
                "strategy.teacher=sharded cannot partition a bitsandbytes (load_in_4bit) teacher; use "
                "strategy.teacher=replicated with it"
            )
        # Inference only (no optimizer); the weights keep the dtype the teacher was loaded in.
        dtype = next(module.parameters()).dtype
        config = {
            "train_micro_batch_size_per_gpu": self.train.micro_batch_size,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 2**31 - 1,
        }
        engine = deepspeed.initialize(model=module.to(self.device), config=config, dist_init_required=False)[
            0
        ]
        engine.eval()
        self.frozen_engines.append(engine)  # keeps its partitioning hooks alive
        return module

    def backward(self, loss: Tensor) -> None:
        # ZeRO averages gradients over ranks and (by default) divides by the accumulation steps;
        # the loss is already the global mean over the step, so undo both.
        assert self.model is not None
        self.model.backward(loss * self.world_size, scale_wrt_gas=False)

    def optimizer_step(self) -> float | None:
        """The engine's step: reduce, clip (``gradient_clipping``), AdamW, schedule, zero-grad."""
        assert self.model is not None
        self.model.step()
        norm = self.model.get_global_grad_norm()
        if self.train.max_grad_norm <= 0 or norm is None:
            return None
        return float(norm)

    # -- state: DeepSpeed's own checkpoint ---------------------------------------------------------

    def check_resumable(self, checkpoint: Path, state: dict[str, Any]) -> None:
        super().check_resumable(checkpoint, state)
        if state.get("engine") != self.engine:
            raise UserError(
                f"checkpoint {checkpoint} was written by {state.get('engine')} and this run uses {self.engine}: "
                f"ZeRO stages partition the optimizer differently; resume with strategy.deepspeed.stage="
                f"{str(state.get('engine')).removeprefix('deepspeed-zero')}"
            )
        self.written_by_world_size = int(state.get("world_size", self.world_size))

    def save_checkpoint(self, staging: Path) -> None:
        assert self.model is not None
        # A LoRA run's frozen base comes from the model source; only what trains is saved.
        self.model.save_checkpoint(str(staging), tag=TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_checkpoint(self, checkpoint: Path) -> None:
        """DeepSpeed's own files at the world size that wrote them; at another, its universal
        checkpoint: rank 0 converts the ZeRO partitions (``ds_to_universal``) into per-parameter
        fp32 weights and Adam moments next to the checkpoint, every rank loads its new partition
        from them, and the conversion is removed. The checkpoint itself is never modified."""
        assert self.model is not None
        if self.written_by_world_size == self.world_size:
            self._load_engine_checkpoint(checkpoint, universal=False)
            return
        universal = checkpoint.with_name(f".universal-{checkpoint.name}.tmp")
        try:
            problem = None
            if self.is_main:
                try:
                    _convert_to_universal(checkpoint / TAG, universal / TAG)
                except Exception as error:  # reported on every rank below, not only on rank 0
                    problem = f"{type(error).__name__}: {error}"
            problem = self.broadcast_object(problem)
            if problem is not None:
                raise UserError(
                    f"checkpoint {checkpoint} holds ZeRO partitions for {self.written_by_world_size} ranks and "
                    f"DeepSpeed's ds_to_universal could not convert them for {self.world_size} ({problem}): "
                    f"relaunch with {self.written_by_world_size} processes"
                )
            self._load_engine_checkpoint(universal, universal=True)
            if self.options.stage == 3:
                self._repair_zero3_universal_load()
            self.barrier()
        finally:
            if self.is_main:
                shutil.rmtree(universal, ignore_errors=True)
        logger.info(
            "resumed %s of %d ranks on %d through DeepSpeed's universal checkpoint",
            checkpoint.name, self.written_by_world_size, self.world_size,
        )  # fmt: skip

    def _repair_zero3_universal_load(self) -> None:
        """DeepSpeed 0.19's ZeRO-3 universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``)
        puts one shared ``step`` tensor in every group's Adam state, which torch's Adam then
        increments in place once per group (bias correction would run ahead): each gets its own.
        (It also gives every group group 0's hyperparameters; ``checkpoint.restore`` re-applies the
        run's own to every group after any engine's load, which undoes that.)"""
        assert self.optimizer is not None
        for state in self.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _load_engine_checkpoint(self, directory: Path, universal: bool) -> None:
        assert self.model is not None
        # The engine reads this flag from its config at load time; it is only set for this load.
        self.model._config.load_universal_checkpoint = universal
        try:
            path, _ = self.model.load_checkpoint(
                str(directory),
                tag=TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=not frozen_names(self.model),
            )
        finally:
            self.model._config.load_universal_checkpoint = False
        if path is None:
            raise UserError(f"checkpoint {directory}: DeepSpeed found no engine state under {TAG}/")

    def consolidated_state_dict(self) -> dict[str, Tensor]:
        assert self.model is not None
        if self.options.stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict() or {}
            prefix = "student."
            return {name[len(prefix) :]: t.cpu() for name, t in state.items() if name.startswith(prefix)}
        return super().consolidated_state_dict()


def _convert_to_universal(engine_dir: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` in this process (one worker: no process pool inside a rank),
    its progress printing kept out of the run's log. ``inject_missing_state`` adds the version
    record that Megatron-DeepSpeed writes and a plain engine does not."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out.parent, ignore_errors=True)  # a conversion an earlier attempt left
    out.mkdir(parents=True)
    args = Namespace(
        input_folder=str(engine_dir), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


def _cpu_adam():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam


def _hidden_size(model: nn.Module) -> int:
    """The model's width (for bucket sizes), from its transformers config or its widest Linear."""
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(
        getattr(config, "text_config", None), "hidden_size", None
    )
    if width:
        return int(width)
    return max((m.in_features for m in model.modules() if isinstance(m, nn.Linear)), default=1024)


def read_weights(checkpoint: Path, model: nn.Module) -> None:
    """Load the student's fp32 weights of a DeepSpeed checkpoint into ``model``, in one process:
    DeepSpeed's own ``zero_to_fp32`` reassembles every rank's ZeRO partitions. Its state dict lists
    a tied parameter once (a head tied to the embeddings), so the other name may be missing."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    prefix = "student."
    weights = {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    check_fit(checkpoint, [name for name in missing if not is_tied(model, name)], unexpected, model)


STRATEGY = DeepSpeedStrategy
