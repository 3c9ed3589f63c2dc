"""`plan` adds up the whole audience: every row lands in exactly one place."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from smartpush.config import load_config
from smartpush.loading import load_campaign
from smartpush.planning import Plan, make_plan

CONFIG = """\
providers:
  sms-main:
    type: outbox
    sender: AMELI
    rate: 10/s
    price_per_part: 0.05
    rate_unit: parts
  mail:
    type: outbox
    rate: 2/s
    daily_quota: 100
"""

HEADER = "id;prenom;age;phone;email\n"


def project(
    tmp_path: Path,
    rows: str,
    campaign_extra: str = "",
    strategy: str = "first-reachable",
    sms_body: str = "Bonjour {{ prenom }}, rendez-vous le 1er décembre.",
) -> Path:
    (tmp_path / "smartpush.yaml").write_text(CONFIG, encoding="utf-8")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/people.csv").write_text(HEADER + rows, encoding="utf-8")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates/sms.txt.j2").write_text(sms_body, encoding="utf-8")
    campaign = f"""\
name: test
audience:
  source: data/people.csv
  id: id
channels:
  - channel: sms
    provider: sms-main
    body: templates/sms.txt.j2
  - channel: email
    provider: mail
    from: "Service <noreply@example.fr>"
    subject: "Bonjour {{{{ prenom }}}}"
    text: "Bonjour {{{{ prenom }}}}"
strategy: {strategy}
{campaign_extra}"""
    (tmp_path / "c.yaml").write_text(campaign, encoding="utf-8")
    return tmp_path / "c.yaml"


PARIS = ZoneInfo("Europe/Paris")
#: Tuesday 1 December 2026, 08:00 in Paris: the frozen "now" of the duration tests.
NOW = datetime(2026, 12, 1, 8, 0, tzinfo=PARIS)


def plan_of(path: Path, now: datetime = NOW) -> Plan:
    return make_plan(load_campaign(path, load_config(path.parent / "smartpush.yaml", env={})), now=now)


def paris(day: int, hour: int, minute: int = 0, second: int = 0, month: int = 12) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=PARIS)


ROWS = (
    "1;Jean;70;06 12 34 56 78;jean@example.fr\n"  # line 2: sms, email fallback
    "2;Marie;80;;marie@example.fr\n"  # line 3: no phone → email
    "3;Luc;66;01 45 67 89 10;luc@example.fr\n"  # line 4: landline → invalid sms, email sent
    "4;Zoé;90;06 12;\n"  # line 5: invalid phone, no email: unreachable
    "1;Jean;70;0612345678;jean@example.fr\n"  # line 6: duplicate of line 2
    ";Anne;70;0612345679;\n"  # line 7: no id → invalid row
    "6;Paul;30;0612345670;\n"  # line 8: filtered out by where (when set)
    "7;Eve;71\n"  # line 9: wrong cell count → invalid row
)


def test_every_row_is_counted_once(tmp_path: Path) -> None:
    plan = plan_of(project(tmp_path, ROWS))
    assert plan.rows == 8
    assert plan.duplicates == [(6, 2)]
    assert {e.line for e in plan.invalid_rows} == {7, 9}
    assert plan.recipients == 5  # lines 2, 3, 4, 5, 8
    sms, email = plan.channels
    assert (sms.send, sms.fallback, sms.skipped, sms.invalid) == (2, 0, 1, 2)
    assert (email.send, email.fallback, email.skipped, email.invalid) == (2, 1, 2, 0)
    # recipients × channels = sum of statuses per channel
    for c in plan.channels:
        assert c.send + c.fallback + c.skipped + c.invalid == plan.recipients
    assert plan.unreachable == 1
    reasons = {(e.line, e.channel): e.reason for e in plan.invalid_messages}
    assert "landline" in reasons[(4, "sms")]
    assert (5, "sms") in reasons
    assert plan.has_invalid


def test_where_filters_rows_with_numbers_in_text_cells(tmp_path: Path) -> None:
    path = project(tmp_path, ROWS)
    path.write_text(path.read_text().replace("  id: id\n", '  id: id\n  where: "age >= 65"\n'))
    plan = plan_of(path)
    assert plan.filtered == 1  # Paul, 30: CSV text "30" compared as a number
    assert plan.recipients == 4


def test_all_strategy_sends_every_reachable_channel(tmp_path: Path) -> None:
    plan = plan_of(project(tmp_path, ROWS, strategy="all"))
    sms, email = plan.channels
    assert sms.send == 2 and email.send == 3 and email.fallback == 0


def test_sms_parts_cost_and_duration(tmp_path: Path) -> None:
    rows = "".join(f"{i};Jean;70;06123456{i:02d};\n" for i in range(40))
    body = "Votre rendez-vous est prêt. " * 4  # 'ê' forces UCS-2; 112 characters → 2 parts
    plan = plan_of(project(tmp_path, rows, sms_body=body))
    (sms, _) = plan.channels
    assert sms.send == 40
    assert sms.sms_parts == 80
    assert sms.by_encoding == {"UCS-2": 40}
    assert sms.forced_ucs2 == {"ê": 40}
    assert str(sms.cost) == "4.00"
    (load,) = [p for p in plan.providers if p.account == "sms-main"]
    assert (load.unit, load.units) == ("parts", 80)
    assert plan.duration is not None and plan.duration.total_seconds() == 8  # 80 parts at 10/s


def test_transliteration_keeps_gsm7(tmp_path: Path) -> None:
    rows = "".join(f"{i};Jean;70;06123456{i:02d};\n" for i in range(10))
    body = "Votre rendez-vous est prêt. " * 4
    plan = plan_of(project(tmp_path, rows, campaign_extra="sms:\n  transliterate: true\n", sms_body=body))
    (sms, _) = plan.channels
    assert sms.by_encoding == {"GSM-7": 10}
    assert sms.sms_parts == 10
    assert sms.transliterated == 10


def test_too_long_sms_is_invalid_for_that_recipient(tmp_path: Path) -> None:
    rows = "1;Jean;70;0612345678;jean@example.fr\n"
    plan = plan_of(project(tmp_path, rows, campaign_extra="sms:\n  max_parts: 1\n", sms_body="x" * 161))
    sms, email = plan.channels
    assert sms.invalid == 1 and email.send == 1
    assert "2 parts" in plan.invalid_messages[0].reason


def test_daily_quota_stretches_the_duration(tmp_path: Path) -> None:
    rows = "".join(f"{i};Jean;70;;p{i}@example.fr\n" for i in range(250))
    plan = plan_of(project(tmp_path, rows))
    (load,) = [p for p in plan.providers if p.account == "mail"]
    assert load.messages == 250
    # 100 a calendar day (Paris): 100 on Tuesday from 08:00, 100 from Wednesday's midnight, the last 50
    # from Thursday's midnight at 2/s: done Thursday 00:00:25.
    assert load.done_by == paris(3, 0, 0, 25)
    assert load.duration == paris(3, 0, 0, 25) - NOW
    assert load.sending == timedelta(seconds=125)
    assert plan.done_by == paris(3, 0, 0, 25) and plan.duration == load.duration


def test_window_and_holidays_count_in_the_duration(tmp_path: Path) -> None:
    rows = "".join(f"{i};Jean;70;06123456{i:02d};\n" for i in range(60))
    window = 'schedule:\n  window: {days: mon-fri, hours: "09:00-19:00", holidays: FR}\n'
    path = project(tmp_path, rows, campaign_extra=window)
    plan = plan_of(path)
    (sms,) = [p for p in plan.providers if p.account == "sms-main"]
    assert plan.window == "mon-fri 09:00-19:00 Europe/Paris (holidays FR)"
    assert (sms.units, sms.per_second, sms.sending) == (60, 10.0, timedelta(seconds=6))
    # Now is 08:00: the window opens at 09:00.
    assert sms.starts_at == paris(1, 9) and sms.done_by == paris(1, 9, 0, 6)
    # Thursday 24 December at 18:59:57: 3 s that evening, Friday 25 is Christmas, then the weekend.
    late = plan_of(path, now=paris(24, 18, 59, 57))
    (sms,) = [p for p in late.providers if p.account == "sms-main"]
    assert sms.starts_at == paris(24, 18, 59, 57)
    assert sms.done_by == paris(28, 9, 0, 3)


def test_marketing_campaigns_get_the_default_window(tmp_path: Path) -> None:
    rows = "1;Jean;70;0612345678;\n"
    sunday = paris(6, 12)
    plan = plan_of(project(tmp_path, rows, campaign_extra="category: marketing\n"), now=sunday)
    assert plan.window == "mon-sat 08:00-20:00 Europe/Paris (holidays FR)"
    assert plan.done_by is not None and plan.done_by > paris(7, 8) and plan.done_by < paris(7, 8, 1)
    (tmp_path / "info").mkdir()
    information = plan_of(project(tmp_path / "info", rows), now=sunday)
    assert information.window is None and information.done_by == sunday + timedelta(seconds=0.1)


def test_schedule_at_is_the_start(tmp_path: Path) -> None:
    rows = "".join(f"{i};Jean;70;;p{i}@example.fr\n" for i in range(10))
    extra = "schedule:\n  at: 2026-12-15T10:00:00+01:00\n"
    path = project(tmp_path, rows, campaign_extra=extra)
    plan = plan_of(path)
    assert plan.scheduled and plan.start == paris(15, 10)
    (mail,) = [p for p in plan.providers if p.account == "mail"]
    assert mail.done_by == paris(15, 10, 0, 5)
    # A schedule.at already past: the run would start now.
    past = plan_of(path, now=paris(16, 10))
    assert not past.scheduled and past.start == paris(16, 10)


def test_plan_shows_rate_quota_window_and_eta(
    tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    rows = "".join(f"{i};Jean;70;06123456{i:02d};p{i}@example.fr\n" for i in range(30))
    window = 'schedule:\n  window: {days: mon-fri, hours: "09:00-19:00", holidays: FR-57}\n'
    path = project(tmp_path, rows, campaign_extra=window, strategy="all")
    result = run_cli("plan", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # the terminal may wrap long lines
    assert "sms-main: 30 SMS parts at 10/s → 3 s of sending; window mon-fri 09:00-19:00 Europe/Paris" in text
    assert "mail: 30 messages at 2/s, quota 100/day → 15 s of sending; window" in text
    assert "(holidays FR-57)" in text and ", done by " in text
    assert "Estimated duration:" in text and "send windows counted" in text
    as_json = json.loads(run_cli("plan", path, "--json", cwd=tmp_path).stdout)
    (mail,) = [p for p in as_json["providers"] if p["account"] == "mail"]
    assert mail["rate"] == "2/s" and mail["rate_per_s"] == 2.0 and mail["daily_quota"] == 100
    assert mail["sending_s"] == 15 and mail["starts_at"] and mail["done_by"]
    assert as_json["window"] == "mon-fri 09:00-19:00 Europe/Paris (holidays FR-57)"
    start = datetime.fromisoformat(as_json["start"])
    assert datetime.fromisoformat(as_json["done_by"]) >= start + timedelta(seconds=15)
    assert start.tzinfo is not None and abs(start - datetime.now(UTC)) < timedelta(minutes=5)


@pytest.mark.parametrize("size,segments", [(2, 3), (500, 1)])
def test_segments(tmp_path: Path, size: int, segments: int) -> None:
    plan = plan_of(project(tmp_path, ROWS, campaign_extra=f"segments:\n  size: {size}\n"))
    assert plan.segments == segments


def test_stop_mention_is_added_to_marketing_sms_only_and_counted(tmp_path: Path) -> None:
    from smartpush.recipients import Evaluator

    rows = "1;Jean;70;0612345678;\n"
    body = "x" * 150  # 150 + "\nSTOP 36111" = 161 septets: two parts
    for category, parts, ends in (("marketing", 2, True), ("information", 1, False)):
        root = tmp_path / category
        root.mkdir()
        path = project(root, rows, campaign_extra=f"category: {category}\n", sms_body=body)
        cfg = root / "smartpush.yaml"
        cfg.write_text(
            cfg.read_text().replace(
                "    sender: AMELI\n", "    sender: AMELI\n    stop_mention: STOP 36111\n"
            )
        )
        prepared = load_campaign(path, load_config(cfg, env={}))
        (outcome,) = list(Evaluator(prepared))
        sms = outcome.channels[0].rendered.sms  # type: ignore[union-attr]
        assert sms is not None
        assert sms.text.endswith("\nSTOP 36111") is ends
        assert sms.parts == parts
        assert plan_of(path).channels[0].sms_parts == parts
