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
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, pairwise
from pathlib import Path
from typing import IO, Any

from smartpush.errors import AudienceError, Problem

__all__ = ["AudienceFile", "Row", "Shard", "ignore_interrupts"]

_CSV_SUFFIXES = (".csv",)
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SNIFF_BYTES = 1 << 20  # encoding "auto" decides on the first MiB
_DELIMITERS = (";", ",", "\t", "|")  # tie order: French spreadsheet exports use ";"
_BUFFER = 1 << 20
#: Below this many bytes per process, starting processes costs more than splitting saves.
_MIN_SHARD_BYTES = 4 << 20
_WHERE = (
    "paths are relative to the project folder: the folder holding smartpush.yaml, or the current directory"
)


def ignore_interrupts() -> None:
    """The initializer of a process forked to read shards: Ctrl-C reaches every process of the
    terminal's group, and the one that forked the readers stops them itself (no traceback from each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass(frozen=True, slots=True)
class Shard:
    """A byte range of whole lines of an audience file; ``first_line`` is the line at ``start``."""

    start: int
    end: int
    first_line: int


def _splittable(encoding: str) -> bool:
    """Encodings in which the byte 0x0A is always a line feed and never part of another character."""
    name = codecs.lookup(encoding).name
    return name in ("utf-8", "utf-8-sig", "ascii") or name.startswith(("cp125", "iso8859", "latin"))


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
                # refuses bytes-to-bytes and text-to-text codecs such as base64 or rot13
                b"x".decode(self._configured_encoding, errors="ignore")
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
                except (
                    UnicodeError
                ):  # a codec refusing the whole stream ("UTF-16 ... does not start with BOM")
                    line = 0
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
        except UnicodeError:
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
        except UnicodeError:
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
            yield from self._csv_rows(reader, header, base)

    def _csv_rows(self, reader: Any, header: tuple[str, ...], base: int) -> Iterator[Row]:
        """Rows from a csv reader whose line ``reader.line_num`` is file line ``base + line_num``."""
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
        except UnicodeError:
            raise self._decode_error() from None
        except csv.Error as exc:
            raise self._error(
                f"the row starting on line {last + 1} cannot be read as CSV ({exc}); "
                'check its quotes (") — a cell that opens a quote must close it',
                line=last + 1,
            ) from None

    # ------------------------------------------------------------------ shards

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self._path.stat().st_size

    def shards(self, count: int, *, min_bytes: int | None = None) -> list[Shard] | None:
        """Split the records into ``count`` byte ranges of whole lines, to read in several processes.

        None when splitting could cut a record or a character: a CSV with quotes (a quoted cell may
        hold a line break), lone carriage returns, an encoding whose bytes can hide a newline (UTF-16),
        or a file too small for the split to pay.
        """
        encoding = self.encoding
        if count < 2 or not _splittable(encoding):  # noqa: PLR2004 - one shard is no split
            return None
        size = self._path.stat().st_size
        if size < (_MIN_SHARD_BYTES if min_bytes is None else min_bytes) * count:
            return None
        header_lines = 0
        if self._format == "csv":
            with self._open() as f:
                skipped, _, reader = self._csv_header(f)
                header_lines = skipped + reader.line_num
        # One binary pass: refuse quotes and lone CRs, find the line ends after each cut target.
        targets = [size * i // count for i in range(1, count)]
        cuts: list[tuple[int, int]] = []  # (byte offset of a line start, its line number)
        newlines, offset, start = 0, 0, (0, 1)
        pending_cr = False
        with self._path.open("rb") as f:
            while chunk := f.read(_BUFFER):
                if self._format == "csv" and b'"' in chunk:
                    return None
                if pending_cr and not chunk.startswith(b"\n"):
                    return None
                pending_cr = chunk.endswith(b"\r")
                if chunk.count(b"\r") - chunk.count(b"\r\n") - pending_cr:
                    return None  # a lone CR ends a line for the csv module but not for this count
                pos = 0
                while header_lines and newlines < header_lines:
                    i = chunk.find(b"\n", pos)
                    if i < 0:
                        break
                    newlines += 1
                    pos = i + 1
                    if newlines == header_lines:
                        start = (offset + pos, header_lines + 1)
                while targets and targets[0] < offset + len(chunk):
                    i = chunk.find(b"\n", max(pos, targets[0] - offset))
                    if i < 0:
                        targets[0] = offset + len(chunk)  # look again in the next chunk
                        break
                    newlines += chunk.count(b"\n", pos, i + 1)
                    pos = i + 1
                    cuts.append((offset + pos, newlines + 1))
                    targets.pop(0)
                newlines += chunk.count(b"\n", pos)
                offset += len(chunk)
        bounds = [start, *[c for c in cuts if c[0] > start[0]], (size, newlines + 1)]
        shards = [Shard(a[0], b[0], a[1]) for a, b in pairwise(bounds) if b[0] > a[0]]
        return shards if len(shards) > 1 else None

    def rows(self, shard: Shard) -> Iterator[Row]:
        """The records of one shard, numbered as in the whole file."""
        lines = self._shard_lines(shard)
        if self._format == "csv":
            header = self.columns
            assert self._delimiter is not None  # noqa: S101 - set by reading the header
            yield from self._csv_rows(
                csv.reader(lines, delimiter=self._delimiter), header, shard.first_line - 1
            )
            return
        for number, text in enumerate(lines, shard.first_line):
            if text.strip():
                data, error = _parse_json_line(text)
                yield Row(number, data if data is not None else {}, error)

    def _shard_lines(self, shard: Shard) -> Iterator[str]:
        encoding = self.encoding
        left = shard.end - shard.start
        with self._path.open("rb", buffering=_BUFFER) as f:
            f.seek(shard.start)
            for raw in f:
                try:
                    yield raw.decode(encoding)
                except UnicodeError:
                    raise self._decode_error() from None
                left -= len(raw)
                if left <= 0:
                    return

    # ------------------------------------------------------------------ JSON Lines

    def _first_object(self) -> dict[str, Any]:
        number, text = 0, ""
        with self._open() as f:
            try:
                for text in f:
                    number += 1
                    if text.strip():
                        break
            except UnicodeError:
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
            except UnicodeError:
                raise self._decode_error() from None
        if empty:
            raise self._error(f"audience file {self._name} is empty: it needs one JSON object per line")


def _parse_json_line(text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"line is not valid JSON: {exc.msg} at column {exc.colno}"
    except ValueError:  # a number of more than 4,300 digits
        return None, "line is not valid JSON"
    except RecursionError:
        return None, "line is not valid JSON: its values are nested too deeply"
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
