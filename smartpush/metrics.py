"""Prometheus metrics of smartpush processes (SPEC.md "Metrics"). No personal data in any label.

Label values are campaign names, channel names, provider account names, run ids, statuses, request
outcomes, SMS encodings and queue names: never an address, a recipient id, a token or a text.

Counters and histograms live at module level. A process started with ``PROMETHEUS_MULTIPROC_DIR`` in
its environment (``smartpush worker`` sets it for its processes) writes them to files there
(prometheus-client's multiprocess mode, chosen once, when ``prometheus_client`` is first imported);
any other process keeps them in memory, in the default registry.

``smartpush_run_messages`` and ``smartpush_queue_messages`` are not stored anywhere: a
:class:`LiveCollector` reads them from the ledger and the broker when an endpoint is scraped, so they
need no multiprocess gauge mode and every endpoint that shows them shows the same values.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import ThrottledError, TransientError
from .ledger import RunState, Status

if TYPE_CHECKING:
    import dramatiq
    from prometheus_client import Metric

    from .ledger import Ledger, MessageRecord, NewMessage, Result
    from .loading import PreparedCampaign

__all__ = [
    "INBOUND_SMS",
    "MESSAGES",
    "PROVIDER_LATENCY",
    "PROVIDER_REQUESTS",
    "RATE_LIMIT_WAIT",
    "RECEIPTS",
    "SMS_PARTS",
    "TIME_TO_DELIVERY",
    "TIME_TO_PROVIDER",
    "LiveCollector",
    "channels_of",
    "count_closed",
    "count_launched",
    "count_recorded",
    "count_request",
    "count_skipped_fallbacks",
    "count_sms_parts",
    "endpoint_registry",
    "multiprocess",
]

log = logging.getLogger("smartpush.metrics")

#: Every status change a message makes, counted once: at launch the status it is stored in (created,
#: waiting, invalid, skipped, suppressed), then the final status it reaches (sent, the failures,
#: invalid, suppressed, skipped, expired, cancelled). Retries (sending → created) are not counted.
MESSAGES = Counter(
    "smartpush_messages",
    "Messages entering a status: at launch the status they are stored in, then their final status, "
    "then what a delivery receipt moves them to (delivered, permanent-failure, temporary-failure).",
    ["campaign", "channel", "provider", "status"],
)

#: One request to a provider account, by outcome: ok, throttled, transient, permanent. A request the
#: provider refuses because of our side (credentials, a malformed request, a driver bug) counts as
#: ``permanent``: sending it again as it is will not help either.
PROVIDER_REQUESTS = Counter(
    "smartpush_provider_requests",
    "Requests to provider accounts, by outcome (ok, throttled, transient, permanent).",
    ["provider", "outcome"],
)

#: Seconds one request to a provider took, whatever its outcome: 5 ms to 30 s.
PROVIDER_LATENCY = Histogram(
    "smartpush_provider_latency_seconds",
    "Seconds a request to a provider account took, whatever its outcome.",
    ["provider", "channel"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf")),
)

#: Seconds from a message's creation (the split of its run) to its acceptance by a provider: waits for
#: the queue, the rate limit, the send window and retries included. 100 ms to 48 h.
TIME_TO_PROVIDER = Histogram(
    "smartpush_time_to_provider_seconds",
    "Seconds from a message's creation to its acceptance by a provider.",
    ["channel"],
    buckets=(
        *(0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600),
        *(7200, 14400, 28800, 43200, 86400, 172800, float("inf")),
    ),
)

RATE_LIMIT_WAIT = Counter(
    "smartpush_rate_limit_wait_seconds",
    "Seconds messages waited for their provider account's rate limit, quota or throttle pause.",
    ["provider"],
)

#: Seconds from a message's acceptance by its provider (``sent_at``) to its delivery receipt: 1 s to 48 h.
TIME_TO_DELIVERY = Histogram(
    "smartpush_time_to_delivery_seconds",
    "Seconds from a message's acceptance by its provider to its delivery receipt.",
    ["channel"],
    buckets=(
        *(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        *(7200, 21600, 43200, 86400, 172800, float("inf")),
    ),
)

#: SMS parts providers accepted (what they bill), by account and encoding (``GSM-7``, ``UCS-2``).
SMS_PARTS = Counter(
    "smartpush_sms_parts",
    "SMS parts accepted by provider accounts, by encoding.",
    ["provider", "encoding"],
)

#: Receipts ``serve`` stored, by what they did: ``applied`` (moved a message), ``unchanged`` (a
#: duplicate, or older news than the message's status), ``pending`` (no message carries the reference
#: yet), ``unknown`` (still none minutes later), ``ignored`` (an interim status the driver drops).
RECEIPTS = Counter(
    "smartpush_receipts",
    "Delivery receipts received by smartpush serve, by provider account and outcome.",
    ["provider", "outcome"],
)

#: SMS replies ``serve`` received: ``stop`` (an opt-out), ``other`` (counted, never read further),
#: ``unreadable`` (a sender that is not a phone number).
INBOUND_SMS = Counter(
    "smartpush_inbound_sms",
    "SMS replies received by smartpush serve, by provider account and outcome.",
    ["provider", "outcome"],
)

RUN_MESSAGES = "smartpush_run_messages"
QUEUE_MESSAGES = "smartpush_queue_messages"
_RUN_HELP = "Messages of each run in progress (and of runs ended in the last minutes), by status."
_QUEUE_HELP = "Segments in each broker queue: waiting for a worker, or delayed (a retry or a send window)."

#: Runs looked at, newest first, when the live gauges are read.
LIVE_RUNS = 200
#: A run that ended this recently still shows in ``smartpush_run_messages``: its final tally is scraped.
ENDED_SHOWN = timedelta(minutes=15)
#: The live gauges are read from the ledger and the broker at most this often per collector: scrapes
#: that come together (two Prometheus servers, say) share one read.
LIVE_TTL_S = 2.0
#: How long the broker may take to answer the queue lengths.
BROKER_TIMEOUT_S = 2.0


def multiprocess() -> bool:
    """Whether this process writes its metrics to ``PROMETHEUS_MULTIPROC_DIR`` (decided at import)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


# -- counting -----------------------------------------------------------------------------------------

#: (metric, label values) → its child: ``labels()`` validates and locks at every call, three times
#: the cost of the ``inc``/``observe`` itself, several times per message sent.
_CHILDREN: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    key = (metric, *values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


def _count(campaign: str, tally: Tally[tuple[str, str, str]]) -> None:
    for (channel, provider, status), n in tally.items():
        if n > 0:
            _child(MESSAGES, campaign, channel, provider, status).inc(n)


def count_launched(campaign: str, messages: Iterable[NewMessage]) -> None:
    """Messages the split just stored, by the status each was stored in."""
    _count(campaign, Tally((m.channel, m.provider, Status(m.status).value) for m in messages))


def count_launched_tally(campaign: str, tally: Tally[tuple[str, str, str]]) -> None:
    """:func:`count_launched` of messages already counted by (channel, account, status)."""
    _count(campaign, tally)


def count_recorded(
    campaign: str, messages: Sequence[MessageRecord], results: Sequence[Result], now: datetime | None = None
) -> None:
    """Results just recorded for claimed messages: each one that ends its message, and the time the
    ``sent`` ones took from creation to acceptance. A ``created`` result (a retry, or a message not
    tried) changes nothing that is counted."""
    now = now or datetime.now(UTC)
    tally: Tally[tuple[str, str, str]] = Tally()
    for message, result in zip(messages, results, strict=True):
        status = Status(result.status)
        if status is Status.CREATED:
            continue
        tally[(message.channel, result.provider or message.provider, status.value)] += 1
        if status is Status.SENT:
            waited = (now - message.created_at).total_seconds()
            _child(TIME_TO_PROVIDER, message.channel).observe(max(waited, 0.0))
    _count(campaign, tally)


def channels_of(prepared: PreparedCampaign) -> dict[str, str]:
    """Provider account → the channel it serves in this campaign."""
    return {account: str(ch.channel) for ch in prepared.channels for account in ch.providers}


def count_closed(
    ledger: Ledger,
    run_id: str,
    prepared: PreparedCampaign,
    status: Status,
    close: Callable[[], int],
) -> int:
    """Run ``close``, a ledger call that moves a run's unsent messages to ``status`` in bulk and says
    how many (``expire``, ``cancel_unsent``), and count them by account.

    The ledger gives only the total: the accounts are read from the unsent counts before and after
    (two reads of the run's unsent messages, through the status index; only when something may close).
    """
    before = _unsent(ledger, run_id)
    if not before:
        return close()
    moved = close()
    if moved <= 0:
        return moved
    after = _unsent(ledger, run_id)
    channels = channels_of(prepared)
    left = moved
    tally: Tally[tuple[str, str, str]] = Tally()
    for account in sorted(before, key=lambda a: -before[a]):
        n = min(left, max(0, before[account] - after.get(account, 0)))
        tally[(channels.get(account, ""), account, status.value)] += n
        left -= n
    if left:  # another process closed some meanwhile: the account that had the most takes the rest
        account = max(before, key=lambda a: before[a])
        tally[(channels.get(account, ""), account, status.value)] += left
    _count(prepared.name, tally)
    return moved


def _unsent(ledger: Ledger, run_id: str) -> dict[str, int]:
    per = ledger.unsent_per_provider(run_id, "-", datetime.now(UTC))
    unsent = {a: c.get(Status.CREATED.value, 0) + c.get(Status.WAITING.value, 0) for a, c in per.items()}
    return {a: n for a, n in unsent.items() if n}


def count_skipped_fallbacks(prepared: PreparedCampaign, reached_at: Iterable[int], skipped: int) -> None:
    """``skipped`` fallback messages (``waiting`` → ``skipped``) of recipients reached on the channels
    of index ``reached_at`` (one entry per recipient).

    The ledger gives only the total. Each recipient's waiting messages are on the channels after the one
    that reached it: exact when every later channel had one (always with two channels), otherwise the
    total is shared out in proportion.
    """
    channels = prepared.channels
    expected: Tally[int] = Tally()
    for index in reached_at:
        for later in range(index + 1, len(channels)):
            expected[later] += 1
    tally: Tally[tuple[str, str, str]] = Tally()
    for index, n in _apportion(expected, skipped).items():
        channel = channels[index]
        tally[(str(channel.channel), channel.providers[0], Status.SKIPPED.value)] += n
    _count(prepared.name, tally)


def _apportion(weights: Tally[int], total: int) -> dict[int, int]:
    """``total`` shared out in proportion to ``weights`` (largest remainders), in whole numbers."""
    whole = sum(weights.values())
    if total <= 0 or whole <= 0:
        return {}
    if whole == total:
        return dict(weights)
    shares = {k: w * total / whole for k, w in weights.items()}
    out = {k: int(s) for k, s in shares.items()}
    rest = total - sum(out.values())
    for k in sorted(shares, key=lambda k: out[k] - shares[k])[:rest]:
        out[k] += 1
    return out


def count_request(provider: str, channel: str, seconds: float, error: BaseException | None) -> None:
    """One request to a provider account: its outcome and how long it took."""
    if error is None:
        outcome = "ok"
    elif isinstance(error, ThrottledError):
        outcome = "throttled"
    elif isinstance(error, TransientError):
        outcome = "transient"
    elif isinstance(error, Exception):  # PermanentError, TechnicalError, a driver's own failure
        outcome = "permanent"
    else:  # the task was cancelled or the process is stopping: no answer, nothing to count
        return
    _child(PROVIDER_REQUESTS, provider, outcome).inc()
    _child(PROVIDER_LATENCY, provider, channel).observe(max(seconds, 0.0))


def count_sms_parts(provider: str, encoding: str, parts: int) -> None:
    """An SMS a provider accepted: its parts, by encoding."""
    if parts > 0:
        _child(SMS_PARTS, provider, str(encoding)).inc(parts)


# -- live gauges and endpoints ------------------------------------------------------------------------


class LiveCollector(Collector):
    """``smartpush_run_messages`` and ``smartpush_queue_messages``, read when scraped.

    ``ledger`` None leaves the runs out; ``broker`` (a Dramatiq broker, or a ``redis://`` URL) None
    leaves the queues out. Each read is kept :data:`LIVE_TTL_S`; a part that fails is logged (its
    exception type only, never a URL) and left out of that scrape.
    """

    def __init__(
        self, ledger: Ledger | None, broker: dramatiq.Broker | str | None, *, ttl_s: float = LIVE_TTL_S
    ) -> None:
        self.ledger = ledger
        self.broker = broker
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None
        self._redis: Any = None

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(RUN_MESSAGES, _RUN_HELP, labels=["run", "status"]),
            GaugeMetricFamily(QUEUE_MESSAGES, _QUEUE_HELP, labels=["queue", "state"]),
        ]

    def collect(self) -> Iterable[Metric]:
        with self._lock:  # one reader at a time; concurrent scrapes share its answer
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.ttl_s:
                self._cached = (now, list(self._read()))
            return list(self._cached[1])

    def _read(self) -> Iterator[Metric]:
        if self.ledger is not None:
            runs = GaugeMetricFamily(RUN_MESSAGES, _RUN_HELP, labels=["run", "status"])
            try:
                for run_id, status, n in self.run_messages():
                    runs.add_metric([run_id, status], n)
            except Exception as exc:
                log.warning("metrics: the ledger does not answer (%s)", type(exc).__name__)
            else:
                yield runs
        if self.broker is not None:
            queues = GaugeMetricFamily(QUEUE_MESSAGES, _QUEUE_HELP, labels=["queue", "state"])
            try:
                for queue, state, n in self.queue_messages():
                    queues.add_metric([queue, state], n)
            except Exception as exc:
                log.warning("metrics: the broker does not answer (%s)", type(exc).__name__)
            else:
                yield queues

    def run_messages(self) -> Iterator[tuple[str, str, int]]:
        """(run id, status, messages) of every run in progress or ended in the last minutes."""
        if self.ledger is None:
            return
        since = datetime.now(UTC) - ENDED_SHOWN
        for run in self.ledger.list_runs(limit=LIVE_RUNS):
            ended = run.state in (RunState.FINISHED, RunState.CANCELLED)
            if ended and (run.finished_at is None or run.finished_at < since):
                continue
            by_status: Tally[str] = Tally()
            for (_, status), n in self.ledger.counts(run.id).items():
                by_status[status.value] += n
            for status in Status:
                yield run.id, status.value, by_status[status.value]

    def queue_messages(self) -> list[tuple[str, str, int]]:
        """(queue, ``waiting`` or ``delayed``, segments) of each smartpush queue of the broker."""
        from dramatiq.brokers.stub import StubBroker
        from dramatiq.common import dq_name

        from .campaign import Priority
        from .queueing import NAMESPACE, queue_name

        names = [queue_name(p.value) for p in Priority]
        broker = self.broker
        if isinstance(broker, StubBroker):
            found = []
            for name in names:
                for state, key in (("waiting", name), ("delayed", dq_name(name))):
                    queue = broker.queues.get(key)
                    found.append((name, state, queue.qsize() if queue is not None else 0))
            return found
        client = self._client()
        if client is None:  # another kind of broker: nothing to read
            return []
        namespace = getattr(broker, "namespace", NAMESPACE)
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.llen(f"{namespace}:{name}")
            pipe.llen(f"{namespace}:{dq_name(name)}")
        lengths = pipe.execute()
        return [
            (name, state, int(lengths[2 * i + j]))
            for i, name in enumerate(names)
            for j, state in enumerate(("waiting", "delayed"))
        ]

    def close(self) -> None:
        """Close the Redis connection this collector opened (a broker's own is left to the broker)."""
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def _client(self) -> Any:
        if isinstance(self.broker, str):
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(
                    self.broker, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
                )
            return self._redis
        return getattr(self.broker, "client", None)


class _Default(Collector):
    """This process's own metrics (the default registry), for a registry that adds more to them."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def endpoint_registry(ledger: Ledger | None, broker: dramatiq.Broker | str | None) -> CollectorRegistry:
    """What a ``/metrics`` endpoint shows; build it once and expose it at every scrape.

    In multiprocess mode, the metrics of every process writing to ``PROMETHEUS_MULTIPROC_DIR`` (Dramatiq's
    ``dramatiq_*`` included); otherwise this process's own. Plus the live gauges of ``ledger`` and
    ``broker`` (:class:`LiveCollector`).
    """
    registry = CollectorRegistry()
    if multiprocess() or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess as mp

        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Default())
    registry.register(LiveCollector(ledger, broker))
    return registry
