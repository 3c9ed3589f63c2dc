"""The ledger: one row per run and per message, the source of truth of every send.

SQLAlchemy Core over SQLite (embedded; WAL mode) or PostgreSQL (distributed), same code. The schema is
versioned in a ``schema_version`` table and upgraded by :meth:`Ledger.migrate`.

Message statuses (SPEC.md "Message lifecycle"), plus ``waiting``: a fallback channel's message of a
``first-reachable`` campaign, which becomes ``created`` if the channels before it fail permanently and
``skipped`` once one of them reached the recipient.

The one rule that prevents double sends: a message is handed to a provider only after
:meth:`Ledger.claim` moved it from ``created`` to ``sending`` in one conditional UPDATE; only the
claimer may send it, and only :meth:`Ledger.record` moves it on from ``sending``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    DateTime,
    Insert,
    Integer,
    String,
    Table,
    and_,
    any_,
    bindparam,
    func,
    literal,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row, RowMapping
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError, StatementError

from .errors import InfrastructureError, RunNotFound
from .ledger_schema import WRITE, UTCDateTime, as_utc, make_engine, upgrade
from .ledger_schema import messages as messages_t
from .ledger_schema import occurrences as occurrences_t
from .ledger_schema import receipts as receipts_t
from .ledger_schema import recipients as recipients_t
from .ledger_schema import runs as runs_t
from .ledger_schema import suppressions as suppressions_t
from .receipts import (
    RANK,
    IncomingReceipt,
    MessageState,
    Settled,
    StoredReceipt,
    observe_delivery,
    settle,
)

__all__ = [
    "FAILED",
    "FINAL",
    "INTERRUPTED",
    "Fallbacks",
    "Ledger",
    "MessageRecord",
    "NewMessage",
    "NewRecipient",
    "OccurrenceRecord",
    "Result",
    "RunRecord",
    "RunState",
    "SplitText",
    "Status",
    "Suppression",
]


class RunState(StrEnum):
    SPLITTING = "splitting"  # the launch is creating message rows
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    FINISHED = "finished"  # every message is in a final status


class Status(StrEnum):
    CREATED = "created"
    WAITING = "waiting"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    TEMPORARY_FAILURE = "temporary-failure"
    PERMANENT_FAILURE = "permanent-failure"
    TECHNICAL_FAILURE = "technical-failure"
    INVALID = "invalid"
    SUPPRESSED = "suppressed"
    SKIPPED = "skipped"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


#: Statuses a message never leaves (except sent → delivered/failed by a receipt).
FINAL = frozenset(Status) - {Status.CREATED, Status.WAITING, Status.SENDING}
#: Final statuses that make a run "partly failed" (exit code 3).
FAILED = frozenset(
    {Status.TEMPORARY_FAILURE, Status.PERMANENT_FAILURE, Status.TECHNICAL_FAILURE, Status.EXPIRED}
)


@dataclass
class RunRecord:
    """One launch of a campaign."""

    id: str
    campaign: str
    campaign_file: str  # absolute path, so workers anywhere on the host find it
    config_file: str | None  # absolute path of smartpush.yaml, None for embedded defaults
    state: RunState = RunState.SPLITTING
    key: str | None = None  # the idempotency key given to `send --key`
    category: str = "information"
    priority: str = "normal"
    strategy: str = "first-reachable"
    channels: list[str] = field(default_factory=list)  # channel names, in the campaign's order
    segment_size: int = 500
    segments: int = 0  # segments created so far (all of them once split_complete)
    recipients: int = 0
    split_line: int = 0  # last audience line whose rows are stored: a re-launch resumes after it
    split_complete: bool = False
    parent_run_id: str | None = None  # set for `resend`
    test: bool = False  # launched with --test-to
    not_after: datetime | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass
class NewRecipient:
    """One recipient of a run, with the row its messages are rendered from."""

    recipient_id: str
    segment: int
    line: int
    context: Mapping[str, Any]


@dataclass
class NewMessage:
    """A message row made by the split: recipient × channel, with its id made now."""

    id: str
    recipient_id: str
    segment: int
    channel: str
    channel_index: int
    provider: str  # the account that will be tried first
    status: Status
    address: str | None = None
    error_code: str | None = None
    error_text: str | None = None


_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_value(value: str | None) -> str:
    """One value in PostgreSQL's COPY text format: \\N for NULL, backslash, tab and line ends escaped."""
    if value is None:
        return "\\N"
    return value.translate(_COPY_ESCAPES) if _COPY_SPECIAL.search(value) else value


#: Rows for COPY: tuples of values in the driver's form, or text already in COPY's text format.
_CopyData = list[tuple[Any, ...]] | str


def _write_copy(copy: Any, rows: _CopyData) -> None:
    if isinstance(rows, str):
        copy.write(rows)
        return
    for row in rows:
        copy.write_row(row)


class SplitText:
    """Split rows in PostgreSQL's COPY text form, made where the rows are read (in another process)
    and stored by :meth:`Ledger.add_split_text`.

    Each row is formatted up to its last column, the segment, which only the launching process knows
    (it numbers the rows in file order once duplicates are dropped): it appends ``"{segment}\\n"``.
    """

    RECIPIENT_COLUMNS = ("run_id", "recipient_id", "line", "context", "segment")
    MESSAGE_COLUMNS = (
        *("id", "run_id", "recipient_id", "channel", "channel_index", "provider", "status", "attempts"),
        *("address", "error_code", "error_text", "created_at", "final_at", "updated_at", "segment"),
    )

    def __init__(self, run_id: str, now: datetime) -> None:
        self.run = _copy_value(run_id)
        self.stamp = now.astimezone(UTC).isoformat()

    def recipient(self, recipient: NewRecipient) -> str:
        context = _copy_value(_json(dict(recipient.context)))
        return f"{self.run}\t{_copy_value(recipient.recipient_id)}\t{recipient.line}\t{context}\t"

    def message(self, message: NewMessage) -> str:
        status = Status(message.status)
        final = self.stamp if status in FINAL else "\\N"
        return (
            f"{_copy_value(message.id)}\t{self.run}\t{_copy_value(message.recipient_id)}\t"
            f"{_copy_value(message.channel)}\t{message.channel_index}\t{_copy_value(message.provider)}\t"
            f"{status.value}\t0\t{_copy_value(message.address)}\t{_copy_value(message.error_code)}\t"
            f"{_copy_value(message.error_text)}\t{self.stamp}\t{final}\t{self.stamp}\t"
        )


@dataclass
class MessageRecord:
    """A message as stored, with its recipient's line and render context when asked for."""

    id: str
    run_id: str
    recipient_id: str
    segment: int
    channel: str
    channel_index: int
    provider: str
    status: Status
    attempts: int
    address: str | None
    next_attempt_at: datetime | None
    provider_reference: str | None
    error_code: str | None
    error_text: str | None
    created_at: datetime
    sending_at: datetime | None
    sent_at: datetime | None
    delivered_at: datetime | None
    final_at: datetime | None
    #: A ``service`` message sent despite this suppression reason (``opt-out``), on record.
    bypassed: str | None = None
    line: int | None = None
    context: dict[str, Any] | None = None


@dataclass
class Fallbacks:
    """What a batch of results means for the fallback channels of a ``first-reachable`` run: recipients
    reached on a channel (their ``waiting`` messages become ``skipped``) and recipients whose channel of
    a given index reached a dead end (their next ``waiting`` message becomes ``created``)."""

    run_id: str
    reached: dict[str, list[str]] = field(default_factory=dict)  # channel → recipient ids
    dead_end: dict[int, list[str]] = field(default_factory=dict)  # channel index → recipient ids

    def __bool__(self) -> bool:
        return bool(self.reached or self.dead_end)


@dataclass(frozen=True)
class OccurrenceRecord:
    """What became of one slot of a scheduled campaign: the run it launched, or why it was skipped."""

    key: str  # the run key: ``NAME@2026-12-01T09:00``
    campaign: str
    slot: datetime | None  # None: a campaign without schedule (one occurrence a day)
    outcome: str  # launched, skipped
    source: str  # send, scheduler
    recorded_at: datetime
    reason: str | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class Suppression:
    """One entry of the suppression list: a keyed hash of an address, never the address itself."""

    channel: str
    address_hash: str
    reason: str  # opt-out, hard-bounce, complaint, unregistered, manual
    source: str
    created_at: datetime


@dataclass
class Result:
    """What happened to one claimed (``sending``) message.

    ``status`` ``created`` with ``next_attempt_at`` schedules a retry; ``attempted`` false means the
    provider was not really tried (throttled, paused before sending) so ``attempts`` stays as it is.
    """

    message_id: str
    status: Status
    attempted: bool = True
    provider: str | None = None
    provider_reference: str | None = None
    error_code: str | None = None
    error_text: str | None = None
    next_attempt_at: datetime | None = None
    #: The provider says the address is dead: put it on the suppression list (not a ledger column).
    suppress: bool = False
    #: Sent although the address is suppressed for this reason (``service`` campaigns and ``opt-out``).
    bypassed: str | None = None


T = TypeVar("T")

_log = logging.getLogger(__name__)

#: The error code of a message whose worker stopped while sending it (see :meth:`Ledger.unstick`).
INTERRUPTED = "interrupted"

_ACTIVE = (Status.CREATED.value, Status.WAITING.value, Status.SENDING.value)
_UNSENT = (Status.CREATED.value, Status.WAITING.value)
#: Ids per ``IN (...)`` list: SQLite builds before 3.32 allow only 999 bound variables a statement.
_IN_CHUNK = 500
#: Ids per array parameter on PostgreSQL (``= ANY(%(ids)s)``, see :func:`_in`): a worker's batch is one
#: statement; the bound only keeps a huge call from locking or sending everything at once.
_ARRAY_CHUNK = 10_000
#: The type of the array parameters of :func:`_in` (every column looked up by a list is a string).
_STRING_ARRAY = postgresql.ARRAY(String)
#: Rows per page of :meth:`Ledger.messages`: a query's cost is amortised, memory stays small.
_STREAM_BATCH = 5_000
#: A shorter id prefix matches too many runs to be a safe way to name one.
_MIN_PREFIX = 6
#: How many of the runs an ambiguous prefix matches are named in the error.
_AMBIGUOUS_SHOWN = 5
#: Segments changed per transaction by expire/cancel, so that other SQLite writers never wait long.
_SEGMENTS_PER_TX = 20
#: The ``pg_advisory_xact_lock`` key that serialises :meth:`Ledger.migrate` ("smartpsh" in ASCII).
_MIGRATE_LOCK = 0x736D_6172_7470_7368

_STATUSES = {status.value: status for status in Status}
_RUN_FIELDS = tuple(f.name for f in fields(RunRecord))
_MESSAGE_COLUMNS = tuple(
    messages_t.c[f.name] for f in fields(MessageRecord) if f.name not in ("line", "context")
)
#: The columns :meth:`Ledger.due` reads, in the order :func:`_due_records` takes them: a message's but
#: those its WHERE clause fixes (run, segment, status), then its recipient's line and context. Times
#: come as the driver gives them (plain DateTime): _due_records makes them aware UTC with UTCDateTime's
#: own as_utc, without SQLAlchemy's result processing per value.
_DUE_COLUMNS = (
    *(
        type_coerce(messages_t.c[name], DateTime(timezone=True))
        if isinstance(messages_t.c[name].type, UTCDateTime)
        else messages_t.c[name]
        for name in (
            *("id", "recipient_id", "channel", "channel_index", "provider", "attempts", "address"),
            *("next_attempt_at", "provider_reference", "error_code", "error_text", "created_at"),
            *("sending_at", "sent_at", "delivered_at", "final_at", "bypassed"),
        )
    ),
    recipients_t.c.line,
    recipients_t.c.context,
)
_RECIPIENT_KEYS = ("run_id", "recipient_id", "segment", "line", "context")
_MESSAGE_KEYS = (
    *("id", "run_id", "recipient_id", "segment", "channel", "channel_index", "provider", "status"),
    *("attempts", "address", "error_code", "error_text", "created_at", "final_at", "updated_at"),
)
_JOIN = and_(
    recipients_t.c.run_id == messages_t.c.run_id, recipients_t.c.recipient_id == messages_t.c.recipient_id
)

# record(): one UPDATE run with executemany; only a message still `sending` is moved on.
_RECORD = (
    update(messages_t)
    .where(messages_t.c.id == bindparam("b_id", type_=String), messages_t.c.status == Status.SENDING.value)
    .values(
        status=bindparam("b_status", type_=String),
        attempts=messages_t.c.attempts + bindparam("b_inc", type_=Integer),
        provider=func.coalesce(bindparam("b_provider", type_=String), messages_t.c.provider),
        provider_reference=bindparam("b_reference", type_=String),
        error_code=bindparam("b_code", type_=String),
        error_text=bindparam("b_text", type_=String),
        next_attempt_at=bindparam("b_next", type_=UTCDateTime()),
        sent_at=func.coalesce(bindparam("b_sent", type_=UTCDateTime()), messages_t.c.sent_at),
        delivered_at=func.coalesce(bindparam("b_delivered", type_=UTCDateTime()), messages_t.c.delivered_at),
        final_at=bindparam("b_final", type_=UTCDateTime()),
        updated_at=bindparam("b_now", type_=UTCDateTime()),
        bypassed=func.coalesce(bindparam("b_bypassed", type_=String), messages_t.c.bypassed),
    )
)


class Ledger:
    """Runs and messages in one SQL database. Thread-safe; one instance per process is enough.

    ``url``: ``sqlite:///FILE.db`` (a relative path is taken from the current directory now),
    ``sqlite://`` (in memory, for tests), or ``postgresql://``/``postgres://``/``postgresql+psycopg://``.
    Datetimes given must be aware; datetimes returned are aware UTC.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine, memory = make_engine(url)
        self._postgresql = self._engine.dialect.name == "postgresql"
        self._chunk = _chunk_size(self._postgresql)  # ids per statement of a lookup by list (see _in)
        self._where = self._engine.url.render_as_string(hide_password=True)
        # A datetime in the driver's form, for the bulk inserts that bypass SQLAlchemy's processing.
        stamp = UTCDateTime().bind_processor(self._engine.dialect)
        self._stamp: Callable[[datetime], Any] = stamp if stamp is not None else lambda value: value
        self._inserts: dict[str, tuple[str, list[int]]] = {}  # table → SQLite INSERT, order of its values
        # In memory every thread shares the one connection, so transactions must take turns.
        self._lock: AbstractContextManager[object] = threading.RLock() if memory else nullcontext()

    def reopen(self) -> Ledger:
        """A new instance on the same database, with connections of its own: what a forked process
        uses (a connection must never be shared across a fork)."""
        return Ledger(self._url)

    @property
    def parallel_writes(self) -> bool:
        """Whether transactions from several threads write at the same time (PostgreSQL), rather than
        wait for each other (SQLite has one writer at a time)."""
        return self._postgresql

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[Connection]:
        """One short transaction; ``write`` takes SQLite's write lock at BEGIN."""
        with self._lock:
            try:
                with self._engine.connect() as conn:
                    if write:
                        conn.execution_options(**{WRITE: True})
                    with conn.begin():
                        yield conn
            except (OperationalError, InterfaceError) as exc:
                raise InfrastructureError(f"the ledger database {self._where} failed: {exc.orig}") from exc
            except StatementError as exc:
                if isinstance(exc.orig, ValueError):  # a naive datetime: the caller's mistake, said plainly
                    raise exc.orig from None
                raise

    def _insert_ignore(self, table: Table) -> Insert:
        if self._postgresql:
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()

    # Schema ------------------------------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the schema to the current version; safe to call from many processes.

        A database written by a newer smartpush raises :class:`InfrastructureError` saying to upgrade.
        """
        with self._tx() as conn:
            if self._postgresql:
                conn.execute(select(func.pg_advisory_xact_lock(_MIGRATE_LOCK)))
            found, now = upgrade(conn)
        if found != now:
            _log.info("ledger schema upgraded from version %d to %d", found, now)

    def close(self) -> None:
        self._engine.dispose()

    # Runs --------------------------------------------------------------------------------------
    def create_run(self, run: RunRecord) -> tuple[RunRecord, bool]:
        """Insert ``run``; if a run with the same non-null ``key`` exists, return it and False.

        ``created_at`` defaults to now. The run returned is the one stored.
        """
        values = {name: getattr(run, name) for name in _RUN_FIELDS}
        values["state"] = RunState(run.state).value
        values["channels"] = _json(list(run.channels))
        values["created_at"] = run.created_at or datetime.now(UTC)
        found = None
        with self._tx() as conn:
            insert = self._insert_ignore(runs_t).values(values).returning(runs_t.c.id)
            created = conn.execute(insert).scalar() is not None
            if created:
                found = self._get_run(conn, runs_t.c.id, run.id)
            elif run.key is not None:
                found = self._get_run(conn, runs_t.c.key, run.key)
        if found is None:  # the id is taken by a run with another key
            raise ValueError(f"a run with the id {run.id} already exists")
        return found, created

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._tx(write=False) as conn:
            return self._get_run(conn, runs_t.c.id, run_id)

    @staticmethod
    def _get_run(conn: Connection, column: Column[str], value: str) -> RunRecord | None:
        row = conn.execute(select(runs_t).where(column == value)).mappings().first()
        return None if row is None else _run_from(row)

    def find_run(self, ref: str) -> RunRecord:
        """A run by id, key or unique id prefix (at least 6 characters); :class:`RunNotFound` if none."""
        ref = ref.strip()
        with self._tx(write=False) as conn:
            found: RunRecord | None = self._get_run(conn, runs_t.c.id, ref) or self._get_run(
                conn, runs_t.c.key, ref
            )
            if found is not None:
                return found
            if len(ref) < _MIN_PREFIX:
                raise RunNotFound(
                    f"no run has the id or key '{ref}' (a shortened id needs at least {_MIN_PREFIX} "
                    "characters): `smartpush runs` lists runs"
                )
            prefix = func.substr(runs_t.c.id, 1, len(ref)) == ref  # LIKE is case-blind on SQLite
            rows = conn.execute(
                select(runs_t).where(prefix).order_by(runs_t.c.created_at.desc()).limit(_AMBIGUOUS_SHOWN + 1)
            ).mappings()
            matches = [_run_from(row) for row in rows]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RunNotFound(f"no run has the id or key '{ref}': `smartpush runs` lists runs")
        shown = ", ".join(m.id for m in matches[:_AMBIGUOUS_SHOWN])
        more = " and more" if len(matches) > _AMBIGUOUS_SHOWN else ""
        raise RunNotFound(
            f"'{ref}' is ambiguous: it starts the ids of several runs ({shown}{more}); type more of the "
            "id (`smartpush runs` lists runs)"
        )

    def list_runs(self, *, campaign: str | None = None, limit: int = 50) -> list[RunRecord]:
        """Newest first."""
        stmt = select(runs_t).order_by(runs_t.c.created_at.desc(), runs_t.c.id.desc()).limit(limit)
        if campaign is not None:
            stmt = stmt.where(runs_t.c.campaign == campaign)
        with self._tx(write=False) as conn:
            return [_run_from(row) for row in conn.execute(stmt).mappings()]

    def set_run_state(
        self, run_id: str, state: RunState, *, only_from: frozenset[RunState] | None = None
    ) -> bool:
        """Move the run to ``state`` (from one of ``only_from`` if given); True if it changed.

        Entering ``running`` sets ``started_at`` and entering ``finished``/``cancelled`` sets
        ``finished_at``, each only the first time.
        """
        now = literal(datetime.now(UTC), UTCDateTime())
        values: dict[str, Any] = {"state": RunState(state).value}
        if state == RunState.RUNNING:
            values["started_at"] = func.coalesce(runs_t.c.started_at, now)
        elif state in (RunState.FINISHED, RunState.CANCELLED):
            values["finished_at"] = func.coalesce(runs_t.c.finished_at, now)
        stmt = update(runs_t).where(runs_t.c.id == run_id, runs_t.c.state != values["state"]).values(values)
        if only_from is not None:
            stmt = stmt.where(runs_t.c.state.in_([RunState(s).value for s in only_from]))
        with self._tx() as conn:
            return conn.execute(stmt).rowcount == 1

    def update_split(
        self, run_id: str, *, split_line: int, segments: int, recipients: int, complete: bool = False
    ) -> None:
        stmt = (
            update(runs_t)
            .where(runs_t.c.id == run_id)
            .values(split_line=split_line, segments=segments, recipients=recipients, split_complete=complete)
        )
        with self._tx() as conn:
            conn.execute(stmt)

    # Split ---------------------------------------------------------------------------------------
    def add_batch(
        self,
        run_id: str,
        recipients: Sequence[NewRecipient],
        messages: Sequence[NewMessage],
        *,
        fresh: bool = False,
    ) -> None:
        """Insert recipients and their messages in one transaction; rows already there are left alone.

        A message is new unless its id or its (recipient, channel) is already stored, so re-running an
        interrupted split with fresh message ids keeps the first ones. A message created in a final
        status (``invalid``, ``skipped``, ``suppressed``) gets ``final_at`` now.

        ``fresh``: the caller knows none of these rows can be stored yet (the first split of a new
        run): PostgreSQL then copies them straight into the tables, without the staging table and the
        conflict check. Should a row be there after all, the batch is written again the careful way.
        """
        stamp = self._stamp(datetime.now(UTC))
        strays = {m.recipient_id for m in messages}.difference(r.recipient_id for r in recipients)
        if strays:
            raise ValueError(f"{len(strays)} message recipient(s) are not among the batch's recipients")
        recipient_rows = [
            (run_id, r.recipient_id, r.segment, r.line, _json(dict(r.context))) for r in recipients
        ]
        message_rows = [
            (
                m.id,
                run_id,
                m.recipient_id,
                m.segment,
                m.channel,
                m.channel_index,
                m.provider,
                Status(m.status).value,
                0,
                m.address,
                m.error_code,
                m.error_text,
                stamp,
                stamp if m.status in FINAL else None,
                stamp,
            )
            for m in messages
        ]
        self._store_split(
            run_id,
            ((recipients_t, _RECIPIENT_KEYS, recipient_rows), (messages_t, _MESSAGE_KEYS, message_rows)),
            fresh=fresh,
        )

    def _store_split(
        self, run_id: str, parts: tuple[tuple[Table, tuple[str, ...], _CopyData], ...], *, fresh: bool
    ) -> None:
        """Each part's rows into its table, in one transaction: copied straight in when ``fresh`` (on
        PostgreSQL), and written again the careful way should a row be there after all."""
        if fresh and self._postgresql:
            try:
                with self._tx() as conn:
                    for table, keys, data in parts:
                        self._copy_direct(conn, table, keys, data)
                return
            except IntegrityError:
                _log.warning("split batch of run %s partly stored already: written again", run_id)
        with self._tx() as conn:
            for table, keys, data in parts:
                self._insert_many(conn, table, keys, data)

    def split_recipients(self, run_id: str, through_line: int) -> Iterator[tuple[str, int]]:
        """(recipient id, line) of the recipients ``run_id``'s split stored from lines up to
        ``through_line``, by line, in pages: what a resumed split must know to recognise a duplicate of
        a row read before it stopped."""
        columns = recipients_t.c
        base = (
            select(columns.recipient_id, columns.line)
            .where(columns.run_id == run_id, columns.line <= through_line)
            .order_by(columns.line)
            .limit(_STREAM_BATCH * 10)
        )
        stmt = base
        while True:
            with self._tx(write=False) as conn:
                batch = [(str(rid), int(line)) for rid, line in conn.execute(stmt)]
            yield from batch
            if len(batch) < _STREAM_BATCH * 10:
                return
            stmt = base.where(columns.line > batch[-1][1])

    def add_split_text(self, run_id: str, recipients: str, messages: str, *, fresh: bool = False) -> None:
        """:meth:`add_batch` for rows already in COPY text form (:class:`SplitText`), PostgreSQL only.

        What a split in several processes hands over: its rows were formatted where they were read.
        """
        if not self._postgresql:
            raise ValueError("rows in COPY text form are for PostgreSQL")
        self._store_split(
            run_id,
            (
                (recipients_t, SplitText.RECIPIENT_COLUMNS, recipients),
                (messages_t, SplitText.MESSAGE_COLUMNS, messages),
            ),
            fresh=fresh,
        )

    def _insert_many(self, conn: Connection, table: Table, keys: tuple[str, ...], rows: _CopyData) -> None:
        """INSERT ... ON CONFLICT DO NOTHING of ``rows``, values already in the driver's form.

        Straight to the driver, because SQLAlchemy's per-value processing cost more than the insert
        itself. SQLite: executemany. PostgreSQL: COPY into a temporary table, then one INSERT ...
        SELECT: for 1,000 recipients and 3,000 messages, 57-67 ms against 148 ms by executemany and 114
        ms by insertmanyvalues (measured on a 2-CPU VM; SQLite: 30-53 ms against 75 ms).
        """
        if not rows:
            return
        if self._postgresql:
            self._copy_insert(conn, table, keys, rows)
            return
        if isinstance(rows, str):
            raise ValueError("rows in COPY text form are for PostgreSQL")
        if table.name not in self._inserts:
            compiled = self._insert_ignore(table).compile(
                dialect=self._engine.dialect, column_keys=list(keys)
            )
            self._inserts[table.name] = (
                str(compiled),
                [keys.index(name) for name in compiled.positiontup or keys],
            )
        statement, order = self._inserts[table.name]
        if order != list(range(len(keys))):  # SQLAlchemy put the columns in another order than ``keys``
            rows = [tuple(row[i] for i in order) for row in rows]
        conn.exec_driver_sql(statement, rows)

    def _copy_direct(self, conn: Connection, table: Table, keys: tuple[str, ...], rows: _CopyData) -> None:
        """PostgreSQL: COPY ``rows`` straight into ``table`` (a duplicate raises IntegrityError)."""
        if not rows:
            return
        statement = f"COPY {table.name} ({', '.join(keys)}) FROM STDIN"
        driver: Any = conn.connection.driver_connection
        dbapi_error: Any = self._engine.dialect.loaded_dbapi.Error
        try:
            with driver.cursor() as cursor, cursor.copy(statement) as copy:
                _write_copy(copy, rows)
        except dbapi_error as exc:
            raise DBAPIError.instance(statement, None, exc, dbapi_error) from exc

    def _copy_insert(self, conn: Connection, table: Table, keys: tuple[str, ...], rows: _CopyData) -> None:
        columns = ", ".join(keys)
        batch = f"smartpush_{table.name}_batch"
        statement = f"COPY {batch} ({columns}) FROM STDIN"
        driver: Any = conn.connection.driver_connection  # psycopg's own connection, in our transaction
        dbapi_error: Any = self._engine.dialect.loaded_dbapi.Error
        try:
            with driver.cursor() as cursor:
                cursor.execute(
                    f"CREATE TEMPORARY TABLE IF NOT EXISTS {batch} (LIKE {table.name}) ON COMMIT DELETE ROWS"
                )
                with cursor.copy(statement) as copy:
                    _write_copy(copy, rows)
                statement = f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {batch}"
                cursor.execute(f"{statement} ON CONFLICT DO NOTHING")
        except dbapi_error as exc:  # the same exceptions as every other statement raises
            raise DBAPIError.instance(statement, None, exc, dbapi_error) from exc

    def _copy_record(self, conn: Connection, params: list[dict[str, Any]]) -> int:
        """PostgreSQL: COPY the results into a temporary table, then one UPDATE ... FROM it.

        An executemany of the UPDATE cost about 50 µs of client CPU per message, the largest share of
        a worker's time; COPY costs a few.
        """
        stamp = self._stamp
        rows = [
            (
                p["b_id"],
                p["b_status"],
                p["b_inc"],
                p["b_provider"],
                p["b_reference"],
                p["b_code"],
                p["b_text"],
                None if p["b_next"] is None else stamp(p["b_next"]),
                None if p["b_sent"] is None else stamp(p["b_sent"]),
                None if p["b_delivered"] is None else stamp(p["b_delivered"]),
                None if p["b_final"] is None else stamp(p["b_final"]),
                stamp(p["b_now"]),
                p["b_bypassed"],
            )
            for p in params
        ]
        statement = (
            "COPY smartpush_results3 (id, status, inc, provider, reference, code, text, next, sent, "
            "delivered, final, now, bypassed) FROM STDIN"
        )
        driver: Any = conn.connection.driver_connection
        dbapi_error: Any = self._engine.dialect.loaded_dbapi.Error
        try:
            with driver.cursor() as cursor:
                cursor.execute(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS smartpush_results3 (id text PRIMARY KEY, "
                    "status text, "
                    "inc integer, provider text, reference text, code text, text text, next timestamptz, "
                    "sent timestamptz, delivered timestamptz, final timestamptz, now timestamptz, "
                    "bypassed text) ON COMMIT DELETE ROWS"
                )
                with cursor.copy(statement) as copy:
                    for row in rows:
                        copy.write_row(row)
                statement = (
                    "UPDATE messages AS m SET status = r.status, attempts = m.attempts + r.inc, "
                    "provider = COALESCE(r.provider, m.provider), provider_reference = r.reference, "
                    "error_code = r.code, error_text = r.text, next_attempt_at = r.next, "
                    "sent_at = COALESCE(r.sent, m.sent_at), "
                    "delivered_at = COALESCE(r.delivered, m.delivered_at), "
                    "final_at = r.final, updated_at = r.now, bypassed = COALESCE(r.bypassed, m.bypassed) "
                    "FROM smartpush_results3 AS r WHERE m.id = r.id AND m.status = 'sending'"
                )
                cursor.execute(statement)
                return int(cursor.rowcount)
        except dbapi_error as exc:
            raise DBAPIError.instance(statement, None, exc, dbapi_error) from exc

    # Sending -------------------------------------------------------------------------------------
    def due(self, run_id: str, segment: int, now: datetime, *, limit: int = 10_000) -> list[MessageRecord]:
        """``created`` messages of a segment whose ``next_attempt_at`` is null or past, with context.

        In audience order (line, then channel). Every record carries ``line`` and ``context`` (None
        once purged); the records of one recipient share one ``context`` dict: do not change it.
        """
        stmt = (
            select(*_DUE_COLUMNS)
            .join_from(messages_t, recipients_t, _JOIN)
            .where(
                messages_t.c.run_id == run_id,
                recipients_t.c.run_id == run_id,
                messages_t.c.status == Status.CREATED.value,
                messages_t.c.segment == segment,
                _is_due(now),
            )
            .order_by(recipients_t.c.line, messages_t.c.channel_index)
            .limit(limit)
        )
        with self._tx(write=False) as conn:
            rows = conn.execute(stmt).all()
        return _due_records(rows, run_id, segment)

    def claim(self, message_ids: Sequence[str], now: datetime) -> set[str]:
        """Move ``created`` → ``sending``; returns the ids this caller won (others were taken).

        A message whose ``next_attempt_at`` is still after ``now`` (a retry scheduled meanwhile by
        another worker) is not claimed either.
        """
        won: set[str] = set()
        for chunk in _chunks(sorted(set(message_ids)), self._chunk):  # one lock order for every claimer
            stmt = (
                update(messages_t)
                .where(
                    _in(messages_t.c.id, chunk, self._postgresql),
                    messages_t.c.status == Status.CREATED.value,
                    _is_due(now),
                )
                .values(status=Status.SENDING.value, sending_at=now, updated_at=now)
                .returning(messages_t.c.id)
            )
            with self._tx() as conn:
                won.update(conn.execute(stmt).scalars())
        return won

    def record(
        self, results: Sequence[Result], now: datetime, *, fallbacks: Fallbacks | None = None
    ) -> dict[str, int]:
        """Apply results to ``sending`` messages in bulk (attempts +1 when ``attempted``).

        A result in status ``created`` is a retry at ``next_attempt_at`` (None: as soon as possible).
        ``provider`` None keeps the stored one. ``sent``/``delivered`` set ``sent_at``, ``delivered``
        sets ``delivered_at`` and every final status sets ``final_at``. Results for messages that are
        no longer ``sending`` are ignored (and logged).

        ``fallbacks`` are settled in the same transaction, so a worker that dies after recording
        cannot leave a recipient's next channel ``waiting`` for ever. Returns, per channel reached,
        how many waiting messages were skipped.
        """
        params = []
        for result in results:
            status = Status(result.status)
            if status in (Status.WAITING, Status.SENDING):
                raise ValueError(f"a result cannot put message {result.message_id} back in {status}")
            params.append(
                {
                    "b_id": result.message_id,
                    "b_status": status.value,
                    "b_inc": 1 if result.attempted else 0,
                    "b_provider": result.provider,
                    "b_reference": result.provider_reference,
                    "b_code": result.error_code,
                    "b_text": result.error_text,
                    "b_next": result.next_attempt_at,
                    "b_sent": now if status in (Status.SENT, Status.DELIVERED) else None,
                    "b_delivered": now if status == Status.DELIVERED else None,
                    "b_final": now if status in FINAL else None,
                    "b_now": now,
                    "b_bypassed": result.bypassed,
                }
            )
        if not params:
            return {}
        skipped: dict[str, int] = {}
        with self._tx() as conn:
            if self._postgresql:
                updated = self._copy_record(conn, params)
            else:
                updated = conn.execute(_RECORD, params).rowcount
            if fallbacks:
                for channel, rids in fallbacks.reached.items():
                    skipped[channel] = self._skip_fallbacks(
                        conn, fallbacks.run_id, rids, f"reached on {channel}", now
                    )
                for index, rids in fallbacks.dead_end.items():
                    self._activate_fallbacks(conn, fallbacks.run_id, rids, index, now)
        if 0 <= updated < len(params):
            _log.warning(
                "%d of %d results were for messages no longer sending: ignored",
                len(params) - updated,
                len(params),
            )
        # Receipts that came before their send was recorded wait, stored, for its reference: apply them.
        recorded = [
            r.message_id for r in results if r.provider_reference is not None and r.status == Status.SENT
        ]
        if recorded:
            self._apply_waiting_receipts(recorded, now)
        return skipped

    def activate_fallbacks(self, run_id: str, recipient_ids: Sequence[str], after_index: int) -> int:
        """For each recipient, its first ``waiting`` message after channel ``after_index`` → ``created``."""
        with self._tx() as conn:
            return self._activate_fallbacks(conn, run_id, recipient_ids, after_index, datetime.now(UTC))

    @staticmethod
    def _activate_fallbacks(
        conn: Connection, run_id: str, recipient_ids: Sequence[str], after_index: int, now: datetime
    ) -> int:
        later = messages_t.alias("later")
        first_waiting = (
            select(func.min(later.c.channel_index))
            .where(
                later.c.run_id == messages_t.c.run_id,
                later.c.recipient_id == messages_t.c.recipient_id,
                later.c.status == Status.WAITING.value,
                later.c.channel_index > after_index,
            )
            .scalar_subquery()
        )
        changed = 0
        postgresql = conn.dialect.name == "postgresql"
        for chunk in _chunks(sorted(set(recipient_ids)), _chunk_size(postgresql)):
            stmt = (
                update(messages_t)
                .where(
                    messages_t.c.run_id == run_id,
                    _in(messages_t.c.recipient_id, chunk, postgresql),
                    messages_t.c.status == Status.WAITING.value,
                    messages_t.c.channel_index == first_waiting,
                )
                .values(status=Status.CREATED.value, updated_at=now)
            )
            changed += conn.execute(stmt).rowcount
        return changed

    def skip_fallbacks(self, run_id: str, recipient_ids: Sequence[str], reason: str, now: datetime) -> int:
        """Every ``waiting`` message of these recipients → ``skipped`` with ``reason`` (in ``error_text``)."""
        with self._tx() as conn:
            return self._skip_fallbacks(conn, run_id, recipient_ids, reason, now)

    @staticmethod
    def _skip_fallbacks(
        conn: Connection, run_id: str, recipient_ids: Sequence[str], reason: str, now: datetime
    ) -> int:
        changed = 0
        postgresql = conn.dialect.name == "postgresql"
        for chunk in _chunks(sorted(set(recipient_ids)), _chunk_size(postgresql)):
            stmt = (
                update(messages_t)
                .where(
                    messages_t.c.run_id == run_id,
                    _in(messages_t.c.recipient_id, chunk, postgresql),
                    messages_t.c.status == Status.WAITING.value,
                )
                .values(status=Status.SKIPPED.value, error_text=reason, final_at=now, updated_at=now)
            )
            changed += conn.execute(stmt).rowcount
        return changed

    def expire(self, run_id: str, *, created_before: datetime | None, now: datetime, reason: str) -> int:
        """``created``/``waiting`` messages (all of them, or those created before a time) → ``expired``.

        ``reason`` goes to ``error_text``. Done a few segments per transaction; messages still
        ``sending`` are left to their worker.
        """
        return self._close_unsent(run_id, Status.EXPIRED, now, {"error_text": reason}, created_before)

    def cancel_unsent(self, run_id: str, now: datetime) -> int:
        """``created``/``waiting`` messages → ``cancelled``; the run's state is the caller's to change.

        Done a few segments per transaction. Messages still ``sending`` are left to their worker: a
        retry it records later comes back as ``created``, so call this again once it is recorded.
        """
        return self._close_unsent(run_id, Status.CANCELLED, now, {}, None)

    def _close_unsent(
        self,
        run_id: str,
        status: Status,
        now: datetime,
        extra: dict[str, Any],
        created_before: datetime | None,
    ) -> int:
        with self._tx(write=False) as conn:
            segments = sorted(
                {*self._segments(conn, run_id, Status.CREATED), *self._segments(conn, run_id, Status.WAITING)}
            )
        changed = 0
        for chunk in _chunks(segments, _SEGMENTS_PER_TX):
            stmt = (
                update(messages_t)
                .where(
                    messages_t.c.run_id == run_id,
                    messages_t.c.status.in_(_UNSENT),
                    messages_t.c.segment.in_(chunk),
                )
                .values(status=status.value, final_at=now, updated_at=now, **extra)
            )
            if created_before is not None:
                stmt = stmt.where(messages_t.c.created_at < created_before)
            with self._tx() as conn:
                changed += conn.execute(stmt).rowcount
        return changed

    def next_due(self, run_id: str, segment: int) -> datetime | None:
        """When the segment's next ``created`` message is due; None when it has none.

        A message without ``next_attempt_at`` counts as due since it last changed: the time returned
        is then in the past, meaning "now".
        """
        stmt = select(func.min(func.coalesce(messages_t.c.next_attempt_at, messages_t.c.updated_at))).where(
            messages_t.c.run_id == run_id,
            messages_t.c.status == Status.CREATED.value,
            messages_t.c.segment == segment,
        )
        with self._tx(write=False) as conn:
            found: datetime | None = conn.execute(stmt).scalar()
        return found

    def pending_segments(self, run_id: str) -> list[int]:
        """Segments that still hold ``created`` or ``sending`` messages, in order."""
        with self._tx(write=False) as conn:
            return sorted(
                {*self._segments(conn, run_id, Status.CREATED), *self._segments(conn, run_id, Status.SENDING)}
            )

    def finish_if_done(self, run_id: str, now: datetime) -> bool:
        """Mark the run finished when no message is ``created``/``waiting``/``sending``.

        Only a ``running`` run whose split is complete (:meth:`update_split` ``complete=True``) is
        finished; ``finished_at`` is set to ``now``. True if this call finished it.
        """
        # MIN(segment) per status, not EXISTS: PostgreSQL answers MIN from the index whatever its
        # statistics say, where EXISTS may be planned as a scan of the whole table.
        none_left = [
            select(func.min(messages_t.c.segment))
            .where(messages_t.c.run_id == run_id, messages_t.c.status == status)
            .scalar_subquery()
            .is_(None)
            for status in _ACTIVE
        ]
        stmt = (
            update(runs_t)
            .where(
                runs_t.c.id == run_id,
                runs_t.c.state == RunState.RUNNING.value,
                runs_t.c.split_complete.is_(True),
                *none_left,
            )
            .values(state=RunState.FINISHED.value, finished_at=now)
        )
        with self._tx() as conn:
            return conn.execute(stmt).rowcount == 1

    # Sweeper -------------------------------------------------------------------------------------
    def stuck(self, *, sending_before: datetime, due_before: datetime) -> list[tuple[str, int]]:
        """(run, segment) pairs of running runs with messages ``sending`` since before ``sending_before``
        or ``created`` and due since before ``due_before``.

        "Due since" is the later of ``next_attempt_at`` and the message's last change.
        """
        overdue = and_(
            messages_t.c.updated_at < due_before,
            or_(messages_t.c.next_attempt_at.is_(None), messages_t.c.next_attempt_at < due_before),
        )
        found: set[tuple[str, int]] = set()
        with self._tx(write=False) as conn:
            running = conn.execute(select(runs_t.c.id).where(runs_t.c.state == RunState.RUNNING.value))
            for run_id in running.scalars().all():
                late = (
                    select(messages_t.c.segment)
                    .distinct()
                    .where(
                        messages_t.c.run_id == run_id,
                        messages_t.c.status == Status.SENDING.value,
                        messages_t.c.sending_at < sending_before,
                    )
                )
                found.update((run_id, segment) for segment in conn.execute(late).scalars())
                found.update(
                    (run_id, segment) for segment in self._segments(conn, run_id, Status.CREATED, overdue)
                )
        return sorted(found)

    def unstick(self, run_id: str, segment: int, *, sending_before: datetime, now: datetime) -> int:
        """``sending`` since before ``sending_before`` → ``created`` (their worker died).

        The interrupted send counts as an attempt (the provider may have had it), with the code
        ``interrupted``: a message that kills its worker every time ends once ``max_attempts`` is
        reached instead of taking worker after worker down.
        """
        stmt = (
            update(messages_t)
            .where(
                messages_t.c.run_id == run_id,
                messages_t.c.status == Status.SENDING.value,
                messages_t.c.segment == segment,
                messages_t.c.sending_at < sending_before,
            )
            .values(
                status=Status.CREATED.value,
                attempts=messages_t.c.attempts + 1,
                error_code=INTERRUPTED,
                error_text="its worker stopped while sending it",
                updated_at=now,
            )
        )
        with self._tx() as conn:
            return int(conn.execute(stmt).rowcount)

    # Occurrences and reach ---------------------------------------------------------------------

    def record_occurrence(self, occurrence: OccurrenceRecord) -> OccurrenceRecord:
        """Store what became of a slot and return what is stored: the first record of a slot stays,
        except that a launch replaces a skip (a slot refused once, launched later by a wider
        ``catch_up``)."""
        values = {f.name: getattr(occurrence, f.name) for f in fields(OccurrenceRecord)}
        with self._tx() as conn:
            conn.execute(self._insert_ignore(occurrences_t).values(values))
            if occurrence.outcome == "launched":
                conn.execute(
                    update(occurrences_t)
                    .where(occurrences_t.c.key == occurrence.key, occurrences_t.c.outcome != "launched")
                    .values(values)
                )
            row = conn.execute(select(occurrences_t).where(occurrences_t.c.key == occurrence.key)).mappings()
            return OccurrenceRecord(**row.one())

    def occurrences(self, campaign: str, *, limit: int = 50) -> list[OccurrenceRecord]:
        """The recorded slots of ``campaign``, latest slot first."""
        stmt = (
            select(occurrences_t)
            .where(occurrences_t.c.campaign == campaign)
            .order_by(
                func.coalesce(occurrences_t.c.slot, occurrences_t.c.recorded_at).desc(),
                occurrences_t.c.recorded_at.desc(),
            )
            .limit(limit)
        )
        with self._tx(write=False) as conn:
            return [OccurrenceRecord(**row) for row in conn.execute(stmt).mappings()]

    def last_slot(self, campaign: str) -> datetime | None:
        """The latest slot of ``campaign`` on record, launched or skipped."""
        stmt = select(func.max(occurrences_t.c.slot)).where(occurrences_t.c.campaign == campaign)
        with self._tx(write=False) as conn:
            value: datetime | None = conn.execute(stmt).scalar()  # max() keeps the column's type
        return value

    def reaching_runs(
        self,
        since: datetime,
        *,
        campaign: str | None = None,
        categories: Collection[str] = (),
        exclude: str | None = None,
    ) -> list[str]:
        """Runs (test runs aside) that may have reached someone since ``since``: of ``campaign``, or
        of one of ``categories``; not finished before ``since``."""
        which = []
        if campaign is not None:
            which.append(runs_t.c.campaign == campaign)
        if categories:
            which.append(runs_t.c.category.in_(list(categories)))
        if not which:
            return []
        stmt = select(runs_t.c.id).where(
            or_(*which),
            runs_t.c.test.is_(False),
            or_(runs_t.c.finished_at.is_(None), runs_t.c.finished_at >= since),
        )
        if exclude is not None:
            stmt = stmt.where(runs_t.c.id != exclude)
        with self._tx(write=False) as conn:
            return list(conn.execute(stmt).scalars())

    def reached(self, recipient_ids: Sequence[str], runs: Sequence[str], since: datetime) -> dict[str, int]:
        """Of ``recipient_ids``, those ``runs`` reached since ``since`` (a message sent or delivered) or
        are still to reach (a message ``created`` or ``sending``): how many of the runs each."""
        if not recipient_ids or not runs:
            return {}
        m = messages_t.c
        reach = or_(
            m.status.in_((Status.CREATED.value, Status.SENDING.value)),
            and_(
                m.status.in_((Status.SENT.value, Status.DELIVERED.value)),
                func.coalesce(m.sent_at, m.delivered_at, m.updated_at) >= since,
            ),
        )
        out: dict[str, int] = {}
        with self._tx(write=False) as conn:
            for some_runs in _chunks(runs, self._chunk // 2):
                for ids in _chunks(recipient_ids, self._chunk):
                    stmt = (
                        select(m.recipient_id, func.count(m.run_id.distinct()))
                        .where(
                            _in(m.run_id, some_runs, self._postgresql),
                            _in(m.recipient_id, ids, self._postgresql),
                            reach,
                        )
                        .group_by(m.recipient_id)
                    )
                    for rid, n in conn.execute(stmt):
                        out[rid] = out.get(rid, 0) + int(n)
        return out

    # Reading -------------------------------------------------------------------------------------

    def sent_since(self, provider: str, since: datetime) -> int:
        """Messages handed to ``provider`` since ``since``, every run: a daily quota's count so far."""
        stmt = select(func.count()).where(messages_t.c.provider == provider, messages_t.c.sent_at >= since)
        with self._tx(write=False) as conn:
            return int(conn.execute(stmt).scalar_one())

    def counts(self, run_id: str) -> dict[tuple[str, Status], int]:
        """(channel, status) → number of messages."""
        stmt = (
            select(messages_t.c.channel, messages_t.c.status, func.count())
            .where(messages_t.c.run_id == run_id)
            .group_by(messages_t.c.channel, messages_t.c.status)
        )
        with self._tx(write=False) as conn:
            return {(channel, Status(status)): n for channel, status, n in conn.execute(stmt)}

    def messages(
        self, run_id: str, *, statuses: Sequence[Status] | None = None, with_context: bool = False
    ) -> Iterator[MessageRecord]:
        """Stream messages in audience order (line, then channel), in batches.

        Each batch is its own short read (keyset pagination), so a long report never holds the
        database. Records carry ``line``; ``context`` only ``with_context`` (shared per recipient).
        """
        columns = [*_MESSAGE_COLUMNS, recipients_t.c.line]
        if with_context:
            columns.append(recipients_t.c.context)
        line, index, ident = recipients_t.c.line, messages_t.c.channel_index, messages_t.c.id
        base = (
            select(*columns)
            .join_from(messages_t, recipients_t, _JOIN)
            .where(messages_t.c.run_id == run_id, recipients_t.c.run_id == run_id)
            .order_by(line, index, ident)
            .limit(_STREAM_BATCH)
        )
        if statuses is not None:
            base = base.where(messages_t.c.status.in_([Status(s).value for s in statuses]))
        stmt = base
        while True:
            with self._tx(write=False) as conn:
                rows = conn.execute(stmt).all()
            contexts: dict[str | None, dict[str, Any] | None] | None = {} if with_context else None
            batch = [_message_from(row, contexts) for row in rows]
            yield from batch
            if len(rows) < _STREAM_BATCH:
                return
            last = batch[-1]
            stmt = base.where(
                line >= last.line,
                or_(
                    line > last.line,
                    index > last.channel_index,
                    and_(index == last.channel_index, ident > last.id),
                ),
            )

    # Helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _segments(
        conn: Connection, run_id: str, status: Status, having: ColumnElement[bool] | None = None
    ) -> list[int]:
        """The segments of a run holding a message in ``status`` (and matching ``having``).

        A loose index scan: one probe of (run_id, status, segment) per segment, instead of reading
        every message of a run that may hold millions.
        """
        step = messages_t.alias("step")
        seed = select(func.min(messages_t.c.segment).label("segment")).where(
            messages_t.c.run_id == run_id, messages_t.c.status == status.value
        )
        segs = seed.cte("segs", recursive=True)
        following = (
            select(func.min(step.c.segment))
            .where(step.c.run_id == run_id, step.c.status == status.value, step.c.segment > segs.c.segment)
            .scalar_subquery()
        )
        segs = segs.union_all(select(following).where(segs.c.segment.is_not(None)))
        stmt = select(segs.c.segment).where(segs.c.segment.is_not(None))
        if having is not None:
            match = (
                select(messages_t.c.id)
                .where(
                    messages_t.c.run_id == run_id,
                    messages_t.c.status == status.value,
                    messages_t.c.segment == segs.c.segment,
                    having,
                )
                .exists()
            )
            stmt = stmt.where(match)
        return list(conn.execute(stmt).scalars())

    # Receipts ------------------------------------------------------------------------------------
    # Delivery receipts (smartpush.receipts): matched to messages by (provider account, provider
    # reference), every one stored in `receipts`, the proof of delivery. A message only moves up
    # sent < temporary-failure < permanent-failure < delivered (smartpush.receipts.settle).

    #: store_receipts on PostgreSQL, in one round trip: the batch as arrays; its messages locked; per
    #: message the best receipt of the batch (highest rank, first of equals) applied when it is higher
    #: than the message's status (smartpush.receipts.settle, in SQL); every receipt inserted; one row
    #: back per receipt, in order: the message's state after, its status before, and whether this
    #: receipt moved it. A statement's CTEs all see the snapshot it started with, hence `moved` for the
    #: state after.
    _STORE_RECEIPTS_PG = """
        WITH input AS (
            SELECT * FROM unnest(
                %(provider)s::text[], %(reference)s::text[], %(status)s::text[], %(code)s::text[],
                %(text)s::text[], %(occurred)s::timestamptz[], %(received)s::timestamptz[]
            ) WITH ORDINALITY AS i(provider, reference, status, code, text, occurred, received, n)
        ),
        locked AS (
            SELECT m.id, m.provider, m.provider_reference AS reference, m.status, m.channel, m.address,
                   m.sent_at, m.delivered_at, m.error_code, m.error_text
            FROM messages m
            WHERE (m.provider, m.provider_reference) IN (SELECT DISTINCT provider, reference FROM input)
              AND m.provider_reference IS NOT NULL
            ORDER BY m.id
            FOR UPDATE
        ),
        ranked AS (
            SELECT l.id, i.n, i.status, i.code, i.text, coalesce(i.occurred, i.received) AS at,
                   array_position(ARRAY['sent', 'temporary-failure', 'permanent-failure', 'delivered'],
                                  i.status) AS r,
                   array_position(ARRAY['sent', 'temporary-failure', 'permanent-failure', 'delivered'],
                                  l.status::text) AS current
            FROM locked l JOIN input i ON i.provider = l.provider AND i.reference = l.reference
        ),
        best AS (
            SELECT DISTINCT ON (id) id, n, status, code, text, at, r, current
            FROM ranked WHERE r IS NOT NULL
            ORDER BY id, r DESC, n
        ),
        moved AS (
            UPDATE messages m SET
                status = b.status,
                error_code = CASE WHEN b.status = 'delivered' THEN NULL ELSE b.code END,
                error_text = CASE WHEN b.status = 'delivered' THEN NULL ELSE b.text END,
                delivered_at = CASE WHEN b.status = 'delivered'
                    THEN greatest(least(b.at, %(now)s::timestamptz), m.sent_at) ELSE m.delivered_at END,
                final_at = %(now)s::timestamptz,
                updated_at = %(now)s::timestamptz
            FROM best b
            WHERE m.id = b.id AND b.current IS NOT NULL AND b.r > b.current
            RETURNING m.id, b.n, m.status, m.delivered_at, m.error_code, m.error_text
        ),
        first AS (
            SELECT i.n, min(l.id) AS id
            FROM input i LEFT JOIN locked l ON l.provider = i.provider AND l.reference = i.reference
            GROUP BY i.n
        ),
        stored AS (
            INSERT INTO receipts (provider, reference, status, error_code, error_text, occurred_at,
                                  received_at, message_id, applied_at)
            SELECT i.provider, i.reference, i.status, i.code, i.text, i.occurred, i.received, f.id,
                   CASE WHEN f.id IS NULL THEN NULL ELSE %(now)s::timestamptz END
            FROM input i JOIN first f ON f.n = i.n
            ORDER BY i.n
        )
        SELECT l.id, coalesce(mv.status, l.status), l.channel, l.address, l.sent_at,
               CASE WHEN mv.id IS NULL THEN l.delivered_at ELSE mv.delivered_at END,
               CASE WHEN mv.id IS NULL THEN l.error_code ELSE mv.error_code END,
               CASE WHEN mv.id IS NULL THEN l.error_text ELSE mv.error_text END,
               l.status, coalesce(mv.n = f.n, false)
        FROM first f
        LEFT JOIN locked l ON l.id = f.id
        LEFT JOIN moved mv ON mv.id = f.id
        ORDER BY f.n
    """

    def store_receipts(self, incoming: Sequence[IncomingReceipt], now: datetime) -> list[Settled]:
        """Store every receipt and apply those whose message is known, in one transaction.

        Returns, for each receipt in order, its message as the receipts left it (``None``: no message
        carries the reference yet; the receipt waits, stored, for :meth:`record` to record it) and
        whether it moved the message: of a batch's receipts for one message, the highest status (the
        first of equals) decides, as if they came one by one. The messages are locked while they are
        settled, so concurrent writers never lose a receipt's effect. PostgreSQL does it all in one
        statement (``_STORE_RECEIPTS_PG``). Every path that delivers a message observes
        ``smartpush_time_to_delivery_seconds``.
        """
        if not incoming:
            return []
        with self._tx() as conn:
            if self._postgresql:
                settled = self._store_receipts_pg(conn, incoming, now)
                changed = list(
                    {s.message.id: s.message for s in settled if s.message and s.message.changed}.values()
                )
            else:
                settled, changed = self._store_receipts_sql(conn, incoming, now)
        self._after_receipts(changed)
        return settled

    def _store_receipts_sql(
        self, conn: Connection, incoming: Sequence[IncomingReceipt], now: datetime
    ) -> tuple[list[Settled], list[MessageState]]:
        references: dict[str, set[str]] = {}
        for item in incoming:
            references.setdefault(item.provider, set()).add(item.receipt.provider_reference)
        found: dict[tuple[str, str], list[MessageState]] = {}
        for provider, refs in references.items():
            for reference, states in self._receipt_messages(conn, provider, refs).items():
                found[provider, reference] = states
        best: dict[str, tuple[int, int, MessageState]] = {}  # message id -> (rank, index, state)
        for index, item in enumerate(incoming):
            rank = RANK.get(item.receipt.status, -1)
            for state in found.get((item.provider, item.receipt.provider_reference), []):
                if state.id not in best or rank > best[state.id][0]:
                    best[state.id] = (rank, index, state)
        moved: set[int] = set()
        for _, index, state in best.values():
            receipt = incoming[index].receipt
            at = receipt.occurred_at or incoming[index].received_at
            if settle(state, receipt.status, receipt.error_code, receipt.error_text, at, now):
                moved.add(index)
        rows: list[dict[str, Any]] = []
        settled: list[Settled] = []
        for index, item in enumerate(incoming):
            receipt = item.receipt
            states = found.get((item.provider, receipt.provider_reference), [])
            rows.append(
                {
                    "provider": item.provider,
                    "reference": receipt.provider_reference,
                    "status": receipt.status,
                    "error_code": receipt.error_code,
                    "error_text": receipt.error_text,
                    "occurred_at": receipt.occurred_at,
                    "received_at": item.received_at,
                    "message_id": states[0].id if states else None,
                    "applied_at": now if states else None,
                }
            )
            settled.append(Settled(item, states[0] if states else None, index in moved))
        changed = [s for ss in found.values() for s in ss if s.changed]
        self._write_receipt_states(conn, changed, now)
        conn.execute(receipts_t.insert(), rows)
        return settled, changed

    def _store_receipts_pg(
        self, conn: Connection, incoming: Sequence[IncomingReceipt], now: datetime
    ) -> list[Settled]:
        """:meth:`store_receipts` on PostgreSQL: one statement, one round trip, whatever the batch."""
        receipts = [item.receipt for item in incoming]
        params = {
            "provider": [item.provider for item in incoming],
            "reference": [r.provider_reference for r in receipts],
            "status": [r.status for r in receipts],
            "code": [r.error_code for r in receipts],
            "text": [r.error_text for r in receipts],
            "occurred": [r.occurred_at for r in receipts],
            "received": [item.received_at for item in incoming],
            "now": now,
        }
        driver: Any = conn.connection.driver_connection  # psycopg's own connection, in our transaction
        dbapi_error: Any = self._engine.dialect.loaded_dbapi.Error
        try:
            with driver.cursor() as cursor:
                cursor.execute(self._STORE_RECEIPTS_PG, params)
                rows = cursor.fetchall()
        except dbapi_error as exc:  # the same exceptions as every other statement raises
            raise DBAPIError.instance(self._STORE_RECEIPTS_PG, None, exc, dbapi_error) from exc
        states: dict[str, MessageState] = {}
        settled: list[Settled] = []
        for item, row in zip(incoming, rows, strict=True):
            message_id, moved = row[0], bool(row[9])
            state = None
            if message_id is not None:
                state = states.get(message_id)
                if state is None:
                    state = states[message_id] = MessageState(
                        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], read_status=row[8]
                    )
                state.changed |= moved
            settled.append(Settled(item, state, moved))
        return settled

    def settle_receipts(
        self, provider: str, references: Collection[str], now: datetime
    ) -> dict[str, MessageState]:
        """Apply the stored receipts of these references that still wait for their message.

        Returns the message of each reference some message carries, as it is now (whether this call,
        :meth:`record` or an earlier receipt settled it). ``serve`` asks this a little after storing a
        receipt that matched nothing: the send may have been recorded meanwhile.
        """
        result: dict[str, MessageState] = {}
        with self._tx() as conn:
            found = self._receipt_messages(conn, provider, references)
            if not found:
                return result
            applied: list[dict[str, Any]] = []
            r = receipts_t.c
            for chunk in _chunks(sorted(found), self._chunk):
                waiting = (
                    select(
                        r.id, r.reference, r.status, r.error_code, r.error_text, r.occurred_at, r.received_at
                    )
                    .where(
                        r.provider == provider,
                        _in(r.reference, chunk, self._postgresql),
                        r.message_id.is_(None),
                    )
                    .order_by(r.id)
                )
                for rid, reference, status, code, text, occurred, received in conn.execute(waiting):
                    states = found[reference]
                    for state in states:
                        settle(state, status, code, text, occurred or received, now)
                    applied.append({"b_rid": rid, "b_mid": states[0].id})
            changed = [s for ss in found.values() for s in ss if s.changed]
            self._write_receipt_states(conn, changed, now)
            self._mark_receipts_applied(conn, applied, now)
        self._after_receipts(changed)
        return {reference: states[0] for reference, states in found.items()}

    def message_receipts(self, message_id: str) -> list[StoredReceipt]:
        """Every receipt matched to a message, oldest first: the proof of what reached whom."""
        stmt = (
            select(*(receipts_t.c[f] for f in StoredReceipt.__slots__))
            .where(receipts_t.c.message_id == message_id)
            .order_by(receipts_t.c.received_at, receipts_t.c.id)
        )
        with self._tx(write=False) as conn:
            return [StoredReceipt(*row) for row in conn.execute(stmt)]

    def _receipt_messages(
        self, conn: Connection, provider: str, references: Collection[str]
    ) -> dict[str, list[MessageState]]:
        """The messages of ``provider`` carrying these references, locked, by reference."""
        m = messages_t.c
        found: dict[str, list[MessageState]] = {}
        for chunk in _chunks(sorted(set(references)), self._chunk):
            stmt = (
                select(m.provider_reference, m.id, m.status, m.channel, m.address, m.sent_at, m.delivered_at)
                .add_columns(m.error_code, m.error_text)
                .where(
                    m.provider == provider,
                    _in(m.provider_reference, chunk, self._postgresql),
                    m.provider_reference.is_not(None),
                )
                .order_by(m.id)
                .with_for_update()
            )
            for reference, *values in conn.execute(stmt):
                found.setdefault(reference, []).append(MessageState(*values))
        return found

    @staticmethod
    def _write_receipt_states(conn: Connection, states: Sequence[MessageState], now: datetime) -> None:
        if not states:
            return
        m = messages_t.c
        stmt = (
            update(messages_t)
            .where(m.id == bindparam("b_id", type_=String), m.status == bindparam("b_old", type_=String))
            .values(
                status=bindparam("b_status", type_=String),
                error_code=bindparam("b_code", type_=String),
                error_text=bindparam("b_text", type_=String),
                delivered_at=bindparam("b_delivered", type_=UTCDateTime()),
                final_at=bindparam("b_now", type_=UTCDateTime()),
                updated_at=bindparam("b_now", type_=UTCDateTime()),
            )
        )
        params = [
            {
                "b_id": s.id,
                "b_old": s.read_status,
                "b_status": s.status,
                "b_code": s.error_code,
                "b_text": s.error_text,
                "b_delivered": s.delivered_at,
                "b_now": now,
            }
            for s in states
        ]
        conn.execute(stmt, params)

    @staticmethod
    def _mark_receipts_applied(conn: Connection, applied: list[dict[str, Any]], now: datetime) -> None:
        if not applied:
            return
        stmt = (
            update(receipts_t)
            .where(receipts_t.c.id == bindparam("b_rid", type_=Integer))
            .values(message_id=bindparam("b_mid", type_=String), applied_at=literal(now, UTCDateTime()))
        )
        conn.execute(stmt, applied)

    def _apply_waiting_receipts(self, message_ids: Sequence[str], now: datetime) -> None:
        """The hook at the end of :meth:`record`: receipts stored before these sends were recorded.

        One read when none waits (the usual case); a failure is logged, never raised: the results are
        recorded already, and ``serve`` looks at unmatched receipts again on its own.
        """
        m, r = messages_t.c, receipts_t.c
        join = and_(r.provider == m.provider, r.reference == m.provider_reference)
        ids = sorted(set(message_ids))
        try:
            waiting = False
            for chunk in _chunks(ids, self._chunk):
                probe = (
                    select(r.id)
                    .select_from(messages_t.join(receipts_t, join))
                    .where(_in(m.id, chunk, self._postgresql), r.message_id.is_(None))
                    .limit(1)
                )
                with self._tx(write=False) as conn:
                    if conn.execute(probe).first() is not None:
                        waiting = True
                        break
            if not waiting:
                return
            states: dict[str, MessageState] = {}
            with self._tx() as conn:
                applied: list[dict[str, Any]] = []
                for chunk in _chunks(ids, self._chunk):
                    stmt = (
                        select(r.id, r.status, r.error_code, r.error_text, r.occurred_at, r.received_at)
                        .add_columns(m.id, m.status, m.channel, m.address, m.sent_at, m.delivered_at)
                        .add_columns(m.error_code, m.error_text)
                        .select_from(messages_t.join(receipts_t, join))
                        .where(_in(m.id, chunk, self._postgresql), r.message_id.is_(None))
                        .order_by(m.id, r.id)
                        .with_for_update(of=messages_t)
                    )
                    for rid, status, code, text, occurred, received, *message in conn.execute(stmt):
                        state = states.setdefault(message[0], MessageState(*message))
                        settle(state, status, code, text, occurred or received, now)
                        applied.append({"b_rid": rid, "b_mid": state.id})
                changed = [s for s in states.values() if s.changed]
                self._write_receipt_states(conn, changed, now)
                self._mark_receipts_applied(conn, applied, now)
            self._after_receipts(changed)
        except (InfrastructureError, DBAPIError) as exc:
            _log.warning(
                "receipts waiting for %d just-recorded send(s) could not be applied (%s): they stay "
                "stored, and serve looks at them again",
                len(ids),
                type(exc).__name__,
            )

    def _after_receipts(self, changed: Sequence[MessageState]) -> None:
        """Metrics of the messages receipts just moved: time to delivery, and one
        ``smartpush_messages_total`` count in the new status (campaign and account read here)."""
        observe_delivery(changed)
        moved = [s for s in changed if s.changed and s.status != s.read_status]
        if not moved:
            return
        from .metrics import MESSAGES

        labels: dict[str, tuple[str, str]] = {}
        for chunk in _chunks([s.id for s in moved], self._chunk):
            stmt = (
                select(messages_t.c.id, runs_t.c.campaign, messages_t.c.provider)
                .join_from(messages_t, runs_t, messages_t.c.run_id == runs_t.c.id)
                .where(_in(messages_t.c.id, chunk, self._postgresql))
            )
            with self._tx(write=False) as conn:
                labels.update({mid: (campaign, provider) for mid, campaign, provider in conn.execute(stmt)})
        for state in moved:
            if state.id in labels:
                campaign, provider = labels[state.id]
                MESSAGES.labels(
                    campaign=campaign, channel=state.channel, provider=provider, status=state.status
                ).inc()

    # Suppression list ----------------------------------------------------------------------------
    def suppress(
        self, entries: Sequence[Suppression], *, yielding: Collection[str] = ("opt-out", "complaint")
    ) -> int:
        """Add entries to the suppression list; returns how many were added or made stricter.

        An address already on a channel's list keeps its first entry, except that an entry whose
        reason is one of ``yielding`` (the reasons ``service`` notices send through, see
        :mod:`smartpush.suppression`) gives way to one whose reason is not: an address that opted
        out and then bounced must stop every campaign, not only marketing and information.
        """
        strict_first: dict[tuple[str, str], Suppression] = {}
        for e in entries:  # one entry per address, the stricter when a batch names it twice
            known = strict_first.get((e.channel, e.address_hash))
            if known is None or (known.reason in yielding and e.reason not in yielding):
                strict_first[(e.channel, e.address_hash)] = e
        if not strict_first:
            return 0
        rows = [
            {
                "channel": e.channel,
                "address_hash": e.address_hash,
                "reason": e.reason,
                "source": e.source,
                "created_at": e.created_at,
            }
            for e in strict_first.values()
        ]
        columns = suppressions_t.c
        insert = self._insert_ignore(suppressions_t).returning(columns.channel, columns.address_hash)
        with self._tx() as conn:
            # RETURNING names the rows really inserted: executemany's rowcount is -1 on PostgreSQL.
            added = {(row[0], row[1]) for row in conn.execute(insert, rows)}
            stricter: dict[tuple[str, str, str, datetime], list[str]] = {}
            for (channel, address_hash), e in strict_first.items():
                if (channel, address_hash) not in added and e.reason not in yielding:
                    stricter.setdefault((channel, e.reason, e.source, e.created_at), []).append(address_hash)
            made_stricter = 0
            for (channel, reason, source, created_at), hashes in stricter.items():
                for chunk in _chunks(hashes, self._chunk):
                    stmt = (
                        update(suppressions_t)
                        .where(
                            columns.channel == channel,
                            _in(columns.address_hash, chunk, self._postgresql),
                            columns.reason.in_(list(yielding)),
                        )
                        .values(reason=reason, source=source, created_at=created_at)
                    )
                    made_stricter += conn.execute(stmt).rowcount
        return len(added) + made_stricter

    def suppressed(self, channel: str, address_hashes: Collection[str]) -> set[str]:
        """Which of these keyed address hashes are on the channel's suppression list."""
        return set(self.suppression_reasons(channel, address_hashes))

    def suppression_reasons(self, channel: str, address_hashes: Collection[str]) -> dict[str, str]:
        """The reason of each of these keyed address hashes on the channel's list (absent: not on it).

        One query (SQLite: one per 500 hashes; PostgreSQL: per 10,000, one array parameter), on the
        primary key: the check before each batch of sends, and at launch per batch of the split. On
        PostgreSQL 2,000 hashes cost one query and one scan, where IN lists of 500 cost four of each
        (98 ms against 15 ms against a list of 100,000 entries).
        """
        found: dict[str, str] = {}
        columns = suppressions_t.c
        for chunk in _chunks(sorted(set(address_hashes)), self._chunk):
            stmt = select(columns.address_hash, columns.reason).where(
                columns.channel == channel, _in(columns.address_hash, chunk, self._postgresql)
            )
            with self._tx(write=False) as conn:
                found.update((h, r) for h, r in conn.execute(stmt))
        return found

    def suppressed_channels(self, channels: Collection[str]) -> set[str]:
        """Which of these channels have at least one entry on the list: one index probe each.

        A launch asks once, and looks nothing up for a channel whose list is empty.
        """
        columns = suppressions_t.c
        with self._tx(write=False) as conn:
            return {
                c
                for c in sorted(set(channels))
                if conn.execute(select(columns.channel).where(columns.channel == c).limit(1)).first()
            }

    def unsuppress(self, channel: str, address_hashes: Collection[str]) -> int:
        """Remove these keyed address hashes from the channel's list; returns how many were there."""
        removed = 0
        columns = suppressions_t.c
        with self._tx() as conn:
            for chunk in _chunks(sorted(set(address_hashes)), self._chunk):
                stmt = suppressions_t.delete().where(
                    columns.channel == channel, _in(columns.address_hash, chunk, self._postgresql)
                )
                removed += conn.execute(stmt).rowcount
        return removed

    def latest_suppressions(
        self, *, channel: str | None = None, reason: str | None = None, limit: int = 50
    ) -> list[Suppression]:
        """The newest entries first (then by channel and hash), at most ``limit``."""
        columns = suppressions_t.c
        stmt = (
            select(suppressions_t)
            .order_by(columns.created_at.desc(), columns.channel, columns.address_hash)
            .limit(limit)
        )
        if channel is not None:
            stmt = stmt.where(columns.channel == channel)
        if reason is not None:
            stmt = stmt.where(columns.reason == reason)
        with self._tx(write=False) as conn:
            return [Suppression(**row) for row in conn.execute(stmt).mappings()]

    def iter_suppressions(self, *, channel: str | None = None) -> Iterator[Suppression]:
        """Every entry, by channel then hash, read in pages (keyset): an export never holds the database."""
        columns = suppressions_t.c
        base = select(suppressions_t).order_by(columns.channel, columns.address_hash).limit(_STREAM_BATCH)
        if channel is not None:
            base = base.where(columns.channel == channel)
        stmt = base
        while True:
            with self._tx(write=False) as conn:
                batch = [Suppression(**row) for row in conn.execute(stmt).mappings()]
            yield from batch
            if len(batch) < _STREAM_BATCH:
                return
            last = batch[-1]
            stmt = base.where(
                or_(
                    columns.channel > last.channel,
                    and_(columns.channel == last.channel, columns.address_hash > last.address_hash),
                )
            )

    def suppression_counts(self) -> dict[tuple[str, str], int]:
        """(channel, reason) → entries on the list."""
        columns = suppressions_t.c
        stmt = select(columns.channel, columns.reason, func.count()).group_by(columns.channel, columns.reason)
        with self._tx(write=False) as conn:
            return {(channel, reason): int(n) for channel, reason, n in conn.execute(stmt)}

    # Bounces: `smartpush bounces` applies delivery status notifications ------------------------
    def messages_for_bounces(
        self,
        message_ids: Collection[str],
        *,
        references: Collection[str] = (),
        providers: Collection[str] = (),
    ) -> list[MessageRecord]:
        """Messages whose id is among ``message_ids``, or whose provider reference is among
        ``references`` at one of the ``providers`` accounts (the (provider, provider_reference) index
        needs the account), without line or context.
        """
        found: dict[str, MessageRecord] = {}
        accounts = sorted(set(providers))
        with self._tx(write=False) as conn:
            for chunk in _chunks(sorted(set(message_ids)), self._chunk):
                rows = conn.execute(
                    select(*_MESSAGE_COLUMNS).where(_in(messages_t.c.id, chunk, self._postgresql))
                )
                found.update((r.id, r) for r in (_message_from(row, None) for row in rows))
            if accounts:
                for chunk in _chunks(sorted(set(references)), self._chunk):
                    stmt = select(*_MESSAGE_COLUMNS).where(
                        messages_t.c.provider.in_(accounts),
                        _in(messages_t.c.provider_reference, chunk, self._postgresql),
                    )
                    found.update((r.id, r) for r in (_message_from(row, None) for row in conn.execute(stmt)))
        return list(found.values())

    def mark_bounced(self, failures: Sequence[tuple[str, str, str]], now: datetime) -> set[str]:
        """``sent`` → ``permanent-failure`` for each (message id, error code, error text): mail the
        provider accepted and that came back. Returns the ids changed; a message no longer ``sent``
        (delivered, already failed) is left as it is.
        """
        by_error: dict[tuple[str, str], set[str]] = {}
        for message_id, code, text in failures:
            by_error.setdefault((code, text), set()).add(message_id)
        changed: set[str] = set()
        if not by_error:
            return changed
        with self._tx() as conn:
            for (code, text), ids in sorted(by_error.items()):
                for chunk in _chunks(sorted(ids), self._chunk):
                    stmt = (
                        update(messages_t)
                        .where(
                            _in(messages_t.c.id, chunk, self._postgresql),
                            messages_t.c.status == Status.SENT.value,
                        )
                        .values(
                            status=Status.PERMANENT_FAILURE.value,
                            error_code=code,
                            error_text=text,
                            final_at=now,
                            updated_at=now,
                        )
                        .returning(messages_t.c.id)
                    )
                    changed.update(conn.execute(stmt).scalars())
        return changed

    # Visibility: what `status` shows per provider account ----------------------------------------
    def sent_per_provider(self, run_id: str, since: Sequence[datetime]) -> dict[str, list[int]]:
        """Per provider account, the run's messages handed to it (``sent_at``) since each of ``since``.

        ``{"sms-main": [n since since[0], n since since[1], ...]}``. Reads only the run's messages in a
        status that keeps ``sent_at``, through the (run, status) index.
        """
        from sqlalchemy import case

        if not since:
            return {}
        handed = [
            s.value
            for s in (Status.SENT, Status.DELIVERED, Status.PERMANENT_FAILURE, Status.TEMPORARY_FAILURE)
        ]
        sent_at = messages_t.c.sent_at
        stmt = (
            select(messages_t.c.provider, *(func.sum(case((sent_at >= t, 1), else_=0)) for t in since))
            .where(messages_t.c.run_id == run_id, messages_t.c.status.in_(handed), sent_at >= min(since))
            .group_by(messages_t.c.provider)
        )
        with self._tx(write=False) as conn:
            return {row[0]: [int(n or 0) for n in row[1:]] for row in conn.execute(stmt)}

    def unsent_per_provider(self, run_id: str, held_code: str, now: datetime) -> dict[str, dict[str, int]]:
        """Per provider account, the run's messages not handed over yet, by status.

        ``{"sms-main": {"created": n, "sending": n, "waiting": n, held_code: n}}``: the ``held_code``
        entry counts the ``created`` messages whose ``error_code`` is ``held_code`` and that are not due
        before ``now`` (held back by a daily quota until it resets). Reads only ``created``,
        ``waiting`` and ``sending`` messages, through the (run, status) index.
        """
        from sqlalchemy import case

        held_back = and_(messages_t.c.error_code == held_code, messages_t.c.next_attempt_at > now)
        held = func.sum(case((held_back, 1), else_=0))
        stmt = (
            select(messages_t.c.provider, messages_t.c.status, func.count(), held)
            .where(messages_t.c.run_id == run_id, messages_t.c.status.in_(_ACTIVE))
            .group_by(messages_t.c.provider, messages_t.c.status)
        )
        found: dict[str, dict[str, int]] = {}
        with self._tx(write=False) as conn:
            for provider, status, n, n_held in conn.execute(stmt):
                counts = found.setdefault(provider, {})
                counts[status] = int(n)
                if status == Status.CREATED.value:
                    counts[held_code] = int(n_held or 0)
        return found


def _chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _chunk_size(postgresql: bool) -> int:
    """How many values one condition of :func:`_in` takes on this database."""
    return _ARRAY_CHUNK if postgresql else _IN_CHUNK


def _in(column: ColumnElement[str], values: Sequence[str], postgresql: bool) -> ColumnElement[bool]:
    """``column`` is one of ``values`` (at most :func:`_chunk_size` of them).

    PostgreSQL: ``column = ANY(%(param)s::VARCHAR[])``, one array parameter, so the SQL text is the
    same short one whatever the count: SQLAlchemy and psycopg reuse their compiled form of it (an
    ``IN`` list of 500 placeholders was expanded by SQLAlchemy, then parsed again by psycopg, at every
    call: about 3 ms of a worker's CPU per 500 ids). The server turns an ``IN`` list into
    ``= ANY(ARRAY[...])`` itself, so the plans are those of an ``IN`` list of the same length (the
    primary key's index for a claim or a suppression lookup). SQLite has no arrays: an ``IN`` list.
    """
    if postgresql:
        return column == any_(bindparam(None, list(values), type_=_STRING_ARRAY))
    return column.in_(values)


#: One encoder for every row: json.dumps with options builds a new JSONEncoder at each call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _json(value: Any) -> str:
    return _JSON.encode(value)


def _is_due(now: datetime) -> ColumnElement[bool]:
    return or_(messages_t.c.next_attempt_at.is_(None), messages_t.c.next_attempt_at <= now)


def _run_from(row: RowMapping) -> RunRecord:
    values = {name: row[name] for name in _RUN_FIELDS}
    values["state"] = RunState(values["state"])
    values["channels"] = json.loads(values["channels"])
    return RunRecord(**values)


def _due_records(rows: Sequence[Row[*tuple[Any, ...]]], run_id: str, segment: int) -> list[MessageRecord]:
    """The records of :meth:`Ledger.due`'s rows (``_DUE_COLUMNS``): the worker reads every message it
    sends through here, so it does no more per row than it must."""
    contexts: dict[str | None, dict[str, Any] | None] = {}
    records: list[MessageRecord] = []
    append = records.append
    created = Status.CREATED
    for (
        message_id,
        recipient_id,
        channel,
        channel_index,
        provider,
        attempts,
        address,
        next_attempt_at,
        provider_reference,
        error_code,
        error_text,
        created_at,
        sending_at,
        sent_at,
        delivered_at,
        final_at,
        bypassed,
        line,
        text,
    ) in rows:
        context = _cached_context(text, contexts)
        append(  # positional, in the field order (keywords cost twice as much)
            MessageRecord(
                message_id,
                run_id,
                recipient_id,
                segment,
                channel,
                channel_index,
                provider,
                created,
                attempts,
                address,
                as_utc(next_attempt_at),
                provider_reference,
                error_code,
                error_text,
                as_utc(created_at),
                as_utc(sending_at),
                as_utc(sent_at),
                as_utc(delivered_at),
                as_utc(final_at),
                bypassed,
                line,
                context,
            )
        )
    return records


_RAW_DECODE = json.JSONDecoder().raw_decode


def _json_loads(text: str) -> Any:
    """``json.loads(text)``, about twice as fast on what the ledger writes (nothing around the value):
    the rest (whitespace around it, or an error) goes to json.loads itself."""
    try:
        value, end = _RAW_DECODE(text)
    except ValueError:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def _message_from(
    row: Row[*tuple[Any, ...]], contexts: dict[str | None, dict[str, Any] | None] | None
) -> MessageRecord:
    """A record from a row of ``_MESSAGE_COLUMNS``, line (and context when ``contexts`` is a cache).

    The columns are in the dataclass's field order, so the row's values go straight in.
    """
    record = MessageRecord(*row)
    record.status = _STATUSES[record.status]
    if contexts is not None:
        text: str | None = record.context  # type: ignore[assignment]  # still the stored JSON text
        record.context = _cached_context(text, contexts)
    return record


def _cached_context(
    text: str | None, contexts: dict[str | None, dict[str, Any] | None]
) -> dict[str, Any] | None:
    """A recipient's stored context, decoded once per batch: its messages share the one dict."""
    if text not in contexts:
        contexts[text] = None if text is None else _json_loads(text)
    return contexts[text]
