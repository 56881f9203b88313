"""Offline teacher: store its top-k logits for the training set once, train without running it.

``lowbit teacher-cache CONFIG`` runs the configured teacher over the training examples and writes
``teacher.cache``/ ``topk.safetensors`` (values fp16, token ids int16 when the vocabulary fits,
else int32, and logsumexp(z / T) fp32 for the tail term) plus ``meta.json``, a fingerprint of
what the cache is valid for: the exact training token ids, the tokenizer's vocabulary, k and T.
Training with ``teacher.cache`` set compares the fingerprint and refuses a stale cache, naming
what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowbit.losses.kd_terms import teacher_topk
from lowbit.trainer.config import RunConfig
from lowbit.trainer.data import Examples, RowSet, model_inputs
from lowbit.trainer.errors import UserError

TENSORS, META = "topk.safetensors", "meta.json"
INT16_OFFSET = 32768  # token ids 0..65535 stored as int16 (id - 32768)


def topk_settings(cfg: RunConfig) -> tuple[int, float]:
    """(k, temperature) of the run's ``kd_topk`` term: what the cache must hold."""
    terms = [entry for entry in cfg.loss if entry.get("kind") == "kd_topk"]
    if not terms:
        raise UserError("a teacher cache stores top-k logits for a `kd_topk` loss term; add one to `loss`")
    return int(terms[0].get("k", 64)), float(terms[0].get("temperature", 1.0))


def fingerprint(train: Examples | RowSet, tokenizer, k: int, temperature: float) -> dict[str, Any]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "data_sha256": train.digest(),
        "examples": len(train),
        "seq_len": train.seq_len,
        "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "k": k,
        "temperature": temperature,
    }


@dataclass
class TeacherCache:
    values: torch.Tensor  # [examples, seq_len, k] fp16
    indices: torch.Tensor  # [examples, seq_len, k] int16 (offset) or int32
    logsumexp: torch.Tensor  # [examples, seq_len] fp32

    def lookup(
        self, index: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        indices = self.indices[index].long()
        if self.indices.dtype == torch.int16:
            indices = indices + INT16_OFFSET
        return (self.values[index].float().to(device), indices.to(device), self.logsumexp[index].to(device))


def load_cache(path: Path, expected: dict[str, Any]) -> TeacherCache:
    """The cache at ``path`` if its fingerprint matches ``expected``, else a clear error."""
    meta_file = path / META
    if not meta_file.is_file():
        raise UserError(f"teacher.cache {path} has no {META}: build it with `lowbit teacher-cache CONFIG`")
    stored = json.loads(meta_file.read_text())["fingerprint"]
    changed = [key for key in expected if stored.get(key) != expected[key]]
    if changed:
        details = "; ".join(f"{key}: cache {stored.get(key)!r}, run {expected[key]!r}" for key in changed)
        raise UserError(
            f"teacher.cache {path} is stale or belongs to another run ({details}); "
            "rebuild it with `lowbit teacher-cache CONFIG`"
        )
    tensors = load_file(str(path / TENSORS))
    return TeacherCache(tensors["values"], tensors["indices"], tensors["logsumexp"])


@torch.no_grad()
def build_cache(cfg: RunConfig) -> dict[str, Any]:
    """Run the teacher over the training examples and write the cache; return a summary."""
    from lowbit.trainer.build import build_model_and_data, seed_everything
    from lowbit.trainer.evaluate import autocast
    from lowbit.trainer.strategies import inference_strategy

    if cfg.teacher is None or cfg.teacher.cache is None:
        raise UserError("set teacher.path (the model to cache) and teacher.cache (where to write it)")
    k, temperature = topk_settings(cfg)
    strategy = inference_strategy(cfg.strategy, cfg.train)
    try:
        seed_everything(cfg.train.seed)
        built = build_model_and_data(cfg, strategy, with_teacher=True, use_cache=False)
        assert built.teacher is not None
        started = time.perf_counter()
        batch_size = cfg.eval.batch_size or cfg.train.micro_batch_size
        values, indices, lse = [], [], []
        train = built.data.rows
        assert train is not None  # data.streaming with teacher.cache is refused with the config
        for start in range(0, len(train), batch_size):
            batch = train.batch(list(range(start, min(start + batch_size, len(train)))))
            batch = {key: value.to(strategy.device) for key, value in batch.items()}
            with autocast(strategy.device, cfg.train.precision):
                logits = built.teacher.forward(**model_inputs(batch)).logits
            if built.teacher.shared_vocab is not None:
                logits = logits[..., : built.teacher.shared_vocab]
            top_values, top_indices, top_lse = teacher_topk(logits, k, temperature)
            values.append(top_values.half().cpu())
            indices.append(top_indices.cpu())
            lse.append(top_lse.float().cpu())
        all_indices = torch.cat(indices)
        small_vocab = int(all_indices.max()) < 2 * INT16_OFFSET
        tensors = {
            "values": torch.cat(values).contiguous(),
            "indices": (
                (all_indices - INT16_OFFSET).to(torch.int16) if small_vocab else all_indices.int()
            ).contiguous(),
            "logsumexp": torch.cat(lse).contiguous(),
        }
        target = Path(cfg.teacher.cache)
        staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(tensors, str(staging / TENSORS))
        tokens = len(train) * train.seq_len
        bytes_total = sum(t.numel() * t.element_size() for t in tensors.values())
        summary = {"tokens": tokens, "bytes": bytes_total, "bytes_per_token": bytes_total / tokens,
                   "seconds": time.perf_counter() - started}  # fmt: skip
        meta = {"fingerprint": fingerprint(train, built.tokenizer, k, temperature), "summary": summary}
        (staging / META).write_text(json.dumps(meta, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:  # a failure half-way still releases the process group
        strategy.teardown()
    return summary
