"""Resume safety: a relaunch that trains something else is refused and changes nothing; new
optimisation values take effect; all-damaged checkpoints stop the run instead of restarting it."""

from __future__ import annotations

import hashlib
import logging

import pytest

from lowbit.trainer.errors import UserError
from lowbit.trainer.loop import Trainer
from lowbit.trainer.optim import lr_factor
from lowbit.trainer.resume_guard import ABSENT, differences
from tests.conftest import TINY, run_cli, tiny_overrides

QUICK = ("train.max_steps=2", "train.warmup_steps=0", "checkpoint.every_steps=1", "eval.every_steps=0")
W4A8 = "quant={rules: [{match: '*', weight: w4a8, activation: w4a8}], baselines: false}"


def digest(run_dir) -> dict[str, str]:
    """sha256 of every file of the run directory (what a refused relaunch must leave as it was)."""
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


def test_differences_lists_every_changed_key_and_sections_present_on_one_side():
    before = {"model": {"config": {"hidden_size": 64, "layers": 2}}, "quant": {"rules": [1]}, "loss": [1]}
    after = {"model": {"config": {"hidden_size": 128, "layers": 2}}, "quant": None, "loss": [1]}
    assert differences(before, after) == {
        "model.config.hidden_size": (64, 128),
        "quant": (ABSENT, None),
        "quant.rules": ([1], ABSENT),
    }
    assert differences(before, before) == {}


def test_a_relaunch_that_trains_another_model_exits_2_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("train", str(TINY), *tiny_overrides(run_dir, *QUICK)).returncode == 0
    before = digest(run_dir)
    done = run_cli("train", str(TINY), *tiny_overrides(run_dir, *QUICK, "model.config.hidden_size=128"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.config.hidden_size: 64 -> 128" in done.stderr and "Traceback" not in done.stderr
    assert "checkpoint.allow_config_change=true" in done.stderr
    assert digest(run_dir) == before  # config.yaml, metrics and checkpoints untouched


@pytest.mark.parametrize(
    ("first", "relaunch", "named"),
    [
        ((W4A8,), ("quant=null",), "quant.rules: [{'match': '*'"),  # a QAT run resumed as a float model
        ((), ("loss=[{kind: ce, weight: 0.5}]",), "loss: [{'kind': 'ce', 'weight': 1.0}] -> [{'kind': 'ce', 'weight': 0.5}]"),
        ((), ("data.seq_len=64",), "data.seq_len: 128 -> 64"),
    ],
)  # fmt: skip
def test_quant_loss_and_data_changes_are_refused_too(tiny_config, tmp_path, first, relaunch, named):
    train(tiny_config(*QUICK, *first))
    before = digest(tmp_path / "run")
    with pytest.raises(UserError, match="trains something else") as refused:
        Trainer(tiny_config(*QUICK, *first, *relaunch))
    assert named in str(refused.value)
    assert digest(tmp_path / "run") == before


def train(cfg) -> None:
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()


def test_allow_config_change_resumes_a_changed_run_with_a_warning(tiny_config, tmp_path, caplog):
    train(tiny_config(*QUICK))
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        trainer = Trainer(
            tiny_config(*QUICK, "train.max_steps=3", "data.seq_len=64", "checkpoint.allow_config_change=true")
        )
    assert trainer.step == 2 and "data.seq_len: 128 -> 64" in caplog.text
    trainer.fit()
    trainer.close()


def test_new_optimisation_values_apply_from_the_next_step(tiny_config, caplog):
    """The checkpoint's optimizer state carries its learning rate and AdamW values; a relaunch's
    own values replace them (here a lower peak lr, other weight decay and betas, a longer run)."""
    train(tiny_config(*QUICK))
    changed = ("train.max_steps=6", "train.lr=1e-3", "train.weight_decay=0.1", "train.betas=[0.8,0.9]")
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        trainer = Trainer(tiny_config(*QUICK, *changed))
    assert "train.lr: 0.003 -> 0.001" in caplog.text and "train.max_steps: 2 -> 6" in caplog.text
    cfg = trainer.cfg.train
    groups = trainer.strategy.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3 * lr_factor(2, cfg)] * len(groups)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # matrices decay, norms do not
    assert all(g["betas"] == (0.8, 0.9) for g in groups)
    assert trainer.strategy.optimizer.state_dict()["state"]  # Adam's moments were restored, not reset
    trainer.fit()
    trainer.close()


def test_an_unchanged_relaunch_of_a_finished_run_says_there_is_nothing_to_train(tiny_config, caplog):
    train(tiny_config(*QUICK))
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        train(tiny_config(*QUICK))
    assert "already at step 2 of train.max_steps=2: nothing left to train" in caplog.text


def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_starting_over(tiny_config, tmp_path):
    train(tiny_config(*QUICK))
    run_dir = tmp_path / "run"
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint-000001", "checkpoint-000002"]
    for checkpoint in checkpoints:
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    before = digest(run_dir)
    with pytest.raises(
        UserError, match=r"every checkpoint in .* is damaged \(checkpoint-000002, checkpoint-000001"
    ):
        Trainer(tiny_config(*QUICK, "train.max_steps=4"))
    assert digest(run_dir) == before


def test_eval_of_a_run_directory_reads_the_config_of_its_checkpoint(tiny_config, tmp_path):
    """A relaunch that failed after the config check (or an edited config.yaml) must not break
    evaluating or exporting what the run trained."""
    from lowbit.trainer.evaluate_cli import evaluate_target

    train(tiny_config(*QUICK))
    run_dir = tmp_path / "run"
    edited = (run_dir / "config.yaml").read_text().replace("hidden_size: 64", "hidden_size: 128")
    (run_dir / "config.yaml").write_text(edited)
    rows = evaluate_target(run_dir, [])
    assert rows and rows[-1]["val_loss"] > 0


@pytest.mark.parametrize("blocker", ["run_dir", "checkpoints"])
def test_a_run_directory_that_cannot_be_written_is_refused_before_the_model_is_built(tmp_path, blocker):
    run_dir = tmp_path / "run"
    if blocker == "run_dir":  # a file where the run directory's parent should be
        (tmp_path / "file").write_text("x")
        run_dir = tmp_path / "file" / "run"
    else:
        run_dir.mkdir()
        (run_dir / "checkpoints").write_text("x")
    done = run_cli("train", str(TINY), *tiny_overrides(run_dir, *QUICK))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"run.output_dir {run_dir}:" in done.stderr and "is a file, not a directory" in done.stderr
    assert "engine single" not in done.stderr  # refused before anything was built


def test_a_checkpoint_that_cannot_fit_on_the_disk_is_refused_before_training(tiny_config, monkeypatch):
    import shutil

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(
        UserError, match=r"a checkpoint needs about 1.1 MB and its filesystem has 0.0 MB free"
    ):
        Trainer(tiny_config(*QUICK))


def test_a_failed_checkpoint_write_is_a_user_error_and_keeps_the_earlier_checkpoints(
    tiny_config, monkeypatch
):
    import errno

    from lowbit.trainer import checkpoint as ckpt

    trainer = Trainer(tiny_config(*QUICK))
    real = ckpt.write_run_files

    def full_disk_at_step_2(staging, state, config_yaml):
        if state.step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(staging, state, config_yaml)

    monkeypatch.setattr(ckpt, "write_run_files", full_disk_at_step_2)
    with pytest.raises(
        UserError, match=r"could not write the checkpoint of step 2 .*No space left on device.*intact"
    ):
        trainer.fit()
    trainer.close()
    assert [c.name for c in ckpt.complete_checkpoints(trainer.run_dir)] == ["checkpoint-000001"]
