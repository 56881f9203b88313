"""Offline teacher: `lowbit teacher-cache`, training from the cache, stale-cache detection."""

from __future__ import annotations

import json

import pytest

from lowbit.trainer.errors import UserError
from lowbit.trainer.loop import Trainer, train
from lowbit.trainer.teacher_cache import build_cache
from tests.conftest import TINY, run_cli, tiny_overrides

TOPK = "loss=[{kind: ce, weight: 0.5}, {kind: kd_topk, weight: 0.5, k: 8, temperature: 2.0}]"


def losses(run_dir):
    return [
        json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]


def test_training_from_the_cache_matches_the_live_teacher(tiny_config, pretrained_tiny, tmp_path):
    cache = tmp_path / "cache"
    common = (
        TOPK,
        f"teacher.path={pretrained_tiny}",
        "train.max_steps=4",
        "train.warmup_steps=0",
        "eval.every_steps=0",
    )
    done = run_cli(
        "teacher-cache", str(TINY), *tiny_overrides(tmp_path / "c", *common, f"teacher.cache={cache}")
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads((cache / "meta.json").read_text())
    # k=8: fp16 values (2 B) + int16 ids (2 B) per entry, + an fp32 logsumexp per token
    assert meta["summary"]["bytes_per_token"] == pytest.approx(8 * 4 + 4)
    assert f"{meta['summary']['bytes_per_token']:.1f} bytes/token" in done.stdout
    live = train(tiny_config(*common, run_dir=tmp_path / "live"))
    trainer = Trainer(tiny_config(*common, f"teacher.cache={cache}", run_dir=tmp_path / "cached"))
    assert trainer.parts.teacher is None and trainer.parts.teacher_cache is not None
    cached = trainer.fit()
    trainer.close()
    # fp16 storage of the teacher's logits is the only difference
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "live"), rel=2e-3)
    assert cached["eval"]["val_loss"] == pytest.approx(live["eval"]["val_loss"], rel=2e-3)


def test_stale_or_mismatched_cache_is_refused(tiny_config, pretrained_tiny, tmp_path):
    cache = tmp_path / "cache"
    common = (TOPK, f"teacher.path={pretrained_tiny}", f"teacher.cache={cache}", "train.warmup_steps=0")
    summary = build_cache(tiny_config(*common, run_dir=tmp_path / "build"))
    assert summary["tokens"] > 0
    with pytest.raises(
        UserError,
        match=r"stale or belongs to another run \(data_sha256: .*examples: .*seq_len: cache 128, run 64",
    ):
        Trainer(tiny_config(*common, "data.seq_len=64", run_dir=tmp_path / "a"))
    with pytest.raises(UserError, match=r"k: cache 8, run 16"):
        Trainer(tiny_config(*[c.replace("k: 8", "k: 16") for c in common], run_dir=tmp_path / "b"))
    with pytest.raises(
        UserError, match=r"kd_kl need the teacher's full outputs, but teacher.cache holds only"
    ):
        Trainer(
            tiny_config(
                *common,
                "loss=[{kind: kd_topk, k: 8, temperature: 2.0}, {kind: kd_kl}]",
                run_dir=tmp_path / "c",
            )
        )
    with pytest.raises(UserError, match="has no meta.json"):
        Trainer(tiny_config(*common[:2], f"teacher.cache={tmp_path}", *common[3:], run_dir=tmp_path / "d"))
