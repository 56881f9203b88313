"""Read raw records from local files as a stream of resumable units; the hub is never contacted.

Supported: ``.txt`` (one document per file), ``.jsonl``, ``.json`` (a list of objects),
``.parquet``, and a directory written by ``datasets.Dataset.save_to_disk``. Paths may be globs.

Nothing here holds a whole corpus in memory: a ``.txt`` file is cut into line-aligned pieces of
about ``TEXT_PIECE_BYTES``, ``.jsonl`` is read line by line, parquet by record batches and a saved
dataset through its memory map. (A ``.json`` file is one JSON document and is parsed whole: use
``.jsonl`` or parquet for large data.) Every unit carries its ``Position`` — file, byte offset or
record index, 1-based line or record number — so a reader restarted at a position yields exactly
what followed it (the streaming path's exact resume), and every error names ``file:line``.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.trainer.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TEXT_PIECE_BYTES = 1 << 20
"""A .txt file is tokenized in pieces of about this size, each cut at a newline between two printable
ASCII characters (``x\ny``): a pre-tokenizer boundary of byte-level BPE tokenizers (GPT-2, Llama 3,
SmolLM2: no whitespace run spans the newline), so the tokens equal the whole file's.
``encode.cut_is_clean`` checks a tokenizer; one that marks the start of a text (SentencePiece's
"▁") is warned about."""
RECORD_BATCH = 1024


@dataclass(frozen=True)
class Position:
    """Where a unit starts; reading again from here yields the same units."""

    file: int
    """Index into the source's file list."""
    offset: int = 0
    """Byte offset (.txt, .jsonl) or 0-based record index (.json, .parquet, saved dataset)."""
    line: int = 1
    """1-based line (.txt, .jsonl) or record number (the others), for messages."""

    def as_dict(self) -> dict[str, int]:
        return {"file": self.file, "offset": self.offset, "line": self.line}


@dataclass
class Unit:
    """A record, or a piece of a text file (``{data.text_field: piece}``)."""

    position: Position
    record: dict[str, Any]
    where: str
    """``file:line`` (or ``file record N``) for error messages."""
    ends_document: bool = True
    """False for every piece of a .txt file but its last: no EOS after it."""


def expand_files(patterns: list[str], key: str) -> list[Path]:
    """Expand globs in ``patterns`` (sorted, deduplicated); a pattern that matches nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        expanded = pattern.replace("~", str(Path.home()), 1) if pattern.startswith("~") else pattern
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        if not matches or not Path(matches[0]).exists():
            raise UserError(f"{key}: {pattern!r} matches no file")
        files += [Path(match) for match in matches]
    unique = list(dict.fromkeys(files))
    for path in unique:
        if path.is_file() and path.suffix not in SUFFIXES:
            raise UserError(f"{key}: {path} has an unsupported type; use one of {', '.join(SUFFIXES)}")
    return unique


def _not_text(path: Path, offset: int, error: UnicodeDecodeError, encoding: str) -> UserError:
    byte = error.object[error.start]
    setting = (
        "set data.encoding (e.g. latin-1) if the whole corpus uses another encoding, "
        if path.suffix == ".txt" else ""  # JSON is UTF-8 by definition
    )  # fmt: skip
    return UserError(
        f"{path} is not {encoding} text (byte 0x{byte:02x} at offset {offset + error.start}): convert it, e.g. "
        f"`iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`, {setting}or leave the file out"
    )


def _safe_cut(data: bytes) -> int | None:
    """The last index just after a newline between two printable ASCII characters, if any."""
    end = len(data) - 1
    while True:
        newline = data.rfind(b"\n", 1, end)
        if newline < 0:
            return None
        if 0x21 <= data[newline - 1] <= 0x7E and 0x21 <= data[newline + 1] <= 0x7E:
            return newline + 1
        end = newline


def _text_units(path: Path, index: int, start: Position, encoding: str, field: str) -> Iterator[Unit]:
    """Pieces of a text file. A piece is a function of its start offset alone (read from there,
    cut at the last safe newline), so a reader started at any piece's offset cuts the same pieces."""
    size = path.stat().st_size
    offset, line, seen_text = start.offset, start.line, start.offset > 0
    with path.open("rb") as handle:
        while offset < size:
            handle.seek(offset)
            data = handle.read(TEXT_PIECE_BYTES)
            if not data:
                raise UserError(f"{path} shrank while it was read: keep data files unchanged during a run")
            cut = _safe_cut(data) if offset + len(data) < size else len(data)
            while cut is None:  # a line longer than a piece: read on to the next safe newline
                more = handle.read(TEXT_PIECE_BYTES)
                if not more and offset + len(data) < size:
                    raise UserError(
                        f"{path} shrank while it was read: keep data files unchanged during a run"
                    )
                data += more
                cut = len(data) if not more or offset + len(data) >= size else _safe_cut(data)
            piece = data[:cut]
            try:
                text = piece.decode(encoding)
            except UnicodeDecodeError as error:
                raise _not_text(path, offset, error, encoding) from None
            seen_text = seen_text or bool(text.strip())
            last = offset + cut >= size
            if last and not seen_text:
                break
            yield Unit(Position(index, offset, line), {field: text}, f"{path}:{line}", ends_document=last)
            offset += cut
            line += piece.count(b"\n")
    if not seen_text:
        raise UserError(f"{path} is empty: it holds no text")


def _jsonl_units(path: Path, index: int, start: Position) -> Iterator[Unit]:
    offset, line = start.offset, start.line
    with path.open("rb") as handle:
        handle.seek(offset)
        for raw in handle:
            where = f"{path}:{line}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_text(path, offset, error, "UTF-8") from None
            if text.strip():
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise UserError(f"{where}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
                yield Unit(Position(index, offset, line), record, where)
            offset += len(raw)
            line += 1


def _json_units(path: Path, index: int, start: Position) -> Iterator[Unit]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise _not_text(path, 0, error, "UTF-8") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(records, list):
        raise UserError(
            f"{path}: a .json data file must hold a list of objects; use .jsonl for one object per line"
        )
    for number in range(start.offset, len(records)):
        where = f"{path} record {number + 1}"
        if not isinstance(records[number], dict):
            raise UserError(f"{where}: not an object ({type(records[number]).__name__})")
        yield Unit(Position(index, number, number + 1), records[number], where)


def _table_units(path: Path, index: int, start: Position, batches: Iterator[list[dict]]) -> Iterator[Unit]:
    number = start.offset
    for batch in batches:
        for record in batch:
            yield Unit(Position(index, number, number + 1), record, f"{path} record {number + 1}")
            number += 1


def _parquet_batches(path: Path, first: int) -> Iterator[list[dict]]:
    import pyarrow.parquet as pq

    reader = pq.ParquetFile(path)
    skip = first
    for group in range(reader.num_row_groups):
        rows = reader.metadata.row_group(group).num_rows
        if skip >= rows:
            skip -= rows
            continue
        for batch in reader.iter_batches(batch_size=RECORD_BATCH, row_groups=[group]):
            records = batch.to_pylist()
            if skip:
                records, skip = records[skip:], max(0, skip - len(records))
            if records:
                yield records


def _saved_dataset_batches(path: Path, first: int) -> Iterator[list[dict]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is a directory but not a `datasets.save_to_disk` dataset") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise UserError(
            f"{path} holds several splits ({splits}); point at one split's directory, e.g. {path}/train"
        )
    for begin in range(first, len(dataset), RECORD_BATCH):
        columns = dataset[begin : begin + RECORD_BATCH]
        names = list(columns)
        yield [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]


def read_units(
    path: Path, index: int, start: Position | None = None, encoding: str = "utf-8", text_field: str = "text"
) -> Iterator[Unit]:
    """The units of one file from ``start`` (its beginning by default); a .txt piece is the record
    ``{text_field: piece}``.

    Raises:
        UserError: naming the file (and line) for a file that is empty, not text in ``encoding``,
        or not valid JSON.
    """
    start = start or Position(index)
    if path.is_dir():
        units = _table_units(path, index, start, _saved_dataset_batches(path, start.offset))
    elif path.suffix == ".txt":
        yield from _text_units(path, index, start, encoding, text_field)
        return
    elif path.suffix == ".jsonl":
        units = _jsonl_units(path, index, start)
    elif path.suffix == ".json":
        units = _json_units(path, index, start)
    else:
        units = _table_units(path, index, start, _parquet_batches(path, start.offset))
    empty = start.offset == 0
    for unit in units:
        empty = False
        yield unit
    if empty:
        raise UserError(f"{path} is empty: it holds no records")


def read_all(
    files: list[Path], start: Position | None = None, encoding: str = "utf-8", text_field: str = "text"
) -> Iterator[Unit]:
    """Every unit of every file in order, from ``start`` (a position in any of them)."""
    first = start.file if start is not None else 0
    for index in range(first, len(files)):
        yield from read_units(files[index], index, start if index == first else None, encoding, text_field)


def file_bytes(files: list[Path]) -> int:
    """Total size on disk (for progress): files, or every file under a saved dataset's directory."""
    return sum(
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else path.stat().st_size
        for path in files
    )
