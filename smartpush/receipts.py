"""Delivery receipts and SMS replies: what ``smartpush serve`` does with them, whatever the provider.

**Receipts.** A driver turns its provider's callback into :class:`~smartpush.provider.Receipt`\\ s;
they are matched to messages by (provider account, provider reference) and move a message on by one
rule, :func:`settle`: a message only ever climbs ``sent`` < ``temporary-failure`` <
``permanent-failure`` < ``delivered``. So receipts are idempotent and their order does not matter: a
late ``sent`` never overwrites ``delivered``, a duplicate changes nothing, and ``delivered`` wins over
any failure (a carrier that reported a failure and then a delivery did deliver). Every receipt is
stored in the ``receipts`` table, matched or not: the proof of what reached whom. A receipt whose
reference no message carries yet (it arrived before the worker recorded the send) stays there and is
applied when :meth:`~smartpush.ledger.Ledger.record` records that reference.

:class:`ReceiptWriter` takes receipts from concurrent requests and commits them together, one
transaction every few milliseconds (whatever piled up while the previous one ran); a request is
answered only once its receipts are committed, so a provider that got 200 knows they are stored.

**Replies.** :func:`is_stop` says whether an SMS reply asks to stop (:data:`STOP_WORDS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .provider import Receipt
from .unsubscribe import recipient_hash

if TYPE_CHECKING:
    from .ledger import Ledger, Suppression

__all__ = [
    "RANK",
    "STOP_WORDS",
    "IncomingReceipt",
    "MessageState",
    "ReceiptWriter",
    "Settled",
    "StoredReceipt",
    "fold",
    "is_stop",
    "settle",
]

log = logging.getLogger("smartpush.receipts")

#: How far each status a receipt can give is from the end: a message only moves up.
RANK: dict[str, int] = {"sent": 0, "temporary-failure": 1, "permanent-failure": 2, "delivered": 3}
#: The suppression reason for a dead address, by channel (SPEC "Suppression").
DEAD_REASON = {"push": "unregistered", "email": "hard-bounce", "sms": "hard-bounce"}
#: When a receipt that matched no message is looked at again (seconds after it arrived): the worker
#: may record the send a little after the receipt came, and the record hook and the receipt's own
#: transaction can pass each other. After the last try it waits, stored, for the record hook alone.
RECHECK_AFTER_S = (1.0, 5.0, 30.0, 120.0, 600.0)
#: At most this many receipts wait for a recheck in memory; the oldest give way.
RECHECK_MAX = 100_000
#: Receipts committed per transaction at most.
BATCH_MAX = 2_000


@dataclass(frozen=True, slots=True)
class IncomingReceipt:
    """A receipt as ``serve`` received it: for which provider account, and when."""

    provider: str
    receipt: Receipt
    received_at: datetime


@dataclass(slots=True)
class MessageState:
    """What a receipt needs of a message, and what receipts made of it (see :func:`settle`)."""

    id: str
    status: str
    channel: str
    address: str | None
    sent_at: datetime | None
    delivered_at: datetime | None
    error_code: str | None
    error_text: str | None
    #: The status it had when read: the UPDATE only applies if nobody moved it meanwhile.
    read_status: str = ""
    #: Receipts of this call moved it.
    changed: bool = False

    def __post_init__(self) -> None:
        self.read_status = self.read_status or self.status

    @property
    def delivered_now(self) -> bool:
        return self.changed and self.status == "delivered" and self.read_status != "delivered"


@dataclass(frozen=True, slots=True)
class Settled:
    """What became of one stored receipt: its message (``None``: none carries the reference yet)."""

    incoming: IncomingReceipt
    message: MessageState | None
    #: This receipt moved the message.
    changed: bool


@dataclass(frozen=True, slots=True)
class StoredReceipt:
    """A receipt as the ledger keeps it: the proof of delivery."""

    provider: str
    reference: str
    status: str
    error_code: str | None
    error_text: str | None
    occurred_at: datetime | None
    received_at: datetime
    message_id: str | None
    applied_at: datetime | None


def settle(
    state: MessageState,
    status: str,
    error_code: str | None,
    error_text: str | None,
    at: datetime,
    now: datetime,
) -> bool:
    """Move ``state`` by one receipt (``at``: when it happened); True if it moved.

    Only a message that a provider accepted (``sent``, or already settled by a receipt) moves, and only
    up :data:`RANK`. ``delivered`` clears the error and sets ``delivered_at`` to ``at``, never before
    ``sent_at`` nor after ``now``; a failure keeps the receipt's code and text.
    """
    current = RANK.get(state.status)
    new = RANK.get(status)
    if current is None or new is None or new <= current:
        return False
    state.status = status
    if status == "delivered":
        when = min(at, now)
        if state.sent_at is not None and when < state.sent_at:
            when = state.sent_at
        state.delivered_at = when
        state.error_code = state.error_text = None
    else:
        state.error_code, state.error_text = error_code, error_text
    state.changed = True
    return True


def observe_delivery(states: Sequence[MessageState]) -> None:
    """``smartpush_time_to_delivery_seconds`` for the messages these receipts just delivered."""
    from .metrics import TIME_TO_DELIVERY

    for state in states:
        if state.delivered_now and state.sent_at is not None and state.delivered_at is not None:
            seconds = (state.delivered_at - state.sent_at).total_seconds()
            TIME_TO_DELIVERY.labels(channel=state.channel).observe(max(seconds, 0.0))


# -- STOP ---------------------------------------------------------------------------------------------

#: Replies that opt the sender out of SMS, after :func:`fold`: French and English keywords used by
#: French aggregators and Twilio.
STOP_WORDS = frozenset(
    {
        "stop",
        "stopsms",
        "stop sms",
        "stop all",
        "stopall",
        "arret",
        "arret sms",
        "unsubscribe",
        "desabonner",
        "desabonnement",
        "desinscription",
        "desinscrire",
    }
)
_EDGE_CATEGORIES = ("P", "S", "Z", "C")  # punctuation, symbols (emoji too), spaces, controls


def fold(text: str) -> str:
    """``text`` lower-cased without accents (NFKD, combining marks dropped), the punctuation,
    symbols, spaces and control characters around it stripped, inner runs of spaces made one."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    start, end = 0, len(bare)
    while start < end and unicodedata.category(bare[start]).startswith(_EDGE_CATEGORIES):
        start += 1
    while end > start and unicodedata.category(bare[end - 1]).startswith(_EDGE_CATEGORIES):
        end -= 1
    return " ".join(bare[start:end].split())


def is_stop(text: str) -> bool:
    """True when an SMS reply, folded (:func:`fold`), is one of :data:`STOP_WORDS`.

    ``STOP``, ``Stop.``, ``« Arrêt »``, ``ARRET SMS``, ``stop  sms !`` match; ``stop merci`` or
    ``ne pas arrêter`` do not: only the keyword alone is an opt-out.
    """
    return fold(text) in STOP_WORDS


# -- the batching writer ------------------------------------------------------------------------------


@dataclass(order=True, slots=True)
class _Recheck:
    due: float
    attempt: int = field(compare=False)
    provider: str = field(compare=False)
    reference: str = field(compare=False)
    suppress: bool = field(compare=False)


class ReceiptWriter:
    """Commits the receipts of concurrent requests together; see the module docstring.

    Start and stop it on the server's event loop. :meth:`submit` returns once the receipts are
    committed (and the dead addresses among them suppressed); it raises what the ledger raised.
    """

    def __init__(self, ledger: Ledger, key: bytes, *, batch_max: int = BATCH_MAX) -> None:
        self.ledger = ledger
        self.key = key
        self.batch_max = batch_max
        self._queue: list[tuple[list[IncomingReceipt], asyncio.Future[list[Settled]]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._rechecks: list[_Recheck] = []  # a heap: the soonest first
        #: Transactions committed and receipts stored so far (for tests and benchmarks).
        self.flushes = 0
        self.stored = 0

    async def start(self) -> None:
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="smartpush-receipts")

    async def stop(self) -> None:
        """Commit what is queued, then stop (rechecks still waiting are left to the record hook)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def submit(self, receipts: list[IncomingReceipt]) -> list[Settled]:
        if self._task is None or self._closing:
            raise RuntimeError("the receipt writer is not running")
        future: asyncio.Future[list[Settled]] = asyncio.get_running_loop().create_future()
        self._queue.append((receipts, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._queue and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._next_recheck_in())
            self._wake.clear()
            if self._queue:
                await self._flush_queue()
            due = self._due_rechecks()
            if due:
                try:
                    requeue = await asyncio.to_thread(self._recheck, due)
                except Exception as exc:  # the ledger is down: try again at their next time
                    log.warning(
                        "receipts could not be rechecked (%s); trying again later",
                        type(exc).__name__,
                        extra={"outcome": "error", "code": type(exc).__name__, "receipts": len(due)},
                    )
                    requeue = [
                        _Recheck(time.monotonic() + 5.0, r.attempt, r.provider, r.reference, r.suppress)
                        for r in due
                    ]
                self._schedule(requeue)
            if self._closing and not self._queue:
                return

    async def _flush_queue(self) -> None:
        taken: list[tuple[list[IncomingReceipt], asyncio.Future[list[Settled]]]] = []
        count = 0
        while self._queue and (not taken or count + len(self._queue[0][0]) <= self.batch_max):
            item = self._queue.pop(0)
            taken.append(item)
            count += len(item[0])
        items = [receipt for receipts, _ in taken for receipt in receipts]
        try:
            settled, rechecks = await asyncio.to_thread(self._store, items)
        except Exception as exc:  # every request of the batch fails alike: none was committed
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
            return
        self.flushes += 1
        self.stored += len(items)
        self._schedule(rechecks)
        start = 0
        for receipts, future in taken:
            if not future.done():  # a request whose client went away is simply not answered
                future.set_result(settled[start : start + len(receipts)])
            start += len(receipts)

    def _store(self, items: list[IncomingReceipt]) -> tuple[list[Settled], list[_Recheck]]:
        """In a worker thread: one transaction, then the suppressions and metrics it calls for."""
        from .metrics import RECEIPTS

        now = datetime.now(UTC)
        settled = self.ledger.store_receipts(items, now)
        dead: list[tuple[str, MessageState]] = []
        outcomes: dict[tuple[str, str], int] = defaultdict(int)
        rechecks: list[_Recheck] = []
        pending: dict[str, int] = defaultdict(int)
        soon = time.monotonic() + RECHECK_AFTER_S[0]
        for one in settled:
            provider = one.incoming.provider
            if one.message is None:
                outcomes[provider, "pending"] += 1
                pending[provider] += 1
                rechecks.append(
                    _Recheck(
                        soon,
                        0,
                        provider,
                        one.incoming.receipt.provider_reference,
                        one.incoming.receipt.suppress,
                    )
                )
                continue
            outcomes[provider, "applied" if one.changed else "unchanged"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "receipt for message %s: %s",
                    one.message.id,
                    one.incoming.receipt.status,
                    extra={
                        "message_id": one.message.id,
                        "provider": provider,
                        "status": one.message.status,
                        "outcome": "applied" if one.changed else "unchanged",
                        "code": one.incoming.receipt.error_code,
                    },
                )
            if one.incoming.receipt.suppress and one.message.status == "permanent-failure":
                dead.append((provider, one.message))
        self._suppress(dead, now)
        for (provider, outcome), n in outcomes.items():
            RECEIPTS.labels(provider=provider, outcome=outcome).inc(n)
        for provider, n in pending.items():
            log.info(
                "account %s: %d receipt(s) for references no message carries yet: stored, applied when "
                "the send is recorded",
                provider,
                n,
                extra={"provider": provider, "outcome": "pending", "receipts": n},
            )
        return settled, rechecks

    def _suppress(self, dead: list[tuple[str, MessageState]], now: datetime) -> None:
        from .ledger import Suppression

        entries: list[Suppression] = []
        for provider, message in dead:
            if message.address:
                address_hash = recipient_hash(self.key, message.channel, message.address)
                reason = DEAD_REASON.get(message.channel, "hard-bounce")
                entries.append(Suppression(message.channel, address_hash, reason, provider, now))
        if entries:
            self.ledger.suppress(entries)

    # -- rechecks -----------------------------------------------------------------------------------

    def _schedule(self, rechecks: list[_Recheck]) -> None:
        room = RECHECK_MAX - len(self._rechecks)
        for recheck in rechecks[: max(room, 0)]:
            heapq.heappush(self._rechecks, recheck)
        if len(rechecks) > room:
            log.warning(
                "%d unmatched receipt(s) will not be rechecked: %d already wait; the record hook will "
                "still apply them",
                len(rechecks) - max(room, 0),
                RECHECK_MAX,
                extra={"outcome": "not-rechecked", "receipts": len(rechecks) - max(room, 0)},
            )

    def _next_recheck_in(self) -> float | None:
        if not self._rechecks:
            return None
        return max(0.0, self._rechecks[0].due - time.monotonic())

    def _due_rechecks(self) -> list[_Recheck]:
        now = time.monotonic()
        due = []
        while self._rechecks and self._rechecks[0].due <= now:
            due.append(heapq.heappop(self._rechecks))
        return due

    def _recheck(self, due: list[_Recheck]) -> list[_Recheck]:
        """In a worker thread: apply the receipts whose message now carries their reference."""
        from .metrics import RECEIPTS

        now = datetime.now(UTC)
        by_provider: dict[str, list[_Recheck]] = defaultdict(list)
        for recheck in due:
            by_provider[recheck.provider].append(recheck)
        again: list[_Recheck] = []
        dead: list[tuple[str, MessageState]] = []
        for provider, rechecks in by_provider.items():
            found = self.ledger.settle_receipts(provider, {r.reference for r in rechecks}, now)
            gone = 0
            for recheck in rechecks:
                message = found.get(recheck.reference)
                if message is not None:
                    if recheck.suppress and message.status == "permanent-failure":
                        dead.append((provider, message))
                    continue
                if recheck.attempt + 1 < len(RECHECK_AFTER_S):
                    delay = RECHECK_AFTER_S[recheck.attempt + 1] - RECHECK_AFTER_S[recheck.attempt]
                    again.append(
                        _Recheck(
                            time.monotonic() + delay,
                            recheck.attempt + 1,
                            provider,
                            recheck.reference,
                            recheck.suppress,
                        )
                    )
                else:
                    gone += 1
            if gone:
                RECEIPTS.labels(provider=provider, outcome="unknown").inc(gone)
                log.warning(
                    "account %s: %d receipt(s) still match no message %d s after they came: kept, "
                    "applied if a send with that reference is ever recorded",
                    provider,
                    gone,
                    int(RECHECK_AFTER_S[-1]),
                    extra={"provider": provider, "outcome": "unknown", "receipts": gone},
                )
        self._suppress(list({m.id: (p, m) for p, m in dead}.values()), now)
        return again
