"""2-process gloo DDP (launched by `lowbit train --nproc-per-node 2`) equals 1 process, step for step."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, run_cli, tiny_overrides

pytestmark = pytest.mark.distributed


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def variable_length_chat(path):
    """Examples with very different numbers of target tokens, so per-rank means would be wrong."""
    rows = [
        {"prompt": f"question {i}: " + "x" * (i % 7), "response": "answer " * (1 + (i * 5) % 9)}
        for i in range(64)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("data", ["packed", "masked", "qat", "kd", "hidden", "fused"])
def test_two_process_ddp_matches_single_process(tmp_path, data, request):
    extra = ["train.max_steps=6", "train.warmup_steps=0", "eval.every_steps=3", "checkpoint.every_steps=3"]
    if data == "masked":
        extra += [f"data.train_files=[{variable_length_chat(tmp_path / 'sft.jsonl')}]", "data.seq_len=96"]
    if data == "qat":  # learned scales and per-token activation quant under DDP
        rules = '{match: "*", weight: {dtype: int4, granularity: group, group_size: 32, learn_scale: true}, activation: w4a8}'
        extra += [f"quant={{rules: [{rules}]}}"]
    if data == "hidden":  # a learned projection outside the DDP-wrapped model: its grads are averaged by hand
        from tests.trainer.test_distill import HIDDEN, WIDE_TEACHER

        extra += [HIDDEN, WIDE_TEACHER, "teacher.tokenizer=byte"]
    if data in ("kd", "fused"):  # a frozen teacher on every rank, CE + forward KL
        teacher = request.getfixturevalue("pretrained_tiny")
        extra += [
            f"teacher.path={teacher}",
            "loss=[{kind: ce, weight: 0.5}, {kind: kd_kl, weight: 0.5, temperature: 2.0}]",
        ]
    if data == "fused":  # logits built chunk by chunk from hidden states; the head's grads reduced by DDP
        extra += ["train.fused_head_chunk=64"]
    single = run_cli(
        "train",
        str(TINY),
        *tiny_overrides(tmp_path / "one", *extra, "train.micro_batch_size=4", "train.grad_accum_steps=2"),
    )
    assert single.returncode == 0, single.stderr
    double = run_cli(
        "train",
        "--nproc-per-node",
        "2",
        str(TINY),
        *tiny_overrides(tmp_path / "two", *extra, "train.micro_batch_size=2", "train.grad_accum_steps=2"),
    )
    assert double.returncode == 0, double.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    # fp32 gradient sums in a different order can move a weight across a rounding boundary of the
    # quantization grid, so QAT gets a looser (still tight) bound than float training.
    tolerance = 1e-4 if data == "qat" else 1e-5
    assert max(abs(a - b) for a, b in zip(one, two)) < tolerance, (one, two)
    assert one[-1] < one[0]


def test_launcher_reports_a_user_error_with_exit_code_2(tmp_path):
    done = run_cli("train", "--nproc-per-node", "2", str(TINY), *tiny_overrides(tmp_path, "train.lrr=1"))
    assert done.returncode == 2
    assert done.stderr.count("Did you mean: 'lr'") == 1
