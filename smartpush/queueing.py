"""The broker and the segment actor: how a run's segments travel to workers.

Embedded (no ``broker:``): Dramatiq's StubBroker and worker threads in the ``send`` process itself.
Distributed (``broker: redis://…``): Dramatiq's RedisBroker, tuned so that a killed worker's messages
come back within seconds, not minutes (``research/ecosystem.md`` §1.2).

One Dramatiq message is one segment: ``send_segment(run_id, segment)``. Each priority has its own
queue and its own actor priority, so ``urgent`` never waits behind ``bulk``: a worker process runs the
urgent segments it has fetched first, and a running bulk or normal segment gives its thread up after
its current batch when :class:`Backlog` sees higher-priority segments waiting for one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker

from .campaign import Priority
from .config import Config
from .errors import ConfigError, InfrastructureError

__all__ = ["ACTOR_PRIORITY", "NAMESPACE", "Backlog", "Dispatcher", "queue_name"]

logger = logging.getLogger("smartpush.queueing")

#: A dead worker's unacknowledged segments are requeued after this long without a heartbeat.
#: Dramatiq's default (60 s) plus its 0.1 % maintenance chance left them stranded for minutes.
HEARTBEAT_TIMEOUT_MS = 15_000
#: Chance, per million broker calls, of a maintenance pass that requeues a dead worker's messages (2 %).
MAINTENANCE_CHANCE = 20_000
#: A segment actor that raises (database down, a bug) is retried this often, with backoff.
ACTOR_MAX_RETRIES = 20
ACTOR_MIN_BACKOFF_MS = 1_000
ACTOR_MAX_BACKOFF_MS = 60_000
#: Dramatiq interrupts a segment after this long; the actor itself yields after SEGMENT_SLICE_S.
ACTOR_TIME_LIMIT_MS = 5 * 60_000
#: Dramatiq's actor ``priority`` of each campaign priority: among the segments a worker process has
#: fetched (its prefetch), the lowest number runs first.
ACTOR_PRIORITY = {Priority.URGENT.value: 0, Priority.NORMAL.value: 10, Priority.BULK.value: 20}
#: A broker queue's length is read at most this often per process: every worker thread asks after
#: every batch, and a message that has just arrived is fetched within Dramatiq's 1 s idle poll anyway.
QUEUE_LENGTH_TTL_S = 0.5
#: The prefix of smartpush's Redis keys: queue ``smartpush-normal`` is list ``smartpush:smartpush-normal``.
NAMESPACE = "smartpush"

Handler = Callable[[str, int], None]


def queue_name(priority: str) -> str:
    return f"smartpush-{priority}"


def _unreachable(url: str, exc: BaseException) -> InfrastructureError:
    where = url.split("@")[-1]  # never print a password from the URL
    return InfrastructureError(
        f"the broker {where} cannot be reached ({type(exc).__name__}); check that Redis runs and `broker:` "
        "in smartpush.yaml (or SMARTPUSH_BROKER_URL)"
    )


def make_broker(config: Config) -> dramatiq.Broker:
    """The configured broker, set as Dramatiq's global broker."""
    url = config.settings.broker
    broker: dramatiq.Broker
    if url is None:
        broker = StubBroker()
        broker.emit_after("process_boot")
    elif url.startswith(("redis://", "rediss://", "unix://")):
        import redis
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(  # type: ignore[no-untyped-call]
            url=url,
            namespace=NAMESPACE,
            heartbeat_timeout=HEARTBEAT_TIMEOUT_MS,
            maintenance_chance=MAINTENANCE_CHANCE,
        )
        try:
            broker.client.ping()
        except redis.RedisError as exc:
            raise _unreachable(url, exc) from None
    else:
        raise ConfigError(f"broker: '{url.split('://')[0]}://' is not supported; use redis://host:6379/0")
    dramatiq.set_broker(broker)
    return broker


class Backlog(dramatiq.Middleware):
    """Whether segments of a higher priority wait for a worker thread of this process.

    Two places are looked at, both cheap. First the process's own work queue: Dramatiq's consumers
    fetch each queue's messages ahead of time (``dramatiq_queue_prefetch`` per queue), so an urgent
    segment leaves Redis within a second and then waits in memory for a free thread; that is where a
    busy worker finds it. Then the broker's queues this process serves (Redis ``LLEN`` or the stub
    queue's size, cached for :data:`QUEUE_LENGTH_TTL_S`), for segments no consumer has fetched yet.
    Outside a worker (no Dramatiq ``Worker`` started in this process) nothing is ever waiting.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        self.worker: dramatiq.Worker | None = None
        self._lengths: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.worker = worker

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.worker is worker:
            self.worker = None

    def waiting_before(self, priority: str) -> bool:
        """Whether a segment of a higher priority than ``priority`` waits for a thread."""
        rank = ACTOR_PRIORITY[priority]
        higher = [p for p, r in ACTOR_PRIORITY.items() if r < rank]
        worker = self.worker
        if not higher or worker is None:
            return False
        work = worker.work_queue
        with work.mutex:  # a heap: its first item is the next one a free thread takes
            head = _actor_priority(work.queue[0]) if work.queue else None
        if head is not None and head < rank:
            return True
        served = worker.consumer_whitelist or self.broker.get_declared_queues()
        return any(self.length(queue_name(p)) > 0 for p in higher if queue_name(p) in served)

    def length(self, queue: str) -> int:
        """Messages ready in the broker's ``queue`` (not delayed, not yet fetched); cached briefly."""
        now = time.monotonic()
        with self._lock:
            cached = self._lengths.get(queue)
            if cached is not None and now - cached[0] < QUEUE_LENGTH_TTL_S:
                return cached[1]
            # Other threads keep the last answer while this one asks the broker.
            self._lengths[queue] = (now, cached[1] if cached is not None else 0)
        try:
            length = self._read_length(queue)
        except Exception as exc:  # a broker hiccup must not stop a segment: assume nothing waits
            logger.debug(
                "length of queue %s unknown (%s)",
                queue,
                type(exc).__name__,
                extra={"queue": queue, "code": type(exc).__name__},
            )
            length = 0
        with self._lock:
            self._lengths[queue] = (time.monotonic(), length)
        return length

    def _read_length(self, queue: str) -> int:
        broker: Any = self.broker
        if isinstance(broker, StubBroker):
            stub = broker.queues.get(queue)
            return stub.qsize() if stub is not None else 0
        client = getattr(broker, "client", None)
        if client is None:  # another broker type: only the process's own work queue is looked at
            return 0
        return int(client.llen(f"{broker.namespace}:{queue}"))


def _actor_priority(item: object) -> int | None:
    """The priority of an item of Dramatiq's work queue: ``_WorkQueueItem`` in 2.x, a tuple before."""
    found = getattr(item, "priority", None)
    if found is None and isinstance(item, tuple) and item:
        found = item[0]
    return found if isinstance(found, int) else None


class Dispatcher:
    """The segment actors of one process, bound to its broker and to ``handler``."""

    def __init__(self, config: Config, handler: Handler, broker: dramatiq.Broker | None = None) -> None:
        self.broker = broker or make_broker(config)
        self.url = config.settings.broker or "(embedded)"
        found = [m for m in self.broker.middleware if isinstance(m, Backlog)]
        self.backlog = found[0] if found else Backlog(self.broker)
        if not found:
            self.broker.add_middleware(self.backlog)
        self.actors: dict[str, dramatiq.Actor[Any, Any]] = {}
        for priority in Priority:
            name = f"send_segment_{priority.value}"

            def send_segment(run_id: str, segment: int) -> None:
                handler(run_id, segment)

            send_segment.__name__ = name
            self.actors[priority.value] = dramatiq.actor(
                actor_name=name,
                queue_name=queue_name(priority.value),
                priority=ACTOR_PRIORITY[priority.value],
                broker=self.broker,
                max_retries=ACTOR_MAX_RETRIES,
                min_backoff=ACTOR_MIN_BACKOFF_MS,
                max_backoff=ACTOR_MAX_BACKOFF_MS,
                time_limit=ACTOR_TIME_LIMIT_MS,
            )(send_segment)

    @property
    def queues(self) -> set[str]:
        return {queue_name(p.value) for p in Priority}

    def enqueue(self, run_id: str, segment: int, priority: str, *, delay_ms: int | None = None) -> None:
        actor = self.actors[priority]
        try:
            if delay_ms:
                actor.send_with_options(args=(run_id, segment), delay=max(1, int(delay_ms)))
            else:
                actor.send(run_id, segment)
        except (dramatiq.errors.DramatiqError, OSError) as exc:
            raise _unreachable(self.url, exc) from None
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):  # redis-py errors are not OSError subclasses
                raise _unreachable(self.url, exc) from None
            raise
        logger.debug(
            "run %s segment %d queued on %s%s",
            run_id,
            segment,
            queue_name(priority),
            f" for {delay_ms / 1000:.1f} s from now" if delay_ms else "",
            extra={
                "run_id": run_id,
                "segment": segment,
                "queue": queue_name(priority),
                "outcome": "queued",
                "delay_s": delay_ms / 1000 if delay_ms else 0.0,
            },
        )
