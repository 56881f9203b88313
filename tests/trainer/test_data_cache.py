"""The tokenized cache, streaming with exact resume, mixtures, epochs, and checks at the edges."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lowbit.trainer.byte_tokenizer import byte_tokenizer
from lowbit.trainer.config import DataConfig
from lowbit.trainer.data import load_data, mixture_counts
from lowbit.trainer.data import sources as sources_module
from lowbit.trainer.errors import UserError
from tests.conftest import ROOT, TINY, TINY_CORPUS, run_cli, tiny_overrides

TOK = byte_tokenizer()


def conversations(count: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}?"},
                {"role": "assistant", "content": f"answer {i}" * (1 + i % 3)},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "done"},
            ]
        }  # fmt: skip
        for i in range(count)
    ]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def corpus(tmp_path):
    """Two text files and a chat file."""
    text = TINY_CORPUS.read_text()
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(text[:20000])
    second.write_text(text[20000:32000])
    chat = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    return first, second, chat


def cfg_for(tmp_path, **fields) -> DataConfig:
    fields.setdefault("val_fraction", 0.0)
    fields.setdefault("seq_len", 64)
    return DataConfig(cache_dir=str(tmp_path / "cache"), **fields)


def every_row(rows) -> dict[str, torch.Tensor]:
    return rows.batch(list(range(len(rows))))


def test_a_cache_hit_gives_the_rows_of_the_build_and_new_content_a_new_cache(tmp_path, corpus, caplog):
    first, second, _ = corpus
    cfg = cfg_for(tmp_path, train_files=[str(first), str(second)])
    with caplog.at_level("INFO", logger="lowbit"):
        built = load_data(cfg, TOK, 0).rows
        assert "tokenized in" in caplog.text
        caplog.clear()
        hit = load_data(cfg, TOK, 0).rows
        assert "from the cache" in caplog.text and "tokenized in" not in caplog.text
    assert hit.stores[0].directory == built.stores[0].directory
    for key, value in every_row(built).items():
        assert torch.equal(value, every_row(hit)[key]), key
    second.write_text(second.read_text() + "One more sentence.\n")
    changed = load_data(cfg, TOK, 0).rows
    assert changed.stores[0].directory != built.stores[0].directory
    for options in ({"seq_len": 32}, {"text_field": "body"}):  # options that change rows change the key
        other = cfg_for(tmp_path, train_files=[str(first)], **options)
        assert load_data(other, TOK, 0).rows.stores[0].directory != built.stores[0].directory


def test_two_processes_build_one_cache_while_the_other_waits(tmp_path, corpus):
    """The file lock: one process builds (slowed down here so the other surely arrives meanwhile),
    the other waits and opens the same store."""
    first, second, _ = corpus
    script = tmp_path / "reader.py"
    script.write_text(
        textwrap.dedent(f"""
        import logging, sys, time
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from lowbit.trainer.byte_tokenizer import byte_tokenizer
        from lowbit.trainer.config import DataConfig
        from lowbit.trainer.data import cache, load_data
        build = cache.build_store
        def slow_build(*args, **kwargs):
            time.sleep(3)
            return build(*args, **kwargs)
        cache.build_store = slow_build
        cfg = DataConfig(train_files=[{str(first)!r}, {str(second)!r}], cache_dir={str(tmp_path / "cache")!r},
                         seq_len=64, val_fraction=0.0)
        rows = load_data(cfg, byte_tokenizer(), 0).rows
        print("DIR", rows.stores[0].directory, "ROWS", len(rows), "SUM", int(rows.batch(list(range(len(rows))))["input_ids"].sum()))
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("tokenized in" in out for out in outputs) == 1, outputs
    assert sum("another process is building this data cache; waiting" in out for out in outputs) == 1, outputs
    results = [next(line for line in out.splitlines() if line.startswith("DIR")) for out in outputs]
    assert results[0] == results[1]


def stream_batches(cfg, micro=2, accum=2, world=1, rank=0):
    return load_data(cfg, TOK, 0).batches(micro, accum, world, rank, seed=0)


def test_the_stream_reads_the_caches_rows_in_file_order(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(sources_module, "TEXT_PIECE_BYTES", 700)  # many pieces, rows spanning them
    first, second, chat = corpus
    for files, extra in (([first, second], {}), ([chat], {"packing": True}), ([chat], {})):
        cfg = cfg_for(tmp_path, train_files=[str(f) for f in files], **extra)
        cached = every_row(load_data(cfg, TOK, 0).rows)
        cfg.streaming = True
        batches = stream_batches(cfg)
        count = len(cached["input_ids"])
        steps = -(-count // 4) + 2  # past the end: the stream starts over (epoch 2)
        read = [b for step in range(steps) for b in batches.micro_batches(step)]
        streamed = {key: torch.cat([b[key] for b in read]) for key in ("input_ids", "labels")}
        for key in ("input_ids", "labels"):
            assert torch.equal(streamed[key][:count], cached[key]), (files, key)
            assert torch.equal(streamed[key][count : count + 4], cached[key][:4]), (
                "the second epoch starts over"
            )
        assert batches.streams[0].epoch == 1


STEPS = 60


def test_a_stream_resumed_from_any_step_continues_bit_identically(tmp_path, corpus, monkeypatch):
    """Kill-and-resume at every step boundary: the state (through JSON, as in a checkpoint) of a
    mixture of packed text and packed chat, rows cut mid-piece, continues exactly."""
    monkeypatch.setattr(sources_module, "TEXT_PIECE_BYTES", 500)
    first, second, chat = corpus
    sources = [
        {"files": [str(first), str(second)], "weight": 2.0},
        {"files": [str(chat)], "weight": 1.0, "name": "chat"},
    ]
    cfg = cfg_for(tmp_path, sources=sources, streaming=True, packing=True, seq_len=256)
    reference = stream_batches(cfg)
    expected = [reference.micro_batches(step) for step in range(STEPS)]
    assert reference.streams[0].epoch >= 1 and reference.streams[1].epoch >= 1  # both wrapped around
    for stop in (1, 7, 19, 41, 55):
        run = stream_batches(cfg)
        for step in range(stop):
            run.micro_batches(step)
        state = json.loads(json.dumps(run.state(stop)))
        resumed = stream_batches(cfg)
        resumed.restore(state, stop)
        for step in range(stop, STEPS):
            for got, want in zip(resumed.micro_batches(step), expected[step]):
                assert got.keys() == want.keys()
                for key in want:
                    assert torch.equal(got[key], want[key]), (stop, step, key)


def test_the_stream_gives_each_rank_its_slice_of_the_same_global_batch(tmp_path, corpus):
    first, second, _ = corpus
    cfg = cfg_for(tmp_path, train_files=[str(first), str(second)], streaming=True)
    single = stream_batches(cfg, micro=4, accum=2, world=1)
    ranks = [stream_batches(cfg, micro=2, accum=2, world=2, rank=r) for r in range(2)]
    for step in range(3):
        whole = sorted(map(tuple, torch.cat([b["input_ids"] for b in single.micro_batches(step)]).tolist()))
        shared = sorted(
            map(tuple, torch.cat([b["input_ids"] for r in ranks for b in r.micro_batches(step)]).tolist())
        )
        assert whole == shared


def test_mixture_shares_match_the_weights(tmp_path, corpus):
    first, second, chat = corpus
    sources = [
        {"files": [str(first), str(second)], "weight": 3.0, "name": "text"},
        {"files": [str(chat)], "weight": 1.0, "name": "chat"},
    ]
    cfg = cfg_for(tmp_path, sources=sources)
    data = load_data(cfg, TOK, 0)
    sizes = [len(load_data(cfg_for(tmp_path, train_files=s["files"]), TOK, 0).rows) for s in sources]
    # Cached: exact counts per epoch, the weights' shares of all rows (within one row of rounding).
    assert data.shares["text"] == pytest.approx(0.75, abs=1 / len(data.rows))
    assert len(data.rows) == sum(sizes)
    assert mixture_counts([10, 30], [1.0, 1.0]) == [20, 20] and mixture_counts([5, 5], [2.0, 1.0]) == [7, 3]
    # The chat source (40 rows) is asked for a quarter of all rows: repeated, every row used.
    epoch0 = data.rows.epoch(0).index
    chat_rows = epoch0[epoch0[:, 0] == 1, 1]
    assert len(chat_rows) == round(0.25 * sum(sizes)) and set(chat_rows.tolist()) == set(range(sizes[1]))
    # The text source gives a subset each epoch, drawn anew: over epochs every row takes its turn.
    subsets = [
        set(data.rows.epoch(e).index[data.rows.epoch(e).index[:, 0] == 0, 1].tolist()) for e in range(6)
    ]
    assert all(len(subset) == data.rows.counts[0] < sizes[0] for subset in subsets)
    assert subsets[0] != subsets[1] and set().union(*subsets) == set(range(sizes[0]))
    # Training reads epoch 1's rows in epoch 1 (one row per step: step s is position s).
    batches = data.batches(micro_batch_size=1, grad_accum_steps=1, world_size=1, rank=0, seed=0)
    size = len(data.rows)
    seen = torch.cat([batches.micro_batches(step)[0]["input_ids"] for step in range(size, 2 * size)])
    second = data.rows.epoch(1).batch(range(size))["input_ids"]
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, second.tolist()))
    # Streaming: each row draws its source; the realised share is within 4 binomial sigmas.
    cfg.streaming = True
    batches = stream_batches(cfg, micro=8, accum=1)
    for step in range(50):
        batches.micro_batches(step)
    share = batches.step_metrics()["data/share/text"]
    sigma = (0.75 * 0.25 / 400) ** 0.5
    assert abs(share - 0.75) < 4 * sigma
    assert batches.taken[0] + batches.taken[1] == 400


def test_bad_sources_and_options_are_refused_by_name(tmp_path, corpus, tiny_config):
    first, _, _ = corpus
    with pytest.raises(UserError, match=r"data.sources\[0\]: unknown key\(s\) wieght"):
        load_data(cfg_for(tmp_path, sources=[{"files": [str(first)], "wieght": 2}]), TOK, 0)
    with pytest.raises(UserError, match=r"names must differ"):
        load_data(cfg_for(tmp_path, sources=[{"files": [str(first)]}, {"files": [str(first)]}]), TOK, 0)
    for overrides, match in (
        (["data.sources=[{files: [x.txt]}]"], "set one of data.train_files .* both are set"),
        (["data.streaming=true"], "data.streaming cannot hold out part of a stream: give data.val_files"),
        (
            ["data.streaming=true", "data.val_fraction=0", "train.epochs=1", "train.max_steps=null"],
            "train.epochs needs the number of rows",
        ),
        (["train.epochs=2"], "train.max_steps and train.epochs are both set"),
        (["data.encoding=klingon"], "unknown encoding 'klingon'"),
        (["data.train_on=assistant"], "data.train_on: unknown value 'assistant'"),
    ):
        with pytest.raises(UserError, match=match):
            tiny_config(*overrides)


def test_epochs_set_the_steps_and_the_banner_says_both(tiny_config, caplog):
    from lowbit.trainer.loop import Trainer

    cfg = tiny_config("train.epochs=0.5", "train.max_steps=null", "eval.every_steps=0", "checkpoint.every_steps=0",
                      "checkpoint.save_final=false", "train.warmup_steps=0")  # fmt: skip
    with caplog.at_level("INFO", logger="lowbit"):
        trainer = Trainer(cfg)
    rows = len(trainer.parts.train_batches.examples)
    assert cfg.train.max_steps == math.ceil(0.5 * rows / 8)  # half the rows, 8 per step
    assert f"{cfg.train.max_steps} steps = 0.5" in caplog.text
    counts = trainer.run_facts["data_counts"]  # in the metrics start record and W&B's config
    assert counts["tokens"] == sum(len(s) for s in trainer.parts.train_batches.examples.stores) * 128
    assert counts["documents"] == 1 and counts["dropped"] == 0
    trainer.close()


def test_seq_len_beyond_the_models_positions_is_refused(tiny_config):
    from lowbit.trainer.loop import Trainer

    with pytest.raises(
        UserError, match=r"data.seq_len=512 is longer than the model's max_position_embeddings \(256\)"
    ):
        Trainer(tiny_config("data.seq_len=512"))


def test_an_unwritable_cache_dir_is_refused(tmp_path, corpus):
    first, _, _ = corpus
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(UserError, match=r"data.cache_dir: cannot create .*set data.cache_dir to a writable"):
        load_data(
            DataConfig(train_files=[str(first)], cache_dir=str(blocked / "cache"), val_fraction=0.0), TOK, 0
        )


def test_a_stores_recorded_counts_match_its_rows(tmp_path, corpus):
    _, _, chat = corpus
    cfg = cfg_for(tmp_path, train_files=[str(chat)], packing=True)
    rows = load_data(cfg, TOK, 0).rows
    meta = rows.stores[0].meta
    labels = every_row(rows)["labels"]
    assert int((labels != -100).sum()) == meta["target_tokens"]
    assert np.isclose(
        meta["padding_tokens"], rows.seq_len * len(rows) - int(every_row(rows)["attention_mask"].sum())
    )


def test_the_cli_exits_2_naming_a_file_that_is_not_utf8_and_writes_nothing(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("caf\u00e9 " * 300).encode("latin-1"))
    result = run_cli("train", str(TINY), *tiny_overrides(tmp_path / "run", f"data.train_files=[{latin1}]"))
    assert result.returncode == 2, result.stderr
    assert (
        "latin1.txt is not utf-8 text (byte 0xe9 at offset 3)" in result.stderr
        and "data.encoding" in result.stderr
    )
    assert not (tmp_path / "run").exists()


def test_a_stream_refuses_to_resume_in_files_that_changed(tmp_path, corpus):
    first, second, _ = corpus
    cfg = cfg_for(tmp_path, train_files=[str(first), str(second)], streaming=True)
    run = stream_batches(cfg)
    run.micro_batches(0)
    state = json.loads(json.dumps(run.state(1)))
    second.write_text(second.read_text() + "appended later\n")
    with pytest.raises(
        UserError, match=r"the data files changed since the checkpoint .* restore them, or start a new run"
    ):
        stream_batches(cfg).restore(state, 1)


def test_the_same_bytes_as_another_file_type_are_another_cache(tmp_path):
    record = json.dumps({"text": "abcdefgh" * 4}) + "\n"
    as_jsonl, as_txt = tmp_path / "x.jsonl", tmp_path / "x.txt"
    as_jsonl.write_text(record)
    as_txt.write_text(record)
    jsonl_rows = load_data(cfg_for(tmp_path, train_files=[str(as_jsonl)], seq_len=8), TOK, 0).rows
    txt_rows = load_data(cfg_for(tmp_path, train_files=[str(as_txt)], seq_len=8), TOK, 0).rows
    assert jsonl_rows.stores[0].directory != txt_rows.stores[0].directory
    assert TOK.decode(txt_rows.batch([0])["input_ids"][0].tolist()) == '{"text":'
