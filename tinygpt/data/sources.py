"""Reading user data: plain text, JSONL, Parquet and `datasets` directories, as documents.

This module owns turning paths into a stream of documents (strings) or records (dicts), and
the error policy for bad input: every problem raises :class:`DataError` naming the file, the
line (JSONL, text; 1-based) or row (Parquet, `datasets`; 0-based, as pandas and `datasets`
index them) and what was expected. With ``skip_bad=True`` the bad document is skipped instead
and counted in :class:`ReadStats` (by reason, with the first few messages kept): never a
silent drop.

Formats and their document rules:
  * ``.txt`` / ``.text``: documents are separated by a line holding only ``<|endoftext|>``
    (the GPT-2 / TinyStories convention; surrounding spaces allowed). A file without such a
    line is one document. Each document is stripped of surrounding whitespace; line endings
    inside it (``\\n`` or ``\\r\\n``) are kept. Whitespace after the last separator is not a
    document; an empty document anywhere else (or an empty file) is an error.
  * ``.jsonl`` / ``.ndjson``: one JSON object per line, the text in field ``text_field``
    (default ``"text"``), used exactly as written. Blank lines are ignored.
  * ``.parquet``: the column ``text_field``.
  * a directory written by ``datasets.Dataset.save_to_disk``: the column ``text_field``.
    A ``DatasetDict`` directory is refused: pass one split's sub-directory, so a test split
    never leaks into training by accident.
  * any other directory: every file above inside it (recursively, sorted, hidden files skipped);
  * a glob pattern (``data/*.jsonl``, ``corpus/**/*.txt``).

It knows nothing about tokenizers, shards or chat formats: :func:`iter_records` gives later
modules (chat, preferences) JSONL records with the same file:line error policy, and
:func:`require_field` the same wording for field errors.
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
DOCUMENT_SEPARATOR = "<|endoftext|>"
MAX_KEPT_ERRORS = 20


class DataError(ValueError):
    """Bad input data; the message starts with ``file:line:`` or ``file: row N:``."""


@dataclass
class ReadStats:
    """What a read saw: files, documents yielded, and every skipped document by reason."""

    files: list[str] = field(default_factory=list)
    documents: int = 0
    skipped: int = 0
    skipped_by_reason: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def record_skip(self, error: DataError, reason: str) -> None:
        self.skipped += 1
        self.skipped_by_reason[reason] += 1
        if len(self.first_errors) < MAX_KEPT_ERRORS:
            self.first_errors.append(str(error))

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "documents": self.documents,
            "skipped": self.skipped,
            "skipped_by_reason": dict(self.skipped_by_reason),
            "first_errors": list(self.first_errors),
        }


class _Bad(Exception):
    """Internal: one bad document (location, problem, short reason for the counts)."""

    def __init__(self, where: str, problem: str, reason: str):
        super().__init__(f"{where}: {problem}")
        self.error = DataError(f"{where}: {problem}")
        self.reason = reason


def _handle(bad: _Bad, skip_bad: bool, stats: ReadStats) -> None:
    if not skip_bad:
        raise bad.error from None
    stats.record_skip(bad.error, bad.reason)


# --- paths ---------------------------------------------------------------------------------------


def is_dataset_dir(path: Path) -> bool:
    """A directory written by ``datasets`` ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    )


def expand_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files, directories and glob patterns -> the list of sources to read, in a stable order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    sources: list[Path] = []
    for entry in paths:
        text = str(entry)
        if any(ch in text for ch in "*?[") and not Path(text).exists():
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            matches = [m for m in matches if m.is_file() and m.suffix in SUPPORTED_SUFFIXES or is_dataset_dir(m)]
            if not matches:
                raise FileNotFoundError(f"pattern {text!r} matches no readable file ({', '.join(SUPPORTED_SUFFIXES)})")
            sources += matches
            continue
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if is_dataset_dir(path):
            sources.append(path)
        elif path.is_dir():
            found = _walk(path)
            if not found:
                raise FileNotFoundError(
                    f"directory {path} holds no readable file ({', '.join(SUPPORTED_SUFFIXES)} "
                    f"or a `datasets` save_to_disk directory)"
                )
            sources += found
        elif path.suffix in SUPPORTED_SUFFIXES:
            sources.append(path)
        else:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUPPORTED_SUFFIXES)} "
                f"or a `datasets` save_to_disk directory"
            )
    if not sources:
        raise FileNotFoundError("no input paths given")
    return sources


def _walk(directory: Path) -> list[Path]:
    found: list[Path] = []
    for child in sorted(directory.iterdir()):
        if child.name.startswith("."):
            continue
        if is_dataset_dir(child):
            found.append(child)
        elif child.is_dir():
            found += _walk(child)
        elif child.suffix in SUPPORTED_SUFFIXES:
            found.append(child)
    return found


# --- documents -----------------------------------------------------------------------------------


def iter_documents(
    paths: str | Path | Iterable[str | Path],
    *,
    text_field: str = "text",
    skip_bad: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """Yield every document (a non-empty string) of every source, in order.

    Pass a :class:`ReadStats` to learn how many documents were read and skipped."""
    stats = stats if stats is not None else ReadStats()
    for source in expand_paths(paths):
        stats.files.append(str(source))
        if source.is_dir():
            reader = _read_dataset_dir(source, text_field, skip_bad, stats)
        elif source.suffix in TEXT_SUFFIXES:
            reader = _read_text(source, skip_bad, stats)
        elif source.suffix in JSONL_SUFFIXES:
            reader = _read_jsonl(source, text_field, skip_bad, stats)
        else:
            reader = _read_parquet(source, text_field, skip_bad, stats)
        for doc in reader:
            stats.documents += 1
            yield doc


def _read_text(path: Path, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    lines: list[str] = []
    start_line, bad = 1, None

    def finish(end_line: int, final: bool) -> Iterator[str]:
        text = "".join(lines).strip()
        if bad is not None:
            _handle(bad, skip_bad, stats)
        elif text:
            yield text
        elif not final or start_line == 1:  # an empty document, or an empty file
            if final:
                bad_doc = _Bad(str(path), "empty document (the file holds only whitespace)", "empty document")
            else:
                where = f"{path}:{start_line}" if start_line == end_line else f"{path}:{start_line}-{end_line}"
                bad_doc = _Bad(where, f"empty document (nothing before the {DOCUMENT_SEPARATOR} line {end_line})",
                               "empty document")
            _handle(bad_doc, skip_bad, stats)

    with open(path, "rb") as f:
        line_no = 0
        for line_no, raw in enumerate(f, start=1):
            if raw.strip() == DOCUMENT_SEPARATOR.encode():
                yield from finish(line_no, final=False)
                lines, start_line, bad = [], line_no + 1, None
                continue
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                if bad is None:
                    bad = _Bad(f"{path}:{line_no}", f"invalid UTF-8 at byte {e.start} of the line ({raw[e.start:e.start + 4]!r})",
                               "invalid UTF-8")
                    if not skip_bad:  # fail at once, not at the end of a possibly long document
                        raise bad.error from None
        yield from finish(line_no, final=True)


def iter_records(
    path: str | Path, *, skip_bad: bool = False, stats: ReadStats | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` for each record of a JSONL file (``where`` = ``"file:line"``), a Parquet
    file or a `datasets` ``save_to_disk`` directory (``"path: row N"``), for the caller's own field
    errors (see :func:`require_field`). Every stage that reads records (chats, rankings, pairs, prompts,
    task records) reads them here, so each takes the same formats. JSONL: blank lines are ignored;
    invalid UTF-8, invalid JSON (nested too deep included) and non-object lines are errors (or skipped
    and counted). A `DatasetDict` directory is refused: pass one split."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    if is_dataset_dir(path):
        yield from _dataset_rows(path)
        return
    if path.is_dir():
        raise DataError(f"{path}: a directory but not a `datasets` save_to_disk directory; pass a .jsonl or "
                        ".parquet file, or a `datasets` directory")
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        yield from _parquet_rows(path)
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _handle(_Bad(where, f"invalid UTF-8 at byte {e.start} of the line", "invalid UTF-8"), skip_bad, stats)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                _handle(_Bad(where, f"invalid JSON ({e.msg}, column {e.colno})", "invalid JSON"), skip_bad, stats)
                continue
            except RecursionError:
                _handle(_Bad(where, "invalid JSON (nested too deep)", "invalid JSON"), skip_bad, stats)
                continue
            if not isinstance(record, dict):
                _handle(_Bad(where, f"expected a JSON object, got {type(record).__name__}", "not an object"), skip_bad, stats)
                continue
            yield where, record


def _dataset_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    if (path / "dataset_dict.json").is_file():
        raise DataError(f"{path}: a DatasetDict; pass one split directory (e.g. {path / 'train'})")
    for i, row in enumerate(datasets.load_from_disk(str(path))):
        yield f"{path}: row {i}", dict(row)


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield f"{path}: row {row}", record
            row += 1


def require_field(record: dict[str, Any], name: str, expected: type | tuple[type, ...], where: str) -> Any:
    """``record[name]`` if present and of type ``expected``, else a DataError naming where and what."""
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    value = record[name]
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise DataError(f"{where}: field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _check_text(value: Any, text_field: str, where: str) -> str:
    if value is None:
        raise _Bad(where, f"field {text_field!r} is null, expected a string", "missing or null text")
    if not isinstance(value, str):
        raise _Bad(where, f"field {text_field!r} must be a string, got {type(value).__name__}", "text not a string")
    if not value.strip():
        raise _Bad(where, f"empty document (field {text_field!r} holds only whitespace)", "empty document")
    return value


def _read_jsonl(path: Path, text_field: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    for where, record in iter_records(path, skip_bad=skip_bad, stats=stats):
        try:
            if text_field not in record:
                raise _Bad(where, f"missing field {text_field!r} (fields present: {sorted(record)})", "missing or null text")
            yield _check_text(record[text_field], text_field, where)
        except _Bad as bad:
            _handle(bad, skip_bad, stats)


def _read_columns(column_iter: Iterator[list[Any]], source: str, text_field: str, skip_bad: bool,
                  stats: ReadStats) -> Iterator[str]:
    row = 0
    for values in column_iter:
        for value in values:
            try:
                yield _check_text(value, text_field, f"{source}: row {row}")
            except _Bad as bad:
                _handle(bad, skip_bad, stats)
            row += 1


def _read_parquet(path: Path, text_field: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {columns}); set text_field")
    batches = (batch.column(0).to_pylist() for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]))
    yield from _read_columns(batches, str(path), text_field, skip_bad, stats)


def _read_dataset_dir(path: Path, text_field: str, skip_bad: bool, stats: ReadStats) -> Iterator[str]:
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path}: a DatasetDict with splits {splits}; pass one split directory, "
                        f"e.g. {path / (splits or ['train'])[0]}")
    dataset = datasets.load_from_disk(str(path))
    if text_field not in dataset.column_names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {dataset.column_names}); set text_field")
    batches = (batch[text_field] for batch in dataset.select_columns([text_field]).iter(batch_size=1024))
    yield from _read_columns(batches, str(path), text_field, skip_bad, stats)
