"""The suppression list: normalisation, the policy, the ledger's methods on both databases, and the
list applied at launch and again before each send (embedded engine, real HTTP provider on loopback)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from servers import ledger_of_kind
from test_engine import Harness, make_project

import smartpush.ledger
from smartpush.addresses import normalise_email, normalise_phone
from smartpush.errors import RecipientError
from smartpush.launch import launch
from smartpush.ledger import Ledger, Status, Suppression
from smartpush.suppression import BYPASSABLE, REASONS, bypass, entry, lookup, normalise, stops
from smartpush.testing import FakeProviderServer
from smartpush.unsubscribe import recipient_hash

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


# normalise ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "typed", ["06 12 34 56 78", "0612345678", "+33 6 12 34 56 78", "0033612345678", " 06.12.34.56.78 "]
)
def test_phones_take_the_ledgers_e164_form(typed: str) -> None:
    assert normalise("sms", typed) == "+33612345678" == normalise_phone("06 12 34 56 78", "FR")


def test_national_numbers_follow_the_region() -> None:
    assert normalise("sms", "0470 12 34 56", region="BE") == "+32470123456"


def test_emails_and_tokens_take_the_audiences_form() -> None:
    assert normalise("email", "  Jean.Dupont@Example.FR ") == normalise_email("Jean.Dupont@Example.FR")
    assert normalise("email", "Jean.Dupont@Example.FR") == "Jean.Dupont@example.fr"
    token = "dGhpcyBpcyBhIHRva2Vu:APA91b-x_y"
    assert normalise("push", f" {token}\n") == token


@pytest.mark.parametrize(
    ("channel", "typed"),
    [("sms", "06 12"), ("sms", "01 44 55 66 77"), ("email", "jean.dupont@"), ("push", "a token")],
)
def test_an_invalid_address_is_refused_without_being_repeated(channel: str, typed: str) -> None:
    with pytest.raises(RecipientError) as caught:
        normalise(channel, typed)
    assert typed.strip() not in str(caught.value)
    assert caught.value.reason


def test_an_unknown_channel_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown channel 'fax'"):
        normalise("fax", "0612345678")


def test_the_hash_is_the_one_the_ledger_messages_get() -> None:
    key = b"k" * 32
    e = entry(key, "sms", normalise("sms", "06 12 34 56 78"), "opt-out", "cli", NOW)
    assert e.address_hash == recipient_hash(key, "sms", "+33612345678")
    assert e.address_hash != recipient_hash(key, "email", "+33612345678")  # per channel
    assert e.address_hash != recipient_hash(b"x" * 32, "sms", "+33612345678")  # keyed


# policy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reason", REASONS)
@pytest.mark.parametrize("category", ["marketing", "information"])
def test_marketing_and_information_skip_every_entry(category: str, reason: str) -> None:
    assert stops(category, reason) and bypass(category, reason) is None


@pytest.mark.parametrize(
    ("reason", "sent"),
    [
        ("opt-out", True),
        ("complaint", True),
        ("hard-bounce", False),
        ("unregistered", False),
        ("manual", False),
    ],
)
def test_service_notices_reach_objectors_but_never_dead_or_blocked_addresses(reason: str, sent: bool) -> None:
    assert stops("service", reason) is not sent
    assert bypass("service", reason) == (reason if sent else None)


def test_an_unknown_reason_stops_every_campaign() -> None:
    assert all(stops(c, "lawyer-letter") for c in ("service", "information", "marketing"))


def test_the_reasons_agree_everywhere() -> None:
    import inspect

    from smartpush.cli import main

    assert REASONS == ("opt-out", "hard-bounce", "complaint", "unregistered", "manual")
    assert main._SUPPRESS_REASONS == REASONS
    default = inspect.signature(Ledger.suppress).parameters["yielding"].default
    assert frozenset(default) == BYPASSABLE


# the ledger, on SQLite and PostgreSQL ------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with ledger_of_kind(request.param, tmp_path, "suppression_test") as led:
        yield led


def entries(
    channel: str, n: int, reason: str = "opt-out", at: datetime = NOW, start: int = 0
) -> list[Suppression]:
    return [Suppression(channel, f"{channel}-{i:04d}", reason, "test", at) for i in range(start, start + n)]


def test_suppress_counts_what_it_added(ledger: Ledger) -> None:
    assert ledger.suppress(entries("sms", 3)) == 3
    assert ledger.suppress(entries("sms", 5)) == 2  # the first 3 are there already
    assert ledger.suppress(entries("sms", 5)) == 0
    assert ledger.suppress([]) == 0
    assert ledger.suppress(entries("email", 1200)) == 1200  # beyond one page of inserted rows
    assert ledger.suppression_counts() == {("sms", "opt-out"): 5, ("email", "opt-out"): 1200}


def test_an_entry_keeps_its_first_reason_unless_a_stricter_one_comes(ledger: Ledger) -> None:
    ledger.suppress(entries("sms", 1, "opt-out") + entries("sms", 1, "manual", start=1))
    later = NOW + timedelta(hours=1)
    assert ledger.suppress(entries("sms", 2, "complaint", later)) == 0  # opt-out, manual: both kept
    assert ledger.suppress(entries("sms", 2, "hard-bounce", later)) == 1  # the opt-out gives way
    assert ledger.suppression_reasons("sms", ["sms-0000", "sms-0001"]) == {
        "sms-0000": "hard-bounce",
        "sms-0001": "manual",
    }
    (newest,) = ledger.latest_suppressions(limit=1)
    assert (newest.address_hash, newest.created_at) == ("sms-0000", later)
    # One batch naming an address twice: the stricter entry wins.
    twice = [
        Suppression("push", "tok", "opt-out", "a", NOW),
        Suppression("push", "tok", "unregistered", "b", NOW),
    ]
    assert ledger.suppress(twice) == 1
    assert ledger.suppression_reasons("push", ["tok"]) == {"tok": "unregistered"}


def test_lookups_are_per_channel(ledger: Ledger) -> None:
    ledger.suppress(entries("sms", 2) + entries("push", 1, "unregistered"))
    assert ledger.suppression_reasons("sms", ["sms-0000", "sms-0001", "nope"]) == {
        "sms-0000": "opt-out",
        "sms-0001": "opt-out",
    }
    assert ledger.suppression_reasons("email", ["sms-0000"]) == {}
    assert ledger.suppressed("sms", {"sms-0001", "nope"}) == {"sms-0001"}
    assert ledger.suppressed_channels(["sms", "email", "push"]) == {"sms", "push"}
    assert ledger.suppression_reasons("sms", []) == {}


def test_unsuppress(ledger: Ledger) -> None:
    ledger.suppress(entries("sms", 3))
    assert ledger.unsuppress("sms", ["sms-0000", "sms-0002", "nope"]) == 2
    assert ledger.unsuppress("email", ["sms-0001"]) == 0
    assert ledger.suppressed("sms", {"sms-0000", "sms-0001", "sms-0002"}) == {"sms-0001"}
    assert ledger.unsuppress("sms", []) == 0


def test_listing_newest_first_with_filters(ledger: Ledger) -> None:
    ledger.suppress(entries("sms", 3, "opt-out", NOW))
    ledger.suppress(entries("email", 2, "hard-bounce", NOW + timedelta(minutes=1)))
    ledger.suppress(entries("sms", 1, "manual", NOW + timedelta(minutes=2), start=3))
    got = ledger.latest_suppressions(limit=3)
    assert [(e.channel, e.address_hash) for e in got] == [
        ("sms", "sms-0003"),
        ("email", "email-0000"),
        ("email", "email-0001"),
    ]
    assert all(e.created_at.tzinfo is not None for e in got)
    assert [e.address_hash for e in ledger.latest_suppressions(channel="sms", reason="opt-out")] == [
        "sms-0000",
        "sms-0001",
        "sms-0002",
    ]
    assert ledger.latest_suppressions(channel="push") == []


def test_export_streams_every_entry_in_pages(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smartpush.ledger, "_STREAM_BATCH", 4)
    ledger.suppress(entries("sms", 9) + entries("email", 4) + entries("push", 1))
    every = list(ledger.iter_suppressions())
    assert len(every) == 14
    assert [(e.channel, e.address_hash) for e in every] == sorted((e.channel, e.address_hash) for e in every)
    assert [e.address_hash for e in ledger.iter_suppressions(channel="email")] == [
        f"email-{i:04d}" for i in range(4)
    ]


def test_lookup_answers_in_the_order_asked(ledger: Ledger) -> None:
    key = b"k" * 32
    ledger.suppress([entry(key, "sms", "+33612345678", "opt-out", "t", NOW)])
    ledger.suppress([entry(key, "email", "a@example.fr", "hard-bounce", "t", NOW)])
    items = [("sms", "+33612345678"), ("email", "a@example.fr"), ("sms", None), ("email", "b@example.fr")]
    assert lookup(ledger, key, items) == ["opt-out", "hard-bounce", None, None]
    assert lookup(ledger, key, items, channels={"email"}) == [None, "hard-bounce", None, None]


# applied at launch and before each send ----------------------------------------------------------
@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as s:
        yield s


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        h.close()


def project(tmp_path: Path, server: FakeProviderServer, category: str, **options: object) -> Path:
    """test_engine's project (sms then email, first-reachable) with the campaign category given."""
    campaign = make_project(tmp_path, server, **options)  # type: ignore[arg-type]
    campaign.write_text(campaign.read_text().replace("category: service", f"category: {category}"))
    config = tmp_path / "smartpush.yaml"  # information emails carry an unsubscribe link built on it
    config.write_text("public_url: http://127.0.0.1:8080\n" + config.read_text())
    return campaign


def phone(i: int) -> str:
    return f"+336{12345600 + i:08d}"


def email(i: int) -> str:
    return f"p{i}@example.fr"


def put(h: Harness, channel: str, address: str, reason: str) -> None:
    h.ledger.suppress([entry(h.config.secret_key(), channel, address, reason, "test", datetime.now(UTC))])


def by_recipient(h: Harness, run_id: str) -> dict[tuple[str, str], smartpush.ledger.MessageRecord]:
    return {(m.recipient_id, m.channel): m for m in h.ledger.messages(run_id)}


def test_launch_stores_suppressed_messages_and_the_next_channel_takes_over(
    tmp_path: Path, server: FakeProviderServer, harnesses: list[Harness]
) -> None:
    h = Harness(project(tmp_path, server, "information", rows=10, size=4))
    harnesses.append(h)
    h.worker.stop()
    put(h, "sms", phone(1), "opt-out")  # → email takes over
    put(h, "sms", phone(2), "opt-out")
    put(h, "email", email(2), "hard-bounce")  # → nothing left for 2
    put(h, "email", email(3), "complaint")  # a fallback that will never be needed: suppressed too
    result = launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None)
    run_id = result.run.id
    assert result.suppressed == 4
    m = by_recipient(h, run_id)
    assert (m["1", "sms"].status, m["1", "sms"].error_code) == (Status.SUPPRESSED, "opt-out")
    assert m["1", "sms"].error_text == "the address is on the sms suppression list (opt-out)"
    assert m["1", "email"].status is Status.CREATED
    assert (m["2", "sms"].status, m["2", "email"].status) == (Status.SUPPRESSED, Status.SUPPRESSED)
    assert m["2", "email"].error_code == "hard-bounce"
    assert (m["3", "sms"].status, m["3", "email"].status) == (Status.CREATED, Status.SUPPRESSED)
    assert (m["4", "sms"].status, m["4", "email"].status) == (Status.CREATED, Status.WAITING)
    assert all(x.final_at is not None for x in m.values() if x.status is Status.SUPPRESSED)
    # Recipients × channels = the sum of statuses, at launch and at the end.
    assert sum(h.ledger.counts(run_id).values()) == 10 * 2
    h.worker = h.engine.worker(2)
    h.engine.resume(run_id)
    h.wait(run_id)
    assert h.statuses(run_id) == {
        "sms": {"sent": 8, "suppressed": 2},
        "email": {"sent": 1, "suppressed": 2, "skipped": 7},
    }
    sent_to = {r.json["to"] for r in server.requests}
    assert phone(1) not in sent_to and phone(2) not in sent_to and email(2) not in sent_to
    assert email(1) in sent_to


def test_launch_looks_nothing_up_while_the_list_is_empty(
    tmp_path: Path, server: FakeProviderServer, harnesses: list[Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(project(tmp_path, server, "information", rows=2500, size=500))
    harnesses.append(h)
    h.worker.stop()
    calls: list[tuple[str, int]] = []
    real = Ledger.suppression_reasons

    def counted(self: Ledger, channel: str, hashes: object) -> dict[str, str]:
        calls.append((channel, len(hashes)))  # type: ignore[arg-type]
        return real(self, channel, hashes)  # type: ignore[arg-type]

    monkeypatch.setattr(Ledger, "suppression_reasons", counted)
    launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None)
    assert calls == []
    put(h, "email", email(7), "opt-out")  # only the email list holds entries now
    result = launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None)
    assert calls == [("email", 2000), ("email", 500)]  # one lookup per split batch, email only
    assert result.suppressed == 1
    assert sum(h.ledger.counts(result.run.id).values()) == 2500 * 2


def test_an_opt_out_received_mid_run_stops_the_next_message(
    tmp_path: Path, server: FakeProviderServer, harnesses: list[Harness]
) -> None:
    h = Harness(project(tmp_path, server, "information", rows=40, size=5, sms_rate="10/s"))
    harnesses.append(h)
    run_id = h.launch()
    deadline = time.monotonic() + 10
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.requests, "nothing was sent"
    # A STOP reply from recipient 35 arrives while the run sends (4 s at 10/s): its SMS is still queued.
    put(h, "sms", phone(35), "opt-out")
    h.wait(run_id)
    m = by_recipient(h, run_id)
    assert (m["35", "sms"].status, m["35", "sms"].error_code) == (Status.SUPPRESSED, "opt-out")
    assert m["35", "sms"].attempts == 0
    assert m["35", "email"].status is Status.SENT  # first-reachable: the next channel took over
    assert phone(35) not in {r.json["to"] for r in server.requests}
    assert h.statuses(run_id) == {
        "sms": {"sent": 39, "suppressed": 1},
        "email": {"sent": 1, "skipped": 39},
    }


def test_an_opt_out_stops_a_message_already_claimed_and_waiting_for_its_turn(
    tmp_path: Path, server: FakeProviderServer, harnesses: list[Harness]
) -> None:
    # One segment of 12, all claimed in one batch, sent at 4/s: the last waits about 3 s for its turn.
    h = Harness(project(tmp_path, server, "information", rows=12, size=12, sms_rate="4/s"))
    harnesses.append(h)
    run_id = h.launch()
    deadline = time.monotonic() + 10
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.requests, "nothing was sent"
    put(h, "sms", phone(11), "opt-out")  # its message is claimed already, waiting for the rate
    h.wait(run_id)
    m = by_recipient(h, run_id)
    assert (m["11", "sms"].status, m["11", "sms"].error_code) == (Status.SUPPRESSED, "opt-out")
    assert phone(11) not in {r.json["to"] for r in server.requests}
    assert m["11", "email"].status is Status.SENT  # first-reachable: the next channel took over


def test_a_service_notice_reaches_an_opted_out_address_on_record_but_not_a_dead_one(
    tmp_path: Path, server: FakeProviderServer, harnesses: list[Harness]
) -> None:
    h = Harness(project(tmp_path, server, "service", rows=6, size=3))
    harnesses.append(h)
    put(h, "sms", phone(0), "opt-out")
    put(h, "sms", phone(1), "complaint")
    put(h, "sms", phone(2), "hard-bounce")
    put(h, "sms", phone(3), "manual")
    run_id = h.launch()
    h.wait(run_id)
    m = by_recipient(h, run_id)
    assert (m["0", "sms"].status, m["0", "sms"].bypassed) == (Status.SENT, "opt-out")
    assert (m["1", "sms"].status, m["1", "sms"].bypassed) == (Status.SENT, "complaint")
    assert (m["2", "sms"].status, m["2", "sms"].error_code) == (Status.SUPPRESSED, "hard-bounce")
    assert (m["3", "sms"].status, m["3", "sms"].error_code) == (Status.SUPPRESSED, "manual")
    assert m["2", "email"].status is Status.SENT and m["2", "email"].bypassed is None
    assert m["4", "sms"].status is Status.SENT and m["4", "sms"].bypassed is None
    sent_to = {r.json["to"] for r in server.requests}
    assert {phone(0), phone(1)} <= sent_to and not {phone(2), phone(3)} & sent_to


def test_before_sending_a_service_notice_bypasses_an_opt_out_added_after_launch(
    tmp_path: Path, server: FakeProviderServer, harnesses: list[Harness]
) -> None:
    """The check before each send applies the same policy as the launch."""
    from smartpush.sending import process_segment

    h = Harness(project(tmp_path, server, "service", rows=3, size=3))
    harnesses.append(h)
    h.worker.stop()
    run_id = launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None).run.id
    put(h, "sms", phone(0), "opt-out")
    put(h, "sms", phone(1), "unregistered")
    process_segment(h.engine.rt, lambda run, seg, delay: None, run_id, 0)
    process_segment(h.engine.rt, lambda run, seg, delay: None, run_id, 0)  # the email fallback
    m = by_recipient(h, run_id)
    assert (m["0", "sms"].status, m["0", "sms"].bypassed) == (Status.SENT, "opt-out")
    assert (m["1", "sms"].status, m["1", "sms"].error_code) == (Status.SUPPRESSED, "unregistered")
    assert m["1", "email"].status is Status.SENT
    assert (m["2", "sms"].status, m["2", "sms"].bypassed) == (Status.SENT, None)
    h.worker = h.engine.worker(1)
