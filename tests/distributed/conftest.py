"""One launch of the engine runner serves every engine × method test (starting processes is
what costs; see ``engine_runner``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.distributed.engine_runner import METHODS

ENGINE_NAMES = ["ddp", "fsdp2", "fsdp2_keep", "zero1", "zero2", "zero3"]
METHOD_NAMES = ["plain", "masked", "qat_w4a8", "qat_lsq_int3", "kd", "kd_relation", "qad"]
# (engine, method, the 1-process method it must match)
EXTRA_RUNS = [
    ("hsdp", "plain", "plain"),
    ("fsdp2_checkpointing", "plain", "plain"),
    ("zero3_offload", "plain", "plain"),
    ("fsdp2", "kd_sharded_teacher", "kd"),
    ("zero3", "kd_sharded_teacher", "kd"),
    ("ddp", "kd_topk_cache", "kd_topk_cache"),
    ("fsdp2", "kd_topk_cache", "kd_topk_cache"),
    ("zero3", "kd_topk_cache", "kd_topk_cache"),
]
PROBES = ["fsdp2", "fsdp2_keep", "zero3"]  # engines whose forwards are checked against fresh weights
assert set(METHOD_NAMES) <= set(METHODS)


def torchrun(*args: str, nproc: int = 2, timeout: float = 900, extra: tuple[str, ...] = ()):
    """``torchrun --standalone --nproc_per_node N [extra] -m ARGS`` from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
         "-m", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.fixture(scope="session")
def engine_runs(tmp_path_factory):
    """Every engine × method trained in 2 processes, and every method in 1 (the reference)."""
    out = tmp_path_factory.mktemp("engines")
    pairs = [f"{engine}:{method}" for engine in ENGINE_NAMES for method in METHOD_NAMES]
    pairs += [f"{engine}:{method}" for engine, method, _ in EXTRA_RUNS] + [f"{e}:qat_probe" for e in PROBES]
    references = [f"single:{m}" for m in METHOD_NAMES] + ["single:kd_topk_cache"]
    # the 1-process run first: it builds the teacher cache both read
    one = torchrun("tests.distributed.engine_runner", "equivalence", str(out), *references, nproc=1)
    assert one.returncode == 0, one.stderr[-6000:]
    two = torchrun("tests.distributed.engine_runner", "equivalence", str(out), *pairs)
    assert two.returncode == 0, two.stderr[-6000:]
    return out


def losses(run_dir) -> list[float]:
    """Per-step training losses from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]
