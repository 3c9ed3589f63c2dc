"""How the ledger is stored: the database engine, the tables, and the steps that create and upgrade
them (see :meth:`Ledger.migrate`).

The schema version lives in the one row of ``schema_version``. ``MIGRATIONS[i]`` upgrades a database
from version ``i`` to ``i + 1``; version 0 is an empty database. A released step never changes: a new
schema is a new step appended to the list. Step 1 builds the tables from the definitions below, which
are today's; the day a step 2 changes them, freeze step 1 first (write its version-1 tables out), so
that an empty database goes 0 → 1 → 2 like every other.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import overload

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Dialect,
    Engine,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from .errors import ConfigError, InfrastructureError

__all__ = [
    "MIGRATIONS",
    "WRITE",
    "UTCDateTime",
    "current_version",
    "make_engine",
    "messages",
    "metadata",
    "occurrences",
    "receipts",
    "recipients",
    "runs",
    "schema_version",
    "suppressions",
    "upgrade",
]


#: Execution option of a connection whose transaction will write (SQLite: BEGIN IMMEDIATE).
WRITE = "smartpush_write"
#: How long an SQLite writer waits for another one before it gives up.
_BUSY_TIMEOUT_S = 30
#: Pause between tries to switch a new SQLite file to WAL while another connection does the same.
_WAL_RETRY_S = 0.02


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, always handed back as an aware UTC ``datetime``.

    PostgreSQL stores ``timestamptz``. SQLite has no time zone type: values are stored as naive UTC
    text of a fixed width (so comparing the text compares the times) and made aware again on reading.
    A naive ``datetime`` is refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"the ledger stores aware datetimes only, got naive {value.isoformat()}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return as_utc(value)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: datetime | None) -> datetime | None: ...
def as_utc(value: datetime | None) -> datetime | None:
    """A time as the driver read it, made aware UTC (SQLite's come naive, in UTC): what
    :class:`UTCDateTime` hands back, for reads that bypass its processing."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

#: The opt-out list (SPEC "Suppression"): a keyed hash per channel and address, never the address.
suppressions = Table(
    "suppressions",
    metadata,
    Column("channel", String, primary_key=True),
    Column("address_hash", String, primary_key=True),
    Column("reason", String, nullable=False),  # opt-out, hard-bounce, complaint, unregistered, manual
    Column("source", String, nullable=False),  # a provider account, `serve`, an operator
    Column("created_at", UTCDateTime, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String, primary_key=True),
    Column("campaign", String, nullable=False),
    Column("campaign_file", Text, nullable=False),
    Column("config_file", Text),
    Column("state", String, nullable=False),
    Column("key", String),
    Column("category", String, nullable=False),
    Column("priority", String, nullable=False),
    Column("strategy", String, nullable=False),
    Column("channels", Text, nullable=False),  # a JSON list of channel names
    Column("segment_size", Integer, nullable=False),
    Column("segments", Integer, nullable=False),
    Column("recipients", Integer, nullable=False),
    Column("split_line", Integer, nullable=False),
    Column("split_complete", Boolean, nullable=False),
    Column("parent_run_id", String),
    Column("test", Boolean, nullable=False),
    Column("not_after", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    # NULL keys never collide (SQL unique semantics, on both databases): only given keys are unique.
    Index(None, "key", unique=True),
)

recipients = Table(
    "recipients",
    metadata,
    Column("run_id", String, nullable=False),
    Column("recipient_id", String, nullable=False),
    Column("segment", Integer, nullable=False),
    Column("line", Integer, nullable=False),
    Column("context", Text),  # JSON object; NULL once purged
    PrimaryKeyConstraint("run_id", "recipient_id"),
    ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
    # messages() walks a run in audience order
    Index(None, "run_id", "line"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", String, primary_key=True),
    Column("run_id", String, nullable=False),
    Column("recipient_id", String, nullable=False),
    Column("segment", Integer, nullable=False),
    Column("channel", String, nullable=False),
    Column("channel_index", Integer, nullable=False),
    Column("provider", String, nullable=False),
    Column("status", String, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("address", Text),
    Column("next_attempt_at", UTCDateTime),
    Column("provider_reference", String),
    Column("error_code", String),
    Column("error_text", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sending_at", UTCDateTime),
    Column("sent_at", UTCDateTime),
    Column("delivered_at", UTCDateTime),
    Column("final_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    # A `service` message sent although its address is on the suppression list for a reason such
    # notices bypass (`opt-out`): that reason, so every such send is on record (schema 3).
    Column("bypassed", String),
    # Every message belongs to a recipient row. Ledger.add_batch, the only writer of both, checks it:
    # a foreign key's per-row trigger made the split 40% slower on PostgreSQL.
    UniqueConstraint("run_id", "recipient_id", "channel"),
    # One index serves due/claim (run, status, segment), counts/cancel/expire (run, status), the
    # pending-segment and sweeper scans (run, status, then segments in order) and, since the sweeper
    # looks only at running runs and few messages are ever `sending`, the sending_at check too.
    # Every extra index slows the split, which writes tens of millions of rows.
    Index(None, "run_id", "status", "segment"),
)

# Delivery receipts find a message by the provider's reference; rows without one (all of them while a
# run is split) stay out of the index, so it costs the split nothing.
Index(
    None,
    messages.c.provider,
    messages.c.provider_reference,
    sqlite_where=messages.c.provider_reference.is_not(None),
    postgresql_where=messages.c.provider_reference.is_not(None),
)


# Delivery receipts as `serve` received them (schema 3): the proof of what reached whom, and the
# receipts that arrive before the worker has recorded the message's provider reference (they are
# applied when it does). `message_id` is set once a receipt has been matched to its message.
receipts = Table(
    "receipts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("provider", String, nullable=False),  # the account whose webhook received it
    Column("reference", String, nullable=False),  # the provider's message reference
    Column("status", String, nullable=False),  # delivered, permanent-failure, temporary-failure
    Column("error_code", String),
    Column("error_text", Text),
    Column("occurred_at", UTCDateTime),  # the provider's own time of the event, when it gives one
    Column("received_at", UTCDateTime, nullable=False),
    Column("message_id", String),
    Column("applied_at", UTCDateTime),
    Index(None, "provider", "reference"),
)


# The slots of scheduled campaigns (schema 4): which run each slot launched, or why it was skipped, so an
# auditor can follow every 3 a.m. launch (`smartpush runs --campaign NAME`). `key` is the run key
# `send --key auto` and the scheduler use (``NAME@2026-12-01T09:00``).
occurrences = Table(
    "occurrences",
    metadata,
    Column("key", String, primary_key=True),
    Column("campaign", String, nullable=False),
    Column("slot", UTCDateTime),  # NULL: a campaign without schedule, one occurrence a day
    Column("outcome", String, nullable=False),  # launched, skipped
    Column("reason", Text),  # why a slot was skipped
    Column("run_id", String),
    Column("source", String, nullable=False),  # send, scheduler
    Column("recorded_at", UTCDateTime, nullable=False),
    Index(None, "campaign", "slot"),
)


def make_engine(url: str) -> tuple[Engine, bool]:
    """An engine for ``url``, and whether it is an in-memory SQLite database (one shared connection).

    ``postgres://`` and ``postgresql://`` use psycopg 3. SQLite runs in WAL mode with
    ``synchronous=NORMAL``, foreign keys on, and writers waiting up to 30 s for each other; a
    transaction begun with the execution option :data:`WRITE` takes the write lock at BEGIN.
    """
    parsed = make_url(url)
    backend = parsed.drivername.partition("+")[0]
    if backend in ("postgres", "postgresql"):
        return create_engine(
            parsed.set(drivername="postgresql+psycopg"), pool_pre_ping=True, hide_parameters=True
        ), False
    if backend != "sqlite":
        raise ConfigError(
            f"the database URL scheme '{parsed.drivername}' is not supported: use sqlite:///FILE.db "
            "(embedded) or postgresql://USER@HOST/DB (distributed)"
        )
    parsed = parsed.set(drivername="sqlite+pysqlite")
    memory = parsed.database in (None, "", ":memory:")
    if memory:
        engine = create_engine(
            parsed, poolclass=StaticPool, connect_args={"check_same_thread": False}, hide_parameters=True
        )
    else:
        path = Path(parsed.database or "").expanduser().resolve()  # relative to the cwd of now, not later
        engine = create_engine(
            parsed.set(database=str(path)),
            connect_args={"timeout": _BUSY_TIMEOUT_S, "check_same_thread": False},
            hide_parameters=True,  # SQL errors must never print addresses into logs
        )
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine, memory


def _sqlite_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # The driver must not begin transactions itself: _sqlite_begin does, so writers can take the lock.
    dbapi_connection.isolation_level = None
    for pragma in (f"busy_timeout={_BUSY_TIMEOUT_S * 1000}", "synchronous=NORMAL", "foreign_keys=ON"):
        dbapi_connection.execute(f"PRAGMA {pragma}")
    # WAL is a property of the file, set by the first connection. Connections that open a new file
    # together get "database is locked" at once (the busy handler does not cover it): they retry.
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while dbapi_connection.execute("PRAGMA journal_mode").fetchone() not in (("wal",), ("memory",)):
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(_WAL_RETRY_S)


def _sqlite_begin(conn: Connection) -> None:
    # A deferred transaction that reads, then writes, fails at once with "database is locked" when
    # another writer got in between; BEGIN IMMEDIATE waits for the lock (busy_timeout) instead.
    write = conn.get_execution_options().get(WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _create_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[runs, recipients, messages], checkfirst=True)


def _create_v2(conn: Connection) -> None:
    suppressions.create(conn, checkfirst=True)


def _create_v3(conn: Connection) -> None:
    receipts.create(conn, checkfirst=True)
    # Step 1 builds `messages` from today's definition, which has the column: add it only when missing.
    if "bypassed" not in {c["name"] for c in inspect(conn).get_columns("messages")}:
        conn.exec_driver_sql("ALTER TABLE messages ADD COLUMN bypassed VARCHAR")


def _create_v4(conn: Connection) -> None:
    occurrences.create(conn, checkfirst=True)


#: ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``.
MIGRATIONS: list[Callable[[Connection], None]] = [_create_v1, _create_v2, _create_v3, _create_v4]


def current_version() -> int:
    """The schema version this code writes and reads."""
    return len(MIGRATIONS)


def upgrade(conn: Connection) -> tuple[int, int]:
    """Bring the schema to :func:`current_version` inside the caller's transaction.

    Returns (version found, version now). The caller holds whatever lock keeps other processes out.
    """
    target = current_version()
    if not inspect(conn).has_table(schema_version.name):
        schema_version.create(conn)
    found = conn.execute(select(schema_version.c.version)).scalar()
    version = 0 if found is None else found
    if version > target:
        raise InfrastructureError(
            f"the ledger database has schema version {version}, but this smartpush only knows versions "
            f"up to {target}: a newer smartpush has upgraded it. Upgrade smartpush on this host "
            "(pip install --upgrade smartpush) to the version the other hosts run."
        )
    for step in MIGRATIONS[version:target]:
        step(conn)
    if found is None:
        conn.execute(schema_version.insert().values(version=target))
    elif target != version:
        conn.execute(schema_version.update().values(version=target))
    return version, target
