"""The broker and the segment actor: how a run's segments travel to workers.

Embedded (no ``broker:``): Dramatiq's StubBroker and worker threads in the ``send`` process itself.
Distributed (``broker: redis://…``): Dramatiq's RedisBroker, tuned so that a killed worker's messages
come back within seconds, not minutes (``research/ecosystem.md`` §1.2).

One Dramatiq message is one segment: ``send_segment(run_id, segment)``. Each priority has its own
queue so ``urgent`` never waits behind ``bulk``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker

from .campaign import Priority
from .config import Config
from .errors import ConfigError, InfrastructureError

__all__ = ["Dispatcher", "queue_name"]

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
            namespace="smartpush",
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


class Dispatcher:
    """The segment actors of one process, bound to its broker and to ``handler``."""

    def __init__(self, config: Config, handler: Handler, broker: dramatiq.Broker | None = None) -> None:
        self.broker = broker or make_broker(config)
        self.url = config.settings.broker or "(embedded)"
        self.actors: dict[str, dramatiq.Actor[Any, Any]] = {}
        for priority in Priority:
            name = f"send_segment_{priority.value}"

            def send_segment(run_id: str, segment: int) -> None:
                handler(run_id, segment)

            send_segment.__name__ = name
            self.actors[priority.value] = dramatiq.actor(
                actor_name=name,
                queue_name=queue_name(priority.value),
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
