"""Runs engine scenarios inside one launched process group (torchrun), so one launch serves many.

    torchrun --nproc_per_node 2 -m tests.distributed.engine_runner equivalence OUT ENGINE:METHOD ...
    torchrun --nproc_per_node 2 -m tests.distributed.engine_runner memory OUT ENGINE ...

Starting Python, torch, transformers and DeepSpeed costs several seconds per process; a test
that launched once per engine × method would spend most of CI's time starting up. Each scenario
builds its own ``Trainer`` (and strategy) over the shared process group, trains, and writes
``metrics.jsonl`` under ``OUT/ENGINE/METHOD``; the tests read them.
"""

from __future__ import annotations

import gc
import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lowbit.trainer.config import load_config
from lowbit.trainer.loop import Trainer
from lowbit.trainer.teacher_cache import build_cache
from tests.conftest import TINY, tiny_overrides

ENGINES = {
    "single": ["strategy.name=single"],
    "ddp": ["strategy.name=ddp"],
    "fsdp2": ["strategy.name=fsdp2"],
    "fsdp2_keep": ["strategy.name=fsdp2", "strategy.fsdp2.reshard_after_forward=false"],
    "zero1": ["strategy.name=deepspeed", "strategy.deepspeed.stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.deepspeed.stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"],
    # options of the engines, each against the 1-process run
    "hsdp": [
        "strategy.name=fsdp2",
        "strategy.fsdp2.replicate=2",
    ],  # launched with 4 ranks: 2 replicas × 2 shards
    "fsdp2_checkpointing": ["strategy.name=fsdp2", "model.gradient_checkpointing=true"],
    "zero3_offload": [
        "strategy.name=deepspeed",
        "strategy.deepspeed.stage=3",
        "strategy.deepspeed.offload_optimizer=cpu",
        "strategy.deepspeed.offload_param=cpu",
    ],  # fmt: skip
}
WIDE_TEACHER = (
    "teacher.config={model_type: llama, vocab_size: 262, hidden_size: 96, intermediate_size: 128, "
    "num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}"
)
KD = [
    WIDE_TEACHER,
    "teacher.tokenizer=byte",
    "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}, "
    "{kind: hidden, weight: 0.5, layer_map: [[1, 2], [2, 4]]}]",
    "train.fused_head_chunk=64",
]
METHODS = {
    "plain": [],
    "qat_w4a8": ['quant={rules: [{match: "*", weight: w4a8, activation: w4a8}]}'],
    "qat_lsq_int3": [
        'quant={rules: [{match: "*", weight: {dtype: int3, granularity: group, group_size: 32, '
        "learn_scale: true, scale_init: mse}}]}"
    ],
    "kd": KD,  # kd_kl + hidden states through a learned projection + the fused head
    # generalized JSD + MiniLM-style Q/K/V relations of student layer 1 and teacher layer 3
    "kd_relation": [
        WIDE_TEACHER,
        "teacher.tokenizer=byte",
        "loss=[{kind: ce, weight: 0.5}, {kind: kd_jsd, weight: 0.5, temperature: 2.0}, "
        "{kind: attn_relation, weight: 0.5, layer_map: [[1, 3]], relation_heads: 8}]",
    ],
    # QAD: w4a8 QAT + forward KL through the fused head
    "qad": [
        'quant={rules: [{match: "*", weight: w4a8, activation: w4a8}]}',
        WIDE_TEACHER,
        "teacher.tokenizer=byte",
        "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]",
        "train.fused_head_chunk=64",
    ],
    # learned scales with fake quant off for 2 steps (no gradient: DDP must look for them), frozen from step 4
    "qat_schedule": [
        'quant={rules: [{match: "*", weight: {dtype: int3, granularity: group, group_size: 32, learn_scale: true}}], '
        "enable_after_steps: 2, freeze_scales_after_steps: 4}"
    ],
    # the fused head over chat data whose ranks count different numbers of tokens (so they would
    # run different numbers of head chunks), with a 16-token chunk
    "masked_fused_kd": [
        "data.train_files=[{out}/sft.jsonl]",
        "data.seq_len=96",
        WIDE_TEACHER,
        "teacher.tokenizer=byte",
        "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]",
        "train.fused_head_chunk=16",
    ],
    # the teacher's top-k logits read from an offline cache (built once by rank 0, see `equivalence`)
    "kd_topk_cache": [
        WIDE_TEACHER,
        "teacher.tokenizer=byte",
        "teacher.cache={out}/teacher_cache",
        "loss=[{kind: ce, weight: 0.5}, {kind: kd_topk, weight: 0.5, k: 8, temperature: 2.0}]",
    ],
    "masked": ["data.train_files=[{out}/sft.jsonl]", "data.seq_len=96"],  # uneven target counts per rank
    # QLoRA: NF4 base (double quant) + r=4 adapters on every linear; lr high enough that they move
    "qlora": ["lora={rank: 4, alpha: 8}", "train.lr=1e-2"],
    # QPiSSA: adapters from the weights' principal directions, the NF4 base the residual; under FSDP2
    # only rank 0 decomposes (the others are built on the meta device and receive rank 0's values)
    "qpissa": ["lora={rank: 4, alpha: 8, init: pissa_niter_4}", "train.lr=1e-2"],
    # BitDistill: SubLN, ternary weights + int8 activations ramped in over 2 steps, CE + logit KL
    # (T = 5) + Q/K/V relations; each forward's ternary weight is checked against the absmean
    # ternary of the whole current weight (not of a shard)
    "bitnet_distill": [
        "model.subln=true",
        'quant={rules: [{match: "*", weight: bitnet, activation: bitnet}], warmup: {steps: 2}}',
        WIDE_TEACHER,
        "teacher.tokenizer=byte",
        "loss=[{kind: ce, weight: 1.0}, {kind: kd_kl, weight: 1.0, temperature: 5.0}, "
        "{kind: attn_relation, weight: 1.0, layer_map: [[1, 3]], relation_heads: 8}]",
        f"imports=[{Path(__file__).with_name('fault_hooks.py')}]",
        "hooks=[{kind: check_forward_weights, out: '{run_dir}/forward_weights.txt'}]",
    ],
    # QLoRA + KD through the fused head, with the head trained in full beside the adapters
    "qlora_kd": [
        "lora={rank: 4, alpha: 8, trainable: [lm_head]}",
        "train.lr=1e-2",
        WIDE_TEACHER,
        "teacher.tokenizer=byte",
        "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]",
        "train.fused_head_chunk=64",
    ],
    # w4a8 QAT, checking after every step that each layer's forward used fake_quant(current full weight)
    "qat_probe": [
        'quant={rules: [{match: "*", weight: w4a8, activation: w4a8}]}',
        f"imports=[{Path(__file__).with_name('fault_hooks.py')}]",
        "hooks=[{kind: check_forward_weights, out: '{run_dir}/forward_weights.txt'}]",
    ],
}
STEPS = ["train.max_steps=6", "train.warmup_steps=0", "eval.every_steps=3", "checkpoint.every_steps=3"]


def batch_overrides(world_size: int) -> list[str]:
    """A global batch of 8 sequences whatever the world size: 4 × 2 in one process, 2 × 2 × 2 in two."""
    return [f"train.micro_batch_size={4 // world_size}", "train.grad_accum_steps=2"]


def variable_length_chat(path: Path) -> None:
    """Instruction data whose examples have very different numbers of target tokens, so a mean of
    per-rank means would differ from the global mean."""
    rows = [
        {"prompt": f"question {i}: " + "x" * (i % 7), "response": "answer " * (1 + (i * 5) % 9)}
        for i in range(64)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def scenario_overrides(out: Path, engine: str, method: str, world_size: int) -> list[str]:
    """The tiny recipe's overrides for one scenario, writing to ``OUT/ENGINE/METHOD``."""
    run_dir = out / engine / method
    methods = [
        entry.replace("{out}", str(out)).replace("{run_dir}", str(run_dir)) for entry in METHODS[method]
    ]
    return tiny_overrides(run_dir, *STEPS, *batch_overrides(world_size), *methods, *ENGINES[engine])


def scenario(out: Path, engine: str, method: str, world_size: int):
    return load_config(TINY, scenario_overrides(out, engine, method, world_size))


def equivalence(out: Path, pairs: list[str]) -> None:
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        variable_length_chat(out / "sft.jsonl")
        if any(pair.endswith(":kd_topk_cache") for pair in pairs) and not (out / "teacher_cache").is_dir():
            build_cache(scenario(out, "single", "kd_topk_cache", 1))
    dist.barrier()
    for pair in pairs:
        engine, method = pair.split(":")
        base = method.removesuffix("+sharded_teacher")
        overrides = scenario_overrides(out, engine, base, dist.get_world_size())
        if base != method:  # the same run with the teacher sharded for inference
            overrides += ["strategy.teacher=sharded", f"run.output_dir={out / engine / method}"]
        cfg = load_config(TINY, overrides)
        trainer = Trainer(cfg)
        record_base_shares(trainer, Path(cfg.run.output_dir))
        trainer.fit()
        # the weights as the live engine consolidates them: an independent check of the
        # checkpoint readers that eval and export use
        state = trainer.strategy.consolidated_state_dict()
        if dist.get_rank() == 0:
            tensors = {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}
            save_file(tensors, str(Path(cfg.run.output_dir) / "consolidated.safetensors"))
        trainer.close()
        dist.barrier()


def record_base_shares(trainer: Trainer, run_dir: Path) -> None:
    """For a 4-bit base: the elements of its state this rank holds (a DTensor's local shard, a
    ZeRO-3 partition) and the whole, written by each rank as ``base_shares-rank{R}.json``."""
    student = trainer.strategy.unwrap(trainer.parts.model)
    state = [p for name, p in student.named_parameters() if name.rsplit(".", 1)[-1] in ("packed", "absmax")]
    if not state:
        return

    def local(param) -> int:
        if hasattr(param, "ds_tensor"):
            return param.ds_tensor.numel()
        return param.to_local().numel() if hasattr(param, "to_local") else param.numel()

    shares = {
        "local": sum(local(p) for p in state),
        "whole": sum(getattr(p, "ds_numel", p.numel()) for p in state),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"base_shares-rank{dist.get_rank()}.json").write_text(json.dumps(shares))


def tensor_bytes(root: object) -> int:
    """Bytes of the tensor storages reachable from ``root`` (a ``Trainer``), each counted once.

    Walks the object graph from the trainer — modules, optimizer and engine state, their dicts,
    lists and attributes — without entering classes, functions or Python modules, so what an
    earlier scenario of this process left behind is not counted. A parameter's ``.grad`` is not
    an attribute the walk sees, so it is followed explicitly.
    """
    skip = (
        type,
        types.ModuleType,
        types.FunctionType,
        types.BuiltinFunctionType,
        types.MethodType,
        str,
        bytes,
    )
    seen_objects: set[int] = set()
    storages: dict[tuple[str, int], int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, skip):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor) and not obj.is_meta and not hasattr(obj, "full_tensor"):
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                storage = None
            if storage is not None and storage.nbytes():
                storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
        if isinstance(obj, torch.nn.Parameter) and obj.grad is not None:
            stack.append(obj.grad)
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


class CountBeforeStep:
    """Stands in for ``strategy.optimizer_step``: counts the trainer's tensor bytes on one call."""

    def __init__(self, trainer: Trainer, count_at_call: int) -> None:
        self.trainer, self.step, self.count_at_call = trainer, trainer.strategy.optimizer_step, count_at_call
        self.calls, self.counted = 0, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.count_at_call:
            self.counted = tensor_bytes(self.trainer)
        return self.step()


MEMORY_MODEL = (
    "model.config={model_type: llama, vocab_size: 262, hidden_size: 512, intermediate_size: 1408, "
    "num_hidden_layers: 6, num_attention_heads: 8, num_key_value_heads: 8, max_position_embeddings: 256, "
    "tie_word_embeddings: true}"
)


def memory(out: Path, engines: list[str]) -> None:
    """Per rank: bytes of the tensors a run holds just before its 2nd optimizer step (after its
    backward; the optimizer state exists since the 1st step): parameters + gradients + optimizer
    state, plus the little else the run holds (data, rotary buffers, engine buckets)."""
    results = {}
    for engine in engines:
        overrides = [MEMORY_MODEL, "train.max_steps=2", "train.warmup_steps=0", "eval.every_steps=0",
                     "checkpoint.save_final=false", "data.seq_len=32", "train.micro_batch_size=1", "data.val_fraction=0",
                     "train.grad_accum_steps=1", "data.max_documents=4", *ENGINES[engine]]  # fmt: skip
        trainer = Trainer(load_config(TINY, tiny_overrides(out / "memory" / engine, *overrides)))
        student = trainer.strategy.unwrap(trainer.parts.model)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters())
        trainer.strategy.optimizer_step = CountBeforeStep(trainer, count_at_call=2)
        trainer.fit()
        results[engine] = {"params": params, "bytes": trainer.strategy.optimizer_step.counted}
        trainer.close()
        del trainer
        gc.collect()
        dist.barrier()
    if dist.get_rank() == 0:
        (out / "memory.json").write_text(json.dumps(results, indent=2))


def main(argv: list[str]) -> None:
    command, out = argv[0], Path(argv[1])
    dist.init_process_group("gloo")
    try:
        if command == "equivalence":
            equivalence(out, argv[2:])
        elif command == "memory":
            memory(out, argv[2:])
        else:
            raise SystemExit(f"unknown command {command}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
