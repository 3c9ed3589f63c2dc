"""Reading an audience in shards gives exactly the rows of one pass, and plans agree."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from smartpush import audience as audience_module
from smartpush.audience import AudienceFile, Row
from smartpush.config import load_config
from smartpush.loading import load_campaign
from smartpush.planning import make_plan


def key(row: Row) -> tuple[int, dict[str, object], str | None]:
    return (row.line, row.data, row.error)


def assert_same_rows(af: AudienceFile, count: int) -> None:
    shards = af.shards(count, min_bytes=1)
    assert shards is not None and len(shards) == count
    assert shards[0].start > 0 or af.delimiter is None
    together = [key(r) for s in shards for r in af.rows(s)]
    assert together == [key(r) for r in af]


def csv_text(n: int) -> str:
    lines = ["id;name;phone"]
    for i in range(n):
        if i % 97 == 0:
            lines.append("")  # blank lines are skipped but still counted
        if i % 101 == 0:
            lines.append(f"{i};too;many;cells")
        lines.append(f"{i};Hélène {i};06123456{i % 100:02d}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("count", [2, 3, 7])
@pytest.mark.parametrize(("encoding", "newline"), [("utf-8", "\n"), ("utf-8-sig", "\r\n"), ("cp1252", "\n")])
def test_csv_shards_cover_every_row_once(tmp_path: Path, count: int, encoding: str, newline: str) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(("\n\n" + csv_text(3000)).replace("\n", newline).encode(encoding))
    assert_same_rows(AudienceFile(path), count)


def test_jsonl_shards(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = [f'{{"id": "{i}", "name": "Zoé"}}' if i % 50 != 7 else "not json" for i in range(2000)]
    path.write_text("\n".join(lines[:100]) + "\n\n" + "\n".join(lines[100:]) + "\n", encoding="utf-8")
    assert_same_rows(AudienceFile(path), 3)


@pytest.mark.parametrize(
    "content",
    [
        'id;name\n1;"Dupont\nJean"\n' * 10,  # a quoted cell may hold a line break
        "id;name\r1;a\r2;b\r" * 10,  # lone CRs end lines for csv but not for the byte scan
    ],
)
def test_unsafe_files_are_not_split(tmp_path: Path, content: str) -> None:
    path = tmp_path / "a.csv"
    path.write_text(content, encoding="utf-8")
    assert AudienceFile(path).shards(2, min_bytes=1) is None


def test_small_files_and_utf16_are_not_split(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(csv_text(100), encoding="utf-8")
    assert AudienceFile(path).shards(2) is None  # below the size where processes pay
    path.write_bytes(codecs.BOM_UTF16_LE + csv_text(100).encode("utf-16-le"))
    assert AudienceFile(path).shards(2, min_bytes=1) is None


def test_plan_in_processes_equals_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "smartpush.yaml").write_text("providers:\n  o:\n    type: outbox\n    rate: 10/s\n")
    rows = ["id;prenom;phone;email"]
    for i in range(4000):
        rid = i if i % 500 else i // 2  # duplicates, some across shard boundaries
        phone = "06 12" if i % 333 == 0 else f"07{i:08d}"[:10]
        rows.append(f"{rid};Zoé;{phone};p{i}@example.fr")
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "c.yaml").write_text(
        "name: t\naudience: {source: a.csv, id: id}\nchannels:\n"
        "  - {channel: sms, provider: o, body: 'Bonjour {{ prenom }} ê'}\n"
        "  - {channel: email, provider: o, from: 'A <a@example.fr>', subject: s, text: t}\n"
    )
    prepared = load_campaign(tmp_path / "c.yaml", load_config(tmp_path / "smartpush.yaml", env={}))
    monkeypatch.setattr(audience_module, "_MIN_SHARD_BYTES", 1)
    one = make_plan(prepared, processes=1)
    three = make_plan(prepared, processes=3)
    assert (one.processes, three.processes) == (1, 3)
    assert one.duplicates and one.invalid_messages
    for field in (
        "rows",
        "recipients",
        "duplicates",
        "invalid_rows",
        "invalid_messages",
        "channels",
        "unreachable",
        "segments",
        "duration",
    ):
        assert getattr(one, field) == getattr(three, field), field
