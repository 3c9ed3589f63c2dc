"""Streaming audience readers and duplicate detection."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from smartpush.audience import AudienceFile, Row
from smartpush.dedup import SeenIds
from smartpush.errors import AudienceError


def write(tmp_path: Path, name: str, content: str | bytes, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


def rows(path: Path, encoding: str = "auto") -> list[Row]:
    return list(AudienceFile(path, encoding=encoding))


# ---------------------------------------------------------------------------------------------- CSV


def test_semicolon_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "id;prenom;phone\n1;Zoé;06 12 34 56 78\n2;Luc;\n")
    audience = AudienceFile(path)
    assert audience.columns == ("id", "prenom", "phone")
    assert audience.delimiter == ";"
    assert audience.encoding == "utf-8"
    assert rows(path) == [
        Row(2, {"id": "1", "prenom": "Zoé", "phone": "06 12 34 56 78"}),
        Row(3, {"id": "2", "prenom": "Luc", "phone": ""}),
    ]


def test_comma_csv_with_quoted_semicolons(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", 'id,note,email\r\n1,"a;b;c",a@x.fr\r\n2,"x, y",b@x.fr\r\n')
    audience = AudienceFile(path)
    assert audience.delimiter == ","
    assert [r.data["note"] for r in audience] == ["a;b;c", "x, y"]


@pytest.mark.parametrize(("sep", "name"), [("\t", "tab"), ("|", "pipe")])
def test_tab_and_pipe_are_sniffed(tmp_path: Path, sep: str, name: str) -> None:
    path = write(tmp_path, f"{name}.csv", f"id{sep}email\n1{sep}a@x.fr\n")
    assert AudienceFile(path).delimiter == sep
    assert rows(path)[0].data == {"id": "1", "email": "a@x.fr"}


def test_header_with_a_single_column(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "phone\n0612345678\n")
    assert AudienceFile(path).columns == ("phone",)
    assert rows(path) == [Row(2, {"phone": "0612345678"})]


def test_configured_delimiter_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "id,name;x\n1,a;b\n")
    assert AudienceFile(path, delimiter=",").columns == ("id", "name;x")
    assert AudienceFile(path, delimiter="tab").delimiter == "\t"
    with pytest.raises(AudienceError, match="one character"):
        AudienceFile(path, delimiter=";;")


def test_cells_and_header_names_are_stripped(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", ' id ; email \n 1 ;  a@x.fr  \n2;" quoted "\n')
    assert AudienceFile(path).columns == ("id", "email")
    assert [r.data for r in AudienceFile(path)] == [
        {"id": "1", "email": "a@x.fr"},
        {"id": "2", "email": "quoted"},
    ]


def test_quoted_newlines_keep_later_line_numbers_right(tmp_path: Path) -> None:
    text = 'id;note;phone\n1;"a;b";0612345678\n2;"line1\nline2\nline3";0612345679\n3;plain;0612345680\n'
    for newline in ("\n", "\r\n", "\r"):
        path = write(tmp_path, "a.csv", text.replace("\n", newline))
        got = rows(path)
        assert [r.line for r in got] == [2, 3, 6]
        assert got[1].data["note"] == f"line1{newline}line2{newline}line3"
        assert got[2].data == {"id": "3", "note": "plain", "phone": "0612345680"}


def test_wrong_cell_count_is_a_bad_row_and_reading_goes_on(tmp_path: Path) -> None:
    text = "id;a;b;c;d\n1;x;x;x;x\n2;x;x\n3;x;x;x;x;x;x\n4;x;x;x;x\n5\n"
    got = rows(write(tmp_path, "a.csv", text))
    assert [(r.line, r.error) for r in got] == [
        (2, None),
        (3, "the row has 3 cells but the header has 5 columns"),
        (4, "the row has 7 cells but the header has 5 columns"),
        (5, None),
        (6, "the row has 1 cell but the header has 5 columns"),
    ]
    assert got[1].data == {"id": "2", "a": "x", "b": "x", "c": "", "d": ""}
    assert got[2].data == {"id": "3", "a": "x", "b": "x", "c": "x", "d": "x"}


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    text = "\nid;email\n\n1;a@x.fr\n   \n;\n ; \n2;b@x.fr\n\n"
    path = write(tmp_path, "a.csv", text)
    assert AudienceFile(path).columns == ("id", "email")
    assert [(r.line, r.data["id"], r.error) for r in AudienceFile(path)] == [(4, "1", None), (8, "2", None)]


def test_file_can_be_iterated_twice(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "id;email\n1;a@x.fr\n2;b@x.fr\n")
    audience = AudienceFile(path)
    assert list(audience) == list(audience)
    assert len(list(audience)) == 2


# ----------------------------------------------------------------------------------------- encodings


def test_utf8_with_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "\ufeffprénom;id\nZoé;1\n")
    audience = AudienceFile(path)
    assert audience.encoding == "utf-8-sig"
    assert audience.columns == ("prénom", "id")
    assert rows(path)[0].data == {"prénom": "Zoé", "id": "1"}


def test_cp1252_is_detected(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "prénom;id\nZoé;1\nœuvre €;2\n", encoding="cp1252")
    assert path.read_bytes().count(b"\xe9") == 2
    audience = AudienceFile(path)
    assert audience.encoding == "cp1252"
    assert [r.data["prénom"] for r in audience] == ["Zoé", "œuvre €"]


def test_configured_encoding(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "prénom;id\nZoé;1\n", encoding="latin-1")
    audience = AudienceFile(path, encoding="Latin-1")
    assert audience.encoding == "iso8859-1"
    assert rows(path, encoding="latin-1")[0].data["prénom"] == "Zoé"


def test_configured_utf8_skips_a_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "\ufeffid;email\n1;a@x.fr\n")
    audience = AudienceFile(path, encoding="utf-8")
    assert audience.encoding == "utf-8-sig"
    assert audience.columns == ("id", "email")


def test_unknown_encoding_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "id\n1\n")
    with pytest.raises(AudienceError, match="unknown encoding"):
        AudienceFile(path, encoding="klingon-8")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_undecodable_byte_late_in_the_file_names_its_line(tmp_path: Path, newline: str) -> None:
    lines = ["id;prenom;email;note"]
    for i in range(2, 6001):
        name = "Zo?" if i == 5000 else "Zoé"
        lines.append(f"{i};{name};user{i}@example.fr;" + "x" * 230)
    data = (newline.join(lines) + newline).encode("utf-8").replace(b"Zo?", b"Zo\xe9")  # cp1252 "é"
    assert data.index(b"Zo\xe9;") > 1 << 20  # after the 1 MiB the encoding is guessed from
    path = write(tmp_path, "big.csv", data)
    audience = AudienceFile(path, display_name="data/big.csv")
    assert audience.encoding == "utf-8"
    assert audience.columns == ("id", "prenom", "email", "note")  # reads only the start
    with pytest.raises(AudienceError) as caught:
        for _ in audience:
            pass
    problem = caught.value.problems[0]
    assert problem.line == 5000
    assert problem.file == "data/big.csv"
    message = str(caught.value)
    assert "data/big.csv:5000" in message
    assert "line 5000" in message
    assert "audience.encoding" in message
    assert "cp1252" in message


def test_undecodable_byte_in_the_header_with_configured_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", b"id;pr\xe9nom\n1;x\n")
    with pytest.raises(AudienceError) as caught:
        _ = AudienceFile(path, encoding="utf-8").columns
    assert caught.value.problems[0].line == 1


def test_multibyte_character_cut_by_the_sniff_window(tmp_path: Path) -> None:
    data = b"id;note\n" + b"".join(b"%d;%s\n" % (i, b"x" * 90) for i in range(10_000))
    data = data[: (1 << 20) - 40]
    data = data[: data.rindex(b"\n") + 1]
    pad = (1 << 20) - 1 - len(data) - len(b"9;")
    data += b"9;" + b"x" * pad + "é\n10;y\n".encode()  # "é" straddles the 1 MiB boundary
    assert data[(1 << 20) - 1 : (1 << 20) + 1] == "é".encode()
    path = write(tmp_path, "a.csv", data)
    audience = AudienceFile(path)
    assert audience.encoding == "utf-8"
    assert [r.data["id"] for r in audience][-2:] == ["9", "10"]


# ------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudienceError) as caught:
        AudienceFile(tmp_path / "data" / "x.csv", display_name="data/x.csv")
    message = str(caught.value)
    assert "audience file data/x.csv not found" in message
    assert "relative to the project folder" in message


@pytest.mark.parametrize("name", ["a.txt", "a.xlsx", "a"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "id\n1\n")
    with pytest.raises(AudienceError) as caught:
        AudienceFile(path)
    message = str(caught.value)
    assert name in message
    assert ".csv" in message
    assert ".jsonl" in message


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, "a.csv", content)
    with pytest.raises(AudienceError, match="empty"):
        _ = AudienceFile(path).columns
    with pytest.raises(AudienceError, match="empty"):
        list(AudienceFile(path))


def test_duplicate_and_empty_header_names(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "id;email;;id\n1;a;b;c\n")
    with pytest.raises(AudienceError) as caught:
        _ = AudienceFile(path).columns
    messages = [p.message for p in caught.value.problems]
    assert len(messages) == 2
    assert "column 3" in messages[0]
    assert "columns 1 and 4" in messages[1]
    assert all(p.line == 1 for p in caught.value.problems)


def test_unclosed_quote_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", 'id;note\n1;ok\n2;"never closed\n' + ("x;y\n" * 40_000))
    with pytest.raises(AudienceError) as caught:
        list(AudienceFile(path))
    assert caught.value.problems[0].line == 3


def test_lines_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "id\n" + "".join(f"{i}\n" for i in range(50_000)))
    hint = AudienceFile(path).lines_hint()
    assert hint is not None
    assert 40_000 < hint < 60_000


# -------------------------------------------------------------------------------------- JSON Lines


def test_jsonl_valid_and_invalid_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "1", "email": "a@x.fr", "age": 70}),
        "",
        '{"id": "2", "email": "b@x.fr"',
        "[1, 2]",
        json.dumps({"id": "3", "tags": ["a"], "phone": None}),
        "42",
        "   ",
    ]
    path = write(tmp_path, "a.jsonl", "\n".join(lines) + "\n")
    audience = AudienceFile(path)
    assert audience.columns == ("id", "email", "age")
    assert audience.delimiter is None
    got = list(audience)
    assert [r.line for r in got] == [1, 3, 4, 5, 6]
    assert got[0] == Row(1, {"id": "1", "email": "a@x.fr", "age": 70})
    assert got[1].error is not None
    assert got[1].error.startswith("line is not valid JSON: ")
    assert "b@x.fr" not in got[1].error
    assert got[2].error == "line is an array, not a JSON object"
    assert got[3] == Row(5, {"id": "3", "tags": ["a"], "phone": None})
    assert got[4].error == "line is a number, not a JSON object"


def test_ndjson_with_bom_and_cp1252(tmp_path: Path) -> None:
    path = write(tmp_path, "a.ndjson", '\ufeff{"prénom": "Zoé"}\n')
    assert rows(path) == [Row(1, {"prénom": "Zoé"})]
    path = write(tmp_path, "b.ndjson", '{"prénom": "Zoé"}\n', encoding="cp1252")
    assert AudienceFile(path).encoding == "cp1252"
    assert rows(path) == [Row(1, {"prénom": "Zoé"})]


def test_jsonl_first_line_must_be_an_object_for_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "a.jsonl", '\n[1]\n{"id": 1}\n')
    with pytest.raises(AudienceError) as caught:
        _ = AudienceFile(path).columns
    assert caught.value.problems[0].line == 2


def test_empty_jsonl(tmp_path: Path) -> None:
    with pytest.raises(AudienceError, match="empty"):
        list(AudienceFile(write(tmp_path, "a.jsonl", "\n\n")))


# --------------------------------------------------------------------------------------- streaming


def test_streaming_keeps_memory_small(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8") as f:
        f.write("numero_assure;prenom;phone;email;age\n")
        for i in range(200_000):
            f.write(f"{i:013d};Zoé;06{i % 100_000_000:08d};user{i}@example.fr;{i % 90}\n")
    assert path.stat().st_size > 10_000_000
    audience = AudienceFile(path)
    tracemalloc.start()
    try:
        count = 0
        last = 0
        for row in audience:
            count += 1
            last = row.line
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000
    assert last == 200_001
    assert peak < 20 * 1024 * 1024


# ----------------------------------------------------------------------------------------- SeenIds


def test_seen_ids_reports_the_first_line() -> None:
    seen = SeenIds()
    assert seen.add("A123", 2) is None
    assert seen.add("B456", 3) is None
    assert seen.add("A123", 7) == 2
    assert seen.add("A123", 9) == 2
    assert seen.add("", 10) is None
    assert seen.add("", 11) == 10
    assert len(seen) == 3


def test_seen_ids_grows_past_several_resizes() -> None:
    seen = SeenIds(capacity=4)
    n = 100_000
    for i in range(n):
        assert seen.add(f"id-{i}", i + 2) is None
    assert len(seen) == n
    for i in range(0, n, 7):
        assert seen.add(f"id-{i}", 10**6) == i + 2
    assert len(seen) == n


def test_seen_ids_memory_per_id() -> None:
    ids = [f"{i:013d}" for i in range(200_000)]
    tracemalloc.start()
    try:
        seen = SeenIds()
        for line, recipient_id in enumerate(ids, 2):
            seen.add(recipient_id, line)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current / len(ids) < 48
    assert peak / len(ids) < 72


def test_jsonl_with_a_bad_first_line_still_streams(tmp_path: Path) -> None:
    path = write(tmp_path, "a.jsonl", 'not json\n{"id": "1"}\n')
    assert [(r.line, r.data, r.error is not None) for r in AudienceFile(path)] == [
        (1, {}, True),
        (2, {"id": "1"}, False),
    ]
