"""Faults under every engine: preemption checkpoints, killed ranks, restarts, several nodes, other
world sizes — and eval/export straight from sharded checkpoints."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.config import load_config
from lowbit.trainer.model import load_model
from tests.conftest import ROOT, TINY, run_cli
from tests.distributed.conftest import losses, torchrun
from tests.distributed.engine_runner import scenario_overrides

pytestmark = pytest.mark.distributed
HOOKS = ROOT / "tests" / "distributed" / "fault_hooks.py"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The student's weights in the run's newest checkpoint, read into a plain model (any engine)."""
    checkpoint = ckpt.complete_checkpoints(run_dir)[0]
    cfg = load_config(checkpoint / "config.yaml")
    model = load_model(cfg.model, None, seed=0, vocab_needed=262)
    ckpt.load_weights(checkpoint, model)
    return model.state_dict()


def signal_hooks(*hooks: str) -> list[str]:
    return [f"imports=[{HOOKS}]", f"hooks=[{', '.join(hooks)}]"]


@pytest.mark.parametrize(
    ("engine", "stop"), [("ddp", "USR1"), ("fsdp2", "TERM"), ("zero3", "INT")]
)  # each checkpoint writer (ZeRO-1/2 share zero3's), each stop signal
def test_a_stop_signal_checkpoints_and_a_killed_rank_restarts_to_the_uninterrupted_weights(
    engine_runs, engine, stop, tmp_path
):
    """One torchrun job with --max-restarts 2: SIGTERM (SLURM's SIGUSR1, Ctrl-C's SIGINT) to rank 0
    after step 2 (a checkpoint of step 2, exit 128 + the signal), torchrun restarts it; SIGKILL to
    rank 1 after step 4, torchrun restarts it again from checkpoint 3; the job ends at step 6 with
    the weights (bit for bit) and per-step losses of the uninterrupted run."""
    overrides = scenario_overrides(tmp_path, engine, "plain", 2)
    hooks = signal_hooks(
        f"{{kind: signal_at_step, step: 2, signal: {stop}, rank: 0, attempt: 0}}",
        "{kind: signal_at_step, step: 4, signal: KILL, rank: 1, attempt: 1}",
    )
    done = torchrun("lowbit.trainer", "train", str(TINY), *overrides, *hooks, extra=("--max-restarts=2",))
    assert done.returncode == 0, done.stderr[-6000:]
    log = done.stderr
    assert f"stopped by SIG{stop} after step 2, with a checkpoint of that step" in log
    assert "checkpoint-000002 at step 2" in log and "checkpoint-000003 at step 3" in log  # both resumes
    run_dir, reference = tmp_path / engine / "plain", engine_runs / engine / "plain"
    assert losses(run_dir) == losses(reference)
    resumed, uninterrupted = final_weights(run_dir), final_weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def test_sigterm_to_the_launcher_reaches_every_rank_which_checkpoint_the_current_step(tmp_path):
    """A scheduler's preemption: SIGTERM to torchrun, which passes it to its workers."""
    overrides = scenario_overrides(tmp_path, "fsdp2", "plain", 2)
    slow = signal_hooks("{kind: sleep_each_step, seconds: 0.5}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "lowbit.trainer", "train", str(TINY), *overrides, *slow, "train.max_steps=60"]  # fmt: skip
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    metrics = tmp_path / "fsdp2" / "plain" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (not metrics.exists() or len(losses(metrics.parent)) < 4) and time.monotonic() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0, stderr[-4000:]
    steps_done = len(losses(metrics.parent))
    newest = ckpt.complete_checkpoints(metrics.parent)[0]
    assert 4 <= ckpt.checkpoint_step(newest) == steps_done < 60, stderr[-4000:]
    assert ckpt.verify(newest) is None and ckpt.read_state(newest).layout == "dcp"


def test_a_killed_rank_ends_the_whole_job_promptly(tmp_path):
    """torchrun sees the dead worker and stops the other (SIGTERM, then SIGKILL after its grace);
    strategy.timeout_s bounds what a surviving rank's collectives would wait otherwise."""
    overrides = scenario_overrides(tmp_path, "fsdp2", "plain", 2)
    hooks = signal_hooks("{kind: signal_at_step, step: 2, signal: KILL, rank: 1}")
    started = time.monotonic()
    done = torchrun("lowbit.trainer", "train", str(TINY), *overrides, *hooks, "strategy.timeout_s=30")
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "Signals.SIGKILL" in done.stderr or "SIGKILL" in done.stderr, done.stderr[-3000:]
    assert elapsed < 90, elapsed  # startup (~15 s) + the step + at most the 30 s shutdown grace


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_train_checkpoint_and_resume_by_themselves_after_a_rank_dies(tmp_path):
    """Two `torchrun --nnodes 2 --nproc_per_node 1` on 127.0.0.1 with a c10d rendezvous: the rank
    on the second node dies after step 3; both agents re-rendezvous and resume from checkpoint 2."""
    overrides = scenario_overrides(tmp_path, "fsdp2", "plain", 2)
    hooks = signal_hooks("{kind: signal_at_step, step: 3, signal: KILL, rank: 1}")
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lowbit-test",
            "--max-restarts=1", "-m", "lowbit.trainer", "train", str(TINY), *overrides, *hooks,
            "train.max_steps=5", "checkpoint.every_steps=2", "eval.every_steps=0"]  # fmt: skip
    # as launch/torchrun_multi_node.sh starts it: a fresh store per rendezvous round
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    nodes = [subprocess.Popen(node, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    outputs = [job.communicate(timeout=600) for job in nodes]
    assert [job.returncode for job in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    log = outputs[0][1] + outputs[1][1]
    assert "checkpoint-000002 at step 2" in log and "on 2 rank(s)" in log
    run_dir = tmp_path / "fsdp2" / "plain"
    assert ckpt.checkpoint_step(ckpt.complete_checkpoints(run_dir)[0]) == 5
    assert len(losses(run_dir)) == 5


@pytest.fixture(scope="module")
def single_continued(engine_runs, tmp_path_factory) -> list[float]:
    """The 1-process run's own checkpoint of step 6, continued to step 9 in one process."""
    return continue_in_one_process(engine_runs, "single", tmp_path_factory.mktemp("single"))


def continue_in_one_process(engine_runs, engine: str, tmp_path) -> list[float]:
    """`lowbit train` in one process on a copy of ENGINE's run, from its checkpoint of step 6 to
    step 9 (a process of its own: DeepSpeed keeps its process groups for the life of a process)."""
    run_dir = tmp_path / engine
    shutil.copytree(engine_runs / engine / "plain", run_dir)
    overrides = scenario_overrides(tmp_path, engine, "plain", 1)
    done = run_cli("train", str(TINY), *overrides, f"run.output_dir={run_dir}", "train.max_steps=9")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "checkpoint-000006 at step 6" in done.stderr and "on 1 rank(s)" in done.stderr
    assert not list((run_dir / "checkpoints").glob(".universal-*"))  # the conversion is removed
    return losses(run_dir)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_a_sharded_checkpoint_of_two_ranks_resumes_in_one_process(
    engine_runs, single_continued, engine, tmp_path
):
    """FSDP2: DCP reshards on load; DeepSpeed: its universal checkpoint (converted on the way in)
    repartitions weights and Adam moments. The 2-rank checkpoint of step 6 continues in one
    process as the 1-process run's own checkpoint of step 6 continues (same global batch and
    data; 1e-5, the engines' equivalence tolerance). Before lowbit repaired DeepSpeed's ZeRO-3
    universal load (a shared Adam step, group 0's weight decay everywhere) step 9 differed by 1.3e-3."""
    continued = continue_in_one_process(engine_runs, engine, tmp_path)
    assert len(continued) == len(single_continued) == 9
    assert max(abs(a - b) for a, b in zip(continued, single_continued)) < 1e-5


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_export_and_eval_read_a_sharded_checkpoint_as_they_read_its_consolidated_weights(
    engine_runs, engine, tmp_path
):
    from lowbit.trainer.evaluate_cli import evaluate_target
    from lowbit.trainer.export import export

    run_dir = engine_runs / engine / "qat_w4a8"
    sharded = ckpt.complete_checkpoints(run_dir)[0]
    # The weights the live engine gathered at the end of training (not read from the checkpoint),
    # as a single/ddp (safetensors) checkpoint of the same step and config.
    consolidated = consolidate(sharded, run_dir / "consolidated.safetensors", tmp_path / "consolidated")
    outputs = []
    for source in (sharded, consolidated):
        out = tmp_path / f"export-{source.name}-{len(outputs)}"
        export(source, "compressed-tensors", out)
        outputs.append(out)
    names = sorted(p.name for p in outputs[0].iterdir())
    assert names == sorted(p.name for p in outputs[1].iterdir()) and "model.safetensors" in names
    assert all(filecmp.cmp(outputs[0] / n, outputs[1] / n, shallow=False) for n in names)
    rows = [evaluate_target(source, []) for source in (sharded, consolidated)]
    assert rows[0][-1]["val_loss"] == rows[1][-1]["val_loss"]


def consolidate(checkpoint: Path, weights: Path, out: Path) -> Path:
    """A safetensors-layout checkpoint of ``checkpoint``'s step and config holding ``weights``."""
    from safetensors.torch import load_file, save_model

    from lowbit.trainer.transforms import apply_transforms

    cfg = load_config(checkpoint / "config.yaml")
    model = load_model(cfg.model, None, seed=0, vocab_needed=262)
    apply_transforms(model, cfg, announce=False)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    assert not unexpected and all(name == "lm_head.weight" for name in missing)  # tied to the embeddings
    staging = ckpt.staging_dir(out, ckpt.checkpoint_step(checkpoint))
    staging.mkdir(parents=True)
    save_model(model, str(staging / "model.safetensors"))
    state = {
        **json.loads((checkpoint / ckpt.STATE_FILE).read_text()),
        "layout": "safetensors",
        "engine": "single",
    }
    (staging / ckpt.STATE_FILE).write_text(json.dumps(state))
    shutil.copy(checkpoint / "config.yaml", staging / "config.yaml")
    return ckpt.finalize(staging, keep_last=1)
