"""The ledger's tables, and the steps that create and upgrade them (see :meth:`Ledger.migrate`).

The schema version lives in the one row of ``schema_version``. ``MIGRATIONS[i]`` upgrades a database
from version ``i`` to ``i + 1``; version 0 is an empty database. A step, once released, never changes:
a new schema is a new step appended to the list (version 1 creates the tables as they were first
released, so the table definitions below must stay those of the latest version and the steps after
1 must alter what step 1 made).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Dialect,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
)
from sqlalchemy.types import TypeDecorator

from .errors import InfrastructureError

__all__ = [
    "MIGRATIONS",
    "UTCDateTime",
    "current_version",
    "messages",
    "metadata",
    "recipients",
    "runs",
    "schema_version",
    "upgrade",
]


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


def _create_v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[runs, recipients, messages], checkfirst=True)


#: ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``.
MIGRATIONS: list[Callable[[Connection], None]] = [_create_v1]


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
