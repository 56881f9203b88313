"""``lowbit export``: from a run or a model path to a verified file, and the errors that keep work safe."""

from __future__ import annotations

import re

import pytest

from lowbit.trainer.cli import main
from lowbit.trainer.config import load_config
from lowbit.trainer.loop import train
from tests.conftest import TINY, tiny_overrides

QAT_Q4_0 = "quant.rules=[{match: '*', weight: gguf_q4_0}]"


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """A tiny model trained 6 steps with the gguf_q4_0 preset (a run directory with a checkpoint)."""
    run_dir = tmp_path_factory.mktemp("qat") / "run"
    train(load_config(TINY, tiny_overrides(run_dir, "train.max_steps=6", "eval.every_steps=0", QAT_Q4_0)))
    return run_dir


def test_qat_run_exports_to_gguf_exactly_and_evaluates_the_same(qat_run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert main(["export", str(qat_run), "--format", "gguf-q4_0", "--out", str(out), "--float-type", "f32"]) == 0
    report = capsys.readouterr().out
    assert "14 × Q4_0" in report and "quantized weights vs trained: exact" in report
    assert "float tensors max |Δ| 0 " in report  # f32 storage keeps the float tensors as trained
    assert out.is_file() and not list(tmp_path.glob(".*partial*"))
    # perplexity of the GGUF (dequantized by transformers' GGUF loader) == the trained fake-quant model
    assert main(["eval", str(qat_run), "log.progress=none"]) == 0
    trained = capsys.readouterr().out.strip().splitlines()[-1]
    tokenizer_dir = tmp_path / "tokenizer"
    from lowbit.trainer.byte_tokenizer import byte_tokenizer

    byte_tokenizer().save_pretrained(tokenizer_dir)
    overrides = [f"model.path={out}", "model.config=null", f"model.tokenizer={tokenizer_dir}"]
    assert main(["eval", str(TINY), *tiny_overrides(qat_run, *overrides)]) == 0
    exported = capsys.readouterr().out.strip().splitlines()[-1]
    numbers = re.compile(r"\d[\d,]*\.\d+|\d{1,3}(?:,\d{3})+")  # val_loss, val_ppl, tokens as printed
    assert numbers.findall(trained)[-3:] == numbers.findall(exported)[-3:]
    assert len(numbers.findall(exported)) >= 3


def test_exporting_a_float_model_asks_for_ptq_then_ptq_works(pretrained_tiny, tmp_path, capsys):
    out = tmp_path / "float.gguf"
    assert main(["export", str(pretrained_tiny), "--format", "gguf-q8_0", "--out", str(out)]) == 2
    assert "float model" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(pretrained_tiny), "--format", "gguf-q8_0", "--out", str(out), "--ptq"]) == 0
    report = capsys.readouterr().out
    assert "(PTQ)" in report and "exact" in report and out.is_file()


def test_a_format_that_cannot_hold_the_model_leaves_no_file(qat_run, tmp_path, capsys):
    out = tmp_path / "t.gguf"
    assert main(["export", str(qat_run), "--format", "gguf-tq2_0", "--out", str(out)]) == 2
    assert "cannot hold" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing at --out, no partial file beside it


def test_existing_output_is_not_overwritten_without_the_flag(qat_run, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("precious")
    assert main(["export", str(qat_run), "--format", "gguf-q4_0", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "precious"


def test_lora_formats_and_unknown_formats_name_the_choices(qat_run, tmp_path, capsys):
    assert main(["export", str(qat_run), "--format", "peft", "--out", str(tmp_path / "a")]) == 2
    assert "LoRA adapters" in capsys.readouterr().err
    assert main(["export", str(qat_run), "--format", "gguf-q5_k", "--out", str(tmp_path / "b")]) == 2
    assert "gguf-q4_0" in capsys.readouterr().err


def test_export_section_runs_when_training_ends(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, "train.max_steps=2", "train.warmup_steps=0", "eval.every_steps=0",
                          "export.format=gguf-q8_0", "export.ptq=true")  # fmt: skip
    assert main(["train", str(TINY), *args]) == 0
    assert "exported gguf-q8_0" in capsys.readouterr().out
    assert (run_dir / "export" / "gguf-q8_0.gguf").is_file()


def test_unknown_export_format_in_a_recipe_fails_before_training(tmp_path, capsys):
    args = tiny_overrides(tmp_path / "run", "export.format=gguf-q5_k")
    assert main(["train", str(TINY), *args]) == 2
    assert "export.format: unknown format 'gguf-q5_k'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
