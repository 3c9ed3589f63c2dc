"""Launching a run: one run row, then the audience split into message rows and segments.

The split streams the audience once; every recipient × channel becomes a message row with its id made
now, written in bulk with the recipient's row (its render context). A segment is queued as soon as it
is complete, so sending starts while a large audience is still being split. A launch that dies half-way
is finished by launching again with the same ``--key``: rows already stored are skipped, and the
ledger's unique keys make a repeated row harmless.

A new run's large audience (:data:`PARALLEL_MIN_BYTES`, PostgreSQL ledger, a file whose lines can be
cut apart) is read by several forked processes, a chunk of lines each, which check the rows and format
them for PostgreSQL's COPY; the launching process numbers them in file order, drops duplicate ids and
hands the batches to two writer threads (1,000,000 recipients: 40,678 → 64,625 a second on a 2-core
VM, bench/RESULTS.md). The readers also apply the suppression list and the per-recipient limits
(``exclude_reached``, ``limits.per_recipient``), each with a ledger connection of its own. What is
stored is exactly what one process would store (tests/test_parallel_split.py).

Addresses on the suppression list are stored ``suppressed`` (the reason as error code), under the
campaign category's policy (:mod:`smartpush.suppression`); a ``first-reachable`` recipient's next
channel then becomes the one to try. The list is asked once per launch which channels it holds
entries for: with none, no address is looked up at all; otherwise one query per channel per batch.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import queue
import random
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.pool import AsyncResult
from multiprocessing.pool import Pool as ProcessPool
from pathlib import Path

from .audience import Row, Shard, ignore_interrupts
from .campaign import Category
from .dedup import SeenIds
from .ledger import Ledger, NewMessage, NewRecipient, RunRecord, RunState, SplitText, Status
from .loading import PreparedCampaign
from .metrics import count_launched, count_launched_tally
from .recipients import Evaluator, RecipientOutcome
from .runtime import Runtime
from .sending import log_run_finished
from .suppression import lookup, stops, suppressed_text
from .templating import PROVIDED_NAMES
from .units import FrequencyValue, format_duration

__all__ = ["Launch", "launch", "new_id"]

logger = logging.getLogger("smartpush.launch")

#: Recipients written per transaction: large enough to amortise round trips, small enough to resume.
SPLIT_BATCH = 2_000

#: A new run's audience file from this size on is read and checked in several processes at once
#: (one chunk of whole lines each, in turn); the launching process numbers the rows in file order,
#: drops duplicate ids and hands the batches to the writers. Smaller files are read in the launching
#: process: forking costs more than it saves.
PARALLEL_MIN_BYTES = 8 << 20
#: Bytes of audience file per chunk: about SPLIT_BATCH rows of a typical audience.
CHUNK_BYTES = 256 << 10
#: Reading processes of one launch, at most (and at most one per core).
MAX_SPLIT_PROCESSES = 4

_STATUS = {
    "send": Status.CREATED,
    "fallback": Status.WAITING,
    "skipped": Status.SKIPPED,
    "invalid": Status.INVALID,
}

Enqueue = Callable[[str, int], None]  # run id, segment


#: Random bits for ids. os.urandom cost 12 µs a call on this machine, more than the rest of the split
#: of a row; a generator seeded from it (again in every forked child) gives the same uniqueness.
_RANDOM = random.Random()
os.register_at_fork(after_in_child=_RANDOM.seed)


def new_id() -> str:
    """A sortable unique id: milliseconds since the epoch, then 64 random bits (hex).

    Ids are keys, not secrets: a provider sees a message's id as its idempotency key.
    """
    return f"{int(time.time() * 1000):011x}{_RANDOM.getrandbits(64):016x}"


@dataclass
class Launch:
    run: RunRecord
    created: bool  # False: a run with this key already existed
    resumed: bool = False  # True: this launch finished an interrupted split
    recipients: int = 0
    filtered: int = 0
    duplicates: int = 0
    invalid_rows: int = 0
    suppressed: int = 0  # messages this launch stored `suppressed`
    reached_recently: int = 0  # recipients left out by audience.exclude_reached
    capped: int = 0  # recipients left out by limits.per_recipient


def launch(
    rt: Runtime,
    prepared: PreparedCampaign,
    *,
    enqueue: Enqueue,
    key: str | None = None,
    rows: Iterable[Row] | None = None,
    parent_run_id: str | None = None,
) -> Launch:
    """Create (or find, by ``key``) the run of ``prepared`` and split its audience into the ledger.

    ``rows`` replaces the audience file (``resend`` passes the recipients of an earlier run).
    """
    campaign = prepared.campaign
    ledger = rt.ledger
    not_after = campaign.schedule.not_after
    run = RunRecord(
        id=new_id(),
        campaign=campaign.name,
        campaign_file=str(Path(prepared.file).resolve()),
        config_file=None
        if prepared.config.source.startswith("(")
        else str(Path(prepared.config.source).resolve()),
        key=key,
        category=str(campaign.category),
        priority=str(campaign.priority),
        strategy=campaign.strategy,
        channels=[str(c.channel) for c in prepared.channels],
        segment_size=campaign.segments.size,
        parent_run_id=parent_run_id,
        not_after=not_after if isinstance(not_after, datetime) else None,
        created_at=datetime.now(UTC),
    )
    run, created = ledger.create_run(run)
    result = Launch(run, created)
    if run.split_complete:
        return result
    result.resumed = not created
    logger.info(
        "run %s of %s %s: splitting the audience",
        run.id,
        run.campaign,
        "launched" if created else "resumed",
        extra={
            "run_id": run.id,
            "campaign": run.campaign,
            "outcome": "launched" if created else "resumed",
            "priority": run.priority,
            "channels": run.channels,
        },
    )
    _split(rt, prepared, run, result, enqueue, rows)
    return result


def _split(
    rt: Runtime,
    prepared: PreparedCampaign,
    run: RunRecord,
    result: Launch,
    enqueue: Enqueue,
    rows: Iterable[Row] | None,
) -> None:
    ledger = rt.ledger
    size = run.segment_size
    index = run.recipients
    after = run.split_line
    queued = index // size  # segments below this were complete, hence queued, before a restart
    recipients: list[NewRecipient] = []
    messages: list[NewMessage] = []
    evaluator = Evaluator(prepared, render="none", keep_data=True)
    # Data minimisation: a recipient's stored row keeps only what its messages are rendered from.
    needed = {name for c in prepared.channels for t in c.templates.values() for name in t.variables}
    needed -= PROVIDED_NAMES
    source = rows if rows is not None else prepared.audience
    last_line = after

    # Asked once: a channel whose list is empty costs the split nothing.
    listed = ledger.suppressed_channels(run.channels)
    screen = (
        _Screen(ledger, rt.config.secret_key(), run.category, run.strategy == "first-reachable", listed)
        if listed
        else None
    )
    reach = _Reach.of(rt, prepared, run)
    if index:  # resumed: the ids read before the stop are known, so their duplicates after it are too
        for rid, line in ledger.split_recipients(run.id, after):
            if rid != f"#line:{line}":  # an invalid row's placeholder id, never compared
                evaluator.seen.add(rid, line)
    readers = None
    if rows is None and result.created and index == 0:
        readers = _Readers.start(rt, prepared, run.id, frozenset(needed), screen, reach)  # before threads
    writer = _Writer(
        rt, run.id, size, queued, enqueue, screen, campaign=run.campaign, reach=reach, fresh=result.created
    )
    read_all = False
    if readers is not None:
        try:
            index, last_line, read_all = readers.split(evaluator.seen, writer, result, size)
        except BaseException:
            writer.finish()
            raise
        after = last_line  # should a reader have failed, the rest is read here (and fails here)

    def flush() -> None:
        writer.put(list(recipients), list(messages), last_line, index)
        recipients.clear()
        messages.clear()

    try:
        for outcome in () if read_all else evaluator.over(row for row in source if row.line > after):
            last_line = outcome.line
            if outcome.kind == "filtered":
                result.filtered += 1
                continue
            if outcome.kind == "duplicate":
                result.duplicates += 1
                continue
            recipient, made = _stored_row(prepared, outcome, needed, index // size)
            index += 1
            if outcome.kind == "invalid":
                result.invalid_rows += 1
            else:
                result.recipients += 1
            recipients.append(recipient)
            messages += made
            if len(recipients) >= SPLIT_BATCH:
                flush()
    except BaseException:
        writer.finish()  # what was read before the failure is stored: a relaunch resumes after it
        raise
    flush()
    queued = writer.finish()
    result.suppressed = writer.suppressed
    result.reached_recently, result.capped = writer.reached_recently, writer.capped
    ledger.update_split(
        run.id, split_line=last_line, segments=-(-index // size), recipients=index, complete=True
    )
    ledger.set_run_state(run.id, RunState.RUNNING, only_from=frozenset({RunState.SPLITTING}))
    for segment in ledger.pending_segments(run.id):
        if segment >= queued or result.resumed:
            enqueue(run.id, segment)
    fresh = ledger.get_run(run.id)
    if fresh is not None:
        result.run = fresh
    logger.info(
        "run %s split: %d recipients in %d segments, %d messages suppressed",
        run.id,
        index,
        -(-index // size),
        result.suppressed,
        extra={
            "run_id": run.id,
            "campaign": run.campaign,
            "outcome": "split",
            "recipients": index,
            "segments": -(-index // size),
            "invalid_rows": result.invalid_rows,
            "duplicates": result.duplicates,
            "filtered": result.filtered,
            "suppressed": result.suppressed,
            "reached_recently": result.reached_recently,
            "capped": result.capped,
        },
    )
    finished = datetime.now(UTC)
    if ledger.finish_if_done(run.id, finished):  # nothing to send (every row invalid, say)
        log_run_finished(ledger, result.run, finished)


def _stored_row(
    prepared: PreparedCampaign, outcome: RecipientOutcome, needed: Iterable[str], segment: int
) -> tuple[NewRecipient, list[NewMessage]]:
    """The recipient row and message rows the split stores for a recipient or an invalid row."""
    if outcome.kind == "invalid":
        rid = f"#line:{outcome.line}"
        return NewRecipient(rid, segment, outcome.line, {}), [
            NewMessage(
                new_id(),
                rid,
                segment,
                str(channel.channel),
                i,
                channel.providers[0],
                Status.INVALID,
                error_code="bad-row",
                error_text=outcome.reason,
            )
            for i, channel in enumerate(prepared.channels)
        ]
    rid = outcome.recipient_id or ""
    data = outcome.data or {}
    # Data minimisation: a recipient's stored row keeps only what its messages are rendered from.
    recipient = NewRecipient(rid, segment, outcome.line, {k: data[k] for k in needed if k in data})
    return recipient, [
        NewMessage(
            new_id(),
            rid,
            segment,
            str(ch.channel.channel),
            i,
            ch.channel.providers[0],
            _STATUS[ch.status],
            address=ch.address,
            error_code=ch.code,
            error_text=ch.reason,
        )
        for i, ch in enumerate(outcome.channels)
    ]


@dataclass
class _Forked:
    """What the reading processes inherit when they are forked (templates don't pickle)."""

    prepared: PreparedCampaign
    needed: frozenset[str]  # the columns a recipient's stored row keeps
    run_id: str
    screen: _Screen | None
    reach: _Reach | None
    ledger: Ledger  # the launching process's: a reader opens its own on the same database

    def own_ledger(self) -> Ledger:
        """In a reader: its own ledger (once), for the suppression and reach lookups."""
        global _READER_LEDGER
        if _READER_LEDGER is None:
            _READER_LEDGER = self.ledger.reopen()
            multiprocessing.util.Finalize(None, _READER_LEDGER.close, exitpriority=10)
        return _READER_LEDGER


_FORKED: _Forked | None = None
_READER_LEDGER: Ledger | None = None

#: A stored row's kind: (channel, account, status) of its messages, and 0, or 1 when it was left out by
#: ``exclude_reached``, 2 by ``limits.per_recipient``.
Signature = tuple[tuple[tuple[str, str, str], ...], int]


@dataclass
class _Chunk:
    """One chunk of the audience, read and checked in a reading process, in COPY text form."""

    failed: bool = False  # the chunk could not be read: the launching process reads on from before it
    filtered: int = 0
    last_line: int = 0  # the last line read
    lines: array[int] = field(default_factory=lambda: array("Q"))  # per row kept (recipient or invalid)
    keys: array[int] = field(default_factory=lambda: array("Q"))  # its id's SeenIds key; 0: invalid row
    recipients: list[str] = field(default_factory=list)  # its recipient row up to the segment
    messages: list[tuple[str, ...]] = field(default_factory=list)  # its message rows up to the segment
    kinds: array[int] = field(default_factory=lambda: array("I"))  # its index in ``signatures``
    signatures: list[Signature] = field(default_factory=list)


def _read_chunk(shard: Shard) -> _Chunk:
    """In a reading process: evaluate one chunk's rows as the launching process would."""
    assert _FORKED is not None  # noqa: S101 - set before the processes fork
    forked = _FORKED
    prepared = forked.prepared
    chunk = _Chunk()
    try:
        rows: list[tuple[NewRecipient, int, list[NewMessage]]] = []  # with its id's SeenIds key (0: invalid)
        for outcome in Evaluator(prepared, render="none", keep_data=True, dedup=False).over(
            prepared.audience.rows(shard)
        ):
            chunk.last_line = outcome.line
            if outcome.kind == "filtered":
                chunk.filtered += 1
                continue
            recipient, messages = _stored_row(prepared, outcome, forked.needed, 0)
            key = SeenIds.key(recipient.recipient_id) if outcome.kind == "recipient" else 0
            rows.append((recipient, key, messages))
        if forked.screen is not None or forked.reach is not None:
            _screen_chunk(forked, [m for row in rows for m in row[2]])
        text = SplitText(forked.run_id, datetime.now(UTC))
        kinds: dict[Signature, int] = {}
        for recipient, key, messages in rows:
            chunk.lines.append(recipient.line)
            chunk.keys.append(key)
            chunk.recipients.append(text.recipient(recipient))
            chunk.messages.append(tuple(text.message(m) for m in messages))
            codes = {m.error_code for m in messages}
            left_out = 1 if REACHED_RECENTLY in codes else 2 if FREQUENCY_CAP in codes else 0
            signature = (tuple((m.channel, m.provider, m.status.value) for m in messages), left_out)
            kind = kinds.get(signature)
            if kind is None:
                kind = kinds[signature] = len(chunk.signatures)
                chunk.signatures.append(signature)
            chunk.kinds.append(kind)
    except Exception:  # read again by the launching process, which reports it
        return _Chunk(failed=True)
    return chunk


def _screen_chunk(forked: _Forked, messages: list[NewMessage]) -> None:
    """In a reader: the recipients reached recently left out and the suppression list applied, as the
    launching process's writer does to a batch, with the reader's own ledger."""
    ledger = forked.own_ledger()
    if forked.reach is not None:
        forked.reach.ledger = ledger
        forked.reach.apply(messages)
    if forked.screen is not None:
        forked.screen.ledger = ledger
        forked.screen.apply(messages)


class _Readers:
    """Reading processes of a new run's split: forked before the writers start, they read and check
    the audience in chunks and format their rows; the launching process keeps the order."""

    def __init__(self, pool: ProcessPool, shards: list[Shard], processes: int) -> None:
        self.pool = pool
        self.shards = shards
        self.processes = processes

    @classmethod
    def start(
        cls,
        rt: Runtime,
        prepared: PreparedCampaign,
        run_id: str,
        needed: frozenset[str],
        screen: _Screen | None,
        reach: _Reach | None,
    ) -> _Readers | None:
        """Fork the readers, or None when the launching process should read alone: a small file, one
        core, SQLite (one writer at a time), or a file whose lines cannot be cut apart safely."""
        global _FORKED
        processes = min(os.cpu_count() or 1, MAX_SPLIT_PROCESSES)
        audience = prepared.audience
        if (
            processes < 2  # noqa: PLR2004 - one process is no split
            or not rt.ledger.parallel_writes
            or "fork" not in multiprocessing.get_all_start_methods()
            or audience.size < PARALLEL_MIN_BYTES
        ):
            return None
        shards = audience.shards(max(2, audience.size // CHUNK_BYTES), min_bytes=CHUNK_BYTES // 2)
        if shards is None:
            return None
        _FORKED = _Forked(prepared, needed, run_id, screen, reach, rt.ledger)
        try:
            pool = multiprocessing.get_context("fork").Pool(processes, initializer=ignore_interrupts)
        finally:
            _FORKED = None
        return cls(pool, shards, processes)

    def split(self, seen: SeenIds, writer: _Writer, result: Launch, size: int) -> tuple[int, int, bool]:
        """Number the rows the readers give back, in file order, and hand them to ``writer`` in batches.

        Returns (rows numbered, last line read, whether every chunk was read). Duplicate ids are
        dropped here, with ``seen``, as the launching process's own reading would.
        """
        index = last_line = 0
        recipients: list[str] = []
        messages: list[str] = []
        tally: Counter[Signature] = Counter()
        batch = 0
        pending: deque[AsyncResult[_Chunk]] = deque()
        shards = iter(self.shards)

        def submit() -> None:
            shard = next(shards, None)
            if shard is not None:
                pending.append(self.pool.apply_async(_read_chunk, (shard,)))

        def flush(line: int) -> None:
            nonlocal batch
            writer.put_text("".join(recipients), "".join(messages), tally.copy(), line, index)
            recipients.clear()
            messages.clear()
            tally.clear()
            batch = 0

        try:
            for _ in range(self.processes * 2):  # bounded: chunks read ahead wait in memory
                submit()
            while pending:
                chunk = pending.popleft().get()
                if chunk.failed:
                    break
                submit()
                result.filtered += chunk.filtered
                for i, line in enumerate(chunk.lines):
                    key = chunk.keys[i]
                    if key:
                        if seen.add_key(key, line) is not None:
                            result.duplicates += 1
                            continue
                        result.recipients += 1
                    else:
                        result.invalid_rows += 1
                    end = f"{index // size}\n"
                    index += 1
                    recipients += (chunk.recipients[i], end)
                    for row in chunk.messages[i]:
                        messages += (row, end)
                    tally[chunk.signatures[chunk.kinds[i]]] += 1
                    batch += 1
                    if batch >= SPLIT_BATCH:
                        flush(line)
                last_line = chunk.last_line
            else:
                if batch:
                    flush(last_line)
                return index, last_line, True
            if batch:
                flush(last_line)
            return index, last_line, False
        finally:
            self.pool.terminate()
            self.pool.join()


class _Screen:
    """Marks a batch's messages whose address is on the suppression list, under the run's policy."""

    def __init__(
        self, ledger: Ledger, key: bytes, category: str, first_reachable: bool, channels: set[str]
    ) -> None:
        self.ledger = ledger
        self.key = key
        self.category = category
        self.first_reachable = first_reachable
        self.channels = channels  # the channels whose list holds entries

    def apply(self, messages: list[NewMessage]) -> int:
        """Suppress in place; returns how many. One lookup per listed channel for the whole batch."""
        candidates = [
            m
            for m in messages
            if m.address is not None
            and m.channel in self.channels
            and m.status in (Status.CREATED, Status.WAITING)
        ]
        if not candidates:
            return 0
        reasons = lookup(self.ledger, self.key, [(m.channel, m.address) for m in candidates], self.channels)
        affected: set[str] = set()
        for message, reason in zip(candidates, reasons, strict=True):
            if reason is not None and stops(self.category, reason):
                message.status = Status.SUPPRESSED
                message.error_code = reason
                message.error_text = suppressed_text(message.channel, reason)
                affected.add(message.recipient_id)
        if self.first_reachable and affected:
            # As the split decides it: the first channel still to try is due, later ones wait for it.
            reached: set[str] = set()
            for message in messages:
                if message.recipient_id in affected and message.status in (Status.CREATED, Status.WAITING):
                    seen = message.recipient_id in reached
                    message.status = Status.WAITING if seen else Status.CREATED
                    reached.add(message.recipient_id)
        return sum(1 for m in candidates if m.status is Status.SUPPRESSED)


#: Error codes of the messages of recipients left out because they were reached recently.
REACHED_RECENTLY = "reached-recently"
FREQUENCY_CAP = "frequency-cap"


class _Reach:
    """Leaves out the recipients reached recently: by an earlier run of this campaign
    (``audience.exclude_reached``) or by as many runs as ``limits.per_recipient`` allows (``information``
    and ``marketing`` runs count; ``service`` campaigns are neither capped nor counted).

    Their messages are stored ``skipped`` with the reason, so the run's counts still add up and a
    report says why. "Reached" is a message sent or delivered within the period, or one still queued
    (``created``/``sending``) in another run, so two runs launched together do not both send. The runs
    that can count are looked up once, when the split starts.
    """

    def __init__(
        self,
        ledger: Ledger,
        now: datetime,
        own: tuple[list[str], timedelta, str] | None,
        cap: tuple[list[str], FrequencyValue] | None,
    ) -> None:
        self.ledger = ledger
        self.now = now
        self.own = own
        self.cap = cap

    @classmethod
    def of(cls, rt: Runtime, prepared: PreparedCampaign, run: RunRecord) -> _Reach | None:
        campaign = prepared.campaign
        period = campaign.audience.exclude_reached
        limit = rt.config.settings.limits.per_recipient
        if run.test or (period is None and (limit is None or run.category == Category.SERVICE)):
            return None
        now = datetime.now(UTC)
        own = None
        if period is not None:
            runs = rt.ledger.reaching_runs(now - period, campaign=run.campaign, exclude=run.id)
            own = (runs, period, format_duration(period))
        cap = None
        if limit is not None and run.category != Category.SERVICE:
            counted = [c.value for c in Category if c is not Category.SERVICE]
            cap = (rt.ledger.reaching_runs(now - limit.period, categories=counted, exclude=run.id), limit)
        return cls(rt.ledger, now, own, cap)

    def apply(self, messages: list[NewMessage]) -> tuple[int, int]:
        """Skip in place the messages of recipients reached recently; returns how many recipients
        each rule left out (exclude_reached, per_recipient)."""
        ids = list(
            dict.fromkeys(m.recipient_id for m in messages if m.status in (Status.CREATED, Status.WAITING))
        )
        if not ids:
            return 0, 0
        left_out: dict[str, tuple[str, str]] = {}
        if self.own is not None:
            runs, period, text = self.own
            for rid in self.ledger.reached(ids, runs, self.now - period):
                left_out[rid] = (
                    REACHED_RECENTLY,
                    f"this campaign reached the recipient less than {text} ago (audience.exclude_reached)",
                )
        own = len(left_out)
        if self.cap is not None:
            runs, limit = self.cap
            rest = [rid for rid in ids if rid not in left_out]
            for rid, n in self.ledger.reached(rest, runs, self.now - limit.period).items():
                if n >= limit.count:
                    within = format_duration(limit.period)
                    text = f"{n} campaign(s) reached the recipient within {within} (limits.per_recipient)"
                    left_out[rid] = (FREQUENCY_CAP, text)
        if left_out:
            for message in messages:
                reason = left_out.get(message.recipient_id)
                if reason is not None and message.status in (Status.CREATED, Status.WAITING):
                    message.status = Status.SKIPPED
                    message.error_code, message.error_text = reason
                    message.address = None  # not needed: nothing will be sent
        return own, len(left_out) - own


_Batch = tuple[list[NewRecipient], list[NewMessage]]


@dataclass
class _TextBatch:
    recipients: str
    messages: str
    tally: Counter[Signature]


class _Writer:
    """Writes split batches in threads of their own while the next batches are being prepared.

    The database works on batches while Python reads and checks the next rows: on a 2-core machine
    that overlap is most of the launch's speed. Two writers, each on its own connection, so that one
    batch is being formatted while PostgreSQL stores the one before. Batches may commit out of order;
    the split's progress (``split_line``, which a relaunch resumes after) and the queueing of segments
    follow only the batches committed without a gap, in order: a segment is queued once every batch
    holding one of its rows is committed. An error in a thread is raised again in the launching thread.
    """

    #: Writing threads (and database connections) of one launch.
    WRITERS = 2
    #: Batches waiting to be written: enough to keep the writers busy, bounded to keep memory flat.
    DEPTH = 2

    def __init__(
        self,
        rt: Runtime,
        run_id: str,
        size: int,
        queued: int,
        enqueue: Enqueue,
        screen: _Screen | None,
        *,
        campaign: str = "",
        reach: _Reach | None = None,
        fresh: bool = False,
    ) -> None:
        self.ledger = rt.ledger
        self.screen = screen
        self.reach = reach
        self.fresh = fresh  # a new run's first split: nothing of it is stored yet
        self.reached_recently = 0
        self.capped = 0
        self.campaign = campaign  # the label of the messages it stores (smartpush_messages_total)
        self.suppressed = 0
        self.run_id = run_id
        self.size = size
        self.queued = queued
        self.enqueue = enqueue
        self.jobs: queue.Queue[tuple[int, _Batch | _TextBatch, int, int] | None] = queue.Queue(self.DEPTH)
        self.error: BaseException | None = None
        self._put = 0  # batches handed over
        self._next = 0  # the first batch not yet followed by the progress
        self._committed: dict[int, tuple[int, int]] = {}  # batch → (last line, index), out of order
        self._lock = threading.Lock()
        # SQLite has one writer at a time: a second thread would only wait for the lock.
        writers = self.WRITERS if self.ledger.parallel_writes else 1
        self.threads = [
            threading.Thread(target=self._run, name=f"smartpush-split-writer-{i}", daemon=True)
            for i in range(writers)
        ]
        for thread in self.threads:
            thread.start()

    def put(
        self, recipients: list[NewRecipient], messages: list[NewMessage], last_line: int, index: int
    ) -> None:
        self._hand((recipients, messages), last_line, index)

    def put_text(
        self, recipients: str, messages: str, tally: Counter[Signature], last_line: int, index: int
    ) -> None:
        """:meth:`put` for rows in COPY text form, with the count of their messages by signature."""
        self._hand(_TextBatch(recipients, messages, tally), last_line, index)

    def _hand(self, batch: _Batch | _TextBatch, last_line: int, index: int) -> None:
        if self.error is not None:
            self.finish()
        self.jobs.put((self._put, batch, last_line, index))
        self._put += 1

    def finish(self) -> int:
        """Wait for every batch to be written; returns how many segments were queued."""
        alive = [thread for thread in self.threads if thread.is_alive()]
        for _ in alive:
            self.jobs.put(None)
        for thread in alive:
            thread.join()
        if self.error is not None:
            raise self.error
        return self.queued

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is not None:
                continue  # drain: the launching thread raises the error at its next put or finish
            number, batch, last_line, index = job
            try:
                own = capped = suppressed = 0
                if isinstance(batch, _TextBatch):
                    self.ledger.add_split_text(
                        self.run_id, batch.recipients, batch.messages, fresh=self.fresh
                    )
                    counts: Counter[tuple[str, str, str]] = Counter()
                    for (triples, left_out), n in batch.tally.items():
                        for triple in triples:
                            counts[triple] += n
                        suppressed += n * sum(1 for t in triples if t[2] == Status.SUPPRESSED.value)
                        own += n * (left_out == 1)
                        capped += n * (left_out == 2)  # noqa: PLR2004 - the per_recipient mark
                    count_launched_tally(self.campaign, counts)
                    recipients: list[NewRecipient] = []
                else:
                    recipients, messages = batch
                if recipients:
                    if self.reach is not None:
                        own, capped = self.reach.apply(messages)
                    if self.screen is not None:  # here, so the lookups overlap the reading of rows
                        suppressed = self.screen.apply(messages)
                    self.ledger.add_batch(self.run_id, recipients, messages, fresh=self.fresh)
                    count_launched(self.campaign, messages)
                with self._lock:
                    self.reached_recently += own
                    self.capped += capped
                    self.suppressed += suppressed
                    self._committed[number] = (last_line, index)
                    self._progress()
            except BaseException as exc:
                self.error = exc

    def _progress(self) -> None:
        """Under the lock: record and queue what the batches committed without a gap have completed."""
        last: tuple[int, int] | None = None
        while self._next in self._committed:
            last = self._committed.pop(self._next)
            self._next += 1
        if last is None:
            return
        last_line, index = last
        self.ledger.update_split(
            self.run_id, split_line=last_line, segments=-(-index // self.size), recipients=index
        )
        while self.queued < index // self.size:
            self.enqueue(self.run_id, self.queued)
            self.queued += 1
