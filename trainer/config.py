"""The run configuration: a typed schema, YAML recipes with ``defaults:``, CLI overrides.

Merge order: schema defaults ← each ``defaults:`` file (recursively, in order) ← the recipe ←
``key=value`` overrides. Every merge is done on its own so an error names the file (or the
command line) and the key, keeping OmegaConf's "Did you mean" suggestion.
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional  # Optional, not `X | None`: OmegaConf 2.3 reads only the former

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lowbit.trainer.errors import UserError


@dataclass
class ModelSource:
    """Where a model comes from (shared by the student and the teacher)."""

    path: Optional[str] = None
    """A local Hugging Face directory (safetensors) or a ``.gguf`` file (loaded dequantized)."""
    config: Optional[dict[str, Any]] = None
    """A transformers config dict (``model_type: llama, hidden_size: 64, ...``): builds a random model."""
    tokenizer: Optional[str] = None
    """Tokenizer directory, or ``byte`` for the built-in byte-level tokenizer. Default: ``path``."""
    dtype: str = "fp32"
    """Weight dtype: fp32 | bf16 | fp16."""
    trust_remote_code: bool = False
    """Allow a model directory to run its own Python code (off unless you trust it)."""


@dataclass
class ModelConfig(ModelSource):
    """The student model."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    init_from_teacher: Optional[list[int]] = None
    """Build the student from the teacher: its embeddings, head and these teacher layers, in order."""
    subln: bool = False
    """Insert BitNet's sub-layer norms (SubLN): an RMSNorm on the input of each attention output
    projection (``self_attn.attn_sub_norm``) and MLP down projection (``mlp.ffn_sub_norm``), trained."""
    init_from: Optional[str] = None
    """Start from the trained weights of a previous run (its run dir or a checkpoint dir) instead of
    ``path``'s: how the stages of a recipe chain. The previous run must build the same modules
    (same ``subln`` and quant layers); ``path`` still gives the architecture and tokenizer."""


@dataclass
class TeacherConfig(ModelSource):
    """A frozen teacher for distillation: same loaders as the student, its own dtype."""

    load_in_4bit: bool = False
    """Hold the teacher in NF4 (bitsandbytes) to save memory."""
    cache: Optional[str] = None
    """An offline top-k cache (``lowbit teacher-cache``) read instead of running the teacher."""
    trim_vocab: bool = False
    """Compare logits on the student's shorter range even if the teacher's extra head rows look
    like real vocabulary (non-zero, distinct); by default that is refused."""


@dataclass
class DataConfig:
    """Training and validation data."""

    train_files: list[str] = field(default_factory=list)
    """Files or globs: .txt, .jsonl, .json, .parquet, or a `datasets.save_to_disk` directory."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """A mixture instead of train_files: ``[{files: [...], weight: 1.0, format: auto, name: ...}, ...]``.
    Each epoch holds every source's weighted share of all rows (cached), or each row picks its source
    with those probabilities (streaming); deterministic per seed."""
    val_files: list[str] = field(default_factory=list)
    """Validation files; when empty, ``val_fraction`` of the training examples is held out."""
    val_fraction: float = 0.05
    """Share of training examples held out for validation when ``val_files`` is empty."""
    max_val_examples: Optional[int] = None
    """Cap on validation examples (sequences), to bound eval time."""
    seq_len: int = 512
    """Tokens per training sequence."""
    format: str = "auto"
    """text (packed) | instruction (prompt/response) | chat (messages) | auto (from the fields)."""
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    truncation: str = "error"
    """An instruction/chat example longer than seq_len: error | truncate | drop (counts are reported)."""
    train_on: str = "all_assistant"
    """Chat targets: all_assistant (every assistant turn) | last_assistant | all (every token).
    Instruction data: the response, or with ``all`` the prompt too."""
    packing: bool = False
    """Pack several instruction/chat examples per row (position ids restart per example; no token
    attends across examples). Text is always packed."""
    streaming: bool = False
    """Tokenize while training instead of caching first: for corpora larger than the disk cache or
    RAM. Reads files in order; the position is checkpointed and resumes at the exact token."""
    cache_dir: Optional[str] = None
    """Where tokenized data is kept (default ``$LOWBIT_CACHE/data``, ``~/.cache/lowbit/data``)."""
    encoding: str = "utf-8"
    """Encoding of .txt files (JSON data is UTF-8)."""
    max_documents: Optional[int] = None
    """Use only the first N documents of the training files (quick experiments)."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: Optional[int] = 100
    """Optimizer steps. Set it to null to train by ``epochs``."""
    epochs: Optional[float] = None
    """Passes over the training rows, instead of max_steps (which is then derived: the banner says
    both)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size × grad_accum_steps × ranks."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step. When set, grad_accum_steps is derived from it for the world size
    the run is launched with (it must divide evenly), so a run resumed on another number of ranks
    keeps its batch and data order."""
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and linear schedules)."""
    warmup_steps: int = 0
    schedule: str = "cosine"
    """cosine | linear | constant (after warmup)."""
    weight_decay: float = 0.01
    """AdamW decay, applied to matrices only (not to biases, norms or embeddings' 1-D params)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    optimizer: str = "adamw"
    """adamw (torch) | adamw_8bit | paged_adamw | paged_adamw_8bit (bitsandbytes: 8-bit blockwise
    moments, 2 bytes/parameter instead of 8; paged state that spills to CPU memory under GPU memory
    pressure, CUDA only). The bitsandbytes ones run on the single and ddp engines."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm; 0 disables clipping."""
    precision: str = "fp32"
    """Autocast: fp32 (off) | bf16."""
    compile: bool = False
    """Compile each decoder layer with ``torch.compile`` (Inductor), after the model transforms and
    before the engine wraps it (fake quant is traced into the layer's graph); the first steps are
    slow while it compiles."""
    fused_head_chunk: int = 0
    """0: the model computes full logits. N: the logit loss terms (ce, kd_*) build logits from the
    final hidden states N tokens at a time, so [tokens × vocab] logits never exist."""
    seed: int = 42
    """Seeds model init, data shuffling and every RNG."""


@dataclass
class EvalConfig:
    """Validation loss and perplexity."""

    every_steps: int = 0
    """Evaluate every N steps (0: only at the end)."""
    at_start: bool = False
    """Also evaluate before the first step (the 'before' perplexity)."""
    batch_size: Optional[int] = None
    """Sequences per eval forward; default: train.micro_batch_size."""


@dataclass
class RunSection:
    """Where a run writes."""

    output_dir: str = "runs/default"
    """The run directory: resolved config, metrics.jsonl, checkpoints/."""
    name: Optional[str] = None
    """Run name (W&B and console); default: the directory name."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints."""
    resume: str = "auto"
    """auto (newest complete checkpoint in the run dir, if any) | never | a checkpoint directory."""
    save_final: bool = True
    allow_config_change: bool = False
    """Resume even if the checkpoint's config trains another model, quantization, loss or data
    (refused by default: it would mix two runs). Optimizer and schedule changes are always allowed."""


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """disabled | offline | online. An unreachable server never stops training."""
    project: str = "lowbit"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 60.0


@dataclass
class LogConfig:
    every_steps: int = 1
    """Write a metrics line every N steps."""
    term_grad_norms_every: int = 0
    """Every N steps, log each loss term's gradient norm on the trained parameters
    (``grad_norm/<term>``): how much each term actually pulls, whatever its weight. 0: off."""
    progress: str = "auto"
    """bar | lines | none | auto (bar on a terminal, lines otherwise)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class FSDP2Config:
    """Options of ``strategy.name: fsdp2`` (PyTorch ``fully_shard``: one unit per decoder layer + the root)."""

    reshard_after_forward: Any = True
    """true: free each layer's gathered weights after its forward and gather again in backward
    (ZeRO-3-like, least memory); false: keep them until backward (ZeRO-2-like, less communication);
    an integer N: reshard to groups of N ranks (e.g. the GPUs of one node)."""
    param_dtype: Optional[str] = None
    """Dtype the gathered weights compute in (bf16: FSDP2 mixed precision); default: the model's dtype."""
    reduce_dtype: Optional[str] = None
    """Dtype gradients are reduce-scattered in; default: fp32 when param_dtype is set, else the param dtype."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU memory (the step runs on CPU)."""
    replicate: int = 1
    """HSDP: split the ranks into this many replicas, each sharding the model over world/replicate ranks
    (shard within a node, replicate across nodes); 1 shards over all ranks."""
    load: str = "rank0"
    """rank0: rank 0 reads the weights and the others build the model on the meta device and receive
    their shards, so a large model is not materialised on every rank; full: every rank loads it."""


@dataclass
class DeepSpeedConfig:
    """Options of ``strategy.name: deepspeed``; the DeepSpeed JSON is generated from these and ``train``."""

    stage: int = 2
    """ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: str = "none"
    """none | cpu: optimizer state and step in CPU memory (ZeRO-Offload)."""
    offload_param: str = "none"
    """none | cpu: parameters in CPU memory between uses (stage 3 only)."""
    config: Optional[str] = None
    """A DeepSpeed JSON merged over the generated one (tuning keys: buckets, overlap, ...); a value that
    contradicts lowbit's (batch sizes, precision, clipping, stage) is an error naming both."""


@dataclass
class StrategyConfig:
    name: str = "auto"
    """auto | single | ddp | fsdp2 | deepspeed. auto: the engine an `accelerate launch` config names,
    else ddp under a multi-process launch, else single."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo."""
    device: str = "auto"
    """auto | cpu | cuda."""
    timeout_s: int = 1800
    """How long a collective waits for the other ranks before the job fails (a dead rank never hangs
    the others longer than this)."""
    teacher: str = "replicated"
    """replicated: every rank holds the whole frozen teacher | sharded: fsdp2 or ZeRO-3 shard it for
    inference (each rank holds 1/N; its layers are gathered as they run)."""
    fsdp2: Optional[FSDP2Config] = None
    """fsdp2 options (only with strategy.name fsdp2)."""
    deepspeed: Optional[DeepSpeedConfig] = None
    """DeepSpeed options (only with strategy.name deepspeed)."""


@dataclass
class ExportConfig:
    """Export the trained model when training ends (as ``lowbit export RUN_DIR`` would)."""

    format: str = "gguf-q8_0"
    """One of ``lowbit export``'s formats: gguf-q8_0/q4_0/q4_1/tq2_0/tq1_0/f16, compressed-tensors, bitnet, bnb-nf4,
    merged (float safetensors, LoRA adapters merged), peft (the adapters)."""
    out: Optional[str] = None
    """Output path (default: ``<run.output_dir>/export/<format>``, ``.gguf`` for GGUF)."""
    ptq: bool = False
    """Round-to-nearest quantize a float-trained model with the format's preset."""
    float_type: Optional[str] = None
    """How tensors left in float are stored: f16, bf16 or f32 (default: f16 for GGUF, the model's dtype otherwise)."""
    embedding_type: Optional[str] = None
    """GGUF: how float token embeddings (and an untied head) are stored: f16, bf16, f32 or q8_0 (default:
    what llama-quantize picks — Q8_0 in quantized files, the float type in f16 ones)."""


@dataclass
class QuantWarmup:
    """Quantization warm-up: blend ``x + λ·(q(x) − x)`` with λ ramped from 0 to 1."""

    steps: int = 0
    """Steps of the ramp, counted from the step fake quant turns on (0: no warm-up, λ = 1)."""
    schedule: str = "linear"
    """With t = min(steps done / steps, 1): linear (λ = t) | exponential (λ = (e^(k·t) − 1)/(e^k − 1))
    | sigmoid (σ(k·(t − ½)) rescaled to run from 0 to 1)."""
    k: float = 5.0
    """Steepness of the exponential and sigmoid ramps."""
    weights: bool = True
    """Ramp the weight quantizers."""
    activations: bool = True
    """Ramp the activation quantizers (when false they quantize fully from the start)."""


@dataclass
class QuantConfig:
    """Quantization-aware training: fake-quant layers chosen by rules (first match wins)."""

    rules: list[dict[str, Any]] = field(default_factory=list)
    """``[{match: GLOB | 're:REGEX', weight: PRESET | {fields}, activation: ..., skip: bool}]``."""
    enable_after_steps: int = 0
    """Train in float for the first N steps, then with fake quant (eval always quantizes)."""
    freeze_scales_after_steps: Optional[int] = None
    """Stop learning LSQ scales/offsets from this step on."""
    quantize_head: bool = False
    """Also quantize the output head (kept in high precision by default)."""
    quantize_embeddings: bool = False
    """Also quantize the input embeddings (kept in high precision by default)."""
    baselines: bool = True
    """Measure the float and PTQ (round-to-nearest) perplexity at the start, to log ``recovered``."""
    warmup: QuantWarmup = field(default_factory=QuantWarmup)
    """Ramp the quantization in over some steps (BitNet fine-tuning); λ is logged as ``quant_lambda``."""


@dataclass
class LoraSection:
    """LoRA adapters (peft) on a frozen base: a 4-bit NF4/FP4 base (QLoRA), or the float model
    (fake-quantized by ``quant`` rules when the run has them: LoRA on a QAT base)."""

    rank: int = 16
    """Rank r of each adapter (A: r × in, B: out × r)."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) · B A (alpha / sqrt(r) with ``rslora``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Layers that get adapters: ``all-linear`` (every Linear but the output head), module names or
    their last parts (``q_proj``), globs (``model.layers.*.mlp.*``) or ``re:REGEX`` on full names."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dora: bool = False
    """DoRA: a learned magnitude per output row on top of the low-rank direction update."""
    init: str = "default"
    """How adapters start: default (Kaiming-uniform A, B = 0: the model starts as the base) | gaussian
    (A ~ N(0, 1/r), B = 0) | pissa | pissa_niter_N (PiSSA: the adapters take the r principal singular
    directions of each weight, the frozen base the residual — which a 4-bit base then quantizes: QPiSSA,
    less quantization error; N subspace iterations of a fast randomized SVD instead of a full one) |
    loftq | loftq_iter_N (4-bit base only: base codes and adapters fitted together so that base +
    adapters ≈ the float weight, N alternating rounds, 1 by default)."""
    trainable: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (names, last parts, globs or re:), e.g. [lm_head]."""
    base: str = "nf4"
    """The frozen base: nf4 | fp4 (bitsandbytes 4-bit codes, QLoRA) | float (the model's own dtype)."""
    base_skip: list[str] = field(default_factory=list)
    """Linear layers kept in float in a 4-bit base (names, globs or re:); the output head always is."""
    blocksize: int = 64
    """Weights per absmax block of the 4-bit base (bitsandbytes: 32 … 4096)."""
    double_quant: bool = True
    """Quantize the block absmax to 8 bits (QLoRA's double quantization: ~0.37 bits/weight saved)."""
    compute_dtype: Optional[str] = None
    """Dtype the 4-bit base dequantizes to and multiplies in: fp32 | bf16 | fp16 (default: the model's)."""
    merge_aware: bool = False
    """With ``base: float`` and ``quant`` rules: the forward fake-quantizes the merged weight
    W + (alpha/r)·B·A, so the merged export on the rules' grid is exactly the trained model."""


@dataclass
class LossBalanceConfig:
    """Scale the loss weights once, at the start, so each term's gradient has a chosen size."""

    reference: str = "ce"
    """The term whose weight stays as configured; the others are scaled against its gradient norm."""
    ratios: dict[str, float] = field(default_factory=dict)
    """Target ‖∇ term‖ / ‖∇ reference‖ per term name (default 1 for every term not listed)."""
    calibration_steps: int = 1
    """Steps whose gradient norms (first micro-batch of each) are averaged before the weights are set."""
    after_warmup: bool = False
    """Calibrate on the first steps after a quantization warm-up has reached λ = 1 (the model that
    trains) instead of the first steps of the run; the configured weights apply until then."""


@dataclass
class RunConfig:
    """Everything a run needs. Recipes in ``configs/`` fill it; ``lowbit config`` prints it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunSection = field(default_factory=RunSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    quant: Optional[QuantConfig] = None
    """Quantization-aware training (absent: a float run)."""
    teacher: Optional[TeacherConfig] = None
    """Frozen teacher for the KD loss terms (absent: no distillation)."""
    lora: Optional[LoraSection] = None
    """LoRA adapters on a frozen base (absent: the whole model trains)."""
    export: Optional[ExportConfig] = None
    """Export when training ends (absent: no export)."""
    loss: list[dict[str, Any]] = field(default_factory=lambda: [{"kind": "ce", "weight": 1.0}])
    """Weighted loss terms: ``[{kind: ce, weight: 1.0}, ...]``."""
    loss_balance: Optional[LossBalanceConfig] = None
    """Set the terms' weights from their measured gradient norms at the start (kept in the run dir)."""
    hooks: list[dict[str, Any]] = field(default_factory=list)
    """Step hooks: ``[{kind: NAME, ...fields}]``."""
    imports: list[str] = field(default_factory=list)
    """Python modules or .py files imported before building, to register your own terms/hooks."""


# Built-in loss terms that read a teacher's outputs (plugins are checked when the objective is built).
TEACHER_TERMS = ("kd_kl", "kd_rkl", "kd_jsd", "kd_topk", "hidden", "attn_relation")

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("fp32", "bf16", "fp16"),
    "teacher.dtype": ("fp32", "bf16", "fp16"),
    "data.format": ("auto", "text", "instruction", "chat"),
    "data.truncation": ("error", "truncate", "drop"),
    "data.train_on": ("all_assistant", "last_assistant", "all"),
    "train.schedule": ("cosine", "linear", "constant"),
    "quant.warmup.schedule": ("linear", "exponential", "sigmoid"),
    "lora.base": ("nf4", "fp4", "float"),
    "lora.compute_dtype": (None, "fp32", "bf16", "fp16"),
    "train.precision": ("fp32", "bf16"),
    "train.optimizer": ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"),
    "log.progress": ("auto", "bar", "lines", "none"),
    "log.wandb.mode": ("disabled", "offline", "online"),
    "strategy.name": ("auto", "single", "ddp", "fsdp2", "deepspeed"),
    "strategy.backend": ("auto", "nccl", "gloo"),
    "strategy.device": ("auto", "cpu", "cuda"),
    "strategy.teacher": ("replicated", "sharded"),
    "strategy.fsdp2.param_dtype": (None, "fp32", "bf16", "fp16"),
    "strategy.fsdp2.reduce_dtype": (None, "fp32", "bf16", "fp16"),
    "strategy.fsdp2.load": ("rank0", "full"),
    "strategy.deepspeed.stage": (1, 2, 3),
    "strategy.deepspeed.offload_optimizer": ("none", "cpu"),
    "strategy.deepspeed.offload_param": ("none", "cpu"),
}


def _validate_export(cfg: RunConfig, fail) -> None:
    """The ``export`` section must be exportable when training ends: checked before training starts."""
    from lowbit.quant.formats.gguf import EMBEDDING_TYPES
    from lowbit.trainer.export import FLOAT_TYPES, FORMATS, LORA_FORMATS

    export = cfg.export
    if export.format in LORA_FORMATS:
        if cfg.lora is None:
            fail(f"export.format {export.format} writes LoRA adapters; this run has no `lora` section")
        return
    if export.format not in FORMATS:
        fail(f"export.format: unknown format {export.format!r}; choose one of {', '.join(FORMATS)}")
    if export.embedding_type is not None and (
        not export.format.startswith("gguf-") or export.embedding_type not in EMBEDDING_TYPES
    ):
        fail(
            f"export.embedding_type {export.embedding_type!r}: a GGUF option ({', '.join(EMBEDDING_TYPES)}); "
            f"export.format is {export.format}"
        )
    if export.float_type is not None and export.float_type not in FLOAT_TYPES:
        fail(
            f"export.float_type: unknown value {export.float_type!r}; choose one of {', '.join(FLOAT_TYPES)}"
        )
    quantized_format = FORMATS[export.format].preset is not None
    if export.ptq and cfg.quant is not None:
        fail("export.ptq: this run trains with `quant` rules and exports its trained codes; drop export.ptq")
    if export.ptq and not quantized_format:
        fail(f"export.ptq: {export.format} stores float weights; there is nothing to quantize")
    if quantized_format and cfg.quant is None and not export.ptq:
        fail(
            f"export.format {export.format} stores quantized weights but this run trains in float: add a `quant` "
            "section (QAT) or set export.ptq: true (round to nearest after training)"
        )


def _validate_quant(cfg: RunConfig, fail) -> None:
    warmup = cfg.quant.warmup
    if warmup.steps < 0:
        fail(f"quant.warmup.steps must be 0 (off) or positive, got {warmup.steps}")
    if (
        warmup.steps
        and cfg.train.max_steps is not None
        and cfg.quant.enable_after_steps + warmup.steps >= cfg.train.max_steps
    ):
        fail(
            f"quant.warmup.steps ({warmup.steps}) after quant.enable_after_steps ({cfg.quant.enable_after_steps}) "
            f"ends past train.max_steps ({cfg.train.max_steps}): the model would never train fully quantized. "
            f"Set quant.warmup.steps to at most {max(0, cfg.train.max_steps - cfg.quant.enable_after_steps - 1)}"
        )
    if warmup.steps and warmup.schedule != "linear" and warmup.k <= 0:
        fail(f"quant.warmup.k must be positive for the {warmup.schedule} ramp, got {warmup.k}")
    if warmup.steps and not (warmup.weights or warmup.activations):
        fail("quant.warmup ramps neither weights nor activations: set one of them true, or steps: 0")


def calibration_start(cfg: RunConfig) -> int:
    """The first step ``loss_balance`` measures: 0, or with ``after_warmup`` the first step at λ = 1
    of a quantization warm-up."""
    quant, balance = cfg.quant, cfg.loss_balance
    warmed = quant is not None and quant.warmup.steps and balance is not None and balance.after_warmup
    return quant.enable_after_steps + quant.warmup.steps if warmed else 0


def _validate_term_gradients(cfg: RunConfig, fail) -> None:
    """Per-term gradient norms (logging, loss balance) need each term's own graph on whole parameters."""
    balance = cfg.loss_balance
    if not cfg.log.term_grad_norms_every and balance is None:
        return
    what = "loss_balance" if balance is not None else "log.term_grad_norms_every"
    if cfg.log.term_grad_norms_every < 0:
        fail("log.term_grad_norms_every must be 0 (off) or positive")
    if cfg.train.fused_head_chunk:
        fail(
            f"{what} measures each loss term's gradient on its own, and the fused head "
            "(train.fused_head_chunk) computes the logit terms together: set train.fused_head_chunk: 0"
        )
    if cfg.strategy.name in ("fsdp2", "deepspeed"):
        fail(
            f"{what} takes gradients of the parameters as the model holds them, and {cfg.strategy.name} holds "
            "shards that the forward does not use directly: use strategy.name single or ddp, or drop it"
        )
    if balance is None:
        return
    names = [str(entry.get("name") or entry.get("kind")) for entry in cfg.loss]
    if len(names) < 2:
        fail("loss_balance needs at least two loss terms to balance")
    if balance.reference not in names:
        fail(
            f"loss_balance.reference {balance.reference!r} is not a loss term; the terms are {', '.join(names)}"
        )
    for name, ratio in balance.ratios.items():
        if name not in names:
            fail(f"loss_balance.ratios: {name!r} is not a loss term; the terms are {', '.join(names)}")
        if ratio <= 0:
            fail(f"loss_balance.ratios.{name} must be positive, got {ratio}")
    start = calibration_start(cfg)
    if balance.calibration_steps < 1 or start + balance.calibration_steps >= (cfg.train.max_steps or 1 << 62):
        after = f" after the quantization warm-up (step {start})" if start else ""
        fail(
            f"loss_balance.calibration_steps ({balance.calibration_steps}){after} must be at least 1 and end before "
            f"train.max_steps ({cfg.train.max_steps})"
        )


def _validate_lora(cfg: RunConfig, fail) -> None:
    """LoRA settings that cannot work, found before a model is loaded."""
    from lowbit.quant.nf4 import BLOCKSIZES

    lora = cfg.lora
    if lora.rank < 1:
        fail(f"lora.rank must be at least 1, got {lora.rank}")
    if lora.alpha <= 0:
        fail(f"lora.alpha must be positive, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        fail(f"lora.dropout must be in [0, 1), got {lora.dropout}")
    if not lora.targets:
        fail("lora.targets is empty; e.g. [all-linear] or [q_proj, v_proj]")
    if lora.init not in ("default", "gaussian", "pissa", "loftq") and not re.fullmatch(
        r"(pissa_niter|loftq_iter)_[1-9][0-9]*", lora.init
    ):
        fail(
            f"lora.init: unknown value {lora.init!r}; choose one of default, gaussian, pissa, pissa_niter_N (e.g. 4), "
            "loftq, loftq_iter_N"
        )
    if lora.init.startswith(("pissa", "loftq")) and lora.dora:
        fail(
            f"lora.init={lora.init} does not combine with lora.dora (DoRA's magnitudes assume B = 0 at the start)"
        )
    if lora.init.startswith("loftq") and lora.base == "float":
        fail("lora.init=loftq fits adapters to a 4-bit base's quantization error: set lora.base=nf4 (or fp4)")
    if lora.blocksize not in BLOCKSIZES:
        fail(
            f"lora.blocksize {lora.blocksize}: bitsandbytes' 4-bit blocks are {', '.join(map(str, BLOCKSIZES))}"
        )
    if lora.base != "float" and cfg.quant is not None:
        fail(
            f"lora.base={lora.base} quantizes the frozen base, and `quant` rules fake-quantize it too: set "
            "lora.base=float to train LoRA on the fake-quant base, or drop the `quant` section for QLoRA"
        )
    if lora.merge_aware:
        if lora.base != "float" or cfg.quant is None:
            fail(
                "lora.merge_aware trains adapters through the fake quant of the merged weight: it needs "
                "lora.base=float and a `quant` section (e.g. weight: gguf_q4_0 for an exact Q4_0 merge)"
            )
        if lora.dora or lora.dropout:
            fail(
                "lora.merge_aware computes one merged weight per layer: it takes no lora.dora and lora.dropout=0"
            )
        deepspeed = cfg.strategy.deepspeed
        if cfg.strategy.name == "deepspeed" and deepspeed is not None and deepspeed.stage == 3:
            fail(
                "lora.merge_aware reads base weights outside their module's forward, which ZeRO-3 does not gather: "
                "use strategy.name fsdp2 (or ZeRO-1/2)"
            )
    if lora.base == "float" and lora.base_skip:
        fail(
            "lora.base_skip names layers kept out of a 4-bit base, but lora.base is float: drop lora.base_skip"
        )


def _validate_strategy(cfg: RunConfig, fail) -> None:
    """Engine options that cannot work, found before anything is built."""
    strategy = cfg.strategy
    for engine in ("fsdp2", "deepspeed"):
        if getattr(strategy, engine) is not None and strategy.name not in (engine, "auto"):
            fail(
                f"strategy.{engine} is set but strategy.name is {strategy.name}: its options apply only to "
                f"strategy.name={engine}; drop the strategy.{engine} section or switch the engine"
            )
    if strategy.fsdp2 is not None:
        reshard = strategy.fsdp2.reshard_after_forward
        if not isinstance(reshard, bool) and not (isinstance(reshard, int) and reshard >= 1):
            fail(
                f"strategy.fsdp2.reshard_after_forward: true, false or a number of ranks >= 1, got {reshard!r}"
            )
        if strategy.fsdp2.replicate < 1:
            fail(f"strategy.fsdp2.replicate must be at least 1, got {strategy.fsdp2.replicate}")
    if strategy.deepspeed is not None:
        options = strategy.deepspeed
        if options.offload_param != "none" and options.stage != 3:
            fail(
                f"strategy.deepspeed.offload_param={options.offload_param} needs ZeRO stage 3 (parameters are only "
                f"partitioned there), got stage {options.stage}; set strategy.deepspeed.stage=3 or drop it"
            )
        if options.config is not None and not Path(options.config).is_file():
            fail(f"strategy.deepspeed.config: {options.config} does not exist")
    if strategy.teacher == "sharded":
        if strategy.name in ("single", "ddp"):
            fail(
                f"strategy.teacher=sharded needs an engine that shards (fsdp2 or deepspeed), not {strategy.name}: "
                "set strategy.name=fsdp2 (or deepspeed), or strategy.teacher=replicated"
            )
        if cfg.teacher is None or cfg.teacher.cache is not None:
            fail(
                "strategy.teacher=sharded, but no teacher runs (none configured, or teacher.cache replaces it)"
            )
        if cfg.teacher.load_in_4bit:
            fail(
                "strategy.teacher=sharded cannot shard a bitsandbytes NF4 teacher (teacher.load_in_4bit): use "
                "strategy.teacher=replicated with it, or a bf16 teacher (teacher.dtype=bf16) sharded"
            )
    if cfg.train.optimizer != "adamw" and strategy.name in ("fsdp2", "deepspeed"):
        fail(
            f"train.optimizer={cfg.train.optimizer} (bitsandbytes) steps whole tensors and does not run under "
            f"{strategy.name}, which shards the optimizer state itself: use train.optimizer=adamw, or the ddp engine"
        )
    if strategy.timeout_s < 1:
        fail(f"strategy.timeout_s must be at least 1 second, got {strategy.timeout_s}")
    if cfg.train.global_batch_size is not None and cfg.train.global_batch_size < 1:
        fail(f"train.global_batch_size must be at least 1, got {cfg.train.global_batch_size}")


def resolve_global_batch(train: TrainConfig, world_size: int) -> None:
    """Derive ``grad_accum_steps`` from ``global_batch_size`` for this world size, in place."""
    if train.global_batch_size is None:
        return
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size % per_pass:
        raise UserError(
            f"train.global_batch_size {train.global_batch_size} is not a multiple of micro_batch_size "
            f"{train.micro_batch_size} × {world_size} ranks = {per_pass}: set a global batch that is, or a "
            f"micro_batch_size that divides {train.global_batch_size // world_size if train.global_batch_size >= world_size else 1}"
        )
    train.grad_accum_steps = train.global_batch_size // per_pass


def _package_dir(name: str) -> str:
    """``${pkg:NAME}``: the directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"${{pkg:{name}}}: no installed package named {name!r}; pip install it first")
    return str(Path(list(spec.submodule_search_locations)[0]))


if not OmegaConf.has_resolver("pkg"):
    # omegaconf 2.4 renamed register_new_resolver (still present, deprecated); 2.3 has only the old name.
    getattr(OmegaConf, "register_resolver", OmegaConf.register_new_resolver)("pkg", _package_dir)


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = (getattr(error, "msg", None) or str(error)).splitlines()[0]
    return f"{key}: {message}" if key else message


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """Return (source name, config) for ``path`` and, before it, its ``defaults:`` files."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"{path}: `defaults:` files include each other in a cycle: {cycle}")
    if not path.is_file():
        where = f" (listed in `defaults:` of {chain[-1]})" if chain else ""
        raise UserError(f"config file {path} does not exist{where}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # yaml.YAMLError and friends: report, don't trace
        raise UserError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path}: a config file must be a mapping of sections, got a list")
    sources: list[tuple[str, DictConfig]] = []
    defaults = loaded.pop("defaults", [])
    if isinstance(defaults, str) or not all(isinstance(d, str) for d in defaults):
        raise UserError(f"{path}: `defaults:` must be a list of YAML file paths (relative to this file)")
    for entry in defaults:
        sources += _read_yaml(path.parent / entry, (*chain, path))
    sources.append((str(path), loaded))
    return sources


def _get(cfg: RunConfig, dotted_key: str) -> Any:
    return functools.reduce(getattr, dotted_key.split("."), cfg)


def _validate(cfg: RunConfig, source: str) -> None:
    def fail(message: str) -> None:
        raise UserError(f"{source}: {message}")

    for key, allowed in CHOICES.items():
        if (key.startswith("teacher.") and cfg.teacher is None) or (
            key.startswith(("lora.", "quant.")) and getattr(cfg, key.split(".")[0]) is None
        ):
            continue
        section = key.rsplit(".", 1)[0]
        if section in ("strategy.fsdp2", "strategy.deepspeed") and _get(cfg, section) is None:
            continue
        value = _get(cfg, key)
        if value not in allowed:
            fail(
                f"{key}: unknown value {value!r}; choose one of {', '.join(str(a) for a in allowed if a is not None)}"
            )
    if cfg.export is not None:
        _validate_export(cfg, fail)
    _validate_strategy(cfg, fail)
    sources = [
        cfg.model.path is not None,
        cfg.model.config is not None,
        cfg.model.init_from_teacher is not None,
    ]
    if sum(sources) != 1:
        fail(
            "set exactly one of model.path (a pretrained model), model.config (a random model) or "
            "model.init_from_teacher (layers copied from the teacher)"
        )
    if cfg.model.init_from_teacher is not None and cfg.teacher is None:
        fail("model.init_from_teacher needs a teacher: set teacher.path")
    if cfg.teacher is not None and (cfg.teacher.path is None) == (cfg.teacher.config is None):
        fail("set exactly one of teacher.path or teacher.config")
    kd_terms = [entry["kind"] for entry in cfg.loss if str(entry.get("kind", "")).startswith("kd_")]
    if kd_terms and cfg.teacher is None:
        fail(
            f"loss term(s) {', '.join(kd_terms)} distill from a teacher, but none is configured: set teacher.path"
        )
    if cfg.model.config is not None and "model_type" not in cfg.model.config:
        fail("model.config needs a model_type (e.g. llama)")
    _validate_data(cfg, fail)
    for key in ("micro_batch_size", "grad_accum_steps"):
        if getattr(cfg.train, key) < 1:
            fail(f"train.{key} must be at least 1, got {getattr(cfg.train, key)}")
    _validate_steps(cfg, fail)
    if cfg.train.lr <= 0:
        fail(f"train.lr must be positive, got {cfg.train.lr}")
    if len(cfg.train.betas) != 2:
        fail(f"train.betas needs two numbers, got {list(cfg.train.betas)}")
    if cfg.checkpoint.keep_last < 1:
        fail("checkpoint.keep_last must be at least 1")
    for key in ("eval.every_steps", "checkpoint.every_steps"):
        if _get(cfg, key) < 0:
            fail(f"{key} must be 0 (off) or positive")
    if not cfg.loss:
        fail("loss is empty; e.g. loss: [{kind: ce, weight: 1.0}]")
    if cfg.train.fused_head_chunk < 0:
        fail("train.fused_head_chunk must be 0 (off) or a positive number of tokens")
    if cfg.train.fused_head_chunk and cfg.teacher is not None and cfg.teacher.cache is not None:
        fail("train.fused_head_chunk does not combine with teacher.cache: set one of them")
    if cfg.quant is not None and not cfg.quant.rules:
        fail("quant.rules is empty; e.g. quant: {rules: [{match: '*', weight: w4a8, activation: w4a8}]}")
    if cfg.quant is not None:
        _validate_quant(cfg, fail)
    if cfg.lora is not None:
        _validate_lora(cfg, fail)
    _validate_term_gradients(cfg, fail)
    for entry in (*cfg.loss, *cfg.hooks):
        if "kind" not in entry:
            fail(f"every loss term and hook needs a `kind`, got {dict(entry)}")


def _validate_data(cfg: RunConfig, fail) -> None:
    data = cfg.data
    if bool(data.train_files) == bool(data.sources):
        fail(
            "set one of data.train_files (files or globs) or data.sources (a mixture: [{files: [...], weight: 1.0}, ...])"
            + ("; both are set" if data.train_files else "")
        )
    if data.seq_len < 2:
        fail(f"data.seq_len must be at least 2, got {data.seq_len}")
    if not 0 <= data.val_fraction < 1:
        fail(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")
    try:
        codecs.lookup(data.encoding)
    except LookupError:
        fail(f"data.encoding: unknown encoding {data.encoding!r}; e.g. utf-8, latin-1, cp1252")
    if data.sources and cfg.teacher is not None and cfg.teacher.cache is not None:
        fail(
            "teacher.cache stores the teacher's logits per training row, and a mixture draws its rows anew each epoch: drop one of them"
        )
    if data.packing and any(entry.get("kind") == "attn_relation" for entry in cfg.loss):
        fail(
            "data.packing puts several examples in a row, and attn_relation relates every token of a row: set one of them"
        )
    if data.streaming:
        if data.val_fraction > 0 and not data.val_files:
            fail(
                "data.streaming cannot hold out part of a stream: give data.val_files, or set data.val_fraction=0"
            )
        if data.max_documents is not None:
            fail(
                "data.max_documents is for cached data: with data.streaming, drop it (a stream reads what it needs)"
            )
        if cfg.teacher is not None and cfg.teacher.cache is not None:
            fail(
                "teacher.cache stores the teacher's logits per cached row, and a stream has no fixed rows: drop data.streaming or teacher.cache"
            )
        if cfg.train.epochs is not None:
            fail(
                "train.epochs needs the number of rows, which a stream does not know in advance: set train.max_steps"
            )


def _validate_steps(cfg: RunConfig, fail) -> None:
    """Checks that need the number of steps (again once ``train.epochs`` has set it)."""
    train = cfg.train
    if (train.max_steps is None) == (train.epochs is None):
        fail(
            "train.max_steps and train.epochs are both set: train by one of them (add train.max_steps=null to train by epochs)"
            if train.epochs is not None
            else "set train.max_steps or train.epochs"
        )
    if train.epochs is not None and not train.epochs > 0:
        fail(f"train.epochs must be positive, got {train.epochs}")
    if train.max_steps is None:
        return
    if train.max_steps < 1:
        fail(f"train.max_steps must be at least 1, got {train.max_steps}")
    if not 0 <= train.warmup_steps < train.max_steps:
        fail(f"train.warmup_steps ({train.warmup_steps}) must be below train.max_steps ({train.max_steps})")


def resolve_epochs(cfg: RunConfig, rows: int, global_batch_size: int) -> None:
    """With ``train.epochs``: set ``train.max_steps`` to the steps that cover them, then check what
    depends on it (warm-ups, calibration) as a config with that max_steps would be."""
    if cfg.train.epochs is None:
        return
    cfg.train.max_steps = max(1, math.ceil(cfg.train.epochs * rows / global_batch_size))
    epochs, cfg.train.epochs = cfg.train.epochs, None
    try:
        _validate(
            cfg,
            f"train.epochs={epochs:g} ({cfg.train.max_steps} steps of {global_batch_size} of {rows:,} rows)",
        )
    finally:
        cfg.train.epochs = epochs


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a recipe (with its ``defaults:``) and ``key=value`` overrides onto the schema.

    Raises:
        UserError: naming the file (or "command line") and the key for every problem.
    """
    merged = OmegaConf.structured(RunConfig)
    sources = _read_yaml(Path(path)) if path is not None else []
    for bad in [o for o in overrides if "=" not in o]:
        raise UserError(f"command line: override {bad!r} is not of the form key=value")
    try:
        sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    except Exception as error:  # YAML syntax in a value
        raise UserError(f"command line: cannot parse the overrides {list(overrides)}: {error}") from None
    for source, cfg in sources:
        try:
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as error:
            raise UserError(f"{source}: {_describe(error)}") from None
    last_source = str(path) if path is not None else "command line"
    if path is not None and overrides:
        last_source += " (with command-line overrides)"
    steps_set = [
        name
        for name, source in sources
        if OmegaConf.select(source, "train.max_steps", default=None) is not None
    ]
    if OmegaConf.select(merged, "train.epochs") is not None and not steps_set:
        merged.train.max_steps = None  # the default 100 gives way to epochs
    try:
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise UserError(f"{last_source}: required value(s) missing: {', '.join(missing)}")
        run_config: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise UserError(f"{last_source}: {_describe(error)}") from None
    _validate(run_config, last_source)
    return run_config


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``lowbit config`` prints and every run dir stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain containers (for W&B and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]
