"""LoRA and QLoRA runs on a tiny pretrained Llama: only adapters train and are checkpointed, the
base stays bit-identical, peft and merged exports reproduce the trained model, bad settings are
refused with the fix named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowbit.trainer.config import load_config
from lowbit.trainer.errors import UserError
from lowbit.trainer.export import export, load_source
from lowbit.trainer.loop import Trainer
from tests.conftest import TINY, tiny_overrides

QLORA = ["lora={rank: 4, alpha: 8}", "train.lr=1e-2", "train.warmup_steps=0", "eval.every_steps=0"]


def lora_config(run_dir, model_dir, *extra):
    return load_config(TINY, tiny_overrides(run_dir, f"model.path={model_dir}", "model.config=null",
                                            "model.tokenizer=null", "train.max_steps=8", *QLORA, *extra))  # fmt: skip


def losses(run_dir) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]


@pytest.fixture(scope="module")
def qlora_run(pretrained_tiny, tmp_path_factory):
    """A QLoRA run (NF4 base, double quant) with the frozen base recorded before and after."""
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    trainer = Trainer(lora_config(run_dir, pretrained_tiny, "eval.at_start=true"))
    model = trainer.strategy.unwrap(trainer.parts.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.fit()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.close()
    return run_dir, before, after


def test_qlora_trains_adapters_only_and_the_4bit_base_stays_bit_identical(qlora_run):
    run_dir, before, after = qlora_run
    assert any(name.endswith(".packed") for name in before)  # the base is 4-bit codes
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert len(losses(run_dir)) == 8
    evals = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"val_loss"' in line
    ]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals  # held-out loss falls


def test_a_qlora_checkpoint_holds_the_adapters_and_the_base_fingerprint_only(qlora_run):
    run_dir, before, _ = qlora_run
    checkpoint = sorted((run_dir / "checkpoints").glob("checkpoint-*"))[-1]
    saved = load_file(checkpoint / "model.safetensors")
    assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved)
    assert not set(saved) & set(before)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert len(state["frozen_base"]) == 64


def test_resuming_adapters_onto_another_base_is_refused(qlora_run, pretrained_tiny):
    run_dir, _, _ = qlora_run
    cfg = lora_config(run_dir, pretrained_tiny, "lora.blocksize=32", "checkpoint.allow_config_change=true",
                      "train.max_steps=9")  # fmt: skip
    with pytest.raises(UserError, match="another frozen base"):
        Trainer(cfg)


def test_peft_export_on_the_bitsandbytes_nf4_base_gives_the_trained_logits(
    qlora_run, pretrained_tiny, tmp_path
):
    """The adapters, loaded by peft onto the base transformers quantizes with bitsandbytes: that
    base holds the very codes lowbit trained on (every layer's dequantized weight bit-equal), and
    with its layers computing ``x @ dequantize(W).T`` the loaded model gives the trained logits up
    to float32 summation order (≤ 1e-5). bitsandbytes' own CPU 4-bit matmul rounds more (2e-3 on
    one layer of this model), so with it the logits agree to 2e-2."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run_dir, _, _ = qlora_run
    summary = export(run_dir, "peft", tmp_path / "adapter")
    assert "BitsAndBytesConfig" in summary.table()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(
        pretrained_tiny, quantization_config=quantization, dtype=torch.float32
    )
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    trained = load_source(run_dir, [], merge=False).model
    ours = {n.removesuffix(".base_layer"): m for n, m in trained.named_modules() if hasattr(m, "packed")}
    theirs = {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
              for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}  # fmt: skip
    assert ours.keys() == theirs.keys() and len(ours) == 14
    weights = {
        name: bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        for name, layer in theirs.items()
    }
    for name, weight in weights.items():
        assert weight.dtype == ours[name].weight.dtype == torch.float32 and torch.equal(
            weight, ours[name].weight
        )
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # (on CPU bitsandbytes repacks the weight for its bf16 kernel on this first forward)
        expected, with_bnb_kernel = trained(ids).logits, loaded(ids).logits
        for name, layer in theirs.items():
            layer.forward = lambda x, weight=weights[name]: torch.nn.functional.linear(x, weight)
        exact = loaded(ids).logits
    assert (exact - expected).abs().max().item() < 1e-5
    assert (with_bnb_kernel - expected).abs().max().item() < 2e-2


def test_merged_export_loads_in_plain_transformers_with_the_trained_logits(qlora_run, tmp_path):
    """Merged in float32 (dequantized base + scaled B A): the logits differ from the adapter model's
    only by float32 rounding of the merged weights (≤ 1e-5 over two layers of width 64)."""
    from transformers import AutoModelForCausalLM

    run_dir, _, _ = qlora_run
    export(run_dir, "merged", tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    trained = load_source(run_dir, [], merge=False).model
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (merged(ids).logits - trained(ids).logits).abs().max().item() < 1e-5


def test_dora_rslora_and_a_fully_trained_head_merge_to_the_trained_model(pretrained_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    cfg = lora_config(run_dir, pretrained_tiny, "train.max_steps=4", "lora.dora=true", "lora.rslora=true",
                      "lora.init=gaussian", "lora.trainable=[lm_head]", "lora.targets=[q_proj, v_proj, down_proj]")  # fmt: skip
    Trainer(cfg).fit()
    saved = load_file(sorted((run_dir / "checkpoints").glob("checkpoint-*"))[-1] / "model.safetensors")
    # the head is tied to the embeddings: trained and saved once, under the embeddings' name
    assert any("lora_magnitude_vector" in n for n in saved) and "model.embed_tokens.weight" in saved
    assert {n.split(".")[-4] for n in saved if ".lora_A." in n} == {"q_proj", "v_proj", "down_proj"}
    export(run_dir, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    trained = load_source(run_dir, [], merge=False).model
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (merged(ids).logits - trained(ids).logits).abs().max().item() < 1e-5


def test_lora_on_a_fake_quant_base_trains_adapters_over_the_qat_layers(pretrained_tiny, tmp_path):
    from peft.tuners.lora import LoraLayer

    from lowbit.quant import FakeQuantLinear

    cfg = lora_config(tmp_path / "run", pretrained_tiny, "train.max_steps=4", "lora.base=float",
                      'quant={rules: [{match: "*", weight: w4a8, activation: w4a8}], baselines: false}')  # fmt: skip
    trainer = Trainer(cfg)
    model = trainer.strategy.unwrap(trainer.parts.model)
    wrapped = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert wrapped and all(isinstance(m.get_base_layer(), FakeQuantLinear) for m in wrapped)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    trainer.fit()
    trainer.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rank=0"], "lora.rank must be at least 1"),
        (["lora.targets=[q_prj]"], "close names: q_proj"),
        (["lora.blocksize=48"], "lora.blocksize 48"),
        (['quant={rules: [{match: "*", weight: w4a8}]}'], "set lora.base=float"),
        (["lora.trainable=[self_attn.q_proj]"], "lora.base_skip"),
        (["lora.base_skip=[lm_hed]"], "lora.base_skip: 'lm_hed' matches no layer"),
        (["lora.merge_aware=true"], "needs lora.base=float and a `quant` section"),
        (["lora.init=pisa"], "lora.init: unknown value 'pisa'"),
        (["lora.init=pissa", "lora.dora=true"], "does not combine with lora.dora"),
        (["lora.init=loftq", "lora.base=float"], "set lora.base=nf4"),
        # quant rules run before adapters exist: a rule meant for them matches nothing, and says so
        (["lora.base=float", 'quant={rules: [{match: "*lora_A*", weight: w4a8}]}'], "matches no"),
        (["strategy.name=fsdp2", "train.optimizer=adamw_8bit"], "use train.optimizer=adamw"),
    ],
)
def test_bad_lora_settings_are_refused_with_the_fix(pretrained_tiny, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        Trainer(lora_config(tmp_path / "run", pretrained_tiny, *overrides))


def test_the_cli_exits_2_on_a_lora_typo_and_peft_export_of_a_full_run_is_refused(
    pretrained_tiny, tmp_path, capsys
):
    from lowbit.trainer.cli import main

    assert main(["train", str(TINY), *tiny_overrides(tmp_path / "run", "lora={targets: [gate_prj]}")]) == 2
    assert "close names: gate_proj" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a LoRA run"):
        export(pretrained_tiny, "peft", tmp_path / "adapter")


def test_merge_aware_lora_exports_exactly_the_trained_model_to_gguf_q4_0(tmp_path):
    """fake_quant(W + s·B·A) in the forward: the merged Q4_0 GGUF holds exactly the weights the
    adapters were trained through (self-check exact, not a PTQ), the merged fake-quant model's
    logits equal the adapter model's bit for bit, and the export prints the merge check."""
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, tiny_overrides(run_dir, "train.max_steps=4", "train.warmup_steps=0", "eval.every_steps=0", "train.lr=1e-2",
                                           "lora={rank: 4, alpha: 8, base: float, merge_aware: true}",
                                           'quant={rules: [{match: "*", weight: gguf_q4_0}], baselines: false}'))  # fmt: skip
    Trainer(cfg).fit()
    summary = export(run_dir, "gguf-q4_0", tmp_path / "merged.gguf")
    assert summary.max_delta_quantized == 0 and summary.quantized_tensors == 14 and not summary.ptq
    rows = {row["name"]: row["val_ppl"] for row in summary.comparison}
    assert rows["adapters (as trained)"] == rows["merged, gguf-q4_0 (this file)"]
    trained, merged = load_source(run_dir, [], merge=False).model, load_source(run_dir, []).model
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, merged(ids).logits)


def test_a_qlora_merge_into_a_quantized_format_is_a_ptq_with_the_perplexities_side_by_side(
    qlora_run, tmp_path
):
    run_dir, _, _ = qlora_run
    summary = export(run_dir, "gguf-q8_0", tmp_path / "merged.gguf", ptq=True)
    assert summary.ptq and [row["name"] for row in summary.comparison] == [
        "adapters (as trained)", "merged, float", "merged, gguf-q8_0 (this file)"
    ]  # fmt: skip
    assert "merge check" in summary.table()


def test_8bit_adamw_trains_the_adapters_and_resumes(pretrained_tiny, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(lora_config(run_dir, pretrained_tiny, "train.optimizer=adamw_8bit", "train.max_steps=3")).fit()
    trainer = Trainer(
        lora_config(run_dir, pretrained_tiny, "train.optimizer=adamw_8bit", "train.max_steps=5")
    )
    assert trainer.step == 3 and type(trainer.strategy.optimizer).__name__ == "AdamW8bit"
    trainer.fit()
    assert len(losses(run_dir)) == 5


def test_pissa_starts_as_the_base_and_its_peft_export_fits_the_original_model(pretrained_tiny, tmp_path):
    """PiSSA moves each weight's r principal directions into the adapters and leaves the residual
    frozen: the model starts computing what the base did (float32 rounding: ≤ 1e-5), and the peft
    export — converted to rank-2r LoRA on the *original* weights — loads onto the untouched model
    and gives the trained logits (≤ 1e-5)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    trainer = Trainer(
        lora_config(run_dir, pretrained_tiny, "train.max_steps=3", "lora.base=float", "lora.init=pissa")
    )
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    original = AutoModelForCausalLM.from_pretrained(pretrained_tiny).eval()
    student = trainer.strategy.unwrap(trainer.parts.model)
    with torch.no_grad():
        assert (student(ids).logits - original(ids).logits).abs().max().item() < 1e-5
    trainer.fit()
    trainer.close()
    export(run_dir, "peft", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16  # rank 2r, alpha 2·alpha: the same scaling
    loaded = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    trained = load_source(run_dir, [], merge=False).model
    with torch.no_grad():
        assert (loaded(ids).logits - trained(ids).logits).abs().max().item() < 1e-5


def assert_nearer_than_nf4(trainer, model_dir, double_quant: bool) -> None:
    """Every adapted layer of ``trainer``'s student: its 4-bit base plus its adapters is nearer the
    pretrained weight than that weight's own NF4 codes are (Frobenius norm)."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from lowbit.quant.nf4 import FrozenNF4Linear

    student = trainer.strategy.unwrap(trainer.parts.model)
    original = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_modules())
    layers = {n: m for n, m in student.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 14 and all(isinstance(m.get_base_layer(), FrozenNF4Linear) for m in layers.values())
    for name, layer in layers.items():
        weight = original[name].weight.detach()
        fitted = layer.get_base_layer().weight + layer.get_delta_weight("default")
        plain = FrozenNF4Linear.from_linear(original[name], double_quant=double_quant).weight
        assert (fitted - weight).norm() < (plain - weight).norm(), name


def test_qpissa_quantizes_the_residual_with_less_error_and_refuses_a_peft_export(pretrained_tiny, tmp_path):
    """QPiSSA: NF4 of the residual plus the principal part is closer to each weight than NF4 of
    the weight itself (the reason to use it); its adapters fit only that quantized residual, so a
    peft export is refused (merged exports hold it)."""
    run_dir = tmp_path / "run"
    trainer = Trainer(lora_config(run_dir, pretrained_tiny, "train.max_steps=2", "lora.init=pissa_niter_4",
                                  "lora.double_quant=false"))  # fmt: skip
    assert_nearer_than_nf4(trainer, pretrained_tiny, double_quant=False)
    trainer.fit()
    trainer.close()
    with pytest.raises(UserError, match="QPiSSA"):
        export(run_dir, "peft", tmp_path / "adapter")
    export(run_dir, "merged", tmp_path / "merged")


def test_loftq_initialises_the_4bit_base_and_adapters_together(pretrained_tiny, tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(lora_config(run_dir, pretrained_tiny, "train.max_steps=2", "lora.init=loftq_iter_2"))
    assert_nearer_than_nf4(trainer, pretrained_tiny, double_quant=True)
    trainer.fit()
    trainer.close()
    with pytest.raises(UserError, match="LoftQ"):
        export(run_dir, "peft", tmp_path / "adapter")


@pytest.mark.parametrize(("base", "message"), [("nf4", "Conv1D"), ("float", "no nn.Linear layers")])
def test_a_gpt2_style_model_is_refused_with_the_reason(tmp_path, base, message):
    gpt2 = "model.config={model_type: gpt2, n_embd: 64, n_layer: 2, n_head: 4, vocab_size: 262, n_positions: 256}"
    cfg = load_config(
        TINY,
        tiny_overrides(
            tmp_path / "run", gpt2, f"lora={{base: {base}}}", "train.max_steps=2", "train.warmup_steps=0"
        ),
    )
    with pytest.raises(UserError, match=message):
        Trainer(cfg)
