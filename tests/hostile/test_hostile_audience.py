"""Broken audience files: every bad record comes back with its line and a reason, none is dropped,
and nothing but an :class:`~smartpush.errors.AudienceError` (naming the file) stops a read.

Random bytes, bad encodings, ragged rows, NUL bytes, huge cells, broken and deeply nested JSON lines.
A file whose structure is broken as a whole (undecodable, no header, a quote left open over the cell
size limit) is one AudienceError with the file and the line; a broken record is a Row with an error.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartpush.audience import AudienceFile, Row
from smartpush.errors import AudienceError

SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ENCODINGS = ["auto", "utf-8", "cp1252", "latin-1", "utf-16", "utf-16-le", "ascii", "utf-8-sig"]


def read(path: Path, encoding: str = "auto") -> list[Row] | AudienceError:
    """Every row of the file, or the AudienceError that stopped the read: nothing else may escape."""
    try:
        return list(AudienceFile(path, encoding=encoding, display_name=path.name))
    except AudienceError as exc:
        for problem in exc.problems:
            assert problem.file == path.name or (problem.file is None and "encoding" in problem.message)
        return exc


@SETTINGS
@given(
    data=st.binary(max_size=2000),
    suffix=st.sampled_from([".csv", ".jsonl"]),
    encoding=st.sampled_from(ENCODINGS),
)
def test_random_bytes_are_rows_or_an_audience_error(
    tmp_path: Path, data: bytes, suffix: str, encoding: str
) -> None:
    path = tmp_path / f"a{suffix}"
    path.write_bytes(data)
    result = read(path, encoding)
    if isinstance(result, list):
        lines = [row.line for row in result]
        assert lines == sorted(lines) and len(set(lines)) == len(lines)  # in order, each once
        assert all(row.error is None or row.error for row in result)


CELL = st.text(
    st.characters(blacklist_characters='";\r\n', blacklist_categories=("Cs",)), max_size=30
) | st.sampled_from(["\x00", "\x00\x00x", "x" * 100_000, "☎️", "\ufeff", " ", "é" * 500])


@SETTINGS
@given(
    rows=st.lists(st.lists(CELL, min_size=0, max_size=6), max_size=30),
    blank=st.lists(st.booleans(), max_size=30),
    crlf=st.booleans(),
)
def test_every_csv_record_comes_back_with_its_line(
    tmp_path: Path, rows: list[list[str]], blank: list[bool], crlf: bool
) -> None:
    """Ragged rows, NUL bytes, 100 KB cells, blank lines: each record is a Row at its line, the
    ragged ones with an error that counts their cells; none is lost."""
    header = ["id", "prenom", "phone"]
    lines = [";".join(header)]
    expected: dict[int, list[str]] = {}
    for i, cells in enumerate(rows):
        if i < len(blank) and blank[i]:
            lines.append("")
        lines.append(";".join(cells))
        if any(c.strip() for c in cells):
            expected[len(lines)] = cells
    path = tmp_path / "a.csv"
    path.write_text(("\r\n" if crlf else "\n").join(lines) + "\n", encoding="utf-8")
    result = read(path)
    assert isinstance(result, list), result
    assert {row.line: row for row in result}.keys() == expected.keys()
    for row in result:
        cells = expected[row.line]
        if len(cells) == len(header):
            assert row.error is None and row.data["id"] == cells[0].strip()
        else:
            assert row.error is not None and f"{len(cells)} cell" in row.error
            assert all(c.strip() not in row.error for c in cells if len(c.strip()) > 3)  # no value quoted


JSON_LINE = st.one_of(
    st.dictionaries(st.text(max_size=8), st.text(max_size=20) | st.integers() | st.none(), max_size=4).map(
        json.dumps
    ),
    st.text(st.characters(blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=40),
    st.sampled_from(
        [
            "[" * 100_000 + "]" * 100_000,  # nested past Python's stack
            '{"a": ' * 50_000 + "1" + "}" * 50_000,
            '{"id": ' + "9" * 5000 + "}",  # past int's 4,300 digits
            '{"id": NaN}',
            "[1, 2]",
            '"text"',
            "null",
            "{",
            '{"id": "x\x00y"}',
            '{"id": "\\ud800"}',
            '{"id": "' + "x" * 200_000 + '"}',
        ]
    ),
)


@SETTINGS
@given(lines=st.lists(JSON_LINE, min_size=1, max_size=20))
def test_every_json_line_comes_back_with_its_line(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    wanted = [i for i, line in enumerate(lines, 1) if line.strip()]
    result = read(path)
    if isinstance(result, AudienceError):  # only a file with no line at all, or undecodable text
        assert not wanted or "decoded" in str(result), result
        return
    assert [row.line for row in result] == wanted
    for row in result:
        text = lines[row.line - 1]
        try:
            valid = isinstance(json.loads(text), dict)
        except (ValueError, RecursionError):
            valid = False
        assert (row.error is None) == valid, (row.line, row.error)
        if row.error is not None:
            assert row.data == {} and "JSON" in row.error


@pytest.mark.parametrize(
    ("content", "encoding", "said"),
    [
        (b"id;phone\n1;\xff\xfe\n", "utf-8", "line 2"),
        (b"id;phone\n1;0612345678\n2;\x81\x8d\x8f\x90\x9d\n", "cp1252", "line 3"),
        (b"id;phone\n1;0612\n", "utf-16", "cannot be decoded"),
        (b"", "auto", "empty"),
        (b"\n\n\n", "auto", "empty"),
        (b";;\n1;2;3\n", "auto", "no name"),
        (b"id;id\n1;2\n", "auto", "both named"),
        (b'id;note\n1;"never closed\n' + b"x;y\n" * 40_000, "auto", "line 2|cannot be read as CSV"),
    ],
)
def test_broken_files_are_one_audience_error_with_the_line(
    tmp_path: Path, content: bytes, encoding: str, said: str
) -> None:
    import re

    path = tmp_path / "a.csv"
    path.write_bytes(content)
    result = read(path, encoding)
    assert isinstance(result, AudienceError), result
    assert re.search(said, str(result)), str(result)


def test_a_configured_non_text_codec_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("id\n1\n", encoding="utf-8")
    for codec in ("base64", "rot13", "zlib", "hex"):
        with pytest.raises(AudienceError, match="unknown encoding"):
            AudienceFile(path, encoding=codec)
    assert codecs.lookup("utf-16").name == "utf-16"


def test_json_nested_past_the_stack_is_one_invalid_row(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text(f'{{"id": "1"}}\n{deep}\n{{"id": "2"}}\n', encoding="utf-8")
    rows = read(path)
    assert isinstance(rows, list)
    assert [(r.line, r.error is None) for r in rows] == [(1, True), (2, False), (3, True)]
    assert "nested too deeply" in str(rows[1].error)
