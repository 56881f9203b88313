"""The frozen teacher for distillation, and a student initialised from its layers.

The teacher is loaded like the student (HF directory, GGUF, or a config), then frozen:
``eval()``, no gradients, never seen by the optimizer, in its own dtype (optionally NF4 through
bitsandbytes). Its vocabulary must be the student's: identical tokenizers pass, and if the two
embedding matrices differ only in padding rows (e.g. 151936 vs 151665) the logits are compared
on the shared range; any other difference is an error naming both sizes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from lowbit.trainer.config import ModelConfig, TeacherConfig
from lowbit.trainer.errors import UserError
from lowbit.trainer.model import DTYPES, build_tokenizer, enable_checkpointing, load_model

LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..+)$")


@dataclass
class Teacher:
    """A frozen model and the number of vocabulary entries it shares with the student."""

    model: nn.Module
    shared_vocab: int | None  # None: identical output sizes, nothing to slice

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, hidden_states: bool = False,
        position_ids: torch.Tensor | None = None, use_cache: bool | None = None,
    ):  # fmt: skip
        """The teacher's outputs (logits, and per-layer hidden states when asked), without autograd.
        ``position_ids`` (packed rows) come without an attention mask (``data.model_inputs``)."""
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=hidden_states, use_cache=use_cache,
        )  # fmt: skip


def _output_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]


def build_teacher(
    cfg: TeacherConfig, model_dir, student_tokenizer, seed: int, device: torch.device
) -> Teacher:
    """Load, freeze and check the teacher (left on CPU for the engine to place; an NF4 teacher is
    loaded straight onto ``device``, as bitsandbytes requires)."""
    tokenizer = build_tokenizer(cfg, model_dir)
    if tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise UserError(
            f"teacher and student tokenizers differ (student {len(student_tokenizer)} tokens, teacher "
            f"{len(tokenizer)}): distillation compares distributions over the same vocabulary; "
            "use a teacher from the student's family"
        )
    load_kwargs = {}
    if cfg.load_in_4bit:
        if model_dir is None:
            raise UserError("teacher.load_in_4bit loads a pretrained teacher: set teacher.path")
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[cfg.dtype]
        )
        load_kwargs["device_map"] = {"": str(device)}  # bitsandbytes models are placed at load, not moved
    model = load_model(cfg, model_dir, seed, len(tokenizer), role="teacher", **load_kwargs)
    model.eval()
    model.requires_grad_(False)
    return Teacher(model, None)


def align_vocab(teacher: Teacher, student: nn.Module, trim: bool = False) -> Teacher:
    """Record the shared logit range when student and teacher heads differ only in padding.

    Both heads cover the (identical) tokenizer, so the rows cut lie past every token. A student's
    extra rows only leave the comparison; a teacher's would also leave its softmax, so they must
    be padding: all zero, or copies of one row. Distinct non-zero rows are refused unless
    ``teacher.trim_vocab`` says they are unused."""
    student_size, teacher_size = _output_size(student), _output_size(teacher.model)
    teacher.shared_vocab = None if student_size == teacher_size else min(student_size, teacher_size)
    if teacher_size > student_size and not trim:
        extra = teacher.model.get_output_embeddings().weight.detach()[student_size:].float()
        distinct = torch.unique(extra[extra.abs().amax(dim=1) > 0], dim=0).shape[0]
        if distinct > 1:
            raise UserError(
                f"the teacher's head has {teacher_size} rows and the student's {student_size}: its "
                f"{teacher_size - student_size} extra rows hold {distinct} distinct non-zero vectors, so they look "
                "like vocabulary rather than padding, and cutting them would change the teacher's distribution. "
                "Give the student the teacher's vocab_size, or set teacher.trim_vocab=true if no token uses them"
            )
    return teacher


def student_from_teacher(teacher: nn.Module, layers: list[int], cfg: ModelConfig) -> PreTrainedModel:
    """A student with the teacher's config but only ``layers`` (in order), weights copied.

    Embeddings, final norm and head are copied too: the DistilBERT / depth-pruning recipe.
    """
    depth = teacher.config.num_hidden_layers
    bad = [index for index in layers if not 0 <= index < depth]
    if bad or not layers:
        raise UserError(
            f"model.init_from_teacher: layers {bad or layers} outside the teacher's 0..{depth - 1}"
        )
    if any(type(p).__name__ == "Params4bit" for p in teacher.parameters()):
        raise UserError("model.init_from_teacher copies float weights: load the teacher without load_in_4bit")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = [config.layer_types[index] for index in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
    source = teacher.state_dict()
    weights = {}
    for name in student.state_dict():
        match = LAYER_KEY.match(name)
        origin = f"{match[1]}{layers[int(match[2])]}{match[3]}" if match else name
        weights[name] = source[origin]
    student.load_state_dict(weights, strict=True)
    student.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(student)
    return student
