"""The BitNet recipe's pieces in the trainer: SubLN, the quantization warm-up, per-term gradient
norms and loss balance, stages chained with ``model.init_from``, and the SubLN exports."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers
from torch import nn

from lowbit.quant import quantizers
from lowbit.trainer.config import QuantWarmup
from lowbit.trainer.errors import UserError
from lowbit.trainer.loop import Trainer
from lowbit.trainer.quantization import quantizers_enabled, warmup_lambda
from lowbit.trainer.subln import apply_subln
from lowbit.trainer.term_gradients import WEIGHTS_FILE, term_gradient_norms
from tests.conftest import TINY, run_cli, tiny_overrides

BITNET_RULES = 'quant={rules: [{match: "*", weight: bitnet, activation: bitnet}], baselines: false}'
# A teacher unlike the student (a random model of another shape), so the KD term has a real gradient.
TEACHER = ("teacher.config={model_type: llama, vocab_size: 262, hidden_size: 32, intermediate_size: 64, "
           "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 256}")  # fmt: skip
KD = ["loss=[{kind: ce}, {kind: kd_kl, temperature: 5.0}]", TEACHER, "teacher.tokenizer=byte"]
SHORT = ["train.warmup_steps=0", "eval.every_steps=0", "checkpoint.every_steps=0"]


def tiny_llama(**overrides) -> transformers.PreTrainedModel:
    sizes = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    config = transformers.LlamaConfig(**{**sizes, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def metric_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- SubLN --------------------------------------------------------------------------------------------


def test_subln_blocks_compute_transformers_bitnet_and_llama_without_the_norms():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        llama_logits = model(ids).logits
    apply_subln(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.attn_sub_norm.weight.uniform_(0.5, 1.5)
            layer.mlp.ffn_sub_norm.weight.uniform_(0.5, 1.5)
        config = transformers.BitNetConfig(**{**model.config.to_dict(), "hidden_act": "silu"})
        bitnet = transformers.BitNetForCausalLM(config).eval()
        missing, unexpected = bitnet.load_state_dict(model.state_dict(), strict=False)
        assert not missing and not unexpected  # same names: the norms are where BitNet has them
        assert torch.equal(model(ids).logits, bitnet(ids).logits)
        # without the norms the converted blocks are the Llama blocks, bit for bit
        for layer in model.model.layers:
            layer.self_attn.attn_sub_norm, layer.mlp.ffn_sub_norm = nn.Identity(), nn.Identity()
        assert torch.equal(model(ids).logits, llama_logits)


def test_subln_refuses_blocks_it_cannot_convert():
    config = transformers.MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        UserError, match=r"MistralAttention.*Llama-architecture.*'mistral'.*model.subln: false"
    ):
        apply_subln(model)


# -- warm-up ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "exponential", "sigmoid"])
def test_warmup_ramps_run_from_exactly_0_to_exactly_1_and_rise(schedule):
    warmup = QuantWarmup(steps=10, schedule=schedule, k=5.0)
    values = [warmup_lambda(step, warmup) for step in range(-2, 14)]
    assert values[:3] == [0.0, 0.0, 0.0] and values[-4:] == [1.0] * 4
    assert all(b > a for a, b in zip(values[2:13], values[3:13]))
    middle = warmup_lambda(5, warmup)
    expected = {"linear": 0.5, "exponential": math.expm1(2.5) / math.expm1(5.0), "sigmoid": 0.5}[schedule]
    assert middle == pytest.approx(expected, abs=1e-12)


def test_warmup_in_the_loop_logs_lambda_and_evaluates_fully_quantized(tiny_config):
    cfg = tiny_config(
        BITNET_RULES, "quant.enable_after_steps=1", "quant.warmup.steps=4", "train.max_steps=7", *SHORT
    )
    trainer = Trainer(cfg)
    trainer.fit()
    model = trainer.strategy.unwrap(trainer.parts.model)
    lambdas = [line.get("quant_lambda") for line in metric_lines(trainer.run_dir) if "loss" in line]
    assert lambdas == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # off (step 0), then ramped from step 1
    for quantizer in quantizers(model):
        quantizer.blend = 0.3
    with quantizers_enabled(model, True):  # what evaluation uses: the deployed model
        assert all(q.enabled and q.blend == 1.0 for q in quantizers(model))
    assert all(q.blend == 0.3 for q in quantizers(model))
    trainer.close()


def test_warmup_longer_than_training_and_subln_on_other_blocks_exit_2(tmp_path):
    result = run_cli(
        "train", str(TINY), *tiny_overrides(tmp_path / "a", BITNET_RULES, "quant.warmup.steps=40")
    )
    assert result.returncode == 2
    assert "quant.warmup.steps (40)" in result.stderr and "at most 39" in result.stderr
    mistral = "model.config.model_type=mistral"
    result = run_cli("train", str(TINY), *tiny_overrides(tmp_path / "b", "model.subln=true", mistral))
    assert result.returncode == 2 and "SubLN converts Llama-architecture blocks" in result.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()


# -- per-term gradient norms and loss balance ---------------------------------------------------------


def test_term_gradient_norms_equal_autograd_grad_of_each_term(tiny_config):
    cfg = tiny_config(*KD, "log.term_grad_norms_every=1", "train.max_steps=1", "loss.1.weight=3.0", *SHORT)
    trainer = Trainer(cfg)
    model, parts = trainer.strategy.unwrap(trainer.parts.model), trainer.parts
    (batch,) = parts.train_batches.micro_batches(0)
    labels = batch["labels"]
    tokens = float((labels[:, 1:] != -100).sum())
    graphs: dict[str, torch.Tensor] = {}
    parts.objective(_inputs(trainer, batch), tokens, None, graphs)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = {}
    for name, weight in (("ce", 1.0), ("kd_kl", 3.0)):
        grads = torch.autograd.grad(weight * graphs[name], params, retain_graph=True, allow_unused=True)
        expected[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    combined = torch.autograd.grad(graphs["ce"] + 3.0 * graphs["kd_kl"], params, allow_unused=True)
    step_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in combined if g is not None))
    model.zero_grad(set_to_none=True)
    trainer.fit()
    (line,) = [line for line in metric_lines(trainer.run_dir) if "loss" in line]
    trainer.close()
    assert line["grad_norm/ce"] == pytest.approx(expected["ce"], rel=1e-6)
    assert line["grad_norm/kd_kl"] == pytest.approx(expected["kd_kl"], rel=1e-6)
    assert line["grad_norm"] == pytest.approx(step_norm, rel=1e-5)  # the real backward: same graph
    assert expected["kd_kl"] > 0 and expected["ce"] > 0


def _inputs(trainer, batch):
    """The objective's inputs for ``batch``, as the loss step prepares them (student and teacher)."""
    loss_step = trainer.parts.loss_step
    model = trainer.parts.model
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    inputs, _ = loss_step._inputs(batch, outputs, None)
    return inputs


def test_loss_balance_sets_weights_from_the_measured_norms_and_a_resume_keeps_them(tiny_config, tmp_path):
    settings = (*KD, "loss_balance={reference: ce, ratios: {kd_kl: 0.5}, calibration_steps: 2}",
                "train.max_steps=4", "train.warmup_steps=0", "eval.every_steps=0")  # fmt: skip
    trainer = Trainer(tiny_config(*settings, "checkpoint.every_steps=2", run_dir=tmp_path / "whole"))
    result = trainer.fit()
    weights = list(trainer.parts.objective.weights)
    trainer.close()
    stored = json.loads((tmp_path / "whole" / WEIGHTS_FILE).read_text())
    measured = stored["measured"]
    assert sorted(measured) == ["0", "1"]
    mean = {name: (measured["0"][name] + measured["1"][name]) / 2 for name in ("ce", "kd_kl")}
    assert weights == [1.0, pytest.approx(0.5 * mean["ce"] / mean["kd_kl"], rel=1e-12)]
    assert stored["weights"] == {"ce": 1.0, "kd_kl": weights[1]}
    lines = [line for line in metric_lines(tmp_path / "whole") if "loss" in line]
    assert "grad_norm/kd_kl" in lines[1] and "grad_norm/kd_kl" not in lines[2]  # measured only to calibrate
    # resume from the step-2 checkpoint: the weights come from the run dir, the losses repeat exactly
    checkpoint = tmp_path / "whole" / "checkpoints" / "checkpoint-000002"
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    import shutil

    shutil.copytree(checkpoint, resumed_dir / "checkpoints" / checkpoint.name)
    shutil.copy(tmp_path / "whole" / WEIGHTS_FILE, resumed_dir / WEIGHTS_FILE)
    shutil.copy(tmp_path / "whole" / "config.yaml", resumed_dir / "config.yaml")
    trainer = Trainer(tiny_config(*settings, run_dir=resumed_dir))
    resumed = trainer.fit()
    assert trainer.parts.objective.weights == weights
    trainer.close()
    assert resumed["train"]["loss"] == result["train"]["loss"]


@pytest.mark.parametrize(("after_warmup", "measured"), [(False, "0"), (True, "2")])
def test_loss_balance_calibrates_at_the_start_or_after_the_quantization_warm_up(
    tiny_config, after_warmup, measured
):
    cfg = tiny_config(*KD, BITNET_RULES, "quant.warmup.steps=2", "train.max_steps=4", *SHORT,
                      f"loss_balance={{reference: ce, after_warmup: {str(after_warmup).lower()}}}")  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()
    stored = json.loads((trainer.run_dir / WEIGHTS_FILE).read_text())
    assert list(stored["measured"]) == [measured]  # step 2: the first at λ = 1


def test_every_rank_sums_every_terms_gradients_even_without_a_graph():
    """A rank whose micro-batch has no counted token has no graph for a KD term: it must still take
    part in the same all-reduces as the others, or the collectives pair up wrongly."""
    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2))]
    calls = []

    def recording_sum(tensor):
        calls.append(tuple(tensor.shape))
        return tensor

    graphs = {"ce": (params[0].sum() * 2 + params[1].sum()), "kd_kl": torch.zeros(())}
    norms = term_gradient_norms(graphs, params, recording_sum)
    assert calls == [(3,), (2, 2), (3,), (2, 2)]
    assert norms["kd_kl"] == 0.0 and norms["ce"] == pytest.approx(math.sqrt(3 * 4 + 4))


def test_loss_balance_refuses_what_it_cannot_measure(tmp_path):
    cases = [
        ("loss_balance={reference: kd}", "loss_balance.reference 'kd' is not a loss term"),
        ("train.fused_head_chunk=64", "set train.fused_head_chunk: 0"),
        ("strategy.name=fsdp2", "use strategy.name single or ddp"),
    ]
    from lowbit.trainer.config import load_config

    for index, (override, message) in enumerate(cases):  # config errors: the CLI's exit 2 (tested elsewhere)
        extra = (
            [override] if override.startswith("loss_balance") else ["loss_balance={reference: ce}", override]
        )
        with pytest.raises(UserError, match=re.escape(message)):
            load_config(TINY, tiny_overrides(tmp_path / str(index), *KD, *extra))


# -- stages -------------------------------------------------------------------------------------------


def test_init_from_starts_a_stage_from_the_previous_runs_weights(tiny_config, tmp_path):
    stage_a = Trainer(tiny_config("model.subln=true", BITNET_RULES, "train.max_steps=3", *SHORT,
                                  run_dir=tmp_path / "a"))  # fmt: skip
    stage_a.fit()
    trained = {k: v.clone() for k, v in stage_a.strategy.unwrap(stage_a.parts.model).state_dict().items()}
    stage_a.close()
    assert not torch.equal(trained["model.layers.0.mlp.ffn_sub_norm.weight"], torch.ones(128))  # norms train
    stage_b = Trainer(tiny_config("model.subln=true", BITNET_RULES, *KD, f"model.init_from={tmp_path / 'a'}",
                                  "train.max_steps=1", *SHORT, run_dir=tmp_path / "b"))  # fmt: skip
    state = stage_b.strategy.unwrap(stage_b.parts.model).state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in trained.items())
    stage_b.fit()
    stage_b.close()
    with pytest.raises(UserError, match="must build the same modules"):
        Trainer(tiny_config(BITNET_RULES, f"model.init_from={tmp_path / 'a'}", run_dir=tmp_path / "c"))
    # stage 2's checkpoint holds all its weights: it exports without stage 1's run
    import shutil

    from lowbit.trainer.export import export

    shutil.rmtree(tmp_path / "a")
    assert export(tmp_path / "b", "bitnet", tmp_path / "hf").max_delta_quantized == 0
    evaluated = run_cli("eval", str(tmp_path / "b"))  # without stage 1: no start-of-run baselines
    assert evaluated.returncode == 0, evaluated.stderr
    assert "QAT (checkpoint-000001)" in evaluated.stdout and "PTQ" not in evaluated.stdout


def test_lora_on_a_ternary_subln_base_trains_adapters_and_norms_and_leaves_the_base(tiny_config):
    lora = 'lora={base: float, rank: 4, alpha: 8, trainable: ["*.attn_sub_norm", "*.ffn_sub_norm"]}'
    trainer = Trainer(tiny_config("model.subln=true", BITNET_RULES, lora, "train.max_steps=3", *SHORT))
    model = trainer.strategy.unwrap(trainer.parts.model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainer.fit()
    after = model.state_dict()
    trainer.close()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("lora_B" in name for name in changed) and any("sub_norm" in name for name in changed)
    assert not any(name.endswith("base_layer.weight") for name in changed)  # the ternary base is frozen
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "BitLinear"  # peft wraps the BitLinear
    result = run_cli(
        "export", str(trainer.run_dir), "--format", "peft", "--out", str(trainer.run_dir / "adapter")
    )
    assert result.returncode == 2 and "SubLN norms" in result.stderr and "--format bitnet" in result.stderr


# -- exports ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subln_run(tmp_path_factory):
    from lowbit.trainer.config import load_config

    run_dir = tmp_path_factory.mktemp("subln") / "run"
    cfg = load_config(
        TINY, tiny_overrides(run_dir, "model.subln=true", BITNET_RULES, "train.max_steps=4", *SHORT)
    )
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()
    return run_dir


def test_subln_model_exports_as_transformers_bitnet_with_the_trained_logits(subln_run, tmp_path):
    from lowbit.trainer.export import export, load_source

    summary = export(subln_run, "bitnet", tmp_path / "hf")
    assert summary.max_delta_quantized == 0 and summary.max_delta_float == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["hidden_act"] == "silu"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == "BitNetForCausalLM"
    ours = load_source(subln_run, []).model
    ids = torch.randint(0, 262, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), quantizers_enabled(ours, True):
        expected = ours(ids).logits
        got = loaded(ids).logits
    # transformers quantizes activations as round(x · 127/absmax) / (127/absmax), we as
    # round(x / (absmax/127)) · (absmax/127): float32 rounding apart (~1e-7 relative per value), and
    # one int8 step where that tips a tie; measured max 5e-7 of logits up to ~2.
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_subln_model_refuses_formats_without_a_place_for_its_norms(subln_run, tmp_path):
    result = run_cli(
        "export", str(subln_run), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")
    )
    assert (
        result.returncode == 2
        and "trained with SubLN" in result.stderr
        and "--format bitnet" in result.stderr
    )
    assert not (tmp_path / "ct").exists()


WIDE = ("model.config.hidden_size=256", "model.config.intermediate_size=512")  # TQ blocks: 256 values a row
TQ_RULES = ('quant={rules: [{match: "*", weight: {preset: bitnet, scale_dtype: fp16}, activation: bitnet}], '
            "baselines: false}")  # fmt: skip


@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0"])
def test_subln_model_exports_as_llama_cpp_bitnet_gguf_exactly(tmp_path, tiny_config, kind):
    from lowbit.quant.formats import gguf

    trainer = Trainer(tiny_config("model.subln=true", TQ_RULES, *WIDE, "train.max_steps=2", *SHORT))
    trainer.fit()
    trainer.close()
    from lowbit.trainer.export import export

    summary = export(tmp_path / "run", f"gguf-{kind}", tmp_path / "model.gguf")
    assert summary.max_delta_quantized == 0 and summary.quantized_tensors == 14
    meta = gguf.metadata(tmp_path / "model.gguf")
    assert meta["general.architecture"] == "bitnet" and meta["bitnet.block_count"] == 2
    assert meta["bitnet.attention.head_count"] == 4 and meta["bitnet.feed_forward_length"] == 512
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "model.gguf")).tensors}
    assert tensors["blk.1.attn_sub_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.1.ffn_sub_norm.weight"].shape.tolist() == [512]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == kind.upper() and "output.weight" not in tensors


@pytest.mark.distributed
def test_term_gradient_norms_under_ddp_are_norms_of_the_rank_summed_gradients(tmp_path):
    """Two ranks, one micro-batch each per step: the measured terms' gradients must add up to the
    step's gradient, whose norm DDP reports (triangle inequality both ways, to float tolerance);
    per-rank norms left unsummed would break it."""
    from tests.distributed.conftest import torchrun

    run_dir = tmp_path / "ddp"
    done = torchrun("lowbit.trainer", "train", str(TINY),
                    *tiny_overrides(run_dir, "strategy.name=ddp", "train.max_steps=2", *SHORT, *KD,
                                    "log.term_grad_norms_every=1"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for line in [line for line in metric_lines(run_dir) if "loss" in line]:
        ce, kd, total = line["grad_norm/ce"], line["grad_norm/kd_kl"], line["grad_norm"]
        assert abs(ce - kd) * (1 - 1e-5) <= total <= (ce + kd) * (1 + 1e-5)
        assert kd > 0.01 * ce  # both terms pull, so the bounds are not vacuous


def test_ternary_formats_refuse_what_is_not_ternary_and_heads_llama_cpp_cannot_tie():
    from lowbit.quant import quantize_model
    from lowbit.quant.formats import ExportError, collect, gguf

    int4 = tiny_llama(hidden_size=256, intermediate_size=512)  # rows that fit TQ blocks, but int4 values
    quantize_model(
        int4, [{"match": "*", "weight": {"dtype": "int4", "granularity": "group", "group_size": 256}}]
    )
    inputs = collect(int4)
    inputs.extra["gguf_type"] = "tq2_0"
    with pytest.raises(ExportError, match="TQ2_0 stores ternary values"):
        gguf.check(inputs)
    model = tiny_llama(hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    apply_subln(model)
    quantize_model(model, [{"match": "*", "weight": {"preset": "bitnet", "scale_dtype": "fp16"}}])
    inputs = collect(model)
    inputs.extra["gguf_type"] = "tq2_0"
    with pytest.raises(ExportError, match="bitnet graph always uses the token embeddings as the output head"):
        gguf.check(inputs)
