"""Distillation through the trainer: frozen teacher, vocab checks, student from teacher layers, QAD."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lowbit.quant import FakeQuantLinear
from lowbit.trainer.byte_tokenizer import byte_tokenizer
from lowbit.trainer.errors import UserError
from lowbit.trainer.loop import Trainer

KD = "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]"


def test_kd_trains_the_student_and_never_the_teacher(tiny_config, pretrained_tiny, tmp_path):
    cfg = tiny_config(KD, f"teacher.path={pretrained_tiny}", "train.max_steps=8", "train.warmup_steps=0",
                      "eval.every_steps=0")  # fmt: skip
    trainer = Trainer(cfg)
    teacher = trainer.parts.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimized = {id(p) for group in trainer.parts.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    result = trainer.fit()
    trainer.close()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    lines = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert {"loss/ce", "loss/kd_kl"} <= set(lines[0])
    assert lines[-1]["loss/kd_kl"] < lines[0]["loss/kd_kl"]  # the student moves towards the teacher
    assert result["eval"]["val_loss"] < 5.0


def test_student_initialised_from_chosen_teacher_layers(tiny_config, pretrained_tiny):
    cfg = tiny_config(KD, f"teacher.path={pretrained_tiny}", "model.config=null", "model.tokenizer=null",
                      "model.init_from_teacher=[1]", "train.max_steps=1", "train.warmup_steps=0")  # fmt: skip
    trainer = Trainer(cfg)
    student = trainer.strategy.unwrap(trainer.parts.model)
    teacher = load_file(pretrained_tiny / "model.safetensors")
    assert student.config.num_hidden_layers == 1
    weights = student.state_dict()
    assert torch.equal(
        weights["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(weights["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert torch.equal(weights["model.norm.weight"], teacher["model.norm.weight"])
    trainer.close()
    with pytest.raises(UserError, match=r"layers \[5\] outside the teacher's 0..1"):
        Trainer(tiny_config(KD, f"teacher.path={pretrained_tiny}", "model.config=null", "model.tokenizer=null",
                            "model.init_from_teacher=[0, 5]"))  # fmt: skip


def test_vocabulary_checks(tiny_config, pretrained_tiny, tmp_path):
    other = tmp_path / "other_teacher"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((pretrained_tiny / name).read_bytes())
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(UserError, match=r"tokenizers differ \(student 262 tokens, teacher 263\)"):
        Trainer(tiny_config(KD, f"teacher.path={other}"))
    # A padded student head (300 rows for 262 tokens) is compared on the shared range.
    padded = tiny_config(KD, f"teacher.path={pretrained_tiny}", "model.config.vocab_size=300", "train.max_steps=2",
                         "train.warmup_steps=0", run_dir=tmp_path / "padded")  # fmt: skip
    trainer = Trainer(padded)
    assert trainer.parts.teacher.shared_vocab == 262
    trainer.fit()
    trainer.close()
    # Padding rows take no part: the same student with 38 extra head rows (any values) distils to
    # exactly the same KL at step 1
    padded_dir = tmp_path / "padded_student"
    student = AutoModelForCausalLM.from_pretrained(pretrained_tiny)
    student.resize_token_embeddings(300, mean_resizing=False)
    student.save_pretrained(padded_dir)
    tokenizer.__class__.from_pretrained(pretrained_tiny).save_pretrained(padded_dir)
    random_teacher = ("teacher={config: {model_type: llama, vocab_size: 262, hidden_size: 64, intermediate_size: 128, "
                      "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}, tokenizer: byte}")  # fmt: skip
    first_kl = []
    for name, source in (("kl-plain", pretrained_tiny), ("kl-padded", padded_dir)):
        run = tiny_config("loss=[{kind: kd_kl, temperature: 2.0}]", random_teacher, "model.config=null",
                          "model.tokenizer=null", f"model.path={source}", "train.max_steps=1", "train.warmup_steps=0",
                          "eval.every_steps=0", run_dir=tmp_path / name)  # fmt: skip
        trained = Trainer(run)
        assert trained.parts.teacher.shared_vocab == (None if name == "kl-plain" else 262)
        trained.fit()
        trained.close()
        line = [
            json.loads(x)
            for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x
        ]
        first_kl.append(line[0]["loss"])  # the only term: the KL
    assert first_kl[0] > 0 and first_kl[0] == first_kl[1]
    # A teacher whose extra rows are distinct non-zero vectors: vocabulary, not padding
    wider = ('teacher={config: {model_type: llama, vocab_size: 300, hidden_size: 64, intermediate_size: 128, '
             'num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}, tokenizer: byte}')  # fmt: skip
    with pytest.raises(
        UserError, match=r"its 38 extra rows hold 38 distinct non-zero vectors.*teacher.trim_vocab=true"
    ):
        Trainer(tiny_config(KD, wider, run_dir=tmp_path / "wider"))
    trimmed = Trainer(tiny_config(KD, wider, "teacher.trim_vocab=true", run_dir=tmp_path / "trimmed"))
    assert trimmed.parts.teacher.shared_vocab == 262
    trimmed.close()


def test_quantization_aware_distillation_composes(tiny_config, pretrained_tiny, tmp_path):
    """The student is the teacher's own weights under w4a8 fake quant; the teacher stays float.
    So the KL term is exactly 0 while fake quant is off and positive once it is on (quantization
    is all that separates them), the teacher never changes, and training shrinks the KL."""
    qad = (KD, f"teacher.path={pretrained_tiny}", "model.config=null", "model.tokenizer=null",
           f"model.path={pretrained_tiny}", "train.warmup_steps=0", "eval.every_steps=0", "train.lr=1e-3")  # fmt: skip
    rules = "quant={rules: [{match: '*', weight: w4a8, activation: w4a8}], baselines: false, enable_after_steps: %d}"
    trainer = Trainer(tiny_config(*qad, rules % 2, "train.max_steps=10", run_dir=tmp_path / "qad"))
    assert isinstance(trainer.parts.model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    assert not isinstance(trainer.parts.teacher.model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    before = {k: v.clone() for k, v in trainer.parts.teacher.model.state_dict().items()}
    trainer.fit()
    trainer.close()
    assert all(torch.equal(before[k], v) for k, v in trainer.parts.teacher.model.state_dict().items())
    kl = [
        json.loads(x)["loss/kd_kl"]
        for x in (tmp_path / "qad" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert kl[0] == 0.0  # step 1: fake quant off, the student is the teacher
    assert kl[2] > 1e-4  # step 3: fake quant on (after enable_after_steps=2)
    assert kl[-1] < kl[2]  # distillation pulls the quantized student back towards the teacher


def test_kd_without_teacher_is_a_config_error(tiny_config):
    with pytest.raises(
        UserError, match=r"loss term\(s\) kd_kl distill from a teacher, but none is configured"
    ):
        tiny_config(KD)


def test_nf4_teacher_through_bitsandbytes(tiny_config, pretrained_tiny):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_config("loss=[{kind: kd_kl}]", f"teacher.path={pretrained_tiny}", "teacher.load_in_4bit=true",
                      "train.max_steps=2", "train.warmup_steps=0")  # fmt: skip
    trainer = Trainer(cfg)
    layer = trainer.parts.teacher.model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.dtype == torch.uint8
    # its outputs are the float teacher's up to NF4's rounding: measured 0.14% of the logit range here,
    # bounded at 1% (NF4 keeps ~3 bits of each weight; a wrong or missing dequantization is far off)
    batch = trainer.parts.train_batches.micro_batches(0)[0]
    float_teacher = AutoModelForCausalLM.from_pretrained(pretrained_tiny).eval()
    with torch.no_grad():
        nf4_logits = trainer.parts.teacher.model(input_ids=batch["input_ids"]).logits
        float_logits = float_teacher(input_ids=batch["input_ids"]).logits
    spread = float_logits.max() - float_logits.min()
    assert 0 < (nf4_logits - float_logits).abs().max() < 0.01 * spread
    packed = layer.weight.data.clone()
    result = trainer.fit()
    trainer.close()
    assert result["step"] == 2 and torch.equal(
        layer.weight.data, packed
    )  # frozen: the 4-bit codes never change


WIDE_TEACHER = (
    "teacher.config={model_type: llama, vocab_size: 262, hidden_size: 96, intermediate_size: 128, "
    "num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}"
)
HIDDEN = "loss=[{kind: ce, weight: 1.0}, {kind: hidden, weight: 0.5, layer_map: [[1, 2], [2, 4]]}]"


def test_hidden_term_with_projection_trains_saves_and_resumes(tiny_config, tmp_path):
    common = (HIDDEN, WIDE_TEACHER, "teacher.tokenizer=byte", "train.warmup_steps=0", "eval.every_steps=0")
    trainer = Trainer(tiny_config(*common, "train.max_steps=3", "checkpoint.every_steps=2"))
    projection = trainer.parts.objective.terms[1].projection
    assert projection.weight.shape == (96, 64)
    before = projection.weight.detach().clone()
    optimized = {id(p) for group in trainer.parts.optimizer.param_groups for p in group["params"]}
    assert id(projection.weight) in optimized
    trainer.fit()
    trainer.close()
    assert not torch.equal(before, projection.weight)
    saved = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-000003" / "objective.safetensors")
    assert torch.equal(saved["terms.1.projection.weight"], projection.weight.detach())
    resumed = Trainer(tiny_config(*common, "train.max_steps=4"))
    assert resumed.step == 3
    assert torch.equal(
        resumed.parts.objective.terms[1].projection.weight.detach(), projection.weight.detach()
    )
    resumed.close()
    with pytest.raises(UserError, match=r"the teacher has hidden states 0..4"):
        Trainer(tiny_config(HIDDEN.replace("[2, 4]", "[2, 7]"), WIDE_TEACHER, "teacher.tokenizer=byte",
                            run_dir=tmp_path / "bad"))  # fmt: skip


def test_attention_relation_distillation_runs_through_the_trainer(tiny_config):
    cfg = tiny_config(WIDE_TEACHER, "teacher.tokenizer=byte", "train.max_steps=3", "train.warmup_steps=0",
                      "loss=[{kind: ce}, {kind: attn_relation, weight: 1.0, layer_map: [[1, 3]], relation_heads: 4}]")  # fmt: skip
    trainer = Trainer(cfg)
    result = trainer.fit()
    teacher_q = trainer.parts.teacher.model.model.layers[3].self_attn.q_proj
    student_q = trainer.parts.model.model.layers[1].self_attn.q_proj
    trainer.close()
    assert not teacher_q._forward_hooks and not student_q._forward_hooks  # capture hooks are removed
    lines = [
        json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    assert all(line["loss/attn_relation"] > 0 for line in lines)
    assert result["step"] == 3


@pytest.mark.parametrize("with_teacher", [False, True])
def test_fused_head_path_trains_like_full_logits(tiny_config, pretrained_tiny, tmp_path, with_teacher):
    extra = [KD, f"teacher.path={pretrained_tiny}", "model.config.vocab_size=300"] if with_teacher else []
    common = ("train.max_steps=4", "train.warmup_steps=0", "eval.every_steps=0", *extra)
    full = Trainer(tiny_config(*common, run_dir=tmp_path / "full"))
    full.fit()
    full.close()
    fused = Trainer(tiny_config(*common, "train.fused_head_chunk=50", run_dir=tmp_path / "fused"))
    fused.fit()
    fused.close()

    def lines(run):
        return [
            json.loads(x)
            for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x
        ]

    for a, b in zip(lines("full"), lines("fused")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        if with_teacher:  # a padded student head (300) against the teacher's 262: the shared range
            assert b["loss/kd_kl"] == pytest.approx(a["loss/kd_kl"], rel=1e-4)
    assert isinstance(fused.strategy.unwrap(fused.parts.model).lm_head, torch.nn.Linear)  # the head is back
