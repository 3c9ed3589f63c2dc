"""The ledger, run against both databases it serves: SQLite (a file in tmp_path) and PostgreSQL.

PostgreSQL is the real server CI starts (``SMARTPUSH_TEST_POSTGRESQL``, default the local ``test``
database); each test gets a schema of its own, dropped afterwards. Without a reachable server the
PostgreSQL cases are skipped, and say why.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone
from multiprocessing.pool import ThreadPool
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError, OperationalError

from smartpush import ledger_schema
from smartpush.errors import ConfigError, InfrastructureError, RunNotFound
from smartpush.ledger import (
    FINAL,
    Fallbacks,
    Ledger,
    MessageRecord,
    NewMessage,
    NewRecipient,
    Result,
    RunRecord,
    RunState,
    Status,
)

PG_URL = os.environ.get("SMARTPUSH_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/test")
CHANNELS = ("sms", "email", "push")


# Fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable ({exc}); set SMARTPUSH_TEST_POSTGRESQL")
    schema = f"ledger_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{PG_URL}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    led = Ledger(db_url)
    led.migrate()
    yield led
    led.close()


@pytest.fixture
def other_ledger(db_url: str) -> Iterator[Ledger]:
    """A second instance on the same database: another process, as far as the database can tell."""
    led = Ledger(db_url)
    yield led
    led.close()


_ids = iter(range(10**9))


def new_id() -> str:
    return f"{next(_ids):010d}{secrets.token_hex(6)}"


def make_run(ledger: Ledger, *, key: str | None = None, campaign: str = "rentree", **kw: object) -> RunRecord:
    run, created = ledger.create_run(
        RunRecord(
            id=new_id(),
            campaign=campaign,
            campaign_file="/srv/campaigns/rentree.yaml",
            config_file=None,
            key=key,
            channels=list(CHANNELS),
            **kw,  # type: ignore[arg-type]
        )
    )
    assert created
    return run


def fill(
    ledger: Ledger,
    run: RunRecord,
    n: int,
    *,
    first_line: int = 2,
    segment_size: int = 10,
    fallback: bool = False,
    channels: tuple[str, ...] = CHANNELS,
) -> list[NewMessage]:
    """``n`` recipients × ``channels``; with ``fallback`` only the first channel is ``created``."""
    recipients, messages = [], []
    for i in range(n):
        rid = f"r{first_line + i:06d}"
        segment = i // segment_size
        recipients.append(
            NewRecipient(rid, segment, first_line + i, {"prenom": f"Jeanne {i}", "age": 40 + i})
        )
        for index, channel in enumerate(channels):
            status = Status.WAITING if fallback and index else Status.CREATED
            messages.append(NewMessage(new_id(), rid, segment, channel, index, f"{channel}-main", status))
    ledger.add_batch(run.id, recipients, messages)
    return messages


def start(ledger: Ledger, run: RunRecord, recipients: int) -> None:
    ledger.update_split(run.id, split_line=recipients + 1, segments=1, recipients=recipients, complete=True)
    assert ledger.set_run_state(run.id, RunState.RUNNING)


def by_id(ledger: Ledger, run: RunRecord) -> dict[str, MessageRecord]:
    return {m.id: m for m in ledger.messages(run.id)}


@contextmanager
def opened(url: str) -> Iterator[Ledger]:
    led = Ledger(url)
    try:
        yield led
    finally:
        led.close()


def now() -> datetime:
    return datetime.now(UTC)


def sql(url: str, statement: str) -> list[tuple[object, ...]]:
    """Run one statement on the database behind a ledger URL (for looking under the hood)."""
    with opened(url) as led, led._tx() as conn:
        result = conn.execute(text(statement))
        return [tuple(row) for row in result] if result.returns_rows else []


# URLs and connections ----------------------------------------------------------------------------
def test_postgresql_urls_of_every_spelling_use_psycopg() -> None:
    for url in ("postgres://u@h/db", "postgresql://u@h/db", "postgresql+psycopg://u@h/db"):
        led = Ledger(url)
        assert led._engine.dialect.name == "postgresql"
        assert led._engine.dialect.driver == "psycopg"
        led.close()


def test_a_relative_sqlite_path_is_taken_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    led = Ledger("sqlite:///relative.db")
    monkeypatch.chdir("/")  # later moves of the process do not move the database
    led.migrate()
    led.close()
    assert (tmp_path / "relative.db").exists()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    with opened(url) as led:
        led.migrate()
    pragmas = [
        sql(url, f"PRAGMA {name}")[0][0]
        for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
    ]
    assert pragmas == ["wal", 1, 30_000, 1]  # synchronous 1 = NORMAL


def test_an_unknown_url_scheme_says_which_ones_work() -> None:
    with pytest.raises(ConfigError, match=r"'mysql' is not supported: use sqlite:///.*postgresql://"):
        Ledger("mysql://u@h/db")


def test_an_unreachable_database_is_an_infrastructure_error_without_the_password() -> None:
    led = Ledger("postgresql://smartpush:s3cret@127.0.0.1:1/ledger?connect_timeout=2")
    with pytest.raises(InfrastructureError, match=r"127\.0\.0\.1:1/ledger") as caught:
        led.migrate()
    assert "s3cret" not in str(caught.value)
    assert caught.value.exit_code == 4
    led.close()


def test_in_memory_sqlite_is_shared_by_threads() -> None:
    led = Ledger("sqlite://")
    led.migrate()
    run = make_run(led)
    messages = fill(led, run, 40)

    def work(chunk: list[str]) -> set[str]:
        won = led.claim(chunk, now())
        led.record([Result(m, Status.SENT) for m in won], now())
        return won

    ids = [m.id for m in messages]
    with ThreadPool(8) as pool:
        won = pool.map(work, [ids[i::8] for i in range(8)])
    assert set().union(*won) == set(ids)
    assert led.counts(run.id) == {(c, Status.SENT): 40 for c in CHANNELS}
    led.close()


# Schema ------------------------------------------------------------------------------------------
def test_the_tables_hold_every_field_of_the_records() -> None:
    run_columns = set(ledger_schema.runs.c.keys())
    assert {f.name for f in fields(RunRecord)} == run_columns
    message_columns = set(ledger_schema.messages.c.keys())
    assert {f.name for f in fields(MessageRecord)} - {"line", "context"} | {"updated_at"} == message_columns


def test_migrate_twice_is_harmless(db_url: str) -> None:
    for _ in range(2):
        with opened(db_url) as led:
            led.migrate()
            led.migrate()
    assert sql(db_url, "SELECT version FROM schema_version") == [(ledger_schema.current_version(),)]


def test_a_version_2_database_is_upgraded_in_place(ledger: Ledger, db_url: str) -> None:
    # Given a version-2 ledger (before receipts and the `bypassed` column) holding a run
    run = make_run(ledger)
    sql(db_url, "DROP TABLE receipts")
    sql(db_url, "ALTER TABLE messages DROP COLUMN bypassed")
    sql(db_url, "UPDATE schema_version SET version = 2")
    # When this smartpush opens it
    with opened(db_url) as led:
        led.migrate()
        # Then the run is still there and version 3's table and column exist
        assert led.get_run(run.id) == run
    assert sql(db_url, "SELECT count(*) FROM receipts") == [(0,)]
    assert sql(db_url, "SELECT count(bypassed) FROM messages") == [(0,)]
    assert sql(db_url, "SELECT version FROM schema_version") == [(ledger_schema.current_version(),)]


def test_a_version_3_database_gets_the_occurrences_table(ledger: Ledger, db_url: str) -> None:
    run = make_run(ledger)
    sql(db_url, "DROP TABLE occurrences")
    sql(db_url, "UPDATE schema_version SET version = 3")
    with opened(db_url) as led:
        led.migrate()
        assert led.get_run(run.id) == run
        assert led.occurrences("any") == []
    assert sql(db_url, "SELECT version FROM schema_version") == [(4,)]


def test_a_database_from_a_newer_smartpush_is_refused(ledger: Ledger, db_url: str) -> None:
    sql(db_url, f"UPDATE schema_version SET version = {ledger_schema.current_version() + 1}")
    with (
        opened(db_url) as newer,
        pytest.raises(
            InfrastructureError,
            match=rf"schema version {ledger_schema.current_version() + 1}.*upgrade smartpush",
        ),
    ):
        newer.migrate()


def test_tables_made_before_the_version_table_are_adopted(db_url: str) -> None:
    # Given version-1 tables created the old way, without a schema_version row, and a run in them
    led = Ledger(db_url)
    with led._tx() as conn:
        ledger_schema.metadata.create_all(conn, tables=[ledger_schema.runs, ledger_schema.recipients])
        ledger_schema.metadata.create_all(conn, tables=[ledger_schema.messages])
    run = make_run(led)
    # When it is migrated
    led.migrate()
    # Then the data is still there and the version recorded
    assert led.get_run(run.id) == run
    assert sql(db_url, "SELECT version FROM schema_version") == [(ledger_schema.current_version(),)]
    led.close()


def test_migrations_run_step_by_step_once(
    ledger: Ledger, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a database at today's version holding a run, and a smartpush that knows one more step
    run = make_run(ledger)
    calls: list[int] = []
    future = ledger_schema.current_version() + 1

    def step(conn: Connection) -> None:
        calls.append(future)
        conn.execute(text("CREATE TABLE future_things (id VARCHAR NOT NULL)"))

    monkeypatch.setattr(ledger_schema, "MIGRATIONS", [*ledger_schema.MIGRATIONS, step])
    # When two workers migrate
    ledger.migrate()
    with opened(db_url) as other:
        other.migrate()
    # Then the step ran once, the version moved on, and the data is intact
    assert calls == [future]
    assert sql(db_url, "SELECT version FROM schema_version") == [(future,)]
    assert ledger.get_run(run.id) == run
    assert sql(db_url, "SELECT count(*) FROM future_things") == [(0,)]


def test_concurrent_migrations_do_not_race(db_url: str) -> None:
    ledgers = [Ledger(db_url) for _ in range(4)]
    with ThreadPool(4) as pool:
        pool.map(Ledger.migrate, ledgers)
    assert sql(db_url, "SELECT version FROM schema_version") == [(ledger_schema.current_version(),)]
    for led in ledgers:
        led.close()


# Runs --------------------------------------------------------------------------------------------
def test_create_run_round_trips_every_field(ledger: Ledger) -> None:
    paris = timezone(timedelta(hours=2))
    run = RunRecord(
        id=new_id(),
        campaign="canicule",
        campaign_file="/srv/c/canicule.yaml",
        config_file="/srv/smartpush.yaml",
        key="canicule-2026-07-01",
        category="service",
        priority="high",
        strategy="all",
        channels=["sms", "push"],
        segment_size=250,
        parent_run_id="0123456789abcdef",
        test=True,
        not_after=datetime(2026, 7, 1, 20, 0, tzinfo=paris),
        created_at=datetime(2026, 7, 1, 8, 0, tzinfo=paris),
    )
    stored, created = ledger.create_run(run)
    assert created
    assert stored == run  # aware datetimes compare by instant
    assert stored.not_after is not None
    assert stored.not_after.tzinfo is UTC
    assert stored.not_after.hour == 18
    assert ledger.get_run(run.id) == run


def test_create_run_is_idempotent_on_its_key(ledger: Ledger) -> None:
    first = make_run(ledger, key="weekly-2026-w48")
    again, created = ledger.create_run(
        RunRecord(
            id=new_id(), campaign="rentree", campaign_file="/x.yaml", config_file=None, key="weekly-2026-w48"
        )
    )
    assert not created
    assert again == first
    assert len(ledger.list_runs()) == 1


def test_runs_without_a_key_never_collide_but_ids_do(ledger: Ledger) -> None:
    a, b = make_run(ledger), make_run(ledger)
    assert a.key is None
    assert b.key is None
    assert a.created_at is not None
    assert a.created_at.tzinfo is UTC
    with pytest.raises(ValueError, match="already exists"):
        ledger.create_run(RunRecord(id=a.id, campaign="x", campaign_file="/x", config_file=None, key="k"))


def test_find_run_by_id_key_and_prefix(ledger: Ledger) -> None:
    run = make_run(ledger, key="nightly")
    other = make_run(ledger)
    assert ledger.find_run(run.id) == run
    assert ledger.find_run("nightly") == run
    assert ledger.find_run(f"  {run.id[:12]} ") == run  # ids share their first 10 characters here
    assert ledger.find_run(other.id[:12]) == other


def test_find_run_says_what_is_wrong(ledger: Ledger) -> None:
    a = make_run(ledger)
    b = make_run(ledger)
    common = next(a.id[:i] for i in range(len(a.id), 0, -1) if b.id.startswith(a.id[:i]))
    assert len(common) >= 6
    with pytest.raises(
        RunNotFound, match=rf"'{common[:6]}' is ambiguous.*{a.id}.*`smartpush runs` lists runs"
    ):
        ledger.find_run(common[:6])
    with pytest.raises(RunNotFound, match=r"no run has the id or key 'nope42': `smartpush runs` lists runs"):
        ledger.find_run("nope42")
    with pytest.raises(RunNotFound, match=r"'00' \(a shortened id needs at least 6 characters\)"):
        ledger.find_run("00")
    with pytest.raises(RunNotFound, match="no run"):
        ledger.find_run(a.id.upper() + "%")  # neither case-blind nor a LIKE pattern


def test_list_runs_newest_first(ledger: Ledger) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    made = [
        make_run(ledger, campaign="a" if i % 2 else "b", created_at=base + timedelta(days=i))
        for i in range(5)
    ]
    assert [r.id for r in ledger.list_runs()] == [r.id for r in reversed(made)]
    assert [r.id for r in ledger.list_runs(campaign="a")] == [made[3].id, made[1].id]
    assert len(ledger.list_runs(limit=2)) == 2


def test_run_states_move_only_from_what_is_allowed(ledger: Ledger) -> None:
    run = make_run(ledger)
    assert not ledger.set_run_state(run.id, RunState.RUNNING, only_from=frozenset({RunState.PAUSED}))
    assert ledger.set_run_state(run.id, RunState.RUNNING, only_from=frozenset({RunState.SPLITTING}))
    assert not ledger.set_run_state(run.id, RunState.RUNNING)  # already there
    started = ledger.get_run(run.id)
    assert started is not None
    assert started.state is RunState.RUNNING
    assert started.started_at is not None
    assert ledger.set_run_state(run.id, RunState.PAUSED)
    assert ledger.set_run_state(run.id, RunState.RUNNING)
    assert ledger.set_run_state(run.id, RunState.CANCELLED)
    final = ledger.get_run(run.id)
    assert final is not None
    assert final.started_at == started.started_at  # the first start is kept
    assert final.finished_at is not None
    assert final.finished_at.tzinfo is UTC
    assert not ledger.set_run_state("no-such-run", RunState.PAUSED)


def test_update_split_records_progress(ledger: Ledger) -> None:
    run = make_run(ledger)
    ledger.update_split(run.id, split_line=1001, segments=2, recipients=1000)
    ledger.update_split(run.id, split_line=1501, segments=3, recipients=1500, complete=True)
    stored = ledger.get_run(run.id)
    assert stored is not None
    assert (stored.split_line, stored.segments, stored.recipients, stored.split_complete) == (
        1501,
        3,
        1500,
        True,
    )


# Split -------------------------------------------------------------------------------------------
def test_add_batch_twice_inserts_once(ledger: Ledger) -> None:
    run = make_run(ledger)
    recipients = [NewRecipient(f"r{i}", 0, i + 2, {"n": i}) for i in range(5)]
    first = [
        NewMessage(new_id(), r.recipient_id, 0, "sms", 0, "sms-main", Status.CREATED) for r in recipients
    ]
    ledger.add_batch(run.id, recipients, first)
    # The same batch again, then a re-split of it that made fresh message ids
    ledger.add_batch(run.id, recipients, first)
    fresh = [NewMessage(new_id(), m.recipient_id, 0, "sms", 0, "sms-main", Status.CREATED) for m in first]
    ledger.add_batch(run.id, recipients, fresh)
    assert sorted(by_id(ledger, run)) == sorted(m.id for m in first)


def test_a_fresh_batch_found_stored_already_is_written_again_safely(ledger: Ledger) -> None:
    """`fresh` copies straight into the tables (PostgreSQL); a row there already falls back to the
    conflict-checked insert instead of failing the launch, and nothing is stored twice."""
    run = make_run(ledger)
    recipients = [NewRecipient(f"r{i}", 0, i + 2, {"n": i}) for i in range(5)]
    first = [
        NewMessage(new_id(), r.recipient_id, 0, "sms", 0, "sms-main", Status.CREATED) for r in recipients
    ]
    ledger.add_batch(run.id, recipients[:2], first[:2], fresh=True)
    ledger.add_batch(run.id, recipients, first, fresh=True)  # 2 of them are there already
    again = [NewMessage(new_id(), m.recipient_id, 0, "sms", 0, "sms-main", Status.CREATED) for m in first]
    ledger.add_batch(run.id, recipients, again, fresh=True)
    assert sorted(by_id(ledger, run)) == sorted(m.id for m in first)
    assert sum(ledger.counts(run.id).values()) == 5


def test_add_batch_keeps_what_the_split_decided(ledger: Ledger) -> None:
    run = make_run(ledger)
    recipients = [NewRecipient("r1", 0, 2, {"prenom": "Zoé", "tags": ["a", "b"], "n": 1.5, "none": None})]
    messages = [
        NewMessage(new_id(), "r1", 0, "sms", 0, "sms-main", Status.CREATED, address="+33612345678"),
        NewMessage(
            new_id(), "r1", 0, "email", 1, "smtp", Status.INVALID, None, "invalid-email", "no @ in it"
        ),
    ]
    ledger.add_batch(run.id, recipients, messages)
    sms, email = ledger.messages(run.id, with_context=True)
    assert (sms.status, sms.address, sms.attempts, sms.final_at, sms.line) == (
        Status.CREATED,
        "+33612345678",
        0,
        None,
        2,
    )
    assert sms.context == {"prenom": "Zoé", "tags": ["a", "b"], "n": 1.5, "none": None}
    assert (email.status, email.error_code, email.error_text) == (
        Status.INVALID,
        "invalid-email",
        "no @ in it",
    )
    assert email.final_at is not None  # born final
    assert email.created_at.tzinfo is UTC


def test_add_batch_refuses_a_message_without_its_recipient(ledger: Ledger) -> None:
    run = make_run(ledger)
    with pytest.raises(ValueError, match="not among the batch's recipients"):
        ledger.add_batch(run.id, [], [NewMessage(new_id(), "ghost", 0, "sms", 0, "sms-main", Status.CREATED)])
    assert list(ledger.messages(run.id)) == []


def test_add_batch_is_one_transaction(ledger: Ledger) -> None:
    run = make_run(ledger)
    fill(ledger, run, 1000, segment_size=500)
    # A batch whose last row the database refuses leaves nothing behind, not even its recipients
    recipients = [NewRecipient(f"x{i}", 9, 5000 + i, {}) for i in range(1000)]
    messages = [NewMessage(new_id(), r.recipient_id, 9, "sms", 0, "p", Status.CREATED) for r in recipients]
    messages[-1].channel = None  # type: ignore[assignment]
    with pytest.raises(IntegrityError):
        ledger.add_batch(run.id, recipients, messages)
    assert sum(ledger.counts(run.id).values()) == 3000
    assert ledger.pending_segments(run.id) == [0, 1]


# Sending -----------------------------------------------------------------------------------------
def test_due_gives_a_segment_in_audience_order_with_context(ledger: Ledger) -> None:
    run = make_run(ledger)
    recipients = [NewRecipient(f"r{line}", 0, line, {"line": line}) for line in (7, 3, 5)]
    messages = [
        NewMessage(new_id(), r.recipient_id, 0, ch, i, "p", Status.CREATED)
        for r in recipients
        for i, ch in reversed(list(enumerate(CHANNELS)))
    ]
    ledger.add_batch(run.id, recipients, messages)
    fill(ledger, run, 5, first_line=100, segment_size=1)  # segments 0-4, other lines
    due = ledger.due(run.id, 0, now())
    assert [(m.line, m.channel_index) for m in due[:9]] == [(line, i) for line in (3, 5, 7) for i in range(3)]
    assert [m.line for m in due[9:]] == [100, 100, 100]
    assert due[0].context == {"line": 3}
    assert all(m.context is not None and m.context.get("line", m.line) == m.line for m in due)
    assert [m.channel_index for m in ledger.due(run.id, 0, now(), limit=2)] == [0, 1]
    assert [m.line for m in ledger.due(run.id, 4, now())] == [104, 104, 104]


def test_claim_moves_created_to_sending_once(ledger: Ledger) -> None:
    run = make_run(ledger)
    messages = fill(ledger, run, 4, fallback=True)
    ids = [m.id for m in messages]
    t = now()
    won = ledger.claim([*ids, "no-such-message"], t)
    assert won == {m.id for m in messages if m.status == Status.CREATED}
    assert ledger.claim(ids, t) == set()
    stored = by_id(ledger, run)
    assert {stored[i].status for i in won} == {Status.SENDING}
    assert {stored[i].sending_at for i in won} == {t}


def test_claims_racing_on_the_same_ids_have_disjoint_winners(ledger: Ledger, other_ledger: Ledger) -> None:
    run = make_run(ledger)
    ids = [m.id for m in fill(ledger, run, 400, segment_size=400)]
    # Eight claimers on two instances (two connection pools), each asking for all ids, in its own order
    claimers = [(ledger if i % 2 else other_ledger, ids[i * 150 :] + ids[: i * 150]) for i in range(8)]
    with ThreadPool(8) as pool:
        won = pool.starmap(lambda led, order: led.claim(order, now()), claimers)
    assert sum(len(w) for w in won) == len(ids)
    assert set().union(*won) == set(ids)


def test_record_applies_results_in_bulk(ledger: Ledger) -> None:
    run = make_run(ledger)
    sent, failed, delivered, retried, throttled = (m.id for m in fill(ledger, run, 5, channels=("sms",)))
    t0 = now()
    ledger.claim([sent, failed, delivered, retried, throttled], t0)
    t1 = t0 + timedelta(seconds=2)
    later = t1 + timedelta(minutes=5)
    ledger.record(
        [
            Result(sent, Status.SENT, provider="sms-backup", provider_reference="SM123"),
            Result(failed, Status.PERMANENT_FAILURE, error_code="21211", error_text="not a mobile number"),
            Result(delivered, Status.DELIVERED, provider_reference="SM124"),
            Result(
                retried, Status.CREATED, error_code="503", error_text="unavailable", next_attempt_at=later
            ),
            Result(throttled, Status.CREATED, attempted=False, error_code="429", next_attempt_at=later),
        ],
        t1,
    )
    m = by_id(ledger, run)
    assert (m[sent].status, m[sent].attempts, m[sent].provider, m[sent].provider_reference) == (
        Status.SENT,
        1,
        "sms-backup",
        "SM123",
    )
    assert (m[sent].sent_at, m[sent].final_at, m[sent].next_attempt_at) == (t1, t1, None)
    assert (m[failed].status, m[failed].error_code, m[failed].final_at, m[failed].sent_at) == (
        Status.PERMANENT_FAILURE,
        "21211",
        t1,
        None,
    )
    assert m[failed].provider == "sms-main"  # a result without a provider keeps the stored one
    assert (m[delivered].sent_at, m[delivered].delivered_at, m[delivered].final_at) == (t1, t1, t1)
    assert (m[retried].status, m[retried].attempts, m[retried].next_attempt_at) == (Status.CREATED, 1, later)
    assert m[retried].final_at is None
    assert (m[throttled].status, m[throttled].attempts) == (Status.CREATED, 0)  # throttling spends no attempt
    # The retries are due at their time, not before, and are then claimable again
    assert ledger.due(run.id, 0, t1) == []
    assert {x.id for x in ledger.due(run.id, 0, later)} == {retried, throttled}
    assert ledger.claim([retried], t1) == set()  # not yet due: not claimable either
    assert ledger.claim([retried], later) == {retried}
    ledger.record([Result(retried, Status.SENT)], later)
    assert by_id(ledger, run)[retried].attempts == 2


def test_record_touches_only_messages_still_sending(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    run = make_run(ledger)
    a, b = (m.id for m in fill(ledger, run, 2, channels=("sms",)))
    ledger.claim([a], now())
    ledger.record([Result(a, Status.SENT, provider_reference="ref-1")], now())
    # A late duplicate result, and one for a message never claimed
    ledger.record([Result(a, Status.TEMPORARY_FAILURE), Result(b, Status.SENT)], now())
    m = by_id(ledger, run)
    assert (m[a].status, m[a].attempts, m[a].provider_reference) == (Status.SENT, 1, "ref-1")
    assert (m[b].status, m[b].attempts) == (Status.CREATED, 0)
    assert "2 of 2 results were for messages no longer sending" in caplog.text
    with pytest.raises(ValueError, match="cannot put message"):
        ledger.record([Result(a, Status.SENDING)], now())
    ledger.record([], now())


def test_results_and_their_fallbacks_are_one_transaction(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies after recording must not leave a recipient's next channel `waiting` for ever:
    the fallbacks are settled in the transaction that records the results, or neither is stored."""
    run = make_run(ledger)
    messages = fill(ledger, run, 2, fallback=True)
    first = {m.recipient_id: m.id for m in messages if m.channel_index == 0}
    ledger.claim(list(first.values()), now())
    results = [Result(first["r000002"], Status.PERMANENT_FAILURE), Result(first["r000003"], Status.SENT)]
    fallbacks = Fallbacks(run.id, reached={"sms": ["r000003"]}, dead_end={0: ["r000002"]})

    def dies(*args: object, **kwargs: object) -> int:
        raise OperationalError("UPDATE", {}, Exception("the server closed the connection"))

    monkeypatch.setattr(Ledger, "_activate_fallbacks", staticmethod(dies))
    with pytest.raises(InfrastructureError):
        ledger.record(results, now(), fallbacks=fallbacks)
    m = by_id(ledger, run)
    assert {m[i].status for i in first.values()} == {Status.SENDING}  # nothing half-recorded
    monkeypatch.undo()
    assert ledger.record(results, now(), fallbacks=fallbacks) == {"sms": 2}
    m = by_id(ledger, run)
    by_recipient = {
        rid: [m[x.id].status for x in messages if x.recipient_id == rid] for rid in ("r000002", "r000003")
    }
    assert by_recipient == {
        "r000002": [Status.PERMANENT_FAILURE, Status.CREATED, Status.WAITING],
        "r000003": [Status.SENT, Status.SKIPPED, Status.SKIPPED],
    }


def test_fallbacks_are_activated_one_channel_at_a_time_or_skipped(ledger: Ledger) -> None:
    run = make_run(ledger)
    messages = fill(ledger, run, 3, fallback=True)
    chain = {
        rid: [m.id for m in messages if m.recipient_id == rid] for rid in ("r000002", "r000003", "r000004")
    }
    # r2's SMS failed for good: its email (not its push) becomes created
    assert ledger.activate_fallbacks(run.id, ["r000002"], 0) == 1
    # r2's email failed too: then the push
    assert ledger.activate_fallbacks(run.id, ["r000002", "r000002"], 1) == 1
    assert ledger.activate_fallbacks(run.id, ["r000002"], 2) == 0
    # r3 was reached by SMS: its other channels are skipped
    t = now()
    assert ledger.skip_fallbacks(run.id, ["r000003", "no-such"], "reached by sms", t) == 2
    m = by_id(ledger, run)
    assert [m[i].status for i in chain["r000002"]] == [Status.CREATED] * 3
    assert [m[i].status for i in chain["r000003"]] == [Status.CREATED, Status.SKIPPED, Status.SKIPPED]
    assert [(m[i].error_text, m[i].final_at) for i in chain["r000003"][1:]] == [("reached by sms", t)] * 2
    assert [m[i].status for i in chain["r000004"]] == [Status.CREATED, Status.WAITING, Status.WAITING]


def test_expire_and_cancel_leave_sending_and_final_messages_alone(ledger: Ledger) -> None:
    run = make_run(ledger)
    old = fill(ledger, run, 30, fallback=True, segment_size=3)  # 10 segments
    time.sleep(0.002)
    cut = now()
    time.sleep(0.002)
    new = fill(ledger, run, 2, first_line=500, fallback=True)
    start(ledger, run, 32)
    sending, sent = old[0].id, old[3].id
    ledger.claim([sending, sent], now())
    ledger.record([Result(sent, Status.SENT)], now())
    t = now()
    assert ledger.expire(run.id, created_before=cut, now=t, reason="not_after passed") == 88
    m = by_id(ledger, run)
    assert (m[sending].status, m[sent].status) == (Status.SENDING, Status.SENT)
    assert {m[x.id].status for x in old if x.id not in (sending, sent)} == {Status.EXPIRED}
    assert {(m[x.id].error_text, m[x.id].final_at) for x in old[1:3]} == {("not_after passed", t)}
    assert {m[x.id].status for x in new} == {Status.CREATED, Status.WAITING}
    assert ledger.cancel_unsent(run.id, t) == 6
    assert {m.status for m in ledger.messages(run.id, statuses=[Status.CANCELLED])} == {Status.CANCELLED}
    assert ledger.expire(run.id, created_before=None, now=t, reason="again") == 0
    stored = ledger.get_run(run.id)
    assert stored is not None
    assert stored.state is RunState.RUNNING  # the caller changes the run's state


def test_next_due_and_pending_segments(ledger: Ledger) -> None:
    run = make_run(ledger)
    messages = fill(ledger, run, 30, segment_size=10, channels=("sms",))
    assert ledger.pending_segments(run.id) == [0, 1, 2]
    due_now = ledger.next_due(run.id, 1)
    assert due_now is not None
    assert due_now <= now()  # already due
    assert due_now.tzinfo is UTC
    # Segment 1: all sent but one, which retries in 10 minutes
    seg1 = [m.id for m in messages if m.segment == 1]
    ledger.claim(seg1, now())
    later = now() + timedelta(minutes=10)
    ledger.record([Result(i, Status.SENT) for i in seg1[1:]], now())
    assert ledger.pending_segments(run.id) == [0, 1, 2]  # one still sending
    ledger.record([Result(seg1[0], Status.CREATED, next_attempt_at=later)], now())
    assert ledger.next_due(run.id, 1) == later
    # Segment 2 all sent: not pending, nothing due
    seg2 = [m.id for m in messages if m.segment == 2]
    ledger.claim(seg2, now())
    ledger.record([Result(i, Status.SENT) for i in seg2], now())
    assert ledger.pending_segments(run.id) == [0, 1]
    assert ledger.next_due(run.id, 2) is None


def test_a_run_finishes_only_when_nothing_is_left_to_send(ledger: Ledger) -> None:
    run = make_run(ledger)
    messages = fill(ledger, run, 2, fallback=True)
    t = now()
    assert not ledger.finish_if_done(run.id, t)  # still splitting
    start(ledger, run, 2)
    firsts = [m.id for m in messages if m.channel_index == 0]
    ledger.claim(firsts, t)
    ledger.record([Result(i, Status.SENT) for i in firsts], t)
    assert not ledger.finish_if_done(run.id, t)  # fallbacks still waiting
    ledger.skip_fallbacks(run.id, ["r000002", "r000003"], "reached", t)
    ledger.set_run_state(run.id, RunState.PAUSED)
    assert not ledger.finish_if_done(run.id, t)  # paused runs are not finished behind the user's back
    ledger.set_run_state(run.id, RunState.RUNNING)
    assert ledger.finish_if_done(run.id, t)
    assert not ledger.finish_if_done(run.id, t)
    done = ledger.get_run(run.id)
    assert done is not None
    assert (done.state, done.finished_at) == (RunState.FINISHED, t)


def test_a_run_whose_split_is_incomplete_is_not_finished(ledger: Ledger) -> None:
    run = make_run(ledger)
    ledger.set_run_state(run.id, RunState.RUNNING)
    assert not ledger.finish_if_done(run.id, now())


# Sweeper -----------------------------------------------------------------------------------------
def test_stuck_finds_abandoned_and_overdue_segments_and_unstick_frees_them(ledger: Ledger) -> None:
    run = make_run(ledger)
    messages = fill(ledger, run, 40, segment_size=10, channels=("sms",))  # segments 0-3
    idle = make_run(ledger)  # not running: never reported
    fill(ledger, idle, 5)
    start(ledger, run, 40)
    t0 = now()
    seg = {s: [m.id for m in messages if m.segment == s] for s in range(4)}
    # 0: claimed long ago, its worker died; 1: being sent right now; 2: sent; 3: never picked up
    ledger.claim(seg[0], t0 - timedelta(hours=1))
    ledger.claim(seg[1], t0)
    ledger.claim(seg[2], t0)
    ledger.record([Result(i, Status.SENT) for i in seg[2]], t0)
    # Nothing has been due for long yet: only the abandoned segment is stuck
    assert ledger.stuck(sending_before=t0 - timedelta(minutes=10), due_before=t0 - timedelta(minutes=10)) == [
        (run.id, 0)
    ]
    # Ten minutes on, segment 3 has been due too long as well
    later = t0 + timedelta(minutes=10)
    assert ledger.stuck(sending_before=later - timedelta(minutes=30), due_before=later) == [
        (run.id, 0),
        (run.id, 3),
    ]
    # Unstick frees the abandoned messages only, for another worker to claim
    assert ledger.unstick(run.id, 0, sending_before=t0 - timedelta(minutes=10), now=t0) == 10
    assert ledger.unstick(run.id, 1, sending_before=t0 - timedelta(minutes=10), now=t0) == 0
    m = by_id(ledger, run)
    assert {m[i].status for i in seg[0]} == {Status.CREATED}
    assert {m[i].status for i in seg[1]} == {Status.SENDING}
    assert ledger.claim(seg[0], t0) == set(seg[0])
    # A retry scheduled for later is not overdue
    ledger.claim(seg[3], t0)
    ledger.record([Result(i, Status.CREATED, next_attempt_at=later + timedelta(hours=1)) for i in seg[3]], t0)
    assert ledger.stuck(sending_before=t0 - timedelta(minutes=10), due_before=later) == []


# Reading -----------------------------------------------------------------------------------------
def test_counts_add_up_to_every_message(ledger: Ledger) -> None:
    run = make_run(ledger)
    messages = fill(ledger, run, 20, fallback=True)
    firsts = [m.id for m in messages if m.channel_index == 0]
    ledger.claim(firsts, now())
    ledger.record(
        [Result(i, Status.SENT if n % 3 else Status.PERMANENT_FAILURE) for n, i in enumerate(firsts)], now()
    )
    counts = ledger.counts(run.id)
    assert sum(counts.values()) == len(messages)
    assert counts[("sms", Status.SENT)] == 13
    assert counts[("sms", Status.PERMANENT_FAILURE)] == 7
    assert counts[("email", Status.WAITING)] == 20
    assert all(isinstance(status, Status) for _, status in counts)
    assert ledger.counts("no-such-run") == {}


def test_messages_stream_in_audience_order_over_several_batches(ledger: Ledger) -> None:
    run = make_run(ledger)
    # 3,400 recipients × 3 channels = 10,200 messages: three pages of 5,000, written in two batches
    fill(ledger, run, 1700, first_line=1702, segment_size=500)
    fill(ledger, run, 1700, first_line=2, segment_size=500)
    other = make_run(ledger)
    fill(ledger, other, 3)
    streamed = ledger.messages(run.id)
    first = next(streamed)
    assert (first.line, first.channel_index, first.context) == (2, 0, None)
    rest = list(streamed)
    keys = [(m.line, m.channel_index) for m in [first, *rest]]
    assert keys == [(line, i) for line in range(2, 3402) for i in range(3)]
    assert {m.run_id for m in rest} == {run.id}
    with_context = list(ledger.messages(run.id, statuses=[Status.CREATED], with_context=True))
    assert len(with_context) == 10_200
    assert with_context[-1].context == {"prenom": "Jeanne 1699", "age": 1739}
    assert list(ledger.messages(run.id, statuses=[Status.SENT])) == []


def test_timestamps_come_back_as_aware_utc(ledger: Ledger, db_url: str) -> None:
    run = make_run(ledger)
    (message,) = fill(ledger, run, 1, channels=("sms",))
    paris = timezone(timedelta(hours=1))
    t = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=paris)
    ledger.claim([message.id], t)
    ledger.record([Result(message.id, Status.SENT)], t)
    (stored,) = ledger.messages(run.id)
    for value in (stored.created_at, stored.sending_at, stored.sent_at, stored.final_at):
        assert value is not None
        assert value.tzinfo is UTC
    assert stored.sent_at == t
    assert stored.sent_at.hour == 11
    assert stored.sent_at.microsecond == 123456
    with pytest.raises(ValueError, match="aware datetimes only"):
        ledger.claim([message.id], datetime(2026, 3, 1, 12, 0))


def test_sqlite_writers_in_many_threads_never_see_a_locked_database(tmp_path: Path) -> None:
    led = Ledger(f"sqlite:///{tmp_path / 'busy.db'}")
    led.migrate()
    run = make_run(led)
    ids = [m.id for m in fill(led, run, 600, segment_size=50)]
    errors: list[BaseException] = []

    def worker(chunk: list[str]) -> None:
        try:
            for i in range(0, len(chunk), 10):
                part = chunk[i : i + 10]
                won = led.claim(part, now())
                led.record([Result(m, Status.SENT) for m in won], now())
                led.counts(run.id)
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(ids[i::12],)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert led.counts(run.id) == {(c, Status.SENT): 600 for c in CHANNELS}
    led.close()


def test_final_statuses_are_those_of_the_spec() -> None:
    assert Status.CREATED not in FINAL
    assert {Status.SENT, Status.DELIVERED, Status.EXPIRED, Status.CANCELLED} <= FINAL


# Lookups by list: IN lists on SQLite, one array parameter on PostgreSQL ------------------------------
def test_a_claim_of_thousands_of_ids_wins_exactly_the_created_and_due_ones(ledger: Ledger) -> None:
    run = make_run(ledger)
    ids = [m.id for m in fill(ledger, run, 850, segment_size=1000)]  # 2,550 messages, all created
    t = now()
    busy = ids[:300]
    assert ledger.claim(busy, t) == set(busy)
    later, ready = busy[:100], busy[100:200]  # retries: not due yet, due already; busy[200:] stay sending
    ledger.record(
        [Result(i, Status.CREATED, next_attempt_at=t + timedelta(hours=1)) for i in later]
        + [Result(i, Status.CREATED, next_attempt_at=t - timedelta(minutes=1)) for i in ready],
        t,
    )
    other = make_run(ledger)
    fallback = fill(ledger, other, 100, fallback=True)  # 100 created, 200 waiting
    asked = [*ids, *(m.id for m in fallback), "no-such-message", "zzz-not-there-either"]
    assert len(asked) > 2_500
    expected = {*ids[300:], *ready, *(m.id for m in fallback if m.status == Status.CREATED)}
    won = ledger.claim(list(reversed(asked)), t)
    assert won == expected
    assert ledger.claim(asked, t) == set()
    stored = {**by_id(ledger, run), **by_id(ledger, other)}
    assert {i for i, m in stored.items() if m.status == Status.SENDING} == won | set(busy[200:])
    assert {stored[i].sending_at for i in won} == {t}


def test_a_suppression_lookup_of_thousands_of_hashes(ledger: Ledger) -> None:
    from smartpush.ledger import Suppression

    t = now()
    listed = [f"h{i:05d}" for i in range(1_200)]
    reasons = ("opt-out", "hard-bounce", "complaint")
    entries = [Suppression("sms", h, reasons[i % 3], "test", t) for i, h in enumerate(listed)]
    entries += [Suppression("email", h, "manual", "test", t) for h in listed[:700]]
    assert ledger.suppress(entries) == 1_900
    asked = [f"h{i:05d}" for i in range(2_500)]
    assert ledger.suppression_reasons("sms", asked) == {h: reasons[i % 3] for i, h in enumerate(listed)}
    assert ledger.suppressed("email", asked) == set(listed[:700])
    assert ledger.suppressed("push", asked) == set()
    # Made stricter in bulk: an opt-out gives way to a hard bounce (the hashes in three IN lists)
    opted_out = [h for i, h in enumerate(listed) if i % 3 != 1]
    assert ledger.suppress([Suppression("sms", h, "hard-bounce", "test", t) for h in listed]) == len(
        opted_out
    )
    assert set(ledger.suppression_reasons("sms", asked).values()) == {"hard-bounce"}
    assert ledger.unsuppress("sms", asked[:1_100]) == 1_100
    assert ledger.suppressed("sms", asked) == set(listed[1_100:])


def test_receipts_waiting_for_more_sends_than_one_lookup_holds_are_applied(ledger: Ledger) -> None:
    from smartpush.provider import Receipt
    from smartpush.receipts import IncomingReceipt

    run = make_run(ledger)
    ids = sorted(m.id for m in fill(ledger, run, 1_200, segment_size=2_000, channels=("sms",)))
    t = now()
    assert ledger.claim(ids, t) == set(ids)
    # Receipts only for the sends after the first 1,000 ids: on SQLite, in the third IN list of 500
    early = set(ids[1_000:])
    stored = ledger.store_receipts(
        [IncomingReceipt("sms-main", Receipt(f"ref-{i}", "delivered"), t) for i in sorted(early)], t
    )
    assert all(s.message is None for s in stored)
    ledger.record([Result(i, Status.SENT, provider_reference=f"ref-{i}") for i in ids], t)
    statuses = {i: m.status for i, m in by_id(ledger, run).items()}
    assert {i for i, s in statuses.items() if s == Status.DELIVERED} == early
    assert {i for i, s in statuses.items() if s == Status.SENT} == set(ids) - early
    assert [r.applied_at for r in ledger.message_receipts(ids[-1])] == [t]


def test_due_reads_every_field_as_messages_does(ledger: Ledger, db_url: str) -> None:
    run = make_run(ledger)
    messages = fill(ledger, run, 30, segment_size=100)
    t = now()
    retried = [m.id for m in messages[::4]]
    ledger.claim(retried, t)
    ledger.record(
        [
            Result(i, Status.CREATED, provider="sms-backup", error_code="429", error_text="slow down")
            for i in retried
        ],
        t,
    )
    # Every time set, and the columns due() does not read from the row but knows
    sql(
        db_url,
        "UPDATE messages SET sent_at = created_at, delivered_at = updated_at, final_at = sending_at, "
        "provider_reference = 'ref-' || id, bypassed = 'opt-out' "
        f"WHERE id IN ('{retried[0]}', '{retried[1]}')",
    )
    due = ledger.due(run.id, 0, t + timedelta(seconds=1))
    assert len(due) == 90
    expected = {m.id: m for m in ledger.messages(run.id, with_context=True)}
    assert due == [expected[m.id] for m in due]
    for record in due:
        assert type(record.status) is Status
        for name in ("created_at", "sending_at", "sent_at", "delivered_at", "final_at", "next_attempt_at"):
            value = getattr(record, name)
            assert value is None or value.tzinfo is UTC
    assert {type(m.sent_at) for m in due} == {datetime, type(None)}
    by_line: dict[int | None, list[MessageRecord]] = {}
    for record in due:
        by_line.setdefault(record.line, []).append(record)
    assert all(len({id(m.context) for m in group}) == 1 for group in by_line.values())


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_lookups_by_list_are_one_short_statement_whatever_the_count(ledger: Ledger) -> None:
    """One array parameter (``= ANY``): the same SQL text for 10 ids as for 1,000, which SQLAlchemy and
    psycopg compile once, where an IN list has a placeholder per id."""
    from sqlalchemy import event

    seen: list[tuple[str, object]] = []

    def executed(*args: object) -> None:
        statement, parameters = args[2], args[3]
        assert isinstance(statement, str)
        seen.append((statement, parameters))

    event.listen(ledger._engine, "before_cursor_execute", executed)
    t = now()

    def statements(call: object, n: int) -> list[str]:
        seen.clear()
        ids = [f"id-{i:05d}" for i in range(n)]
        assert callable(call)
        call(ids)
        for _statement, parameters in seen:
            assert isinstance(parameters, dict)
            lists = [v for v in parameters.values() if isinstance(v, list)]
            assert lists in ([], [sorted(ids)]), "one array parameter, every id in it"
        return [statement for statement, _ in seen]

    calls = {
        "claim": lambda ids: ledger.claim(ids, t),
        "suppression_reasons": lambda ids: ledger.suppression_reasons("sms", ids),
        "waiting receipts": lambda ids: ledger._apply_waiting_receipts(ids, t),
    }
    for name, call in calls.items():
        few, many = statements(call, 10), statements(call, 1_000)
        assert few == many, name
        assert len(few) == 1 and len(few[0]) < 1_000, name
        assert "ANY" in few[0], name
