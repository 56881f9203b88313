"""Tokenize a source once into a memory-mapped store, keyed by everything that decides its rows.

The key hashes the files' contents (sha256, remembered per path/size/mtime so a warm start only
stats them), the tokenizer (its full serialisation and chat template), and every data option that
changes the rows (format, fields, seq_len, truncation, train_on, packing, encoding, max_documents).
A second run with the same key opens the store in well under a second.

Every process that needs a store takes an exclusive file lock on its key: the first builds it
(into a temporary directory, renamed into place when whole) while the others — the other ranks
of this node, another job — wait, then open it. No collective is involved, so a long build
cannot time out a process group, and a killed builder leaves no half store behind.

Why not ``datasets.map``: the text path is bound by the tokenizer, and the fast tokenizer's own
``encode_batch`` already runs on every core. ``map`` adds an Arrow round trip per batch and worker
processes that each import the tokenizer; measured in ``benchmarks/data_pipeline.py`` (the same
100 MB, 2 cores) it took 4.3× the time of this build at 4.9× its peak RSS (150 s / 4.7 GB against
35 s / 0.98 GB). ``datasets`` still reads saved datasets, and pyarrow
reads parquet, batch by batch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lowbit.trainer.data.sources as sources
from lowbit.trainer.config import DataConfig
from lowbit.trainer.data.encode import Counts, Encoder, Piece, plain_backend
from lowbit.trainer.data.rows import pack
from lowbit.trainer.data.sources import Position, Unit, file_bytes, read_all
from lowbit.trainer.data.store import META, VERSION, StoreWriter, TokenStore
from lowbit.trainer.errors import UserError
from lowbit.trainer.hashing import file_sha256

logger = logging.getLogger("lowbit")

# Options that change the rows a source yields.
ROW_OPTIONS = (
    "seq_len", "text_field", "prompt_field", "response_field", "messages_field", "truncation",
    "train_on", "packing", "encoding",
)  # fmt: skip


def cache_root(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$LOWBIT_DATA_CACHE``, else ``$LOWBIT_CACHE/data`` (``~/.cache/lowbit/data``)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("LOWBIT_DATA_CACHE"):
        return Path(os.environ["LOWBIT_DATA_CACHE"])
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "data"


class Digests:
    """sha256 of files' bytes, remembered in ``ROOT/digests.json`` per (path, size, mtime, inode):
    a warm start only stats the files. Loaded once and written once per source."""

    def __init__(self, root: Path) -> None:
        self.file = root / "digests.json"
        try:
            self.memo = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.changed = False

    def of(self, path: Path) -> str:
        """One digest of a file, or of every file under a directory (with their relative names)."""
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        parts = []
        for file in files:
            stat = file.stat()
            stamp = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
            if stamp not in self.memo:
                self.memo[stamp], self.changed = file_sha256(file), True
            parts.append(f"{file.relative_to(path) if path.is_dir() else ''}:{self.memo[stamp]}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def save(self) -> None:
        if self.changed:
            with contextlib.suppress(OSError):
                temporary = self.file.with_suffix(f".{os.getpid()}.tmp")
                temporary.write_text(json.dumps(self.memo))
                temporary.replace(self.file)


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides token ids: the backend's serialisation (or vocabulary), the chat template."""
    backend = plain_backend(tokenizer)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, tokenizer.pad_token_id]
    )
    return hashlib.sha256((text + extra).encode()).hexdigest()


def layout_of(fmt: str, cfg: DataConfig) -> str:
    return "blocks" if fmt == "text" else "packed" if cfg.packing else "padded"


def options_key(fmt: str, cfg: DataConfig, tokenizer, max_documents: int | None) -> dict[str, Any]:
    """Everything but the files' contents that decides the rows."""
    return {
        "version": VERSION,
        "piece_bytes": sources.TEXT_PIECE_BYTES,
        "tokenizer": tokenizer_digest(tokenizer),
        "format": fmt,
        "max_documents": max_documents,
        **{name: getattr(cfg, name) for name in ROW_OPTIONS},
    }


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


class BuildProgress:
    """Bytes read while a store is built: a tqdm bar on a terminal, a log line every 10 s otherwise."""

    def __init__(self, files: list[Path], label: str) -> None:
        self.label = label
        self.starts = list(itertools.accumulate((file_bytes([path]) for path in files), initial=0))
        self.total = self.starts[-1]
        self.started = self.last_line = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total, unit="B", unit_scale=True, desc=f"tokenizing {label}", mininterval=0.5
            )

    def update(self, position: Position, byte_offsets: bool) -> None:
        done = self.starts[position.file] + (position.offset if byte_offsets else 0)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif time.perf_counter() - self.last_line > 10:
            self.last_line = time.perf_counter()
            rate = done / max(self.last_line - self.started, 1e-9)
            eta = (self.total - done) / max(rate, 1e-9)
            logger.info(
                "tokenizing %s: %.0f of %.0f MB, %.1f MB/s, eta %.0f s",
                self.label,
                done / 1e6,
                self.total / 1e6,
                rate / 1e6,
                eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()


def first_format(files: list[Path], cfg: DataConfig, fmt: str) -> str:
    """The source's format: ``fmt``, or detected from its first record (``auto``)."""
    if fmt != "auto":
        return fmt
    from lowbit.trainer.data.encode import detect_format

    unit = next(read_all(files, encoding=cfg.encoding, text_field=cfg.text_field))
    return detect_format(unit.record, cfg, fmt, unit.where)


def limited(pieces: Iterator[Piece], max_documents: int | None) -> Iterator[Piece]:
    """``pieces`` up to the end of the ``max_documents``-th document."""
    done = 0
    for piece in pieces:
        yield piece
        done += piece.ends_document
        if max_documents is not None and done >= max_documents:
            return


def _tracked(units: Iterator[Unit], progress: BuildProgress, byte_offsets: bool) -> Iterator[Unit]:
    for unit in units:
        progress.update(unit.position, byte_offsets)
        yield unit


def build_store(
    directory: Path, files: list[Path], fmt: str, cfg: DataConfig, tokenizer, max_documents: int | None,
    label: str, key: dict[str, Any],
) -> None:  # fmt: skip
    """Tokenize ``files`` into a store at ``directory`` (with progress: only the builder reads)."""
    fmt = first_format(files, cfg, fmt)
    layout = layout_of(fmt, cfg)
    encoder = Encoder(tokenizer, cfg, fmt)
    progress = BuildProgress(files, label)
    byte_offsets = all(path.suffix in (".txt", ".jsonl") for path in files)
    writer = StoreWriter(directory, layout, cfg.seq_len, len(tokenizer))  # type: ignore[arg-type]
    started = time.perf_counter()
    try:
        pieces = limited(
            encoder.pieces(
                _tracked(
                    read_all(files, encoding=cfg.encoding, text_field=cfg.text_field), progress, byte_offsets
                )
            ),
            max_documents,
        )
        for row, _ in pack(layout, pieces, cfg.seq_len):
            writer.add(row)
    finally:
        progress.close()
    if writer.rows == 0:
        raise UserError(
            f"{label}: the data holds fewer tokens than one data.seq_len block ({cfg.seq_len}); add data or lower "
            "data.seq_len"
            if layout == "blocks"
            else f"{label}: every example was dropped (data.truncation={cfg.truncation})"
        )
    padded_rows = encoder.counts.examples if layout == "packed" else writer.rows
    writer.close({
        "counts": encoder.counts.as_dict(), "key": key, "build_seconds": time.perf_counter() - started,
        "padding_tokens": writer.rows * cfg.seq_len - writer.tokens,
        "padding_saved_tokens": (padded_rows - writer.rows) * cfg.seq_len,
    })  # fmt: skip


@contextlib.contextmanager
def _locked(path: Path, label: str, show: bool) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (saying so when another process holds it first)."""
    with path.open("w") as handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if show:
                    logger.info("%s: another process is building this data cache; waiting for it", label)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            raise UserError(
                f"data.cache_dir: cannot lock {path} ({error.strerror}; some network file systems do not support "
                "locks): set data.cache_dir to a local or lock-capable directory"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def builds_caches() -> bool:
    """Local rank 0 of each node builds caches; the other ranks wait for it (the same files, read
    once per node). Processes outside a launcher are each their own local rank 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def cached_store(
    files: list[Path],
    fmt: str,
    cfg: DataConfig,
    tokenizer,
    label: str,
    show: bool,
    max_documents: int | None = None,
) -> TokenStore:
    """The store of ``files``: opened from the cache, or built first (by one process at a time).

    The lock is named by the files' paths, sizes and mtimes and the options (cheap to compute), so
    one process hashes the contents while the others wait; the store by the contents' hashes.
    """
    root = cache_root(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"data.cache_dir: cannot create {root} ({error.strerror}); set data.cache_dir to a writable directory"
        ) from None
    # Keyed by the configured format: an `auto` format follows from the contents, which the key holds.
    options = options_key(fmt, cfg, tokenizer, max_documents)
    stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    builder = builds_caches()
    while True:
        with _locked(root / f"{_hash([stats, options])}.lock", label, show and builder):
            digests = Digests(root)
            key = {**options, "files": [[path.suffix, path.is_dir(), digests.of(path)] for path in files]}
            digests.save()
            name = _hash(key)
            directory, failed = root / name, root / f"{name}.failed"
            if failed.is_file():  # the same files and options failed before: the same error, not a rebuild
                raise UserError(failed.read_text())
            if (directory / META).is_file():
                store = TokenStore(directory)
                if show:
                    report(store, label, built=False)
                return store
            if builder:
                store = _build(root, name, files, fmt, cfg, tokenizer, max_documents, label, key)
                if show:
                    report(store, label, built=True)
                return store
        if show:
            logger.info("%s: waiting for local rank 0 to build this data cache", label)
            show = False
        time.sleep(1.0)


def _build(root: Path, name: str, files: list[Path], fmt: str, cfg: DataConfig, tokenizer, max_documents: int | None,
           label: str, key: dict[str, Any]) -> TokenStore:  # fmt: skip
    """Build into a temporary directory and rename it into place (under the lock). Leftovers of a
    killed builder are removed first; a data error is remembered for the processes waiting."""
    for stale in root.glob(f"{name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temporary = root / f"{name}.building-{os.getpid()}"
    try:
        build_store(temporary, files, fmt, cfg, tokenizer, max_documents, label, key)
        temporary.rename(root / name)
    except UserError as error:
        (root / f"{name}.failed").write_text(str(error))
        raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return TokenStore(root / name)


def report(store: TokenStore, label: str, built: bool) -> None:
    """One line on a store: rows, tokens, what was dropped or truncated, padding (saved)."""
    meta = store.meta
    counts = Counts(**meta["counts"])
    how = f"tokenized in {meta['build_seconds']:.1f} s" if built else "from the cache"
    parts = [
        f"{label}: {meta['rows']:,} rows of {meta['seq_len']} ({meta['tokens']:,} tokens, {store.layout}) {how}"
    ]
    if store.layout != "blocks":
        parts.append(f"{counts.examples:,} examples")
        if counts.truncated or counts.dropped:
            parts.append(
                f"{counts.truncated:,} truncated, {counts.dropped:,} dropped as longer than data.seq_len"
            )
        share = meta["padding_tokens"] / max(1, meta["rows"] * meta["seq_len"])
        parts.append(f"padding {share:.1%}")
        if store.layout == "packed":
            parts.append(f"packing saved {meta['padding_saved_tokens']:,} padding tokens")
    parts.append(f"cache {store.directory}")
    logger.info("%s", " | ".join(parts))
