"""``lowbit gptq``: a recipe's model rounded by GPTQ onto its rules, written as a float model that
PTQ, QAT and export read as that rounding; and the inputs it refuses."""

from __future__ import annotations

import json
import re

import pytest

from lowbit.trainer.cli import main
from tests.conftest import TINY, tiny_overrides

INT3 = "quant.rules=[{match: '*', weight: {dtype: int3, granularity: group, group_size: 32}}]"


def gptq_args(source, run_dir, out, *extra: str) -> list[str]:
    overrides = tiny_overrides(run_dir, f"model.path={source}", "model.config=null", INT3, *extra)
    return ["gptq", str(TINY), *overrides, "--out", str(out), "--samples", "16"]


def ptq_row(capsys, *args: str) -> float:
    """val_loss of the 'PTQ (round-to-nearest)' row that `lowbit eval` prints."""
    assert main(["eval", *args]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("PTQ"))
    return float(re.findall(r"\d+\.\d+", line)[0])


@pytest.fixture(scope="module")
def gptq_model(pretrained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "model"
    assert main(gptq_args(pretrained_tiny, out.parent / "run", out)) == 0
    return out


def test_gptq_lowers_the_ptq_loss_and_every_layers_output_error(
    gptq_model, pretrained_tiny, tmp_path, capsys
):
    """The written model, read with the same rules, is a better PTQ than round-to-nearest of the
    original on held-out text; its report has every quantized layer below RTN's output error."""
    report = json.loads((gptq_model / "gptq.json").read_text())
    assert len(report["layers"]) == 14 and report["samples"] == 16
    assert all(layer["error"] < layer["rtn_error"] for layer in report["layers"].values())
    common = [str(TINY), *tiny_overrides(tmp_path / "eval", "model.config=null", INT3)]
    rtn = ptq_row(capsys, *common, f"model.path={pretrained_tiny}")
    gptq = ptq_row(capsys, *common, f"model.path={gptq_model}")
    assert gptq < rtn, (gptq, rtn)


def test_the_written_weights_sit_on_the_grid(gptq_model):
    """Every weight is its own fake quant but for the elements at their block's absmax: the anchor
    that fixes the scale and, on int3's full grid, those on the bottom code (held at -absmax, which
    rounds there). So a run that reads the model computes GPTQ's rounding in its first forward."""
    from transformers import AutoModelForCausalLM

    from lowbit.quant import QuantSpec, fake_quantize

    spec = QuantSpec(dtype="int3", granularity="group", group_size=32)
    model = AutoModelForCausalLM.from_pretrained(gptq_model)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        weight = model.get_submodule(name).weight.detach().reshape(-1, 32)
        off_grid = fake_quantize(weight, spec) != weight
        at_absmax = weight.abs() == weight.abs().amax(1, keepdim=True)
        assert not (off_grid & ~at_absmax).any()
        assert off_grid.sum(1).min() >= 1  # the anchor of every block


def test_a_gptq_model_for_llama_cpp_exports_its_rounding_exactly(pretrained_tiny, tmp_path, capsys):
    """GPTQ on the Q4_0 grid, then `export --ptq`: the file holds GPTQ's codes (the export's own
    self-check reads them back equal to the fake quant of the written weights)."""
    q4_0 = "quant.rules=[{match: '*', weight: gguf_q4_0}]"
    model = tmp_path / "gptq"
    assert main(gptq_args(pretrained_tiny, tmp_path / "run", model, q4_0)) == 0
    assert "gguf_q4_0" in capsys.readouterr().out
    out = tmp_path / "model.gguf"
    assert main(["export", str(model), "--format", "gguf-q4_0", "--out", str(out), "--ptq"]) == 0
    report = capsys.readouterr().out
    assert "14 × Q4_0" in report and "quantized weights vs trained: exact" in report


@pytest.mark.parametrize(
    "extra, message",
    [
        (["quant=null"], "add a `quant` section"),
        (["quant.rules=[{match: '*', weight: {dtype: int4, granularity: group, group_size: 32, symmetric: false}}]"],
         "14 layers cannot be rounded by GPTQ"),
        (["lora={rank: 4, base: float}"], "freezes its base"),
        (["quant.quantize_head=true"], "lm_head shares its weight with the input embeddings (a tied head)"),
    ],
)  # fmt: skip
def test_recipes_gptq_cannot_round_are_refused_before_any_work(
    extra, message, pretrained_tiny, tmp_path, capsys
):
    out = tmp_path / "out"
    assert main(gptq_args(pretrained_tiny, tmp_path / "run", out, *extra)) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_bad_arguments_and_an_existing_output_are_refused_with_the_fix(
    gptq_model, pretrained_tiny, tmp_path, capsys
):
    args = gptq_args(pretrained_tiny, tmp_path / "run", tmp_path / "out")
    assert main([*args[:-1], "100000"]) == 2
    assert re.search(r"holds \d+ sequences; pass --samples \d+", capsys.readouterr().err)
    assert main([*args, "--damp", "0"]) == 2
    assert "a damping in (0, 1)" in capsys.readouterr().err
    before = (gptq_model / "model.safetensors").read_bytes()
    assert main(gptq_args(pretrained_tiny, tmp_path / "run", gptq_model)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (gptq_model / "model.safetensors").read_bytes() == before
