"""`status` of a run: each provider account's current rate and ETA, and what holds the run back.

A ledger is filled with messages in the states the engine leaves them in (sent a moment ago, sent this
morning, waiting for the daily quota until midnight, still to send), on SQLite and on PostgreSQL, and
the clock is frozen: the lines a user reads are checked.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from servers import ledger_of_kind
from smartpush.cli import runview

from smartpush.config import Config, load_config
from smartpush.ledger import Ledger, NewMessage, NewRecipient, Result, RunRecord, RunState, Status
from smartpush.ratelimit import DAILY_QUOTA_CODE
from smartpush.windows import local_midnight_after

PARIS = ZoneInfo("Europe/Paris")

CONFIG = """\
timezone: Europe/Paris
providers:
  sms-main:
    type: outbox
    sender: AMELI
    rate: 10/s
  mail:
    type: outbox
    rate: 2/s
    daily_quota: 100
"""


def paris(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, second, tzinfo=PARIS)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with ledger_of_kind(request.param, tmp_path, "status_test") as led:
        yield led


def project(tmp_path: Path, campaign_extra: str = "") -> tuple[Config, Path]:
    (tmp_path / "smartpush.yaml").write_text(CONFIG, encoding="utf-8")
    campaign = tmp_path / "c.yaml"
    campaign.write_text(
        "name: c\naudience: {source: a.csv, id: id}\n"
        "channels:\n"
        "  - {channel: sms, provider: sms-main, body: hi}\n"
        "  - {channel: email, provider: mail, from: a@example.fr, subject: s, text: t}\n"
        "strategy: all\n" + campaign_extra,
        encoding="utf-8",
    )
    return load_config(tmp_path / "smartpush.yaml", env={}), campaign


def make_run(
    ledger: Ledger, campaign: Path, started: datetime, n: int
) -> tuple[RunRecord, dict[str, list[str]]]:
    """A running run of ``n`` recipients × (sms on sms-main, email on mail); message ids per channel."""
    run, _ = ledger.create_run(
        RunRecord(
            id=secrets.token_hex(8),
            campaign="c",
            campaign_file=str(campaign),
            config_file=None,
            state=RunState.RUNNING,
            channels=["sms", "email"],
            started_at=started,
            created_at=started,
        )
    )
    recipients, messages = [], []
    ids: dict[str, list[str]] = {"sms": [], "email": []}
    for i in range(n):
        rid = f"r{i:05d}"
        recipients.append(NewRecipient(rid, i // 50, i + 2, {}))
        for index, (channel, account) in enumerate((("sms", "sms-main"), ("email", "mail"))):
            mid = secrets.token_hex(10)
            ids[channel].append(mid)
            messages.append(
                NewMessage(
                    mid, rid, i // 50, channel, index, account, Status.CREATED, address=f"+3361234{i:04d}"
                )
            )
    ledger.add_batch(run.id, recipients, messages)
    ledger.update_split(run.id, split_line=n + 1, segments=n // 50 + 1, recipients=n, complete=True)
    return run, ids


def sent(ledger: Ledger, ids: list[str], at: datetime) -> None:
    assert ledger.claim(ids, at) == set(ids)
    ledger.record([Result(i, Status.SENT, provider_reference=f"ref-{i}") for i in ids], at)


def held_by_quota(ledger: Ledger, ids: list[str], at: datetime, timezone: str = "Europe/Paris") -> None:
    """What the quota does with messages it cannot send today: back to `created` until midnight."""
    assert ledger.claim(ids, at) == set(ids)
    midnight = local_midnight_after(at, timezone)
    ledger.record(
        [
            Result(i, Status.CREATED, attempted=False, error_code=DAILY_QUOTA_CODE, next_attempt_at=midnight)
            for i in ids
        ],
        at,
    )


def printed(capsys: pytest.CaptureFixture[str], run: RunRecord, ledger: Ledger, view: object) -> str:
    assert isinstance(view, runview.RunStatus)
    runview.summary(run, ledger.counts(run.id), view)
    return " ".join(capsys.readouterr().out.split())  # the console may wrap long lines


# Ledger queries ----------------------------------------------------------------------------------------
def test_ledger_counts_recent_sends_and_held_messages_per_provider(ledger: Ledger, tmp_path: Path) -> None:
    _, campaign = project(tmp_path)
    now = paris(1, 10)
    run, ids = make_run(ledger, campaign, now - timedelta(hours=3), 100)
    sent(ledger, ids["sms"][:20], now - timedelta(hours=2))  # this morning
    sent(ledger, ids["sms"][20:50], now - timedelta(seconds=30))  # just now
    sent(ledger, ids["email"][:10], now - timedelta(seconds=10))
    held_by_quota(ledger, ids["email"][10:40], now - timedelta(seconds=5))
    today = paris(1, 0)
    assert ledger.sent_per_provider(run.id, [now - timedelta(seconds=60), today]) == {
        "sms-main": [30, 50],
        "mail": [10, 10],
    }
    assert ledger.sent_per_provider(run.id, []) == {}
    unsent = ledger.unsent_per_provider(run.id, DAILY_QUOTA_CODE, now)
    assert unsent == {
        "sms-main": {"created": 50, DAILY_QUOTA_CODE: 0},
        "mail": {"created": 90, DAILY_QUOTA_CODE: 30},
    }
    # After midnight the held messages are due again: no longer waiting for the quota.
    after = ledger.unsent_per_provider(run.id, DAILY_QUOTA_CODE, paris(2, 0, 0, 1))
    assert after["mail"] == {"created": 90, DAILY_QUOTA_CODE: 0}


# What status shows ---------------------------------------------------------------------------------------
def test_status_shows_rate_now_and_eta_per_account(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, campaign = project(tmp_path)
    now = paris(1, 10)  # Tuesday 1 December 2026, 10:00 Paris; no send window (information)
    run, ids = make_run(ledger, campaign, now - timedelta(hours=1), 100)
    sent(ledger, ids["sms"][:30], now - timedelta(seconds=20))  # 30 in the last minute: 0.5/s
    sent(ledger, ids["email"][:40], now - timedelta(minutes=30))  # 40 of today's quota of 100
    view = runview.run_status(run, ledger, config, now)
    assert view is not None and view.window is None and not view.waiting()
    sms, mail = sorted(view.accounts, key=lambda a: a.account != "sms-main")
    assert (sms.account, sms.current_per_s, sms.left, sms.rate) == ("sms-main", 0.5, 70, "10/s")
    assert sms.done_by == now + timedelta(seconds=7)  # 70 at 10/s
    # mail: 60 left, 60 of today's quota left at 2/s: 30 s.
    assert (mail.current_per_s, mail.left, mail.sent_today, mail.daily_quota) == (0.0, 60, 40, 100)
    assert mail.done_by == now + timedelta(seconds=30)
    text = printed(capsys, run, ledger, view)
    assert (
        "sms-main: 0.5/s over the last 60 s (rate 10/s); 70 messages left → done by Tue 1 Dec 10:01" in text
    )
    assert (
        "mail: 0.0/s over the last 60 s (rate 2/s, quota 100/day, 40 sent today by this run); 60 messages"
        in text
    )
    assert "Expected done by Tue 1 Dec 10:01 Europe/Paris" in text
    assert "+336" not in text  # no address, ever
    as_json = runview.run_dict(run, ledger.counts(run.id), view)
    by_account = {p["account"]: p for p in as_json["providers"]}
    assert by_account["sms-main"]["current_rate_per_s"] == 0.5
    assert by_account["sms-main"]["eta_s"] == 7 and by_account["mail"]["eta_s"] == 30
    assert by_account["mail"]["daily_quota"] == 100 and by_account["mail"]["left"] == 60
    assert as_json["waiting"] == [] and as_json["done_in_s"] == 30
    assert as_json["done_by"] == (now + timedelta(seconds=30)).astimezone(UTC).isoformat()


def test_status_says_the_run_waits_for_its_window_and_for_a_quota(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, campaign = project(tmp_path, "category: marketing\n")  # Mon–Sat 08:00–20:00, no holidays
    saturday = paris(5, 19, 50)
    run, ids = make_run(ledger, campaign, saturday - timedelta(hours=1), 200)
    sent(ledger, ids["email"][:100], saturday - timedelta(minutes=30))  # the whole quota of the day
    held_by_quota(ledger, ids["email"][100:180], saturday - timedelta(minutes=1))
    now = paris(6, 12)  # Sunday noon: closed; the quota-held messages wait for midnight
    held_by_quota(ledger, ids["email"][180:], now)
    view = runview.run_status(run, ledger, config, now)
    assert view is not None
    assert view.window_opens_at == paris(7, 8)
    text = printed(capsys, run, ledger, view)
    assert "Waiting: outside its send window until Mon 7 Dec 08:00 Europe/Paris" in text
    assert "window mon-sat 08:00-20:00 Europe/Paris (holidays FR)" in text
    # The 80 held on Saturday were due at Sunday's midnight: only the 20 held now still wait.
    assert "Waiting: 20 messages wait for account mail's daily quota (resets at 00:00 Europe/Paris)" in text
    assert (
        "mail: 0.0/s over the last 60 s (rate 2/s, quota 100/day, used up today); 100 messages left" in text
    )
    mail = next(a for a in view.accounts if a.account == "mail")
    # 100 left, 100 a day, Monday from 08:00 at 2/s: 50 s.
    assert mail.done_by == paris(7, 8, 0, 50)
    sms = next(a for a in view.accounts if a.account == "sms-main")
    assert sms.done_by == paris(7, 8, 0, 20)  # 200 at 10/s once the window opens
    as_json = runview.run_dict(run, ledger.counts(run.id), view)
    assert as_json["window"] == "mon-sat 08:00-20:00 Europe/Paris (holidays FR)"
    assert as_json["waiting"] == [
        {"reason": "send-window", "until": paris(7, 8).astimezone(UTC).isoformat()},
        {
            "reason": DAILY_QUOTA_CODE,
            "account": "mail",
            "messages": 20,
            "resets_at": paris(7, 0).astimezone(UTC).isoformat(),
        },
    ]
    assert any("outside its send window" in w for w in as_json["waiting_text"])


def test_quota_exhausted_today_pushes_the_eta_to_tomorrow(ledger: Ledger, tmp_path: Path) -> None:
    config, campaign = project(tmp_path)
    now = paris(1, 22)
    run, ids = make_run(ledger, campaign, now - timedelta(hours=2), 150)
    sent(ledger, ids["email"][:100], now - timedelta(hours=1))
    held_by_quota(ledger, ids["email"][100:], now - timedelta(minutes=5))
    view = runview.run_status(run, ledger, config, now)
    assert view is not None
    mail = next(a for a in view.accounts if a.account == "mail")
    assert (mail.held, mail.left) == (50, 50)
    assert mail.done_by == paris(2, 0, 0, 25)  # at midnight, 50 at 2/s
    assert view.quota_resets_at == paris(2, 0)


def test_a_holiday_is_named_when_it_closes_the_window(
    ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, campaign = project(tmp_path, "category: marketing\n")
    christmas = paris(25, 10)  # a Friday: the marketing default opens again on Saturday 26, 08:00
    run, _ = make_run(ledger, campaign, christmas - timedelta(hours=1), 10)
    view = runview.run_status(run, ledger, config, christmas)
    assert view is not None and view.window_opens_at == paris(26, 8)
    text = printed(capsys, run, ledger, view)
    assert "outside its send window (a public holiday today) until Sat 26 Dec 08:00 Europe/Paris" in text


def test_paused_finished_and_unreadable_runs(ledger: Ledger, tmp_path: Path) -> None:
    config, campaign = project(tmp_path)
    now = paris(1, 10)
    run, _ = make_run(ledger, campaign, now - timedelta(hours=1), 10)
    ledger.set_run_state(run.id, RunState.PAUSED)
    paused = ledger.get_run(run.id)
    assert paused is not None
    view = runview.run_status(paused, ledger, config, now)
    assert view is not None and all(a.done_by is None for a in view.accounts)  # no ETA while paused
    campaign.unlink()
    ledger.set_run_state(run.id, RunState.RUNNING)
    running = ledger.get_run(run.id)
    assert running is not None
    view = runview.run_status(running, ledger, config, now)
    assert view is not None and view.note is not None and "cannot be read" in view.note
    ledger.set_run_state(run.id, RunState.FINISHED)
    finished = ledger.get_run(run.id)
    assert finished is not None and runview.run_status(finished, ledger, config, now) is None
