"""Turn records into fixed-length training examples: packed text, or masked instruction data.

Every example is a row of ``input_ids``, ``labels`` (``-100`` where no loss is taken: prompts,
padding) and ``attention_mask``, all of length ``seq_len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lowbit.losses import IGNORE_INDEX
from lowbit.trainer.config import DataConfig
from lowbit.trainer.errors import UserError


@dataclass
class Examples:
    """A tokenized split: three ``[num_examples, seq_len]`` int64 tensors."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, indices: Tensor | list[int]) -> Examples:
        index = torch.as_tensor(indices, dtype=torch.long)
        return Examples(self.input_ids[index], self.labels[index], self.attention_mask[index])

    def batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        """Model inputs for ``indices``, plus ``index`` (which examples: for an offline teacher cache)."""
        chosen = self.select(indices)
        return {
            "input_ids": chosen.input_ids,
            "labels": chosen.labels,
            "attention_mask": chosen.attention_mask,
            "index": torch.as_tensor(indices, dtype=torch.long),
        }


def detect_format(record: dict, cfg: DataConfig, source: Path) -> str:
    """The data format for ``data.format: auto``, from the first record's fields."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in record:
        return "chat"
    if cfg.prompt_field in record and cfg.response_field in record:
        return "instruction"
    if cfg.text_field in record:
        return "text"
    raise UserError(
        f"{source}: records have fields {sorted(record)}, none of which is data.text_field "
        f"({cfg.text_field!r}), data.prompt_field+data.response_field or data.messages_field; "
        "set the matching data.*_field"
    )


def _field(record: dict, name: str, key: str, source: Path) -> object:
    if name not in record:
        raise UserError(
            f"{source}: a record has no field {name!r} (data.{key}); its fields: {sorted(record)}"
        )
    return record[name]


def pack_text(token_lists: list[list[int]], seq_len: int, eos_id: int) -> Examples:
    """Concatenate documents, each followed by EOS, and cut into full ``seq_len`` blocks.

    The tail that does not fill a block is dropped. Every token is a target (labels = inputs).
    """
    stream = [token for tokens in token_lists for token in (*tokens, eos_id)]
    num_blocks = len(stream) // seq_len
    if num_blocks == 0:
        raise UserError(
            f"the text holds {len(stream)} tokens, fewer than one data.seq_len block ({seq_len}); "
            "add data or lower data.seq_len"
        )
    ids = torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)
    return Examples(ids, ids.clone(), torch.ones_like(ids))


def _fit(
    prompt: list[int], response: list[int], cfg: DataConfig, where: str
) -> tuple[list[int], list[int]] | None:
    """Apply the truncation policy to one (prompt, response); None means drop the example."""
    length = len(prompt) + len(response)
    if length <= cfg.seq_len:
        return prompt, response
    if cfg.truncation == "drop":
        return None
    if cfg.truncation == "truncate":
        keep = cfg.seq_len - len(prompt)
        if keep < 1:
            return None  # nothing of the response would remain to learn from
        return prompt, response[:keep]
    raise UserError(
        f"{where}: example is {length} tokens, longer than data.seq_len={cfg.seq_len}; "
        "set data.truncation to truncate or drop, or raise data.seq_len"
    )


def pad_examples(pairs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Examples:
    """Rows of prompt+response, right-padded; labels are -100 on prompt and padding tokens."""
    count = len(pairs)
    ids = torch.full((count, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((count, seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((count, seq_len), dtype=torch.long)
    for row, (prompt, response) in enumerate(pairs):
        tokens = prompt + response
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, len(prompt) : len(tokens)] = torch.tensor(response)
        mask[row, : len(tokens)] = 1
    return Examples(ids, labels, mask)


def _as_ids(output) -> list[int]:
    """``apply_chat_template`` returns a list or, in newer transformers, an encoding dict."""
    return list(output["input_ids"] if isinstance(output, dict) or hasattr(output, "keys") else output)


def chat_segments(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """Split a rendered conversation into (context tokens, assistant tokens) via prefix renders.

    Only the *last* assistant turn is a target; earlier turns are context. Rendering the history
    with ``add_generation_prompt`` gives the exact prefix the model sees before answering.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise UserError(
            f'{where}: the messages field must be a list of {{"role": ..., "content": ...}} objects, got '
            f"{type(messages).__name__} {str(messages)[:60]!r}"
        )
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: a conversation has no assistant message to learn from")
    render = tokenizer.apply_chat_template
    prefix = _as_ids(render(messages[:last], add_generation_prompt=True, tokenize=True))
    full = _as_ids(render(messages[: last + 1], tokenize=True))
    if full[: len(prefix)] != prefix:
        raise UserError(f"{where}: the tokenizer's chat template does not render history as a prefix")
    return prefix, full[len(prefix) :]


def build_examples(records: list[tuple[Path, dict]], tokenizer, cfg: DataConfig) -> Examples:
    """Tokenize records into examples of ``cfg.seq_len`` tokens in the configured format."""
    source, first = records[0]
    fmt = detect_format(first, cfg, source)
    if fmt == "text":
        texts = [str(_field(record, cfg.text_field, "text_field", path)) for path, record in records]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return pack_text(encoded, cfg.seq_len, tokenizer.eos_token_id)
    pairs: list[tuple[list[int], list[int]]] = []
    for number, (path, record) in enumerate(records):
        where = f"{path} record {number}"
        if fmt == "chat":
            messages = _field(record, cfg.messages_field, "messages_field", path)
            prompt, response = chat_segments(tokenizer, messages, where)  # type: ignore[arg-type]
            # The template already closes the turn (e.g. <|im_end|>): no extra EOS.
        else:
            prompt_text = str(_field(record, cfg.prompt_field, "prompt_field", path))
            response_text = str(_field(record, cfg.response_field, "response_field", path))
            prompt = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
            response = [
                *tokenizer(response_text, add_special_tokens=False)["input_ids"],
                tokenizer.eos_token_id,
            ]
        fitted = _fit(list(prompt), list(response), cfg, where)
        if fitted is not None:
            pairs.append(fitted)
    if not pairs:
        raise UserError(f"every example was longer than data.seq_len={cfg.seq_len} and dropped")
    return pad_examples(pairs, cfg.seq_len, tokenizer.pad_token_id)


def split_validation(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Hold out ``fraction`` of the examples (at least one) by a seeded permutation."""
    count = len(examples)
    num_val = max(1, round(count * fraction)) if fraction > 0 else 0
    if num_val >= count:
        raise UserError(
            f"only {count} example(s): too few to hold out a validation split; "
            "add data, lower data.seq_len, or give data.val_files"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return examples.select(order[num_val:].sort().values), examples.select(order[:num_val].sort().values)
