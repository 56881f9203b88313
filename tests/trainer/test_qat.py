"""QAT through the trainer: rules from config, schedule, baselines and `recovered`, eval, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.quant import FakeQuantLinear, quantizers
from lowbit.trainer.errors import UserError
from lowbit.trainer.hooks import HOOKS, StepHook
from lowbit.trainer.loop import Trainer, train
from tests.conftest import TINY, run_cli

INT2 = 'quant={rules: [{match: "model.layers.*", weight: {dtype: int2, granularity: group, group_size: 32}}]}'


def metric_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@HOOKS.register("record_quant_state")
class RecordQuantState(StepHook):
    """Test probe: records whether fake quant is on during each step."""

    seen: list[tuple[int, bool, torch.Tensor]] = []

    def on_step_end(self, trainer, step, metrics):
        model = trainer.strategy.unwrap(trainer.parts.model)
        found = quantizers(model)
        scale = next(q.scale for q in found if q.scale is not None).detach().clone()
        RecordQuantState.seen.append((step, all(q.enabled for q in found), scale))


def test_schedule_enables_fake_quant_after_n_steps_and_freezes_scales(tiny_config):
    RecordQuantState.seen = []
    cfg = tiny_config(
        'quant={rules: [{match: "*", weight: {dtype: int4, granularity: group, group_size: 32, learn_scale: true}}]}',
        "quant.enable_after_steps=2", "quant.freeze_scales_after_steps=4", "quant.baselines=false",
        "hooks=[{kind: record_quant_state}]", "train.max_steps=5", "train.warmup_steps=0", "eval.every_steps=0",
    )  # fmt: skip
    trainer = Trainer(cfg)
    scale_before = next(q.scale for q in quantizers(trainer.parts.model)).detach().clone()
    trainer.fit()
    trainer.close()
    # on_step_end(step) reports the state during optimizer step `step` (1-based): steps 1-2 float.
    assert [(s, on) for s, on, _ in RecordQuantState.seen] == [
        (1, False),
        (2, False),
        (3, True),
        (4, True),
        (5, True),
    ]
    scales = [scale for _, _, scale in RecordQuantState.seen]
    # no gradient and no weight decay in the float steps; learned in steps 3-4; frozen (their
    # optimizer group's lr zeroed) from the 5th step on
    assert torch.equal(scales[0], scale_before) and torch.equal(scales[1], scale_before)
    assert not torch.equal(scales[2], scales[1]) and not torch.equal(scales[3], scales[2])
    assert torch.equal(scales[4], scales[3])


def test_qat_recovers_ptq_loss_and_logs_recovered(tiny_config, tmp_path, pretrained_tiny):
    # Start from a "pretrained" float model, so that PTQ to int2 really hurts it (the restricted int2
    # grid: 3 levels; the full one's 4 levels lose only ~0.2% perplexity on this tiny model).
    model_dir = pretrained_tiny
    int2_restricted = INT2.replace("model.layers.*", "*").replace(
        "group_size: 32}", "group_size: 32, range: restricted}"
    )
    qat = tiny_config(int2_restricted, "quant.quantize_head=true", "model.config=null", "model.tokenizer=null", f"model.path={model_dir}",
                      "train.max_steps=30", "train.lr=1e-3", "train.warmup_steps=0", "eval.every_steps=15",
                      run_dir=tmp_path / "qat")  # fmt: skip
    result = train(qat)
    lines = metric_lines(tmp_path / "qat")
    baselines = next(line for line in lines if "val_ppl_ptq" in line)
    assert baselines["val_ppl_ptq"] > 1.03 * baselines["val_ppl_float"]  # int2 PTQ of the head hurts
    evals = [line for line in lines if "recovered" in line]
    assert [line["step"] for line in evals] == [15, 30]
    final = result["eval"]
    expected = (baselines["val_ppl_ptq"] - final["val_ppl"]) / (
        baselines["val_ppl_ptq"] - baselines["val_ppl_float"]
    )
    assert final["recovered"] == pytest.approx(expected)
    assert final["recovered"] > 0.5  # (the quality figures on a real model live in benchmarks/)
    # `lowbit eval` on the run reports the same three numbers on the same data.
    done = run_cli("eval", str(tmp_path / "qat"))
    assert done.returncode == 0, done.stderr
    rows = {
        line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]
    }  # name (source) loss ppl tokens [recovered]
    assert float(rows["float"][3]) == pytest.approx(baselines["val_ppl_float"], rel=1e-4)
    assert float(rows["PTQ"][3]) == pytest.approx(baselines["val_ppl_ptq"], rel=1e-4)
    assert rows["QAT"][5] == f"{100 * final['recovered']:.1f}%"


LSQ = ('quant={rules: [{match: "model.layers.*", weight: {dtype: int3, granularity: group, group_size: 32, '
       "learn_scale: true}}], baselines: false}")  # fmt: skip


def test_lsq_resume_restores_weights_scales_and_their_adam_state_and_continues_exactly(tiny_config, tmp_path):
    """Killed after step 3 (its final checkpoint), resumed to step 5: fake-quant layers, weights,
    learned scales and the Adam moments of both come back bit for bit, and the run ends with the
    weights of an uninterrupted 5-step run (constant lr: the schedule does not depend on max_steps)."""
    common = (LSQ, "train.warmup_steps=0", "train.schedule=constant", "eval.every_steps=0")
    first = Trainer(tiny_config(*common, "train.max_steps=3", run_dir=tmp_path / "a"))
    first.fit()
    saved = {k: v.clone() for k, v in first.strategy.unwrap(first.parts.model).state_dict().items()}
    saved_moments = {
        i: s["exp_avg_sq"].clone() for i, s in first.strategy.optimizer.state_dict()["state"].items()
    }
    first.close()
    resumed = Trainer(tiny_config(*common, "train.max_steps=5", run_dir=tmp_path / "a"))
    model = resumed.strategy.unwrap(resumed.parts.model)
    assert resumed.step == 3 and isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    now = model.state_dict()
    scales = [k for k in saved if "weight_quantizer" in k]
    assert len(scales) >= 14 and saved.keys() == now.keys()
    assert all(torch.equal(saved[k], now[k]) for k in saved)  # weights and learned scales
    moments = resumed.strategy.optimizer.state_dict()["state"]
    assert moments.keys() == saved_moments.keys()
    assert all(torch.equal(saved_moments[i], moments[i]["exp_avg_sq"]) for i in saved_moments)
    resumed.fit()
    resumed.close()
    straight = Trainer(tiny_config(*common, "train.max_steps=5", run_dir=tmp_path / "b"))
    straight.fit()
    straight.close()
    ends = [t.strategy.unwrap(t.parts.model).state_dict() for t in (resumed, straight)]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_quant_config_errors_are_user_errors(tiny_config):
    with pytest.raises(UserError, match=r"quant.rules: quant rule 'model.layer.\*' matches no module"):
        Trainer(tiny_config('quant={rules: [{match: "model.layer.*", weight: w4a8}]}'))
    with pytest.raises(UserError, match=r"quant.rules is empty"):
        tiny_config("quant={rules: []}")
    done = run_cli(
        "train", str(TINY), 'quant={rules: [{match: "*", weight: {dtype: int4, granularity: grup}}]}'
    )
    assert done.returncode == 2 and "unknown granularity 'grup'. Did you mean: 'group'?" in done.stderr


def test_recovered_is_reported_only_when_ptq_lost_something_and_printed_as_a_percentage():
    from lowbit.trainer.loggers import format_metrics
    from lowbit.trainer.quantization import recovered

    assert recovered(11.0, {"val_ppl_float": 10.0, "val_ppl_ptq": 12.0}) == pytest.approx(0.5)
    assert recovered(9.0, {"val_ppl_float": 10.0, "val_ppl_ptq": 10.05}) is None  # gap 0.5% of float: noise
    assert recovered(9.0, {"val_ppl_float": 10.0, "val_ppl_ptq": 9.0}) is None  # PTQ no worse than float
    assert format_metrics({"val_ppl": 11.0, "recovered": 0.8734}) == "val_ppl 11.0000  recovered 87.3%"


def _rewrite_state(checkpoint, edit) -> None:
    """Change a checkpoint's trainer_state.json and re-seal its manifest (what an older lowbit wrote)."""
    from lowbit.trainer.checkpoint import MANIFEST, STATE_FILE
    from lowbit.trainer.hashing import file_sha256

    path = checkpoint / STATE_FILE
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state, indent=2))
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][STATE_FILE].update(bytes=path.stat().st_size, sha256=file_sha256(path))
    (checkpoint / MANIFEST).write_text(json.dumps(manifest, indent=2))


def test_a_resume_or_export_continues_only_on_the_grids_the_checkpoint_trained_on(
    tiny_config, caplog, tmp_path
):
    """``range: auto`` resolves an unset range to full for int4 g32, where lowbit before auto used
    the restricted grid: a checkpoint records its grids, and one without the record (written before
    auto) is read as restricted. Resuming or exporting it on the full grid is refused with the fix,
    which works; a deliberate rule change under checkpoint.allow_config_change only warns."""
    from lowbit.trainer.cli import main

    rule = 'quant={rules: [{match: "model.layers.*", weight: {dtype: int4, granularity: group, group_size: 32}}]}'
    explicit = rule.replace("group_size: 32}", "group_size: 32, range: restricted}")
    steps = ("train.warmup_steps=0", "checkpoint.every_steps=2", "eval.every_steps=0")
    allow = "checkpoint.allow_config_change=true"
    cfg = tiny_config("train.max_steps=2", *steps, rule)
    train(cfg)
    run_dir = Path(cfg.run.output_dir)
    checkpoint = run_dir / "checkpoints" / "checkpoint-000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["quant_grids"] == ["int4 g32 sym full"]
    Trainer(tiny_config("train.max_steps=3", *steps, rule)).close()  # same grids: resumes
    with caplog.at_level("WARNING", logger="lowbit"):  # changed on purpose: a warning
        Trainer(tiny_config("train.max_steps=3", *steps, explicit, allow)).close()
    assert (
        "trained on the grids int4 g32 sym full but this model computes int4 g32 sym (the quant"
        in caplog.text
    )
    _rewrite_state(checkpoint, lambda state: state.pop("quant_grids"))  # as written before range: auto
    refused = r"int4 g32 sym but this model computes int4 g32 sym full.*range: restricted"
    for extra in ((), (allow,)):  # the config did not change: allow_config_change does not cover it
        with pytest.raises(UserError, match=refused):
            Trainer(tiny_config("train.max_steps=3", *steps, rule, *extra))
    resumed = Trainer(tiny_config("train.max_steps=3", *steps, explicit, allow))  # the fix the message names
    assert resumed.step == 2
    resumed.close()
    # export reads the same record: refused, then the quant.rules override the message names works
    out = ["--format", "compressed-tensors", "--out", str(tmp_path / "ct")]
    assert main(["export", str(run_dir), *out]) == 2
    override = explicit.replace("quant={rules: ", "quant.rules=")[:-1]
    assert main(["export", str(run_dir), override, *out]) == 0
