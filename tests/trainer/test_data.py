"""Data: reading, packing and masking on hand-checkable examples, batching, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.losses import IGNORE_INDEX
from lowbit.trainer.byte_tokenizer import byte_tokenizer
from lowbit.trainer.config import DataConfig
from lowbit.trainer.data import StepBatches, build_examples, eval_batches, load_splits, split_validation
from lowbit.trainer.data.examples import Examples, pack_text, pad_examples
from lowbit.trainer.data.sources import read_all
from lowbit.trainer.errors import UserError

TOK = byte_tokenizer()


def data_cfg(files, **fields) -> DataConfig:
    return DataConfig(train_files=[str(f) for f in files], **fields)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_pack_text_by_hand():
    packed = pack_text([[1, 2, 3], [4, 5]], seq_len=3, eos_id=9)
    # stream 1 2 3 9 4 5 9 -> blocks [1 2 3] [9 4 5], the tail [9] is dropped
    assert packed.input_ids.tolist() == [[1, 2, 3], [9, 4, 5]]
    assert packed.labels.tolist() == packed.input_ids.tolist()
    assert packed.attention_mask.sum() == 6


def test_pack_text_too_short_is_an_error():
    with pytest.raises(UserError, match="fewer than one data.seq_len block"):
        pack_text([[1, 2]], seq_len=8, eos_id=0)


def test_pad_examples_masks_prompt_and_padding():
    rows = pad_examples([([1, 2], [3, 4]), ([5], [6])], seq_len=5, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 0], [5, 6, 0, 0, 0]]
    assert rows.labels.tolist() == [[-100, -100, 3, 4, -100], [-100, 6, -100, -100, -100]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]


def test_instruction_format_masks_prompt_tokens(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q: 2+2?", "response": " 4"}])
    examples = build_examples(read_all([str(path)], "k"), TOK, data_cfg([path], seq_len=16))
    prompt, response = ids("Q: 2+2?"), ids(" 4") + [TOK.eos_token_id]
    row_ids, row_labels = examples.input_ids[0].tolist(), examples.labels[0].tolist()
    assert row_ids[: len(prompt) + len(response)] == prompt + response
    assert row_labels == [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * (
        16 - len(prompt) - len(response)
    )


def test_chat_format_learns_only_the_last_assistant_turn(tmp_path):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": "ok"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    examples = build_examples(read_all([str(path)], "k"), TOK, data_cfg([path], seq_len=40))
    labels = [t for t in examples.labels[0].tolist() if t != IGNORE_INDEX]
    assert TOK.decode(labels) == "ok<|end|>"
    rendered = TOK.apply_chat_template(messages, tokenize=False)
    n = int(examples.attention_mask[0].sum())
    assert TOK.decode(examples.input_ids[0, :n].tolist()) == rendered


@pytest.mark.parametrize("policy", ["error", "truncate", "drop"])
def test_truncation_policies(tmp_path, policy):
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": "abc", "response": "defghij"}, {"prompt": "a", "response": "b"}]
    )
    cfg = data_cfg([path], seq_len=6, truncation=policy)
    if policy == "error":
        with pytest.raises(UserError, match=r"record 0: example is 11 tokens, longer than data.seq_len=6"):
            build_examples(read_all([str(path)], "k"), TOK, cfg)
        return
    examples = build_examples(read_all([str(path)], "k"), TOK, cfg)
    if policy == "drop":
        assert len(examples) == 1 and examples.labels[0].tolist()[1:3] == ids("b") + [TOK.eos_token_id]
    else:
        assert len(examples) == 2 and examples.input_ids[0].tolist() == ids("abcdef")


def test_input_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match=r"empty.txt is empty"):
        read_all([str(empty)], "data.train_files")
    with pytest.raises(UserError, match=r"data.train_files: '.*nothing\*.txt' matches no file"):
        read_all([str(tmp_path / "nothing*.txt")], "data.train_files")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        read_all([str(bad)], "data.train_files")
    fields = write_jsonl(tmp_path / "f.jsonl", [{"body": "x"}])
    with pytest.raises(UserError, match=r"fields \['body'\].*data.text_field"):
        build_examples(read_all([str(fields)], "k"), TOK, data_cfg([fields], seq_len=4))
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "abcdef"}, {"body": "x"}])
    with pytest.raises(UserError, match=r"m.jsonl: a record has no field 'text' \(data.text_field\)"):
        build_examples(read_all([str(mixed)], "k"), TOK, data_cfg([mixed], seq_len=4))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(
        UserError, match=r"latin1.txt is not UTF-8 text \(byte 0xe9 at offset 3\): convert it"
    ):
        read_all([str(latin1)], "data.train_files")
    for messages in ("hello there", [{"content": "no role"}], ["hi"]):
        chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
        with pytest.raises(UserError, match=r"chat.jsonl record 0: the messages field must be a list of"):
            build_examples(read_all([str(chat)], "k"), TOK, data_cfg([chat], seq_len=16, format="chat"))


def test_parquet_and_saved_dataset_read_like_jsonl(tmp_path):
    import datasets

    records = [{"text": f"document number {i} " * 5} for i in range(6)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    expected = build_examples(read_all([str(jsonl)], "k"), TOK, data_cfg([jsonl], seq_len=16)).input_ids
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        got = build_examples(read_all([str(source)], "k"), TOK, data_cfg([source], seq_len=16)).input_ids
        assert torch.equal(got, expected)


def numbered(count: int, seq_len: int = 4) -> Examples:
    rows = torch.arange(count).repeat_interleave(seq_len).view(count, seq_len)
    return Examples(rows, rows.clone(), torch.ones_like(rows))


def test_global_batch_is_the_same_whatever_the_number_of_ranks():
    data = numbered(37)

    def global_batch(world: int, micro: int, accum: int, step: int) -> list[int]:
        rows = []
        for rank in range(world):
            batches = StepBatches(data, micro, accum, world, rank, seed=3).micro_batches(step)
            rows += [int(r) for b in batches for r in b["input_ids"][:, 0]]
        return sorted(rows)

    for step in range(6):  # crosses epoch boundaries (37 examples, 8 per step)
        assert global_batch(1, 8, 1, step) == global_batch(2, 2, 2, step) == global_batch(4, 1, 2, step)


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    data = numbered(16)
    batches = StepBatches(data, micro_batch_size=4, grad_accum_steps=1, world_size=1, rank=0, seed=5)
    seen = [int(r) for step in range(4) for r in batches.micro_batches(step)[0]["input_ids"][:, 0]]
    assert sorted(seen) == list(range(16))
    fresh = StepBatches(data, 4, 1, 1, 0, seed=5)
    assert torch.equal(fresh.micro_batches(2)[0]["input_ids"], batches.micro_batches(2)[0]["input_ids"])
    other_seed = StepBatches(data, 4, 1, 1, 0, seed=6)
    assert not torch.equal(
        other_seed.micro_batches(0)[0]["input_ids"], batches.micro_batches(0)[0]["input_ids"]
    )


def test_eval_batches_split_ranks_without_overlap_and_pad_short_ranks_with_uncounted_rows():
    data = numbered(7)
    per_rank = [eval_batches(data, 2, 3, rank) for rank in range(3)]
    # every rank runs the same forwards (sharded engines gather weights collectively in each)
    assert [[len(b["input_ids"]) for b in batches] for batches in per_rank] == [[2, 1]] * 3
    counted = [
        int(row[0]) for batches in per_rank for b in batches
        for row, labels in zip(b["input_ids"], b["labels"]) if (labels != -100).any()
    ]  # fmt: skip
    assert sorted(counted) == list(range(7))
    assert (per_rank[1][-1]["labels"] == -100).all() and (per_rank[2][-1]["labels"] == -100).all()
    assert (data.labels != -100).any(dim=1).all()  # padding never touched the dataset itself


def test_validation_split_is_seeded_and_disjoint():
    data = numbered(20)
    train, val = split_validation(data, 0.25, seed=1)
    again_train, again_val = split_validation(data, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 15
    assert torch.equal(val.input_ids, again_val.input_ids)
    assert not set(val.input_ids[:, 0].tolist()) & set(train.input_ids[:, 0].tolist())
    with pytest.raises(UserError, match="too few to hold out"):
        split_validation(numbered(1), 0.5, seed=0)


def test_load_splits_uses_val_files_and_caps(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("training text " * 50)
    val = tmp_path / "val.txt"
    val.write_text("held out text " * 50)
    train_ex, val_ex = load_splits(
        data_cfg([train], val_files=[str(val)], seq_len=8, max_val_examples=3), TOK, 0
    )
    assert len(val_ex) == 3
    assert TOK.decode(val_ex.input_ids[0].tolist()) == "held out"
    assert len(train_ex) == len("training text " * 50) // 8
