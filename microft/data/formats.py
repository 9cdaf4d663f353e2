"""Record files, one reader per data format: a format is one entry in `FORMATS` (its name, suffixes, reader).

A reader turns one file into a `Table`: its rows, each a decoded value (a dict of fields for every format
but JSON, whose arrays may hold anything) with the words that name it in messages ("line 3", "record 2",
"row 5"), and the column names when the format has a header. A row that can't be decoded (a JSONL line that
is not JSON, a CSV row with more fields than its header) is a `Bad` value in its place, so `--skip-bad` can
skip it; a problem with the file (unreadable, empty, not the format at all) raises DataError. What a row means
(instruction, chat, column names) is `instruct.py`'s business, the same for every format.

A file whose suffix no entry claims is read by its content: Parquet's magic bytes, else JSON/JSONL, whose
reader names plain text as such (`microft pretrain` trains on text).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from microft.errors import DataError, one_line

# the column names of other schemas, read for the fields a record without messages lacks (Dolly's
# context/response beside its instruction, prompt/completion pairs, question/answer sets); --columns names
# any others
ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("prompt", "question"),
    "input": ("context",),
    "output": ("completion", "answer", "response"),
}

_BOM = b"\xef\xbb\xbf"
PARQUET_MAGIC = b"PAR1"


class Bad(NamedTuple):
    """A row that could not be decoded, and why."""

    problem: str


class Row(NamedTuple):
    where: str  # how messages name the row: "line 3", "record 2", "row 5"
    source: str  # the record's origin, kept on it: "data.csv:3", "data.json[2]"
    value: Any  # the decoded row, or Bad


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)
    columns: list[str] | None = None  # the header of a tabular format (CSV, TSV, Parquet); None for JSON


Reader = Callable[[Path, str], Table]


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]
    read: Reader  # (path, name in messages) -> Table


def _bytes(path: Path, name: str) -> bytes:
    """The file's bytes without a UTF-8 BOM; an unreadable or empty file is a DataError."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: can't read ({e.strerror})") from None
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    if not raw.strip():
        raise DataError(f"{name}: file is empty")
    return raw


def _decode_error(raw: bytes, e: UnicodeDecodeError) -> str:
    line = raw.count(b"\n", 0, e.start) + 1
    col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return f"line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col})"


def plain_text_error(name: str) -> DataError:
    """The one line for text given where records are wanted."""
    return DataError(f"{name}: plain text, not instruction records: use `microft pretrain --data {name}` to "
                     "train on text, or give finetune JSON/JSONL, CSV/TSV or Parquet records")


def looks_like_text(raw: bytes, lines: list[bytes] | None = None) -> bool:
    """Plain text, not JSON/JSONL: it doesn't start like JSON, and most of its lines don't either (a JSONL
    file with a broken first line is still JSONL, its bad lines reported one by one)."""
    if raw.lstrip()[:1] in (b"{", b"["):
        return False
    lines = raw.split(b"\n") if lines is None else lines
    starts = [line.lstrip()[:1] for line in lines if line.strip()]
    return 2 * sum(c in (b"{", b"[") for c in starts) < len(starts)


def read_json(path: Path, name: str) -> Table:
    """A JSON array (one document: a syntax error is fatal), one JSON object, or JSONL (line by line)."""
    raw = _bytes(path, name)
    if raw.lstrip()[:1] == b"[":
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: {_decode_error(raw, e)}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{name}: JSON nested too deeply to be a dataset") from None
        if not data:
            raise DataError(f"{name}: the JSON array is empty")
        return Table([Row(f"record {i}", f"{name}[{i}]", obj) for i, obj in enumerate(data)])
    if raw.lstrip()[:1] == b"{":  # one (possibly pretty-printed) object is a one-record file
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            obj = None  # several lines of JSONL, or bad lines reported one by one below
        if isinstance(obj, dict):
            return Table([Row("line 1", f"{name}:1", obj)])
    lines = raw.split(b"\n")
    if looks_like_text(raw, lines):
        raise plain_text_error(name)
    table = Table()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            col = e.start + 1
            obj = Bad(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {col})")
        except json.JSONDecodeError as e:
            obj = Bad(f"invalid JSON ({e.msg} at column {e.colno})")
        except RecursionError:
            obj = Bad("JSON nested too deeply")
        table.rows.append(Row(f"line {n}", f"{name}:{n}", obj))
    return table


def _read_delimited(path: Path, name: str, delimiter: str) -> Table:
    """CSV or TSV with a header row; every cell is text (a `messages` cell holds the chat as JSON)."""
    raw = _bytes(path, name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: {_decode_error(raw, e)}") from None
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a long response is one cell: no 128 KiB
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next((r for r in reader if any(c.strip() for c in r)), None)
        header_line = reader.line_num
        if header is None:
            raise DataError(f"{name}: file is empty")
        columns = [c.strip() for c in header]
        unnamed = [str(i + 1) for i, c in enumerate(columns) if not c]
        if unnamed:
            raise DataError(f"{name}: line {header_line}: the header names no column {', '.join(unnamed)} "
                            "(the first row must name the columns, e.g. instruction,input,output)")
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        if dupes:
            raise DataError(f"{name}: line {header_line}: column {', '.join(map(repr, dupes))} named twice")
        table = Table(columns=columns)
        start = reader.line_num + 1
        for cells in reader:
            where, start = f"line {start}", reader.line_num + 1  # a quoted cell may span lines
            if not any(c.strip() for c in cells):
                continue
            table.rows.append(Row(where, f"{name}:{where.removeprefix('line ')}", _cells(columns, cells)))
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"{name}: line {reader.line_num}: not valid {kind} ({e})") from None
    if not table.rows:
        raise DataError(f"{name}: a header ({', '.join(columns)}) but no rows")
    return table


def _cells(columns: list[str], cells: list[str]) -> dict[str, Any] | Bad:
    if len(cells) != len(columns):
        return Bad(f"{len(cells)} fields, the header has {len(columns)}")
    row: dict[str, Any] = dict(zip(columns, cells))
    if "messages" in row:
        try:
            row["messages"] = json.loads(row["messages"])
        except json.JSONDecodeError as e:
            return Bad(f"the 'messages' cell is not JSON ({e.msg})")
    return row


def read_csv(path: Path, name: str) -> Table:
    """Comma-separated values with a header."""
    return _read_delimited(path, name, ",")


def read_tsv(path: Path, name: str) -> Table:
    """Tab-separated values with a header."""
    return _read_delimited(path, name, "\t")


def read_parquet(path: Path, name: str) -> Table:
    """A Parquet file through pyarrow (the optional `parquet` extra): every row as a dict of its columns,
    so a `messages` column of role/content structs is a chat."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading Parquet needs pyarrow: pip install 'microft[parquet]'") from None
    _bytes(path, name)  # unreadable or empty: the same line as every format
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid / ArrowIOError / OSError: the file is not Parquet
        raise DataError(f"{name}: not a readable Parquet file ({one_line(e, 120)})") from None
    if table.num_rows == 0:
        raise DataError(f"{name}: the Parquet file has no rows")
    rows = [Row(f"row {i}", f"{name}[{i}]", obj) for i, obj in enumerate(table.to_pylist())]
    return Table(rows, list(table.column_names))


FORMATS: tuple[Format, ...] = (
    Format("JSON/JSONL", (".json", ".jsonl"), read_json),
    Format("CSV", (".csv",), read_csv),
    Format("TSV", (".tsv",), read_tsv),
    Format("Parquet", (".parquet",), read_parquet),
)
SUFFIXES = tuple(s for f in FORMATS for s in f.suffixes)


def format_for(path: Path) -> Format:
    """The format of `path`: by suffix, else by content (Parquet's magic bytes, else JSON/JSONL)."""
    suffix = path.suffix.lower()
    for f in FORMATS:
        if suffix in f.suffixes:
            return f
    try:
        with path.open("rb") as fh:
            magic = fh.read(len(PARQUET_MAGIC))
    except OSError:
        magic = b""  # the reader says why it can't read the file
    parquet = next(f for f in FORMATS if f.read is read_parquet)
    return parquet if magic == PARQUET_MAGIC else FORMATS[0]


def read_table(path: Path, name: str) -> Table:
    """The rows of one record file, whatever its format."""
    return format_for(path).read(path, name)
