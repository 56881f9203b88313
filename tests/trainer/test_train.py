"""End-to-end training on the tiny recipe: learning, exact resume after SIGKILL, eval, W&B, plugins."""

from __future__ import annotations

import json
import logging
import signal
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.trainer.errors import UserError
from lowbit.trainer.loop import Trainer, train
from tests.conftest import TINY, TINY_CORPUS, run_cli, tiny_overrides

KILL_HOOK = '''
import os, signal
from lowbit.trainer.hooks import HOOKS, StepHook

@HOOKS.register("sigkill_at_step")
class SigkillAtStep(StepHook):
    """Kills its own process with SIGKILL after a given step: a crash no handler can soften."""
    def __init__(self, step: int):
        self.step = step
    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def metric_lines(run_dir, key="loss"):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if key in line]


def final_weights(run_dir):
    newest = sorted((run_dir / "checkpoints").glob("checkpoint-*"))[-1]
    return load_file(newest / "model.safetensors")


def test_tiny_model_loss_falls_over_30_steps(tiny_config):
    cfg = tiny_config(
        "train.max_steps=30", "eval.every_steps=0", "eval.at_start=true", "checkpoint.every_steps=0"
    )
    result = train(cfg)
    losses = [line["loss"] for line in metric_lines(cfg_run_dir(cfg))]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    evals = metric_lines(cfg_run_dir(cfg), "val_loss")
    assert [e["step"] for e in evals] == [0, 30]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert result["eval"]["val_ppl"] == pytest.approx(
        torch.tensor(evals[1]["val_loss"]).exp().item(), rel=1e-6
    )


def cfg_run_dir(cfg):
    return Path(cfg.run.output_dir)


def streamed_mixture(tmp_path) -> list[str]:
    """Overrides: the tiny corpus (weight 3) and a chat file (weight 1), packed, streamed."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                                 {"role": "assistant", "content": f"{2 * i}, since {i} + {i} = {2 * i}."}]}) + "\n"
        for i in range(60)
    ))  # fmt: skip
    return [
        "data.train_files=[]", f"data.sources=[{{files: [{TINY_CORPUS}], weight: 3}}, {{files: [{chat}], weight: 1}}]",
        "data.streaming=true", "data.packing=true", "data.val_fraction=0",
    ]  # fmt: skip


@pytest.mark.parametrize("data", ["cached", "streamed mixture"])
def test_sigkill_mid_training_resumes_to_identical_weights(tmp_path, data):
    plugin = tmp_path / "kill_hook.py"
    plugin.write_text(KILL_HOOK)
    common = [
        "train.max_steps=10",
        "train.warmup_steps=2",
        "checkpoint.every_steps=3",
        "eval.every_steps=0",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
        f"imports=[{plugin}]",
        *(streamed_mixture(tmp_path) if data == "streamed mixture" else []),
    ]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    done = run_cli("train", str(TINY), *tiny_overrides(reference_dir, *common))
    assert done.returncode == 0, done.stderr

    killed = run_cli(
        "train", str(TINY), *tiny_overrides(killed_dir, *common, "hooks=[{kind: sigkill_at_step, step: 7}]")
    )
    assert killed.returncode == -signal.SIGKILL
    assert [line["step"] for line in metric_lines(killed_dir)] == list(range(1, 8))

    resumed = run_cli("train", str(TINY), *tiny_overrides(killed_dir, *common))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "checkpoint-000006" in resumed.stderr

    reference, recovered = final_weights(reference_dir), final_weights(killed_dir)
    assert reference.keys() == recovered.keys()
    for name in reference:
        assert torch.equal(reference[name], recovered[name]), name
    # The metrics file holds each step once, with the losses of the uninterrupted run.
    assert [line["step"] for line in metric_lines(killed_dir)] == list(range(1, 11))
    assert [line["loss"] for line in metric_lines(killed_dir)] == [
        line["loss"] for line in metric_lines(reference_dir)
    ]
    if data == "streamed mixture":  # each source's share of the rows read so far, logged per step
        shares = metric_lines(reference_dir)[-1]
        assert shares["data/share/tiny_corpus"] + shares["data/share/chat"] == pytest.approx(1.0)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tiny_config, caplog):
    cfg = tiny_config(
        "train.max_steps=4", "train.warmup_steps=0", "checkpoint.every_steps=2", "eval.every_steps=0"
    )
    train(cfg)
    run_dir = cfg_run_dir(cfg)
    newest = run_dir / "checkpoints" / "checkpoint-000004"
    (newest / "optimizer.pt").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="lowbit"):
        resumed = Trainer(
            tiny_config("train.max_steps=5", "train.warmup_steps=0", "checkpoint.every_steps=2")
        )
    assert resumed.step == 2
    assert "skipping checkpoint" in caplog.text and "optimizer.pt has 7 bytes" in caplog.text
    resumed.close()


def test_resume_never_refuses_to_overwrite_a_run(tiny_config):
    cfg = tiny_config("train.max_steps=2", "train.warmup_steps=0")
    train(cfg)
    with pytest.raises(UserError, match="already holds checkpoints"):
        Trainer(tiny_config("train.max_steps=2", "train.warmup_steps=0", "checkpoint.resume=never"))


def test_eval_cli_reports_the_trained_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=6", "train.warmup_steps=0", "eval.every_steps=0")
    result = train(cfg)
    done = run_cli("eval", cfg.run.output_dir)
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "checkpoint-000006" in line)
    assert f"{result['eval']['val_ppl']:.3f}" in row.split()
    missing = run_cli("eval", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    # the float run evaluated with quant rules: a PTQ of that checkpoint, against its own float model
    rules = 'quant={rules: [{match: "*", weight: {dtype: int2, granularity: group, group_size: 32}}]}'
    done = run_cli("eval", cfg.run.output_dir, rules)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    float_row = next(line for line in lines if line.startswith("float (checkpoint-000006)"))
    assert f"{result['eval']['val_ppl']:.3f}" in float_row.split()
    assert any(line.startswith("PTQ of checkpoint-000006") for line in lines)
    assert "QAT" not in done.stdout and "%" not in done.stdout  # no QAT row, no recovered share


def test_instruction_data_and_pretrained_directory(tmp_path, tiny_config):
    from lowbit.trainer.byte_tokenizer import byte_tokenizer
    from lowbit.trainer.config import load_config

    # A "pretrained" model directory: the tiny model saved with its tokenizer.
    trained = tiny_config("train.max_steps=2", "train.warmup_steps=0", run_dir=tmp_path / "base")
    trainer = Trainer(trained)
    model_dir = tmp_path / "hf"
    trainer.strategy.unwrap(trainer.parts.model).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    trainer.close()
    chat = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"say {i}"},
                {"role": "assistant", "content": f"{i} " * (i % 5 + 1)},
            ]
        }
        for i in range(40)
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path / 'sft'}",
            "log.progress=none",
            "model.config=null",
            "model.tokenizer=null",
            f"model.path={model_dir}",
            f"data.train_files=[{chat}]",
            "data.seq_len=32",
            "train.max_steps=3",
            "train.warmup_steps=0",
            "eval.every_steps=0",
            "eval.at_start=false",
        ],
    )
    result = train(cfg)
    assert result["step"] == 3 and result["eval"]["val_tokens"] > 0


def test_wandb_offline_writes_a_run_and_unreachable_online_never_stops_training(tiny_config, tmp_path):
    offline = tiny_config(
        "train.max_steps=2", "train.warmup_steps=0", "log.wandb.mode=offline", run_dir=tmp_path / "off"
    )
    train(offline)
    assert list((tmp_path / "off" / "wandb").glob("offline-run-*/run-*.wandb"))
    # a relaunch that continues the run (2 more steps) writes to the same W&B run id
    train(
        tiny_config(
            "train.max_steps=4", "train.warmup_steps=0", "log.wandb.mode=offline", run_dir=tmp_path / "off"
        )
    )
    files = sorted((tmp_path / "off" / "wandb").glob("offline-run-*/run-*.wandb"))
    run_id = (tmp_path / "off" / "wandb_run_id").read_text().strip()
    assert len(files) == 2 and {f.name for f in files} == {f"run-{run_id}.wandb"}
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "a" * 40}
    done = run_cli(
        "train",
        str(TINY),
        *tiny_overrides(
            tmp_path / "on",
            "train.max_steps=2",
            "train.warmup_steps=0",
            "log.wandb.mode=online",
            "log.wandb.init_timeout_s=3",
        ),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "W&B could not start" in done.stderr and "training continues without it" in done.stderr
    assert len(metric_lines(tmp_path / "on")) == 2


def test_unknown_hook_and_missing_plugin_are_user_errors(tiny_config):
    with pytest.raises(UserError, match="unknown hook 'nope'"):
        Trainer(tiny_config("hooks=[{kind: nope}]"))
    with pytest.raises(UserError, match="imports: cannot import 'no_such_plugin_mod'"):
        Trainer(tiny_config("imports=[no_such_plugin_mod]"))


def test_python_dash_m_runs_the_cli_and_accepts_deepspeeds_local_rank_flag():
    done = run_cli("--help")
    assert done.returncode == 0 and "train" in done.stdout and "eval" in done.stdout
    launched = run_cli("--local_rank=0", "config", str(TINY))  # as `deepspeed --module` calls us
    assert launched.returncode == 0 and "model_type: llama" in launched.stdout


def test_gradient_checkpointing_gives_the_same_losses_and_bf16_autocast_trains(tiny_config, tmp_path):
    common = (
        "train.max_steps=4",
        "train.warmup_steps=0",
        "eval.every_steps=0",
        "checkpoint.save_final=false",
    )
    plain = train(tiny_config(*common, run_dir=tmp_path / "plain"))
    recomputed = train(tiny_config(*common, "model.gradient_checkpointing=true", run_dir=tmp_path / "gc"))
    plain_losses = [line["loss"] for line in metric_lines(tmp_path / "plain")]
    gc_losses = [line["loss"] for line in metric_lines(tmp_path / "gc")]
    assert gc_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    assert recomputed["eval"]["val_loss"] == pytest.approx(plain["eval"]["val_loss"], rel=1e-5)
    bf16 = train(tiny_config(*common, "train.precision=bf16", run_dir=tmp_path / "bf16"))
    bf16_losses = [line["loss"] for line in metric_lines(tmp_path / "bf16")]
    assert bf16_losses[-1] < bf16_losses[0]
    assert bf16_losses != plain_losses  # autocast really ran in bf16
    assert bf16_losses == pytest.approx(plain_losses, rel=0.05)
    assert bf16["eval"]["val_loss"] == pytest.approx(plain["eval"]["val_loss"], rel=0.05)


class FakeWandb:
    """Stands in for the ``wandb`` module: records init arguments and logged steps, keeps the
    largest step per run id as W&B does (it drops a step that does not increase)."""

    def __init__(self) -> None:
        self.inits: list[dict] = []
        self.steps: list[list[int]] = []  # per launch: the steps it logged (train and eval)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        record: list[int] = []
        self.steps.append(record)
        fake = types.SimpleNamespace(id=kwargs["id"], finish=lambda: None)
        fake.log = lambda metrics, step: record.append(step)
        return fake

    def Settings(self, **kwargs):  # noqa: N802 (wandb's name)
        return kwargs


def test_a_relaunched_run_continues_its_wandb_run_without_logging_a_step_twice(
    tiny_config, monkeypatch, caplog
):
    """Killed after step 3 (checkpoint at 2, metrics logged through 3), relaunched: the same W&B
    run resumes, W&B's step 3 is kept, and each step reaches W&B exactly once; its config says
    what ran (world size, global batch, parameter counts)."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    common = (
        "train.warmup_steps=0",
        "checkpoint.every_steps=2",
        "log.wandb.mode=offline",
        "eval.every_steps=0",
    )
    first = Trainer(tiny_config(*common, "train.max_steps=3", "checkpoint.save_final=false"))
    first.fit()
    first.close()
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        second = Trainer(tiny_config(*common, "train.max_steps=5"))
        assert second.step == 2
        second.fit()
        second.close()
    run_id = fake.inits[0]["id"]
    assert [init["id"] for init in fake.inits] == [run_id, run_id] and len(run_id) == 12
    assert (first.run_dir / "wandb_run_id").read_text().strip() == run_id
    assert all(init["resume"] == "allow" for init in fake.inits)
    before, after = ({step for step in launch if step > 0} for launch in fake.steps)
    assert before == {1, 2, 3} and after == {4, 5}  # no step sent twice; none missing
    assert f"W&B run {run_id} continues: it keeps steps 3-3" in caplog.text
    facts = fake.inits[0]["config"]["lowbit"]
    assert (
        facts["world_size"] == 1 and facts["global_batch_size"] == 8 and facts["tokens_per_step"] == 8 * 128
    )
    model = first.strategy.unwrap(first.parts.model)
    assert facts["parameters"] == facts["trained_parameters"] == sum(p.numel() for p in model.parameters())


def test_the_start_line_and_record_count_what_runs(tiny_config, tmp_path, caplog):
    """Parameters, quantized weights, batch in sequences and tokens, data and epochs, against the
    tensors and the data; the same facts open metrics.jsonl."""
    cfg = tiny_config("train.max_steps=2", "train.warmup_steps=0", "eval.every_steps=0",
                      "quant={rules: [{match: '*', weight: w4a8}], baselines: false}")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lowbit"):
        trainer = Trainer(cfg)
    model = trainer.strategy.unwrap(trainer.parts.model)
    linear = [m for m in model.modules() if getattr(m, "weight_quantizer", None) is not None]
    quantized = sum(m.weight.numel() for m in linear)
    # per layer q 64×64, k and v 32×64, o 64×64, gate and up 128×64, down 64×128; 2 layers; head untouched
    assert len(linear) == 14 and quantized == 2 * (4096 + 2 * 2048 + 4096 + 3 * 8192) == 73_728
    train_sequences, val_sequences = len(trainer.parts.train_batches.examples), len(trainer.parts.val)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("engine single"))
    assert f"({8 * 128:,} tokens)" in line and f"{quantized / 1e6:.2f}M quantized" in line
    assert f"{train_sequences:,} training / {val_sequences:,} validation sequences" in line
    assert f"2 steps = {2 * 8 / train_sequences:.2f} epochs" in line
    trainer.fit()
    trainer.close()
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0 and start["start"]["quantized_parameters"] == quantized
    assert start["start"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert start["start"]["val_sequences"] == val_sequences and start["start"]["tokens_per_step"] == 1024
