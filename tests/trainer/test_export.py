"""``lowbit export``: from a run or a model path to a verified file, and the errors that keep work safe."""

from __future__ import annotations

import re

import pytest
import torch

from lowbit.trainer.cli import main
from lowbit.trainer.config import load_config
from lowbit.trainer.loop import train
from tests.conftest import TINY, TINY_CORPUS, tiny_overrides

QAT_Q4_0 = "quant.rules=[{match: '*', weight: gguf_q4_0}]"


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """A tiny model trained 6 steps with the gguf_q4_0 preset (a run directory with a checkpoint)."""
    run_dir = tmp_path_factory.mktemp("qat") / "run"
    train(load_config(TINY, tiny_overrides(run_dir, "train.max_steps=6", "eval.every_steps=0", QAT_Q4_0)))
    return run_dir


def test_qat_run_exports_to_gguf_exactly_and_evaluates_the_same(qat_run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert (
        main(
            [
                "export",
                str(qat_run),
                "--format",
                "gguf-q4_0",
                "--out",
                str(out),
                "--float-type",
                "f32",
                "--embedding-type",
                "f32",
            ]
        )
        == 0
    )
    report = capsys.readouterr().out
    assert "14 × Q4_0, 1 × f32 (embeddings), 5 × f32 (norms)" in report
    assert "quantized weights vs trained: exact" in report
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
    # the GGUF on its own, with the recipe's text (its validation carve) given on the command line
    text = [f"data.train_files=[{TINY_CORPUS}]", "data.seq_len=128", "data.val_fraction=0.1", "train.seed=0"]
    assert main(["eval", str(out), f"model.tokenizer={tokenizer_dir}", *text, "log.progress=none"]) == 0
    alone = capsys.readouterr().out.strip().splitlines()[-1]
    assert numbers.findall(alone)[-3:] == numbers.findall(exported)[-3:]
    assert main(["eval", str(out)]) == 2
    assert "give the text to evaluate it on" in capsys.readouterr().err


def test_exporting_a_float_model_asks_for_ptq_then_ptq_works(pretrained_tiny, tmp_path, capsys):
    out = tmp_path / "float.gguf"
    assert main(["export", str(pretrained_tiny), "--format", "gguf-q8_0", "--out", str(out)]) == 2
    assert "float model" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(pretrained_tiny), "--format", "gguf-q8_0", "--out", str(out), "--ptq"]) == 0
    report = capsys.readouterr().out
    assert "(PTQ)" in report and "exact" in report and out.is_file()


def test_a_full_range_ptq_scheme_exports_exactly_with_every_code(pretrained_tiny, tmp_path, capsys):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    out = tmp_path / "ct"
    args = ["export", str(pretrained_tiny), "--format", "compressed-tensors", "--out", str(out), "--ptq"]
    assert main([*args, "int4-g32-full"]) == 0
    report = capsys.readouterr().out
    assert "int4 g32 sym full" in report and "exact" in report
    packed = load_file(out / "model.safetensors")["model.layers.0.mlp.down_proj.weight_packed"]
    codes = unpack_from_int32(packed, 4, torch.Size([64, 128]))  # the library unpacks to signed codes
    assert int(codes.min()) == -8 and int(codes.max()) == 7  # all 16 levels: [-8, 7]
    assert main([*args, "int4-g32-wide", "--overwrite"]) == 2
    assert "DTYPE-gN|channel|tensor[-asym|-full|-restricted]" in capsys.readouterr().err


def test_a_format_that_cannot_hold_the_model_leaves_no_file(qat_run, tmp_path, capsys):
    out = tmp_path / "t.gguf"
    assert main(["export", str(qat_run), "--format", "gguf-tq2_0", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "cannot hold" in error and "Rows of 64 values never fit TQ2_0's 256-value blocks" in error
    assert list(tmp_path.iterdir()) == []  # nothing at --out, no partial file beside it
    # the fix it names works
    assert error.rstrip().endswith("or export it as it is with --format gguf-q4_0")  # its own grid, exactly
    assert main(["export", str(qat_run), "--format", "gguf-q4_0", "--out", str(tmp_path / "q4.gguf")]) == 0


def test_activations_llama_cpp_does_not_compute_are_refused_and_the_named_fix_exports_the_weights(
    tmp_path, capsys
):
    """A GGUF file holds no activation quantization: a model trained on per-token int8 inputs would
    run on llama.cpp's Q8_0 rounding instead (and an f16 file on none). Refused (nothing written);
    the fix the message names — the rules without `activation`, changed on purpose — exports the
    weights exactly (the rules alone are still a grid change, refused); trained on llama.cpp's own
    rounding, it exports as it is."""
    run_dir = tmp_path / "run"
    w4a8_inputs = "quant.rules=[{match: '*', weight: gguf_q4_0, activation: w4a8}]"
    train(load_config(TINY, tiny_overrides(run_dir, "train.max_steps=2", "train.warmup_steps=0",
                                           "eval.every_steps=0", w4a8_inputs)))  # fmt: skip
    out = tmp_path / "m.gguf"
    assert main(["export", str(run_dir), "--format", "gguf-q4_0", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "trained on inputs quantized as int8 token sym, and a GGUF file holds no activation" in error
    assert "llama.cpp rounds its inputs as `activation: gguf_q8_0` does for gguf-q4_0" in error
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    assert (
        "repeat the run's quant rules without `activation` on the export command, with checkpoint.allow"
        in error
    )
    weights_only = "quant.rules=[{match: '*', weight: gguf_q4_0}]"
    assert main(["export", str(run_dir), weights_only, "--format", "gguf-q4_0", "--out", str(out)]) == 2
    assert (
        "trained on the grids gguf_q4_0, int8 token sym" in capsys.readouterr().err
    )  # a rule change, unasked
    fix = [weights_only, "checkpoint.allow_config_change=true"]
    assert main(["export", str(run_dir), *fix, "--format", "gguf-q4_0", "--out", str(out)]) == 0
    assert "quantized weights vs trained: exact" in capsys.readouterr().out
    f16 = tmp_path / "f16.gguf"
    assert main(["export", str(run_dir), "--format", "gguf-f16", "--out", str(f16)]) == 2
    assert "llama.cpp does not round its inputs for gguf-f16" in capsys.readouterr().err and not f16.exists()
    llama_inputs = w4a8_inputs.replace("activation: w4a8", "activation: gguf_q8_0")
    run_dir = tmp_path / "run_q8_0_inputs"
    train(load_config(TINY, tiny_overrides(run_dir, "train.max_steps=2", "train.warmup_steps=0",
                                           "eval.every_steps=0", llama_inputs)))  # fmt: skip
    assert main(["export", str(run_dir), "--format", "gguf-q4_0", "--out", str(tmp_path / "q8in.gguf")]) == 0


def test_an_output_inside_a_file_is_refused_naming_it(qat_run, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["export", str(qat_run), "--format", "gguf-q4_0", "--out", str(blocker / "m.gguf")]) == 2
    assert f"--out {blocker / 'm.gguf'}: {blocker} is a file, not a directory" in capsys.readouterr().err


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
    report = capsys.readouterr().out
    assert "exported gguf-q8_0" in report and "(PTQ)" in report and "exact" in report
    from gguf import GGUFReader

    written = GGUFReader(str(run_dir / "export" / "gguf-q8_0.gguf"))
    # the tied embeddings too are Q8_0 (llama-quantize's choice), the norms F32
    assert {t.tensor_type.name for t in written.tensors} == {"Q8_0", "F32"}


def test_unknown_export_format_in_a_recipe_fails_before_training(tmp_path, capsys):
    args = tiny_overrides(tmp_path / "run", "export.format=gguf-q5_k")
    assert main(["train", str(TINY), *args]) == 2
    assert "export.format: unknown format 'gguf-q5_k'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_overwrite_refuses_to_replace_a_directory_with_a_file_or_the_source(qat_run, tmp_path, capsys):
    folder = tmp_path / "folder"
    (folder / "keep").mkdir(parents=True)
    assert main(["export", str(qat_run), "--format", "gguf-q4_0", "--out", str(folder), "--overwrite"]) == 2
    assert "is a directory" in capsys.readouterr().err and (folder / "keep").is_dir()
    assert (
        main(["export", str(qat_run), "--format", "bnb-nf4", "--out", str(qat_run.parent), "--overwrite"])
        == 2
    )
    assert "contains it" in capsys.readouterr().err and qat_run.is_dir()


def test_overwrite_replaces_a_previous_export(qat_run, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    assert main(["export", str(qat_run), "--format", "gguf-q4_0", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_failing_self_check_writes_nothing(qat_run, tmp_path, monkeypatch, capsys):
    """A reader that disagrees with the trained weights stops the export before --out exists."""
    from lowbit.quant.formats import gguf

    real_read = gguf.read

    def corrupted(path):
        weights = real_read(path)
        weights["model.layers.0.mlp.up_proj.weight"][0, 0] += 1e-3
        return weights

    monkeypatch.setattr(gguf, "read", corrupted)
    out = tmp_path / "m.gguf"
    assert main(["export", str(qat_run), "--format", "gguf-q4_0", "--out", str(out)]) == 2
    assert "self-check failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_saved_before_quantization_started_is_labelled_ptq(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = [
        "train.max_steps=3",
        "train.warmup_steps=0",
        "eval.every_steps=0",
        QAT_Q4_0,
        "quant.enable_after_steps=5",
    ]
    train(load_config(TINY, tiny_overrides(run_dir, *overrides)))
    assert main(["export", str(run_dir), "--format", "gguf-q4_0", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "(PTQ)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["export.format=gguf-q4_0"], "add a `quant` section (QAT) or set export.ptq: true"),
        (["export.format=gguf-q4_0", "export.ptq=true", QAT_Q4_0], "drop export.ptq"),
        (["export.format=gguf-f16", "export.ptq=true"], "nothing to quantize"),
        (["export.format=gguf-f16", "export.float_type=f8"], "export.float_type"),
    ],
)
def test_export_section_is_checked_before_training(tmp_path, capsys, overrides, message):
    assert main(["train", str(TINY), *tiny_overrides(tmp_path / "run", *overrides)]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
