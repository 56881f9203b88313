"""Read raw records (dicts) from local files; the hub is never contacted.

Supported: ``.txt`` (one document per file), ``.jsonl``, ``.json`` (a list of objects),
``.parquet``, and a directory written by ``datasets.Dataset.save_to_disk``. Paths may be globs.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowbit.trainer.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


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


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: each line must be a JSON object")
            yield record


def _read_json(path: Path) -> Iterator[dict[str, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: a .json data file must hold a list of objects")
    yield from records


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    yield from pq.read_table(path).to_pylist()


def _read_saved_dataset(path: Path) -> Iterator[dict[str, Any]]:
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
    yield from dataset


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of one file; an empty file, or one that is not UTF-8 text, is an error naming it."""
    try:
        return _read_records(path)
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}): convert "
            f"it, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`, or leave it out of the data files"
        ) from None


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        records = list(_read_saved_dataset(path))
    elif path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        records = [{"text": text}] if text.strip() else []
    elif path.suffix == ".jsonl":
        records = list(_read_jsonl(path))
    elif path.suffix == ".json":
        records = list(_read_json(path))
    else:
        records = list(_read_parquet(path))
    if not records:
        raise UserError(f"{path} is empty: it holds no text or records")
    return records


def read_all(patterns: list[str], key: str, max_documents: int | None = None) -> list[tuple[Path, dict]]:
    """(source file, record) for every record of every file, in file order."""
    out: list[tuple[Path, dict]] = []
    for path in expand_files(patterns, key):
        out += [(path, record) for record in read_records(path)]
        if max_documents is not None and len(out) >= max_documents:
            return out[:max_documents]
    return out
