"""Shared fixtures: the tiny recipe with overrides, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
# Tokenized data of this session's test files, not the user's cache (subprocesses inherit it).
os.environ.setdefault("LOWBIT_DATA_CACHE", tempfile.mkdtemp(prefix="lowbit-test-data-"))
# The environment's own tools first (as in an activated venv): DeepSpeed JIT-builds its C++ ops
# with whichever `ninja` PATH finds, and two ninjas (the venv's, the system's) record different
# command hashes, so alternating them rebuilds every op (~45 s each). setup_env.sh prebuilds the
# ops with this PATH too.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_CORPUS = ROOT / "configs" / "data" / "tiny_corpus.txt"


def tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    """Overrides that make the tiny recipe fast, quiet and independent of the working directory."""
    return [
        f"run.output_dir={run_dir}",
        f"data.train_files=[{TINY_CORPUS}]",
        "log.progress=none",
        "eval.at_start=false",
        *extra,
    ]


@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(*overrides)`` -> RunConfig of the tiny recipe writing under tmp_path/run."""
    from lowbit.trainer.config import load_config

    def make(*extra: str, run_dir: Path | None = None):
        return load_config(TINY, tiny_overrides(run_dir or tmp_path / "run", *extra))

    return make


def run_cli(
    *args: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m lowbit.trainer ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "lowbit.trainer", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly where CUDA is absent (CI never has a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory):
    """A tiny Llama trained for 40 steps and saved as an HF directory with the byte tokenizer."""
    from lowbit.trainer.byte_tokenizer import byte_tokenizer
    from lowbit.trainer.config import load_config
    from lowbit.trainer.loop import Trainer

    root = tmp_path_factory.mktemp("pretrained")
    cfg = load_config(TINY, tiny_overrides(root / "run", "train.max_steps=40", "train.warmup_steps=0",
                                           "eval.every_steps=0", "checkpoint.save_final=false"))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    model_dir = root / "model"
    trainer.strategy.unwrap(trainer.parts.model).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    trainer.close()
    return model_dir
