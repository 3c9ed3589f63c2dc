"""The segment actor's work: send what is due in one segment, record it, schedule what is left.

Idempotent by construction: only messages that :meth:`Ledger.claim` moved from ``created`` to
``sending`` are handed to a provider, so a redelivered segment, a second worker or a resumed run never
sends a message twice. Retries are decided here, by the class of the provider's error alone.

At-least-once where it cannot be otherwise: a message whose worker dies between the provider's answer
and the ledger's write stays ``sending`` and the sweeper sends it again, with the same message id as the
provider's idempotency key. That window is kept small: results are written while the batch is still
sending (:class:`Recorder`, every :data:`RECORD_EVERY_S`), and a write that fails because the database
is briefly out of reach is tried again (:data:`RECORD_RETRY_S`) instead of leaving the batch ``sending``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from zoneinfo import ZoneInfo

from . import logs
from .campaign import Category, Retry
from .errors import (
    InfrastructureError,
    PermanentError,
    ProviderError,
    RecipientError,
    TechnicalError,
    ThrottledError,
    TransientError,
)
from .failover import choose_account
from .ledger import (
    INTERRUPTED,
    Fallbacks,
    Ledger,
    MessageRecord,
    Result,
    RunRecord,
    RunState,
    Status,
    Suppression,
)
from .loading import PreparedCampaign, PreparedChannel
from .metrics import (
    count_closed,
    count_recorded,
    count_request,
    count_skipped_fallbacks,
    count_sms_parts,
)
from .provider import Channel, OutboundMessage
from .ratelimit import DAILY_QUOTA_CODE, HandedBack, QuotaExhausted, StoreUnavailable
from .recipients import Evaluator
from .runtime import Runtime
from .unsubscribe import make_token, recipient_hash
from .windows import effective_window, next_opening

__all__ = ["SegmentOutcome", "backoff", "process_segment"]

logger = logging.getLogger("smartpush.sending")

#: Messages claimed and sent together by a segment's first batch. Each next batch is sized to take
#: about BATCH_TARGET_S at the pace of the one before (within MIN_BATCH and MAX_BATCH), and a worker
#: process remembers that size for the run's next segments: a fast provider gets large batches, so
#: fewer ledger round trips and pauses between batches per message (500 instead of 200 messages a
#: batch: +36 % messages/s, bench/RESULTS.md); a slow or rate-limited one small batches, so that a
#: closing send window, pause and cancel, checked between batches, take effect within seconds.
BATCH_SIZE = 200
MIN_BATCH = 10
MAX_BATCH = 1_000
BATCH_TARGET_S = 2.0
#: A segment yields its worker thread after this long and re-enqueues itself for the rest.
SEGMENT_SLICE_S = 30.0
#: How long a message waits when every account of its channel is cooling down (failover breaker open).
ALL_OPEN_WAIT = timedelta(seconds=10)
#: How often a batch in flight asks whether its thread is wanted by higher-priority work.
YIELD_POLL_S = 0.5
#: A message that waited longer than this for its rate-limit turn checks the suppression list again.
SUPPRESSION_RECHECK_S = 1.0
#: How long a message waits when the shared rate-limit store (Redis) cannot be reached.
STORE_DOWN_WAIT = timedelta(seconds=10)
#: How long a throttled message waits when the provider gives no Retry-After.
DEFAULT_THROTTLE_WAIT_S = 1.0
#: A batch's results are written to the ledger at least this often while it sends: a worker killed
#: mid-batch leaves only the last moments' messages ``sending`` (to be sent again), not all 200.
RECORD_EVERY_S = 0.05
#: How long the results of messages already handed to a provider are kept and written again while
#: the ledger database is out of reach (a PostgreSQL restart); below the default ``stuck_after``.
RECORD_RETRY_S = 120.0
#: The pause between two of those tries.
RECORD_RETRY_PAUSE_S = 0.5

Enqueue = Callable[[str, int, int | None], None]  # run id, segment, delay in ms


@dataclass
class SegmentOutcome:
    sent: int = 0
    failed: int = 0
    retrying: int = 0
    again_in_ms: int | None = None


def now_utc() -> datetime:
    return datetime.now(UTC)


def backoff(retry: Retry, attempt: int, retry_after_s: float | None = None) -> timedelta:
    """Wait before attempt ``attempt + 1``: exponential from ``min`` to ``max``, with jitter."""
    low = retry.backoff.min.total_seconds()
    high = retry.backoff.max.total_seconds()
    delay = min(high, low * 2 ** max(0, attempt - 1)) * random.uniform(1.0, 1.25)
    return timedelta(seconds=max(min(delay, high), retry_after_s or 0.0))


def process_segment(
    rt: Runtime,
    enqueue: Enqueue,
    run_id: str,
    segment: int,
    *,
    should_yield: Callable[[], bool] | None = None,
) -> SegmentOutcome:
    """Send the due messages of one segment (at most :data:`SEGMENT_SLICE_S` of work).

    ``should_yield`` is asked after each batch: when it answers True the segment re-enqueues itself
    at once and gives its thread up (segments of a higher priority are waiting for one).
    """
    from .suppression import screen

    ledger = rt.ledger
    outcome = SegmentOutcome()
    read_at = time.monotonic()
    run = ledger.get_run(run_id)
    if run is None or run.state not in (RunState.RUNNING, RunState.SPLITTING):
        return outcome  # paused: `resume` enqueues again; cancelled or finished: nothing to do
    rt.saw_run(run, read_at)
    prepared = rt.campaign(run)
    evaluator = rt.evaluator(run, prepared)
    campaign = prepared.campaign
    started = time.monotonic()
    window = effective_window(campaign)
    while time.monotonic() - started < SEGMENT_SLICE_S:
        now = now_utc()
        # Before every batch, not once a segment: a window that closes at 19:00 closes at 19:00.
        if _past_not_after(prepared, now):
            why = "the campaign's not_after has passed"
            expire = partial(ledger.expire, run_id, created_before=None, now=now, reason=why)
            count_closed(ledger, run_id, prepared, Status.EXPIRED, expire)
            _finish(rt, run, now)
            return outcome
        opens = next_opening(window, now) if window is not None else now
        if opens is None or opens > now:
            delay = int(((opens or now + timedelta(days=1)) - now).total_seconds() * 1000)
            logger.info(
                "run %s segment %d waits %d s for its send window",
                run_id,
                segment,
                delay // 1000,
                extra={
                    "run_id": run_id,
                    "segment": segment,
                    "campaign": run.campaign,
                    "outcome": "window-closed",
                    "delay_s": delay / 1000,
                },
            )
            enqueue(run_id, segment, delay)
            outcome.again_in_ms = delay
            return outcome
        sizes = _batch_sizes(rt)
        due = ledger.due(run_id, segment, now, limit=sizes.get(run_id, BATCH_SIZE))
        if not due:
            break
        won = ledger.claim([m.id for m in due], now)
        batch = [m for m in due if m.id in won]
        if not batch:
            continue
        cutoff = now - campaign.retry.expire_after
        late = [m for m in batch if m.created_at < cutoff]
        if late:  # never sent late: past expire_after, a message expires instead
            batch = [m for m in batch if m.created_at >= cutoff]
            expired = [
                Result(
                    m.id,
                    Status.EXPIRED,
                    attempted=False,
                    error_code="expired",
                    error_text=f"not sent within expire_after ({campaign.retry.expire_after})",
                )
                for m in late
            ]
            record_results(rt, run, late, expired)
            count_recorded(run.campaign, late, expired)
            _follow_up(rt, run, late, expired, outcome)
        # The suppression list again, just before sending: an opt-out received mid-run stops the next
        # message. One query per channel of the batch.
        screened = screen(ledger, rt.config.secret_key(), run.category, batch)
        if screened.stopped:
            record_results(rt, run, screened.stopped, screened.results)
            count_recorded(run.campaign, screened.stopped, screened.results)
            _follow_up(rt, run, screened.stopped, screened.results, outcome)  # next channel, if any
            batch = screened.send
        mark = screened.mark if screened.bypassed else None  # a `service` notice despite an opt-out
        sending = time.monotonic()
        results, handed_back = rt.run(_send_all(rt, run, prepared, evaluator, batch, should_yield, mark))
        sizes[run_id] = next_batch_size(len(batch), time.monotonic() - sending)
        count_recorded(run.campaign, batch, results)
        _suppress_dead_addresses(rt, batch, results)
        _follow_up(rt, run, batch, results, outcome)
        if not rt.sending_allowed(run_id):  # cached: at most one read of the run per RUN_STATE_TTL_S
            current = ledger.get_run(run_id)
            if current is not None and current.state is RunState.CANCELLED:
                cancel = partial(ledger.cancel_unsent, run_id, now_utc())  # messages this batch handed back
                count_closed(ledger, run_id, prepared, Status.CANCELLED, cancel)
            state = current.state.value if current is not None else "gone"
            logger.info(
                "run %s is %s: segment %d stops",
                run_id,
                state,
                segment,
                extra={"run_id": run_id, "segment": segment, "campaign": run.campaign, "outcome": state},
            )
            return outcome
        if handed_back or (should_yield is not None and should_yield()):
            enqueue(run_id, segment, None)
            outcome.again_in_ms = 0
            return outcome
    else:
        enqueue(run_id, segment, None)  # time slice used up: let other segments have the thread
        outcome.again_in_ms = 0
        return outcome
    nxt = ledger.next_due(run_id, segment)
    if nxt is not None:
        delay = max(1, int((nxt - now_utc()).total_seconds() * 1000))
        enqueue(run_id, segment, delay)
        outcome.again_in_ms = delay
    _finish(rt, run, now_utc())
    return outcome


#: The suppression reason for an address a provider reports dead, by channel (SPEC "Suppression").
_DEAD_REASON = {"push": "unregistered", "email": "hard-bounce", "sms": "hard-bounce"}


def _suppress_dead_addresses(rt: Runtime, batch: list[MessageRecord], results: list[Result]) -> None:
    """Unregistered tokens, hard bounces and dead numbers go on the channel's suppression list."""
    key = rt.config.secret_key()
    now = now_utc()
    entries = [
        Suppression(
            m.channel,
            recipient_hash(key, m.channel, m.address),
            _DEAD_REASON.get(m.channel, "hard-bounce"),
            r.provider or m.provider,
            now,
        )
        for m, r in zip(batch, results, strict=True)
        if r.suppress and m.address
    ]
    if entries:
        rt.ledger.suppress(entries)


def _past_not_after(prepared: PreparedCampaign, now: datetime) -> bool:
    limit = prepared.campaign.schedule.not_after
    if limit is None:
        return False
    if isinstance(limit, datetime):
        return now > limit
    window = prepared.campaign.schedule.window
    tz = ZoneInfo(window.timezone if window else prepared.config.settings.timezone)
    return now.astimezone(tz).date() > limit


def _finish(rt: Runtime, run: RunRecord, now: datetime) -> None:
    fresh = rt.ledger.get_run(run.id)
    if fresh is not None and fresh.split_complete and rt.ledger.finish_if_done(run.id, now):
        log_run_finished(rt.ledger, fresh, now)


def log_run_finished(ledger: Ledger, run: RunRecord, now: datetime) -> None:
    """The run's last event: its counts by status and how long it took since it was launched."""
    by_status: dict[str, int] = {}
    for (_, status), n in ledger.counts(run.id).items():
        by_status[status.value] = by_status.get(status.value, 0) + n
    took = round((now - run.created_at).total_seconds(), 3) if run.created_at is not None else None
    logger.info(
        "run %s finished: %s",
        run.id,
        ", ".join(f"{n} {status}" for status, n in sorted(by_status.items())) or "no messages",
        extra={
            "run_id": run.id,
            "campaign": run.campaign,
            "outcome": "finished",
            "messages": sum(by_status.values()),
            "counts": by_status,
            "duration_s": took,
        },
    )


def _log_results(rt: Runtime, run: RunRecord, batch: list[MessageRecord], results: list[Result]) -> None:
    """A batch's outcome in the log: one DEBUG line per message; one WARNING per provider account
    and error code for technical failures (our side: they would hit every message)."""
    technical: dict[tuple[int, str, str], int] = {}
    for message, result in zip(batch, results, strict=True):
        if result.status is Status.TECHNICAL_FAILURE:
            key = (message.segment, result.provider or message.provider, result.error_code or "")
            technical[key] = technical.get(key, 0) + 1
    for (segment, provider, code), n in technical.items():
        logger.warning(
            "run %s segment %d: %d message(s) failed technically at provider %s (%s)",
            run.id,
            segment,
            n,
            provider,
            logs.safe_code(code) or "no code",
            extra={
                "run_id": run.id,
                "segment": segment,
                "campaign": run.campaign,
                "provider": provider,
                "status": Status.TECHNICAL_FAILURE.value,
                "code": code or None,
                "messages": n,
            },
        )
    if not logger.isEnabledFor(logging.DEBUG):
        return
    now = now_utc()
    for message, result in zip(batch, results, strict=True):
        retry_in = result.next_attempt_at - now if result.next_attempt_at is not None else None
        logger.debug(
            "message %s: %s",
            message.id,
            result.status.value,
            extra={
                "run_id": run.id,
                "segment": message.segment,
                "message_id": message.id,
                "recipient": rt.pseudonym(message.recipient_id),
                "channel": message.channel,
                "provider": result.provider or message.provider,
                "status": result.status.value,
                "code": result.error_code,
                "attempt": message.attempts + (1 if result.attempted else 0),
                "retry_in_s": round(max(retry_in.total_seconds(), 0.0), 3) if retry_in is not None else None,
            },
        )


def _follow_up(
    rt: Runtime, run: RunRecord, batch: list[MessageRecord], results: list[Result], outcome: SegmentOutcome
) -> None:
    """Counters for the log (the fallbacks were settled when the results were recorded)."""
    _log_results(rt, run, batch, results)
    for result in results:
        if result.status is Status.SENT:
            outcome.sent += 1
        elif result.status is Status.CREATED:
            outcome.retrying += 1
        else:
            outcome.failed += 1


#: Final statuses after which a first-reachable recipient's next channel is tried.
_DEAD_ENDS = frozenset(
    {
        Status.PERMANENT_FAILURE,
        Status.INVALID,
        Status.TECHNICAL_FAILURE,
        Status.TEMPORARY_FAILURE,
        Status.SUPPRESSED,
        Status.EXPIRED,
    }
)


def fallbacks_of(
    run: RunRecord, batch: Sequence[MessageRecord], results: Sequence[Result]
) -> Fallbacks | None:
    """What these results mean for a first-reachable run's fallback channels (None: nothing)."""
    if run.strategy != "first-reachable" or len(run.channels) < 2:  # noqa: PLR2004 - one channel: none
        return None
    fallbacks = Fallbacks(run.id)
    for message, result in zip(batch, results, strict=True):
        if result.status is Status.SENT:
            fallbacks.reached.setdefault(message.channel, []).append(message.recipient_id)
        elif result.status in _DEAD_ENDS:
            fallbacks.dead_end.setdefault(message.channel_index, []).append(message.recipient_id)
    return fallbacks or None


def record_results(
    rt: Runtime,
    run: RunRecord,
    batch: Sequence[MessageRecord],
    results: Sequence[Result],
    *,
    durably: bool = False,
) -> None:
    """Record ``results`` of ``batch`` with their fallbacks in one transaction; count skipped fallbacks.

    ``durably``: tried again for up to :data:`RECORD_RETRY_S` while the database is out of reach.
    """
    fallbacks = fallbacks_of(run, batch, results)
    if durably:
        skipped = record_durably(rt.ledger, list(results), fallbacks)
    else:
        skipped = rt.ledger.record(results, now_utc(), fallbacks=fallbacks)
    if fallbacks is not None and skipped:
        index = {m.channel: m.channel_index for m in batch}
        prepared = rt.campaign(run)
        for channel, count in skipped.items():
            rids = fallbacks.reached.get(channel, [])
            count_skipped_fallbacks(prepared, [index[channel]] * len(rids), count)


class Handback:
    """A batch's messages give their rate-limit places up when their worker thread is wanted elsewhere.

    Watched every :data:`YIELD_POLL_S` while the batch runs: a bulk batch held back by a slow account's
    rate would otherwise keep its thread from a waiting urgent segment for minutes. Messages handed back
    are still ``created`` and due: the segment, queued again, sends them later.
    """

    def __init__(self) -> None:
        self.on = False

    async def watch(self, rt: Runtime, should_yield: Callable[[], bool]) -> None:
        while not self.on:
            await asyncio.sleep(YIELD_POLL_S)
            if await asyncio.to_thread(should_yield):
                self.on = True
                for limiter in rt.limiters():
                    limiter.abandon(self)


def record_durably(
    ledger: Ledger, results: list[Result], fallbacks: Fallbacks | None = None
) -> dict[str, int]:
    """:meth:`Ledger.record`, tried again for up to :data:`RECORD_RETRY_S` while the database is out of
    reach: these messages were handed to a provider, and left ``sending`` they would be sent again."""
    deadline = time.monotonic() + RECORD_RETRY_S
    while True:
        try:
            return ledger.record(results, now_utc(), fallbacks=fallbacks)
        except InfrastructureError as exc:
            if time.monotonic() >= deadline:
                raise
            if logs.every(("record-retry", id(ledger))):
                logger.warning(
                    "the ledger cannot record %d results (%s); trying again for up to %.0f s",
                    len(results),
                    type(exc.__cause__ or exc).__name__,
                    RECORD_RETRY_S,
                    extra={"outcome": "record-retry", "messages": len(results)},
                )
            time.sleep(RECORD_RETRY_PAUSE_S)


class Recorder:
    """Writes the results of every batch a process is sending to the ledger while they send.

    One per :class:`Runtime` (one event loop per process): results are collected as each message's
    send ends, from every batch of every worker thread, and written together every
    :data:`RECORD_EVERY_S` (in a thread: the event loop keeps sending meanwhile). A batch's end writes
    what is left before the batch returns. One writer for all the batches of a process keeps the window
    in which a killed worker's sends are not on record at 50 ms, with one ledger transaction per run
    every 50 ms instead of one per batch: 16 batches in flight wrote 16 times as often.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.pending: list[tuple[RunRecord, MessageRecord, Result]] = []
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None

    def add(self, run: RunRecord, message: MessageRecord, result: Result) -> None:
        self.pending.append((run, message, result))
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def flush(self) -> None:
        """Write everything collected so far (other batches' results too); raises if that fails, and
        keeps what failed for the next write."""
        async with self._lock:
            chunk, self.pending = self.pending, []
            if not chunk:
                return
            try:
                await asyncio.to_thread(_record_chunk, self.rt, chunk)
            except BaseException:
                self.pending[:0] = chunk
                raise

    async def _tick(self) -> None:
        """Writes every RECORD_EVERY_S while there is something to write, then ends (``add`` restarts it)."""
        while True:
            await asyncio.sleep(RECORD_EVERY_S)
            if not self.pending:
                return
            try:
                await self.flush()
            except InfrastructureError:
                continue  # the database stayed away past RECORD_RETRY_S: the batches' own flushes say so


def _record_chunk(rt: Runtime, chunk: list[tuple[RunRecord, MessageRecord, Result]]) -> None:
    """Record collected results, one transaction per run (its fallbacks with it)."""
    by_run: dict[str, tuple[RunRecord, list[MessageRecord], list[Result]]] = {}
    for run, message, result in chunk:
        entry = by_run.setdefault(run.id, (run, [], []))
        entry[1].append(message)
        entry[2].append(result)
    for run, batch, results in by_run.values():
        record_results(rt, run, batch, results, durably=True)


_RECORDERS: weakref.WeakKeyDictionary[Runtime, Recorder] = weakref.WeakKeyDictionary()
_BATCH_SIZES: weakref.WeakKeyDictionary[Runtime, dict[str, int]] = weakref.WeakKeyDictionary()


def next_batch_size(sent: int, took_s: float) -> int:
    """The size of a batch that would take about :data:`BATCH_TARGET_S` at the pace of the last one."""
    if sent <= 0:
        return BATCH_SIZE
    if took_s <= 0:
        return MAX_BATCH
    return max(MIN_BATCH, min(MAX_BATCH, int(sent * BATCH_TARGET_S / took_s)))


def _batch_sizes(rt: Runtime) -> dict[str, int]:
    """Run id → the size of its next batch in this process (the pace is the provider's, not the segment's)."""
    sizes = _BATCH_SIZES.get(rt)
    if sizes is None:
        sizes = _BATCH_SIZES.setdefault(rt, {})
    return sizes


def _recorder(rt: Runtime) -> Recorder:
    recorder = _RECORDERS.get(rt)
    if recorder is None:
        recorder = _RECORDERS.setdefault(rt, Recorder(rt))
    return recorder


async def _send_all(
    rt: Runtime,
    run: RunRecord,
    prepared: PreparedCampaign,
    evaluator: Evaluator,
    batch: list[MessageRecord],
    should_yield: Callable[[], bool] | None = None,
    mark: Callable[[list[Result]], list[Result]] | None = None,
) -> tuple[list[Result], bool]:
    """Send a batch and record its results as they come (see :class:`Recorder`); also says whether it
    was handed back part-way for higher-priority work. The results returned are recorded."""
    handback = Handback()
    recorder = _recorder(rt)
    watcher = asyncio.ensure_future(handback.watch(rt, should_yield)) if should_yield is not None else None

    outcomes: list[Result | BaseException | None] = [None] * len(batch)
    queue = iter(range(len(batch)))

    async def sender() -> None:
        # Every message's send runs to its end even when one fails unexpectedly, so that what the
        # others handed to the provider is recorded before the failure is raised.
        for i in queue:
            message = batch[i]
            try:
                result = await _send_one(rt, prepared, evaluator, message, handback)
                if mark is not None:
                    result = mark([result])[0]
            except Exception as exc:
                outcomes[i] = exc
                continue
            recorder.add(run, message, result)
            outcomes[i] = result

    try:
        # As many senders as the batch's accounts have connections, not a task per message: the
        # others would only queue for a connection, each with its own task and future.
        await asyncio.gather(*(sender() for _ in range(min(len(batch), _senders(rt, prepared, batch)))))
    finally:
        if watcher is not None:
            watcher.cancel()
    await recorder.flush()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome  # the segment fails; the message it concerns is left to the sweeper
    return [o for o in outcomes if isinstance(o, Result)], handback.on


def _senders(rt: Runtime, prepared: PreparedCampaign, batch: list[MessageRecord]) -> int:
    """How many of a batch's messages may be in flight at once: the connections of the accounts of the
    batch's channels."""
    channels = {m.channel_index for m in batch}
    accounts = {account for i in channels for account in prepared.channels[i].providers}
    return max(1, sum(rt.limiter(account).concurrency for account in accounts))


def _unsubscribe_url(rt: Runtime, prepared: PreparedCampaign, message: MessageRecord) -> str | None:
    base = rt.config.settings.public_url
    if base is None or prepared.campaign.category is Category.SERVICE or message.address is None:
        return None
    key = rt.config.secret_key()
    token = make_token(
        key,
        campaign=prepared.name,
        channel=message.channel,
        address_hash=recipient_hash(key, message.channel, message.address),
    )
    return f"{base}/unsubscribe/{token}"


def _outbound(
    prepared: PreparedCampaign,
    channel: PreparedChannel,
    message: MessageRecord,
    fields: dict[str, str],
    unsubscribe: str | None,
) -> OutboundMessage:
    spec = channel.spec
    kind = channel.channel
    if kind is Channel.EMAIL:
        headers: dict[str, str] = {}
        if unsubscribe is not None:
            headers["List-Unsubscribe"] = f"<{unsubscribe}>"
            mailto = prepared.config.settings.unsubscribe_mailto
            if mailto:
                headers["List-Unsubscribe"] += f", <mailto:{mailto}?subject=unsubscribe>"
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        reply_to = getattr(spec, "reply_to", None)
        if reply_to:
            headers["Reply-To"] = reply_to
        return OutboundMessage(
            message_id=message.id,
            run_id=message.run_id,
            channel=kind,
            to=message.address or "",
            subject=fields.get("subject"),
            body=fields.get("text", ""),
            html=fields.get("html"),
            sender=getattr(spec, "from_", None),
            headers=headers,
        )
    if kind is Channel.PUSH:
        data = {k.removeprefix("data."): v for k, v in fields.items() if k.startswith("data.")}
        if "url" in fields:
            data["url"] = fields["url"]
        return OutboundMessage(
            message_id=message.id,
            run_id=message.run_id,
            channel=kind,
            to=message.address or "",
            title=fields.get("title"),
            body=fields.get("body", ""),
            data=data,
        )
    return OutboundMessage(
        message_id=message.id,
        run_id=message.run_id,
        channel=kind,
        to=message.address or "",
        body=fields.get("body", ""),
        sender=channel.sender,
    )


def _now_suppressed(rt: Runtime, prepared: PreparedCampaign, message: MessageRecord) -> Result | None:
    """The ``suppressed`` result of a message whose address went on the list since its batch was
    checked (a STOP or an unsubscribe while it waited for its rate-limit turn), else None."""
    from .suppression import lookup, stops, suppressed_text

    (reason,) = lookup(rt.ledger, rt.config.secret_key(), [(message.channel, message.address)])
    if reason is None or not stops(prepared.campaign.category.value, reason):
        return None
    return Result(
        message.id,
        Status.SUPPRESSED,
        attempted=False,
        error_code=reason,
        error_text=suppressed_text(message.channel, reason),
    )


def _quota_wait(rt: Runtime, message: MessageRecord, exc: QuotaExhausted) -> Result:
    """The account used its daily quota: the message stays due, for when the quota resets."""
    local = exc.resets_at.astimezone(ZoneInfo(rt.config.settings.timezone))
    return Result(
        message.id,
        Status.CREATED,
        attempted=False,
        provider=exc.account,
        error_code=DAILY_QUOTA_CODE,
        error_text=(
            f"provider account '{exc.account}' used its daily quota of {exc.quota:,}; "
            f"sending resumes at {local:%Y-%m-%d %H:%M} {rt.config.settings.timezone}"
        ),
        next_attempt_at=exc.resets_at,
    )


async def _still_sending(rt: Runtime, run_id: str) -> bool:
    """:meth:`Runtime.still_sending`; False while the ledger cannot say (the database is out of reach):
    the message is not handed to the provider and stays due, as it would for a pause."""
    try:
        return await rt.still_sending(run_id)
    except InfrastructureError:
        return False


async def _send_one(
    rt: Runtime,
    prepared: PreparedCampaign,
    evaluator: Evaluator,
    message: MessageRecord,
    handback: Handback | None = None,
) -> Result:
    channel = prepared.channels[message.channel_index]
    if message.attempts >= prepared.campaign.retry.max_attempts:  # its sends kept being interrupted
        return Result(
            message.id,
            Status.TECHNICAL_FAILURE,
            attempted=False,
            error_code=INTERRUPTED,
            error_text=f"its worker stopped while sending it, {message.attempts} times: not tried again",
        )
    failed_before = message.attempts > 0 and message.error_code is not None
    chosen = choose_account(rt.breaker, channel.providers, message.provider, failed_before)
    if chosen is None:  # every account of the channel is cooling down: wait without spending an attempt
        return Result(message.id, Status.CREATED, attempted=False, next_attempt_at=now_utc() + ALL_OPEN_WAIT)
    account = chosen
    alternatives = len(channel.providers) > 1
    # Two HMACs a message: only for emails (List-Unsubscribe) and templates that show the link.
    needed = channel.channel is Channel.EMAIL or channel.index in evaluator.with_unsubscribe
    unsubscribe = _unsubscribe_url(rt, prepared, message) if needed else None
    try:
        rendered = evaluator.render(
            channel, message.context or {}, message.recipient_id, unsubscribe_url=unsubscribe
        )
    except RecipientError as exc:
        return Result(message.id, Status.INVALID, attempted=False, error_code=exc.code, error_text=exc.reason)
    parts = rendered.sms.parts if rendered.sms is not None else 1
    outbound = _outbound(prepared, channel, message, rendered.fields, unsubscribe)
    if alternatives and rt.limiter(account).exhausted_until() is not None:
        # This account used its daily quota: another account of the channel may still have some.
        account = next(
            (
                other
                for other in channel.providers
                if not rt.breaker.is_open(other) and rt.limiter(other).exhausted_until() is None
            ),
            account,
        )
    limiter = rt.limiter(account)
    options = rt.config.account(account)
    units = parts if getattr(options, "rate_unit", "messages") == "parts" else 1
    retry = prepared.campaign.retry
    provider = rt.provider(account)  # built before waiting: a driver's first use may take a while
    if not await _still_sending(rt, message.run_id):
        return Result(message.id, Status.CREATED, attempted=False)
    try:
        if handback is not None and handback.on:
            raise HandedBack
        waited = await limiter.acquire(
            units, priority=prepared.campaign.priority.value, group=message.run_id, tag=handback
        )
    except HandedBack:
        return Result(message.id, Status.CREATED, attempted=False)
    except QuotaExhausted as exc:
        return _quota_wait(rt, message, exc)
    except StoreUnavailable:  # said once a minute per account by the limiter; each message waits
        logger.debug(
            "message %s waits: the rate-limit store is out of reach",
            message.id,
            extra={"run_id": message.run_id, "message_id": message.id, "provider": account},
        )
        later = now_utc() + STORE_DOWN_WAIT
        return Result(message.id, Status.CREATED, attempted=False, next_attempt_at=later)
    if waited > SUPPRESSION_RECHECK_S:  # held for a while: an opt-out may have arrived meanwhile
        stopped = await asyncio.to_thread(_now_suppressed, rt, prepared, message)
        if stopped is not None:
            await limiter.give_back(units)
            return stopped
    try:
        async with limiter.slot():
            # The rate limit or a connection may have held this message for a while: a segment of a
            # higher priority may have asked for the thread meanwhile, or the run stopped sending.
            if (handback is not None and handback.on) or not await _still_sending(rt, message.run_id):
                await limiter.give_back(units)
                return Result(message.id, Status.CREATED, attempted=False)
            began = time.monotonic()
            try:
                result = await provider.send(outbound)
            except BaseException as exc:
                count_request(account, message.channel, time.monotonic() - began, exc)
                raise
            count_request(account, message.channel, time.monotonic() - began, None)
    except ThrottledError as exc:
        wait = exc.retry_after_s if exc.retry_after_s is not None else DEFAULT_THROTTLE_WAIT_S
        # Back-pressure: the whole account pauses, in every worker, not just this message.
        await limiter.pause(wait)
        await limiter.give_back(units)
        return Result(
            message.id,
            Status.CREATED,
            attempted=False,
            provider=account,
            error_code=exc.code,
            error_text=exc.detail,
            next_attempt_at=now_utc() + timedelta(seconds=wait),
        )
    except TransientError as exc:
        rt.breaker.failed(account)
        attempt = message.attempts + 1
        if attempt >= retry.max_attempts:
            return Result(
                message.id,
                Status.TEMPORARY_FAILURE,
                provider=account,
                error_code=exc.code,
                error_text=f"{exc.detail} (after {attempt} attempts)",
            )
        return Result(
            message.id,
            Status.CREATED,
            provider=account,
            error_code=exc.code,
            error_text=exc.detail,
            # With another account to try, fail over at once; else back off before the same one.
            next_attempt_at=now_utc()
            + (timedelta(0) if alternatives else backoff(retry, attempt, exc.retry_after_s)),
        )
    except PermanentError as exc:
        return Result(
            message.id,
            Status.PERMANENT_FAILURE,
            provider=account,
            error_code=exc.code,
            error_text=exc.detail,
            suppress=exc.suppress,
        )
    except (TechnicalError, ProviderError) as exc:
        rt.breaker.failed(account)
        if (
            alternatives and message.attempts + 1 < retry.max_attempts
        ):  # our side with this account: try the next
            return Result(
                message.id,
                Status.CREATED,
                provider=account,
                error_code=exc.code,
                error_text=exc.detail,
                next_attempt_at=now_utc(),
            )
        return Result(
            message.id, Status.TECHNICAL_FAILURE, provider=account, error_code=exc.code, error_text=exc.detail
        )
    except Exception as exc:  # a driver bug must not lose the message: it is recorded, not re-raised
        # The type and the frames, once a minute per kind: its text may quote the request (an address,
        # a body), so smartpush.logs masks it; every message is counted in the batch's warning.
        if logs.every(("driver-failed", account, type(exc).__name__)):
            logger.exception(
                "driver %s failed with %s (the same failure again within a minute is not logged)",
                account,
                type(exc).__name__,
                extra={
                    "run_id": message.run_id,
                    "message_id": message.id,
                    "provider": account,
                    "code": type(exc).__name__,
                },
            )
        return Result(
            message.id,
            Status.TECHNICAL_FAILURE,
            provider=account,
            error_code=type(exc).__name__,
            error_text="the provider driver failed; see the worker log",
        )
    if rendered.sms is not None:
        count_sms_parts(account, rendered.sms.encoding, rendered.sms.parts)
    return Result(message.id, Status.SENT, provider=account, provider_reference=result.provider_reference)
