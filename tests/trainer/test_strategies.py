"""Engine choice and options: what each bad combination says, the DeepSpeed JSON, launcher options."""

from __future__ import annotations

import json

import pytest

from lowbit.trainer.config import DeepSpeedConfig, StrategyConfig, TrainConfig, resolve_global_batch
from lowbit.trainer.errors import UserError
from lowbit.trainer.strategies.deepspeed_config import deepspeed_config, generated_config, merge_user_config
from tests.conftest import TINY, run_cli, tiny_overrides


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["strategy.name=fsdp3"],
            "strategy.name: unknown value 'fsdp3'; choose one of auto, single, ddp, fsdp2, deepspeed",
        ),
        (
            ["strategy.name=ddp", "strategy.fsdp2.reshard_after_forward=false"],
            "strategy.fsdp2 is set but strategy.name is ddp",
        ),
        (
            ["strategy.name=fsdp2", "strategy.deepspeed.stage=3"],
            "strategy.deepspeed is set but strategy.name is fsdp2",
        ),
        (
            ["strategy.name=deepspeed", "strategy.deepspeed.stage=4"],
            "strategy.deepspeed.stage: unknown value 4; choose one of 1, 2, 3",
        ),
        (
            ["strategy.name=deepspeed", "strategy.deepspeed.offload_param=cpu"],
            "offload_param=cpu needs ZeRO stage 3",
        ),
        (
            ["strategy.name=fsdp2", "strategy.fsdp2.reshard_after_forward=sometimes"],
            "reshard_after_forward: true, false or a number of ranks",
        ),
        (
            ["strategy.name=deepspeed", "strategy.deepspeed.config=/no/such.json"],
            "/no/such.json does not exist",
        ),
        (
            ["strategy.teacher=sharded", "strategy.name=ddp"],
            "strategy.teacher=sharded needs an engine that shards",
        ),
        (["strategy.teacher=sharded", "strategy.name=fsdp2"], "no teacher runs"),
        (["train.global_batch_size=0"], "train.global_batch_size must be at least 1"),
        (
            ["strategy.name=fsdp2", "strategy.fsdp2.cpu_offload=true", "strategy.device=cpu"],
            "this run computes on the CPU, where it already is: drop strategy.fsdp2.cpu_offload",
        ),
    ],
)
def test_impossible_engine_settings_exit_2_naming_the_fix_before_anything_is_written(
    tmp_path, overrides, message
):
    done = run_cli("train", str(TINY), *tiny_overrides(tmp_path / "run", *overrides))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_global_batch_the_ranks_do_not_divide_is_an_error_naming_the_numbers():
    train = TrainConfig(micro_batch_size=4, global_batch_size=24)
    resolve_global_batch(train, 3)
    assert train.grad_accum_steps == 2
    with pytest.raises(
        UserError, match=r"global_batch_size 24 is not a multiple of micro_batch_size 4 × 4 ranks = 16"
    ):
        resolve_global_batch(TrainConfig(micro_batch_size=4, global_batch_size=24), 4)


def test_generated_deepspeed_config_is_consistent_by_construction():
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=4, max_grad_norm=0.5, precision="bf16")
    config = generated_config(
        train, DeepSpeedConfig(stage=3, offload_optimizer="cpu"), world_size=8, hidden_size=512
    )
    assert config["train_batch_size"] == 2 * 4 * 8
    # bf16 is lowbit's autocast over fp32 weights on every engine: DeepSpeed's weight cast stays off
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": False}
    zero = config["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["offload_optimizer"] == {"device": "cpu"} and "offload_param" not in zero
    )
    assert zero["reduce_bucket_size"] == 512 * 512 and zero["stage3_param_persistence_threshold"] == 5120
    assert config["managed_gradient_accumulation"] is False  # the loop marks the boundary


def test_a_user_deepspeed_json_tunes_freely_but_may_not_contradict_lowbit(tmp_path):
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=4)
    generated = generated_config(train, DeepSpeedConfig(stage=2), world_size=2, hidden_size=64)
    tuned = merge_user_config(
        generated,
        {"zero_optimization": {"overlap_comm": True, "stage": 2, "reduce_bucket_size": 1000},
         "train_micro_batch_size_per_gpu": "auto"},
        "ds.json",
    )  # fmt: skip
    assert tuned["zero_optimization"] == {
        **generated["zero_optimization"],
        "overlap_comm": True,
        "reduce_bucket_size": 1000,
    }
    assert tuned["train_micro_batch_size_per_gpu"] == 2
    cases = [
        (
            {"train_batch_size": 64},
            "ds.json sets train_batch_size = 64, but lowbit's train.micro_batch_size × grad_accum_steps × ranks gives 16",
        ),
        (
            {"bf16": {"enabled": True}},
            "sets bf16.enabled = true, but lowbit's train.precision gives false: remove bf16 from the JSON",
        ),
        (
            {"zero_optimization": {"stage": 3}},
            "zero_optimization.stage = 3, but lowbit's strategy.deepspeed.stage gives 2",
        ),
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section: lowbit builds AdamW"),
        ({"gradient_clipping": 0.3}, "gradient_clipping = 0.3, but lowbit's train.max_grad_norm gives 1.0"),
    ]
    for user, message in cases:
        with pytest.raises(UserError) as error:
            merge_user_config(generated, user, "ds.json")
        assert message in str(error.value)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(
        UserError, match="gradient_accumulation_steps = 8, but lowbit's train.grad_accum_steps"
    ):
        deepspeed_config(train, DeepSpeedConfig(stage=2, config=str(path)), world_size=2, hidden_size=64)
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read it as JSON"):
        deepspeed_config(train, DeepSpeedConfig(stage=2, config=str(path)), world_size=2, hidden_size=64)


def test_accelerate_launch_configs_pick_the_engine_and_fill_options_or_conflict(monkeypatch):
    from lowbit.trainer.strategies import resolve_name
    from lowbit.trainer.strategies.launchers import with_launcher_options

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert resolve_name(StrategyConfig()) == "fsdp2"
    adopted = with_launcher_options(StrategyConfig(name="fsdp2"), TrainConfig(), "fsdp2")
    assert adopted.fsdp2 is not None and adopted.fsdp2.reshard_after_forward is False
    with pytest.raises(UserError, match="strategy.name is ddp, but the accelerate config .* asks for fsdp2"):
        resolve_name(StrategyConfig(name="ddp"))
    from lowbit.trainer.config import FSDP2Config

    # a section of the run config that sets other fields still takes the launcher's value for this one
    adopted = with_launcher_options(
        StrategyConfig(name="fsdp2", fsdp2=FSDP2Config(load="full")), TrainConfig(), "fsdp2"
    )
    assert adopted.fsdp2.load == "full" and adopted.fsdp2.reshard_after_forward is False
    conflicting = StrategyConfig(name="fsdp2", fsdp2=FSDP2Config(reshard_after_forward=2))
    with pytest.raises(
        UserError,
        match="sets reshard_after_forward=False for fsdp2 but strategy.fsdp2.reshard_after_forward is 2",
    ):
        with_launcher_options(conflicting, TrainConfig(), "fsdp2")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="set `fsdp_version: 2`"):
        with_launcher_options(StrategyConfig(name="fsdp2"), TrainConfig(), "fsdp2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(UserError, match="sets gradient_accumulation_steps=4 but train.grad_accum_steps is 1"):
        with_launcher_options(StrategyConfig(name="deepspeed"), TrainConfig(), "deepspeed")
    adopted = with_launcher_options(
        StrategyConfig(name="deepspeed"), TrainConfig(grad_accum_steps=4), "deepspeed"
    )
    assert adopted.deepspeed is not None and adopted.deepspeed.stage == 3


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_any_engine_trains_plainly_in_one_process_as_a_group_of_one(tiny_config, engine):
    from lowbit.trainer.loop import Trainer

    trainer = Trainer(tiny_config(f"strategy.name={engine}", "train.max_steps=2", "train.warmup_steps=0",
                                  "eval.every_steps=0", "strategy.device=cpu"))  # fmt: skip
    try:
        assert trainer.strategy.world_size == 1 and trainer.strategy.name == engine
        result = trainer.fit()
    finally:
        trainer.close()
    assert result["step"] == 2 and result["eval"]["val_loss"] < 6
