"""Streaming readers for audience files (CSV, JSON Lines) and bounded-memory duplicate detection.

An audience file is never loaded whole: :class:`AudienceFile` yields one :class:`Row` at a time and
re-opens the file for every pass. Problems with the file as a whole (missing, undecodable, no header)
raise :class:`AudienceError`; a malformed record is yielded as a ``Row`` whose ``error`` says why, so the
caller counts it ``invalid`` with its line and carries on. Messages never quote cell values.
"""

from __future__ import annotations

import codecs
import csv
import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any

from smartpush.errors import AudienceError, Problem

__all__ = ["AudienceFile", "Row", "SeenIds"]

_CSV_SUFFIXES = (".csv",)
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SNIFF_BYTES = 1 << 20  # encoding "auto" decides on the first MiB
_DELIMITERS = (";", ",", "\t", "|")  # tie order: French spreadsheet exports use ";"
_BUFFER = 1 << 20
_WHERE = (
    "paths are relative to the project folder: the folder holding smartpush.yaml, or the current directory"
)


@dataclass(slots=True)
class Row:
    """One record: ``line`` is where it starts in the file (the CSV header is line 1)."""

    line: int
    data: dict[str, Any]
    error: str | None = None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _count_newlines(text: str, after_cr: bool) -> int:
    """Line ends in ``text`` as Python's universal newlines count them (\\r\\n, \\r, \\n)."""
    n = text.count("\n") + text.count("\r") - text.count("\r\n")
    return n - 1 if after_cr and text.startswith("\n") else n


class AudienceFile:
    """An audience file, ``.csv`` or ``.jsonl``/``.ndjson``, read as a stream of :class:`Row`.

    ``encoding="auto"``: a UTF-8 BOM means utf-8-sig (a UTF-16 BOM utf-16); otherwise the first MiB
    decodes as UTF-8 or the file is read as cp1252. CSV delimiters are sniffed from the header line
    among ``;`` ``,`` tab ``|`` unless given.
    """

    def __init__(
        self,
        path: Path,
        *,
        encoding: str = "auto",
        delimiter: str | None = None,
        display_name: str | None = None,
    ) -> None:
        self._path = Path(path)
        self._name = display_name if display_name is not None else str(path)
        suffix = self._path.suffix.lower()
        if suffix in _CSV_SUFFIXES:
            self._format = "csv"
        elif suffix in _JSONL_SUFFIXES:
            self._format = "jsonl"
        else:
            raise self._error(
                f"audience file {self._name} has an unsupported extension ({suffix or 'none'}); "
                "use .csv, .jsonl or .ndjson"
            )
        self._configured_encoding: str | None = None
        if encoding.strip().lower() != "auto":
            try:
                self._configured_encoding = codecs.lookup(encoding.strip()).name
                b"".decode(self._configured_encoding)  # refuses bytes-to-bytes codecs such as base64
            except LookupError:
                raise self._error(
                    f"audience.encoding: unknown encoding {encoding!r}; use auto or a codec name "
                    "such as utf-8 or cp1252",
                    in_file=False,
                ) from None
        if delimiter is not None:
            delimiter = "\t" if delimiter.lower() in ("tab", "\\t") else delimiter
            if len(delimiter) != 1 or delimiter in ('"', "\r", "\n"):
                raise self._error(
                    "audience.delimiter must be one character such as ';', ',', '|' or a tab", in_file=False
                )
        self._delimiter = delimiter
        if not self._path.is_file():
            raise self._unreadable(None if self._path.exists() else FileNotFoundError())
        self._encoding: str | None = None
        self._columns: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def columns(self) -> tuple[str, ...]:
        """The CSV header, or the keys of the first JSON object; reads only the start of the file."""
        if self._columns is None:
            if self._format == "csv":
                with self._open() as f:
                    self._columns = self._csv_header(f)[1]
            else:
                self._columns = tuple(self._first_object())
        return self._columns

    @property
    def encoding(self) -> str:
        """The encoding actually used: utf-8, utf-8-sig, cp1252 (auto) or the configured codec."""
        if self._encoding is None:
            self._encoding = self._detect_encoding()
        return self._encoding

    @property
    def delimiter(self) -> str | None:
        """The CSV delimiter (configured or sniffed); None for JSON Lines."""
        if self._format != "csv":
            return None
        if self._delimiter is None:
            _ = self.columns
        return self._delimiter

    def lines_hint(self) -> int | None:
        """A rough estimate of the number of records, from the file size and the first 64 KiB."""
        try:
            size = self._path.stat().st_size
            with self._path.open("rb") as f:
                sample = f.read(1 << 16)
        except OSError:
            return None
        lines = sample.count(b"\n") + (0 if sample.endswith(b"\n") or not sample else 1)
        if not lines:
            return None
        estimate = lines if len(sample) >= size else round(size * lines / len(sample))
        return max(estimate - (1 if self._format == "csv" else 0), 0)

    def __iter__(self) -> Iterator[Row]:
        if self._format == "csv":
            return self._iter_csv()
        return self._iter_jsonl()

    # ------------------------------------------------------------------ helpers

    def _error(self, message: str, *, line: int | None = None, in_file: bool = True) -> AudienceError:
        return AudienceError(Problem(message, file=self._name if in_file else None, line=line))

    def _unreadable(self, exc: OSError | None) -> AudienceError:
        if isinstance(exc, FileNotFoundError):
            return self._error(f"audience file {self._name} not found ({_WHERE} when there is none)")
        why = exc.strerror if exc is not None else "it is not a regular file"
        return self._error(f"audience file {self._name} cannot be read ({why})")

    def _detect_encoding(self) -> str:
        try:
            with self._path.open("rb") as f:
                sample = f.read(_SNIFF_BYTES)
        except OSError as exc:
            raise self._unreadable(exc) from None
        if self._configured_encoding is not None:
            if self._configured_encoding == "utf-8" and sample.startswith(codecs.BOM_UTF8):
                return "utf-8-sig"
            return self._configured_encoding
        if sample.startswith(codecs.BOM_UTF8):
            return "utf-8-sig"
        if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "utf-16"
        try:
            # final=False when the sample may end inside a multibyte character: it is kept, not failed.
            codecs.getincrementaldecoder("utf-8")().decode(sample, final=len(sample) < _SNIFF_BYTES)
        except UnicodeDecodeError:
            return "cp1252"
        return "utf-8"

    def _open(self) -> IO[str]:
        encoding = self.encoding
        try:
            f = open(  # noqa: SIM115 - returned to a with block
                self._path, encoding=encoding, errors="strict", newline="", buffering=_BUFFER
            )
        except OSError as exc:
            raise self._unreadable(exc) from None
        f._CHUNK_SIZE = 1 << 16  # type: ignore[attr-defined]  # fewer, larger decode calls
        return f

    def _decode_error(self) -> AudienceError:
        """Rescan the file in binary to find the line of the first undecodable byte."""
        encoding = self.encoding
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        line, after_cr = 1, False
        with self._path.open("rb") as f:
            while True:
                chunk = f.read(_BUFFER)
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    prefix = bytes(exc.object[: exc.start]).decode(encoding, errors="replace")
                    line += _count_newlines(prefix, after_cr)
                    break
                line += _count_newlines(text, after_cr)
                after_cr = text.endswith("\r") if text else after_cr
                if not chunk:
                    line = 0
                    break
        if encoding.startswith("utf-8"):
            hint = "e.g. `encoding: cp1252` for files saved by Excel or other Windows programs"
        else:
            hint = "the encoding of the program that exported it (e.g. utf-8 or latin-1)"
        return self._error(
            f"the audience file cannot be decoded as {encoding}: there is an invalid byte on line "
            f"{line}. Set `audience.encoding:` in the campaign to the file's real encoding ({hint})",
            line=line or None,
        )

    # ------------------------------------------------------------------ CSV

    def _csv_header(self, f: IO[str]) -> tuple[int, tuple[str, ...], Any]:
        """Read the header; returns the number of blank lines before it, its names and the reader."""
        skipped = 0
        first = ""
        try:
            for first in f:
                if first.strip():
                    break
                skipped += 1
        except UnicodeDecodeError:
            raise self._decode_error() from None
        if not first.strip():
            raise self._error(
                f"audience file {self._name} is empty: it needs a header line naming the columns"
            )
        if self._delimiter is None:
            self._delimiter = _sniff_delimiter(first)
        reader = csv.reader(chain([first], f), delimiter=self._delimiter)
        line = skipped + 1
        try:
            cells = next(reader)
        except UnicodeDecodeError:
            raise self._decode_error() from None
        except csv.Error as exc:
            raise self._error(f"the header cannot be read as CSV ({exc})", line=line) from None
        names = tuple(c.strip() for c in cells)
        problems: list[Problem] = []
        seen: dict[str, int] = {}
        for i, name in enumerate(names, 1):
            if not name:
                problems.append(Problem(f"column {i} of the header has no name", file=self._name, line=line))
            elif name in seen:
                message = (
                    f"columns {seen[name]} and {i} of the header are both named {name!r}; "
                    "every column needs its own name"
                )
                problems.append(Problem(message, file=self._name, line=line))
            else:
                seen[name] = i
        if problems:
            raise AudienceError(problems)
        return skipped, names, reader

    def _iter_csv(self) -> Iterator[Row]:
        with self._open() as f:
            base, header, reader = self._csv_header(f)
            self._columns = header
            n = len(header)
            last = base + reader.line_num
            strip = str.strip
            try:
                for cells in reader:
                    line = last + 1
                    last = base + reader.line_num
                    values = list(map(strip, cells))
                    if len(values) == n:
                        if any(values):  # else a row of empty cells, as blank lines are
                            yield Row(line, dict(zip(header, values, strict=False)))
                    elif any(values):
                        data = dict(zip(header, values + [""] * (n - len(values)), strict=False))
                        cells_, columns_ = _plural(len(values), "cell"), _plural(n, "column")
                        yield Row(line, data, f"the row has {cells_} but the header has {columns_}")
            except UnicodeDecodeError:
                raise self._decode_error() from None
            except csv.Error as exc:
                raise self._error(
                    f"the row starting on line {last + 1} cannot be read as CSV ({exc}); "
                    'check its quotes (") — a cell that opens a quote must close it',
                    line=last + 1,
                ) from None

    # ------------------------------------------------------------------ JSON Lines

    def _first_object(self) -> dict[str, Any]:
        number, text = 0, ""
        with self._open() as f:
            try:
                for text in f:
                    number += 1
                    if text.strip():
                        break
            except UnicodeDecodeError:
                raise self._decode_error() from None
        if not text.strip():
            raise self._error(f"audience file {self._name} is empty: it needs one JSON object per line")
        data, error = _parse_json_line(text)
        if error is not None or data is None:
            raise self._error(f"{error}; the first line gives the columns", line=number)
        return data

    def _iter_jsonl(self) -> Iterator[Row]:
        empty = True
        with self._open() as f:
            try:
                for number, text in enumerate(f, 1):
                    if not text.strip():
                        continue
                    empty = False
                    data, error = _parse_json_line(text)
                    yield Row(number, data if data is not None else {}, error)
            except UnicodeDecodeError:
                raise self._decode_error() from None
        if empty:
            raise self._error(f"audience file {self._name} is empty: it needs one JSON object per line")


def _parse_json_line(text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"line is not valid JSON: {exc.msg} at column {exc.colno}"
    except ValueError:
        return None, "line is not valid JSON"
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(
            type(value), "a number"
        )
        return None, f"line is {kind}, not a JSON object"
    return value, None


def _sniff_delimiter(line: str) -> str:
    """The candidate delimiter found most often outside quotes in the header line; ',' if none."""
    counts = dict.fromkeys(_DELIMITERS, 0)
    quoted = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in counts:
            counts[ch] += 1
    best = max(_DELIMITERS, key=lambda d: counts[d])  # max keeps the first on ties
    return best if counts[best] else ","


class SeenIds:
    """Duplicate detection for millions of recipient ids in bounded memory.

    Keeps a 64-bit hash of each id (Python's ``hash`` of the string, 0 reserved as "empty") with the
    line of its first occurrence, in an open-addressing table (linear probing) backed by
    ``array('Q')`` + ``array('I')`` (lines up to 2**32 - 1), doubled when half full: 12 bytes a slot,
    so 24-48 bytes per id, plus the old table while doubling (1,000,000 ids: 2**21 slots, 25 MB).

    The ids themselves are not kept. Two different ids collide with probability about n²/2⁶⁵ for n ids
    (about 3 × 10⁻⁸ for a million): such an id would be reported as a duplicate of the other. ``hash``
    is salted per process, so a table is only meaningful within one process.
    """

    __slots__ = ("_count", "_keys", "_lines", "_mask")

    def __init__(self, capacity: int = 1 << 16) -> None:
        size = 1 << max(4, (max(capacity, 1) * 2 - 1).bit_length())
        self._keys = array("Q", [0]) * size
        self._lines = array("I", [0]) * size
        self._mask = size - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, recipient_id: str, line: int) -> int | None:
        """Record ``recipient_id``; return the line of its earlier occurrence if already seen, else None."""
        h = hash(recipient_id) & 0xFFFF_FFFF_FFFF_FFFF or 1
        keys = self._keys
        mask = self._mask
        i = h & mask
        while True:
            k = keys[i]
            if k == 0:
                break
            if k == h:
                return self._lines[i]
            i = (i + 1) & mask
        keys[i] = h
        self._lines[i] = line
        self._count += 1
        if self._count * 2 > mask:
            self._grow()
        return None

    def _grow(self) -> None:
        old_keys, old_lines = self._keys, self._lines
        size = (self._mask + 1) * 2
        keys = array("Q", [0]) * size
        lines = array("I", [0]) * size
        mask = size - 1
        for j, h in enumerate(old_keys):
            if h:
                i = h & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = h
                lines[i] = old_lines[j]
        self._keys, self._lines, self._mask = keys, lines, mask
