"""The multi-process launcher itself (engine equivalence lives in ``test_engines``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.trainer import checkpoint as ckpt
from tests.conftest import ROOT, TINY, run_cli, tiny_overrides
from tests.distributed.test_faults import free_port

pytestmark = pytest.mark.distributed


def test_launcher_reports_a_user_error_with_exit_code_2(tmp_path):
    """Found before launching (a config typo), or by the launched workers (an engine that cannot
    run in this launch): exit 2 either way, the message once, no traceback of ours."""
    done = run_cli("train", "--nproc-per-node", "2", str(TINY), *tiny_overrides(tmp_path, "train.lrr=1"))
    assert done.returncode == 2
    assert done.stderr.count("Did you mean: 'lr'") == 1
    done = run_cli(
        "train", "--nproc-per-node", "2", str(TINY), *tiny_overrides(tmp_path / "w", "strategy.name=single")
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "strategy single was launched with several processes; use ddp, fsdp2, deepspeed" in done.stderr
    assert not (tmp_path / "w").exists()


def test_lowbit_train_restarts_its_processes_and_resumes(tmp_path):
    """`lowbit train --nproc-per-node 2 --max-restarts 1`: rank 1 dies after step 3, the job comes
    back from checkpoint 2 and finishes."""
    from tests.distributed.test_faults import HOOKS

    done = run_cli(
        "train", "--nproc-per-node", "2", "--max-restarts", "1", str(TINY),
        *tiny_overrides(tmp_path / "run", "train.max_steps=4", "train.warmup_steps=0", "checkpoint.every_steps=2", "eval.every_steps=0",
                        "train.micro_batch_size=2", f"imports=[{HOOKS}]",
                        "hooks=[{kind: signal_at_step, step: 3, signal: KILL, rank: 1}]"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "checkpoint-000002 at step 2" in done.stderr
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"loss"' in line] == [1, 2, 3, 4]


def cpu_copy(config: Path, out: Path) -> Path:
    """A launch/ accelerate config for 2 CPU processes (the samples are written for 8 GPUs)."""
    text = (
        config.read_text()
        .replace("num_processes: 8", "num_processes: 2")
        .replace("use_cpu: false", "use_cpu: true")
    )
    out.write_text(text)
    return out


@pytest.mark.parametrize(
    ("sample", "engine"), [("accelerate_fsdp2.yaml", "fsdp2"), ("accelerate_zero3.yaml", "deepspeed-zero3")]
)
def test_accelerate_launch_with_a_sample_config_runs_the_engine_it_names(tmp_path, sample, engine):
    config = cpu_copy(ROOT / "launch" / sample, tmp_path / sample)
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "lowbit.trainer",
         "train", str(TINY), *tiny_overrides(tmp_path / "run", "train.max_steps=3", "train.warmup_steps=0",
                                             "train.micro_batch_size=2", "eval.every_steps=0", "data.val_fraction=0")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"engine {engine} on 2 rank(s)" in done.stderr
    assert ckpt.checkpoint_step(ckpt.complete_checkpoints(tmp_path / "run")[0]) == 3


def test_the_deepspeed_launcher_starts_the_configured_zero_stage(tmp_path):
    launcher = Path(sys.executable).with_name("deepspeed")
    done = subprocess.run(
        [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "lowbit.trainer", "train",
         str(TINY), *tiny_overrides(tmp_path / "run", "train.max_steps=3", "train.warmup_steps=0",
                                    "strategy.name=deepspeed", "strategy.deepspeed.stage=1", "train.micro_batch_size=2")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # PATH starts with the venv's bin (conftest.py)
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "engine deepspeed-zero1 on 2 rank(s)" in output
    assert (ckpt.complete_checkpoints(tmp_path / "run")[0] / "deepspeed").is_dir()
