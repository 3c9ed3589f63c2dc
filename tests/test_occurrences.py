"""`send --key auto`: one run per scheduled slot, however often the trigger fires; nothing stale."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from smartpush.campaign import Campaign
from smartpush.occurrences import occurrence

PARIS = "Europe/Paris"


def campaign(**schedule: Any) -> Campaign:
    return Campaign.model_validate(
        {
            "name": "rappel",
            "category": "service",
            "audience": {"source": "people.csv", "id": "id"},
            "channels": [{"channel": "sms", "provider": "sms", "body": "Bonjour."}],
            "schedule": schedule,
        }
    )


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "key"),
    [
        # Monday 9:00 Paris = 08:00 UTC in winter: exactly on the slot
        (utc(2026, 11, 30, 8, 0), "rappel@2026-11-30T09:00"),
        # a timer that fired 20 minutes late, or a retry: the same slot
        (utc(2026, 11, 30, 8, 20), "rappel@2026-11-30T09:00"),
        # summer time: 9:00 Paris is 07:00 UTC
        (utc(2026, 7, 6, 7, 5), "rappel@2026-07-06T09:00"),
    ],
)
def test_cron_slots_are_named_in_local_time(now: datetime, key: str) -> None:
    occ = occurrence(campaign(cron="0 9 * * mon"), now, PARIS)
    assert (occ.key, occ.refused) == (key, None)


def test_two_triggers_of_one_slot_get_one_key_and_the_next_slot_another() -> None:
    c = campaign(cron="0 9 * * *")
    first = occurrence(c, utc(2026, 12, 1, 8, 0, 1), PARIS)
    again = occurrence(c, utc(2026, 12, 1, 8, 30), PARIS)
    tomorrow = occurrence(c, utc(2026, 12, 2, 8, 0, 30), PARIS)
    assert first.key == again.key != tomorrow.key


def test_a_slot_missed_by_more_than_catch_up_is_refused() -> None:
    c = campaign(cron="0 9 * * *", catch_up="1h")
    late = occurrence(c, utc(2026, 12, 1, 8, 59), PARIS)  # 59 minutes late: still sent
    stale = occurrence(c, utc(2026, 12, 1, 9, 1), PARIS)  # 61 minutes late: refused
    assert late.refused is None
    assert stale.refused is not None and "catch_up" in stale.refused


def test_past_not_after_is_refused() -> None:
    c = campaign(cron="0 9 * * *", not_after="2026-12-15")
    assert occurrence(c, utc(2026, 12, 15, 8, 10), PARIS).refused is None
    refused = occurrence(c, utc(2026, 12, 16, 8, 10), PARIS).refused
    assert refused is not None and "not_after" in refused


def test_a_one_off_at_is_its_own_slot_and_not_early() -> None:
    c = campaign(at="2026-12-01T09:00:00+01:00")
    assert occurrence(c, utc(2026, 12, 1, 8, 10), PARIS).key == "rappel@2026-12-01T09:00"
    early = occurrence(c, utc(2026, 12, 1, 7, 0), PARIS).refused
    assert early is not None and "not come yet" in early


def test_without_a_schedule_the_slot_is_the_local_day() -> None:
    c = campaign()
    # 23:30 UTC on 30 November is already 1 December in Paris
    assert occurrence(c, utc(2026, 11, 30, 23, 30), PARIS).key == "rappel@2026-12-01"


def test_the_window_s_time_zone_names_the_slot() -> None:
    c = campaign(cron="0 9 * * *", window={"timezone": "America/Cayenne"})
    assert occurrence(c, utc(2026, 12, 1, 12, 5), PARIS).key == "rappel@2026-12-01T09:00"


def test_an_invalid_cron_is_a_campaign_error() -> None:
    with pytest.raises(ValueError, match="not a valid cron expression"):
        campaign(cron="0 25 * * *")


def test_send_key_auto_twice_in_one_slot_launches_one_run(
    project: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    path = project / "campaigns" / "rappel-vaccination-grippe.yaml"
    slot = (datetime.now(UTC) - timedelta(minutes=10)).replace(second=0, microsecond=0)
    text = path.read_text(encoding="utf-8")
    path.write_text(text + f"schedule:\n  at: {slot.isoformat()}\n", encoding="utf-8")
    first = run_cli("send", path, "--yes", "--json", "--key", "auto", cwd=project)
    again = run_cli("send", path, "--yes", "--json", "--key", "auto", cwd=project)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert a["run_id"] == b["run_id"]
    assert (a["launched"], b["launched"]) == (True, False)
    assert a["key"].startswith("rappel-vaccination-grippe@")


def test_send_key_auto_refuses_a_stale_slot(
    project: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    path = project / "campaigns" / "rappel-vaccination-grippe.yaml"
    stale = datetime.now(UTC) - timedelta(hours=3)
    text = path.read_text(encoding="utf-8")
    path.write_text(text + f"schedule:\n  at: {stale.isoformat()}\n", encoding="utf-8")
    done = run_cli("send", path, "--yes", "--json", "--key", "auto", cwd=project)
    assert done.returncode == 1
    out = json.loads(done.stdout)
    assert out["launched"] is False and "catch_up" in out["refused"]
    runs = json.loads(run_cli("runs", "--json", cwd=project).stdout)
    assert runs == [] or runs.get("runs") == []  # nothing was launched


def failing_project(root: Path, url: str, schedule: str) -> Path:
    """A project whose SMS provider refuses every number: its runs end partly failed (exit 3)."""
    root.mkdir()
    (root / "smartpush.yaml").write_text(
        f"database: sqlite:///{root / 'ledger.db'}\n"
        f"providers:\n  sms:\n    type: webhook\n    base_url: {url}\n    path: /sms\n",
        encoding="utf-8",
    )
    (root / "people.csv").write_text("id;phone\n1;0612345678\n2;0612345679\n", encoding="utf-8")
    path = root / "rappel.yaml"
    path.write_text(
        "name: rappel\ncategory: service\naudience: {source: people.csv, id: id}\n"
        "channels:\n  - {channel: sms, provider: sms, body: Bonjour.}\n"
        f"schedule:\n  {schedule}\n",
        encoding="utf-8",
    )
    return path


def test_a_second_send_key_auto_returns_the_slot_s_run_with_its_exit_code(
    tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    from smartpush.testing import FakeProviderServer, Reply

    with FakeProviderServer(responder=lambda request: Reply(400, {"error": "invalid number"})) as server:
        slot = (datetime.now(UTC) - timedelta(minutes=5)).replace(second=0, microsecond=0)
        path = failing_project(tmp_path / "p", server.url, f"at: {slot.isoformat()}")
        first = run_cli("send", path, "--yes", "--json", "--key", "auto", cwd=path.parent)
        again = run_cli("send", path, "--yes", "--json", "--key", "auto", cwd=path.parent)
        sent = len(server.requests)
    assert first.returncode == again.returncode == 3, first.stderr + again.stderr  # partly failed, twice
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert (a["launched"], b["launched"]) == (True, False)
    assert a["run_id"] == b["run_id"] and b["counts"] == {"permanent-failure": 2}
    assert sent == 2  # the second trigger sent nothing


def test_a_slot_s_run_is_found_even_once_catch_up_has_passed(
    tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """A retry hours later finds the run the slot launched in time, instead of a refusal."""
    stale = (datetime.now(UTC) - timedelta(hours=3)).replace(second=0, microsecond=0)
    root = tmp_path / "p"
    path = failing_project(root, "http://127.0.0.1:9", f"at: {stale.isoformat()}")
    (root / "smartpush.yaml").write_text(
        f"database: sqlite:///{root / 'ledger.db'}\nproviders:\n  sms:\n    type: outbox\n    path: outbox\n",
        encoding="utf-8",
    )
    key = f"rappel@{stale.astimezone(ZoneInfo('Europe/Paris')).strftime('%Y-%m-%dT%H:%M')}"
    launched = run_cli("send", path, "--yes", "--json", "--key", key, cwd=root)
    assert launched.returncode == 0, launched.stderr
    retry = run_cli("send", path, "--yes", "--json", "--key", "auto", cwd=root)
    assert retry.returncode == 0, retry.stderr
    out = json.loads(retry.stdout)
    assert out["launched"] is False and out["run_id"] == json.loads(launched.stdout)["run_id"]


def test_a_refused_stale_slot_is_on_record_as_skipped(
    project: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    path = project / "campaigns" / "rappel-vaccination-grippe.yaml"
    stale = datetime.now(UTC) - timedelta(hours=3)
    text = path.read_text(encoding="utf-8") + f"schedule:\n  at: {stale.isoformat()}\n"
    path.write_text(text, encoding="utf-8")
    assert run_cli("send", path, "--yes", "--key", "auto", cwd=project).returncode == 1
    listed = run_cli("runs", "--campaign", "rappel-vaccination-grippe", "--json", cwd=project)
    history = json.loads(listed.stdout)
    (slot,) = history["occurrences"]
    assert (slot["outcome"], slot["source"], slot["run_id"]) == ("skipped", "send", None)
    assert "catch_up" in slot["reason"] and history["runs"] == []
