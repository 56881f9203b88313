"""Data: reading, tokenizing, packing and masking on hand-checkable examples, batching, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.losses import IGNORE_INDEX
from lowbit.trainer.byte_tokenizer import byte_tokenizer
from lowbit.trainer.config import DataConfig
from lowbit.trainer.data import StepBatches, eval_batches, load_data, split_validation
from lowbit.trainer.data import sources as sources_module
from lowbit.trainer.data.examples import Examples
from lowbit.trainer.errors import UserError
from tests.conftest import TINY_CORPUS

TOK = byte_tokenizer()
EOS = TOK.eos_token_id


def data_cfg(files, tmp_path, **fields) -> DataConfig:
    fields.setdefault("val_fraction", 0.0)
    return DataConfig(train_files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), **fields)


def rows_of(files, tmp_path, tokenizer=TOK, **fields):
    return load_data(data_cfg(files, tmp_path, **fields), tokenizer, seed=0).rows


def all_rows(rows) -> dict[str, torch.Tensor]:
    return rows.batch(list(range(len(rows))))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ids(text: str, tokenizer=TOK) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bpe_tokenizer():
    """A byte-level BPE with GPT-2's pre-tokenizer regex and real merges, trained in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TINY_CORPUS.read_text()[:40000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def test_text_rows_are_the_whole_files_tokens_in_blocks_even_when_read_in_pieces(tmp_path, monkeypatch):
    """A .txt is tokenized in line-aligned pieces; with a real BPE the tokens equal the whole
    file's (the cut is a pre-tokenizer boundary), EOS ends each file, the tail is dropped."""
    tokenizer = bpe_tokenizer()
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    text = TINY_CORPUS.read_text()[:30000]
    first.write_text(text)
    second.write_text("Short second document.\n")
    monkeypatch.setattr(sources_module, "TEXT_PIECE_BYTES", 500)  # ~60 pieces
    rows = rows_of([first, second], tmp_path, tokenizer, seq_len=32)
    eos = tokenizer.eos_token_id
    stream = ids(text, tokenizer) + [eos] + ids("Short second document.\n", tokenizer) + [eos]
    count = len(stream) // 32
    expected = torch.tensor(stream[: count * 32]).view(count, 32)
    got = all_rows(rows)
    assert torch.equal(got["input_ids"], expected)
    assert torch.equal(got["labels"], expected) and bool(got["attention_mask"].all())
    assert "position_ids" not in got


def test_text_shorter_than_a_block_is_an_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(UserError, match=r"fewer tokens than one data.seq_len block \(64\)"):
        rows_of([path], tmp_path, seq_len=64)


def test_instruction_format_masks_prompt_tokens(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q: 2+2?", "response": " 4"}])
    batch = all_rows(rows_of([path], tmp_path, seq_len=16))
    prompt, response = ids("Q: 2+2?"), ids(" 4") + [EOS]
    assert batch["input_ids"][0].tolist()[: len(prompt) + len(response)] == prompt + response
    pad = [IGNORE_INDEX] * (16 - len(prompt) - len(response))
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt) + response + pad
    assert batch["attention_mask"][0].tolist() == [1] * (len(prompt) + len(response)) + [0] * len(pad)


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok?"},
    {"role": "tool", "content": "t"},
    {"role": "assistant", "content": [{"type": "text", "text": "o"}, {"type": "text", "text": "k"}]},
]


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant", "all"])
def test_multi_turn_chat_labels_match_a_hand_built_expectation(tmp_path, train_on):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    batch = all_rows(rows_of([path], tmp_path, seq_len=64, train_on=train_on))
    # The byte template: <|user|> for system/user/tool, <|assistant|> for the assistant; <|end|> closes.
    user, assistant, end = (TOK.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    pieces = [
        ([user] + ids("be brief") + [end], False), ([user] + ids("hi") + [end], False),
        ([assistant], False), (ids("yo") + [end], True),
        ([user] + ids("ok?") + [end], False), ([user] + ids("t") + [end], False),
        ([assistant], False), (ids("ok") + [end], True),
    ]  # fmt: skip
    tokens = [t for piece, _ in pieces for t in piece]
    turn = 0
    expected = []
    for piece, is_answer in pieces:
        turn += is_answer
        target = train_on == "all" or (is_answer and (train_on == "all_assistant" or turn == 2))
        expected += piece if target else [IGNORE_INDEX] * len(piece)
    expected[0] = IGNORE_INDEX  # position 0 is never predicted
    n = len(tokens)
    assert batch["input_ids"][0, :n].tolist() == tokens
    assert batch["labels"][0, :n].tolist() == expected
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("policy", ["error", "truncate", "drop"])
def test_truncation_policies_and_their_counts(tmp_path, policy, caplog):
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "abc", "response": "defghij"}]
    )
    if policy == "error":
        with pytest.raises(
            UserError, match=r"sft.jsonl:2: the example is 11 tokens, longer than data.seq_len=6"
        ):
            rows_of([path], tmp_path, seq_len=6, truncation=policy)
        return
    with caplog.at_level("INFO", logger="lowbit"):
        rows = rows_of([path], tmp_path, seq_len=6, truncation=policy)
    batch = all_rows(rows)
    if policy == "drop":
        assert len(rows) == 1 and batch["labels"][0].tolist()[1:3] == ids("b") + [EOS]
        assert "0 truncated, 1 dropped as longer than data.seq_len" in caplog.text
    else:
        assert len(rows) == 2 and batch["input_ids"][1].tolist() == ids("abcdef")
        assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 3 + ids("def")
        assert "1 truncated, 0 dropped as longer than data.seq_len" in caplog.text
    assert rows.stores[0].meta["counts"]["dropped"] == (policy == "drop")


def expect_error(tmp_path, match, files, **fields):
    with pytest.raises(UserError, match=match):
        rows_of(files, tmp_path, **fields)


def test_input_errors_name_the_file_and_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    expect_error(tmp_path, r"empty.txt is empty", [empty], seq_len=4)
    expect_error(
        tmp_path,
        r"data.train_files: '.*nothing\*.txt' matches no file",
        [tmp_path / "nothing*.txt"],
        seq_len=4,
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    expect_error(tmp_path, r"bad.jsonl:2: not valid JSON", [bad], seq_len=4)
    fields = write_jsonl(tmp_path / "f.jsonl", [{"body": "x"}])
    expect_error(tmp_path, r"f.jsonl:1: records have fields \['body'\].*data.text_field", [fields], seq_len=4)
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "abcdef"}, {"body": "x"}])
    expect_error(
        tmp_path, r"m.jsonl:2: the record has no field 'text' \(data.text_field\)", [mixed], seq_len=4
    )
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait, encore du caf\u00e9".encode("latin-1"))
    expect_error(
        tmp_path,
        r"latin1.txt is not utf-8 text \(byte 0xe9 at offset 3\).*data.encoding",
        [latin1],
        seq_len=4,
    )
    decoded = all_rows(rows_of([latin1], tmp_path, seq_len=4, encoding="latin-1"))["input_ids"]
    assert decoded.flatten().tolist() == ids("caf\u00e9 au lait, encore du caf\u00e9")[:28]
    cases = [
        ("hello there", r"chat.jsonl:1: messages must be a non-empty list of .* got str 'hello there'"),
        ([{"content": "no role"}], r"chat.jsonl:1: message 1 has role None; known roles"),
        (
            [{"role": "usr", "content": "x"}],
            r"chat.jsonl:1: message 1 has role 'usr' \(did you mean 'user'\?\)",
        ),
        ([{"role": "user"}], r"chat.jsonl:1: message 1 \(user\) has no content"),
        ([{"role": "user", "content": 3}], r"chat.jsonl:1: message 1's content must be a string"),
        ([{"role": "user", "content": [{"type": "image"}]}], r"content parts must be"),
        (["hi"], r"chat.jsonl:1: message 1 is a str, not an object"),
        (
            [{"role": "user", "content": "only a question"}],
            r"chat.jsonl:1: the conversation has no assistant message",
        ),
    ]
    for messages, match in cases:
        chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
        expect_error(tmp_path, match, [chat], seq_len=32, format="chat")


def test_parquet_json_and_saved_dataset_read_like_jsonl(tmp_path):
    import datasets

    records = [{"text": f"document number {i} " * 5} for i in range(6)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    expected = all_rows(rows_of([jsonl], tmp_path, seq_len=16))["input_ids"]
    for source in (tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "saved"):
        assert torch.equal(all_rows(rows_of([source], tmp_path, seq_len=16))["input_ids"], expected)


def test_packed_rows_restart_positions_and_mask_each_examples_first_token(tmp_path, caplog):
    records = [
        {"prompt": "ab", "response": "cd"},
        {"prompt": "e", "response": "fgh"},
        {"prompt": "ijklmn", "response": "o"},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    with caplog.at_level("INFO", logger="lowbit"):
        rows = rows_of([path], tmp_path, seq_len=12, packing=True)
    batch = all_rows(rows)
    first = ids("abcd") + [EOS]  # 5 tokens
    second = ids("efgh") + [EOS]  # 5 tokens: fits with the first (10 <= 12); the third (8) does not
    assert len(rows) == 2
    assert batch["input_ids"][0, :10].tolist() == first + second
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert batch["labels"][0, :10].tolist() == [IGNORE_INDEX] * 2 + ids("cd") + [EOS] + [IGNORE_INDEX] + ids(
        "fgh"
    ) + [EOS]
    assert batch["position_ids"][1].tolist() == [*range(8), *range(4)]
    assert "packing saved 12 padding tokens" in caplog.text  # 3 examples in 2 rows of 12


def test_a_packed_row_computes_what_its_examples_compute_alone(tmp_path):
    """transformers turns restarting position ids into a block-diagonal causal mask: the logits of
    each example inside a packed row equal those of the example in a row of its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.trainer.data import model_inputs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    records = [{"prompt": "ab", "response": "cdef"}, {"prompt": "ghi", "response": "jk"}]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    packed = all_rows(rows_of([path], tmp_path, seq_len=16, packing=True))
    alone = all_rows(rows_of([path], tmp_path, seq_len=16))
    with torch.no_grad():
        packed_logits = model(**model_inputs(packed)).logits[0]
        alone_logits = model(**model_inputs(alone)).logits
    lengths = alone["attention_mask"].sum(1).tolist()
    # fp32 attention over different key sets: equal up to summation order (a few ulps of logits ~1)
    torch.testing.assert_close(packed_logits[: lengths[0]], alone_logits[0, : lengths[0]], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        packed_logits[lengths[0] : sum(lengths)], alone_logits[1, : lengths[1]], rtol=0, atol=1e-5
    )
    leaked = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"]).logits[0]
    assert (
        leaked[lengths[0] : sum(lengths)] - alone_logits[1, : lengths[1]]
    ).abs().max() > 1e-3  # the check can fail


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


def test_load_data_uses_val_files_and_caps(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("training text " * 50)
    val = tmp_path / "val.txt"
    val.write_text("held out text " * 50)
    data = load_data(data_cfg([train], tmp_path, val_files=[str(val)], seq_len=8, max_val_examples=3), TOK, 0)
    assert len(data.val) == 3
    assert TOK.decode(data.val.batch([0])["input_ids"][0].tolist()) == "held out"
    assert len(data.rows) == (len("training text " * 50) + 1) // 8
    held = load_data(data_cfg([train], tmp_path, seq_len=8, val_fraction=0.25), TOK, 0)
    assert len(held.val) == round(len(data.rows) * 0.25) and len(held.rows) + len(held.val) == len(data.rows)
    assert not set(held.val.index[:, 1].tolist()) & set(held.rows.index[:, 1].tolist())


def test_text_pieces_are_cut_only_between_printable_characters(tmp_path, monkeypatch, caplog):
    """GPT-2's regex joins whitespace runs across a newline ("\\n\\n", "  \\n"): a cut there would
    change the tokens, so pieces are cut only at x\\ny. A real BPE's pieces equal the whole text;
    a tokenizer that marks the start of a text (Metaspace) is warned about."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.trainer.data.encode import cut_is_clean
    from lowbit.trainer.data.sources import _safe_cut

    assert _safe_cut(b"ab\n\ncd") is None and _safe_cut(b"ab  \ncd") is None and _safe_cut(b"ab\n cd") is None
    assert _safe_cut(b"ab\ncd\n\nef") == 3 and _safe_cut(b"\nab") is None
    tokenizer = bpe_tokenizer()
    assert cut_is_clean(tokenizer)
    text = "Hello\n\nWorld.  \nNext line\r\nand\n\n\nmore.\nEnd of it\n" * 40
    path = tmp_path / "t.txt"
    path.write_text(text)
    monkeypatch.setattr(sources_module, "TEXT_PIECE_BYTES", 40)
    rows = all_rows(rows_of([path], tmp_path, tokenizer, seq_len=8))["input_ids"].flatten().tolist()
    whole = ids(text, tokenizer) + [tokenizer.eos_token_id]
    assert rows == whole[: len(rows)] and len(whole) - len(rows) < 8
    backend = Tokenizer(
        models.WordLevel({"[UNK]": 0, "▁Hello": 1, "▁world.": 2, "Hello": 3}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    marked = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[UNK]", pad_token="[UNK]")
    assert not cut_is_clean(marked)
    with caplog.at_level("WARNING", logger="lowbit"):
        rows_of([path], tmp_path, marked, seq_len=8)
    assert "marks the start of a text" in caplog.text


def test_a_template_that_refuses_a_conversation_names_the_line(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    refused = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [ok, refused])
    with pytest.raises(
        UserError,
        match=r"chat.jsonl:2: the tokenizer's chat template refused the conversation: no system role",
    ):
        rows_of([path], tmp_path, tokenizer, seq_len=32)
    nulls = write_jsonl(tmp_path / "null.jsonl", [{"text": None}])
    expect_error(
        tmp_path,
        r"null.jsonl:1: field 'text' \(data.text_field\) must be a string, got NoneType",
        [nulls],
        seq_len=4,
    )
