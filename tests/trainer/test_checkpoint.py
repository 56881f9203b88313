"""Checkpoints: atomic save, verification, skipping corrupt ones, pruning, RNG round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.config import StrategyConfig, TrainConfig
from lowbit.trainer.errors import UserError
from lowbit.trainer.strategies import Strategy


def prepared(seed: int = 0) -> Strategy:
    torch.manual_seed(seed)
    strategy = Strategy(StrategyConfig(device="cpu"), TrainConfig(max_steps=10))
    strategy.prepare(torch.nn.Linear(4, 3), torch.nn.Module())
    return strategy


def save(run_dir, step: int, keep_last: int = 3):
    strategy = prepared()
    strategy.model(torch.randn(2, 4)).sum().backward()
    strategy.optimizer_step()
    state = ckpt.TrainerState(
        step=step, data_position=step * 8, global_batch_size=8, world_size=1,
        scheduler=strategy.scheduler.state_dict(),
    )  # fmt: skip
    return ckpt.save(strategy, run_dir, state, "train: {}\n", keep_last), strategy.model


def test_save_verify_load_round_trip(tmp_path):
    path, model = save(tmp_path, 5)
    assert path.name == "checkpoint-000005" and ckpt.verify(path) is None
    assert not list(ckpt.checkpoints_root(tmp_path).glob(".*"))  # no staging left behind
    fresh = prepared(seed=1)
    assert not torch.equal(fresh.model.weight, model.weight)
    state = ckpt.restore(fresh, path)
    assert state.step == 5 and state.data_position == 40 and state.layout == "safetensors"
    assert torch.equal(fresh.model.weight, model.weight)
    assert fresh.optimizer.state_dict()["state"][0]["exp_avg"].shape == (3, 4)
    assert fresh.scheduler.last_epoch == 1


def test_a_checkpoint_of_another_layout_is_refused_naming_the_engine_that_reads_it(tmp_path):
    path, _ = save(tmp_path, 2)
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    with pytest.raises(UserError, match="resume it with strategy.name=fsdp2"):
        prepared().check_resumable(path, {**state, "engine": "fsdp2", "layout": "dcp"})


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "delete"])
def test_damaged_checkpoint_is_reported_and_skipped(tmp_path, damage, caplog):
    good, _ = save(tmp_path, 2)
    bad, _ = save(tmp_path, 4)
    weights = bad / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (bad / ckpt.MANIFEST).unlink()
    else:
        (bad / "optimizer.pt").unlink()
    assert ckpt.verify(bad) is not None
    with caplog.at_level("WARNING", logger="lowbit"):
        assert ckpt.latest_valid_checkpoint(tmp_path) == good
    assert "skipping checkpoint" in caplog.text and "checkpoint-000004" in caplog.text
    with pytest.raises(UserError, match="cannot be loaded"):
        ckpt.load_weights(bad, torch.nn.Linear(4, 3))


def test_unfinished_staging_dir_is_ignored(tmp_path):
    good, _ = save(tmp_path, 1)
    staging = ckpt.staging_dir(tmp_path, 9)
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_valid_checkpoint(tmp_path) == good


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["checkpoint-000004", "checkpoint-000003"]


def test_manifest_lists_every_file_with_hash(tmp_path):
    path, _ = save(tmp_path, 3)
    files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    assert set(files) == {
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "config.yaml",
        "rng-rank0.pt",
    }
    assert all(len(entry["sha256"]) == 64 for entry in files.values())


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_a_deepspeed_checkpoint_of_another_zero_stage_is_refused_naming_the_stage(tmp_path):
    """ZeRO stages partition the optimizer differently: the stage that wrote it is named. (Another
    world size is accepted: tests/distributed/test_faults.py resumes 2-rank checkpoints on 1.)"""
    from lowbit.trainer.config import DeepSpeedConfig
    from lowbit.trainer.strategies.deepspeed import DeepSpeedStrategy

    strategy = object.__new__(DeepSpeedStrategy)  # the check needs no engine and no process group
    strategy.options, strategy.world_size = DeepSpeedConfig(stage=3), 1
    state = {"engine": "deepspeed-zero2", "layout": "deepspeed", "world_size": 2}
    with pytest.raises(UserError, match="resume with strategy.deepspeed.stage=2"):
        strategy.check_resumable(tmp_path, state)
    strategy.check_resumable(tmp_path, {**state, "engine": "deepspeed-zero3"})
    assert strategy.written_by_world_size == 2
